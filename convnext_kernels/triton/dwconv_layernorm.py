"""Triton kernels for the fused depthwise 7x7 conv + LayerNorm over C (NHWC).

Forward: one program owns a BLOCK_W-wide strip of ROWS output rows of one
sample, all C channels, so the LayerNorm statistics over C come from registers.
It walks its input rows once, top to bottom: each row's 7 column taps are loaded
and converted to fp32 once and feed all 7 kernel rows, into a ring of 7 row
accumulators (output rows ih - 3 .. ih + 3); the top one is then complete, is
normalised and stored, and the ring moves down. Rows outside the image are
skipped, not masked. The channels are held as up to three power-of-two tiles
(_channel_split: 96 = 3 x 32, 768 = 3 x 256, 40 = 32 + 8), not one
next_power_of_2(C) tile: at the ConvNeXt widths that tile would be a quarter
padding or more, and the conv's loads, conversions and FMAs run on every lane.

Backward:
  1. ``_dwconv_layernorm_bwd_norm_kernel`` (the forward's programs and ring)
     recomputes the conv output z and xhat, writes the gradient with respect to
     z, g = rstd * (dy*nw - mean_C(dy*nw) - xhat * mean_C(dy*nw*xhat)), into an
     fp32 workspace, and per-program fp32 partial sums of dnorm_weight,
     dnorm_bias and dconv_bias.
  2. ``_dwconv_layernorm_bwd_conv_kernel`` is purely per channel, so it tiles C
     too, one value per thread: each thread holds its channel's 49 weights and
     49 dconv_weight sums in registers, and walks g rows once, each loaded at its
     7 column shifts: dx = transposed depthwise conv of g (a ring, as in the
     forward), and dconv_weight[c, tap] = sum_p g[p, c] * x[p + off(tap), c]
     summed elementwise, then once per program over its pixels into an fp32
     partial row (a program takes whole images where there are enough of them:
     few partials).
  Partials are summed with torch in a fixed order: deterministic, no atomics.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
import triton
import triton.language as tl

from ..launchers import dwconv_layernorm_fwd_outputs, empty_output, on_tensors_device
from ._compat import wrap_triton

KERNEL_SIZE = 7
TAPS = KERNEL_SIZE * KERNEL_SIZE

# The forward and backward-norm kernels hold seven tiles (one per output row in flight) of
# BLOCK_W pixels x all C: above C = 512, about 1024 fp32 elements each.
_RING_TILE_ELEMS = 1024
# Values of each ring accumulator per thread in the forward, where its channel tiles share one
# width, and the most output rows a ring program takes (see _ring_tiling). Module settings that
# benchmarks/kernels.py changes to time other values on a GPU (providers triton_ring6,
# triton_rows32).
_RING_FWD_VALUES = 12
_RING_MAX_ROWS = 16
# The backward conv kernel: values per program (one per thread, 4 warps), its widest channel
# tile, and the programs it aims for (a few per SM on an H100's 132 SMs).
_CONV_BWD_THREADS = 128
_CONV_BWD_BLOCK_C = 32
_CONV_BWD_PROGRAMS = 512
# A CUDA grid's x dimension; the kernels use that axis alone (axes 1 and 2 stop at 65535).
_MAX_PROGRAMS = 2**31 - 1
# The backward conv addresses the pixels of an image row in int32 from the row's int64 start
# (_shifted_row; int64 there cost it 17 registers); shifted pixels reach 3 columns past the row.
_MAX_ROW_ELEMS = 2**31 - 1


@triton.jit
def _tile_mask(
    offs_c,       # (BLOCK_C,) channels of one tile
    C,
    END: tl.constexpr,  # where the tile ends: offs_c < END everywhere
    MASKED: tl.constexpr,  # the tile may pass C
):
    """offs_c < C; a compile-time constant (all true, offs_c < END) where the tile ends within C,
    which the compiler folds out of every load, select and store."""
    if MASKED:
        mask = offs_c < C
    else:
        mask = offs_c < END  # not tl.full: an int1 tl.full fails in triton 3.3's interpreter
    return mask


@triton.jit
def _channel_tiles(
    C,
    BLOCK_C0: tl.constexpr,
    BLOCK_C1: tl.constexpr,
    BLOCK_C2: tl.constexpr,
    EVEN_C: tl.constexpr,
):
    """(offs_c0, mask_c0, offs_c1, mask_c1, offs_c2, mask_c2) of the channel tiles, side by side
    from channel 0; an absent tile (width 0) repeats the first pair (a placeholder the kernels
    never use). Only the last tile can pass C (_channel_split)."""
    offs_c0 = tl.arange(0, BLOCK_C0)
    mask_c0 = _tile_mask(offs_c0, C, BLOCK_C0, BLOCK_C1 == 0 and not EVEN_C)
    offs_c1, mask_c1, offs_c2, mask_c2 = offs_c0, mask_c0, offs_c0, mask_c0
    if BLOCK_C1 > 0:
        offs_c1 = BLOCK_C0 + tl.arange(0, BLOCK_C1)
        mask_c1 = _tile_mask(offs_c1, C, BLOCK_C0 + BLOCK_C1, BLOCK_C2 == 0 and not EVEN_C)
    if BLOCK_C2 > 0:
        offs_c2 = BLOCK_C0 + BLOCK_C1 + tl.arange(0, BLOCK_C2)
        mask_c2 = _tile_mask(offs_c2, C, BLOCK_C0 + BLOCK_C1 + BLOCK_C2, not EVEN_C)
    return offs_c0, mask_c0, offs_c1, mask_c1, offs_c2, mask_c2


@triton.jit
def _sum_tiles(
    t0, t1, t2,   # (BLOCK_W, BLOCK_Ck) fp32 values of each channel tile (placeholders if absent)
    BLOCK_C0: tl.constexpr,
    BLOCK_C1: tl.constexpr,
    BLOCK_C2: tl.constexpr,
):
    """(BLOCK_W,) row sums over all the tiles. Two tiles have two widths (_channel_split) and
    are reduced one by one; three share one width, so one layout: they are added elementwise
    and reduced across threads once."""
    if BLOCK_C1 == 0:
        total = tl.sum(t0, axis=1)
    elif BLOCK_C2 == 0:
        total = tl.sum(t0, axis=1) + tl.sum(t1, axis=1)
    else:
        total = tl.sum(t0 + t1 + t2, axis=1)
    return total


@triton.jit
def _layernorm_store_tile(
    y_ptr, norm_w_ptr, norm_b_ptr,  # as in the forward kernel
    zc,           # (BLOCK_W, BLOCK_C) centred conv output, 0 in padded channels
    rstd,         # (BLOCK_W,) fp32
    pix,          # (BLOCK_W,) int64 pixel indices
    mask_w,       # (BLOCK_W,) pixel validity
    offs_c, mask_c, C,
):
    nw = tl.load(norm_w_ptr + offs_c, mask=mask_c, other=0.0)
    nb = tl.load(norm_b_ptr + offs_c, mask=mask_c, other=0.0)
    y = zc * rstd[:, None] * nw[None, :] + nb[None, :]
    tl.store(y_ptr + pix[:, None] * C + offs_c[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask_w[:, None] & mask_c[None, :])


@triton.jit
def _add_conv_bias(
    z0, z1, z2,   # conv output of one row, the channel tiles (placeholders for absent ones)
    conv_bias_ptr, offs_c0, mask_c0, offs_c1, mask_c1, offs_c2, mask_c2,
    HAS_BIAS: tl.constexpr,
    BLOCK_C1: tl.constexpr,
    BLOCK_C2: tl.constexpr,
):
    """z + conv_bias, every tile (unchanged without a bias)."""
    if HAS_BIAS:
        z0 += tl.load(conv_bias_ptr + offs_c0, mask=mask_c0, other=0.0)[None, :]
        if BLOCK_C1 > 0:
            z1 += tl.load(conv_bias_ptr + offs_c1, mask=mask_c1, other=0.0)[None, :]
        if BLOCK_C2 > 0:
            z2 += tl.load(conv_bias_ptr + offs_c2, mask=mask_c2, other=0.0)[None, :]
    return z0, z1, z2


@triton.jit
def _layernorm_store_row(
    y_ptr, mean_ptr, rstd_ptr, conv_bias_ptr, norm_w_ptr, norm_b_ptr,  # as in the forward kernel
    z0, z1, z2,   # conv output of one row segment, the channel tiles (bias not yet added)
    pix,          # (BLOCK_W,) int64 pixel indices
    mask_w, offs_c0, mask_c0, offs_c1, mask_c1, offs_c2, mask_c2,
    C, eps,
    HAS_BIAS: tl.constexpr,
    BLOCK_C0: tl.constexpr,
    BLOCK_C1: tl.constexpr,
    BLOCK_C2: tl.constexpr,
):
    """Bias, LayerNorm over C (all channel tiles) and the stores of one finished output row."""
    z0, z1, z2 = _add_conv_bias(z0, z1, z2, conv_bias_ptr, offs_c0, mask_c0, offs_c1, mask_c1, offs_c2,
                                mask_c2, HAS_BIAS, BLOCK_C1, BLOCK_C2)
    # Padded channels of z are exactly 0, so the plain sums give the mean; they must be masked
    # out of the centred values for the variance.
    mean = _sum_tiles(z0, z1, z2, BLOCK_C0, BLOCK_C1, BLOCK_C2) / C
    zc0 = tl.where(mask_c0[None, :], z0 - mean[:, None], 0.0)
    zc1, zc2 = z1, z2  # placeholders for absent tiles
    if BLOCK_C1 > 0:
        zc1 = tl.where(mask_c1[None, :], z1 - mean[:, None], 0.0)
    if BLOCK_C2 > 0:
        zc2 = tl.where(mask_c2[None, :], z2 - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(_sum_tiles(zc0 * zc0, zc1 * zc1, zc2 * zc2, BLOCK_C0, BLOCK_C1, BLOCK_C2) / C + eps)
    _layernorm_store_tile(y_ptr, norm_w_ptr, norm_b_ptr, zc0, rstd, pix, mask_w, offs_c0, mask_c0, C)
    if BLOCK_C1 > 0:
        _layernorm_store_tile(y_ptr, norm_w_ptr, norm_b_ptr, zc1, rstd, pix, mask_w, offs_c1, mask_c1, C)
    if BLOCK_C2 > 0:
        _layernorm_store_tile(y_ptr, norm_w_ptr, norm_b_ptr, zc2, rstd, pix, mask_w, offs_c2, mask_c2, C)
    tl.store(mean_ptr + pix, mean, mask=mask_w)
    tl.store(rstd_ptr + pix, rstd, mask=mask_w)


@triton.jit
def _tap(column_taps, kh: tl.constexpr, taps_stride: tl.constexpr, offs_c, BLOCK_W: tl.constexpr):
    """(BLOCK_W, BLOCK_C) fp32 weights of kernel row kh in one kernel column for these channels,
    the same in every pixel row (the padded taps need no mask). Loaded as a 2-D tile, not as a
    (BLOCK_C,) vector broadcast afterwards: the vector gets a layout of its own (one value per
    thread once BLOCK_C reaches the thread count), and at C = 384 each of the 7 taps of a column
    went through shared memory into the accumulators' layout (14 barriers per column, sm_90
    SASS); the tile loads straight into a layout the FMAs take."""
    return tl.load(column_taps + kh * 7 * taps_stride + offs_c[None, :] + tl.zeros([BLOCK_W, 1], dtype=tl.int32))


@triton.jit
def _ring_column(
    pix_ptrs,     # (BLOCK_W, 1) pointers to the pixels of one input row at one kernel column
    m,            # (BLOCK_W,) their validity (zero padding at the image's sides)
    offs_c, mask_c,  # one channel tile
    column_taps,  # that kernel column's taps: kernel row kh at + kh * 7 * taps_stride
    taps_stride: tl.constexpr,
    r0, r1, r2, r3, r4, r5, r6,  # the ring: output rows ih - 3 .. ih + 3
    BLOCK_W: tl.constexpr,
):
    """One kernel column of one input row into the ring: the pixels are loaded and converted to
    fp32 once (all arithmetic is fp32), and kernel row kh sends them to r{6 - kh}."""
    xv = tl.load(pix_ptrs + offs_c[None, :], mask=m[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    return (r0 + xv * _tap(column_taps, 6, taps_stride, offs_c, BLOCK_W),
            r1 + xv * _tap(column_taps, 5, taps_stride, offs_c, BLOCK_W),
            r2 + xv * _tap(column_taps, 4, taps_stride, offs_c, BLOCK_W),
            r3 + xv * _tap(column_taps, 3, taps_stride, offs_c, BLOCK_W),
            r4 + xv * _tap(column_taps, 2, taps_stride, offs_c, BLOCK_W),
            r5 + xv * _tap(column_taps, 1, taps_stride, offs_c, BLOCK_W),
            r6 + xv * _tap(column_taps, 0, taps_stride, offs_c, BLOCK_W))


@triton.jit
def _ring_program(
    H, W,
    ROWS,         # output rows per program
    BLOCK_W: tl.constexpr,
):
    """(pid, sample_row0, h_begin, h_end, offs_w, mask_w) of this program: one grid axis
    (2^31 - 1 programs; axes 1 and 2 stop at 65535), program = (n, row chunk) * w tiles + w
    tile, int64 so offsets never overflow; its output rows are [h_begin, h_end) of sample n
    (image rows from sample_row0 = n * H)."""
    pid = tl.program_id(0).to(tl.int64)
    num_w_tiles = tl.cdiv(W, BLOCK_W)
    num_chunks = tl.cdiv(H, ROWS)
    pid_w = pid % num_w_tiles
    chunk = pid // num_w_tiles
    sample_row0 = (chunk // num_chunks) * H
    h_begin = ((chunk % num_chunks) * ROWS).to(tl.int32)
    h_end = tl.minimum(h_begin + ROWS, H)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    return pid, sample_row0, h_begin, h_end, offs_w, offs_w < W


@triton.jit
def _ring_row(
    x_ptr, taps_ptr,  # input; (49, BLOCK_C0 + BLOCK_C1 + BLOCK_C2) padded taps
    sample_row0, ih,  # this input row: image row ih of the sample
    H, W, C,
    offs_w, offs_c0, mask_c0, offs_c1, mask_c1, offs_c2, mask_c2,
    a0, a1, a2, a3, a4, a5, a6,  # the ring, first channel tile: output rows ih - 3 .. ih + 3
    b0, b1, b2, b3, b4, b5, b6,  # the same, second and third tiles (placeholders if absent)
    c0, c1, c2, c3, c4, c5, c6,
    BLOCK_W: tl.constexpr,
    BLOCK_C0: tl.constexpr,
    BLOCK_C1: tl.constexpr,
    BLOCK_C2: tl.constexpr,
):
    """Input row ih into the ring (rows outside the image add nothing: zero padding)."""
    if ih >= 0 and ih < H:  # `and`: under triton 3.3's interpreter ih is a Python int, and bool & tensor fails
        row_base = (sample_row0 + ih) * W  # int64 pixel index of (n, ih, 0)
        # A loop, not unrolled: the weights of one kernel column (7 taps) are live at a time.
        # Unrolled, the compiler hoists all 49 taps' loads ahead of their uses (255 registers
        # and spills at C = 96).
        for kw in range(7):
            column_taps = taps_ptr + kw * (BLOCK_C0 + BLOCK_C1 + BLOCK_C2)
            iw = offs_w + (kw - 3)
            m = (iw >= 0) & (iw < W)
            pix_ptrs = x_ptr + (row_base + iw)[:, None] * C
            a0, a1, a2, a3, a4, a5, a6 = _ring_column(pix_ptrs, m, offs_c0, mask_c0, column_taps,
                                                      BLOCK_C0 + BLOCK_C1 + BLOCK_C2, a0, a1, a2, a3, a4, a5, a6,
                                                      BLOCK_W)
            if BLOCK_C1 > 0:
                b0, b1, b2, b3, b4, b5, b6 = _ring_column(pix_ptrs, m, offs_c1, mask_c1, column_taps,
                                                          BLOCK_C0 + BLOCK_C1 + BLOCK_C2, b0, b1, b2, b3, b4, b5,
                                                          b6, BLOCK_W)
            if BLOCK_C2 > 0:
                c0, c1, c2, c3, c4, c5, c6 = _ring_column(pix_ptrs, m, offs_c2, mask_c2, column_taps,
                                                          BLOCK_C0 + BLOCK_C1 + BLOCK_C2, c0, c1, c2, c3, c4, c5,
                                                          c6, BLOCK_W)
    return a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6, c0, c1, c2, c3, c4, c5, c6


@triton.jit
def _ring_zeros(
    BLOCK_W: tl.constexpr,
    BLOCK_C0: tl.constexpr,
    BLOCK_C1: tl.constexpr,
    BLOCK_C2: tl.constexpr,
):
    """A new ring row: zero accumulators for each channel tile ((1, 1) placeholders for absent
    ones)."""
    b = tl.zeros([1, 1], dtype=tl.float32)
    c = b
    if BLOCK_C1 > 0:
        b = tl.zeros([BLOCK_W, BLOCK_C1], dtype=tl.float32)
    if BLOCK_C2 > 0:
        c = tl.zeros([BLOCK_W, BLOCK_C2], dtype=tl.float32)
    return tl.zeros([BLOCK_W, BLOCK_C0], dtype=tl.float32), b, c


@triton.jit
def _ring_init(
    BLOCK_W: tl.constexpr,
    BLOCK_C0: tl.constexpr,
    BLOCK_C1: tl.constexpr,
    BLOCK_C2: tl.constexpr,
):
    """An empty ring: a0..a6, b0..b6, c0..c6 zero."""
    a, b, c = _ring_zeros(BLOCK_W, BLOCK_C0, BLOCK_C1, BLOCK_C2)
    return a, a, a, a, a, a, a, b, b, b, b, b, b, b, c, c, c, c, c, c, c


@triton.jit
def _ring_shift(
    a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6,  # the ring after input row ih
    c0, c1, c2, c3, c4, c5, c6,
    BLOCK_W: tl.constexpr,
    BLOCK_C0: tl.constexpr,
    BLOCK_C1: tl.constexpr,
    BLOCK_C2: tl.constexpr,
):
    """The ring one row down (a0, b0, c0, finished, dropped; a new zero row at the bottom)."""
    new_a, new_b, new_c = _ring_zeros(BLOCK_W, BLOCK_C0, BLOCK_C1, BLOCK_C2)
    return a1, a2, a3, a4, a5, a6, new_a, b1, b2, b3, b4, b5, b6, new_b, c1, c2, c3, c4, c5, c6, new_c


# Both the forward and the backward-norm kernel recompute the conv as a ring: a program walks
# its input rows once, top to bottom. Each row's 7 column taps are loaded and converted once and
# serve all 7 kernel rows: kernel row kh sends input row ih to output row ih + 3 - kh, whose
# accumulator is a{6 - kh} (b{..}, c{..} for the other channel tiles): a0 holds output row
# ih - 3, a6 row ih + 3. After row ih, a0 has all 7 kernel rows: the kernel finishes that output
# row, and the ring moves down one row. (The one-row form loaded and converted every input
# element 7 times, once per kernel row, and masked, rather than skipped, the rows outside the
# image.)


@triton.jit
def _dwconv_layernorm_fwd_kernel(
    x_ptr,          # (N, H, W, C) input, NHWC contiguous, fp32/fp16/bf16
    taps_ptr,       # (49, BLOCK_C0 + BLOCK_C1 + BLOCK_C2) fp32 conv weight, tap-major, zero past C
    conv_bias_ptr,  # (C,) fp32 conv bias; read only when HAS_BIAS
    norm_w_ptr,     # (C,) fp32 LayerNorm weight
    norm_b_ptr,     # (C,) fp32 LayerNorm bias
    y_ptr,          # (N, H, W, C) output, x.dtype
    mean_ptr,       # (N, H, W) fp32 mean over C of the conv output
    rstd_ptr,       # (N, H, W) fp32 1/sqrt(var + eps)
    H, W, C,        # sizes
    eps,            # LayerNorm epsilon
    ROWS,           # output rows per program: a chunk of one sample's rows
    HAS_BIAS: tl.constexpr,  # conv has a bias
    BLOCK_W: tl.constexpr,   # pixels of each row per program
    BLOCK_C0: tl.constexpr,  # channel tiles side by side, powers of 2 (_channel_split); the
    BLOCK_C1: tl.constexpr,  #   second and third 0 when absent
    BLOCK_C2: tl.constexpr,
    EVEN_C: tl.constexpr,    # C == BLOCK_C0 + BLOCK_C1 + BLOCK_C2: no channel masks
):
    _, sample_row0, h_begin, h_end, offs_w, mask_w = _ring_program(H, W, ROWS, BLOCK_W)
    offs_c0, mask_c0, offs_c1, mask_c1, offs_c2, mask_c2 = _channel_tiles(C, BLOCK_C0, BLOCK_C1, BLOCK_C2, EVEN_C)
    a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6, c0, c1, c2, c3, c4, c5, c6 = _ring_init(
        BLOCK_W, BLOCK_C0, BLOCK_C1, BLOCK_C2)
    for ih in range(h_begin - 3, h_end + 3):
        a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6, c0, c1, c2, c3, c4, c5, c6 = _ring_row(
            x_ptr, taps_ptr, sample_row0, ih, H, W, C, offs_w, offs_c0, mask_c0, offs_c1, mask_c1, offs_c2,
            mask_c2, a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6, c0, c1, c2, c3, c4, c5, c6,
            BLOCK_W, BLOCK_C0, BLOCK_C1, BLOCK_C2)
        if ih - 3 >= h_begin:  # a0 is output row ih - 3 (< h_end: ih < h_end + 3)
            _layernorm_store_row(y_ptr, mean_ptr, rstd_ptr, conv_bias_ptr, norm_w_ptr, norm_b_ptr, a0, b0, c0,
                                 (sample_row0 + ih - 3) * W + offs_w, mask_w, offs_c0, mask_c0, offs_c1,
                                 mask_c1, offs_c2, mask_c2, C, eps, HAS_BIAS, BLOCK_C0, BLOCK_C1, BLOCK_C2)
        a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6, c0, c1, c2, c3, c4, c5, c6 = _ring_shift(
            a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6, c0, c1, c2, c3, c4, c5, c6,
            BLOCK_W, BLOCK_C0, BLOCK_C1, BLOCK_C2)


@triton.jit
def _bwd_norm_tile_inputs(
    z,            # (BLOCK_W, BLOCK_C) recomputed conv output (+ bias) of one channel tile
    dy_ptr, norm_w_ptr,  # as in the kernel below
    pix, mask_w,  # this program's pixels
    mean, rstd,   # (BLOCK_W,) fp32 saved statistics
    offs_c, mask_c, C,  # this channel tile
):
    """(xhat, dy, dy * norm_weight) of one channel tile, fp32. Invalid pixels / channels get
    xhat = 0 and dy = 0, so they add nothing to the sums."""
    mask = mask_w[:, None] & mask_c[None, :]
    xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
    dy = tl.load(dy_ptr + pix[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    nw = tl.load(norm_w_ptr + offs_c, mask=mask_c, other=0.0)
    return xhat, dy, dy * nw[None, :]


@triton.jit
def _norm_grad_row(
    z0, z1, z2,   # recomputed conv output of one finished row, the channel tiles (no bias yet)
    dy_ptr, g_ptr, conv_bias_ptr, norm_w_ptr, mean_ptr, rstd_ptr,  # as in the kernel below
    pix, mask_w,  # (BLOCK_W,) int64 pixel indices of the row, their validity
    offs_c0, mask_c0, offs_c1, mask_c1, offs_c2, mask_c2,
    C,
    HAS_BIAS: tl.constexpr,
    BLOCK_C0: tl.constexpr,
    BLOCK_C1: tl.constexpr,
    BLOCK_C2: tl.constexpr,
):
    """g = rstd * (dyw - mean_C(dyw) - xhat * mean_C(dyw * xhat)), dyw = dy * norm_weight, of
    one row, stored; returns dy * xhat, dy and g of each tile (what dnorm_weight, dnorm_bias and
    dconv_bias sum; placeholders for absent tiles)."""
    z0, z1, z2 = _add_conv_bias(z0, z1, z2, conv_bias_ptr, offs_c0, mask_c0, offs_c1, mask_c1, offs_c2,
                                mask_c2, HAS_BIAS, BLOCK_C1, BLOCK_C2)
    mean = tl.load(mean_ptr + pix, mask=mask_w, other=0.0)
    rstd = tl.load(rstd_ptr + pix, mask=mask_w, other=0.0)
    xhat0, dy0, dyw0 = _bwd_norm_tile_inputs(z0, dy_ptr, norm_w_ptr, pix, mask_w, mean, rstd, offs_c0, mask_c0, C)
    xhat1, dy1, dyw1 = z1, z1, z1  # placeholders for absent tiles
    xhat2, dy2, dyw2 = z2, z2, z2
    if BLOCK_C1 > 0:
        xhat1, dy1, dyw1 = _bwd_norm_tile_inputs(z1, dy_ptr, norm_w_ptr, pix, mask_w, mean, rstd, offs_c1,
                                                 mask_c1, C)
    if BLOCK_C2 > 0:
        xhat2, dy2, dyw2 = _bwd_norm_tile_inputs(z2, dy_ptr, norm_w_ptr, pix, mask_w, mean, rstd, offs_c2,
                                                 mask_c2, C)
    # The two means over C, over all the tiles.
    mean_dyw_xhat = _sum_tiles(dyw0 * xhat0, dyw1 * xhat1, dyw2 * xhat2, BLOCK_C0, BLOCK_C1, BLOCK_C2) / C
    mean_dyw = _sum_tiles(dyw0, dyw1, dyw2, BLOCK_C0, BLOCK_C1, BLOCK_C2) / C
    g0 = _norm_grad_tile(g_ptr, pix, mask_w, offs_c0, mask_c0, xhat0, dyw0, mean_dyw_xhat, mean_dyw, rstd, C)
    g1, g2 = z1, z2
    if BLOCK_C1 > 0:
        g1 = _norm_grad_tile(g_ptr, pix, mask_w, offs_c1, mask_c1, xhat1, dyw1, mean_dyw_xhat, mean_dyw, rstd, C)
    if BLOCK_C2 > 0:
        g2 = _norm_grad_tile(g_ptr, pix, mask_w, offs_c2, mask_c2, xhat2, dyw2, mean_dyw_xhat, mean_dyw, rstd, C)
    return dy0 * xhat0, dy0, g0, dy1 * xhat1, dy1, g1, dy2 * xhat2, dy2, g2


@triton.jit
def _norm_grad_tile(
    g_ptr,        # (N, H, W, C) fp32 out
    pix, mask_w,  # the row's pixels
    offs_c, mask_c,  # one channel tile
    xhat, dyw,    # from _bwd_norm_tile_inputs
    mean_dyw_xhat, mean_dyw,  # (BLOCK_W,) mean_C(dyw * xhat), mean_C(dyw) over all of C
    rstd, C,
):
    """g of one channel tile, stored and returned (0 at invalid pixels / channels)."""
    mask = mask_w[:, None] & mask_c[None, :]
    g = tl.where(mask, (dyw - mean_dyw[:, None] - xhat * mean_dyw_xhat[:, None]) * rstd[:, None], 0.0)
    tl.store(g_ptr + pix[:, None] * C + offs_c[None, :], g, mask=mask)
    return g


@triton.jit
def _store_partials(
    dnw_part_ptr, dnb_part_ptr, dcb_part_ptr,  # as in the kernel above
    pid, C,
    offs_c, mask_c,  # one channel tile
    dnw, dnb, dcb,  # (BLOCK_W, BLOCK_C) its sums over the program's rows
):
    """This program's partial row of each sum, one channel tile: summed over its pixels."""
    tl.store(dnw_part_ptr + pid * C + offs_c, tl.sum(dnw, axis=0), mask=mask_c)
    tl.store(dnb_part_ptr + pid * C + offs_c, tl.sum(dnb, axis=0), mask=mask_c)
    tl.store(dcb_part_ptr + pid * C + offs_c, tl.sum(dcb, axis=0), mask=mask_c)


