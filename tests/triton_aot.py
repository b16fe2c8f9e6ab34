"""Ahead-of-time compile of the Triton kernels for an H100 (sm_90) or A100 (sm_80), no GPU needed.

Run as a script by tests/test_triton_compile.py, in a child process whose environment has no
TRITON_INTERPRET (under the interpreter ``triton.jit`` gives no compilable function and the
launchers pick their interpreter-only config lists). It

1. runs the four Triton launchers on meta tensors with ``wrap_triton`` replaced by a recorder,
   so it sees exactly the launches (kernel, arguments, constexprs, num_warps) they make;
2. expands every autotuned launch over the kernel's GPU config list and specialises the
   arguments as Triton's JIT does (tensors 16-byte aligned; ints: == 1 -> constexpr,
   % 16 == 0 -> divisibility 16);
3. compiles each distinct (kernel, specialisation, config) once with
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` in a small process pool,
   and reads registers / spills from ptxas's ``-v`` log (TRITON_DUMP_PTXAS_LOG) and shared
   memory from the compiled metadata.

Writes one JSON object: {"error": str} when a Triton API it needs is missing, else
{"triton": version, "results": [...]}, one row per compile.

With --cubin-dir DIR each compile's cubin is written there too (row field "cubin"), for
benchmarks/sass_report.py to count its instructions.

usage: python tests/triton_aot.py OUT.json [--jobs 2] [--arch 90] [--cases bf16:96,...] [--cubin-dir DIR]
"""
import argparse
import contextlib
import importlib
import inspect
import io
import json
import multiprocessing
import os
import re
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor

# (dtype, N, H, W, C): the shapes the test compiles for, one per autotune list. fp32 runs with
# TF32 off (the launchers' input_precision "ieee" path), tf32 is fp32 with TF32 on.
CASES = {
    "bf16:96": ("bf16", 2, 56, 56, 96),
    # Batch 128: the backward conv kernel's programs take half an image here; everything else
    # specialises as at batch 2 and is compiled once. At batch 87 and 7x7 they take 2 images
    # (SAMPLES, specialised when 1): 87 * 49 rows, like 2 * 49, are no multiple of 16, so the
    # MLP kernels are not compiled again.
    "bf16:96:b128": ("bf16", 128, 56, 56, 96),
    "fp16:768:b87": ("fp16", 87, 7, 7, 768),
    "bf16:192": ("bf16", 2, 28, 28, 192),
    "bf16:256": ("bf16", 2, 14, 14, 256),
    "bf16:384": ("bf16", 2, 14, 14, 384),
    "fp16:768": ("fp16", 2, 7, 7, 768),
    "fp32:40": ("fp32", 2, 13, 17, 40),
    "fp32:192": ("fp32", 2, 28, 28, 192),
    "tf32:96": ("tf32", 2, 28, 28, 96),
    "tf32:192": ("tf32", 2, 28, 28, 192),
}
MODULES = ("convnext_kernels.triton.dwconv_layernorm", "convnext_kernels.triton.mlp_layerscale")

