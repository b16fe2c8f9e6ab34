// mlp_layerscale: y = shortcut + s[n] * gamma * (gelu_erf(x W1^T + b1) W2^T + b2), NHWC rows.
//
// Forward: two GEMMs with fused epilogues (bias + GELU -> hidden in memory; bias + gamma + drop
// scale + residual -> y). Backward (hidden recomputed from x):
//   1. a = x W1^T + b1, h = gelu(a)                               (TN GEMM, stores a and h)
//   2. dys = dy s, dz = dys gamma; per-row-tile column sums of dys        (elementwise)
//   3. G = dys^T h                                                (split-K GEMM, fp32 partials)
//   4. da = (dz W2) * gelu'(a), in place over a; partial db1 = sum da              (NN GEMM)
//   5. dW1 = da^T x                                               (split-K GEMM, fp32 partials)
//   6. dx = da W1                                                 (NN GEMM)
//   7. fixed-order sums of all partials (deterministic, no atomics): G, S = sum dys, db1, dW1
//   8. layer scale, per channel c: dgamma = sum_j W2[c][j] G[c][j] + b2[c] S[c]
//      (= sum_m dys z, since z = h W2^T + b2), dW2 = gamma G, db2 = gamma S
// Step 8 replaces recomputing z = h W2^T (a GEMM and a pass over the 4C hidden) for dgamma.
// Rounding: with a drop scale, dys is rounded to T as the G GEMM's operand (as dz always was for
// dW2), so dgamma carries that rounding too (the S column sums do not); without one, dys is dy.
#pragma once

#include <limits>
#include <type_traits>

#include "mlp_gemm.cuh"

