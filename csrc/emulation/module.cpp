// pybind11 module convnext_kernels._cuda_emulated: the CUDA kernels of csrc/cuda compiled for the
// host against cuda_emulation.h, with the same bindings as _C's CUDA functions (pointers are CPU
// tensors' data_ptr(); the stream argument is ignored). For tests on machines without a GPU.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../cuda/mlp_gemm.cuh"

namespace py = pybind11;

// ---- kernels with the bugs the emulator must catch (tests/test_cuda_emulation.py) ----------------
namespace selftest {
using namespace convnext_kernels::cuda;

// Lanes 0-15 shuffle while lanes 16-31 wait at a barrier: a hang on a GPU.
__global__ void divergent_collective_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

// A shuffle whose member mask leaves out lanes 16-31 although they take part: not modelled.
__global__ void partial_mask_shuffle_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, static_cast<float>(threadIdx.x), 1);
}

// A butterfly with laneMask 33: its low 5 bits (1) pick the partner.
__global__ void wide_lane_mask_shuffle_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<float>(threadIdx.x), 33);
}

// Reads a neighbour's shared-memory slot with no barrier after the writes: a race.
__global__ void race_kernel(float* out) {
  CNK_DYNAMIC_SMEM(float, s);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// cp.async of 4 floats per thread, read back with (wait = true) or without waiting for the group.
__global__ void cp_async_kernel(const float* in, float* out, bool wait) {
  CNK_DYNAMIC_SMEM(float4, s);
  mlp::cp_async_16(s + threadIdx.x, in + 4 * threadIdx.x, true);
  mlp::cp_async_commit();
  if (wait) mlp::cp_async_wait<0>();
  out[threadIdx.x] = s[threadIdx.x].x;
}

// ldmatrix from a row address 4 bytes past a 16-byte boundary.
__global__ void misaligned_ldmatrix_kernel(float* out) {
  CNK_DYNAMIC_SMEM(float4, s);
  uint32_t r[4];
  mlp::ldmatrix_x4(r, reinterpret_cast<char*>(s) + 16 * threadIdx.x + 4);
  out[threadIdx.x] = static_cast<float>(r[0]);
}

// Thread 31 writes one element past the end of out (32 floats): only AddressSanitizer sees it.
__global__ void oob_write_kernel(float* out) { out[threadIdx.x + 1] = static_cast<float>(threadIdx.x); }

// A 16-byte vector load from an address 4 bytes past alignment: a misaligned-address fault on a
// GPU; x86 would not mind, UndefinedBehaviorSanitizer's alignment check does.
__global__ void misaligned_vector_load_kernel(const float* in, float* out) {
  const float4 v = *reinterpret_cast<const float4*>(in + 4 * threadIdx.x + 1);
  out[threadIdx.x] = v.x;
}

// One wgmma m64n128k16 by a warpgroup: shared memory <- image (the A and B operand tiles as the
// test lays them out), D (out, thread t's fragment at out[64 t ..]) += A B with the given
// descriptors, then D back to out. clobber_before_wait zeroes shared memory between the issue and
// the wait: wgmma reads its operands asynchronously, so the result must then be D alone.
__global__ void wgmma_kernel(const unsigned char* image, int image_bytes, uint64_t desc_a, uint64_t desc_b,
                             bool trans_a, bool trans_b, bool bf16, bool clobber_before_wait, float* out) {
  CNK_DYNAMIC_SMEM(unsigned char, s);
  for (int i = threadIdx.x; i < image_bytes; i += blockDim.x) s[i] = image[i];
  __syncthreads();
  float acc[1][16][4];
  float* d = out + 64 * threadIdx.x;
  for (int i = 0; i < 64; ++i) acc[0][i / 4][i % 4] = d[i];
  ::cnk_emu::wgmma(bf16 ? ::cnk_emu::WgmmaKind::kBF16 : ::cnk_emu::WgmmaKind::kF16, 128, &acc[0][0][0], desc_a, desc_b,
                   true, trans_a, trans_b);
  mlp::wgmma_commit_group();
  if (clobber_before_wait) {
    __syncthreads();
    for (int i = threadIdx.x; i < image_bytes; i += blockDim.x) s[i] = 0;
    __syncthreads();
  }
  mlp::wgmma_wait_group<0>();
  for (int i = 0; i < 64; ++i) d[i] = acc[0][i / 4][i % 4];
}

// Runs one of the kernels above with 32 threads; in: 128 floats, out: 32 floats.
void run(const std::string& kind, std::uintptr_t in_ptr, std::uintptr_t out_ptr) {
  const float* in = reinterpret_cast<const float*>(in_ptr);
  float* out = reinterpret_cast<float*>(out_ptr);
  if (kind == "divergent_collective") {
    CNK_LAUNCH(divergent_collective_kernel, 1, 32, 0, nullptr)(out);
  } else if (kind == "partial_mask_shuffle") {
    CNK_LAUNCH(partial_mask_shuffle_kernel, 1, 32, 0, nullptr)(out);
  } else if (kind == "wide_lane_mask_shuffle") {
    CNK_LAUNCH(wide_lane_mask_shuffle_kernel, 1, 32, 0, nullptr)(out);
  } else if (kind == "race") {
    CNK_LAUNCH(race_kernel, 1, 32, 32 * sizeof(float), nullptr)(out);
  } else if (kind == "cp_async_wait" || kind == "cp_async_no_wait") {
    CNK_LAUNCH(cp_async_kernel, 1, 32, 32 * sizeof(float4), nullptr)(in, out, kind == "cp_async_wait");
  } else if (kind == "misaligned_vector_load") {
    CNK_LAUNCH(misaligned_vector_load_kernel, 1, 32, 0, nullptr)(in, out);
  } else if (kind == "oob_write") {
    CNK_LAUNCH(oob_write_kernel, 1, 32, 0, nullptr)(out);
  } else if (kind == "misaligned_ldmatrix") {
    CNK_LAUNCH(misaligned_ldmatrix_kernel, 1, 32, 33 * 16, nullptr)(out);
  } else {
    throw std::invalid_argument("unknown self-test kernel '" + kind + "'");
  }
  CNK_CHECK_LAUNCH(kind.c_str());
}
}  // namespace selftest

