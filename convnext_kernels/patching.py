"""convert_model: switch the blocks of an existing ConvNeXt (official, timm, torchvision, Hugging Face) to the fused ops.

Each block is replaced, in its parent, by a wrapper that adopts the block's parameters, buffers and
child modules under the same names and in the same order: ``state_dict`` keys are unchanged, the
Parameter objects are the same (an optimizer built before conversion keeps working), and the
model's own forward, heads, hooks and gradient checkpointing still apply. The wrapper takes NCHW in
and gives NCHW out like the block it replaces; inside it runs ``dwconv_layernorm`` and
``mlp_layerscale`` on the NHWC view. With channels_last activations
(``model.to(memory_format=torch.channels_last)`` and channels_last images) that view is free;
otherwise the ops copy their input to contiguous NHWC.

Blocks are recognised by their attribute names (the libraries need not be installed):

- official / ``convnext_kernels.reference``: ``dwconv``, ``norm``, ``pwconv1``, ``act``, ``pwconv2``,
  ``gamma``, and ``drop_prob`` (reference) or ``drop_path`` (timm DropPath or Identity);
- timm ``ConvNeXtBlock``: ``conv_dw``, ``norm``, ``mlp`` (``fc1``, ``act``, ``drop1``, ``norm``,
  ``fc2``, ``drop2``; Linear or, with ``conv_mlp``, 1x1 Conv2d), ``gamma``, ``shortcut``, ``drop_path``;
- torchvision ``CNBlock``: ``block`` (conv, Permute, LayerNorm, Linear, GELU, Linear, Permute),
  ``layer_scale`` (C, 1, 1), ``stochastic_depth`` (``p``, ``mode`` "row" or "batch");
- Hugging Face transformers ``ConvNextLayer``: ``dwconv``, ``layernorm``, ``pwconv1``, ``act``
  (``GELUActivation``), ``pwconv2``, ``layer_scale_parameter`` (or None), ``drop_path``; and
  ``DINOv3ConvNextLayer``, the same block under other names: ``depthwise_conv``, ``layer_norm``,
  ``pointwise_conv1``, ``activation_fn``, ``pointwise_conv2``, ``gamma``, ``drop_path``.

Drop path keeps each library's meaning: in training mode only, per sample (torchvision "batch"
mode: one draw for the whole batch), Bernoulli(keep) scaled by 1/keep (unless timm's
``scale_by_keep`` is off). The draw is ``reference.drop_path_scale``, read from the block's live
``drop_prob`` / ``p`` at every call, so changing the rate after conversion takes effect.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import BACKENDS
from .model import FusedBlock, RecomputableBlock
from .ops import KERNEL_SIZE, dwconv_layernorm, mlp_layerscale
from .reference import drop_path_scale

__all__ = [
    "UnsupportedBlockError",
    "ConvertedBlock",
    "ConvertedOfficialBlock",
    "ConvertedTimmBlock",
    "ConvertedTorchvisionBlock",
    "ConvertedHuggingFaceBlock",
    "ConvertedDinov3Block",
    "convert_model",
    "set_grad_checkpointing",
]


# Recorded as a call by torch.fx's symbolic tracing, as in convnext_kernels.model.
torch.fx.wrap("drop_path_scale")


class UnsupportedBlockError(TypeError):
    """A ConvNeXt block that the fused ops cannot compute exactly (the message names its type)."""


# ----------------------------------------------------------------------------------------------
# Wrappers
# ----------------------------------------------------------------------------------------------
class ConvertedBlock(RecomputableBlock):
    """Base of the wrappers: NCHW in and out, the two fused ops inside (see the module docstring).

    Subclasses say where the parameters live (``_parts``) and, unless it is the block's DropPath
    module ``drop_path``, how drop path is drawn (``_drop_scale``). ``grad_checkpointing``
    recomputes the block in backward.
    """

    source = ""  # which library's block this wraps
    LAYER_SCALE = "gamma"  # the block's name for its layer scale, a Parameter or absent / None

    def __init__(self, block: nn.Module, backend: str):
        super().__init__()
        # Adopt the original's members in their original order: same state_dict keys and order.
        for name, p in block._parameters.items():
            self.register_parameter(name, p)
        for name, b in block._buffers.items():
            self.register_buffer(name, b, persistent=name not in block._non_persistent_buffers_set)
        for name, m in block._modules.items():
            self.add_module(name, m)
        self.train(block.training)
        self.original_type = f"{type(block).__module__}.{type(block).__qualname__}"
        self.backend = backend
        if self.LAYER_SCALE not in self._parameters:  # no layer scale: None (or a plain None attribute)
            setattr(self, self.LAYER_SCALE, None)

    def _parts(self):
        """(conv, norm, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma) with fc weights 2-D."""
        raise NotImplementedError

    def _drop_scale(self, batch: int, device: torch.device) -> Optional[torch.Tensor]:
        return _drop_path_module_scale(self.drop_path, batch, device)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, norm, fc1_w, fc1_b, fc2_w, fc2_b, gamma = self._parts()
        x_nhwc = x.permute(0, 2, 3, 1)  # a contiguous view when x is channels_last
        y = dwconv_layernorm(x_nhwc, conv.weight, conv.bias, norm.weight, norm.bias, norm.eps, backend=self.backend)
        scale = self._drop_scale(x.shape[0], x.device) if self.training else None
        out = mlp_layerscale(y, x_nhwc, fc1_w, fc1_b, fc2_w, fc2_b, gamma, scale, backend=self.backend)
        return out.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"source={self.source}, backend={self.backend!r}"


def _drop_path_module_scale(module: nn.Module, batch: int, device) -> Optional[torch.Tensor]:
    """The scale a timm/official DropPath (or Identity) module would apply, or None for none."""
    p = float(getattr(module, "drop_prob", 0.0) or 0.0)
    if p <= 0.0:
        return None
    scale = drop_path_scale(batch, p, device)
    if not getattr(module, "scale_by_keep", True):
        scale = scale * (1.0 - p)  # a plain Bernoulli(keep) mask
    return scale


class ConvertedOfficialBlock(ConvertedBlock):
    """facebookresearch/ConvNeXt ``Block`` or ``convnext_kernels.reference.Block``."""

    source = "official"

    def __init__(self, block: nn.Module, backend: str):
        super().__init__(block, backend)
        # reference.Block keeps the rate as a float; the official Block has a DropPath module.
        self.has_drop_path_module = "drop_path" in self._modules
        if not self.has_drop_path_module:
            self.drop_prob = float(getattr(block, "drop_prob", 0.0))

    def _parts(self):
        return (self.dwconv, self.norm, self.pwconv1.weight, self.pwconv1.bias, self.pwconv2.weight,
                self.pwconv2.bias, self.gamma)

    def _drop_scale(self, batch, device):
        if self.has_drop_path_module:
            return super()._drop_scale(batch, device)
        p = self.drop_prob
        return drop_path_scale(batch, p, device) if p > 0.0 else None


class ConvertedTimmBlock(ConvertedBlock):
    """timm ``ConvNeXtBlock`` (Linear MLP, or 1x1-conv MLP with ``conv_mlp=True``)."""

    source = "timm"

    def __init__(self, block: nn.Module, backend: str):
        super().__init__(block, backend)
        self.use_conv_mlp = bool(getattr(block, "use_conv_mlp", False))

    def _parts(self):
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        # conv_mlp stores (out, in, 1, 1) 1x1-conv weights; flatten(1) is a view, gradients reach them.
        return (self.conv_dw, self.norm, fc1.weight.flatten(1), fc1.bias, fc2.weight.flatten(1), fc2.bias,
                self.gamma)


class ConvertedTorchvisionBlock(ConvertedBlock):
    """torchvision ``CNBlock``."""

    source = "torchvision"
    LAYER_SCALE = "layer_scale"

    def _parts(self):
        conv, norm, fc1, fc2 = self.block[0], self.block[2], self.block[3], self.block[5]
        return (conv, norm, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.layer_scale.reshape(-1))

    def _drop_scale(self, batch, device):
        sd = self.stochastic_depth
        p = float(sd.p)
        if p <= 0.0:
            return None
        if sd.mode == "batch":  # one draw drops or keeps the whole batch
            return drop_path_scale(1, p, device).expand(batch)
        return drop_path_scale(batch, p, device)


class ConvertedHuggingFaceBlock(ConvertedBlock):
    """Hugging Face transformers ``ConvNextLayer`` (ConvNextModel, ConvNextForImageClassification, ...)."""

    source = "hugging_face"
    # Where the block's pieces live: dwconv, LayerNorm, fc1, activation, fc2; and its layer scale
    # (None when layer_scale_init_value is 0).
    NAMES = ("dwconv", "layernorm", "pwconv1", "act", "pwconv2")
    LAYER_SCALE = "layer_scale_parameter"

    def _parts(self):
        conv, norm, fc1, _, fc2 = (getattr(self, n) for n in self.NAMES)
        return conv, norm, fc1.weight, fc1.bias, fc2.weight, fc2.bias, getattr(self, self.LAYER_SCALE)
    # Drop path: ConvNextDropPath (floor(rand + keep) / keep per sample, in training mode) or
    # Identity, as the base class draws it.


class ConvertedDinov3Block(ConvertedHuggingFaceBlock):
    """Hugging Face transformers ``DINOv3ConvNextLayer`` (DINOv3's ConvNeXt backbones)."""

    source = "hugging_face_dinov3"
    NAMES = ("depthwise_conv", "layer_norm", "pointwise_conv1", "activation_fn", "pointwise_conv2")
    LAYER_SCALE = "gamma"


# ----------------------------------------------------------------------------------------------
# Recognising and checking blocks
# ----------------------------------------------------------------------------------------------
def _type_name(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _block_kind(m: nn.Module) -> Optional[str]:
    """A key of _WRAPPERS ('official', 'timm', ...) or None, from the attribute names of a block."""
    if all(hasattr(m, a) for a in ("dwconv", "norm", "pwconv1", "pwconv2")):
        return "official"
    for kind, wrapper in (("hugging_face", ConvertedHuggingFaceBlock), ("hugging_face_dinov3", ConvertedDinov3Block)):
        if all(hasattr(m, a) for a in wrapper.NAMES):
            return kind
    if all(hasattr(m, a) for a in ("conv_dw", "norm", "mlp")):
        return "timm"
    if all(hasattr(m, a) for a in ("block", "layer_scale", "stochastic_depth")):
        return "torchvision"
    return None


def _has_grn(m: nn.Module) -> bool:
    # ConvNeXt V2: official Block.grn, timm GlobalResponseNormMlp.grn.
    return any(
        name.split(".")[-1] == "grn" or "GlobalResponseNorm" in type(sub).__name__ or type(sub).__name__ == "GRN"
        for name, sub in m.named_modules()
    )


_LAYER_NORM_NAMES = ("LayerNorm", "ConvNextLayerNorm", "DINOv3ConvNextLayerNorm")


class _Checker:
    """Collects why a block cannot be fused; raises UnsupportedBlockError naming the block type."""

    def __init__(self, block: nn.Module, path: str):
        self.block, self.path = block, path

    def require(self, ok: bool, why: str) -> None:
        if not ok:
            where = f" at {self.path!r}" if self.path else ""
            raise UnsupportedBlockError(f"cannot convert {_type_name(self.block)}{where}: {why}")

    def conv(self, conv, C: int) -> None:
        self.require(isinstance(conv, nn.Conv2d), f"the depthwise conv is {type(conv).__name__}, not nn.Conv2d")
        self.require(conv.in_channels == C and conv.out_channels == C and conv.groups == C,
                     f"the conv is not depthwise over {C} channels ({conv})")
        self.require(tuple(conv.kernel_size) == (KERNEL_SIZE, KERNEL_SIZE) and tuple(conv.stride) == (1, 1)
                     and tuple(conv.dilation) == (1, 1) and conv.padding in ((3, 3), "same")
                     and conv.padding_mode == "zeros",
                     f"the fused op is a 7x7, stride 1, padding 3, zero-padded conv; got {conv}")

    def norm(self, norm, C: int) -> None:
        # nn.LayerNorm and its subclasses; the official and older transformers LayerNorms are modules
        # of their own with the same attributes.
        is_ln = isinstance(norm, nn.LayerNorm) or type(norm).__name__ in _LAYER_NORM_NAMES
        self.require(is_ln, f"the norm is {type(norm).__name__}, not a LayerNorm over channels")
        self.require(tuple(getattr(norm, "normalized_shape", ())) == (C,),
                     f"the LayerNorm normalises {getattr(norm, 'normalized_shape', None)}, not ({C},)")
        self.require(getattr(norm, "weight", None) is not None and getattr(norm, "bias", None) is not None,
                     "the LayerNorm has no affine weight and bias")
        self.require(getattr(norm, "data_format", "channels_last") == "channels_last",
                     "the LayerNorm inside a block must be channels_last (over C)")

    def linear(self, name: str, layer, fan_in: int, fan_out: int) -> None:
        ok = isinstance(layer, nn.Linear) or (
            isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) == (1, 1) and tuple(layer.stride) == (1, 1)
            and layer.groups == 1)
        self.require(ok, f"{name} is {type(layer).__name__}, not nn.Linear or a 1x1 nn.Conv2d")
        shape = tuple(layer.weight.shape[:2])
        self.require(shape == (fan_out, fan_in),
                     f"{name} maps {shape[1]} -> {shape[0]}; the fused MLP needs {fan_in} -> {fan_out} (ratio 4)")

    def gelu(self, act) -> None:
        if type(act).__name__ == "GELUActivation":
            # transformers' "gelu" / "gelu_python": F.gelu or its erf formula, both exact; its other
            # GELUs (gelu_new, gelu_fast, gelu_10 ...) are classes of other names.
            fn = getattr(act, "act", None)
            exact = fn is F.gelu or getattr(fn, "__name__", "") == "_gelu_python"
        else:
            exact = type(act).__name__ == "GELU" and getattr(act, "approximate", "none") == "none"
        self.require(exact, f"the activation is {act!r}; the fused MLP computes the exact (erf) GELU")

    def inert(self, name: str, m) -> None:
        """Dropout with p=0 or Identity: modules that do nothing."""
        ok = isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and m.p == 0.0)
        self.require(ok, f"{name} is {m!r}; only Identity or Dropout(p=0) is supported there")

    def drop_path(self, dp) -> None:
        self.require(isinstance(dp, nn.Identity) or hasattr(dp, "drop_prob"),
                     f"drop_path is {type(dp).__name__}, neither Identity nor a DropPath with drop_prob")

    def gamma(self, block, name: str, C: int) -> None:
        """The layer scale `name`: a plain Parameter of the block, or None for none. (The wrappers
        adopt the block's parameters, so a parametrized layer scale or a buffer would be lost.)"""
        gamma = getattr(block, name, None)
        self.require(gamma is None or name in block._parameters,
                     f"the layer scale {name!r} is {type(gamma).__name__} but not a plain Parameter of the block "
                     "(parametrized, or a buffer)")
        if gamma is not None:  # None: no layer scale
            self.require(gamma.numel() == C, f"the layer scale has shape {tuple(gamma.shape)}, not {C} values")


