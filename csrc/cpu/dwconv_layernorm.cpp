// CPU fused 7x7 depthwise conv + bias + LayerNorm (NHWC), forward and backward.
//
// Layout of the work: every input row (n, h) the kernel touches is first
// converted to float32 into a zero-padded, channel-blocked buffer: Cp / 16
// blocks of (W + 6) columns x 16 channels, Cp = C rounded up to 16. Padding
// makes the hot loops branch-free and tail-free (padded channels are never
// written back), and blocking puts every load of the conv at a constant offset
// from one pointer per kernel row, which keeps the address arithmetic out of
// the FMA loop. Weights are blocked the same way: (Cp / 16, 49 taps, 16).
//
// SIMD: gcc/clang vector extensions, compiled three times (AVX-512, AVX2+FMA,
// baseline) via per-function target attributes and picked at runtime, so the
// wheel needs no -march flag. Each variant uses its native vector width and a
// register-blocked conv (a tile of WB output pixels x 1 vector of channels
// stays in registers over all 49 taps, and each input vector is loaded once per
// kernel row and reused by up to 7 taps).
//
// Determinism: per-output arithmetic never depends on the tiling or on which
// thread computes it. Weight gradients go to one fp32 partial per fixed block
// of rows (the block count depends on the shape only) and are summed in block
// order, so results are bitwise identical for any number of threads.

#include "dwconv_layernorm.h"

#include <cmath>
#include <stdexcept>
#include <type_traits>

#include "cpu_kernel_utils.h"

namespace convnext_kernels {
namespace {

using namespace cpu;

constexpr int kTaps = 49;
constexpr int kPad = 3;
constexpr int kMaxLanes = 16;  // channel padding: a multiple of every variant's width
constexpr int64_t kBlock = 16;  // channels per block of the blocked layouts
// Per-partial layout: 49 rows of dconv_weight (tap-major), then dconv_bias,
// dnorm_weight, dnorm_bias.
constexpr int64_t kPartialRows = kTaps + 3;
// Weight-gradient partials: enough blocks for many cores, but at most about
// kPartialBudget floats in all, since they are summed at the end (matters at
// large C). The count depends on nothing but the shape.
constexpr int64_t kMaxPartials = 128;
constexpr int64_t kMinPartials = 16;
constexpr int64_t kPartialBudget = int64_t(1) << 18;

// ---------------------------------------------------------------------------
// Problem description shared by all variants.

struct Problem {
  int64_t N, H, W, C, Cp, NH;
  int64_t padded_row;  // (W + 6) * Cp floats, channel-blocked (see top)
  int64_t block_stride;  // (W + 6) * kBlock: from one channel block to the next
  const void* x;
  // Padded copies of the parameters (Cp columns).
  const float* weight_blk;       // (Cp / 16, 49, 16)
  const float* weight_flip_blk;  // same, taps reversed: dx is a conv of g with it
  const float* conv_bias;      // (Cp) zeros when there is no bias
  const float* norm_weight;    // (Cp) zero in the padding
  const float* norm_bias;      // (Cp)
  const float* channel_mask;   // (Cp) 1 for real channels, 0 for padding
  // Forward.
  void* y;
  float* mean_out;
  float* rstd_out;
  float eps;
  // Backward.
  const void* dy;
  void* dx;
  const float* mean_in;
  const float* rstd_in;
  float* g;  // NH padded blocked rows like the x rows: dL/dz
  float* partials;  // (num_partials, kPartialRows, Cp)
  int64_t rows_per_partial, num_partials;
};

// Ring of the 7 most recent zero-padded float32 input rows. A row index hi
// lives in slot hi % 7, so the 7 rows of a conv window never collide, and
// consecutive output rows reuse 6 of them.
template <typename T>
class PaddedRowRing {
 public:
  static int64_t floats_needed(const Problem& p) { return 7 * p.padded_row; }

