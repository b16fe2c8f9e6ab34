"""The ground truth: ConvNeXt (arXiv 2201.03545) in plain PyTorch, as the official code builds it.

Parameter names follow facebookresearch/ConvNeXt, so official checkpoints load as they are.
Beside the model sit reference functions for the two fused ops; with ``upcast=True`` they
compute in float64 and return float64 (the yardstick every kernel is measured against),
otherwise they compute in the input dtype as eager PyTorch does on a GPU (see ``layer_norm``).
"""

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ConvNeXt",
    "Block",
    "LayerNorm",
    "layer_norm",
    "dwconv_layernorm_ref",
    "mlp_layerscale_ref",
    "drop_path_scale",
    "drop_path_rates",
]


# ----------------------------------------------------------------------------------------------
# Reference functions for the fused ops (NHWC activations)
# ----------------------------------------------------------------------------------------------
def layer_norm(x: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """F.layer_norm, but fp16 / bf16 CPU inputs in fp32, the output rounded to x's dtype once, as
    CUDA's layer_norm computes them. torch's CPU layer_norm sums 16-bit inputs' weight and bias
    gradients with 16-bit roundings, an error that grows with the rows (ConvNeXt-T's stem at
    batch 8, 25088 rows of 96: 14% relative error in bf16, 1.8% in fp16; 0.3% and 0.03% here).
    Gradients reach x and the parameters in their own dtypes."""
    if x.device.type != "cpu" or x.dtype not in (torch.float16, torch.bfloat16):
        return F.layer_norm(x, normalized_shape, weight, bias, eps)

    def fp32(t):
        return None if t is None else t.float()

    with torch.autocast("cpu", enabled=False):  # autocast runs layer_norm in x's dtype anyway
        y = F.layer_norm(x.float(), normalized_shape, fp32(weight), fp32(bias), eps)
    return y.to(x.dtype)


def dwconv_layernorm_ref(
    x: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: Optional[torch.Tensor],
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float = 1e-6,
    upcast: bool = False,
) -> torch.Tensor:
    """LayerNorm over C of the zero-padded 7x7 depthwise conv of x (N, H, W, C)."""
    dtype = torch.float64 if upcast else x.dtype
    # Sizes from the weights, not from x: the ONNX exporter (torch.onnx.export) traces x's sizes
    # as values where its batch is dynamic, and conv and LayerNorm need constants. padding as a
    # pair: torch 2.6 and 2.7's exporter turns a single traced k // 2 into an empty list.
    C, _, k, _ = conv_weight.shape
    x_nchw = x.to(dtype).permute(0, 3, 1, 2)
    bias = None if conv_bias is None else conv_bias.to(dtype)
    z = F.conv2d(x_nchw, conv_weight.to(dtype), bias, padding=(k // 2, k // 2), groups=C)
    z = z.permute(0, 2, 3, 1)
    return layer_norm(z, (C,), norm_weight.to(dtype), norm_bias.to(dtype), eps)


def mlp_layerscale_ref(
    x: torch.Tensor,
    shortcut: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    gamma: Optional[torch.Tensor] = None,
    drop_scale: Optional[torch.Tensor] = None,
    upcast: bool = False,
) -> torch.Tensor:
    """shortcut + drop_scale[n] * gamma * fc2(gelu_erf(fc1(x))) over the last dim of (N, H, W, C)."""
    dtype = torch.float64 if upcast else x.dtype

    def cast(t):
        return None if t is None else t.to(dtype)

    h = F.gelu(F.linear(x.to(dtype), cast(fc1_weight), cast(fc1_bias)))
    z = F.linear(h, cast(fc2_weight), cast(fc2_bias))
    if gamma is not None:
        z = z * cast(gamma)
    if drop_scale is not None:
        z = z * cast(drop_scale).view(-1, 1, 1, 1)
    return shortcut.to(dtype) + z


def drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> list[float]:
    """Stochastic depth rates as in the official code: linspace(0, rate, sum(depths))."""
    return torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()


def drop_path_scale(
    batch: int, drop_prob: float, device: Union[torch.device, str, None] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Per-sample stochastic-depth factors, (batch,) float32: Bernoulli(keep) / keep.

    The same draw as timm's DropPath (floor(keep + U[0,1)) / keep), shared by the reference
    and the fused model so both consume the RNG identically.
    """
    keep = 1.0 - drop_prob
    u = torch.rand(batch, device=device, dtype=torch.float32, generator=generator)
    mask = torch.floor(u + keep)
    return mask / keep if keep > 0.0 else mask


# ----------------------------------------------------------------------------------------------
# The official model
# ----------------------------------------------------------------------------------------------
class LayerNorm(nn.Module):
    """LayerNorm over channels for channels_last (N, H, W, C) or channels_first (N, C, H, W)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-6, data_format: str = "channels_last"):
        super().__init__()
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"data_format must be channels_last or channels_first, got {data_format!r}")
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (normalized_shape,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Block(nn.Module):
    """dwconv 7x7 -> LayerNorm -> Linear C->4C -> GELU -> Linear 4C->C -> gamma -> drop path -> + x."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (
            nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None
        )
        self.drop_prob = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, C, H, W)
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        if self.training and self.drop_prob > 0.0:
            x = x * drop_path_scale(x.shape[0], self.drop_prob, x.device).to(x.dtype).view(-1, 1, 1, 1)
        return shortcut + x


class ConvNeXt(nn.Module):
    """The official ConvNeXt: patchify stem, four stages with LN + 2x2 stride-2 downsampling, head."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        head_init_scale: float = 1.0,
    ):
        super().__init__()
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(
            nn.Sequential(
                nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
                LayerNorm(dims[0], eps=1e-6, data_format="channels_first"),
            )
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNorm(dims[i], eps=1e-6, data_format="channels_first"),
                    nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2),
                )
            )
        rates = drop_path_rates(drop_path_rate, depths)
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(4):
            self.stages.append(
                nn.Sequential(
                    *[
                        Block(dims[i], drop_path=rates[cur + j], layer_scale_init_value=layer_scale_init_value)
                        for j in range(depths[i])
                    ]
                )
            )
            cur += depths[i]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        self.apply(init_weights)
        self.head.weight.data.mul_(head_init_scale)
        self.head.bias.data.mul_(head_init_scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(4):
            x = self.downsample_layers[i](x)
            x = self.stages[i](x)
        return self.norm(x.mean([-2, -1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def init_weights(m: nn.Module) -> None:
    """The official init: trunc_normal(std=0.02) weights and zero biases for convs and linears."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)

