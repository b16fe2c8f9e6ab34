// CPU epilogues of mlp_layerscale's Linears: fc1's GELU, forward and backward, and fc2's layer
// scale and residual (see mlp_layerscale.h).
//
// Exact-erf GELU, gelu(a) = a * Phi(a), gelu'(a) = Phi(a) + a * phi(a), evaluated in float32
// SIMD from one exp and one division per element: with u = a / sqrt(2) and e = exp(-u^2),
//   phi(a) = e / sqrt(2 pi),  Phi(-|a|) = erfc(|u|) / 2 = e * Q(1 / (1 + 0.4 |u|)) / 2,
// and Phi(|a|) = 1 - Phi(-|a|). Q (degree 9) is a least-squares fit of exp(u^2) erfc(u) on
// [0, 10], relative error 6e-8 with its float32 coefficients. That is about as many vector
// operations as torch's own erf-based GELU, and as close to float64 (tests/
// test_cpu_gelu_epilogue.py); computing the lower tail directly, not as 1 + erf(u), keeps its
// relative accuracy where torch's 1 + erf(u) cancels. Infinities and NaN behave as in torch's
// float64 gelu: gelu(+inf) = +inf (torch's float32 gelu gives NaN there on AVX-512),
// gelu(-inf) = NaN, NaN in, NaN out.
//
// Determinism: the bias gradient is summed per fixed block of kRowsPerPartial rows into a
// partial row of the workspace, then the partials in block order, whatever the thread count.

#include "mlp_layerscale.h"

#include <stdexcept>
#include <type_traits>

#include "cpu_kernel_utils.h"

