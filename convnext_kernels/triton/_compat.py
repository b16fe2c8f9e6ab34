"""The two Triton entry points the kernels go through, made to behave alike on every supported
torch (>= 2.6) and triton (>= 3.3)."""
import triton
from torch.library import wrap_triton as _torch_wrap_triton

from ..backends import triton_interpreted


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``, or the kernel itself under TRITON_INTERPRET=1.

    The interpreter makes ``triton.jit`` return an InterpretedFunction, launched eagerly as it
    is: recent torch returns it unwrapped, torch 2.6 rejects it (RuntimeError)."""
    if triton_interpreted():
        return kernel
    return _torch_wrap_triton(kernel)


def autotune(configs, key):
    """``triton.autotune`` that asks the GPU driver for its benchmarker only when a config is
    timed. triton 3.3 asks when the autotuner is built, i.e. when our modules are imported, which
    fails on a machine without a GPU (the interpreter has no driver); triton >= 3.4 asks lazily."""
    return triton.autotune(configs=configs, key=key, do_bench=_driver_benchmark)


def _driver_benchmark(kernel_call, quantiles):
    return triton.runtime.driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)