  // buf: floats_needed() floats of per-thread scratch, contents arbitrary.
  // Only the padding is zeroed; conversion overwrites everything else.
  PaddedRowRing(const Problem& p, float* buf) : p_(p), buf_(buf) {
    std::fill(tag_, tag_ + 7, int64_t(-1));
    const int64_t blocks = p.Cp / kBlock, tail = p.C % kBlock;
    for (int slot = 0; slot < 7; ++slot) {
      float* row = buf_ + slot * p.padded_row;
      for (int64_t b = 0; b < blocks; ++b) {
        float* blk = row + b * p.block_stride;
        std::fill(blk, blk + kPad * kBlock, 0.f);
        std::fill(blk + (p.W + kPad) * kBlock, blk + (p.W + 2 * kPad) * kBlock, 0.f);
      }
      if (tail) {
        float* last = row + (blocks - 1) * p.block_stride;
        for (int64_t col = kPad; col < p.W + kPad; ++col)
          std::fill(last + col * kBlock + tail, last + (col + 1) * kBlock, 0.f);
      }
    }
  }
  const float* row(const T* base, int64_t n, int64_t hi) {
    const int64_t global_row = n * p_.H + hi;
    const int slot = int(hi % 7);
    float* dst = buf_ + slot * p_.padded_row;
    if (tag_[slot] != global_row) {
      const T* src = base + global_row * p_.W * p_.C;
      // Padding columns/channels stay zero from construction.
      const int64_t full_blocks = p_.C / kBlock, tail = p_.C % kBlock;
      for (int64_t w = 0; w < p_.W; ++w) {
        const T* s = src + w * p_.C;
        float* d = dst + (w + kPad) * kBlock;
        for (int64_t b = 0; b < full_blocks; ++b)
          store_vec<kBlock>(d + b * p_.block_stride, load_converted<T, kBlock>(s + b * kBlock));
        for (int64_t j = 0; j < tail; ++j)
          d[full_blocks * p_.block_stride + j] = to_float(s[full_blocks * kBlock + j]);
      }
      tag_[slot] = global_row;
    }
    return dst;
  }

