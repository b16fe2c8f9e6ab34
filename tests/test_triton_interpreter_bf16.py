"""The bf16 patch of Triton's interpreter (tests/triton_interpreter_bf16.py) that the bf16 Triton
tests rely on off a GPU: it must be active there, round like torch and refuse bf16 arithmetic."""

import pytest
import torch

pytest.importorskip("triton")

from convnext_kernels.backends import unavailable_reason  # noqa: E402

# Only where the Triton kernels run in the interpreter (on a GPU bf16 runs natively; triton < 3.3
# has no Triton backend at all).
_WHY_NOT = unavailable_reason("triton", torch.device("cpu"))
if _WHY_NOT:
    pytest.skip(f"no Triton kernels in the interpreter here: {_WHY_NOT}", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import triton_interpreter_bf16 as bf16  # noqa: E402
from conftest import TRITON_INTERPRETER_BF16_MISSING  # noqa: E402


def test_patch_is_active():
    # Otherwise every bf16 Triton test would skip and CI would check nothing in bf16.
    assert TRITON_INTERPRETER_BF16_MISSING == ""


def test_rounding_matches_torch_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3e-39, 3.4e38,
                             3.3961776e38, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 1.0 + 2.0 ** -9])
    # NaNs whose rounding would carry out of the mantissa (0xFFFFFFFF is the launchers' poison).
    specials = torch.cat([specials, torch.tensor([-1, 0x7FFFFFFF, 0x7F80FFFF], dtype=torch.int32).view(torch.float32)])
    values = torch.cat([torch.randn(100_000, generator=gen) * 10.0 ** torch.randint(-30, 30, (100_000,),
                                                                                     generator=gen), specials])
    ours = torch.from_numpy(bf16.fp32_to_bf16_bits(values.numpy()).view("int16"))
    theirs = values.bfloat16().view(torch.int16)
    nan = values.isnan()
    assert torch.equal(ours[~nan], theirs[~nan])
    back = torch.from_numpy(bf16.bf16_bits_to_fp32(ours.numpy().view("uint16")))
    assert nan.sum() == 4 and back[nan].isnan().all()
    torch.testing.assert_close(back[~nan], theirs[~nan].view(torch.bfloat16).float(), rtol=0, atol=0)


def test_casts_round_as_asked():
    @triton.jit
    def _bf16_cast_kernel(x_ptr, rtne_ptr, rtz_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)
        tl.store(rtne_ptr + offs, x.to(tl.bfloat16))
        tl.store(rtz_ptr + offs, x.to(tl.bfloat16, fp_downcast_rounding="rtz"))

    x = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 1e3
    rtne, rtz = torch.empty(64, dtype=torch.bfloat16), torch.empty(64, dtype=torch.bfloat16)
    _bf16_cast_kernel[(1,)](x, rtne, rtz, 64)
    assert torch.equal(rtne, x.bfloat16())
    truncated = (x.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)  # drop the low 16 bits
    assert torch.equal(rtz, truncated)
    assert not torch.equal(rtz, rtne)


def test_fp8_casts_are_left_to_the_interpreter():
    @triton.jit
    def _fp8_round_trip_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)  # bf16
        tl.store(y_ptr + offs, x.to(tl.float8e5).to(tl.bfloat16))

    x = torch.tensor([-3.5, -0.75, 0.5, 2.0, 3.0, -1.25, 0.0, 6.0], dtype=torch.bfloat16)  # exact in e5m2
    y = torch.empty_like(x)
    _fp8_round_trip_kernel[(1,)](x, y, 8)
    assert torch.equal(y, x)


# (tl.max / tl.min are absent: Triton's front end computes them in fp32 for bf16.)
@pytest.mark.parametrize("op", ["add", "neg", "fma", "compare", "sum"])
def test_bf16_arithmetic_is_refused(op):
    @triton.jit
    def _bf16_math_kernel(x_ptr, y_ptr, OP: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)  # bf16, used without the conversion to fp32 the kernels make
        if OP == "add":
            y = x + x
        elif OP == "neg":
            y = -x
        elif OP == "fma":
            y = tl.fma(x, x, x)
        elif OP == "compare":
            y = tl.where(x < tl.zeros_like(x), 0.0, 1.0).to(tl.bfloat16)
        else:
            y = tl.zeros_like(x) + tl.sum(x, axis=0)
        tl.store(y_ptr + offs, y)

    x = torch.randn(16).bfloat16()
    # NotImplementedError, which recent interpreters wrap in their InterpreterError.
    with pytest.raises(Exception, match="convert to tl.float32"):
        _bf16_math_kernel[(1,)](x, torch.empty_like(x), op, 16)


def test_bf16_where_and_data_movement_are_allowed():
    @triton.jit
    def _bf16_select_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < BLOCK - 3, other=0.0)
        keep = x.to(tl.float32) > 0
        tl.store(y_ptr + offs, tl.where(keep, x, tl.zeros_like(x)))

    x = torch.randn(16, generator=torch.Generator().manual_seed(2)).bfloat16()
    y = torch.empty_like(x)
    _bf16_select_kernel[(1,)](x, y, 16)
    expected = torch.where(x > 0, x, torch.zeros_like(x))
    expected[-3:] = 0
    assert torch.equal(y, expected)