def _check_official(block: nn.Module, chk: _Checker) -> None:
    C = block.dwconv.in_channels
    chk.conv(block.dwconv, C)
    chk.norm(block.norm, C)
    chk.linear("pwconv1", block.pwconv1, C, 4 * C)
    chk.linear("pwconv2", block.pwconv2, 4 * C, C)
    chk.require(isinstance(block.pwconv1, nn.Linear) and isinstance(block.pwconv2, nn.Linear),
                "pwconv1/pwconv2 must be nn.Linear")
    chk.gelu(getattr(block, "act", nn.GELU()))
    chk.gamma(block, "gamma", C)
    if getattr(block, "drop_path", None) is not None:  # reference.Block keeps a rate, no module
        chk.drop_path(block.drop_path)


def _check_timm(block: nn.Module, chk: _Checker) -> None:
    C = block.conv_dw.in_channels
    chk.conv(block.conv_dw, C)
    chk.norm(block.norm, C)
    mlp = block.mlp
    chk.require(all(hasattr(mlp, a) for a in ("fc1", "act", "fc2")),
                f"the MLP is {type(mlp).__name__}, without fc1/act/fc2")
    chk.linear("mlp.fc1", mlp.fc1, C, 4 * C)
    chk.linear("mlp.fc2", mlp.fc2, 4 * C, C)
    chk.gelu(mlp.act)
    for name in ("drop1", "norm", "drop2"):
        if hasattr(mlp, name):
            chk.inert(f"mlp.{name}", getattr(mlp, name))
    chk.gamma(block, "gamma", C)
    chk.require(isinstance(getattr(block, "shortcut", nn.Identity()), nn.Identity),
                "the shortcut is a downsample (in_chs != out_chs or stride > 1), not an identity")
    chk.drop_path(getattr(block, "drop_path", nn.Identity()))


