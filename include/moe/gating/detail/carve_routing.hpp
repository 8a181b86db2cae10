// SPDX-License-Identifier: Apache-2.0
#pragma once
// What the host and the CUDA routing states (host_routing.hpp, device_routing.hpp) lay out
// alike, in one order: logits and scores (T, E) in the backend's real type, expert, weight
// and slot (T, k), and the loads (E).

#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>

#include <cstdint>
#include <string>

namespace moe::gating::detail {

/// Carves r's views for up to `max_tokens` tokens and `max_k` choices and returns them with
/// `tokens` tokens and `k` choices (the layout depends on neither).
template <class Real, class Routing>
void carve_routing_views(workspace_carver& carver, Routing& r, index_t max_tokens, int max_k,
                         index_t tokens, index_t experts, int k) {
  MOE_EXPECTS(k >= 0 && k <= max_k && tokens <= max_tokens, "k",
              "views of " + std::to_string(tokens) + " tokens and k = " + std::to_string(k) +
                  " do not fit a layout for " + std::to_string(max_tokens) +
                  " tokens and k = " + std::to_string(max_k));
  r.logits = make_view(carver.take<Real>(max_tokens * experts), tokens, experts);
  r.scores = make_view(carver.take<Real>(max_tokens * experts), tokens, experts);
  r.expert = make_view(carver.take<std::int32_t>(max_tokens * max_k), tokens, k);
  r.weight = make_view(carver.take<Real>(max_tokens * max_k), tokens, k);
  r.slot = make_view(carver.take<std::int64_t>(max_tokens * max_k), tokens, k);
  r.load = make_view(carver.take<std::int64_t>(experts), experts);
}

}  // namespace moe::gating::detail
