"""Each fused op, each backend, against the fp64 reference: outputs and every gradient.

CPU runs cover "torch", "cpu", "triton" (through Triton's interpreter) and "cuda" (the CUDA
kernels in the host emulator, CONVNEXT_KERNELS_CUDA_EMULATE=1 from conftest); GPU runs (marked
`cuda`) cover "torch", "triton" and "cuda" at the ConvNeXt-T stage shapes.
"""

import platform

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import convnext_kernels as ck
import convnext_kernels.launchers as launchers
from convnext_kernels.reference import dwconv_layernorm_ref, mlp_layerscale_ref

from conftest import (DTYPES, TRITON_CPU_MISSING, TRITON_UNUSABLE, assert_pass_rule, cpu_backend_params,
                      package_subprocess_env, skip_triton_bf16_if_unsupported)

CPU_BACKENDS = cpu_backend_params(("torch", "cpu", "triton", "cuda"))
# Backends with a stored-pre-activation backward (cuda only recomputes it).
STORE_PREACT_BACKENDS = ("torch", "cpu", "triton")
GPU_BACKENDS = ("torch", "triton", "cuda")
ODD_SHAPES = [(3, 13, 17, 40), (1, 1, 1, 96), (2, 5, 7, 96)]
STAGE_SHAPES_B32 = [(32, 56, 56, 96), (32, 28, 28, 192), (32, 14, 14, 384), (32, 7, 7, 768)]


def _leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]


def _grads(out, leaves, dy):
    live = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, live, dy.to(out.dtype)))
    return [None if t is None else next(grads) for t in leaves]


def _compare(name, fused_fn, ref_fn, inputs, dy, dtype):
    """Run fused (dtype), eager (dtype) and reference (fp64); check outputs and all gradients."""
    fused_in, eager_in, ref_in = _leaves(inputs, dtype), _leaves(inputs, dtype), _leaves(inputs, torch.float64)
    fused = fused_fn(*fused_in)
    eager = ref_fn(*eager_in, upcast=False)
    ref = ref_fn(*ref_in, upcast=True)
    assert fused.dtype == dtype
    assert_pass_rule(f"{name} output", fused, ref, eager, dtype)
    for i, (gf, ge, gr) in enumerate(zip(_grads(fused, fused_in, dy), _grads(eager, eager_in, dy),
                                         _grads(ref, ref_in, dy))):
        if gr is None:
            continue
        assert gf is not None and gf.dtype == dtype, f"{name}: gradient {i} missing or wrong dtype"
        assert_pass_rule(f"{name} grad[{i}]", gf, gr, ge, dtype)


