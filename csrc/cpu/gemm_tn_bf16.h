// C = A^T B in float32 from bf16 operands, on x86-64 CPUs with AVX512-BF16: the weight gradients
// of mlp_layerscale's Linears under bf16 autocast (launchers/cpu.py). torch has no CPU GEMM that
// takes bf16 and returns float32: its bf16 GEMMs round the product to bf16, and the float32 ones
// run at about half the bf16 rate. Raw pointers, no torch: Python owns the memory.
#pragma once

#include <cstdint>

namespace convnext_kernels {

// Whether gemm_tn_bf16_cpu runs here: an x86-64 CPU with AVX-512 and AVX512-BF16, and the
// instruction set not lowered by CONVNEXT_KERNELS_CPU_ISA.
bool gemm_tn_bf16_cpu_supported();

// Number of float32 elements gemm_tn_bf16_cpu's workspace must hold (the packed operands).
int64_t gemm_tn_bf16_cpu_workspace_size(int64_t rows, int64_t p, int64_t q);

// c (p, q, row stride ldc) = [c +] a^T b for a (rows, p) and b (rows, q), row-major with row
// strides lda and ldb, each float32 or bfloat16 (a_dtype, b_dtype: DTYPE_* codes; float32
// values are rounded to bf16 first, to nearest even). Each product of two bf16 values is exact
// in float32 unless it overflows or falls below float32's normal range, and the sums run in
// float32 (vdpbf16ps, which reads subnormal inputs as zero and flushes subnormal results to
// zero), in an order fixed by the shape whatever num_threads is: each block of 256 rows is summed
// on its own, and the blocks' sums are added in order to the old c (accumulate) or to the first
// block's. c must not overlap a, b or the workspace. Throws std::invalid_argument on bad
// arguments and std::runtime_error where gemm_tn_bf16_cpu_supported() is false.
void gemm_tn_bf16_cpu(const void* a, int64_t lda, int a_dtype, const void* b, int64_t ldb,
                      int b_dtype, float* c, int64_t ldc, int64_t rows, int64_t p, int64_t q,
                      bool accumulate, float* workspace, int64_t workspace_floats,
                      int num_threads);

}  // namespace convnext_kernels