@triton.jit
def _dwconv_layernorm_bwd_norm_kernel(
    dy_ptr,         # (N, H, W, C) upstream gradient, x.dtype
    x_ptr,          # (N, H, W, C) forward input (the conv output is recomputed)
    taps_ptr,       # (49, BLOCK_C0 + BLOCK_C1 + BLOCK_C2) fp32 conv weight, tap-major, zero past C
    conv_bias_ptr,  # (C,) fp32 conv bias; read only when HAS_BIAS
    norm_w_ptr,     # (C,) fp32 LayerNorm weight
    mean_ptr,       # (N, H, W) fp32 saved mean
    rstd_ptr,       # (N, H, W) fp32 saved rstd
    g_ptr,          # (N, H, W, C) fp32 workspace: gradient w.r.t. the conv output
    dnw_part_ptr,   # (programs, C) fp32 partial sums of dy * xhat
    dnb_part_ptr,   # (programs, C) fp32 partial sums of dy
    dcb_part_ptr,   # (programs, C) fp32 partial sums of g
    H, W, C,        # sizes
    ROWS,           # output rows per program, as in the forward
    HAS_BIAS: tl.constexpr,  # conv has a bias
    BLOCK_W: tl.constexpr,   # pixels of each row per program
    BLOCK_C0: tl.constexpr,  # channel tiles, as in the forward
    BLOCK_C1: tl.constexpr,
    BLOCK_C2: tl.constexpr,
    EVEN_C: tl.constexpr,
):
    # The forward's ring (see above it). Each finished row gives g; dy * xhat, dy and g add up
    # elementwise over the program's rows and are summed over its pixels once, at the end, into
    # one partial row per program (a reduction across threads per row would cost more than the
    # row's own arithmetic).
    pid, sample_row0, h_begin, h_end, offs_w, mask_w = _ring_program(H, W, ROWS, BLOCK_W)
    offs_c0, mask_c0, offs_c1, mask_c1, offs_c2, mask_c2 = _channel_tiles(C, BLOCK_C0, BLOCK_C1, BLOCK_C2, EVEN_C)
    a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6, c0, c1, c2, c3, c4, c5, c6 = _ring_init(
        BLOCK_W, BLOCK_C0, BLOCK_C1, BLOCK_C2)
    dnw0, dnw1, dnw2 = _ring_zeros(BLOCK_W, BLOCK_C0, BLOCK_C1, BLOCK_C2)
    dnb0, dnb1, dnb2 = dnw0, dnw1, dnw2
    dcb0, dcb1, dcb2 = dnw0, dnw1, dnw2
    for ih in range(h_begin - 3, h_end + 3):
        a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6, c0, c1, c2, c3, c4, c5, c6 = _ring_row(
            x_ptr, taps_ptr, sample_row0, ih, H, W, C, offs_w, offs_c0, mask_c0, offs_c1, mask_c1, offs_c2,
            mask_c2, a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6, c0, c1, c2, c3, c4, c5, c6,
            BLOCK_W, BLOCK_C0, BLOCK_C1, BLOCK_C2)
        if ih - 3 >= h_begin:  # a0 is output row ih - 3 (< h_end: ih < h_end + 3)
            s0, s1, s2, s3, s4, s5, s6, s7, s8 = _norm_grad_row(
                a0, b0, c0, dy_ptr, g_ptr, conv_bias_ptr, norm_w_ptr, mean_ptr, rstd_ptr,
                (sample_row0 + ih - 3) * W + offs_w, mask_w, offs_c0, mask_c0, offs_c1, mask_c1, offs_c2,
                mask_c2, C, HAS_BIAS, BLOCK_C0, BLOCK_C1, BLOCK_C2)
            dnw0 += s0
            dnb0 += s1
            dcb0 += s2
            if BLOCK_C1 > 0:
                dnw1 += s3
                dnb1 += s4
                dcb1 += s5
            if BLOCK_C2 > 0:
                dnw2 += s6
                dnb2 += s7
                dcb2 += s8
        a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6, c0, c1, c2, c3, c4, c5, c6 = _ring_shift(
            a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6, c0, c1, c2, c3, c4, c5, c6,
            BLOCK_W, BLOCK_C0, BLOCK_C1, BLOCK_C2)
    _store_partials(dnw_part_ptr, dnb_part_ptr, dcb_part_ptr, pid, C, offs_c0, mask_c0, dnw0, dnb0, dcb0)
    if BLOCK_C1 > 0:
        _store_partials(dnw_part_ptr, dnb_part_ptr, dcb_part_ptr, pid, C, offs_c1, mask_c1, dnw1, dnb1, dcb1)
    if BLOCK_C2 > 0:
        _store_partials(dnw_part_ptr, dnb_part_ptr, dcb_part_ptr, pid, C, offs_c2, mask_c2, dnw2, dnb2, dcb2)


