"""Building the package elsewhere. `python -m build` and pip installing from PyPI build the wheel from
the sdist alone, not from the checkout, so the sdist must carry CMakeLists.txt and the C++/CUDA tree
(MANIFEST.in): one test checks its file list against the tracked files, one builds a CPU-only wheel
from it through setuptools' PEP 517 hook, as pip does, and runs both ops from that wheel. And the
CPU sources compile with other compilers (Clang, GCC for aarch64) where they are installed, and the
CPU kernels built for aarch64 compute under qemu what the native build's portable code computes."""

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest
from conftest import run_commands

REPO = Path(__file__).resolve().parents[1]
# Tracked files a user of the sdist has no use for: CI's script and git's own file.
NOT_IN_SDIST = {".ci/run", ".gitignore"}


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: no tracked files to compare the sdist with")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [name for name in out.split("\0") if name]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """(path of the sdist built from the tracked files as they are in the working tree, the files
    it was built from)."""
    tracked = _tracked_files()
    src = tmp_path_factory.mktemp("source")
    for name in tracked:
        if (REPO / name).is_file():  # (a tracked file deleted in the working tree is not copied)
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    hook = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", hook, str(dist)], cwd=src, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"build_sdist failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return dist / proc.stdout.strip().splitlines()[-1], [n for n in tracked if (src / n).is_file()]


def test_sdist_carries_every_tracked_file(sdist):
    path, tracked = sdist
    with tarfile.open(path) as tar:
        # Members are "<name>-<version>/<path>".
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}
    missing = sorted(set(tracked) - NOT_IN_SDIST - members)
    assert not missing, f"tracked files missing from the sdist (MANIFEST.in): {missing}"
    for needed in ("CMakeLists.txt", "csrc/bindings.cpp", "setup.py", "pyproject.toml"):
        assert needed in members
    stray = sorted(m for m in members if m.endswith((".so", ".pyc")) or "__pycache__" in m
                   or m.startswith(("build/", "dist/")))
    assert not stray, f"build products in the sdist: {stray}"


def _build_tools(env: dict) -> str:
    """Why a wheel cannot be built here ("" when it can): the build requirements of pyproject.toml
    that must come from this environment (no build isolation, no network)."""
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 is not installed"
    # setuptools builds wheels by itself from 70.1 on; before, with the wheel package.
    if importlib.util.find_spec("setuptools.command.bdist_wheel") is None and importlib.util.find_spec("wheel") is None:
        return "setuptools < 70.1 without the wheel package"
    if shutil.which("cmake", path=env["PATH"]) is None:
        return "no cmake"
    try:
        import ninja  # noqa: F401
    except ImportError:
        if shutil.which("ninja", path=env["PATH"]) is None:
            return "no ninja"
    return ""


def test_wheel_builds_from_the_sdist_alone(sdist, tmp_path):
    path, _ = sdist
    with tarfile.open(path) as tar:
        # (The "data" filter where this Python has it: plain files only, nothing outside the folder.)
        tar.extractall(tmp_path / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (root,) = (tmp_path / "unpacked").iterdir()
    # The venv's scripts (cmake and ninja from the test extras) first, as an activated venv has them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVNEXT_KERNELS_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # CPU kernels only: what every build has; the CUDA sources' presence is the file-list test's.
    env.update(CONVNEXT_KERNELS_CUDA="0", CONVNEXT_KERNELS_CUDA_EMULATION="0", MAX_JOBS="2")
    why = _build_tools(env)
    if why:
        pytest.skip(f"cannot build a wheel here: {why}")
    wheels = tmp_path / "wheels"
    hook = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", hook, str(wheels)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"build_wheel from the sdist failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    wheel = wheels / proc.stdout.strip().splitlines()[-1]
    site = tmp_path / "site"
    shutil.unpack_archive(wheel, site, format="zip")
    # The wheel's package, not the installed one, runs both ops against the float64 reference.
    check = """
