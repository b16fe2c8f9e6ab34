"""Training with the fused ops: convert_model, drop path, checkpointing, torch.compile, DDP, convergence.

timm and torchvision cannot be installed on the CPU CI machine, so their blocks are reproduced
here by small stand-ins with the same attribute names and forward code as the libraries
(timm/models/convnext.py, timm/layers/mlp.py, torchvision/models/convnext.py); convert_model
recognises blocks by those names. The GPU tests at the end convert the real libraries' models.
Hugging Face transformers installs on CPU (a test dependency), so its models are converted as they are.
"""

import copy
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convnext_kernels as ck
from convnext_kernels.model import RecomputableBlock
from convnext_kernels.patching import (
    ConvertedBlock,
    UnsupportedBlockError,
    set_grad_checkpointing,
)
from convnext_kernels.reference import ConvNeXt, LayerNorm, drop_path_scale

from conftest import assert_pass_rule, package_subprocess_env, transformers_with_dinov3

REPO = Path(__file__).resolve().parents[1]
CPU_BACKENDS = ["torch", "cpu"]
TINY = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))


# ----------------------------------------------------------------------------------------------
# Stand-ins for the official, timm and torchvision modules
# ----------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """timm's DropPath (drawn with drop_path_scale, the floor(keep + U) form timm used to draw)."""

    def __init__(self, drop_prob=0.0, scale_by_keep=True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        scale = drop_path_scale(x.shape[0], self.drop_prob, x.device)
        if not self.scale_by_keep:
            scale = scale * (1 - self.drop_prob)
        return x * scale.to(x.dtype).view(-1, 1, 1, 1)


class OfficialBlock(nn.Module):
    """facebookresearch/ConvNeXt models/convnext.py Block (V2: with grn and no gamma)."""

    def __init__(self, dim, drop_path=0.0, layer_scale_init_value=1e-6, grn=False):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        if grn:
            self.grn = GlobalResponseNorm(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.act(self.pwconv1(self.norm(x)))
        if hasattr(self, "grn"):
            x = self.grn(x)
        x = self.pwconv2(x)
        if self.gamma is not None:
            x = self.gamma * x
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: LayerNorm over C of NCHW."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt V2's GRN (channels last)."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        g = x.norm(p=2, dim=(1, 2), keepdim=True)
        return x + torch.addcmul(self.bias, self.weight, x * (g / (g.mean(dim=-1, keepdim=True) + 1e-6)))


class Mlp(nn.Module):
    """timm's Mlp (use_conv: 1x1 convs on NCHW) or GlobalResponseNormMlp (grn)."""

    def __init__(self, dim, hidden, use_conv=False, grn=False, act=nn.GELU):
        super().__init__()
        linear = (lambda i, o: nn.Conv2d(i, o, 1)) if use_conv else nn.Linear
        self.fc1 = linear(dim, hidden)
        self.act = act()
        self.drop1 = nn.Dropout(0.0)
        if grn:
            self.grn = GlobalResponseNorm(hidden)
        else:
            self.norm = nn.Identity()
        self.fc2 = linear(hidden, dim)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        x = self.drop1(self.act(self.fc1(x)))
        x = self.grn(x) if hasattr(self, "grn") else self.norm(x)
        return self.drop2(self.fc2(x))


class ConvNeXtBlock(nn.Module):
    """timm models/convnext.py ConvNeXtBlock."""

    def __init__(self, dim, conv_mlp=False, ls_init_value=1e-6, drop_path=0.0, grn=False, kernel_size=7,
                 act=nn.GELU, mlp_ratio=4):
        super().__init__()
        self.use_conv_mlp = conv_mlp
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = (LayerNorm2d if conv_mlp else nn.LayerNorm)(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio * dim, use_conv=conv_mlp, grn=grn, act=act)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim)) if ls_init_value is not None else None
        self.shortcut = nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return self.drop_path(x) + self.shortcut(shortcut)


class ConvNeXtStage(nn.Module):
    def __init__(self, in_dim, dim, depth, **block_kwargs):
        super().__init__()
        self.downsample = (nn.Identity() if in_dim == dim else
                           nn.Sequential(LayerNorm2d(in_dim, eps=1e-6), nn.Conv2d(in_dim, dim, 2, stride=2)))
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim, **block_kwargs) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class TimmConvNeXt(nn.Module):
    """timm's ConvNeXt layout: stem, stages[i].downsample / .blocks, head."""

    def __init__(self, dims=(16, 32), depth=2, num_classes=5, **block_kwargs):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        self.stages = nn.Sequential(*[ConvNeXtStage(dims[max(i - 1, 0)], d, depth, **block_kwargs)
                                      for i, d in enumerate(dims)])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth (bernoulli_ draw, like torchvision)."""

    def __init__(self, p, mode):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        size = [x.shape[0]] + [1] * (x.ndim - 1) if self.mode == "row" else [1] * x.ndim
        noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * noise.div_(1 - self.p)


class CNBlock(nn.Module):
    """torchvision models/convnext.py CNBlock."""

    def __init__(self, dim, layer_scale=1e-6, stochastic_depth_prob=0.0, mode="row"):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True), Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, mode)

    def forward(self, x):
        result = self.stochastic_depth(self.layer_scale * self.block(x))
        result += x
        return result


class TorchvisionConvNeXt(nn.Module):
    """torchvision's layout: features (stem, stage, downsample, stage), classifier."""

    def __init__(self, dims=(16, 32), depth=2, num_classes=5, **block_kwargs):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6)),
            nn.Sequential(*[CNBlock(dims[0], **block_kwargs) for _ in range(depth)]),
            nn.Sequential(LayerNorm2d(dims[0], eps=1e-6), nn.Conv2d(dims[0], dims[1], 2, stride=2)),
            nn.Sequential(*[CNBlock(dims[1], **block_kwargs) for _ in range(depth)]))
        self.classifier = nn.Sequential(LayerNorm2d(dims[1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[1], num_classes))

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1))


