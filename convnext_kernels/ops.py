"""The two fused ops: public functions, input checks, and their torch.library registration.

Each backend gets a forward op and a backward op per fused op, named
``convnext_kernels::{dwconv_layernorm,mlp_layerscale}_{fwd,bwd}_{backend}``. Triton ops are
``torch.library.triton_op`` (torch.compile traces into the kernels); the others are
``torch.library.custom_op`` with a fake impl. Autograd is registered on the forward op and calls
the backward op, so compiled backward graphs see the kernels too. Under torch.func transforms
and forward-mode AD the ops run through autograd.Functions of their own instead; plain eager code
runs their implementations past torch's dispatcher, which costs more host time than it brings
there; while torch.onnx.export runs, the public functions compute with the reference functions
(all below).

Inputs: activations are NHWC (N, H, W, C); non-contiguous inputs are copied to contiguous
(documented, not an error). Parameters may be fp32, fp16 or bf16: the conv/norm parameters,
biases and gamma go to the kernels in fp32, the Linear weights in the activation dtype (tensor
cores; cast inside the op, so that an fp32 weight's gradient stays fp32); their gradients flow
back in each parameter's own dtype. Under torch.autocast the
activations are cast to the autocast dtype, as autocast would do for the Linear layers.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.onnx

from .backends import _TRITON_MISSING, BACKENDS, MLP_LAYERSCALE_STORE_PREACT_MIN_C, launchers, resolve_backend
from .launchers import empty_output
from .reference import dwconv_layernorm_ref, mlp_layerscale_ref

__all__ = ["dwconv_layernorm", "mlp_layerscale"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_SIZE = 7


# ----------------------------------------------------------------------------------------------
# Input checks shared by both ops
# ----------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {expected}, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} has layout {t.layout}; expected a dense (torch.strided) tensor")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected float32, float16 or bfloat16")


def _check_shape(name: str, t: Optional[torch.Tensor], shape: tuple) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {shape}")


def _check_activation(name: str, x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, H, W, C) channels-last activations, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {tuple(x.shape)}); N must be at least 1")
    if min(x.shape[1:]) < 1:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; H, W and C must be at least 1")


def _check_devices(named: dict) -> torch.device:
    devices = {n: t.device for n, t in named.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")
    return first


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """x's dtype, or the autocast dtype when autocast is on for x's device."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _dense(*tensors: Optional[torch.Tensor]) -> tuple:
    """The tensors as contiguous (a no-op when they are). The public functions already pass
    contiguous tensors, but the ops are public too, and torch.compile may hand them other layouts:
    the launchers read raw pointers and need them dense, row-major."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def _to_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The dtype test first: a .to() that changes nothing still costs most of a microsecond.
    return t if t.dtype == dtype else t.to(dtype)


def _fp32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else _to_dtype(t, torch.float32).contiguous()


# ----------------------------------------------------------------------------------------------
# torch.func transforms
# ----------------------------------------------------------------------------------------------
# torch.library's autograd registration cannot run under a torch.func transform (grad, vjp,
# jacrev, vmap of grad, ...): the autograd.Function it generates has no setup_context
# (pytorch/pytorch#168393, #179652); and under forward-mode AD it drops the tangent (the output
# comes out with none, silently). There, each op runs through an autograd.Function of our own with
# the same forward, setup_context and backward, and a jvp that raises. Under vmap the ops loop
# over the vmapped dim (what torch's fallback would do, without its warning asking for a
# batching rule).
_OWN_FUNCTIONS = {}  # op -> its autograd.Function


def _own_function_needed() -> bool:
    # Never under torch.compile: while dynamo traces, both flags read as set, in any function
    # (torch 2.13). torch.func transforms inside a compiled function are not supported (there
    # the ops behave as any torch.library custom op: grad raises, jvp's tangents come out zero).
    return not torch.compiler.is_compiling() and (torch._C._are_functorch_transforms_active()
                                                  or torch.autograd.forward_ad._current_level >= 0)


def _run(op, *args):
    """op(*args), through op's own autograd.Function under torch.func or forward-mode AD, and past
    torch's dispatcher in plain eager code (see "Eager calls" below)."""
    if _own_function_needed():
        return _OWN_FUNCTIONS[op].apply(*args)
    if _dispatcher_needed(args):
        return op(*args)
    impl, function = _EAGER_IMPLS[op]
    # Inference mode records no autograd graph even with grad mode on (enable_grad inside it).
    if (torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
        if function is None:  # a backward op under create_graph: the op raises as it should
            return op(*args)
        return function.apply(*args)
    return impl(*args)


# ----------------------------------------------------------------------------------------------
# Eager calls
# ----------------------------------------------------------------------------------------------
# A call through torch's dispatcher costs a custom op about 17 us of host time with autograd off
# and 40 us with it on (torch 2.13, the ops' whole check-to-launch path being 12-30 us), per op
# and direction: at small batches on a GPU the host, not the GPU, sets the pace. Plain eager code
# on plain tensors needs nothing the dispatcher adds, so there each op runs its implementation
# directly (autograd off), or through an autograd.Function with the op's own setup_context and
# backward. Everything that must see the op itself still does: torch.compile and torch.export,
# torch.jit tracing, dispatch and torch-function modes (FakeTensorMode, make_fx, FlopCounterMode,
# selective checkpointing, `with torch.device(...)`), the profiler (which names the op), tensor
# subclasses (DTensor ...), and tensors whose dispatch keys say they are more than memory on the
# CPU or a CUDA GPU: torch's older vmap (autograd.grad(is_grads_batched=True),
# autograd.functional.jacobian(vectorize=True)) passes batched tensors with no storage of their
# own, and negative-bit views and zero tensors would reach the kernels unresolved; fake and meta
# tensors too.
_EAGER_IMPLS = {}  # op -> (its implementation, its eager autograd.Function or None)
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_dispatch_keys() -> int:
    """The raw dispatch key set of every dense CPU or CUDA tensor, with or without autograd."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    for key in ("CUDA", "ADInplaceOrView", "AutogradCPU", "AutogradCUDA", "AutocastCPU", "AutocastCUDA"):
        keys = keys | torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
    return keys.raw_repr()


_PLAIN_DISPATCH_KEYS = _plain_dispatch_keys()


def _dispatcher_needed(args) -> bool:
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled() or torch.autograd._profiler_enabled()):
        return True
    for a in args:
        if isinstance(a, torch.Tensor) and (
                type(a) not in _PLAIN_TENSOR_TYPES
                or torch._C._dispatch_keys(a).raw_repr() | _PLAIN_DISPATCH_KEYS != _PLAIN_DISPATCH_KEYS):
            return True
    return False


def _eager_impl(backend: str, fn):
    """fn as the dispatcher runs it. A triton_op's implementation runs with torch's wrap_triton
    off (triton_op turns it off around it), so wrap_triton(kernel)[grid] launches the kernel as it
    is; left on, each launch would go through torch's tracing path in eager code too: a
    higher-order op, and an entry in torch's kernel side table that is never freed."""
    if backend != "triton":
        return fn
    from torch._library.triton import set_wrap_triton_enabled

    def run(*args):
        with set_wrap_triton_enabled(False):
            return fn(*args)
    return run


def _support_eager_calls(op, name: str, impl, setup_context=None, backward=None) -> None:
    """op's entry for _run: impl, and (for a forward op) an autograd.Function calling it."""
    function = None
    if backward is not None:
        function = type(f"{name}_eager", (torch.autograd.Function,), dict(
            forward=staticmethod(impl), setup_context=staticmethod(setup_context), backward=staticmethod(backward)))
    _EAGER_IMPLS[op] = (impl, function)


def _meta_slice(a, d: Optional[int]):
    """A meta tensor shaped as one slice of a along its vmapped dim d (a itself if no tensor)."""
    if not isinstance(a, torch.Tensor):
        return a
    shape = list(a.shape)
    if d is not None:
        del shape[d]
    return torch.empty(shape, dtype=a.dtype, device="meta")


def _support_torch_func(op, name: str, fake, setup_context, backward) -> None:
    """op's autograd.Function (for _run) and vmap rule. op returns a tuple of tensors; fake is its
    fake impl."""
    def jvp(ctx, *tangents):
        raise NotImplementedError(f"convnext_kernels::{name} has no forward-mode derivative: the fused ops do not "
                                  "support torch.func.jvp, jacfwd or torch.autograd.forward_ad")

    _OWN_FUNCTIONS[op] = type(name, (torch.autograd.Function,), dict(
        forward=staticmethod(lambda *args: op(*args)),
        setup_context=staticmethod(setup_context),
        backward=staticmethod(backward),
        jvp=staticmethod(jvp),
        generate_vmap_rule=True,  # vmaps the forward, which calls op: op's rule below
    ))

    def vmap_rule(info, in_dims, *args):
        if info.batch_size == 0:  # no slice to run: empty outputs of a slice's output shapes
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            outs = fake(*(_meta_slice(a, d) for a, d in zip(args, in_dims)))
            return tuple(torch.empty((0, *o.shape), dtype=o.dtype, device=device) for o in outs), (0,) * len(outs)
        outs = [op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
                for i in range(info.batch_size)]
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])

    torch.library.register_vmap(op, vmap_rule)


