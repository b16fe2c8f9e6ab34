"""Each fused op against eager PyTorch and torch.compile at the ConvNeXt-T stage shapes.

    python benchmarks/kernels.py                 # GPU: batch 128, bf16; CPU: batch 8, fp32
    python benchmarks/kernels.py --ops mlp_layerscale --passes fwd
    python benchmarks/kernels.py --quick         # smoke run: batch 1, no compile provider

Shapes (H = W, C): 56x96, 28x192, 14x384, 7x768 (the four stages of ConvNeXt-T at 224 px).
Passes: "fwd" (no autograd) and "fwd+bwd" (forward, then backward of a fixed output gradient
into the input and every parameter).

Providers:
  eager          dwconv: F.conv2d(groups=C) on the channels_last view + F.layer_norm;
                 mlp: Linear + GELU + Linear + mul(gamma) + add(shortcut); all tensors in --dtype
  compile        torch.compile of the eager function (fresh, static shapes, per case)
  fused_<b>      convnext_kernels.<op>(..., backend=b) for each fused backend that runs here
                 (triton and cuda on GPU, cpu on CPU); parameters in the dtypes the kernels take
                 (Linear weights in --dtype, the rest fp32), so no provider pays a cast
  triton_recompute, triton_stored
                 mlp_layerscale fwd+bwd only, GPU with Triton: the Triton launchers called
                 directly (no autograd), backward recomputing the pre-activation x @ W1.T + b1
                 (what the ops do) or reading it from a buffer the forward wrote (the
                 stored-activation variant). Same harness for both, so the pair answers which
                 is faster at each shape.
  cuda_mma_sync  mlp_layerscale, GPU with the cuda backend: fused_cuda with its kernels on mma.sync
                 (CONVNEXT_KERNELS_CUDA_MLP_WGMMA=0). On an H100 fused_cuda's kernels (fused or
                 two-GEMM forward, backward GEMMs) use wgmma, so the pair answers whether wgmma
                 pays at each shape.
  cpu_torch_gemm mlp_layerscale, CPU: fused_cpu with its fp32 GEMMs on torch's own matmuls (MKL)
                 instead of oneDNN (CONVNEXT_KERNELS_CPU_ONEDNN=0), so that what the GEMM library
                 gives is told apart from what the fusion gives.
  cuda_ring2     dwconv_layernorm, GPU with the cuda backend: fused_cuda with each thread of its
                 ring kernels convolving two channels at 2 pixels at every C
                 (CONVNEXT_KERNELS_CUDA_DWCONV_RING_CHANNELS=2), the choice before 2026-12-06
                 for C <= 384, where one channel at 4 pixels now runs (sm_90a SASS, bf16, 7 row
                 steps: forward 2,324 instructions against 2,303 but no spill reloads against
                 84; backward recompute 2,254 against 2,402, 148 of them reloads).
  triton_ring6, triton_rows32
                 dwconv_layernorm, GPU with Triton: fused_triton with one setting of its ring
                 kernels changed for the step: the forward's values of each accumulator per
                 thread 6 instead of 12 (the choice before 2026-12-06: a third more
                 instructions, ~40% fewer registers), or row chunks of up to 32 rows instead of
                 16 (28 at stages 1 and 2: fewer halo rows recomputed, half the programs).

Ceilings, measured in the same run: copy bandwidth (device-to-device copy of a large buffer,
read + write bytes / time), matmul peak (best of three large square matmuls in --dtype; on the
CPU in fp32 the faster of torch.mm and the oneDNN GEMM the cpu backend runs) and the
fp32 FMA rate (the same in fp32 with TF32 off: cuBLAS SGEMM, CUDA-core FFMA). Per case:
  bytes   the minimum traffic: every activation tensor read or written once (dwconv fwd: x, y;
          bwd: dy, x, dx. mlp fwd: x, shortcut, out and the Linear weights; bwd: dy, x, dx, the
          Linear weights and their gradients; the 4C hidden never leaves the chip)
  flops   dwconv 2*49*NHWC, mlp 16*NHWC*C (two GEMMs); fwd+bwd counts 3x the forward
  bound   max(bytes / copy bandwidth, flops / compute ceiling): the fastest a kernel could be, as far
          as the measured ceilings are the true ones. The compute ceiling is the matmul peak for
          mlp_layerscale (tensor cores) and the fp32 FMA rate for dwconv_layernorm: its conv runs
          on CUDA cores with exact fp32 accumulation, and on an H100 in bf16 its 49 FMAs a value
          take about as long as its bytes (forward; the backward's 3x the FMAs, longer), so that
          ceiling, not the bytes, can set its bound.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import common

ck = common.import_package()

STAGES = ((56, 96), (28, 192), (14, 384), (7, 768))  # (H = W, C) of ConvNeXt-T at 224 px
OPS = ("dwconv_layernorm", "mlp_layerscale")
PASSES = ("fwd", "fwd+bwd")
STAGE_PRIORITY = (1, 3, 2, 4)  # the order stages run in (case_order)
EPS = 1e-6
KERNEL_TAPS = 49
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROFILES = {
    "gpu": dict(batch_size=128, dtype="bfloat16", cpu_iters=10),  # GPU timing: CUDA graph replays
    "cpu": dict(batch_size=8, dtype="float32", cpu_iters=10),
    "quick": dict(batch_size=1, dtype="float32", cpu_iters=3),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, help="N (default 128 on GPU, 8 on CPU, 1 under --quick)")
    p.add_argument("--dtype", choices=DTYPES, help="activation dtype (default bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    p.add_argument("--passes", default=",".join(PASSES), help="comma-separated subset of " + ",".join(PASSES))
    p.add_argument("--stages", default="1,2,3,4", help="comma-separated ConvNeXt-T stages (1-4)")
    p.add_argument("--providers", help="comma-separated subset of eager,compile,fused_<backend> "
                   "(default: eager, compile and every fused backend that runs here)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", type=Path, default=common.DEFAULT_RESULTS_DIR, help="results directory")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 1, few iterations, no compile")
    args = p.parse_args(argv)

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = dict(PROFILES["quick" if args.quick else ("gpu" if args.device.type == "cuda" else "cpu")])
    if args.quick and args.device.type == "cuda":
        profile["dtype"] = PROFILES["gpu"]["dtype"]  # smoke-test the GPU path as it is benchmarked
    args.batch_size = args.batch_size or profile["batch_size"]
    args.dtype = args.dtype or profile["dtype"]
    args.cpu_iters = profile["cpu_iters"]
    args.ops = common.comma_subset(p, args.ops, OPS, "--ops")
    args.passes = common.comma_subset(p, args.passes, PASSES, "--passes")
    args.stages = [int(s) for s in common.comma_subset(p, args.stages, ("1", "2", "3", "4"), "--stages")]
    fused = [f"fused_{b}" for b in common.fused_backends(ck, args.device)]
    if args.providers:
        known = (["eager", "compile"] + [f"fused_{b}" for b in ck.BACKENDS] + list(PREACT_PROVIDERS)
                 + list(GEMM_PROVIDERS) + list(CUDA_RING_PROVIDERS) + list(RING_PROVIDERS))
        args.providers = common.comma_subset(p, args.providers, known, "--providers")
    else:
        args.providers = ["eager"] + ([] if args.quick else ["compile"]) + fused
        if "fused_triton" in fused and not args.quick:
            args.providers += list(PREACT_PROVIDERS) + list(RING_PROVIDERS)
        if "fused_cuda" in fused and not args.quick:
            args.providers += ["cuda_mma_sync", *CUDA_RING_PROVIDERS]
        if "fused_cpu" in fused and not args.quick and not common.cpu_torch_gemm_unavailable():
            args.providers.append("cpu_torch_gemm")
    return args


# Launcher-level providers comparing the two backward forms of mlp_layerscale (see above).
PREACT_PROVIDERS = ("triton_recompute", "triton_stored")
# A fused backend with an environment switch set for the whole step (forward and backward), by
# provider: (backend, variable, value). mlp_layerscale's GEMMs:
GEMM_PROVIDERS = {"cuda_mma_sync": ("cuda", "CONVNEXT_KERNELS_CUDA_MLP_WGMMA", "0"),
                  "cpu_torch_gemm": common.CPU_TORCH_GEMM}
# The same for dwconv_layernorm.
CUDA_RING_PROVIDERS = {"cuda_ring2": ("cuda", "CONVNEXT_KERNELS_CUDA_DWCONV_RING_CHANNELS", "2")}
ENV_PROVIDERS = {**GEMM_PROVIDERS, **CUDA_RING_PROVIDERS}  # every fused backend with a switch set
# fused_triton with a setting of convnext_kernels.triton.dwconv_layernorm changed for the whole
# step, by provider.
RING_PROVIDERS = {"triton_ring6": ("_RING_FWD_VALUES", 6), "triton_rows32": ("_RING_MAX_ROWS", 32)}


def providers_for(op: str, pass_: str, providers: list[str]) -> list[str]:
    """The providers that apply to one case (the preact pair: mlp_layerscale fwd+bwd only; the GEMM
    variants: mlp_layerscale; the ring variants: dwconv_layernorm)."""
    return [p for p in providers
            if (p not in PREACT_PROVIDERS or (op == "mlp_layerscale" and pass_ == "fwd+bwd"))
            and (p not in GEMM_PROVIDERS or op == "mlp_layerscale")
            and ((p not in RING_PROVIDERS and p not in CUDA_RING_PROVIDERS) or op == "dwconv_layernorm")]


def backend_of(provider: str) -> str | None:
    """The convnext_kernels backend a provider runs, None for eager / compile."""
    if provider.startswith("fused_"):
        return provider[len("fused_"):]
    if provider in PREACT_PROVIDERS or provider in RING_PROVIDERS:
        return "triton"
    if provider in ENV_PROVIDERS:
        return ENV_PROVIDERS[provider][0]
    return None


def with_ring_setting(step, name: str, value: int):
    """step() with convnext_kernels.triton.dwconv_layernorm.<name> = value while it runs (the
    launchers read it at each call)."""
    from convnext_kernels.triton import dwconv_layernorm as module

    def wrapped():
        old = getattr(module, name)
        setattr(module, name, value)
        try:
            step()
        finally:
            setattr(module, name, old)
    return wrapped


# ----------------------------------------------------------------------------------------------
# Ceilings
# ----------------------------------------------------------------------------------------------
def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy of a buffer far larger than any cache: (read + write) bytes / time."""
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = common.kernel_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Best of three square matmul sizes (the largest is not always the fastest)."""
    sizes = (4096, 8192, 16384) if device.type == "cuda" else (512, 1024, 2048)
    return max(_square_matmul_tflops(n, device, dtype) for n in sizes)


def fp32_fma_tflops(device: torch.device) -> float:
    """The CUDA-core fp32 FMA rate, as a fp32 matmul with TF32 off reaches it (SGEMM)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return matmul_tflops(device, torch.float32)
    finally:
        torch.set_float32_matmul_precision(previous)


