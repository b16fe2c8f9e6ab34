// A tiled tensor-core GEMM with fused epilogues, for the mlp_layerscale kernels.
//
//   out[m][n] = epilogue( sum_k A(m, k) * B(k, n) )    fp32 accumulation
//
// A is either K-major (A[m * lda + k], activations) or M-major (A[k * lda + m], the transposed
// activations of a weight gradient); B is either K-major (B[n * ldb + k], nn.Linear weights as
// stored) or N-major (B[k * ldb + n]). Shared-memory tiles keep the global layout (cp.async copies
// 16-byte chunks verbatim, padded rows avoid bank conflicts), and fragments are read with
// ldmatrix / ldmatrix.trans for 16-bit types, with scalar shared loads for fp32.
//
// Math modes: m16n8k16 mma.sync for fp16/bf16; m16n8k8 tf32 mma.sync for fp32 when TF32 is
// allowed; otherwise an exact fp32 FFMA path that computes the same per-thread fragment layout
// as the mma (so tiles, pipeline and epilogues are shared).
//
// blockIdx.x enumerates (m tile, n tile) with n fastest (CTAs that run together share the A
// tile in L2), blockIdx.z is the K split (weight gradients: K = all rows, split into chunks
// whose fp32 partials are reduced deterministically afterwards).
#pragma once

#include <limits>
#include <type_traits>

#include "cuda_utils.cuh"

namespace convnext_kernels {
namespace cuda {
namespace mlp {

enum class MathMode { kMma16, kMmaTf32, kFfma };

template <typename T>
struct GemmConfig {
  static constexpr int kBlockM = 128;                        // CTA tile rows
  static constexpr int kBlockN = 128;                        // CTA tile columns
  static constexpr int kStages = 3;                          // cp.async pipeline depth
  static constexpr int kWarpsM = 2;                          // warp grid over the CTA tile
  static constexpr int kWarpsN = 4;
  static constexpr int kThreads = kWarpsM * kWarpsN * 32;    // 256
  static constexpr int kMinBlocksPerSm = 2;                  // caps at 128 registers: 2 CTAs (16 warps) per SM; 1 = no spills but 8 warps/SM
  static constexpr int kWarpTileM = kBlockM / kWarpsM;       // 64
  static constexpr int kWarpTileN = kBlockN / kWarpsN;       // 32
  static constexpr int kMmaM = 16;                           // mma tile: 16 x 8 outputs
  static constexpr int kMmaN = 8;
  static constexpr int kFragsM = kWarpTileM / kMmaM;         // 4
  static constexpr int kFragsN = kWarpTileN / kMmaN;         // 4
  static constexpr int kChunkElems = 16 / int(sizeof(T));    // elements per 16-byte cp.async
  // Row padding, in elements: 16 bytes for K-major tiles (row stride 80 B: 8 consecutive rows
  // hit 8 distinct 16-byte bank groups), 8 elements for MN-major tiles (stride 272 B / 544 B).
  static constexpr int kPadKMajor = kChunkElems;
  static constexpr int kPadMNMajor = 8;
};

// 64 bytes of K per row per stage: 32 halves or 16 floats.
template <typename T>
constexpr int block_k() { return 64 / int(sizeof(T)); }

// Offset of element (mn, k) of a shared-memory tile stored K-major ([mn][k], rows kStride apart)
// or MN-major ([k][mn]).
template <bool kKMajor, int kStride>
__device__ __forceinline__ int smem_offset(int mn, int k) { return kKMajor ? mn * kStride + k : k * kStride + mn; }

template <typename T, bool kKMajor, int kRows>
struct SmemTile {
  static constexpr int kBlockK = block_k<T>();
  // K-major: [kRows][kBlockK + pad]; MN-major: [kBlockK][kRows + pad].
  static constexpr int kStride = kKMajor ? kBlockK + GemmConfig<T>::kPadKMajor : kRows + GemmConfig<T>::kPadMNMajor;
  static constexpr int kElems = kKMajor ? kRows * kStride : kBlockK * kStride;
  __device__ static __forceinline__ int offset(int mn, int k) { return smem_offset<kKMajor, kStride>(mn, k); }
};

// ------------------------------------------------------------------------------------------------
// PTX wrappers (the emulation build runs the same operations on the host: cuda_emulation.h)
// ------------------------------------------------------------------------------------------------
#ifdef CNK_CUDA_EMULATION
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  ::cnk_emu::cp_async_16(smem, gmem, valid);
}
__device__ __forceinline__ void cp_async_commit() { ::cnk_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { ::cnk_emu::cp_async_wait(N); }
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { ::cnk_emu::ldmatrix_x4(r, smem, false); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  ::cnk_emu::ldmatrix_x4(r, smem, true);
}
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ::cnk_emu::mma(std::is_same_v<T, __half> ? ::cnk_emu::MmaKind::kF16 : ::cnk_emu::MmaKind::kBF16, d, a, b0, b1);
}
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ::cnk_emu::mma(::cnk_emu::MmaKind::kTF32, d, a, b0, b1);
}
__device__ __forceinline__ uint32_t to_tf32(float v) {
  // cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits (finite values).
  const uint32_t u = ::cnk_emu::float_bits(v);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;
  return (u + 0x1000u) & 0xffffe000u;
}
#else
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0: zero-fill (out-of-range rows / columns)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return r;
}
#endif  // CNK_CUDA_EMULATION

