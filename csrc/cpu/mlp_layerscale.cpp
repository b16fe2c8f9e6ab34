// CPU GELU epilogues of mlp_layerscale's first Linear (see mlp_layerscale.h).
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

template <typename T, int L>
CNK_INLINE void store_as(T* dst, FVec<L> h, int n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == L) {
      store_vec<L>(dst, h);
      return;
    }
  }
  for (int j = 0; j < n; ++j) dst[j] = from_float<T>(h[j]);
}

// n <= L floats from src, zero-padded to a vector (the tail of a row).
template <int L>
CNK_INLINE FVec<L> load_part(const float* src, int n) {
  if (n == L) return load_vec<L>(src);
  float buf[L] = {};
  std::memcpy(buf, src, sizeof(float) * size_t(n));
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
  const float* preact;  // read (the hidden or preact_out may be this memory: read first)
  const float* bias;
  void* preact_out;  // forward: receives preact + bias in the hidden's dtype, or null
  void* hidden;
  float* grad;
  float* partials;  // (num_partials, cols)
  int64_t rows, cols, num_partials;
};

// Columns [c, c + K * L) of one row (n < L valid lanes in the last vector when K == 1).
template <typename T, int L, int K>
CNK_INLINE void gelu_fwd_columns(const float* a_row, const float* bias, T* out_row, T* h_row,
                                 int64_t c, int n) {
  using V = FVec<L>;
  V a[K], cdf[K], pdf[K];
  CNK_EACH a[k] = load_part<L>(a_row + c + k * L, n);
  if (bias) CNK_EACH a[k] += load_part<L>(bias + c + k * L, n);
  if (out_row) CNK_EACH store_as<T, L>(out_row + c + k * L, a[k], n);
  normal_cdf_pdf<L, K>(a, cdf, pdf);
  CNK_EACH store_as<T, L>(h_row + c + k * L, a[k] * cdf[k], n);
}

template <typename T, int L, int K>
CNK_INLINE void gelu_bwd_columns(const float* a_row, const float* bias, float* grad_row, T* h_row,
                                 float* partial, int64_t c, int n) {
  using V = FVec<L>;
  V a[K], cdf[K], pdf[K];
  CNK_EACH a[k] = load_part<L>(a_row + c + k * L, n);
  if (bias) CNK_EACH a[k] += load_part<L>(bias + c + k * L, n);
  normal_cdf_pdf<L, K>(a, cdf, pdf);
  CNK_EACH {
    const int64_t ck = c + k * L;
    const V da = load_part<L>(grad_row + ck, n) * (cdf[k] + a[k] * pdf[k]);
    store_part<L>(grad_row + ck, da, n);
    store_as<T, L>(h_row + ck, a[k] * cdf[k], n);  // after the last read of a_row[ck...]
    store_part<L>(partial + ck, load_part<L>(partial + ck, n) + da, n);
  }
}

// Vectors in lockstep (see CNK_EACH). AVX2, one thread, (2048, 384) floats: K = 1, 2, 4, 8 ran
// the backward at 0.62, 0.73, 0.84, 0.49 G elements/s (8 spills its 16 registers), the forward
// at 0.85, 0.94, 1.03, 0.55 (torch's GELU alone: 0.93; AMD EPYC, 2026-12-06).
constexpr int kInterleave = 4;

template <typename T, int L>
CNK_INLINE void gelu_fwd_rows_impl(const Args& g, int64_t row_begin, int64_t row_end) {
  constexpr int K = kInterleave;
  T* hidden = static_cast<T*>(g.hidden);
  T* preact_out = static_cast<T*>(g.preact_out);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* a_row = g.preact + r * g.cols;
    T* out_row = preact_out ? preact_out + r * g.cols : nullptr;
    T* h_row = hidden + r * g.cols;
    int64_t c = 0;
    for (; c + K * L <= g.cols; c += K * L) gelu_fwd_columns<T, L, K>(a_row, g.bias, out_row, h_row, c, L);
    for (; c < g.cols; c += L)
      gelu_fwd_columns<T, L, 1>(a_row, g.bias, out_row, h_row, c, int(std::min<int64_t>(L, g.cols - c)));
  }
}

// Row blocks [block_begin, block_end): hidden, grad and each block's bias-gradient partial.
template <typename T, int L>
CNK_INLINE void gelu_bwd_blocks_impl(const Args& g, int64_t block_begin, int64_t block_end) {
  constexpr int K = kInterleave;
  T* hidden = static_cast<T*>(g.hidden);
  for (int64_t blk = block_begin; blk < block_end; ++blk) {
    float* partial = g.partials + blk * g.cols;
    std::fill(partial, partial + g.cols, 0.f);
    const int64_t row_end = std::min(g.rows, (blk + 1) * kRowsPerPartial);
    for (int64_t r = blk * kRowsPerPartial; r < row_end; ++r) {
      const float* a_row = g.preact + r * g.cols;
      float* grad_row = g.grad + r * g.cols;
      T* h_row = hidden + r * g.cols;
      int64_t c = 0;
      for (; c + K * L <= g.cols; c += K * L)
        gelu_bwd_columns<T, L, K>(a_row, g.bias, grad_row, h_row, partial, c, L);
      for (; c < g.cols; c += L)
        gelu_bwd_columns<T, L, 1>(a_row, g.bias, grad_row, h_row, partial, c,
                                  int(std::min<int64_t>(L, g.cols - c)));
    }
  }
}

