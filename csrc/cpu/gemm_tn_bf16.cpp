// c = [c +] a^T b with AVX512-BF16 dot products (see gemm_tn_bf16.h).
//
// vdpbf16ps multiplies 16 pairs of bf16 values by 16 pairs and adds each pair's two products to
// a float32 lane. So both operands are first packed by row pairs: rows 2k and 2k + 1 become one
// uint32 per column (row 2k's bf16 in the low half), and columns are grouped into panels
// (kTileRows of a's, kTileCols of b's), stored pair by pair, zero beyond the operand. A micro-
// tile of c (kTileRows x kTileCols) then takes, for each row pair, three vectors of b's panel
// and one broadcast pair of a's per row: 24 dot products into 24 float32 accumulators.
// The row pairs are taken in blocks of kBlockPairs, so that b's panel block stays in L1 while
// a's panels stream past it; each block's sums are added to c (read back from memory) in block
// order, so the result depends on the shape only, not on the number of threads.

#include "gemm_tn_bf16.h"

#include <stdexcept>
#include <string>

#include "cpu_kernel_utils.h"

// The AVX512-BF16 intrinsics need GCC 10 or Clang 9; older compilers build the fallback (the
// kernel reports itself unsupported and the backend keeps its fp32 GEMMs).
#if CNK_X86 && ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10))
#define CNK_AVX512_BF16 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define CNK_AVX512_BF16 0
#endif

namespace convnext_kernels {
namespace {

using namespace cpu;

constexpr int kTileRows = 8;           // rows of c per micro-tile: a's values, broadcast
constexpr int kTileVectors = 3;        // 16-float vectors per micro-tile row
constexpr int kTileCols = 16 * kTileVectors;  // columns of c per micro-tile: b's values
constexpr int64_t kBlockPairs = 128;   // row pairs per block: b's panel block is 24 KB (L1)
constexpr int64_t kPackPairs = 16;     // row pairs packed together: 32 rows' source in L1

CNK_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Micro-tiles of c down its p rows and across its q columns.
CNK_INLINE int64_t row_tile_count(int64_t p) { return round_up(p, kTileRows) / kTileRows; }
CNK_INLINE int64_t col_tile_count(int64_t q) { return round_up(q, kTileCols) / kTileCols; }

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("gemm_tn_bf16 (cpu): ") + what);
}

#if CNK_AVX512_BF16
#define CNK_TARGET_AVX512_BF16 \
  __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,avx2,fma,f16c")))

using U16 = U32VecOf<16>::type;

// The packing is written without a target attribute and inlined into pack_pairs's AVX512-BF16
// body, as the other kernels' *_impl functions are: clang refuses a call that passes 512-bit
// vectors between functions of different targets (cpu_kernel_utils.h's helpers have none).

// The bf16 bits of src[0, n) (n <= 16; zero beyond), one per uint32 lane.
template <typename T>
CNK_INLINE U16 load_bf16_bits(const T* src, int64_t n) {
  // Whole vectors by fixed-size copies (one vector load each); a row's tail through a buffer.
  if constexpr (std::is_same_v<T, BFloat16>) {
    LanesOf<uint16_t, 16>::type h = {};
    if (n == 16) std::memcpy(&h, src, sizeof h);
    else std::memcpy(&h, src, sizeof(uint16_t) * size_t(n));
    return __builtin_convertvector(h, U16);
  } else {
    if (n == 16) return bf16_bits<16>(load_vec<16>(src));
    float buf[16] = {};
    std::memcpy(buf, src, sizeof(float) * size_t(n));
    return bf16_bits<16>(load_vec<16>(buf));
  }
}

