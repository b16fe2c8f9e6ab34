"""bf16 for Triton's interpreter, so CI checks the bf16 kernels on the CPU.

Triton's interpreter (TRITON_INTERPRET=1) keeps bf16 values as their raw 16-bit patterns in
uint16 numpy arrays. Loads, stores and data movement are then exact, but three operations are
not (triton 3.3-3.9; upstream triton-lang/triton #4972, #11584):

* ``tl.dot`` multiplies the uint16 patterns as integers (garbage);
* fp32 -> bf16 casts truncate the mantissa, where the GPU rounds to nearest even;
* arithmetic, comparisons and sums on bf16 values work on the integer patterns (Triton's front
  end computes tl.max / tl.min in fp32 and rejects bf16 in tl.exp, tl.sqrt and the like).

`enable()` patches the interpreter's builder class for the first two, with the GPU's semantics:
a bf16 dot multiplies the exact fp32 values of its operands and accumulates in fp32 (what
mma/wgmma do, up to the summation order); fp32 -> bf16 rounds to nearest even (NaN stays NaN,
overflow goes to inf), or toward zero where a cast asks for "rtz". The third is not patched but
refused: the kernels convert to fp32 right after a load (the package's numerics rule), so a kernel
that computes in bf16 fails loudly here instead of passing on garbage; tl.where and data movement
stay allowed. Test-only: nothing in the package imports this.
"""
from __future__ import annotations

import numpy as np

