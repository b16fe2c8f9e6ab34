// The subset of CUDA that csrc/cuda uses, implemented on the host, so that the CUDA kernels run
// (slowly, exactly as written) on a machine without a GPU: CI checks their numerics the way
// TRITON_INTERPRET=1 checks the Triton kernels.
//
// Included by csrc/cuda/cuda_utils.cuh instead of the CUDA headers when CNK_CUDA_EMULATION is
// defined; the .cu sources are then compiled by the host C++ compiler into the Python module
// convnext_kernels._cuda_emulated (see CMakeLists.txt).
//
// Model: a launch runs its blocks one after another; each CUDA thread of a block is a fiber with
// its own stack, run until it reaches __syncthreads() or a warp collective (shuffles, ldmatrix,
// mma.sync), where it yields. A barrier releases when every live thread of the block waits on it;
// a warp collective runs when all lanes of the warp have arrived at the same collective. So the
// tensor-core fragment layouts, shuffles and barriers are emulated with their real semantics, and
// the sm_90a warpgroup MMA (wgmma) is a collective of the warpgroup's 128 threads (see wgmma below);
// bugs the hardware would expose show up here as well:
//   - threads of a block at different barriers, or lanes at different collectives: the block
//     deadlocks; the launch fails with cudaErrorLaunchFailure naming where each thread waits;
//   - cp.async copies land at the latest moment the PTX rules allow (cp.async.wait_group), so a
//     read of a tile before its wait sees the poison dynamic shared memory is filled with
//     (0xFF bytes: NaN); or, selectably, at the earliest (the instruction), so that a copy into a
//     stage an asynchronous reader (wgmma) has yet to read changes the result;
//   - shared-memory races between barriers: the order in which threads run between barriers is
//     selectable (forward, reverse, seeded shuffle, greedy); a race gives order-dependent results;
//   - misaligned or out-of-shared-memory cp.async / ldmatrix addresses, launches with invalid
//     configurations or more dynamic shared memory than opted into: the CUDA error, as a GPU
//     would report it, from cudaGetLastError (so CNK_CHECK_LAUNCH turns it into RuntimeError).
//   - ldmatrix bank conflicts: counted (Stats), so a test can hold the padded layouts to zero.
// Global memory is plain host memory: built with AddressSanitizer, out-of-bounds accesses to the
// tensors and workspaces (torch allocates them with malloc) are reported (tests/test_cuda_emulation.py).
// Numerics: mma.sync multiplies the 16-bit / tf32 operands exactly and accumulates in double,
// rounding once per mma into the fp32 accumulators (the hardware's intermediate rounding differs
// within fp32 accumulation error); fp16 / bf16 conversions round to nearest even, bit for bit.
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- language ------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static shared memory is not emulated: a host static would outlive the block, so a read before
// any write would see the last block's values instead of the poison that dynamic shared memory
// starts with. Kernels declare shared memory with CNK_DYNAMIC_SMEM.
#define __shared__ static_assert(false, "static __shared__ is not emulated: use CNK_DYNAMIC_SMEM");

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
// CUDA's integer min / max overloads (device code calls them unqualified).
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// ---- 16-bit floating point -----------------------------------------------------------------------
struct alignas(2) __half {
  std::uint16_t bits;
};
struct alignas(2) __nv_bfloat16 {
  std::uint16_t bits;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace cnk_emu {
inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// IEEE binary32 -> binary16, round to nearest even (subnormals, overflow to inf, NaN kept quiet).
inline std::uint16_t float_to_half_bits(float f) {
  const std::uint32_t u = float_bits(f);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  std::uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return static_cast<std::uint16_t>(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (a >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds past 65504
  if (a < 0x38800000u) {
    // Below 2^-14 (half subnormals): adding 0.5f leaves the value in [0.5, 1), where a float's
    // ulp is 2^-24, the subnormal half's spacing; the FPU rounds to nearest even.
    const float r = bits_float(a) + 0.5f;
    return static_cast<std::uint16_t>(sign | (float_bits(r) - 0x3f000000u));
  }
  const std::uint32_t odd = (a >> 13) & 1u;
  a += 0xc8000fffu + odd;  // rebias the exponent (127 -> 15) and round to nearest even
  return static_cast<std::uint16_t>(sign | (a >> 13));
}
inline float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}
inline std::uint16_t float_to_bf16_bits(float f) {
  const std::uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  return static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_float(std::uint16_t b) { return bits_float(static_cast<std::uint32_t>(b) << 16); }
}  // namespace cnk_emu

inline float __half2float(__half h) { return cnk_emu::half_bits_to_float(h.bits); }
inline __half __float2half_rn(float f) { return __half{cnk_emu::float_to_half_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return cnk_emu::bf16_bits_to_float(b.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{cnk_emu::float_to_bf16_bits(f)}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}

// ---- runtime API (host side) ---------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorIllegalAddress = 700,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaDeviceAttr {
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

cudaError_t cudaGetLastError();
const char* cudaGetErrorName(cudaError_t err);
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);

namespace cnk_emu {

// Limits every device the kernels target shares.
constexpr int kWarpSize = 32;
constexpr int kWarpgroupSize = 128;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kDefaultDynamicSmem = 48 * 1024;

// What the host code asks of the device (cudaDeviceGetAttribute): its compute capability, which
// picks the GEMM instructions, and its opt-in shared memory per block, which bounds the tiles.
// The default is an H100; set_device switches to another GPU's (an A100: 8.0, 166912 bytes; an
// RTX 3090 / A10 / RTX 4090 / L4 / L40S / RTX 5090: 8.6, 8.9 or 12.0, 101376 bytes) and forgets
// the kernels' cudaFuncSetAttribute opt-ins, as a new device would.
struct DeviceProps {
  int major = 9;
  int minor = 0;
  int max_dynamic_smem_optin = 232448;  // 227 KiB
};
const DeviceProps& device_props();
void set_device(const DeviceProps& props);

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);

// Counters over all launches since the last reset (per host thread).
struct Stats {
  std::uint64_t blocks = 0;                     // thread blocks run
  std::uint64_t mma = 0;                        // warp-wide mma.sync instructions
  std::uint64_t ldmatrix = 0;                   // warp-wide ldmatrix.x4 instructions
  std::uint64_t ldmatrix_extra_wavefronts = 0;  // shared-memory bank conflicts of those
  std::uint64_t wgmma = 0;                      // warpgroup-wide wgmma.mma_async instructions run
};
Stats& stats();

// Every launch that passed the configuration checks since the last clear (per host thread): what
// a test reads to know which grid a launcher chose. `name` is the CNK_LAUNCH kernel expression.
struct LaunchRecord {
  std::string name;
  dim3 grid, block;
  std::size_t dynamic_smem;
};
std::vector<LaunchRecord>& launches();

// Order in which the scheduler resumes the runnable threads of a block between barriers: each
// runnable thread in turn (forward, reverse, seeded shuffle), or greedily: after every switch the
// lowest (highest) numbered runnable thread runs next, so one warp or warpgroup gets as far as
// collectives allow before the others move (a consumer that skips a barrier then reads before the
// producers in other warps have written).
enum class Schedule { kForward = 0, kReverse = 1, kShuffle = 2, kGreedy = 3, kGreedyReverse = 4 };
void set_schedule(Schedule schedule, std::uint64_t seed);

// When cp.async copies land: at the cp.async.wait_group that retires them, the latest moment (the
// default: a read of a tile before its wait sees the poison), or at the instruction, the earliest
// (an overwrite of a tile that an earlier, asynchronous reader such as wgmma is still to read
// shows up). Correct code gives the same results either way.
void set_cp_async_eager(bool eager);

// Per-thread and per-block coordinates of the running fiber.
struct ThreadCoords {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern thread_local ThreadCoords* g_coords;

// Runs body() as every thread of every block of the grid; the error (if any) goes to
// cudaGetLastError, as a failed launch would.
void run_grid(const char* name, const void* kernel, dim3 grid, dim3 block, std::size_t dynamic_smem,
              const std::function<void()>& body);

// Base of the running block's dynamic shared memory.
void* dynamic_smem();

// Collectives and barriers (called from kernel code).
void syncthreads();
float shfl_xor(unsigned member_mask, float v, int lane_mask);
void ldmatrix_x4(std::uint32_t (&r)[4], const void* smem, bool trans);
enum class MmaKind { kF16, kBF16, kTF32 };
void mma(MmaKind kind, float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1);
void cp_async_16(void* smem, const void* gmem, bool valid);
void cp_async_commit();
void cp_async_wait(int newest_pending_groups);

// wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16}: D (64 x n, fp32, the PTX accumulator
// fragment: thread t of the warpgroup holds d[i] = D[16 (t/32) + (t%32)/4 + 8 ((i/2)%2)]
// [8 (i/4) + 2 (t%4) + i%2]) += A (64 x 16) B (16 x n), A and B in shared memory, each given by a
// matrix descriptor (start address, leading / stride byte offsets; only the no-swizzle layout is
// emulated, others fault). trans_a / trans_b: the operand is M- / N-major instead of K-major.
// Asynchronous as on the GPU: the instruction is recorded, and runs (reading shared memory and the
// accumulators at that moment) at the wgmma.wait_group that retires its commit group, so reusing
// an operand tile or reading the accumulators before the wait gives wrong results here too.
// Issue, commit and wait are collectives of the warpgroup (all 128 threads, the same operands).
// Not modelled: wgmma.fence and fence.proxy.async (no-ops here), so a missing fence, or an
// accumulator touched between issue and wait, is not caught (plain host stores and registers are
// not observable).
enum class WgmmaKind { kF16, kBF16 };
void wgmma(WgmmaKind kind, int n, float* d, std::uint64_t desc_a, std::uint64_t desc_b, bool scale_d, bool trans_a,
           bool trans_b);
void wgmma_commit_group();
void wgmma_wait_group(int pending_groups);
// The shared-window address of a pointer into the block's shared memory (cvta.to.shared), as
// wgmma descriptors encode it; faults for a pointer outside it.
std::size_t shared_window_address(const void* p);

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  const char* name;
  dim3 grid, block;
  std::size_t smem;
  template <typename... A>
  void operator()(A&&... args) const {
    // Kernel parameters are copied once, like CUDA's parameter space; each thread gets a copy.
    const std::tuple<P...> params(std::forward<A>(args)...);
    auto fn = kernel;
    run_grid(name, reinterpret_cast<const void*>(kernel), grid, block, smem, [&] { std::apply(fn, params); });
  }
};
template <typename... P>
Launch<P...> make_launch(void (*kernel)(P...), const char* name, dim3 grid, dim3 block, std::size_t smem) {
  return Launch<P...>{kernel, name, grid, block, smem};
}

}  // namespace cnk_emu

#define threadIdx (::cnk_emu::g_coords->thread_idx)
#define blockIdx (::cnk_emu::g_coords->block_idx)
#define blockDim (::cnk_emu::g_coords->block_dim)
#define gridDim (::cnk_emu::g_coords->grid_dim)

template <typename K>
cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return cnk_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
}

// ---- device intrinsics ---------------------------------------------------------------------------
inline void __syncthreads() { cnk_emu::syncthreads(); }
inline float __shfl_xor_sync(unsigned member_mask, float v, int lane_mask) {
  return cnk_emu::shfl_xor(member_mask, v, lane_mask);
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline std::size_t __cvta_generic_to_shared(const void* p) { return cnk_emu::shared_window_address(p); }

// <<<grid, block, smem, stream>>> for the host compiler (see CNK_LAUNCH in cuda_utils.cuh).
#define CNK_EMULATED_LAUNCH(kernel, grid, block, smem, stream) \
  ::cnk_emu::make_launch(kernel, #kernel, dim3(grid), dim3(block), (smem))
