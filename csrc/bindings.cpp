// pybind11 module convnext_kernels._C. Plain C++: no torch headers, tensors
// arrive as raw data pointers (Python ints) plus sizes; Python owns all memory.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/dwconv_layernorm.h"
#include "cpu/gemm_tn_bf16.h"
#include "cpu/mlp_layerscale.h"

namespace py = pybind11;

#ifdef CONVNEXT_KERNELS_WITH_CUDA
// Defined by the CUDA sources (csrc/cuda/bindings_cuda.cpp).
void register_cuda_bindings(pybind11::module_& m);
#endif

#ifndef CONVNEXT_KERNELS_COMPILER
#define CONVNEXT_KERNELS_COMPILER "unknown"
#endif
#ifndef CONVNEXT_KERNELS_OPENMP
#define CONVNEXT_KERNELS_OPENMP 0
#endif
#ifndef CONVNEXT_KERNELS_CUDA_ENABLED
#define CONVNEXT_KERNELS_CUDA_ENABLED 0
#endif
#ifndef CONVNEXT_KERNELS_CUDA_VERSION
#define CONVNEXT_KERNELS_CUDA_VERSION ""
#endif
#ifndef CONVNEXT_KERNELS_CUDA_ARCHS
#define CONVNEXT_KERNELS_CUDA_ARCHS ""
#endif

namespace {

// The CPU's vendor: "amd", "intel" or "other" on x86, "" elsewhere. The cpu backend picks the
// library of its fp32 GEMMs by it (convnext_kernels/launchers/cpu.py).
std::string cpu_vendor() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_is("amd")) return "amd";
  if (__builtin_cpu_is("intel")) return "intel";
  return "other";
#else
  return "";
#endif
}

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

