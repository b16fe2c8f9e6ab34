// dwconv_layernorm: depthwise 7x7 convolution (+bias) followed by LayerNorm over C, NHWC.
//
// The conv on a ring (ring_conv; the forward and the backward recompute): a block walks a strip of
// pixel columns down a sample's rows, each input row loaded once into a ring of 7 output-row
// accumulators (per thread: 1 channel x 4 pixels, or 2 x 2 for C > kRingMaxThreads, the channels'
// 49 taps in registers); complete rows go to shared memory, where the LayerNorm (forward) or its
// gradient (backward) runs on a few lanes a pixel (PixelLanes; shuffle sums; the forward in two
// passes: mean, then centred variance). C past the ring's block (more than kRingMaxThreads channel
// groups: C > 768, or C > 384 on the scalar path) takes the tile kernels.
//
// Tile kernels (the forward and the backward recompute for wide C): a block owns `tile_w`
// consecutive output pixels of one (n, h) row, all C channels. In the conv phase a thread owns VEC
// channels and kSegment consecutive output pixels; it streams the 7 input rows through registers
// (sliding window along W, 16-byte loads when VEC == 8), with the weights pre-transposed to
// [49][C] so a tap's VEC channels are one vector load. The conv output of the tile goes to shared
// memory (fp32) for the LayerNorm.
//
// Backward: recompute kernel -> g = dL/dz (fp32 workspace) + per-block partials of dnorm_weight,
// dnorm_bias, dconv_bias; conv kernel -> dx (the transposed conv of g) and per-block partials of
// dconv_weight in one pass over g; reduce kernel sums partials in fixed order.
#pragma once

#include "cuda_utils.cuh"

namespace convnext_kernels {
namespace cuda {
namespace dwconv {

constexpr int kKernelSize = 7;                      // 7x7 depthwise taps
constexpr int kTaps = kKernelSize * kKernelSize;    // 49
constexpr int kPad = kKernelSize / 2;               // 3: "same" padding
// Output pixels per thread in the conv phase: more pixels = fewer redundant input loads, but more
// registers (VEC * (segment + 7 weights) live values); 2 keeps the 16-byte path spill-free at the
// 128-register cap (4 spilled ~40 bytes).
constexpr int kSegmentVector = 2;
constexpr int kSegmentScalar = 4;
constexpr int segment_width(int vec) { return vec == 8 ? kSegmentVector : kSegmentScalar; }
constexpr int kMaxSegmentsPerTile = 16;             // tile_w <= 16 * segment pixels
constexpr int kMaxThreads = 256;                    // conv/LN kernels' block size cap
constexpr int kMinBlocksPerSm = 2;                  // caps registers at 128/thread: >= 16 warps per SM
// The backward conv kernel (dx and dconv_weight):
constexpr int kConvBwdChannels = 32;       // channels per block: a warp, one channel a lane
constexpr int kConvBwdPixels = 4;          // pixel pairs walked at once: a warp each
constexpr int kConvBwdPair = 2;            // pixels a thread walks side by side (they share its registers)
// Its [pixel pair][channel][tap] reduction buffer (25 KB, dynamic shared memory).
constexpr int kConvBwdSmemBytes = kConvBwdPixels * kConvBwdChannels * kTaps * static_cast<int>(sizeof(float));
constexpr int kStatsMaxBlocks = 2048;               // recompute kernel: persistent blocks (partials rows)
// The ring kernels (forward and backward recompute):
// A ring thread convolves kCh channels at kPx pixel columns side by side (they share its taps):
//   kCh 1, kPx 4 where C channels fit a block (C <= kRingMaxThreads): 49 taps, 28 accumulators and
//     10 input columns in registers, no spills; a row step is 196 FMAs for 10 loads;
//   kCh 2, kPx 2 for wider C on the 16-byte path (C <= 2 * kRingMaxThreads): 98 taps and 28
//     accumulators; a row step is 196 FMAs for 8 two-channel loads, but ptxas spills (below).
constexpr int ring_pixels(int channels) { return channels == 1 ? 4 : 2; }
// Block size cap: __launch_bounds__(384) caps registers at 168. There kCh 1 spills nothing in the
// forward's row steps (28 B outside them in the backward recompute); kCh 2 spills 64 B (forward)
// and 124 B (backward recompute), 12 and 21 reloads (L1) a row step against its 196 FMAs (bf16,
// sm_90a).
constexpr int kRingMaxThreads = 384;
// How the ring kernels and the backward conv share out the batch's rows (split_rows):
constexpr int kTargetBlocks = 512;     // blocks to aim for before splitting rows into chunks: a few per SM
constexpr int kMinRowChunk = 14;       // shortest row chunk (each redoes 6 halo rows)

struct ConvTile {
  int64_t n;
  int h;
  int w_begin;
  int n_valid;  // pixels of this tile inside the image (<= tile_w)
};

__device__ __forceinline__ ConvTile decode_tile(int64_t tile, int tiles_w, int tile_w, int H, int W) {
  ConvTile t;
  const int64_t nh = tile / tiles_w;
  t.w_begin = static_cast<int>(tile - nh * tiles_w) * tile_w;
  t.h = static_cast<int>(nh % H);
  t.n = nh / H;
  t.n_valid = min(tile_w, W - t.w_begin);
  return t;
}

// acc[s][v] = sum_{r,k} in[h + r - 3][w0 + s + k - 3][c + v] * wt[r * 7 + k][c + v]  (zero padding).
// `in_n` points at sample n; `wt` is [49][C] fp32.
template <typename TIn, int VEC>
__device__ __forceinline__ void dwconv7x7_segment(const TIn* __restrict__ in_n, const float* __restrict__ wt,
                                                  int h, int w0, int c, int H, int W, int C,
                                                  float (&acc)[segment_width(VEC)][VEC]) {
  constexpr int kSegment = segment_width(VEC);
#pragma unroll
  for (int s = 0; s < kSegment; ++s)
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[s][v] = 0.0f;

#pragma unroll 1
  for (int r = 0; r < kKernelSize; ++r) {
    const int ih = h + r - kPad;
    if (ih < 0 || ih >= H) continue;
    float wr[kKernelSize][VEC];
#pragma unroll
    for (int k = 0; k < kKernelSize; ++k) load_f32<VEC>(wt + static_cast<int64_t>(r * kKernelSize + k) * C + c, wr[k]);
    const TIn* row = in_n + static_cast<int64_t>(ih) * W * C + c;
#pragma unroll
    for (int j = 0; j < kSegment + kKernelSize - 1; ++j) {
      const int iw = w0 + j - kPad;
      float xv[VEC];
      if (iw >= 0 && iw < W) {
        load_as_float<TIn, VEC>(row + static_cast<int64_t>(iw) * C, xv);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) xv[v] = 0.0f;
      }
#pragma unroll
      for (int s = 0; s < kSegment; ++s) {
        const int k = j - s;  // compile-time after unrolling
        if (k >= 0 && k < kKernelSize) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[s][v] = fmaf(xv[v], wr[k][v], acc[s][v]);
        }
      }
    }
  }
}

// Conv phase shared by the forward and the backward recompute: z (+bias) of one tile -> smem_z.
template <typename T, int VEC>
__device__ __forceinline__ void conv_tile_to_smem(const T* __restrict__ x, const float* __restrict__ wt,
                                                  const float* __restrict__ conv_bias, const ConvTile& tile,
                                                  int H, int W, int C, float* smem_z) {
  constexpr int kSegment = segment_width(VEC);
  const int cvecs = C / VEC;
  const int segs = (tile.n_valid + kSegment - 1) / kSegment;
  const T* x_n = x + tile.n * H * W * static_cast<int64_t>(C);
  for (int item = threadIdx.x; item < cvecs * segs; item += blockDim.x) {
    const int c = (item % cvecs) * VEC;
    const int seg = item / cvecs;
    float acc[kSegment][VEC];
    dwconv7x7_segment<T, VEC>(x_n, wt, tile.h, tile.w_begin + seg * kSegment, c, H, W, C, acc);
    float bias[VEC];
    if (conv_bias != nullptr) {
      load_f32<VEC>(conv_bias + c, bias);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) bias[v] = 0.0f;
    }
#pragma unroll
    for (int s = 0; s < kSegment; ++s) {
      const int p = seg * kSegment + s;
      if (p < tile.n_valid) {
        float z[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) z[v] = acc[s][v] + bias[v];
        store_f32<VEC>(smem_z + static_cast<int64_t>(p) * C + c, z);
      }
    }
  }
}

