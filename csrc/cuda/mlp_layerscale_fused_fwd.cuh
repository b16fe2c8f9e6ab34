// mlp_layerscale forward, back-to-back fused: the (rows x 4C) hidden never leaves the chip.
//
//   y = shortcut + s[n] * gamma * (gelu_erf(x W1^T + b1) W2^T + b2)      fp16 / bf16, fp32 accumulation
//
// For C <= 384, C % 8 == 0, 16-byte aligned activations / weights / gamma (see fused_fwd_eligible).
// Everything else takes the two-GEMM path of mlp_layerscale.cuh (run_fwd).
//
// One CTA owns kBlockM rows of x. Per CTA:
//
//   sX  <- x[m0 : m0+kBlockM, 0:C]                        (cp.async once; columns >= C and rows >= M zero)
//   acc2 = 0                                              (kBlockM x kCTile fp32, registers, all warps)
//   for each hidden chunk j of kBlockH columns (h0 = j * kBlockH):
//     acc1 = sX . sW1^T          sW1 = W1[h0 : h0+kBlockH, 0:C]     (K = kCTile)
//     sH   = dtype(gelu(acc1 + b1[h0 : h0+kBlockH]))               (registers -> shared memory)
//     acc2 += sH . sW2^T         sW2 = W2[0:C, h0 : h0+kBlockH]     (K = kBlockH)
//   y = shortcut + s * gamma * (acc2 + b2)                 (staged through shared memory in fp32 for
//                                                           16-byte loads of shortcut / stores of y)
//
// Pipeline: sW1 and sW2 are single buffers that are filled alternately, so each weight tile's
// cp.async overlaps the other GEMM (W2 chunk j lands during GEMM1 of chunk j, W1 chunk j+1 during
// GEMM2 of chunk j): a double-buffered stream of operand tiles in one W1 + one W2 tile of shared
// memory (a second W1 and W2 buffer would not fit for C = 384 on an A100: 164 KB today).
//
//   iteration j:  wait(W1 j) ; sync S1 ; issue W2 j ; GEMM1 j ; epilogue -> sH ;
//                 wait(W2 j) ; sync S2 ; issue W1 j+1 ; GEMM2 j
//   S1: W1 j (and sX) visible to all; every warp is past GEMM2 j-1, so sW2 and sH may be rewritten.
//   S2: sH and W2 j visible to all; every warp is past GEMM1 j, so sW1 may be rewritten.
//
// Fragments: mma.sync m16n8k16 (row.col), A and B both K-major in shared memory (x / hidden rows,
// nn.Linear weight rows), read with ldmatrix.x4 by warp_mma16 (mlp_gemm.cuh), as in the two-GEMM
// kernel. Rows are padded by 16 bytes (an odd number of 16-byte chunks per row: the 8 row
// addresses of one 8x8 ldmatrix matrix fall in 8 distinct bank groups, conflict-free).
#pragma once

#include "mlp_layerscale.cuh"

namespace convnext_kernels {
namespace cuda {
namespace mlp {

constexpr int kFusedMaxC = 384;  // largest C of the fused path (register budget of acc2)

// ------------------------------------------------------------------------------------------------
// Tile configuration, one per padded channel tile.
// ------------------------------------------------------------------------------------------------
template <int kCTile_, int kBlockM_, int kBlockH_, int kMinBlocksPerSm_>
struct FusedFwdConfig {
  static constexpr int kCTile = kCTile_;                      // channels, padded: GEMM1 K and GEMM2 N (C <= kCTile, tail masked)
  static constexpr int kBlockM = kBlockM_;                    // rows of x per CTA
  static constexpr int kBlockH = kBlockH_;                    // hidden columns per chunk: GEMM1 N and GEMM2 K
  static constexpr int kWarpTileM = 32;                       // rows per warp, both GEMMs (2 m16 fragments)
  static constexpr int kWarpsM = kBlockM / kWarpTileM;        // warp grid: rows
  static constexpr int kWarpsN = 8 / kWarpsM;                 // warp grid: columns (hidden chunk / channels)
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;     // 256
  static constexpr int kMinBlocksPerSm = kMinBlocksPerSm_;    // __launch_bounds__ occupancy hint (2: <= 128 registers)
  static constexpr int kUnrollK1 = 4;                         // GEMM1 k16 steps unrolled (K = kCTile; a full unroll lets the
                                                              //   ldmatrix prefetch take acc2's registers: 255 + spills)
  static constexpr int kUnrollK2 = 2;                         // GEMM2 k16 steps unrolled (K = kBlockH)

