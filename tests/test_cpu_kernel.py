"""The C++ CPU kernel (convnext_kernels._C) through the "cpu" launchers, against plain torch.
(The mlp_layerscale GELU epilogue has its own file, test_cpu_gelu_epilogue.py.)"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

_C = pytest.importorskip("convnext_kernels._C", reason="compiled extension not built")
from convnext_kernels.launchers import cpu as cpu_launchers  # noqa: E402
from convnext_kernels.reference import dwconv_layernorm_ref  # noqa: E402

SHAPES = [(3, 13, 17, 40), (2, 1, 1, 24), (1, 5, 7, 96)]  # (N, H, W, C): odd sizes, 1x1, C % 16 == 0
EPS = 1e-6
# Absolute slack on top of 2x torch's own error in the same dtype, relative to the output scale.
ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def make_inputs(shape, dtype, bias=True, seed=0):
    N, H, W, C = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, W, C, generator=g).to(dtype)
    conv_weight = torch.randn(C, 1, 7, 7, generator=g) * 0.2
    conv_bias = torch.randn(C, generator=g) if bias else None
    norm_weight = 1 + 0.5 * torch.randn(C, generator=g)
    norm_bias = 0.5 * torch.randn(C, generator=g)
    dy = torch.randn(N, H, W, C, generator=g).to(dtype)
    return x, conv_weight, conv_bias, norm_weight, norm_bias, dy


def torch_forward_backward(x, conv_weight, conv_bias, norm_weight, norm_bias, dy, dtype):
    """Plain torch in `dtype` (parameters cast too): the reference (F.conv2d(groups=C) + LayerNorm)."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None
              for t in (x, conv_weight, conv_bias, norm_weight, norm_bias)]
    y = dwconv_layernorm_ref(*leaves, EPS)
    y.backward(dy.to(dtype))
    grads = [t.grad if t is not None else None for t in leaves]
    return y.detach(), grads  # grads: dx, dconv_weight, dconv_bias, dnorm_weight, dnorm_bias


def fused_forward_backward(x, conv_weight, conv_bias, norm_weight, norm_bias, dy):
    y, mean, rstd = cpu_launchers.dwconv_layernorm_fwd(x, conv_weight, conv_bias, norm_weight, norm_bias, EPS)
    grads = cpu_launchers.dwconv_layernorm_bwd(dy, x, conv_weight, conv_bias, norm_weight, mean, rstd)
    return y, mean, rstd, list(grads)


def max_abs_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_build_info():
    info = _C.build_info()
    for key, kind in (("compiler", str), ("openmp", bool), ("cuda", bool), ("cuda_archs", list)):
        assert isinstance(info[key], kind), key
    assert info["cuda_version"] is None or isinstance(info["cuda_version"], str)
    assert all(isinstance(a, str) for a in info["cuda_archs"])
    assert info["cuda"] == (info["cuda_version"] is not None)
    assert info["cpu_bf16_dot"] is _C.gemm_tn_bf16_cpu_supported()
    import convnext_kernels

    assert convnext_kernels.build_info()["cuda_emulation"] in (True, False)


