"""The C++ epilogues of the cpu backend's mlp_layerscale (convnext_kernels._C): fc1's GELU
(mlp_layerscale_gelu_{fwd,bwd}_cpu) against float64 torch: its own exp/erfc evaluation, the bias
it adds, the bias gradient it sums, the hidden in every dtype, odd widths, thread counts and bad
input; fc2's residual epilogue (mlp_layerscale_residual_cpu); the weight-gradient operands'
transposed copy (transpose_to_float32_cpu)."""

import math

import pytest
import torch
import torch.nn.functional as F

_C = pytest.importorskip("convnext_kernels._C", reason="compiled extension not built")

from convnext_kernels.launchers import dtype_code  # noqa: E402
from conftest import cpu_fp32_precision  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def gelu_fwd(preact, bias, hidden, threads=2, preact_out=None):
    """The forward kernel; preact is float32 or of hidden's dtype (its own dtype is passed)."""
    rows, cols = preact.shape
    _C.mlp_layerscale_gelu_fwd_cpu(preact.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                   0 if preact_out is None else preact_out.data_ptr(), hidden.data_ptr(),
                                   rows, cols, dtype_code(hidden.dtype, "cpu"), dtype_code(preact.dtype, "cpu"),
                                   threads)


def gelu_bwd(preact, bias, grad, hidden, bias_grad, threads=2, dtype=None, grad_preact=None, grad_preact_low=None):
    """The backward kernel for activations of `dtype` (default: hidden's); preact, grad and hidden
    each float32 or of that dtype (their own dtypes are passed); grad_preact None: in place
    over grad."""
    rows, cols = preact.shape
    dtype = hidden.dtype if dtype is None else dtype
    grad_preact = grad if grad_preact is None else grad_preact
    n = _C.mlp_layerscale_gelu_bwd_cpu_workspace_size(rows, cols)
    workspace = torch.full((max(n, 1),), math.nan)  # poisoned: every partial is written before it is read
    _C.mlp_layerscale_gelu_bwd_cpu(preact.data_ptr(), 0 if bias is None else bias.data_ptr(), grad.data_ptr(),
                                   grad_preact.data_ptr(), 0 if grad_preact_low is None else grad_preact_low.data_ptr(),
                                   hidden.data_ptr(), bias_grad.data_ptr(), workspace.data_ptr(), n, rows, cols,
                                   dtype_code(dtype, "cpu"), dtype_code(preact.dtype, "cpu"),
                                   dtype_code(grad.dtype, "cpu"), dtype_code(hidden.dtype, "cpu"), threads)


def all_16_bit_patterns(dtype, cols=16):
    """Every fp16 or bf16 bit pattern once (then zeros to fill the last row), in rows of cols:
    whole vectors for 16, a partial one at the end of every row for 17."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    bits = torch.cat([bits, bits.new_zeros(-bits.numel() % cols)])
    return bits.view(dtype).view(-1, cols)


def canonical_bits(t):
    """t's bits, with every NaN replaced by the quiet NaN the kernels write (sign dropped)."""
    nan = torch.tensor(math.nan, dtype=t.dtype)
    return torch.where(t.isnan(), nan, t).view(torch.int16)


def gelu_grad64(a):
    return torch.ops.aten.gelu_backward(torch.ones_like(a), a)


def test_gelu_and_its_derivative_match_float64_as_well_as_torch_does():
    # Dense over [-20, 20] (both branches of every select, the far tails where exp underflows)
    # plus typical pre-activations; the flash-attention rule against torch's own fp32 error.
    typical = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 3
    a = torch.cat([torch.linspace(-20, 20, 400_000), typical])
    # Rows of 100: whole groups of interleaved vectors (64 floats a group on AVX-512), then single
    # vectors and a partial one.
    a = a.view(-1, 100)
    preact, hidden, grad = a.clone(), torch.empty_like(a), torch.ones_like(a)
    gelu_bwd(preact, None, grad, hidden, torch.zeros(a.shape[1]))
    a64 = a.double()
    for name, ours, torch_fp32, ref in (("gelu", hidden, F.gelu(a), F.gelu(a64)),
                                        ("gelu'", grad, gelu_grad64(a), gelu_grad64(a64))):
        err, torch_err = (ours.double() - ref).abs(), (torch_fp32.double() - ref).abs()
        bound = 2 * torch_err + 3e-7 * ref.abs().clamp_min(1.0)
        assert (err <= bound).all(), f"{name}: worst {err.max():.3g}, torch's {torch_err.max():.3g}"
    forward_hidden = torch.empty_like(a)
    gelu_fwd(a.clone(), None, forward_hidden)
    assert torch.equal(forward_hidden, hidden), "forward and backward evaluate GELU alike"


