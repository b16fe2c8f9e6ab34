// Shared helpers for the CUDA kernels: error checks, dtype dispatch, reductions, vector I/O.
#pragma once

#ifdef CNK_CUDA_EMULATION
#include "../emulation/cuda_emulation.h"  // the host emulation of CUDA (no GPU; see that header)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "launch_api.h"

namespace convnext_kernels {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// Host-side error handling. std::runtime_error / std::invalid_argument become RuntimeError /
// ValueError in Python (pybind11's default translation).
// ------------------------------------------------------------------------------------------------
inline void throw_on_cuda_error(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA error in ") + what + " (" + file + ":" + std::to_string(line) +
                             "): " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

#define CNK_CUDA_CHECK(expr) \
  ::convnext_kernels::cuda::throw_on_cuda_error((expr), #expr, __FILE__, __LINE__)

// After every kernel launch: launch-configuration errors surface here (asynchronous faults
// surface at the next synchronising call, as with any CUDA library).
#define CNK_CHECK_LAUNCH(kernel_name) \
  ::convnext_kernels::cuda::throw_on_cuda_error(cudaGetLastError(), kernel_name, __FILE__, __LINE__)

// kernel<<<grid, block, smem, stream>>>, spelled so that the host compiler of the emulation
// build can parse it too: CNK_LAUNCH(kernel, grid, block, smem, stream)(args...). `kernel` is a
// name or a function-pointer variable (template arguments' commas would split the macro).
#ifdef CNK_CUDA_EMULATION
#define CNK_LAUNCH(kernel, grid, block, smem, stream) CNK_EMULATED_LAUNCH(kernel, grid, block, smem, stream)
#else
#define CNK_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif

// The kernel's dynamic shared memory as an array NAME of TYPE (TYPE sets the alignment).
#ifdef CNK_CUDA_EMULATION
#define CNK_DYNAMIC_SMEM(TYPE, NAME) TYPE* NAME = static_cast<TYPE*>(::cnk_emu::dynamic_smem())
#else
#define CNK_DYNAMIC_SMEM(TYPE, NAME) extern __shared__ TYPE NAME[]
#endif

#define CNK_CHECK_ARG(cond, msg)                                                  \
  do {                                                                            \
    if (!(cond)) throw std::invalid_argument(std::string(__func__) + ": " + (msg)); \
  } while (0)

// Runs the lambda-body __VA_ARGS__ with CONST_NAME a constexpr bool equal to COND.
#define CNK_BOOL_SWITCH(COND, CONST_NAME, ...)  \
  [&] {                                         \
    if (COND) {                                 \
      constexpr bool CONST_NAME = true;         \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr bool CONST_NAME = false;        \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// Runs the lambda-body __VA_ARGS__ with ELEM_T the element type of dtype code CODE.
#define CNK_DTYPE_SWITCH(CODE, ELEM_T, ...)                                          \
  [&] {                                                                              \
    switch (CODE) {                                                                  \
      case ::convnext_kernels::cuda::kDTypeFloat32: {                                \
        using ELEM_T = float;                                                        \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      case ::convnext_kernels::cuda::kDTypeFloat16: {                                \
        using ELEM_T = __half;                                                       \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      case ::convnext_kernels::cuda::kDTypeBFloat16: {                               \
        using ELEM_T = __nv_bfloat16;                                                \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      default:                                                                       \
        throw std::invalid_argument("unknown dtype code " + std::to_string(CODE) +   \
                                    " (0 float32, 1 float16, 2 bfloat16)");          \
    }                                                                                \
  }()

inline bool is_aligned(const void* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// A pointer argument, as Python passes it (an integer), typed.
template <typename P>
P* as_ptr(std::uintptr_t v) {
  return reinterpret_cast<P*>(v);
}

// Whether every pointer (given as the integers Python passes; null counts as aligned) is
// 16-byte aligned: the condition of the vectorised paths.
inline bool all_aligned16(std::initializer_list<std::uintptr_t> ptrs) {
  for (std::uintptr_t p : ptrs)
    if (p % 16 != 0) return false;
  return true;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Opts a kernel into more than 48 KiB of dynamic shared memory when it needs it.
template <typename Kernel>
inline void set_dynamic_smem(Kernel kernel, std::size_t bytes, const char* name) {
  if (bytes > 48 * 1024) {
    throw_on_cuda_error(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
        name, __FILE__, __LINE__);
  }
}

// Carves 256-byte aligned sub-buffers out of one workspace allocation, in a fixed order, so that
// the size query and the launch agree on the layout.
struct WorkspaceCarver {
  char* base;
  int64_t offset = 0;
  explicit WorkspaceCarver(void* b) : base(static_cast<char*>(b)) {}
  template <typename T>
  T* take(int64_t count) {
    offset = round_up(offset, 256);
    T* p = base ? reinterpret_cast<T*>(base + offset) : nullptr;
    offset += count * static_cast<int64_t>(sizeof(T));
    return p;
  }
};

// ------------------------------------------------------------------------------------------------
// Device helpers
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Loads VEC consecutive elements as floats. VEC == 8 issues 16-byte loads (the caller guarantees
// 16-byte alignment: C % 8 == 0 and aligned base pointers); VEC == 1 is the any-C scalar path.
template <typename T, int VEC>
__device__ __forceinline__ void load_as_float(const T* __restrict__ p, float (&out)[VEC]) {
  static_assert(VEC == 1 || VEC == 8, "VEC must be 1 or 8");
  if constexpr (VEC == 1) {
    out[0] = to_float(p[0]);
  } else if constexpr (sizeof(T) == 4) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
  } else {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = to_float(e[i]);
  }
}

// fp32 loads/stores of VEC consecutive floats (fp32 parameters, workspaces, shared memory).
template <int VEC>
__device__ __forceinline__ void load_f32(const float* __restrict__ p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = p[0];
  } else {
    static_assert(VEC % 4 == 0, "vector width must be a multiple of 4");
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      const float4 a = *reinterpret_cast<const float4*>(p + i);
      out[i] = a.x; out[i + 1] = a.y; out[i + 2] = a.z; out[i + 3] = a.w;
    }
  }
}

template <int VEC>
__device__ __forceinline__ void store_f32(float* p, const float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    p[0] = v[0];
  } else {
    static_assert(VEC % 4 == 0, "vector width must be a multiple of 4");
#pragma unroll
    for (int i = 0; i < VEC; i += 4) *reinterpret_cast<float4*>(p + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_from_float(T* p, const float (&v)[VEC]) {
  static_assert(VEC == 1 || VEC == 8, "VEC must be 1 or 8");
  if constexpr (VEC == 1) {
    p[0] = from_float<T>(v[0]);
  } else if constexpr (sizeof(T) == 4) {
    store_f32<8>(reinterpret_cast<float*>(p), v);
  } else {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = from_float<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// Exact (erf) GELU and its derivative, in fp32.
__device__ __forceinline__ float gelu_erf(float a) {
  return 0.5f * a * (1.0f + erff(a * 0.70710678118654752440f));
}
__device__ __forceinline__ float gelu_erf_grad(float a) {
  const float cdf = 0.5f * (1.0f + erff(a * 0.70710678118654752440f));
  const float pdf = 0.39894228040143267794f * expf(-0.5f * a * a);
  return cdf + a * pdf;
}

// ------------------------------------------------------------------------------------------------
// Deterministic reduction of fp32 partial buffers: out[e] = sum_i partials[i * stride + e], always
// in the same order (four interleaved running sums, combined in a fixed tree), so results are
// bit-identical run to run. One launch handles several independent segments (blockIdx.y).
// ------------------------------------------------------------------------------------------------
struct PartialSumSegment {
  const float* partials;
  float* out;
  int64_t len;     // elements per partial row
  int64_t count;   // number of partial rows
  int64_t stride;  // elements between partial rows
};

constexpr int kMaxPartialSegments = 6;

struct PartialSumBatch {
  PartialSumSegment seg[kMaxPartialSegments];
  int num = 0;
  void add(const float* partials, float* out, int64_t len, int64_t count, int64_t stride) {
    if (num >= kMaxPartialSegments) throw std::logic_error("PartialSumBatch: too many segments");
    seg[num++] = PartialSumSegment{partials, out, len, count, stride};
  }
};

// Launches the reduction (defined in reduce_partials.cu).
void launch_reduce_partials(const PartialSumBatch& batch, cudaStream_t stream);

}  // namespace cuda
}  // namespace convnext_kernels
