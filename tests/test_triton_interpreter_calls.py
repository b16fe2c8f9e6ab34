"""The helper-call patch of Triton's interpreter (tests/triton_interpreter_calls.py): active where
the kernels run in the interpreter, one full patch of triton.language per launch, the same results,
and triton.language restored after the launch."""

import pytest
import torch

pytest.importorskip("triton")

from convnext_kernels.backends import unavailable_reason  # noqa: E402

_WHY_NOT = unavailable_reason("triton", torch.device("cpu"))
if _WHY_NOT:
    pytest.skip(f"no Triton kernels in the interpreter here: {_WHY_NOT}", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import triton_interpreter_calls as calls  # noqa: E402
from conftest import TRITON_INTERPRETER_CALLS_MISSING  # noqa: E402


@triton.jit
def _scaled(v, k):
    return v * k


@triton.jit
def _helper_calls_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs)
    for k in range(1, 4):  # 3 calls in a loop, 2 nested ones below
        v = _scaled(v, k)
    v = _scaled(_scaled(v, 0.5), 0.25)
    tl.store(y_ptr + offs, v)


def test_patch_is_active():
    assert TRITON_INTERPRETER_CALLS_MISSING == ""


def test_one_full_patch_per_launch_and_same_results():
    x = torch.randn(16, generator=torch.Generator().manual_seed(0))
    y = torch.full_like(x, float("nan"))
    before = calls.full_patches()
    _helper_calls_kernel[(1,)](x, y, BLOCK=16)
    assert calls.full_patches() - before == 1, "helper calls inside the launch patched triton.language again"
    assert torch.equal(y, x * 1 * 2 * 3 * 0.5 * 0.25)
    # Where the interpreter undoes a launch's patch afterwards (triton >= 3.6: _LangPatchScope;
    # older ones keep it), tl.load is Triton's own builtin again.
    from triton.runtime import interpreter
    if hasattr(interpreter, "_LangPatchScope"):
        assert tl.core.is_builtin(tl.load)