def _randomise(model):
    """Non-trivial layer scales, norm affines and biases, so every parameter matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or "gamma" in name or "layer_scale" in name:
                p.normal_(mean=1.0 if ("norm" in name or "block.2" in name) and name.endswith("weight") else 0.0,
                          std=0.3)
    return model


STAND_INS = {
    "reference": lambda **kw: ConvNeXt(num_classes=5, depths=(1, 2, 1, 1), dims=(16, 32, 48, 64),
                                       drop_path_rate=kw.get("drop_path", 0.0)),
    "official": lambda **kw: nn.Sequential(OfficialBlock(16, **kw), OfficialBlock(16, **kw)),
    "timm": lambda **kw: TimmConvNeXt(**kw),
    "timm_conv_mlp": lambda **kw: TimmConvNeXt(conv_mlp=True, **kw),
    "timm_no_layer_scale": lambda **kw: TimmConvNeXt(ls_init_value=None, **kw),
    "torchvision": lambda **kw: TorchvisionConvNeXt(**{("stochastic_depth_prob" if k == "drop_path" else k): v
                                                         for k, v in kw.items()}),
}


def _input(kind, n=3):
    return torch.randn(n, 16, 12, 10) if kind == "official" else torch.randn(n, 3, 40, 36)


def _loss_and_grads(model, x, seed=0):
    torch.manual_seed(seed)
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    return out, grads


# ----------------------------------------------------------------------------------------------
# convert_model
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", list(STAND_INS))
def test_convert_model_matches_unconverted(kind, backend):
    torch.manual_seed(0)
    original = _randomise(STAND_INS[kind]())
    model = copy.deepcopy(original)
    keys = list(model.state_dict())
    params = list(model.parameters())
    # The loss is scaled by 1e4 and eps raised so that Adam's first step, lr * g / (|g| + eps),
    # stays linear in near-zero gradients: with eps = 1e-8 float rounding in gradients of ~1e-8 moved a
    # weight by a sizeable part of lr (seen under torch 2.6). Steps still reach ~lr, far above atol.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3)  # built before conversion

    assert ck.convert_model(model, backend=backend) is model
    converted = [m for m in model.modules() if isinstance(m, ConvertedBlock)]
    assert len(converted) == (5 if kind == "reference" else 2 if kind == "official" else 4)
    assert all(m.backend == backend for m in converted)
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params)) and len(list(model.parameters())) == len(params)

    x = _input(kind)
    ref64 = copy.deepcopy(original).double()
    out64, grads64 = _loss_and_grads(ref64, x.double())
    out32, grads32 = _loss_and_grads(original, x)
    out, grads = _loss_and_grads(model, x)
    assert_pass_rule("output", out, out64, out32, torch.float32)
    names = [n for n, _ in model.named_parameters()]
    for name, g, g64, g32 in zip(names, grads, grads64, grads32):
        assert_pass_rule(f"grad {name}", g, g64, g32, torch.float32)

    # The optimizer built before conversion steps the converted model's parameters.
    opt_ref = torch.optim.AdamW(original.parameters(), lr=1e-2, eps=1e-3)
    for m, o in ((model, opt), (original, opt_ref)):
        o.zero_grad()
        (m(x).square().mean() * 1e4).backward()
        o.step()
    for (name, p), q in zip(model.named_parameters(), original.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=f"{name} after one AdamW step")
    assert len(opt.state) == len(params)


def test_convert_model_channels_last_and_nested():
    """A model holding a ConvNeXt inside another module; channels_last inputs take the free NHWC view."""
    torch.manual_seed(0)
    inner = _randomise(TimmConvNeXt())
    wrapper = nn.ModuleDict({"backbone": copy.deepcopy(inner)})
    ck.convert_model(wrapper, backend="cpu")
    assert isinstance(wrapper["backbone"].stages[0].blocks[0], ConvertedBlock)
    net = wrapper["backbone"].to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(net(x), inner(x), rtol=1e-4, atol=1e-5)
        block_out = net.stages[0].blocks[0](net.stem(x))
    assert block_out.is_contiguous(memory_format=torch.channels_last)


def test_convert_model_idempotent_and_fused_models():
    model = TimmConvNeXt()
    ck.convert_model(model, backend="torch")
    blocks = [m for m in model.modules() if isinstance(m, ConvertedBlock)]
    ck.convert_model(model, backend="cpu")  # not wrapped twice; the backend changes
    assert [m for m in model.modules() if isinstance(m, ConvertedBlock)] == blocks
    assert all(b.backend == "cpu" and not isinstance(b.conv_dw, ConvertedBlock) for b in blocks)

    fused = ck.ConvNeXtFused(num_classes=3, backend="torch", **TINY)
    keys = list(fused.state_dict())
    assert ck.convert_model(fused, backend="cpu") is fused
    assert fused.backend == "cpu" and list(fused.state_dict()) == keys


@pytest.mark.parametrize("make,type_name", [
    (lambda: TimmConvNeXt(grn=True, ls_init_value=None), "ConvNeXtBlock"),
    (lambda: nn.Sequential(OfficialBlock(16, layer_scale_init_value=0, grn=True)), "OfficialBlock"),
], ids=["timm_v2", "official_v2"])
def test_convert_model_rejects_convnext_v2(make, type_name):
    model = make()
    before = [type(m) for m in model.modules()]
    with pytest.raises(UnsupportedBlockError, match=rf"{type_name}.*GlobalResponseNorm"):
        ck.convert_model(model)
    assert [type(m) for m in model.modules()] == before  # nothing converted


@pytest.mark.parametrize("make,why", [
    (lambda: TimmConvNeXt(kernel_size=5), "7x7"),
    (lambda: TimmConvNeXt(act=lambda: nn.GELU(approximate="tanh")), "exact"),
    (lambda: TimmConvNeXt(mlp_ratio=3), "ratio 4"),
    (lambda: nn.Linear(3, 3), "no ConvNeXt blocks"),
    (lambda: OfficialBlock(16), "OfficialBlock is a block itself"),
])
def test_convert_model_rejects_what_it_cannot_fuse(make, why):
    with pytest.raises((UnsupportedBlockError, ValueError), match=why):
        ck.convert_model(make())


def test_convert_model_takes_modules_and_fused_blocks():
    with pytest.raises(TypeError, match="model must be an nn.Module, got OrderedDict"):
        ck.convert_model(TimmConvNeXt().state_dict())
    block = ck.FusedBlock(16)  # already fused: only its backend changes
    assert ck.convert_model(block, backend="cpu") is block and block.backend == "cpu"


def test_convert_model_refuses_a_layer_scale_it_would_lose():
    """The wrappers adopt a block's own parameters: a parametrized layer scale (or a buffer) would
    silently vanish, so it is refused by name."""
    import torch.nn.utils.parametrize as parametrize

    class Twice(nn.Module):
        def forward(self, g):
            return 2 * g

    model = TimmConvNeXt()
    parametrize.register_parametrization(model.stages[1].blocks[0], "gamma", Twice())
    with pytest.raises(UnsupportedBlockError, match="'gamma' is Tensor but not a plain Parameter"):
        ck.convert_model(model)


def test_convert_model_bad_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        ck.convert_model(TimmConvNeXt(), backend="metal")


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers (the real library: a test dependency on CPU; skipped where it is missing)
# ----------------------------------------------------------------------------------------------
HF_DIMS = dict(hidden_sizes=[16, 32, 48, 40], depths=[1, 2, 1, 1])


def _hf_model(kind, drop_path=0.0, **cfg):
    """A small transformers ConvNeXt ('convnext', 'dinov3') or ConvNeXt V2 ('convnextv2')."""
    transformers = pytest.importorskip("transformers")
    cfg = {**HF_DIMS, "drop_path_rate": drop_path, **cfg}
    if kind == "convnext":
        return transformers.ConvNextForImageClassification(
            transformers.ConvNextConfig(**{"num_labels": 5, "layer_scale_init_value": 0.5, **cfg}))
    if kind == "dinov3":
        transformers = transformers_with_dinov3()
        return transformers.DINOv3ConvNextModel(transformers.DINOv3ConvNextConfig(**{"layer_scale_init_value": 0.5, **cfg}))
    return transformers.ConvNextV2Model(transformers.ConvNextV2Config(**cfg))


def _hf_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind,wrapper", [("convnext", "ConvertedHuggingFaceBlock"),
                                          ("dinov3", "ConvertedDinov3Block")])
def test_convert_hugging_face_models(kind, wrapper, backend):
    torch.manual_seed(0)
    original = _randomise(_hf_model(kind)).eval()
    model = copy.deepcopy(original)
    keys, params = list(model.state_dict()), list(model.parameters())
    assert ck.convert_model(model, backend=backend) is model
    converted = [m for m in model.modules() if isinstance(m, ConvertedBlock)]
    assert len(converted) == sum(HF_DIMS["depths"]) and {type(m).__name__ for m in converted} == {wrapper}
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params)) and len(list(model.parameters())) == len(params)

    x = torch.randn(3, 3, 44, 52)
    ref64 = copy.deepcopy(original).double()
    outs = []
    for m, inp in ((ref64, x.double()), (original, x), (model, x)):
        torch.manual_seed(0)
        out = _hf_output(m(inp))
        outs.append((out, torch.autograd.grad(out.square().sum(), list(m.parameters()))))
    (out64, grads64), (out32, grads32), (out, grads) = outs
    assert_pass_rule("output", out, out64, out32, torch.float32)
    for (name, _), g, g64, g32 in zip(model.named_parameters(), grads, grads64, grads32):
        assert_pass_rule(f"grad {name}", g, g64, g32, torch.float32)
    # transformers' output capture (hooks on the stages) still sees every stage.
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states
        hidden_ref = original(x, output_hidden_states=True).hidden_states
    assert len(hidden) == len(hidden_ref) == 5
    for h, h_ref in zip(hidden, hidden_ref):
        torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-5)


def test_convert_hugging_face_drop_path_and_no_layer_scale():
    """ConvNextDropPath: per sample, Bernoulli(keep) / keep, in training mode only; layer scale 0 is None."""
    torch.manual_seed(0)
    model = _randomise(_hf_model("convnext", drop_path=0.6, layer_scale_init_value=0.0))
    ck.convert_model(model, backend="cpu")
    block = model.convnext.encoder.stages[3].layers[0]  # drop rate 0.6 (linspace up to the last block)
    assert isinstance(block, ConvertedBlock) and block.layer_scale_parameter is None
    p = block.drop_path.drop_prob
    assert p == pytest.approx(0.6)
    x = torch.randn(256, 40, 3, 3)
    with torch.no_grad():
        branch = block.eval()(x) - x
        out = block.train()(x)
    factor = ((out - x) * branch).flatten(1).sum(1) / branch.square().flatten(1).sum(1)
    dropped, kept = factor.abs() < 1e-4, (factor - 1 / (1 - p)).abs() < 1e-4
    assert bool((dropped | kept).all())
    assert 0.25 < kept.float().mean().item() < 0.55  # Binomial(256, 0.4): 5 sigma


@pytest.mark.parametrize("kind,cfg,why", [
    ("convnextv2", {}, r"ConvNextV2Layer.*GlobalResponseNorm"),
    ("convnext", {"hidden_act": "gelu_new"}, r"NewGELUActivation.*exact"),
    ("dinov3", {"hidden_act": "gelu_10"}, r"ClippedGELUActivation.*exact"),
])
def test_convert_hugging_face_rejects_what_it_cannot_fuse(kind, cfg, why):
    model = _hf_model(kind, **cfg)
    before = [type(m) for m in model.modules()]
    with pytest.raises(UnsupportedBlockError, match=why):
        ck.convert_model(model)
    assert [type(m) for m in model.modules()] == before


# ----------------------------------------------------------------------------------------------
# Drop path
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["reference", "official", "timm"])
def test_converted_drop_path_matches_unconverted_draw_for_draw(kind):
    """The official/timm DropPath and the fused path both draw with drop_path_scale."""
    torch.manual_seed(0)
    original = _randomise(STAND_INS[kind](drop_path=0.5)).train()
    model = ck.convert_model(copy.deepcopy(original), backend="cpu")
    x = _input(kind, n=8)
    out_ref, grads_ref = _loss_and_grads(original, x, seed=3)
    out, grads = _loss_and_grads(model, x, seed=3)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    # Eval mode: no drop path at all, whatever the seed.
    original.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("source", ["torchvision", "timm", "timm_no_scale_by_keep", "fused"])
def test_drop_path_semantics(source, mode):
    """Training: each sample keeps its residual branch with probability keep, scaled by 1/keep, or drops it."""
    if mode == "batch" and source != "torchvision":
        pytest.skip("only torchvision's StochasticDepth has a batch mode")
    p, n, dim = 0.5, 256, 8
    torch.manual_seed(0)
    if source == "torchvision":
        block = nn.Sequential(CNBlock(dim, layer_scale=0.5, stochastic_depth_prob=p, mode=mode))
    elif source.startswith("timm"):
        block = nn.Sequential(ConvNeXtBlock(dim, ls_init_value=0.5, drop_path=p))
        block[0].drop_path.scale_by_keep = source == "timm"
    else:
        block = nn.Sequential(ck.FusedBlock(dim, drop_path=p, layer_scale_init_value=0.5))
    ck.convert_model(block, backend="cpu")
    x = torch.randn(n, dim, 5, 5)
    if source == "fused":
        x = x.permute(0, 2, 3, 1).contiguous()  # FusedBlock is NHWC
    with torch.no_grad():
        branch = block.eval()(x) - x
        out = block.train()(x)
    factor = ((out - x) * branch).flatten(1).sum(1) / branch.square().flatten(1).sum(1)
    kept_scale = 1.0 if source == "timm_no_scale_by_keep" else 1.0 / (1 - p)
    dropped = factor.abs() < 1e-4
    kept = (factor - kept_scale).abs() < 1e-4
    assert bool((dropped | kept).all()), "every sample is either dropped or kept and rescaled"
    if mode == "batch":
        assert bool(dropped.all()) or bool(kept.all())
    else:
        assert 0.35 < kept.float().mean().item() < 0.65  # Binomial(256, 0.5): 8 sigma
    torch.manual_seed(1)
    with torch.no_grad():
        again = block(x)
    assert not torch.equal(again, out) or mode == "batch", "fresh draws on each call"


# ----------------------------------------------------------------------------------------------
# Gradient checkpointing
# ----------------------------------------------------------------------------------------------
def _count_block_runs(patch):
    """A list that grows by one at each block run (each calls dwconv_layernorm once, from
    model.py or patching.py) while `patch` (monkeypatch or one of its contexts) is active."""
    calls = []
    for module in (ck.model, ck.patching):
        op = module.dwconv_layernorm
        patch.setattr(module, "dwconv_layernorm", lambda *a, _op=op, **k: calls.append(1) or _op(*a, **k))
    return calls


@pytest.mark.parametrize("kind", ["fused", "timm", "torchvision"])
def test_grad_checkpointing_with_drop_path(kind, monkeypatch):
    """Recomputation in backward replays the same drop-path draw: identical outputs and gradients.
    And it does recompute: each block's dwconv_layernorm runs twice a step, not once."""
    torch.manual_seed(0)
    if kind == "fused":
        model = ck.ConvNeXtFused(num_classes=5, drop_path_rate=0.5, backend="cpu", **TINY)
        x = torch.randn(4, 3, 32, 32)
    else:
        model = ck.convert_model(_randomise(STAND_INS[kind](drop_path=0.5)), backend="cpu")
        x = _input(kind, n=4)
    blocks = sum(isinstance(m, RecomputableBlock) for m in model.modules())
    calls = _count_block_runs(monkeypatch)
    model.train()
    out, grads = _loss_and_grads(model, x, seed=7)
    assert len(calls) == blocks
    set_grad_checkpointing(model, True)
    calls.clear()
    out_ckpt, grads_ckpt = _loss_and_grads(model, x, seed=7)
    assert len(calls) == 2 * blocks, "each block is recomputed once in backward"
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    for g, g_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-6, atol=1e-7)
    set_grad_checkpointing(model, False)
    calls.clear()
    _loss_and_grads(model, x, seed=7)
    assert len(calls) == blocks