  // Derived shapes.
  static constexpr int kWarpTileH = kBlockH / kWarpsN;        // GEMM1 columns per warp
  static constexpr int kWarpTileC = kCTile / kWarpsN;         // GEMM2 columns per warp (acc2 slice)
  static constexpr int kFragsM = kWarpTileM / 16;             // m16 fragments per warp
  static constexpr int kFragsH = kWarpTileH / 8;              // n8 fragments per warp, GEMM1
  static constexpr int kFragsC = kWarpTileC / 8;              // n8 fragments per warp, GEMM2
  static constexpr int kChunk = 8;                            // elements per 16-byte cp.async / vector access

  // Shared memory, in elements of the 16-bit type (strides padded by one 16-byte chunk).
  static constexpr int kStrideX = kCTile + kChunk;            // sX [kBlockM][kStrideX], sW1 [kBlockH][kStrideX]
  static constexpr int kStrideH = kBlockH + kChunk;           // sH [kBlockM][kStrideH], sW2 [kCTile][kStrideH]
  static constexpr int kElemsX = kBlockM * kStrideX;
  static constexpr int kElemsW1 = kBlockH * kStrideX;
  static constexpr int kElemsW2 = kCTile * kStrideH;
  static constexpr int kElemsH = kBlockM * kStrideH;
  static constexpr int kMainBytes = 2 * (kElemsX + kElemsW1 + kElemsW2 + kElemsH);
  // Output staging after the loop (fp32, overlays the buffers above). kCTile % 32 == 0, so the
  // stride is 8 (mod 32) words: the float2 writes of a half-warp cover the 32 banks once.
  static constexpr int kStrideY = kCTile + 8;
  static constexpr int kStageBytes = 4 * kBlockM * kStrideY;
  static constexpr int kSmemBytes = kMainBytes > kStageBytes ? kMainBytes : kStageBytes;

