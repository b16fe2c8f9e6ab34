"""The host CUDA emulator (csrc/emulation, module convnext_kernels._cuda_emulated) itself.

tests/test_cuda_kernels.py runs the CUDA kernels through it; these tests check that it can be
trusted to: convert to fp16 / bf16 exactly as the GPU does, report the bugs it claims to catch
(each self-test kernel carries one), and that the real kernels give bit-identical results
whatever order the threads of a block run in between barriers (a shared-memory race would not).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from conftest import run_commands
from convnext_kernels.backends import emulated_cuda_extension

emu, _why_missing = emulated_cuda_extension()
needs_emulator = pytest.mark.skipif(emu is None, reason=f"CUDA emulator not built: {_why_missing}")


def test_emulator_is_built_on_linux():
    """CI runs the CUDA kernels only through the emulator: it must not silently go missing."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the emulator is built by default on Linux")
    assert emu is not None, _why_missing


def _conversion_inputs() -> torch.Tensor:
    # Every fp16 value, and the midpoints between neighbours (ties) and just either side of them.
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    halves = bits.view(torch.float16).float()
    finite = halves[torch.isfinite(halves)].unique()
    mids = (finite[1:].double() + finite[:-1].double()) / 2
    nudged = torch.cat([mids, mids * (1 + 2.0 ** -20), mids * (1 - 2.0 ** -20)]).float()
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(100_000, generator=g) * torch.exp2(torch.randint(-140, 130, (100_000,), generator=g).float())
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 65504.0, 65519.0, 65520.0, 3.4e38, 1e-45,
                            -1e-45, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -133])
    bf16_bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    bf16_all = bf16_bits.view(torch.bfloat16).float()
    return torch.cat([halves, nudged, wide, special, bf16_all, bf16_all * (1 + 2.0 ** -9)]).contiguous()


@needs_emulator
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_emulated_conversions_match_torch(dtype):
    src = _conversion_inputs()
    dst = torch.empty_like(src)
    code = emu.CUDA_DTYPE_FLOAT16 if dtype == torch.float16 else emu.CUDA_DTYPE_BFLOAT16
    emu.round_through(src.data_ptr(), dst.data_ptr(), src.numel(), code)
    expected = src.to(dtype).float()
    both_nan = torch.isnan(dst) & torch.isnan(expected)
    same = (dst.view(torch.int32) == expected.view(torch.int32)) | both_nan
    bad = (~same).nonzero().flatten()[:5]
    assert same.all(), f"{dtype}: {int((~same).sum())} conversions differ, e.g. {src[bad].tolist()} -> " \
                       f"{dst[bad].tolist()} (torch: {expected[bad].tolist()})"


def _selftest(kind: str) -> torch.Tensor:
    src = torch.arange(128, dtype=torch.float32) + 0.5
    dst = torch.full((32,), -1.0)
    emu.selftest(kind, src.data_ptr(), dst.data_ptr())
    return dst


@pytest.fixture
def schedule():
    """Sets the emulator's thread order; back to forward afterwards."""
    def set_schedule(order: str, seed: int = 0):
        emu.set_schedule(order, seed)

    yield set_schedule
    emu.set_schedule("forward", 0)


@needs_emulator
def test_emulated_device_can_be_another_gpu():
    """set_device changes what the kernels' host code reads of the device (tests/test_cuda_kernels.py
    runs the kernels as an A100 and as a 99 KB GPU with it); bad values are refused."""
    assert emu.mlp_layerscale_cuda_wgmma_supported()  # the default: an H100
    previous = emu.set_device(8, 9, 101376)
    try:
        assert previous == (9, 0, 232448)
        assert not emu.mlp_layerscale_cuda_wgmma_supported()
        with pytest.raises(ValueError, match="48 KiB"):
            emu.set_device(8, 9, 1024)
        assert emu.set_device(8, 9, 101376) == (8, 9, 101376)  # the refused call changed nothing
    finally:
        emu.set_device(*previous)
    assert emu.mlp_layerscale_cuda_wgmma_supported()


@needs_emulator
def test_divergent_warp_collective_is_reported():
    with pytest.raises(RuntimeError, match="deadlock.*__shfl_xor_sync"):
        _selftest("divergent_collective")
    _selftest("cp_async_wait")  # the error is not sticky: the next launch runs


