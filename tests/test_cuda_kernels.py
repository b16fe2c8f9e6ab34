"""Tests of the "cuda" backend launchers against a float64 torch reference, on two targets:
  gpu       CUDA tensors, the kernels built by nvcc (marked cuda; skipped without a GPU)
  emulated  CPU tensors, the same kernel sources compiled for the host against the CUDA emulator
            (convnext_kernels._cuda_emulated, csrc/emulation): how CI runs the CUDA kernels.
            The ConvNeXt-T stage shapes are GPU-only (the emulator runs a GPU thread as a fiber).

Pass rule (flash-attention style), for outputs and every gradient:
  fp16 / bf16: max|fused - ref64| <= 2 * max|torch_same_dtype - ref64| + atol * max(max|ref64|, 1)
  fp32:        max|fused - ref64| <= 1e-5 * max|ref64|
Outputs are poisoned: on the GPU the caching allocator is first filled with NaN, on the CPU the
launchers fill outputs and workspaces with NaN / 0xFF bytes (CONVNEXT_KERNELS_POISON_OUTPUTS), and
the emulator fills shared memory with 0xFF bytes; an element a kernel forgets to write, or reads
before it is written, comes back as NaN and fails.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

from convnext_kernels.backends import emulated_cuda_extension
from convnext_kernels.reference import dwconv_layernorm_ref

from conftest import package_subprocess_env, tf32_matmul


def _cuda_backend_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from convnext_kernels import _C  # type: ignore[attr-defined]
    except ImportError:
        return False
    return bool(_C.build_info().get("cuda", False)) and hasattr(_C, "dwconv_layernorm_fwd_cuda")


class _Target:
    """Where the CUDA kernels run: "gpu" (CUDA tensors, _C) or "emulated" (CPU tensors, _cuda_emulated)."""

    def __init__(self, name: str):
        self.name = name
        self.gpu = name == "gpu"
        self.device = torch.device("cuda" if self.gpu else "cpu")

    @property
    def module(self):
        if self.gpu:
            from convnext_kernels import _C  # type: ignore[attr-defined]

            return _C
        from convnext_kernels import _cuda_emulated  # type: ignore[attr-defined]

        return _cuda_emulated

    def stream(self) -> int:
        return torch.cuda.current_stream().cuda_stream if self.gpu else 0

    def sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize()

    def gpu_only(self, why: str = "a GPU-sized case") -> None:
        if not self.gpu:
            pytest.skip(f"{why}: too slow for the emulator")


TARGETS = [
    pytest.param("gpu", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not _cuda_backend_ready(), reason="needs a CUDA GPU and _C built with the CUDA kernels")]),
    pytest.param("emulated", marks=pytest.mark.skipif(
        emulated_cuda_extension()[0] is None, reason=emulated_cuda_extension()[1])),
]


@pytest.fixture(params=TARGETS)
def target(request):
    t = _Target(request.param)
    if t.gpu and os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") != "1":
        # Fill the caching allocator with NaN so that large blocks (workspaces) come back as NaN
        # garbage; small ones come from other segments, and the launchers' outputs are poisoned
        # anyway (CONVNEXT_KERNELS_POISON_OUTPUTS). Without caching (under the sanitizer) there
        # is nothing to fill.
        big = torch.empty(512 * 1024 * 1024 // 4, dtype=torch.float32, device="cuda")
        big.fill_(math.nan)
        del big
    yield t
    t.sync()


DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ATOL = {torch.float32: 0.0, torch.float16: 1e-3, torch.bfloat16: 1e-2}
FP32_RTOL = 1e-5

# (N, H, W, C): odd sizes, 1x1 images, a scalar-path C (not a multiple of 8), ConvNeXt-T stages.
SMALL_SHAPES = [
    (3, 13, 17, 40),
    (2, 1, 1, 96),
    (2, 9, 11, 96),
    (2, 5, 6, 13),
    (2, 7, 7, 768),
]
STAGE_SHAPES = [
    (32, 56, 56, 96),
    (32, 28, 28, 192),
    (32, 14, 14, 384),
    (32, 7, 7, 768),
]
SHAPES = SMALL_SHAPES + STAGE_SHAPES


def _launchers():
    from convnext_kernels.launchers import cuda as launchers

    return launchers


def _shape_id(s):
    return "x".join(map(str, s))


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _check(name, fused, ref64, eager, dtype):
    assert tuple(fused.shape) == tuple(ref64.shape), f"{name}: shape {tuple(fused.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(fused).all(), f"{name}: non-finite values (an element left unwritten?)"
    err = _max_err(fused, ref64)
    scale = ref64.abs().max().item()
    if dtype == torch.float32:
        bound = FP32_RTOL * max(scale, 1e-3)
    else:
        bound = 2 * _max_err(eager, ref64) + ATOL[dtype] * max(scale, 1.0)
    assert err <= bound, f"{name} [{dtype}]: max error {err:.3e} > bound {bound:.3e} (max|ref| {scale:.3e})"


# ------------------------------------------------------------------------------------------------
# dwconv_layernorm
# ------------------------------------------------------------------------------------------------
def _dwconv_inputs(target, shape, dtype, with_bias=True, seed=0):
    N, H, W, C = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, W, C, generator=g).to(dtype)
    w = torch.randn(C, 1, 7, 7, generator=g) * 0.2
    b = torch.randn(C, generator=g) * 0.1 if with_bias else None
    nw = 1.0 + 0.1 * torch.randn(C, generator=g)
    nb = 0.1 * torch.randn(C, generator=g)
    dy = torch.randn(N, H, W, C, generator=g).to(dtype)
    return tuple(None if t is None else t.to(target.device) for t in (x, w, b, nw, nb, dy))


def _run_dwconv_reference(x, w, b, nw, nb, dy, eps, to_dtype):
    """Forward + backward of the torch composition with inputs cast to to_dtype."""
    params = [t.detach().to(to_dtype).requires_grad_(True) if t is not None else None for t in (x, w, b, nw, nb)]
    y = dwconv_layernorm_ref(*params, eps)
    y.backward(dy.to(to_dtype))
    return y.detach(), [p.grad if p is not None else None for p in params]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_dwconv_layernorm(target, shape, dtype):
    if shape in STAGE_SHAPES:
        target.gpu_only("a ConvNeXt-T stage shape")
    eps = 1e-6
    L = _launchers()
    x, w, b, nw, nb, dy = _dwconv_inputs(target, shape, dtype)
    y, mean, rstd = L.dwconv_layernorm_fwd(x, w, b, nw, nb, eps)
    dx, dw, db, dnw, dnb = L.dwconv_layernorm_bwd(dy, x, w, b, nw, mean, rstd)
    target.sync()

    y64, g64 = _run_dwconv_reference(x, w, b, nw, nb, dy, eps, torch.float64)
    ye, ge = _run_dwconv_reference(x, w, b, nw, nb, dy, eps, dtype)

    _check("y", y, y64, ye, dtype)
    z64 = F.conv2d(x.double().permute(0, 3, 1, 2), w.double(), b.double(), padding=3, groups=shape[-1])
    z64 = z64.permute(0, 2, 3, 1)
    mean64 = z64.mean(-1)
    rstd64 = torch.rsqrt(z64.var(-1, unbiased=False) + eps)
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32
    # Statistics are fp32 in every dtype (of the conv of the same rounded x): fp32-tight.
    assert _max_err(mean, mean64) <= 1e-5 * max(mean64.abs().max().item(), 1.0), "mean"
    assert _max_err(rstd, rstd64) <= 1e-5 * rstd64.abs().max().item(), "rstd"
    for name, got, r64, e in zip(("dx", "dconv_weight", "dconv_bias", "dnorm_weight", "dnorm_bias"),
                                 (dx, dw, db, dnw, dnb), g64, ge):
        assert got.dtype == (dtype if name == "dx" else torch.float32), name
        _check(name, got, r64, e, dtype)


# Channel counts and row lengths beyond ConvNeXt-T's: the widest ConvNeXts (L: 1536, XL: 2048,
# few pixels per tile), a 70-pixel row with C = 8, a single channel, a scalar-path C = 84 (not a
# multiple of 8) with an odd W.
EXTREME_DWCONV_SHAPES = [(1, 2, 33, 1536), (1, 3, 5, 2048), (2, 1, 70, 8), (1, 9, 3, 84), (1, 4, 4, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", EXTREME_DWCONV_SHAPES, ids=_shape_id)
def test_dwconv_layernorm_extreme_shapes(target, shape, dtype):
    test_dwconv_layernorm(target, shape, dtype)


# Shapes where the backward's blocks loop, which none of the above reaches, while on a GPU every
# stage shape at batch 32 does. The recompute kernel runs max(64, min(2048, 196608 // C))
# persistent blocks (96 at C = 2044 and 2048), fewer than these shapes' 98 tiles (one per row:
# W = 2 fits a tile). The conv kernel splits the 49 rows into 3 chunks of 17 (N * ceil(C / 32) =
# 128 blocks is below its 512, and chunks keep at least 14 rows), its ring walking past its period
# of 7 rows, the last chunk partial; at 1024 x 1 x 1 x 64 (2048 whole images) each block takes 2
# samples. C = 2048 takes the 16-byte path, C = 2044 the scalar one.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 49, 2, 2048), (2, 49, 2, 2044), (1024, 1, 1, 64)], ids=_shape_id)
def test_dwconv_layernorm_bwd_blocks_loop(target, shape, dtype):
    test_dwconv_layernorm(target, shape, dtype)


# The ring kernels (forward and backward recompute; C up to 768, 384 on the scalar path) in the
# block shapes that whole images one a block at ConvNeXt batch sizes never take. Row chunks: one or
# two samples give fewer than the 512 target blocks, so 31 and 30 rows split into 2 chunks of 16
# and 15, each ring starting 3 rows above its chunk (in-image halo rows) and stopping mid-period.
# 1 x 31 x 9 x 24 (one channel and 4 pixels a thread): 3 groups of 4 pixels in one strip (72
# threads and 24 padding ones), the last group 3 pixels past the row's end; 2 x 30 x 3 x 13 is the
# scalar path, one group (13 threads + 19), its last pixel past the row's end; 1 x 31 x 5 x 392
# takes two channels and 2 pixels a thread (C > 384): 196 threads + 28 padding ones a strip of one
# pixel pair, 3 strips. Several samples a block: 2101 whole images leave more than twice the
# target, so blocks take 2 (the last 1).
# Emulated, the forward's launch is checked to be that block shape: (blocks, threads a block).
RING_BLOCKS = {(1, 31, 9, 24): (2, 96), (2, 30, 3, 13): (4, 32), (1, 31, 5, 392): (6, 224), (2101, 1, 2, 8): (1051, 32)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(RING_BLOCKS), ids=_shape_id)
def test_dwconv_layernorm_ring_blocks(target, shape, dtype):
    if not target.gpu:
        x, w, b, nw, nb, _ = _dwconv_inputs(target, shape, dtype)
        target.module.launches(clear=True)
        _launchers().dwconv_layernorm_fwd(x, w, b, nw, nb, 1e-6)
        (launch,) = target.module.launches(clear=True)
        assert (launch["grid"], launch["block"]) == ((RING_BLOCKS[shape][0], 1, 1), (RING_BLOCKS[shape][1], 1, 1))
    test_dwconv_layernorm(target, shape, dtype)


# CONVNEXT_KERNELS_CUDA_DWCONV_RING_CHANNELS (a benchmark switch, benchmarks/kernels.py cuda_ring2)
# sets the channels a ring thread convolves. At 2 x 9 x 9 x 96: two (48 threads a pixel pair, 9
# pixels in 5 pairs: 240 threads and 16 padding ones) instead of one (96 threads a group of 4
# pixels: 3 groups, 288). 1 at C = 392 leaves the tile kernels to run (392 threads would not fit
# the ring's 384; they launch after the weight transpose); on the scalar path (C % 8 != 0) 2 falls
# back to 1 (the two-channel kernel does not exist there). Emulated, the launches are checked.
@pytest.mark.parametrize("request_, shape, threads", [
    ("", (2, 9, 9, 96), 288), ("2", (2, 9, 9, 96), 256), ("1", (2, 9, 9, 96), 288),
    ("1", (1, 5, 4, 392), None), ("", (1, 5, 4, 392), 224), ("2", (2, 5, 6, 13), 32)], ids=str)
def test_dwconv_layernorm_ring_channels_switch(target, request_, shape, threads, monkeypatch):
    monkeypatch.setenv("CONVNEXT_KERNELS_CUDA_DWCONV_RING_CHANNELS", request_)
    if not target.gpu:
        x, w, b, nw, nb, _ = _dwconv_inputs(target, shape, torch.bfloat16)
        target.module.launches(clear=True)
        _launchers().dwconv_layernorm_fwd(x, w, b, nw, nb, 1e-6)
        launches = target.module.launches(clear=True)
        if threads is None:
            assert [entry["name"] for entry in launches] == ["dwconv_weight_transpose_kernel", "kernel"]
        else:
            assert [entry["block"] for entry in launches] == [(threads, 1, 1)]
    test_dwconv_layernorm(target, shape, torch.bfloat16)


def test_dwconv_layernorm_ring_channels_switch_rejects_other_values(monkeypatch):
    monkeypatch.setenv("CONVNEXT_KERNELS_CUDA_DWCONV_RING_CHANNELS", "3")
    with pytest.raises(ValueError, match="must be 1 or 2"):
        _launchers()._dwconv_ring_channels()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 1, 70, 8), (1, 4, 4, 1), (3, 2, 3, 24)], ids=_shape_id)
def test_mlp_layerscale_narrow_channels(target, shape, dtype):
    _check_mlp(target, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dwconv_layernorm_no_bias(target, dtype):
    shape, eps = (3, 13, 17, 40), 1e-6
    L = _launchers()
    x, w, _, nw, nb, dy = _dwconv_inputs(target, shape, dtype, with_bias=False)
    y, mean, rstd = L.dwconv_layernorm_fwd(x, w, None, nw, nb, eps)
    dx, dw, db, dnw, dnb = L.dwconv_layernorm_bwd(dy, x, w, None, nw, mean, rstd)
    y64, g64 = _run_dwconv_reference(x, w, None, nw, nb, dy, eps, torch.float64)
    ye, ge = _run_dwconv_reference(x, w, None, nw, nb, dy, eps, dtype)
    _check("y", y, y64, ye, dtype)
    for name, got, i in (("dx", dx, 0), ("dconv_weight", dw, 1), ("dnorm_weight", dnw, 3), ("dnorm_bias", dnb, 4)):
        _check(name, got, g64[i], ge[i], dtype)
    # dconv_bias is still returned: the gradient a zero bias would get.
    assert torch.isfinite(db).all()


def test_dwconv_layernorm_bwd_deterministic(target):
    L = _launchers()
    shape = (4, 28, 28, 192) if target.gpu else (2, 9, 11, 96)
    x, w, b, nw, nb, dy = _dwconv_inputs(target, shape, torch.bfloat16)
    _, mean, rstd = L.dwconv_layernorm_fwd(x, w, b, nw, nb, 1e-6)
    first = L.dwconv_layernorm_bwd(dy, x, w, b, nw, mean, rstd)
    second = L.dwconv_layernorm_bwd(dy, x, w, b, nw, mean, rstd)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# mlp_layerscale
# ------------------------------------------------------------------------------------------------
def _mlp_torch(x, shortcut, w1, b1, w2, b2, gamma, s):
    h = F.gelu(F.linear(x, w1, b1))  # exact erf GELU
    z = F.linear(h, w2, b2)
    if gamma is not None:
        z = z * gamma
    if s is not None:
        z = z * s.view(-1, 1, 1, 1)
    return shortcut + z


def _mlp_inputs(target, shape, dtype, with_gamma=True, with_drop=True, seed=0):
    N, H, W, C = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, W, C, generator=g).to(dtype)
    sc = torch.randn(N, H, W, C, generator=g).to(dtype)
    w1 = (torch.randn(4 * C, C, generator=g) / math.sqrt(C)).to(dtype)
    b1 = 0.1 * torch.randn(4 * C, generator=g)
    w2 = (torch.randn(C, 4 * C, generator=g) / math.sqrt(4 * C)).to(dtype)
    b2 = 0.1 * torch.randn(C, generator=g)
    gamma = 0.5 * torch.randn(C, generator=g) if with_gamma else None
    if with_drop:
        # Both kinds of sample whatever the draw: one dropped (scale 0), the others kept (1 / 0.7).
        keep = torch.rand(N, generator=g) > 0.3
        keep[0] = False
        keep[-1] = True  # N == 1: the one sample is kept
        s = keep.float() / 0.7
    else:
        s = None
    dy = torch.randn(N, H, W, C, generator=g).to(dtype)
    return tuple(None if t is None else t.to(target.device) for t in (x, sc, w1, b1, w2, b2, gamma, s, dy))


def _run_mlp_reference(x, sc, w1, b1, w2, b2, gamma, s, dy, to_dtype):
    """Forward + backward with every input cast to to_dtype; grads of x, w1, b1, w2, b2, gamma."""
    def prep(t, grad):
        return None if t is None else t.detach().to(to_dtype).requires_grad_(grad)

    xs, w1s, b1s, w2s, b2s, gs = (prep(t, True) for t in (x, w1, b1, w2, b2, gamma))
    y = _mlp_torch(xs, prep(sc, False), w1s, b1s, w2s, b2s, gs, prep(s, False))
    y.backward(dy.to(to_dtype))
    return y.detach(), [None if t is None else t.grad for t in (xs, w1s, b1s, w2s, b2s, gs)]


def _check_mlp(target, shape, dtype, with_gamma=True, with_drop=True):
    L = _launchers()
    x, sc, w1, b1, w2, b2, gamma, s, dy = _mlp_inputs(target, shape, dtype, with_gamma, with_drop)
    y = L.mlp_layerscale_fwd(x, sc, w1, b1, w2, b2, gamma, s)
    grads = L.mlp_layerscale_bwd(dy, x, w1, b1, w2, b2, gamma, s)
    target.sync()
    y64, g64 = _run_mlp_reference(x, sc, w1, b1, w2, b2, gamma, s, dy, torch.float64)
    ye, ge = _run_mlp_reference(x, sc, w1, b1, w2, b2, gamma, s, dy, dtype)
    _check("y", y, y64, ye, dtype)
    names = ("dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias", "dgamma")
    assert len(grads) == 6
    for name, got, r64, e in zip(names, grads, g64, ge):
        assert got.dtype == (dtype if name == "dx" else torch.float32), name
        if r64 is None:  # gamma is None: dgamma is returned, the caller drops it
            assert got.shape == (shape[-1],)
            continue
        _check(name, got, r64, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_mlp_layerscale(target, shape, dtype):
    if shape in STAGE_SHAPES:
        target.gpu_only("a ConvNeXt-T stage shape")
    _check_mlp(target, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_gamma,with_drop", [(False, False), (True, False), (False, True)])
def test_mlp_layerscale_optional_params(target, dtype, with_gamma, with_drop):
    _check_mlp(target, (3, 13, 17, 40), dtype, with_gamma, with_drop)


def test_mlp_layerscale_tf32(target):
    """With allow_tf32 the fp32 path uses TF32 tensor cores: compare to torch's own TF32 GEMMs."""
    L = _launchers()
    shape = (4, 14, 14, 96) if target.gpu else (2, 9, 11, 96)
    x, sc, w1, b1, w2, b2, gamma, s, dy = _mlp_inputs(target, shape, torch.float32)
    with tf32_matmul(True):
        y = L.mlp_layerscale_fwd(x, sc, w1, b1, w2, b2, gamma, s)
        grads = L.mlp_layerscale_bwd(dy, x, w1, b1, w2, b2, gamma, s)
        ye, ge = _run_mlp_reference(x, sc, w1, b1, w2, b2, gamma, s, dy, torch.float32)
    with tf32_matmul(False):
        y64, g64 = _run_mlp_reference(x, sc, w1, b1, w2, b2, gamma, s, dy, torch.float64)
    # TF32 has a 10-bit mantissa, like fp16: hold it to fp16's rule against torch's TF32.
    _check("y", y, y64, ye, torch.float16)
    for name, got, r64, e in zip(("dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias", "dgamma"),
                                 grads, g64, ge):
        _check(name, got, r64, e, torch.float16)