  static_assert(kThreads == 256, "the fused kernel runs 8 warps");
  static_assert(kBlockM % kWarpTileM == 0 && kWarpsM * kWarpsN == 8, "warp grid must tile the CTA rows");
  static_assert(kWarpTileM % 16 == 0, "warp rows: whole m16 fragments");
  static_assert(kWarpTileH % 16 == 0 && kWarpTileC % 16 == 0, "warp columns: pairs of n8 fragments (ldmatrix.x4 of B)");
  static_assert(kCTile % 32 == 0 && kCTile <= kFusedMaxC, "channel tile: multiple of 32 (K steps, cp.async split, staging banks)");
  static_assert(kBlockH % 16 == 0, "hidden chunk: whole k16 steps");
  static_assert((kStrideX / kChunk) % 2 == 1 && (kStrideH / kChunk) % 2 == 1,
                "row strides must be an odd number of 16-byte chunks (conflict-free ldmatrix)");
  static_assert(kFragsM * kFragsC * 4 <= 96, "acc2 register budget: at most 96 fp32 per thread");
  static_assert(kSmemBytes <= 166912, "must fit the sm_80 opt-in shared memory limit (163 KB)");
};

// The instantiated configurations (per dtype), measured with ptxas -v (CUDA 13.0, fp16; bf16 within
// a few registers), 0 spills each; smem = dynamic shared memory per CTA:
//                             kCTile kBlockM kBlockH minCTAs/SM    regs sm_80/sm_90a  acc2/thread  smem
using FusedCfg64 = FusedFwdConfig<64, 128, 32, 2>;     //  116 / 121            32      38 KB
using FusedCfg96 = FusedFwdConfig<96, 128, 32, 2>;     //  118 / 117            48      52 KB
using FusedCfg128 = FusedFwdConfig<128, 128, 64, 1>;   //  150 / 151                64      87 KB
using FusedCfg192 = FusedFwdConfig<192, 128, 64, 1>;   //  208 / 207            96     120 KB
using FusedCfg256 = FusedFwdConfig<256, 64, 64, 1>;    //  137 / 136            64     111 KB
using FusedCfg384 = FusedFwdConfig<384, 64, 64, 1>;    //  185 / 184            96     161 KB
// kBlockH = 32 for the small tiles keeps acc1 at 16 registers so that two CTAs (16 warps) fit
// per SM without spills; with kCTile >= 128 one CTA per SM holds acc2 + acc1 = up to 112 fp32.

// Calls f(Cfg{}) with the smallest channel tile >= C (C in [1, kFusedMaxC]); chosen once per launch.
template <typename F>
inline decltype(auto) with_fused_config(int64_t C, F&& f) {
  if (C <= 64) return f(FusedCfg64{});
  if (C <= 96) return f(FusedCfg96{});
  if (C <= 128) return f(FusedCfg128{});
  if (C <= 192) return f(FusedCfg192{});
  if (C <= 256) return f(FusedCfg256{});
  return f(FusedCfg384{});
}

inline std::size_t fused_fwd_smem_bytes(int64_t C) {
  return with_fused_config(C, [](auto cfg) { return static_cast<std::size_t>(decltype(cfg)::kSmemBytes); });
}

// Host-side eligibility: shapes, 16-bit dtype, 16-byte alignment of everything read or written
// with 16-byte accesses, and the device's opt-in shared memory. Otherwise: two-GEMM path.
inline bool fused_fwd_eligible(const FwdArgs& a, int64_t elem_bytes) {
  if (elem_bytes != 2) return false;                   // fp32 stays on the two-GEMM path
  if (a.C % 8 != 0 || a.C < 8 || a.C > kFusedMaxC) return false;
  for (const void* p : {a.x, a.shortcut, a.fc1_weight, a.fc2_weight, static_cast<const void*>(a.y)})
    if (!is_aligned(p, 16)) return false;
  if (a.gamma != nullptr && !is_aligned(a.gamma, 16)) return false;  // read as float4
  int device = 0, optin = 0;
  CNK_CUDA_CHECK(cudaGetDevice(&device));
  CNK_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return fused_fwd_smem_bytes(a.C) <= static_cast<std::size_t>(optin);  // e.g. sm_86 / sm_89: 99 KB
}

// ------------------------------------------------------------------------------------------------
// Device helpers
// ------------------------------------------------------------------------------------------------

// cp.async of a kRows x kCols tile: global g (tile origin, row stride ld elements) -> shared s,
// laid out as SmemTile<T, K-major, kRows, kCanonical, kCols>: padded rows [kRows][kCols + 8] for the
// mma kernel, wgmma's canonical core matrices for the wgmma kernel (8 consecutive threads fill one
// 128-byte core matrix: conflict-free 16-byte stores). Rows >= rows_valid and columns >= cols_valid
// are zero-filled (cols_valid is a multiple of 8, so a 16-byte chunk is entirely in or entirely out).
template <typename T, int kRows, int kCols, bool kCanonical, int kThreads>
__device__ __forceinline__ void fused_copy_tile(T* s, const T* __restrict__ g, int64_t ld, int rows_valid,
                                                int cols_valid) {
  using Tile = SmemTile<T, true, kRows, kCanonical, kCols>;
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kCols % 8 == 0 && kRows % 8 == 0, "whole 16-byte chunks per row, whole core matrices");
  // Not unrolled: the per-chunk addresses are loop-invariant across hidden chunks, and an
  // unrolled copy lets the compiler keep all of them live in registers next to acc2.
#pragma unroll 1
  for (int chunk = static_cast<int>(threadIdx.x); chunk < kChunks; chunk += kThreads) {
    int row, col;
    Tile::chunk_origin(chunk, row, col);
    const bool valid = row < rows_valid && col < cols_valid;
    const T* src = valid ? g + static_cast<int64_t>(row) * ld + col : g;  // not read when !valid
    cp_async_16(s + Tile::offset(row, col), src, valid);
  }
}

// y = shortcut + s * gamma * z for the CTA's rows, z = acc2 + b2 staged in fp32 in sY[row][col]
// (row stride Cfg::kStrideY): 8 channels per thread and step, 16-byte loads / stores.
template <typename T, typename Cfg>
__device__ __forceinline__ void fused_store_output(const FwdArgs& a, const float* sY, int64_t m0, int rows_here) {
  constexpr int kChunksPerRow = Cfg::kCTile / 8;
  static_assert((Cfg::kBlockM * kChunksPerRow) % Cfg::kThreads == 0, "output chunks must divide evenly over the threads");
  const int C = static_cast<int>(a.C);
  const T* shortcut = static_cast<const T*>(a.shortcut);
  T* y = static_cast<T*>(a.y);
#pragma unroll 4
  for (int i = 0; i < Cfg::kBlockM * kChunksPerRow / Cfg::kThreads; ++i) {
    const int chunk = static_cast<int>(threadIdx.x) + i * Cfg::kThreads;
    const int row = chunk / kChunksPerRow;
    const int col = (chunk % kChunksPerRow) * 8;
    if (row >= rows_here || col >= C) continue;
    const int64_t grow = m0 + row;
    const int64_t off = grow * C + col;
    float z[8], r[8], gm[8], out[8];
    load_f32<8>(sY + row * Cfg::kStrideY + col, z);
    load_as_float<T, 8>(shortcut + off, r);
    if (a.gamma != nullptr) {
      load_f32<8>(a.gamma + col, gm);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) gm[e] = 1.0f;
    }
    const float s = a.drop_scale != nullptr ? a.drop_scale[grow / a.rows_per_sample] : 1.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = fmaf(s * gm[e], z[e], r[e]);
    store_from_float<T, 8>(y + off, out);
  }
}

// ------------------------------------------------------------------------------------------------
// The kernel
// ------------------------------------------------------------------------------------------------
template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocksPerSm)
    mlp_layerscale_fused_fwd_kernel(FwdArgs a) {
  static_assert(sizeof(T) == 2, "fused forward: fp16 / bf16 only");
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kBlockH = Cfg::kBlockH;
  constexpr int kCTile = Cfg::kCTile;
  constexpr int kThreads = Cfg::kThreads;

  CNK_DYNAMIC_SMEM(float4, fused_smem_raw);  // float4: 16-byte aligned for cp.async / ldmatrix
  T* sX = reinterpret_cast<T*>(fused_smem_raw);
  T* sW1 = sX + Cfg::kElemsX;
  T* sW2 = sW1 + Cfg::kElemsW1;
  T* sH = sW2 + Cfg::kElemsW2;

  const int C = static_cast<int>(a.C);  // <= kFusedMaxC
  const int H4 = 4 * C;                 // hidden width, a multiple of 32
  const int64_t M = a.rows;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int rows_here = M - m0 < kBlockM ? static_cast<int>(M - m0) : kBlockM;  // rows of x in this tile
  const T* x = static_cast<const T*>(a.x);
  const T* w1 = static_cast<const T*>(a.fc1_weight);  // (4C, C)
  const T* w2 = static_cast<const T*>(a.fc2_weight);  // (C, 4C)

  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4;  // C fragment: row within an 8-row slab
  const int t = lane % 4;  // C fragment: column pair
  const int warp_m0 = (warp / Cfg::kWarpsN) * Cfg::kWarpTileM;  // same rows in both GEMMs
  const int warp_h0 = (warp % Cfg::kWarpsN) * Cfg::kWarpTileH;  // GEMM1 columns within the chunk
  const int warp_c0 = (warp % Cfg::kWarpsN) * Cfg::kWarpTileC;  // GEMM2 columns (channels)

  // Prologue: x tile and W1 chunk 0, one group.
  fused_copy_tile<T, kBlockM, kCTile, false, kThreads>(sX, x + m0 * C, C, rows_here, C);
  fused_copy_tile<T, kBlockH, kCTile, false, kThreads>(sW1, w1, C, H4, C);
  cp_async_commit();

  float acc2[Cfg::kFragsM][Cfg::kFragsC][4];
#pragma unroll
  for (int fm = 0; fm < Cfg::kFragsM; ++fm)
#pragma unroll
    for (int fn = 0; fn < Cfg::kFragsC; ++fn)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc2[fm][fn][i] = 0.0f;

  const int num_chunks = (H4 + kBlockH - 1) / kBlockH;
  for (int j = 0; j < num_chunks; ++j) {
    const int h0 = j * kBlockH;
    const int h_valid = H4 - h0;  // hidden columns of this chunk that exist (> 0, a multiple of 32)

    cp_async_wait<0>();  // W1 chunk j (and, for j == 0, sX) has landed for this thread
    __syncthreads();     // S1 (see the header comment)
    // W2[0:C, h0 : h0+kBlockH] -> sW2[n][k]: row n = output channel, k = hidden column.
    fused_copy_tile<T, kCTile, kBlockH, false, kThreads>(sW2, w2 + h0, H4, C, h_valid);
    cp_async_commit();

    // GEMM1: acc1 = x_tile . W1_chunk^T over K = kCTile (padded channels are zero on both sides).
    float acc1[Cfg::kFragsM][Cfg::kFragsH][4];
#pragma unroll
    for (int fm = 0; fm < Cfg::kFragsM; ++fm)
#pragma unroll
      for (int fn = 0; fn < Cfg::kFragsH; ++fn)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc1[fm][fn][i] = 0.0f;
    warp_mma16<T, Cfg::kFragsM, Cfg::kFragsH, kCTile, kKMajor, kKMajor, Cfg::kStrideX, Cfg::kStrideX, Cfg::kUnrollK1>(
        sX, sW1, warp_m0, warp_h0, acc1);

    // Epilogue 1: h = gelu(acc1 + b1) in the activation dtype -> sH (the A operand of GEMM2).
    // Hidden columns >= 4C (only in the last chunk) get bias 0: acc1 is 0 there (zero-filled W1
    // rows), so h = gelu(0) = 0; their W2 columns are zero-filled as well.
#pragma unroll
    for (int fn = 0; fn < Cfg::kFragsH; ++fn) {
      const int hc = warp_h0 + fn * 8 + 2 * t;  // column within the chunk (even; hc + 1 shares validity)
      const bool ok = hc < h_valid;
      const float bias0 = ok ? a.fc1_bias[h0 + hc] : 0.0f;
      const float bias1 = ok ? a.fc1_bias[h0 + hc + 1] : 0.0f;
#pragma unroll
      for (int fm = 0; fm < Cfg::kFragsM; ++fm) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = warp_m0 + fm * 16 + g + 8 * half;
          store_pair(sH + row * Cfg::kStrideH + hc, gelu_erf(acc1[fm][fn][2 * half] + bias0),
                     gelu_erf(acc1[fm][fn][2 * half + 1] + bias1), true);
        }
      }
    }

    cp_async_wait<0>();  // W2 chunk j has landed for this thread
    __syncthreads();     // S2
    if (j + 1 < num_chunks) {
      const int h1 = h0 + kBlockH;
      fused_copy_tile<T, kBlockH, kCTile, false, kThreads>(sW1, w1 + static_cast<int64_t>(h1) * C, C, H4 - h1, C);
    }
    cp_async_commit();  // possibly empty: group counting stays uniform

    // GEMM2: acc2 += h_chunk . W2_chunk^T over K = kBlockH.
    warp_mma16<T, Cfg::kFragsM, Cfg::kFragsC, kBlockH, kKMajor, kKMajor, Cfg::kStrideH, Cfg::kStrideH, Cfg::kUnrollK2>(
        sH, sW2, warp_m0, warp_c0, acc2);
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with sH / sW2: the staging buffer overlays them

  // Stage z = acc2 + b2 in fp32: sY[row][col], row < kBlockM, col < kCTile (columns >= C unused).
  float* sY = reinterpret_cast<float*>(fused_smem_raw);
