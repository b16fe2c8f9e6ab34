"""The "torch" backend: the launcher contract written with PyTorch ops (any device).

Numerics follow the package policy: the conv and all statistics in fp32, GEMMs in the input
dtype with fp32 epilogues, weight gradients reduced in fp32. Backward is written out by hand
(no autograd inside), the same algorithm the fused kernels run.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

_PAD = 3  # 7x7 kernel, "same" zero padding


def _own_dtypes(launcher):
    """Runs a launcher with autocast off on its tensors' device and without autograd. The op
    bodies run inside the caller's autocast region, which would recast the launchers' chosen
    dtypes (the conv and the fp32 epilogues and accumulators); the op layer has already cast the
    activations to the autocast dtype."""
    @functools.wraps(launcher)
    def run(first, *args, **kwargs):
        with torch.autocast(first.device.type, enabled=False), torch.no_grad():
            return launcher(first, *args, **kwargs)
    return run


def _conv_out_fp32(x, conv_weight, conv_bias):
    """fp32 depthwise conv of NHWC x, returned as an NHWC (channels_last) view."""
    C = x.shape[-1]
    z = F.conv2d(x.permute(0, 3, 1, 2).float(), conv_weight, conv_bias, padding=_PAD, groups=C)
    return z.permute(0, 2, 3, 1)


def _stats(z, eps):
    var, mean = torch.var_mean(z, dim=-1, unbiased=False)
    return mean, torch.rsqrt(var + eps)


@_own_dtypes
def dwconv_layernorm_fwd(x, conv_weight, conv_bias, norm_weight, norm_bias, eps):
    z = _conv_out_fp32(x, conv_weight, conv_bias)
    mean, rstd = _stats(z, eps)
    xhat = (z - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    y = (xhat * norm_weight + norm_bias).to(x.dtype).contiguous()
    return y, mean.contiguous(), rstd.contiguous()


@_own_dtypes
def dwconv_layernorm_bwd(dy, x, conv_weight, conv_bias, norm_weight, mean, rstd):
    C = x.shape[-1]
    z = _conv_out_fp32(x, conv_weight, conv_bias)
    xhat = (z - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    dyf = dy.float()
    dnorm_weight = (dyf * xhat).sum((0, 1, 2))
    dnorm_bias = dyf.sum((0, 1, 2))
    wdy = dyf * norm_weight
    g = rstd.unsqueeze(-1) * (
        wdy - wdy.mean(-1, keepdim=True) - xhat * (wdy * xhat).mean(-1, keepdim=True)
    )
    dconv_bias = g.sum((0, 1, 2))
    g_nchw = g.permute(0, 3, 1, 2)
    x_nchw = x.permute(0, 3, 1, 2).float()
    dx = torch.nn.grad.conv2d_input(x_nchw.shape, conv_weight, g_nchw, padding=_PAD, groups=C)
    dconv_weight = torch.nn.grad.conv2d_weight(x_nchw, conv_weight.shape, g_nchw, padding=_PAD, groups=C)
    dx = dx.permute(0, 2, 3, 1).to(x.dtype).contiguous()
    return dx, dconv_weight, dconv_bias, dnorm_weight, dnorm_bias


def _row_scale(drop_scale: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-row (M, 1) factor from the per-sample drop_scale (N,)."""
    if drop_scale is None:
        return None
    N, H, W, _ = x.shape
    return drop_scale.repeat_interleave(H * W).unsqueeze(1)