 private:
  const Problem& p_;
  float* buf_;
  int64_t tag_[7];
};

// Rows of the 7x7 window that fall inside the image.
CNK_INLINE void window_rows(int64_t h, int64_t H, int& kh_begin, int& kh_end) {
  kh_begin = int(std::max<int64_t>(0, kPad - h));
  kh_end = int(std::min<int64_t>(7, H + kPad - h));
}

// ---------------------------------------------------------------------------
// Hot loops, instantiated per instruction set (L lanes, WB pixels per tile,
// U pixels per weight-gradient step).

// Offset of channel c0 (a multiple of L) in a blocked buffer whose blocks are
// `block_stride` floats apart.
CNK_INLINE int64_t block_offset(int64_t c0, int64_t block_stride) {
  return (c0 / kBlock) * block_stride + c0 % kBlock;
}

// WB output pixels x CB vectors of L channels. rows[kh] point at column w0 of
// the first channel block, weights at its tap 0; every load below is at a
// constant offset from one of them (or from it plus block_stride). CB > 1 only
// when L == kBlock, so that consecutive channel vectors are whole blocks.
template <int L, int WB, int CB>
CNK_INLINE void conv7x7_tile(const float* const* rows, int kh_begin, int kh_end,
                             const float* weights, const float* bias, int64_t block_stride,
                             float* out, int64_t out_stride) {
  using V = typename VecOf<L>::type;
  static_assert(CB == 1 || L == kBlock, "several channel vectors need whole blocks");
  V acc[CB][WB];
#pragma GCC unroll 4
  for (int cb = 0; cb < CB; ++cb) {
    const V b = bias ? load_vec<L>(bias + cb * L) : V{};
    for (int j = 0; j < WB; ++j) acc[cb][j] = b;
  }
  for (int kh = kh_begin; kh < kh_end; ++kh) {
  #pragma GCC unroll 4
  for (int cb = 0; cb < CB; ++cb) {
      V wv[7];
      const float* wk = weights + cb * kTaps * kBlock + kh * 7 * kBlock;
      for (int kw = 0; kw < 7; ++kw) wv[kw] = load_vec<L>(wk + kw * kBlock);
      const float* r = rows[kh] + cb * block_stride;
      // Input column i feeds output j = i - kw: load it once, use it for every
      // tap that needs it. Per output, taps still accumulate in (kh, kw)
      // order, so the result does not depend on WB or CB.
#pragma GCC unroll 32
      for (int i = 0; i < WB + 6; ++i) {
        const V xv = load_vec<L>(r + i * kBlock);
#pragma GCC unroll 7
        for (int kw = 0; kw < 7; ++kw) {
          const int j = i - kw;
          if (j >= 0 && j < WB) acc[cb][j] += xv * wv[kw];
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int cb = 0; cb < CB; ++cb)
    for (int j = 0; j < WB; ++j) store_vec<L>(out + j * out_stride + cb * L, acc[cb][j]);
}

// A tile of exactly n pixels, 0 < n < WB: the remainder of a row as one tile
// keeps several independent FMA chains in flight.
template <int L, int WB, int CB>
CNK_INLINE void conv7x7_tail(int64_t n, const float* const* rows, int kh_begin, int kh_end,
                             const float* weights, const float* bias, int64_t block_stride,
                             float* out, int64_t out_stride) {
  if constexpr (WB > 1) {
    if (n == WB - 1)
      conv7x7_tile<L, WB - 1, CB>(rows, kh_begin, kh_end, weights, bias, block_stride, out,
                                  out_stride);
    else
      conv7x7_tail<L, WB - 1, CB>(n, rows, kh_begin, kh_end, weights, bias, block_stride, out,
                                  out_stride);
  }
}

// out (W, Cp), pixel-major = bias + 7x7 conv of the padded blocked rows
// rows[kh_begin..kh_end) with blocked weights.
template <int L, int WB>
CNK_INLINE void conv7x7_row(const float* const* rows, int kh_begin, int kh_end,
                            const float* weight_blk, const float* bias, float* out,
                            int64_t W, int64_t Cp) {
  const int64_t block_stride = (W + 2 * kPad) * kBlock;
  // Narrow rows (W = 7 at the last ConvNeXt stage) have too few pixels for
  // enough independent accumulators: take two channel blocks per tile.
  constexpr int kNarrow = 8;
  const bool two_blocks = L == kBlock && W <= kNarrow;
  for (int64_t c0 = 0; c0 < Cp;) {
    const float* weights = weight_blk + block_offset(c0, kTaps * kBlock);
    const float* b = bias ? bias + c0 : nullptr;
    const int64_t row_offset = block_offset(c0, block_stride);
    const float* r[7] = {};
    for (int kh = kh_begin; kh < kh_end; ++kh) r[kh] = rows[kh] + row_offset;
    if constexpr (L == kBlock) {
      if (two_blocks && c0 + 2 * L <= Cp) {
        conv7x7_tail<L, kNarrow + 1, 2>(W, r, kh_begin, kh_end, weights, b, block_stride,
                                        out + c0, Cp);
        c0 += 2 * L;
        continue;
      }
    }
    int64_t w0 = 0;
    for (; w0 + WB <= W; w0 += WB) {
      conv7x7_tile<L, WB, 1>(r, kh_begin, kh_end, weights, b, block_stride, out + w0 * Cp + c0,
                             Cp);
      for (int kh = kh_begin; kh < kh_end; ++kh) r[kh] += WB * kBlock;
    }
    if (w0 < W)
      conv7x7_tail<L, WB, 1>(W - w0, r, kh_begin, kh_end, weights, b, block_stride,
                             out + w0 * Cp + c0, Cp);
    c0 += L;
  }
}

// z (W, Cp) = bias + 7x7 conv for output row r (sample r / H, image row r % H), its input rows
// taken through the ring (converted once, reused by the next rows). Forward and backward
// (which recomputes z rather than storing it) both start each row with this; rows and
// [kh_begin, kh_end) return the window, which the weight gradient reuses.
template <typename T, int L, int WB>
CNK_INLINE void conv_output_row(const Problem& p, PaddedRowRing<T>& ring, const T* x, int64_t r, float* z,
                                const float* (&rows)[7], int& kh_begin, int& kh_end) {
  const int64_t n = r / p.H, h = r % p.H;
  window_rows(h, p.H, kh_begin, kh_end);
  for (int kh = 0; kh < 7; ++kh) rows[kh] = nullptr;
  for (int kh = kh_begin; kh < kh_end; ++kh) rows[kh] = ring.row(x, n, h + kh - kPad);
  conv7x7_row<L, WB>(rows, kh_begin, kh_end, p.weight_blk, p.conv_bias, z, p.W, p.Cp);
}

// dweight_t[kh*7+kw][c] += sum_w g[w][c] * xrows[kh][w + kw][c], with g the
// interior (column 3 on) of a padded blocked row and xrows padded blocked rows.
template <int L, int U>
CNK_INLINE void conv7x7_weight_grad_row(const float* g_row, const float* const* xrows,
                                        int kh_begin, int kh_end, float* dweight_t,
                                        int64_t W, int64_t Cp) {
  using V = typename VecOf<L>::type;
  const int64_t block_stride = (W + 2 * kPad) * kBlock;
  for (int64_t c0 = 0; c0 < Cp; c0 += L) {
    const int64_t row_offset = block_offset(c0, block_stride);
    const float* g = g_row + row_offset + kPad * kBlock;
    for (int kh = kh_begin; kh < kh_end; ++kh) {
      V acc[7];
      for (int kw = 0; kw < 7; ++kw) acc[kw] = V{};
      const float* xr = xrows[kh] + row_offset;
      int64_t w = 0;
      for (; w + U <= W; w += U) {
        V gv[U];
        for (int u = 0; u < U; ++u) gv[u] = load_vec<L>(g + (w + u) * kBlock);
        // x column w + i feeds tap kw = i - u of pixel w + u; per tap the
        // pixels still accumulate in w order.
#pragma GCC unroll 32
        for (int i = 0; i < U + 6; ++i) {
          const V xv = load_vec<L>(xr + (w + i) * kBlock);
#pragma GCC unroll 16
          for (int u = 0; u < U; ++u) {
            const int kw = i - u;
            if (kw >= 0 && kw < 7) acc[kw] += gv[u] * xv;
          }
        }
      }
      for (; w < W; ++w) {
        const V gv = load_vec<L>(g + w * kBlock);
#pragma GCC unroll 7
        for (int kw = 0; kw < 7; ++kw) acc[kw] += gv * load_vec<L>(xr + (w + kw) * kBlock);
      }
      float* dst = dweight_t + int64_t(kh) * 7 * Cp + c0;
      for (int kw = 0; kw < 7; ++kw)
        store_vec<L>(dst + kw * Cp, load_vec<L>(dst + kw * Cp) + acc[kw]);
    }
  }
}

// Prefetch pixel w (C elements) of a row, if any.
template <typename T>
CNK_INLINE void prefetch_pixel(const T* row, int64_t w, int64_t C) {
  if (!row) return;
  const char* begin = reinterpret_cast<const char*>(row + w * C);
  const char* end = reinterpret_cast<const char*>(row + (w + 1) * C);
  for (const char* q = begin; q < end; q += 64) __builtin_prefetch(q, 0, 2);
}

template <typename T>
CNK_INLINE void store_row(const float* src, T* dst, int64_t W, int64_t C, int64_t Cp) {
  for (int64_t w = 0; w < W; ++w) {
    int64_t c = 0;
    for (; c + kBlock <= C; c += kBlock)
      store_converted<T, kBlock>(dst + w * C + c, load_vec<kBlock>(src + w * Cp + c));
    for (; c < C; ++c) dst[w * C + c] = from_float<T>(src[w * Cp + c]);
  }
}

template <typename T>
CNK_INLINE void load_row(const T* src, float* dst, int64_t W, int64_t C, int64_t Cp) {
  for (int64_t w = 0; w < W; ++w) {
    int64_t c = 0;
    for (; c + kBlock <= C; c += kBlock)
      store_vec<kBlock>(dst + w * Cp + c, load_converted<T, kBlock>(src + w * C + c));
    for (; c < C; ++c) dst[w * Cp + c] = to_float(src[w * C + c]);
    for (c = C; c < Cp; ++c) dst[w * Cp + c] = 0.f;
  }
}

// Forward for output rows [row_begin, row_end).
template <typename T, int L, int WB>
CNK_INLINE void fwd_rows_impl(const Problem& p, int64_t row_begin, int64_t row_end) {
  using V = typename VecOf<L>::type;
  const int64_t W = p.W, Cp = p.Cp;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  float* scratch = thread_scratch(PaddedRowRing<T>::floats_needed(p) + W * Cp);
  PaddedRowRing<T> ring(p, scratch);
  float* z = scratch + PaddedRowRing<T>::floats_needed(p);
  const float inv_c = 1.f / float(p.C);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t h = r % p.H;
    const float* rows[7];
    int kh_begin, kh_end;
    conv_output_row<T, L, WB>(p, ring, x, r, z, rows, kh_begin, kh_end);
    // The input row the next output row will convert: fetch it while this
    // row's LayerNorm runs, rather than stalling in the conversion.
    const T* next_x = h + kPad + 1 < p.H ? x + (r + kPad + 1) * W * p.C : nullptr;
    for (int64_t w = 0; w < W; ++w) {
      float* zp = z + w * Cp;
      V s = V{};
      for (int64_t c0 = 0; c0 < Cp; c0 += L) s += load_vec<L>(zp + c0);  // padding is 0
      const float mean = sum_lanes<L>(s) * inv_c;
      V q = V{};
      for (int64_t c0 = 0; c0 < Cp; c0 += L) {
        const V d = (load_vec<L>(zp + c0) - mean) * load_vec<L>(p.channel_mask + c0);
        q += d * d;
      }
      const float rstd = 1.f / std::sqrt(sum_lanes<L>(q) * inv_c + p.eps);
      T* yp = y + (r * W + w) * p.C;
      int64_t c0 = 0;
      for (; c0 + L <= p.C; c0 += L) {
        const V xhat = (load_vec<L>(zp + c0) - mean) * rstd;
        store_converted<T, L>(yp + c0, xhat * load_vec<L>(p.norm_weight + c0) + load_vec<L>(p.norm_bias + c0));
      }
      for (; c0 < p.C; ++c0)
        yp[c0] = from_float<T>((zp[c0] - mean) * rstd * p.norm_weight[c0] + p.norm_bias[c0]);
      p.mean_out[r * W + w] = mean;
      p.rstd_out[r * W + w] = rstd;
      prefetch_pixel(next_x, w, p.C);
    }
  }
}

// Backward phase 1 for partials [part_begin, part_end): recompute z, write g
// (padded, blocked) to the workspace and accumulate this partial's weight
// gradients.
template <typename T, int L, int WB, int U>
CNK_INLINE void bwd_grad_rows_impl(const Problem& p, int64_t part_begin, int64_t part_end) {
  using V = typename VecOf<L>::type;
  const int64_t W = p.W, Cp = p.Cp;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  float* scratch = thread_scratch(PaddedRowRing<T>::floats_needed(p) + 2 * W * Cp);
  PaddedRowRing<T> ring(p, scratch);
  float* z = scratch + PaddedRowRing<T>::floats_needed(p);
  float* dyf = z + W * Cp;
  const float inv_c = 1.f / float(p.C);
  for (int64_t part = part_begin; part < part_end; ++part) {
    float* partial = p.partials + part * kPartialRows * Cp;
    std::fill(partial, partial + kPartialRows * Cp, 0.f);
    float* dweight_t = partial;
    float* dconv_bias = partial + kTaps * Cp;
    float* dnorm_weight = dconv_bias + Cp;
    float* dnorm_bias = dnorm_weight + Cp;
    const int64_t row_begin = part * p.rows_per_partial;
    const int64_t row_end = std::min(p.NH, row_begin + p.rows_per_partial);
    for (int64_t r = row_begin; r < row_end; ++r) {
      const float* rows[7];
      int kh_begin, kh_end;
      conv_output_row<T, L, WB>(p, ring, x, r, z, rows, kh_begin, kh_end);
      load_row<T>(dy + r * W * p.C, dyf, W, p.C, Cp);

      float* g_row = p.g + r * p.padded_row;
      for (int64_t b = 0; b < Cp / kBlock; ++b) {  // zero padding columns
        float* blk = g_row + b * p.block_stride;
        std::fill(blk, blk + kPad * kBlock, 0.f);
        std::fill(blk + (W + kPad) * kBlock, blk + (W + 2 * kPad) * kBlock, 0.f);
      }
      for (int64_t w = 0; w < W; ++w) {
        const float* zp = z + w * Cp;
        const float* dyp = dyf + w * Cp;
        const float mean = p.mean_in[r * W + w];
        const float rstd = p.rstd_in[r * W + w];
        // dy is zero in the padding, so the padding adds nothing to the sums.
        V sum_dyn = V{}, sum_dyn_xhat = V{};
        for (int64_t c0 = 0; c0 < Cp; c0 += L) {
          const V dyv = load_vec<L>(dyp + c0);
          const V xhat = (load_vec<L>(zp + c0) - mean) * rstd;
          const V dyn = dyv * load_vec<L>(p.norm_weight + c0);
          sum_dyn += dyn;
          sum_dyn_xhat += dyn * xhat;
          store_vec<L>(dnorm_weight + c0, load_vec<L>(dnorm_weight + c0) + dyv * xhat);
          store_vec<L>(dnorm_bias + c0, load_vec<L>(dnorm_bias + c0) + dyv);
        }
        const float mean_dyn = sum_lanes<L>(sum_dyn) * inv_c;
        const float mean_dyn_xhat = sum_lanes<L>(sum_dyn_xhat) * inv_c;
        float* gp = g_row + (w + kPad) * kBlock;
        for (int64_t c0 = 0; c0 < Cp; c0 += L) {
          const V xhat = (load_vec<L>(zp + c0) - mean) * rstd;
          const V dyn = load_vec<L>(dyp + c0) * load_vec<L>(p.norm_weight + c0);
          // Masked so padded channels of g stay exactly zero.
          const V gv = (dyn - mean_dyn - xhat * mean_dyn_xhat) * rstd *
                       load_vec<L>(p.channel_mask + c0);
          store_vec<L>(gp + block_offset(c0, p.block_stride), gv);
          store_vec<L>(dconv_bias + c0, load_vec<L>(dconv_bias + c0) + gv);
        }
      }
      conv7x7_weight_grad_row<L, U>(g_row, rows, kh_begin, kh_end, dweight_t, W, Cp);
    }
  }
}

// Backward phase 2 for rows [row_begin, row_end): dx = conv of g with the
// flipped kernel (the transpose of the forward conv).
template <typename T, int L, int WB>
CNK_INLINE void bwd_dx_rows_impl(const Problem& p, int64_t row_begin, int64_t row_end) {
  const int64_t W = p.W, Cp = p.Cp;
  T* dx = static_cast<T*>(p.dx);
  float* out = thread_scratch(W * Cp);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t h = r % p.H;
    int kh_begin, kh_end;
    window_rows(h, p.H, kh_begin, kh_end);
    const float* rows[7] = {};
    for (int kh = kh_begin; kh < kh_end; ++kh) rows[kh] = p.g + (r + kh - kPad) * p.padded_row;
    conv7x7_row<L, WB>(rows, kh_begin, kh_end, p.weight_flip_blk, nullptr, out, W, Cp);
    store_row<T>(out, dx + r * W * p.C, W, p.C, Cp);
  }
}

// Sum partials [0, num_partials) in order into sum[begin, end).
template <int L>
CNK_INLINE void reduce_partials_impl(const Problem& p, float* sum, int64_t begin, int64_t end) {
  const int64_t stride = kPartialRows * p.Cp;
  for (int64_t i = begin; i < end; i += L) {
    typename VecOf<L>::type acc = load_vec<L>(p.partials + i);
    for (int64_t part = 1; part < p.num_partials; ++part)
      acc += load_vec<L>(p.partials + part * stride + i);
    store_vec<L>(sum + i, acc);
  }
}
// ---------------------------------------------------------------------------
// Instruction-set variants.

struct Variant {
  const char* name;
  Isa isa;
};

#define CNK_DEFINE_VARIANT(NS, TARGET, L, WB, U)                                         \
  namespace NS {                                                                         \
  template <typename T>                                                                  \
  TARGET void fwd_rows(const Problem& p, int64_t b, int64_t e) {                         \
    fwd_rows_impl<T, L, WB>(p, b, e);                                                    \
  }                                                                                      \
  template <typename T>                                                                  \
  TARGET void bwd_grad_rows(const Problem& p, int64_t b, int64_t e) {                    \
    bwd_grad_rows_impl<T, L, WB, U>(p, b, e);                                            \
  }                                                                                      \
  template <typename T>                                                                  \
  TARGET void bwd_dx_rows(const Problem& p, int64_t b, int64_t e) {                      \
    bwd_dx_rows_impl<T, L, WB>(p, b, e);                                                 \
  }                                                                                      \
  TARGET void reduce_partials(const Problem& p, float* sum, int64_t b, int64_t e) {      \
    reduce_partials_impl<L>(p, sum, b, e);                                               \
  }                                                                                      \
  }

// WB >= 8 keeps 8 independent FMA chains in flight (2 FMA ports x 4 cycles);
// AVX-512 has registers for 16 (16 accumulators + 7 weights + 1 input of 32).
// The weight-gradient step U is bounded the same way (7 accumulators + U
// gradient vectors + 1 input vector).
#define CNK_NO_TARGET
CNK_DEFINE_VARIANT(generic, CNK_NO_TARGET, 4, 8, 4)
#if CNK_X86
CNK_DEFINE_VARIANT(avx2, CNK_TARGET_AVX2, 8, 8, 4)
CNK_DEFINE_VARIANT(avx512, CNK_TARGET_AVX512, 16, 16, 8)
#endif

// ---------------------------------------------------------------------------
// Argument checking and parameter preparation.

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("dwconv_layernorm (cpu): ") + what);
}

void check_shape(int64_t N, int64_t H, int64_t W, int64_t C) {
  require(N >= 1 && H >= 1 && W >= 1 && C >= 1, "N, H, W and C must all be >= 1");
  // Every offset below is an int64 product of these; refuse shapes that would
  // overflow it (including the padded workspace).
  int64_t total = 0;
  const bool overflow = __builtin_mul_overflow(N, H, &total) ||
                        __builtin_mul_overflow(total, W + 2 * kPad, &total) ||
                        __builtin_mul_overflow(total, C + kMaxLanes, &total) ||
                        __builtin_mul_overflow(total, int64_t(64), &total);
  require(!overflow, "tensor too large");
}

int64_t padded_channels(int64_t C) { return (C + kMaxLanes - 1) / kMaxLanes * kMaxLanes; }

void partial_layout(int64_t NH, int64_t Cp, int64_t& rows_per_partial, int64_t& num_partials) {
  const int64_t by_budget = std::max(kMinPartials, kPartialBudget / (kPartialRows * Cp));
  const int64_t target = std::min({NH, kMaxPartials, by_budget});
  rows_per_partial = (NH + target - 1) / target;
  num_partials = (NH + rows_per_partial - 1) / rows_per_partial;
}

struct PreparedParams {
  std::vector<float> weight_blk, weight_flip_blk, conv_bias, norm_weight, norm_bias, channel_mask;