def test_mlp_layerscale_bwd_deterministic(target):
    L = _launchers()
    shape = (8, 14, 14, 96) if target.gpu else (2, 9, 11, 96)
    x, sc, w1, b1, w2, b2, gamma, s, dy = _mlp_inputs(target, shape, torch.bfloat16)
    first = L.mlp_layerscale_bwd(dy, x, w1, b1, w2, b2, gamma, s)
    second = L.mlp_layerscale_bwd(dy, x, w1, b1, w2, b2, gamma, s)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# mlp_layerscale forward: back-to-back fused kernel vs two-GEMM path
# ------------------------------------------------------------------------------------------------
# The fused kernel runs fp16 / bf16 with C % 8 == 0, C <= 384 and 16-byte aligned tensors; the env
# switch CONVNEXT_KERNELS_CUDA_MLP_FUSED=0 forces the two-GEMM path. C values cover every padded
# channel tile of the fused kernel (40 -> 64, 96, 120 -> 128, 192, 200 -> 256, 384) and the
# fallbacks (36: C % 8 != 0; 392: C > 384); row counts cover partial row tiles (663, 2, 105 rows).
FUSED_FWD_SHAPES = [
    (3, 13, 17, 40),
    (2, 1, 1, 96),
    (2, 9, 11, 96),
    (3, 5, 7, 120),
    (3, 13, 17, 192),
    (3, 5, 7, 200),
    (2, 7, 7, 384),
    (3, 5, 7, 384),
    (2, 5, 6, 36),
    (2, 3, 5, 392),
]
HALF_DTYPES = (torch.float16, torch.bfloat16)
MLP_FUSED_ENV = "CONVNEXT_KERNELS_CUDA_MLP_FUSED"