struct FwdParams {
  const void* x;
  const float* wt;  // [49][C] transposed conv weight
  const float* conv_bias;  // nullable
  const float* norm_weight;
  const float* norm_bias;
  void* y;
  float* mean;
  float* rstd;
  int H, W, C;
  int tile_w, tiles_w;
  int64_t num_tiles;
  float eps;
};

// The LayerNorm phases share a warp among 32 / lanes pixels, `lanes` lanes a pixel: the fewest
// (a power of 2, at most 32) that hold C in VEC-wide pieces, so that at small C few lanes idle
// (C = 96 on the 16-byte path: 16 lanes a pixel, 12 of them busy, two pixels a warp, where a
// whole warp a pixel kept 20 of 32 lanes idle).
struct PixelLanes {
  int lanes;     // lanes a pixel
  int per_warp;  // pixels a warp: 32 / lanes
  int group;     // this lane's pixel among the warp's
  int lane;      // this lane among its pixel's lanes
};

template <int VEC>
__device__ __forceinline__ PixelLanes pixel_lanes(int C) {
  PixelLanes p;
  const int pieces = (C + VEC - 1) / VEC;
  p.lanes = 1;
  while (p.lanes < 32 && p.lanes < pieces) p.lanes *= 2;
  p.per_warp = 32 / p.lanes;
  const int lane = threadIdx.x % 32;
  p.group = lane / p.lanes;
  p.lane = lane % p.lanes;
  return p;
}

// Sum over each aligned group of `lanes` lanes (a power of 2); every lane of the warp takes part.
__device__ __forceinline__ float group_sum(float v, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// LayerNorm of rows x row_pixels pixels whose conv output z (+bias) is in shared memory ([row] at
// smem_row_stride floats, then [pixel][C] fp32), the first at pixel index pix0 and each row W
// pixels after the last: PixelLanes lanes a pixel (shuffle sums; two passes over shared memory,
// mean then the centred variance: no cancellation); y, mean and rstd out. Only whole warps call
// it (the shuffles take all 32 lanes; lanes past the last pixel only join them).
template <typename T, int VEC>
__device__ __forceinline__ void layernorm_smem_pixels(const float* smem_z, int rows, int row_pixels,
                                                      int64_t smem_row_stride, int64_t pix0, int W, int C,
                                                      const float* __restrict__ norm_weight,
                                                      const float* __restrict__ norm_bias, float eps, T* y,
                                                      float* mean_out, float* rstd_out, int warp, int num_warps) {
  const PixelLanes pl = pixel_lanes<VEC>(C);
  const float inv_c = 1.0f / static_cast<float>(C);
  const int items = rows * row_pixels;
  for (int first = warp * pl.per_warp; first < items; first += num_warps * pl.per_warp) {  // warp-uniform
    const int item = first + pl.group;
    const int c_end = item < items ? C : 0;  // lanes past the last pixel load nothing
    const int row = item / row_pixels;
    const float* z = smem_z + row * smem_row_stride + static_cast<int64_t>(item - row * row_pixels) * C;
    float sum = 0.0f;
    for (int c = pl.lane * VEC; c < c_end; c += pl.lanes * VEC) {
      float v[VEC];
      load_f32<VEC>(z + c, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum += v[i];
    }
    const float mean = group_sum(sum, pl.lanes) * inv_c;
    float sq = 0.0f;
    for (int c = pl.lane * VEC; c < c_end; c += pl.lanes * VEC) {
      float v[VEC];
      load_f32<VEC>(z + c, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float d = v[i] - mean;
        sq = fmaf(d, d, sq);
      }
    }
    const float rstd = 1.0f / sqrtf(group_sum(sq, pl.lanes) * inv_c + eps);
    if (item >= items) continue;
    const int64_t pix = pix0 + static_cast<int64_t>(row) * W + (item - row * row_pixels);
    T* y_pix = y + pix * C;
    for (int c = pl.lane * VEC; c < C; c += pl.lanes * VEC) {
      float v[VEC], nw[VEC], nb[VEC], out[VEC];
      load_f32<VEC>(z + c, v);
      load_f32<VEC>(norm_weight + c, nw);
      load_f32<VEC>(norm_bias + c, nb);
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = fmaf((v[i] - mean) * rstd, nw[i], nb[i]);
      store_from_float<T, VEC>(y_pix + c, out);
    }
    if (pl.lane == 0) {
      mean_out[pix] = mean;
      rstd_out[pix] = rstd;
    }
  }
}

// The LayerNorm backward of one pixel, by its PixelLanes lanes (with c_end = C; c_end = 0 for
// lanes past the last pixel, which only join the shuffles): z (its conv output +bias, in shared
// memory) becomes xhat in place, and g = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat *
// xhat)), dxhat = dy * norm_weight, goes to g_smem and to the workspace g_pix.
template <typename T, int VEC>
__device__ __forceinline__ void layernorm_grad_pixel(const PixelLanes& pl, int c_end, float* xh, float* g_smem,
                                                     float* g_pix, const T* dy_pix,
                                                     const float* __restrict__ norm_weight, float mean, float rstd,
                                                     int C) {
  const float inv_c = 1.0f / static_cast<float>(C);
  float s1 = 0.0f, s2 = 0.0f;
  for (int c = pl.lane * VEC; c < c_end; c += pl.lanes * VEC) {
    float z[VEC], d[VEC], nw[VEC];
    load_f32<VEC>(xh + c, z);
    load_as_float<T, VEC>(dy_pix + c, d);
    load_f32<VEC>(norm_weight + c, nw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      z[i] = (z[i] - mean) * rstd;
      const float dxh = d[i] * nw[i];
      s1 += dxh;
      s2 = fmaf(dxh, z[i], s2);
    }
    store_f32<VEC>(xh + c, z);  // same lane reads it back below
  }
  s1 = group_sum(s1, pl.lanes) * inv_c;
  s2 = group_sum(s2, pl.lanes) * inv_c;
  for (int c = pl.lane * VEC; c < c_end; c += pl.lanes * VEC) {
    float z[VEC], d[VEC], nw[VEC], g[VEC];
    load_f32<VEC>(xh + c, z);
    load_as_float<T, VEC>(dy_pix + c, d);
    load_f32<VEC>(norm_weight + c, nw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) g[i] = rstd * (d[i] * nw[i] - s1 - z[i] * s2);
    store_f32<VEC>(g_smem + c, g);
    store_f32<VEC>(g_pix + c, g);
  }
}

// The recompute kernels' per-block sums, a thread a channel, in fixed pixel order (deterministic):
// acc[0 / 1 / 2][c] += sums of dy * xhat, dy and g over rows x row_pixels pixels, whose xhat and g
// are in shared memory ([row] at smem_row floats, then [pixel][C]) and whose first pixel has
// index pix0, each row W pixels after the last.
template <typename T>
__device__ __forceinline__ void accumulate_norm_grad_sums(const float* xhat, const float* g, int64_t smem_row,
                                                          int rows, int row_pixels, const T* dy, int64_t pix0, int W,
                                                          int C, float* acc) {
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float a_nw = 0.0f, a_nb = 0.0f, a_cb = 0.0f;
    for (int row = 0; row < rows; ++row) {
      for (int pl = 0; pl < row_pixels; ++pl) {
        const int64_t at = row * smem_row + static_cast<int64_t>(pl) * C + c;
        const float d = to_float(dy[(pix0 + static_cast<int64_t>(row) * W + pl) * C + c]);
        a_nw = fmaf(d, xhat[at], a_nw);
        a_nb += d;
        a_cb += g[at];
      }
    }
    acc[c] += a_nw;
    acc[C + c] += a_nb;
    acc[2 * C + c] += a_cb;
  }
}

// The block's row of the [3][blocks][C] partials (dnorm_weight, dnorm_bias, dconv_bias).
__device__ __forceinline__ void store_norm_grad_partials(const float* acc, float* partials, int C) {
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
#pragma unroll
    for (int k = 0; k < 3; ++k)
      partials[(static_cast<int64_t>(k) * gridDim.x + blockIdx.x) * C + c] = acc[k * C + c];
  }
}

