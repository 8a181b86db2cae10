// SPDX-License-Identifier: Apache-2.0
#pragma once
// The host backend of moe::layer: the composition of layer.hpp over host memory, every
// step in double, and with expert parallelism the exchanges of expert_parallel.hpp.
//
//   x ─ route ─▶ routing ─ offsets ─▶ local batch ─ to_experts ─▶ expert batch ─ expert ─▶
//     ─ to_ranks ─▶ local batch ─ combine ─▶ y
//
// The workspace starts with a header in which forward tells backward the call's tokens and
// the batches' rows; every other array is carved after it, the same way by forward,
// backward and `stats`.

#include <moe/comm/concepts.hpp>
#include <moe/core/backend.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/expert/concepts.hpp>
#include <moe/gating/host_routing.hpp>
#include <moe/gating/router.hpp>
#include <moe/layer/args.hpp>
#include <moe/layer/expert_parallel.hpp>
#include <moe/layer/sizes.hpp>
#include <moe/layout/capacity.hpp>
#include <moe/layout/ragged.hpp>
#include <moe/layout/row_map.hpp>

#include <algorithm>
#include <cstdint>
#include <string>

namespace moe {

template <class Gate, class Layout, class Collective, class Expert>
class layer;

namespace detail {

/// The backends of a layer: the host one here, the CUDA one in <moe/layer/kernels/layer.cuh>.
template <class Layer>
struct host_layer;

/// The CUDA backend of a layer. It is defined in <moe/layer/kernels/layer.cuh>, which
/// needs nvcc; the primary template only says where to find it.
template <class Layer>
struct cuda_layer {
  static_assert(sizeof(Layer) == 0,
                "moe::layer: the CUDA backend of the layer is defined in "
                "<moe/layer/kernels/layer.cuh>; include it in a .cu file compiled by nvcc.");
};

template <class Gate, class Layout, class Collective, class Expert>
struct host_layer<layer<Gate, Layout, Collective, Expert>> {
  using layer_type = layer<Gate, Layout, Collective, Expert>;
  using sizes = layer_sizes<Gate, Layout, Collective>;

  /// Bytes of host workspace that forward and backward need (host backend).
  static std::size_t workspace_bytes(layer_type const& l) {
    workspace_carver counter;
    (void)carve(l, counter, l.args_.gate.tokens, l.max_local_rows(), l.max_expert_rows());
    return counter.bytes();
  }

  /// What the last forward call in `ws` decided (host backend).
  static layer_stats stats(layer_type const& l, workspace ws) {
    l.template check_workspace<double>(host, ws).throw_if_failed();
    forward_header const h = header_of(ws);
    MOE_EXPECTS(h.forward_done(), "ws", "holds no forward call's state");
    workspace_carver carver(ws);
    auto const state = carve(l, carver, h.forward_tokens, h.local_rows, h.expert_rows);
    auto const& r = state.routing;
    return l.stats_of(h.summary, h.expert_rows,
                      {r.load.data_handle(), static_cast<std::size_t>(l.args_.gate.experts)},
                      gating::dropped_per_expert(as_const(r.expert), as_const(r.slot),
                                                 h.summary.capacity, l.args_.gate.experts));
  }