// ------------------------------------------------------------------------------------------------
// Problem description
// ------------------------------------------------------------------------------------------------
struct GemmProblem {
  int64_t M, N, K;        // output M x N, reduction length K
  const void* A;          // K-major: A[m * lda + k]; M-major: A[k * lda + m]
  int64_t lda;
  const void* B;          // K-major: B[n * ldb + k]; N-major: B[k * ldb + n]
  int64_t ldb;
  int64_t k_chunk;        // K range of one blockIdx.z (multiple of the CTA's K tile)
  int tiles_n;            // CTA tiles along N
  bool vec_loads;         // 16-byte cp.async allowed (contiguous extents multiples of 16 B, aligned)
};

// Copies one operand tile (kRows along M or N, kBlockK along K) of the current K step into smem.
// Out-of-range elements are zero-filled, so they add nothing to the accumulators.
template <typename T, bool kKMajor, int kRows>
__device__ __forceinline__ void load_operand_tile(T* smem, const T* __restrict__ g, int64_t ld, int64_t mn0,
                                                  int64_t mn_end, int64_t k0, int64_t k_end, bool vec_loads) {
  using Tile = SmemTile<T, kKMajor, kRows>;
  using Cfg = GemmConfig<T>;
  constexpr int kBlockK = Tile::kBlockK;
  constexpr int kChunk = Cfg::kChunkElems;
  // Chunks run along the contiguous dimension: K for K-major, M/N for MN-major.
  constexpr int kContig = kKMajor ? kBlockK : kRows;
  constexpr int kStrided = kKMajor ? kRows : kBlockK;
  constexpr int kChunksPerLine = kContig / kChunk;
  constexpr int kChunks = kChunksPerLine * kStrided;
  static_assert(kChunks % Cfg::kThreads == 0, "tile chunks must divide evenly over the threads");
  if (vec_loads) {
#pragma unroll
    for (int i = 0; i < kChunks / Cfg::kThreads; ++i) {
      const int chunk = threadIdx.x + i * Cfg::kThreads;
      const int line = chunk / kChunksPerLine;
      const int within = (chunk % kChunksPerLine) * kChunk;
      const int mn = kKMajor ? line : within;
      const int k = kKMajor ? within : line;
      // The contiguous extent is a multiple of kChunk here, so a chunk is all in or all out.
      const bool valid = (mn0 + mn < mn_end) && (k0 + k < k_end);
      const T* src = valid ? (kKMajor ? g + (mn0 + mn) * ld + (k0 + k) : g + (k0 + k) * ld + (mn0 + mn)) : g;
      cp_async_16(smem + Tile::offset(mn, k), src, valid);
    }
  } else {
    // Any-alignment fallback: element-wise guarded loads (synchronous).
    for (int e = threadIdx.x; e < kContig * kStrided; e += Cfg::kThreads) {
      const int line = e / kContig;
      const int within = e % kContig;
      const int mn = kKMajor ? line : within;
      const int k = kKMajor ? within : line;
      const bool valid = (mn0 + mn < mn_end) && (k0 + k < k_end);
      T v = from_float<T>(0.0f);
      if (valid) v = kKMajor ? g[(mn0 + mn) * ld + (k0 + k)] : g[(k0 + k) * ld + (mn0 + mn)];
      smem[Tile::offset(mn, k)] = v;
    }
  }
}