import sys, torch, convnext_kernels as ck
from convnext_kernels.reference import dwconv_layernorm_ref, mlp_layerscale_ref
assert ck.__file__.startswith(sys.argv[1]), ck.__file__
info = ck.build_info()
assert info["cuda"] is False and info["cuda_emulation"] is False, info
torch.manual_seed(0)
N, H, W, C = 3, 13, 17, 40
x = torch.randn(N, H, W, C)
cw, cb, nw, nb = torch.randn(C, 1, 7, 7) / 7, torch.randn(C), 1 + torch.randn(C) / 4, torch.randn(C) / 4
w1, b1 = torch.randn(4 * C, C) / C ** 0.5, torch.randn(4 * C)
w2, b2, g = torch.randn(C, 4 * C) / (2 * C ** 0.5), torch.randn(C), torch.randn(C)
d = lambda *ts: [t.double() for t in ts]
y = ck.dwconv_layernorm(x, cw, cb, nw, nb, 1e-6, backend="cpu")
y64 = dwconv_layernorm_ref(*d(x, cw, cb, nw, nb), 1e-6)
out = ck.mlp_layerscale(y, x, w1, b1, w2, b2, g, backend="cpu")
out64 = mlp_layerscale_ref(*d(y, x, w1, b1, w2, b2, g))
for a, b in ((y, y64), (out, out64)):
    err = (a.double() - b).abs().max().item()
    assert err <= 1e-5 * b.abs().max().item(), err
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run([sys.executable, "-c", check, str(site)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), \
        f"the wheel built from the sdist does not work:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


# Compilers other than the one that builds the installed extension, where this machine has them
# (.ci/run installs them where it can): the CPU kernels must build everywhere, with any GCC or
# Clang and on other architectures (aarch64 hosts such as NVIDIA Grace take the portable vector
# code). Each compiles the sources CMake gives _C, with its language and warning flags (at -O1, to
# be quick), to objects that are dropped.
OTHER_COMPILERS = ["clang++", "aarch64-linux-gnu-g++"]
# CMakeLists.txt's language and warning flags for _C (and its include directory).
CMAKE_CXX_FLAGS = ["-std=c++17", "-ffp-contract=fast", "-Wall", "-Wno-psabi", f"-I{REPO / 'csrc'}"]


@pytest.mark.parametrize("compiler", OTHER_COMPILERS)
def test_cpu_sources_compile_with(compiler, tmp_path):
    cxx = shutil.which(compiler)
    if cxx is None:
        pytest.skip(f"{compiler} is not installed")
    try:
        import pybind11
    except ImportError:
        pytest.skip("pybind11 is not installed")
    # OpenMP where the compiler has it (clang needs libomp's headers), as CMake's find_package does.
    probe = subprocess.run([cxx, "-fopenmp", "-x", "c++", "-c", "-", "-o", os.devnull],
                           input="#include <omp.h>\nint f() { return omp_get_max_threads(); }\n",
                           capture_output=True, text=True)
    openmp = ["-fopenmp"] if probe.returncode == 0 else []
    flags = [*CMAKE_CXX_FLAGS, "-O1", "-fPIC", *openmp, f"-I{pybind11.get_include()}",
             f"-I{sysconfig.get_paths()['include']}"]
    sources = sorted((REPO / "csrc" / "cpu").glob("*.cpp")) + [REPO / "csrc" / "bindings.cpp"]
    procs = run_commands([[cxx, *flags, "-c", str(src), "-o", str(tmp_path / f"{src.stem}.o")] for src in sources])
    failures = [f"{src.relative_to(REPO)}:\n{proc.stderr[-3000:]}" for src, proc in zip(sources, procs)
                if proc.returncode != 0]
    assert not failures, f"{compiler} {' '.join(openmp)} fails to compile:\n" + "\n".join(failures)


def _read_records(path: Path) -> list:
    """tests/cpu_kernels_cross.cpp's output: (storage dtype code, float32 values) per record."""
    import numpy as np

    data, records, at = path.read_bytes(), [], 0
    while at < len(data):
        code, count = np.frombuffer(data, np.uint32, 2, at)
        at += 8
        records.append((int(code), np.frombuffer(data, np.float32, int(count), at)))
        at += 4 * int(count)
    return records


def test_cpu_kernels_compute_the_same_on_aarch64(tmp_path):
    """Every CPU kernel, built for aarch64 and run under qemu-aarch64, against the native build's
    portable code path (CONVNEXT_KERNELS_CPU_ISA=generic) on the same inputs: equal up to the
    rounding that FMA contraction moves (aarch64 contracts a * b + c where x86's baseline cannot),
    which may flip a 16-bit output by one unit in the last place."""
    import numpy as np

    cross, qemu, native = (shutil.which(c) for c in ("aarch64-linux-gnu-g++", "qemu-aarch64", "g++"))
    if cross is None or qemu is None or native is None:
        pytest.skip("needs aarch64-linux-gnu-g++, qemu-aarch64 and g++")
    sources = [str(REPO / "csrc" / "cpu" / "dwconv_layernorm.cpp"), str(REPO / "csrc" / "cpu" / "mlp_layerscale.cpp"),
               str(REPO / "tests" / "cpu_kernels_cross.cpp")]
    flags = [*CMAKE_CXX_FLAGS, "-O2", "-fopenmp", f"-I{REPO / 'csrc' / 'cpu'}"]
    builds = {"native": [native, *flags, *sources, "-o", str(tmp_path / "native")],
              # Static: qemu-aarch64 then needs no aarch64 sysroot.
              "aarch64": [cross, *flags, "-static", *sources, "-o", str(tmp_path / "aarch64")]}
    for name, proc in zip(builds, run_commands(builds.values())):
        assert proc.returncode == 0, f"{name} build failed:\n{proc.stderr[-3000:]}"
    env = dict(os.environ, CONVNEXT_KERNELS_CPU_ISA="generic", OMP_NUM_THREADS="2")
    for name, cmd in (("native", [str(tmp_path / "native")]), ("aarch64", [qemu, str(tmp_path / "aarch64")])):
        proc = subprocess.run([*cmd, str(tmp_path / f"{name}.bin")], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{name} run failed:\n{proc.stderr[-3000:]}"
    native_records, foreign_records = _read_records(tmp_path / "native.bin"), _read_records(tmp_path / "aarch64.bin")
    # Per dtype: two dwconv_layernorm cases of 8 records, two epilogue cases of 7 (8 in 16 bits).
    assert len(native_records) == len(foreign_records) == 3 * 2 * 8 + 2 * 7 + 2 * 2 * 8, len(native_records)
    # One unit in the last place of the storage dtype, relative to each value; 1e-5 of the record's
    # largest value for float32 sums whose order of rounding differs.
    ulp = {0: 0.0, 1: 2.0 ** -10, 2: 2.0 ** -7}
    for i, ((code, a), (code_b, b)) in enumerate(zip(native_records, foreign_records)):
        assert code == code_b and a.shape == b.shape, f"record {i}: layouts differ"
        assert np.isfinite(a).all() and np.isfinite(b).all(), f"record {i}: non-finite values"
        bound = ulp[code] * np.abs(a) + 1e-5 * np.abs(a).max()
        worst = int(np.argmax(np.abs(a - b) - bound))
        assert np.abs(a - b)[worst] <= bound[worst], \
            f"record {i} (dtype code {code}): aarch64 {b[worst]} vs native {a[worst]} at {worst}"