namespace convnext_kernels {
namespace {

using namespace cpu;

constexpr int64_t kRowsPerPartial = 64;  // rows summed into one partial of the bias gradient

template <int L>
using FVec = typename VecOf<L>::type;
template <int L>
using IVec = typename IntVecOf<L>::type;

template <int L>
CNK_INLINE IVec<L> as_int(FVec<L> v) {
  IVec<L> r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}
template <int L>
CNK_INLINE FVec<L> as_float(IVec<L> v) {
  FVec<L> r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}
// x where mask (a comparison result: all ones or zero per lane) is set, else y. Bitwise, so it
// needs no vector ?: (which not every compiler accepts for these types).
template <int L>
CNK_INLINE FVec<L> select(IVec<L> mask, FVec<L> x, FVec<L> y) {
  return as_float<L>((mask & as_int<L>(x)) | (~mask & as_int<L>(y)));
}

// The math below runs on K independent vectors in lockstep, statement by statement: one vector's
// dependency chain (exp, division, polynomial: over 60 cycles) would otherwise leave the FMA
// units idle, since out-of-order execution overlaps too few loop iterations to hide it.
#define CNK_EACH _Pragma("GCC unroll 4") for (int k = 0; k < K; ++k)

// exp(-s) for s >= 0, relative error about 1e-7 (2^-23 is 1.2e-7); 0 where it would leave
// float32's normal range (s > 87.3).
template <int L, int K>
CNK_INLINE void exp_neg(const FVec<L> (&s)[K], FVec<L> (&out)[K]) {
  using V = FVec<L>;
  constexpr float kMaxS = 87.3f;  // 126 ln 2 = 87.34: 2^n below stays a normal number
  const V shift = V{} + 12582912.f;
  IVec<L> in_range[K];
  V x[K], t[K], r[K], p[K];
  CNK_EACH in_range[k] = s[k] < kMaxS;
  CNK_EACH x[k] = -select<L>(in_range[k], s[k], V{} + kMaxS);
  // n = rint(x / ln 2): adding 1.5 * 2^23 rounds to an integer and leaves n in the low
  // mantissa bits of t, so that bits(t) << 23 is n << 23, the exponent field of 2^n.
  CNK_EACH t[k] = x[k] * 1.44269504f + shift;
  // r = x - n ln 2, |r| <= ln 2 / 2; with |n| <= 126, ln 2's rounding adds at most 2.4e-7
  // to r, and only where exp(-s) < 2^-100.
  CNK_EACH r[k] = x[k] - (t[k] - shift) * 0.693147181f;
  // exp(r) = 1 + r + r^2 P(r), a least-squares fit with relative error 4e-9.
  CNK_EACH p[k] = r[k] * 1.375140739e-03f + 8.368915878e-03f;
  CNK_EACH p[k] = p[k] * r[k] + 4.166953266e-02f;
  CNK_EACH p[k] = p[k] * r[k] + 1.666651815e-01f;
  CNK_EACH p[k] = p[k] * r[k] + 4.999998808e-01f;
  CNK_EACH p[k] = (p[k] * r[k]) * r[k] + r[k] + 1.f;
  CNK_EACH out[k] =
      select<L>(in_range[k], as_float<L>(as_int<L>(p[k]) + (as_int<L>(t[k]) << 23)), V{});
}

// Phi(a) and phi(a), the standard normal CDF and density.
template <int L, int K>
CNK_INLINE void normal_cdf_pdf(const FVec<L> (&a)[K], FVec<L> (&cdf)[K], FVec<L> (&pdf)[K]) {
  using V = FVec<L>;
  V half_a2[K], e[K], t[K], q[K];
  CNK_EACH half_a2[k] = (0.5f * a[k]) * a[k];
  exp_neg<L, K>(half_a2, e);  // exp(-u^2), u = a / sqrt(2)
  // erfc(|u|) = exp(-u^2) * Q(t), t = 1 / (1 + 0.4 |u|) = 1 / (1 + 0.4 / sqrt(2) |a|).
  CNK_EACH t[k] = 1.f / (1.f + 0.282842712f * as_float<L>(as_int<L>(a[k]) & 0x7fffffff));
  CNK_EACH q[k] = t[k] * 3.197830170e-02f + -9.159605205e-02f;
  CNK_EACH q[k] = q[k] * t[k] + -2.644022368e-02f;
  CNK_EACH q[k] = q[k] * t[k] + 2.293410599e-01f;
  CNK_EACH q[k] = q[k] * t[k] + -3.264461830e-02f;
  CNK_EACH q[k] = q[k] * t[k] + 2.508069277e-01f;
  CNK_EACH q[k] = q[k] * t[k] + 1.830867827e-01f;
  CNK_EACH q[k] = q[k] * t[k] + 2.302424312e-01f;
  CNK_EACH q[k] = q[k] * t[k] + 2.252047658e-01f;
  CNK_EACH q[k] = q[k] * t[k] + 2.068225695e-05f;
  CNK_EACH {
    const V lower_tail = (0.5f * e[k]) * q[k];  // Phi(-|a|) = erfc(|u|) / 2
    cdf[k] = select<L>(a[k] > 0.f, 1.f - lower_tail, lower_tail);
    pdf[k] = e[k] * 0.398942280f;  // 1 / sqrt(2 pi)
  }
}

// n <= L values as T at dst (a row's tail when n < L).
template <typename T, int L>
CNK_INLINE void store_as(T* dst, FVec<L> h, int n) {
  if (n == L) return store_converted<T, L>(dst, h);
  for (int j = 0; j < n; ++j) dst[j] = from_float<T>(h[j]);
}

// n <= L values of T from src as floats, zero-padded to a vector (the tail of a row).
template <typename T, int L>
CNK_INLINE FVec<L> load_part(const T* src, int n) {
  if (n == L) return load_converted<T, L>(src);
  float buf[L] = {};
  for (int j = 0; j < n; ++j) buf[j] = to_float(src[j]);
  return load_vec<L>(buf);
}
template <int L>
CNK_INLINE void store_part(float* dst, FVec<L> v, int n) {
  if (n == L) return store_vec<L>(dst, v);
  float buf[L];
  store_vec<L>(buf, v);
  std::memcpy(dst, buf, sizeof(float) * size_t(n));
}

struct Args {
  const void* preact;  // read, in float32 or the hidden's dtype (hidden or preact_out may be
                       // this memory when of its dtype: each vector is read before it is written)
  const float* bias;
  void* preact_out;  // forward: receives a copy of preact (without the bias), or null
  void* hidden;
  const void* grad;    // backward: dL/dhidden, float32 or of the hidden's dtype
  float* grad_preact;  // backward: dL/da (may be grad itself when that is float32), or null
  void* grad_preact_low;  // backward: dL/da rounded to the activation dtype, or null
  float* partials;  // (num_partials, cols)
  int64_t rows, cols, num_partials;
};

// v rounded to T's precision, as floats: what a T hidden converted back to float32 holds.
template <typename T, int L>
CNK_INLINE FVec<L> round_to(FVec<L> v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    T buf[L];
    store_converted<T, L>(buf, v);
    return load_converted<T, L>(buf);
  }
}

// Columns [c, c + K * L) of one row (n < L valid lanes in the last vector when K == 1); T is
// the hidden's storage type, P the pre-activation's (float or T).
template <typename T, typename P, int L, int K>
CNK_INLINE void gelu_fwd_columns(const P* a_row, const float* bias, T* out_row, T* h_row,
                                 int64_t c, int n) {
  using V = FVec<L>;
  V a[K], cdf[K], pdf[K];
  CNK_EACH a[k] = load_part<P, L>(a_row + c + k * L, n);
  // The pre-activation as read (P is T here): backward adds the same bias to the same values.
  if (out_row) CNK_EACH store_as<T, L>(out_row + c + k * L, a[k], n);
  if (bias) CNK_EACH a[k] += load_part<float, L>(bias + c + k * L, n);
  normal_cdf_pdf<L, K>(a, cdf, pdf);
  CNK_EACH store_as<T, L>(h_row + c + k * L, a[k] * cdf[k], n);
}

// The backward's types: T the activations' (the hidden's precision), P the pre-activation's, G
// the incoming gradient's, H the hidden's storage (float32 holding T-rounded values, or T).
template <typename T, typename P, typename G, typename H, int L, int K>
CNK_INLINE void gelu_bwd_columns(const P* a_row, const float* bias, const G* grad_row,
                                 float* grad_preact_row, T* grad_low_row, H* h_row,
                                 float* partial, int64_t c, int n) {
  using V = FVec<L>;
  V a[K], cdf[K], pdf[K];
  CNK_EACH a[k] = load_part<P, L>(a_row + c + k * L, n);
  if (bias) CNK_EACH a[k] += load_part<float, L>(bias + c + k * L, n);
  normal_cdf_pdf<L, K>(a, cdf, pdf);
  CNK_EACH {
    const int64_t ck = c + k * L;
    const V da = load_part<G, L>(grad_row + ck, n) * (cdf[k] + a[k] * pdf[k]);
    if (grad_preact_row) store_part<L>(grad_preact_row + ck, da, n);  // after grad_row's last read
    if (grad_low_row) store_as<T, L>(grad_low_row + ck, da, n);
    // After the last read of a_row[ck...].
    if constexpr (std::is_same_v<H, T>) store_as<T, L>(h_row + ck, a[k] * cdf[k], n);
    else store_as<float, L>(h_row + ck, round_to<T, L>(a[k] * cdf[k]), n);
    store_part<L>(partial + ck, load_part<float, L>(partial + ck, n) + da, n);
  }
}

// Vectors in lockstep (see CNK_EACH). AVX2, one thread, (2048, 384) floats: K = 1, 2, 4, 8 ran
// the backward at 0.62, 0.73, 0.84, 0.49 G elements/s (8 spills its 16 registers), the forward
// at 0.85, 0.94, 1.03, 0.55 (torch's GELU alone: 0.93; AMD EPYC, 2026-12-06).
constexpr int kInterleave = 4;

template <typename T, typename P, int L>
CNK_INLINE void gelu_fwd_rows_impl(const Args& g, int64_t row_begin, int64_t row_end) {
  constexpr int K = kInterleave;
  T* hidden = static_cast<T*>(g.hidden);
  T* preact_out = static_cast<T*>(g.preact_out);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const P* a_row = static_cast<const P*>(g.preact) + r * g.cols;
    T* out_row = preact_out ? preact_out + r * g.cols : nullptr;
    T* h_row = hidden + r * g.cols;
    int64_t c = 0;
    for (; c + K * L <= g.cols; c += K * L) gelu_fwd_columns<T, P, L, K>(a_row, g.bias, out_row, h_row, c, L);
    for (; c < g.cols; c += L)
      gelu_fwd_columns<T, P, L, 1>(a_row, g.bias, out_row, h_row, c, int(std::min<int64_t>(L, g.cols - c)));
  }
}