class TorchMlpParts:
    """The pieces of mlp_layerscale that a backend may replace, in torch ops for any device: its
    GEMMs, fc1's epilogue (bias, exact-erf GELU, and their backward) and fc2's (bias, drop-path
    scale, layer scale, residual), called once per chunk
    of rows by mlp_layerscale_fwd/bwd below. The cpu backend subclasses it
    (launchers.cpu.CpuMlpParts: oneDNN GEMMs, a C++ epilogue). Classmethods, so that each piece
    calls the subclass's version of the others."""

    @classmethod
    def gemm_16bit(cls, a, weight):
        """a @ weight.T for 16-bit a and weight, in their dtype."""
        return F.linear(a, weight)

    @classmethod
    def linear(cls, inp, weight, bias=None):
        """inp @ weight.T + bias in fp32 (bias None: none added): one addmm for fp32 inputs;
        16-bit inputs add the fp32 bias after the GEMM (gemm_16bit) instead."""
        if inp.dtype == torch.float32:
            return torch.mm(inp, weight.t()) if bias is None else torch.addmm(bias, inp, weight.t())
        a = cls.gemm_16bit(inp, weight).float()
        return a if bias is None else a.add_(bias)

    @classmethod
    def matmul(cls, a, weight, out=None):
        """a @ weight (a weight matrix, not transposed) in a's dtype, into out when given."""
        return torch.mm(a, weight, out=out)

    @classmethod
    def accumulate_tn(cls, acc, a, b):
        """acc + a.T @ b in fp32 for (R, p) and (R, q) a and b, each fp32 or of the activations'
        dtype (its values taken exactly; where a subclass's GEMM takes bf16 operands, fp32 ones
        may be rounded to bf16 first), added into acc (fp32 (p, q)); acc None (the first
        chunk): a fresh a.T @ b."""
        a, b = a.float(), b.float()
        return torch.mm(a.t(), b) if acc is None else acc.addmm_(a.t(), b)

    @classmethod
    def gelu_forward(cls, x2, fc1_weight, fc1_bias, preact_out=None):
        """The hidden gelu(x2 @ fc1_weight.T + fc1_bias) in x2's dtype. preact_out (x2's dtype),
        when given, receives the GEMM's own output x2 @ fc1_weight.T, without the bias: backward
        adds the bias to it and so differentiates at the very pre-activation the forward used."""
        if preact_out is None:
            a = cls.linear(x2, fc1_weight, fc1_bias)
        else:
            a = cls.matmul(x2, fc1_weight.t(), out=preact_out).float() + fc1_bias
        return F.gelu(a).to(x2.dtype)

    @classmethod
    def gelu_backward(cls, x2, fc1_weight, fc1_bias, preact, dh, dfc1_bias):
        """(hidden, da, da_low) from dh = dL/dhidden (fc2's input-gradient GEMM output, in x2's
        dtype; consumed when fp32): the hidden as forward made it (rounded to x2's dtype) in
        fp32, da = dh * gelu'(a) in fp32 (both in x2's dtype instead where the subclass's
        accumulate_tn takes them so) with a the pre-activation (preact, stored by the
        forward without its bias, or recomputed when None), da_low = da in x2's dtype (the dx
        GEMM's operand) or None (then made from da where it is used: the torch backend's
        16-bit copy does not stay alive through the weight-gradient GEMMs), and dfc1_bias
        (fp32) += da's column sums."""
        a = cls.linear(x2, fc1_weight, fc1_bias) if preact is None else preact.float() + fc1_bias
        dh = dh.float()
        # aten's fused exact-erf GELU backward, dh * (Phi(a) + a * phi(a)) in one pass, over dh.
        da = torch.ops.aten.gelu_backward.grad_input(dh, a, grad_input=dh)
        dfc1_bias += da.sum(0)
        return F.gelu(a).to(x2.dtype).float(), da, None

    @classmethod
    def residual(cls, h, fc2_weight, fc2_bias, s, gamma, shortcut, out):
        """out = shortcut + gamma * (s * (h @ fc2_weight.T + fc2_bias)), the fc2 GEMM (in h's
        dtype) with its fp32 epilogue, written into out (shortcut's dtype); s (rows, 1) and gamma
        may be None."""
        z = cls.linear(h, fc2_weight, fc2_bias)
        if s is not None:
            z.mul_(s)
        # The residual add writes out directly (fp32: no sum tensor and no copy).
        if gamma is not None:
            torch.addcmul(shortcut, z, gamma, out=out)
        else:
            torch.add(shortcut, z, out=out)


# On the CPU the rows go through the MLP in chunks, so the (rows, 4C) hidden stays in cache and
# no tensor of the full hidden size is allocated (fresh large allocations cost page faults on
# every call). On a GPU one chunk of all rows keeps the launch count down.
CPU_ROWS_PER_CHUNK = 2048


