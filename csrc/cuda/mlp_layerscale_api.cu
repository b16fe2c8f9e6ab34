// Host entry points of mlp_layerscale: argument checks, dtype dispatch.
#include <limits>

#include "mlp_layerscale_fused_fwd.cuh"

namespace convnext_kernels {
namespace cuda {
namespace mlp {
namespace {

void check_sizes(int64_t N, int64_t H, int64_t W, int64_t C) {
  CNK_CHECK_ARG(N >= 1 && H >= 1 && W >= 1 && C >= 1, "N, H, W and C must be at least 1");
  CNK_CHECK_ARG(C <= (int64_t{1} << 20), "C is too large");
  // Divide step by step, so no intermediate product overflows: the largest buffer is
  // N * H * W * 4C elements of up to 4 bytes.
  constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();
  CNK_CHECK_ARG(H <= kInt64Max / W && H * W <= kInt64Max / (16 * C) && N <= kInt64Max / (H * W * 16 * C),
                "N * H * W * 4C overflows");
}

int64_t elem_bytes(int dtype) {
  switch (dtype) {
    case kDTypeFloat32: return 4;
    case kDTypeFloat16:
    case kDTypeBFloat16: return 2;
    default: throw std::invalid_argument("unknown dtype code " + std::to_string(dtype) + " (0 float32, 1 float16, 2 bfloat16)");
  }
}

FwdArgs make_fwd_args(std::uintptr_t x, std::uintptr_t shortcut, std::uintptr_t fc1_weight,
                      std::uintptr_t fc1_bias, std::uintptr_t fc2_weight, std::uintptr_t fc2_bias,
                      std::uintptr_t gamma, std::uintptr_t drop_scale, std::uintptr_t y, std::uintptr_t workspace,
                      int64_t N, int64_t H, int64_t W, int64_t C) {
  return FwdArgs{as_ptr<const void>(x), as_ptr<const void>(shortcut), as_ptr<const void>(fc1_weight),
                 as_ptr<const float>(fc1_bias), as_ptr<const void>(fc2_weight), as_ptr<const float>(fc2_bias),
                 as_ptr<const float>(gamma), as_ptr<const float>(drop_scale), as_ptr<void>(y),
                 as_ptr<void>(workspace), N * H * W, H * W, C, false};
}

// The forward's path and the workspace it needs. The one place the decision is made: both the
// workspace query and the forward call it (on the current device: fused_fwd_eligible reads its
// opt-in shared memory), so the size the query returns is what the forward then checks against.
struct FwdPlan {
  bool fused;
  int64_t workspace_bytes;  // 0 for the fused kernel (hidden kept on chip)
};

FwdPlan plan_fwd(const FwdArgs& a, int dtype, bool allow_fused) {
  const int64_t eb = elem_bytes(dtype);
  if (allow_fused && fused_fwd_eligible(a, eb)) return {true, 0};
  return {false, FwdWorkspace(nullptr, a.rows, a.C, eb).bytes};
}

}  // namespace
}  // namespace mlp

bool mlp_layerscale_wgmma_supported() {
  // An sm_90a cubin loads on compute capability 9.0 devices only (H100, H200, GH200).
#if defined(CNK_CUDA_EMULATION) || defined(CNK_CUDA_HAS_SM90A)
  int device = 0, major = 0, minor = 0;
  CNK_CUDA_CHECK(cudaGetDevice(&device));
  CNK_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  CNK_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

int64_t mlp_layerscale_fwd_workspace_bytes(std::uintptr_t x, std::uintptr_t shortcut, std::uintptr_t fc1_weight,
                                           std::uintptr_t fc1_bias, std::uintptr_t fc2_weight,
                                           std::uintptr_t fc2_bias, std::uintptr_t gamma,
                                           std::uintptr_t drop_scale, std::uintptr_t y, int64_t N, int64_t H,
                                           int64_t W, int64_t C, int dtype, bool allow_fused) {
  using namespace mlp;
  check_sizes(N, H, W, C);
  CNK_CHECK_ARG(x && shortcut && fc1_weight && fc1_bias && fc2_weight && fc2_bias && y,
                "null pointer for a required tensor");
  const FwdArgs a = make_fwd_args(x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale, y,
                                  0, N, H, W, C);
  return plan_fwd(a, dtype, allow_fused).workspace_bytes;
}

int64_t mlp_layerscale_bwd_workspace_bytes(int64_t N, int64_t H, int64_t W, int64_t C, int dtype) {
  mlp::check_sizes(N, H, W, C);
  return mlp::BwdWorkspace(nullptr, N * H * W, C, mlp::elem_bytes(dtype)).bytes;
}

void mlp_layerscale_fwd(std::uintptr_t x, std::uintptr_t shortcut, std::uintptr_t fc1_weight,
                        std::uintptr_t fc1_bias, std::uintptr_t fc2_weight, std::uintptr_t fc2_bias,
                        std::uintptr_t gamma, std::uintptr_t drop_scale, std::uintptr_t y,
                        std::uintptr_t workspace, int64_t workspace_bytes, int64_t N, int64_t H, int64_t W,
                        int64_t C, int dtype, bool allow_tf32, bool allow_fused, bool allow_wgmma,
                        std::uintptr_t stream) {
  using namespace mlp;
  check_sizes(N, H, W, C);
  CNK_CHECK_ARG(x && shortcut && fc1_weight && fc1_bias && fc2_weight && fc2_bias && y,
                "null pointer for a required tensor");
  FwdArgs a = make_fwd_args(x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale, y,
                            workspace, N, H, W, C);
  // Back-to-back fused kernel where it applies (shape, dtype, alignment, shared memory checked
  // here, before any launch); the two-GEMM path otherwise. The workspace is checked against what
  // the chosen path needs (none for the fused kernel), so a workspace sized for another path, or
  // on another device, raises instead of being overrun.
  const FwdPlan plan = plan_fwd(a, dtype, allow_fused);
  CNK_CHECK_ARG(plan.workspace_bytes == 0 || workspace, "null pointer for a required tensor (workspace)");
  CNK_CHECK_ARG(workspace_bytes >= plan.workspace_bytes,
                "workspace too small: " + std::to_string(workspace_bytes) + " bytes, the " +
                    (plan.fused ? "fused" : "two-GEMM") + " path needs " + std::to_string(plan.workspace_bytes) +
                    " (size it with mlp_layerscale_fwd_cuda_workspace_bytes, same tensors and allow_fused)");
  // cp.async 16-byte chunks: every contiguous extent (C, 4C) a multiple of 8 elements, aligned bases.
  a.vec_loads = C % 8 == 0 && all_aligned16({x, fc1_weight, fc2_weight, workspace});
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const bool fused = plan.fused;
  const bool use_wgmma = allow_wgmma && dtype != kDTypeFloat32 && mlp_layerscale_wgmma_supported();
  CNK_DTYPE_SWITCH(dtype, T, [&] {
    if constexpr (sizeof(T) == 2) {
      if (fused) return run_fused_fwd<T>(a, use_wgmma, s);
    }
    run_fwd<T>(a, allow_tf32, use_wgmma, s);
  });
}

void mlp_layerscale_bwd(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t fc1_weight,
                        std::uintptr_t fc1_bias, std::uintptr_t fc2_weight, std::uintptr_t fc2_bias,
                        std::uintptr_t gamma, std::uintptr_t drop_scale, std::uintptr_t dx,
                        std::uintptr_t dfc1_weight, std::uintptr_t dfc1_bias, std::uintptr_t dfc2_weight,
                        std::uintptr_t dfc2_bias, std::uintptr_t dgamma, std::uintptr_t workspace,
                        int64_t workspace_bytes, int64_t N, int64_t H, int64_t W, int64_t C, int dtype,
                        bool allow_tf32, bool allow_wgmma, std::uintptr_t stream) {
  using namespace mlp;
  check_sizes(N, H, W, C);
  CNK_CHECK_ARG(dy && x && fc1_weight && fc1_bias && fc2_weight && fc2_bias && dx && dfc1_weight && dfc1_bias &&
                    dfc2_weight && dfc2_bias && dgamma && workspace,
                "null pointer for a required tensor");
  const int64_t rows = N * H * W;
  CNK_CHECK_ARG(workspace_bytes >= BwdWorkspace(nullptr, rows, C, elem_bytes(dtype)).bytes, "workspace too small");
  BwdArgs a{as_ptr<const void>(dy), as_ptr<const void>(x), as_ptr<const void>(fc1_weight),
            as_ptr<const float>(fc1_bias), as_ptr<const void>(fc2_weight), as_ptr<const float>(fc2_bias),
            as_ptr<const float>(gamma), as_ptr<const float>(drop_scale), as_ptr<void>(dx),
            as_ptr<float>(dfc1_weight), as_ptr<float>(dfc1_bias), as_ptr<float>(dfc2_weight),
            as_ptr<float>(dfc2_bias), as_ptr<float>(dgamma), as_ptr<void>(workspace), rows, H * W, C, false};
  a.vec_loads = C % 8 == 0 && all_aligned16({x, fc1_weight, fc2_weight, workspace});
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const bool use_wgmma = allow_wgmma && dtype != kDTypeFloat32 && mlp_layerscale_wgmma_supported();
  CNK_DTYPE_SWITCH(dtype, T, [&] { run_bwd<T>(a, allow_tf32, use_wgmma, s); });
}

}  // namespace cuda
}  // namespace convnext_kernels
