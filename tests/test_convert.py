"""Checkpoint layouts: official, timm, torchvision and Hugging Face load into ConvNeXtFused."""

import re

import pytest
import torch

import convnext_kernels as ck
from convnext_kernels.reference import ConvNeXt

from conftest import transformers_with_dinov3

CFG = dict(depths=(2, 2, 3, 2), dims=(40, 80, 160, 320), num_classes=10)


def _official():
    torch.manual_seed(0)
    ref = ConvNeXt(**CFG, layer_scale_init_value=0.3)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


# The other layouts, written out key by key from each project's module structure.
def _to_timm(sd, conv_mlp=False):
    out = {}
    for k, v in sd.items():
        if m := re.fullmatch(r"downsample_layers\.0\.(\d)\.(.+)", k):
            k = f"stem.{m[1]}.{m[2]}"
        elif m := re.fullmatch(r"downsample_layers\.(\d)\.(\d)\.(.+)", k):
            k = f"stages.{m[1]}.downsample.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"stages\.(\d)\.(\d+)\.(\w+)(\.\w+)?", k):
            part = {"dwconv": "conv_dw", "norm": "norm", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2",
                    "gamma": "gamma"}[m[3]]
            k = f"stages.{m[1]}.blocks.{m[2]}.{part}{m[4] or ''}"
            if conv_mlp and "mlp.fc" in k and k.endswith("weight"):
                v = v[:, :, None, None]
        elif m := re.fullmatch(r"norm\.(.+)", k):
            k = f"head.norm.{m[1]}"
        elif m := re.fullmatch(r"head\.(.+)", k):
            k = f"head.fc.{m[1]}"
        out[k] = v
    return out


def _to_torchvision(sd):
    out = {}
    for k, v in sd.items():
        if m := re.fullmatch(r"downsample_layers\.(\d)\.(\d)\.(.+)", k):
            k = f"features.{2 * int(m[1])}.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"stages\.(\d)\.(\d+)\.gamma", k):
            k, v = f"features.{2 * int(m[1]) + 1}.{m[2]}.layer_scale", v.view(-1, 1, 1)
        elif m := re.fullmatch(r"stages\.(\d)\.(\d+)\.(\w+)\.(\w+)", k):
            idx = {"dwconv": 0, "norm": 2, "pwconv1": 3, "pwconv2": 5}[m[3]]
            k = f"features.{2 * int(m[1]) + 1}.{m[2]}.block.{idx}.{m[4]}"
        elif m := re.fullmatch(r"norm\.(.+)", k):
            k = f"classifier.0.{m[1]}"
        elif m := re.fullmatch(r"head\.(.+)", k):
            k = f"classifier.2.{m[1]}"
        out[k] = v
    return out


def _to_hf(sd):
    out = {}
    for k, v in sd.items():
        if m := re.fullmatch(r"downsample_layers\.0\.0\.(.+)", k):
            k = f"convnext.embeddings.patch_embeddings.{m[1]}"
        elif m := re.fullmatch(r"downsample_layers\.0\.1\.(.+)", k):
            k = f"convnext.embeddings.layernorm.{m[1]}"
        elif m := re.fullmatch(r"downsample_layers\.(\d)\.(\d)\.(.+)", k):
            k = f"convnext.encoder.stages.{m[1]}.downsampling_layer.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"stages\.(\d)\.(\d+)\.gamma", k):
            k = f"convnext.encoder.stages.{m[1]}.layers.{m[2]}.layer_scale_parameter"
        elif m := re.fullmatch(r"stages\.(\d)\.(\d+)\.(\w+)\.(\w+)", k):
            part = "layernorm" if m[3] == "norm" else m[3]
            k = f"convnext.encoder.stages.{m[1]}.layers.{m[2]}.{part}.{m[4]}"
        elif m := re.fullmatch(r"norm\.(.+)", k):
            k = f"convnext.layernorm.{m[1]}"
        elif m := re.fullmatch(r"head\.(.+)", k):
            k = f"classifier.{m[1]}"
        out[k] = v
    return out


def _to_hf_dinov3(sd):
    """transformers' DINOv3ConvNextModel: no classifier, so the head's keys are dropped."""
    out = {}
    for k, v in sd.items():
        if m := re.fullmatch(r"downsample_layers\.(\d)\.(\d)\.(.+)", k):
            k = f"model.stages.{m[1]}.downsample_layers.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"stages\.(\d)\.(\d+)\.gamma", k):
            k = f"model.stages.{m[1]}.layers.{m[2]}.gamma"
        elif m := re.fullmatch(r"stages\.(\d)\.(\d+)\.(\w+)\.(\w+)", k):
            part = {"dwconv": "depthwise_conv", "norm": "layer_norm", "pwconv1": "pointwise_conv1",
                    "pwconv2": "pointwise_conv2"}[m[3]]
            k = f"model.stages.{m[1]}.layers.{m[2]}.{part}.{m[4]}"
        elif m := re.fullmatch(r"norm\.(.+)", k):
            k = f"layer_norm.{m[1]}"
        elif k.startswith("head."):
            continue
        out[k] = v
    return out