def _mlp_forward_reference(x, sc, w1, b1, w2, b2, gamma, s, to_dtype):
    """Forward only (no autograd graph): the fp64 reference of the ConvNeXt-T stage shapes stays small."""
    def cast(t):
        return None if t is None else t.to(to_dtype)

    with torch.no_grad():
        return _mlp_torch(*(cast(t) for t in (x, sc, w1, b1, w2, b2, gamma, s)))


def _check_mlp_fwd(target, shape, dtype, with_gamma=True, with_drop=True):
    L = _launchers()
    x, sc, w1, b1, w2, b2, gamma, s, _ = _mlp_inputs(target, shape, dtype, with_gamma, with_drop)
    y = L.mlp_layerscale_fwd(x, sc, w1, b1, w2, b2, gamma, s)
    target.sync()
    y64 = _mlp_forward_reference(x, sc, w1, b1, w2, b2, gamma, s, torch.float64)
    ye = _mlp_forward_reference(x, sc, w1, b1, w2, b2, gamma, s, dtype)
    assert y.dtype == dtype
    _check("y", y, y64, ye, dtype)
    return y


# ------------------------------------------------------------------------------------------------
# mlp_layerscale GEMMs: wgmma (sm_90a, the default on an H100) vs mma.sync
# ------------------------------------------------------------------------------------------------
# The fp16 / bf16 kernels of mlp_layerscale (the fused forward, the two-GEMM forward's GEMMs and the
# backward's) run wgmma where the extension was built for sm_90a and the device is compute
# capability 9.0 (the emulator: an H100); CONVNEXT_KERNELS_CUDA_MLP_WGMMA=0 keeps them on mma.sync.
# Shapes: partial row and column tiles, the any-alignment element-wise tile loads (C = 13, never
# fused), and every channel tile of the fused forward: 40 -> 64 (GEMM2 one n64), 96 (n32 x 3),
# 120 -> 128 (GEMM1 n64, GEMM2 n128), 136 -> 192 (n64 x 3); 200 -> 256 and 384, 64-row tiles with the
# two warpgroups side by side (GEMM2 n128, n64 x 3; at 200 the last hidden chunk leaves the second
# warpgroup's GEMM1 columns all masked); and the ConvNeXt-T stages on a GPU.
MLP_WGMMA_ENV = "CONVNEXT_KERNELS_CUDA_MLP_WGMMA"


