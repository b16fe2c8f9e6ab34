// The activation dtypes of the CPU kernels' raw-pointer API (the `dtype` argument).
#pragma once

namespace convnext_kernels {

enum ActivationDtype : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

}  // namespace convnext_kernels
