// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA path of the combine weights (gating/weights.hpp): once the capacity is known on
// the device, the pre-drop weights router_select wrote become w = α · s / D, 0 when dropped.

#include <moe/core/checked.hpp>
#include <moe/core/config.hpp>
#include <moe/core/kernels/shapes.cuh>
#include <moe/core/view.hpp>
#include <moe/gating/device_routing.hpp>
#include <moe/gating/weights.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace moe::gating::detail {

/// Turns the pre-drop weights into combine weights once the capacity is known (weights.hpp):
/// w = α · s / D for a kept assignment and 0 for a dropped one. router_select already
/// divided by the selected experts' sum when the call renormalises before drops; after
/// drops, D is the sum over the kept ones (1 when it is 0). A thread per token.
struct finalize_weights : moe::detail::thread_per_item<finalize_weights> {
  struct params {
    std::int64_t const* slot;  // (tokens, k) device memory
    float* weight;             // (tokens, k) in: pre-drop weights; out: combine weights
    index_t tokens;
    int k;
    bool normalize_after;                   // divide by the sum over the kept assignments
    float scaling_factor;                   // α
    device_routing_scalars const* scalars;  // capacity, written by assign_slots
  };
  static index_t items(params const& p) { return p.tokens; }

  __device__ void operator()(params const& p, char*) const {
    index_t const t = item();
    if (t >= p.tokens) return;
    finalize_token_weights(p.weight + t * p.k, p.slot + t * p.k, p.k, p.scalars->capacity,
                           p.normalize_after, p.scaling_factor);
  }
};

}  // namespace moe::gating::detail