@pytest.mark.parametrize("gemm", ["wgmma", "mma_sync"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_gemm"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 13, 17, 40), (2, 5, 6, 13), (2, 9, 11, 96), (2, 5, 7, 120), (2, 9, 11, 136),
                                   (2, 5, 7, 200), (2, 5, 7, 384)] + STAGE_SHAPES, ids=_shape_id)
def test_mlp_layerscale_gemm_paths(target, shape, dtype, fused, gemm, monkeypatch):
    if shape in STAGE_SHAPES:
        target.gpu_only("a ConvNeXt-T stage shape")
    monkeypatch.setenv(MLP_FUSED_ENV, "1" if fused else "0")
    monkeypatch.setenv(MLP_WGMMA_ENV, "1" if gemm == "wgmma" else "0")
    if target.gpu and os.environ.get("CONVNEXT_KERNELS_TEST_PROFILER") == "0":
        _check_mlp(target, shape, dtype)  # under compute-sanitizer, which excludes CUPTI (the profiler)
        return
    if target.gpu:
        # The path asked for is the path that ran: the GEMM kernels' names carry their MathMode
        # (kWgmma16 = 3), the fused forward's its own; wgmma only where the device can run it.
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            _check_mlp(target, shape, dtype)
        names = {e.name for e in prof.events()
                 if "mlp_layerscale_gemm_kernel" in e.name or "mlp_layerscale_fused_fwd" in e.name}
        wgmma_ran = any(re.search(r"MathMode\)3|MathMode::kWgmma16|fused_fwd_wgmma_kernel", n) for n in names)
        expect = gemm == "wgmma" and target.module.mlp_layerscale_cuda_wgmma_supported()
        assert names and wgmma_ran == expect, sorted(names)[:4]
        return
    target.module.stats(True)
    _check_mlp(target, shape, dtype)
    st = target.module.stats(True)  # the path asked for is the path that ran
    assert (st["wgmma"] > 0, st["mma"] > 0) == ((True, False) if gemm == "wgmma" else (False, True)), st