// Row blocks [block_begin, block_end): hidden, grad and each block's bias-gradient partial.
template <typename T, typename P, typename G, typename H, int L>
CNK_INLINE void gelu_bwd_blocks_impl(const Args& g, int64_t block_begin, int64_t block_end) {
  constexpr int K = kInterleave;
  for (int64_t blk = block_begin; blk < block_end; ++blk) {
    float* partial = g.partials + blk * g.cols;
    std::fill(partial, partial + g.cols, 0.f);
    const int64_t row_end = std::min(g.rows, (blk + 1) * kRowsPerPartial);
    for (int64_t r = blk * kRowsPerPartial; r < row_end; ++r) {
      const int64_t offset = r * g.cols;
      const P* a_row = static_cast<const P*>(g.preact) + offset;
      const G* grad_row = static_cast<const G*>(g.grad) + offset;
      float* grad_preact_row = g.grad_preact ? g.grad_preact + offset : nullptr;
      T* grad_low_row = g.grad_preact_low ? static_cast<T*>(g.grad_preact_low) + offset : nullptr;
      H* h_row = static_cast<H*>(g.hidden) + offset;
      int64_t c = 0;
      for (; c + K * L <= g.cols; c += K * L)
        gelu_bwd_columns<T, P, G, H, L, K>(a_row, g.bias, grad_row, grad_preact_row, grad_low_row,
                                           h_row, partial, c, L);
      for (; c < g.cols; c += L)
        gelu_bwd_columns<T, P, G, H, L, 1>(a_row, g.bias, grad_row, grad_preact_row, grad_low_row,
                                           h_row, partial, c, int(std::min<int64_t>(L, g.cols - c)));
    }
  }
}