  template <element T>
  static void forward(layer_type const& l, host_backend, matrix_view<T const> x,
                      typename layer_type::template params<T> const& p, matrix_view<T> y,
                      workspace ws) {
    l.template can_implement<T>(host, x, p, y, ws).throw_if_failed();
    index_t const tokens = x.extent(0);
    workspace_carver carver(ws);
    auto state = carve(l, carver, tokens, l.max_local_rows(), l.max_expert_rows());
    gating::gate_args gate = sizes::gate_args_of(l.args_);
    gate.capacity_tokens = capacity_tokens_of(l, state, tokens);
    gating::routing_summary const summary =
        gating::route(host, Gate{}, gate, x, p.gate_weight, state.routing,
                      [&](index_t load) { return max_over_ranks(l, state, load); });
    index_t const local_rows = lay_out_local_batch(l, state, summary.capacity);
    index_t const expert_rows = lay_out_expert_batch(l, state, summary.capacity, local_rows);
    workspace_carver resized(ws);
    state = carve(l, resized, tokens, local_rows, expert_rows);
    state.routing.capacity = summary.capacity;

    for (index_t t = 0; t < tokens; ++t)
      for (index_t h = 0; h < l.args_.hidden; ++h) state.x(t, h) = to_accumulate(x(t, h));
    auto const row_of = row_map_of(state);
    layout::gather(host, state.routing, row_of, x, state.local_in);
    to_experts(l, state, as_const(state.local_in), state.dispatched);
    Expert::forward(host, l.expert_shape(), p.expert, segments_of(state),
                    as_const(state.dispatched), state.expert_out, state.expert);
    to_ranks(l, state, as_const(state.expert_out), state.local_out);
    layout::combine(host, state.routing, row_of, as_const(state.local_out), y);
    // The type is named: nvcc 13.0 ignores the designators of a braced list assigned to an
    // object of a dependent type, and fills the fields in order.
    *state.header = forward_header{.forward_tokens = tokens,
                                   .local_rows = local_rows,
                                   .expert_rows = expert_rows,
                                   .summary = summary};
  }

  template <element T>
  static void backward(layer_type const& l, host_backend, matrix_view<T const> dy,
                       typename layer_type::template params<T> const& p, matrix_view<T> dx,
                       typename layer_type::template gradients<T> const& g, workspace ws) {
    l.template can_implement<T>(host, dy, p, dx, g, ws).throw_if_failed();
    index_t const tokens = dy.extent(0);
    forward_header const header = header_of(ws);
    workspace_carver carver(ws);
    auto state = carve(l, carver, tokens, header.local_rows, header.expert_rows);
    state.routing.capacity = header.summary.capacity;

    auto const row_of = row_map_of(state);
    layout::combine_backward(host, state.routing, row_of, dy, as_const(state.local_out),
                             state.local_d_out, state.d_weight);
    to_experts(l, state, as_const(state.local_d_out), state.d_expert_out);
    Expert::backward(host, l.expert_shape(), p.expert, segments_of(state),
                     as_const(state.dispatched), as_const(state.d_expert_out), state.d_dispatched,
                     g.expert, state.expert);
    to_ranks(l, state, as_const(state.d_dispatched), state.local_d_in);
    layout::gather_backward(host, state.routing, row_of, as_const(state.local_d_in), state.dx);
    gating::route_backward(host, Gate{}, sizes::gate_args_of(l.args_), state.routing,
                           as_const(state.d_weight), as_const(state.x), p.gate_weight,
                           state.d_logits, state.dx, g.gate_weight);
    for (index_t t = 0; t < dx.extent(0); ++t)
      for (index_t h = 0; h < dx.extent(1); ++h)
        dx(t, h) = from_accumulate<T>(static_cast<accumulate_t<T>>(state.dx(t, h)));
  }

  /// The first bytes of the workspace: what forward tells backward.
  struct forward_header {
    static constexpr std::uint64_t forward_done_magic = 0x6d6f652d66776421;  // "moe-fwd!"
    std::uint64_t magic = forward_done_magic;
    [[nodiscard]] bool forward_done() const noexcept { return magic == forward_done_magic; }
    index_t forward_tokens = 0;
    index_t local_rows = 0;   // rows of the local batch
    index_t expert_rows = 0;  // rows of the expert batch
    gating::routing_summary summary;
  };