// The forward for C too wide for the ring kernel below (more than kRingMaxThreads channel groups):
// one block a tile of a row, its conv into shared memory, then LayerNorm.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm) dwconv_layernorm_fwd_kernel(FwdParams p) {
  CNK_DYNAMIC_SMEM(float4, smem_raw);  // float4: 16-byte aligned for vector access
  float* smem_z = reinterpret_cast<float*>(smem_raw);  // [tile_w][C]
  const ConvTile tile = decode_tile(blockIdx.x, p.tiles_w, p.tile_w, p.H, p.W);
  conv_tile_to_smem<T, VEC>(static_cast<const T*>(p.x), p.wt, p.conv_bias, tile, p.H, p.W, p.C, smem_z);
  __syncthreads();
  const int64_t pix0 = (tile.n * p.H + tile.h) * static_cast<int64_t>(p.W) + tile.w_begin;
  layernorm_smem_pixels<T, VEC>(smem_z, 1, tile.n_valid, 0, pix0, p.W, p.C, p.norm_weight, p.norm_bias, p.eps,
                                static_cast<T*>(p.y), p.mean, p.rstd, threadIdx.x / 32, blockDim.x / 32);
}

// Two channels of a pixel (kChannels 2: one 4-byte load of bf16 / fp16, 8 bytes of fp32) or one,
// as floats.
template <typename T, int kChannels>
__device__ __forceinline__ void load_channels_as_float(const T* __restrict__ p, float (&out)[kChannels]) {
  static_assert(kChannels == 1 || kChannels == 2, "one or two channels");
  if constexpr (kChannels == 1) {
    out[0] = to_float(p[0]);
  } else if constexpr (sizeof(T) == 4) {
    const float2 v = __ldg(reinterpret_cast<const float2*>(p));
    out[0] = v.x;
    out[1] = v.y;
  } else {
    const unsigned raw = __ldg(reinterpret_cast<const unsigned*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
    out[0] = to_float(e[0]);
    out[1] = to_float(e[1]);
  }
}

// A block's share of the batch's rows: its part (a group of samples x a chunk of their rows).
struct RowSplit {
  int64_t samples;  // samples per part
  int rows;         // rows per part: a chunk of each of its samples' rows
  int chunks;       // row chunks per sample
  int64_t parts;    // sample groups x row chunks
};

// Whole images per part where there are enough blocks (a ring's halo rows outside the image cost
// nothing); else row chunks of at least kMinRowChunk rows, enough for kTargetBlocks; several
// samples per part where whole images leave more than twice kTargetBlocks (fewer partial rows).
// lanes: blocks that share one part (strips of a row, channel blocks). The Triton backward conv's
// _conv_bwd_tiling follows the same rule.
inline RowSplit split_rows(int64_t N, int64_t H, int64_t lanes) {
  RowSplit s;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(kTargetBlocks, N * lanes), H / kMinRowChunk));
  s.rows = static_cast<int>(ceil_div(H, chunks));
  s.chunks = static_cast<int>(ceil_div(H, s.rows));
  s.samples = s.chunks == 1 ? std::max<int64_t>(1, N * lanes / (2 * kTargetBlocks)) : 1;
  s.parts = ceil_div(N, s.samples) * s.chunks;
  return s;
}

// Samples [n_begin, n_end) and rows [h_begin, h_end) of part `part`.
struct PartRows {
  int64_t n_begin, n_end;
  int h_begin, h_end;
};
__device__ __forceinline__ PartRows part_rows(const RowSplit& s, int64_t part, int64_t N, int H) {
  PartRows r;
  r.h_begin = static_cast<int>(part % s.chunks) * s.rows;
  r.h_end = min(H, r.h_begin + s.rows);
  r.n_begin = part / s.chunks * s.samples;
  r.n_end = min(N, r.n_begin + s.samples);
  return r;
}

// The ring kernels' grid: a block owns a strip of kPx * segments pixels of rows [h_begin, h_end)
// of its part's samples (split.samples consecutive ones), all C channels.
struct RingGrid {
  int64_t N;
  int H, W, C;
  int channels;  // channels a thread convolves (kCh; its pixels: ring_pixels(channels))
  int segments;  // groups of ring_pixels(channels) pixels per block
  int strips;    // strips per row
  RowSplit split;
};

// One period's complete output rows (+bias) in shared memory, for the kernels' row phase.
struct RingRows {
  float* z;          // the first row's strip: [rows][smem_row floats], [pixel][C] in a row
  int rows;
  int row_pixels;    // the strip's pixels inside the image
  int64_t smem_row;  // floats between rows
  int64_t pix0;      // pixel index of the first row's first pixel; each row W pixels on
};