  PreparedParams(int64_t C, int64_t Cp, const float* conv_weight, const float* bias,
                 const float* nw, const float* nb, bool need_flip)
      : weight_blk(size_t(kTaps * Cp), 0.f),
        conv_bias(size_t(Cp), 0.f),
        norm_weight(size_t(Cp), 0.f),
        norm_bias(size_t(Cp), 0.f),
        channel_mask(size_t(Cp), 0.f) {
    if (need_flip) weight_flip_blk.assign(size_t(kTaps * Cp), 0.f);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t base = (c / kBlock) * kTaps * kBlock + c % kBlock;
      for (int tap = 0; tap < kTaps; ++tap) {
        const float v = conv_weight[c * kTaps + tap];
        weight_blk[base + tap * kBlock] = v;
        if (need_flip) weight_flip_blk[base + (kTaps - 1 - tap) * kBlock] = v;
      }
      if (bias) conv_bias[c] = bias[c];
      norm_weight[c] = nw[c];
      if (nb) norm_bias[c] = nb[c];
      channel_mask[c] = 1.f;
    }
  }
};

// The shape and parameter fields shared by forward and backward.
Problem make_problem(int64_t N, int64_t H, int64_t W, int64_t C, int64_t Cp, const void* x,
                     const PreparedParams& params) {
  Problem p{};
  p.N = N; p.H = H; p.W = W; p.C = C; p.Cp = Cp; p.NH = N * H;
  p.padded_row = (W + 2 * kPad) * Cp;
  p.block_stride = (W + 2 * kPad) * kBlock;
  p.x = x;
  p.weight_blk = params.weight_blk.data();
  p.weight_flip_blk = params.weight_flip_blk.empty() ? nullptr : params.weight_flip_blk.data();
  p.conv_bias = params.conv_bias.data();
  p.norm_weight = params.norm_weight.data();
  p.norm_bias = params.norm_bias.data();
  p.channel_mask = params.channel_mask.data();
  return p;
}

