"""Which backends exist on this machine, and which one "auto" means for a device.

Backends:
  "triton"  Triton kernels: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (how CI checks them)
  "cuda"    the hand-written CUDA kernels in the compiled extension (built where nvcc was found):
            CUDA tensors, or CPU tensors when CONVNEXT_KERNELS_CUDA_EMULATE=1 (the same kernels
            compiled for the host against a CUDA emulator: how CI checks them; slow, tests only)
  "cpu"     the C++ kernel in the compiled extension (dwconv_layernorm; mlp_layerscale uses torch GEMMs)
  "torch"   the same math in PyTorch ops, any device
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from types import ModuleType
from typing import Optional

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")

# "auto" takes the first available entry. Triton leads on CUDA until the benchmarks in
# benchmarks/results/ show the CUDA kernels ahead on every ConvNeXt-T stage shape.
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

ENV_BACKEND = "CONVNEXT_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says what is missing."""


def _import_extension() -> tuple[Optional[ModuleType], str]:
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as e:  # not built, or built for another Python
        return None, (f"the compiled extension convnext_kernels._C could not be imported ({e}); "
                      "run `pip install .`")
    return _C, ""


# Resolved once at import (the extension here, triton below): a lookup filled lazily inside a
# torch.compile trace would add a guard and a recompile on the next call.
_EXTENSION = _import_extension()


def _extension() -> tuple[Optional[ModuleType], str]:
    """The compiled extension, or None and why it could not be imported."""
    return _EXTENSION


def _find_cuda_kernels() -> str:
    """Empty when the extension holds the CUDA kernels, else why not. Asked once, here: a call
    into the extension during backend resolution would stop a torch.compile(fullgraph=True)
    trace (dynamo cannot trace a pybind11 function)."""
    ext, why = _EXTENSION
    if ext is None:
        return why
    if not ext.build_info().get("cuda_kernels", False):
        return ("the compiled extension was built without CUDA (nvcc was not found at build time); "
                "reinstall with CONVNEXT_KERNELS_CUDA=1 where nvcc is on PATH")
    return ""


_CUDA_KERNELS_MISSING = _find_cuda_kernels()


def build_info() -> dict:
    """What the compiled extension was built with (compiler, OpenMP, CUDA, archs), and whether the
    host-emulated CUDA kernels (convnext_kernels._cuda_emulated, for tests) were built."""
    ext, why = _extension()
    if ext is None:
        raise BackendUnavailableError(why)
    return dict(ext.build_info(), cuda_emulation=emulated_cuda_extension()[0] is not None)


def triton_interpreted() -> bool:
    """Whether Triton runs its interpreter (TRITON_INTERPRET=1): CPU tensors, checked numerics."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


ENV_CUDA_EMULATE = "CONVNEXT_KERNELS_CUDA_EMULATE"


def cuda_emulated() -> bool:
    """Whether backend "cuda" takes CPU tensors and runs its kernels in the host CUDA emulator
    (CONVNEXT_KERNELS_CUDA_EMULATE=1; the module convnext_kernels._cuda_emulated)."""
    return os.environ.get(ENV_CUDA_EMULATE, "0") == "1"


def _import_emulated_cuda() -> tuple[Optional[ModuleType], str]:
    try:
        from . import _cuda_emulated  # type: ignore[attr-defined]
    except ImportError as e:
        return None, (f"the CUDA emulation module convnext_kernels._cuda_emulated could not be imported ({e}); "
                      "it is built by `pip install .` on hosts with ucontext (CONVNEXT_KERNELS_CUDA_EMULATION)")
    return _cuda_emulated, ""


def emulated_cuda_extension() -> tuple[Optional[ModuleType], str]:
    """The CUDA kernels compiled for the host (None and why, when not built)."""
    return _import_emulated_cuda()


# Oldest triton the kernels are written for (tl.dot input_precision, autotune(do_bench=...)).
MIN_TRITON = (3, 3)


def _find_triton() -> str:
    """Empty when triton imports, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install \"triton>=3.3\")"
    try:
        triton = importlib.import_module("triton")
    except Exception as e:  # a broken install must not break the package
        return f"triton failed to import ({e})"
    version = getattr(triton, "__version__", "")
    major_minor = tuple(int(v) for v in re.findall(r"\d+", version)[:2])
    if len(major_minor) == 2 and major_minor < MIN_TRITON:
        return (f"triton {version} is older than {MIN_TRITON[0]}.{MIN_TRITON[1]}, the oldest the Triton kernels "
                "support (torch 2.6 pins triton 3.2): use backend 'cuda' or 'torch', or torch >= 2.7")
    return ""


_TRITON_MISSING = _find_triton()


