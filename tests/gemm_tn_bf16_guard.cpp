// Guard-page check of gemm_tn_bf16_cpu (built and run by tests/test_cpu_gemm_tn_bf16.py): every
// operand, the output and the workspace sit flush against an inaccessible page, after their last
// byte or before their first, so a read or write one element outside them faults. AddressSanitizer
// does not see the kernel's masked AVX-512 loads and stores; the page protection does. Each result
// is also checked against a double-precision sum of the bf16-rounded operands. Exit status 0: all
// passed.
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "cpu_kernel_utils.h"  // the DTYPE_* codes and the kernels' own bf16 rounding
#include "gemm_tn_bf16.h"

namespace {

using convnext_kernels::kBFloat16;
using convnext_kernels::kFloat32;
using convnext_kernels::cpu::BFloat16;

// `bytes` of memory with an inaccessible page right after its end (flush_end) or right before its
// start. Never freed: the process is short.
void* guarded(size_t bytes, bool flush_end) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t pages = (bytes + page - 1) / page + 2;
  char* base = static_cast<char*>(mmap(nullptr, pages * page, PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (base == MAP_FAILED) return nullptr;
  mprotect(base, page, PROT_NONE);
  mprotect(base + (pages - 1) * page, page, PROT_NONE);
  return flush_end ? base + (pages - 1) * page - bytes : base + page;
}

float bf16_round(float f) {
  return convnext_kernels::cpu::to_float(convnext_kernels::cpu::from_float<BFloat16>(f));
}

// An operand of values.size() values of dtype, filled from `values` (bf16: rounded).
void* operand(const std::vector<float>& values, int dtype, bool flush_end) {
  const size_t n = values.size();
  if (dtype == kFloat32) {
    float* p = static_cast<float*>(guarded(n * 4, flush_end));
    std::memcpy(p, values.data(), n * 4);
    return p;
  }
  BFloat16* p = static_cast<BFloat16*>(guarded(n * 2, flush_end));
  for (size_t i = 0; i < n; ++i) p[i] = convnext_kernels::cpu::from_float<BFloat16>(values[i]);
  return p;
}

int check(int64_t rows, int64_t p, int64_t q, int a_dtype, int b_dtype, bool flush_end,
          bool accumulate, int threads) {
  std::vector<float> a(size_t(rows * p)), b(size_t(rows * q)), c0(size_t(p * q));
  uint32_t state = uint32_t(rows * 131 + p * 17 + q);
  auto next = [&] { state = state * 1664525u + 1013904223u; return float(int(state >> 9) % 2001 - 1000) / 500.f; };
  for (float& v : a) v = next();
  for (float& v : b) v = next();
  for (float& v : c0) v = next();
  void* da = operand(a, a_dtype, flush_end);
  void* db = operand(b, b_dtype, flush_end);
  float* c = static_cast<float*>(guarded(size_t(p * q) * 4 + 1, flush_end));  // (+1: never 0 bytes)
  std::memcpy(c, c0.data(), size_t(p * q) * 4);
  const int64_t ws_floats = convnext_kernels::gemm_tn_bf16_cpu_workspace_size(rows, p, q);
  float* ws = static_cast<float*>(guarded(size_t(ws_floats) * 4 + 1, flush_end));
  if (!da || !db || !c || !ws) return 1;
  convnext_kernels::gemm_tn_bf16_cpu(da, p, a_dtype, db, q, b_dtype, c, q, rows, p, q, accumulate,
                                     ws, ws_floats, threads);
  for (int64_t i = 0; i < p; ++i)
    for (int64_t j = 0; j < q; ++j) {
      double sum = accumulate ? c0[size_t(i * q + j)] : 0.0, scale = std::fabs(sum);
      for (int64_t r = 0; r < rows; ++r) {
        const double x = double(bf16_round(a[size_t(r * p + i)])) * bf16_round(b[size_t(r * q + j)]);
        sum += x;
        scale += std::fabs(x);
      }
      if (std::fabs(c[i * q + j] - sum) > 2.0 * double(rows + 1) * std::ldexp(scale, -24)) {
        std::printf("mismatch rows=%ld p=%ld q=%ld at (%ld, %ld): %g vs %g\n", long(rows), long(p),
                    long(q), long(i), long(j), double(c[i * q + j]), sum);
        return 1;
      }
    }
  return 0;
}

}  // namespace

int main() {
  if (!convnext_kernels::gemm_tn_bf16_cpu_supported()) return 77;  // skipped
  // Shapes at and around the 8 x 48 tiles, the 16-column packing vectors, odd rows and the
  // 256-row blocks.
  const int64_t shapes[][3] = {{1, 1, 1},   {2, 8, 48},  {3, 7, 47},   {5, 9, 49},  {7, 15, 17},
                               {9, 16, 95}, {33, 40, 5}, {257, 17, 97}, {300, 100, 70}, {513, 23, 131}};
  int failures = 0, cases = 0;
  for (const auto& s : shapes)
    for (int a_dtype : {kFloat32, kBFloat16})
      for (int b_dtype : {kFloat32, kBFloat16})
        for (bool flush_end : {true, false})
          for (bool accumulate : {false, true})
            for (int threads : {1, 3}) {
              failures += check(s[0], s[1], s[2], a_dtype, b_dtype, flush_end, accumulate, threads);
              ++cases;
            }
  std::printf("%d of %d cases passed\n", cases - failures, cases);
  return failures == 0 ? 0 : 1;
}