#define CNK_DEFINE_VARIANT(NS, TARGET, L)                                   \
  namespace NS {                                                            \
  template <typename T>                                                     \
  TARGET void gelu_fwd_rows(const Args& g, int64_t b, int64_t e) {          \
    gelu_fwd_rows_impl<T, L>(g, b, e);                                      \
  }                                                                         \
  template <typename T>                                                     \
  TARGET void gelu_bwd_blocks(const Args& g, int64_t b, int64_t e) {        \
    gelu_bwd_blocks_impl<T, L>(g, b, e);                                    \
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

void check_args(int64_t rows, int64_t cols, int dtype, const float* preact, const void* hidden) {
  require(rows >= 0 && cols >= 1, "rows must be >= 0 and cols >= 1");
  int64_t total = 0;
  require(!__builtin_mul_overflow(rows, cols, &total) &&
              !__builtin_mul_overflow(total, int64_t(4), &total),
          "tensor too large");
  check_activation_dtype(dtype, "mlp_layerscale (cpu)");
  require(static_cast<const void*>(preact) != hidden || dtype == kFloat32,
          "hidden may be preact's memory only when dtype is float32");
}

int64_t num_partials(int64_t rows) { return (rows + kRowsPerPartial - 1) / kRowsPerPartial; }

template <typename T>
void run_fwd(const Args& g, int nthreads) {
  const Isa isa = detect_isa();
  parallel_split(g.rows, nthreads,
                 [&](int64_t b, int64_t e) { CNK_ISA_DISPATCH(isa, gelu_fwd_rows<T>(g, b, e)); });
}

template <typename T>
void run_bwd(const Args& g, float* bias_grad, int nthreads) {
  const Isa isa = detect_isa();
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = thread_index(), nt = thread_count();
    int64_t b, e;
    split_range(g.num_partials, tid, nt, b, e);
    if (b < e) CNK_ISA_DISPATCH(isa, gelu_bwd_blocks<T>(g, b, e));
#pragma omp barrier  // the sums read partials written by other threads
    split_range(g.cols, tid, nt, b, e);
    for (int64_t c = b; c < e; ++c) {
      float sum = 0.f;
      for (int64_t blk = 0; blk < g.num_partials; ++blk) sum += g.partials[blk * g.cols + c];
      bias_grad[c] += sum;
    }
  }
}

}  // namespace

void mlp_layerscale_gelu_fwd_cpu(const float* preact, const float* bias, void* preact_out,
                                 void* hidden, int64_t rows, int64_t cols, int dtype,
                                 int num_threads) {
  check_args(rows, cols, dtype, preact, hidden);
  require(preact && hidden, "null pointer (only bias and preact_out may be null)");
  require(static_cast<const void*>(preact) != preact_out || dtype == kFloat32,
          "preact_out may be preact's memory only when dtype is float32");
  require(preact_out != hidden, "preact_out and hidden must be different memory");
  if (rows == 0) return;
  Args g{};
  g.preact = preact; g.bias = bias; g.preact_out = preact_out; g.hidden = hidden;
  g.rows = rows; g.cols = cols;
  const int nthreads = resolve_threads(num_threads, rows);
  dispatch_activation_dtype(dtype, [&](auto t) { run_fwd<decltype(t)>(g, nthreads); });
}

int64_t mlp_layerscale_gelu_bwd_cpu_workspace_size(int64_t rows, int64_t cols) {
  check_args(rows, cols, kFloat32, nullptr, nullptr);
  return num_partials(rows) * cols;
}

void mlp_layerscale_gelu_bwd_cpu(float* preact, const float* bias, float* grad,
                                 void* hidden, float* bias_grad, float* workspace,
                                 int64_t workspace_floats, int64_t rows, int64_t cols, int dtype,
                                 int num_threads) {
  check_args(rows, cols, dtype, preact, hidden);
  require(preact && grad && hidden && bias_grad && (workspace || rows == 0),
          "null pointer (only bias may be null)");
  require(workspace_floats >= mlp_layerscale_gelu_bwd_cpu_workspace_size(rows, cols),
          "workspace smaller than mlp_layerscale_gelu_bwd_cpu_workspace_size()");
  if (rows == 0) return;
  Args g{};
  g.preact = preact;
  g.bias = bias; g.hidden = hidden; g.grad = grad; g.partials = workspace;
  g.rows = rows; g.cols = cols; g.num_partials = num_partials(rows);
  const int nthreads = resolve_threads(num_threads, g.num_partials);
  dispatch_activation_dtype(dtype, [&](auto t) { run_bwd<decltype(t)>(g, bias_grad, nthreads); });
}

}  // namespace convnext_kernels
