// SPDX-License-Identifier: Apache-2.0
#pragma once
// The size arithmetic of a layer, shared by its backends: the gate's arguments as the layout
// routes with them, the capacity bound, the bounds of the local and expert batches the
// workspace is sized for, and the limits of layer_args (checked arithmetic throughout).

#include <moe/core/checked.hpp>
#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/gating/args.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/policies.hpp>
#include <moe/layer/args.hpp>
#include <moe/layer/concepts.hpp>
#include <moe/layout/args.hpp>
#include <moe/layout/capacity.hpp>
#include <moe/layout/ragged.hpp>

#include <algorithm>
#include <string>

namespace moe::detail {

template <class Gate, class Layout, class Collective>
struct layer_sizes {
  /// k of a layer with these arguments.
  static int k_of(layer_args const& a) noexcept { return Gate{}.k(gate_args_of(a)); }

  /// The gate's arguments. A dropless layout routes with dynamic capacity (f = 0 in training
  /// and evaluation, no alignment): the capacity is then the largest load, and no assignment
  /// is dropped. A dropless gate (capacity policy gating::dropless) needs a dropless layout.
  static gating::gate_args gate_args_of(layer_args const& a) noexcept {
    static_assert(gate_capacity_fits_layout<Gate, Layout>,
                  "moe::layer: the gate is dropless (capacity policy gating::dropless) but "
                  "layout::capacity drops assignments past its capacity. Use layout::ragged, or "
                  "a gate with a capacity policy such as gating::tutel_capacity.");
    gating::gate_args g = a.gate;
    if constexpr (!Layout::drops_tokens) {
      g.capacity_factor = 0.0f;
      g.eval_capacity_factor = 0.0f;
      g.capacity_alignment = 1;
    }
    return g;
  }

  /// The capacity arguments of a call of `tokens` tokens (gating/capacity.hpp).
  static gating::capacity_args capacity_args_of(layer_args const& a, index_t tokens) noexcept {
    gating::gate_args const g = gate_args_of(a);
    return gating::capacity_args_of(g, Gate{}.k(g), gating::capacity_of<Gate>::rounding, tokens);
  }

  /// The capacity bound of calls of up to `a.gate.tokens` tokens; `size_overflow` past index_t.
  static index_t capacity_bound_of(layer_args const& a) noexcept {
    return gating::capacity_bound(capacity_args_of(a, a.gate.tokens));
  }

  /// What the layout's size math needs, for `tokens` tokens and capacity `capacity`.
  static layout::layout_args layout_args_of(layer_args const& a, index_t tokens, index_t capacity,
                                            index_t row_alignment) noexcept {
    return {.tokens = tokens,
            .experts = a.gate.experts,
            .k = k_of(a),
            .capacity = capacity,
            .row_alignment = row_alignment};
  }

  /// Padding belongs to the batch the experts compute on: with expert parallelism the local
  /// batch travels unpadded and the expert batch is padded on arrival.
  static index_t local_row_alignment(layer_args const& a) noexcept {
    return Collective::is_identity ? a.expert_row_alignment : 1;
  }

  /// The most rows of a local batch: what the workspace is sized for (`size_overflow` when
  /// it does not fit index_t).
  static index_t local_rows_bound(layer_args const& a) noexcept {
    return layout::rows_bound(
        Layout{}, layout_args_of(a, a.gate.tokens, capacity_bound_of(a), local_row_alignment(a)));
  }

  /// The most rows of an expert batch over `ranks` ranks. The capacity layout's is the local
  /// batch's size (E_local · W·C = E·C); the ragged one receives at most min(k, E_local) rows
  /// per token of every rank, plus padding. `size_overflow` when it does not fit index_t.
  static index_t expert_rows_bound(layer_args const& a, int ranks) noexcept {
    if (Collective::is_identity || Layout::drops_tokens) return local_rows_bound(a);
    index_t const local_experts = a.gate.experts / ranks;
    index_t const per_token = std::min<index_t>(k_of(a), local_experts);
    return checked_add(checked_mul(checked_mul(ranks, a.gate.tokens), per_token),
                       checked_mul(local_experts, a.expert_row_alignment - 1));
  }

  /// The limits of layer_args: every array the layer lays out for `ranks` ranks holds at
  /// most `max_array_elements` elements. Runs after the arguments' own checks (positive
  /// sizes, the gate's k, finite factors).
  static status check_sizes(layer_args const& a, int ranks) {
    constexpr index_t limit = max_array_elements;
    auto const too_large = [](char const* argument, std::string const& what) {
      return status::failure(argument, what + " exceeds the limit of 2^52 elements per array of " +
                                           "the layer's workspace (so that its bytes fit int64); " +
                                           "lower it");
    };
    struct named {
      char const* name;
      index_t value;
    };
    for (named const n :
         {named{"tokens", a.gate.tokens}, named{"hidden", a.hidden}, named{"ffn", a.ffn},
          named{"experts", a.gate.experts}, named{"capacity_alignment", a.gate.capacity_alignment},
          named{"expert_row_alignment", a.expert_row_alignment},
          named{"min_capacity", a.gate.min_capacity}})
      if (n.value > limit) return too_large(n.name, std::to_string(n.value));
    // The widest row of a per-token or per-row array: hidden, the expert's (up to 2F for a
    // gated expert), the logits', and the router's 2k keys.
    int const k = k_of(a);
    index_t const width =
        std::max({a.hidden, checked_mul(2, a.ffn), a.gate.experts, index_t{2} * k});
    if (checked_mul(a.gate.tokens, width) > limit)
      return too_large("tokens",
                       std::to_string(a.gate.tokens) + " tokens of width " + std::to_string(width));
    if (checked_mul(checked_mul(a.gate.experts, a.hidden), a.ffn) > limit)
      return too_large("ffn", "E·H·F of the expert weights, " + std::to_string(a.gate.experts) +
                                  "·" + std::to_string(a.hidden) + "·" + std::to_string(a.ffn) +
                                  ",");
    index_t const rows = std::max(local_rows_bound(a), expert_rows_bound(a, ranks));
    if (checked_mul(rows, width) <= limit) return {};
    std::string const what = (rows == size_overflow ? std::string("more than 2^63 rows")
                                                    : std::to_string(rows) + " rows") +
                             " of width " + std::to_string(width) + " in the expert batch";
    if constexpr (Layout::drops_tokens) {
      // The capacity sets the rows: blame the alignment when the factor alone fits.
      layer_args unaligned = a;
      unaligned.gate.capacity_alignment = 1;
      bool const factor_fits = checked_mul(local_rows_bound(unaligned), width) <= limit;
      return too_large(factor_fits ? "capacity_alignment" : "capacity_factor", what);
    } else {
      return too_large(
          a.expert_row_alignment > 1 && checked_mul(checked_mul(a.gate.tokens, k), width) <= limit
              ? "expert_row_alignment"
              : "tokens",
          what);
    }
  }
};

}  // namespace moe::detail