_REGS_RE = re.compile(r"Used (\d+) registers")
_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _missing_api():
    """Name of the first Triton API this script needs that this Triton lacks, else None."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        return "triton.backends.compiler.GPUTarget"
    try:
        from triton.compiler import ASTSource
    except ImportError:
        return "triton.compiler.ASTSource"
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        return "ASTSource(constexprs=...) (Triton >= 3.3)"
    fn = getattr(importlib.import_module(MODULES[0]), "_dwconv_layernorm_fwd_kernel")
    if not hasattr(fn, "arg_names"):
        return "JITFunction.arg_names"
    if not all(hasattr(fn, "params") and hasattr(p, "is_constexpr") for p in fn.params):
        return "JITFunction.params[i].is_constexpr"
    return None


# ------------------------------------------------------------------ launch capture
def capture(case):
    """Run the four launchers on meta tensors; return [(kernel, args, kwargs, grid)] they launch.

    case: a CASES key or a (dtype, N, H, W, C) tuple; grid as the launcher gives it (a tuple, or a
    function of the config's META)."""
    import torch
    mods = [importlib.import_module(m) for m in MODULES]
    dwln, mlp = mods
    records = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: records.append((self.kernel, args, kwargs, grid))

    dtype, N, H, W, C = CASES[case] if isinstance(case, str) else case
    dt = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    saved = [m.wrap_triton for m in mods], torch.backends.cuda.matmul.allow_tf32
    # fp32 -> input_precision "ieee", tf32 -> "tf32" (fp32 tensors with torch's TF32 switch on)
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        for m in mods:
            m.wrap_triton = Recorder
        f32 = dict(dtype=torch.float32, device="meta")
        x = torch.empty((N, H, W, C), dtype=dt, device="meta")
        cw, vec = torch.empty((C, 1, 7, 7), **f32), torch.empty((C,), **f32)
        _, mean, rstd = dwln.dwconv_layernorm_fwd(x, cw, vec, vec, vec, 1e-6)
        dwln.dwconv_layernorm_bwd(x, x, cw, vec, vec, mean, rstd)
        w1 = torch.empty((4 * C, C), dtype=dt, device="meta")
        w2 = torch.empty((C, 4 * C), dtype=dt, device="meta")
        b1 = torch.empty((4 * C,), **f32)
        scale = torch.empty((N,), **f32)  # drop-path scale
        mlp.mlp_layerscale_fwd(x, x, w1, b1, w2, vec, vec, scale)
        mlp.mlp_layerscale_bwd(x, x, w1, b1, w2, vec, vec, scale)
        # The stored pre-activation variant (STORE_PREACT / PREACT_STORED specialisations).
        preact = torch.empty((N * H * W, 4 * C), dtype=dt, device="meta")
        mlp.mlp_layerscale_fwd(x, x, w1, b1, w2, vec, vec, scale, preact_out=preact)
        mlp.mlp_layerscale_bwd(x, x, w1, b1, w2, vec, vec, scale, preact=preact)
    finally:
        for m, w in zip(mods, saved[0]):
            m.wrap_triton = w
        torch.backends.cuda.matmul.allow_tf32 = saved[1]
    return records


# ------------------------------------------------------------------ specialisation
_TORCH2TRITON = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}
_DIV16 = [["tt.divisibility", 16]]


def _spec(value, specialize):
    """(type, attrs) of a runtime argument as Triton's JIT specialises it, or ("constexpr", v)."""
    import torch
    if isinstance(value, torch.Tensor):
        # CUDA allocations are 256-byte aligned: pointers get divisibility 16.
        return "*" + _TORCH2TRITON[str(value.dtype)], _DIV16
    if isinstance(value, bool):
        return "u1", []
    if isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", 1
        ty = "i32" if -2**31 <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return ty, (_DIV16 if specialize and value % 16 == 0 else [])
    if isinstance(value, float):
        return "fp32", []
    raise TypeError(f"unsupported kernel argument {type(value).__name__}")


def expand(record):
    """One job per GPU autotune config: (module, fn name, signature, constexprs, attrs, options, desc)."""
    kernel, args, kwargs, _ = record
    fn, configs = kernel, [None]
    if hasattr(kernel, "configs") and hasattr(kernel, "fn"):  # triton.autotune
        fn, configs = kernel.fn, kernel.configs
    jobs = []
    for cfg in configs:
        kw = dict(kwargs)
        opts = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
        if cfg is not None:
            kw.update(cfg.kwargs)
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        bound = dict(zip(fn.arg_names, args), **kw)
        missing = [n for n in fn.arg_names if n not in bound]
        if missing:
            raise TypeError(f"{fn.__name__}: launch does not bind {missing}")
        sig, consts, attrs = {}, {}, {}
        for i, p in enumerate(fn.params):
            v = bound[p.name]
            if p.is_constexpr:
                ty, a = "constexpr", v
            else:
                ty, a = _spec(v, not getattr(p, "do_not_specialize", False))
            sig[p.name] = ty
            if ty == "constexpr":
                consts[p.name] = a
            elif a:
                attrs[i] = a
        desc = " ".join(f"{k}={v}" for k, v in sorted(cfg.kwargs.items())) if cfg else ""
        desc += " " + " ".join(f"{k}={v}" for k, v in sorted(opts.items()))
        jobs.append((fn.__module__, fn.__name__, sig, consts, attrs, opts, desc.strip()))
    return jobs