def test_mlp_layerscale_wgmma_dispatch(target, monkeypatch):
    """wgmma is used exactly where it can run: on a compute capability 9.0 device with an sm_90a
    build (the default archs "80;90a"), never for fp32 (tf32 / FFMA stay on their paths)."""
    supported = target.module.mlp_layerscale_cuda_wgmma_supported()
    if target.gpu:
        from convnext_kernels import _C  # type: ignore[attr-defined]

        expect = torch.cuda.get_device_capability() == (9, 0) and "90a" in _C.build_info()["cuda_archs"]
        assert supported == expect
        return
    assert supported  # the emulator is an H100
    monkeypatch.setenv(MLP_FUSED_ENV, "0")
    L = _launchers()
    x, sc, w1, b1, w2, b2, gamma, s, dy = _mlp_inputs(target, (2, 5, 7, 40), torch.float32)
    target.module.stats(True)
    L.mlp_layerscale_fwd(x, sc, w1, b1, w2, b2, gamma, s)
    L.mlp_layerscale_bwd(dy, x, w1, b1, w2, b2, gamma, s)
    assert target.module.stats(True)["wgmma"] == 0


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_gemm"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("shape", FUSED_FWD_SHAPES + STAGE_SHAPES, ids=_shape_id)
def test_mlp_layerscale_fwd_paths(target, shape, dtype, fused, monkeypatch):
    if shape in STAGE_SHAPES:
        target.gpu_only("a ConvNeXt-T stage shape")
    monkeypatch.setenv(MLP_FUSED_ENV, "1" if fused else "0")
    _check_mlp_fwd(target, shape, dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("with_gamma,with_drop", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("shape", [(3, 13, 17, 96), (3, 5, 7, 384)], ids=_shape_id)
def test_mlp_layerscale_fused_fwd_optional_params(target, shape, dtype, with_gamma, with_drop, monkeypatch):
    monkeypatch.setenv(MLP_FUSED_ENV, "1")
    _check_mlp_fwd(target, shape, dtype, with_gamma, with_drop)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 13, 17, 40), (2, 9, 11, 96), (3, 13, 17, 192), (3, 5, 7, 384)],
                         ids=_shape_id)
