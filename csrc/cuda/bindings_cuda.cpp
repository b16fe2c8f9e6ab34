// pybind11 bindings of the CUDA kernels (host compiler: only the plain declarations of launch_api.h).
// All pointers are tensor.data_ptr() ints, `stream` is torch.cuda.current_stream().cuda_stream.
// Launches are asynchronous; the GIL is released while the host code enqueues them.
// Errors: std::invalid_argument -> ValueError (bad sizes / null pointers), std::runtime_error ->
// RuntimeError (carrying the CUDA error name and message).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "launch_api.h"

namespace py = pybind11;
namespace ck = convnext_kernels::cuda;

void register_cuda_bindings(pybind11::module_& m) {
  m.attr("CUDA_DTYPE_FLOAT32") = int(ck::kDTypeFloat32);
  m.attr("CUDA_DTYPE_FLOAT16") = int(ck::kDTypeFloat16);
  m.attr("CUDA_DTYPE_BFLOAT16") = int(ck::kDTypeBFloat16);

  m.def("dwconv_layernorm_fwd_cuda_workspace_bytes", &ck::dwconv_layernorm_fwd_workspace_bytes, py::arg("N"),
        py::arg("H"), py::arg("W"), py::arg("C"), "Bytes of scratch memory dwconv_layernorm_fwd_cuda needs.");
  m.def("dwconv_layernorm_fwd_cuda", &ck::dwconv_layernorm_fwd, py::arg("x"), py::arg("conv_weight"),
        py::arg("conv_bias"), py::arg("norm_weight"), py::arg("norm_bias"), py::arg("y"), py::arg("mean"),
        py::arg("rstd"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("N"), py::arg("H"), py::arg("W"),
        py::arg("C"), py::arg("eps"), py::arg("dtype"), py::arg("stream"), py::arg("ring_channels") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "Fused dwconv7x7(+bias) + LayerNorm forward (NHWC). conv_bias may be 0. ring_channels: channels a "
        "ring-kernel thread convolves, 1 or 2 (0: chosen by C; a benchmark switch).");

  m.def("dwconv_layernorm_bwd_cuda_workspace_bytes", &ck::dwconv_layernorm_bwd_workspace_bytes, py::arg("N"),
        py::arg("H"), py::arg("W"), py::arg("C"), "Bytes of scratch memory dwconv_layernorm_bwd_cuda needs.");
  m.def("dwconv_layernorm_bwd_cuda", &ck::dwconv_layernorm_bwd, py::arg("dy"), py::arg("x"), py::arg("conv_weight"),
        py::arg("conv_bias"), py::arg("norm_weight"), py::arg("mean"), py::arg("rstd"), py::arg("dx"),
        py::arg("dconv_weight"), py::arg("dconv_bias"), py::arg("dnorm_weight"), py::arg("dnorm_bias"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("N"), py::arg("H"), py::arg("W"), py::arg("C"),
        py::arg("dtype"), py::arg("stream"), py::arg("ring_channels") = 0, py::call_guard<py::gil_scoped_release>(),
        "Backward of dwconv_layernorm_fwd_cuda; fp32 parameter gradients are overwritten (deterministic). "
        "ring_channels as in dwconv_layernorm_fwd_cuda.");

  m.def("mlp_layerscale_fwd_cuda_workspace_bytes", &ck::mlp_layerscale_fwd_workspace_bytes, py::arg("x"),
        py::arg("shortcut"), py::arg("fc1_weight"), py::arg("fc1_bias"), py::arg("fc2_weight"),
        py::arg("fc2_bias"), py::arg("gamma"), py::arg("drop_scale"), py::arg("y"), py::arg("N"), py::arg("H"),
        py::arg("W"), py::arg("C"), py::arg("dtype"), py::arg("allow_fused"),
        "Bytes of scratch memory mlp_layerscale_fwd_cuda needs for these tensors and allow_fused on the "
        "current device: 0 when the fused kernel will run, rows * 4C elements for the two-GEMM path.");
  m.def("mlp_layerscale_fwd_cuda", &ck::mlp_layerscale_fwd, py::arg("x"), py::arg("shortcut"), py::arg("fc1_weight"),
        py::arg("fc1_bias"), py::arg("fc2_weight"), py::arg("fc2_bias"), py::arg("gamma"), py::arg("drop_scale"),
        py::arg("y"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("N"), py::arg("H"), py::arg("W"),
        py::arg("C"), py::arg("dtype"), py::arg("allow_tf32"), py::arg("allow_fused"), py::arg("allow_wgmma"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "y = shortcut + drop_scale[n] * gamma * (gelu(x W1^T + b1) W2^T + b2). gamma / drop_scale may be 0. "
        "allow_fused: fp16 / bf16 with C <= 384, C % 8 == 0 and 16-byte aligned tensors run the "
        "back-to-back fused kernel (hidden kept on chip); False forces the two-GEMM path. ValueError if "
        "workspace_bytes is below what the path taken needs (see mlp_layerscale_fwd_cuda_workspace_bytes). "
        "allow_wgmma: the fp16 / bf16 kernels (fused or two-GEMM) use wgmma where mlp_layerscale_cuda_wgmma_supported().");

  m.def("mlp_layerscale_bwd_cuda_workspace_bytes", &ck::mlp_layerscale_bwd_workspace_bytes, py::arg("N"),
        py::arg("H"), py::arg("W"), py::arg("C"), py::arg("dtype"),
        "Bytes of scratch memory mlp_layerscale_bwd_cuda needs.");
  m.def("mlp_layerscale_bwd_cuda", &ck::mlp_layerscale_bwd, py::arg("dy"), py::arg("x"), py::arg("fc1_weight"),
        py::arg("fc1_bias"), py::arg("fc2_weight"), py::arg("fc2_bias"), py::arg("gamma"), py::arg("drop_scale"),
        py::arg("dx"), py::arg("dfc1_weight"), py::arg("dfc1_bias"), py::arg("dfc2_weight"), py::arg("dfc2_bias"),
        py::arg("dgamma"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("N"), py::arg("H"), py::arg("W"),
        py::arg("C"), py::arg("dtype"), py::arg("allow_tf32"), py::arg("allow_wgmma"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Backward of mlp_layerscale_fwd_cuda (hidden recomputed); fp32 parameter gradients (deterministic). "
        "allow_wgmma: fp16 / bf16 GEMMs use wgmma where mlp_layerscale_cuda_wgmma_supported().");
  m.def("mlp_layerscale_cuda_wgmma_supported", &ck::mlp_layerscale_wgmma_supported,
        "Whether allow_wgmma takes effect on the current device: the extension was built for sm_90a and "
        "the device has compute capability 9.0 (the emulator: an H100, so True).");

  m.def("cuda_debug_launch", &ck::debug_launch, py::arg("block_threads"), py::arg("stream") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "Launches an empty kernel with block_threads threads (> 1024 is an invalid configuration): "
        "for testing that CUDA errors reach Python.");
}
