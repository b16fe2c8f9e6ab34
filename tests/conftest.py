"""Shared test set-up: Triton's interpreter on CPU-only machines, the CUDA emulator for CPU
tensors, poisoned outputs, the pass rule."""

import concurrent.futures
import contextlib
import os
import subprocess
import sys

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; this must be set
# before triton is first imported (convnext_kernels imports it lazily, pytest imports this first).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Backend "cuda" takes CPU tensors and runs its kernels in the host CUDA emulator (slow; small
# shapes), so the CPU suite checks the CUDA kernels as it checks the Triton ones.
os.environ.setdefault("CONVNEXT_KERNELS_CUDA_EMULATE", "1")
# Every kernel output starts as NaN, so an element a kernel forgets to write cannot pass.
os.environ.setdefault("CONVNEXT_KERNELS_POISON_OUTPUTS", "1")

import pytest  # noqa: E402

import convnext_kernels  # noqa: E402,F401  (registers the ops once, under the settings above)
from convnext_kernels import backends  # noqa: E402
from convnext_kernels.backends import unavailable_reason  # noqa: E402

# Empty where the installed triton can run the Triton kernels on some device, else why not: not
# installed, or older than they support (torch 2.6 pins triton 3.2), when their modules fail to import.
TRITON_UNUSABLE = backends._find_triton()

# Triton takes CPU tensors only through its interpreter, which this file turns on only where there
# is no GPU (on a GPU machine the compiled kernels must run, in the same process). So there the
# CPU-tensor Triton tests skip; test_ops.py asserts that they run wherever there is no GPU.
TRITON_CPU_MISSING = unavailable_reason("triton", torch.device("cpu"))

# Where the Triton kernels run on CPU tensors (the interpreter), bf16 needs
# tests/triton_interpreter_bf16.py's patch (dots and rounding as on the GPU); empty when bf16
# Triton kernels can run here, else why they cannot.
if not TRITON_CPU_MISSING:
    import triton_interpreter_bf16  # noqa: E402
    import triton_interpreter_calls  # noqa: E402
    TRITON_INTERPRETER_BF16_MISSING = triton_interpreter_bf16.enable()
    # Helper calls without the interpreter re-patching triton.language each time (speed only).
    TRITON_INTERPRETER_CALLS_MISSING = triton_interpreter_calls.enable()
else:
    TRITON_INTERPRETER_BF16_MISSING = TRITON_INTERPRETER_CALLS_MISSING = ""

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cpu_backend_params(names):
    """The backend names as pytest parameters for CPU-tensor tests, "triton" skipped where it
    cannot take CPU tensors (see TRITON_CPU_MISSING)."""
    return [pytest.param(n, marks=pytest.mark.skipif(n == "triton" and bool(TRITON_CPU_MISSING),
                                                     reason=f"triton on CPU tensors: {TRITON_CPU_MISSING}"))
            for n in names]


# Absolute slack added to 2x eager's error, per dtype (flash-attention's rule).
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _exact_fp32_convolutions():
    """On a GPU, cuDNN runs fp32 convolutions in TF32 by default (torch.backends.cudnn.allow_tf32):
    the stem and downsample convs of every model, and the torch backend's depthwise conv, would
    then miss the fp32 rule (1e-5 relative to fp64). Tests that want TF32 ask for it themselves.
    Without CUDA nothing is touched."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


BENCHMARKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


BENCHMARK_MODULES = [f[:-3] for f in os.listdir(BENCHMARKS_DIR) if f.endswith(".py")]


def imported_benchmark_script(name: str) -> bool:
    """Whether sys.modules[name] is the benchmarks/ script of that name (not a package so named)."""
    path = getattr(sys.modules.get(name), "__file__", None)
    return isinstance(path, str) and os.path.dirname(os.path.abspath(path)) == BENCHMARKS_DIR


@pytest.fixture(autouse=True)
def _forget_benchmark_modules():
    """Tests import the benchmark scripts as top-level modules (kernels, throughput, common ...).
    Left in sys.modules they shadow packages of the same names for later tests: transformers
    finds Hugging Face's `kernels` package by importlib.util.find_spec("kernels"), got
    benchmarks/kernels.py and failed to import from it. So they are dropped after each test."""
    yield
    for name in BENCHMARK_MODULES:
        if imported_benchmark_script(name):
            del sys.modules[name]


def transformers_with_dinov3():
    """transformers, skipping the test where it is missing or has no DINOv3 ConvNeXt (before 4.56)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DINOv3ConvNextModel"):
        pytest.skip(f"transformers {transformers.__version__} has no DINOv3 ConvNeXt (4.56 and later do)")
    return transformers


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running (whole models, benchmarks)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@contextlib.contextmanager
def tf32_matmul(enabled: bool):
    """torch's TF32 switch for CUDA matmuls set to `enabled` in the block, restored after it even
    when the block fails. Not monkeypatch.setattr: pytest 9.2 looks the old value up statically,
    misses this attribute (torch computes it on access) and so deletes it on undo, which raises."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@contextlib.contextmanager
def cpu_fp32_precision(op: str, precision: str):
    """oneDNN's CPU fp32 precision for `op` ("matmul" or "conv") in the block: "highest" (exact) or
    "medium" (bf16), restored after it. torch >= 2.9: torch.backends.mkldnn.<op>.fp32_precision
    (set through set_float32_matmul_precision, the legacy API would leave "ieee" for "none"
    behind); older torch: set_float32_matmul_precision."""
    settings = getattr(torch.backends.mkldnn, op, None)
    if settings is not None and hasattr(settings, "fp32_precision"):
        old = settings.fp32_precision
        settings.fp32_precision = {"highest": "ieee", "medium": "bf16"}[precision]
        try:
            yield
        finally:
            settings.fp32_precision = old
        return
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def package_subprocess_env(drop=(), **overrides) -> dict:
    """os.environ for a child Python process that must import the convnext_kernels under test
    (installed or the checkout) before any other copy: its root goes first on PYTHONPATH. `drop`
    names variables to leave out; `overrides` sets others."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(convnext_kernels.__file__)))
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(overrides)
    return env


def run_commands(commands, jobs: int = 2, timeout: int = 600) -> list:
    """subprocess.run of each command (output captured as text), `jobs` at a time (CI has two
    cores): the CompletedProcess of each, in the commands' order. For the tests that compile."""
    with concurrent.futures.ThreadPoolExecutor(max(jobs, 1)) as pool:
        return list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True, timeout=timeout),
                             commands))


def skip_triton_bf16_if_unsupported(backend: str, dtype: torch.dtype) -> None:
    """Skip a bf16 Triton test where the interpreter could not be taught bf16 (never on a GPU)."""
    if backend == "triton" and dtype == torch.bfloat16 and TRITON_INTERPRETER_BF16_MISSING:
        pytest.skip(f"bf16 under Triton's interpreter: {TRITON_INTERPRETER_BF16_MISSING}")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_pass_rule(name: str, fused: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor,
                     dtype: torch.dtype) -> None:
    """fp32: max|fused - ref64| <= 1e-5 * max|ref64|; else <= 2 * max|eager - ref64| + atol."""
    assert fused.shape == ref64.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(fused).all(), f"{name}: non-finite values (an element left unwritten?)"
    err = max_err(fused, ref64)
    scale = ref64.abs().max().item()
    if dtype == torch.float32:
        bound = 1e-5 * max(scale, 1e-3)
    else:
        bound = 2 * max_err(eager, ref64) + ATOL[dtype] * max(scale, 1.0)
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (max|ref| {scale:.3e})"
