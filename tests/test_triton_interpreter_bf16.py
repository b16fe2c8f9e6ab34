"""The bf16 patch of Triton's interpreter (tests/triton_interpreter_bf16.py) that the bf16 Triton
tests rely on off a GPU: it must be active there, round like torch and refuse bf16 arithmetic."""

import pytest
import torch

pytest.importorskip("triton")

import triton_interpreter_bf16 as bf16  # noqa: E402
from conftest import TRITON_INTERPRETER_BF16_MISSING  # noqa: E402
from convnext_kernels.backends import triton_interpreted  # noqa: E402

needs_interpreter = pytest.mark.skipif(not triton_interpreted(), reason="on a GPU bf16 runs natively")


@needs_interpreter
def test_patch_is_active():
    # Otherwise every bf16 Triton test would skip and CI would check nothing in bf16.
    assert TRITON_INTERPRETER_BF16_MISSING == ""


def test_rounding_matches_torch_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3e-39, 3.4e38,
                             3.3961776e38, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 1.0 + 2.0 ** -9])
    values = torch.cat([torch.randn(100_000, generator=gen) * 10.0 ** torch.randint(-30, 30, (100_000,),
                                                                                     generator=gen), specials])
    ours = torch.from_numpy(bf16.fp32_to_bf16_bits(values.numpy()).view("int16"))
    theirs = values.bfloat16().view(torch.int16)
    nan = values.isnan()
    assert torch.equal(ours[~nan], theirs[~nan])
    back = torch.from_numpy(bf16.bf16_bits_to_fp32(ours.numpy().view("uint16")))
    assert back[nan].isnan().all()
    torch.testing.assert_close(back[~nan], theirs[~nan].view(torch.bfloat16).float(), rtol=0, atol=0)


@needs_interpreter
def test_bf16_arithmetic_is_refused():
    import triton
    import triton.language as tl

    @triton.jit
    def _bf16_add_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)
        tl.store(y_ptr + offs, x + x)  # bf16 arithmetic: the kernels convert to fp32 first

    x = torch.randn(16).bfloat16()
    # NotImplementedError, which recent interpreters wrap in their InterpreterError.
    with pytest.raises(Exception, match="convert to tl.float32"):
        _bf16_add_kernel[(1,)](x, torch.empty_like(x), 16)