void register_cuda_bindings(pybind11::module_& m);

PYBIND11_MODULE(_cuda_emulated, m) {
  m.doc() = "The CUDA kernels of convnext_kernels run on the CPU by a CUDA emulator (testing only)";
  register_cuda_bindings(m);

  m.def(
      "set_schedule",
      [](const std::string& order, std::uint64_t seed) {
        if (order == "forward") {
          cnk_emu::set_schedule(cnk_emu::Schedule::kForward, seed);
        } else if (order == "reverse") {
          cnk_emu::set_schedule(cnk_emu::Schedule::kReverse, seed);
        } else if (order == "shuffle") {
          cnk_emu::set_schedule(cnk_emu::Schedule::kShuffle, seed);
        } else if (order == "greedy") {
          cnk_emu::set_schedule(cnk_emu::Schedule::kGreedy, seed);
        } else if (order == "greedy_reverse") {
          cnk_emu::set_schedule(cnk_emu::Schedule::kGreedyReverse, seed);
        } else {
          throw std::invalid_argument("schedule must be 'forward', 'reverse', 'shuffle', 'greedy' or 'greedy_reverse', got '" +
                                      order + "'");
        }
      },
      py::arg("order"), py::arg("seed") = 0,
      "Order in which the threads of a block run between barriers (greedy: the lowest, greedy_reverse: the "
      "highest numbered runnable thread after every switch): a shared-memory race gives results that depend on it.");

  m.def("set_cp_async_eager", &cnk_emu::set_cp_async_eager, py::arg("eager"),
        "True: cp.async copies land at the instruction (the earliest moment); False (default): at the "
        "cp.async.wait_group that retires them (the latest). Correct kernels give the same results.");

  m.def(
      "set_device",
      [](int major, int minor, int max_dynamic_smem_optin) {
        const cnk_emu::DeviceProps old = cnk_emu::device_props();
        cnk_emu::set_device(cnk_emu::DeviceProps{major, minor, max_dynamic_smem_optin});
        return py::make_tuple(old.major, old.minor, old.max_dynamic_smem_optin);
      },
      py::arg("major"), py::arg("minor"), py::arg("max_dynamic_smem_optin"),
      "Emulate another GPU: its compute capability and opt-in shared memory per block (bytes), as "
      "cudaDeviceGetAttribute reports them. Returns the previous (major, minor, bytes); the default is "
      "an H100's (9, 0, 232448).");

  m.def(
      "stats",
      [](bool reset) {
        const cnk_emu::Stats st = cnk_emu::stats();
        if (reset) cnk_emu::stats() = cnk_emu::Stats{};
        py::dict d;
        d["blocks"] = st.blocks;
        d["mma"] = st.mma;
        d["ldmatrix"] = st.ldmatrix;
        d["ldmatrix_extra_wavefronts"] = st.ldmatrix_extra_wavefronts;
        d["wgmma"] = st.wgmma;
        return d;
      },
      py::arg("reset") = false,
      "Counters since the last reset: blocks run, warp-wide mma.sync and ldmatrix.x4 instructions, "
      "the extra shared-memory wavefronts bank conflicts cost those ldmatrix (0 when conflict-free), and "
      "warpgroup-wide wgmma.mma_async instructions run.");

  m.def(
      "launches",
      [](bool clear) {
        py::list out;
        for (const cnk_emu::LaunchRecord& r : cnk_emu::launches()) {
          py::dict d;
          d["name"] = r.name;
          d["grid"] = py::make_tuple(r.grid.x, r.grid.y, r.grid.z);
          d["block"] = py::make_tuple(r.block.x, r.block.y, r.block.z);
          d["dynamic_smem"] = r.dynamic_smem;
          out.append(d);
        }
        if (clear) cnk_emu::launches().clear();
        return out;
      },
      py::arg("clear") = false,
      "The launches since the last clear, in order: name (the launch's kernel expression), grid, block "
      "and dynamic shared memory bytes; clear=True empties the log after reading it.");

  m.def(
      "round_through",
      [](std::uintptr_t src, std::uintptr_t dst, int64_t n, int dtype) {
        const float* in = reinterpret_cast<const float*>(src);
        float* out = reinterpret_cast<float*>(dst);
        for (int64_t i = 0; i < n; ++i) {
          switch (dtype) {
            case convnext_kernels::cuda::kDTypeFloat16: out[i] = __half2float(__float2half_rn(in[i])); break;
            case convnext_kernels::cuda::kDTypeBFloat16:
              out[i] = __bfloat162float(__float2bfloat16_rn(in[i]));
              break;
            default: throw std::invalid_argument("dtype must be CUDA_DTYPE_FLOAT16 or CUDA_DTYPE_BFLOAT16");
          }
        }
      },
      py::arg("src"), py::arg("dst"), py::arg("n"), py::arg("dtype"),
      "dst[i] = float(T(src[i])) for n fp32 values, T the 16-bit type of dtype: the emulator's "
      "conversions, to check against torch's.");

  m.def(
      "wgmma_selftest",
      [](std::uintptr_t image, int image_bytes, std::uint64_t desc_a, std::uint64_t desc_b, bool trans_a,
         bool trans_b, bool bf16, bool clobber_before_wait, std::uintptr_t out) {
        CNK_LAUNCH(selftest::wgmma_kernel, 1, 128, static_cast<std::size_t>(image_bytes), nullptr)(
            reinterpret_cast<const unsigned char*>(image), image_bytes, desc_a, desc_b, trans_a, trans_b, bf16,
            clobber_before_wait, reinterpret_cast<float*>(out));
        CNK_CHECK_LAUNCH("wgmma_selftest");
      },
      py::arg("image"), py::arg("image_bytes"), py::arg("desc_a"), py::arg("desc_b"), py::arg("trans_a"),
      py::arg("trans_b"), py::arg("bf16"), py::arg("clobber_before_wait"), py::arg("out"),
      "One warpgroup runs one wgmma.mma_async m64n128k16 (f32 accumulators) on shared memory loaded "
      "from image (image_bytes bytes); out: 128 x 64 floats, thread t's accumulator fragment at 64 t, "
      "read as D and written back as D + A B.");

  m.def("selftest", &selftest::run, py::arg("kind"), py::arg("src"), py::arg("dst"),
        "Runs a kernel with a known bug on 32 threads (src: 128 floats, dst: 32 floats): "
        "divergent_collective, race, cp_async_no_wait, misaligned_ldmatrix, oob_write and "
        "misaligned_vector_load (for sanitizer builds only), or cp_async_wait, the fixed form. Faults raise RuntimeError "
        "as CUDA errors do.");
}
