"""The cpu backend's bf16 weight-gradient GEMM (convnext_kernels._C.gemm_tn_bf16_cpu): c = [c +]
a.T @ b from bf16 products summed in fp32 on CPUs with AVX512-BF16, against float64 torch on the
bf16-rounded operands: odd shapes across its 8 x 48 tiles and 256-row blocks, fp32 operands
rounded as torch rounds them, row strides, thread counts, zero rows and bad input; and, built from
source with every buffer against an inaccessible page, no read or write outside them."""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_C = pytest.importorskip("convnext_kernels._C", reason="compiled extension not built")

from convnext_kernels.launchers import dtype_code  # noqa: E402

needs_bf16_dot = pytest.mark.skipif(not _C.gemm_tn_bf16_cpu_supported(), reason="this CPU has no AVX512-BF16")


def gemm(a, b, c=None, threads=2, accumulate=False):
    """c = [c +] a.T @ b through the kernel, a, b and c 2-D with unit column stride (views of
    wider tensors allowed); c None: a fresh poisoned (p, q) output. The workspace is poisoned:
    every packed value is written before it is read."""
    (rows, p), q = a.shape, b.shape[1]
    if c is None:
        c = torch.full((p, q), math.nan)
    n = _C.gemm_tn_bf16_cpu_workspace_size(rows, p, q)
    workspace = torch.full((max(n, 1),), math.nan)
    _C.gemm_tn_bf16_cpu(a.data_ptr(), a.stride(0), dtype_code(a.dtype, "cpu"), b.data_ptr(), b.stride(0),
                        dtype_code(b.dtype, "cpu"), c.data_ptr(), c.stride(0), rows, p, q, accumulate,
                        workspace.data_ptr(), n, threads)
    return c


def check(got, a, b, acc=None):
    """got against float64 a.T @ b of the bf16-rounded operands (+ acc), within the bound of an
    fp32 sum of len(a) + 1 terms: (terms) * 2^-24 * (|a|.T @ |b| + |acc|), with room for the
    order of the sums."""
    a64, b64 = a.bfloat16().double(), b.bfloat16().double()
    expected = a64.t() @ b64
    scale = a64.abs().t() @ b64.abs()
    if acc is not None:
        expected, scale = expected + acc.double(), scale + acc.double().abs()
    bound = 2 * (a.shape[0] + 1) * 2.0**-24 * scale
    assert got.dtype == torch.float32
    err = (got.double() - expected).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, bound there {bound.flatten()[err.argmax()].item():.3g}"


@needs_bf16_dot
@pytest.mark.parametrize("rows, p, q", [(1, 1, 1), (2, 8, 48), (3, 40, 17), (7, 9, 50), (64, 160, 40),
                                        (257, 49, 97), (513, 100, 70), (600, 384, 96)], ids=str)
@pytest.mark.parametrize("a_dtype, b_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                              (torch.bfloat16, torch.float32), (torch.float32, torch.float32)],
                         ids=("bf16_bf16", "fp32_bf16", "bf16_fp32", "fp32_fp32"))
def test_matches_float64_on_bf16_operands(rows, p, q, a_dtype, b_dtype):
    # Shapes below, at and across a tile (8 rows x 48 columns of c), odd row counts (the last row
    # pair half empty), and more than one block of 256 rows (257, 513, 600), fresh and accumulated.
    g = torch.Generator().manual_seed(rows * 1000 + p + q)
    a = torch.randn(rows, p, generator=g).to(a_dtype)
    b = torch.randn(rows, q, generator=g).to(b_dtype)
    check(gemm(a, b), a, b)
    acc = torch.randn(p, q, generator=g)
    check(gemm(a, b, acc.clone(), accumulate=True), a, b, acc)