def test_mlp_layerscale_fused_matches_two_gemm(target, shape, dtype, monkeypatch):
    """Both paths round the hidden to the activation dtype and accumulate in fp32 over the same
    k16 order, so they should agree to about one output ulp (often bit for bit)."""
    L = _launchers()
    x, sc, w1, b1, w2, b2, gamma, s, _ = _mlp_inputs(target, shape, dtype)
    monkeypatch.setenv(MLP_FUSED_ENV, "1")
    y_fused = L.mlp_layerscale_fwd(x, sc, w1, b1, w2, b2, gamma, s)
    monkeypatch.setenv(MLP_FUSED_ENV, "0")
    y_two = L.mlp_layerscale_fwd(x, sc, w1, b1, w2, b2, gamma, s)
    target.sync()
    assert torch.isfinite(y_fused).all() and torch.isfinite(y_two).all()
    ulp = torch.finfo(dtype).eps * max(y_two.abs().max().item(), 1.0)
    err = _max_err(y_fused, y_two)
    assert err <= 2 * ulp, f"fused vs two-GEMM [{dtype}]: max difference {err:.3e} > {2 * ulp:.3e}"


def _raw_mlp_fwd(target, x, sc, w1, b1, w2, b2, gamma, s, allow_fused, workspace_fill):
    """Calls the kernels directly with a workspace filled with workspace_fill; returns (y, workspace)."""
    _C = target.module

    N, H, W, C = x.shape
    code = {torch.float32: _C.CUDA_DTYPE_FLOAT32, torch.float16: _C.CUDA_DTYPE_FLOAT16,
            torch.bfloat16: _C.CUDA_DTYPE_BFLOAT16}[x.dtype]
    y = torch.full_like(x, math.nan)
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    ptrs = (x.data_ptr(), sc.data_ptr(), w1.data_ptr(), b1.data_ptr(), w2.data_ptr(), b2.data_ptr(), ptr(gamma),
            ptr(s), y.data_ptr())
    # Sized for the two-GEMM path (allow_fused=False), enough for either path: which one ran shows
    # in whether the workspace was written.
    nbytes = _C.mlp_layerscale_fwd_cuda_workspace_bytes(*ptrs, N, H, W, C, code, False)
    assert nbytes == N * H * W * 4 * C * x.element_size()
    workspace = torch.full((nbytes,), workspace_fill, dtype=torch.uint8, device=x.device)
    _C.mlp_layerscale_fwd_cuda(
        *ptrs, workspace.data_ptr(), workspace.numel(), N, H, W, C, code, False, allow_fused, True, target.stream(),
    )
    target.sync()
    return y, workspace


# (shape, dtype, fused kernel expected with allow_fused) on a device with >= 161 KB opt-in shared memory.
MLP_FWD_DISPATCH_CASES = [
    ((2, 9, 11, 96), torch.float16, True),
    ((2, 9, 11, 384), torch.bfloat16, True),
    ((2, 9, 11, 40), torch.bfloat16, True),   # 40 % 8 == 0: fused, 64-channel tile
    ((2, 5, 6, 36), torch.float16, False),    # C % 8 != 0
    ((2, 3, 5, 392), torch.float16, False),   # C > 384
    ((2, 9, 11, 96), torch.float32, False),   # fp32: two GEMMs
]


def _dispatch_id(v):
    return _shape_id(v) if isinstance(v, tuple) else str(v)


@pytest.mark.parametrize("shape,dtype,expect_fused", MLP_FWD_DISPATCH_CASES, ids=_dispatch_id)
def test_mlp_layerscale_fwd_dispatch(target, shape, dtype, expect_fused):
    """Which path ran: the two-GEMM path writes the hidden into the workspace, the fused one never
    touches it. allow_fused=False must always take the two-GEMM path."""
    x, sc, w1, b1, w2, b2, gamma, s, _ = _mlp_inputs(target, shape, dtype)
    y_on, ws_on = _raw_mlp_fwd(target, x, sc, w1, b1, w2, b2, gamma, s, True, 0xA5)
    y_off, ws_off = _raw_mlp_fwd(target, x, sc, w1, b1, w2, b2, gamma, s, False, 0xA5)
    assert torch.isfinite(y_on).all() and torch.isfinite(y_off).all()
    assert (ws_on == 0xA5).all().item() == expect_fused, "allow_fused=True took the unexpected path"
    assert not (ws_off == 0xA5).all().item(), "allow_fused=False did not run the two-GEMM path"


@pytest.mark.parametrize("shape,dtype,expect_fused", MLP_FWD_DISPATCH_CASES, ids=_dispatch_id)
def test_mlp_layerscale_fwd_workspace_size(target, shape, dtype, expect_fused, monkeypatch):
    """The forward workspace is only the two-GEMM hidden: the query (same tensors, allow_fused and
    device as the forward) returns 0 where the fused kernel will run, and the launcher then
    allocates a token byte instead of rows x 4C; the full size otherwise and with the env switch
    off. The forward rejects a workspace smaller than its path needs."""
    _C = target.module

    L = _launchers()
    N, H, W, C = shape
    full = N * H * W * 4 * C * torch.finfo(dtype).bits // 8
    x, sc, w1, b1, w2, b2, gamma, s, _ = _mlp_inputs(target, shape, dtype)
    y = torch.empty_like(x)
    code = {torch.float32: _C.CUDA_DTYPE_FLOAT32, torch.float16: _C.CUDA_DTYPE_FLOAT16,
            torch.bfloat16: _C.CUDA_DTYPE_BFLOAT16}[dtype]
    ptrs = (x.data_ptr(), sc.data_ptr(), w1.data_ptr(), b1.data_ptr(), w2.data_ptr(), b2.data_ptr(),
            gamma.data_ptr(), s.data_ptr(), y.data_ptr())
    on = _C.mlp_layerscale_fwd_cuda_workspace_bytes(*ptrs, N, H, W, C, code, True)
    off = _C.mlp_layerscale_fwd_cuda_workspace_bytes(*ptrs, N, H, W, C, code, False)
    assert on == (0 if expect_fused else full)
    assert off == full

    allocated = []
    real_workspace = L._workspace

    def recording_workspace(nbytes, device):
        ws = real_workspace(nbytes, device)
        allocated.append(ws.numel())
        return ws

    monkeypatch.setattr(L, "_workspace", recording_workspace)
    for env, expect in (("1", on), ("0", full)):
        monkeypatch.setenv(MLP_FUSED_ENV, env)
        allocated.clear()
        L.mlp_layerscale_fwd(x, sc, w1, b1, w2, b2, gamma, s)
        assert allocated == [max(expect, 1)], f"{MLP_FUSED_ENV}={env}: allocated {allocated}, expected {expect}"
        if expect_fused and env == "1":
            assert allocated[0] <= 16

    stream = target.stream()
    if expect_fused:  # the fused kernel needs no workspace at all
        _C.mlp_layerscale_fwd_cuda(*ptrs, 0, 0, N, H, W, C, code, False, True, True, stream)
    ws = torch.empty((full,), dtype=torch.uint8, device=target.device)
    with pytest.raises(ValueError, match="workspace too small"):  # two-GEMM path, one byte short
        _C.mlp_layerscale_fwd_cuda(*ptrs, ws.data_ptr(), full - 1, N, H, W, C, code, False, False, True, stream)
    if not expect_fused:  # a fused-sized (empty) workspace on an ineligible case is rejected, not overrun
        with pytest.raises(ValueError, match="workspace too small"):
            _C.mlp_layerscale_fwd_cuda(*ptrs, ws.data_ptr(), 0, N, H, W, C, code, False, True, True, stream)
    target.sync()