def _square_matmul_tflops(n: int, device: torch.device, dtype: torch.dtype) -> float:
    # Its own function so that each size's operands are freed before the next size's are made.
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    products = [lambda: torch.mm(a, b)]
    onednn_linear = common.cpu_onednn_linear() if device.type == "cpu" and dtype == torch.float32 else None
    if onednn_linear is not None:
        # The fused cpu backend's fp32 GEMMs run on oneDNN (on AMD CPUs: faster than torch.mm's MKL).
        b_t = b.t()
        products.append(lambda: onednn_linear(a, b_t, None, "none", [], ""))
    ms = min(common.kernel_ms(product, device, cpu_iters=5) for product in products)
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------------------------
# The ops, per provider
# ----------------------------------------------------------------------------------------------
def dwconv_layernorm_eager(x, conv_weight, conv_bias, norm_weight, norm_bias):
    C = x.shape[-1]
    # x is NHWC contiguous, so its NCHW permute is a channels_last view: no copy either way.
    z = F.conv2d(x.permute(0, 3, 1, 2), conv_weight, conv_bias, padding=3, groups=C)
    return F.layer_norm(z.permute(0, 2, 3, 1), (C,), norm_weight, norm_bias, EPS)


def mlp_layerscale_eager(x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma):
    h = F.gelu(F.linear(x, fc1_weight, fc1_bias))
    return shortcut + F.linear(h, fc2_weight, fc2_bias) * gamma


