// Deterministic fixed-order reduction of fp32 partial buffers (weight / bias gradients).
#include "cuda_utils.cuh"

namespace convnext_kernels {
namespace cuda {

constexpr int kReduceThreads = 256;
constexpr int kReduceMaxBlocksX = 1024;

__global__ void __launch_bounds__(kReduceThreads) reduce_partials_kernel(PartialSumBatch batch) {
  const PartialSumSegment seg = batch.seg[blockIdx.y];
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < seg.len;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // Four interleaved running sums (independent loads in flight), combined in a fixed tree.
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    const float* p = seg.partials + e;
    int64_t i = 0;
    for (; i + 4 <= seg.count; i += 4) {
      s0 += p[(i + 0) * seg.stride];
      s1 += p[(i + 1) * seg.stride];
      s2 += p[(i + 2) * seg.stride];
      s3 += p[(i + 3) * seg.stride];
    }
    for (; i < seg.count; ++i) s0 += p[i * seg.stride];
    seg.out[e] = (s0 + s1) + (s2 + s3);
  }
}

void launch_reduce_partials(const PartialSumBatch& batch, cudaStream_t stream) {
  if (batch.num == 0) return;
  int64_t max_len = 0;
  for (int i = 0; i < batch.num; ++i) max_len = std::max(max_len, batch.seg[i].len);
  const int64_t blocks_x = std::max<int64_t>(1, std::min<int64_t>(kReduceMaxBlocksX, ceil_div(max_len, kReduceThreads)));
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(batch.num));
  CNK_LAUNCH(reduce_partials_kernel, grid, kReduceThreads, 0, stream)(batch);
  CNK_CHECK_LAUNCH("reduce_partials_kernel");
}

// ---- debug entry point --------------------------------------------------------------------------
__global__ void debug_noop_kernel() {}

void debug_launch(int64_t block_threads, std::uintptr_t stream) {
  CNK_CHECK_ARG(block_threads >= 1 && block_threads <= (int64_t{1} << 30), "block_threads must be in [1, 2^30]");
  CNK_LAUNCH(debug_noop_kernel, 1, static_cast<unsigned>(block_threads), 0, reinterpret_cast<cudaStream_t>(stream))();
  CNK_CHECK_LAUNCH("debug_noop_kernel");
}

}  // namespace cuda
}  // namespace convnext_kernels
