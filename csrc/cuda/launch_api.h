// Host entry points of the CUDA kernels, as bound into convnext_kernels._C.
//
// Plain C++ (no CUDA headers): bindings_cuda.cpp is compiled by the host compiler. Tensors are
// passed as raw device addresses (Python ints from tensor.data_ptr()), the stream as the integer
// value of a cudaStream_t (torch.cuda.current_stream().cuda_stream). Optional tensors pass 0.
// Activations are NHWC and contiguous; see convnext_kernels/launchers/__init__.py for the contract.
#pragma once

#include <cstdint>

namespace convnext_kernels {
namespace cuda {

// Element type of the activations (and of the Linear weights for mlp_layerscale).
enum DTypeCode : int { kDTypeFloat32 = 0, kDTypeFloat16 = 1, kDTypeBFloat16 = 2 };

// ---- dwconv_layernorm --------------------------------------------------------------------------
// ring_channels: channels a thread of the ring kernels convolves, 1 or 2 (2 only where C % 8 ==
// 0 and the pointers are 16-byte aligned; otherwise 1); 0 chooses (1 for C <= 384, else 2). Where
// C / ring_channels threads do not fit a block (C > 384 with 1) the tile kernels run. A benchmark
// switch: every choice gives the same results up to fp32 summation order.
int64_t dwconv_layernorm_fwd_workspace_bytes(int64_t N, int64_t H, int64_t W, int64_t C);

void dwconv_layernorm_fwd(std::uintptr_t x, std::uintptr_t conv_weight, std::uintptr_t conv_bias,
                          std::uintptr_t norm_weight, std::uintptr_t norm_bias, std::uintptr_t y,
                          std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t workspace,
                          int64_t workspace_bytes, int64_t N, int64_t H, int64_t W, int64_t C, double eps,
                          int dtype, std::uintptr_t stream, int ring_channels = 0);

int64_t dwconv_layernorm_bwd_workspace_bytes(int64_t N, int64_t H, int64_t W, int64_t C);

void dwconv_layernorm_bwd(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t conv_weight,
                          std::uintptr_t conv_bias, std::uintptr_t norm_weight, std::uintptr_t mean,
                          std::uintptr_t rstd, std::uintptr_t dx, std::uintptr_t dconv_weight,
                          std::uintptr_t dconv_bias, std::uintptr_t dnorm_weight, std::uintptr_t dnorm_bias,
                          std::uintptr_t workspace, int64_t workspace_bytes, int64_t N, int64_t H, int64_t W,
                          int64_t C, int dtype, std::uintptr_t stream, int ring_channels = 0);

// ---- mlp_layerscale ----------------------------------------------------------------------------
// mlp_layerscale_fwd: allow_fused lets fp16 / bf16 with C <= 384, C % 8 == 0 and 16-byte aligned
// tensors run the back-to-back fused kernel (hidden kept on chip) where the current device's opt-in
// shared memory fits it; false forces the two-GEMM path. The workspace query takes the same tensors,
// sizes and allow_fused as the forward and makes the same decision (one function, on the current
// device): 0 bytes when the fused kernel will run (workspace may then be 0), rows * 4C elements
// otherwise. The forward throws std::invalid_argument if workspace_bytes is below what the path it
// takes needs, so a query made with other arguments (or on another device) cannot be overrun.
// allow_wgmma (forward and backward): the fp16 / bf16 kernels (the fused forward, the two-GEMM
// forward's GEMMs, the backward's GEMMs) use wgmma on a compute capability 9.0 device when the
// extension was built for sm_90a (mma.sync otherwise, or when false).
int64_t mlp_layerscale_fwd_workspace_bytes(std::uintptr_t x, std::uintptr_t shortcut, std::uintptr_t fc1_weight,
                                           std::uintptr_t fc1_bias, std::uintptr_t fc2_weight,
                                           std::uintptr_t fc2_bias, std::uintptr_t gamma,
                                           std::uintptr_t drop_scale, std::uintptr_t y, int64_t N, int64_t H,
                                           int64_t W, int64_t C, int dtype, bool allow_fused);

void mlp_layerscale_fwd(std::uintptr_t x, std::uintptr_t shortcut, std::uintptr_t fc1_weight,
                        std::uintptr_t fc1_bias, std::uintptr_t fc2_weight, std::uintptr_t fc2_bias,
                        std::uintptr_t gamma, std::uintptr_t drop_scale, std::uintptr_t y,
                        std::uintptr_t workspace, int64_t workspace_bytes, int64_t N, int64_t H, int64_t W,
                        int64_t C, int dtype, bool allow_tf32, bool allow_fused, bool allow_wgmma,
                        std::uintptr_t stream);

int64_t mlp_layerscale_bwd_workspace_bytes(int64_t N, int64_t H, int64_t W, int64_t C, int dtype);

void mlp_layerscale_bwd(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t fc1_weight,
                        std::uintptr_t fc1_bias, std::uintptr_t fc2_weight, std::uintptr_t fc2_bias,
                        std::uintptr_t gamma, std::uintptr_t drop_scale, std::uintptr_t dx,
                        std::uintptr_t dfc1_weight, std::uintptr_t dfc1_bias, std::uintptr_t dfc2_weight,
                        std::uintptr_t dfc2_bias, std::uintptr_t dgamma, std::uintptr_t workspace,
                        int64_t workspace_bytes, int64_t N, int64_t H, int64_t W, int64_t C, int dtype,
                        bool allow_tf32, bool allow_wgmma, std::uintptr_t stream);

// Whether allow_wgmma takes effect on the current device: built for sm_90a, compute capability 9.0.
bool mlp_layerscale_wgmma_supported();

// ---- debugging ---------------------------------------------------------------------------------
// Launches a trivial kernel with an invalid configuration (block_threads > 1024 fails) so tests
// can check that CUDA errors reach Python as exceptions carrying the CUDA message.
void debug_launch(int64_t block_threads, std::uintptr_t stream);

}  // namespace cuda
}  // namespace convnext_kernels