// The conv of both ring kernels (the Triton forward's scheme, and the CUDA backward conv's).
// Thread = kCh channels (1, or 2 for C > kRingMaxThreads: one 4-byte load of bf16 / fp16, 8 bytes
// of fp32) and kPx = ring_pixels(kCh) pixel columns (segment); it keeps its channels' 49 taps in
// registers and walks input rows ih = h_begin - 3 .. h_end + 2 of each sample once, each loaded at
// its kPx + 6 column positions and converted once: kernel row r sends input row ih to output row
// ih + 3 - r, in a ring of 7 row accumulators, the top one (row ih - 3) complete after the step.
// Rows outside the image are skipped (zero padding). The row loop is unrolled by the ring's period,
// 7, so ring slots are registers; each complete output row (+bias) goes to its own shared-memory row
// (smem_z: [7][kPx * segments][C]), and after each period of 7 input rows, `rows_done` gets the
// complete ones (block-uniform: it may hold barriers). Threads past the block's segments pad it
// to whole warps: they only take part in rows_done.
// Static check, sm_90a SASS (nvcc 13.0, bf16): the 7 unrolled row steps are 1,372 FMAs in 2,324
// instructions in the forward and 2,254 in the backward recompute with kCh 1 (1.69 and 1.64 a
// FMA: 10 loads a step, each with ~4 instructions of 64-bit addressing and zero padding, and 10
// conversions; no spill reloads), 2,303 and 2,402 with kCh 2 (with 12 and 21 spill reloads a
// step, from L1, against 8 two-channel loads); the tile kernel's kernel-row loop takes 457 for 112
// FMAs, 4.1 a FMA (7 weight-vector loads and 8 input loads per kernel row, 64-bit addressing of
// each).
template <typename T, int kCh, typename RowsDone>
__device__ __forceinline__ void ring_conv(const RingGrid& g, const T* __restrict__ x,
                                          const float* __restrict__ conv_weight, const float* __restrict__ conv_bias,
                                          float* smem_z, RowsDone&& rows_done) {
  constexpr int kPx = ring_pixels(kCh);
  constexpr int kCols = kPx + kKernelSize - 1;  // input columns a thread's pixels read
  const int H = g.H, W = g.W, C = g.C;
  const int groups = C / kCh;  // channel groups: threads per segment
  const int segment = threadIdx.x / groups;
  const int c = (threadIdx.x - segment * groups) * kCh;
  const int64_t block = blockIdx.x;
  const int strip = static_cast<int>(block % g.strips);
  const PartRows rows = part_rows(g.split, block / g.strips, g.N, H);
  const int h_begin = rows.h_begin, h_end = rows.h_end;
  const int64_t n_begin = rows.n_begin, n_end = rows.n_end;
  const int strip_w = kPx * g.segments;
  const int w_strip = strip * strip_w;
  const int strip_pixels = min(strip_w, W - w_strip);
  const int64_t smem_row = static_cast<int64_t>(strip_w) * C;
  const bool conv_thread = segment < g.segments;
  const int w0 = w_strip + kPx * segment;  // the thread's first pixel column

  float wt[kCh][kTaps];
  float bias[kCh];
#pragma unroll
  for (int v = 0; v < kCh; ++v) {
    const int cv = conv_thread ? c + v : 0;
#pragma unroll
    for (int t = 0; t < kTaps; ++t) wt[v][t] = conv_weight[static_cast<int64_t>(cv) * kTaps + t];
    bias[v] = conv_bias != nullptr ? conv_bias[cv] : 0.0f;
  }
  // Bit j: input column w0 + j - 3 inside the row (none for padding threads).
  unsigned cols = 0;
#pragma unroll
  for (int j = 0; j < kCols; ++j) cols |= (conv_thread && w0 + j - kPad >= 0 && w0 + j - kPad < W ? 1u : 0u) << j;
  // The thread's pixels' offsets in a shared-memory row (none for padding threads and pixels
  // past the strip's end).
  int z_off[kPx];
#pragma unroll
  for (int q = 0; q < kPx; ++q) {
    const int pl = kPx * segment + q;
    z_off[q] = conv_thread && pl < strip_pixels ? pl * C + c : -1;
  }
  const int64_t row_stride = static_cast<int64_t>(W) * C;

  for (int64_t n = n_begin; n < n_end; ++n) {
    // Element index of (n, ih, w0 - 3, c) for the step's input row ih (h_begin - 3 at first).
    int64_t e = ((n * H + h_begin - kPad) * W + w0 - kPad) * C + c;
    float ring[kKernelSize][kPx][kCh];
#pragma unroll
    for (int i = 0; i < kKernelSize; ++i)
#pragma unroll
      for (int q = 0; q < kPx; ++q)
#pragma unroll
        for (int v = 0; v < kCh; ++v) ring[i][q][v] = 0.0f;

    for (int ih0 = h_begin - kPad; ih0 < h_end + kPad; ih0 += kKernelSize) {
#pragma unroll
      for (int s = 0; s < kKernelSize; ++s) {
        const int ih = ih0 + s;
        if (ih >= h_end + kPad) break;
        if (ih >= 0 && ih < H) {
          float xin[kCols][kCh];
          const T* col = x + e;
#pragma unroll
          for (int j = 0; j < kCols; ++j, col += C) {
            if (cols >> j & 1u) {
              load_channels_as_float<T, kCh>(col, xin[j]);
            } else {
#pragma unroll
              for (int v = 0; v < kCh; ++v) xin[j][v] = 0.0f;
            }
          }
#pragma unroll
          for (int r = 0; r < kKernelSize; ++r) {
            const int slot = (s + 2 * kKernelSize + kPad - r) % kKernelSize;  // output row ih + 3 - r
#pragma unroll
            for (int k = 0; k < kKernelSize; ++k)
#pragma unroll
              for (int q = 0; q < kPx; ++q)
#pragma unroll
                for (int v = 0; v < kCh; ++v)
                  ring[slot][q][v] = fmaf(xin[q + k][v], wt[v][r * kKernelSize + k], ring[slot][q][v]);
          }
        }
        const int top = (s + kKernelSize - kPad) % kKernelSize;  // output row ih - 3: complete
        if (ih - kPad >= h_begin) {
          float* z_row = smem_z + s * smem_row;
#pragma unroll
          for (int q = 0; q < kPx; ++q) {
            if (z_off[q] >= 0) {
#pragma unroll
              for (int v = 0; v < kCh; ++v) z_row[z_off[q] + v] = ring[top][q][v] + bias[v];
            }
          }
        }
#pragma unroll
        for (int q = 0; q < kPx; ++q)
#pragma unroll
          for (int v = 0; v < kCh; ++v) ring[top][q][v] = 0.0f;
        e += row_stride;
      }
      // Output rows ih0 + s - 3 of this period's steps s in [s_first, s_last] are in shared memory.
      const int s_first = max(0, h_begin + kPad - ih0);
      const int s_last = min(kKernelSize - 1, h_end + kPad - 1 - ih0);
      if (s_first <= s_last) {  // block-uniform
        rows_done(RingRows{smem_z + s_first * smem_row, s_last - s_first + 1, strip_pixels, smem_row,
                           (n * H + ih0 + s_first - kPad) * static_cast<int64_t>(W) + w_strip});
      }
    }
  }
}

struct RingFwdParams {
  RingGrid grid;
  const void* x;
  const float* conv_weight;  // [C][49] as given: a thread's 49 taps of a channel are contiguous
  const float* conv_bias;    // nullable
  const float* norm_weight;
  const float* norm_bias;
  void* y;
  float* mean;
  float* rstd;
  float eps;
};

// The forward: the ring's complete rows, LayerNorm once per 7 rows over all of them, PixelLanes
// lanes a pixel (two barriers per 7 rows, and more pixels to spread over the warps than one row has).
template <typename T, int VEC, int kCh>
__global__ void __launch_bounds__(kRingMaxThreads, 1) dwconv_layernorm_fwd_ring_kernel(RingFwdParams p) {
  static_assert(kCh == 1 || VEC == 8, "two channels a thread only on the 16-byte path");
  CNK_DYNAMIC_SMEM(float4, smem_raw);
  float* smem_z = reinterpret_cast<float*>(smem_raw);  // [7][kPx * segments][C]: the output rows of one period
  ring_conv<T, kCh>(p.grid, static_cast<const T*>(p.x), p.conv_weight, p.conv_bias, smem_z, [&](const RingRows& r) {
    __syncthreads();
    layernorm_smem_pixels<T, VEC>(r.z, r.rows, r.row_pixels, r.smem_row, r.pix0, p.grid.W, p.grid.C, p.norm_weight,
                                  p.norm_bias, p.eps, static_cast<T*>(p.y), p.mean, p.rstd, threadIdx.x / 32,
                                  blockDim.x / 32);
    __syncthreads();  // before the next period's writes
  });
}

