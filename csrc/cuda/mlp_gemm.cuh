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
// as the mma (so tiles, pipeline and epilogues are shared). On sm_90a, fp16/bf16 can instead use
// the warpgroup MMA (wgmma.mma_async m64n128k16, both operands read from shared memory): the two
// warpgroups of the CTA each take 64 rows x 128 columns, shared-memory tiles are stored in
// wgmma's no-swizzle core-matrix layout, and each warp's accumulators come out in the same
// C-fragment layout as the mma's (one 16-row band of 16 n8 fragments), so the epilogues are shared.
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

enum class MathMode { kMma16, kMmaTf32, kFfma, kWgmma16 };

template <typename T, MathMode kMode = MathMode::kMma16>
struct GemmConfig {
  static constexpr bool kWgmma = kMode == MathMode::kWgmma16;
  static constexpr int kBlockM = 128;                        // CTA tile rows
  static constexpr int kBlockN = 128;                        // CTA tile columns
  static constexpr int kPrefetch = 2;                        // K tiles in flight (cp.async) ahead of the math
  static constexpr int kStages = kWgmma ? 4 : 3;             // shared-memory stages: + the one being read (wgmma:
                                                             //   + the one the previous, still running, wgmma reads)
  static constexpr int kWarpsM = kWgmma ? 8 : 2;             // warp grid over the CTA tile (wgmma: warp w of
  static constexpr int kWarpsN = kWgmma ? 1 : 4;             //   warpgroup w/4 holds rows 16w..16w+15, all columns)
  static constexpr int kThreads = kWarpsM * kWarpsN * 32;    // 256
  static constexpr int kMinBlocksPerSm = 2;                  // caps at 128 registers: 2 CTAs (16 warps) per SM; 1 = no spills but 8 warps/SM
  static constexpr int kWarpTileM = kBlockM / kWarpsM;       // 64 (wgmma: 16)
  static constexpr int kWarpTileN = kBlockN / kWarpsN;       // 32 (wgmma: 128)
  static constexpr int kMmaM = 16;                           // mma tile: 16 x 8 outputs
  static constexpr int kMmaN = 8;
  static constexpr int kFragsM = kWarpTileM / kMmaM;         // 4 (wgmma: 1)
  static constexpr int kFragsN = kWarpTileN / kMmaN;         // 4 (wgmma: 16)
  static constexpr int kChunkElems = 16 / int(sizeof(T));    // elements per 16-byte cp.async
  // Row padding, in elements: 16 bytes for K-major tiles (row stride 80 B: 8 consecutive rows
  // hit 8 distinct 16-byte bank groups), 8 elements for MN-major tiles (stride 272 B / 544 B).
  static constexpr int kPadKMajor = kChunkElems;
  static constexpr int kPadMNMajor = 8;
};

// 64 bytes of K per row per stage: 32 halves or 16 floats. (wgmma: two m64n128k16 per warpgroup
// between waits. 128 bytes would make it four, but then ptxas spills 16-104 B in every wgmma
// kernel at the 128-register cap of 2 CTAs per SM, against 0-36 B now: to be timed on a GPU.)
template <typename T>
constexpr int block_k() { return 64 / int(sizeof(T)); }

// Offset of element (mn, k) of a shared-memory tile stored K-major ([mn][k], rows kStride apart)
// or MN-major ([k][mn]).
template <bool kKMajor, int kStride>
__device__ __forceinline__ int smem_offset(int mn, int k) { return kKMajor ? mn * kStride + k : k * kStride + mn; }

