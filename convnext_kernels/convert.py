"""Checkpoint layouts: timm, torchvision and Hugging Face ConvNeXt state dicts to official names.

The official (facebookresearch/ConvNeXt) names are the ones ConvNeXtFused and
reference.ConvNeXt use. Each layout is a list of (pattern, replacement) rules over whole keys;
a key no rule matches is an error naming it, never silently dropped.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

__all__ = ["convert_state_dict", "detect_layout"]


_TIMM_RULES = [
    (r"stem\.(?P<i>[01])\.(?P<p>weight|bias)", "downsample_layers.0.{i}.{p}"),
    (r"stages\.(?P<s>\d+)\.downsample\.(?P<i>[01])\.(?P<p>weight|bias)", "downsample_layers.{s}.{i}.{p}"),
    (r"stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.conv_dw\.(?P<p>weight|bias)", "stages.{s}.{b}.dwconv.{p}"),
    (r"stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.norm\.(?P<p>weight|bias)", "stages.{s}.{b}.norm.{p}"),
    (r"stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.mlp\.fc1\.(?P<p>weight|bias)", "stages.{s}.{b}.pwconv1.{p}"),
    (r"stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.mlp\.fc2\.(?P<p>weight|bias)", "stages.{s}.{b}.pwconv2.{p}"),
    (r"stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.gamma", "stages.{s}.{b}.gamma"),
    (r"head\.norm\.(?P<p>weight|bias)", "norm.{p}"),
    (r"head\.fc\.(?P<p>weight|bias)", "head.{p}"),
]

# torchvision: features.0 = stem, features.{1,3,5,7} = stages 0..3, features.{2,4,6} = downsample 1..3.
_TORCHVISION_RULES = [
    (r"features\.0\.(?P<i>[01])\.(?P<p>weight|bias)", "downsample_layers.0.{i}.{p}"),
    (r"features\.(?P<f>[246])\.(?P<i>[01])\.(?P<p>weight|bias)", "downsample_layers.{down}.{i}.{p}"),
    (r"features\.(?P<f>[1357])\.(?P<b>\d+)\.block\.0\.(?P<p>weight|bias)", "stages.{stage}.{b}.dwconv.{p}"),
    (r"features\.(?P<f>[1357])\.(?P<b>\d+)\.block\.2\.(?P<p>weight|bias)", "stages.{stage}.{b}.norm.{p}"),
    (r"features\.(?P<f>[1357])\.(?P<b>\d+)\.block\.3\.(?P<p>weight|bias)", "stages.{stage}.{b}.pwconv1.{p}"),
    (r"features\.(?P<f>[1357])\.(?P<b>\d+)\.block\.5\.(?P<p>weight|bias)", "stages.{stage}.{b}.pwconv2.{p}"),
    (r"features\.(?P<f>[1357])\.(?P<b>\d+)\.layer_scale", "stages.{stage}.{b}.gamma"),
    (r"classifier\.0\.(?P<p>weight|bias)", "norm.{p}"),
    (r"classifier\.2\.(?P<p>weight|bias)", "head.{p}"),
]

_HF = r"convnext\.encoder\.stages\.(?P<s>\d+)"
_HF_RULES = [
    (r"convnext\.embeddings\.patch_embeddings\.(?P<p>weight|bias)", "downsample_layers.0.0.{p}"),
    (r"convnext\.embeddings\.layernorm\.(?P<p>weight|bias)", "downsample_layers.0.1.{p}"),
    (_HF + r"\.downsampling_layer\.(?P<i>[01])\.(?P<p>weight|bias)", "downsample_layers.{s}.{i}.{p}"),
    (_HF + r"\.layers\.(?P<b>\d+)\.dwconv\.(?P<p>weight|bias)", "stages.{s}.{b}.dwconv.{p}"),
    (_HF + r"\.layers\.(?P<b>\d+)\.layernorm\.(?P<p>weight|bias)", "stages.{s}.{b}.norm.{p}"),
    (_HF + r"\.layers\.(?P<b>\d+)\.pwconv1\.(?P<p>weight|bias)", "stages.{s}.{b}.pwconv1.{p}"),
    (_HF + r"\.layers\.(?P<b>\d+)\.pwconv2\.(?P<p>weight|bias)", "stages.{s}.{b}.pwconv2.{p}"),
    (_HF + r"\.layers\.(?P<b>\d+)\.layer_scale_parameter", "stages.{s}.{b}.gamma"),
    (r"convnext\.layernorm\.(?P<p>weight|bias)", "norm.{p}"),
    (r"classifier\.(?P<p>weight|bias)", "head.{p}"),
]

_OFFICIAL_RULES = [
    (r"downsample_layers\.\d+\.[01]\.(weight|bias)", None),
    (r"stages\.\d+\.\d+\.(dwconv|norm|pwconv1|pwconv2)\.(weight|bias)", None),
    (r"stages\.\d+\.\d+\.gamma", None),
    (r"(norm|head)\.(weight|bias)", None),
]

_LAYOUTS = {"official": _OFFICIAL_RULES, "timm": _TIMM_RULES, "torchvision": _TORCHVISION_RULES,
            "hf": _HF_RULES}

# A key that only one layout has, to tell them apart.
_MARKERS = [
    ("hf", r"convnext\.embeddings\."),
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
    """'official', 'timm', 'torchvision' or 'hf', from the keys of a (unwrapped) state dict."""
    keys = list(state_dict.keys())
    for layout, marker in _MARKERS:
        if any(re.match(marker, k) for k in keys):
            return layout
    raise ValueError(
        "unrecognised ConvNeXt state dict: expected official (downsample_layers.*), timm (stem.*), "
        f"torchvision (features.*) or Hugging Face (convnext.*) keys; first keys: {keys[:5]}"
    )


def _to_official_tensor(new_key: str, value: torch.Tensor) -> torch.Tensor:
    # timm conv_mlp models store the Linear weights as 1x1 convs; torchvision's layer scale is (C, 1, 1).
    if re.search(r"pwconv[12]\.weight$", new_key) and value.dim() == 4:
        return value.flatten(1)
    if new_key.endswith(".gamma") and value.dim() > 1:
        return value.reshape(-1)
    return value


def convert_state_dict(state_dict: Mapping) -> dict:
    """Map an official, timm, torchvision or Hugging Face ConvNeXt state dict to official names.

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
