// Shared by the CPU kernels (dwconv_layernorm.cpp, mlp_layerscale.cpp): bit-exact 16-bit
// float conversions, SIMD vectors built from GCC/Clang vector extensions, the instruction set
// picked at runtime, and OpenMP work splitting. Internal: not part of the extension's API.
//
// Each kernel file compiles its hot loops once per instruction set (per-function target
// attributes, so the wheel needs no -march flag) into namespaces avx512, avx2 and generic,
// and calls them through CNK_ISA_DISPATCH.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if !defined(__GNUC__)
#error "the CPU kernels need GCC or Clang vector extensions"
#endif

#include "activation_dtype.h"

#define CNK_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) || defined(__i386__)
#define CNK_X86 1
#define CNK_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")))
#define CNK_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define CNK_X86 0
#endif

namespace convnext_kernels {
namespace cpu {

// ---------------------------------------------------------------------------
// Bit-exact fp16 / bf16 <-> fp32 (round to nearest even on store).

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

CNK_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
CNK_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

CNK_INLINE float to_float(float v) { return v; }
CNK_INLINE float to_float(BFloat16 v) { return bits_to_float(uint32_t(v.bits) << 16); }
CNK_INLINE float to_float(Half v) {
  // Shift exponent+mantissa into float position, rebias; subnormals are
  // renormalised exactly by one float subtraction.
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (uint32_t(v.bits) & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += uint32_t(127 - 15) << 23;
  if (exp == shifted_exp) {
    o += uint32_t(128 - 16) << 23;  // Inf / NaN
  } else if (exp == 0) {
    o += 1u << 23;  // zero / subnormal
    o = float_to_bits(bits_to_float(o) - bits_to_float(113u << 23));
  }
  o |= (uint32_t(v.bits) & 0x8000u) << 16;
  return bits_to_float(o);
}

template <typename T>
CNK_INLINE T from_float(float f);

template <>
CNK_INLINE float from_float<float>(float f) {
  return f;
}

template <>
CNK_INLINE BFloat16 from_float<BFloat16>(float f) {
  const uint32_t u = float_to_bits(f);
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return BFloat16{uint16_t(is_nan ? 0x7fc0u : rounded)};
}

template <>
CNK_INLINE Half from_float<Half>(float f) {
  uint32_t u = float_to_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= (uint32_t(127 + 16) << 23)) {
    o = u > (255u << 23) ? 0x7e00u : 0x7c00u;  // NaN -> qNaN, overflow -> Inf
  } else if (u < (113u << 23)) {
    // Half subnormal or zero: adding a magic float aligns the 10 result bits at
    // the bottom of the mantissa and the FPU does the round-to-nearest-even.
    const uint32_t magic = uint32_t((127 - 15) + (23 - 10) + 1) << 23;
    o = float_to_bits(bits_to_float(u) + bits_to_float(magic)) - magic;
  } else {
    const uint32_t mantissa_odd = (u >> 13) & 1u;
    u += (uint32_t(15 - 127) << 23) + 0xfffu;
    u += mantissa_odd;
    o = u >> 13;
  }
  return Half{uint16_t(o | (sign >> 16))};
}

// Throws std::invalid_argument, its message prefixed by `op`, unless dtype is an
// ActivationDtype code.
inline void check_activation_dtype(int dtype, const char* op) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    throw std::invalid_argument(std::string(op) +
                                ": dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
}

// fn(T{}) with T the storage type of a checked activation dtype code.
template <typename Fn>
void dispatch_activation_dtype(int dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat32: fn(float{}); break;
    case kFloat16: fn(Half{}); break;
    default: fn(BFloat16{}); break;
  }
}

// ---------------------------------------------------------------------------
// Vector helpers (lanes L = 4, 8 or 16 floats).

// One template for every lane type: L lanes of T (float, int32, uint32, uint16), L * sizeof(T) bytes.
template <typename T, int L>
struct LanesOf {
  static_assert(L == 4 || L == 8 || L == 16, "vectors of 4, 8 or 16 lanes");
  typedef T type __attribute__((vector_size(L * sizeof(T))));
};
template <int L>
using VecOf = LanesOf<float, L>;
// The int32 vectors of the same widths (float comparisons yield them; bit manipulation).
template <int L>
using IntVecOf = LanesOf<int32_t, L>;

template <int L>
CNK_INLINE typename VecOf<L>::type load_vec(const float* p) {
  typename VecOf<L>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <int L>
CNK_INLINE void store_vec(float* p, typename VecOf<L>::type v) {
  std::memcpy(p, &v, sizeof v);
}

// ---------------------------------------------------------------------------
// Whole vectors of fp16 / bf16 <-> fp32, bit for bit what to_float / from_float give each lane.
// In integer lane operations, so they stay in SIMD registers: from_float called lane by lane
// was not vectorised (a bf16 GELU epilogue ran at a third of its float32 speed).

template <int L>
using U32VecOf = LanesOf<uint32_t, L>;

template <int L>
CNK_INLINE typename U32VecOf<L>::type float_bits(typename VecOf<L>::type v) {
  typename U32VecOf<L>::type u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}
template <int L>
CNK_INLINE typename VecOf<L>::type bits_float(typename U32VecOf<L>::type u) {
  typename VecOf<L>::type v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// L values of T (float, Half or BFloat16) from src, as float32.
template <typename T, int L>
CNK_INLINE typename VecOf<L>::type load_converted(const T* src) {
  using U = typename U32VecOf<L>::type;
  if constexpr (std::is_same_v<T, float>) {
    return load_vec<L>(src);
  } else {
    typename LanesOf<uint16_t, L>::type h;
    std::memcpy(&h, src, sizeof h);
    const U x = __builtin_convertvector(h, U);
    if constexpr (std::is_same_v<T, BFloat16>) {
      return bits_float<L>(x << 16);
    } else {
      // to_float(Half), each case computed in every lane and the lane's own one selected.
      const uint32_t shifted_exp = 0x7c00u << 13;
      const U magnitude = (x & 0x7fffu) << 13;
      const U exp = magnitude & shifted_exp;
      U o = magnitude + (uint32_t(127 - 15) << 23);
      const U inf_nan = (U)(exp == shifted_exp), zero_subnormal = (U)(exp == 0u);
      const U renormalised = float_bits<L>(bits_float<L>(o + (1u << 23)) - bits_to_float(113u << 23));
      o = (inf_nan & (o + (uint32_t(128 - 16) << 23))) | (zero_subnormal & renormalised) |
          (~(inf_nan | zero_subnormal) & o);
      return bits_float<L>(o | ((x & 0x8000u) << 16));
    }
  }
}

// The bf16 bits of each lane of v (in the low 16 bits of its uint32), from_float<BFloat16>'s.
template <int L>
CNK_INLINE typename U32VecOf<L>::type bf16_bits(typename VecOf<L>::type v) {
  using U = typename U32VecOf<L>::type;
  const U u = float_bits<L>(v);
  const U is_nan = (U)((u & 0x7fffffffu) > 0x7f800000u);
  return (is_nan & 0x7fc0u) | (~is_nan & ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16));
}

// v as L values of T at dst, rounded to nearest even.
template <typename T, int L>
CNK_INLINE void store_converted(T* dst, typename VecOf<L>::type v) {
  using U = typename U32VecOf<L>::type;
  if constexpr (std::is_same_v<T, float>) {
    store_vec<L>(dst, v);
  } else {
    U u = float_bits<L>(v), o;
    if constexpr (std::is_same_v<T, BFloat16>) {
      o = bf16_bits<L>(v);
    } else {
      // from_float<Half>, each case computed in every lane and the lane's own one selected.
      const U sign = u & 0x80000000u;
      u ^= sign;
      const U overflow = (U)(u >= (uint32_t(127 + 16) << 23));
      const U small = (U)(u < (113u << 23));
      const U inf_nan = 0x7c00u | ((U)(u > (255u << 23)) & 0x0200u);  // NaN -> qNaN 0x7e00
      const uint32_t magic = uint32_t((127 - 15) + (23 - 10) + 1) << 23;
      const U subnormal = float_bits<L>(bits_float<L>(u) + bits_to_float(magic)) - magic;
      const U normal = (u + ((uint32_t(15 - 127) << 23) + 0xfffu) + ((u >> 13) & 1u)) >> 13;
      o = (overflow & inf_nan) | (small & subnormal) | (~(overflow | small) & normal);
      o |= sign >> 16;
    }
    const auto h = __builtin_convertvector(o, typename LanesOf<uint16_t, L>::type);
    std::memcpy(dst, &h, sizeof h);
  }
}

// Pairwise (tree) sum of the lanes: short dependency chain, fixed order.
template <int L>
CNK_INLINE float sum_lanes(typename VecOf<L>::type v) {
  if constexpr (L == 4) {
    return (v[0] + v[2]) + (v[1] + v[3]);
  } else {
    typename VecOf<L / 2>::type lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    return sum_lanes<L / 2>(lo + hi);
  }
}

// Per-thread scratch, reused across calls (OpenMP threads persist), so the
// kernels neither allocate nor zero pages on every call.
inline float* thread_scratch(int64_t floats) {
  static thread_local std::vector<float> buf;
  if (int64_t(buf.size()) < floats) {
    buf.clear();
    buf.shrink_to_fit();
    buf.resize(size_t(floats));
  }
  return buf.data();
}

// ---------------------------------------------------------------------------
// Instruction set and threads.

enum class Isa { kGeneric, kAvx2, kAvx512 };

inline Isa detect_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kGeneric;
#if CNK_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw"))
      best = Isa::kAvx512;
#endif
    // Lets tests exercise every variant on one machine; never upgrades.
    if (const char* forced = std::getenv("CONVNEXT_KERNELS_CPU_ISA")) {
      const std::string f(forced);
      if (f == "generic") best = Isa::kGeneric;
      else if (f == "avx2" && best == Isa::kAvx512) best = Isa::kAvx2;
    }
    return best;
  }();
  return isa;
}