// kCanonical = false: the padded row layout the mma path reads with ldmatrix. true: wgmma's
// no-swizzle canonical layout (16-bit types): 8 x 8 "core matrices" of 128 contiguous bytes,
// K-major [mn/8][k/8][mn%8][k%8], MN-major [k/8][mn/8][k%8][mn%8]; a descriptor gives the byte
// distance between core matrices adjacent along K (LBO) and along M/N (SBO).
// kBlockK_: the tile's K extent (the GEMM kernel's K step; the fused forward's whole K).
template <typename T, bool kKMajor, int kRows, bool kCanonical = false, int kBlockK_ = block_k<T>()>
struct SmemTile {
  static constexpr bool kIsKMajor = kKMajor;
  static constexpr int kBlockK = kBlockK_;
  // Padded: K-major [kRows][kBlockK + pad], MN-major [kBlockK][kRows + pad].
  static constexpr int kStride = kKMajor ? kBlockK + GemmConfig<T>::kPadKMajor : kRows + GemmConfig<T>::kPadMNMajor;
  static constexpr int kElems = kCanonical ? kRows * kBlockK : kKMajor ? kRows * kStride : kBlockK * kStride;
  static constexpr int kCoreElems = 64;                                           // one 8 x 16-byte core matrix
  static constexpr int kKGroupStride = kKMajor ? kCoreElems : (kRows / 8) * kCoreElems;     // elements: LBO
  static constexpr int kMNGroupStride = kKMajor ? (kBlockK / 8) * kCoreElems : kCoreElems;  // elements: SBO
  static_assert(!kCanonical || (sizeof(T) == 2 && kRows % 8 == 0 && kBlockK % 16 == 0),
                "canonical layout: 16-bit elements, whole core matrices");
  __device__ static __forceinline__ int offset(int mn, int k) {
    if constexpr (kCanonical) {
      const int within = kKMajor ? (mn % 8) * 8 + k % 8 : (k % 8) * 8 + mn % 8;
      return (mn / 8) * kMNGroupStride + (k / 8) * kKGroupStride + within;
    } else {
      return smem_offset<kKMajor, kStride>(mn, k);
    }
  }
  // Tile position (mn, k) of 16-byte chunk `chunk` (0 .. kRows * kBlockK / kChunkElems - 1), in the
  // order threads fill the tile with cp.async. Padded: along the contiguous dimension. Canonical:
  // 8 consecutive chunks fill one core matrix (128 contiguous bytes), so each 8-thread phase of a
  // warp's 16-byte stores hits all 32 banks once; along a global row they still read whole chunks.
  __device__ static __forceinline__ void chunk_origin(int chunk, int& mn, int& k) {
    constexpr int kChunk = GemmConfig<T>::kChunkElems;
    if constexpr (kCanonical && kKMajor) {  // a core matrix: 8 rows (mn) of one 8-wide k chunk
      constexpr int kChunksK = kBlockK / kChunk;
      mn = (chunk / (8 * kChunksK)) * 8 + chunk % 8;
      k = ((chunk / 8) % kChunksK) * kChunk;
    } else if constexpr (kCanonical) {  // MN-major: 8 k rows of one 8-wide mn chunk
      constexpr int kGroupsMN = kRows / kChunk;
      k = chunk % 8 + (chunk / (8 * kGroupsMN)) * 8;
      mn = ((chunk / 8) % kGroupsMN) * kChunk;
    } else {
      constexpr int kChunksPerLine = (kKMajor ? kBlockK : kRows) / kChunk;
      const int line = chunk / kChunksPerLine;
      const int within = (chunk % kChunksPerLine) * kChunk;
      mn = kKMajor ? line : within;
      k = kKMajor ? within : line;
    }
  }
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
__device__ __forceinline__ void cp_async_wait() {
  // "memory": no shared-memory load of the landed data may be hoisted above the wait.
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

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

// ---- wgmma (sm_90a) -------------------------------------------------------------------------------
// Descriptor of a no-swizzle canonical tile (PTX ISA, "Matrix Descriptor Format"): bits 0-13 the
// shared-window start address >> 4, 16-29 the leading byte offset (between core matrices adjacent
// along K) >> 4, 32-45 the stride byte offset (adjacent along M/N) >> 4; base offset and swizzle
// mode (bits 49-51, 62-63) 0.
__device__ __forceinline__ uint64_t wgmma_descriptor(const void* smem, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  const uint64_t addr = static_cast<uint64_t>(__cvta_generic_to_shared(smem));
  return ((addr & 0x3ffffu) >> 4) | (static_cast<uint64_t>((lbo_bytes & 0x3ffffu) >> 4) << 16) |
         (static_cast<uint64_t>((sbo_bytes & 0x3ffffu) >> 4) << 32);
}

#ifdef CNK_CUDA_EMULATION
__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void fence_proxy_async_shared() {}
__device__ __forceinline__ void wgmma_commit_group() { ::cnk_emu::wgmma_commit_group(); }
template <int N>
__device__ __forceinline__ void wgmma_wait_group() { ::cnk_emu::wgmma_wait_group(N); }
template <int kFrags>
__device__ __forceinline__ void wgmma_fence_operands(float (&)[kFrags][4]) {}
// acc += A (64 x 16) B (16 x kN): A M-major when kTransA, B N-major when kTransB (else K-major);
// acc[j][i] in the accumulator fragment layout (n8 fragment j).
template <typename T, int kN, bool kTransA, bool kTransB>
__device__ __forceinline__ void wgmma_m64nNk16(float (&acc)[kN / 8][4], uint64_t desc_a, uint64_t desc_b) {
  ::cnk_emu::wgmma(std::is_same_v<T, __half> ? ::cnk_emu::WgmmaKind::kF16 : ::cnk_emu::WgmmaKind::kBF16, kN,
                   &acc[0][0], desc_a, desc_b, true, kTransA, kTransB);
}
#else
// wgmma and the async-proxy fence exist on sm_90a only; the sm_80 build never launches the wgmma
// kernels (the host checks the device), so there they trap.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define CNK_WGMMA_DEVICE 1
#endif
// The host dispatches to wgmma on a 9.0 device when CNK_CUDA_HAS_SM90A is defined; a 9.0 image
// compiled without the "a" features would hold only the traps below (a lost CUDA context).
#if defined(CNK_CUDA_HAS_SM90A) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(CNK_WGMMA_DEVICE)
#error "CNK_CUDA_HAS_SM90A is defined but this sm_90 image is not compute_90a: build for 90a, not 90"
#endif
__device__ __forceinline__ void wgmma_fence() {
#ifdef CNK_WGMMA_DEVICE
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
// Orders this thread's completed generic-proxy writes to shared memory (cp.async landings) before
// later reads of the async proxy (wgmma operands); a barrier then publishes them to the CTA.
__device__ __forceinline__ void fence_proxy_async_shared() {
#ifdef CNK_WGMMA_DEVICE
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void wgmma_commit_group() {
#ifdef CNK_WGMMA_DEVICE
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait_group() {
#ifdef CNK_WGMMA_DEVICE
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#else
  __trap();
#endif
}
// Keeps the compiler from moving accumulator reads / writes across the asynchronous region.
template <int kFrags>
__device__ __forceinline__ void wgmma_fence_operands(float (&acc)[kFrags][4]) {
#pragma unroll
  for (int j = 0; j < kFrags; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) asm volatile("" : "+f"(acc[j][r])::"memory");
}
// D += A B, D fp32 (64 x N), with scale-d = 1 (a predicate set from the operand after the
// descriptors), imm-scale-a = imm-scale-b = 1 (no negation), imm-trans-a / imm-trans-b = kTransA /
// kTransB. REGS lists the N / 2 accumulator operands, DESC / SCALE / TRANS the numbers of the others;
// the accumulators are the "+f" operands (CNK_WGMMA_ACC16: 4 n8 fragments from fragment j).
#define CNK_WGMMA_R0 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define CNK_WGMMA_R16 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define CNK_WGMMA_R32 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47"
#define CNK_WGMMA_R48 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define CNK_WGMMA_ACC4(j) "+f"(acc[j][0]), "+f"(acc[j][1]), "+f"(acc[j][2]), "+f"(acc[j][3])
#define CNK_WGMMA_ACC16(j) CNK_WGMMA_ACC4(j), CNK_WGMMA_ACC4(j + 1), CNK_WGMMA_ACC4(j + 2), CNK_WGMMA_ACC4(j + 3)
#define CNK_WGMMA_ASM(N, TYPE, REGS, DESC, SCALE, TRANS, ...)                                          \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"                                    \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " {" REGS "}, " DESC   \
               ", p, 1, 1, " TRANS ";\n}\n"                                                            \
               : __VA_ARGS__                                                                         \
               : "l"(desc_a), "l"(desc_b), "r"(1), "n"(int(kTransA)), "n"(int(kTransB)))
#define CNK_WGMMA_N32(TYPE) \
  CNK_WGMMA_ASM(32, TYPE, CNK_WGMMA_R0, "%16, %17", "%18", "%19, %20", CNK_WGMMA_ACC16(0))
#define CNK_WGMMA_N64(TYPE)                                                                      \
  CNK_WGMMA_ASM(64, TYPE, CNK_WGMMA_R0 ", " CNK_WGMMA_R16, "%32, %33", "%34", "%35, %36", CNK_WGMMA_ACC16(0), \
                CNK_WGMMA_ACC16(4))
#define CNK_WGMMA_N128(TYPE)                                                                                   \
  CNK_WGMMA_ASM(128, TYPE, CNK_WGMMA_R0 ", " CNK_WGMMA_R16 ", " CNK_WGMMA_R32 ", " CNK_WGMMA_R48, "%64, %65", "%66", \
                "%67, %68", CNK_WGMMA_ACC16(0), CNK_WGMMA_ACC16(4), CNK_WGMMA_ACC16(8), CNK_WGMMA_ACC16(12))
template <typename T, int kN, bool kTransA, bool kTransB>
__device__ __forceinline__ void wgmma_m64nNk16(float (&acc)[kN / 8][4], uint64_t desc_a, uint64_t desc_b) {
  static_assert(kN == 32 || kN == 64 || kN == 128, "instantiated for n = 32, 64, 128");
#ifdef CNK_WGMMA_DEVICE
  constexpr bool kHalf = std::is_same_v<T, __half>;
  if constexpr (kN == 32) {
    if constexpr (kHalf) CNK_WGMMA_N32("f16"); else CNK_WGMMA_N32("bf16");
  } else if constexpr (kN == 64) {
    if constexpr (kHalf) CNK_WGMMA_N64("f16"); else CNK_WGMMA_N64("bf16");
  } else {
    if constexpr (kHalf) CNK_WGMMA_N128("f16"); else CNK_WGMMA_N128("bf16");
  }
#else
  __trap();
#endif
}
#undef CNK_WGMMA_N32
#undef CNK_WGMMA_N64
#undef CNK_WGMMA_N128
#undef CNK_WGMMA_ASM
#undef CNK_WGMMA_ACC16
#undef CNK_WGMMA_ACC4
#undef CNK_WGMMA_R0
#undef CNK_WGMMA_R16
#undef CNK_WGMMA_R32
#undef CNK_WGMMA_R48
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
template <typename T, bool kKMajor, int kRows, bool kCanonical>
__device__ __forceinline__ void load_operand_tile(T* smem, const T* __restrict__ g, int64_t ld, int64_t mn0,
                                                  int64_t mn_end, int64_t k0, int64_t k_end, bool vec_loads) {
  using Tile = SmemTile<T, kKMajor, kRows, kCanonical>;
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
      int mn, k;
      Tile::chunk_origin(threadIdx.x + i * Cfg::kThreads, mn, k);
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

// acc += A . B^T for one warpgroup: 64 rows of the canonical tile A from row a_row, times kN rows of
// the canonical tile B from row b_row, over the tiles' whole K, as K / 16 x kN / kInstrN wgmma (the
// transpose flags from the tiles' majorness) in one commit group; returns once at most
// kPendingGroups groups of this warpgroup are still running (their operands and accumulators must
// then stay untouched until a later wait retires them).
template <typename T, typename TileA, typename TileB, int kN, int kInstrN, int kPendingGroups>
__device__ __forceinline__ void warpgroup_gemm(const T* sA, int a_row, const T* sB, int b_row, float (&acc)[kN / 8][4]) {
  static_assert(TileA::kBlockK == TileB::kBlockK && TileA::kBlockK % 16 == 0, "same K, whole k16 steps");
  static_assert(kN % kInstrN == 0, "whole instructions");
  constexpr uint32_t kLboA = TileA::kKGroupStride * sizeof(T), kSboA = TileA::kMNGroupStride * sizeof(T);
  constexpr uint32_t kLboB = TileB::kKGroupStride * sizeof(T), kSboB = TileB::kMNGroupStride * sizeof(T);
  constexpr int kFragsPerInstr = kInstrN / 8;
  wgmma_fence_operands(acc);
  wgmma_fence();
  // Fully unrolled: with a runtime loop around wgmma, ptxas serialises the wgmma (C7520).
#pragma unroll
  for (int kk = 0; kk < TileA::kBlockK; kk += 16) {
    const uint64_t desc_a = wgmma_descriptor(sA + TileA::offset(a_row, kk), kLboA, kSboA);
#pragma unroll
    for (int n = 0; n < kN / kInstrN; ++n) {
      const uint64_t desc_b = wgmma_descriptor(sB + TileB::offset(b_row + n * kInstrN, kk), kLboB, kSboB);
      wgmma_m64nNk16<T, kInstrN, !TileA::kIsKMajor, !TileB::kIsKMajor>(
          reinterpret_cast<float(&)[kFragsPerInstr][4]>(acc[n * kFragsPerInstr]), desc_a, desc_b);
    }
  }
  wgmma_commit_group();
  wgmma_wait_group<kPendingGroups>();
  wgmma_fence_operands(acc);
}

template <typename T, MathMode kMode, bool kAKMajor, bool kBKMajor>
constexpr std::size_t gemm_smem_bytes() {
  using Cfg = GemmConfig<T, kMode>;
  return static_cast<std::size_t>(Cfg::kStages) * (SmemTile<T, kAKMajor, Cfg::kBlockM, Cfg::kWgmma>::kElems +
                                                   SmemTile<T, kBKMajor, Cfg::kBlockN, Cfg::kWgmma>::kElems) *
         sizeof(T);
}

// Epilogue interface: static constexpr int kColSums (0..2): how many per-column sums over the
// tile's rows the epilogue produces (bias / gamma gradients); operator()(row, col, v0, v1, has1,
// sums) handles out[row][col] = v0 and, when has1, out[row][col + 1] = v1, adding its
// contributions to sums[k][0 / 1]; colsum_out(k) is where the CTA writes its [tiles_m][N] row.
template <typename T, MathMode kMode, bool kAKMajor, bool kBKMajor, typename Epilogue>
__global__ void __launch_bounds__(GemmConfig<T, kMode>::kThreads, GemmConfig<T, kMode>::kMinBlocksPerSm)
    mlp_layerscale_gemm_kernel(GemmProblem prob, Epilogue epi) {
  using Cfg = GemmConfig<T, kMode>;
  using TileA = SmemTile<T, kAKMajor, Cfg::kBlockM, Cfg::kWgmma>;
  using TileB = SmemTile<T, kBKMajor, Cfg::kBlockN, Cfg::kWgmma>;
  constexpr int kBlockK = block_k<T>();
  static_assert(Cfg::kWarpTileM % Cfg::kMmaM == 0 && Cfg::kWarpTileN % (2 * Cfg::kMmaN) == 0, "warp tile shape");
  static_assert(kBlockK % 16 == 0, "K tile must hold whole mma K steps");
  static_assert(Epilogue::kColSums >= 0 && Epilogue::kColSums <= 2, "at most two column sums");
  static_assert(Cfg::kStages == Cfg::kPrefetch + (Cfg::kWgmma ? 2 : 1), "a stage per tile in flight or being read");

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
    load_operand_tile<T, kAKMajor, Cfg::kBlockM, Cfg::kWgmma>(smem_a + stage * TileA::kElems, A, prob.lda, m0, prob.M,
                                                              k0, k_end, prob.vec_loads);
    load_operand_tile<T, kBKMajor, Cfg::kBlockN, Cfg::kWgmma>(smem_b + stage * TileB::kElems, B, prob.ldb, n0, prob.N,
                                                              k0, k_end, prob.vec_loads);
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

  // Prologue: tiles 0 .. kPrefetch-1 in flight (always commit, so group counting stays uniform).
#pragma unroll
  for (int s = 0; s < Cfg::kPrefetch; ++s) {
    if (s < num_k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < num_k_tiles; ++kt) {
    cp_async_wait<Cfg::kPrefetch - 1>();  // tile kt has landed (for this thread)
    if constexpr (Cfg::kWgmma) fence_proxy_async_shared();  // ... visible to wgmma's operand reads
    __syncthreads();  // ... for all threads; and stage (kt + kPrefetch) % kStages is free: its last reader
                      // (mma: step kt-1; wgmma: step kt-2, retired by step kt-1's wait) is done
    const int next = kt + Cfg::kPrefetch;
    if (next < num_k_tiles) load_stage(next % Cfg::kStages, next);
    cp_async_commit();
    const int stage = kt % Cfg::kStages;
    if constexpr (Cfg::kWgmma) {
      // Warpgroup wg: rows 64 wg .. 64 wg + 63 by the whole B tile. Only the previous K step's group
      // is waited for, so this one runs on across the next barrier and prefetch: a stage is
      // rewritten two K steps after it was read (kStages = kPrefetch + 2), after a barrier that every
      // thread reaches past the wait that retired its reads.
      static_assert(Cfg::kBlockN == 128 && Cfg::kThreads == 256, "two m64n128 warpgroups");
      warpgroup_gemm<T, TileA, TileB, Cfg::kBlockN, Cfg::kBlockN, 1>(smem_a + stage * TileA::kElems,
                                                                     64 * (static_cast<int>(threadIdx.x) / 128),
                                                                     smem_b + stage * TileB::kElems, 0, acc[0]);
    } else {
      warp_mma_step<T, kMode, kAKMajor, kBKMajor>(smem_a + stage * TileA::kElems, smem_b + stage * TileB::kElems,
                                                   warp_m0, warp_n0, acc);
    }
  }
  if constexpr (Cfg::kWgmma) {  // the last K step's wgmma group
    wgmma_wait_group<0>();
    wgmma_fence_operands(acc[0]);
  }
  cp_async_wait<0>();
  __syncthreads();  // shared memory is reused below for the column sums

  // Epilogue, one n8 column band at a time, so that only that band's column sums are live (the
  // wgmma warp tile has 16 bands). Rows beyond M contribute nothing to the column sums, which are
  // reduced in a fixed order: lanes sharing t (same columns) via xor shuffles, then the kWarpsM
  // warps of a column band in warp order through shared memory.
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  float* red = reinterpret_cast<float*>(gemm_smem_raw);  // [kColSums][kWarpsM][kBlockN]
  const int warp_m = warp / Cfg::kWarpsN;
#pragma unroll
  for (int fn = 0; fn < Cfg::kFragsN; ++fn) {
    const int64_t col = n0 + warp_n0 + fn * 8 + 2 * t;
    float colsum[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
    if (col < prob.N) {
#pragma unroll
      for (int fm = 0; fm < Cfg::kFragsM; ++fm) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int64_t row = m0 + warp_m0 + fm * 16 + g + half * 8;
          if (row >= prob.M) continue;
          float sums[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
          epi(row, col, acc[fm][fn][2 * half], acc[fm][fn][2 * half + 1], col + 1 < prob.N, sums);
#pragma unroll
          for (int k = 0; k < 2; ++k) {
            colsum[k][0] += sums[k][0];
            colsum[k][1] += sums[k][1];
          }
        }
      }
    }
    if constexpr (Epilogue::kColSums > 0) {  // every lane, in or out of range: the shuffles need all 32
#pragma unroll
      for (int k = 0; k < Epilogue::kColSums; ++k) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          float v = colsum[k][j];
          v += __shfl_xor_sync(0xffffffffu, v, 4);
          v += __shfl_xor_sync(0xffffffffu, v, 8);
          v += __shfl_xor_sync(0xffffffffu, v, 16);
          if (g == 0) red[(k * Cfg::kWarpsM + warp_m) * Cfg::kBlockN + warp_n0 + fn * 8 + 2 * t + j] = v;
        }
      }
    }
  }

  if constexpr (Epilogue::kColSums > 0) {
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
  using Cfg = GemmConfig<T, kMode>;
  constexpr int kBlockK = block_k<T>();
  const int64_t tiles_m = ceil_div(prob.M, Cfg::kBlockM);
  const int64_t tiles_n = ceil_div(prob.N, Cfg::kBlockN);
  if (tiles_m * tiles_n > std::numeric_limits<int>::max() || splits > 65535) {
    throw std::invalid_argument("mlp_layerscale: problem too large for the launch grid");
  }
  prob.tiles_n = static_cast<int>(tiles_n);
  prob.k_chunk = round_up(ceil_div(prob.K, splits), kBlockK);
  constexpr std::size_t smem = gemm_smem_bytes<T, kMode, kAKMajor, kBKMajor>();
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