_STATE = {"reason": None}


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 patterns -> float32 values (exact)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def fp32_to_bf16_bits(values: np.ndarray, toward_zero: bool = False) -> np.ndarray:
    """float32 values -> uint16 bf16 patterns, rounded to nearest even (or toward zero); NaN ->
    quiet NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    u = bits if toward_zero else bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    rounded = (u >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if np.any(nan):  # from the original bits: rounding a NaN such as 0xFFFFFFFF would carry out
        rounded = np.where(nan, ((bits >> 16) | np.uint32(0x0040)).astype(np.uint16), rounded)
    return rounded


def enable() -> str:
    """Patch the interpreter (idempotent). Returns "" when bf16 works, else why not."""
    if _STATE["reason"] is not None:
        return _STATE["reason"]
    _STATE["reason"] = _patch()
    return _STATE["reason"]


def _patch() -> str:
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception as e:  # noqa: BLE001 - reported as the skip reason
        return f"triton's interpreter did not import ({e})"
    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    needed = ("create_dot", "cast_impl", "create_fp_to_fp", "unary_op", "binary_op", "ternary_op")
    if builder is None or handle is None or not all(hasattr(builder, n) for n in needed):
        return f"this triton's interpreter lacks one of InterpreterBuilder.{needed}"

    def is_bf16(ty) -> bool:
        return getattr(ty, "scalar", ty) == tl.bfloat16

    orig_dot, orig_cast, orig_fp_to_fp = builder.create_dot, builder.cast_impl, builder.create_fp_to_fp

    def create_dot(self, a, b, d, *args, **kwargs):
        if not (is_bf16(a.dtype) or is_bf16(b.dtype)):
            return orig_dot(self, a, b, d, *args, **kwargs)
        a32 = bf16_bits_to_fp32(a.data) if is_bf16(a.dtype) else a.data.astype(np.float32)
        b32 = bf16_bits_to_fp32(b.data) if is_bf16(b.dtype) else b.data.astype(np.float32)
        out = np.matmul(a32, b32, dtype=np.float32) + d.data
        return handle(out.astype(d.data.dtype), d.dtype.scalar)

    def convert(self, src, dst_type, toward_zero=False):
        s, t = src.dtype.scalar, dst_type.scalar
        if 8 in (getattr(s, "primitive_bitwidth", 0), getattr(t, "primitive_bitwidth", 0)):
            return None  # fp8 <-> bf16: the interpreter's own bit-level conversion is right
        if is_bf16(s) and is_bf16(t):
            return handle(src.data, t)
        if is_bf16(s):  # bf16 -> anything: through its exact fp32 value
            return orig_cast(self, handle(bf16_bits_to_fp32(src.data), tl.float32), dst_type)
        if is_bf16(t) and s.is_floating():  # -> bf16: round the fp32 value (nearest even or toward zero)
            f32 = src.data.astype(np.float32)  # fp16 -> fp32 exact; fp64 -> fp32 rounds (not used)
            return handle(fp32_to_bf16_bits(f32, toward_zero), t)
        if is_bf16(t):  # integer -> bf16
            return handle(fp32_to_bf16_bits(src.data.astype(np.float32)), t)
        return None

    def cast_impl(self, src, dst_type):
        out = convert(self, src, dst_type)
        return out if out is not None else orig_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        # tl.cast(..., fp_downcast_rounding="rtz") arrives here (the interpreter truncates always).
        out = convert(self, src, dst_type, toward_zero=str(rounding_mode).endswith("RTZ"))
        return out if out is not None else orig_fp_to_fp(self, src, dst_type, rounding_mode)

    def refusing_bf16(name, method):
        # Arithmetic, comparisons and reductions would work on the integer patterns.
        # tl.where (a ternary np.where) only moves values and stays allowed.
        def wrapper(*args):
            if getattr(args[-1], "__name__", None) == "where":
                return method(*args)
            tensors = [a for a in args if hasattr(a, "dtype")] + [
                t for a in args if isinstance(a, tuple) for t in a if hasattr(t, "dtype")]
            if any(is_bf16(t.dtype) for t in tensors):
                raise NotImplementedError(
                    f"bf16 arithmetic ({name}) under Triton's interpreter (tests/triton_interpreter_bf16.py): "
                    "convert to tl.float32 after the load")
            return method(*args)
        return wrapper

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
    for name in ("unary_op", "binary_op", "ternary_op", "create_fma", "create_erf", "create_rsqrt"):
        if hasattr(builder, name):  # the others reach these (fcmp*, fneg, exp, sqrt, ... are lambdas)
            setattr(builder, name, refusing_bf16(name, getattr(builder, name)))
    reductions = getattr(interpreter, "ReduceScanOpInterface", None)
    if reductions is not None:
        reductions.apply = refusing_bf16("reduction", reductions.apply)
    return _self_test()


def _self_test() -> str:
    """A bf16 dot, store and round trip against torch; "" when they agree."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _bf16_probe_kernel(a_ptr, b_ptr, c32_ptr, c16_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
        a = tl.load(a_ptr + m[:, None] * K + k[None, :])
        b = tl.load(b_ptr + k[:, None] * N + n[None, :])
        acc = tl.dot(a, b)  # bf16 x bf16 -> fp32
        tl.store(c32_ptr + m[:, None] * N + n[None, :], acc)
        tl.store(c16_ptr + m[:, None] * N + n[None, :], acc.to(tl.bfloat16))

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 32, generator=gen).bfloat16()
    b = torch.randn(32, 16, generator=gen).bfloat16()
    c32 = torch.empty(16, 16, dtype=torch.float32)
    c16 = torch.empty(16, 16, dtype=torch.bfloat16)
    try:
        _bf16_probe_kernel[(1,)](a, b, c32, c16, 16, 16, 32)
    except Exception as e:  # noqa: BLE001
        return f"the bf16 probe kernel failed under the patched interpreter ({type(e).__name__}: {e})"
    ref = a.double() @ b.double()
    if (c32.double() - ref).abs().max() > 1e-5 * ref.abs().max():
        return "the patched interpreter's bf16 dot disagrees with torch"
    if not torch.equal(c16, c32.bfloat16()):
        return "the patched interpreter's fp32 -> bf16 rounding disagrees with torch's (round to nearest even)"
    return ""