def _support_torch_func_in_backward(op, name: str, fake) -> None:
    """_support_torch_func for a backward op: a second derivative raises (as the op's own autograd
    does), rather than coming out zero."""
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"Trying to backward through convnext_kernels::{name} but no autograd formula was "
                           "registered: the fused ops do not support double backward (second derivatives)")

    _support_torch_func(op, name, fake, setup_context, backward)


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------
def _define(name: str, backend: str, fn, fake):
    """A custom op (triton_op for Triton) named convnext_kernels::{name}_{backend} running fn."""
    qualname = f"convnext_kernels::{name}_{backend}"
    if backend == "triton":
        return torch.library.triton_op(qualname, mutates_args=())(fn)
    op = torch.library.custom_op(qualname, mutates_args=())(fn)
    op.register_fake(fake)
    return op


# Fake (meta) outputs are contiguous whatever the inputs' strides, as the real ones are: the ops
# copy non-contiguous inputs (_dense) and allocate contiguous outputs. (empty_like would copy an
# input's permuted strides, which torch.compile then asserts on the real output.)
def _dwconv_layernorm_fake_fwd(x, conv_weight, conv_bias, norm_weight, norm_bias, eps):
    stats = x.new_empty(x.shape[:3], dtype=torch.float32)
    return x.new_empty(x.shape), stats, torch.empty_like(stats)