@needs_emulator
def test_shuffle_member_and_lane_masks():
    # A member mask that leaves out lanes taking part is refused (sub-warp shuffles are not
    # modelled); laneMask keeps its low 5 bits, as the butterfly does on a GPU.
    with pytest.raises(RuntimeError, match="member mask"):
        _selftest("partial_mask_shuffle")
    lanes = torch.arange(32, dtype=torch.float32)
    assert torch.equal(_selftest("wide_lane_mask_shuffle"), lanes.view(16, 2).flip(1).flatten())


@needs_emulator
def test_misaligned_ldmatrix_is_reported():
    with pytest.raises(RuntimeError, match="misaligned address"):
        _selftest("misaligned_ldmatrix")


@needs_emulator
def test_cp_async_lands_at_the_wait():
    """Data copied by cp.async is there after cp.async.wait_group, and not before: a read that
    skips the wait sees the shared-memory poison (NaN)."""
    out = _selftest("cp_async_wait")
    assert torch.equal(out, torch.arange(0, 128, 4, dtype=torch.float32) + 0.5)
    assert torch.isnan(_selftest("cp_async_no_wait")).all()


@needs_emulator
def test_race_shows_as_schedule_dependence(schedule):
    """A read of another thread's shared-memory write with no barrier between: the result depends
    on the thread order, which is how the schedule tests below would expose such a race."""
    schedule("forward")
    forward = _selftest("race")
    schedule("reverse")
    reverse = _selftest("race")
    assert not torch.equal(forward.nan_to_num(-7.0), reverse.nan_to_num(-7.0))