#pragma unroll
  for (int fn = 0; fn < Cfg::kFragsC; ++fn) {
    const int col = warp_c0 + fn * 8 + 2 * t;  // even; C even, so col + 1 < C iff col < C
    const bool ok = col < C;
    const float bias0 = ok ? a.fc2_bias[col] : 0.0f;
    const float bias1 = ok ? a.fc2_bias[col + 1] : 0.0f;
#pragma unroll
    for (int fm = 0; fm < Cfg::kFragsM; ++fm) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = warp_m0 + fm * 16 + g + 8 * half;
        *reinterpret_cast<float2*>(sY + row * Cfg::kStrideY + col) =
            make_float2(acc2[fm][fn][2 * half] + bias0, acc2[fm][fn][2 * half + 1] + bias1);
      }
    }
  }
  __syncthreads();

  fused_store_output<T, Cfg>(a, sY, m0, rows_here);
}

// ------------------------------------------------------------------------------------------------
// The kernel on wgmma (sm_90a): the same tiles, loop and barriers as above. Both GEMMs read their
// operands from shared memory in wgmma's canonical K-major layout (sX, sW1, sW2 and sH), each
// warpgroup multiplying 64 rows; a GEMM's wgmma group is waited for before the next barrier, so
// S1 / S2 keep their meaning. fence.proxy.async before each barrier makes the cp.async landings and
// the sH stores (generic proxy) visible to wgmma (async proxy).
// ------------------------------------------------------------------------------------------------
template <typename Cfg>
struct FusedWgmmaShape {
  static constexpr int kWgM = Cfg::kBlockM / 64;      // warpgroups along the rows: 2 (128 rows) or 1 (64 rows)
  static constexpr int kWgN = 2 / kWgM;               // ... along the columns of both GEMMs
  static constexpr int kN1 = Cfg::kBlockH / kWgN;     // GEMM1 columns per warpgroup: one m64nNk16 per k16
  static constexpr int kN2 = Cfg::kCTile / kWgN;      // GEMM2 columns per warpgroup (acc2)
  static constexpr int kInstrN2 = kN2 % 128 == 0 ? 128 : kN2 % 64 == 0 ? 64 : 32;  // GEMM2 n per instruction
  static constexpr int kMainBytes = 2 * (Cfg::kBlockM * Cfg::kCTile + Cfg::kBlockH * Cfg::kCTile +
                                         Cfg::kCTile * Cfg::kBlockH + Cfg::kBlockM * Cfg::kBlockH);
  static constexpr int kSmemBytes = kMainBytes > Cfg::kStageBytes ? kMainBytes : Cfg::kStageBytes;
  static_assert(Cfg::kBlockM == 64 || Cfg::kBlockM == 128, "one or two warpgroups of 64 rows");
  static_assert(kN1 == 32 || kN1 == 64 || kN1 == 128, "GEMM1: an instantiated wgmma n");
  static_assert(kN2 % kInstrN2 == 0 && kN2 / 2 <= 96, "GEMM2: whole instructions; acc2 at most 96 fp32 per thread");
  static_assert(kSmemBytes <= Cfg::kSmemBytes, "no more shared memory than the mma kernel (its eligibility check)");
};