def test_grad_checkpointing_switches_reach_every_block():
    """The method, the attribute and patching.set_grad_checkpointing on a module holding a
    ConvNeXtFused each switch every block."""
    model = ck.ConvNeXtFused(num_classes=5, backend="cpu", **TINY)
    blocks = [m for m in model.modules() if isinstance(m, ck.FusedBlock)]
    model.grad_checkpointing = True
    assert model.grad_checkpointing and all(b.grad_checkpointing for b in blocks)
    model.set_grad_checkpointing(False)
    assert not model.grad_checkpointing and not any(b.grad_checkpointing for b in blocks)
    set_grad_checkpointing(nn.ModuleDict({"backbone": model}), True)
    assert all(b.grad_checkpointing for b in blocks)


def test_grad_checkpointing_keeps_the_stage_hooks():
    """With checkpointing on, ConvNeXtFused still calls each stage module, so hooks on the stages
    run, FSDP2's among them (its all-gather of a stage's parameters is a forward pre-hook: run
    the blocks one by one from the model instead, and they met sharded parameters)."""
    model = ck.ConvNeXtFused(num_classes=5, backend="cpu", **TINY)
    model.set_grad_checkpointing(True)
    seen = []
    for i, stage in enumerate(model.stages):
        stage.register_forward_pre_hook(lambda module, args, i=i: seen.append(i))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert seen == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------