# ------------------------------------------------------------------ compile
def compile_one(job):
    module, name, sig, consts, attrs, opts, _desc, arch, cubin_path = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = getattr(importlib.import_module(module), name)
    index = {n: i for i, n in enumerate(fn.arg_names)}
    src = ASTSource(fn=fn, signature=sig, constexprs={(index[k],): v for k, v in consts.items()},
                    attrs={(i,): a for i, a in attrs.items()})
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # ptxas -v log (TRITON_DUMP_PTXAS_LOG=1)
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(opts))
    except Exception as e:  # noqa: BLE001 - reported, the test asserts on it
        return dict(ok=False, error=f"{type(e).__name__}: {e}"[-4000:],
                    tb=traceback.format_exc()[-2000:])
    text = log.getvalue()
    regs, spills = _REGS_RE.findall(text), _SPILL_RE.findall(text)
    extra = {}
    if cubin_path:
        with open(cubin_path, "wb") as f:
            f.write(k.asm["cubin"])
        extra["cubin"] = cubin_path
    return dict(ok=True, smem=int(k.metadata.shared), **extra,
                regs=int(regs[-1]) if regs else None,
                spill_stores=int(spills[-1][1]) if spills else None,
                spill_loads=int(spills[-1][2]) if spills else None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--cubin-dir", help="also write each compile's cubin here")
    a = ap.parse_args()

    def write(obj):
        with open(a.out, "w") as f:
            json.dump(obj, f, indent=1, default=str)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        write({"error": "TRITON_INTERPRET is set: run without it"})
        return 1
    import triton
    missing = _missing_api()
    if missing:
        write({"error": f"triton {triton.__version__} lacks {missing}"})
        return 0
    # Dedupe: one compile per distinct (kernel, specialisation, options), listing the cases it serves.
    # A launch is one kernel call a launcher makes ("case#index"); its jobs are its autotune configs.
    jobs = {}
    for case in a.cases.split(","):
        for i, rec in enumerate(capture(case)):
            for job in expand(rec):
                key = json.dumps(job[:6], sort_keys=True, default=str)
                entry = jobs.setdefault(key, dict(job=job, cases=[], launches=[]))
                entry["cases"].append(case)
                entry["launches"].append(f"{case}#{i}")
    work = list(jobs.values())
    # Longest (large-tile, many-warp) compiles first keeps both workers busy to the end.
    work.sort(key=lambda w: -(w["job"][5].get("num_warps", 4)))
    ctx = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
    cubins = [None] * len(work)
    if a.cubin_dir:
        os.makedirs(a.cubin_dir, exist_ok=True)
        cubins = [os.path.join(a.cubin_dir, f"{w['job'][1]}_{i:03d}.cubin") for i, w in enumerate(work)]
    with ProcessPoolExecutor(max(1, a.jobs), mp_context=ctx) as ex:
        outs = list(ex.map(compile_one, [w["job"] + (a.arch, c) for w, c in zip(work, cubins)]))
    rows = []
    for w, r in zip(work, outs):
        module, name, sig, consts, attrs, opts, desc = w["job"]
        rows.append(dict(kernel=name, config=desc, cases=sorted(set(w["cases"])), launches=w["launches"],
                         arch=a.arch, constexprs={k: str(v) for k, v in consts.items()}, **r))
    write({"triton": triton.__version__, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