// acc[fm][fn] += A[warp_m0 + 16 fm + (0..15)][0:kK] . B[warp_n0 + 8 fn + (0..7)][0:kK]^T with
// m16n8k16 mma.sync, A and B in shared memory K-major or MN-major (row strides kStrideA /
// kStrideB elements), fragments read with ldmatrix.x4 (.trans for MN-major). C-fragment layout:
// acc[fm][fn][i] is row warp_m0 + 16 fm + lane/4 + 8 (i/2), column warp_n0 + 8 fn + 2 (lane%4) + i%2.
// Used by the two-GEMM kernel (warp_mma_step) and the back-to-back fused forward.
template <typename T, int kFragsM, int kFragsN, int kK, bool kAKMajor, bool kBKMajor, int kStrideA, int kStrideB,
          int kUnrollK>
__device__ __forceinline__ void warp_mma16(const T* sA, const T* sB, int warp_m0, int warp_n0,
                                           float (&acc)[kFragsM][kFragsN][4]) {
  static_assert(sizeof(T) == 2, "m16n8k16 needs a 16-bit type");
  static_assert(kK % 16 == 0 && kFragsN % 2 == 0, "whole k16 steps, pairs of n8 fragments");
  const int lane = static_cast<int>(threadIdx.x) % 32;
  // Each lane's ldmatrix row address, as (mn, k) from the fragment origin. The four 8x8 matrices
  // of an x4 load are, for A: (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15),
  // i.e. a0..a3 of m16n8k16; for B: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
  // (n 8-15, k 8-15), i.e. b0, b1 of two n8 fragments. Lanes 8j..8j+7 address matrix j's rows:
  // along mn when K-major, along k when MN-major (.trans transposes each matrix on load).
  const int a_mn = kAKMajor ? lane % 16 : ((lane / 8) % 2) * 8;
  const int a_k = kAKMajor ? (lane / 16) * 8 : lane % 8 + (lane / 16) * 8;
  const int b_mn = kBKMajor ? (lane / 16) * 8 + lane % 8 : (lane / 16) * 8;
  const int b_k = kBKMajor ? ((lane / 8) % 2) * 8 : lane % 8 + ((lane / 8) % 2) * 8;
  const T* a_lane = sA + smem_offset<kAKMajor, kStrideA>(warp_m0 + a_mn, a_k);
  const T* b_lane = sB + smem_offset<kBKMajor, kStrideB>(warp_n0 + b_mn, b_k);
#pragma unroll kUnrollK
  for (int kk = 0; kk < kK; kk += 16) {
    uint32_t af[kFragsM][4];
    uint32_t bf[kFragsN][2];
#pragma unroll
    for (int fm = 0; fm < kFragsM; ++fm) {
      const T* p = a_lane + smem_offset<kAKMajor, kStrideA>(fm * 16, kk);
      if constexpr (kAKMajor) {
        ldmatrix_x4(af[fm], p);
      } else {
        ldmatrix_x4_trans(af[fm], p);
      }
    }
#pragma unroll
    for (int fp = 0; fp < kFragsN / 2; ++fp) {
      const T* p = b_lane + smem_offset<kBKMajor, kStrideB>(fp * 16, kk);
      uint32_t r[4];
      if constexpr (kBKMajor) {
        ldmatrix_x4(r, p);
      } else {
        ldmatrix_x4_trans(r, p);
      }
      bf[2 * fp][0] = r[0];
      bf[2 * fp][1] = r[1];
      bf[2 * fp + 1][0] = r[2];
      bf[2 * fp + 1][1] = r[3];
    }
#pragma unroll
    for (int fm = 0; fm < kFragsM; ++fm)
#pragma unroll
      for (int fn = 0; fn < kFragsN; ++fn) mma_m16n8k16<T>(acc[fm][fn], af[fm], bf[fn][0], bf[fn][1]);
  }
}