def _row_chunks(M: int, device: torch.device):
    step = CPU_ROWS_PER_CHUNK if device.type == "cpu" else max(M, 1)
    return [slice(i, min(i + step, M)) for i in range(0, M, step)]


@_own_dtypes
def mlp_layerscale_fwd(x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale,
                       preact_out=None, *, parts=TorchMlpParts):
    C = x.shape[-1]
    x2, shortcut2 = x.reshape(-1, C), shortcut.reshape(-1, C)
    s = _row_scale(drop_scale, x)
    # Allocated in x's shape and written through a 2-D view: the op returns the base tensor, not a
    # view of a hidden one (FSDP2 warns about a wrapped module whose output is a view).
    y = x.new_empty(x.shape)
    y2 = y.view(-1, C)
    for rows in _row_chunks(x2.shape[0], x.device):
        h = parts.gelu_forward(x2[rows], fc1_weight, fc1_bias, None if preact_out is None else preact_out[rows])
        parts.residual(h, fc2_weight, fc2_bias, None if s is None else s[rows], gamma, shortcut2[rows], y2[rows])
    return y


def _rowwise_dot(a, b):
    """(a * b).sum(1) for (R, K) fp32 tensors. On the CPU in blocks of rows: the product of a
    whole (C, 4C) pair is a fresh allocation of several MB, paid in page faults on every call."""
    if a.device.type != "cpu":
        return torch.linalg.vecdot(a, b)
    out = a.new_empty(a.shape[0])
    step = max(1, (1 << 16) // max(a.shape[1], 1))
    for i in range(0, a.shape[0], step):
        torch.linalg.vecdot(a[i:i + step], b[i:i + step], out=out[i:i + step])
    return out


@_own_dtypes
def mlp_layerscale_bwd(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale, preact=None, *,
                       parts=TorchMlpParts):
    C = x.shape[-1]
    x2, dy2 = x.reshape(-1, C), dy.reshape(-1, C)
    s = _row_scale(drop_scale, x)
    f32 = dict(dtype=torch.float32, device=x.device)
    dfc1_bias, dys_sum = torch.zeros(fc1_bias.shape, **f32), torch.zeros(C, **f32)
    # With dys = dy * s: G = dys.T @ h gives dW2 = gamma * G and, since z = h @ W2.T + b2,
    # dgamma = sum(dys * z) = rowsum(W2 * G) + b2 * colsum(dys): no second pass through fc2.
    # G and dW1 are written by the first chunk's GEMM and accumulated into by the others (no
    # zero fill of two (4C, C) buffers).
    g = dfc1_weight = None
    dx = x.new_empty(x.shape)  # returned as it is, not as a view (as y in the forward)
    dx2 = dx.view(-1, C)
    # Chunks are visited in a fixed order, so the weight-gradient sums are deterministic.
    for rows in _row_chunks(x2.shape[0], x.device):
        dys = dy2[rows].float()  # dy itself for fp32 (it is also dshortcut): never written below
        if s is not None:
            dys = dys * s[rows]
        dys_sum += dys.sum(0)
        dz = dys * gamma if gamma is not None else dys
        dh = parts.matmul(dz.to(x.dtype), fc2_weight)
        h, da, da_low = parts.gelu_backward(x2[rows], fc1_weight, fc1_bias,
                                            None if preact is None else preact[rows], dh, dfc1_bias)
        g = parts.accumulate_tn(g, dys, h)
        dfc1_weight = parts.accumulate_tn(dfc1_weight, da, x2[rows])
        parts.matmul(da.to(x.dtype) if da_low is None else da_low, fc1_weight, out=dx2[rows])
    if g is None:  # no rows
        g, dfc1_weight = torch.zeros(fc2_weight.shape, **f32), torch.zeros(fc1_weight.shape, **f32)
    dgamma = _rowwise_dot(g, fc2_weight.float()).add_(fc2_bias * dys_sum)
    if gamma is None:
        return dx, dfc1_weight, dfc1_bias, g, dys_sum, dgamma
    return dx, dfc1_weight, dfc1_bias, g.mul_(gamma[:, None]), dys_sum.mul_(gamma), dgamma