@needs_bf16_dot
def test_fp32_operands_are_rounded_as_torch_rounds_them():
    # One row: each output is one product of two bf16 values, exact in fp32, so the result is
    # bit for bit the product of torch's roundings, ties to even and NaN included.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 64, generator=g)
    bits = base.view(torch.int32)
    # Halfway cases (the 16 dropped bits 0x8000, even and odd kept parts) and values just off them.
    ties = torch.cat([(bits & ~0xFFFF) | 0x8000, (bits & ~0x1FFFF) | 0x8000, (bits & ~0xFFFF) | 0x8001,
                      (bits & ~0xFFFF) | 0x7FFF], dim=1).view(torch.float32)
    a = torch.cat([ties, torch.tensor([[math.nan, math.inf, -math.inf, 0.0, -0.0, 3.0e38]])], dim=1)
    b = torch.randn(1, 70, generator=g).to(torch.bfloat16)
    got = gemm(a, b)
    expected = a.bfloat16().float().t() @ b.float()
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())


@needs_bf16_dot
def test_row_strides_and_a_strided_output():
    # Operands and output as column slices of wider matrices: only the slices are read and written.
    g = torch.Generator().manual_seed(1)
    wide_a, wide_b = torch.randn(70, 60, generator=g).to(torch.bfloat16), torch.randn(70, 90, generator=g)
    a, b = wide_a[:, 5:45], wide_b[:, 3:83]
    wide_c = torch.randn(40, 100, generator=g)
    before = wide_c.clone()
    c = wide_c[:, 7:87]
    gemm(a, b, c, accumulate=True)
    check(c, a, b, before[:, 7:87])
    assert torch.equal(wide_c[:, :7], before[:, :7]) and torch.equal(wide_c[:, 87:], before[:, 87:])


@needs_bf16_dot
@pytest.mark.parametrize("rows, p, q", [(600, 384, 96), (300, 40, 160)], ids=str)
def test_same_bits_for_any_thread_count(rows, p, q):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(rows, p, generator=g).to(torch.bfloat16), torch.randn(rows, q, generator=g).to(torch.bfloat16)
    first = gemm(a, b, threads=1)
    for threads in (2, 3, 8):
        assert torch.equal(gemm(a, b, threads=threads), first)


@needs_bf16_dot
def test_zero_rows_give_zero_or_leave_the_accumulator():
    a, b = torch.empty(0, 5, dtype=torch.bfloat16), torch.empty(0, 3, dtype=torch.bfloat16)
    assert torch.equal(gemm(a, b), torch.zeros(5, 3))
    acc = torch.randn(5, 3)
    assert torch.equal(gemm(a, b, acc.clone(), accumulate=True), acc)


@needs_bf16_dot
def test_empty_output_is_left_alone():
    # p == 0 or q == 0: nothing to compute, and nothing read or written.
    a, b = torch.randn(4, 0, dtype=torch.bfloat16), torch.randn(4, 3, dtype=torch.bfloat16)
    assert gemm(a, b).shape == (0, 3) and gemm(b, a).shape == (3, 0)


@needs_bf16_dot
def test_cpu_parts_take_any_accumulator_and_check_row_counts(monkeypatch):
    # CpuMlpParts.accumulate_tn adds into any fp32 (p, q) accumulator, as the fp32 routes do: a
    # transposed (non-unit column stride) one gets a fresh product added; operands with different
    # row counts are refused, not read past their end.
    from convnext_kernels.launchers import cpu

    monkeypatch.setattr(cpu, "BF16_DOT_GEMMS", True)
    monkeypatch.setenv("CONVNEXT_KERNELS_CPU_ONEDNN", "1")  # the package's routes on any CPU
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(70, 40, generator=g).to(torch.bfloat16), torch.randn(70, 48, generator=g).to(torch.bfloat16)
    for acc in (torch.randn(48, 40, generator=g).t(), torch.randn(40, 96, generator=g)[:, ::2]):
        before = acc.clone()
        assert cpu.CpuMlpParts.accumulate_tn(acc, a, b) is acc
        check(acc, a, b, before)
    with pytest.raises(ValueError, match="one row count"):
        cpu.CpuMlpParts.accumulate_tn(None, a, b[:69])