template <int kFrags>
__device__ __forceinline__ void fill_fragments(float (&acc)[kFrags][4], float v) {
#pragma unroll
  for (int j = 0; j < kFrags; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = v;
}

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocksPerSm)
    mlp_layerscale_fused_fwd_wgmma_kernel(FwdArgs a) {
  static_assert(sizeof(T) == 2, "fused forward: fp16 / bf16 only");
  using Shape = FusedWgmmaShape<Cfg>;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kBlockH = Cfg::kBlockH;
  constexpr int kCTile = Cfg::kCTile;
  constexpr int kThreads = Cfg::kThreads;
  using TileX = SmemTile<T, true, kBlockM, true, kCTile>;    // x rows, K = channels
  using TileW1 = SmemTile<T, true, kBlockH, true, kCTile>;   // W1 chunk rows (hidden), K = channels
  using TileW2 = SmemTile<T, true, kCTile, true, kBlockH>;   // W2 chunk rows (channels), K = hidden
  using TileH = SmemTile<T, true, kBlockM, true, kBlockH>;   // h rows, K = hidden

  CNK_DYNAMIC_SMEM(float4, fused_smem_raw);  // 16-byte aligned: cp.async, wgmma descriptors
  T* sX = reinterpret_cast<T*>(fused_smem_raw);
  T* sW1 = sX + TileX::kElems;
  T* sW2 = sW1 + TileW1::kElems;
  T* sH = sW2 + TileW2::kElems;

  const int C = static_cast<int>(a.C);  // <= kFusedMaxC
  const int H4 = 4 * C;
  const int64_t M = a.rows;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int rows_here = M - m0 < kBlockM ? static_cast<int>(M - m0) : kBlockM;
  const T* x = static_cast<const T*>(a.x);
  const T* w1 = static_cast<const T*>(a.fc1_weight);
  const T* w2 = static_cast<const T*>(a.fc2_weight);

  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int wg = warp / 4;
  const int wg_m = wg % Shape::kWgM;  // the warpgroup's 64 rows
  const int wg_n = wg / Shape::kWgM;  // ... and its share of each GEMM's columns
  const int row0 = 64 * wg_m;
  const int warp_row0 = row0 + 16 * (warp % 4);  // accumulator rows of this warp: + g, + g + 8
  const int h_col0 = wg_n * Shape::kN1;           // GEMM1 columns within the chunk
  const int c_col0 = wg_n * Shape::kN2;           // GEMM2 columns (channels)

  fused_copy_tile<T, kBlockM, kCTile, true, kThreads>(sX, x + m0 * C, C, rows_here, C);
  fused_copy_tile<T, kBlockH, kCTile, true, kThreads>(sW1, w1, C, H4, C);
  cp_async_commit();

  float acc2[Shape::kN2 / 8][4];
  fill_fragments(acc2, 0.0f);

  const int num_chunks = (H4 + kBlockH - 1) / kBlockH;
  for (int j = 0; j < num_chunks; ++j) {
    const int h0 = j * kBlockH;
    const int h_valid = H4 - h0;

    cp_async_wait<0>();
    fence_proxy_async_shared();
    __syncthreads();  // S1
    fused_copy_tile<T, kCTile, kBlockH, true, kThreads>(sW2, w2 + h0, H4, C, h_valid);
    cp_async_commit();

    float acc1[Shape::kN1 / 8][4];
    fill_fragments(acc1, 0.0f);
    warpgroup_gemm<T, TileX, TileW1, Shape::kN1, Shape::kN1, 0>(sX, row0, sW1, h_col0, acc1);

    // Epilogue 1: h = gelu(acc1 + b1) -> sH (see the mma kernel for the columns >= 4C).
#pragma unroll
    for (int fn = 0; fn < Shape::kN1 / 8; ++fn) {
      const int hc = h_col0 + fn * 8 + 2 * t;
      const bool ok = hc < h_valid;
      const float bias0 = ok ? a.fc1_bias[h0 + hc] : 0.0f;
      const float bias1 = ok ? a.fc1_bias[h0 + hc + 1] : 0.0f;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = warp_row0 + g + 8 * half;
        store_pair(sH + TileH::offset(row, hc), gelu_erf(acc1[fn][2 * half] + bias0),
                   gelu_erf(acc1[fn][2 * half + 1] + bias1), true);
      }
    }

    cp_async_wait<0>();
    fence_proxy_async_shared();  // this thread's sH stores and W2 landings, for wgmma
    __syncthreads();             // S2
    if (j + 1 < num_chunks) {
      const int h1 = h0 + kBlockH;
      fused_copy_tile<T, kBlockH, kCTile, true, kThreads>(sW1, w1 + static_cast<int64_t>(h1) * C, C, H4 - h1, C);
    }
    cp_async_commit();

    warpgroup_gemm<T, TileH, TileW2, Shape::kN2, Shape::kInstrN2, 0>(sH, row0, sW2, c_col0, acc2);
  }
  cp_async_wait<0>();
  __syncthreads();  // every warpgroup is done with the tiles: the staging buffer overlays them

  float* sY = reinterpret_cast<float*>(fused_smem_raw);