// ---- fc2's epilogue: y = shortcut + gamma * (s * (z + bias)) ---------------------------------

struct ResidualArgs {
  const void* z;          // fc2's GEMM output (rows, cols), float32 or of the activation dtype
  const float* bias;      // (cols) or null (z already holds it)
  const float* row_scale; // (rows) drop-path factors, or null
  const float* gamma;     // (cols) layer scale, or null
  const void* shortcut;   // (rows, cols), activation dtype
  void* y;                // (rows, cols), activation dtype
  int64_t rows, cols;
};

// T the activations' storage type, Z the GEMM output's (float or T).
template <typename T, typename Z, int L>
CNK_INLINE void residual_rows_impl(const ResidualArgs& g, int64_t row_begin, int64_t row_end) {
  using V = FVec<L>;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t offset = r * g.cols;
    const Z* z_row = static_cast<const Z*>(g.z) + offset;
    const T* shortcut_row = static_cast<const T*>(g.shortcut) + offset;
    T* y_row = static_cast<T*>(g.y) + offset;
    const float scale = g.row_scale ? g.row_scale[r] : 1.f;
    for (int64_t c = 0; c < g.cols; c += L) {
      const int n = int(std::min<int64_t>(L, g.cols - c));
      V z = load_part<Z, L>(z_row + c, n);
      if (g.bias) z += load_part<float, L>(g.bias + c, n);
      if (g.row_scale) z *= scale;
      if (g.gamma) z *= load_part<float, L>(g.gamma + c, n);
      store_as<T, L>(y_row + c, load_part<T, L>(shortcut_row + c, n) + z, n);
    }
  }
}

