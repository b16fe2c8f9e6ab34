// The CPU kernels' portable vector code on another architecture (built by tests/test_packaging.py
// with aarch64-linux-gnu-g++ and run under qemu-aarch64, and built natively): every kernel of
// dwconv_layernorm.h and mlp_layerscale.h, in each dtype, on fixed pseudo-random inputs, its
// outputs written to argv[1] as records (uint32 storage dtype code, uint32 count, the values as
// float32). The test compares the foreign build's file with the native build's (run with CONVNEXT_KERNELS_CPU_ISA=generic, the code path other architectures
// take, and which the Python suite checks against the reference).
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cpu_kernel_utils.h"  // DTYPE codes and the kernels' own 16-bit conversions
#include "dwconv_layernorm.h"
#include "mlp_layerscale.h"

namespace {

using namespace convnext_kernels;
using cpu::BFloat16;
using cpu::Half;

uint64_t state = 0x9e3779b97f4a7c15ull;
float uniform() {  // in [-1, 1), the same sequence on every architecture
  state = state * 6364136223846793005ull + 1442695040888963407ull;
  return float(int32_t(state >> 32)) * (1.0f / 2147483648.0f);
}
std::vector<float> randoms(size_t n, float scale = 1.f, float offset = 0.f) {
  std::vector<float> v(n);
  for (auto& x : v) x = offset + scale * uniform();
  return v;
}

// An activation buffer of `dtype` (bytes), filled from floats / read back as floats.
std::vector<uint16_t> to_16(const std::vector<float>& v, int dtype) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i)
    out[i] = dtype == kBFloat16 ? cpu::from_float<BFloat16>(v[i]).bits : cpu::from_float<Half>(v[i]).bits;
  return out;
}
struct Act {
  int dtype;
  std::vector<float> f32;
  std::vector<uint16_t> h16;
  Act(const std::vector<float>& v, int d) : dtype(d), f32(v) {
    if (d != kFloat32) h16 = to_16(v, d);
  }
  Act(size_t n, int d) : dtype(d), f32(d == kFloat32 ? n : 0), h16(d == kFloat32 ? 0 : n) {}
  void* data() { return dtype == kFloat32 ? static_cast<void*>(f32.data()) : static_cast<void*>(h16.data()); }
  std::vector<float> floats() const {
    if (dtype == kFloat32) return f32;
    std::vector<float> out(h16.size());
    for (size_t i = 0; i < h16.size(); ++i)
      out[i] = dtype == kBFloat16 ? cpu::to_float(BFloat16{h16[i]}) : cpu::to_float(Half{h16[i]});
    return out;
  }
};

FILE* out_file = nullptr;
// One record: values stored in `dtype` (so rounded to it), as float32.
void emit(const std::vector<float>& v, int dtype = kFloat32) {
  const uint32_t head[2] = {uint32_t(dtype), uint32_t(v.size())};
  fwrite(head, sizeof head, 1, out_file);
  fwrite(v.data(), sizeof(float), v.size(), out_file);
}
void emit(const Act& a) { emit(a.floats(), a.dtype); }

void dwconv_layernorm_case(int64_t N, int64_t H, int64_t W, int64_t C, int dtype) {
  const int64_t n = N * H * W * C;
  Act x(randoms(n), dtype), dy(randoms(n), dtype);
  auto cw = randoms(C * 49, 0.3f), cb = randoms(C), nw = randoms(C, 0.5f, 1.f), nb = randoms(C, 0.5f);
  Act y(n, dtype), dx(n, dtype);
  std::vector<float> mean(N * H * W), rstd(N * H * W);
  dwconv_layernorm_fwd_cpu(x.data(), cw.data(), cb.data(), nw.data(), nb.data(), y.data(), mean.data(),
                           rstd.data(), N, H, W, C, 1e-6f, dtype, 2);
  emit(y), emit(mean), emit(rstd);
  std::vector<float> dcw(C * 49), dcb(C), dnw(C), dnb(C);
  std::vector<float> ws(dwconv_layernorm_bwd_cpu_workspace_size(N, H, W, C));
  dwconv_layernorm_bwd_cpu(dy.data(), x.data(), cw.data(), cb.data(), nw.data(), mean.data(), rstd.data(),
                           dx.data(), dcw.data(), dcb.data(), dnw.data(), dnb.data(), ws.data(),
                           int64_t(ws.size()), N, H, W, C, dtype, 2);
  emit(dx), emit(dcw), emit(dcb), emit(dnw), emit(dnb);
}

void mlp_epilogues_case(int64_t rows, int64_t cols, int dtype) {
  const int64_t n = rows * cols;
  auto bias = randoms(cols);
  // GELU forward over the whole range (tails included), keeping a copy of the pre-activation.
  Act preact(randoms(n, 6.f), dtype), kept(n, dtype), hidden(n, dtype);
  mlp_layerscale_gelu_fwd_cpu(preact.data(), bias.data(), kept.data(), hidden.data(), rows, cols, dtype, dtype, 2);
  emit(kept), emit(hidden);
  // GELU backward: dL/da in float32 and in dtype, the hidden, the bias gradient.
  Act grad(randoms(n), dtype), grad_low(n, dtype), hidden_b(n, dtype);
  std::vector<float> grad_preact(n), bias_grad(cols, 0.f);
  std::vector<float> ws(mlp_layerscale_gelu_bwd_cpu_workspace_size(rows, cols));
  mlp_layerscale_gelu_bwd_cpu(kept.data(), bias.data(), grad.data(), grad_preact.data(),
                              dtype == kFloat32 ? nullptr : grad_low.data(), hidden_b.data(), bias_grad.data(),
                              ws.data(), int64_t(ws.size()), rows, cols, dtype, dtype, dtype, dtype, 2);
  emit(grad_preact), emit(hidden_b), emit(bias_grad);
  if (dtype != kFloat32) emit(grad_low);
  // The residual epilogue with every optional factor, and the transpose.
  Act z(randoms(n), dtype), shortcut(randoms(n), dtype), y(n, dtype);
  auto gamma = randoms(cols), scale = randoms(rows, 0.5f, 1.f);
  mlp_layerscale_residual_cpu(z.data(), bias.data(), scale.data(), gamma.data(), shortcut.data(), y.data(), rows,
                              cols, dtype, dtype, 2);
  emit(y);
  std::vector<float> t(n);
  transpose_to_float32_cpu(z.data(), t.data(), rows, cols, dtype, 2);
  emit(t);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2 || !(out_file = fopen(argv[1], "wb"))) {
    fprintf(stderr, "usage: %s OUTPUT\n", argv[0]);
    return 2;
  }
  try {
    for (int dtype : {kFloat32, kFloat16, kBFloat16}) {
      dwconv_layernorm_case(2, 5, 7, 40, dtype);  // C with a vector tail
      dwconv_layernorm_case(1, 13, 3, 96, dtype);
      mlp_epilogues_case(37, 160, dtype);
      mlp_epilogues_case(5, 20, dtype);  // a row shorter than a vector
    }
  } catch (const std::exception& e) {
    fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return fclose(out_file) == 0 ? 0 : 1;
}