def _dwconv_layernorm_fake_bwd(dy, x, conv_weight, conv_bias, norm_weight, mean, rstd):
    C = x.shape[-1]
    vec = x.new_empty((C,), dtype=torch.float32)
    return (x.new_empty(x.shape), x.new_empty(conv_weight.shape, dtype=torch.float32), vec,
            torch.empty_like(vec), torch.empty_like(vec))


def _preact_shape(x: torch.Tensor, store_preact: bool) -> tuple:
    """Shape of the forward's saved pre-activation: (rows, 4C), or (0,) when it is recomputed."""
    return (x.numel() // x.shape[-1], 4 * x.shape[-1]) if store_preact else (0,)


def _mlp_layerscale_fake_fwd(x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale,
                             store_preact):
    return x.new_empty(x.shape), x.new_empty(_preact_shape(x, store_preact))


def _mlp_layerscale_fake_bwd(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale, preact):
    f32 = dict(dtype=torch.float32)
    return (x.new_empty(x.shape), x.new_empty(fc1_weight.shape, **f32), x.new_empty(fc1_bias.shape, **f32),
            x.new_empty(fc2_weight.shape, **f32), x.new_empty(fc2_bias.shape, **f32),
            x.new_empty((x.shape[-1],), **f32))


def _register_dwconv_layernorm(backend: str):
    def fwd(x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
            norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return launchers(backend).dwconv_layernorm_fwd(*_dense(x, conv_weight, conv_bias, norm_weight, norm_bias),
                                                       eps)

    def bwd(dy: torch.Tensor, x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
            norm_weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return launchers(backend).dwconv_layernorm_bwd(*_dense(dy, x, conv_weight, conv_bias, norm_weight, mean,
                                                              rstd))

    fwd_op = _define("dwconv_layernorm_fwd", backend, fwd, _dwconv_layernorm_fake_fwd)
    bwd_op = _define("dwconv_layernorm_bwd", backend, bwd, _dwconv_layernorm_fake_bwd)

    def setup_context(ctx, inputs, output):
        x, conv_weight, conv_bias, norm_weight, _, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, conv_weight, conv_bias, norm_weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)  # no zero tensors for the statistics' (unused) gradients

    def backward(ctx, dy, _dmean, _drstd):
        if dy is None:
            return None, None, None, None, None, None
        x, conv_weight, conv_bias, norm_weight, mean, rstd = ctx.saved_tensors
        dx, dconv_weight, dconv_bias, dnorm_weight, dnorm_bias = _run(
            bwd_op, _to_dtype(dy, x.dtype), x, conv_weight, conv_bias, norm_weight, mean, rstd
        )
        return dx, dconv_weight, (None if conv_bias is None else dconv_bias), dnorm_weight, dnorm_bias, None

    fwd_op.register_autograd(backward, setup_context=setup_context)
    _support_eager_calls(fwd_op, f"dwconv_layernorm_fwd_{backend}", _eager_impl(backend, fwd), setup_context, backward)
    _support_eager_calls(bwd_op, f"dwconv_layernorm_bwd_{backend}", _eager_impl(backend, bwd))
    _support_torch_func(fwd_op, f"dwconv_layernorm_fwd_{backend}", _dwconv_layernorm_fake_fwd, setup_context,
                        backward)
    _support_torch_func_in_backward(bwd_op, f"dwconv_layernorm_bwd_{backend}", _dwconv_layernorm_fake_bwd)
    return fwd_op, bwd_op


def _register_mlp_layerscale(backend: str):
    # The forward op also returns the pre-activation (in the backend's stored form, see
    # convnext_kernels.launchers) when store_preact is set (an empty tensor otherwise); the
    # backward op reads it, or recomputes it when empty.
    def fwd(x: torch.Tensor, shortcut: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor,
            fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, gamma: Optional[torch.Tensor],
            drop_scale: Optional[torch.Tensor], store_preact: bool) -> tuple[torch.Tensor, torch.Tensor]:
        preact = empty_output(_preact_shape(x, store_preact), x.dtype, x.device)
        fc1_weight, fc2_weight = _to_dtype(fc1_weight, x.dtype), _to_dtype(fc2_weight, x.dtype)
        y = launchers(backend).mlp_layerscale_fwd(
            *_dense(x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale),
            preact_out=preact if store_preact else None)
        return y, preact

    def bwd(dy: torch.Tensor, x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor,
            fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, gamma: Optional[torch.Tensor],
            drop_scale: Optional[torch.Tensor], preact: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        fc1_weight, fc2_weight = _to_dtype(fc1_weight, x.dtype), _to_dtype(fc2_weight, x.dtype)
        return launchers(backend).mlp_layerscale_bwd(
            *_dense(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale),
            preact=preact.contiguous() if preact.numel() else None)

    fwd_op = _define("mlp_layerscale_fwd", backend, fwd, _mlp_layerscale_fake_fwd)
    bwd_op = _define("mlp_layerscale_bwd", backend, bwd, _mlp_layerscale_fake_bwd)

    def setup_context(ctx, inputs, output):
        x, _, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale, _ = inputs
        _, preact = output
        ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale, preact)
        ctx.mark_non_differentiable(preact)
        # Otherwise autograd hands backward a zero tensor the size of preact (rows x 4C).
        ctx.set_materialize_grads(False)

    def backward(ctx, dy, _dpreact):
        if dy is None:
            return (None,) * 9
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale, preact = ctx.saved_tensors
        dy = _to_dtype(dy, x.dtype)
        dx, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias, dgamma = _run(
            bwd_op, dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale, preact
        )
        return (dx, dy, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias,
                None if gamma is None else dgamma, None, None)

    fwd_op.register_autograd(backward, setup_context=setup_context)
    _support_eager_calls(fwd_op, f"mlp_layerscale_fwd_{backend}", _eager_impl(backend, fwd), setup_context, backward)
    _support_eager_calls(bwd_op, f"mlp_layerscale_bwd_{backend}", _eager_impl(backend, bwd))
    _support_torch_func(fwd_op, f"mlp_layerscale_fwd_{backend}", _mlp_layerscale_fake_fwd, setup_context,
                        backward)
    _support_torch_func_in_backward(bwd_op, f"mlp_layerscale_bwd_{backend}", _mlp_layerscale_fake_bwd)
    return fwd_op, bwd_op


# (fwd op, bwd op) per backend; Triton ops only where triton imports (triton_op needs it).
DWCONV_LAYERNORM_OPS = {}
MLP_LAYERSCALE_OPS = {}
for _backend in BACKENDS:
    if _backend == "triton" and _TRITON_MISSING:
        continue
    DWCONV_LAYERNORM_OPS[_backend] = _register_dwconv_layernorm(_backend)
    MLP_LAYERSCALE_OPS[_backend] = _register_mlp_layerscale(_backend)


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------
def _fx_traced_call(op, args, kwargs):
    """Under torch.fx symbolic tracing (an argument is a Proxy): op's call, recorded as one graph
    node that runs op when the traced module runs (op's checks need real tensors); else None.
    Any caller traces so, without a torch.fx.wrap of its own."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.fx.Proxy):
            return a.tracer.create_proxy("call_function", op, args, kwargs)
    return None


# ONNX export: an ONNX graph cannot hold our custom ops, so while torch.onnx.export runs (either
# exporter: TorchScript, or torch.export's non-strict capture) both functions compute with the
# reference functions in the same dtype, plain torch ops that ONNX has translations for. An
# exported model runs on any ONNX runtime, without this package or its kernels.
def dwconv_layernorm(x, conv_weight, conv_bias, norm_weight, norm_bias, eps=1e-6, *, backend="auto"):
    """LayerNorm over C of the zero-padded 7x7 depthwise conv (+ bias) of x.

    x: (N, H, W, C) float32/float16/bfloat16; conv_weight (C, 1, 7, 7); conv_bias (C,) or None;
    norm_weight, norm_bias (C,). Returns (N, H, W, C) in x's dtype (the autocast dtype under
    autocast). Differentiable in x and every parameter.
    """
    traced = _fx_traced_call(dwconv_layernorm, (x, conv_weight, conv_bias, norm_weight, norm_bias, eps),
                             {"backend": backend})
    if traced is not None:
        return traced
    _check_tensor("x", x)
    _check_tensor("conv_weight", conv_weight)
    _check_tensor("conv_bias", conv_bias, optional=True)
    _check_tensor("norm_weight", norm_weight)
    _check_tensor("norm_bias", norm_bias)
    _check_activation("x", x)
    C = x.shape[-1]
    if conv_weight.dim() != 4 or conv_weight.shape[0] != C:
        raise ValueError(
            f"conv_weight has shape {tuple(conv_weight.shape)} but x has C={C} channels in its last dim; "
            f"expected ({C}, 1, {KERNEL_SIZE}, {KERNEL_SIZE}) (is x NCHW instead of NHWC?)"
        )
    _check_shape("conv_weight", conv_weight, (C, 1, KERNEL_SIZE, KERNEL_SIZE))
    _check_shape("conv_bias", conv_bias, (C,))
    _check_shape("norm_weight", norm_weight, (C,))
    _check_shape("norm_bias", norm_bias, (C,))
    if not isinstance(eps, (float, int)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    device = _check_devices(dict(x=x, conv_weight=conv_weight, conv_bias=conv_bias,
                                 norm_weight=norm_weight, norm_bias=norm_bias))
    fwd_op, _ = DWCONV_LAYERNORM_OPS[resolve_backend(backend, device)]
    x = _to_dtype(x, _compute_dtype(x))
    if torch.onnx.is_in_onnx_export():  # see "ONNX export" above
        return dwconv_layernorm_ref(x, conv_weight, conv_bias, norm_weight, norm_bias, eps)
    x = x.contiguous()
    y, _, _ = _run(fwd_op, x, _fp32(conv_weight), _fp32(conv_bias), _fp32(norm_weight), _fp32(norm_bias),
                   float(eps))
    return y


def mlp_layerscale(x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma=None, drop_scale=None, *,
                   backend="auto"):
    """shortcut + drop_scale[n] * gamma * fc2(gelu(fc1(x))), exact-erf GELU, over the last dim.

    x, shortcut: (N, H, W, C); fc1_weight (4C, C), fc1_bias (4C,) or None; fc2_weight (C, 4C),
    fc2_bias (C,) or None; gamma (C,) or None (no layer scale); drop_scale (N,) per-sample
    factors or None. Returns (N, H, W, C) in x's dtype (the autocast dtype under autocast);
    shortcut is cast to it. Differentiable in x, shortcut and every parameter (not drop_scale).
    """
    traced = _fx_traced_call(mlp_layerscale, (x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma,
                                              drop_scale), {"backend": backend})
    if traced is not None:
        return traced
    _check_tensor("x", x)
    _check_tensor("shortcut", shortcut)
    _check_tensor("fc1_weight", fc1_weight)
    _check_tensor("fc1_bias", fc1_bias, optional=True)
    _check_tensor("fc2_weight", fc2_weight)
    _check_tensor("fc2_bias", fc2_bias, optional=True)
    _check_tensor("gamma", gamma, optional=True)
    _check_tensor("drop_scale", drop_scale, optional=True)
    _check_activation("x", x)
    if tuple(shortcut.shape) != tuple(x.shape):
        raise ValueError(f"shortcut has shape {tuple(shortcut.shape)}; expected x's shape {tuple(x.shape)}")
    N, C = x.shape[0], x.shape[-1]
    if fc1_weight.dim() != 2 or fc1_weight.shape[1] != C:
        raise ValueError(f"fc1_weight has shape {tuple(fc1_weight.shape)} but x has C={C} channels in its "
                         f"last dim; expected ({4 * C}, {C})")
    _check_shape("fc1_weight", fc1_weight, (4 * C, C))
    _check_shape("fc1_bias", fc1_bias, (4 * C,))
    _check_shape("fc2_weight", fc2_weight, (C, 4 * C))
    _check_shape("fc2_bias", fc2_bias, (C,))
    _check_shape("gamma", gamma, (C,))
    _check_shape("drop_scale", drop_scale, (N,))
    device = _check_devices(dict(x=x, shortcut=shortcut, fc1_weight=fc1_weight, fc1_bias=fc1_bias,
                                 fc2_weight=fc2_weight, fc2_bias=fc2_bias, gamma=gamma, drop_scale=drop_scale))
    resolved = resolve_backend(backend, device)
    fwd_op, _ = MLP_LAYERSCALE_OPS[resolved]
    dtype = _compute_dtype(x)
    if torch.onnx.is_in_onnx_export():  # see "ONNX export" above
        return mlp_layerscale_ref(x.to(dtype), shortcut.to(dtype), fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma,
                                  drop_scale)
    x = _to_dtype(x, dtype).contiguous()
    shortcut = _to_dtype(shortcut, dtype).contiguous()
    if fc1_bias is None:
        fc1_bias = x.new_zeros((4 * C,), dtype=torch.float32)
    if fc2_bias is None:
        fc2_bias = x.new_zeros((C,), dtype=torch.float32)
    drop_scale = None if drop_scale is None else _fp32(drop_scale.detach())
    # Store the pre-activation for backward only where the backend prefers that (see
    # MLP_LAYERSCALE_STORE_PREACT_MIN_C in convnext_kernels.backends) and a backward can follow.
    min_c = MLP_LAYERSCALE_STORE_PREACT_MIN_C.get(resolved, {}).get(dtype)
    # Branches, not bool(...) of the condition: C is symbolic under torch.compile(dynamic=True),
    # and torch 2.7's dynamo cannot trace bool() of a symbolic comparison.
    store_preact = False
    if min_c is not None and C >= min_c and torch.is_grad_enabled():
        for t in (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma):
            if t is not None and t.requires_grad:
                store_preact = True
                break
    # The Linear weights enter the op in their own dtype and are cast to the activations' inside
    # it (forward and backward): cast before the op, an fp32 weight's gradient would be rounded to
    # the 16-bit dtype at the op's boundary (autograd casts a gradient to its input's dtype).
    y, _ = _run(fwd_op, x, shortcut, fc1_weight.contiguous(), _fp32(fc1_bias), fc2_weight.contiguous(),
                _fp32(fc2_bias), _fp32(gamma), drop_scale, store_preact)
    return y