inline int resolve_threads(int num_threads, int64_t work_items) {
#ifdef _OPENMP
  int t = num_threads > 0 ? num_threads : omp_get_max_threads();
  return int(std::max<int64_t>(1, std::min<int64_t>(t, work_items)));
#else
  (void)num_threads;
  (void)work_items;
  return 1;
#endif
}

// Contiguous static split of [0, total) over nparts.
CNK_INLINE void split_range(int64_t total, int index, int nparts, int64_t& begin, int64_t& end) {
  const int64_t base = total / nparts, extra = total % nparts;
  begin = index * base + std::min<int64_t>(index, extra);
  end = begin + base + (index < extra ? 1 : 0);
}

CNK_INLINE int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
CNK_INLINE int thread_count() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// fn(begin, end) on each of nthreads threads, for its contiguous share of [0, total) (threads
// left without work are not called).
template <typename Fn>
void parallel_split(int64_t total, int nthreads, Fn&& fn) {
#pragma omp parallel num_threads(nthreads)
  {
    int64_t b, e;
    split_range(total, thread_index(), thread_count(), b, e);
    if (b < e) fn(b, e);
  }
}

}  // namespace cpu
}  // namespace convnext_kernels

// Runs the call __VA_ARGS__ (e.g. fwd_rows<T>(p, b, e)) from the namespace of the instruction
// set picked at runtime: avx512, avx2 or generic.
#if CNK_X86
#define CNK_ISA_DISPATCH(isa, ...)                          \
  switch (isa) {                                            \
    case Isa::kAvx512: avx512::__VA_ARGS__; break;          \
    case Isa::kAvx2: avx2::__VA_ARGS__; break;              \
    default: generic::__VA_ARGS__; break;                   \
  }
#else
#define CNK_ISA_DISPATCH(isa, ...) ((void)(isa), generic::__VA_ARGS__)
#endif