def _check_torchvision(block: nn.Module, chk: _Checker) -> None:
    seq = block.block
    chk.require(isinstance(seq, nn.Sequential) and len(seq) == 7,
                "block.block is not the 7-layer Sequential (conv, Permute, LayerNorm, Linear, GELU, Linear, Permute)")
    C = seq[0].in_channels
    chk.conv(seq[0], C)
    chk.norm(seq[2], C)
    chk.linear("block.3", seq[3], C, 4 * C)
    chk.linear("block.5", seq[5], 4 * C, C)
    chk.require(isinstance(seq[3], nn.Linear) and isinstance(seq[5], nn.Linear), "block.3/block.5 must be nn.Linear")
    chk.gelu(seq[4])
    for i, dims in ((1, [0, 2, 3, 1]), (6, [0, 3, 1, 2])):
        chk.require(list(getattr(seq[i], "dims", [])) == dims, f"block.{i} is not Permute({dims})")
    chk.gamma(block, "layer_scale", C)
    sd = block.stochastic_depth
    chk.require(hasattr(sd, "p") and getattr(sd, "mode", None) in ("row", "batch"),
                f"stochastic_depth is {sd!r}, not a StochasticDepth with mode 'row' or 'batch'")


def _check_hugging_face(block: nn.Module, chk: _Checker, wrapper: type) -> None:
    """wrapper: the ConvertedHuggingFaceBlock (sub)class whose names the block uses."""
    conv, norm, fc1, act, fc2 = (getattr(block, n) for n in wrapper.NAMES)
    C = conv.in_channels
    chk.conv(conv, C)
    chk.norm(norm, C)
    chk.linear("the first Linear", fc1, C, 4 * C)
    chk.linear("the second Linear", fc2, 4 * C, C)
    chk.require(isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear), "the MLP layers must be nn.Linear")
    chk.gelu(act)
    chk.gamma(block, wrapper.LAYER_SCALE, C)
    chk.drop_path(getattr(block, "drop_path", nn.Identity()))