LAYOUTS = {
    "official": lambda sd: sd,
    "official_wrapped": lambda sd: {"model": sd, "epoch": 300},
    "timm": _to_timm,
    "timm_conv_mlp": lambda sd: _to_timm(sd, conv_mlp=True),
    "timm_wrapped_ddp": lambda sd: {"state_dict": {f"module.{k}": v for k, v in _to_timm(sd).items()}},
    "torchvision": _to_torchvision,
    "hf": _to_hf,
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_and_matches(layout):
    ref = _official().eval()
    converted = LAYOUTS[layout](ref.state_dict())
    fused = ck.ConvNeXtFused(**CFG, layer_scale_init_value=0.3, backend="torch").eval()
    fused.load_state_dict(converted)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4)
    # And the mapping is exact, key for key.
    sd = ck.convert_state_dict(converted)
    assert sd.keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(sd[k], v), k


def test_unknown_and_missing_keys_are_named():
    sd = _to_timm(_official().state_dict())
    sd["stages.1.blocks.0.mlp.grn.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"stages\.1\.blocks\.0\.mlp\.grn\.weight"):
        ck.convert_state_dict(sd)
    sd = _official().state_dict()
    del sd["stages.2.1.pwconv1.bias"]
    fused = ck.ConvNeXtFused(**CFG, layer_scale_init_value=0.3, backend="torch")
    with pytest.raises(RuntimeError, match=r"stages\.2\.1\.pwconv1\.bias"):
        fused.load_state_dict(sd)
    with pytest.raises(ValueError, match="unrecognised ConvNeXt state dict"):
        ck.convert_state_dict({"conv1.weight": torch.ones(1)})
    with pytest.raises(TypeError, match="mapping"):
        ck.convert_state_dict([1, 2])


def test_real_timm_model():
    timm = pytest.importorskip("timm")
    for name, dims, depths in [("convnext_atto", (40, 80, 160, 320), (2, 2, 6, 2)),
                               ("convnext_tiny", (96, 192, 384, 768), (3, 3, 9, 3))]:
        src = timm.create_model(name, pretrained=False, num_classes=10).eval()
        fused = ck.ConvNeXtFused(depths=depths, dims=dims, num_classes=10, backend="torch").eval()
        fused.load_state_dict(src.state_dict())
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), src(x), rtol=1e-4, atol=1e-4)


def test_real_torchvision_model():
    tv = pytest.importorskip("torchvision")
    src = tv.models.convnext_tiny(weights=None, num_classes=10).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    fused = ck.convnext_tiny(num_classes=10, backend="torch").eval()
    fused.load_state_dict(src.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), src(x), rtol=1e-4, atol=1e-4)


def test_real_hugging_face_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(hidden_sizes=list(CFG["dims"]), depths=list(CFG["depths"]),
                                         num_labels=CFG["num_classes"], layer_scale_init_value=0.3)
    src = transformers.ConvNextForImageClassification(config).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fused = ck.ConvNeXtFused(**CFG, layer_scale_init_value=0.3, backend="torch").eval()
    fused.load_state_dict(src.state_dict())
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), src(x).logits, rtol=1e-4, atol=1e-4)


def test_dinov3_layout_loads_into_a_model_without_classifier():
    ref = _official().eval()
    converted = _to_hf_dinov3(ref.state_dict())
    cfg = {k: v for k, v in CFG.items() if k != "num_classes"}
    fused = ck.ConvNeXtFused(**cfg, num_classes=0, layer_scale_init_value=0.3, backend="torch").eval()
    assert not any(k.startswith("head.") for k in fused.state_dict())
    fused.load_state_dict(converted)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref.forward_features(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused(x), fused.forward_features(x), rtol=0, atol=0)
    sd, expected = ck.convert_state_dict(converted), {k: v for k, v in ref.state_dict().items() if not k.startswith("head.")}
    assert sd.keys() == expected.keys() and all(torch.equal(sd[k], v) for k, v in expected.items())
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        ck.ConvNeXtFused(num_classes=-1)


def test_real_hugging_face_dinov3_model():
    transformers = transformers_with_dinov3()
    torch.manual_seed(0)
    config = transformers.DINOv3ConvNextConfig(hidden_sizes=list(CFG["dims"]), depths=list(CFG["depths"]),
                                               layer_scale_init_value=0.3)
    src = transformers.DINOv3ConvNextModel(config).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg = {k: v for k, v in CFG.items() if k != "num_classes"}
    fused = ck.ConvNeXtFused(**cfg, num_classes=0, layer_scale_init_value=0.3, backend="torch").eval()
    fused.load_state_dict(src.state_dict())
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), src(x).pooler_output, rtol=1e-4, atol=1e-4)