# ------------------------------------------------------------------------------------------------
# Other GPUs, emulated: an A100, the GPUs with 99 KB of shared memory a block, and a B200
# ------------------------------------------------------------------------------------------------
# (compute capability major, minor, opt-in shared memory a block in bytes), as cudaDeviceGetAttribute
# reports them. 8.6, 8.9 and 12.0 (RTX 3090, A10, RTX 4090, L4, L40S, RTX 5090; the default build's
# sm_80 cubin runs on the first two, its compute_80 PTX is JIT-compiled for 12.0) all allow 101376
# bytes, and the host code looks only at whether the capability is 9.0 (wgmma) and at the shared
# memory. A B200 (10.0) runs the JIT-compiled compute_80 PTX too, with the H100's 232448 bytes: the
# mma.sync kernels at the largest shared memory. The emulator refuses a launch or an opt-in past
# the device's shared memory.
OTHER_GPUS = {"a100": (8, 0, 166912), "sm89_99kb": (8, 9, 101376), "b200": (10, 0, 232448)}
# Every ConvNeXt width, atto (40) to XL (2048), and scalar-path widths (C % 8 != 0) near the ring
# kernels' limit (384) and, on a 99 KB GPU, the tile kernels' (2044).
CONVNEXT_WIDTHS = (40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024, 1536, 2048)


@pytest.fixture(params=list(OTHER_GPUS))
def other_gpu(request):
    emu, why = emulated_cuda_extension()
    if emu is None:
        pytest.skip(why)
    previous = emu.set_device(*OTHER_GPUS[request.param])
    emu.launches(True)  # _launches_fit checks the test's own
    try:
        yield _Target("emulated"), request.param
    finally:
        emu.set_device(*previous)


def _launches_fit(emu, gpu):
    launches = emu.launches(True)
    assert launches and max(r["dynamic_smem"] for r in launches) <= OTHER_GPUS[gpu][2]


# dwconv_layernorm's host code reads only the shared memory, where a B200 is an H100.
@pytest.mark.parametrize("other_gpu", ["a100", "sm89_99kb"], indirect=True)
@pytest.mark.parametrize("C", CONVNEXT_WIDTHS + (380, 2044))
def test_dwconv_layernorm_on_other_gpus(other_gpu, C):
    """56 pixels a row: there the ring kernels stack the most segments (shared memory) in a block."""
    target, gpu = other_gpu
    test_dwconv_layernorm(target, (1, 2, 56, C), torch.bfloat16)
    _launches_fit(target.module, gpu)


# The largest C whose fused forward fits the device's shared memory (FusedCfg*::kSmemBytes in
# mlp_layerscale_fused_fwd.cuh); wider C (up to 384) take the two-GEMM path there.
FUSED_FWD_MAX_C = {"a100": 384, "sm89_99kb": 128, "b200": 384}


@pytest.mark.parametrize("C", (40, 96, 128, 160, 192, 256, 384))
def test_mlp_layerscale_on_other_gpus(other_gpu, C):
    """mma.sync GEMMs (wgmma runs on 9.0 only: the sm_90a cubin; a B200 JIT-compiles the compute_80
    PTX); the fused forward where its shared memory fits."""
    target, gpu = other_gpu
    emu = target.module
    assert not emu.mlp_layerscale_cuda_wgmma_supported()
    shape, dtype = (1, 3, 5, C), torch.bfloat16
    x, sc, w1, b1, w2, b2, gamma, s, _ = _mlp_inputs(target, shape, dtype)
    _, workspace = _raw_mlp_fwd(target, x, sc, w1, b1, w2, b2, gamma, s, True, 0xA5)
    assert (workspace == 0xA5).all().item() == (C <= FUSED_FWD_MAX_C[gpu]), "the fused forward ran: untouched"
    emu.stats(True)
    _check_mlp(target, shape, dtype)
    assert emu.stats(True)["wgmma"] == 0
    _launches_fit(emu, gpu)