  /// The host backend's workspace, carved for `tokens` tokens, a local batch of
  /// `local_rows` rows and an expert batch of `expert_rows` rows. On one rank the two
  /// batches are one (the local_* views alias the expert batch's).
  struct host_state {
    forward_header* header;
    matrix_view<double> x;  // (tokens, hidden)  the forward's input
    gating::host_routing routing;
    span<std::int64_t> local_begin;  // (experts) the local batch: first row of each expert
    span<std::int64_t> local_rows;   // (experts) … and its rows
    span<std::int64_t> begin;        // (local experts) the expert batch: first row of each
    span<std::int64_t> rows;         // (local experts) … and its rows
    matrix_view<double> dispatched;  // (expert rows, hidden)
    matrix_view<double> expert_out;  // (expert rows, hidden)
    typename Expert::host_state expert;
    matrix_view<double> d_expert_out;  // (expert rows, hidden)
    matrix_view<double> d_dispatched;  // (expert rows, hidden)
    matrix_view<double> local_in;      // (local rows, hidden)  dispatched, before the exchange
    matrix_view<double> local_out;     // (local rows, hidden)  expert output, back home
    matrix_view<double> local_d_out;   // (local rows, hidden)
    matrix_view<double> local_d_in;    // (local rows, hidden)
    matrix_view<double> d_weight;      // (tokens, k)
    matrix_view<double> d_logits;      // (tokens, experts)
    matrix_view<double> dx;            // (tokens, hidden)
    // Expert parallelism only:
    span<std::byte> exchange;                  // scratch of the all-to-alls
    span<std::int64_t> received;               // (ranks, local experts) rows each rank sends
    span<std::uint64_t> byte_counts;           // (2·ranks) all_to_allv's counts
    span<std::int64_t> gathered, gather_send;  // (ranks) each an all-gather's
  };

  static host_state carve(layer_type const& l, workspace_carver& carver, index_t tokens,
                          index_t local_rows, index_t expert_rows) {
    index_t const max_tokens = l.args_.gate.tokens, max_rows = l.max_expert_rows();
    index_t const e = l.args_.gate.experts, h = l.args_.hidden, local_e = l.expert_shape().experts;
    int const k = l.k();
    auto batch = [&](index_t most, index_t rows) {
      return make_view(carver.take<double>(most * h), rows, h);
    };
    auto integers = [&](index_t n) {
      return span<std::int64_t>(carver.take<std::int64_t>(n), static_cast<std::size_t>(n));
    };
    host_state s;
    s.header = carver.take<forward_header>(1);
    s.x = make_view(carver.take<double>(max_tokens * h), tokens, h);
    s.routing = gating::carve_host_routing(carver, max_tokens, tokens, e, k);
    s.begin = integers(local_e);
    s.rows = integers(local_e);
    s.dispatched = batch(max_rows, expert_rows);
    s.expert_out = batch(max_rows, expert_rows);
    s.expert = Expert::carve_host_state(carver, l.expert_shape(), max_rows, expert_rows);
    s.d_expert_out = batch(max_rows, expert_rows);
    s.d_dispatched = batch(max_rows, expert_rows);
    s.d_weight = make_view(carver.take<double>(max_tokens * k), tokens, k);
    s.d_logits = make_view(carver.take<double>(max_tokens * e), tokens, e);
    s.dx = make_view(carver.take<double>(max_tokens * h), tokens, h);
    if constexpr (Collective::is_identity) {
      s.local_begin = s.begin;
      s.local_rows = s.rows;
      s.local_in = s.dispatched;
      s.local_out = s.expert_out;
      s.local_d_out = s.d_expert_out;
      s.local_d_in = s.d_dispatched;
    } else {
      index_t const max_local = l.max_local_rows(), w = l.ranks();
      s.local_begin = integers(e);
      s.local_rows = integers(e);
      s.local_in = batch(max_local, local_rows);
      s.local_out = batch(max_local, local_rows);
      s.local_d_out = batch(max_local, local_rows);
      s.local_d_in = batch(max_local, local_rows);
      std::size_t const exchange = exchange_scratch_bytes<Collective>(
          max_local, max_rows, static_cast<std::size_t>(h) * sizeof(double), l.comm_->topology());
      s.exchange = {carver.take<std::byte>(exchange), exchange};
      s.received = integers(w * local_e);
      s.byte_counts = {carver.take<std::uint64_t>(2 * w), static_cast<std::size_t>(2 * w)};
      s.gathered = integers(w);
      s.gather_send = integers(w);
    }
    return s;
  }

  /// The forward's header, at the start of the workspace.
  static forward_header header_of(workspace ws) {
    workspace_carver carver(ws);
    return *carver.take<forward_header>(1);
  }

