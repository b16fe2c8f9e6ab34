"""CPU timing of the fused C++ dwconv_layernorm against torch, at the ConvNeXt-T stage shapes.

torch baseline: F.conv2d(groups=C) on a channels_last tensor + F.layer_norm over C, backward
through autograd. Fused: the "cpu" launchers (forward; forward + backward).

    python benchmarks/cpu_dwconv_layernorm.py [--batch 8] [--threads 2] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from convnext_kernels import _C
from convnext_kernels.launchers import cpu as cpu_launchers

STAGES = [(56, 96), (28, 192), (14, 384), (7, 768)]  # (H = W, C) of ConvNeXt-T at 224x224
EPS = 1e-6


def bench(fn, min_time=1.0, warmup=3):
    """Best and median wall time (ms) of fn over repeats filling about min_time seconds.

    The table shows the best time: on a shared machine the median mostly measures the
    neighbours (a 2-thread run waits for whichever thread was descheduled)."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    repeats = max(5, min(200, int(min_time / max(once, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times), 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    info = _C.build_info()
    print(f"best of repeats; torch {torch.__version__}, threads {args.threads}, batch {args.batch}, {args.dtype}, "
          f"kernel ISA {info['cpu_isa']}, {info['compiler']}")
    header = (f"{'shape (N,H,W,C)':>20} | {'fwd torch':>9} {'fwd fused':>9} {'speedup':>7} | "
              f"{'f+b torch':>9} {'f+b fused':>9} {'speedup':>7}")
    print(header)
    print("-" * len(header))
    medians = []

    for hw, C in STAGES:
        N = args.batch
        x = torch.randn(N, hw, hw, C).to(dtype)
        dy = torch.randn(N, hw, hw, C).to(dtype)
        cw = torch.randn(C, 1, 7, 7) * 0.1
        cb, nw, nb = torch.randn(C), 1 + 0.1 * torch.randn(C), 0.1 * torch.randn(C)

        # torch: NHWC memory seen as a channels_last NCHW tensor, so no layout copies.
        xt = x.permute(0, 3, 1, 2).requires_grad_()
        params = [p.to(dtype).requires_grad_() for p in (cw, cb, nw, nb)]

        def torch_fwd():
            with torch.no_grad():
                z = F.conv2d(xt, params[0], params[1], padding=3, groups=C).permute(0, 2, 3, 1)
                return F.layer_norm(z, (C,), params[2], params[3], EPS)

        def torch_fwd_bwd():
            z = F.conv2d(xt, params[0], params[1], padding=3, groups=C).permute(0, 2, 3, 1)
            y = F.layer_norm(z, (C,), params[2], params[3], EPS)
            torch.autograd.grad(y, [xt, *params], dy)

        def fused_fwd():
            return cpu_launchers.dwconv_layernorm_fwd(x, cw, cb, nw, nb, EPS)

        def fused_fwd_bwd():
            y, mean, rstd = cpu_launchers.dwconv_layernorm_fwd(x, cw, cb, nw, nb, EPS)
            cpu_launchers.dwconv_layernorm_bwd(dy, x, cw, cb, nw, mean, rstd)

        best, median = zip(*[bench(f, args.min_time) for f in (torch_fwd, fused_fwd, torch_fwd_bwd, fused_fwd_bwd)])
        shape = f"({N},{hw},{hw},{C})"
        t = best
        print(f"{shape:>20} | {t[0]:7.2f}ms {t[1]:7.2f}ms {t[0] / t[1]:6.2f}x | "
              f"{t[2]:7.2f}ms {t[3]:7.2f}ms {t[2] / t[3]:6.2f}x")
        medians.append((shape, median))
    print("\nmedians (ms): torch fwd, fused fwd, torch f+b, fused f+b")
    for shape, m in medians:
        print(f"{shape:>20} | " + " ".join(f"{v:8.2f}" for v in m))


if __name__ == "__main__":
    main()