def _misaligned_copy(t):
    """A contiguous copy of t that starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    copy = buf[1:].view(t.shape)
    copy.copy_(t)
    assert copy.data_ptr() % 16 != 0
    return copy


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_mlp_layerscale_fwd_misaligned_falls_back(target, dtype, monkeypatch):
    """x one element past a 16-byte boundary: the fused kernel must not run (cp.async needs
    16-byte alignment); the result is still correct."""
    monkeypatch.setenv(MLP_FUSED_ENV, "1")
    shape = (2, 9, 11, 96)
    L = _launchers()
    x, sc, w1, b1, w2, b2, gamma, s, _ = _mlp_inputs(target, shape, dtype)
    xm = _misaligned_copy(x)
    y = L.mlp_layerscale_fwd(xm, sc, w1, b1, w2, b2, gamma, s)
    target.sync()
    y64 = _mlp_forward_reference(x, sc, w1, b1, w2, b2, gamma, s, torch.float64)
    ye = _mlp_forward_reference(x, sc, w1, b1, w2, b2, gamma, s, dtype)
    _check("y", y, y64, ye, dtype)
    _, ws = _raw_mlp_fwd(target, xm, sc, w1, b1, w2, b2, gamma, s, True, 0xA5)
    assert not (ws == 0xA5).all().item(), "misaligned x must take the two-GEMM path"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mlp_layerscale_bwd_misaligned_dy(target, dtype):
    """Without gamma and drop scale the backward uses dy itself as a GEMM operand (dys = dz = dy):
    one element past a 16-byte boundary it must not take the cp.async path; gradients still right."""
    shape = (2, 9, 11, 96)
    L = _launchers()
    x, sc, w1, b1, w2, b2, _, _, dy = _mlp_inputs(target, shape, dtype, with_gamma=False, with_drop=False)
    dym = _misaligned_copy(dy)
    grads = L.mlp_layerscale_bwd(dym, x, w1, b1, w2, b2, None, None)
    target.sync()
    _, g64 = _run_mlp_reference(x, sc, w1, b1, w2, b2, None, None, dy, torch.float64)
    _, ge = _run_mlp_reference(x, sc, w1, b1, w2, b2, None, None, dy, dtype)
    for name, got, r64, e in zip(("dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias"), grads, g64, ge):
        _check(name, got, r64, e, dtype)


# ------------------------------------------------------------------------------------------------
# Errors reach Python
# ------------------------------------------------------------------------------------------------
def test_cuda_error_becomes_python_exception(target):
    _C = target.module
    stream = target.stream()
    _C.cuda_debug_launch(128, stream)  # a valid launch
    with pytest.raises(RuntimeError, match="invalid configuration"):
        _C.cuda_debug_launch(4096, stream)  # > 1024 threads per block
    _C.cuda_debug_launch(128, stream)  # the error was not sticky
    target.sync()


def test_invalid_arguments_raise_value_error(target):
    _C = target.module

    with pytest.raises(ValueError):
        _C.dwconv_layernorm_fwd_cuda_workspace_bytes(0, 1, 1, 8)
    for query in (_C.dwconv_layernorm_fwd_cuda_workspace_bytes, _C.dwconv_layernorm_bwd_cuda_workspace_bytes):
        query(2**14, 2**8, 2**9 - 1, 8)  # 2^31 - 2^22 pixels: the grid still fits
        with pytest.raises(ValueError, match="below 2\\^31"):  # one block per pixel would not
            query(2**14, 2**8, 2**9, 8)
    with pytest.raises(ValueError):
        _C.dwconv_layernorm_fwd_cuda(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 8, 1e-6, 0, 0)
    with pytest.raises(ValueError):  # unknown dtype code
        _C.mlp_layerscale_fwd_cuda_workspace_bytes(16, 16, 16, 16, 16, 16, 0, 0, 16, 1, 1, 1, 8, 7, True)
    with pytest.raises(ValueError):  # null x
        _C.mlp_layerscale_fwd_cuda_workspace_bytes(0, 16, 16, 16, 16, 16, 0, 0, 16, 1, 1, 1, 8, 1, True)


# Run in a fresh interpreter: once torch's new TF32 API (torch.backends.cuda.matmul.fp32_precision,
# torch >= 2.9) has been used, torch raises on every later read of the legacy allow_tf32 in that
# process, which the fixtures of this module do.
_TF32_NEW_API_SCRIPT = """
import torch
import convnext_kernels as ck
from convnext_kernels.reference import mlp_layerscale_ref

g = torch.Generator().manual_seed(0)
C = 40
x, sc = torch.randn(2, 5, 6, C, generator=g), torch.randn(2, 5, 6, C, generator=g)
w1, b1 = torch.randn(4 * C, C, generator=g) / C ** 0.5, 0.1 * torch.randn(4 * C, generator=g)
w2, b2 = torch.randn(C, 4 * C, generator=g) / (4 * C) ** 0.5, 0.1 * torch.randn(C, generator=g)
gamma = torch.rand(C, generator=g) + 0.5
args = (x, sc, w1, b1, w2, b2, gamma)
ref = mlp_layerscale_ref(*(t.double() for t in args), upcast=True)
errors = []
for precision in ("tf32", "ieee"):
    torch.backends.cuda.matmul.fp32_precision = precision
    xg = x.clone().requires_grad_()
    y = ck.mlp_layerscale(xg, *args[1:], backend="cuda")
    y.sum().backward()  # the backward reads the switch too
    errors.append(((y.double() - ref).abs().max() / ref.abs().max()).item())
print("RELATIVE_ERRORS", *errors)
"""


def test_mlp_layerscale_follows_torchs_new_tf32_api(tmp_path):
    """torch >= 2.9's fp32_precision API switches the CUDA kernels' fp32 GEMMs between TF32 and
    exact fp32, and reading it does not raise (the legacy allow_tf32 getter would)."""
    import subprocess
    import sys

    if emulated_cuda_extension()[0] is None:
        pytest.skip(emulated_cuda_extension()[1])
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision API")
    # No override of torch's TF32 default.
    env = package_subprocess_env(drop=("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",), CONVNEXT_KERNELS_CUDA_EMULATE="1")
    proc = subprocess.run([sys.executable, "-c", _TF32_NEW_API_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RELATIVE_ERRORS"))
    tf32_error, exact_error = map(float, line.split()[1:])
    assert exact_error <= FP32_RTOL, exact_error
    # TF32 rounds the GEMM inputs to 10 mantissa bits: an error far above fp32's, below fp16's.
    assert 10 * FP32_RTOL < tf32_error < 1e-2, tf32_error