def test_cpu_and_cuda_kernels_share_dtype_codes():
    # The launchers pass one code table (convnext_kernels.launchers.dtype_code) to both.
    assert (_C.DTYPE_FLOAT32, _C.DTYPE_FLOAT16, _C.DTYPE_BFLOAT16) == (0, 1, 2)
    if _C.build_info()["cuda_kernels"]:  # compiled here whenever nvcc is found, as in CI
        assert (_C.CUDA_DTYPE_FLOAT32, _C.CUDA_DTYPE_FLOAT16, _C.CUDA_DTYPE_BFLOAT16) == (0, 1, 2)
    from convnext_kernels.backends import emulated_cuda_extension

    emulated = emulated_cuda_extension()[0]
    if emulated is not None:  # the same codes in the emulated CUDA kernels
        assert (emulated.CUDA_DTYPE_FLOAT32, emulated.CUDA_DTYPE_FLOAT16, emulated.CUDA_DTYPE_BFLOAT16) == (0, 1, 2)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_torch(shape, bias):
    x, cw, cb, nw, nb, dy = make_inputs(shape, torch.float32, bias)
    y, mean, rstd, grads = fused_forward_backward(x, cw, cb, nw, nb, dy)
    y_ref, grads_ref = torch_forward_backward(x, cw, cb, nw, nb, dy, torch.float32)

    z = F.conv2d(x.permute(0, 3, 1, 2), cw, cb, padding=3, groups=shape[3]).permute(0, 2, 3, 1)
    var, mean_ref = torch.var_mean(z, dim=-1, unbiased=False)
    pairs = [("y", y, y_ref), ("mean", mean, mean_ref), ("rstd", rstd, torch.rsqrt(var + EPS))]
    names = ["dx", "dconv_weight", "dconv_bias", "dnorm_weight", "dnorm_bias"]
    for name, got, ref in zip(names, grads, grads_ref):
        if ref is None:  # no conv bias: the kernel still returns its gradient
            assert got.shape == (shape[3],)
            continue
        pairs.append((name, got, ref))
    for name, got, ref in pairs:
        assert got.shape == ref.shape and got.dtype == torch.float32, name
        assert torch.isfinite(got).all(), f"{name}: NaN/Inf (unwritten output?)"
        scale = max(ref.abs().max().item(), 1.0)
        assert max_abs_err(got, ref) <= 1e-5 * scale, f"{name}: err {max_abs_err(got, ref):.3g} scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_low_precision_pass_rule(shape, dtype):
    x, cw, cb, nw, nb, dy = make_inputs(shape, dtype)
    y, _, _, grads = fused_forward_backward(x, cw, cb, nw, nb, dy)
    assert y.dtype == dtype and grads[0].dtype == dtype
    assert all(g.dtype == torch.float32 for g in grads[1:])
    y64, grads64 = torch_forward_backward(x, cw, cb, nw, nb, dy, torch.float64)
    y_same, grads_same = torch_forward_backward(x, cw, cb, nw, nb, dy, dtype)
    names = ["y", "dx", "dconv_weight", "dconv_bias", "dnorm_weight", "dnorm_bias"]
    for name, got, ref, same in zip(names, [y] + grads, [y64] + grads64, [y_same] + grads_same):
        assert torch.isfinite(got).all(), f"{name}: NaN/Inf (unwritten output?)"
        atol = ATOL[dtype] * max(ref.abs().max().item(), 1.0)
        bound = 2 * max_abs_err(same, ref) + atol
        assert max_abs_err(got, ref) <= bound, f"{name}: err {max_abs_err(got, ref):.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_across_thread_counts(dtype):
    inputs = make_inputs((2, 19, 11, 40), dtype)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y, mean, rstd, grads = fused_forward_backward(*inputs)
            results.append([y, mean, rstd, *grads])
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_float_conversions_round_to_nearest_even():
    # Values between representable fp16/bf16 numbers, ties, subnormals, overflow: the kernel's
    # own conversion must equal torch's. With all-zero weights and bias, y = norm_bias exactly.
    C = 64
    special = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 2**-24 * 1.5, 2**-25, 6e-8, 65519.0, 65520.0,
                            1e6, -1 - 2**-8, 1 + 2**-8, 1 + 3 * 2**-8, 3.3e38, -2.5e-39])
    norm_bias = torch.cat([special, torch.randn(C - special.numel())])
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(1, 2, 3, C).to(dtype)
        y, _, _ = cpu_launchers.dwconv_layernorm_fwd(
            x, torch.zeros(C, 1, 7, 7), None, torch.ones(C), norm_bias, EPS)
        expected = norm_bias.to(dtype).expand_as(y)
        assert torch.equal(y.view(torch.int16), expected.contiguous().view(torch.int16)), dtype


def test_invalid_arguments_raise_value_error():
    with pytest.raises(ValueError):
        _C.dwconv_layernorm_fwd_cpu(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 8, 1e-6, 0)
    x = torch.randn(1, 2, 2, 8)
    with pytest.raises(ValueError):
        _C.dwconv_layernorm_bwd_cpu_workspace_size(1, 0, 2, 8)
    with pytest.raises(ValueError):  # unknown dtype code
        _C.dwconv_layernorm_fwd_cpu(x.data_ptr(), x.data_ptr(), 0, x.data_ptr(), x.data_ptr(),
                                    x.data_ptr(), x.data_ptr(), x.data_ptr(), 1, 1, 1, 8, 1e-6, 7)