@triton.jit
def _shifted_row(
    row_ptr,      # pixel 0 of one image row
    offs_w,       # (BLOCK_W,) pixels
    shift: tl.constexpr,  # columns; pixels shifted outside the row read 0 (zero padding)
    W, offs_c, mask_c, C,
):
    """(BLOCK_W, BLOCK_C) fp32 values of the row at pixels offs_w + shift: the backward conv's
    g-row load."""
    iw = offs_w + shift
    m = (iw >= 0) & (iw < W)
    return tl.load(row_ptr + iw[:, None] * C + offs_c[None, :], mask=m[:, None] & mask_c[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _bwd_conv_tap_row(
    taps_ptr,     # (49, C) fp32 conv weight, tap-major
    kh: tl.constexpr,  # kernel row
    offs_c, mask_c, C,
):
    """The 7 weights of kernel row kh (kernel columns 0..6) for these channels, (1, BLOCK_C)
    fp32 each: loaded once per program and held in registers."""
    row = taps_ptr + kh * 7 * C + offs_c
    return (tl.load(row, mask=mask_c, other=0.0)[None, :],
            tl.load(row + C, mask=mask_c, other=0.0)[None, :],
            tl.load(row + 2 * C, mask=mask_c, other=0.0)[None, :],
            tl.load(row + 3 * C, mask=mask_c, other=0.0)[None, :],
            tl.load(row + 4 * C, mask=mask_c, other=0.0)[None, :],
            tl.load(row + 5 * C, mask=mask_c, other=0.0)[None, :],
            tl.load(row + 6 * C, mask=mask_c, other=0.0)[None, :])


@triton.jit
def _bwd_conv_kernel_row(
    g0, g1, g2, g3, g4, g5, g6,  # one g row, shifted by j - 3 pixels (g{j}[w] = g[w + j - 3])
    xk,           # the x row kernel row kh pairs with it (this program's rows only, else 0)
    rk,           # the dx row it feeds
    t0, t1, t2, t3, t4, t5, t6,  # kernel row kh's weights, kernel columns 0..6
    d0, d1, d2, d3, d4, d5, d6,  # elementwise dconv_weight sums of kernel row kh, columns 0..6
):
    """Kernel row kh at one g row: dx += g(shifted) * w (the transposed conv), dw += x * g(shifted).
    Kernel column kw meets shift j = 6 - kw in both."""
    rk = rk + g0 * t6 + g1 * t5 + g2 * t4 + g3 * t3 + g4 * t2 + g5 * t1 + g6 * t0
    return (rk, d0 + xk * g6, d1 + xk * g5, d2 + xk * g4, d3 + xk * g3, d4 + xk * g2, d5 + xk * g1,
            d6 + xk * g0)


@triton.jit
def _bwd_conv_store_tap_row(
    dw_part_ptr, part, kh: tl.constexpr, offs_c, mask_c, C,
    d0, d1, d2, d3, d4, d5, d6,  # kernel row kh's elementwise sums
):
    """Kernel row kh's sums over the program's pixels into its partial row."""
    row = dw_part_ptr + (part * 49 + kh * 7) * C + offs_c
    tl.store(row, tl.sum(d0, axis=0), mask=mask_c)
    tl.store(row + C, tl.sum(d1, axis=0), mask=mask_c)
    tl.store(row + 2 * C, tl.sum(d2, axis=0), mask=mask_c)
    tl.store(row + 3 * C, tl.sum(d3, axis=0), mask=mask_c)
    tl.store(row + 4 * C, tl.sum(d4, axis=0), mask=mask_c)
    tl.store(row + 5 * C, tl.sum(d5, axis=0), mask=mask_c)
    tl.store(row + 6 * C, tl.sum(d6, axis=0), mask=mask_c)


@triton.jit
def _dwconv_layernorm_bwd_conv_kernel(
    g_ptr,          # (N, H, W, C) fp32 gradient w.r.t. the conv output
    x_ptr,          # (N, H, W, C) forward input
    taps_ptr,       # (49, C) fp32 conv weight, tap-major
    dx_ptr,         # (N, H, W, C) output gradient, x.dtype
    dw_part_ptr,    # (sample groups * row chunks, 49, C) fp32 partials of dconv_weight (tap-major)
    N, H, W, C,     # sizes
    SAMPLES,        # samples per program
    ROWS,           # image rows per program: a chunk of each of its samples' rows
    BLOCK_W: tl.constexpr,   # pixels of a row per step
    BLOCK_C: tl.constexpr,   # channels per program (the conv is per channel)
):
    # One value per thread: each thread keeps its channel's 49 weights and 49 dconv_weight sums
    # in registers for the whole program. A program walks its row strip BLOCK_W pixels at a
    # time, top to bottom, over g rows gr = h_begin - 3 .. h_end + 2; each g row is loaded at
    # its 7 column shifts (fp32) and meets every weight once:
    #   dx:  g row gr feeds dx rows gr - 3 .. gr + 3 (kernel row kh: row gr + kh - 3), a ring of
    #        7 accumulators r0..r6 whose top row is complete after the step (the forward's ring,
    #        over g with the flipped kernel);
    #   dw:  dw[kh, kw] += x[gr + kh - 3, w] * g[gr, w - kw + 3], with x rows gr - 3 .. gr + 3 in
    #        a ring x0..x6 (only this program's rows: each x pixel is counted by one program).
    # g rows outside the image are skipped. Partial row per (sample group, row chunk); its c
    # tiles fill disjoint C slices.
    pid = tl.program_id(0).to(tl.int64)
    num_c_tiles = tl.cdiv(C, BLOCK_C)
    pid_c = pid % num_c_tiles
    part = pid // num_c_tiles
    num_chunks = tl.cdiv(H, ROWS)
    n_begin = (part // num_chunks) * SAMPLES
    n_end = tl.minimum(n_begin + SAMPLES, N)
    h_begin = ((part % num_chunks) * ROWS).to(tl.int32)
    h_end = tl.minimum(h_begin + ROWS, H)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C

    t00, t01, t02, t03, t04, t05, t06 = _bwd_conv_tap_row(taps_ptr, 0, offs_c, mask_c, C)
    t10, t11, t12, t13, t14, t15, t16 = _bwd_conv_tap_row(taps_ptr, 1, offs_c, mask_c, C)
    t20, t21, t22, t23, t24, t25, t26 = _bwd_conv_tap_row(taps_ptr, 2, offs_c, mask_c, C)
    t30, t31, t32, t33, t34, t35, t36 = _bwd_conv_tap_row(taps_ptr, 3, offs_c, mask_c, C)
    t40, t41, t42, t43, t44, t45, t46 = _bwd_conv_tap_row(taps_ptr, 4, offs_c, mask_c, C)
    t50, t51, t52, t53, t54, t55, t56 = _bwd_conv_tap_row(taps_ptr, 5, offs_c, mask_c, C)
    t60, t61, t62, t63, t64, t65, t66 = _bwd_conv_tap_row(taps_ptr, 6, offs_c, mask_c, C)
    zero = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    d00, d01, d02, d03, d04, d05, d06 = zero, zero, zero, zero, zero, zero, zero
    d10, d11, d12, d13, d14, d15, d16 = zero, zero, zero, zero, zero, zero, zero
    d20, d21, d22, d23, d24, d25, d26 = zero, zero, zero, zero, zero, zero, zero
    d30, d31, d32, d33, d34, d35, d36 = zero, zero, zero, zero, zero, zero, zero
    d40, d41, d42, d43, d44, d45, d46 = zero, zero, zero, zero, zero, zero, zero
    d50, d51, d52, d53, d54, d55, d56 = zero, zero, zero, zero, zero, zero, zero
    d60, d61, d62, d63, d64, d65, d66 = zero, zero, zero, zero, zero, zero, zero

    for n in range(n_begin, n_end):
        sample_row0 = n * H
        for w_begin in range(0, W, BLOCK_W):
            offs_w = w_begin + tl.arange(0, BLOCK_W)
            mask_w = offs_w < W
            r0, r1, r2, r3, r4, r5, r6 = zero, zero, zero, zero, zero, zero, zero
            x0, x1, x2, x3, x4, x5 = zero, zero, zero, zero, zero, zero
            for gr in range(h_begin - 3, h_end + 3):
                x6 = zero
                if (gr + 3 >= h_begin) & (gr + 3 < h_end):
                    x6 = tl.load(x_ptr + ((sample_row0 + gr + 3) * W + offs_w)[:, None] * C + offs_c[None, :],
                                 mask=mask_w[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
                if gr >= 0 and gr < H:  # `and`, as in _ring_row
                    g_row = g_ptr + (sample_row0 + gr) * W * C
                    g0 = _shifted_row(g_row, offs_w, -3, W, offs_c, mask_c, C)
                    g1 = _shifted_row(g_row, offs_w, -2, W, offs_c, mask_c, C)
                    g2 = _shifted_row(g_row, offs_w, -1, W, offs_c, mask_c, C)
                    g3 = _shifted_row(g_row, offs_w, 0, W, offs_c, mask_c, C)
                    g4 = _shifted_row(g_row, offs_w, 1, W, offs_c, mask_c, C)
                    g5 = _shifted_row(g_row, offs_w, 2, W, offs_c, mask_c, C)
                    g6 = _shifted_row(g_row, offs_w, 3, W, offs_c, mask_c, C)
                    r0, d00, d01, d02, d03, d04, d05, d06 = _bwd_conv_kernel_row(
                        g0, g1, g2, g3, g4, g5, g6, x0, r0, t00, t01, t02, t03, t04, t05, t06,
                        d00, d01, d02, d03, d04, d05, d06)
                    r1, d10, d11, d12, d13, d14, d15, d16 = _bwd_conv_kernel_row(
                        g0, g1, g2, g3, g4, g5, g6, x1, r1, t10, t11, t12, t13, t14, t15, t16,
                        d10, d11, d12, d13, d14, d15, d16)
                    r2, d20, d21, d22, d23, d24, d25, d26 = _bwd_conv_kernel_row(
                        g0, g1, g2, g3, g4, g5, g6, x2, r2, t20, t21, t22, t23, t24, t25, t26,
                        d20, d21, d22, d23, d24, d25, d26)
                    r3, d30, d31, d32, d33, d34, d35, d36 = _bwd_conv_kernel_row(
                        g0, g1, g2, g3, g4, g5, g6, x3, r3, t30, t31, t32, t33, t34, t35, t36,
                        d30, d31, d32, d33, d34, d35, d36)
                    r4, d40, d41, d42, d43, d44, d45, d46 = _bwd_conv_kernel_row(
                        g0, g1, g2, g3, g4, g5, g6, x4, r4, t40, t41, t42, t43, t44, t45, t46,
                        d40, d41, d42, d43, d44, d45, d46)
                    r5, d50, d51, d52, d53, d54, d55, d56 = _bwd_conv_kernel_row(
                        g0, g1, g2, g3, g4, g5, g6, x5, r5, t50, t51, t52, t53, t54, t55, t56,
                        d50, d51, d52, d53, d54, d55, d56)
                    r6, d60, d61, d62, d63, d64, d65, d66 = _bwd_conv_kernel_row(
                        g0, g1, g2, g3, g4, g5, g6, x6, r6, t60, t61, t62, t63, t64, t65, t66,
                        d60, d61, d62, d63, d64, d65, d66)
                if gr - 3 >= h_begin:  # r0 is dx row gr - 3, complete (< h_end: gr < h_end + 3)
                    pix = (sample_row0 + gr - 3) * W + offs_w
                    tl.store(dx_ptr + pix[:, None] * C + offs_c[None, :], r0.to(dx_ptr.dtype.element_ty),
                             mask=mask_w[:, None] & mask_c[None, :])
                r0, r1, r2, r3, r4, r5, r6 = r1, r2, r3, r4, r5, r6, zero
                x0, x1, x2, x3, x4, x5 = x1, x2, x3, x4, x5, x6

    _bwd_conv_store_tap_row(dw_part_ptr, part, 0, offs_c, mask_c, C, d00, d01, d02, d03, d04, d05, d06)
    _bwd_conv_store_tap_row(dw_part_ptr, part, 1, offs_c, mask_c, C, d10, d11, d12, d13, d14, d15, d16)
    _bwd_conv_store_tap_row(dw_part_ptr, part, 2, offs_c, mask_c, C, d20, d21, d22, d23, d24, d25, d26)
    _bwd_conv_store_tap_row(dw_part_ptr, part, 3, offs_c, mask_c, C, d30, d31, d32, d33, d34, d35, d36)
    _bwd_conv_store_tap_row(dw_part_ptr, part, 4, offs_c, mask_c, C, d40, d41, d42, d43, d44, d45, d46)
    _bwd_conv_store_tap_row(dw_part_ptr, part, 5, offs_c, mask_c, C, d50, d51, d52, d53, d54, d55, d56)
    _bwd_conv_store_tap_row(dw_part_ptr, part, 6, offs_c, mask_c, C, d60, d61, d62, d63, d64, d65, d66)


def _channel_split(C):
    """(BLOCK_C0, BLOCK_C1, BLOCK_C2): the C channels as up to three power-of-two tiles side by
    side (0: absent), the split that pads least, tiles of one width first: one tile at a power
    of 2; three equal ones at 3 * 2^k (ConvNeXt-T's 96 = 3 x 32, 384 = 3 x 128); the largest
    power of 2 <= C and the rest at 5 * 2^k (atto's 40 = 32 + 8). Tiles of two widths get two
    layouts, and triton then carries ring accumulators in both across the row loop and reduces
    them twice for the statistics: in the forward at C = 96, 64 + 32 cost 631 instructions a
    row step outside the column loop against 333 for 3 x 32, and 157 registers against 82
    (sm_90 SASS, triton 3.6, 6 values a thread, 2026-12-06); at C = 384 triton 3.8 spilled
    328 B. At 5 * 2^k three equal tiles pad a fifth, which costs more than the layouts (C = 80,
    triton 3.9: 954 instructions a row step against 839).
    Every tile but the last lies within C (the equal ones: BLOCK_C <= next_power_of_2(C) / 4 <
    C / 2), so only the last can need a mask."""
    one = triton.next_power_of_2(C)
    third = triton.next_power_of_2(triton.cdiv(C, 3))
    first = 1 << (C.bit_length() - 1)
    splits = [(one, 0, 0), (third, third, third)]
    if first < C:
        splits.append((first, triton.next_power_of_2(C - first), 0))
    return min(splits, key=sum)  # min keeps the first of equal sums: one layout before two


def _ring_tiling(H, W, C, backward=False):
    """(ROWS, BLOCK_W, (BLOCK_C0, BLOCK_C1, BLOCK_C2), num_warps) for the forward kernel, or with
    backward for the backward-norm kernel (the same programs, maybe fewer values per thread),
    whose programs hold seven row accumulators of BLOCK_W pixels x C."""
    tiles = _channel_split(C)
    width = sum(tiles)
    # Chosen from the sm_90 SASS of the ConvNeXt-T stage shapes (triton 3.9, 2026-12-05): 8-pixel
    # tiles up to C = 384 and one pixel above keep the conv loop free of layout conversions
    # through shared memory; 4-pixel tiles at C = 192 and 2-pixel tiles at C = 384 put 14-40
    # barriers into every kernel column.
    block_w = min(8 if width <= 512 else max(1, _RING_TILE_ELEMS // width), triton.next_power_of_2(W))
    # Values of each ring accumulator per thread. The kernels are instruction-bound (49 FMAs an
    # element, plus loads and the row's LayerNorm), and each thread's share of the per-column
    # taps and addressing, and of the row's reductions, is paid once for all its values: in the
    # forward, 12 rather than 6 cut the instructions per output pixel by a quarter (sm_90 SASS,
    # triton 3.6, 2026-12-06; C = 96: 446 -> 328 warp-instructions, 192: 864 -> 658, 768:
    # 3528 -> 2606, at 140-146 registers against 80-99). The backward-norm also holds its three
    # weight-gradient sums per tile: at 12 it took 250 registers at C = 96, so it stays at 6.
    # Tiles of two widths (5 * 2^k) hold duplicate ring tiles (_channel_split): also 6 (12 took
    # 255 registers at C = 80 and spilled 1 KB at C = 40).
    values = _RING_FWD_VALUES if not backward and len({t for t in tiles if t}) == 1 else 6
    num_warps = min(8, triton.next_power_of_2(triton.cdiv(block_w * width, 32 * values)))
    # Rows in chunks of at most 16 (each chunk re-reads 6 halo rows): enough programs to fill
    # the GPU at the ConvNeXt stage shapes.
    rows = triton.cdiv(H, triton.cdiv(H, _RING_MAX_ROWS))
    return rows, block_w, tiles, num_warps


def _grid(programs: int, x: Tensor) -> Tuple[int]:
    _, _, W, C = x.shape
    if (W + 3) * C > _MAX_ROW_ELEMS:
        raise ValueError(f"dwconv_layernorm: x of shape {tuple(x.shape)} has W * C = {W * C} elements in an image "
                         f"row; the triton backend takes rows of fewer than 2^31 (with 3 columns of padding): "
                         f"use backend 'cuda'")
    if programs > _MAX_PROGRAMS:
        raise ValueError(f"dwconv_layernorm: x of shape {tuple(x.shape)} needs {programs} programs, more than a "
                         f"launch grid holds ({_MAX_PROGRAMS}); split the batch")
    return (programs,)


def _taps(conv_weight, width=None):
    # (C, 1, 7, 7) -> (49, C): each tap's weights become one contiguous C vector; with width,
    # (49, width), zero past C.
    C = conv_weight.shape[0]
    taps = conv_weight.reshape(C, TAPS).t()
    return taps.contiguous() if width is None or width == C else F.pad(taps, (0, width - C))


@on_tensors_device
def dwconv_layernorm_fwd(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    norm_weight: Tensor,
    norm_bias: Tensor,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """y = LayerNorm_C(dwconv7x7(x) + conv_bias); returns (y, mean, rstd)."""
    N, H, W, C = x.shape
    y, mean, rstd = dwconv_layernorm_fwd_outputs(x)
    has_bias = conv_bias is not None
    rows, block_w, tiles, num_warps = _ring_tiling(H, W, C)
    taps = _taps(conv_weight, sum(tiles))
    grid = _grid(triton.cdiv(W, block_w) * N * triton.cdiv(H, rows), x)
    wrap_triton(_dwconv_layernorm_fwd_kernel)[grid](
        x, taps, conv_bias if has_bias else taps, norm_weight, norm_bias,
        y, mean, rstd,
        H, W, C, eps, rows,
        HAS_BIAS=has_bias, BLOCK_W=block_w, BLOCK_C0=tiles[0], BLOCK_C1=tiles[1], BLOCK_C2=tiles[2],
        EVEN_C=sum(tiles) == C, num_warps=num_warps,
    )
    return y, mean, rstd


def _conv_bwd_tiling(N, H, W, C):
    """(SAMPLES, ROWS, BLOCK_W, BLOCK_C, num_warps) for the backward conv kernel."""
    # Channel tiles that divide C where a power of 2 from 8 up does (ConvNeXt widths: 32 | C, or
    # 8 | C for atto's 40 / 80); else one padded tile.
    lowest_bit = C & -C
    block_c = min(_CONV_BWD_BLOCK_C, lowest_bit if lowest_bit >= 8 else triton.next_power_of_2(C))
    block_w = max(1, min(_CONV_BWD_THREADS // block_c, triton.next_power_of_2(W)))
    c_tiles = triton.cdiv(C, block_c)
    # A program takes whole images where that leaves enough programs: the ring's 6 halo rows
    # are g rows outside the image, skipped. Split rows only to reach _CONV_BWD_PROGRAMS (at
    # least 14 rows a chunk: each chunk redoes 6 halo rows), and give a program several samples
    # where whole images leave more than twice that (fewer (parts, 49, C) partials to sum).
    # The CUDA kernels' split_rows (csrc/cuda/dwconv_layernorm.cuh) is the same rule: change both.
    chunks = max(1, min(triton.cdiv(_CONV_BWD_PROGRAMS, N * c_tiles), H // 14))
    rows = triton.cdiv(H, chunks)
    samples = max(1, N * c_tiles // (2 * _CONV_BWD_PROGRAMS)) if chunks == 1 else 1
    num_warps = max(1, block_w * block_c // 32)
    return samples, rows, block_w, block_c, num_warps


@on_tensors_device
def dwconv_layernorm_bwd(
    dy: Tensor,
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    norm_weight: Tensor,
    mean: Tensor,
    rstd: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dconv_weight, dconv_bias, dnorm_weight, dnorm_bias)."""
    N, H, W, C = x.shape
    dev = x.device
    taps = _taps(conv_weight)
    has_bias = conv_bias is not None

    # Kernel 1: gradient w.r.t. the conv output + LayerNorm / bias partials.
    rows1, block_w, tiles, num_warps = _ring_tiling(H, W, C, backward=True)
    programs1 = triton.cdiv(W, block_w) * N * triton.cdiv(H, rows1)
    grid1 = _grid(programs1, x)
    g = empty_output((N, H, W, C), torch.float32, dev)
    dnw_part = empty_output((programs1, C), torch.float32, dev)
    dnb_part = empty_output((programs1, C), torch.float32, dev)
    dcb_part = empty_output((programs1, C), torch.float32, dev)
    wrap_triton(_dwconv_layernorm_bwd_norm_kernel)[grid1](
        dy, x, _taps(conv_weight, sum(tiles)), conv_bias if has_bias else taps, norm_weight, mean, rstd,
        g, dnw_part, dnb_part, dcb_part,
        H, W, C, rows1,
        HAS_BIAS=has_bias, BLOCK_W=block_w, BLOCK_C0=tiles[0], BLOCK_C1=tiles[1], BLOCK_C2=tiles[2],
        EVEN_C=sum(tiles) == C, num_warps=num_warps,
    )

    # Kernel 2: dx (transposed conv of g) + conv-weight partials.
    samples, rows, block_w2, block_c2, num_warps2 = _conv_bwd_tiling(N, H, W, C)
    parts = triton.cdiv(N, samples) * triton.cdiv(H, rows)
    grid2 = _grid(parts * triton.cdiv(C, block_c2), x)
    dx = empty_output(x.shape, x.dtype, x.device)
    dw_part = empty_output((parts, TAPS, C), torch.float32, dev)
    wrap_triton(_dwconv_layernorm_bwd_conv_kernel)[grid2](
        g, x, taps, dx, dw_part,
        N, H, W, C, samples, rows,
        BLOCK_W=block_w2, BLOCK_C=block_c2, num_warps=num_warps2,
    )
    # Fixed-order reductions (deterministic).
    dconv_weight = dw_part.sum(0).t().reshape(C, 1, KERNEL_SIZE, KERNEL_SIZE).contiguous()
    dconv_bias = dcb_part.sum(0)
    dnorm_weight = dnw_part.sum(0)
    dnorm_bias = dnb_part.sum(0)
    return dx, dconv_weight, dconv_bias, dnorm_weight, dnorm_bias
