"""Images/s and peak memory of ConvNeXtFused against eager PyTorch and torch.compile.

    python benchmarks/throughput.py                     # GPU: ConvNeXt-T, 224, bf16, infer + train
    python benchmarks/throughput.py --model small --bench train
    python benchmarks/throughput.py --quick             # seconds-long smoke run (atto, 64 px)

GPU default: ConvNeXt-T at 224x224, bf16 autocast, channels-last inputs; inference at batch 256
(inference_mode), training at batch 128 (forward + cross-entropy + backward + AdamW step).
Without a GPU the default is a CPU run: fp32, batch 8, ConvNeXt-T, inference and training, without
fused_compile (the fused ops are opaque to inductor, so on the CPU it only compiles the glue, and it
timed as fused_cpu did), so that it fits in under three minutes on two cores.

Providers:
  eager                the reference model (official code path) on NCHW inputs
  eager_channels_last  the reference model and inputs in channels_last memory
  compile              torch.compile of eager_channels_last (--compile-mode, default mode)
  fused_<backend>      ConvNeXtFused with backend triton / cuda / cpu / torch
  fused_compile        torch.compile of ConvNeXtFused(backend="auto")
  resnet50             torchvision's ResNet-50, eager channels_last (a familiar reference point)
  cpu_torch_gemm       CPU: fused_cpu with its fp32 GEMMs on torch's own matmuls (MKL) instead of
                       oneDNN (CONVNEXT_KERNELS_CPU_ONEDNN=0): what the fusion gives without the
                       GEMM library it picks on AMD CPUs (default where fused_cpu runs oneDNN)

Figures: images/s from the median of the timed iterations (CUDA events on GPU, each provider
alone; perf_counter on CPU, providers taking turns iteration by iteration so that load from
other processes on a shared machine falls on all of them alike), peak memory per image from
torch.cuda.max_memory_allocated over the timed iterations (weights, gradients and optimizer
state included; not measured on CPU), speedup against eager_channels_last. A provider that
fails (unavailable backend, compile error, out of memory) gets an `error` string in its record;
the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import common

ck = common.import_package()
from convnext_kernels.model import _CONFIGS  # noqa: E402  (after import_package set up the path)
from convnext_kernels.reference import ConvNeXt  # noqa: E402

MODELS = tuple(_CONFIGS)
ALL_PROVIDERS = ("eager", "eager_channels_last", "compile", "fused_triton", "fused_cuda", "fused_cpu",
                 "fused_torch", "fused_compile", "resnet50", "cpu_torch_gemm")
# A fused backend with an environment switch set around each step, by provider: (backend,
# variable, value).
ENV_PROVIDERS = {"cpu_torch_gemm": common.CPU_TORCH_GEMM}
SPEEDUP_BASE = "eager_channels_last"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Defaults per setting: GPU as in the issue, CPU sized to under three minutes on two cores (9
# timed rounds: with 5, the medians of one run moved by up to 4% between runs on a shared
# 2-core machine, as much as the differences measured), quick sized to seconds (the test suite
# runs it).
PROFILES = {
    "gpu": dict(model="tiny", img_size=224, dtype="bfloat16", bench="both", infer_batch=256,
                train_batch=128, warmup=5, iters=30),
    "cpu": dict(model="tiny", img_size=224, dtype="float32", bench="both", infer_batch=8,
                train_batch=8, warmup=1, iters=9),
    "quick": dict(model="atto", img_size=64, dtype="float32", bench="both", infer_batch=2,
                  train_batch=2, warmup=1, iters=3),
}


def torchvision_missing() -> str:
    try:
        import torchvision  # noqa: F401
    except Exception as e:
        return f"torchvision does not import ({common.short_error(e)})"
    return ""


def provider_unavailable(provider: str, device: torch.device) -> str:
    """Empty when the provider can run on device, else why not."""
    from convnext_kernels.backends import unavailable_reason

    if provider.startswith("fused_") and provider != "fused_compile":
        return unavailable_reason(provider[len("fused_"):], device)
    if provider in ENV_PROVIDERS:
        why = unavailable_reason(ENV_PROVIDERS[provider][0], device)
        if not why and provider == "cpu_torch_gemm":
            why = common.cpu_torch_gemm_unavailable()
        return why
    if provider == "resnet50":
        return torchvision_missing()
    return ""


def default_providers(device: torch.device, quick: bool) -> list[str]:
    """Reference providers, the fused backends worth timing here (common.fused_backends) and, on
    a GPU, fused_compile and ResNet-50; --quick leaves out the compile providers (they take
    minutes). On the CPU, fused_compile costs half a minute of compiling for a figure within noise
    of fused_cpu's (13.5 vs 13.4 img/s infer, 3.8 vs 4.0 train, 2-core EPYC, 2026-12-06), and
    without it the default run fits in three minutes from a cold compile cache."""
    fused = [f"fused_{b}" for b in common.fused_backends(ck, device)]
    names = ["eager", "eager_channels_last", "compile", *fused]
    if "fused_cpu" in fused and not common.cpu_torch_gemm_unavailable():
        names.append("cpu_torch_gemm")
    if device.type == "cuda":
        names.append("fused_compile")
        if not torchvision_missing():
            names.append("resnet50")
    if quick:
        names = [p for p in names if "compile" not in p]
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, help="ConvNeXt size (default tiny; atto under --quick)")
    p.add_argument("--batch-size", type=int,
                   help="batch for both benches (default: 256 infer / 128 train on GPU, 8 on CPU)")
    p.add_argument("--img-size", type=int, help="input height = width (default 224)")
    p.add_argument("--dtype", choices=DTYPES, help="autocast dtype; float32 = no autocast "
                   "(default bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--bench", choices=("infer", "train", "both"),
                   help="default: both")
    p.add_argument("--providers", help=f"comma-separated subset of {','.join(ALL_PROVIDERS)} "
                   "(default: all that run here)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for compile / fused_compile (default: torch's default mode)")
    p.add_argument("--warmup", type=int, help="untimed iterations after the first call")
    p.add_argument("--iters", type=int, help="timed iterations (default 30 on GPU, 5 on CPU)")
    p.add_argument("--drop-path", type=float, default=0.0, help="drop_path_rate when training")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch.set_num_threads (default: torch's default, all cores)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", type=Path, default=common.DEFAULT_RESULTS_DIR, help="results directory")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: atto, 64 px, batch 2, 3 iterations, no compile providers unless named")
    args = p.parse_args(argv)

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = dict(PROFILES["quick" if args.quick else ("gpu" if args.device.type == "cuda" else "cpu")])
    if args.quick and args.device.type == "cuda":
        profile["dtype"] = PROFILES["gpu"]["dtype"]  # smoke-test the GPU path as it is benchmarked
    for key in ("model", "img_size", "dtype", "bench", "warmup", "iters"):
        if getattr(args, key) is None:
            setattr(args, key, profile[key])
    args.infer_batch = args.batch_size or profile["infer_batch"]
    args.train_batch = args.batch_size or profile["train_batch"]
    if args.providers:
        args.providers = common.comma_subset(p, args.providers, ALL_PROVIDERS, "--providers")
    else:
        args.providers = default_providers(args.device, args.quick)
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be at least 1 and --warmup at least 0")
    return args


# ----------------------------------------------------------------------------------------------
# Models and steps
# ----------------------------------------------------------------------------------------------
def build_model(provider: str, args) -> tuple[torch.nn.Module, str, bool]:
    """(model on device, backend label, whether inputs are channels_last) for a provider."""
    depths, dims = _CONFIGS[args.model]
    drop_path = args.drop_path
    if provider == "resnet50":
        import torchvision

        model, backend, channels_last = torchvision.models.resnet50(), "torch", True
    elif provider in ("eager", "eager_channels_last", "compile"):
        model = ConvNeXt(depths=depths, dims=dims, drop_path_rate=drop_path)
        backend, channels_last = ("inductor" if provider == "compile" else "torch"), provider != "eager"
    else:
        if provider in ENV_PROVIDERS:
            backend = ENV_PROVIDERS[provider][0]
        else:
            backend = "auto" if provider == "fused_compile" else provider[len("fused_"):]
        model = ck.ConvNeXtFused(depths=depths, dims=dims, drop_path_rate=drop_path, backend=backend)
        if backend == "auto":
            from convnext_kernels.backends import resolve_backend

            backend = resolve_backend("auto", args.device)
        channels_last = True
    model = model.to(args.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if provider.endswith("compile"):
        model = torch.compile(model, mode=args.compile_mode)
    return model, backend, channels_last


def autocast(args):
    if args.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(args.device.type, dtype=DTYPES[args.dtype])


def make_step(model: torch.nn.Module, bench: str, batch: int, channels_last: bool, args):
    """The callable timed for one iteration, with its inputs made once."""
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=args.device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if bench == "infer":
        model.eval()

        def infer():
            with torch.inference_mode(), autocast(args):
                model(x)

        return infer

    model.train()
    labels = torch.randint(0, 1000, (batch,), device=args.device)
    # torch's fused AdamW (GPU and, since torch 2.4, CPU) keeps the optimizer step small and equal
    # for everyone. (On the CPU the default for-loop AdamW took 74 ms a step for ConvNeXt-T's
    # parameters, the fused one 14 ms: 2-thread AMD EPYC, 2026-12-06.)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def train():
        with autocast(args):
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return train


def release_memory(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()  # compiled graphs of one provider must not count against the next
    if device.type == "cuda":
        torch.cuda.empty_cache()


def new_record(provider: str, bench: str, args) -> dict:
    return {
        "model": "resnet50" if provider == "resnet50" else f"convnext_{args.model}",
        "bench": bench, "provider": provider, "backend": None, "dtype": args.dtype,
        "batch_size": args.infer_batch if bench == "infer" else args.train_batch, "img_size": args.img_size,
        "img_per_s": None, "img_per_s_best": None, "peak_mem_mb_per_img": None, "peak_mem_mb": None,
        "ms_per_iter_median": None, "iter_ms": [], "iters": args.iters, "warmup": args.warmup,
        "compile_mode": (args.compile_mode or "default") if "compile" in provider else None, "error": None,
    }


def prepare(record: dict, args):
    """The provider's step, called once (compilation, autotuning and lazy set-up happen there and
    are not timed), or None with record["error"] set."""
    why = provider_unavailable(record["provider"], args.device)
    if why:
        record["error"] = f"unavailable: {why}"
        return None
    try:
        model, record["backend"], channels_last = build_model(record["provider"], args)
        step = make_step(model, record["bench"], record["batch_size"], channels_last, args)
        if record["provider"] in ENV_PROVIDERS:
            step = common.with_env(step, *ENV_PROVIDERS[record["provider"]][1:])
        step()
        common.synchronize(args.device)
        return step
    except Exception as e:  # one failing provider is a finding, not the end of the run
        record["error"] = common.short_error(e)
        return None


def finish(record: dict, times: list[float], peak_mb=None) -> None:
    seconds = common.median(times)
    record["iter_ms"] = [round(t * 1e3, 4) for t in times]
    record["iters"] = len(times)
    record["ms_per_iter_median"] = seconds * 1e3
    record["img_per_s"] = record["batch_size"] / seconds
    # Load from other processes only ever adds time: on a shared CPU the best iteration says
    # what the code can do, the median what a user saw.
    record["img_per_s_best"] = record["batch_size"] / min(times)
    if peak_mb is not None:
        record["peak_mem_mb"] = peak_mb
        record["peak_mem_mb_per_img"] = peak_mb / record["batch_size"]


def run_one_at_a_time(bench: str, args, bar, records: list[dict]) -> None:
    """GPU: each provider alone on the device (its own peak memory), freed before the next. Each
    record goes into `records` before it is measured, so an interrupted run keeps the ones done."""
    lost = None  # set once the CUDA context is unusable (a sticky error such as an illegal access)
    for provider in args.providers:
        bar.set(f"{bench} {provider}")
        record = new_record(provider, bench, args)
        records.append(record)
        bar.advance()
        if lost is not None:
            record["error"] = f"not run: the CUDA context was lost earlier ({lost})"
            continue
        step = prepare(record, args)
        if step is not None:
            try:
                if args.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(args.device)
                times = common.time_iterations(step, args.device, args.warmup, args.iters)
                peak = torch.cuda.max_memory_allocated(args.device) / 1e6 if args.device.type == "cuda" else None
                finish(record, times, peak)
            except Exception as e:
                record["error"] = common.short_error(e)
        del step
        try:
            release_memory(args.device)
        except Exception as e:  # the rest are recorded as not run; main still writes the results
            lost = common.short_error(e)


def run_interleaved(bench: str, args, bar, records: list[dict]) -> None:
    """CPU: all providers built first, then timed taking turns (common.time_interleaved)."""
    mine = [new_record(p, bench, args) for p in args.providers]
    records += mine
    steps = {}
    for record in mine:
        bar.set(f"{bench} {record['provider']}: set-up")
        step = prepare(record, args)
        if step is not None:
            steps[record["provider"]] = step
        bar.advance()
    rounds = args.warmup + args.iters
    bar.set(f"{bench}: round 1 of {rounds}")

    def on_round(i):  # round i + 1 (of rounds) is done
        if i + 1 < rounds:
            bar.set(f"{bench}: round {i + 2} of {rounds}")
        bar.advance()

    times, errors = common.time_interleaved(steps, args.warmup, args.iters, on_round=on_round)
    for record in mine:
        if record["provider"] in errors:
            record["error"] = common.short_error(errors[record["provider"]])
        elif record["provider"] in times:
            finish(record, times[record["provider"]])
    steps.clear()
    release_memory(args.device)


def add_ratios(records: list[dict]) -> None:
    """speedup (img/s) and memory ratio of every record against eager_channels_last, same bench."""
    base = {r["bench"]: r for r in records if r["provider"] == SPEEDUP_BASE and r["img_per_s"]}
    for r in records:
        b = base.get(r["bench"])
        r["speedup_vs_eager_channels_last"] = (r["img_per_s"] / b["img_per_s"]
                                               if b and r["img_per_s"] else None)
        r["mem_ratio_vs_eager_channels_last"] = (
            r["peak_mem_mb_per_img"] / b["peak_mem_mb_per_img"]
            if b and r["peak_mem_mb_per_img"] and b["peak_mem_mb_per_img"] else None)


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------
TABLE_HEADERS = ("bench", "provider", "backend", "batch", "img/s", "x eager_cl", "best img/s", "peak MB/img",
                 "iters", "error")


def table_rows(records: list[dict]) -> list[list[str]]:
    return [[r["bench"], r["provider"], r["backend"] or "-", r["batch_size"], common.fmt(r["img_per_s"]),
             common.fmt(r["speedup_vs_eager_channels_last"], ".2f"), common.fmt(r["img_per_s_best"]),
             common.fmt(r["peak_mem_mb_per_img"], ".1f"),
             r["iters"] if r["img_per_s"] else "-", r["error"] or ""] for r in records]


def describe_run(args) -> str:
    where = "GPU" if args.device.type == "cuda" else "CPU run (no GPU used)"
    return (f"convnext_{args.model}, {args.img_size}x{args.img_size}, {args.dtype}"
            f"{' autocast' if args.dtype != 'float32' else ''}, channels-last; {where}")


def markdown(payload: dict, records: list[dict], chart_name: str, args) -> str:
    return "\n".join([
        common.markdown_header("Throughput: " + describe_run(args), payload),
        f"Images/s: median of {args.iters} timed iterations after {args.warmup} untimed warm-up "
        f"iteration(s) and the first call; best img/s: the fastest iteration. Peak memory: "
        f"torch.cuda.max_memory_allocated over the timed iterations divided by the batch (n/a on CPU). "
        f"Speedup against eager_channels_last.",
        "",
        common.markdown_table(TABLE_HEADERS, table_rows(records)),
        "",
        f"![images/s by provider]({chart_name})",
    ])


def chart(path: Path, records: list[dict], args, device_label: str):
    providers = list(dict.fromkeys(r["provider"] for r in records))
    benches = list(dict.fromkeys(r["bench"] for r in records))
    by_key = {(r["bench"], r["provider"]): r["img_per_s"] for r in records}
    series = {b: [by_key.get((b, p)) for p in providers] for b in benches}
    title = f"convnext_{args.model} {args.img_size}px {args.dtype}, {device_label}: images/s"
    return common.bar_chart(path, title, "images / s", providers, series)


def main(argv=None) -> int:
    args = parse_args(argv)
    benches = ("infer", "train") if args.bench == "both" else (args.bench,)
    config = {"model": f"convnext_{args.model}", "img_size": args.img_size, "dtype": args.dtype,
              "bench": list(benches), "infer_batch": args.infer_batch, "train_batch": args.train_batch,
              "providers": args.providers, "warmup": args.warmup, "iters": args.iters,
              "compile_mode": args.compile_mode or "default", "drop_path_rate": args.drop_path,
              "quick": args.quick}
    payload = common.environment(args.device, "throughput", config)
    print(f"{describe_run(args)}; {payload['device']}", flush=True)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as any real training script would

    interleave = args.device.type == "cpu"
    steps_per_bench = len(args.providers) + (args.warmup + args.iters if interleave else 0)
    records = []
    with common.keep_results_on_interrupt(payload, records), \
            common.Progress(len(benches) * steps_per_bench, "throughput") as bar:
        for bench in benches:
            try:
                (run_interleaved if interleave else run_one_at_a_time)(bench, args, bar, records)
            except Exception as e:  # keep what was measured: the results below are still written
                print(f"{bench}: stopped by {common.short_error(e)}", flush=True)
    add_ratios(records)
    common.finish_environment(payload)
    payload["results"] = records

    print(common.text_table(TABLE_HEADERS, table_rows(records)))
    stem = common.result_stem("throughput", args.device, [args.model, args.img_size, args.bench, args.dtype],
                              args.quick)
    device_label = common.device_slug(args.device)
    written = common.write_results(args.out, stem, payload, markdown(payload, records, f"{stem}.png", args),
                                   lambda path: chart(path, records, args, device_label))
    print("wrote " + ", ".join(str(p) for p in written))
    return common.exit_status(payload)


if __name__ == "__main__":
    sys.exit(main())