def test_bad_input_raises_value_error():
    a, b, c = torch.randn(4, 8), torch.randn(4, 16), torch.empty(8, 16)
    n = _C.gemm_tn_bf16_cpu_workspace_size(4, 8, 16)
    ws = torch.empty(n)

    def call(a_dtype=0, b_dtype=0, lda=8, ldb=16, ldc=16, workspace_floats=n, c_ptr=None, rows=4):
        _C.gemm_tn_bf16_cpu(a.data_ptr(), lda, a_dtype, b.data_ptr(), ldb, b_dtype,
                            c.data_ptr() if c_ptr is None else c_ptr, ldc, rows, 8, 16, False, ws.data_ptr(),
                            workspace_floats, 1)

    with pytest.raises(ValueError, match="a_dtype"):
        call(a_dtype=dtype_code(torch.float16, "cpu"))
    with pytest.raises(ValueError, match="b_dtype"):
        call(b_dtype=7)
    with pytest.raises(ValueError, match="row strides"):
        call(lda=7)
    with pytest.raises(ValueError, match="row strides"):
        call(ldc=15)
    with pytest.raises(ValueError, match="workspace"):
        call(workspace_floats=n - 1)
    with pytest.raises(ValueError, match="null"):
        call(c_ptr=0)
    with pytest.raises(ValueError, match="rows"):
        _C.gemm_tn_bf16_cpu_workspace_size(-1, 8, 16)
    for sizes in ((1, 2**63 - 3, 1), (2**63 - 1, 1, 1), (2**40, 2**30, 1)):
        with pytest.raises(ValueError, match="too large"):
            _C.gemm_tn_bf16_cpu_workspace_size(*sizes)


def test_unsupported_cpu_raises_runtime_error_and_the_backend_keeps_its_fp32_gemms(tmp_path):
    # With the instruction set lowered to AVX2 (as on a CPU without AVX-512), the kernel says what
    # it needs, and the cpu backend's bf16 weight gradients take the fp32 route.
    code = (
        "import torch, pytest\n"
        "from convnext_kernels import _C\n"
        "from convnext_kernels.launchers import cpu\n"
        "assert not _C.gemm_tn_bf16_cpu_supported() and not cpu._bf16_dot_gemms(torch.bfloat16)\n"
        "a = torch.randn(4, 8)\n"
        "c = torch.empty(8, 8)\n"
        "ws = torch.empty(_C.gemm_tn_bf16_cpu_workspace_size(4, 8, 8))\n"
        "with pytest.raises(RuntimeError, match='AVX512-BF16'):\n"
        "    _C.gemm_tn_bf16_cpu(a.data_ptr(), 8, 0, a.data_ptr(), 8, 0, c.data_ptr(), 8, 4, 8, 8, False,\n"
        "                        ws.data_ptr(), ws.numel(), 1)\n"
        "got = cpu.CpuMlpParts.accumulate_tn(None, a.bfloat16(), a)\n"
        "torch.testing.assert_close(got, (a.bfloat16().double().t() @ a.double()).float())\n"
    )
    env = dict(os.environ, CONVNEXT_KERNELS_CPU_ISA="avx2")
    # Run outside the source tree, so the child imports the same (installed) package as this test.
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr


@needs_bf16_dot
def test_no_access_outside_the_buffers(tmp_path):
    # tests/gemm_tn_bf16_guard.cpp puts each operand, the output and the workspace flush against
    # an inaccessible page (after the end, then before the start) over shapes around the tiles,
    # the packing vectors, odd rows and the row blocks: a masked AVX-512 access one element out,
    # which AddressSanitizer does not see, faults.
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    root = Path(__file__).resolve().parent.parent
    exe = tmp_path / "guard"
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-fopenmp", f"-I{root / 'csrc' / 'cpu'}",
                            str(root / "csrc" / "cpu" / "gemm_tn_bf16.cpp"), str(root / "tests" / "gemm_tn_bf16_guard.cpp"),
                            "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    if result.returncode == 77:
        pytest.skip("the source build finds no AVX512-BF16 (an older compiler)")
    assert result.returncode == 0, f"exit {result.returncode} (-11: an access outside a buffer)\n{result.stdout}"
