// SPDX-License-Identifier: Apache-2.0
#pragma once
// The feed-forward expert: out = act(x · W1 + b1) · W2 + b2, one weight set per expert.
//
//   W1 (experts, hidden, ffn)   b1 (experts, ffn)     optional
//   W2 (experts, ffn, hidden)   b2 (experts, hidden)  optional
//
// The ungated policy of the two-GEMM expert (two_layer.hpp, which holds both backends; the
// CUDA one is defined in kernels/ffn.cuh, which needs nvcc).

#include <moe/core/dtype.hpp>
#include <moe/expert/activation.hpp>
#include <moe/expert/concepts.hpp>
#include <moe/expert/two_layer.hpp>

namespace moe::expert {

/// FFN expert with activation `Act` (act::relu, act::gelu, act::silu).
template <act::activation Act>
using ffn = two_layer<Act, false>;

static_assert(trainable_expert<ffn<act::relu>> && trainable_expert<ffn<act::gelu>> &&
              trainable_expert<ffn<act::silu>>);
static_assert(cuda_expert<ffn<act::gelu>, float> && cuda_expert<ffn<act::gelu>, __half> &&
              cuda_expert<ffn<act::silu>, __nv_bfloat16>);

}  // namespace moe::expert