# torch.fx symbolic tracing (torchvision's create_feature_extractor, FX graph-mode quantization)
# ----------------------------------------------------------------------------------------------
def _assert_traces(model, x, monkeypatch):
    """torch.fx.symbolic_trace(model) records the fused ops as calls (or, with gradient
    checkpointing, each block's recomputation) and computes what the model does, in eval and in
    training mode (the same drop-path draws), gradients included; and the traced module pickles."""
    blocks = sum(isinstance(m, RecomputableBlock) for m in model.modules())
    for train, checkpointing in ((False, False), (True, False), (True, True)):
        model.train(train)
        set_grad_checkpointing(model, checkpointing)
        traced = torch.fx.symbolic_trace(model)
        called = {getattr(n.target, "__name__", "") for n in traced.graph.nodes if n.op == "call_function"}
        assert ({"_recompute"} if checkpointing else {"dwconv_layernorm", "mlp_layerscale"}) <= called
        buffer = io.BytesIO()
        torch.save(traced, buffer)
        buffer.seek(0)
        torch.manual_seed(5)
        reloaded = torch.load(buffer, weights_only=False)(x)
        # The traced module holds the model's Parameter objects, under the same names.
        params = dict(traced.named_parameters())
        assert params.keys() == dict(model.named_parameters()).keys()
        assert all(params[n] is p for n, p in model.named_parameters())
        want, want_grads = _loss_and_grads(model, x, seed=5)
        with monkeypatch.context() as patch:  # graph calls hold the originals: only recomputation counts
            calls = _count_block_runs(patch)
            got, got_grads = _loss_and_grads(traced, x, seed=5)  # gradients in the traced module's order
        assert len(calls) == (2 * blocks if checkpointing else 0), "traced checkpointing recomputes each block"
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(reloaded, want, rtol=0, atol=0)
        got_grads = dict(zip(params, got_grads))
        for (name, _), w in zip(model.named_parameters(), want_grads):
            torch.testing.assert_close(got_grads[name], w, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kind", ["fused"] + list(STAND_INS))
def test_fx_symbolic_trace(kind, monkeypatch):
    """Converting a torchvision model used to break its FX tracing ("x must be a torch.Tensor, got
    Proxy": the ops' checks ran on proxies), and ConvNeXtFused never traced."""
    torch.manual_seed(0)
    if kind == "fused":
        model, x = ck.ConvNeXtFused(num_classes=5, drop_path_rate=0.3, backend="cpu", **TINY), torch.randn(2, 3, 32, 32)
    else:
        model, x = ck.convert_model(_randomise(STAND_INS[kind](drop_path=0.3)), backend="cpu"), _input(kind, n=2)
    _assert_traces(model, x, monkeypatch)


def _torchvision_feature_extractor_check(backend, device):
    """torchvision's create_feature_extractor over a converted convnext_tiny gives the unconverted
    model's stage outputs and parameter gradients (eval mode: no drop-path draws)."""
    tv = pytest.importorskip("torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    original = _randomise(tv.models.convnext_tiny(num_classes=10)).to(device).eval()
    model = ck.convert_model(copy.deepcopy(original), backend=backend)
    nodes = {"features.1": "stage1", "features.3": "stage2", "features.5": "stage3", "features.7": "stage4"}
    x = torch.randn(2, 3, 96, 128, device=device)

    def features_and_grads(net):
        features = create_feature_extractor(net, nodes)(x)
        # Every parameter but the classifier's (after the last stage) is reached.
        params = [(n, p) for n, p in net.named_parameters() if not n.startswith("classifier.")]
        grads = torch.autograd.grad(sum(f.square().mean() for f in features.values()), [p for _, p in params])
        return features, dict(zip([n for n, _ in params], grads))

    tf32 = torch.backends.cudnn.allow_tf32  # the stem and downsampling convs in true fp32
    torch.backends.cudnn.allow_tf32 = False
    try:
        want, want_grads = features_and_grads(original)
        got, got_grads = features_and_grads(model)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    for ours, theirs in ((got, want), (got_grads, want_grads)):
        for name, value in theirs.items():
            torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-4 * value.abs().max().item(), msg=name)


def test_torchvision_feature_extractor_of_converted_model():
    _torchvision_feature_extractor_check("cpu", "cpu")


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------
def _train_steps(model, steps, seed=0, batch=4, size=32, compile_backend=None):
    """Losses of `steps` AdamW steps on fixed random data (compiled with fullgraph=True if asked)."""
    gen = torch.Generator().manual_seed(seed)
    data = [(torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, 5, (batch,), generator=gen))
            for _ in range(steps)]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    run = model if compile_backend is None else torch.compile(model, fullgraph=True, backend=compile_backend)
    losses = []
    for step, (x, y) in enumerate(data):
        torch.manual_seed(seed + step)
        loss = F.cross_entropy(run(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _tiny_fused(backend, drop_path_rate=0.0, seed=0):
    torch.manual_seed(seed)
    return ck.ConvNeXtFused(num_classes=5, drop_path_rate=drop_path_rate, layer_scale_init_value=0.5,
                            backend=backend, depths=(1, 1, 1, 1), dims=(40, 80, 160, 320))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_training_matches_eager(backend):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward through the ops.

    (Inductor itself is exercised by the next test; compiling the torch backend's decomposed math
    with inductor costs about a minute on two cores.)
    """
    torch._dynamo.reset()
    eager = _train_steps(_tiny_fused(backend), steps=3)
    compiled = _train_steps(_tiny_fused(backend), steps=3, compile_backend="aot_eager")
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=0)


def test_compile_inductor_with_drop_path_and_checkpointing():
    torch._dynamo.reset()
    model = _tiny_fused("cpu", drop_path_rate=0.3)
    model.set_grad_checkpointing(True)
    model(torch.randn(1, 3, 32, 32))  # resolve the backend before tracing (no recompile on step 2)
    losses = _train_steps(model, steps=3, compile_backend="inductor")
    assert all(torch.isfinite(torch.tensor(losses)))


def test_compile_converted_model_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ck.convert_model(_randomise(TimmConvNeXt(drop_path=0.2, conv_mlp=True)), backend="cpu").train()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    out = compiled(x)
    out.sum().backward()
    torch.manual_seed(5)
    torch.testing.assert_close(out, original(x), rtol=1e-4, atol=1e-5)



def test_compile_fullgraph_under_cpu_fp16_autocast():
    """The model's fp16 conv route (launchers.cpu_fp32_exact, a global setting) traces without a
    graph break: dynamo takes the setting as a constant."""
    torch._dynamo.reset()
    model = _tiny_fused("cpu")
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.float16):
        out, out_eager = compiled(x), model(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, out_eager, rtol=2e-3, atol=2e-3)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())

# ----------------------------------------------------------------------------------------------
# DistributedDataParallel and FSDP2 (gloo, 2 processes)
# ----------------------------------------------------------------------------------------------
DIST_STEPS, DIST_BATCH = 3, 4  # per rank
DIST_TIMEOUT_S = 180


def _dist_data():
    gen = torch.Generator().manual_seed(123)
    return [(torch.randn(2 * DIST_BATCH, 3, 32, 32, generator=gen), torch.randint(0, 5, (2 * DIST_BATCH,), generator=gen))
            for _ in range(DIST_STEPS)]


def _dist_model():
    torch.manual_seed(0)
    return ck.ConvNeXtFused(num_classes=5, layer_scale_init_value=0.5, backend="auto", **TINY)


def _dist_reference():
    """The reference model (torch's own layers) with _dist_model's weights."""
    ref = ConvNeXt(num_classes=5, layer_scale_init_value=0.5, **TINY)
    ref.load_state_dict(_dist_model().state_dict())
    return ref


def _dist_train(model, rank=None):
    """SGD with momentum on _dist_data: this rank's share of each batch, or all of it (rank None:
    the mean loss over the combined batch equals the mean of the ranks' means)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for x, y in _dist_data():
        if rank is not None:
            shard = slice(rank * DIST_BATCH, (rank + 1) * DIST_BATCH)
            x, y = x[shard], y[shard]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()  # DDP and FSDP2 average the gradients over the ranks
        opt.step()


def _init_rank(rank, world_size, port):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return dist


def _ddp_worker(rank, world_size, port, out_dir, compile_backend):
    from torch._dynamo.utils import counters

    dist = _init_rank(rank, world_size, port)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_dist_model())
        # torch.compile of the DDP module, as users write it
        _dist_train(model if compile_backend is None else torch.compile(model, backend=compile_backend), rank)
        torch.save({"state": model.module.state_dict(), "graphs": counters["stats"]["unique_graphs"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        # DDP's reducer must not hold the last reference to the process group: the reducer's
        # destructor keeps the GIL while ProcessGroupGloo's joins its worker threads, and a worker
        # still releasing a finished allreduce waits for the GIL (a deadlock seen under torch
        # 2.13, pytorch/pytorch#56297). Freed here, the group's own binding releases the GIL.
        del model
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(worker, *args):
    """worker(rank, 2, port, *args) in two spawned processes, failing the test on a hang."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    workers = mp.spawn(worker, args=(2, _free_port(), *args), nprocs=2, join=False)
    deadline = time.monotonic() + DIST_TIMEOUT_S
    while not workers.join(timeout=2):  # raises if a worker failed
        if time.monotonic() > deadline:
            for proc in workers.processes:
                proc.kill()
                proc.join(10)
            pytest.fail(f"the workers did not finish within {DIST_TIMEOUT_S} s (a hang, not a slow run: "
                        "they take a few seconds)")


def _mismatch(state, single):
    """How a two-rank state differs from the one-process model (the first parameter), or None.
    Three steps at lr 0.5 move weights by O(1); the two summation orders of the gradient then
    differ by ~1e-6 (up to 2.7e-6 under torch 2.6), far below any averaging mistake."""
    assert state.keys() == single.state_dict().keys()
    for name, value in single.state_dict().items():
        try:
            torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5)
        except AssertionError as e:
            return f"{name}: {e}"
    return None


def _assert_ranks_match_single_process(rank0, rank1):
    single = _dist_model()
    _dist_train(single)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
    wrong = _mismatch(rank0, single)
    assert wrong is None, f"2 ranks vs 1 process: {wrong}"
    initial = _dist_model().state_dict()
    assert any(not torch.equal(initial[n], v) for n, v in rank0.items()), "training changed nothing"


@pytest.mark.parametrize("compile_backend", [None, "aot_eager"], ids=["eager", "compiled"])
def test_ddp_gloo_two_processes_match_single_process(tmp_path, compile_backend):
    _run_two_ranks(_ddp_worker, str(tmp_path), compile_backend)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert (rank0["graphs"] > 0) == (compile_backend is not None), "compiled: dynamo made graphs"
    _assert_ranks_match_single_process(rank0["state"], rank1["state"])


def _fully_shard_per_stage(model, mesh, **kwargs):
    """fully_shard each stage (its parameters gathered around its forward and backward), then the
    root."""
    from torch.distributed.fsdp import fully_shard

    for stage in model.stages:
        fully_shard(stage, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)


def _skip_or_fail_on_fsdp2_control(control):
    """control: how torch's own layers failed under FSDP2 on CPU, or None. Seen under torch 2.6 (an
    error) and 2.7 (gradients summed over the ranks), where the test skips; later versions must
    pass the control, or the set-up here is wrong."""
    if control is None:
        return
    if torch.__version__ < (2, 8):  # TorchVersion compares as a version
        pytest.skip(f"FSDP2 on CPU under torch {torch.__version__} {control}")
    pytest.fail(f"FSDP2 on CPU under torch {torch.__version__} {control}")


def _fsdp_worker(rank, world_size, port, out_dir, checkpointing):
    import warnings

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist = _init_rank(rank, world_size, port)
    full = StateDictOptions(full_state_dict=True)
    result = {}
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        # The control: torch's own layers under FSDP2 (on CPU, torch 2.6 fails and 2.7 sums the
        # ranks' gradients instead of averaging them).
        reference = _dist_reference()
        fully_shard(reference, mesh=mesh)
        try:
            _dist_train(reference, rank)
        except Exception as e:  # noqa: BLE001  (reported by the test as torch's, with its message)
            result["reference_error"] = f"{type(e).__name__}: {e}"
        else:
            result["reference"] = get_model_state_dict(reference, options=full)
            model = _dist_model()
            model.set_grad_checkpointing(checkpointing)
            _fully_shard_per_stage(model, mesh)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _dist_train(model, rank)
            result["fused"] = get_model_state_dict(model, options=full)
            result["view_warnings"] = [str(w.message) for w in caught if "view" in str(w.message)]
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_checkpointing"])
def test_fsdp2_gloo_two_processes_match_single_process(tmp_path, checkpointing):
    """FSDP2 (fully_shard per stage and at the root) on CPU with gloo: the fused ops see the
    gathered parameters, the ranks agree and match one process on the combined batch. With
    gradient checkpointing the model used to run the blocks past the stage modules, so the
    blocks met sharded DTensor parameters ("got mixed torch.Tensor and DTensor")."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (public from torch 2.6)
    except ImportError as e:
        pytest.skip(f"no torch.distributed.fsdp.fully_shard in torch {torch.__version__}: {e}")
    _run_two_ranks(_fsdp_worker, str(tmp_path), checkpointing)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    if "reference_error" in rank0:
        control = f"fails with torch's own layers too: {rank0['reference_error']}"
    else:
        single_reference = _dist_reference()
        _dist_train(single_reference)
        wrong = _mismatch(rank0["reference"], single_reference)
        control = None if wrong is None else f"does not match one process with torch's own layers either ({wrong})"
    _skip_or_fail_on_fsdp2_control(control)
    # FSDP2 warns about a wrapped module whose output is a view; the stages return the ops' outputs.
    assert rank0["view_warnings"] == [] and rank1["view_warnings"] == []
    _assert_ranks_match_single_process(rank0["fused"], rank1["fused"])


def _mp_batch():
    """One batch for the FSDP2 mixed-precision test: 64x64 images, so that the stem's LayerNorm
    sums its weight gradient over 4 x 16 x 16 pixels a rank (torch's CPU bf16 layer_norm rounds
    such sums to bf16, which ConvNeXtFused avoids: reference.layer_norm)."""
    gen = torch.Generator().manual_seed(7)
    return torch.randn(2 * DIST_BATCH, 3, 64, 64, generator=gen), torch.randint(0, 5, (2 * DIST_BATCH,), generator=gen)


def _fsdp_mixed_precision_worker(rank, world_size, port, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dist = _init_rank(rank, world_size, port)
    result = {}
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        # bf16 compute, fp32 parameters and gradient reduction: the usual FSDP2 training set-up
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        x, y = _mp_batch()
        shard = slice(rank * DIST_BATCH, (rank + 1) * DIST_BATCH)
        # the reference (torch's own layers) is the control and the same-dtype baseline
        for name, model in (("reference", _dist_reference()), ("fused", _dist_model())):
            _fully_shard_per_stage(model, mesh, mp_policy=policy)
            try:
                out = model(x[shard])
                F.cross_entropy(out.float(), y[shard]).backward()
                result[name] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
                result[name + "_out_dtype"] = out.dtype
            except Exception as e:  # noqa: BLE001  (reported by the test, with torch's message)
                result[name + "_error"] = f"{type(e).__name__}: {e}"
                break
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_bf16_mixed_precision_gloo(tmp_path):
    """FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on two gloo processes:
    the fused model computes in bf16 and every fp32 gradient is within twice the reference
    model's own error under the same policy (against one float64 process on the combined
    batch). Norms per parameter (not maxima): a bf16 error that a loose elementwise atol hides,
    such as torch's CPU bf16 layer_norm weight gradients (2-3x the reference's), fails."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: F401
    except ImportError as e:
        pytest.skip(f"no FSDP2 MixedPrecisionPolicy in torch {torch.__version__}: {e}")
    _run_two_ranks(_fsdp_mixed_precision_worker, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert "fused_error" not in rank0, rank0.get("fused_error")
    ref64 = _dist_reference().double()
    x, y = _mp_batch()
    F.cross_entropy(ref64(x.double()), y).backward()
    grads64 = {n: p.grad for n, p in ref64.named_parameters()}

    def rel_err(grads, name):
        return ((grads[name].double() - grads64[name]).norm() / grads64[name].norm()).item()

    if "reference_error" in rank0:
        control = f"fails with torch's own layers too: {rank0['reference_error']}"
    else:
        worst = max(grads64, key=lambda n: rel_err(rank0["reference"], n))
        control = None if rel_err(rank0["reference"], worst) < 0.05 else (
            f"does not match one process with torch's own layers either ({worst}: relative error "
            f"{rel_err(rank0['reference'], worst):.3f})")
    _skip_or_fail_on_fsdp2_control(control)
    assert rank0["fused_out_dtype"] == rank0["reference_out_dtype"] == torch.bfloat16
    assert rank0["fused"].keys() == grads64.keys()
    for name, grad in rank0["fused"].items():
        assert grad.dtype == torch.float32, f"{name}: gradient in {grad.dtype}"
        assert torch.equal(grad, rank1["fused"][name]), f"{name} differs between ranks"
        err, err_ref = rel_err(rank0["fused"], name), rel_err(rank0["reference"], name)
        assert err <= 2 * err_ref + 1e-3, f"{name}: relative error {err:.2e} > 2 x the reference's {err_ref:.2e} + 1e-3"


# ----------------------------------------------------------------------------------------------
# Convergence: fused vs reference
# ----------------------------------------------------------------------------------------------
def _digits(n, size=32, seed=0):
    """n images of scikit-learn's digits (8x8, shipped with the package) upsampled to size x size RGB."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(digits.target), generator=gen)[:n]
    x = torch.tensor(digits.images, dtype=torch.float32)[idx].unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    return (x - 0.3) / 0.4, torch.tensor(digits.target)[idx]


def _convergence_losses(model, x, y, steps, batch, device="cpu", autocast_dtype=None):
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    losses = []
    for step in range(steps):
        i = (step * batch) % (len(x) - batch)
        xb, yb = x[i:i + batch].to(device), y[i:i + batch].to(device)
        torch.manual_seed(1000 + step)  # the same drop-path draws for both models
        with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


def _convergence_pair(backend, cfg, drop_path_rate=0.1):
    torch.manual_seed(0)
    ref = ConvNeXt(num_classes=10, drop_path_rate=drop_path_rate, **cfg)
    fused = ck.ConvNeXtFused(num_classes=10, drop_path_rate=drop_path_rate, backend=backend, **cfg)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["cuda"])  # cuda: the CUDA kernels, emulated
def test_convergence_fused_matches_reference_fp32(backend):
    x, y = _digits(512)
    ref, fused = _convergence_pair(backend, TINY)
    steps = 32
    ref_losses = _convergence_losses(ref, x, y, steps, batch=16)
    fused_losses = _convergence_losses(fused, x, y, steps, batch=16)
    rel = ((fused_losses - ref_losses).abs() / ref_losses.abs()).max().item()
    assert rel <= 1e-4, f"max per-step relative loss difference {rel:.2e}"
    assert ref_losses[-8:].mean() < 0.8 * ref_losses[:4].mean(), "the loss should fall (the run trains)"


# ----------------------------------------------------------------------------------------------
# The training example
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compile"])
def test_train_example_smoke(tmp_path, compile_):
    """The example end to end, against the reference model with the same drop-path masks: the
    losses agree to rounding. Compiled, that needs Inductor to draw the masks with torch.rand
    (without it the losses differed by 2e-4 relative at drop path 0.5)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    cmd = [sys.executable, str(REPO / "examples" / "train.py"), "--steps", "3", "--batch-size", "8",
           "--image-size", "32", "--model", "atto", "--depths", "1,1,1,1", "--eval-every", "2",
           "--drop-path", "0.5", "--compare-reference", "--out", str(tmp_path), "--no-progress",
           "--device", "cpu"]  # fp32 on any machine (on a GPU the default is bf16 autocast)
    if compile_:
        cmd.append("--compile")
    # The example imports the same convnext_kernels as this test (installed or the checkout).
    env = package_subprocess_env()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "max |loss diff|" in run.stdout and "accuracy" in run.stdout
    assert (tmp_path / "curves.png").stat().st_size > 0
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["max_rel_loss_diff"] < 1e-5, run.stdout


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_convert_real_models_gpu(library, backend):
    if library == "timm":
        timm = pytest.importorskip("timm")
        make = lambda: timm.create_model("convnext_atto", num_classes=10)  # noqa: E731
        v2 = timm.create_model("convnextv2_atto")
        with pytest.raises(UnsupportedBlockError, match="ConvNeXtBlock"):
            ck.convert_model(v2)
    else:
        tv = pytest.importorskip("torchvision")
        make = lambda: tv.models.convnext_tiny(num_classes=10)  # noqa: E731
    torch.manual_seed(0)
    original = _randomise(make()).cuda()
    model = ck.convert_model(copy.deepcopy(original), backend=backend)
    assert list(model.state_dict()) == list(original.state_dict())
    assert any(isinstance(m, ConvertedBlock) for m in model.modules())
    x = torch.randn(2, 3, 96, 128, device="cuda")
    ref64 = copy.deepcopy(original).double()
    # The stem and downsampling convs stay cuDNN convs: keep them in true fp32 for the fp32 rule.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        out64, grads64 = _loss_and_grads(ref64.eval(), x.double())
        out32, grads32 = _loss_and_grads(original.eval(), x)
        out, grads = _loss_and_grads(model.eval(), x)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert_pass_rule("output", out, out64, out32, torch.float32)
    for (name, _), g, g64, g32 in zip(model.named_parameters(), grads, grads64, grads32):
        assert_pass_rule(f"grad {name}", g, g64, g32, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_torchvision_feature_extractor_of_converted_model_gpu(backend):
    _torchvision_feature_extractor_check(backend, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compile_fullgraph_training_gpu(backend):
    torch._dynamo.reset()
    eager_model = _tiny_fused(backend, drop_path_rate=0.0).cuda()
    compiled_model = _tiny_fused(backend, drop_path_rate=0.0).cuda()

    def steps(model, compile_backend):
        gen = torch.Generator().manual_seed(0)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        run = model if compile_backend is None else torch.compile(model, fullgraph=True, backend=compile_backend)
        out = []
        for _ in range(3):
            x = torch.randn(8, 3, 64, 64, generator=gen).cuda()
            y = torch.randint(0, 5, (8,), generator=gen).cuda()
            loss = F.cross_entropy(run(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return torch.tensor(out)

    torch.testing.assert_close(steps(compiled_model, "inductor"), steps(eager_model, None), rtol=1e-3, atol=0)


def _check_bf16_within_reference_spread(backend, device):
    """bf16 autocast: |fused_bf16 - ref_fp32| stays within the reference's own |ref_bf16 - ref_fp32|."""
    x, y = _digits(1024, size=64)
    cfg = dict(depths=(2, 2, 2, 2), dims=(40, 80, 160, 320))
    # 30 steps of 16 images: on 2 CPU cores 44 s, against 112 s for 40 of 32 (CPU bf16 convs are
    # slow); the margins stay alike (largest step difference 0.0054 against a spread of 0.0065).
    steps, batch = 30, 16
    ref, fused = _convergence_pair(backend, cfg)
    ref_bf16 = copy.deepcopy(ref)
    ref32 = _convergence_losses(ref.to(device), x, y, steps, batch=batch, device=device)
    ref16 = _convergence_losses(ref_bf16.to(device), x, y, steps, batch=batch, device=device,
                                autocast_dtype=torch.bfloat16)
    fused16 = _convergence_losses(fused.to(device), x, y, steps, batch=batch, device=device,
                                  autocast_dtype=torch.bfloat16)
    spread = (ref16 - ref32).abs()
    diff = (fused16 - ref32).abs()
    report = f"|fused bf16 - ref fp32| {diff.tolist()}\n|ref bf16 - ref fp32| {spread.tolist()}"
    # Every step within twice the largest spread (one step's spread can be near zero by chance),
    # and on average within twice the average spread.
    assert bool((diff <= 2 * spread.max() + 1e-3 * ref32.abs()).all()), report
    assert diff.mean() <= 2 * spread.mean() + 1e-3, report


def test_convergence_bf16_within_reference_spread_cpu():
    # CPU autocast runs the convs and Linears in bf16 too; the fused cpu backend in bf16.
    _check_bf16_within_reference_spread("cpu", "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_convergence_bf16_within_reference_spread_gpu(backend):
    _check_bf16_within_reference_spread(backend, "cuda")
