// The elementwise passes of the CPU mlp_layerscale (Linear -> GELU -> Linear), between the
// GEMMs that torch runs (oneDNN where torch has it, else MKL). In eager PyTorch
// the fc1 epilogue is three or four passes over the (rows, 4C) hidden: the bias copy of addmm,
// GELU, and in backward GELU again, its derivative and the bias-gradient sum. Here it is one
// pass each way, with the exact-erf GELU evaluated once per element.
//
// Raw-pointer API, row-major (rows, cols) buffers; cols is fc1's output width (4C). The
// pre-activation read and the gradients are float32; the hidden and the forward's stored
// pre-activation are written in `dtype` (see ActivationDtype), the activations' dtype. All functions validate their
// arguments and throw std::invalid_argument. Results do not depend on num_threads
// (<= 0: the OpenMP default).
#pragma once

#include <cstdint>

#include "activation_dtype.h"

namespace convnext_kernels {

// a = preact + bias (bias may be null); hidden = gelu(a) in dtype, and preact_out (null: not
// kept) receives a in dtype, the pre-activation that backward reads when it is stored. Either
// may be preact itself when dtype is float32, not both.
void mlp_layerscale_gelu_fwd_cpu(const float* preact, const float* bias, void* preact_out,
                                 void* hidden, int64_t rows, int64_t cols, int dtype,
                                 int num_threads);

// Number of float32 elements mlp_layerscale_gelu_bwd_cpu's workspace must hold.
int64_t mlp_layerscale_gelu_bwd_cpu_workspace_size(int64_t rows, int64_t cols);

// With a = preact + bias (bias may be null): hidden = gelu(a) in dtype (for fc2's weight
// gradient), grad = grad * gelu'(a) in place (dL/dhidden in, dL/da out), and
// bias_grad[c] += sum over rows of the new grad[:, c], summed in an order fixed by the shape.
// preact is only read, unless hidden is preact itself (allowed when dtype is float32): it is then
// overwritten by the hidden.
void mlp_layerscale_gelu_bwd_cpu(float* preact, const float* bias, float* grad,
                                 void* hidden, float* bias_grad, float* workspace,
                                 int64_t workspace_floats, int64_t rows, int64_t cols, int dtype,
                                 int num_threads);

}  // namespace convnext_kernels
