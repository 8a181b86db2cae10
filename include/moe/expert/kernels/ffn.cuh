// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA backend of expert::ffn (ffn.hpp declares it): include this header in the .cu file
// that calls ffn<Act>::forward or ::backward with a cuda_backend. The GEMM sequence and the
// kernels are shared with the glu expert (two_layer.cuh).

#include <moe/expert/activation.hpp>
#include <moe/expert/device_state.hpp>
#include <moe/expert/ffn.hpp>
#include <moe/expert/kernels/two_layer.cuh>

namespace moe::expert::detail {

template <act::activation Act>
struct cuda_backend_of<ffn<Act>> : cuda_two_layer<false, Act> {};

}  // namespace moe::expert::detail