#define CNK_DEFINE_VARIANT(NS, TARGET, L)                                   \
  namespace NS {                                                            \
  template <typename T, typename P>                                         \
  TARGET void gelu_fwd_rows(const Args& g, int64_t b, int64_t e) {          \
    gelu_fwd_rows_impl<T, P, L>(g, b, e);                                   \
  }                                                                         \
  template <typename T, typename P, typename G, typename H>                 \
  TARGET void gelu_bwd_blocks(const Args& g, int64_t b, int64_t e) {        \
    gelu_bwd_blocks_impl<T, P, G, H, L>(g, b, e);                           \
  }                                                                         \
  template <typename T, typename Z>                                         \
  TARGET void residual_rows(const ResidualArgs& g, int64_t b, int64_t e) {  \
    residual_rows_impl<T, Z, L>(g, b, e);                                   \
  }                                                                         \
  }

#define CNK_NO_TARGET
CNK_DEFINE_VARIANT(generic, CNK_NO_TARGET, 4)
#if CNK_X86
CNK_DEFINE_VARIANT(avx2, CNK_TARGET_AVX2, 8)
CNK_DEFINE_VARIANT(avx512, CNK_TARGET_AVX512, 16)
#endif

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("mlp_layerscale (cpu): ") + what);
}

void check_args(int64_t rows, int64_t cols, int dtype, int preact_dtype) {
  require(rows >= 0 && cols >= 1, "rows must be >= 0 and cols >= 1");
  int64_t total = 0;
  require(!__builtin_mul_overflow(rows, cols, &total) &&
              !__builtin_mul_overflow(total, int64_t(4), &total),
          "tensor too large");
  check_activation_dtype(dtype, "mlp_layerscale (cpu)");
  require(preact_dtype == kFloat32 || preact_dtype == dtype,
          "preact_dtype must be 0 (float32) or dtype");
}

int64_t num_partials(int64_t rows) { return (rows + kRowsPerPartial - 1) / kRowsPerPartial; }

// fn(T{}, P{}): T the storage type of `dtype`, P that of `other_dtype` (float32 or dtype, as
// checked before).
template <typename Fn>
void dispatch_dtypes(int dtype, int other_dtype, Fn&& fn) {
  dispatch_activation_dtype(dtype, [&](auto t) {
    if (other_dtype == kFloat32) fn(t, float{});
    else fn(t, t);
  });
}

template <typename T, typename P>
void run_fwd(const Args& g, int nthreads) {
  const Isa isa = detect_isa();
  parallel_split(g.rows, nthreads,
                 [&](int64_t b, int64_t e) { CNK_ISA_DISPATCH(isa, gelu_fwd_rows<T, P>(g, b, e)); });
}

template <typename T, typename P, typename G, typename H>
void run_bwd(const Args& g, float* bias_grad, int nthreads) {
  const Isa isa = detect_isa();
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = thread_index(), nt = thread_count();
    int64_t b, e;
    split_range(g.num_partials, tid, nt, b, e);
    if (b < e) CNK_ISA_DISPATCH(isa, gelu_bwd_blocks<T, P, G, H>(g, b, e));
#pragma omp barrier  // the sums read partials written by other threads
    split_range(g.cols, tid, nt, b, e);
    for (int64_t c = b; c < e; ++c) {
      float sum = 0.f;
      for (int64_t blk = 0; blk < g.num_partials; ++blk) sum += g.partials[blk * g.cols + c];
      bias_grad[c] += sum;
    }
  }
}

