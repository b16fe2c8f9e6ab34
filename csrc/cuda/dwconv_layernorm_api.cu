// Host entry points of dwconv_layernorm: argument checks, dtype dispatch, the weight re-layout.
#include <limits>

#include "dwconv_layernorm.cuh"

namespace convnext_kernels {
namespace cuda {
namespace dwconv {

__global__ void dwconv_weight_transpose_kernel(const float* __restrict__ w, float* __restrict__ wt, int64_t C) {
  const int64_t total = kTaps * C;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = e / C;
    const int64_t c = e - t * C;
    wt[e] = w[c * kTaps + t];
  }
}

void launch_transpose_weight(const float* w, float* wt, int64_t C, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>(1024, ceil_div(kTaps * C, kThreads));
  CNK_LAUNCH(dwconv_weight_transpose_kernel, static_cast<unsigned>(blocks), kThreads, 0, stream)(w, wt, C);
  CNK_CHECK_LAUNCH("dwconv_weight_transpose_kernel");
}

namespace {

void check_sizes(int64_t N, int64_t H, int64_t W, int64_t C) {
  CNK_CHECK_ARG(N >= 1 && H >= 1 && W >= 1 && C >= 1, "N, H, W and C must be at least 1");
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  CNK_CHECK_ARG(H <= kIntMax / 8 && W <= kIntMax / 8 && C <= kIntMax / 64, "H, W or C is too large");
  // Divide step by step: H * W * C itself may overflow within the caps above.
  constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();
  CNK_CHECK_ARG(H * W <= kInt64Max / C && N <= kInt64Max / (H * W * C), "N * H * W * C overflows int64");
  // The tile grids have at most one block per pixel, and a grid's x dimension stops at 2^31 - 1.
  CNK_CHECK_ARG(N * H * W <= kIntMax, "N * H * W (pixels) must be below 2^31 for the launch grid");
}

}  // namespace
}  // namespace dwconv

int64_t dwconv_layernorm_fwd_workspace_bytes(int64_t N, int64_t H, int64_t W, int64_t C) {
  dwconv::check_sizes(N, H, W, C);
  return dwconv::FwdWorkspace(nullptr, C).bytes;
}

int64_t dwconv_layernorm_bwd_workspace_bytes(int64_t N, int64_t H, int64_t W, int64_t C) {
  dwconv::check_sizes(N, H, W, C);
  return dwconv::BwdWorkspace(nullptr, N, H, W, C).bytes;
}

void dwconv_layernorm_fwd(std::uintptr_t x, std::uintptr_t conv_weight, std::uintptr_t conv_bias,
                          std::uintptr_t norm_weight, std::uintptr_t norm_bias, std::uintptr_t y,
                          std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t workspace,
                          int64_t workspace_bytes, int64_t N, int64_t H, int64_t W, int64_t C, double eps,
                          int dtype, std::uintptr_t stream, int ring_channels) {
  using namespace dwconv;
  check_sizes(N, H, W, C);
  CNK_CHECK_ARG(x && conv_weight && norm_weight && norm_bias && y && mean && rstd && workspace,
                "null pointer for a required tensor");
  CNK_CHECK_ARG(eps >= 0.0, "eps must be non-negative");
  CNK_CHECK_ARG(ring_channels >= 0 && ring_channels <= 2, "ring_channels must be 0 (choose), 1 or 2");
  CNK_CHECK_ARG(workspace_bytes >= FwdWorkspace(nullptr, C).bytes, "workspace too small");
  FwdArgs a{as_ptr<const void>(x), as_ptr<const float>(conv_weight), as_ptr<const float>(conv_bias),
            as_ptr<const float>(norm_weight), as_ptr<const float>(norm_bias), as_ptr<void>(y),
            as_ptr<float>(mean), as_ptr<float>(rstd), as_ptr<void>(workspace), N, H, W, C,
            static_cast<float>(eps), false, ring_channels};
  // 16-byte vector path: whole channel vectors and aligned rows (conv_bias may be null).
  // The workspace holds the transposed conv weights, read as float4.
  a.vectorized = C % 8 == 0 && all_aligned16({x, norm_weight, norm_bias, y, conv_bias, workspace});
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  CNK_DTYPE_SWITCH(dtype, T, [&] { run_fwd<T>(a, s); });
}

void dwconv_layernorm_bwd(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t conv_weight,
                          std::uintptr_t conv_bias, std::uintptr_t norm_weight, std::uintptr_t mean,
                          std::uintptr_t rstd, std::uintptr_t dx, std::uintptr_t dconv_weight,
                          std::uintptr_t dconv_bias, std::uintptr_t dnorm_weight, std::uintptr_t dnorm_bias,
                          std::uintptr_t workspace, int64_t workspace_bytes, int64_t N, int64_t H, int64_t W,
                          int64_t C, int dtype, std::uintptr_t stream, int ring_channels) {
  using namespace dwconv;
  check_sizes(N, H, W, C);
  CNK_CHECK_ARG(dy && x && conv_weight && norm_weight && mean && rstd && dx && dconv_weight && dconv_bias &&
                    dnorm_weight && dnorm_bias && workspace,
                "null pointer for a required tensor");
  CNK_CHECK_ARG(workspace_bytes >= BwdWorkspace(nullptr, N, H, W, C).bytes, "workspace too small");
  CNK_CHECK_ARG(ring_channels >= 0 && ring_channels <= 2, "ring_channels must be 0 (choose), 1 or 2");
  BwdArgs a{as_ptr<const void>(dy), as_ptr<const void>(x), as_ptr<const float>(conv_weight),
            as_ptr<const float>(conv_bias), as_ptr<const float>(norm_weight), as_ptr<const float>(mean),
            as_ptr<const float>(rstd), as_ptr<void>(dx), as_ptr<float>(dconv_weight), as_ptr<float>(dconv_bias),
            as_ptr<float>(dnorm_weight), as_ptr<float>(dnorm_bias), as_ptr<void>(workspace), N, H, W, C, false,
            ring_channels};
  a.vectorized = C % 8 == 0 && all_aligned16({dy, x, dx, norm_weight, conv_bias, workspace});
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  CNK_DTYPE_SWITCH(dtype, T, [&] { run_bwd<T>(a, s); });
}

}  // namespace cuda
}  // namespace convnext_kernels