def unavailable_reason(backend: str, device: torch.device) -> str:
    """Empty when `backend` can run on tensors of `device`, else what is missing."""
    dev = device.type
    if backend == "torch":
        return ""
    if backend == "triton":
        missing = _TRITON_MISSING
        if missing:
            return missing
        if dev == "cuda":
            return "" if torch.cuda.is_available() else "torch was built without CUDA or no GPU is visible"
        if dev == "cpu":
            return "" if triton_interpreted() else (
                "backend 'triton' needs CUDA tensors (got CPU tensors); set TRITON_INTERPRET=1 before "
                "importing triton to run the Triton kernels on the CPU"
            )
        return f"backend 'triton' does not support {dev} tensors"
    if backend == "cuda":
        if dev == "cpu" and cuda_emulated():
            return emulated_cuda_extension()[1]
        if dev != "cuda":
            hint = (f"; set {ENV_CUDA_EMULATE}=1 to run the CUDA kernels on the CPU in the emulator (tests)"
                    if dev == "cpu" else "")
            return f"backend 'cuda' needs CUDA tensors (got {dev} tensors){hint}"
        return _CUDA_KERNELS_MISSING
    if backend == "cpu":
        if dev != "cpu":
            return f"backend 'cpu' needs CPU tensors (got {dev} tensors)"
        ext, why = _extension()
        return "" if ext is not None else why
    return f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)} or 'auto'"


def available_backends(device=None) -> list[str]:
    """Backends that can run on `device` (default: CUDA if available, else CPU), fastest first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    order = AUTO_ORDER.get(device.type, ("torch",))
    names = list(order) + [b for b in BACKENDS if b not in order]
    return [b for b in names if not unavailable_reason(b, device)]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for `backend` ("auto" or a name) on `device`; raises if it cannot run."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "auto") or "auto"
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            if not unavailable_reason(name, device):
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)} or 'auto'")
    why = unavailable_reason(backend, device)
    if why:
        raise BackendUnavailableError(f"backend {backend!r} is unavailable: {why}")
    return backend


# The module holding each backend's launchers, imported on first use (triton's only then).
_LAUNCHER_MODULES = {
    "triton": "convnext_kernels.triton",
    "cuda": "convnext_kernels.launchers.cuda",
    "cpu": "convnext_kernels.launchers.cpu",
    "torch": "convnext_kernels.launchers.torch_ops",
}

# Per backend and activation dtype, from which C on mlp_layerscale's forward stores the
# pre-activation x @ fc1_weight.T + fc1_bias (in the activation dtype) for backward, when one can
# follow, instead of backward recomputing it; absent: never. Storing trades 4C values per pixel
# of memory traffic (and, on the CPU, the page faults of a fresh buffer of that size) for one
# GEMM less, whose cost per stored value grows with C. cpu, fp32 (fwd+bwd at batch 8, medians of
# 15 interleaved): on a 2-thread AMD EPYC with its GEMMs on oneDNN (2026-12-06), C = 192 at
# 28x28 32.6 ms stored against 37.0 recomputed, C = 96 at 56x56 44.6-44.7 against 42.3-42.5
# (the GEMM is cheap there and the faults are not); at C = 80 and 96 on 28x28 storing won by
# 0.4-1 ms, at C = 40 it lost by 0.5. On a 2-thread Intel Xeon with MKL's GEMMs (2026-12-07, two
# runs), the same crossing: storing 1.10-1.13x faster at C = 128 to 768 (28x28 to 7x7), 0.88-0.90x
# at C = 96 on 56x56, 0.97-0.98x at C = 40 on 56x56, 1.07-1.08x at C = 80 and 96 on 28x28.
# cpu, 16-bit: always stored (2 bytes a value against a 16-bit GEMM): ConvNeXt-T bf16-autocast
# training step at batch 8, on the AMD EPYC, 548 ms stored against 590 recomputed (medians of 7;
# fp16, whose CPU GEMMs are slow there: 25.8 s against 26.7 s); on the Intel Xeon, the op in bf16
# at the shapes above, 0.99-1.06x. It stores the 16-bit GEMM's own output, without the bias, so
# backward differentiates at the very pre-activation the forward used, and the forward does not
# depend on whether a backward follows. GPU backends recompute: triton has both forms, timed
# against each other by benchmarks/kernels.py (the GPU figures will set its entry); cuda has only
# this one; torch runs the GPU algorithm.
# A plain table, not a launcher attribute: torch.compile traces the lookup.
MLP_LAYERSCALE_STORE_PREACT_MIN_C = {"cpu": {torch.float32: 128, torch.bfloat16: 0, torch.float16: 0}}


def launchers(backend: str) -> ModuleType:
    """The launcher module of a backend (see convnext_kernels.launchers)."""
    return importlib.import_module(_LAUNCHER_MODULES[backend])