template <typename T, typename Z>
void run_residual(const ResidualArgs& g, int nthreads) {
  const Isa isa = detect_isa();
  parallel_split(g.rows, nthreads,
                 [&](int64_t b, int64_t e) { CNK_ISA_DISPATCH(isa, residual_rows<T, Z>(g, b, e)); });
}

// ---- dst (cols, rows) float32 = src (rows, cols)^T: the weight-gradient GEMMs' operand ------

constexpr int64_t kTransposeTile = 16;  // a 16 x 16 tile of floats: 1 KB, in L1 with its source

template <typename T>
void transpose_tiles(const T* src, float* dst, int64_t rows, int64_t cols, int64_t tile_begin,
                     int64_t tile_end) {
  constexpr int64_t B = kTransposeTile;
  const int64_t row_tiles = (rows + B - 1) / B;
  float buf[B][B];
  // Tiles in column-tile-major order: each thread writes whole rows of dst.
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t c0 = (tile / row_tiles) * B, r0 = (tile % row_tiles) * B;
    const int64_t nr = std::min(B, rows - r0), nc = std::min(B, cols - c0);
    for (int64_t i = 0; i < nr; ++i) {
      const T* s = src + (r0 + i) * cols + c0;
      if (nc == B) store_vec<B>(buf[i], load_converted<T, B>(s));
      else for (int64_t j = 0; j < nc; ++j) buf[i][j] = to_float(s[j]);
    }
    for (int64_t j = 0; j < nc; ++j) {
      float* d = dst + (c0 + j) * rows + r0;
      for (int64_t i = 0; i < nr; ++i) d[i] = buf[i][j];
    }
  }
}

}  // namespace

void transpose_to_float32_cpu(const void* src, float* dst, int64_t rows, int64_t cols, int dtype,
                              int num_threads) {
  check_args(rows, cols, dtype, kFloat32);
  require(src && dst, "null pointer");
  require(src != static_cast<const void*>(dst), "dst must be different memory from src");
  if (rows == 0) return;
  const int64_t tiles = ((rows + kTransposeTile - 1) / kTransposeTile) *
                        ((cols + kTransposeTile - 1) / kTransposeTile);
  const int nthreads = resolve_threads(num_threads, tiles);
  dispatch_activation_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    parallel_split(tiles, nthreads, [&](int64_t b, int64_t e) {
      transpose_tiles<T>(static_cast<const T*>(src), dst, rows, cols, b, e);
    });
  });
}

void mlp_layerscale_gelu_fwd_cpu(const void* preact, const float* bias, void* preact_out,
                                 void* hidden, int64_t rows, int64_t cols, int dtype,
                                 int preact_dtype, int num_threads) {
  check_args(rows, cols, dtype, preact_dtype);
  require(preact && hidden, "null pointer (only bias and preact_out may be null)");
  require(preact != hidden || preact_dtype == dtype,
          "hidden may be preact's memory only when preact_dtype equals dtype");
  require(!preact_out || preact_dtype == dtype,
          "preact_out needs preact_dtype equal to dtype (it receives a copy of preact)");
  require(preact_out != hidden, "preact_out and hidden must be different memory");
  if (rows == 0) return;
  Args g{};
  g.preact = preact; g.bias = bias; g.preact_out = preact_out; g.hidden = hidden;
  g.rows = rows; g.cols = cols;
  const int nthreads = resolve_threads(num_threads, rows);
  dispatch_dtypes(dtype, preact_dtype, [&](auto t, auto p) {
    run_fwd<decltype(t), decltype(p)>(g, nthreads);
  });
}

int64_t mlp_layerscale_gelu_bwd_cpu_workspace_size(int64_t rows, int64_t cols) {
  check_args(rows, cols, kFloat32, kFloat32);
  return num_partials(rows) * cols;
}

