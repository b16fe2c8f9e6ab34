"""Kernel-level tests of the Triton launchers against float64 torch references.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before triton is
imported and the kernels run on CPU tensors in Triton's interpreter (slow:
shapes are small and odd on purpose). bf16 runs there too, through the
interpreter patch in tests/triton_interpreter_bf16.py (bf16 dots and fp32 ->
bf16 rounding as on the GPU). Pass rule: fp32 max|fused - ref64| <= 1e-5 *
max|ref64|; fp16/bf16 <= 2 * max|eager - ref64| + atol * max(max|ref64|, 1),
where eager is the plain torch computation in that dtype.
"""
import math

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from conftest import TRITON_INTERPRETER_BF16_MISSING, TRITON_UNUSABLE, tf32_matmul  # noqa: E402

if TRITON_UNUSABLE:
    pytest.skip(TRITON_UNUSABLE, allow_module_level=True)

from convnext_kernels.backends import triton_interpreted  # noqa: E402
from convnext_kernels.reference import dwconv_layernorm_ref  # noqa: E402
from convnext_kernels.triton.dwconv_layernorm import (  # noqa: E402
    dwconv_layernorm_bwd,
    dwconv_layernorm_fwd,
)
from convnext_kernels.triton._tiling import split_width  # noqa: E402
from convnext_kernels.triton.mlp_layerscale import (  # noqa: E402
    FUSED_MAX_C,
    mlp_layerscale_bwd,
    mlp_layerscale_fwd,
)

# Without the interpreter every test here runs the kernels on the GPU: all are GPU tests then
# (`pytest -m cuda` selects them), as the stage-shape test always is.
pytestmark = [] if triton_interpreted() else [pytest.mark.cuda]

EPS = 1e-6
ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# bf16 runs under the interpreter through tests/triton_interpreter_bf16.py (set up by conftest).
FLOAT_DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        bool(TRITON_INTERPRETER_BF16_MISSING), reason=f"bf16 under Triton's interpreter: {TRITON_INTERPRETER_BF16_MISSING}")),
]


def _device() -> str:
    # No torch.cuda call here: the interpreter flag already says where we run.
    return "cpu" if triton_interpreted() else "cuda"


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Launcher outputs and partial buffers start as NaN: an unwritten element fails."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _fill(t):
        if t.is_floating_point():
            t.fill_(math.nan)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(real_empty_like(*a, **k)))


