"""Host time of the fused ops: what a call costs the CPU that launches it, through torch's
dispatcher and through the direct eager path the package takes in plain eager code.

At small batches a GPU finishes each kernel before the host has launched the next one, so the
host's time per call (input checks, torch's dispatcher, autograd, the launcher) sets the pace.
Each case runs on inputs too small to hide it, and is timed both ways, taking turns:
  dispatcher  the ops called as torch.library ops (what torch.compile, export, the profiler and
              dispatch modes still see)
  direct      what plain eager code runs: each op's implementation, through an
              autograd.Function of the package's own when a gradient is needed
Cases: each op on a (1, 4, 4, 32) input, forward without autograd ("infer") and forward plus
backward ("train"); and a host-bound ConvNeXt-T (depths 3-3-9-3 as ConvNeXt-T, dims 8-16-32-64,
32x32 images, batch 1: 36 op calls a forward), inference and a training step (forward and
backward, no optimizer). Each timed step runs --calls steps back to back and synchronizes once at
the end (on a GPU); the figure is the median time of one step.

  python benchmarks/host_overhead.py                 # every fused backend that runs here
  python benchmarks/host_overhead.py --backends cuda --out /tmp/res
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

import common

ck = common.import_package()

OPS = ("dwconv_layernorm", "mlp_layerscale")
OP_SHAPE = (1, 4, 4, 32)
MODEL = dict(depths=(3, 3, 9, 3), dims=(8, 16, 32, 64))
MODEL_IMG = 32
BENCHES = ("infer", "train")
PATHS = ("dispatcher", "direct")
TABLE_HEADERS = ["case", "bench", "backend", "dtype", "dispatcher us", "direct us", "saved us", "x faster", "error"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", help="comma-separated fused backends (default: every one that runs here but "
                   "the plain-torch one and Triton's CPU interpreter)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--calls", type=int, default=20, help="steps per timed sample")
    p.add_argument("--iters", type=int, default=15, help="timed samples per path, the paths taking turns")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch.set_num_threads (default 1: host time "
                   "is one thread's)")
    p.add_argument("--out", type=Path, default=common.DEFAULT_RESULTS_DIR, help="results directory")
    p.add_argument("--quick", action="store_true", help="smoke run: few calls and samples")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cpu":
        torch.set_num_threads(args.threads)
    runnable = common.fused_backends(ck, args.device)  # the ones that run on this device here
    args.backends = common.comma_subset(p, args.backends, runnable, "--backends") if args.backends else runnable
    if args.quick:
        args.calls, args.iters = 2, 3
    # Ops in the dtype the benchmarks time on each device; the model in fp32 (its parameters').
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    return args


@contextlib.contextmanager
def dispatcher_path(on: bool):
    """The ops through torch's dispatcher (on) or as plain eager code takes them (off)."""
    needed = ck.ops._dispatcher_needed
    if on:
        ck.ops._dispatcher_needed = lambda args: True
    try:
        yield
    finally:
        ck.ops._dispatcher_needed = needed


def op_step(op_name: str, backend: str, bench: str, device, dtype):
    """One call of op_name (forward, or forward and backward) on a tiny input."""
    g = torch.Generator().manual_seed(0)
    N, H, W, C = OP_SHAPE

    def rand(*shape, scale=1.0, dt=torch.float32):
        return (torch.randn(*shape, generator=g) * scale).to(device, dt).requires_grad_(bench == "train")

    if op_name == "dwconv_layernorm":
        args = [rand(N, H, W, C, dt=dtype), rand(C, 1, 7, 7, scale=0.2), rand(C), 1.0 + rand(C, scale=0.1), rand(C)]
    else:
        args = [rand(N, H, W, C, dt=dtype), rand(N, H, W, C, dt=dtype), rand(4 * C, C, scale=C ** -0.5, dt=dtype),
                rand(4 * C), rand(C, 4 * C, scale=(4 * C) ** -0.5, dt=dtype), rand(C), rand(C, scale=0.1)]
    fn = getattr(ck, op_name)
    leaves = [a for a in args if a.requires_grad]
    dy = torch.randn(OP_SHAPE, generator=g).to(device, dtype)

    def step():
        if bench == "infer":
            with torch.no_grad():
                fn(*args, backend=backend)
            return
        fn(*args, backend=backend).backward(dy)
        for t in leaves:
            t.grad = None
    return step


def model_step(backend: str, bench: str, device):
    torch.manual_seed(0)
    model = ck.ConvNeXtFused(**MODEL, backend=backend).to(device)
    images = torch.randn(1, 3, MODEL_IMG, MODEL_IMG, device=device)
    model.train(bench == "train")

    def step():
        if bench == "infer":
            with torch.no_grad():
                model(images)
            return
        model(images).sum().backward()
        model.zero_grad(set_to_none=True)
    return step


