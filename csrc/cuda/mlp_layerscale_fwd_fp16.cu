// mlp_layerscale fwd for __half activations (one translation unit per dtype: parallel builds).
#include "mlp_layerscale.cuh"

namespace convnext_kernels {
namespace cuda {
namespace mlp {

template void run_fwd<__half>(const FwdArgs& a, bool allow_tf32, bool use_wgmma, cudaStream_t stream);

}  // namespace mlp
}  // namespace cuda
}  // namespace convnext_kernels
