// mlp_layerscale fused (back-to-back) forward for __half activations (one translation unit per dtype).
#include "mlp_layerscale_fused_fwd.cuh"

namespace convnext_kernels {
namespace cuda {
namespace mlp {

template void run_fused_fwd<__half>(const FwdArgs& a, bool use_wgmma, cudaStream_t stream);

}  // namespace mlp
}  // namespace cuda
}  // namespace convnext_kernels