// Packs row pairs [pair_begin, pair_end) of src (rows, cols; row stride ld) into panels of Width
// columns: panel j at dst + j * pairs * Width, pair k of it at + k * Width (see the top).
template <int Width, typename T>
CNK_INLINE void pack_pairs_impl(const T* src, int64_t ld, int64_t rows, int64_t cols, int64_t pairs,
                                int64_t pair_begin, int64_t pair_end, uint32_t* dst) {
  constexpr int kSegment = Width < 16 ? Width : 16;  // lanes of one vector in one panel
  static_assert(Width % kSegment == 0 && 16 % kSegment == 0, "panels of 8, 16, 32, 48 ... columns");
  const int64_t padded = round_up(cols, Width);
  // kPackPairs row pairs at a time, 16 columns across them: each panel receives a contiguous
  // run of stores, not one segment per row pair (a's 8-column panels lie pairs * 32 bytes apart).
  for (int64_t block = pair_begin; block < pair_end; block += kPackPairs) {
    const int64_t block_end = std::min(block + kPackPairs, pair_end);
    for (int64_t c = 0; c < padded; c += 16) {
      const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, cols - c));
      for (int64_t k = block; k < block_end; ++k) {
        const T* row0 = src + 2 * k * ld;
        U16 pair = U16{} + 0u;
        if (n > 0) {
          pair = load_bf16_bits<T>(row0 + c, n);
          if (2 * k + 1 < rows) pair |= load_bf16_bits<T>(row0 + ld + c, n) << 16;
        }
        for (int lane = 0; lane < 16 && c + lane < padded; lane += kSegment) {
          const int64_t col = c + lane;
          std::memcpy(dst + (col / Width) * pairs * Width + k * Width + col % Width,
                      reinterpret_cast<const uint32_t*>(&pair) + lane, sizeof(uint32_t) * kSegment);
        }
      }
    }
  }
}

template <int Width, typename T>
CNK_TARGET_AVX512_BF16 void pack_pairs(const T* src, int64_t ld, int64_t rows, int64_t cols,
                                       int64_t pairs, int64_t pair_begin, int64_t pair_end,
                                       uint32_t* dst) {
  pack_pairs_impl<Width, T>(src, ld, rows, cols, pairs, pair_begin, pair_end, dst);
}

// c[0, rows) x [0, cols) (rows <= kTileRows, cols <= kTileCols) = [c +] the sum over `pairs`
// row pairs of a's panel slice times b's.
CNK_TARGET_AVX512_BF16 void micro_tile(int64_t pairs, const uint32_t* a, const uint32_t* b,
                                       float* c, int64_t ldc, int rows, int cols, bool add) {
  __m512 acc[kTileRows][kTileVectors];
#pragma GCC unroll 8
  for (int i = 0; i < kTileRows; ++i)
#pragma GCC unroll 3
    for (int v = 0; v < kTileVectors; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < pairs; ++k, a += kTileRows, b += kTileCols) {
    __m512bh bv[kTileVectors];
#pragma GCC unroll 3
    for (int v = 0; v < kTileVectors; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < kTileRows; ++i) {
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(int(a[i]));
#pragma GCC unroll 3
      for (int v = 0; v < kTileVectors; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], ai, bv[v]);
    }
  }
  for (int i = 0; i < rows; ++i) {
#pragma GCC unroll 3
    for (int v = 0; v < kTileVectors; ++v) {
      const int n = cols - 16 * v;
      if (n <= 0) break;
      const __mmask16 mask = n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u);
      float* dst = c + i * ldc + 16 * v;
      __m512 sum = acc[i][v];
      if (add) sum = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), sum);
      _mm512_mask_storeu_ps(dst, mask, sum);
    }
  }
}

template <typename A, typename B>
void run(const A* a, int64_t lda, const B* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
         int64_t p, int64_t q, bool accumulate, uint32_t* workspace, int nthreads) {
  const int64_t pairs = (rows + 1) / 2;
  uint32_t* a_packed = workspace;
  uint32_t* b_packed = workspace + pairs * round_up(p, kTileRows);
  const int64_t row_tiles = row_tile_count(p), col_tiles = col_tile_count(q);
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = thread_index(), nt = thread_count();
    int64_t begin, end;
    split_range(pairs, tid, nt, begin, end);
    pack_pairs<kTileRows>(a, lda, rows, p, pairs, begin, end, a_packed);
    pack_pairs<kTileCols>(b, ldb, rows, q, pairs, begin, end, b_packed);
#pragma omp barrier  // the tiles read pairs packed by every thread
    // Tiles column-panel-major: consecutive tiles of a thread share b's panel block.
    split_range(row_tiles * col_tiles, tid, nt, begin, end);
    for (int64_t k0 = 0; k0 < pairs; k0 += kBlockPairs) {
      const int64_t block = std::min(kBlockPairs, pairs - k0);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t tj = t / row_tiles, ti = t % row_tiles;
        micro_tile(block, a_packed + (ti * pairs + k0) * kTileRows,
                   b_packed + (tj * pairs + k0) * kTileCols, c + ti * kTileRows * ldc + tj * kTileCols,
                   ldc, int(std::min<int64_t>(kTileRows, p - ti * kTileRows)),
                   int(std::min<int64_t>(kTileCols, q - tj * kTileCols)), accumulate || k0 > 0);
      }
    }
  }
}
#endif  // CNK_AVX512_BF16

}  // namespace