struct RingBwdStatsParams {
  RingGrid grid;
  const void* x;
  const void* dy;
  const float* conv_weight;  // [C][49] as given
  const float* conv_bias;    // nullable
  const float* norm_weight;
  const float* mean;
  const float* rstd;
  float* g;         // [N*H*W][C] dL/dz
  float* partials;  // [3][blocks][C]: dnorm_weight, dnorm_bias, dconv_bias
};

// The backward recompute on the ring: z per 7 rows as in the forward; then per pixel (its PixelLanes)
// g = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dy * norm_weight, into
// the workspace, with xhat and g left in shared memory; then per channel (a thread), in fixed
// pixel order, the block's sums of dy * xhat, dy and g: one partial row per block.
template <typename T, int VEC, int kCh>
__global__ void __launch_bounds__(kRingMaxThreads, 1) dwconv_layernorm_bwd_stats_ring_kernel(RingBwdStatsParams p) {
  static_assert(kCh == 1 || VEC == 8, "two channels a thread only on the 16-byte path");
  CNK_DYNAMIC_SMEM(float4, smem_raw);
  const int C = p.grid.C, W = p.grid.W;
  const int64_t period_floats = kKernelSize * static_cast<int64_t>(ring_pixels(kCh)) * p.grid.segments * C;
  float* smem_z = reinterpret_cast<float*>(smem_raw);  // [7][kPx * segments][C]: z, then xhat
  float* smem_g = smem_z + period_floats;               // the same layout: g
  float* smem_acc = smem_g + period_floats;             // [3][C], each channel's thread's own
  for (int c = threadIdx.x; c < 3 * C; c += blockDim.x) smem_acc[c] = 0.0f;  // before the first period's barrier
  const T* dy = static_cast<const T*>(p.dy);
  const int num_warps = blockDim.x / 32;
  const PixelLanes lanes = pixel_lanes<VEC>(C);
  ring_conv<T, kCh>(p.grid, static_cast<const T*>(p.x), p.conv_weight, p.conv_bias, smem_z, [&](const RingRows& r) {
    __syncthreads();
    const int items = r.rows * r.row_pixels;
    for (int first = threadIdx.x / 32 * lanes.per_warp; first < items; first += num_warps * lanes.per_warp) {
      const int item = min(first + lanes.group, items - 1);  // lanes past the last pixel: c_end 0
      const int row = item / r.row_pixels;
      const int pl = item - row * r.row_pixels;
      const int64_t at = row * r.smem_row + static_cast<int64_t>(pl) * C;
      const int64_t pix = r.pix0 + static_cast<int64_t>(row) * W + pl;
      layernorm_grad_pixel<T, VEC>(lanes, first + lanes.group < items ? C : 0, r.z + at, smem_g + (r.z - smem_z) + at,
                                   p.g + pix * C, dy + pix * C, p.norm_weight, p.mean[pix], p.rstd[pix], C);
    }
    __syncthreads();
    accumulate_norm_grad_sums(r.z, smem_g + (r.z - smem_z), r.smem_row, r.rows, r.row_pixels, dy, r.pix0, W, C,
                              smem_acc);
    __syncthreads();  // before the next period's writes
  });
  store_norm_grad_partials(smem_acc, p.partials, C);
}

struct BwdStatsParams {
  const void* x;
  const void* dy;
  const float* wt;  // [49][C]
  const float* conv_bias;  // nullable
  const float* norm_weight;
  const float* mean;
  const float* rstd;
  float* g;         // [N*H*W][C] dL/dz
  float* partials;  // [3][num_blocks][C]: dnorm_weight, dnorm_bias, dconv_bias
  int H, W, C;
  int tile_w, tiles_w;
  int64_t num_tiles;
};

// Persistent blocks (grid-stride over tiles) so the number of partial rows stays bounded.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm) dwconv_layernorm_bwd_stats_kernel(BwdStatsParams p) {
  CNK_DYNAMIC_SMEM(float4, smem_raw);
  const int C = p.C;
  float* smem_xhat = reinterpret_cast<float*>(smem_raw);                 // [tile_w][C] (z, then xhat)
  float* smem_g = smem_xhat + static_cast<int64_t>(p.tile_w) * C;        // [tile_w][C]
  float* smem_acc = smem_g + static_cast<int64_t>(p.tile_w) * C;         // [3][C], channel-owned
  for (int c = threadIdx.x; c < 3 * C; c += blockDim.x) smem_acc[c] = 0.0f;

  const T* dy = static_cast<const T*>(p.dy);
  const int warp = threadIdx.x / 32;
  const int num_warps = blockDim.x / 32;
  const PixelLanes lanes = pixel_lanes<VEC>(C);

  for (int64_t t = blockIdx.x; t < p.num_tiles; t += gridDim.x) {
    const ConvTile tile = decode_tile(t, p.tiles_w, p.tile_w, p.H, p.W);
    const int64_t pix0 = (tile.n * p.H + tile.h) * static_cast<int64_t>(p.W) + tile.w_begin;
    conv_tile_to_smem<T, VEC>(static_cast<const T*>(p.x), p.wt, p.conv_bias, tile, p.H, p.W, C, smem_xhat);
    __syncthreads();

    for (int first = warp * lanes.per_warp; first < tile.n_valid; first += num_warps * lanes.per_warp) {
      const int pl = min(first + lanes.group, tile.n_valid - 1);  // lanes past the last pixel: c_end 0
      const int64_t pix = pix0 + pl;
      layernorm_grad_pixel<T, VEC>(lanes, first + lanes.group < tile.n_valid ? C : 0,
                                   smem_xhat + static_cast<int64_t>(pl) * C, smem_g + static_cast<int64_t>(pl) * C,
                                   p.g + pix * C, dy + pix * C, p.norm_weight, p.mean[pix], p.rstd[pix], C);
    }
    __syncthreads();

    accumulate_norm_grad_sums(smem_xhat, smem_g, 0, 1, tile.n_valid, dy, pix0, p.W, C, smem_acc);
    __syncthreads();  // before the next tile overwrites shared memory
  }
  store_norm_grad_partials(smem_acc, p.partials, C);
}

struct BwdConvParams {
  const void* x;
  const float* g;            // [N*H*W][C] dL/dz
  const float* conv_weight;  // [C][49] as given: a thread's 49 taps are contiguous
  void* dx;
  float* partials;           // [parts][C][49]: dconv_weight's layout
  int64_t N;
  int H, W, C;
  RowSplit split;            // a block's samples and rows
};

