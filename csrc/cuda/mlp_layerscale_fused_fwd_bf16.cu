// mlp_layerscale fused (back-to-back) forward for __nv_bfloat16 activations (one translation unit per dtype).
#include "mlp_layerscale_fused_fwd.cuh"

namespace convnext_kernels {
namespace cuda {
namespace mlp {

template void run_fused_fwd<__nv_bfloat16>(const FwdArgs& a, bool use_wgmma, cudaStream_t stream);

}  // namespace mlp
}  // namespace cuda
}  // namespace convnext_kernels