#pragma unroll
  for (int fn = 0; fn < Shape::kN2 / 8; ++fn) {
    const int col = c_col0 + fn * 8 + 2 * t;
    const bool ok = col < C;
    const float bias0 = ok ? a.fc2_bias[col] : 0.0f;
    const float bias1 = ok ? a.fc2_bias[col + 1] : 0.0f;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = warp_row0 + g + 8 * half;
      *reinterpret_cast<float2*>(sY + row * Cfg::kStrideY + col) =
          make_float2(acc2[fn][2 * half] + bias0, acc2[fn][2 * half + 1] + bias1);
    }
  }
  __syncthreads();
  fused_store_output<T, Cfg>(a, sY, m0, rows_here);
}

// ------------------------------------------------------------------------------------------------
// Host launch (the caller checked fused_fwd_eligible).
// ------------------------------------------------------------------------------------------------
template <typename T, typename Cfg>
void launch_fused_fwd(const FwdArgs& a, bool use_wgmma, cudaStream_t stream) {
  const int64_t blocks = ceil_div(a.rows, Cfg::kBlockM);
  if (blocks > std::numeric_limits<int>::max()) {
    throw std::invalid_argument("mlp_layerscale: problem too large for the launch grid");
  }
  if (use_wgmma) {
    constexpr int kSmem = FusedWgmmaShape<Cfg>::kSmemBytes;
    auto kernel = mlp_layerscale_fused_fwd_wgmma_kernel<T, Cfg>;
    set_dynamic_smem(kernel, kSmem, "mlp_layerscale_fused_fwd_wgmma_kernel");
    CNK_LAUNCH(kernel, static_cast<unsigned>(blocks), Cfg::kThreads, kSmem, stream)(a);
    CNK_CHECK_LAUNCH("mlp_layerscale_fused_fwd_wgmma_kernel");
    return;
  }
  auto kernel = mlp_layerscale_fused_fwd_kernel<T, Cfg>;
  set_dynamic_smem(kernel, Cfg::kSmemBytes, "mlp_layerscale_fused_fwd_kernel");
  CNK_LAUNCH(kernel, static_cast<unsigned>(blocks), Cfg::kThreads, Cfg::kSmemBytes, stream)(a);
  CNK_CHECK_LAUNCH("mlp_layerscale_fused_fwd_kernel");
}

// use_wgmma: the sm_90a kernel (the caller checked the device).
template <typename T>
void run_fused_fwd(const FwdArgs& a, bool use_wgmma, cudaStream_t stream) {
  with_fused_config(a.C, [&](auto cfg) { launch_fused_fwd<T, decltype(cfg)>(a, use_wgmma, stream); });
}

extern template void run_fused_fwd<__half>(const FwdArgs&, bool, cudaStream_t);
extern template void run_fused_fwd<__nv_bfloat16>(const FwdArgs&, bool, cudaStream_t);

}  // namespace mlp
}  // namespace cuda
}  // namespace convnext_kernels
