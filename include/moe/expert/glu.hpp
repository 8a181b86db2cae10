// SPDX-License-Identifier: Apache-2.0
#pragma once
// The gated (GLU) expert: out = (act(x · Wg + bg) ⊙ (x · Wu + bu)) · W2 + b2, one weight set
// per expert. SwiGLU (Mixtral, DeepSeek, Qwen) is glu<act::silu>; GeGLU is glu<act::gelu>.
//
// The gate and up projections are ONE weight, so that the CUDA backend runs them as one
// GEMM, stored as stacked halves [gate | up] along the last axis:
//
//   W13 (experts, hidden, 2·ffn)   W13[e, :, 0:F] = Wg[e],  W13[e, :, F:2F] = Wu[e]
//   b13 (experts, 2·ffn)           b13[e, 0:F]    = bg[e],  b13[e, F:2F]    = bu[e]  optional
//   W2  (experts, ffn, hidden)     b2  (experts, hidden)                            optional
//
// (A checkpoint that interleaves gate and up columns, or stores w1 and w3 separately as
// Mixtral's does, is converted once when loading.)
//
// The gated policy of the two-GEMM expert (two_layer.hpp, which holds both backends; the
// CUDA one is defined in kernels/glu.cuh, which needs nvcc).

#include <moe/core/dtype.hpp>
#include <moe/expert/activation.hpp>
#include <moe/expert/concepts.hpp>
#include <moe/expert/two_layer.hpp>

namespace moe::expert {

/// GLU expert with gate activation `Act`: act::silu gives SwiGLU, act::gelu GeGLU.
template <act::activation Act>
using glu = two_layer<Act, true>;

static_assert(trainable_expert<glu<act::silu>> && trainable_expert<glu<act::gelu>>);
static_assert(cuda_expert<glu<act::silu>, __nv_bfloat16> && cuda_expert<glu<act::gelu>, float>);

/// SwiGLU (Mixtral, DeepSeek-V3, Qwen3): glu<act::silu>.
using swiglu = glu<act::silu>;
/// GeGLU: glu<act::gelu>.
using geglu = glu<act::gelu>;

}  // namespace moe::expert
