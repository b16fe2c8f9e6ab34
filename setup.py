"""Builds convnext_kernels._C with CMake + Ninja (pybind11 cmake_example pattern).

Environment switches:
  CONVNEXT_KERNELS_CUDA        unset: build CUDA if CMake finds nvcc; 1: require it; 0: CPU only
  CONVNEXT_KERNELS_CUDA_ARCHS  CUDA architectures, default "80;90a" (90a -> sm_90a)
  CONVNEXT_KERNELS_CUDA_EMULATION
                               unset: also build convnext_kernels._cuda_emulated (the CUDA kernels
                               compiled for the host against a CUDA emulator, for tests without a
                               GPU; plain C++, no nvcc) where the host has ucontext; 1: require it; 0: skip
  MAX_JOBS                     parallel compile jobs
  CMAKE_ARGS                   extra CMake arguments (space separated)
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str = "") -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


def _switch(name: str) -> str:
    """An AUTO / ON / OFF CMake switch from environment variable `name` (unset, 1 or 0)."""
    value = os.environ.get(name, "").strip().lower()
    modes = {"": "AUTO", "auto": "AUTO", "1": "ON", "on": "ON", "0": "OFF", "off": "OFF"}
    if value not in modes:
        raise ValueError(f"{name} must be 0, 1 or unset, got {value!r}")
    return modes[value]


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        ext_fullpath = Path.cwd() / self.get_ext_fullpath(ext.name)
        extdir = ext_fullpath.parent.resolve()
        debug = int(os.environ.get("DEBUG", 0)) if self.debug is None else self.debug
        cfg = "Debug" if debug else "Release"

        cmake_args = [
            "-G", "Ninja",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCONVNEXT_KERNELS_CUDA={_switch('CONVNEXT_KERNELS_CUDA')}",
            f"-DCONVNEXT_KERNELS_CUDA_EMULATION={_switch('CONVNEXT_KERNELS_CUDA_EMULATION')}",
            "-DCONVNEXT_KERNELS_CUDA_ARCHS="
            + os.environ.get("CONVNEXT_KERNELS_CUDA_ARCHS", "80;90a"),
        ]
        # Use the ninja from the build environment even if it is not on PATH.
        try:
            import ninja

            ninja_bin = Path(ninja.BIN_DIR) / "ninja"
            cmake_args.append(f"-DCMAKE_MAKE_PROGRAM={ninja_bin}")
        except ImportError:
            pass
        if "CMAKE_ARGS" in os.environ:
            cmake_args += [item for item in os.environ["CMAKE_ARGS"].split(" ") if item]

        build_args = ["--config", cfg]
        if os.environ.get("MAX_JOBS"):
            build_args.append(f"--parallel={int(os.environ['MAX_JOBS'])}")

        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", *build_args], cwd=build_temp, check=True)


setup(
    ext_modules=[CMakeExtension("convnext_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
