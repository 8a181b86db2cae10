// SPDX-License-Identifier: Apache-2.0
#pragma once
// A router for hand-worked cases: T one-hot tokens (H = T), so that token t's logits are row
// t of W_gate, written out by the test. Carves the routing state once for the largest k and
// routes any gate with any gate_args through the host backend.

#include <moe/gating.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

namespace moe::test {

/// What a hand-worked case expects of a routing's (tokens, k) experts and slots, row-major.
using ints = std::vector<std::int32_t>;
using slots = std::vector<std::int64_t>;

struct hand_router {
  index_t tokens, experts;
  int max_k;
  std::vector<double> x, w_gate;  // (tokens, tokens) identity, (tokens, experts) the logits
  host_buffer buffer;
  gating::host_routing r;

  hand_router(std::vector<std::vector<double>> const& logits, int max_k_)
      : tokens(static_cast<index_t>(logits.size())),
        experts(static_cast<index_t>(logits.at(0).size())),
        max_k(max_k_),
        x(static_cast<std::size_t>(tokens * tokens)),
        w_gate(static_cast<std::size_t>(tokens * experts)) {
    for (index_t t = 0; t < tokens; ++t) {
      x[static_cast<std::size_t>(t * tokens + t)] = 1;
      for (index_t e = 0; e < experts; ++e)
        w_gate[static_cast<std::size_t>(t * experts + e)] =
            logits[static_cast<std::size_t>(t)][static_cast<std::size_t>(e)];
    }
    workspace_carver counter;
    (void)gating::carve_host_routing(counter, tokens, max_k, tokens, experts, max_k);
    buffer = host_buffer(counter.bytes());
  }

  /// Logits ln p from proportions p (softmax then gives p / Σ p).
  static std::vector<std::vector<double>> log_of(std::vector<std::vector<double>> p) {
    for (auto& row : p)
      for (double& v : row) v = std::log(v);
    return p;
  }

  /// Routes with `gate` and `args` (tokens and experts filled in); carves for the gate's k.
  template <class G, class ReduceMaxLoad = std::identity>
  gating::routing_summary route(G const& gate, gating::gate_args args, ReduceMaxLoad reduce = {}) {
    args.tokens = tokens;
    args.experts = experts;
    workspace_carver carver(buffer.view());
    r = gating::carve_host_routing(carver, tokens, max_k, tokens, experts, gate.k(args));
    return gating::route(host, gate, args, make_view(std::as_const(x).data(), tokens, tokens),
                         make_view(std::as_const(w_gate).data(), tokens, experts), r, reduce);
  }

  /// What gating::can_implement says of `route(gate, args)`; writes nothing.
  template <class G>
  status can_route(G const& gate, gating::gate_args args) {
    args.tokens = tokens;
    args.experts = experts;
    workspace_carver carver(buffer.view());
    int const k = std::clamp(gate.k(args), 1, max_k);  // the gate's own check names a bad k
    gating::host_routing const state =
        gating::carve_host_routing(carver, tokens, max_k, tokens, experts, k);
    return gating::can_implement(host, gate, args,
                                 make_view(std::as_const(x).data(), tokens, tokens),
                                 make_view(std::as_const(w_gate).data(), tokens, experts), state);
  }

  [[nodiscard]] std::vector<std::int32_t> experts_of(index_t t) const {
    std::vector<std::int32_t> v;
    for (int j = 0; j < r.k(); ++j) v.push_back(r.expert(t, j));
    return v;
  }
  [[nodiscard]] std::vector<std::int64_t> slots_of(index_t t) const {
    std::vector<std::int64_t> v;
    for (int j = 0; j < r.k(); ++j) v.push_back(r.slot(t, j));
    return v;
  }
};

}  // namespace moe::test