def test_far_negative_tail_keeps_its_relative_accuracy():
    # Where GELU and its derivative are tiny (a < -5: below 3e-6) the rule above is an absolute
    # 3e-7, which zeros would pass. Computed as exp(-a^2/2) Q(t) / 2, not as 1 + erf, the lower
    # tail stays accurate relative to float64 (a^2 / 2 rounded in float32 limits it to about
    # |a|^2 / 2 * 6e-8) down to where float32 flushes it.
    a = torch.linspace(-13, -5, 10_000).view(-1, 100)
    hidden, grad = torch.empty_like(a), torch.ones_like(a)
    gelu_bwd(a.clone(), None, grad, hidden, torch.zeros(a.shape[1]))
    # float64 references through erfc: torch's float64 1 + erf(u) cancels to 0 below a = -12.
    a64 = a.double()
    cdf = 0.5 * torch.special.erfc(-a64 / math.sqrt(2))
    pdf = torch.exp(-0.5 * a64 * a64) / math.sqrt(2 * math.pi)
    for name, ours, ref in (("gelu", hidden, a64 * cdf), ("gelu'", grad, cdf + a64 * pdf)):
        rel = ((ours.double() - ref) / ref).abs()
        assert rel.max() < 1e-5, f"{name}: relative error {rel.max():.3g}"


def test_special_values_behave_as_torch_gelu():
    a = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-30, -1e-30, 88.0, -88.0, 14.0, -14.0]).view(1, -1)
    hidden, grad = torch.empty_like(a), torch.ones_like(a)
    gelu_bwd(a.clone(), None, grad, hidden, torch.zeros(a.shape[1]))
    # Against float64 torch: torch's float32 GELU is NaN at +inf on AVX-512 machines (inf in float64
    # and on AVX2); ours is inf everywhere.
    torch.testing.assert_close(hidden, F.gelu(a.double()).float(), equal_nan=True, rtol=1e-6, atol=1e-38)
    torch.testing.assert_close(grad, gelu_grad64(a.double()).float(), equal_nan=True, rtol=1e-6, atol=1e-38)


@pytest.mark.parametrize("cols", (1, 7, 13, 37, 160, 200))  # below / across the vector and interleave widths
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_adds_the_bias_and_writes_the_hidden(cols, dtype):
    g = torch.Generator().manual_seed(cols)
    a = (torch.randn(5, cols, generator=g) * 3).to(dtype)  # the GEMM's output, in the activation dtype
    bias = torch.randn(cols, generator=g)
    preact, hidden = a.clone(), torch.full((5, cols), math.nan).to(dtype)
    preact_out = torch.full((5, cols), math.nan).to(dtype)
    gelu_fwd(preact, bias, hidden, preact_out=preact_out)
    assert torch.equal(preact, a), "the forward reads the GEMM's output, never writes it"
    assert torch.equal(preact_out, a), "the stored pre-activation is the GEMM's output, without the bias"
    fp32 = torch.empty(5, cols)
    gelu_fwd(a.float() + bias, None, fp32)
    torch.testing.assert_close(fp32.double(), F.gelu(a.double() + bias.double()), rtol=1e-6, atol=1e-6)
    assert torch.equal(hidden, fp32.to(dtype)), "16-bit hiddens are the fp32 result rounded once"
    unstored = torch.full((5, cols), math.nan).to(dtype)
    gelu_fwd(a.clone(), bias, unstored)
    assert torch.equal(unstored, hidden), "storing the pre-activation does not change the hidden"
    from_fp32 = torch.full((5, cols), math.nan).to(dtype)
    gelu_fwd(a.float(), bias, from_fp32)
    assert torch.equal(from_fp32, hidden), "a float32 pre-activation of the same values gives the same"