def make_inputs(op: str, N: int, H: int, C: int, dtype: torch.dtype, fused: bool, device) -> dict:
    """Named inputs of one case, seeded so every provider sees the same values."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0, offset=0.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale + offset).to(device=device, dtype=dt)

    # The fused kernels take conv/norm parameters, biases and gamma in fp32 (see ops.py).
    small = torch.float32 if fused else dtype
    x = randn(N, H, H, C)
    if op == "dwconv_layernorm":
        return dict(x=x, conv_weight=randn(C, 1, 7, 7, scale=0.1, dt=small),
                    conv_bias=randn(C, scale=0.1, dt=small), norm_weight=randn(C, scale=0.1, offset=1.0, dt=small),
                    norm_bias=randn(C, scale=0.1, dt=small))
    return dict(x=x, shortcut=randn(N, H, H, C), fc1_weight=randn(4 * C, C, scale=C ** -0.5),
                fc1_bias=randn(4 * C, scale=0.1, dt=small), fc2_weight=randn(C, 4 * C, scale=(4 * C) ** -0.5),
                fc2_bias=randn(C, scale=0.1, dt=small), gamma=randn(C, scale=0.1, offset=1.0, dt=small))


def op_function(op: str, provider: str):
    eager = dwconv_layernorm_eager if op == "dwconv_layernorm" else mlp_layerscale_eager
    if provider == "eager":
        return eager
    if provider == "compile":
        return torch.compile(eager, dynamic=False)
    if provider.startswith("fused_"):
        backend = provider[len("fused_"):]
        fused_op = getattr(ck, op)
        if op == "dwconv_layernorm":
            return lambda **t: fused_op(**t, eps=EPS, backend=backend)
        return lambda **t: fused_op(**t, backend=backend)
    raise ValueError(f"unknown provider {provider!r}; expected eager, compile or fused_<backend>")


def preact_launcher_step(provider: str, inputs: dict, dy: torch.Tensor):
    """One fwd+bwd of the Triton mlp_layerscale launchers, pre-activation recomputed or stored."""
    from torch._library.triton import set_wrap_triton_enabled

    from convnext_kernels.triton import mlp_layerscale_bwd, mlp_layerscale_fwd

    x = inputs["x"]
    params = (inputs["fc1_weight"], inputs["fc1_bias"], inputs["fc2_weight"], inputs["fc2_bias"],
              inputs["gamma"], None)
    stored = provider == "triton_stored"
    rows, hidden = x.numel() // x.shape[-1], inputs["fc1_weight"].shape[0]

    def step():
        # Launched as the ops launch them: outside a triton_op, wrap_triton would send every
        # launch through torch's higher-order op (Python cost per launch, where not graphed).
        with set_wrap_triton_enabled(False):
            preact = torch.empty((rows, hidden), dtype=x.dtype, device=x.device) if stored else None
            mlp_layerscale_fwd(x, inputs["shortcut"], *params, preact_out=preact)
            mlp_layerscale_bwd(dy, x, *params, preact=preact)
    return step


def model_cost(op: str, pass_: str, N: int, H: int, C: int, dtype: torch.dtype) -> tuple[float, float]:
    """(minimum bytes moved, FLOPs) of one case; see the module docstring."""
    act = N * H * H * C * dtype.itemsize
    if op == "dwconv_layernorm":
        fwd_bytes, bwd_bytes = 2 * act, 3 * act
        fwd_flops = 2 * KERNEL_TAPS * N * H * H * C
    else:
        weights = 8 * C * C * dtype.itemsize
        fwd_bytes, bwd_bytes = 3 * act + weights, 3 * act + 2 * weights
        fwd_flops = 16 * N * H * H * C * C
    if pass_ == "fwd":
        return fwd_bytes, fwd_flops
    return fwd_bytes + bwd_bytes, 3 * fwd_flops


def new_record(op: str, pass_: str, stage: int, provider: str, args, ceilings: dict) -> dict:
    H, C = STAGES[stage - 1]
    N = args.batch_size
    nbytes, flops = model_cost(op, pass_, N, H, C, DTYPES[args.dtype])
    compute_tflops = ceilings["fp32_tflops"] if op == "dwconv_layernorm" else ceilings["matmul_tflops"]
    bound_ms = 1e3 * max(nbytes / (ceilings["copy_gbps"] * 1e9), flops / (compute_tflops * 1e12))
    return {"op": op, "pass": pass_, "stage": stage, "shape": [N, H, H, C], "provider": provider,
            "backend": backend_of(provider) or ("inductor" if provider == "compile" else "torch"),
            "dtype": args.dtype, "ms": None, "gb_per_s": None, "pct_copy_bw": None, "tflop_per_s": None,
            "pct_matmul_peak": None, "bound_ms": bound_ms, "pct_roofline": None,
            "timing": "perf_counter" if args.device.type == "cpu" else None,
            "model_bytes": nbytes, "model_flops": flops, "error": None}


def prepare(record: dict, args):
    """(step, tensors whose .grad to reset) for a record, after one untimed call (compilation,
    autotuning); None with record["error"] set when the provider cannot run."""
    provider = record["provider"]
    backend = backend_of(provider)
    if backend is not None:
        from convnext_kernels.backends import unavailable_reason

        why = unavailable_reason(backend, args.device)
        if not why and provider == "cpu_torch_gemm":
            why = common.cpu_torch_gemm_unavailable()
        if why:
            record["error"] = f"unavailable: {why}"
            return None
    N, H, _, C = record["shape"]
    try:
        inputs = make_inputs(record["op"], N, H, C, DTYPES[args.dtype], backend is not None, args.device)
        if provider in PREACT_PROVIDERS:
            step, leaves = preact_launcher_step(provider, inputs, torch.randn_like(inputs["x"])), []
            step()
            common.synchronize(args.device)
            return step, leaves
        variant = provider in ENV_PROVIDERS or provider in RING_PROVIDERS  # fused_<backend>, a setting changed
        fn = op_function(record["op"], f"fused_{backend}" if variant else provider)
        if record["pass"] == "fwd":
            def step():
                with torch.no_grad():
                    fn(**inputs)
            leaves = []
        else:
            leaves = [t.requires_grad_() for t in inputs.values()]
            dy = torch.randn_like(fn(**inputs))

            def step():
                fn(**inputs).backward(dy)
        if provider in ENV_PROVIDERS:
            step = common.with_env(step, *ENV_PROVIDERS[provider][1:])
        if provider in RING_PROVIDERS:
            step = with_ring_setting(step, *RING_PROVIDERS[provider])
        step()
        common.synchronize(args.device)
        return step, leaves
    except Exception as e:  # recorded, and the other providers run
        record["error"] = common.short_error(e)
        return None


def finish(record: dict, ms: float, ceilings: dict) -> None:
    gbps = record["model_bytes"] / (ms * 1e-3) / 1e9
    tflops = record["model_flops"] / (ms * 1e-3) / 1e12
    record.update(ms=ms, gb_per_s=gbps, pct_copy_bw=100 * gbps / ceilings["copy_gbps"], tflop_per_s=tflops,
                  pct_matmul_peak=100 * tflops / ceilings["matmul_tflops"],
                  pct_roofline=100 * record["bound_ms"] / ms)


def run_case(op: str, pass_: str, stage: int, args, ceilings: dict, results: list[dict]) -> None:
    """Every provider on one (op, pass, shape): on GPU one after the other (CUDA graph replays); on CPU
    taking turns call by call (common.time_interleaved), as the load of a shared machine drifts.
    The case's records join `results` before any is measured, so a run cut short mid-case keeps
    the providers it measured (the others are marked interrupted)."""
    records = [new_record(op, pass_, stage, p, args, ceilings) for p in providers_for(op, pass_, args.providers)]
    results.extend(records)
    by_provider = {r["provider"]: r for r in records}
    prepared = {}
    for record in records:
        step_and_leaves = prepare(record, args)
        if step_and_leaves is not None:
            prepared[record["provider"]] = step_and_leaves
    if args.device.type == "cuda":
        for provider, (step, leaves) in prepared.items():
            record = by_provider[provider]
            try:
                try:  # GPU time alone (see common.graphed_kernel_ms) ...
                    ms, record["timing"] = common.graphed_kernel_ms(step, grad_to_none=leaves), "cuda_graph"
                except Exception as e:  # ... or, where a provider cannot be captured, with its launch cost
                    record["graph_error"] = common.short_error(e)
                    ms, record["timing"] = common.kernel_ms(step, args.device, grad_to_none=leaves), "do_bench"
                finish(record, ms, ceilings)
            except Exception as e:
                record["error"] = common.short_error(e)
    else:
        def reset_grads(leaves):
            return lambda: [setattr(t, "grad", None) for t in leaves]

        times, errors = common.time_interleaved(
            {p: step for p, (step, _) in prepared.items()}, warmup=2, iters=args.cpu_iters,
            between={p: reset_grads(leaves) for p, (_, leaves) in prepared.items()})
        for provider, e in errors.items():
            by_provider[provider]["error"] = common.short_error(e)
        for provider, t in times.items():
            finish(by_provider[provider], 1e3 * common.median(t), ceilings)
    prepared.clear()
    torch._dynamo.reset()  # this case's compiled graphs are not needed again


def case_order(ops, passes, stages) -> list[tuple]:
    """(op, pass, stage) cases in the order they run: stage by stage, the most telling first, so
    that a run cut short by its time limit keeps whole stages: stage 1 (the dwconv bandwidth
    target, a third of the dwconv work), 3 (half the blocks, the MLP roofline target), 2, 4."""
    return [(op, pass_, stage) for stage in sorted(stages, key=STAGE_PRIORITY.index)
            for pass_ in passes for op in ops]


def add_speedups(records: list[dict]) -> None:
    eager = {(r["op"], r["pass"], r["stage"]): r["ms"] for r in records if r["provider"] == "eager" and r["ms"]}
    for r in records:
        base = eager.get((r["op"], r["pass"], r["stage"]))
        r["speedup_vs_eager"] = base / r["ms"] if base and r["ms"] else None


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------
TABLE_HEADERS = ("op", "pass", "shape NHWC", "provider", "ms", "GB/s", "% copy BW", "TFLOP/s",
                 "% matmul", "bound ms", "% roofline", "x eager", "error")


def case_label(r: dict) -> str:
    short = "dwconv_ln" if r["op"] == "dwconv_layernorm" else "mlp"
    return f"{short} {r['pass']} {r['shape'][1]}x{r['shape'][2]}x{r['shape'][3]}"


def table_rows(records: list[dict]) -> list[list[str]]:
    f = common.fmt
    return [[r["op"], r["pass"], "x".join(map(str, r["shape"])), r["provider"], f(r["ms"], ".4g"),
             f(r["gb_per_s"], ".1f"), f(r["pct_copy_bw"], ".1f"), f(r["tflop_per_s"], ".2f"),
             f(r["pct_matmul_peak"], ".1f"), f(r["bound_ms"], ".4g"), f(r["pct_roofline"], ".1f"),
             f(r["speedup_vs_eager"], ".2f"), r["error"] or ""] for r in records]


def markdown(payload: dict, records: list[dict], chart_name: str) -> str:
    c = payload["ceilings"]
    cfg = payload["config"]
    timing = ("GPU time alone: each provider captured in a CUDA graph, replayed after an L2 flush "
              "between CUDA events (record field timing = cuda_graph; do_bench, launch cost included, "
              "where a provider cannot be captured)" if payload["device_type"] == "cuda" else "time.perf_counter")
    return "\n".join([
        common.markdown_header(f"Fused ops at the ConvNeXt-T stage shapes: batch {cfg['batch_size']}, "
                               f"{cfg['dtype']}", payload),
        f"Ceilings measured in this run: copy {c['copy_gbps']:.1f} GB/s, {cfg['dtype']} matmul "
        f"{c['matmul_tflops']:.2f} TFLOP/s, fp32 FMA {c['fp32_tflops']:.2f} TFLOP/s (fp32 matmul, TF32 off). "
        f"Bound = max(minimum bytes / copy bandwidth, model FLOPs / compute ceiling: the matmul peak "
        f"for mlp_layerscale, the fp32 FMA rate for dwconv_layernorm's CUDA-core conv); % roofline = "
        f"bound / measured time. Times: median, {timing}.",
        "",
        common.markdown_table(TABLE_HEADERS, table_rows(records)),
        "",
        f"![% of roofline by case]({chart_name})",
    ])


def chart(path: Path, records: list[dict], title: str):
    cases = list(dict.fromkeys(case_label(r) for r in records))
    providers = list(dict.fromkeys(r["provider"] for r in records))
    value = {(case_label(r), r["provider"]): r["pct_roofline"] for r in records}
    series = {p: [value.get((c, p)) for c in cases] for p in providers}
    return common.bar_chart(path, title, "% of roofline bound (higher is better)", cases, series)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = {"batch_size": args.batch_size, "dtype": args.dtype, "ops": args.ops, "passes": args.passes,
              "stages": args.stages, "providers": args.providers, "quick": args.quick}
    payload = common.environment(args.device, "kernels", config)
    where = "GPU" if args.device.type == "cuda" else "CPU run (no GPU used)"
    print(f"fused ops, batch {args.batch_size}, {args.dtype}; {where}: {payload['device']}", flush=True)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the eager conv gets cuDNN's fastest algorithm

    ceilings = {"copy_gbps": copy_bandwidth_gbps(args.device),
                "matmul_tflops": matmul_tflops(args.device, DTYPES[args.dtype]), "matmul_dtype": args.dtype}
    # The fp32 FMA rate: a float32 matmul is that already where TF32 is off (the CPU's, or set so).
    same = args.dtype == "float32" and (args.device.type == "cpu" or torch.get_float32_matmul_precision() == "highest")
    ceilings["fp32_tflops"] = ceilings["matmul_tflops"] if same else fp32_fma_tflops(args.device)
    payload["ceilings"] = ceilings
    print(f"ceilings: copy {ceilings['copy_gbps']:.1f} GB/s, matmul {ceilings['matmul_tflops']:.2f} TFLOP/s, "
          f"fp32 FMA {ceilings['fp32_tflops']:.2f} TFLOP/s")

    cases = case_order(args.ops, args.passes, args.stages)
    records = []
    with common.keep_results_on_interrupt(payload, records), common.Progress(len(cases), "kernels") as bar:
        for op, pass_, stage in cases:
            bar.set(f"{op} {pass_} stage {stage}")
            run_case(op, pass_, stage, args, ceilings, records)
            bar.advance()
    add_speedups(records)
    # Reported op by op (stable: each case's providers keep their order).
    records.sort(key=lambda r: (OPS.index(r["op"]), PASSES.index(r["pass"]), r["stage"]))
    common.finish_environment(payload)
    payload["results"] = records

    print(common.text_table(TABLE_HEADERS, table_rows(records)))
    # A run over a subset (to split a long GPU run) gets its own file; the README merges them.
    subset = [("-".join(args.ops) if len(args.ops) < len(OPS) else None),
              ("-".join(args.passes) if len(args.passes) < len(PASSES) else None),
              ("stages" + "".join(map(str, args.stages)) if len(args.stages) < len(STAGES) else None)]
    stem = common.result_stem("kernels", args.device, [f"b{args.batch_size}", args.dtype, *filter(None, subset)],
                              args.quick)
    title = (f"fused ops, ConvNeXt-T stage shapes, batch {args.batch_size} {args.dtype}, "
             f"{common.device_slug(args.device)}")
    written = common.write_results(args.out, stem, payload, markdown(payload, records, f"{stem}.png"),
                                   lambda path: chart(path, records, title))
    print("wrote " + ", ".join(str(p) for p in written))
    return common.exit_status(payload)


if __name__ == "__main__":
    sys.exit(main())
