// Fused 7x7 depthwise conv + bias + LayerNorm over C (NHWC) for CPU.
//
// Raw-pointer API: Python (torch) owns every buffer, including the backward
// workspace, so this code never allocates anything the caller has to free.
// Parameters and statistics are always float32; activations (x, y, dy, dx)
// are float32, float16 or bfloat16 as given by `dtype` (see ActivationDtype).
// All functions validate their arguments and throw std::invalid_argument.
#pragma once

#include <cstdint>

#include "activation_dtype.h"

namespace convnext_kernels {

// y = LayerNorm_C(dwconv7x7(x) + conv_bias); writes y (dtype), mean and rstd
// (N*H*W float32, biased variance, rstd = 1/sqrt(var + eps)).
// conv_weight is (C, 1, 7, 7) contiguous; conv_bias may be null.
// num_threads <= 0 means the OpenMP default.
void dwconv_layernorm_fwd_cpu(const void* x, const float* conv_weight,
                              const float* conv_bias, const float* norm_weight,
                              const float* norm_bias, void* y, float* mean,
                              float* rstd, int64_t N, int64_t H, int64_t W,
                              int64_t C, float eps, int dtype, int num_threads);

// Number of float32 elements the backward workspace must hold.
int64_t dwconv_layernorm_bwd_cpu_workspace_size(int64_t N, int64_t H, int64_t W,
                                                int64_t C);

// Writes dx (dtype), dconv_weight (C, 1, 7, 7), dconv_bias, dnorm_weight,
// dnorm_bias (C each, float32; overwritten, not accumulated). The conv output
// is recomputed from x. Results do not depend on num_threads.
void dwconv_layernorm_bwd_cpu(const void* dy, const void* x,
                              const float* conv_weight, const float* conv_bias,
                              const float* norm_weight, const float* mean,
                              const float* rstd, void* dx, float* dconv_weight,
                              float* dconv_bias, float* dnorm_weight,
                              float* dnorm_bias, float* workspace,
                              int64_t workspace_floats, int64_t N, int64_t H,
                              int64_t W, int64_t C, int dtype, int num_threads);

// Name of the instruction-set variant the kernels dispatch to on this machine
// ("avx512", "avx2" or "generic"); CONVNEXT_KERNELS_CPU_ISA overrides it.
const char* dwconv_layernorm_cpu_isa();

}  // namespace convnext_kernels