namespace convnext_kernels {
namespace cuda {
namespace mlp {

constexpr int kSplitTargetCtas = 264;    // weight-gradient GEMMs: ~2 CTAs per SM on an H100
constexpr int kSplitMinKTiles = 8;       // ... but at least this many K tiles per split

// ---- pair load / store (two consecutive columns; vectorised when aligned) ----------------------
template <typename T>
__device__ __forceinline__ void store_pair(T* p, float v0, float v1, bool has1) {
  if (has1 && reinterpret_cast<std::uintptr_t>(p) % (2 * sizeof(T)) == 0) {
    if constexpr (std::is_same_v<T, float>) {
      *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
    } else if constexpr (std::is_same_v<T, __half>) {
      *reinterpret_cast<__half2*>(p) = __floats2half2_rn(v0, v1);
    } else {
      *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
    }
  } else {
    p[0] = from_float<T>(v0);
    if (has1) p[1] = from_float<T>(v1);
  }
}

template <typename T>
__device__ __forceinline__ void load_pair(const T* p, bool has1, float& v0, float& v1) {
  v0 = to_float(p[0]);
  v1 = has1 ? to_float(p[1]) : 0.0f;
}

// ---- epilogues (see the interface note above mlp_layerscale_gemm_kernel) -----------------------

// hidden = gelu(acc + b1); optionally also the pre-activation a = acc + b1 (backward).
template <typename T, bool kStorePreact>
struct EpilogueBiasGelu {
  static constexpr int kColSums = 0;
  T* hidden;
  T* preact;
  const float* bias;
  int64_t ld;
  __device__ __forceinline__ void operator()(int64_t row, int64_t col, float v0, float v1, bool has1,
                                             float (&)[2][2]) const {
    const float a0 = v0 + bias[col];
    const float a1 = has1 ? v1 + bias[col + 1] : 0.0f;
    const int64_t off = row * ld + col;
    store_pair(hidden + off, gelu_erf(a0), gelu_erf(a1), has1);
    if constexpr (kStorePreact) store_pair(preact + off, a0, a1, has1);
  }
};

// y = shortcut + s[n] * gamma * (acc + b2); gamma / drop_scale may be null (= 1).
template <typename T>
struct EpilogueResidualLayerScale {
  static constexpr int kColSums = 0;
  T* out;
  const T* shortcut;
  const float* bias;
  const float* gamma;
  const float* drop_scale;
  int64_t ld;
  int64_t rows_per_sample;
  __device__ __forceinline__ void operator()(int64_t row, int64_t col, float v0, float v1, bool has1,
                                             float (&)[2][2]) const {
    const float s = drop_scale ? drop_scale[row / rows_per_sample] : 1.0f;
    const float g0 = gamma ? gamma[col] : 1.0f;
    const float g1 = (gamma && has1) ? gamma[col + 1] : 1.0f;
    const int64_t off = row * ld + col;
    float r0, r1;
    load_pair(shortcut + off, has1, r0, r1);
    const float y0 = fmaf(s * g0, v0 + bias[col], r0);
    const float y1 = has1 ? fmaf(s * g1, v1 + bias[col + 1], r1) : 0.0f;
    store_pair(out + off, y0, y1, has1);
  }
};

// da = acc * gelu'(a), written over a (same element, same thread: read before write); db1 += da.
template <typename T>
struct EpilogueGeluGrad {
  static constexpr int kColSums = 1;
  T* out;            // may alias preact
  const T* preact;
  int64_t ld;
  float* colsum[2];  // [tiles_m][N]: db1
  __device__ __forceinline__ float* colsum_out(int k) const { return k == 0 ? colsum[0] : colsum[1]; }  // no dynamic indexing: keeps the params out of local memory
  __device__ __forceinline__ void operator()(int64_t row, int64_t col, float v0, float v1, bool has1,
                                             float (&sums)[2][2]) const {
    const int64_t off = row * ld + col;
    float a0, a1;
    load_pair(preact + off, has1, a0, a1);
    const float da0 = v0 * gelu_erf_grad(a0);
    const float da1 = has1 ? v1 * gelu_erf_grad(a1) : 0.0f;
    sums[0][0] = da0;
    sums[0][1] = da1;
    store_pair(out + off, da0, da1, has1);
  }
};

// out = acc, in the activation dtype (dx).
template <typename T>
struct EpilogueStore {
  static constexpr int kColSums = 0;
  T* out;
  int64_t ld;
  __device__ __forceinline__ void operator()(int64_t row, int64_t col, float v0, float v1, bool has1,
                                             float (&)[2][2]) const {
    store_pair(out + row * ld + col, v0, v1, has1);
  }
};

// fp32 partial of one K split: out[blockIdx.z][row][col] = acc (weight gradients).
struct EpilogueStoreSplitPartial {
  static constexpr int kColSums = 0;
  float* out;
  int64_t ld;
  int64_t split_stride;
  __device__ __forceinline__ void operator()(int64_t row, int64_t col, float v0, float v1, bool has1,
                                             float (&)[2][2]) const {
    store_pair(out + static_cast<int64_t>(blockIdx.z) * split_stride + row * ld + col, v0, v1, has1);
  }
};

// ---- backward elementwise steps ----------------------------------------------------------------
constexpr int kDysRowsPerTile = 256;  // rows per column-sum partial of step 2 (the fixed-order reduce
                                      //   then sums rows / 256 partials per channel, not rows / 64)
constexpr int kDysThreads = 128;      // channels per block of step 2

// Step 2: dys = dy * s[n] (written only with a drop scale; else dys is dy), dz = dys * gamma
// (written only with gamma; else dz is dys), colsum[tile][c] = sum of dys over the tile's rows in
// row order. Block (tile, channel block); each thread owns one channel of the tile.
template <typename T, bool kHasGamma, bool kHasDropScale>
__global__ void __launch_bounds__(kDysThreads) mlp_layerscale_dys_kernel(
    const T* __restrict__ dy, const float* __restrict__ gamma, const float* __restrict__ drop_scale,
    T* __restrict__ dys, T* __restrict__ dz, float* __restrict__ colsum, int64_t rows, int64_t C,
    int64_t rows_per_sample) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kDysThreads + threadIdx.x;
  if (c >= C) return;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kDysRowsPerTile;
  const int64_t row_end = min(rows, row0 + kDysRowsPerTile);
  const float g = kHasGamma ? gamma[c] : 1.0f;
  float sum = 0.0f;
  for (int64_t row = row0; row < row_end; ++row) {
    const int64_t off = row * C + c;
    float v = to_float(dy[off]);
    if constexpr (kHasDropScale) {
      v *= drop_scale[row / rows_per_sample];
      dys[off] = from_float<T>(v);
    }
    sum += v;
    if constexpr (kHasGamma) dz[off] = from_float<T>(v * g);
  }
  colsum[static_cast<int64_t>(blockIdx.x) * C + c] = sum;
}

// Step 8, one warp per channel c: on entry dw2[c][:] holds G[c][:] and db2[c] holds S[c].
// dgamma[c] = sum_j W2[c][j] G[c][j] + b2[c] S[c] (fixed-order lane sums, then a fixed xor
// tree); then dw2[c][:] *= gamma[c] and db2[c] *= gamma[c] when there is a gamma. Each lane
// rescales exactly the elements it read.
constexpr int kLayerScaleWarps = 4;

template <typename T>
__global__ void __launch_bounds__(kLayerScaleWarps * 32) mlp_layerscale_gamma_grad_kernel(
    const T* __restrict__ w2, const float* __restrict__ b2, const float* __restrict__ gamma, float* dw2,
    float* db2, float* __restrict__ dgamma, int64_t C, int64_t hidden) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kLayerScaleWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (c >= C) return;
  float* grow = dw2 + c * hidden;
  const T* wrow = w2 + c * hidden;
  float dot = 0.0f;
  for (int64_t j = lane; j < hidden; j += 32) dot = fmaf(to_float(wrow[j]), grow[j], dot);
  dot = warp_sum(dot);
  if (lane == 0) dgamma[c] = fmaf(b2[c], db2[c], dot);
  if (gamma == nullptr) return;  // uniform per launch
  const float g = gamma[c];
  for (int64_t j = lane; j < hidden; j += 32) grow[j] *= g;
  if (lane == 0) db2[c] *= g;
}

// ---- host side ---------------------------------------------------------------------------------
struct FwdArgs {
  const void* x;
  const void* shortcut;
  const void* fc1_weight;
  const float* fc1_bias;
  const void* fc2_weight;
  const float* fc2_bias;
  const float* gamma;       // nullable
  const float* drop_scale;  // nullable
  void* y;
  void* workspace;
  int64_t rows;             // N * H * W
  int64_t rows_per_sample;  // H * W
  int64_t C;
  bool vec_loads;
};

struct BwdArgs {
  const void* dy;
  const void* x;
  const void* fc1_weight;
  const float* fc1_bias;
  const void* fc2_weight;
  const float* fc2_bias;
  const float* gamma;
  const float* drop_scale;
  void* dx;
  float* dfc1_weight;
  float* dfc1_bias;
  float* dfc2_weight;
  float* dfc2_bias;
  float* dgamma;
  void* workspace;
  int64_t rows;
  int64_t rows_per_sample;
  int64_t C;
  bool vec_loads;
};

inline int64_t tiles_m_of(int64_t rows) { return ceil_div(rows, GemmConfig<float>::kBlockM); }

// K splits of the weight-gradient GEMMs (C x 4C and 4C x C outputs, K = rows). Shape-only.
inline int64_t weight_grad_splits(int64_t rows, int64_t C, int64_t elem_bytes) {
  const int64_t tiles = ceil_div(C, GemmConfig<float>::kBlockM) * ceil_div(4 * C, GemmConfig<float>::kBlockN);
  const int64_t k_tile = 64 / elem_bytes;
  const int64_t max_splits = std::max<int64_t>(1, rows / (kSplitMinKTiles * k_tile));
  return std::max<int64_t>(1, std::min<int64_t>({ceil_div(kSplitTargetCtas, tiles), max_splits, 65535}));
}

struct FwdWorkspace {
  void* hidden;
  int64_t bytes;
  FwdWorkspace(void* base, int64_t rows, int64_t C, int64_t elem_bytes) {
    WorkspaceCarver carve(base);
    hidden = carve.take<char>(rows * 4 * C * elem_bytes);
    bytes = carve.offset;
  }
};

inline int64_t dys_tiles_of(int64_t rows) { return ceil_div(rows, kDysRowsPerTile); }

struct BwdWorkspace {
  void* preact;  // a, then da in place
  void* hidden;  // h
  void* dys;     // dy * s (used with a drop scale)
  void* dz;      // dys * gamma (used with gamma)
  float* dys_colsums;   // [dys_tiles][C]: S
  float* gelu_colsums;  // [tiles_m][4C]: db1
  float* dw2_partials;  // [splits][C][4C]: G
  float* dw1_partials;  // [splits][4C][C]
  int64_t splits;
  int64_t bytes;
  BwdWorkspace(void* base, int64_t rows, int64_t C, int64_t elem_bytes) {
    const int64_t tiles_m = tiles_m_of(rows);
    splits = weight_grad_splits(rows, C, elem_bytes);
    WorkspaceCarver carve(base);
    preact = carve.take<char>(rows * 4 * C * elem_bytes);
    hidden = carve.take<char>(rows * 4 * C * elem_bytes);
    dys = carve.take<char>(rows * C * elem_bytes);
    dz = carve.take<char>(rows * C * elem_bytes);
    dys_colsums = carve.take<float>(dys_tiles_of(rows) * C);
    gelu_colsums = carve.take<float>(tiles_m * 4 * C);
    dw2_partials = carve.take<float>(splits * 4 * C * C);
    dw1_partials = carve.take<float>(splits * 4 * C * C);
    bytes = carve.offset;
  }
};

// Calls f(std::integral_constant<MathMode, mode>) with the mode for T, allow_tf32 and use_wgmma
// (fp16 / bf16 on an sm_90a device: the caller checks the device).
template <typename T, typename F>
inline void with_math_mode(bool allow_tf32, bool use_wgmma, F&& f) {
  if constexpr (sizeof(T) == 2) {
    if (use_wgmma) {
      f(std::integral_constant<MathMode, MathMode::kWgmma16>{});
    } else {
      f(std::integral_constant<MathMode, MathMode::kMma16>{});
    }
  } else if (allow_tf32) {
    f(std::integral_constant<MathMode, MathMode::kMmaTf32>{});
  } else {
    f(std::integral_constant<MathMode, MathMode::kFfma>{});
  }
}

constexpr bool kKMajor = true;    // operand layout tags for launch_gemm<..., A, B, ...>
constexpr bool kMNMajor = false;

template <typename T>
void run_fwd(const FwdArgs& a, bool allow_tf32, bool use_wgmma, cudaStream_t stream) {
  const int64_t M = a.rows, C = a.C, C4 = 4 * C;
  FwdWorkspace ws(a.workspace, M, C, sizeof(T));
  T* hidden = static_cast<T*>(ws.hidden);
  with_math_mode<T>(allow_tf32, use_wgmma, [&](auto mode) {
    constexpr MathMode kMode = decltype(mode)::value;
    // hidden = gelu(x W1^T + b1)
    GemmProblem p1{M, C4, C, a.x, C, a.fc1_weight, C, 0, 0, a.vec_loads};
    launch_gemm<T, kMode, kKMajor, kKMajor>(p1, 1, EpilogueBiasGelu<T, false>{hidden, nullptr, a.fc1_bias, C4},
                                            stream);
    // y = shortcut + s * gamma * (hidden W2^T + b2)
    GemmProblem p2{M, C, C4, hidden, C4, a.fc2_weight, C4, 0, 0, a.vec_loads};
    EpilogueResidualLayerScale<T> e2{static_cast<T*>(a.y), static_cast<const T*>(a.shortcut), a.fc2_bias, a.gamma,
                                     a.drop_scale, C, a.rows_per_sample};
    launch_gemm<T, kMode, kKMajor, kKMajor>(p2, 1, e2, stream);
  });
}

template <typename T>
void run_bwd(const BwdArgs& a, bool allow_tf32, bool use_wgmma, cudaStream_t stream) {
  const int64_t M = a.rows, C = a.C, C4 = 4 * C;
  const int64_t tiles_m = tiles_m_of(M);
  BwdWorkspace ws(a.workspace, M, C, sizeof(T));
  T* preact = static_cast<T*>(ws.preact);
  T* hidden = static_cast<T*>(ws.hidden);
  const T* dy = static_cast<const T*>(a.dy);
  const bool has_gamma = a.gamma != nullptr, has_drop = a.drop_scale != nullptr;
  // dys is dy itself without a drop scale; dz is dys itself without gamma.
  const T* dys = has_drop ? static_cast<const T*>(ws.dys) : dy;
  const T* dz = has_gamma ? static_cast<const T*>(ws.dz) : dys;
  with_math_mode<T>(allow_tf32, use_wgmma, [&](auto mode) {
    constexpr MathMode kMode = decltype(mode)::value;
    // 1. a = x W1^T + b1, h = gelu(a)
    GemmProblem p1{M, C4, C, a.x, C, a.fc1_weight, C, 0, 0, a.vec_loads};
    launch_gemm<T, kMode, kKMajor, kKMajor>(p1, 1, EpilogueBiasGelu<T, true>{hidden, preact, a.fc1_bias, C4},
                                            stream);
    // 2. dys, dz and the column sums of dys
    const int64_t dys_tiles = dys_tiles_of(M);
    const int64_t channel_blocks = ceil_div(C, kDysThreads);
    if (dys_tiles > std::numeric_limits<int>::max() || channel_blocks > 65535) {
      throw std::invalid_argument("mlp_layerscale: problem too large for the launch grid");
    }
    CNK_BOOL_SWITCH(has_gamma, kHasGamma, [&] {
      CNK_BOOL_SWITCH(has_drop, kHasDropScale, [&] {
        auto dys_kernel = mlp_layerscale_dys_kernel<T, kHasGamma, kHasDropScale>;
        const dim3 dys_grid(static_cast<unsigned>(dys_tiles), static_cast<unsigned>(channel_blocks));
        CNK_LAUNCH(dys_kernel, dys_grid, kDysThreads, 0, stream)(dy, a.gamma, a.drop_scale, static_cast<T*>(ws.dys),
                                                                 static_cast<T*>(ws.dz), ws.dys_colsums, M, C,
                                                                 a.rows_per_sample);
        CNK_CHECK_LAUNCH("mlp_layerscale_dys_kernel");
      });
    });
    // 3. G partials = dys^T h   (C x 4C, K = rows)
    GemmProblem p3{C, C4, M, dys, C, hidden, C4, 0, 0, a.vec_loads && is_aligned(dys, 16)};
    launch_gemm<T, kMode, kMNMajor, kMNMajor>(p3, ws.splits, EpilogueStoreSplitPartial{ws.dw2_partials, C4, C * C4},
                                              stream);
    // 4. da = (dz W2) * gelu'(a), over a; db1 column sums
    GemmProblem p4{M, C4, C, dz, C, a.fc2_weight, C4, 0, 0, a.vec_loads && is_aligned(dz, 16)};
    launch_gemm<T, kMode, kKMajor, kMNMajor>(p4, 1, EpilogueGeluGrad<T>{preact, preact, C4, {ws.gelu_colsums, nullptr}},
                                             stream);
    // 5. dW1 partials = da^T x   (4C x C, K = rows)
    GemmProblem p5{C4, C, M, preact, C4, a.x, C, 0, 0, a.vec_loads};
    launch_gemm<T, kMode, kMNMajor, kMNMajor>(p5, ws.splits, EpilogueStoreSplitPartial{ws.dw1_partials, C, C4 * C},
                                              stream);
    // 6. dx = da W1
    GemmProblem p6{M, C, C4, preact, C4, a.fc1_weight, C, 0, 0, a.vec_loads};
    launch_gemm<T, kMode, kKMajor, kMNMajor>(p6, 1, EpilogueStore<T>{static_cast<T*>(a.dx), C}, stream);
  });
  // 7. deterministic sums of the partials: dW1, G (into dfc2_weight), db1, S (into dfc2_bias)
  PartialSumBatch batch;
  batch.add(ws.dw1_partials, a.dfc1_weight, C4 * C, ws.splits, C4 * C);
  batch.add(ws.dw2_partials, a.dfc2_weight, C * C4, ws.splits, C * C4);
  batch.add(ws.gelu_colsums, a.dfc1_bias, C4, tiles_m, C4);
  batch.add(ws.dys_colsums, a.dfc2_bias, C, dys_tiles_of(M), C);
  launch_reduce_partials(batch, stream);
  // 8. dgamma; G -> dW2 and S -> db2
  auto gamma_grad_kernel = mlp_layerscale_gamma_grad_kernel<T>;
  CNK_LAUNCH(gamma_grad_kernel, static_cast<unsigned>(ceil_div(C, kLayerScaleWarps)), kLayerScaleWarps * 32, 0,
             stream)(static_cast<const T*>(a.fc2_weight), a.fc2_bias, a.gamma, a.dfc2_weight, a.dfc2_bias, a.dgamma,
                     C, C4);
  CNK_CHECK_LAUNCH("mlp_layerscale_gamma_grad_kernel");
}

extern template void run_fwd<float>(const FwdArgs&, bool, bool, cudaStream_t);
extern template void run_fwd<__half>(const FwdArgs&, bool, bool, cudaStream_t);
extern template void run_fwd<__nv_bfloat16>(const FwdArgs&, bool, bool, cudaStream_t);
extern template void run_bwd<float>(const BwdArgs&, bool, bool, cudaStream_t);
extern template void run_bwd<__half>(const BwdArgs&, bool, bool, cudaStream_t);
extern template void run_bwd<__nv_bfloat16>(const BwdArgs&, bool, bool, cudaStream_t);

}  // namespace mlp
}  // namespace cuda
}  // namespace convnext_kernels
