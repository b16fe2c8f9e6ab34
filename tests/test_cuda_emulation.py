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


def _all_outputs(device_dtype, shape, fused: bool, monkeypatch):
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
    out.append(L.mlp_layerscale_fwd(x, y, w1, b1, w2, b2, gamma, s))
    out.extend(L.mlp_layerscale_bwd(dy, x, w1, b1, w2, b2, gamma, s))
    return out


@needs_emulator
@pytest.mark.parametrize("dtype,shape,fused", [
    (torch.float16, (2, 5, 7, 40), True),      # fused MLP forward, C padded to the 64-channel tile
    (torch.bfloat16, (2, 9, 11, 96), False),   # two-GEMM forward, cp.async + ldmatrix GEMMs
    (torch.float32, (2, 5, 6, 13), False),     # scalar paths (C % 8 != 0), FFMA GEMMs
], ids=["fp16-fused", "bf16-two_gemm", "fp32-scalar"])
def test_cuda_kernels_do_not_depend_on_thread_order(dtype, shape, fused, schedule, monkeypatch):
    """The racecheck of the emulator: every output bit-identical whether a block's threads run
    forward, in reverse or shuffled between barriers."""
    schedule("forward")
    reference = _all_outputs(dtype, shape, fused, monkeypatch)
    for order, seed in (("reverse", 0), ("shuffle", 1), ("shuffle", 2)):
        schedule(order, seed)
        outputs = _all_outputs(dtype, shape, fused, monkeypatch)
        for i, (a, b) in enumerate(zip(reference, outputs)):
            assert torch.isfinite(a).all(), f"output {i} has non-finite values"
            assert torch.equal(a, b), f"output {i} differs between the forward and {order} (seed {seed}) thread orders"


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
    flags = ["-std=c++17", "-O1", "-g", *SANITIZE, "-fno-omit-frame-pointer", "-fPIC",
             "-DCNK_CUDA_EMULATION", "-w", f"-I{REPO / 'csrc'}", f"-I{sysconfig.get_paths()['include']}",
             f"-I{pybind11_include}"]
    objects = [out_dir / f"{src.name}.o" for src in sources]
    jobs = max(os.cpu_count() or 1, 1)
    running = []
    for src, obj in zip(sources, objects):
        running.append(subprocess.Popen([cxx, *flags, "-x", "c++", "-c", str(src), "-o", str(obj)],
                                        stderr=subprocess.PIPE, text=True))
        while len(running) >= jobs or (running and src == sources[-1]):
            proc = running.pop(0)
            _, err = proc.communicate()
            assert proc.returncode == 0, err
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
    env = dict(os.environ, LD_PRELOAD=lib, ASAN_OPTIONS=f"{ASAN_OPTIONS}:log_path={root / 'asan'}",
               UBSAN_OPTIONS=f"print_stacktrace=1:log_path={root / 'ubsan'}", PYTHONPATH=str(root))
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