# ------------------------------------------------------------------------------------------------
# wgmma: the emulator against the PTX ISA's layouts, transcribed here independently of its code
# ------------------------------------------------------------------------------------------------
# Shared-memory operands, no-swizzle canonical layouts of 16-bit elements (T = 8 per 16 bytes), in
# CuTe notation from the PTX ISA ("Canonical Layouts"), element offsets for (mn, k):
#   K-major:  ((8, m), (T, 2k)) : ((1T, SBO), (1, LBO))
#   MN-major: ((T, 1, m), (8, k)) : ((1, T, SBO), (1T, LBO))
# Accumulator D of m64nNk16 (CuTe's CLayout_64xN): (thread, value) -> m + 64 n by
#   ((4, 8, 4), (2, 2, N/8)) : ((128, 1, 16), (64, 8, 512)).
def _canonical_offset(mn: int, k: int, mn_major: bool, lbo: int, sbo: int) -> int:
    if mn_major:
        return (mn % 8) + (mn // 8) * sbo + (k % 8) * 8 + (k // 8) * lbo
    return (mn % 8) * 8 + (mn // 8) * sbo + (k % 8) + (k // 8) * lbo


def _d_coordinate(thread: int, value: int) -> tuple[int, int]:
    index = (128 * (thread % 4) + (thread // 4) % 8 + 16 * (thread // 32)
             + 64 * (value % 2) + 8 * ((value // 2) % 2) + 512 * (value // 4))
    return index % 64, index // 64


def _descriptor(start_bytes: int, lbo_bytes: int, sbo_bytes: int) -> int:
    # PTX ISA "Matrix Descriptor Format": bits 0-13, 16-29, 32-45 hold (x & 0x3FFFF) >> 4; swizzle 0.
    enc = lambda x: (x & 0x3FFFF) >> 4  # noqa: E731
    return enc(start_bytes) | (enc(lbo_bytes) << 16) | (enc(sbo_bytes) << 32)


# (A M-major?, A LBO, A SBO, B N-major?, B LBO, B SBO), strides in elements. Besides the layouts
# the GEMM kernel uses (K-major: LBO 64, SBO 256; MN-major: SBO 64, LBO = 8 x rows), ones with the
# 8-row groups of both K halves interleaved (K-major LBO 64 / SBO 128), and with gaps between core
# matrices, so that a swapped or ignored LBO / SBO cannot pass.
WGMMA_LAYOUTS = [
    (False, 64, 256, False, 64, 256),
    (False, 64, 128, False, 64, 128),
    (True, 512, 64, True, 1024, 64),
    (False, 1200, 80, True, 72, 144),
    (True, 96, 1056, False, 4200, 136),
]


def _wgmma_case(dtype, layout, clobber=False, seed=0):
    a_mn, a_lbo, a_sbo, b_mn, b_lbo, b_sbo = layout
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(64, 16, generator=g).to(dtype)
    B = torch.randn(128, 16, generator=g).to(dtype)  # (n, k)
    D = torch.randn(128, 64, generator=g)            # each thread's accumulator fragment
    a_off = [[_canonical_offset(m, k, a_mn, a_lbo, a_sbo) for k in range(16)] for m in range(64)]
    b_off = [[_canonical_offset(n, k, b_mn, b_lbo, b_sbo) for k in range(16)] for n in range(128)]
    a_elems = 1 + max(max(r) for r in a_off)
    b_base = (a_elems + 7) // 8 * 8  # B starts on a 16-byte boundary after A
    elems = b_base + 1 + max(max(r) for r in b_off)
    image = torch.full((elems,), float("nan")).to(dtype)  # gaps hold NaN: reading one shows
    image[torch.tensor(a_off).flatten()] = A.flatten()
    image[b_base + torch.tensor(b_off).flatten()] = B.flatten()
    out = D.clone()
    emu.wgmma_selftest(image.data_ptr(), 2 * elems, _descriptor(0, 2 * a_lbo, 2 * a_sbo),
                       _descriptor(2 * b_base, 2 * b_lbo, 2 * b_sbo), a_mn, b_mn, dtype == torch.bfloat16,
                       clobber, out.data_ptr())
    product = A.double() @ B.double().T  # exact products of 16-bit values; one rounding to fp32 at the end
    expect = torch.empty(128, 64)
    for t in range(128):
        for v in range(64):
            m, n = _d_coordinate(t, v)
            expect[t, v] = (D[t, v].double() + (0.0 if clobber else product[m, n])).float()
    return out, expect


@needs_emulator
@pytest.mark.parametrize("layout", WGMMA_LAYOUTS, ids=lambda v: "-".join(map(str, v)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_wgmma_matches_the_ptx_layouts(dtype, layout):
    out, expect = _wgmma_case(dtype, layout)
    assert torch.equal(out, expect), (out - expect).abs().max()


@needs_emulator
def test_wgmma_reads_its_operands_at_the_wait():
    """wgmma is asynchronous: shared memory overwritten between the issue and wgmma.wait_group is
    what the instruction reads (here zeros, so D comes back unchanged)."""
    out, expect = _wgmma_case(torch.float16, WGMMA_LAYOUTS[0], clobber=True)
    assert torch.equal(out, expect)


@needs_emulator
def test_wgmma_descriptor_checks():
    """A swizzled layout (not emulated) and an operand past the end of shared memory fault."""
    image = torch.zeros(64 * 16 + 128 * 16, dtype=torch.float16)
    out = torch.zeros(128, 64)
    good = _descriptor(0, 128, 256)
    with pytest.raises(RuntimeError, match="swizzled"):
        emu.wgmma_selftest(image.data_ptr(), image.numel() * 2, good | (1 << 62), good, False, False, False, False,
                           out.data_ptr())
    with pytest.raises(RuntimeError, match="outside the block's shared memory"):
        emu.wgmma_selftest(image.data_ptr(), image.numel() * 2, good, _descriptor(2048, 128, 512), False, False,
                           False, False, out.data_ptr())


def _all_outputs(device_dtype, shape, fused: bool, monkeypatch, wgmma: bool = True):
    """Every output of the four CUDA launchers (both ops, fwd and bwd) on fixed random inputs."""
    from convnext_kernels.launchers import cuda as L

    dtype = device_dtype
    N, H, W, C = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, H, W, C, generator=g).to(dtype)
    dy = torch.randn(N, H, W, C, generator=g).to(dtype)
    w = torch.randn(C, 1, 7, 7, generator=g) * 0.2
    b, nw, nb = (torch.randn(C, generator=g) * 0.1 for _ in range(3))
    y, mean, rstd = L.dwconv_layernorm_fwd(x, w, b, nw, nb, 1e-6)
    out = [y, mean, rstd, *L.dwconv_layernorm_bwd(dy, x, w, b, nw, mean, rstd)]
    w1 = (torch.randn(4 * C, C, generator=g) / math.sqrt(C)).to(dtype)
    w2 = (torch.randn(C, 4 * C, generator=g) / math.sqrt(4 * C)).to(dtype)
    b1, b2, gamma = torch.randn(4 * C, generator=g), torch.randn(C, generator=g), torch.randn(C, generator=g)
    s = torch.tensor([0.0] + [1.25] * (N - 1))
    monkeypatch.setenv("CONVNEXT_KERNELS_CUDA_MLP_FUSED", "1" if fused else "0")
    monkeypatch.setenv("CONVNEXT_KERNELS_CUDA_MLP_WGMMA", "1" if wgmma else "0")
    out.append(L.mlp_layerscale_fwd(x, y, w1, b1, w2, b2, gamma, s))
    out.extend(L.mlp_layerscale_bwd(dy, x, w1, b1, w2, b2, gamma, s))
    return out


@needs_emulator
@pytest.mark.parametrize("dtype,shape,fused,wgmma", [
    (torch.float16, (2, 5, 7, 40), True, False),    # fused MLP forward, C padded to the 64-channel tile
    (torch.float16, (2, 5, 7, 40), True, True),     # the same on wgmma (an H100's default)
    (torch.float16, (2, 5, 7, 200), True, True),    # 64-row tiles: each warpgroup reads the other's h
    (torch.bfloat16, (2, 9, 11, 96), False, False),  # two-GEMM forward, cp.async + ldmatrix + mma.sync GEMMs
    (torch.bfloat16, (2, 9, 11, 96), False, True),   # the same GEMMs on wgmma
    (torch.float32, (2, 5, 6, 13), False, False),   # scalar paths (C % 8 != 0), FFMA GEMMs
], ids=["fp16-fused", "fp16-fused-wgmma", "fp16-fused-wgmma-64rows", "bf16-two_gemm", "bf16-two_gemm-wgmma",
        "fp32-scalar"])
def test_cuda_kernels_do_not_depend_on_thread_order(dtype, shape, fused, wgmma, schedule, monkeypatch):
    """The racecheck of the emulator: every output bit-identical whether a block's threads run
    forward, in reverse or shuffled between barriers."""
    schedule("forward")
    reference = _all_outputs(dtype, shape, fused, monkeypatch, wgmma)
    for order, seed in (("reverse", 0), ("shuffle", 1), ("shuffle", 2), ("greedy", 0), ("greedy_reverse", 0)):
        schedule(order, seed)
        outputs = _all_outputs(dtype, shape, fused, monkeypatch, wgmma)
        for i, (a, b) in enumerate(zip(reference, outputs)):
            assert torch.isfinite(a).all(), f"output {i} has non-finite values"
            assert torch.equal(a, b), f"output {i} differs between the forward and {order} (seed {seed}) thread orders"


@pytest.fixture
def cp_async_eager():
    """cp.async copies land at the instruction instead of at their wait; back to the wait afterwards."""
    emu.set_cp_async_eager(True)
    yield
    emu.set_cp_async_eager(False)


@needs_emulator
@pytest.mark.parametrize("dtype,shape,fused,wgmma", [
    (torch.float16, (2, 5, 7, 40), True, False),
    (torch.float16, (2, 5, 7, 40), True, True),
    (torch.float16, (2, 5, 7, 200), True, True),
    (torch.bfloat16, (3, 13, 17, 40), False, False),
    (torch.bfloat16, (3, 13, 17, 40), False, True),
], ids=["fp16-fused", "fp16-fused-wgmma", "fp16-fused-wgmma-64rows", "bf16-two_gemm", "bf16-two_gemm-wgmma"])
def test_cuda_kernels_do_not_depend_on_when_cp_async_lands(dtype, shape, fused, wgmma, monkeypatch, request):
    """The other half of the cp.async check: landing at the wait catches a read before it; landing
    at the instruction catches a copy into a stage that a reader has yet to read (wgmma reads its
    operands when it is waited for, up to a K step later). Every output bit-identical both ways.
    The shape has enough rows for K loops of several tiles in the weight-gradient GEMMs."""
    reference = _all_outputs(dtype, shape, fused, monkeypatch, wgmma)
    request.getfixturevalue("cp_async_eager")
    outputs = _all_outputs(dtype, shape, fused, monkeypatch, wgmma)
    for i, (a, b) in enumerate(zip(reference, outputs)):
        assert torch.isfinite(a).all(), f"output {i} has non-finite values"
        assert torch.equal(a, b), f"output {i} differs when cp.async lands at the instruction"


@needs_emulator
def test_cp_async_eager_landing():
    out = _selftest("cp_async_no_wait")
    assert torch.isnan(out).all()
    emu.set_cp_async_eager(True)
    try:
        out = _selftest("cp_async_no_wait")  # no wait needed: the copy landed at the instruction
    finally:
        emu.set_cp_async_eager(False)
    assert torch.equal(out, torch.arange(0, 128, 4, dtype=torch.float32) + 0.5)


@needs_emulator
@pytest.mark.parametrize("fused,C", [(True, c) for c in (40, 96, 120, 192, 200, 384)] + [(False, 40)],
                         ids=lambda v: str(v))
def test_ldmatrix_is_free_of_bank_conflicts(fused, C, monkeypatch):
    """The padded shared-memory rows are there so that the 8 rows of every ldmatrix matrix hit 8
    distinct 16-byte bank groups: the emulator sees each warp's addresses and counts the extra
    wavefronts a conflict would cost. The fused forward has one tile shape per padded C; the
    two-GEMM path's forward and backward cover every operand layout (K-major, MN-major)."""
    from convnext_kernels.launchers import cuda as L

    monkeypatch.setenv("CONVNEXT_KERNELS_CUDA_MLP_FUSED", "1" if fused else "0")
    monkeypatch.setenv("CONVNEXT_KERNELS_CUDA_MLP_WGMMA", "0")  # the ldmatrix GEMMs (wgmma reads no ldmatrix)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, C, generator=g).half()
    w1, w2 = (torch.randn(4 * C, C, generator=g) / 8).half(), (torch.randn(C, 4 * C, generator=g) / 16).half()
    b1, b2 = torch.randn(4 * C, generator=g), torch.randn(C, generator=g)
    emu.stats(True)
    L.mlp_layerscale_fwd(x, x, w1, b1, w2, b2, None, None)
    if not fused:
        L.mlp_layerscale_bwd(x, x, w1, b1, w2, b2, None, None)
    st = emu.stats(True)
    assert st["ldmatrix"] > 0 and st["mma"] > 0, st
    assert st["ldmatrix_extra_wavefronts"] == 0, st


# ------------------------------------------------------------------------------------------------
# memcheck: the emulated kernels under AddressSanitizer + UndefinedBehaviorSanitizer
# ------------------------------------------------------------------------------------------------
# On a GPU, compute-sanitizer memcheck reports accesses outside an allocation and misaligned
# accesses. On the host, ASan sees the first (torch's CPU tensors come from malloc) and UBSan's
# alignment check the second (x86 itself does not fault on a misaligned float4 / uint4).
REPO = Path(__file__).resolve().parents[1]
ASAN_OPTIONS = "detect_leaks=0:detect_stack_use_after_return=0:abort_on_error=0"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=undefined"]


def _asan_toolchain():
    """(g++, LD_PRELOAD value, pybind11 include dir), or the reason the memcheck cannot run here."""
    if not sys.platform.startswith("linux"):
        return None, "AddressSanitizer memcheck runs on Linux"
    if not (REPO / "csrc" / "emulation").is_dir():
        return None, "needs the source checkout (csrc/)"
    cxx = shutil.which("g++")
    if cxx is None:
        return None, "needs g++"
    libs = [subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
            for name in ("libasan.so", "libstdc++.so")]
    if not all(os.path.isabs(lib) and os.path.exists(lib) for lib in libs):
        return None, "g++ has no libasan"
    # libstdc++ preloaded as well: python does not link it, and ASan's __cxa_throw interceptor
    # must find the real one when the launchers throw (bad arguments raise ValueError).
    lib = " ".join(libs)
    try:
        import pybind11
    except ImportError:
        return None, "needs pybind11 (pip install '.[test]')"
    return (cxx, lib, pybind11.get_include()), ""


def _build_asan_emulator(cxx: str, pybind11_include: str, out_dir: Path) -> Path:
    """The CUDA sources + emulator compiled with the sanitizers into a _cuda_emulated module."""
    sources = sorted((REPO / "csrc" / "cuda").glob("*.cu")) + [REPO / "csrc" / "cuda" / "bindings_cuda.cpp"] + \
        sorted((REPO / "csrc" / "emulation").glob("*.cpp"))
    # -O2: the emulated kernels ran 3.3x slower at -O1 (571 s against 174 s for the memcheck run,
    # 2 cores); the sanitizers instrument every access that remains at either level.
    flags = ["-std=c++17", "-O2", "-g", *SANITIZE, "-fno-omit-frame-pointer", "-fPIC",
             "-DCNK_CUDA_EMULATION", "-w", f"-I{REPO / 'csrc'}", f"-I{sysconfig.get_paths()['include']}",
             f"-I{pybind11_include}"]
    objects = [out_dir / f"{src.name}.o" for src in sources]
    for proc in run_commands([[cxx, *flags, "-x", "c++", "-c", str(src), "-o", str(obj)]
                              for src, obj in zip(sources, objects)], jobs=os.cpu_count() or 1, timeout=1200):
        assert proc.returncode == 0, proc.stderr
    module = out_dir / "convnext_kernels" / f"_cuda_emulated{sysconfig.get_config_var('EXT_SUFFIX')}"
    link = subprocess.run([cxx, "-shared", SANITIZE[0], "-o", str(module), *map(str, objects)],
                          capture_output=True, text=True)
    assert link.returncode == 0, link.stderr
    return module


@pytest.fixture(scope="module")
def asan_package(tmp_path_factory):
    """A copy of the installed package whose _cuda_emulated is the sanitizer build."""
    toolchain, why = _asan_toolchain()
    if toolchain is None:
        pytest.skip(why)
    cxx, lib, pybind11_include = toolchain
    root = tmp_path_factory.mktemp("asan")
    import convnext_kernels

    shutil.copytree(Path(convnext_kernels.__file__).parent, root / "convnext_kernels",
                    ignore=shutil.ignore_patterns("_cuda_emulated*", "__pycache__"))
    _build_asan_emulator(cxx, pybind11_include, root)
    # No GPU for the child, on a GPU machine too: the emulated tests are the point, and the CUDA
    # driver does not start under ASan's shadow-memory layout.
    env = dict(os.environ, LD_PRELOAD=lib, ASAN_OPTIONS=f"{ASAN_OPTIONS}:log_path={root / 'asan'}",
               UBSAN_OPTIONS=f"print_stacktrace=1:log_path={root / 'ubsan'}", PYTHONPATH=str(root),
               CUDA_VISIBLE_DEVICES="")
    return root, env


def _sanitizer_reports(root: Path, remove: bool = False) -> str:
    logs = sorted(p for pattern in ("asan*", "ubsan*") for p in root.glob(pattern) if p.is_file())
    text = "".join(p.read_text() for p in logs)
    if remove:
        for p in logs:
            p.unlink()
    return text


@pytest.mark.parametrize("kind,expected", [("oob_write", "heap-buffer-overflow"),
                                           ("misaligned_vector_load", "misaligned address")])
def test_memcheck_catches_kernel_bugs(asan_package, kind, expected):
    """The check below could not fail if the sanitizers were not watching: each planted bug must be seen."""
    root, env = asan_package
    code = ("import torch, convnext_kernels._cuda_emulated as e; "
            f"src = torch.zeros(128); dst = torch.zeros(32); e.selftest('{kind}', src.data_ptr(), dst.data_ptr())")
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    # ASan writes to its log file; UBSan (inside ASan's runtime) may print to stderr instead.
    reports = _sanitizer_reports(root, remove=True) + run.stderr
    assert run.returncode != 0 and expected in reports and f"{kind}_kernel" in reports, reports[-3000:]


def test_memcheck_of_the_cuda_kernels(asan_package):
    """compute-sanitizer memcheck's job on the CPU: every emulated CUDA kernel test (but the slowest
    shape) under ASan + UBSan, so a read or write past any tensor or workspace the launchers
    allocate, or a misaligned vector access, fails."""
    root, env = asan_package
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
           str(REPO / "tests" / "test_cuda_kernels.py"), "-k", "emulated and not 2x7x7x768"]
    run = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=1200)
    reports = _sanitizer_reports(root)
    if "runtime error" in run.stderr:  # a UBSan report printed instead of logged
        reports += run.stderr
    assert run.returncode == 0 and not reports, run.stdout[-3000:] + reports[-3000:]
    assert " passed" in run.stdout