def _dwconv_layernorm_inputs(shape, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, H, W, C = shape

    def rand(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale + shift).to(device)

    inputs = [rand(N, H, W, C), rand(C, 1, 7, 7, scale=0.2), rand(C, scale=0.5) if bias else None,
              rand(C, scale=0.5, shift=1.0), rand(C, scale=0.5)]
    return inputs, rand(N, H, W, C)


def _mlp_layerscale_inputs(shape, device, gamma=True, drop=True, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    N, H, W, C = shape

    def rand(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device)

    drop_scale = None
    if drop:
        drop_scale = torch.tensor([(0.0 if n % 3 == 1 else 1.25) for n in range(N)], dtype=torch.float64,
                                  device=device)
    inputs = [rand(N, H, W, C), rand(N, H, W, C), rand(4 * C, C, scale=C ** -0.5), rand(4 * C, scale=0.5),
              rand(C, 4 * C, scale=(4 * C) ** -0.5), rand(C, scale=0.5),
              rand(C, scale=0.5) if gamma else None, drop_scale]
    if not bias:  # Linear(bias=False) layers
        inputs[3] = inputs[5] = None
    return inputs, rand(N, H, W, C)


def _run_dwconv_layernorm(backend, device, shape, dtype, bias=True):
    skip_triton_bf16_if_unsupported(backend, dtype)
    inputs, dy = _dwconv_layernorm_inputs(shape, device, bias)

    def fused(x, w, b, nw, nb):
        return ck.dwconv_layernorm(x, w, b, nw, nb, 1e-6, backend=backend)

    def ref(x, w, b, nw, nb, upcast):
        return dwconv_layernorm_ref(x, w, b, nw, nb, 1e-6, upcast=upcast)

    _compare(f"dwconv_layernorm[{backend},{shape},{dtype}]", fused, ref, inputs, dy, dtype)


def _run_mlp_layerscale(backend, device, shape, dtype, gamma=True, drop=True, bias=True):
    skip_triton_bf16_if_unsupported(backend, dtype)
    inputs, dy = _mlp_layerscale_inputs(shape, device, gamma, drop, bias=bias)
    drop_scale = inputs.pop()

    def fused(x, s, w1, b1, w2, b2, gm):
        return ck.mlp_layerscale(x, s, w1, b1, w2, b2, gm, None if drop_scale is None else drop_scale.float(),
                                 backend=backend)

    def ref(x, s, w1, b1, w2, b2, gm, upcast):
        return mlp_layerscale_ref(x, s, w1, b1, w2, b2, gm, drop_scale, upcast=upcast)

    _compare(f"mlp_layerscale[{backend},{shape},{dtype}]", fused, ref, inputs, dy, dtype)


# ----------------------------------------------------------------------------------------------
# CPU
# ----------------------------------------------------------------------------------------------
def test_expected_backends_are_available_here():
    # A backend that silently went missing would make every test below skip it.
    assert ck.available_backends("cpu")[:2] == ["cpu", "torch"]
    # conftest turns the interpreter on only where there is no GPU; torch 2.6's triton 3.2 is refused.
    if not torch.cuda.is_available() and "older than" not in TRITON_UNUSABLE:
        assert "triton" in ck.available_backends("cpu"), f"TRITON_INTERPRET=1 with triton installed: {TRITON_CPU_MISSING}"
    assert "cuda" in ck.available_backends("cpu"), "CONVNEXT_KERNELS_CUDA_EMULATE=1 with the emulator built"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_dwconv_layernorm_cpu(backend, dtype, shape):
    _run_dwconv_layernorm(backend, "cpu", shape, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dwconv_layernorm_no_bias_cpu(backend):
    _run_dwconv_layernorm(backend, "cpu", (2, 6, 5, 40), torch.float32, bias=False)


@pytest.mark.parametrize("backend", ("torch", "cpu"))
def test_dwconv_layernorm_wide_channels_cpu(backend):
    _run_dwconv_layernorm(backend, "cpu", (1, 3, 4, 768), torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_mlp_layerscale_cpu(backend, dtype, shape):
    _run_mlp_layerscale(backend, "cpu", shape, dtype)


@pytest.mark.parametrize("backend", cpu_backend_params(STORE_PREACT_BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("store", (True, False), ids=("store_preact", "recompute"))
def test_mlp_layerscale_both_backward_forms_cpu(backend, dtype, store, monkeypatch):
    # Each backend through the op with the pre-activation stored for backward and recomputed,
    # whatever its entry in the table says.
    monkeypatch.setitem(ck.backends.MLP_LAYERSCALE_STORE_PREACT_MIN_C, backend, {dtype: 1} if store else {})
    _run_mlp_layerscale(backend, "cpu", (2, 5, 7, 96), dtype)


@pytest.mark.parametrize("backend", ("torch", "cpu"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("store", (True, False), ids=("store_preact", "recompute"))
def test_mlp_layerscale_row_chunks_cpu(backend, dtype, store, monkeypatch):
    # On the CPU the rows go through the MLP in chunks (2048 rows; the shapes above fit in one):
    # 64-row chunks give 10 whole ones and a partial one of 23 rows, with the weight gradients
    # accumulated across them and the stored pre-activation read back chunk by chunk.
    from convnext_kernels.launchers import torch_ops

    monkeypatch.setattr(torch_ops, "CPU_ROWS_PER_CHUNK", 64)
    monkeypatch.setitem(ck.backends.MLP_LAYERSCALE_STORE_PREACT_MIN_C, backend, {dtype: 1} if store else {})
    _run_mlp_layerscale(backend, "cpu", (3, 13, 17, 40), dtype)


def test_cpu_onednn_gemms_only_on_x86(monkeypatch):
    # Elsewhere (Arm) oneDNN's fp32 GEMMs were never compared with torch's: torch's are kept.
    import platform

    from convnext_kernels.launchers import cpu

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert cpu._find_onednn_linear() is None
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert (cpu._find_onednn_linear() is None) == (not torch.backends.mkldnn.is_available())


def test_cpu_gemm_library_follows_the_cpu_vendor_unless_told(monkeypatch):
    # Unset, CONVNEXT_KERNELS_CPU_ONEDNN leaves the choice to the CPU's maker: the package's GEMM
    # routes (oneDNN fp32, gemm_tn_bf16_cpu) on AMD CPUs, torch's matmuls (MKL) elsewhere; 1 and 0
    # choose. The fp16 GEMMs' fp32 route (CPUs without fp16 GEMMs) is off under 0 only.
    from convnext_kernels.launchers import cpu

    vendor = cpu._C.build_info()["cpu_vendor"]
    assert vendor in (("amd", "intel", "other") if platform.machine().lower() in ("x86_64", "amd64") else ("",))
    assert cpu.PACKAGE_GEMMS_BY_DEFAULT == (vendor == "amd")
    name = "CONVNEXT_KERNELS_CPU_ONEDNN"
    for default in (True, False):
        monkeypatch.setattr(cpu, "PACKAGE_GEMMS_BY_DEFAULT", default)
        for setting, package, fp16_route in ((None, default, True), ("1", True, True), ("0", False, False)):
            if setting is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, setting)
            assert cpu._package_gemms() == package and cpu._torch_gemms_not_forced() == fp16_route
            assert cpu._onednn_gemms() == (package and cpu.ONEDNN_LINEAR is not None)
            assert cpu._bf16_dot_gemms(torch.bfloat16) == (package and cpu.BF16_DOT_GEMMS)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("onednn", ("1", "0"), ids=("onednn", "torch_gemm"))
@pytest.mark.parametrize("store", (True, False), ids=("store_preact", "recompute"))
def test_mlp_layerscale_cpu_gemm_library_switch(onednn, store, dtype, monkeypatch):
    # The cpu backend's fp32 GEMMs run on oneDNN with CONVNEXT_KERNELS_CPU_ONEDNN=1 (where torch
    # has it; the default on AMD CPUs), on torch's own matmuls with =0; both pass the same
    # checks, over 64-row chunks and a last one of 23 rows, where the first layer's weight
    # gradient (da.T @ x) takes both of its routes:
    # x transposed, the product transposed back (64 rows), and da transposed (23 rows). With
    # bf16 activations only the (fp32) weight-gradient GEMMs are oneDNN's, x converted to fp32
    # in its transposed copy: on CPUs without AVX512-BF16 (BF16_DOT_GEMMS off here; see
    # test_mlp_layerscale_cpu_bf16_weight_gradients_from_bf16_products for the others).
    from convnext_kernels.launchers import cpu, torch_ops

    if cpu.ONEDNN_LINEAR is None:
        pytest.skip("no oneDNN GEMMs here (no oneDNN in this torch, or not an x86-64 CPU)")
    calls = []

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    real = cpu.ONEDNN_LINEAR
    monkeypatch.setattr(cpu, "ONEDNN_LINEAR", counting)
    monkeypatch.setattr(cpu, "BF16_DOT_GEMMS", False)
    monkeypatch.setenv("CONVNEXT_KERNELS_CPU_ONEDNN", onednn)
    monkeypatch.setattr(torch_ops, "CPU_ROWS_PER_CHUNK", 64)
    monkeypatch.setitem(ck.backends.MLP_LAYERSCALE_STORE_PREACT_MIN_C, "cpu", {dtype: 1} if store else {})
    _run_mlp_layerscale("cpu", "cpu", (3, 13, 17, 40), dtype)
    if onednn == "1":
        assert (160, 23) in calls and calls.count((40, 64)) >= 20
        assert ((64, 40) in calls) == (dtype == torch.float32)  # fc1 (the 16-bit GEMMs are torch's)
    else:
        assert not calls


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("onednn", ("1", "0"), ids=("package_gemms", "torch_gemm"))
@pytest.mark.parametrize("store", (True, False), ids=("store_preact", "recompute"))
def test_mlp_layerscale_cpu_bf16_weight_gradients_from_bf16_products(store, onednn, dtype, monkeypatch):
    # On CPUs with AVX512-BF16, bf16 activations' weight gradients come from gemm_tn_bf16_cpu (two
    # per chunk of rows, here 64-row chunks and a last one of 23), which takes da and the hidden
    # in bf16 as the backward epilogue writes them; never for other dtypes, nor under
    # CONVNEXT_KERNELS_CPU_ONEDNN=0. Both routes pass the same checks.
    from convnext_kernels.launchers import cpu, torch_ops

    if not cpu.BF16_DOT_GEMMS:
        pytest.skip("this CPU has no AVX512-BF16")
    calls = []

    def counting(a, lda, a_dtype, b, ldb, b_dtype, c, ldc, rows, p, q, *rest):
        calls.append((rows, p, q, a_dtype, b_dtype))
        return real(a, lda, a_dtype, b, ldb, b_dtype, c, ldc, rows, p, q, *rest)

    real = cpu._C.gemm_tn_bf16_cpu
    monkeypatch.setattr(cpu._C, "gemm_tn_bf16_cpu", counting)
    monkeypatch.setenv("CONVNEXT_KERNELS_CPU_ONEDNN", onednn)
    monkeypatch.setattr(torch_ops, "CPU_ROWS_PER_CHUNK", 64)
    monkeypatch.setitem(ck.backends.MLP_LAYERSCALE_STORE_PREACT_MIN_C, "cpu", {dtype: 1} if store else {})
    _run_mlp_layerscale("cpu", "cpu", (3, 13, 17, 40), dtype)
    if dtype != torch.bfloat16 or onednn == "0":
        assert not calls
        return
    fp32, bf16 = cpu._C.DTYPE_FLOAT32, cpu._C.DTYPE_BFLOAT16
    # G = dys.T @ hidden (dys in fp32: dy times the drop-path scale), dW1 = da.T @ x.
    assert calls.count((64, 40, 160, fp32, bf16)) == calls.count((64, 160, 40, bf16, bf16)) == 10
    assert (23, 40, 160, fp32, bf16) in calls and (23, 160, 40, bf16, bf16) in calls


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("gamma,drop", [(False, False), (True, False), (False, True)])
def test_mlp_layerscale_optional_args_cpu(backend, gamma, drop):
    _run_mlp_layerscale(backend, "cpu", (2, 3, 5, 40), torch.float32, gamma, drop)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mlp_layerscale_no_bias_cpu(backend):
    _run_mlp_layerscale(backend, "cpu", (2, 3, 5, 40), torch.float32, bias=False)


def test_drop_scale_zero_drops_the_branch():
    inputs, _ = _mlp_layerscale_inputs((2, 3, 3, 40), "cpu")
    x, s, w1, b1, w2, b2, gm, _ = [t.float() for t in inputs[:7]] + [None]
    y = ck.mlp_layerscale(x, s, w1, b1, w2, b2, gm, torch.tensor([0.0, 2.0]), backend="torch")
    assert torch.equal(y[0], s[0])
    assert not torch.allclose(y[1], s[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_outputs_are_deterministic(backend):
    inputs, dy = _dwconv_layernorm_inputs((2, 9, 11, 40), "cpu")
    leaves = _leaves(inputs, torch.float32)
    first = None
    for _ in range(2):
        y = ck.dwconv_layernorm(*leaves, backend=backend)
        got = [y] + list(torch.autograd.grad(y, leaves, dy.float()))
        if first is not None:
            for a, b in zip(first, got):
                assert torch.equal(a, b)
        first = got


@pytest.mark.parametrize("backend", ("torch", "cpu"))
@pytest.mark.parametrize("op_name", ["dwconv_layernorm", "mlp_layerscale"])
def test_autocast_stops_at_the_ops(backend, op_name):
    """Under autocast an op runs in the autocast dtype (bf16 out) and computes as for that
    dtype: bit for bit what it gives for bf16 activations outside autocast, with backward inside
    or outside the region. Autocast must not reach into the op bodies, where it would recast the
    launchers' fp32 math (the torch backend's conv ran in bf16; a backward inside the region
    crashed on bf16 weight gradients)."""
    args = _op_args(op_name, (2, 3, 5, 40))
    fn = getattr(ck, op_name)
    dy = torch.randn(2, 3, 5, 40, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    def run(autocast, backward_inside):
        leaves = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                  for a in args]
        x = leaves[0] if autocast else leaves[0].to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(x, *leaves[1:], backend=backend)
            if backward_inside:
                y.backward(dy)
        if not backward_inside:
            y.backward(dy)
        return [y] + [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]

    expected = run(autocast=False, backward_inside=False)
    assert expected[0].dtype == torch.bfloat16
    assert all(g is not None and g.dtype == torch.float32 for g in expected[1:])
    for inside in (False, True):
        got = run(autocast=True, backward_inside=inside)
        for i, (a, b) in enumerate(zip(got, expected)):
            assert a.dtype == b.dtype and torch.equal(a, b), (inside, i)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op_name", ["dwconv_layernorm", "mlp_layerscale"])
def test_outputs_and_gradients_are_not_views(backend, op_name):
    """Each op returns tensors of its own, not views of a buffer it hides: FSDP2 warns about a
    wrapped module whose output is a view (one warning per block or stage), since an in-place op
    on it would bypass its hooks. The torch and cpu backends' MLP returned y.view(x.shape)."""
    args = _op_args(op_name, (2, 3, 5, 40))
    y = getattr(ck, op_name)(*args, backend=backend)
    assert not y._is_view()
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(y, leaves, dy)
    assert [i for i, g in enumerate(grads) if g._is_view()] == []


def _ops_outputs_and_grads(backend, device, shape=(2, 5, 6, 40)):
    """Both ops' outputs and all their gradients (forward and backward) on `device`."""
    got = []
    for op_name in ("dwconv_layernorm", "mlp_layerscale"):
        args = [a.detach().to(device).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                for a in _op_args(op_name, shape)]
        y = getattr(ck, op_name)(*args, backend=backend)
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(device)
        got += [y, *torch.autograd.grad(y, leaves, dy)]
    return got


@pytest.mark.parametrize("backend", cpu_backend_params(("triton", "cuda")))
def test_gpu_launchers_enter_their_tensors_device_guard(backend, monkeypatch):
    """Triton and the compiled kernels launch on torch's current CUDA device and its stream, so
    each GPU launcher (both ops, forward and backward) first makes its tensors' device current
    (launchers.device_guard; the Triton ones had no guard). Here on CPU tensors, whose guard is a
    null context; with two GPUs, test_ops_on_a_gpu_that_is_not_current runs the kernels so."""
    entered = []
    guard = launchers.device_guard
    monkeypatch.setattr(launchers, "device_guard", lambda device: entered.append(device) or guard(device))
    _ops_outputs_and_grads(backend, "cpu")
    assert entered == [torch.device("cpu")] * 4
    second_gpu = guard(torch.device("cuda", 1))  # built without touching CUDA
    assert isinstance(second_gpu, torch.cuda.device) and second_gpu.idx == 1


OP_NAMES = ("dwconv_layernorm", "mlp_layerscale")


class _DispatchedOps(TorchDispatchMode):
    """Records the names of the package's ops that reach torch's dispatcher."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, name = func.name().split("::")
        if namespace == "convnext_kernels":
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def _spy_on_eager_calls(backend, monkeypatch):
    """The names of the op implementations that plain eager calls run (past the dispatcher)."""
    calls = []
    for op_name, table in zip(OP_NAMES, (ck.ops.DWCONV_LAYERNORM_OPS, ck.ops.MLP_LAYERSCALE_OPS)):
        for op, direction in zip(table[backend], ("fwd", "bwd")):
            impl, function = ck.ops._EAGER_IMPLS[op]

            def spy(*args, _impl=impl, _name=f"{op_name}_{direction}"):
                calls.append(_name)
                return _impl(*args)
            monkeypatch.setitem(ck.ops._EAGER_IMPLS, op, (spy, function))
    return calls


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eager_calls_skip_the_dispatcher_and_compute_what_it_computes(backend, monkeypatch):
    """Plain eager calls run each op's implementation directly (without autograd) or through an
    autograd.Function of their own, not through torch's dispatcher, whose ~17-40 us of host time a
    call would set the pace at small batches on a GPU. They give, bit for bit, what the ops give
    through the dispatcher (taken here under a dispatch mode), outputs and every gradient."""
    with _DispatchedOps() as seen:
        dispatched = _ops_outputs_and_grads(backend, "cpu")
    assert seen.ops == [f"{op_name}_{d}_{backend}" for op_name in OP_NAMES for d in ("fwd", "bwd")]

    calls = _spy_on_eager_calls(backend, monkeypatch)
    eager = _ops_outputs_and_grads(backend, "cpu")
    # With autograd: the forwards through the autograd.Functions (no spy), the backwards directly.
    assert calls == ["dwconv_layernorm_bwd", "mlp_layerscale_bwd"]
    assert [type(y.grad_fn).__name__ for y in (eager[0], eager[6])] == [
        f"{op_name}_fwd_{backend}_eagerBackward" for op_name in OP_NAMES]
    assert len(eager) == len(dispatched) == 6 + 8
    for i, (a, b) in enumerate(zip(eager, dispatched)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"output/gradient {i}: {m}")
    calls.clear()
    with torch.no_grad():
        for op_name in OP_NAMES:
            getattr(ck, op_name)(*_op_args(op_name, (2, 5, 6, 40)), backend=backend)
    assert calls == ["dwconv_layernorm_fwd", "mlp_layerscale_fwd"]


@pytest.mark.parametrize("backend", cpu_backend_params(("triton",)))
def test_eager_calls_launch_triton_kernels_as_the_dispatcher_does(backend, monkeypatch):
    """The direct path runs the Triton launchers with torch's wrap_triton off, as triton_op does
    around them: left on (its default), every eager launch on a GPU went through torch's tracing
    path, a higher-order op plus a kernel side-table entry never freed. (Under the interpreter
    the package's wrap_triton bypasses torch's, so the flag is what can be checked here.)"""
    from torch._library.triton import is_wrap_triton_enabled

    import convnext_kernels.triton.dwconv_layernorm as dwconv_module
    import convnext_kernels.triton.mlp_layerscale as mlp_module
    seen = []
    for module in (dwconv_module, mlp_module):
        wrap = module.wrap_triton
        monkeypatch.setattr(module, "wrap_triton", lambda kernel, wrap=wrap: seen.append(is_wrap_triton_enabled())
                            or wrap(kernel))
    _ops_outputs_and_grads(backend, "cpu")
    assert len(seen) >= 4 and not any(seen), seen


@pytest.mark.cuda
def test_eager_triton_launches_leave_no_side_table_entries():
    """Eager calls of the Triton ops on a GPU add nothing to torch's Triton kernel side table
    (each launch through torch's tracing path added an entry, never freed)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    _ops_outputs_and_grads("triton", "cuda")
    before = len(kernel_side_table.constant_args)
    for _ in range(3):
        _ops_outputs_and_grads("triton", "cuda")
    assert len(kernel_side_table.constant_args) == before


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_eager_calls_skip_the_dispatcher_gpu(backend):
    """CUDA tensors take the direct path too (their dispatch keys are among the plain ones the
    path checks for; were one missing, every GPU call would silently keep the dispatcher), with
    the bits the dispatched ops give."""
    with _DispatchedOps() as seen:
        dispatched = _ops_outputs_and_grads(backend, "cuda")
    assert len(seen.ops) == 4
    eager = _ops_outputs_and_grads(backend, "cuda")
    assert [type(y.grad_fn).__name__ for y in (eager[0], eager[6])] == [
        f"{op_name}_fwd_{backend}_eagerBackward" for op_name in OP_NAMES]
    for i, (a, b) in enumerate(zip(eager, dispatched)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"output/gradient {i}: {m}")


def test_eager_calls_in_inference_mode_record_no_graph():
    """Inference mode records no autograd graph, with grad mode on too (enable_grad inside it); the
    direct path's autograd.Function would have tried to save inference tensors for backward."""
    args = _op_args("mlp_layerscale", (2, 3, 4, 40))
    want = ck.mlp_layerscale(*args, backend="cpu").detach()
    with torch.inference_mode(), torch.enable_grad():
        got = ck.mlp_layerscale(*args, backend="cpu")
    assert not got.requires_grad and got.grad_fn is None
    torch.testing.assert_close(got, want, rtol=0, atol=0)


class _PlainSubclass(torch.Tensor):
    pass


@pytest.mark.parametrize("context", ["profiler", "jit_trace", "torch_device", "subclass", "fake_tensors",
                                     "batched_grads", "negative_view"])
def test_eager_calls_keep_the_dispatcher_where_it_is_needed(context, monkeypatch):
    """What must see the ops themselves still does: the profiler names them, torch.jit.trace
    records them, torch-function modes (`with torch.device(...)`) and dispatch modes see them,
    tensor subclasses and fake tensors reach their own handling (a fake tensor has no memory for a
    kernel to read), and so do tensors that are more than memory: the batched gradients of
    torch's older vmap (autograd.grad(is_grads_batched=True), jacobian(vectorize=True)) have no
    storage, a negative-bit view holds its values negated (both reached the kernels as they were)."""
    calls = _spy_on_eager_calls("cpu", monkeypatch)
    # Nothing requires grad: a plain eager call would run the spied implementation directly.
    x, *params = (a.detach() if isinstance(a, torch.Tensor) else a for a in _op_args("dwconv_layernorm", (2, 5, 6, 40)))

    def fn(x):
        return ck.dwconv_layernorm(x, *params, backend="cpu")
    want = fn(x)
    assert calls == ["dwconv_layernorm_fwd"]
    calls.clear()
    if context == "profiler":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = fn(x)
        assert "convnext_kernels::dwconv_layernorm_fwd_cpu" in {e.name for e in prof.events()}
    elif context == "jit_trace":
        traced = torch.jit.trace(fn, x, check_trace=False)
        assert "convnext_kernels::dwconv_layernorm_fwd_cpu" in str(traced.graph)
        got = traced(x)
    elif context == "torch_device":
        with torch.device("cpu"):
            got = fn(x)
    elif context == "subclass":
        got = fn(x.as_subclass(_PlainSubclass))
        assert type(got) is _PlainSubclass
    elif context == "negative_view":
        got = fn(torch._neg_view(-x))  # x's values, stored negated
    elif context == "batched_grads":  # the backward op gets the batched gradients
        xg = x.clone().requires_grad_()
        y = fn(xg)
        dys = torch.randn((2, *y.shape), generator=torch.Generator().manual_seed(3))
        batched = torch.autograd.grad(y, xg, dys, is_grads_batched=True, retain_graph=True)[0]
        assert calls == []
        looped = torch.stack([torch.autograd.grad(y, xg, dy, retain_graph=True)[0] for dy in dys])
        torch.testing.assert_close(batched, looped, rtol=0, atol=0)
        calls.clear()
        got = y
    else:
        with FakeTensorMode() as mode:
            fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in (x, *params)]
            got = ck.dwconv_layernorm(*fakes, backend="cpu")
        assert isinstance(got, FakeTensor) and got.shape == want.shape and got.dtype == want.dtype
        got = want
    assert calls == []
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op_name", ["dwconv_layernorm", "mlp_layerscale"])
def test_torch_func_transforms(backend, op_name, recwarn):
    """torch.func.grad gives what autograd gives (torch.library's own autograd registration raises
    under it: pytorch/pytorch#168393); vmap of the op and per-sample gradients (vmap of grad) give
    what a loop over the samples gives (nothing for no samples), without torch's warning about a
    missing batching rule; a second derivative through torch.func raises instead of coming out
    zero, and so does forward-mode AD instead of giving no tangent."""
    fn = getattr(ck, op_name)
    args = _op_args(op_name, (3, 5, 6, 40))
    x, params = args[0].detach(), [a.detach() if isinstance(a, torch.Tensor) else a for a in args[1:]]
    n_leaves = sum(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))

    def loss(x, *params, dy=dy):
        return (fn(x, *params, backend=backend) * dy).sum()

    got = torch.func.grad(loss, argnums=tuple(range(n_leaves)))(x, *params)
    expected = torch.autograd.grad(loss(*args), [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad])
    assert len(got) == len(expected) == n_leaves
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item(), msg=lambda m: f"grad {i}: {m}")

    # The arguments with a batch dim: x (and shortcut and drop_scale for the MLP).
    batched = (0, 1, 7) if op_name == "mlp_layerscale" else (0,)
    full = [x] + params

    # vmap over a new leading dim of the batched arguments: one call of the op per slice.
    stacked = [torch.stack([a, 2.0 * a]) if i in batched else a for i, a in enumerate(full)]
    in_dims = tuple(0 if i in batched else None for i in range(len(full)))
    ys = torch.func.vmap(lambda *a: fn(*a, backend=backend), in_dims=in_dims)(*stacked)
    for k in range(2):
        want = fn(*(a[k] if i in batched else a for i, a in enumerate(stacked)), backend=backend)
        torch.testing.assert_close(ys[k], want, rtol=0, atol=0)
    # ... and over an empty one: empty outputs.
    empty = torch.func.vmap(lambda *a: fn(*a, backend=backend), in_dims=in_dims)(
        *(a[:0] if i in batched else a for i, a in enumerate(stacked)))
    assert empty.shape == (0, *ys.shape[1:]) and empty.dtype == ys.dtype

    # Per-sample gradients of the conv weight (fc1's weight for the MLP).
    p = 2 if op_name == "mlp_layerscale" else 1

    def sample_loss(dy_n, *a):
        return loss(*(t[None] if i in batched else t for i, t in enumerate(a)), dy=dy_n[None])

    per_sample = torch.func.vmap(torch.func.grad(sample_loss, argnums=1 + p), in_dims=(0,) + in_dims)(dy, *full)
    for n in range(x.shape[0]):
        leaf = full[p].clone().requires_grad_()
        a = [leaf if i == p else t[n:n + 1] if i in batched else t for i, t in enumerate(full)]
        (want,) = torch.autograd.grad(loss(*a, dy=dy[n:n + 1]), leaf)
        torch.testing.assert_close(per_sample[n], want, rtol=1e-5, atol=1e-5 * want.abs().max().item(),
                                   msg=lambda m: f"sample {n}: {m}")
    no_samples = torch.func.vmap(torch.func.grad(sample_loss, argnums=1 + p), in_dims=(0,) + in_dims)(
        dy[:0], *(a[:0] if i in batched else a for i, a in enumerate(full)))
    assert no_samples.shape == (0, *full[p].shape)
    assert [str(w.message) for w in recwarn if "batching rule" in str(w.message)] == []

    with pytest.raises(RuntimeError, match="double backward"):
        torch.func.grad(lambda x: torch.func.grad(loss)(x, *params).square().sum())(x)
    # Forward-mode AD raises: torch.library's registration would drop the tangent, silently.
    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(lambda x: fn(x, *params, backend=backend), (x,), (dy,))
    with torch.autograd.forward_ad.dual_level(), pytest.raises(NotImplementedError, match="forward-mode"):
        fn(torch.autograd.forward_ad.make_dual(x, dy), *params, backend=backend)


class _UserBlock(torch.nn.Module):
    """User code calling the public ops, with no torch.fx.wrap of its own."""

    def __init__(self, C):
        super().__init__()
        self.conv = torch.nn.Conv2d(C, C, 7, padding=3, groups=C)
        self.norm = torch.nn.LayerNorm(C)
        self.fc1, self.fc2 = torch.nn.Linear(C, 4 * C), torch.nn.Linear(4 * C, C)
        self.gamma = torch.nn.Parameter(torch.full((C,), 0.5))

    def forward(self, x):
        y = ck.dwconv_layernorm(x, self.conv.weight, self.conv.bias, self.norm.weight, self.norm.bias, backend="cpu")
        return ck.mlp_layerscale(y, x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.gamma,
                                 backend="cpu")


def test_ops_trace_with_torch_fx():
    """Under torch.fx symbolic tracing each op records itself as one call (its checks would
    refuse a Proxy with a TypeError), and the traced module computes what the module does."""
    block = _UserBlock(40)
    traced = torch.fx.symbolic_trace(block)
    assert [n.target for n in traced.graph.nodes if n.op == "call_function"] == [ck.dwconv_layernorm,
                                                                                    ck.mlp_layerscale]
    x = torch.randn(2, 5, 6, 40, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(traced(x), block(x), rtol=0, atol=0)


def test_non_contiguous_input_is_copied():
    inputs, _ = _dwconv_layernorm_inputs((2, 5, 6, 40), "cpu")
    x, w, b, nw, nb = [t.float() for t in inputs]
    x_strided = x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert not x_strided.is_contiguous()
    torch.testing.assert_close(ck.dwconv_layernorm(x_strided, w, b, nw, nb, backend="cpu"),
                               ck.dwconv_layernorm(x, w, b, nw, nb, backend="cpu"), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ----------------------------------------------------------------------------------------------
def _op_args(op_name, shape, dtype=torch.float32):
    if op_name == "dwconv_layernorm":
        inputs, _ = _dwconv_layernorm_inputs(shape, "cpu")
        x, w, b, nw, nb = inputs
        return (x.to(dtype).requires_grad_(), w.float().requires_grad_(), b.float().requires_grad_(),
                nw.float().requires_grad_(), nb.float().requires_grad_(), 1e-6)
    inputs, _ = _mlp_layerscale_inputs(shape, "cpu")
    x, s, w1, b1, w2, b2, gm, ds = inputs
    return (x.to(dtype).requires_grad_(), s.to(dtype).requires_grad_(), w1.to(dtype).requires_grad_(),
            b1.float().requires_grad_(), w2.to(dtype).requires_grad_(), b2.float().requires_grad_(),
            gm.float().requires_grad_(), ds.float())


# The mlp_layerscale forward op's last argument: store the pre-activation for backward (the
# op returns it) or return an empty tensor and recompute it there.
OPCHECK_CASES = [("dwconv_layernorm", ()), ("mlp_layerscale", (False,)), ("mlp_layerscale", (True,))]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op_name, extra", OPCHECK_CASES, ids=["dwconv_layernorm", "mlp", "mlp_store_preact"])
def test_opcheck(backend, op_name, extra):
    if extra == (True,) and backend not in STORE_PREACT_BACKENDS:
        pytest.skip(f"backend {backend!r} has no stored-pre-activation variant")
    table = ck.ops.DWCONV_LAYERNORM_OPS if op_name == "dwconv_layernorm" else ck.ops.MLP_LAYERSCALE_OPS
    fwd_op, _ = table[backend]
    # Under Triton's interpreter wrap_triton hands back the interpreted kernel itself, so the fake
    # and AOT checks would launch it on FakeTensors; those two run in the GPU test below.
    utils = ("test_schema", "test_autograd_registration") if backend == "triton" else None
    kwargs = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(fwd_op, _op_args(op_name, (2, 3, 5, 40)) + extra, **kwargs)


def _channels_strided(t):
    """t's values in another memory order (N, C, H, W), viewed with t's shape: not contiguous."""
    return t.detach().permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1).requires_grad_(t.requires_grad)


@pytest.mark.parametrize("backend", ("torch", "cpu", "cuda"))
@pytest.mark.parametrize("op_name, extra", OPCHECK_CASES, ids=["dwconv_layernorm", "mlp", "mlp_store_preact"])
def test_ops_take_non_contiguous_activations(backend, op_name, extra):
    """The ops themselves (torch.compile may call them with any layout): same outputs and gradients
    as with contiguous tensors, and outputs as contiguous as their fake implementations say."""
    if extra == (True,) and backend not in STORE_PREACT_BACKENDS:
        pytest.skip(f"backend {backend!r} has no stored-pre-activation variant")
    table = ck.ops.DWCONV_LAYERNORM_OPS if op_name == "dwconv_layernorm" else ck.ops.MLP_LAYERSCALE_OPS
    fwd_op, _ = table[backend]
    args = _op_args(op_name, (2, 3, 5, 40)) + extra
    n_act = 1 if op_name == "dwconv_layernorm" else 2  # x (and the shortcut)
    strided = tuple(_channels_strided(a) for a in args[:n_act]) + args[n_act:]
    assert not strided[0].is_contiguous()
    torch.library.opcheck(fwd_op, strided)
    outs, outs_strided = fwd_op(*args), fwd_op(*strided)
    dy = torch.randn_like(outs[0])
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    leaves_strided = [a for a in strided if isinstance(a, torch.Tensor) and a.requires_grad]
    for a, b in zip(outs, outs_strided):
        assert b.is_contiguous()
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(outs[0], leaves, dy), torch.autograd.grad(outs_strided[0], leaves_strided, dy)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ("torch", "cpu"))
@pytest.mark.parametrize("grad", (True, False))
@pytest.mark.parametrize("C", (40, 192))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_mlp_layerscale_stores_preact_where_the_backend_table_says(backend, grad, C, dtype):
    """The forward saves the (rows, 4C) pre-activation only for a backend, dtype and C the table
    names, and only when a backward can follow; otherwise backward recomputes it."""
    N, H, W = 2, 3, 5
    inputs, _ = _mlp_layerscale_inputs((N, H, W, C), "cpu")
    inputs = [t.to(dtype if i < 2 else torch.float32).requires_grad_(grad and i < 7) if t is not None else None
              for i, t in enumerate(inputs)]
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ck.mlp_layerscale(*inputs, backend=backend)
    min_c = ck.backends.MLP_LAYERSCALE_STORE_PREACT_MIN_C.get(backend, {}).get(dtype)
    assert backend != "cpu" or min_c is not None  # the table as shipped: cpu stores in every dtype
    stores = min_c is not None and C >= min_c and grad
    assert ((N * H * W, 4 * C) in saved) == stores, saved


@pytest.mark.parametrize("backend", ("cpu", "torch"))
def test_mlp_layerscale_fp32_weight_gradients_stay_fp32_under_autocast(backend):
    """The Linear weights run in bf16 under autocast, but their fp32 parameters' gradients are the
    fp32 sums, not rounded to bf16 at the op's boundary (autograd casts a gradient to the dtype
    of the op input it belongs to: the weights enter the op in their own dtype)."""
    inputs, dy = _mlp_layerscale_inputs((2, 3, 5, 40), "cpu")
    leaves = [t.float().requires_grad_(i < 7) if t is not None else None for i, t in enumerate(inputs)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ck.mlp_layerscale(*leaves, backend=backend)
    assert y.dtype == torch.bfloat16
    y.backward(dy.to(y.dtype))
    for name, i in (("fc1_weight", 2), ("fc2_weight", 4)):
        grad = leaves[i].grad
        assert grad.dtype == torch.float32
        assert not torch.equal(grad, grad.bfloat16().float()), f"{name}'s gradient was rounded to bf16"
    # A bf16 parameter still gets its gradient in bf16.
    w1 = leaves[2].detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ck.mlp_layerscale(leaves[0].detach(), leaves[1].detach(), w1, *[t.detach() for t in leaves[3:7]],
                              leaves[7], backend=backend)
    y.backward(dy.to(y.dtype))
    assert w1.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mlp_layerscale_cpu_same_with_or_without_a_stored_preact(dtype):
    """The cpu backend stores the pre-activation only when a backward can follow: the forward's
    output must not depend on it, and backward must give the same gradients from the stored
    pre-activation as from a recomputed one."""
    inputs, dy = _mlp_layerscale_inputs((2, 3, 5, 96), "cpu")
    inputs = [t.to(dtype if i < 2 else torch.float32) if t is not None else None for i, t in enumerate(inputs)]
    with torch.no_grad():
        y_no_grad = ck.mlp_layerscale(*inputs, backend="cpu")
    grads = []
    for min_c in (0, None):  # stored, recomputed
        table = dict(ck.backends.MLP_LAYERSCALE_STORE_PREACT_MIN_C["cpu"])
        table.pop(dtype) if min_c is None else table.__setitem__(dtype, min_c)
        leaves = [t.detach().requires_grad_(i < 7) if t is not None else None for i, t in enumerate(inputs)]
        with pytest.MonkeyPatch.context() as m:
            m.setitem(ck.backends.MLP_LAYERSCALE_STORE_PREACT_MIN_C, "cpu", table)
            y = ck.mlp_layerscale(*leaves, backend="cpu")
            assert torch.equal(y, y_no_grad)
            grads.append(torch.autograd.grad(y, [t for t in leaves[:7]], dy.to(dtype)))
    for stored, recomputed in zip(*grads):
        assert torch.equal(stored, recomputed)


@pytest.mark.parametrize("backend", ("torch", "cpu", "cuda"))
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    x, w, b, nw, nb, _ = _op_args("dwconv_layernorm", (2, 5, 6, 40))
    _, s, w1, b1, w2, b2, gm, ds = _op_args("mlp_layerscale", (2, 5, 6, 40))

    def block(x):
        y = ck.dwconv_layernorm(x, w, b, nw, nb, backend=backend)
        return ck.mlp_layerscale(y, x, w1, b1, w2, b2, gm, ds, backend=backend)

    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x)
    expected = block(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(out.square().sum(), (x, w, w1, gm))
    want = torch.autograd.grad(expected.square().sum(), (x, w, w1, gm))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


DYNAMIC_SHAPES = [(2, 5, 6, 40), (3, 7, 9, 40), (4, 13, 17, 40)]  # no size 1: torch specialises those


def _check_compile_dynamic_shapes(backend, device, shapes=DYNAMIC_SHAPES):
    """torch.compile(dynamic=True): one compile serves other batch and image sizes (the fake
    implementations work on symbolic sizes), and the results stay right."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    w, b, nw, nb = (t.detach().to(device).requires_grad_() for t in _op_args("dwconv_layernorm", (2, 5, 6, 40))[1:5])
    w1, b1, w2, b2, gm = (t.detach().to(device).requires_grad_() for t in _op_args("mlp_layerscale", (2, 5, 6, 40))[2:7])

    def block(x):
        y = ck.dwconv_layernorm(x, w, b, nw, nb, backend=backend)
        return ck.mlp_layerscale(y, x, w1, b1, w2, b2, gm, None, backend=backend)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend=counter)
    frames = None
    for shape in shapes:
        x = torch.randn(shape, device=device, requires_grad=True)
        out, expected = compiled(x), block(x)
        frames = counter.frame_count if frames is None else frames
        assert counter.frame_count == frames, f"recompiled for {shape}"
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        got = torch.autograd.grad(out.square().sum(), (x, w, w1))
        want = torch.autograd.grad(expected.square().sum(), (x, w, w1))
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ("torch", "cpu", "cuda"))
def test_torch_compile_dynamic_shapes(backend):
    _check_compile_dynamic_shapes(backend, "cpu")


# ----------------------------------------------------------------------------------------------
# Bad input: a clear exception, never a crash or garbage
# ----------------------------------------------------------------------------------------------
def _good_dwconv_layernorm():
    inputs, _ = _dwconv_layernorm_inputs((2, 5, 6, 40), "cpu")
    return [t.float() for t in inputs]


def _good_mlp_layerscale():
    inputs, _ = _mlp_layerscale_inputs((2, 5, 6, 40), "cpu")
    return [t.float() for t in inputs]


def _replace(args, i, value):
    args = list(args)
    args[i] = value
    return args


BAD_DWCONV_LAYERNORM = [
    ("x rank 3", lambda a: _replace(a, 0, a[0][0]), ValueError, "4-D"),
    ("x NCHW", lambda a: _replace(a, 0, a[0].permute(0, 3, 1, 2)), ValueError, "channels"),
    ("x int", lambda a: _replace(a, 0, a[0].long()), TypeError, "dtype"),
    ("x float64", lambda a: _replace(a, 0, a[0].double()), TypeError, "float32, float16 or bfloat16"),
    ("x not a tensor", lambda a: _replace(a, 0, a[0].tolist()), TypeError, "torch.Tensor"),
    ("x sparse", lambda a: _replace(a, 0, a[0].to_sparse()), TypeError, "layout torch.sparse_coo; expected a dense"),
    ("empty batch", lambda a: _replace(a, 0, a[0][:0]), ValueError, "empty batch"),
    ("zero width", lambda a: _replace(a, 0, a[0][:, :, :0]), ValueError, "H, W and C must be at least 1"),
    ("eps zero", lambda a: a + [0.0], ValueError, "eps must be a positive number"),
    ("eps a tensor", lambda a: a + [torch.tensor(1e-6)], ValueError, "eps must be a positive number"),
    ("conv weight 3x3", lambda a: _replace(a, 1, a[1][..., :3, :3]), ValueError, "conv_weight"),
    ("conv weight channels", lambda a: _replace(a, 1, a[1][:8]), ValueError, "conv_weight"),
    ("conv bias channels", lambda a: _replace(a, 2, a[2][:8]), ValueError, "conv_bias"),
    ("norm weight channels", lambda a: _replace(a, 3, a[3][:8]), ValueError, "norm_weight"),
    ("norm bias 2-D", lambda a: _replace(a, 4, a[4][None]), ValueError, "norm_bias"),
    ("mixed devices", lambda a: _replace(a, 3, a[3].to("meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("case", BAD_DWCONV_LAYERNORM, ids=[c[0] for c in BAD_DWCONV_LAYERNORM])
def test_dwconv_layernorm_bad_input(case):
    _, mutate, exc, words = case
    with pytest.raises(exc, match=words):
        ck.dwconv_layernorm(*mutate(_good_dwconv_layernorm()), backend="cpu")


BAD_MLP_LAYERSCALE = [
    ("x rank 2", lambda a: _replace(a, 0, a[0].flatten(0, 2)), ValueError, "4-D"),
    ("shortcut shape", lambda a: _replace(a, 1, a[1][:, :2]), ValueError, "shortcut"),
    ("fc1 channels", lambda a: _replace(a, 2, a[2][:, :8]), ValueError, "fc1_weight"),
    ("fc1 hidden", lambda a: _replace(a, 2, a[2][:100]), ValueError, "fc1_weight"),
    ("fc2 shape", lambda a: _replace(a, 4, a[4].t()), ValueError, "fc2_weight"),
    ("fc2 bias", lambda a: _replace(a, 5, a[5][:3]), ValueError, "fc2_bias"),
    ("gamma", lambda a: _replace(a, 6, a[6][:3]), ValueError, "gamma"),
    ("drop_scale", lambda a: _replace(a, 7, a[7][:1]), ValueError, "drop_scale"),
    ("fc1 int", lambda a: _replace(a, 2, a[2].int()), TypeError, "dtype"),
    ("fc2 sparse", lambda a: _replace(a, 4, a[4].to_sparse_csr()), TypeError, "layout torch.sparse_csr"),
    ("empty batch", lambda a: _replace(_replace(a, 0, a[0][:0]), 1, a[1][:0]), ValueError, "empty batch"),
    ("zero height", lambda a: _replace(_replace(a, 0, a[0][:, :0]), 1, a[1][:, :0]), ValueError,
     "H, W and C must be at least 1"),
    ("mixed devices", lambda a: _replace(a, 2, a[2].to("meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("case", BAD_MLP_LAYERSCALE, ids=[c[0] for c in BAD_MLP_LAYERSCALE])
def test_mlp_layerscale_bad_input(case):
    _, mutate, exc, words = case
    with pytest.raises(exc, match=words):
        ck.mlp_layerscale(*mutate(_good_mlp_layerscale()), backend="cpu")


def test_backend_errors_name_what_is_missing(monkeypatch):
    monkeypatch.delenv("CONVNEXT_KERNELS_CUDA_EMULATE", raising=False)  # conftest's: CPU tensors allowed
    x, w, b, nw, nb = _good_dwconv_layernorm()
    with pytest.raises(ValueError, match="unknown backend"):
        ck.dwconv_layernorm(x, w, b, nw, nb, backend="cudnn")
    with pytest.raises(ck.BackendUnavailableError, match="needs CUDA tensors.*CONVNEXT_KERNELS_CUDA_EMULATE=1"):
        ck.dwconv_layernorm(x, w, b, nw, nb, backend="cuda")
    with pytest.raises(TypeError, match="backend must be a string"):
        ck.dwconv_layernorm(x, w, b, nw, nb, backend=None)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    if TRITON_UNUSABLE:  # then that is what the error names
        pytest.skip(TRITON_UNUSABLE)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b, nw, nb = _good_dwconv_layernorm()
    with pytest.raises(ck.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        ck.dwconv_layernorm(x, w, b, nw, nb, backend="triton")


@pytest.mark.parametrize("version, too_old", [("3.2.0", True), ("3.3.1", False), ("3.10.0", False),
                                               ("3.6.0+git5c1a2b3", False), ("3.2.0rc1", True)])
def test_triton_older_than_supported_is_reported(monkeypatch, version, too_old):
    from convnext_kernels import backends
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", version)
    reason = backends._find_triton()
    assert ("older than 3.3" in reason) == too_old, reason
    assert not reason or version in reason


def test_env_overrides_auto(monkeypatch):
    monkeypatch.delenv("CONVNEXT_KERNELS_CUDA_EMULATE", raising=False)
    x, w, b, nw, nb = _good_dwconv_layernorm()
    monkeypatch.setenv("CONVNEXT_KERNELS_BACKEND", "cuda")
    with pytest.raises(ck.BackendUnavailableError):
        ck.dwconv_layernorm(x, w, b, nw, nb)  # auto -> the env's "cuda", which needs CUDA tensors
    monkeypatch.setenv("CONVNEXT_KERNELS_BACKEND", "torch")
    ck.dwconv_layernorm(x, w, b, nw, nb)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_backend_resolution_traces_under_fullgraph(device, monkeypatch):
    """Every op call resolves its backend inside the user's torch.compile trace, so the resolution
    must trace for every backend on every device, GPU branches included, which this machine reaches
    by asking about a "cuda" device it does not have. (It once called into the extension there,
    which dynamo cannot trace: fullgraph training with backend "cuda" would fail on the GPU.)"""
    from convnext_kernels.backends import BACKENDS, unavailable_reason
    monkeypatch.delenv("CONVNEXT_KERNELS_CUDA_EMULATE", raising=False)  # the real-CUDA branches
    dev = torch.device(device)
    expected = {b: unavailable_reason(b, dev) for b in BACKENDS}

    def reasons(x):
        return x + sum(len(unavailable_reason(b, dev)) for b in BACKENDS)

    torch._dynamo.reset()
    traced = torch.compile(reasons, fullgraph=True, backend="eager")(torch.zeros(()))
    assert traced.item() == sum(len(r) for r in expected.values())


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES + STAGE_SHAPES_B32, ids=str)
def test_dwconv_layernorm_gpu(backend, dtype, shape):
    _run_dwconv_layernorm(backend, "cuda", shape, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES + STAGE_SHAPES_B32, ids=str)
def test_mlp_layerscale_gpu(backend, dtype, shape):
    _run_mlp_layerscale(backend, "cuda", shape, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ("triton", "cuda"))
def test_torch_compile_dynamic_shapes_gpu(backend):
    # Triton's BLOCK_W is a constexpr picked from W, so a W in another power-of-two bucket
    # compiles anew by design; N and H stay symbolic.
    shapes = [(n, h, 6, c) for n, h, _, c in DYNAMIC_SHAPES] if backend == "triton" else DYNAMIC_SHAPES
    _check_compile_dynamic_shapes(backend, "cuda", shapes)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ("triton", "cuda"))
@pytest.mark.parametrize("op_name, extra", OPCHECK_CASES, ids=["dwconv_layernorm", "mlp", "mlp_store_preact"])
def test_opcheck_gpu(backend, op_name, extra):
    if backend == "cuda" and extra == (True,):
        pytest.skip("the cuda backend has no stored-pre-activation variant")
    table = ck.ops.DWCONV_LAYERNORM_OPS if op_name == "dwconv_layernorm" else ck.ops.MLP_LAYERSCALE_OPS
    args = [a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            for a in _op_args(op_name, (2, 5, 6, 40)) + extra]
    torch.library.opcheck(table[backend][0], args)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ("triton", "cuda"))
def test_ops_on_a_gpu_that_is_not_current(backend):
    """Tensors on the last GPU while the first is current (a model moved to cuda:1 without
    torch.cuda.set_device): the kernels run on the tensors' GPU and its stream, and give bit for
    bit what they give with that GPU current; the current device is left as it was."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    other = torch.device("cuda", torch.cuda.device_count() - 1)
    with torch.cuda.device(0):
        got = _ops_outputs_and_grads(backend, other)
        assert torch.cuda.current_device() == 0
    with torch.cuda.device(other):
        expected = _ops_outputs_and_grads(backend, other)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.device == other and torch.equal(a, b), i


@pytest.mark.parametrize("setup, expected", [
    ("", False),
    ("torch.backends.cuda.matmul.allow_tf32 = True", True),
    ("torch.set_float32_matmul_precision('high')", True),
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True),
    ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", False),
])
def test_tf32_switch_follows_either_torch_api(setup, expected, tmp_path):
    """The kernels' TF32 switch reads whichever of torch's APIs the user set; a fresh interpreter per
    case, because torch >= 2.9 makes mixing the two APIs in one process an error."""
    import subprocess
    import sys

    if "fp32_precision" in setup and not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision API")
    # The Triton launcher's dot precision too (its interpreter is always exact, so ask it as the
    # compiled path would).
    script = (f"import torch\n{setup}\n"
              "from convnext_kernels.launchers import tf32_matmul_allowed\n"
              "print(tf32_matmul_allowed())\n"
              "from convnext_kernels.backends import unavailable_reason\n"
              "if not unavailable_reason('triton', torch.device('cpu')):\n"
              "    from convnext_kernels.triton import mlp_layerscale as m\n"
              "    m.triton_interpreted = lambda: False\n"
              "    print(m._input_precision(torch.float32))\n")
    # No override of torch's TF32 default.
    env = package_subprocess_env(drop=("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split()
    assert lines[0] == str(expected)
    if len(lines) > 1:
        assert lines[1] == ("tf32" if expected else "ieee")