_WRAPPERS = {"official": (ConvertedOfficialBlock, _check_official), "timm": (ConvertedTimmBlock, _check_timm),
             "torchvision": (ConvertedTorchvisionBlock, _check_torchvision),
             "hugging_face": (ConvertedHuggingFaceBlock, partial(_check_hugging_face, wrapper=ConvertedHuggingFaceBlock)),
             "hugging_face_dinov3": (ConvertedDinov3Block, partial(_check_hugging_face, wrapper=ConvertedDinov3Block))}


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def convert_model(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Switch every ConvNeXt block of `model` to the fused ops in place, and return `model`.

    Works on timm ``ConvNeXt``, torchvision ``ConvNeXt``, the official / ``reference.ConvNeXt``,
    Hugging Face transformers ConvNeXt and DINOv3 ConvNeXt models, and any module containing their
    blocks. Parameters stay the same objects under the same
    ``state_dict`` keys. Already-fused blocks (``ConvNeXtFused``'s ``FusedBlock``, or blocks
    converted before) are not wrapped again; their backend is set to `backend`.

    Raises UnsupportedBlockError naming the block type for blocks the fused ops cannot compute
    exactly (ConvNeXt V2 blocks with GRN, non-7x7 kernels, tanh GELU, MLP ratio != 4, a
    downsampling shortcut ...), before changing anything; ValueError for an unknown backend or a
    model without ConvNeXt blocks.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)} or 'auto'")

    already, to_wrap = [], []  # (parent, name, block, kind)

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in parent._modules.items():
            if child is None:
                continue
            path = f"{prefix}{name}"
            if isinstance(child, (FusedBlock, ConvertedBlock)):
                already.append(child)
                continue
            kind = _block_kind(child)
            if kind is None:
                visit(child, path + ".")
                continue
            chk = _Checker(child, path)
            chk.require(not _has_grn(child),
                        "ConvNeXt V2 blocks (GlobalResponseNorm) are not supported by the fused ops yet")
            _WRAPPERS[kind][1](child, chk)
            to_wrap.append((parent, name, child, kind))

    if isinstance(model, (FusedBlock, ConvertedBlock)):
        already.append(model)
    else:
        kind = _block_kind(model)
        if kind is not None:
            raise ValueError(f"convert_model converts the blocks inside a model; {_type_name(model)} is a block "
                             f"itself: pass the model (or a container) that holds it")
        visit(model, "")
    if not already and not to_wrap:
        raise ValueError(f"no ConvNeXt blocks found in {_type_name(model)}: expected official (dwconv/pwconv1), "
                         "timm (conv_dw/mlp), torchvision (block/layer_scale) or Hugging Face "
                         "(dwconv/layernorm, depthwise_conv/layer_norm) blocks")
    for block in already:
        block.backend = backend
    for parent, name, block, kind in to_wrap:
        setattr(parent, name, _WRAPPERS[kind][0](block, backend))
    return model


def set_grad_checkpointing(model: nn.Module, enable: bool = True) -> nn.Module:
    """Recompute each fused block in backward (converted blocks and ConvNeXtFused's, wherever they
    sit in `model`); a model without fused blocks gets its own ``set_grad_checkpointing``."""
    blocks = [m for m in model.modules() if isinstance(m, RecomputableBlock)]
    if not blocks and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(enable)
    for m in blocks:
        m.grad_checkpointing = enable
    return model