// One K step (kBlockK) of the warp's 64 x 32 tile: acc[fm][fn][i] in the mma C-fragment layout
// (row = fm*16 + lane/4 + 8*(i/2), col = fn*8 + 2*(lane%4) + i%2, relative to the warp tile).
template <typename T, MathMode kMode, bool kAKMajor, bool kBKMajor>
__device__ __forceinline__ void warp_mma_step(const T* sA, const T* sB, int warp_m0, int warp_n0,
                                              float (&acc)[GemmConfig<T>::kFragsM][GemmConfig<T>::kFragsN][4]) {
  using Cfg = GemmConfig<T>;
  using TileA = SmemTile<T, kAKMajor, Cfg::kBlockM>;
  using TileB = SmemTile<T, kBKMajor, Cfg::kBlockN>;
  constexpr int kBlockK = block_k<T>();
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;  // "group": row within an 8-row slab
  const int t = lane % 4;  // thread within the group

  if constexpr (kMode == MathMode::kMma16) {
    warp_mma16<T, Cfg::kFragsM, Cfg::kFragsN, kBlockK, kAKMajor, kBKMajor, TileA::kStride, TileB::kStride,
               kBlockK / 16>(sA, sB, warp_m0, warp_n0, acc);
  } else if constexpr (kMode == MathMode::kMmaTf32) {
    static_assert(sizeof(T) == 4, "tf32 mma needs fp32 data");
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += 8) {
      uint32_t af[Cfg::kFragsM][4];
      uint32_t bf[Cfg::kFragsN][2];
#pragma unroll
      for (int fm = 0; fm < Cfg::kFragsM; ++fm) {
        const int m = warp_m0 + fm * 16 + g;
        af[fm][0] = to_tf32(sA[TileA::offset(m, kk + t)]);
        af[fm][1] = to_tf32(sA[TileA::offset(m + 8, kk + t)]);
        af[fm][2] = to_tf32(sA[TileA::offset(m, kk + t + 4)]);
        af[fm][3] = to_tf32(sA[TileA::offset(m + 8, kk + t + 4)]);
      }
#pragma unroll
      for (int fn = 0; fn < Cfg::kFragsN; ++fn) {
        const int n = warp_n0 + fn * 8 + g;
        bf[fn][0] = to_tf32(sB[TileB::offset(n, kk + t)]);
        bf[fn][1] = to_tf32(sB[TileB::offset(n, kk + t + 4)]);
      }
#pragma unroll
      for (int fm = 0; fm < Cfg::kFragsM; ++fm)
#pragma unroll
        for (int fn = 0; fn < Cfg::kFragsN; ++fn) mma_m16n8k8_tf32(acc[fm][fn], af[fm], bf[fn][0], bf[fn][1]);
    }
  } else {
    static_assert(sizeof(T) == 4, "the FFMA path is for fp32 data");
#pragma unroll 4
    for (int k = 0; k < kBlockK; ++k) {
      float a[Cfg::kFragsM][2];
      float b[Cfg::kFragsN][2];
#pragma unroll
      for (int fm = 0; fm < Cfg::kFragsM; ++fm) {
        const int m = warp_m0 + fm * 16 + g;
        a[fm][0] = sA[TileA::offset(m, k)];
        a[fm][1] = sA[TileA::offset(m + 8, k)];
      }
#pragma unroll
      for (int fn = 0; fn < Cfg::kFragsN; ++fn) {
        const int n = warp_n0 + fn * 8 + 2 * t;
        b[fn][0] = sB[TileB::offset(n, k)];
        b[fn][1] = sB[TileB::offset(n + 1, k)];
      }
#pragma unroll
      for (int fm = 0; fm < Cfg::kFragsM; ++fm)
#pragma unroll
        for (int fn = 0; fn < Cfg::kFragsN; ++fn) {
          acc[fm][fn][0] = fmaf(a[fm][0], b[fn][0], acc[fm][fn][0]);
          acc[fm][fn][1] = fmaf(a[fm][0], b[fn][1], acc[fm][fn][1]);
          acc[fm][fn][2] = fmaf(a[fm][1], b[fn][0], acc[fm][fn][2]);
          acc[fm][fn][3] = fmaf(a[fm][1], b[fn][1], acc[fm][fn][3]);
        }
    }
  }
}

template <typename T, bool kAKMajor, bool kBKMajor>
constexpr std::size_t gemm_smem_bytes() {
  using Cfg = GemmConfig<T>;
  return static_cast<std::size_t>(Cfg::kStages) *
         (SmemTile<T, kAKMajor, Cfg::kBlockM>::kElems + SmemTile<T, kBKMajor, Cfg::kBlockN>::kElems) * sizeof(T);
}

