"""ConvNeXtFused: the official ConvNeXt with each block as two fused ops, NHWC end to end.

Parameter names are the official ones (``downsample_layers``, ``stages.s.b.dwconv`` ...), so an
official checkpoint loads as it is; ``load_state_dict`` also accepts timm, torchvision and
Hugging Face layouts (see ``convert_state_dict``). Activations stay (N, H, W, C) contiguous from
the stem to the head: the stem and downsampling convs run on the NCHW view of that memory
(channels_last), so no permute copies anything.
"""

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .convert import convert_state_dict
from .launchers import CPU_FP16_IN_FP32, cpu_fp32_exact
from .ops import dwconv_layernorm, mlp_layerscale
from .reference import drop_path_rates, drop_path_scale, init_weights, layer_norm

__all__ = [
    "ConvNeXtFused",
    "FusedBlock",
    "convnext_atto",
    "convnext_femto",
    "convnext_pico",
    "convnext_nano",
    "convnext_tiny",
    "convnext_small",
    "convnext_base",
    "convnext_large",
    "convnext_xlarge",
]


def _check_images(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """x, checked: the stride-4 stem and three 2x2 stride-2 downsamplings need 32 pixels a side
    (torch's conv would fail at the last one with a message about kernel sizes)."""
    if x.dim() != 4 or x.shape[1] != in_chans or x.shape[2] < 32 or x.shape[3] < 32:
        raise ValueError(f"images must be (N, {in_chans}, H, W) with H, W >= 32, got shape {tuple(x.shape)}")
    return x


def _nhwc(x_nchw: torch.Tensor) -> torch.Tensor:
    return x_nchw.permute(0, 2, 3, 1)


def _nchw(x_nhwc: torch.Tensor) -> torch.Tensor:
    return x_nhwc.permute(0, 3, 1, 2)


class RecomputableBlock(nn.Module):
    """A block whose forward is ``_fused_forward``, recomputed in backward when
    ``grad_checkpointing`` is set. The checkpoint sits inside the block's own forward, so hooks on
    the block and on the modules around it (FSDP2's all-gathers among them) run as they do without
    it. Non-reentrant checkpoint restores the RNG state: a drop-path draw repeats exactly."""

    grad_checkpointing = False

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing:
            return _recompute(self, x)
        return self._fused_forward(x)


def _recompute(block: RecomputableBlock, x: torch.Tensor) -> torch.Tensor:
    """block's forward, recomputed in backward (checkpointed) where autograd records it."""
    if torch.is_grad_enabled():
        return checkpoint(block._fused_forward, x, use_reentrant=False)
    return block._fused_forward(x)


class FusedBlock(RecomputableBlock):
    """A ConvNeXt block as dwconv_layernorm + mlp_layerscale on (N, H, W, C) activations."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6,
                 backend: str = "auto"):
        super().__init__()
        # Modules only hold the parameters, under the official names.
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (
            nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None
        )
        self.drop_prob = drop_path
        self.backend = backend

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = dwconv_layernorm(x, self.dwconv.weight, self.dwconv.bias, self.norm.weight, self.norm.bias,
                             self.norm.eps, backend=self.backend)
        scale = None
        if self.training and self.drop_prob > 0.0:
            scale = drop_path_scale(x.shape[0], self.drop_prob, x.device)
        return mlp_layerscale(y, x, self.pwconv1.weight, self.pwconv1.bias, self.pwconv2.weight,
                              self.pwconv2.bias, self.gamma, scale, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dwconv.in_channels}, drop_path={self.drop_prob}, backend={self.backend!r}"


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x). In fp16 on a CPU without fp16 convs (CPU_FP16_IN_FP32, e.g. AMD Zen 5), where
    torch's fp16 conv is a generic loop (about half of an fp16 training step): oneDNN's fp32
    conv of the operands rounded to fp16 as autocast rounds them, its output rounded to fp16
    once, as torch's fp16 conv (fp32 accumulation) gives it up to summation order; gradients
    are rounded to fp16 on their way back to each operand, as autocast's casts round them."""
    if x.device.type != "cpu" or not CPU_FP16_IN_FP32:
        return conv(x)
    if torch.is_autocast_enabled("cpu"):
        fp16 = torch.get_autocast_dtype("cpu") == torch.float16
    else:
        fp16 = x.dtype == conv.weight.dtype == torch.float16
    if not fp16 or not cpu_fp32_exact("conv"):
        return conv(x)

    def exact(t):  # the fp16 operand autocast would make, as fp32
        return None if t is None else t.to(torch.float16).float()

    with torch.autocast("cpu", enabled=False):
        y = F.conv2d(exact(x), exact(conv.weight), exact(conv.bias), conv.stride, conv.padding, conv.dilation,
                     conv.groups)
    return y.to(torch.float16)


# torch.fx's symbolic tracing (torchvision's create_feature_extractor) records these as calls, run
# as they are when the traced module runs, instead of tracing into their checks and branches,
# which need real tensors (and _recompute: traced into, a checkpoint would be dropped). The two
# ops record themselves (ops._fx_traced_call).
torch.fx.wrap("drop_path_scale")  # torch 2.6 and 2.7 cannot trace torch.rand of a traced size
torch.fx.wrap("_recompute")
torch.fx.wrap("_check_images")
torch.fx.wrap("_conv")
torch.fx.wrap("layer_norm")


class _LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (the same parameters and state_dict keys) whose 16-bit CPU inputs compute in
    fp32 (reference.layer_norm: torch's own sums their parameter gradients in 16 bits)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class _Stem(nn.Sequential):
    """4x4 stride-4 patchify conv + LayerNorm; NCHW image in, NHWC activations out."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__(nn.Conv2d(in_chans, dim, kernel_size=4, stride=4), _LayerNorm(dim, eps=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_images(x, self[0].in_channels)
        # channels_last memory by permute + contiguous: torch.func's vmap cannot take a memory format
        x = _conv(self[0], _nchw(_nhwc(x).contiguous()))
        return self[1](_nhwc(x))


class _Downsample(nn.Sequential):
    """LayerNorm + 2x2 stride-2 conv, NHWC in and out (the conv runs on the channels_last view)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__(_LayerNorm(dim, eps=1e-6), nn.Conv2d(dim, out_dim, kernel_size=2, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _nchw(self[0](x).contiguous())
        return _nhwc(_conv(self[1], x))


class ConvNeXtFused(nn.Module):
    """Drop-in ConvNeXt (arXiv 2201.03545) running the fused kernels; see the module docstring."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        head_init_scale: float = 1.0,
        backend: str = "auto",
    ):
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"depths and dims need 4 entries each, got {tuple(depths)} and {tuple(dims)}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no classifier), got {num_classes}")
        self.depths = tuple(depths)
        self.dims = tuple(dims)
        self.num_classes = num_classes
        self.downsample_layers = nn.ModuleList(
            [_Stem(in_chans, dims[0])] + [_Downsample(dims[i], dims[i + 1]) for i in range(3)]
        )
        rates = drop_path_rates(drop_path_rate, depths)
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                FusedBlock(dims[i], rates[cur + j], layer_scale_init_value, backend) for j in range(depths[i])
            ]))
            cur += depths[i]
        self.norm = _LayerNorm(dims[-1], eps=1e-6)
        # num_classes=0: no classifier (as in timm); forward gives the pooled, normalised features.
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)
        if num_classes > 0:
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)

    # --- configuration ----------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self.stages[0][0].backend

    def set_backend(self, backend: str) -> "ConvNeXtFused":
        """Switch every block to `backend` ("auto", "triton", "cuda", "cpu", "torch")."""
        for m in self.modules():
            if isinstance(m, FusedBlock):
                m.backend = backend
        return self

    @property
    def grad_checkpointing(self) -> bool:
        """Whether the blocks are recomputed in backward; setting it sets every block's switch."""
        return any(m.grad_checkpointing for m in self.modules() if isinstance(m, RecomputableBlock))

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool) -> None:
        for m in self.modules():
            if isinstance(m, RecomputableBlock):
                m.grad_checkpointing = bool(enable)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of keeping its activations (saves memory)."""
        self.grad_checkpointing = enable

    # --- forward ----------------------------------------------------------------------------
    def _run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.stages[i](self.downsample_layers[i](x))

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stage outputs, each an (N, C, H, W) tensor in channels_last memory."""
        outs = []
        for i in range(4):
            x = self._run_stage(i, x)
            outs.append(_nchw(x))
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled and normalised features (N, dims[-1])."""
        for i in range(4):
            x = self._run_stage(i, x)
        return self.norm(x.mean((1, 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    # --- checkpoints ------------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load official, timm, torchvision or Hugging Face weights (converted to official names)."""
        return super().load_state_dict(convert_state_dict(state_dict), strict=strict, assign=assign)


_CONFIGS = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}


def _factory(size: str):
    depths, dims = _CONFIGS[size]

    def make(**kwargs) -> ConvNeXtFused:
        return ConvNeXtFused(depths=depths, dims=dims, **kwargs)

    make.__name__ = f"convnext_{size}"
    make.__doc__ = f"ConvNeXt-{size}: depths {depths}, dims {dims}."
    return make


convnext_atto = _factory("atto")
convnext_femto = _factory("femto")
convnext_pico = _factory("pico")
convnext_nano = _factory("nano")
convnext_tiny = _factory("tiny")
convnext_small = _factory("small")
convnext_base = _factory("base")
convnext_large = _factory("large")
convnext_xlarge = _factory("xlarge")