template <typename T>
void run_fwd(const Problem& p, int nthreads) {
  const Isa isa = detect_isa();
  parallel_split(p.NH, nthreads,
                 [&](int64_t b, int64_t e) { CNK_ISA_DISPATCH(isa, fwd_rows<T>(p, b, e)); });
}

template <typename T>
void run_bwd(const Problem& p, float* sum, int nthreads) {
  const Isa isa = detect_isa();
  const int64_t sum_len = kPartialRows * p.Cp;
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = thread_index(), nt = thread_count();
    int64_t b, e;
    split_range(p.num_partials, tid, nt, b, e);
    if (b < e) CNK_ISA_DISPATCH(isa, bwd_grad_rows<T>(p, b, e));
#pragma omp barrier  // phase 2 reads g rows written by other threads
    split_range(p.NH, tid, nt, b, e);
    if (b < e) CNK_ISA_DISPATCH(isa, bwd_dx_rows<T>(p, b, e));
    // Reduction split in whole vectors of kMaxLanes (sum_len is a multiple).
    split_range(sum_len / kMaxLanes, tid, nt, b, e);
    if (b < e) {
      b *= kMaxLanes;
      e *= kMaxLanes;
      CNK_ISA_DISPATCH(isa, reduce_partials(p, sum, b, e));
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Public API.

const char* dwconv_layernorm_cpu_isa() {
  switch (detect_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

void dwconv_layernorm_fwd_cpu(const void* x, const float* conv_weight,
                              const float* conv_bias, const float* norm_weight,
                              const float* norm_bias, void* y, float* mean,
                              float* rstd, int64_t N, int64_t H, int64_t W,
                              int64_t C, float eps, int dtype, int num_threads) {
  check_shape(N, H, W, C);
  check_activation_dtype(dtype, "dwconv_layernorm (cpu)");
  require(x && conv_weight && norm_weight && norm_bias && y && mean && rstd,
          "null pointer (only conv_bias may be null)");
  require(std::isfinite(eps) && eps >= 0.f, "eps must be finite and >= 0");

  const int64_t Cp = padded_channels(C);
  const PreparedParams params(C, Cp, conv_weight, conv_bias, norm_weight, norm_bias, false);
  Problem p = make_problem(N, H, W, C, Cp, x, params);
  p.y = y; p.mean_out = mean; p.rstd_out = rstd; p.eps = eps;

  const int nthreads = resolve_threads(num_threads, p.NH);
  dispatch_activation_dtype(dtype, [&](auto t) { run_fwd<decltype(t)>(p, nthreads); });
}

int64_t dwconv_layernorm_bwd_cpu_workspace_size(int64_t N, int64_t H, int64_t W, int64_t C) {
  check_shape(N, H, W, C);
  const int64_t Cp = padded_channels(C);
  int64_t rows_per_partial, num_partials;
  partial_layout(N * H, Cp, rows_per_partial, num_partials);
  return N * H * (W + 2 * kPad) * Cp + num_partials * kPartialRows * Cp;
}

void dwconv_layernorm_bwd_cpu(const void* dy, const void* x,
                              const float* conv_weight, const float* conv_bias,
                              const float* norm_weight, const float* mean,
                              const float* rstd, void* dx, float* dconv_weight,
                              float* dconv_bias, float* dnorm_weight,
                              float* dnorm_bias, float* workspace,
                              int64_t workspace_floats, int64_t N, int64_t H,
                              int64_t W, int64_t C, int dtype, int num_threads) {
  check_shape(N, H, W, C);
  check_activation_dtype(dtype, "dwconv_layernorm (cpu)");
  require(dy && x && conv_weight && norm_weight && mean && rstd && dx && dconv_weight &&
              dconv_bias && dnorm_weight && dnorm_bias && workspace,
          "null pointer (only conv_bias may be null)");
  require(workspace_floats >= dwconv_layernorm_bwd_cpu_workspace_size(N, H, W, C),
          "workspace smaller than dwconv_layernorm_bwd_cpu_workspace_size()");

  const int64_t Cp = padded_channels(C);
  const PreparedParams params(C, Cp, conv_weight, conv_bias, norm_weight, nullptr, true);
  Problem p = make_problem(N, H, W, C, Cp, x, params);
  p.dy = dy; p.dx = dx; p.mean_in = mean; p.rstd_in = rstd;
  p.g = workspace;
  p.partials = workspace + p.NH * p.padded_row;
  partial_layout(p.NH, Cp, p.rows_per_partial, p.num_partials);

  std::vector<float> sum(size_t(kPartialRows * Cp));
  const int nthreads = resolve_threads(num_threads, p.NH);
  dispatch_activation_dtype(dtype, [&](auto t) { run_bwd<decltype(t)>(p, sum.data(), nthreads); });

  for (int64_t c = 0; c < C; ++c) {
    for (int tap = 0; tap < kTaps; ++tap) dconv_weight[c * kTaps + tap] = sum[tap * Cp + c];
    dconv_bias[c] = sum[kTaps * Cp + c];
    dnorm_weight[c] = sum[(kTaps + 1) * Cp + c];
    dnorm_bias[c] = sum[(kTaps + 2) * Cp + c];
  }
}

}  // namespace convnext_kernels