// Epilogue interface: static constexpr int kColSums (0..2): how many per-column sums over the
// tile's rows the epilogue produces (bias / gamma gradients); operator()(row, col, v0, v1, has1,
// sums) handles out[row][col] = v0 and, when has1, out[row][col + 1] = v1, adding its
// contributions to sums[k][0 / 1]; colsum_out(k) is where the CTA writes its [tiles_m][N] row.
template <typename T, MathMode kMode, bool kAKMajor, bool kBKMajor, typename Epilogue>
__global__ void __launch_bounds__(GemmConfig<T>::kThreads, GemmConfig<T>::kMinBlocksPerSm) mlp_layerscale_gemm_kernel(GemmProblem prob, Epilogue epi) {
  using Cfg = GemmConfig<T>;
  using TileA = SmemTile<T, kAKMajor, Cfg::kBlockM>;
  using TileB = SmemTile<T, kBKMajor, Cfg::kBlockN>;
  constexpr int kBlockK = block_k<T>();
  static_assert(Cfg::kWarpTileM % Cfg::kMmaM == 0 && Cfg::kWarpTileN % (2 * Cfg::kMmaN) == 0, "warp tile shape");
  static_assert(kBlockK % 16 == 0, "K tile must hold whole mma K steps");
  static_assert(Epilogue::kColSums >= 0 && Epilogue::kColSums <= 2, "at most two column sums");
  static_assert(Cfg::kStages >= 2, "pipeline needs at least two stages");

  CNK_DYNAMIC_SMEM(float4, gemm_smem_raw);  // float4: 16-byte aligned for cp.async / ldmatrix
  T* smem_a = reinterpret_cast<T*>(gemm_smem_raw);
  T* smem_b = smem_a + Cfg::kStages * TileA::kElems;

  const int tile_m = blockIdx.x / prob.tiles_n;
  const int tile_n = blockIdx.x % prob.tiles_n;
  const int64_t m0 = static_cast<int64_t>(tile_m) * Cfg::kBlockM;
  const int64_t n0 = static_cast<int64_t>(tile_n) * Cfg::kBlockN;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * prob.k_chunk;
  const int64_t k_end = min(prob.K, k_begin + prob.k_chunk);
  const int num_k_tiles = k_end > k_begin ? static_cast<int>((k_end - k_begin + kBlockK - 1) / kBlockK) : 0;

  const T* A = static_cast<const T*>(prob.A);
  const T* B = static_cast<const T*>(prob.B);
  auto load_stage = [&](int stage, int k_tile) {
    const int64_t k0 = k_begin + static_cast<int64_t>(k_tile) * kBlockK;
    load_operand_tile<T, kAKMajor, Cfg::kBlockM>(smem_a + stage * TileA::kElems, A, prob.lda, m0, prob.M, k0, k_end,
                                                  prob.vec_loads);
    load_operand_tile<T, kBKMajor, Cfg::kBlockN>(smem_b + stage * TileB::kElems, B, prob.ldb, n0, prob.N, k0, k_end,
                                                  prob.vec_loads);
  };

  const int warp = threadIdx.x / 32;
  const int warp_m0 = (warp / Cfg::kWarpsN) * Cfg::kWarpTileM;
  const int warp_n0 = (warp % Cfg::kWarpsN) * Cfg::kWarpTileN;

  float acc[Cfg::kFragsM][Cfg::kFragsN][4];
#pragma unroll
  for (int fm = 0; fm < Cfg::kFragsM; ++fm)
#pragma unroll
    for (int fn = 0; fn < Cfg::kFragsN; ++fn)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[fm][fn][i] = 0.0f;

  // Prologue: stages 0 .. kStages-2 in flight (always commit, so group counting stays uniform).
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < num_k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < num_k_tiles; ++kt) {
    cp_async_wait<Cfg::kStages - 2>();  // tile kt has landed (for this thread)
    __syncthreads();                    // ... for all threads; and stage (kt-1) % kStages is free
    const int next = kt + Cfg::kStages - 1;
    if (next < num_k_tiles) load_stage(next % Cfg::kStages, next);
    cp_async_commit();
    const int stage = kt % Cfg::kStages;
    warp_mma_step<T, kMode, kAKMajor, kBKMajor>(smem_a + stage * TileA::kElems, smem_b + stage * TileB::kElems,
                                                 warp_m0, warp_n0, acc);
  }
  cp_async_wait<0>();
  __syncthreads();  // shared memory is reused below for the column sums

  // Epilogue. Rows beyond M contribute nothing to the column sums.
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  float colsum[2][Cfg::kFragsN][2];
#pragma unroll
  for (int k = 0; k < 2; ++k)