def time_case(step, args) -> dict:
    """Median microseconds of one step, each path's samples taking turns with the other's."""
    def sample(path):
        def run():
            with dispatcher_path(path == "dispatcher"):
                for _ in range(args.calls):
                    step()
                common.synchronize(args.device)
        return run
    times, errors = common.time_interleaved({path: sample(path) for path in PATHS}, warmup=1, iters=args.iters)
    if errors:
        raise next(iter(errors.values()))
    return {path: 1e6 * common.median(times[path]) / args.calls for path in PATHS}


def cases(args):
    """(case, bench, backend, dtype, a function making the step) for every case."""
    todo = []
    for backend in args.backends:
        for bench in BENCHES:
            for op_name in OPS:
                todo.append((op_name, bench, backend, args.dtype,
                             lambda o=op_name, b=backend, m=bench: op_step(o, b, m, args.device, args.dtype)))
            todo.append(("model", bench, backend, torch.float32,
                         lambda b=backend, m=bench: model_step(b, m, args.device)))
    return todo


def table_rows(records):
    f = common.fmt
    rows = []
    for r in records:
        d, e = r.get("dispatcher_us"), r.get("direct_us")
        both = d is not None and e is not None
        rows.append([r["case"], r["bench"], r["backend"], r["dtype"], f(d), f(e), f(d - e if both else None),
                     f(d / e if both else None, ".2f"), r.get("error", "")])
    return rows


def markdown(payload, records) -> str:
    m = MODEL
    return "\n".join([
        common.markdown_header("Host time per call: through torch's dispatcher and direct", payload),
        f"Microseconds of host time per step (median of {payload['config']['iters']} samples of "
        f"{payload['config']['calls']} steps, the two paths taking turns). Op cases: one call on a "
        f"{OP_SHAPE} input; infer: forward without autograd; train: forward and backward. Model: "
        f"ConvNeXtFused with depths {'-'.join(map(str, m['depths']))} and dims {'-'.join(map(str, m['dims']))} "
        f"on {MODEL_IMG}x{MODEL_IMG} images, batch 1 (36 op calls a forward), fp32; train: forward and "
        "backward, no optimizer. dispatcher: the ops as torch.library ops; direct: what plain eager code "
        "runs (see convnext_kernels/ops.py, \"Eager calls\").",
        "",
        common.markdown_table(TABLE_HEADERS, table_rows(records)),
    ])


def chart(path: Path, records):
    """Each case's dispatcher time over its direct time: the cases' times span three decades."""
    labels = [f"{r['case']} {r['bench']} {r['backend']}" for r in records]
    ratios = [r["dispatcher_us"] / r["direct_us"] if r.get("direct_us") else None for r in records]
    return common.bar_chart(path, "Host time through the dispatcher / direct (higher: more saved)",
                            "x faster direct", labels, {"direct": ratios})


def main(argv=None) -> int:
    args = parse_args(argv)
    config = {"backends": args.backends, "calls": args.calls, "iters": args.iters, "op_shape": list(OP_SHAPE),
              "model": {**{k: list(v) for k, v in MODEL.items()}, "img_size": MODEL_IMG, "batch_size": 1},
              "dtype": str(args.dtype).replace("torch.", ""), "quick": args.quick}
    payload = common.environment(args.device, "host_overhead", config)
    records = []
    todo = cases(args)
    with common.keep_results_on_interrupt(payload, records), common.Progress(len(todo), "host time") as bar:
        for case, bench, backend, dtype, make_step in todo:
            bar.set(f"{case} {bench} {backend}")
            record = {"case": case, "bench": bench, "backend": backend,
                      "dtype": str(dtype).replace("torch.", "")}
            records.append(record)
            try:
                times = time_case(make_step(), args)
            except Exception as e:  # recorded; the other cases go on
                record["error"] = common.short_error(e)
            else:
                record.update({f"{p}_us": t for p, t in times.items()})
            bar.advance()
    common.finish_environment(payload)
    payload["results"] = records
    stem = common.result_stem("host_overhead", args.device, [], args.quick)
    written = common.write_results(args.out, stem, payload, markdown(payload, records),
                                   lambda path: chart(path, records))
    print(common.text_table(TABLE_HEADERS, table_rows(records)))
    print("wrote " + ", ".join(str(p) for p in written))
    return common.exit_status(payload)


if __name__ == "__main__":
    sys.exit(main())