void mlp_layerscale_gelu_bwd_cpu(void* preact, const float* bias, const void* grad,
                                 float* grad_preact, void* grad_preact_low, void* hidden,
                                 float* bias_grad, float* workspace, int64_t workspace_floats,
                                 int64_t rows, int64_t cols, int dtype, int preact_dtype,
                                 int grad_dtype, int hidden_dtype, int num_threads) {
  check_args(rows, cols, dtype, preact_dtype);
  require(grad_dtype == kFloat32 || grad_dtype == dtype, "grad_dtype must be 0 (float32) or dtype");
  require(hidden_dtype == kFloat32 || hidden_dtype == dtype,
          "hidden_dtype must be 0 (float32) or dtype");
  require(preact && grad && (grad_preact || grad_preact_low) && hidden && bias_grad &&
              (workspace || rows == 0),
          "null pointer (only bias, and one of grad_preact and grad_preact_low, may be null)");
  require(preact != hidden || hidden_dtype == preact_dtype,
          "hidden may be preact's memory only when hidden_dtype equals preact_dtype");
  require(static_cast<const void*>(grad_preact) != grad || grad_dtype == kFloat32,
          "grad_preact may be grad's memory only when grad_dtype is float32");
  const void* others[] = {preact, grad, grad_preact, grad_preact_low, hidden};
  for (int i = 0; i < 5; ++i)
    for (int j = i + 1; j < 5; ++j)
      require(others[i] != others[j] || (i == 0 && j == 4) || (i == 1 && j == 2) || !others[i],
              "preact, grad, grad_preact, grad_preact_low and hidden must be different memory "
              "(except hidden over preact and grad_preact over grad, as allowed above)");
  require(workspace_floats >= mlp_layerscale_gelu_bwd_cpu_workspace_size(rows, cols),
          "workspace smaller than mlp_layerscale_gelu_bwd_cpu_workspace_size()");
  if (rows == 0) return;
  Args g{};
  g.preact = preact; g.bias = bias; g.grad = grad; g.grad_preact = grad_preact;
  g.grad_preact_low = grad_preact_low; g.hidden = hidden; g.partials = workspace;
  g.rows = rows; g.cols = cols; g.num_partials = num_partials(rows);
  const int nthreads = resolve_threads(num_threads, g.num_partials);
  dispatch_dtypes(dtype, preact_dtype, [&](auto t, auto p) {
    using T = decltype(t);
    using P = decltype(p);
    // G, the incoming gradient's type, and H, the hidden's storage: each float32 or T.
    auto with_grad_type = [&](auto grad_tag) {
      using G = decltype(grad_tag);
      if (hidden_dtype == kFloat32) run_bwd<T, P, G, float>(g, bias_grad, nthreads);
      else run_bwd<T, P, G, T>(g, bias_grad, nthreads);
    };
    if (grad_dtype == kFloat32) with_grad_type(float{});
    else with_grad_type(T{});
  });
}

void mlp_layerscale_residual_cpu(const void* z, const float* bias, const float* row_scale,
                                 const float* gamma, const void* shortcut, void* y, int64_t rows,
                                 int64_t cols, int dtype, int z_dtype, int num_threads) {
  check_args(rows, cols, dtype, kFloat32);
  require(z_dtype == kFloat32 || z_dtype == dtype, "z_dtype must be 0 (float32) or dtype");
  require(z && shortcut && y, "null pointer (only bias, row_scale and gamma may be null)");
  require(y != z || z_dtype == dtype, "y may be z's memory only when z_dtype equals dtype");
  if (rows == 0) return;
  ResidualArgs g{z, bias, row_scale, gamma, shortcut, y, rows, cols};
  const int nthreads = resolve_threads(num_threads, rows);
  dispatch_dtypes(dtype, z_dtype, [&](auto t, auto zt) {
    run_residual<decltype(t), decltype(zt)>(g, nthreads);
  });
}

}  // namespace convnext_kernels
