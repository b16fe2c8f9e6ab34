// dwconv_layernorm bwd for __nv_bfloat16 activations (one translation unit per dtype: parallel builds).
#include "dwconv_layernorm.cuh"

namespace convnext_kernels {
namespace cuda {
namespace dwconv {

template void run_bwd<__nv_bfloat16>(const BwdArgs& a, cudaStream_t stream);

}  // namespace dwconv
}  // namespace cuda
}  // namespace convnext_kernels