def _check(name, fused, ref64, eager, dtype):
    assert fused.shape == ref64.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(fused).all(), f"{name}: non-finite values (unwritten element?)"
    err = (fused.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    if dtype == torch.float32:
        bound = 1e-5 * max(scale, 1e-3) + 1e-7
    else:
        eager_err = (eager.double() - ref64).abs().max().item()
        bound = 2 * eager_err + ATOL[dtype] * max(scale, 1.0)
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (max|ref| {scale:.3e})"


# --------------------------------------------------------------------------- dwconv + LayerNorm


def _dwconv_layernorm_ref(x, conv_weight, conv_bias, norm_weight, norm_bias):
    return dwconv_layernorm_ref(x, conv_weight, conv_bias, norm_weight, norm_bias, EPS)


def _dwconv_layernorm_case(N, H, W, C, has_bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev = _device()
    x = torch.randn(N, H, W, C, generator=g).to(dev, dtype)
    conv_weight = (0.2 * torch.randn(C, 1, 7, 7, generator=g)).to(dev)
    conv_bias = (0.2 * torch.randn(C, generator=g)).to(dev) if has_bias else None
    norm_weight = (1 + 0.3 * torch.randn(C, generator=g)).to(dev)
    norm_bias = (0.3 * torch.randn(C, generator=g)).to(dev)
    dy = torch.randn(N, H, W, C, generator=g).to(dev, dtype)
    return x, conv_weight, conv_bias, norm_weight, norm_bias, dy


def _autograd(fn, dy, *tensors):
    """fn(*tensors) and the gradients w.r.t. the tensors (None stays None)."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    inputs = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, inputs, dy.to(out.dtype)))
    return out.detach(), [next(grads) if t is not None else None for t in leaves]


DWCONV_SHAPES = [
    # N, H, W, C, conv bias
    (2, 5, 13, 40, True),
    (1, 17, 5, 96, False),
    (1, 1, 1, 40, True),
    (1, 13, 1, 40, True),
    (1, 3, 4, 768, True),
    # Several pixel tiles per image row, the last partial, as the ConvNeXt-T stage shapes have on
    # a GPU: forward and backward-norm 9 tiles of 8 / 1 pixel; backward conv 5 steps of 16 / 3
    # of 4. (And H = 17 above: two row chunks in the forward and backward-norm, 9 + 8 rows.)
    (1, 3, 70, 40, True),
    (1, 2, 9, 768, True),
    (1, 5, 6, 64, True),  # C a power of 2: one channel tile (the others have two or three)
    (2, 4, 6, 20, True),  # 8 does not divide C: padded channel tiles in the backward conv
    # Forward / backward-norm channel tiles that pass C, the last one masked: three of 16 (44),
    # 32 + 8 (37), one of 16 (13).
    (1, 4, 5, 44, True),
    (1, 3, 6, 37, False),
    (2, 3, 5, 13, True),
]


def _run_dwconv_layernorm(shape, dtype):
    N, H, W, C, has_bias = shape
    x, cw, cb, nw, nb, dy = _dwconv_layernorm_case(N, H, W, C, has_bias, dtype)

    y, mean, rstd = dwconv_layernorm_fwd(x, cw, cb, nw, nb, EPS)
    grads = dwconv_layernorm_bwd(dy, x, cw, cb, nw, mean, rstd)

    params64 = [t.double() if t is not None else None for t in (x, cw, cb, nw, nb)]
    y64, g64 = _autograd(_dwconv_layernorm_ref, dy.double(), *params64)
    if dtype == torch.float32:
        y_e, g_e = y64, g64  # unused by the fp32 rule
    else:  # eager in the low dtype: parameters in that dtype too (model.to(dtype))
        params_lo = [t.to(dtype) if t is not None else None for t in (x, cw, cb, nw, nb)]
        y_e, g_e = _autograd(_dwconv_layernorm_ref, dy, *params_lo)

    z64 = F.conv2d(x.double().permute(0, 3, 1, 2), cw.double(),
                   cb.double() if cb is not None else None, padding=3, groups=C)
    mean64 = z64.mean(1)
    rstd64 = (z64.var(1, unbiased=False) + EPS).rsqrt()
    assert y.dtype == dtype and mean.dtype == rstd.dtype == torch.float32
    assert mean.shape == rstd.shape == (N, H, W)
    _check("y", y, y64, y_e, dtype)
    assert (mean.double() - mean64).abs().max().item() <= 1e-5 * max(mean64.abs().max().item(), 1)
    assert ((rstd.double() - rstd64).abs() / rstd64).max().item() <= 1e-4

    dx, dcw, dcb, dnw, dnb = grads
    assert dx.dtype == dtype
    assert all(t.dtype == torch.float32 for t in (dcw, dcb, dnw, dnb))
    _check("dx", dx, g64[0], g_e[0], dtype)
    _check("dconv_weight", dcw, g64[1], g_e[1], dtype)
    if has_bias:
        _check("dconv_bias", dcb, g64[2], g_e[2], dtype)
    else:  # still returned: the bias gradient is the sum of dL/dz
        assert dcb.shape == (C,) and torch.isfinite(dcb).all()
    _check("dnorm_weight", dnw, g64[3], g_e[3], dtype)
    _check("dnorm_bias", dnb, g64[4], g_e[4], dtype)


@pytest.mark.parametrize("shape", DWCONV_SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + ("b" if s[4] else ""))
def test_dwconv_layernorm_fp32(shape):
    _run_dwconv_layernorm(shape, torch.float32)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES[1:], ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 13, 40, True), (1, 13, 5, 96, True), (1, 3, 4, 768, True),
                                   (1, 3, 70, 40, True)],
                         ids=lambda s: "x".join(map(str, s[:4])))
def test_dwconv_layernorm_low_precision(shape, dtype):
    _run_dwconv_layernorm(shape, dtype)


def test_dwconv_layernorm_channel_tiles():
    """The forward and backward-norm kernels hold all of C as up to three power-of-two tiles side
    by side: never wider than one next_power_of_2(C) tile, exactly C at every ConvNeXt width,
    three of one width at 3 * 2^k (one layout), every tile but the last within C (its mask is a
    constant); pixel tiles of 8 up to C = 512, then about _RING_TILE_ELEMS values; rows in chunks
    of at most 16; the backward-norm kernel's programs those of the forward."""
    from convnext_kernels.triton import dwconv_layernorm as m

    for C in range(1, 2049):
        rows, block_w, tiles, num_warps = m._ring_tiling(13, 56, C)
        assert m._ring_tiling(13, 56, C, backward=True)[:3] == (rows, block_w, tiles)
        present = [t for t in tiles if t]
        assert tiles[0] > 0 and present == list(tiles[:len(present)]), (C, tiles)
        assert all(t & (t - 1) == 0 for t in present), (C, tiles)
        assert C <= sum(tiles) <= triton.next_power_of_2(C), (C, tiles)
        assert sum(present[:-1]) < C, (C, tiles)  # only the last tile may need a mask
        # The least padding of one tile, three equal ones, or two; tiles of two widths (two
        # layouts) only where they pad strictly less.
        one, third = triton.next_power_of_2(C), triton.next_power_of_2(triton.cdiv(C, 3))
        assert sum(tiles) <= min(one, 3 * third), (C, tiles)
        assert len(set(present)) == 1 or sum(tiles) < min(one, 3 * third), (C, tiles)
        width = sum(tiles)
        assert block_w & (block_w - 1) == 0 and (block_w == 8 if width <= 512 else
                                                  block_w == 1 or block_w * width <= m._RING_TILE_ELEMS)
        assert rows == 13 and num_warps in (1, 2, 4, 8)
    for C in (40, 48, 64, 80, 96, 160, 192, 320, 384, 640, 768, 1024, 1536, 2048):
        assert sum(m._ring_tiling(56, 56, C)[2]) == C, C
    assert [m._channel_split(C) for C in (96, 384, 768, 128, 40, 80, 13, 44)] == [
        (32, 32, 32), (128, 128, 128), (256, 256, 256), (128, 0, 0), (32, 8, 0), (64, 16, 0), (16, 0, 0),
        (16, 16, 16)]
    # At the ConvNeXt-T stage shapes: row chunks that divide the image, the tiles the SASS was
    # checked for (see _ring_tiling): about 12 values of each accumulator per thread in the
    # forward, 6 in the backward-norm (12 at C = 384, where the warps run out).
    stages = ((56, 96), (28, 192), (14, 384), (7, 768))
    assert [m._ring_tiling(hw, hw, C)[:2] + m._ring_tiling(hw, hw, C)[3:]
            for hw, C in stages] == [(14, 8, 2), (14, 8, 4), (14, 8, 8), (7, 1, 2)]
    assert [m._ring_tiling(hw, hw, C, backward=True)[:2] + m._ring_tiling(hw, hw, C, backward=True)[3:]
            for hw, C in stages] == [(14, 8, 4), (14, 8, 8), (14, 8, 8), (7, 1, 4)]
    # Tiles of two widths: 6 values in the forward too.
    assert m._ring_tiling(28, 28, 80)[3] == m._ring_tiling(28, 28, 80, backward=True)[3] == 4


def test_dwconv_layernorm_bwd_conv_tiling():
    """The backward conv kernel's programs: whole images at the ConvNeXt-T stage shapes at batch
    128 (28-row halves at stage 1, to have enough programs), 3 samples per program at stage 4,
    channel tiles that divide C (32, or 8 at atto's 40), one value per thread. The interpreter's
    shapes take one whole image per program; the test below forces the other cases there."""
    from convnext_kernels.triton import dwconv_layernorm as m

    assert [m._conv_bwd_tiling(128, hw, hw, c) for hw, c in ((56, 96), (28, 192), (14, 384), (7, 768))] \
        == [(1, 28, 4, 32, 4), (1, 28, 4, 32, 4), (1, 14, 4, 32, 4), (3, 7, 4, 32, 4)]
    assert m._conv_bwd_tiling(2, 13, 5, 40) == (1, 13, 8, 8, 2)
    assert m._conv_bwd_tiling(2, 4, 6, 20) == (1, 4, 4, 32, 4)
    for C in range(1, 1025):
        _, _, block_w, block_c, num_warps = m._conv_bwd_tiling(8, 56, 56, C)
        assert block_c & (block_c - 1) == 0 and block_w * block_c == 32 * num_warps <= 128, C
        assert C % block_c == 0 or block_c == min(32, triton.next_power_of_2(C)), C


@pytest.mark.parametrize("samples,rows,dtype", [(1, 3, torch.float32), (2, 13, torch.float16), (2, 5, torch.float32)],
                         ids=str)
def test_dwconv_layernorm_bwd_rows_per_program(samples, rows, dtype, monkeypatch):
    """Programs that take part of an image, or several images: H = 13 leaves a partial last
    chunk for ROWS = 3 (1 row) and 5 (3 rows); 2 samples a program with 3 samples leave a
    partial last group. Each x pixel's dconv_weight terms must be counted by one program, each dx
    row written by one."""
    from convnext_kernels.triton import dwconv_layernorm as m

    real, used = m._conv_bwd_tiling, []

    def forced(N, H, W, C):
        _, _, block_w, block_c, num_warps = real(N, H, W, C)
        used.append((samples, rows))
        return samples, rows, block_w, block_c, num_warps

    monkeypatch.setattr(m, "_conv_bwd_tiling", forced)
    _run_dwconv_layernorm((3, 13, 5, 40, True), dtype)
    assert used == [(samples, rows)]


# --------------------------------------------------------------------------- MLP + layer scale


def _mlp_layerscale_ref(x, shortcut, w1, b1, w2, b2, gamma, drop_scale):
    z = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    if gamma is not None:
        z = z * gamma
    if drop_scale is not None:
        z = z * drop_scale.view(-1, 1, 1, 1)
    return shortcut + z


def _mlp_layerscale_case(N, H, W, C, has_gamma, has_drop, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev = _device()
    x = torch.randn(N, H, W, C, generator=g).to(dev, dtype)
    shortcut = torch.randn(N, H, W, C, generator=g).to(dev, dtype)
    w1 = (0.1 * torch.randn(4 * C, C, generator=g)).to(dev, dtype)
    b1 = (0.2 * torch.randn(4 * C, generator=g)).to(dev)
    w2 = (0.1 * torch.randn(C, 4 * C, generator=g)).to(dev, dtype)
    b2 = (0.2 * torch.randn(C, generator=g)).to(dev)
    gamma = (0.5 * torch.randn(C, generator=g)).to(dev) if has_gamma else None
    drop = (0.5 + 1.5 * torch.rand(N, generator=g)).to(dev) if has_drop else None
    if drop is not None and N > 1:
        drop[0] = 0.0  # a dropped sample (its branch gradient must vanish)
    dy = torch.randn(N, H, W, C, generator=g).to(dev, dtype)
    return x, shortcut, w1, b1, w2, b2, gamma, drop, dy


MLP_SHAPES = [
    # N, H, W, C, gamma, drop scale
    (2, 5, 13, 40, True, True),
    (1, 3, 5, 96, False, True),
    (3, 1, 1, 40, True, False),
    (1, 3, 7, 64, False, True),   # a power of 2: one accumulator tile (BLOCK_C1 = 0)
    (2, 3, 5, 13, True, True),    # below tl.dot's minimum width of 16
    (1, 2, 5, 400, True, True),   # C > FUSED_MAX_C: two-GEMM forward
    (1, 1, 3, 768, True, False),  # ConvNeXt-T stage-4 width
]


def _run_mlp_layerscale(shape, dtype, stored_preact=False, backward=True, tf32=False):
    """Launch forward (and backward) and check every output by the pass rule. tf32: fp32 under
    torch's TF32 switch (set by the caller), held to fp16's rule against torch's own TF32 GEMMs."""
    N, H, W, C, has_gamma, has_drop = shape
    x, sc, w1, b1, w2, b2, gamma, drop, dy = _mlp_layerscale_case(N, H, W, C, has_gamma, has_drop, dtype)

    preact = torch.empty((N * H * W, 4 * C), dtype=dtype, device=x.device) if stored_preact else None
    y = mlp_layerscale_fwd(x, sc, w1, b1, w2, b2, gamma, drop, preact_out=preact)
    grads = mlp_layerscale_bwd(dy, x, w1, b1, w2, b2, gamma, drop, preact=preact) if backward else None
    if stored_preact:
        a64 = x.double().reshape(-1, C) @ w1.double().T + b1.double()
        a_e = (x.reshape(-1, C) @ w1.T + b1.to(dtype)) if dtype != torch.float32 else a64
        _check("preact", preact, a64, a_e, dtype)

    def ref(x_, w1_, b1_, w2_, b2_, gamma_, sc_, drop_):
        return _mlp_layerscale_ref(x_, sc_, w1_, b1_, w2_, b2_, gamma_, drop_)

    def as64(t):
        return t.double() if t is not None else None

    tensors = (x, w1, b1, w2, b2, gamma)
    y64, g64 = _autograd(lambda *p: ref(*p, sc.double(), as64(drop)), dy.double(),
                         *[as64(t) for t in tensors])
    if dtype == torch.float32 and not tf32:
        y_e, g_e = y64, g64
    else:
        lo = [t.to(dtype) if t is not None else None for t in tensors]
        drop_lo = drop.to(dtype) if drop is not None else None
        y_e, g_e = _autograd(lambda *p: ref(*p, sc, drop_lo), dy, *lo)
    rule = torch.float16 if tf32 else dtype  # TF32 keeps 10 mantissa bits, as fp16 does

    assert y.dtype == dtype
    _check("y", y, y64, y_e, rule)
    if not backward:
        return
    dx, dw1, db1, dw2, db2, dgamma = grads
    assert dx.dtype == dtype
    assert all(t.dtype == torch.float32 for t in (dw1, db1, dw2, db2, dgamma))
    for name, got, i in (("dx", dx, 0), ("dfc1_weight", dw1, 1), ("dfc1_bias", db1, 2),
                         ("dfc2_weight", dw2, 3), ("dfc2_bias", db2, 4)):
        _check(name, got, g64[i], g_e[i], rule)
    if has_gamma:
        _check("dgamma", dgamma, g64[5], g_e[5], rule)
    else:
        assert dgamma.shape == (C,) and torch.isfinite(dgamma).all()


@pytest.mark.skipif(not triton_interpreted(), reason="a property of Triton's interpreter")
@pytest.mark.parametrize("case", ["dwconv_layernorm", "mlp_layerscale_fused", "mlp_layerscale_two_gemm"])
def test_kernels_build_no_int1_constants(case, monkeypatch):
    """Triton 3.3's interpreter cannot build int1 constants (its builder has no get_int1_ty), so a
    kernel that makes one (tl.full(..., True, tl.int1); a Python bool & a tensor, as a range loop
    variable is a Python int there) fails under 3.3 while CI's newer triton runs it. With that
    method taken away here, every kernel still runs and is right."""
    from triton.runtime import interpreter

    def refuse(self):
        raise AttributeError("no get_int1_ty: triton 3.3's interpreter has none")

    monkeypatch.setattr(interpreter.InterpreterBuilder, "get_int1_ty", refuse, raising=False)
    if case == "dwconv_layernorm":  # the ring forward, backward norm and backward conv; 2 channel tiles
        _run_dwconv_layernorm((1, 5, 6, 40, True), torch.float32)
    elif case == "mlp_layerscale_fused":
        _run_mlp_layerscale((1, 3, 5, 40, True, True), torch.float32)
    else:
        _run_mlp_layerscale((1, 2, 5, 400, True, True), torch.float32)


@pytest.mark.parametrize("shape", MLP_SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_mlp_layerscale_fp32(shape):
    _run_mlp_layerscale(shape, torch.float32)


@pytest.mark.skipif(triton_interpreted(), reason="TF32 is a GPU mode: the interpreter's dots are exact fp32")
# C = 40, 96, 192: the fused forward's TF32 lists; 400: the two-GEMM forward; all: the backward.
@pytest.mark.parametrize("shape", [(2, 5, 13, 40, True, True), (1, 5, 17, 96, True, True),
                                   (4, 14, 14, 192, True, False), (1, 2, 5, 400, True, True)],
                         ids=lambda s: "x".join(map(str, s[:4])))
def test_mlp_layerscale_tf32(shape):
    """fp32 with torch's TF32 switch on: the kernels' "tf32" dot mode and autotune lists, which
    only a GPU runs, against torch's own TF32 GEMMs."""
    from convnext_kernels.triton import mlp_layerscale as m

    with tf32_matmul(True):
        assert m._input_precision(torch.float32) == "tf32"
        _run_mlp_layerscale(shape, torch.float32, tf32=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES[1:], ids=str)
# C = 384: the widest fused (hidden on chip) case in 16 bits; 400 and 768: the two-GEMM path.
@pytest.mark.parametrize("shape", [(2, 5, 13, 40, True, True), (1, 5, 17, 96, True, True),
                                   (1, 3, 7, 64, True, True), (1, 2, 3, 384, True, True),
                                   (1, 2, 5, 400, True, True),
                                   (1, 1, 3, 768, True, False)],
                         ids=lambda s: "x".join(map(str, s[:4])))
def test_mlp_layerscale_low_precision(shape, dtype):
    _run_mlp_layerscale(shape, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 13, 40, True, True), (1, 2, 5, 400, True, False)],
                         ids=lambda s: "x".join(map(str, s[:4])))
def test_mlp_layerscale_stored_preact(shape, dtype):
    """The variant whose forward stores x @ W1.T + b1 and whose backward reads it."""
    _run_mlp_layerscale(shape, dtype, stored_preact=True)


def test_mlp_layerscale_bwd_reads_stored_preact():
    # A backward that ignored preact would pass the test above: feed it a different one.
    x, sc, w1, b1, w2, b2, gamma, drop, dy = _mlp_layerscale_case(1, 3, 5, 40, True, True, torch.float32)
    recomputed = mlp_layerscale_bwd(dy, x, w1, b1, w2, b2, gamma, drop)
    shifted = (x.reshape(-1, 40) @ w1.T + b1 + 0.5).contiguous()
    from_stored = mlp_layerscale_bwd(dy, x, w1, b1, w2, b2, gamma, drop, preact=shifted)
    assert not torch.allclose(recomputed[2], from_stored[2])  # db1 = sum(dh * gelu'(a))


def test_fused_forward_width_split():
    """The fused forward's two accumulator tiles cover C with powers of 2 >= 16, never wider than
    one next_power_of_2(C) tile, and fit ConvNeXt's widths (3 or 5 times a power of 2) exactly."""
    for C in range(1, FUSED_MAX_C + 1):
        c0, c1 = split_width(C)
        assert c0 >= 16 and c0 & (c0 - 1) == 0 and c0 <= max(C, 16), (C, c0, c1)
        assert c1 == 0 or (c1 >= 16 and c1 & (c1 - 1) == 0), (C, c0, c1)
        assert C <= c0 + c1 <= max(16, 1 << (C - 1).bit_length()), (C, c0, c1)
    for C in (48, 80, 96, 160, 192, 320, 384):  # atto/femto/nano/ConvNeXt-T widths <= 384
        assert sum(split_width(C)) == C
    assert split_width(40) == (32, 16) and split_width(128) == (128, 0)


def test_mlp_paths_cover_both_sides_of_threshold():
    assert any(s[3] <= FUSED_MAX_C for s in MLP_SHAPES)
    assert any(s[3] > FUSED_MAX_C for s in MLP_SHAPES)


def test_autotune_keys_name_real_parameters_and_the_preact_flags():
    """The autotuner keeps one choice per key. The flags that change a kernel's memory traffic
    (storing or reading the (M, 4C) pre-activation) must be in the key, or the stored form reuses
    configs timed for the recomputing one; and triton silently drops a key that names no
    parameter, so each must be a real one."""
    from convnext_kernels.triton import mlp_layerscale as m

    producers = [t for per_c in m._fused_fwd_kernels.values() for t in per_c.values()] + list(m._matmul.values())
    readers = list(m._bwd_hidden.values())
    assert all("STORE_PREACT" in t.keys for t in producers)
    assert all("PREACT_STORED" in t.keys for t in readers)
    for t in producers + readers:
        assert set(t.keys) <= set(t.arg_names), (t.fn.__name__, sorted(set(t.keys) - set(t.arg_names)))


def test_autotune_tunes_once_per_size_octave(monkeypatch):
    """A new row count (batch or image size) in the same power of two reuses the tuned choice of
    every autotuned kernel; the next power of two tunes again. Each kernel is given two configs
    (one config is never timed) and a stand-in timer that counts what it is asked to time."""
    from convnext_kernels.triton import mlp_layerscale as m

    mode = m._dot_mode(torch.float32, "ieee")
    tuned = {"fused": m._fused_fwd_kernels[mode][128], "matmul": m._matmul[mode],
             "bwd_hidden": m._bwd_hidden[mode]}
    timed = []
    for name, t in tuned.items():
        cfg = t.configs[0]
        twin = triton.Config(dict(cfg.kwargs), num_warps=cfg.num_warps, num_stages=cfg.num_stages + 1)
        monkeypatch.setattr(t, "configs", [cfg, twin])
        monkeypatch.setattr(t, "cache", {})
        monkeypatch.setattr(t, "_bench", lambda *a, config, _n=name, **k: timed.append(_n) or [1.0, 1.0, 1.0])

    def tunings(rows_h):
        timed.clear()
        _run_mlp_layerscale((1, rows_h, 29, 40, True, True), torch.float32)
        return sorted(set(timed)), {name: len(t.cache) for name, t in tuned.items()}

    # 145 rows: the fused forward, the backward hidden kernel and three backward GEMMs tune.
    kernels, first = tunings(5)
    assert kernels == ["bwd_hidden", "fused", "matmul"] and first == {"fused": 1, "matmul": 3, "bwd_hidden": 1}
    assert tunings(6) == ([], first)  # 174 rows: the same octave (<= 256)
    kernels, third = tunings(9)  # 261 rows: the next one
    assert kernels == ["bwd_hidden", "fused", "matmul"] and third == {"fused": 2, "matmul": 6, "bwd_hidden": 2}


def _gpu_config_cases():
    """(kernel, dot mode, fused width key, config) for each tile shape of the GPU autotune lists
    (configs differing only in num_warps / num_stages run alike in the interpreter: once)."""
    from convnext_kernels.triton import mlp_layerscale as m

    cases = [("fused", mode, width, cfg) for mode, per_width in m._GPU_FUSED_FWD_CONFIGS.items()
             for width, cfgs in per_width.items() for cfg in cfgs]
    cases += [("matmul", mode, None, cfg) for mode, cfgs in m._GPU_MATMUL_CONFIGS.items() for cfg in cfgs]
    cases += [("bwd_hidden", mode, None, cfg) for mode, cfgs in m._GPU_BWD_HIDDEN_CONFIGS.items()
              for cfg in cfgs]
    unique = {}
    for kernel, mode, width, cfg in cases:
        unique.setdefault((kernel, mode, width, tuple(sorted(cfg.kwargs.items()))), (kernel, mode, width, cfg))
    return list(unique.values())


def _config_id(case):
    kernel, mode, width, cfg = case
    blocks = "-".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in sorted(cfg.kwargs.items()))
    return f"{kernel}-{mode}{'' if width is None else f'-w{width}'}-{blocks}"


# C per fused width key: an accumulator (BLOCK_C0 + BLOCK_C1) the key serves, with both tiles.
_WIDTH_TO_C = {128: 96, 192: 160, 256: 224, 384: 320}


@pytest.mark.skipif(not triton_interpreted(), reason="checks the tile shapes, which the interpreter runs on CPU "
                    "in CI; on a GPU only the autotuner's pick runs (in the other tests)")
@pytest.mark.parametrize("case", _gpu_config_cases(), ids=_config_id)
def test_every_gpu_autotune_config(case, monkeypatch):
    """Each GPU autotune config's tile shape (BLOCK_M / H / K / N, GROUP_M) gives the right
    result: the interpreter normally runs one small config, while a GPU's autotuner may pick any
    of these. 145 rows = two BLOCK_M = 128 row tiles, the second partial. tf32 configs run in
    exact fp32 here (the interpreter has no TF32): their tiles are what is checked."""
    from convnext_kernels.triton import mlp_layerscale as m

    kernel, mode, width, cfg = case
    dtype = torch.float16 if mode == "mma" else torch.float32
    run_mode = m._dot_mode(dtype, "ieee")  # the slot the interpreter's launch uses
    if kernel == "fused":
        C = _WIDTH_TO_C[width]
        # On a GPU this C selects this width's list.
        assert C <= m._fused_max_c(dtype)
        assert m._fused_list_key(m._GPU_FUSED_FWD_CONFIGS[mode], sum(split_width(C))) == width
        tuned = list(m._fused_fwd_kernels[run_mode].values())
    else:
        tuned = [(m._matmul if kernel == "matmul" else m._bwd_hidden)[run_mode]]
    for t in tuned:
        monkeypatch.setattr(t, "configs", [cfg])
        monkeypatch.setattr(t, "best_config", None, raising=False)
    if kernel == "fused":
        _run_mlp_layerscale((1, 5, 29, C, True, False), dtype, backward=False)
    elif kernel == "matmul":
        C = 400 if mode == "mma" else 264  # above the fused widths: the two-GEMM forward
        assert C > m._fused_max_c(dtype)
        _run_mlp_layerscale((1, 5, 29, C, True, True), dtype)
    else:
        _run_mlp_layerscale((1, 5, 29, 40, True, True), dtype)
    assert any(t.best_config is cfg for t in tuned), "the patched config did not run"


def test_weight_gradients_split_k_on_gpu_shapes():
    """The weight-gradient GEMMs split their reduction over the rows only above 512 rows: at the
    ConvNeXt-T stage shapes at batch 32 and 128, never at a shape small enough for the
    interpreter. The test below forces the split there."""
    from convnext_kernels.triton import mlp_layerscale as m

    for batch in (32, 128):
        for hw, C in ((56, 96), (28, 192), (14, 384), (7, 768)):
            rows = batch * hw * hw
            assert m._split_k(C, 4 * C, rows)[0] > 1 and m._split_k(4 * C, C, rows)[0] > 1
    assert m._split_k(40, 160, 145) == (1, 256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("k_per_split", [48, 64])
def test_weight_gradients_split_k(k_per_split, dtype, monkeypatch):
    """G = dys.T @ h and dW1 = da.T @ x in several K splits (fp32 partials summed after): 145 rows
    in splits of 48 (not a multiple of BLOCK_K, the last split 1 row) or 64."""
    from convnext_kernels.triton import mlp_layerscale as m

    used = []

    def forced(rows, cols, K):
        used.append(triton.cdiv(K, k_per_split))
        return triton.cdiv(K, k_per_split), k_per_split

    monkeypatch.setattr(m, "_split_k", forced)
    _run_mlp_layerscale((1, 5, 29, 40, True, True), dtype)
    assert used == [triton.cdiv(145, k_per_split)] * 2


def test_backward_is_deterministic():
    x, cw, cb, nw, nb, dy = _dwconv_layernorm_case(2, 5, 6, 40, True, torch.float32, seed=1)
    _, mean, rstd = dwconv_layernorm_fwd(x, cw, cb, nw, nb, EPS)
    a = dwconv_layernorm_bwd(dy, x, cw, cb, nw, mean, rstd)
    b = dwconv_layernorm_bwd(dy, x, cw, cb, nw, mean, rstd)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    x, sc, w1, b1, w2, b2, gamma, drop, dy = _mlp_layerscale_case(2, 3, 5, 40, True, True,
                                                                  torch.float32, seed=1)
    a = mlp_layerscale_bwd(dy, x, w1, b1, w2, b2, gamma, drop)
    b = mlp_layerscale_bwd(dy, x, w1, b1, w2, b2, gamma, drop)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


# --------------------------------------------------------------------------- torch.library.triton_op

_TEST_OPS = {}


def _test_ops():
    """Register the launchers as triton_ops once (as the op layer does) under a test namespace."""
    if not _TEST_OPS:
        for name, fn in (("dwln_fwd", dwconv_layernorm_fwd), ("dwln_bwd", dwconv_layernorm_bwd),
                         ("mlp_fwd", mlp_layerscale_fwd), ("mlp_bwd", mlp_layerscale_bwd)):
            _TEST_OPS[name] = torch.library.triton_op(f"convnext_kernels_test::{name}",
                                                      mutates_args=())(fn)
    return _TEST_OPS


def _opcheck(op, args):
    # Under TRITON_INTERPRET=1, wrap_triton returns the interpreted kernel itself
    # (no higher-order op), so the fake-tensor / AOT-dispatch checks would launch
    # the interpreter on FakeTensors and fail; only the eager checks apply there.
    if triton_interpreted():
        result = torch.library.opcheck(op, args,
                                       test_utils=("test_schema", "test_autograd_registration"))
    else:
        result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_launchers_as_triton_ops():
    ops = _test_ops()
    x, cw, cb, nw, nb, dy = _dwconv_layernorm_case(1, 5, 6, 40, True, torch.float32, seed=2)
    y, mean, rstd = ops["dwln_fwd"](x, cw, cb, nw, nb, EPS)
    y_direct, _, _ = dwconv_layernorm_fwd(x, cw, cb, nw, nb, EPS)
    assert torch.equal(y, y_direct)
    _opcheck(ops["dwln_fwd"], (x, cw, cb, nw, nb, EPS))
    _opcheck(ops["dwln_fwd"], (x, cw, None, nw, nb, EPS))
    _opcheck(ops["dwln_bwd"], (dy, x, cw, cb, nw, mean, rstd))

    x, sc, w1, b1, w2, b2, gamma, drop, dy = _mlp_layerscale_case(1, 5, 6, 40, True, True,
                                                                  torch.float32, seed=2)
    y = ops["mlp_fwd"](x, sc, w1, b1, w2, b2, gamma, drop)
    assert torch.equal(y, mlp_layerscale_fwd(x, sc, w1, b1, w2, b2, gamma, drop))
    _opcheck(ops["mlp_fwd"], (x, sc, w1, b1, w2, b2, gamma, drop))
    _opcheck(ops["mlp_fwd"], (x, sc, w1, b1, w2, b2, None, None))
    _opcheck(ops["mlp_bwd"], (dy, x, w1, b1, w2, b2, gamma, None))


@pytest.mark.parametrize("shape", [
    ("bf16", 4096, 56, 56, 96),   # stage 1 at batch 4096 (N * H = 229376)
    ("fp16", 160, 512, 512, 96),  # 2048-px images' stage 1 at batch 160
    ("fp32", 16384, 7, 7, 768),   # stage 4 at batch 16384
], ids=lambda s: "x".join(map(str, s)))
def test_launch_grids_fit_cuda_limits(shape):
    """Every launch the four launchers make at large batches and images stays inside CUDA's grid
    limits (x < 2^31, y and z <= 65535): the interpreter does not check them, a GPU refuses the
    launch. Launchers run on meta tensors with the kernels recorded, not run (tests/triton_aot.py)."""
    from triton_aot import capture

    launches = capture(shape)
    assert {getattr(k, "fn", k).__name__ for k, _, _, _ in launches} >= {
        "_dwconv_layernorm_fwd_kernel", "_dwconv_layernorm_bwd_norm_kernel", "_dwconv_layernorm_bwd_conv_kernel"}
    for kernel, _, kwargs, grid in launches:
        for cfg in getattr(kernel, "configs", None) or [None]:  # an autotuned grid depends on the config
            meta = dict(kwargs, **(cfg.kwargs if cfg is not None else {}))
            size = tuple(grid(meta) if callable(grid) else grid) + (1, 1)
            name = getattr(kernel, "fn", kernel).__name__
            assert 0 < size[0] < 2**31 and 0 < size[1] <= 65535 and 0 < size[2] <= 65535, (name, size[:3])


def test_launch_grid_overflow_is_an_error():
    from triton_aot import capture

    # 2^36 pixels at C = 2048: the forward's programs take 1 pixel x 16 rows, 2^32 of them.
    with pytest.raises(ValueError, match="split the batch"):
        capture(("bf16", 2**17, 2**9, 2**10, 2048))


def test_row_offset_overflow_is_an_error():
    """An image row is addressed with int32 offsets from its int64 start: a row of 2^31 elements
    or more is refused with a clear error, not read at wrapped offsets."""
    from triton_aot import capture

    with pytest.raises(ValueError, match="elements in an image row"):
        capture(("bf16", 1, 2, 2**21, 1024))  # (2^21 + 3) * 1024 > 2^31 - 1
    capture(("bf16", 1, 2, 2**21 - 3, 1023))  # (W + 3) * C = 2^21 * 1023, just under the limit: no error


# --------------------------------------------------------------------------- GPU: ConvNeXt-T stages

CONVNEXT_T_STAGES = [(32, 56, 56, 96), (32, 28, 28, 192), (32, 14, 14, 384), (32, 7, 7, 768)]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stage", CONVNEXT_T_STAGES, ids=lambda s: "x".join(map(str, s)))
def test_convnext_t_stage_shapes(stage, dtype):
    N, H, W, C = stage
    _run_dwconv_layernorm((N, H, W, C, True), dtype)
    _run_mlp_layerscale((N, H, W, C, True, True), dtype)
