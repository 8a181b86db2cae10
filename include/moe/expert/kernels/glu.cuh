// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA backend of expert::glu (glu.hpp declares it): include this header in the .cu file
// that calls glu<Act>::forward or ::backward with a cuda_backend. One GEMM gives the
// [gate | up] halves of W13 side by side; the kernel after it forms act(gate) ⊙ up.

#include <moe/expert/activation.hpp>
#include <moe/expert/device_state.hpp>
#include <moe/expert/glu.hpp>
#include <moe/expert/kernels/two_layer.cuh>

namespace moe::expert::detail {

template <act::activation Act>
struct cuda_backend_of<glu<Act>> : cuda_two_layer<true, Act> {};

}  // namespace moe::expert::detail
