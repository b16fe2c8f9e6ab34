"""The reference itself, against independent formulations (it is what every kernel is judged by)."""

import math

import pytest
import torch
import torch.nn.functional as F

from convnext_kernels.reference import (
    Block,
    ConvNeXt,
    LayerNorm,
    drop_path_rates,
    drop_path_scale,
    dwconv_layernorm_ref,
    mlp_layerscale_ref,
)


def _naive_dwconv(x, w, b):
    """7x7 depthwise conv by explicit shifts over a zero-padded NHWC tensor."""
    N, H, W, C = x.shape
    xp = F.pad(x, (0, 0, 3, 3, 3, 3))
    out = torch.zeros_like(x)
    for i in range(7):
        for j in range(7):
            out += xp[:, i:i + H, j:j + W, :] * w[:, 0, i, j]
    return out + (0 if b is None else b)


def test_dwconv_layernorm_ref_matches_explicit_loops():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 9, 12, generator=g, dtype=torch.float64)
    w = torch.randn(12, 1, 7, 7, generator=g, dtype=torch.float64)
    b, nw, nb = (torch.randn(12, generator=g, dtype=torch.float64) for _ in range(3))
    z = _naive_dwconv(x, w, b)
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    expected = (z - mu) / torch.sqrt(var + 1e-6) * nw + nb
    torch.testing.assert_close(dwconv_layernorm_ref(x, w, b, nw, nb, upcast=True), expected)


def test_mlp_layerscale_ref_matches_explicit_formula():
    g = torch.Generator().manual_seed(2)
    x, s = (torch.randn(3, 2, 4, 8, generator=g, dtype=torch.float64) for _ in range(2))
    w1, b1 = torch.randn(32, 8, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    w2, b2 = torch.randn(8, 32, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    gamma = torch.randn(8, generator=g, dtype=torch.float64)
    ds = torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64)
    a = torch.einsum("nhwc,kc->nhwk", x, w1) + b1
    h = 0.5 * a * (1 + torch.special.erf(a / math.sqrt(2)))
    z = torch.einsum("nhwk,ck->nhwc", h, w2) + b2
    expected = s + ds.view(3, 1, 1, 1) * gamma * z
    torch.testing.assert_close(mlp_layerscale_ref(x, s, w1, b1, w2, b2, gamma, ds, upcast=True), expected)


def test_block_equals_conv_mlp_formulation():
    """The official block vs the same math with 1x1 convs in NCHW and a channels-first LayerNorm."""
    torch.manual_seed(3)
    blk = Block(16, layer_scale_init_value=0.5).double()
    with torch.no_grad():
        blk.gamma.normal_()
    x = torch.randn(2, 16, 9, 7, dtype=torch.float64)
    ln = LayerNorm(16, data_format="channels_first").double()
    ln.load_state_dict(blk.norm.state_dict())
    y = ln(blk.dwconv(x))
    y = F.conv2d(y, blk.pwconv1.weight[:, :, None, None], blk.pwconv1.bias)
    y = F.conv2d(F.gelu(y), blk.pwconv2.weight[:, :, None, None], blk.pwconv2.bias)
    expected = x + blk.gamma.view(1, -1, 1, 1) * y
    torch.testing.assert_close(blk(x), expected)


def test_drop_path_semantics():
    torch.manual_seed(0)
    s = drop_path_scale(20000, 0.25)
    assert set(s.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert abs(s.mean().item() - 1.0) < 0.03  # unbiased: E[s] = 1
    assert torch.equal(drop_path_scale(5, 0.0), torch.ones(5))
    assert drop_path_rates(0.3, (1, 1, 1, 1)) == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_model_structure_and_init():
    m = ConvNeXt(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=7, layer_scale_init_value=0.0,
                 head_init_scale=0.5)
    assert all(b.gamma is None for s in m.stages for b in s)
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert m.stages[0][0].dwconv.bias.abs().max() == 0
    assert m.stages[0][0].dwconv.weight.std().item() == pytest.approx(0.02, rel=0.3)
    assert m.head.weight.std().item() == pytest.approx(0.01, rel=0.3)  # 0.02 * head_init_scale
    keys = set(m.state_dict())
    assert {"downsample_layers.0.0.weight", "downsample_layers.0.1.weight", "downsample_layers.3.1.weight",
            "stages.2.1.pwconv2.bias", "norm.weight", "head.bias"} <= keys
