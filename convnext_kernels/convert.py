"""Checkpoint layouts: timm, torchvision and Hugging Face (ConvNeXt, DINOv3 ConvNeXt) state dicts to official names.

The official (facebookresearch/ConvNeXt) names are the ones ConvNeXtFused and
reference.ConvNeXt use. Each layout is a list of (pattern, replacement) rules over whole keys;
a key no rule matches is an error naming it, never silently dropped.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

__all__ = ["convert_state_dict", "detect_layout"]


def _block_rules(block: str, names: tuple, stage: str = "s") -> list:
    """A layout's rules for the block parameters. block: the pattern of a block's key prefix (groups
    for the stage and b, the block index); names: the layout's names of the official dwconv,
    norm, pwconv1, pwconv2 and gamma; stage: the template field that holds the official stage."""
    parts = ("dwconv", "norm", "pwconv1", "pwconv2")
    rules = [(rf"{block}\.{re.escape(name)}\.(?P<p>weight|bias)", f"stages.{{{stage}}}.{{b}}.{part}.{{p}}")
             for part, name in zip(parts, names)]
    return rules + [(rf"{block}\.{re.escape(names[4])}", f"stages.{{{stage}}}.{{b}}.gamma")]


_TIMM_RULES = [
    (r"stem\.(?P<i>[01])\.(?P<p>weight|bias)", "downsample_layers.0.{i}.{p}"),
    (r"stages\.(?P<s>\d+)\.downsample\.(?P<i>[01])\.(?P<p>weight|bias)", "downsample_layers.{s}.{i}.{p}"),
    *_block_rules(r"stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)", ("conv_dw", "norm", "mlp.fc1", "mlp.fc2", "gamma")),
    (r"head\.norm\.(?P<p>weight|bias)", "norm.{p}"),
    (r"head\.fc\.(?P<p>weight|bias)", "head.{p}"),
]

# torchvision: features.0 = stem, features.{1,3,5,7} = stages 0..3, features.{2,4,6} = downsample 1..3.
_TORCHVISION_RULES = [
    (r"features\.0\.(?P<i>[01])\.(?P<p>weight|bias)", "downsample_layers.0.{i}.{p}"),
    (r"features\.(?P<f>[246])\.(?P<i>[01])\.(?P<p>weight|bias)", "downsample_layers.{down}.{i}.{p}"),
    *_block_rules(r"features\.(?P<f>[1357])\.(?P<b>\d+)", ("block.0", "block.2", "block.3", "block.5", "layer_scale"),
                  stage="stage"),
    (r"classifier\.0\.(?P<p>weight|bias)", "norm.{p}"),
    (r"classifier\.2\.(?P<p>weight|bias)", "head.{p}"),
]

_HF = r"convnext\.encoder\.stages\.(?P<s>\d+)"
_HF_RULES = [
    (r"convnext\.embeddings\.patch_embeddings\.(?P<p>weight|bias)", "downsample_layers.0.0.{p}"),
    (r"convnext\.embeddings\.layernorm\.(?P<p>weight|bias)", "downsample_layers.0.1.{p}"),
    (_HF + r"\.downsampling_layer\.(?P<i>[01])\.(?P<p>weight|bias)", "downsample_layers.{s}.{i}.{p}"),
    *_block_rules(_HF + r"\.layers\.(?P<b>\d+)", ("dwconv", "layernorm", "pwconv1", "pwconv2", "layer_scale_parameter")),
    (r"convnext\.layernorm\.(?P<p>weight|bias)", "norm.{p}"),
    (r"classifier\.(?P<p>weight|bias)", "head.{p}"),
]

# transformers' DINOv3ConvNextModel (DINOv3's ConvNeXt backbones): no classifier; its final
# layer_norm normalises the pooled features as the official head norm does.
_DINOV3 = r"model\.stages\.(?P<s>\d+)"
_DINOV3_RULES = [
    (_DINOV3 + r"\.downsample_layers\.(?P<i>[01])\.(?P<p>weight|bias)", "downsample_layers.{s}.{i}.{p}"),
    *_block_rules(_DINOV3 + r"\.layers\.(?P<b>\d+)",
                  ("depthwise_conv", "layer_norm", "pointwise_conv1", "pointwise_conv2", "gamma")),
    (r"layer_norm\.(?P<p>weight|bias)", "norm.{p}"),
]

_OFFICIAL_RULES = [
    (r"downsample_layers\.\d+\.[01]\.(weight|bias)", None),
    (r"stages\.\d+\.\d+\.(dwconv|norm|pwconv1|pwconv2)\.(weight|bias)", None),
    (r"stages\.\d+\.\d+\.gamma", None),
    (r"(norm|head)\.(weight|bias)", None),
]

_LAYOUTS = {"official": _OFFICIAL_RULES, "timm": _TIMM_RULES, "torchvision": _TORCHVISION_RULES,
            "hf": _HF_RULES, "hf_dinov3": _DINOV3_RULES}

# A key that only one layout has, to tell them apart.
_MARKERS = [
    ("hf", r"convnext\.embeddings\."),
    ("hf_dinov3", r"model\.stages\.\d+\.downsample_layers\."),
    ("torchvision", r"features\.0\.0\."),
    ("timm", r"stem\.0\."),
    ("official", r"downsample_layers\.0\.0\."),
]

# Buffers and bookkeeping that carry no weights (HF / timm extras) and are dropped on purpose.
_IGNORED = re.compile(r".*num_batches_tracked$")


def _format(template: str, groups: dict) -> str:
    """Fill the template; torchvision's features index f also yields {down} and {stage}."""
    if "f" in groups:
        f = int(groups["f"])
        groups = dict(groups, down=str(f // 2), stage=str((f - 1) // 2))
    return template.format(**groups)


def _unwrap(state_dict: Mapping) -> Mapping:
    for key in ("model", "state_dict"):
        inner = state_dict.get(key) if isinstance(state_dict, Mapping) else None
        if isinstance(inner, Mapping):
            return _unwrap(inner)
    return state_dict


def detect_layout(state_dict: Mapping) -> str:
    """'official', 'timm', 'torchvision', 'hf' or 'hf_dinov3', from the keys of a (unwrapped) state dict."""
    keys = list(state_dict.keys())
    for layout, marker in _MARKERS:
        if any(re.match(marker, k) for k in keys):
            return layout
    raise ValueError(
        "unrecognised ConvNeXt state dict: expected official (downsample_layers.*), timm (stem.*), "
        f"torchvision (features.*) or Hugging Face (convnext.*, DINOv3 model.stages.*) keys; first keys: {keys[:5]}"
    )


def _to_official_tensor(new_key: str, value: torch.Tensor) -> torch.Tensor:
    # timm conv_mlp models store the Linear weights as 1x1 convs; torchvision's layer scale is (C, 1, 1).
    if re.search(r"pwconv[12]\.weight$", new_key) and value.dim() == 4:
        return value.flatten(1)
    if new_key.endswith(".gamma") and value.dim() > 1:
        return value.reshape(-1)
    return value


def convert_state_dict(state_dict: Mapping) -> dict:
    """Map an official, timm, torchvision or Hugging Face (ConvNeXt or DINOv3 ConvNeXt) state dict to
    official names. DINOv3's have no classifier: load them into ConvNeXtFused(num_classes=0).

    Accepts dicts that wrap the weights under "model" or "state_dict" and DDP "module." prefixes.
    Raises ValueError naming every key that belongs to no known ConvNeXt parameter.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    sd = _unwrap(state_dict)
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    layout = detect_layout(sd)
    rules = [(re.compile(p + r"$"), t) for p, t in _LAYOUTS[layout]]
    out, unknown = {}, []
    for key, value in sd.items():
        if _IGNORED.match(key):
            continue
        for pattern, template in rules:
            m = pattern.match(key)
            if m:
                new_key = key if template is None else _format(template, m.groupdict())
                out[new_key] = _to_official_tensor(new_key, value)
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{layout} ConvNeXt state dict has keys with no ConvNeXt parameter: {unknown}")
    return out