std::vector<std::string> split_commas(const std::string& s) {
  // CMake lists are passed comma-separated (a ';' would split the definition).
  std::vector<std::string> out;
  std::stringstream stream(s);
  std::string item;
  while (std::getline(stream, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

py::dict build_info() {
  py::dict info;
  info["compiler"] = std::string(CONVNEXT_KERNELS_COMPILER);
  info["openmp"] = bool(CONVNEXT_KERNELS_OPENMP);
  info["cuda"] = bool(CONVNEXT_KERNELS_CUDA_ENABLED);
  const std::string cuda_version = CONVNEXT_KERNELS_CUDA_VERSION;
  info["cuda_version"] = cuda_version.empty() ? py::object(py::none()) : py::str(cuda_version);
  info["cuda_archs"] = split_commas(CONVNEXT_KERNELS_CUDA_ARCHS);
#ifdef CONVNEXT_KERNELS_WITH_CUDA
  info["cuda_kernels"] = true;
#else
  info["cuda_kernels"] = false;  // CUDA enabled but no csrc/cuda sources were built
#endif
  info["cpu_isa"] = std::string(convnext_kernels::dwconv_layernorm_cpu_isa());
  // Whether the bf16 weight-gradient GEMMs run on AVX512-BF16 here (a property of this CPU).
  info["cpu_bf16_dot"] = convnext_kernels::gemm_tn_bf16_cpu_supported();
  info["cpu_vendor"] = cpu_vendor();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "convnext_kernels compiled kernels (raw-pointer API; see convnext_kernels/launchers)";

  m.attr("DTYPE_FLOAT32") = int(convnext_kernels::kFloat32);
  m.attr("DTYPE_FLOAT16") = int(convnext_kernels::kFloat16);
  m.attr("DTYPE_BFLOAT16") = int(convnext_kernels::kBFloat16);

  m.def("build_info", &build_info,
        "Dict: compiler, openmp, cuda, cuda_version, cuda_archs, cuda_kernels, cpu_isa, cpu_bf16_dot, "
        "cpu_vendor.");

  // The kernels run with the GIL released: they only touch memory that the
  // calling Python frame keeps alive.
  m.def(
      "dwconv_layernorm_fwd_cpu",
      [](std::uintptr_t x, std::uintptr_t conv_weight, std::uintptr_t conv_bias,
         std::uintptr_t norm_weight, std::uintptr_t norm_bias, std::uintptr_t y,
         std::uintptr_t mean, std::uintptr_t rstd, int64_t N, int64_t H, int64_t W,
         int64_t C, double eps, int dtype, int num_threads) {
        convnext_kernels::dwconv_layernorm_fwd_cpu(
            as_ptr<const void>(x), as_ptr<const float>(conv_weight),
            as_ptr<const float>(conv_bias), as_ptr<const float>(norm_weight),
            as_ptr<const float>(norm_bias), as_ptr<void>(y), as_ptr<float>(mean),
            as_ptr<float>(rstd), N, H, W, C, float(eps), dtype, num_threads);
      },
      py::arg("x"), py::arg("conv_weight"), py::arg("conv_bias"), py::arg("norm_weight"),
      py::arg("norm_bias"), py::arg("y"), py::arg("mean"), py::arg("rstd"), py::arg("N"),
      py::arg("H"), py::arg("W"), py::arg("C"), py::arg("eps"), py::arg("dtype"),
      py::arg("num_threads") = 0, py::call_guard<py::gil_scoped_release>(),
      "Fused 7x7 depthwise conv + bias + LayerNorm forward (NHWC). Pointers are "
      "data_ptr() ints; conv_bias may be 0. dtype: DTYPE_* code of x and y.");

  m.def("dwconv_layernorm_bwd_cpu_workspace_size",
        &convnext_kernels::dwconv_layernorm_bwd_cpu_workspace_size, py::arg("N"),
        py::arg("H"), py::arg("W"), py::arg("C"),
        "Float32 elements needed by dwconv_layernorm_bwd_cpu's workspace.");

  m.def(
      "dwconv_layernorm_bwd_cpu",
      [](std::uintptr_t dy, std::uintptr_t x, std::uintptr_t conv_weight,
         std::uintptr_t conv_bias, std::uintptr_t norm_weight, std::uintptr_t mean,
         std::uintptr_t rstd, std::uintptr_t dx, std::uintptr_t dconv_weight,
         std::uintptr_t dconv_bias, std::uintptr_t dnorm_weight, std::uintptr_t dnorm_bias,
         std::uintptr_t workspace, int64_t workspace_floats, int64_t N, int64_t H, int64_t W,
         int64_t C, int dtype, int num_threads) {
        convnext_kernels::dwconv_layernorm_bwd_cpu(
            as_ptr<const void>(dy), as_ptr<const void>(x), as_ptr<const float>(conv_weight),
            as_ptr<const float>(conv_bias), as_ptr<const float>(norm_weight),
            as_ptr<const float>(mean), as_ptr<const float>(rstd), as_ptr<void>(dx),
            as_ptr<float>(dconv_weight), as_ptr<float>(dconv_bias), as_ptr<float>(dnorm_weight),
            as_ptr<float>(dnorm_bias), as_ptr<float>(workspace), workspace_floats, N, H, W, C,
            dtype, num_threads);
      },
      py::arg("dy"), py::arg("x"), py::arg("conv_weight"), py::arg("conv_bias"),
      py::arg("norm_weight"), py::arg("mean"), py::arg("rstd"), py::arg("dx"),
      py::arg("dconv_weight"), py::arg("dconv_bias"), py::arg("dnorm_weight"),
      py::arg("dnorm_bias"), py::arg("workspace"), py::arg("workspace_floats"), py::arg("N"),
      py::arg("H"), py::arg("W"), py::arg("C"), py::arg("dtype"), py::arg("num_threads") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "Backward of dwconv_layernorm_fwd_cpu: writes dx and the float32 parameter "
      "gradients (overwritten). Deterministic for any num_threads.");

  m.def(
      "mlp_layerscale_gelu_fwd_cpu",
      [](std::uintptr_t preact, std::uintptr_t bias, std::uintptr_t preact_out,
         std::uintptr_t hidden, int64_t rows, int64_t cols, int dtype, int preact_dtype,
         int num_threads) {
        convnext_kernels::mlp_layerscale_gelu_fwd_cpu(
            as_ptr<const void>(preact), as_ptr<const float>(bias), as_ptr<void>(preact_out),
            as_ptr<void>(hidden), rows, cols, dtype, preact_dtype, num_threads);
      },
      py::arg("preact"), py::arg("bias"), py::arg("preact_out"), py::arg("hidden"),
      py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("preact_dtype"),
      py::arg("num_threads") = 0, py::call_guard<py::gil_scoped_release>(),
      "fc1 epilogue of mlp_layerscale: with a = preact (rows, cols) + bias (float32; may be 0), "
      "hidden = exact-erf gelu(a) in dtype (DTYPE_* code) and preact_out (0: not written) = a "
      "copy of preact; preact is float32 (preact_dtype DTYPE_FLOAT32) or of dtype "
      "(required with preact_out), and when of dtype hidden may be preact itself.");

  m.def("mlp_layerscale_gelu_bwd_cpu_workspace_size",
        &convnext_kernels::mlp_layerscale_gelu_bwd_cpu_workspace_size, py::arg("rows"),
        py::arg("cols"), "Float32 elements needed by mlp_layerscale_gelu_bwd_cpu's workspace.");

  m.def(
      "mlp_layerscale_gelu_bwd_cpu",
      [](std::uintptr_t preact, std::uintptr_t bias, std::uintptr_t grad,
         std::uintptr_t grad_preact, std::uintptr_t grad_preact_low, std::uintptr_t hidden,
         std::uintptr_t bias_grad, std::uintptr_t workspace, int64_t workspace_floats,
         int64_t rows, int64_t cols, int dtype, int preact_dtype, int grad_dtype,
         int hidden_dtype, int num_threads) {
        convnext_kernels::mlp_layerscale_gelu_bwd_cpu(
            as_ptr<void>(preact), as_ptr<const float>(bias), as_ptr<const void>(grad),
            as_ptr<float>(grad_preact), as_ptr<void>(grad_preact_low), as_ptr<void>(hidden),
            as_ptr<float>(bias_grad), as_ptr<float>(workspace), workspace_floats, rows, cols,
            dtype, preact_dtype, grad_dtype, hidden_dtype, num_threads);
      },
      py::arg("preact"), py::arg("bias"), py::arg("grad"), py::arg("grad_preact"),
      py::arg("grad_preact_low"), py::arg("hidden"), py::arg("bias_grad"), py::arg("workspace"),
      py::arg("workspace_floats"), py::arg("rows"), py::arg("cols"), py::arg("dtype"),
      py::arg("preact_dtype"), py::arg("grad_dtype"), py::arg("hidden_dtype"),
      py::arg("num_threads") = 0, py::call_guard<py::gil_scoped_release>(),
      "Backward of the fc1 epilogue: with a = preact + bias, grad_preact = grad * gelu'(a) "
      "(float32; may be grad itself when that is float32), grad_preact_low = the same in dtype "
      "(0: not written), hidden = gelu(a) rounded to dtype, stored in hidden_dtype, and "
      "bias_grad += column sums of grad_preact (fixed order, any num_threads). preact, grad "
      "and hidden are each float32 or of dtype (DTYPE_* codes).");

  m.def(
      "mlp_layerscale_residual_cpu",
      [](std::uintptr_t z, std::uintptr_t bias, std::uintptr_t row_scale, std::uintptr_t gamma,
         std::uintptr_t shortcut, std::uintptr_t y, int64_t rows, int64_t cols, int dtype,
         int z_dtype, int num_threads) {
        convnext_kernels::mlp_layerscale_residual_cpu(
            as_ptr<const void>(z), as_ptr<const float>(bias), as_ptr<const float>(row_scale),
            as_ptr<const float>(gamma), as_ptr<const void>(shortcut), as_ptr<void>(y), rows, cols,
            dtype, z_dtype, num_threads);
      },
      py::arg("z"), py::arg("bias"), py::arg("row_scale"), py::arg("gamma"), py::arg("shortcut"),
      py::arg("y"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("z_dtype"),
      py::arg("num_threads") = 0, py::call_guard<py::gil_scoped_release>(),
      "fc2 epilogue of mlp_layerscale: y = shortcut + gamma * (row_scale * (z + bias)) in float32, "
      "written in dtype; z float32 or of dtype (z_dtype); bias, row_scale (per row) and gamma "
      "may be 0 (none).");

  m.def(
      "transpose_to_float32_cpu",
      [](std::uintptr_t src, std::uintptr_t dst, int64_t rows, int64_t cols, int dtype,
         int num_threads) {
        convnext_kernels::transpose_to_float32_cpu(as_ptr<const void>(src), as_ptr<float>(dst), rows,
                                                   cols, dtype, num_threads);
      },
      py::arg("src"), py::arg("dst"), py::arg("rows"), py::arg("cols"), py::arg("dtype"),
      py::arg("num_threads") = 0, py::call_guard<py::gil_scoped_release>(),
      "dst (cols, rows) float32 = src (rows, cols) of dtype (DTYPE_* code) transposed.");

  m.def("gemm_tn_bf16_cpu_supported", &convnext_kernels::gemm_tn_bf16_cpu_supported,
        "Whether gemm_tn_bf16_cpu runs on this CPU (x86-64 with AVX512-BF16).");
  m.def("gemm_tn_bf16_cpu_workspace_size", &convnext_kernels::gemm_tn_bf16_cpu_workspace_size,
        py::arg("rows"), py::arg("p"), py::arg("q"),
        "Float32 elements needed by gemm_tn_bf16_cpu's workspace.");
  m.def(
      "gemm_tn_bf16_cpu",
      [](std::uintptr_t a, int64_t lda, int a_dtype, std::uintptr_t b, int64_t ldb, int b_dtype,
         std::uintptr_t c, int64_t ldc, int64_t rows, int64_t p, int64_t q, bool accumulate,
         std::uintptr_t workspace, int64_t workspace_floats, int num_threads) {
        convnext_kernels::gemm_tn_bf16_cpu(as_ptr<const void>(a), lda, a_dtype,
                                           as_ptr<const void>(b), ldb, b_dtype, as_ptr<float>(c),
                                           ldc, rows, p, q, accumulate, as_ptr<float>(workspace),
                                           workspace_floats, num_threads);
      },
      py::arg("a"), py::arg("lda"), py::arg("a_dtype"), py::arg("b"), py::arg("ldb"),
      py::arg("b_dtype"), py::arg("c"), py::arg("ldc"), py::arg("rows"), py::arg("p"),
      py::arg("q"), py::arg("accumulate"), py::arg("workspace"), py::arg("workspace_floats"),
      py::arg("num_threads") = 0, py::call_guard<py::gil_scoped_release>(),
      "c (p, q) float32 = [c +] a.T @ b for a (rows, p) and b (rows, q), each float32 "
      "(rounded to bf16) or bfloat16 (DTYPE_* codes), with AVX512-BF16 dot products summed in "
      "float32 in a fixed order.");

#ifdef CONVNEXT_KERNELS_WITH_CUDA
  register_cuda_bindings(m);
#endif
}