  /// The tokens the capacity is sized for (gate_args::capacity_tokens). With the capacity
  /// layout over several ranks, the largest T over them: the all-to-all moves equal [E, C, H]
  /// blocks, so every rank needs the same C whatever its own T (Tutel's inequivalent_tokens).
  /// Every rank gathers, an empty one too, so the collectives stay in step. Elsewhere 0, the
  /// call's own T (the ragged layout routes with dynamic capacity and exchanges counts).
  static index_t capacity_tokens_of(layer_type const& l, host_state const& s, index_t tokens) {
    if constexpr (!Collective::is_identity && Layout::drops_tokens)
      return max_over_ranks(l, s, tokens);
    else
      return 0;
  }

  /// The largest `value` over the ranks: a load, for dynamic capacity (Tutel's all-reduce
  /// MAX), or a token count.
  static index_t max_over_ranks(layer_type const& l, host_state const& s, index_t value) {
    if constexpr (Collective::is_identity) {
      return value;
    } else {
      detail::all_gather(*l.comm_, value, s.gathered, s.gather_send);
      return *std::max_element(s.gathered.begin(), s.gathered.end());
    }
  }

  /// Lays out the local batch after routing, the one place that does: writes each
  /// expert's segment (begin, rows) as the layout says and returns the batch's rows.
  [[nodiscard]] static index_t lay_out_local_batch(layer_type const& l, host_state const& s,
                                                   index_t capacity) {
    span<std::int64_t const> const load{s.routing.load.data_handle(), s.local_begin.size()};
    return layout::offsets(
        host, Layout{},
        sizes::layout_args_of(l.args_, s.routing.tokens(), capacity, l.local_row_alignment()), load,
        s.local_begin, s.local_rows);
  }

  /// Lays out the expert batch: the local batch on one rank; with expert parallelism, the
  /// capacity layout's [E_local, W·C] (every row computed, unclaimed ones zero) or the
  /// ragged rows every rank sends, counted first.
  [[nodiscard]] static index_t lay_out_expert_batch(layer_type const& l, host_state const& s,
                                                    index_t capacity, index_t local_rows) {
    if constexpr (Collective::is_identity) {
      return local_rows;
    } else if constexpr (Layout::drops_tokens) {
      index_t const per_expert = l.ranks() * capacity;
      for (std::size_t e = 0; e < s.begin.size(); ++e) {
        s.begin[e] = static_cast<index_t>(e) * per_expert;
        s.rows[e] = per_expert;
      }
      return static_cast<index_t>(s.begin.size()) * per_expert;
    } else {
      ragged_exchange::exchange_counts(host, *l.comm_, s.local_rows.data(), s.received.data(),
                                       l.expert_shape().experts);
      return ragged_exchange::lay_out_expert_batch(s.received, l.args_.expert_row_alignment,
                                                   s.begin, s.rows);
    }
  }

  /// Moves local-batch rows to the ranks that own their experts (no-op on one rank).
  static void to_experts(layer_type const& l, host_state const& s, matrix_view<double const> local,
                         matrix_view<double> expert) {
    if constexpr (!Collective::is_identity)
      layer_exchange<Layout, Collective>::to_experts(host, *l.comm_, exchange_of(s), local, expert);
  }

  /// The way back: expert-batch rows to the ranks their tokens live on.
  static void to_ranks(layer_type const& l, host_state const& s, matrix_view<double const> expert,
                       matrix_view<double> local) {
    if constexpr (!Collective::is_identity)
      layer_exchange<Layout, Collective>::to_ranks(host, *l.comm_, exchange_of(s), expert, local);
  }

  /// What the exchanges of this call need (expert parallelism).
  static typename layer_exchange<Layout, Collective>::call exchange_of(host_state const& s) {
    return {.capacity = s.routing.capacity,
            .plan = {s.local_rows, s.received},
            .begin = s.begin,
            .scratch = s.exchange,
            .byte_counts = s.byte_counts};
  }

  /// The expert batch as the expert sees it.
  static expert::row_segments segments_of(host_state const& s) noexcept {
    return {s.begin, s.rows};
  }

  /// The row of each assignment (t, j) in the local batch, the one place that says:
  /// begin_e + slot(t, j) while the slot lies inside expert e's segment, dropped past it.
  static layout::segment_rows row_map_of(host_state const& s) noexcept {
    return {as_const(s.routing.expert), as_const(s.routing.slot), s.local_begin, s.local_rows};
  }
};

}  // namespace detail
}  // namespace moe