bool gemm_tn_bf16_cpu_supported() {
#if CNK_AVX512_BF16
  // AVX512-BF16 is CPUID leaf 7, subleaf 1, EAX bit 5 (read directly: older compilers'
  // __builtin_cpu_supports does not know it); detect_isa() has checked that the OS keeps the
  // AVX-512 state.
  static const bool supported = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return detect_isa() == Isa::kAvx512 && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) &&
           (eax & (1u << 5)) != 0;
  }();
  return supported;
#else
  return false;
#endif
}

int64_t gemm_tn_bf16_cpu_workspace_size(int64_t rows, int64_t p, int64_t q) {
  require(rows >= 0 && p >= 0 && q >= 0, "rows, p and q must be >= 0");
  constexpr int64_t kLimit = int64_t(1) << 60;  // so that the roundings below cannot overflow
  require(rows < kLimit && p < kLimit && q < kLimit, "operands too large");
  int64_t size = 0;
  require(!__builtin_mul_overflow((rows + 1) / 2, round_up(p, kTileRows) + round_up(q, kTileCols),
                                  &size) && size < (int64_t(1) << 60),
          "operands too large");
  return size;
}

void gemm_tn_bf16_cpu(const void* a, int64_t lda, int a_dtype, const void* b, int64_t ldb,
                      int b_dtype, float* c, int64_t ldc, int64_t rows, int64_t p, int64_t q,
                      bool accumulate, float* workspace, int64_t workspace_floats,
                      int num_threads) {
  require(a_dtype == kFloat32 || a_dtype == kBFloat16, "a_dtype must be 0 (float32) or 2 (bfloat16)");
  require(b_dtype == kFloat32 || b_dtype == kBFloat16, "b_dtype must be 0 (float32) or 2 (bfloat16)");
  require(lda >= p && ldb >= q && ldc >= q, "row strides must be at least the row lengths");
  require(workspace_floats >= gemm_tn_bf16_cpu_workspace_size(rows, p, q),
          "workspace smaller than gemm_tn_bf16_cpu_workspace_size()");
  if (p == 0 || q == 0) return;
  require(c != nullptr && (rows == 0 || (a && b && workspace)), "null pointer");
  if (!gemm_tn_bf16_cpu_supported())
    throw std::runtime_error("gemm_tn_bf16 (cpu): needs an x86-64 CPU with AVX512-BF16");
  if (rows == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < p; ++i) std::fill(c + i * ldc, c + i * ldc + q, 0.f);
    return;
  }
#if CNK_AVX512_BF16
  const int64_t tiles = row_tile_count(p) * col_tile_count(q);
  const int nthreads = resolve_threads(num_threads, std::min(tiles, (rows + 1) / 2));
  auto with_a = [&](auto a_tag) {
    using A = decltype(a_tag);
    auto with_b = [&](auto b_tag) {
      using B = decltype(b_tag);
      run(static_cast<const A*>(a), lda, static_cast<const B*>(b), ldb, c, ldc, rows, p, q,
          accumulate, reinterpret_cast<uint32_t*>(workspace), nthreads);
    };
    if (b_dtype == kFloat32) with_b(float{});
    else with_b(BFloat16{});
  };
  if (a_dtype == kFloat32) with_a(float{});
  else with_a(BFloat16{});
#endif
}

}  // namespace convnext_kernels