_ISA_CHECK = """
import torch, torch.nn.functional as F
from convnext_kernels import _C
from convnext_kernels.launchers import cpu
assert _C.build_info()["cpu_isa"] == {isa!r}, _C.build_info()["cpu_isa"]
torch.manual_seed(0)
N, H, W, C = 2, 9, 13, 40
x = torch.randn(N, H, W, C, requires_grad=True); cw = torch.randn(C, 1, 7, 7) * 0.2
cb, nw, nb = torch.randn(C), 1 + 0.5 * torch.randn(C), torch.randn(C)
dy = torch.randn(N, H, W, C)
y, mean, rstd = cpu.dwconv_layernorm_fwd(x.detach(), cw, cb, nw, nb, 1e-6)
dx = cpu.dwconv_layernorm_bwd(dy, x.detach(), cw, cb, nw, mean, rstd)[0]
ref = F.layer_norm(F.conv2d(x.permute(0, 3, 1, 2), cw, cb, padding=3, groups=C).permute(0, 2, 3, 1), (C,), nw, nb, 1e-6)
ref.backward(dy)
assert (y - ref).abs().max() < 1e-4 and (dx - x.grad).abs().max() < 1e-4
# The mlp_layerscale GELU epilogue, its width-37 rows ending in a partial vector.
a, dh = torch.randn(70, 37) * 3, torch.randn(70, 37)
h, da, db = torch.empty(70, 37), dh.clone(), torch.zeros(37)
n = _C.mlp_layerscale_gelu_bwd_cpu_workspace_size(70, 37)
workspace = torch.empty(n)
_C.mlp_layerscale_gelu_bwd_cpu(a.data_ptr(), 0, da.data_ptr(), da.data_ptr(), 0, h.data_ptr(), db.data_ptr(),
                               workspace.data_ptr(), n, 70, 37, 0, 0, 0, 0, 2)
ref_da = dh * torch.ops.aten.gelu_backward(torch.ones_like(a), a)
assert (h - F.gelu(a)).abs().max() < 1e-5 and (da - ref_da).abs().max() < 1e-5
assert (db - ref_da.sum(0)).abs().max() < 1e-4
bias, h16, out16 = torch.randn(37), torch.empty(70, 37, dtype=torch.bfloat16), torch.empty(70, 37, dtype=torch.bfloat16)
a16 = a.bfloat16()
_C.mlp_layerscale_gelu_fwd_cpu(a16.data_ptr(), bias.data_ptr(), out16.data_ptr(), h16.data_ptr(), 70, 37,
                               _C.DTYPE_BFLOAT16, _C.DTYPE_BFLOAT16, 2)
assert torch.equal(out16, a16)
torch.testing.assert_close(h16.float(), F.gelu(a16.float() + bias), rtol=1e-2, atol=1e-2)
# The backward's 16-bit forms: bf16 pre-activation and gradient in; fp32 da, its bf16 copy and the
# bf16-rounded hidden in fp32 out; as the float32 kernel gives for the same values.
a16, dh16 = a.bfloat16(), dh.bfloat16()
da2, low, h2, db2 = torch.empty(70, 37), torch.empty(70, 37, dtype=torch.bfloat16), torch.empty(70, 37), torch.zeros(37)
_C.mlp_layerscale_gelu_bwd_cpu(a16.data_ptr(), 0, dh16.data_ptr(), da2.data_ptr(), low.data_ptr(), h2.data_ptr(),
                               db2.data_ptr(), workspace.data_ptr(), n, 70, 37, _C.DTYPE_BFLOAT16, _C.DTYPE_BFLOAT16,
                               _C.DTYPE_BFLOAT16, 0, 2)
a32, da3, h3, db3 = a16.float(), dh16.float(), torch.empty(70, 37), torch.zeros(37)
_C.mlp_layerscale_gelu_bwd_cpu(a32.data_ptr(), 0, da3.data_ptr(), da3.data_ptr(), 0, h3.data_ptr(),
                               db3.data_ptr(), workspace.data_ptr(), n, 70, 37, 0, 0, 0, 0, 2)
assert torch.equal(da2, da3) and torch.equal(low, da3.bfloat16()) and torch.equal(db2, db3)
assert torch.equal(h2, h3.bfloat16().float())
# The vectorised 16-bit conversions: every bit pattern read and written back (NaN stays NaN),
# and float32 values (ties between neighbours, subnormals, overflow) rounded as torch rounds
# (through the residual epilogue: -0 + f).
for dt, code in ((torch.float16, _C.DTYPE_FLOAT16), (torch.bfloat16, _C.DTYPE_BFLOAT16)):
    p16 = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dt).view(4096, 16)
    out, scratch = torch.empty_like(p16), torch.empty_like(p16)
    _C.mlp_layerscale_gelu_fwd_cpu(p16.data_ptr(), 0, out.data_ptr(), scratch.data_ptr(), 4096, 16, code, code, 2)
    nan = p16.isnan()
    assert torch.equal(out[~nan].view(torch.int16), p16[~nan].view(torch.int16)) and out[nan].isnan().all()
    finite = p16.flatten()[~p16.flatten().isnan() & ~p16.flatten().isinf()].float().sort().values.unique()
    f = torch.cat([(finite[1:] + finite[:-1]) / 2, finite * 1.0001, torch.randn(4096) * 7e4]).float()
    f = f[: f.numel() // 16 * 16].view(-1, 16).contiguous()
    out, zeros = torch.empty(f.shape, dtype=dt), torch.full(f.shape, -0.0, dtype=dt)  # -0 + f is f, signed zeros too
    _C.mlp_layerscale_residual_cpu(f.data_ptr(), 0, 0, 0, zeros.data_ptr(), out.data_ptr(), f.shape[0], 16, code, 0, 2)
    assert torch.equal(out.view(torch.int16), f.to(dt).view(torch.int16)), dt
"""


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_other_instruction_set_variants(isa, tmp_path):
    """The runtime-dispatched variants this machine would not pick by itself (only downgrades)."""
    best = _C.build_info()["cpu_isa"]
    order = ["generic", "avx2", "avx512"]
    if order.index(isa) >= order.index(best):
        pytest.skip(f"{isa} is this machine's default ({best}) or not supported")
    env = dict(os.environ, CONVNEXT_KERNELS_CPU_ISA=isa)
    # Run outside the source tree, so the child imports the same (installed) package as this test.
    subprocess.run([sys.executable, "-c", _ISA_CHECK.format(isa=isa)], env=env, check=True, timeout=120,
                   cwd=tmp_path)