// dx = transposed conv of g, and partials of dconv_weight[c][r][k] = sum_p g[p][c] * x[p + (r-3, k-3)][c],
// in one pass over g. Thread = one channel and a pair of pixel columns w, w + 1; it keeps its
// channel's 49 taps and 49 dconv_weight sums in registers and walks g rows gr = h_begin - 3 ..
// h_end + 2 of its columns, each loaded at its 8 column shifts (g_cur[j] = g[gr][w + j - 3]; pixel
// w + q takes g_cur[j + q]):
//   dx: g row gr feeds dx rows gr - 3 .. gr + 3 (kernel row r: row gr + r - 3, weight [r][6 - j]);
//       a ring of 7 row accumulators, the top one complete after the step;
//   dw: [r][6 - j] += x[gr + r - 3][w + q] * g_cur[j + q], x rows gr - 3 .. gr + 3 in a second ring
//       (only the block's own rows: each x pixel is counted by one block).
// The row loop is unrolled by the ring's period, 7, so ring slots are registers, not moves. sm_90
// SASS (nvcc 13.0): 2 x 98 FMAs in about 284 instructions a step, 198 registers, no spills; one
// pixel a thread took 197 for 98 (the weights and sums are shared by the pair, the 8 loads of g
// serve 14 shifts). Hence 2 blocks an SM (__launch_bounds__'s 2: up to 255 registers; with 3, 168
// registers spilled).
template <typename T>
__global__ void __launch_bounds__(kConvBwdChannels* kConvBwdPixels, 2)
    dwconv_layernorm_bwd_conv_kernel(BwdConvParams p) {
  CNK_DYNAMIC_SMEM(float, red);  // [kConvBwdPixels][kConvBwdChannels][kTaps]; odd stride 49: no bank conflicts
  const int H = p.H, W = p.W, C = p.C;
  const int lane = threadIdx.x;  // channel within the block
  const int slot = threadIdx.y;  // pixel pair within a step
  const int c0 = blockIdx.x * kConvBwdChannels;
  const int c = c0 + lane;
  const int64_t part = blockIdx.y;  // at most ~2 * kTargetBlocks: within gridDim.y's 65535
  const PartRows rows = part_rows(p.split, part, p.N, H);
  const int h_begin = rows.h_begin, h_end = rows.h_end;
  const int64_t n_begin = rows.n_begin, n_end = rows.n_end;
  const T* x = static_cast<const T*>(p.x);
  T* dx = static_cast<T*>(p.dx);

  float dw[kTaps];
#pragma unroll
  for (int t = 0; t < kTaps; ++t) dw[t] = 0.0f;

  if (c < C) {
    float wt[kTaps];
#pragma unroll
    for (int t = 0; t < kTaps; ++t) wt[t] = p.conv_weight[static_cast<int64_t>(c) * kTaps + t];
    const int64_t row_stride = static_cast<int64_t>(W) * C;
    for (int64_t n = n_begin; n < n_end; ++n) {
      for (int w = kConvBwdPair * slot; w < W; w += kConvBwdPair * kConvBwdPixels) {
        // Which of the 8 column shifts fall inside the row (bit j: column w + j - 3), and whether
        // the pair's second pixel w + 1 does.
        unsigned cols = 0;
#pragma unroll
        for (int j = 0; j < kKernelSize + 1; ++j) cols |= (w + j - kPad >= 0 && w + j - kPad < W ? 1u : 0u) << j;
        const bool second = w + 1 < W;
        // Element index of (n, row, w, c) for the step's g row gr (row h_begin - 3 at first): the
        // x row gr + 3 and the dx row gr - 3 are +-3 rows from it. One int64 add a step.
        int64_t e = ((n * H + h_begin - kPad) * W + w) * C + c;
        float ring_dx[kKernelSize][kConvBwdPair], ring_x[kKernelSize][kConvBwdPair];
#pragma unroll
        for (int i = 0; i < kKernelSize; ++i)
#pragma unroll
          for (int q = 0; q < kConvBwdPair; ++q) ring_dx[i][q] = ring_x[i][q] = 0.0f;
        for (int gr0 = h_begin - kPad; gr0 < h_end + kPad; gr0 += kKernelSize) {
#pragma unroll
          for (int s = 0; s < kKernelSize; ++s) {
            // Ring slot of the row gr + r - 3 (kernel row r) is (s + r + 4) % 7: compile-time.
            const int gr = gr0 + s;
            if (gr >= h_end + kPad) break;
            const int in = (s + 3) % kKernelSize;  // x row gr + 3: only the block's own rows
            const bool x_row = gr + kPad >= h_begin && gr + kPad < h_end;
            ring_x[in][0] = x_row ? to_float(x[e + kPad * row_stride]) : 0.0f;
            ring_x[in][1] = x_row && second ? to_float(x[e + kPad * row_stride + C]) : 0.0f;
            if (gr >= 0 && gr < H) {
              // g row gr at 8 shifts, g_cur[j] = g[gr][w + j - 3]: pixel w takes g_cur[0..6],
              // pixel w + 1 g_cur[1..7].
              float g_cur[kKernelSize + 1];
              const float* g_pix = p.g + (e - kPad * C);
#pragma unroll
              for (int j = 0; j < kKernelSize + 1; ++j, g_pix += C) g_cur[j] = cols >> j & 1u ? *g_pix : 0.0f;
#pragma unroll
              for (int r = 0; r < kKernelSize; ++r) {
                const int ring = (s + r + 4) % kKernelSize;
#pragma unroll
                for (int j = 0; j < kKernelSize; ++j) {
                  const int t = r * kKernelSize + kKernelSize - 1 - j;
                  ring_dx[ring][0] = fmaf(g_cur[j], wt[t], ring_dx[ring][0]);
                  ring_dx[ring][1] = fmaf(g_cur[j + 1], wt[t], ring_dx[ring][1]);
                  dw[t] = fmaf(ring_x[ring][1], g_cur[j + 1], fmaf(ring_x[ring][0], g_cur[j], dw[t]));
                }
              }
            }
            const int top = (s + 4) % kKernelSize;  // dx row gr - 3: complete
            if (gr - kPad >= h_begin) {
              dx[e - kPad * row_stride] = from_float<T>(ring_dx[top][0]);
              if (second) dx[e - kPad * row_stride + C] = from_float<T>(ring_dx[top][1]);
            }
            ring_dx[top][0] = ring_dx[top][1] = 0.0f;
            e += row_stride;
          }
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kTaps; ++t) red[(slot * kConvBwdChannels + lane) * kTaps + t] = dw[t];
  __syncthreads();
  // Fixed-order sum over the pixel pairs; partial layout [part][c][tap] = dconv_weight's layout.
  const int tid = slot * kConvBwdChannels + lane;
  const int valid_channels = min(kConvBwdChannels, C - c0);
  for (int e = tid; e < valid_channels * kTaps; e += kConvBwdChannels * kConvBwdPixels) {
    const int cl = e / kTaps;
    const int t = e - cl * kTaps;
    float sum = 0.0f;
#pragma unroll
    for (int sl = 0; sl < kConvBwdPixels; ++sl) sum += red[(sl * kConvBwdChannels + cl) * kTaps + t];
    p.partials[(part * C + c0) * kTaps + e] = sum;
  }
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
struct TileConfig {
  int vec;
  int tile_w;
  int tiles_w;
  int64_t num_tiles;
  int threads;
};

// Tile width so that a block has ~128 (channel-vector, segment) work items.
inline TileConfig make_tile_config(int64_t N, int64_t H, int64_t W, int64_t C, bool vectorized) {
  TileConfig t;
  t.vec = vectorized ? 8 : 1;
  const int64_t cvecs = C / t.vec;
  const int kSegment = segment_width(t.vec);
  int64_t segs = ceil_div(128, cvecs);
  segs = std::max<int64_t>(1, std::min<int64_t>({segs, kMaxSegmentsPerTile, ceil_div(W, kSegment)}));
  t.tile_w = static_cast<int>(segs * kSegment);
  t.tiles_w = static_cast<int>(ceil_div(W, t.tile_w));
  t.num_tiles = N * H * t.tiles_w;
  t.threads = static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(64, round_up(cvecs * segs, 32))));
  return t;
}

struct RingConfig {
  bool fits;       // C / channels-per-thread groups fit a block (else the tile kernels)
  int threads;     // segments * groups, rounded up to whole warps
  int64_t blocks;  // strips * row chunks * sample groups: also the backward's partial rows
  RingGrid grid;
};

// Channels a ring thread convolves: one where C fits a block (C <= kRingMaxThreads), else two on
// the 16-byte path (C <= 2 * kRingMaxThreads); wider C takes the tile kernels. `request` (1 or 2;
// 0 none) overrides the choice where the path allows it (two only on the 16-byte path).
inline int ring_channels(int64_t C, bool vectorized, int request) {
  if (!vectorized || request == 1) return 1;
  return request == 2 || C > kRingMaxThreads ? 2 : 1;
}

// Segments per block: as many as fit kRingMaxThreads, with the least idle work (padding threads
// of the last warp, pixel groups past the row's end in the last strip); on a tie, more. Rows by
// split_rows, the strips of a row sharing each part. ConvNeXt-T at batch 128: C = 96, 192, 384
// take one channel and 4 pixels a thread, 2, 1, 1 segments (192, 192, 384 threads), 7, 7, 4
// strips; C = 768 two channels and 2 pixels, 1 segment (384 threads), 4 strips; whole images,
// one a block.
inline RingConfig make_ring_config(int64_t N, int64_t H, int64_t W, int64_t C, bool vectorized, int request) {
  RingConfig r{};
  const int channels = ring_channels(C, vectorized, request);
  const int64_t groups = C / channels;
  r.fits = groups <= kRingMaxThreads;
  if (!r.fits) return r;
  RingGrid& g = r.grid;
  g.N = N;
  g.H = static_cast<int>(H);
  g.W = static_cast<int>(W);
  g.C = static_cast<int>(C);
  g.channels = channels;
  const int64_t pairs = ceil_div(W, ring_pixels(channels));
  double best = -1.0;
  for (int64_t s = 1; s <= std::min<int64_t>(pairs, kRingMaxThreads / groups); ++s) {
    const int64_t threads = round_up(groups * s, 32);
    if (threads > kRingMaxThreads) break;
    const int64_t strips = ceil_div(pairs, s);
    const double used = static_cast<double>(groups * s) / threads * static_cast<double>(pairs) / (strips * s);
    if (used >= best) {
      best = used;
      g.segments = static_cast<int>(s);
      g.strips = static_cast<int>(strips);
      r.threads = static_cast<int>(threads);
    }
  }
  g.split = split_rows(N, H, g.strips);
  r.blocks = g.split.parts * g.strips;
  return r;
}

// Shared memory of the ring kernels: 7 rows of the strip (the forward; the backward two such
// buffers, z / xhat and g, and its [3][C] sums).
inline std::size_t ring_smem_bytes(const RingConfig& r, bool backward) {
  const std::size_t period =
      static_cast<std::size_t>(kKernelSize) * ring_pixels(r.grid.channels) * r.grid.segments * r.grid.C;
  return (backward ? 2 * period + 3 * static_cast<std::size_t>(r.grid.C) : period) * sizeof(float);
}

struct ConvBwdConfig {
  int64_t channel_blocks;
  RowSplit split;  // its parts: blocks per channel block, partial rows of dconv_weight
};

// Rows by split_rows, the channel blocks sharing each part.
inline ConvBwdConfig make_conv_bwd_config(int64_t N, int64_t H, int64_t C) {
  ConvBwdConfig d;
  d.channel_blocks = ceil_div(C, kConvBwdChannels);
  d.split = split_rows(N, H, d.channel_blocks);
  return d;
}

// Persistent blocks of the recompute kernel, bounded both in count and in partial-buffer size
// (3 * blocks * C floats). Depends on the shape only, so results are reproducible across GPUs.
inline int64_t stats_blocks_cap(int64_t C) {
  return std::max<int64_t>(64, std::min<int64_t>(kStatsMaxBlocks, 196608 / C));
}
inline int64_t stats_blocks(const TileConfig& t, int64_t C) { return std::min<int64_t>(t.num_tiles, stats_blocks_cap(C)); }

struct FwdArgs {
  const void* x;
  const float* conv_weight;
  const float* conv_bias;
  const float* norm_weight;
  const float* norm_bias;
  void* y;
  float* mean;
  float* rstd;
  void* workspace;
  int64_t N, H, W, C;
  float eps;
  bool vectorized;
  int ring_channels;  // 0: ring_channels() chooses; 1 or 2 (launch_api.h)
};

struct BwdArgs {
  const void* dy;
  const void* x;
  const float* conv_weight;
  const float* conv_bias;
  const float* norm_weight;
  const float* mean;
  const float* rstd;
  void* dx;
  float* dconv_weight;
  float* dconv_bias;
  float* dnorm_weight;
  float* dnorm_bias;
  void* workspace;
  int64_t N, H, W, C;
  bool vectorized;
  int ring_channels;  // as in FwdArgs
};

// Workspace layouts (sizes computed with a null base).
struct FwdWorkspace {
  float* wt;
  int64_t bytes;
  FwdWorkspace(void* base, int64_t C) {
    WorkspaceCarver carve(base);
    wt = carve.take<float>(kTaps * C);
    bytes = carve.offset;
  }
};

// Partial rows of the recompute kernel, whichever runs (the ring kernel's blocks depend on
// whether the 16-byte path is taken and on ring_channels, which the workspace size, from the sizes
// alone, cannot know).
inline int64_t stats_partial_rows(int64_t N, int64_t H, int64_t W, int64_t C) {
  int64_t rows = stats_blocks_cap(C);
  for (bool vectorized : {false, true}) {
    if (vectorized && C % 8 != 0) continue;
    for (int request : {1, 2}) {
      const RingConfig r = make_ring_config(N, H, W, C, vectorized, request);
      if (r.fits) rows = std::max(rows, r.blocks);
    }
  }
  return rows;
}

struct BwdWorkspace {
  float* wt;
  float* g;
  float* stats_partials;
  float* dweight_partials;
  int64_t bytes;
  BwdWorkspace(void* base, int64_t N, int64_t H, int64_t W, int64_t C) {
    const ConvBwdConfig d = make_conv_bwd_config(N, H, C);
    WorkspaceCarver carve(base);
    wt = carve.take<float>(kTaps * C);
    g = carve.take<float>(N * H * W * C);
    stats_partials = carve.take<float>(3 * stats_partial_rows(N, H, W, C) * C);
    dweight_partials = carve.take<float>(d.split.parts * C * kTaps);
    bytes = carve.offset;
  }
};

// Weight re-layout [C][49] -> [49][C] (a tap's channels contiguous); in dwconv_layernorm_api.cu.
void launch_transpose_weight(const float* w, float* wt, int64_t C, cudaStream_t stream);

template <typename Kernel>
inline void check_smem_fits(Kernel kernel, std::size_t bytes, const char* name) {
  int device = 0, max_optin = 0;
  CNK_CUDA_CHECK(cudaGetDevice(&device));
  CNK_CUDA_CHECK(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (bytes > static_cast<std::size_t>(max_optin)) {
    throw std::invalid_argument(std::string(name) + ": C is too large for this GPU (needs " + std::to_string(bytes) +
                                " bytes of shared memory per block, the device allows " + std::to_string(max_optin) + ")");
  }
  set_dynamic_smem(kernel, bytes, name);
}

// The ring kernel for `channels` a thread: one_channel, or (16-byte path only) two_channels.
template <int kVec, typename Kernel>
inline Kernel ring_kernel(int channels, Kernel one_channel, Kernel two_channels) {
  if (channels == 1) return one_channel;
  if constexpr (kVec == 8) return two_channels;
  throw std::logic_error("ring_kernel: two channels a thread on the scalar path");
}

// Per-dtype entry points, explicitly instantiated in dwconv_layernorm_{fwd,bwd}_{dtype}.cu.
template <typename T>
void run_fwd(const FwdArgs& a, cudaStream_t stream) {
  const RingConfig r = make_ring_config(a.N, a.H, a.W, a.C, a.vectorized, a.ring_channels);
  if (r.fits) {
    RingFwdParams p{r.grid, a.x, a.conv_weight, a.conv_bias, a.norm_weight, a.norm_bias, a.y, a.mean, a.rstd, a.eps};
    CNK_BOOL_SWITCH(a.vectorized, kVectorized, [&] {
      constexpr int kVec = kVectorized ? 8 : 1;  // 16-byte LayerNorm, or any-C scalar path
      auto kernel = ring_kernel<kVec>(r.grid.channels, dwconv_layernorm_fwd_ring_kernel<T, kVec, 1>,
                                      dwconv_layernorm_fwd_ring_kernel<T, 8, 2>);
      const std::size_t smem = ring_smem_bytes(r, false);
      check_smem_fits(kernel, smem, "dwconv_layernorm_fwd_ring_kernel");
      CNK_LAUNCH(kernel, static_cast<unsigned>(r.blocks), r.threads, smem, stream)(p);
      CNK_CHECK_LAUNCH("dwconv_layernorm_fwd_ring_kernel");
    });
    return;
  }
  FwdWorkspace ws(a.workspace, a.C);
  launch_transpose_weight(a.conv_weight, ws.wt, a.C, stream);
  const TileConfig t = make_tile_config(a.N, a.H, a.W, a.C, a.vectorized);
  FwdParams p{a.x, ws.wt, a.conv_bias, a.norm_weight, a.norm_bias, a.y, a.mean, a.rstd,
              static_cast<int>(a.H), static_cast<int>(a.W), static_cast<int>(a.C),
              t.tile_w, t.tiles_w, t.num_tiles, a.eps};
  const std::size_t smem = static_cast<std::size_t>(t.tile_w) * a.C * sizeof(float);
  CNK_BOOL_SWITCH(a.vectorized, kVectorized, [&] {
    constexpr int kVec = kVectorized ? 8 : 1;  // 16-byte channel vectors, or any-C scalar path
    auto kernel = dwconv_layernorm_fwd_kernel<T, kVec>;
    check_smem_fits(kernel, smem, "dwconv_layernorm_fwd_kernel");
    CNK_LAUNCH(kernel, static_cast<unsigned>(t.num_tiles), t.threads, smem, stream)(p);
    CNK_CHECK_LAUNCH("dwconv_layernorm_fwd_kernel");
  });
}

template <typename T>
void run_bwd(const BwdArgs& a, cudaStream_t stream) {
  BwdWorkspace ws(a.workspace, a.N, a.H, a.W, a.C);
  const int H = static_cast<int>(a.H), W = static_cast<int>(a.W), C = static_cast<int>(a.C);

  // 1) recompute z, xhat -> g and partials of dnorm_weight, dnorm_bias, dconv_bias: on the ring,
  // or (C too wide for it) the tile kernel
  const RingConfig r = make_ring_config(a.N, a.H, a.W, a.C, a.vectorized, a.ring_channels);
  int64_t blocks = r.blocks;
  CNK_BOOL_SWITCH(a.vectorized, kVectorized, [&] {
    constexpr int kVec = kVectorized ? 8 : 1;  // 2-channel loads + 16-byte vectors, or any-C scalar path
    if (r.fits) {
      RingBwdStatsParams sp{r.grid, a.x, a.dy, a.conv_weight, a.conv_bias, a.norm_weight, a.mean, a.rstd,
                            ws.g, ws.stats_partials};
      auto stats_kernel = ring_kernel<kVec>(r.grid.channels, dwconv_layernorm_bwd_stats_ring_kernel<T, kVec, 1>,
                                            dwconv_layernorm_bwd_stats_ring_kernel<T, 8, 2>);
      const std::size_t smem = ring_smem_bytes(r, true);
      check_smem_fits(stats_kernel, smem, "dwconv_layernorm_bwd_stats_ring_kernel");
      CNK_LAUNCH(stats_kernel, static_cast<unsigned>(r.blocks), r.threads, smem, stream)(sp);
      CNK_CHECK_LAUNCH("dwconv_layernorm_bwd_stats_ring_kernel");
      return;
    }
    launch_transpose_weight(a.conv_weight, ws.wt, a.C, stream);
    const TileConfig t = make_tile_config(a.N, a.H, a.W, a.C, a.vectorized);
    blocks = stats_blocks(t, a.C);
    BwdStatsParams sp{a.x, a.dy, ws.wt, a.conv_bias, a.norm_weight, a.mean, a.rstd, ws.g, ws.stats_partials,
                      H, W, C, t.tile_w, t.tiles_w, t.num_tiles};
    const std::size_t smem = (2 * static_cast<std::size_t>(t.tile_w) + 3) * a.C * sizeof(float);
    auto stats_kernel = dwconv_layernorm_bwd_stats_kernel<T, kVec>;
    check_smem_fits(stats_kernel, smem, "dwconv_layernorm_bwd_stats_kernel");
    CNK_LAUNCH(stats_kernel, static_cast<unsigned>(blocks), t.threads, smem, stream)(sp);
    CNK_CHECK_LAUNCH("dwconv_layernorm_bwd_stats_kernel");
  });

  // 2) dx and partials of dconv_weight, one pass over g
  const ConvBwdConfig d = make_conv_bwd_config(a.N, a.H, a.C);
  BwdConvParams cp{a.x, ws.g, a.conv_weight, a.dx, ws.dweight_partials, a.N, H, W, C, d.split};
  const dim3 cgrid(static_cast<unsigned>(d.channel_blocks), static_cast<unsigned>(d.split.parts));
  const dim3 cblock(kConvBwdChannels, kConvBwdPixels);
  auto conv_kernel = dwconv_layernorm_bwd_conv_kernel<T>;
  CNK_LAUNCH(conv_kernel, cgrid, cblock, kConvBwdSmemBytes, stream)(cp);
  CNK_CHECK_LAUNCH("dwconv_layernorm_bwd_conv_kernel");

  // 3) fixed-order sums of all partials into the fp32 gradients
  PartialSumBatch batch;
  batch.add(ws.dweight_partials, a.dconv_weight, a.C * kTaps, d.split.parts, a.C * kTaps);
  batch.add(ws.stats_partials, a.dnorm_weight, a.C, blocks, a.C);
  batch.add(ws.stats_partials + blocks * a.C, a.dnorm_bias, a.C, blocks, a.C);
  batch.add(ws.stats_partials + 2 * blocks * a.C, a.dconv_bias, a.C, blocks, a.C);
  launch_reduce_partials(batch, stream);
}

// Instantiated once each in the per-dtype translation units; everyone else links to those.
extern template void run_fwd<float>(const FwdArgs&, cudaStream_t);
extern template void run_fwd<__half>(const FwdArgs&, cudaStream_t);
extern template void run_fwd<__nv_bfloat16>(const FwdArgs&, cudaStream_t);
extern template void run_bwd<float>(const BwdArgs&, cudaStream_t);
extern template void run_bwd<__half>(const BwdArgs&, cudaStream_t);
extern template void run_bwd<__nv_bfloat16>(const BwdArgs&, cudaStream_t);

}  // namespace dwconv
}  // namespace cuda
}  // namespace convnext_kernels