#pragma unroll
    for (int fn = 0; fn < Cfg::kFragsN; ++fn) colsum[k][fn][0] = colsum[k][fn][1] = 0.0f;

#pragma unroll
  for (int fm = 0; fm < Cfg::kFragsM; ++fm) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = m0 + warp_m0 + fm * 16 + g + half * 8;
      if (row >= prob.M) continue;
#pragma unroll
      for (int fn = 0; fn < Cfg::kFragsN; ++fn) {
        const int64_t col = n0 + warp_n0 + fn * 8 + 2 * t;
        if (col >= prob.N) continue;
        float sums[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
        epi(row, col, acc[fm][fn][2 * half], acc[fm][fn][2 * half + 1], col + 1 < prob.N, sums);
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          colsum[k][fn][0] += sums[k][0];
          colsum[k][fn][1] += sums[k][1];
        }
      }
    }
  }

  if constexpr (Epilogue::kColSums > 0) {
    // Fixed-order reduction: lanes sharing t (same columns) via xor shuffles, then the kWarpsM
    // warps of a column band in warp order through shared memory.
    float* red = reinterpret_cast<float*>(gemm_smem_raw);  // [kColSums][kWarpsM][kBlockN]
    const int warp_m = warp / Cfg::kWarpsN;
#pragma unroll
    for (int k = 0; k < Epilogue::kColSums; ++k) {
#pragma unroll
      for (int fn = 0; fn < Cfg::kFragsN; ++fn) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          float v = colsum[k][fn][j];
          v += __shfl_xor_sync(0xffffffffu, v, 4);
          v += __shfl_xor_sync(0xffffffffu, v, 8);
          v += __shfl_xor_sync(0xffffffffu, v, 16);
          if (g == 0) red[(k * Cfg::kWarpsM + warp_m) * Cfg::kBlockN + warp_n0 + fn * 8 + 2 * t + j] = v;
        }
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < Epilogue::kColSums * Cfg::kBlockN; e += Cfg::kThreads) {
      const int k = e / Cfg::kBlockN;
      const int cl = e % Cfg::kBlockN;
      const int64_t col = n0 + cl;
      if (col >= prob.N) continue;
      float s = 0.0f;
#pragma unroll
      for (int wm = 0; wm < Cfg::kWarpsM; ++wm) s += red[(k * Cfg::kWarpsM + wm) * Cfg::kBlockN + cl];
      epi.colsum_out(k)[static_cast<int64_t>(tile_m) * prob.N + col] = s;
    }
  }
}

// Host launch. splits > 1 divides K over blockIdx.z (the epilogue must write per-split partials).
template <typename T, MathMode kMode, bool kAKMajor, bool kBKMajor, typename Epilogue>
void launch_gemm(GemmProblem prob, int64_t splits, const Epilogue& epi, cudaStream_t stream) {
  using Cfg = GemmConfig<T>;
  constexpr int kBlockK = block_k<T>();
  const int64_t tiles_m = ceil_div(prob.M, Cfg::kBlockM);
  const int64_t tiles_n = ceil_div(prob.N, Cfg::kBlockN);
  if (tiles_m * tiles_n > std::numeric_limits<int>::max() || splits > 65535) {
    throw std::invalid_argument("mlp_layerscale: problem too large for the launch grid");
  }
  prob.tiles_n = static_cast<int>(tiles_n);
  prob.k_chunk = round_up(ceil_div(prob.K, splits), kBlockK);
  constexpr std::size_t smem = gemm_smem_bytes<T, kAKMajor, kBKMajor>();
  static_assert(smem >= sizeof(float) * 2 * Cfg::kWarpsM * Cfg::kBlockN, "column-sum scratch must fit");
  auto kernel = mlp_layerscale_gemm_kernel<T, kMode, kAKMajor, kBKMajor, Epilogue>;
  set_dynamic_smem(kernel, smem, "mlp_layerscale_gemm_kernel");
  const dim3 grid(static_cast<unsigned>(tiles_m * tiles_n), 1, static_cast<unsigned>(splits));
  CNK_LAUNCH(kernel, grid, Cfg::kThreads, smem, stream)(prob, epi);
  CNK_CHECK_LAUNCH("mlp_layerscale_gemm_kernel");
}

}  // namespace mlp
}  // namespace cuda
}  // namespace convnext_kernels
