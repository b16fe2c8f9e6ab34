// The elementwise passes of the CPU mlp_layerscale (Linear -> GELU -> Linear -> layer scale ->
// residual), between and after the GEMMs that torch runs (oneDNN or MKL: see launchers/cpu.py). In eager PyTorch
// the fc1 epilogue is three or four passes over the (rows, 4C) hidden: the bias copy of addmm,
// GELU, and in backward GELU again, its derivative and the bias-gradient sum. Here it is one
// pass each way, with the exact-erf GELU evaluated once per element.
//
// Raw-pointer API, row-major (rows, cols) buffers; cols is fc1's output width (4C) for the GELU
// epilogues, C for the residual one. `dtype` (see ActivationDtype) is the activations' dtype;
// the GEMM outputs read (pre-activation, incoming gradient, fc2's output) are float32 or of
// `dtype`, as the GEMM made them (a 16-bit GEMM's output is read as it is, not through a
// float32 copy); biases, scales, the bias gradient and workspaces are float32.
// All functions validate their arguments and throw std::invalid_argument. Results do not
// depend on num_threads (<= 0: the OpenMP default).
#pragma once

#include <cstdint>

#include "activation_dtype.h"

namespace convnext_kernels {

// a = preact + bias (bias may be null); hidden = gelu(a) in dtype; preact_out (null: not kept)
// receives a copy of preact, the GEMM's own output without the bias, that backward reads with
// the same bias added (so it differentiates at the very a the forward used); preact_out needs
// preact_dtype equal to dtype. hidden may be preact itself when preact_dtype equals dtype.
void mlp_layerscale_gelu_fwd_cpu(const void* preact, const float* bias, void* preact_out,
                                 void* hidden, int64_t rows, int64_t cols, int dtype,
                                 int preact_dtype, int num_threads);

// Number of float32 elements mlp_layerscale_gelu_bwd_cpu's workspace must hold.
int64_t mlp_layerscale_gelu_bwd_cpu_workspace_size(int64_t rows, int64_t cols);

// With a = preact + bias (bias may be null): grad_preact = grad * gelu'(a) (dL/dhidden in,
// dL/da out, float32), grad_preact_low = the same rounded to dtype (the operand of the 16-bit dx
// GEMM; either may be null, not written, but not both), hidden = gelu(a) rounded to dtype (for
// fc2's weight gradient), and bias_grad[c] += sum over rows of the float32 dL/da[:, c], summed in
// an order fixed by the shape.
// grad is float32 or of dtype (grad_dtype); hidden is stored as dtype or as float32
// (hidden_dtype; float32 holding the dtype-rounded values, for a float32 GEMM). grad_preact may
// be grad itself when grad is float32 (in place), and hidden may be preact itself when both have
// one dtype (preact is then overwritten by the hidden); otherwise the buffers are distinct.
void mlp_layerscale_gelu_bwd_cpu(void* preact, const float* bias, const void* grad,
                                 float* grad_preact, void* grad_preact_low, void* hidden,
                                 float* bias_grad, float* workspace, int64_t workspace_floats,
                                 int64_t rows, int64_t cols, int dtype, int preact_dtype,
                                 int grad_dtype, int hidden_dtype, int num_threads);

// fc2's epilogue: y = shortcut + gamma * (row_scale * (z + bias)), in float32, written in dtype;
// z (fc2's GEMM output) is float32 or of dtype (z_dtype); bias, gamma (cols) and row_scale
// (rows, the drop-path factors) may each be null (none). y may be shortcut or, when z is of
// dtype, z itself (each element is read before it is written).
void mlp_layerscale_residual_cpu(const void* z, const float* bias, const float* row_scale,
                                 const float* gamma, const void* shortcut, void* y, int64_t rows,
                                 int64_t cols, int dtype, int z_dtype, int num_threads);

// dst (cols, rows) float32 = the transpose of src (rows, cols) of dtype, converted exactly: the
// contiguous row-major operand oneDNN's GEMM takes for a weight gradient a.T @ b (torch's
// strided copy_ was 3-5x slower). dst must not overlap src.
void transpose_to_float32_cpu(const void* src, float* dst, int64_t rows, int64_t cols, int dtype,
                              int num_threads);

}  // namespace convnext_kernels