@pytest.mark.parametrize("cols", (16, 17))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_16_bit_preact_is_read_exactly(dtype, cols):
    # Every bit pattern (subnormals, infinities, NaN included) through the conversions both ways
    # (vectorised, and the scalar tail with 17 columns): the stored pre-activation is the input,
    # bit for bit, and the hidden is what the same values in float32 give.
    preact = all_16_bit_patterns(dtype, cols)
    preact_out, hidden = torch.empty_like(preact), torch.empty_like(preact)
    gelu_fwd(preact, None, hidden, preact_out=preact_out)
    assert torch.equal(canonical_bits(preact_out), canonical_bits(preact))
    hidden_from_fp32 = torch.empty_like(preact)
    gelu_fwd(preact.float(), None, hidden_from_fp32)
    assert torch.equal(canonical_bits(hidden), canonical_bits(hidden_from_fp32))


@pytest.mark.parametrize("cols", (7, 37, 160, 200))  # below / across the vector and interleave widths
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_16_bit_preact_gives_what_its_float32_copy_gives(cols, dtype):
    g = torch.Generator().manual_seed(cols)
    a = (torch.randn(70, cols, generator=g) * 3).to(dtype)
    bias, dh = torch.randn(cols, generator=g), torch.randn(70, cols, generator=g)
    results = []
    for preact in (a.float(), a):
        hidden = torch.full((70, cols), math.nan).to(dtype)
        gelu_fwd(preact.clone(), bias, hidden)
        grad, bwd_hidden, bias_grad = dh.clone(), torch.full((70, cols), math.nan).to(dtype), torch.zeros(cols)
        gelu_bwd(preact.clone(), bias, grad, bwd_hidden, bias_grad)
        results.append((hidden, grad, bwd_hidden, bias_grad))
    for x, y in zip(*results):
        assert torch.equal(x, y)
    # Written over the 16-bit pre-activation itself: the same values; the stored copy is a itself.
    in_place, out = a.clone(), torch.empty_like(a)
    gelu_fwd(in_place, bias, in_place, preact_out=out)
    assert torch.equal(in_place, results[0][0]) and torch.equal(out, a)
    out_in_place, hidden = a.clone(), torch.empty_like(a)
    gelu_fwd(out_in_place, bias, hidden, preact_out=out_in_place)
    assert torch.equal(out_in_place, a) and torch.equal(hidden, results[0][0])
    shared, grad = a.clone(), dh.clone()
    gelu_bwd(shared, bias, grad, shared, torch.zeros(cols))
    assert torch.equal(shared, results[0][2]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("cols", (7, 37, 200))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("preact_16, grad_16, hidden_16", [(p, g, h) for p in (0, 1) for g in (0, 1) for h in (0, 1)])
def test_backward_16_bit_forms(cols, dtype, preact_16, grad_16, hidden_16):
    # Every mix of float32 / 16-bit pre-activation, incoming gradient and hidden storage, with
    # da's 16-bit copy: the values the all-float32 call gives for the same inputs.
    g = torch.Generator().manual_seed(cols)
    a = (torch.randn(70, cols, generator=g) * 3).to(dtype)
    dh = torch.randn(70, cols, generator=g).to(dtype)
    bias = torch.randn(cols, generator=g)
    ref_grad, ref_hidden, ref_sum = dh.float(), torch.empty(70, cols, dtype=dtype), torch.zeros(cols)
    gelu_bwd(a.float(), bias, ref_grad, ref_hidden, ref_sum)
    preact = a if preact_16 else a.float()
    grad = dh if grad_16 else dh.float()
    hidden = torch.full((70, cols), math.nan, dtype=dtype if hidden_16 else torch.float32)
    grad_preact, low, bias_grad = torch.full((70, cols), math.nan), torch.full((70, cols), math.nan).to(dtype), torch.zeros(cols)
    gelu_bwd(preact, bias, grad, hidden, bias_grad, dtype=dtype, grad_preact=grad_preact, grad_preact_low=low)
    assert torch.equal(grad_preact, ref_grad) and torch.equal(low, ref_grad.to(dtype))
    assert torch.equal(hidden, ref_hidden.to(hidden.dtype)) and torch.equal(bias_grad, ref_sum)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_backward_may_write_da_in_the_activation_dtype_only(dtype):
    # grad_preact null: da only in its 16-bit copy (the bf16 weight-gradient GEMMs' operand), the
    # bias gradient still summed from the float32 da; one of the two is required.
    g = torch.Generator().manual_seed(11)
    a, dh = (torch.randn(70, 37, generator=g) * 3).to(dtype), torch.randn(70, 37, generator=g).to(dtype)
    bias = torch.randn(37, generator=g)
    ref_grad, ref_hidden, ref_sum = dh.float(), torch.empty(70, 37, dtype=dtype), torch.zeros(37)
    gelu_bwd(a, bias, ref_grad, ref_hidden, ref_sum, dtype=dtype)
    n = _C.mlp_layerscale_gelu_bwd_cpu_workspace_size(70, 37)
    low, hidden, bias_grad = torch.full((70, 37), math.nan).to(dtype), torch.full((70, 37), math.nan).to(dtype), torch.zeros(37)
    code, workspace = dtype_code(dtype, "cpu"), torch.full((n,), math.nan)

    def call(low_ptr):
        _C.mlp_layerscale_gelu_bwd_cpu(a.data_ptr(), bias.data_ptr(), dh.data_ptr(), 0, low_ptr, hidden.data_ptr(),
                                       bias_grad.data_ptr(), workspace.data_ptr(), n, 70, 37, code, code, code,
                                       code, 2)

    call(low.data_ptr())
    assert torch.equal(low, ref_grad.to(dtype)) and torch.equal(hidden, ref_hidden) and torch.equal(bias_grad, ref_sum)
    with pytest.raises(ValueError, match="null"):
        call(0)


def test_forward_hidden_or_stored_preact_may_overwrite_the_preact():
    a = torch.randn(9, 40) * 2
    bias = torch.randn(40)
    separate, separate_out = torch.empty_like(a), torch.empty_like(a)
    gelu_fwd(a.clone(), bias, separate, preact_out=separate_out)
    hidden_in_place, out = a.clone(), torch.empty_like(a)
    gelu_fwd(hidden_in_place, bias, hidden_in_place, preact_out=out)
    assert torch.equal(hidden_in_place, separate) and torch.equal(out, separate_out)
    out_in_place, hidden = a.clone(), torch.empty_like(a)
    gelu_fwd(out_in_place, bias, hidden, preact_out=out_in_place)
    assert torch.equal(out_in_place, separate_out) and torch.equal(hidden, separate)


@pytest.mark.parametrize("rows, cols", [(130, 160), (64, 37), (1, 13), (3, 200)])
@pytest.mark.parametrize("with_bias", (True, False), ids=("bias", "no_bias"))
def test_backward_against_float64(rows, cols, with_bias):
    g = torch.Generator().manual_seed(rows * cols)
    a = torch.randn(rows, cols, generator=g) * 2
    bias = torch.randn(cols, generator=g) if with_bias else None
    dh = torch.randn(rows, cols, generator=g)
    prior = torch.randn(cols, generator=g)  # bias_grad is accumulated into
    grad, hidden, bias_grad = dh.clone(), torch.full((rows, cols), math.nan), prior.clone()
    preact = a.clone()
    gelu_bwd(preact, bias, grad, hidden, bias_grad)
    assert torch.equal(preact, a), "backward reads the pre-activation, never writes it"
    a64 = a.double() + (0 if bias is None else bias.double())
    da64 = dh.double() * gelu_grad64(a64)
    torch.testing.assert_close(hidden.double(), F.gelu(a64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), da64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bias_grad.double(), prior.double() + da64.sum(0), rtol=1e-6, atol=1e-5 * math.sqrt(rows))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_cpu_launcher_backward_leaves_the_stored_preact_alone(dtype):
    # The stored pre-activation is a saved tensor: a second backward (retain_graph) reads it
    # again, so the hidden must never be written over it.
    from convnext_kernels.launchers import cpu

    C, g = 40, torch.Generator().manual_seed(3)
    x, shortcut, dy = (torch.randn(2, 5, 7, C, generator=g).to(dtype) for _ in range(3))
    w1, w2 = (torch.randn(4 * C, C, generator=g) * 0.2).to(dtype), (torch.randn(C, 4 * C, generator=g) * 0.1).to(dtype)
    b1, b2, gamma = torch.randn(4 * C, generator=g), torch.randn(C, generator=g), torch.randn(C, generator=g)
    preact = torch.empty(70, 4 * C, dtype=dtype)
    cpu.mlp_layerscale_fwd(x, shortcut, w1, b1, w2, b2, gamma, None, preact)
    stored = preact.clone()
    first = cpu.mlp_layerscale_bwd(dy, x, w1, b1, w2, b2, gamma, None, preact)
    assert torch.equal(preact, stored)
    second = cpu.mlp_layerscale_bwd(dy, x, w1, b1, w2, b2, gamma, None, preact)
    recomputed = cpu.mlp_layerscale_bwd(dy, x, w1, b1, w2, b2, gamma, None, None)
    # Stored or recomputed, backward differentiates at the same pre-activation (the GEMM's own
    # output plus the bias), bit for bit, in every dtype.
    for a, b, c in zip(first, second, recomputed):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("onednn", ("1", "0"), ids=("onednn", "torch_gemm"))
def test_cpu_parts_forward_fills_preact_out_in_the_activation_dtype(dtype, onednn, monkeypatch):
    from convnext_kernels.launchers.cpu import CpuMlpParts

    monkeypatch.setenv("CONVNEXT_KERNELS_CPU_ONEDNN", onednn)
    g = torch.Generator().manual_seed(5)
    x2, w1 = torch.randn(30, 40, generator=g).to(dtype), (torch.randn(160, 40, generator=g) * 0.2).to(dtype)
    b1 = torch.randn(160, generator=g)
    preact_out = torch.full((30, 160), math.nan).to(dtype)
    h = CpuMlpParts.gelu_forward(x2, w1, b1, preact_out)
    product = x2.double() @ w1.double().t()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(preact_out.double(), product, rtol=tol, atol=tol)  # without the bias
    assert h.dtype == dtype
    torch.testing.assert_close(h.double(), F.gelu(product + b1.double()), rtol=tol, atol=tol)
    assert torch.equal(h, CpuMlpParts.gelu_forward(x2, w1, b1)), "the hidden is the same, stored or not"
    for wrong in (torch.empty(30, 160, dtype=torch.float64), torch.empty(30, 159, dtype=dtype),
                  torch.empty(160, 30, dtype=dtype).t()):
        with pytest.raises(ValueError, match="preact_out must be"):
            CpuMlpParts.gelu_forward(x2, w1, b1, wrong)
    # The other GEMMs keep the activations' dtype too (dx is computed in it).
    assert CpuMlpParts.matmul(h, w1).dtype == dtype


def test_backward_hidden_may_overwrite_a_fresh_preact():
    a, dh = torch.randn(70, 48) * 2, torch.randn(70, 48)
    bias = torch.randn(48)
    grad1, hidden1, sum1 = dh.clone(), torch.empty_like(a), torch.zeros(48)
    gelu_bwd(a.clone(), bias, grad1, hidden1, sum1)
    shared, grad2, sum2 = a.clone(), dh.clone(), torch.zeros(48)
    gelu_bwd(shared, bias, grad2, shared, sum2)
    assert torch.equal(shared, hidden1) and torch.equal(grad2, grad1) and torch.equal(sum2, sum1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_is_deterministic_across_thread_counts(dtype):
    a, dh = torch.randn(1000, 160) * 2, torch.randn(1000, 160)
    results = []
    for threads in (1, 2, 3, 8):
        grad, hidden, bias_grad = dh.clone(), torch.empty(1000, 160, dtype=dtype), torch.zeros(160)
        gelu_bwd(a.clone(), None, grad, hidden, bias_grad, threads=threads)
        results.append((grad, hidden, bias_grad))
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


def test_invalid_arguments_raise_value_error():
    a = torch.randn(4, 8)
    h16 = torch.empty(4, 8, dtype=torch.bfloat16)
    bf16 = dtype_code(torch.bfloat16, "cpu")
    fp16 = dtype_code(torch.float16, "cpu")

    def fwd(preact, preact_out, hidden, dtype, preact_dtype, cols=8):
        _C.mlp_layerscale_gelu_fwd_cpu(0 if preact is None else preact.data_ptr(), 0,
                                       0 if preact_out is None else preact_out.data_ptr(), hidden.data_ptr(),
                                       4, cols, dtype, preact_dtype, 1)

    fwd(a, None, a, 0, 0)  # valid: the hidden over a float32 preact
    fwd(a, None, h16, bf16, 0)  # valid: a float32 preact, a bf16 hidden
    with pytest.raises(ValueError, match="cols"):
        fwd(a, None, a, 0, 0, cols=0)
    with pytest.raises(ValueError, match="dtype"):
        fwd(a, None, a, 7, 0)
    with pytest.raises(ValueError, match="hidden may be preact"):  # a bf16 hidden over a float32 preact
        fwd(a, None, a, bf16, 0)
    with pytest.raises(ValueError, match="preact_out needs preact_dtype"):  # a bf16 copy of a float32 preact
        fwd(a, h16.clone(), h16, bf16, 0)
    with pytest.raises(ValueError, match="preact_out and hidden"):
        fwd(h16, h16, h16, bf16, bf16)
    with pytest.raises(ValueError, match="null"):
        fwd(None, None, h16, bf16, bf16)
    with pytest.raises(ValueError, match="preact_dtype"):  # float32 or the hidden's dtype only
        fwd(h16, None, a, 0, bf16)
    with pytest.raises(ValueError, match="preact_dtype"):
        fwd(h16, None, a, bf16, fp16)
    grad, hidden, bias_grad = a.clone(), torch.empty_like(a), torch.zeros(8)
    n = _C.mlp_layerscale_gelu_bwd_cpu_workspace_size(4, 8)
    workspace, g16 = torch.empty(n), torch.empty(4, 8, dtype=torch.bfloat16)

    def bwd(preact, grad, grad_preact, low, hidden, dtype, preact_dtype, grad_dtype, hidden_dtype, workspace_floats=n):
        _C.mlp_layerscale_gelu_bwd_cpu(preact.data_ptr(), 0, grad.data_ptr(), grad_preact.data_ptr(),
                                       0 if low is None else low.data_ptr(), hidden.data_ptr(), bias_grad.data_ptr(),
                                       workspace.data_ptr(), workspace_floats, 4, 8, dtype, preact_dtype, grad_dtype,
                                       hidden_dtype, 1)

    bwd(a, grad, grad, None, hidden, 0, 0, 0, 0)  # valid: in place over grad
    bwd(h16, g16, grad, g16.clone(), hidden, bf16, bf16, bf16, 0)  # valid: 16-bit in, fp32 out
    with pytest.raises(ValueError, match="workspace"):
        bwd(a, grad, grad, None, hidden, 0, 0, 0, 0, workspace_floats=1)
    with pytest.raises(ValueError, match="hidden may be preact"):  # a bf16 hidden over a float32 preact
        bwd(a, grad, grad, None, a, bf16, 0, 0, bf16)
    with pytest.raises(ValueError, match="preact_dtype"):
        bwd(h16, grad, grad, None, hidden, fp16, bf16, 0, 0)
    with pytest.raises(ValueError, match="grad_dtype"):
        bwd(a, g16, grad, None, hidden, fp16, 0, bf16, 0)
    with pytest.raises(ValueError, match="hidden_dtype"):
        bwd(a, grad, grad, None, h16, fp16, 0, 0, bf16)
    with pytest.raises(ValueError, match="grad_preact may be grad"):  # in place over a 16-bit grad
        bwd(a, g16, g16, None, hidden, bf16, 0, bf16, 0)
    with pytest.raises(ValueError, match="different memory"):  # da's low copy over the hidden
        bwd(a, grad, grad, hidden, hidden, 0, 0, 0, 0)


@pytest.mark.parametrize("cols", (7, 40, 37))
@pytest.mark.parametrize("dtype, z_16", [(torch.float32, False), (torch.float16, False), (torch.float16, True),
                                         (torch.bfloat16, False), (torch.bfloat16, True)], ids=str)
@pytest.mark.parametrize("with_bias, with_scale, with_gamma", [(True, True, True), (False, False, False),
                                                               (True, False, True), (False, True, False)])
def test_residual_epilogue(cols, dtype, z_16, with_bias, with_scale, with_gamma):
    g = torch.Generator().manual_seed(cols)
    rows = 70
    z = torch.randn(rows, cols, generator=g).to(dtype if z_16 else torch.float32)
    shortcut = torch.randn(rows, cols, generator=g).to(dtype)
    bias = torch.randn(cols, generator=g) if with_bias else None
    scale = torch.rand(rows, generator=g) * 2 if with_scale else None
    gamma = torch.randn(cols, generator=g) if with_gamma else None
    y = torch.full((rows, cols), math.nan).to(dtype)
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    _C.mlp_layerscale_residual_cpu(z.data_ptr(), ptr(bias), ptr(scale), ptr(gamma), shortcut.data_ptr(), y.data_ptr(),
                                   rows, cols, dtype_code(dtype, "cpu"), dtype_code(z.dtype, "cpu"), 2)
    t = z.double() + (0 if bias is None else bias.double())
    t = t * (1 if scale is None else scale.double()[:, None]) * (1 if gamma is None else gamma.double())
    expected = (shortcut.double() + t).to(dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    else:  # the fp32 result rounded once: at most a unit in the last place from the exact one rounded
        ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
        torch.testing.assert_close(y.double(), expected.double(), rtol=ulp, atol=1e-6)


def test_residual_epilogue_in_place_and_bad_input():
    z, shortcut = torch.randn(9, 40).bfloat16(), torch.randn(9, 40).bfloat16()
    gamma, bf16 = torch.randn(40), dtype_code(torch.bfloat16, "cpu")
    expected = torch.empty_like(z)
    _C.mlp_layerscale_residual_cpu(z.data_ptr(), 0, 0, gamma.data_ptr(), shortcut.data_ptr(), expected.data_ptr(),
                                   9, 40, bf16, bf16, 1)
    over_shortcut, over_z = shortcut.clone(), z.clone()
    _C.mlp_layerscale_residual_cpu(z.data_ptr(), 0, 0, gamma.data_ptr(), over_shortcut.data_ptr(),
                                   over_shortcut.data_ptr(), 9, 40, bf16, bf16, 1)
    _C.mlp_layerscale_residual_cpu(over_z.data_ptr(), 0, 0, gamma.data_ptr(), shortcut.data_ptr(), over_z.data_ptr(),
                                   9, 40, bf16, bf16, 1)
    assert torch.equal(over_shortcut, expected) and torch.equal(over_z, expected)
    z32 = z.float()
    with pytest.raises(ValueError, match="y may be z"):  # a bf16 y over a float32 z
        _C.mlp_layerscale_residual_cpu(z32.data_ptr(), 0, 0, 0, shortcut.data_ptr(), z32.data_ptr(), 9, 40, bf16, 0, 1)
    with pytest.raises(ValueError, match="z_dtype"):
        _C.mlp_layerscale_residual_cpu(z.data_ptr(), 0, 0, 0, shortcut.data_ptr(), expected.data_ptr(), 9, 40,
                                       dtype_code(torch.float16, "cpu"), bf16, 1)
    with pytest.raises(ValueError, match="null"):
        _C.mlp_layerscale_residual_cpu(z.data_ptr(), 0, 0, 0, 0, expected.data_ptr(), 9, 40, bf16, bf16, 1)


@pytest.mark.parametrize("rows, cols", [(1, 1), (37, 5), (16, 16), (70, 33), (2048, 96), (5, 200)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transpose_to_float32(rows, cols, dtype):
    # The weight-gradient GEMMs' transposed fp32 operand: whole and partial 16 x 16 tiles, exact.
    src = torch.randn(rows, cols).to(dtype)
    dst = torch.full((cols, rows), math.nan)
    _C.transpose_to_float32_cpu(src.data_ptr(), dst.data_ptr(), rows, cols, dtype_code(dtype, "cpu"), 3)
    assert torch.equal(dst, src.float().t())


def test_transpose_to_float32_bad_input():
    src = torch.randn(4, 8)
    with pytest.raises(ValueError, match="different memory"):
        _C.transpose_to_float32_cpu(src.data_ptr(), src.data_ptr(), 4, 8, 0, 1)
    with pytest.raises(ValueError, match="dtype"):
        _C.transpose_to_float32_cpu(src.data_ptr(), torch.empty(8, 4).data_ptr(), 4, 8, 7, 1)
    with pytest.raises(ValueError, match="null"):
        _C.transpose_to_float32_cpu(0, src.data_ptr(), 4, 8, 0, 1)


@pytest.mark.parametrize("dtype, bf16_dot", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=("float32", "bfloat16-onednn", "bfloat16-bf16_dot"))
@pytest.mark.parametrize("p, q", [(40, 160), (160, 40)], ids=("a_transposed", "b_transposed"))
def test_cpu_parts_weight_gradient_routes(dtype, bf16_dot, p, q, monkeypatch):
    # a.T @ b for the weight gradients, whichever operand is copied transposed, fresh and
    # accumulated, from 16-bit operands too, and from a non-contiguous one (torch's copy); bf16
    # ones also from bf16 products where the CPU has AVX512-BF16 (gemm_tn_bf16_cpu).
    from convnext_kernels.launchers import cpu
    from convnext_kernels.launchers.cpu import CpuMlpParts

    if bf16_dot and not cpu.BF16_DOT_GEMMS:
        pytest.skip("this CPU has no AVX512-BF16")
    monkeypatch.setattr(cpu, "BF16_DOT_GEMMS", bf16_dot)
    monkeypatch.setenv("CONVNEXT_KERNELS_CPU_ONEDNN", "1")  # the package's routes on any CPU
    g = torch.Generator().manual_seed(p)
    a, b = torch.randn(64, p, generator=g).to(dtype), torch.randn(64, q, generator=g).to(dtype)
    expected = (a.double().t() @ b.double()).float()
    first = CpuMlpParts.accumulate_tn(None, a, b)
    assert first.dtype == torch.float32 and first.is_contiguous()
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(CpuMlpParts.accumulate_tn(first.clone(), a, b), 2 * expected, rtol=1e-5, atol=1e-5)
    strided_a, strided_b = a.t().contiguous().t(), b.t().contiguous().t()
    torch.testing.assert_close(CpuMlpParts.accumulate_tn(None, strided_a, strided_b), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ("highest", "medium"))
@pytest.mark.parametrize("fp16_in_fp32", (True, False), ids=("no_fp16_gemm", "fp16_gemm"))
def test_cpu_parts_fp16_gemms_run_in_fp32_where_the_cpu_has_no_fp16_gemm(fp16_in_fp32, precision, monkeypatch):
    # Without hardware fp16 GEMMs, every fp16 GEMM of the cpu backend is oneDNN's fp32 GEMM of the
    # converted operands, rounded to fp16 once; not where the CPU has fp16 GEMMs, nor under a
    # lowered fp32 matmul precision (bf16 would cut fp16's mantissa), nor for bf16.
    from convnext_kernels.launchers import cpu

    if cpu.ONEDNN_LINEAR is None:
        pytest.skip("torch has no oneDNN linear on this CPU")
    calls = []
    real = cpu.ONEDNN_LINEAR

    def spy(inp, weight, *args):
        calls.append((inp.dtype, weight.dtype))
        return real(inp, weight, *args)

    monkeypatch.setattr(cpu, "ONEDNN_LINEAR", spy)
    monkeypatch.setattr(cpu, "FP16_GEMMS_IN_FP32", fp16_in_fp32)
    with cpu_fp32_precision("matmul", precision):
        g = torch.Generator().manual_seed(3)
        x2 = torch.randn(70, 40, generator=g).half()
        w1, w2 = (torch.randn(160, 40, generator=g) * 0.2).half(), (torch.randn(40, 160, generator=g) * 0.1).half()
        b1, b2 = torch.randn(160, generator=g), torch.randn(40, generator=g)
        h = cpu.CpuMlpParts.gelu_forward(x2, w1, b1)
        out = torch.full((70, 40), math.nan, dtype=torch.float16)
        cpu.CpuMlpParts.residual(h, w2, b2, None, None, x2, out)
        dx = torch.full((70, 40), math.nan, dtype=torch.float16)
        cpu.CpuMlpParts.matmul(h, w1, out=dx)
        dx_fresh = cpu.CpuMlpParts.matmul(h, w1)
        bf16 = cpu.CpuMlpParts.gemm_16bit(x2.bfloat16(), w1.bfloat16())
    rerouted = fp16_in_fp32 and precision == "highest"
    assert calls == ([(torch.float32, torch.float32)] * 4 if rerouted else []), "fp16 GEMMs: fp32 oneDNN or torch's"
    assert h.dtype == out.dtype == dx.dtype == dx_fresh.dtype == torch.float16 and bf16.dtype == torch.bfloat16
    product = x2.double() @ w1.double().t()
    torch.testing.assert_close(h.double(), F.gelu(product.half().double() + b1.double()), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out.double(), x2.double() + h.double() @ w2.double().t() + b2.double(),
                               rtol=2e-3, atol=4e-3)
    # One rounding to fp16 of an fp32-accumulated product, with or without out.
    assert torch.equal(dx, dx_fresh)
    torch.testing.assert_close(dx.double(), (h.double() @ w1.double()).half().double(), rtol=1e-3, atol=1e-3)
