// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA backend of moe::layer: the same composition as the host backend (host_layer.hpp),
// over device memory, on the caller's stream, on one GPU or with expert parallelism over any
// communicator (the exchanges of expert_parallel.hpp, which both backends share).
//
//   x ─ route ─▶ routing ─ offsets ─▶ local batch ─ to_experts ─▶ expert batch ─ expert ─▶
//     ─ to_ranks ─▶ local batch ─ combine ─▶ y
//
// On one rank the two batches are one and the exchanges do nothing. Everything is
// stream-ordered. The expert GEMMs need the expert batch's shape on the host:
// - capacity layout, fixed capacity factor: known before routing (E·C rows, with expert
//   parallelism [E_local, W·C]), so nothing synchronises, over any number of ranks, and a CUDA
//   graph can capture forward and backward;
// - dynamic capacity: the router's all-reduce MAX over the ranks (comm::max_over_ranks) stays
//   on the device; C is read once per call (one stream synchronisation);
// - ragged layout: each expert's rows are counted on the device, with expert parallelism
//   exchanged there too (int64 per (rank, expert)), then read once per call: this rank's rows
//   per expert and, with expert parallelism, the (W, E_local) rows it receives. The expert
//   batch's segments and the all-to-allv's byte counts follow on the host, so the rows move
//   with no further synchronisation.
// Where forward reads back, backward reads the same values back from the workspace once more
// (C, or the row counts: one synchronisation, no communication, nothing exchanged again):
// the layer keeps no host state between calls, so that one layer serves any number of
// workspaces and threads.
//
// With the capacity layout every rank must route as many tokens (a fixed factor sizes C from
// them). The host backend sizes C for the largest T over the ranks, learnt by an all-gather;
// this backend cannot learn it without a synchronisation, so equal T is the caller's promise
// (a simulated world reports the unequal messages that break it). An empty call is the host
// backend's only, for now (layer.hpp rejects it here).
//
// The workspace is carved the same way by forward, backward and `stats`, from the layer's
// arguments and the call's token count alone, so backward finds what forward left there.

#include <moe/comm/communicator_ref.hpp>
#include <moe/comm/kernels/max_over_ranks.cuh>
#include <moe/core/backend.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/gating/device_routing.hpp>
#include <moe/gating/kernels/router.cuh>
#include <moe/layer/expert_parallel.hpp>
#include <moe/layer/layer.hpp>
#include <moe/layout/kernels/capacity.cuh>
#include <moe/layout/kernels/ragged.cuh>
#include <moe/layout/kernels/row_map.cuh>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace moe::detail {

template <class Gate, class Layout, class Collective, class Expert>
struct cuda_layer<layer<Gate, Layout, Collective, Expert>> {
  using layer_type = layer<Gate, Layout, Collective, Expert>;
  using exchange = layer_exchange<Layout, Collective>;
  static constexpr bool expert_parallel = !Collective::is_identity;

  /// What a call leaves in the workspace that does not depend on the element type, carved
  /// first so that `stats` finds it without knowing T. Device memory.
  struct routing_state {
    gating::device_routing routing;
    span<std::int64_t> local_begin;  // (experts) the local batch: first row of each expert
    span<std::int64_t> local_rows;   // (experts) … and its rows
    span<std::int64_t> received;     // (ranks, local experts) ragged with expert parallelism:
                                     // the rows each rank sends this rank per local expert
    workspace max_load_scratch;      // expert parallelism: comm::max_over_ranks's
  };

  /// The layer's device workspace, carved for a call of `tokens` tokens, a local batch of
  /// `local_rows` rows and an expert batch of `expert_rows` (the most of each when sizing).
  /// On one rank the local_* views alias the expert batch's.
  template <class T>
  struct device_state : routing_state {
    workspace route_scratch;      // the router's, forward and backward
    workspace layout_scratch;     // gather's and combine_backward's row sources
    matrix_view<T> x;             // (tokens, hidden)  forward's input, for dW_gate
    matrix_view<T> dispatched;    // (expert rows, hidden)
    matrix_view<T> expert_out;    // (expert rows, hidden)
    matrix_view<T> d_expert_out;  // (expert rows, hidden)
    matrix_view<T> d_dispatched;  // (expert rows, hidden)
    matrix_view<T> local_in;      // (local rows, hidden)  dispatched, before the exchange
    matrix_view<T> local_out;     // (local rows, hidden)  expert output, back home
    matrix_view<T> local_d_out;   // (local rows, hidden)
    matrix_view<T> local_d_in;    // (local rows, hidden)
    matrix_view<float> d_weight;  // (tokens, k)
    matrix_view<float> d_logits;  // (tokens, experts)
    span<std::byte> exchange;     // expert parallelism: the exchanges' scratch
    typename Expert::template device_state<T> expert;
  };

  static expert::expert_shape shape_of(layer_type const& l) noexcept { return l.expert_shape(); }

  static routing_state carve_routing(layer_type const& l, workspace_carver& carver,
                                     index_t tokens) {
    layer_args const& a = l.args_;
    index_t const e = a.gate.experts;
    auto integers = [&](index_t n) {
      return span<std::int64_t>(carver.take<std::int64_t>(n), static_cast<std::size_t>(n));
    };
    routing_state s;
    s.routing = gating::carve_device_routing(carver, a.gate.tokens, tokens, e, l.k(),
                                             layer_type::gate_args_of(a).groups);
    s.local_begin = integers(e);
    s.local_rows = integers(e);
    if constexpr (expert_parallel) {
      if constexpr (!Layout::drops_tokens) s.received = integers(e);  // W · E_local = E
      std::size_t const bytes =
          comm::max_over_ranks<comm::communicator_ref>::workspace_bytes(l.ranks());
      s.max_load_scratch = {carver.take<std::byte>(bytes), bytes};
    }
    return s;
  }

  template <class T>
  static device_state<T> carve(layer_type const& l, workspace_carver& carver, index_t tokens,
                               index_t local_rows, index_t expert_rows) {
    layer_args const& a = l.args_;
    gating::gate_args const g = layer_type::gate_args_of(a);
    int const k = l.k();
    index_t const most_local = l.max_local_rows(), most = l.max_expert_rows(), h = a.hidden;
    auto bytes = [&](std::size_t n) { return workspace{carver.take<std::byte>(n), n}; };
    auto batch = [&](index_t most_rows, index_t rows) {
      return make_view(carver.take<T>(most_rows * h), rows, h);
    };
    device_state<T> s;
    static_cast<routing_state&>(s) = carve_routing(l, carver, tokens);
    s.route_scratch = bytes(std::max(gating::route_workspace_bytes<T>(Gate{}, g, h),
                                     gating::route_backward_workspace_bytes<T>(Gate{}, g, h)));
    s.layout_scratch = bytes(layout::gather_workspace_bytes(most_local));
    s.x = make_view(carver.take<T>(a.gate.tokens * h), tokens, h);
    s.dispatched = batch(most, expert_rows);
    s.expert_out = batch(most, expert_rows);
    s.d_expert_out = batch(most, expert_rows);
    s.d_dispatched = batch(most, expert_rows);
    s.d_weight = make_view(carver.take<float>(a.gate.tokens * k), tokens, k);
    s.d_logits =
        make_view(carver.take<float>(a.gate.tokens * a.gate.experts), tokens, a.gate.experts);
    s.expert = Expert::template carve_device_state<T>(carver, shape_of(l), most, expert_rows,
                                                      expert::expert_pass::training);
    if constexpr (expert_parallel) {
      s.local_in = batch(most_local, local_rows);
      s.local_out = batch(most_local, local_rows);
      s.local_d_out = batch(most_local, local_rows);
      s.local_d_in = batch(most_local, local_rows);
      std::size_t const n = exchange_scratch_bytes<Collective>(
          most_local, most, static_cast<std::size_t>(h) * sizeof(T), l.comm_->topology());
      s.exchange = {carver.take<std::byte>(n), n};
    } else {
      s.local_in = s.dispatched;
      s.local_out = s.expert_out;
      s.local_d_out = s.d_expert_out;
      s.local_d_in = s.d_dispatched;
    }
    return s;
  }

  template <class T>
  static std::size_t workspace_bytes(layer_type const& l, cuda_backend) {
    static_assert(expert::cuda_expert<Expert, T>,
                  "moe::layer: Expert has no CUDA backend for this element type. Include its "
                  "kernels header (<moe/expert/kernels/ffn.cuh>, <moe/expert/kernels/glu.cuh>).");
    workspace_carver counter;
    (void)carve<T>(l, counter, l.args_.gate.tokens, l.max_local_rows(), l.max_expert_rows());
    return counter.bytes();
  }

  /// The batches of the call, as the host must know them for the expert GEMMs and the
  /// exchanges: the capacity layout's C (read from the device only when it is dynamic), or the
  /// ragged layout's rows per (rank, expert) read from the device, and what follows from them.
  struct batch_shape {
    index_t capacity = 0;     // capacity layout
    index_t local_rows = 0;   // rows of the local batch
    index_t expert_rows = 0;  // rows of the expert batch
    // Ragged, host copies: the rows this rank holds per expert (W, E_local), the rows it
    // receives, and the expert batch's segments (E_local). On one rank received == sent.
    std::vector<std::int64_t> sent, received, begin, rows;
    std::vector<std::uint64_t> byte_counts;  // (2W) the all-to-allv's, expert parallelism
  };

  /// The ragged layout's counts, read back once (one stream synchronisation), and the
  /// batches laid out from them on the host as the host backend does.
  static batch_shape read_ragged_shape(layer_type const& l, cuda_backend cuda,
                                       routing_state const& s) {
    batch_shape b;
    auto read = [&](std::vector<std::int64_t>& to, span<std::int64_t> from) {
      to.resize(from.size());
      MOE_CUDA_TRY(cudaMemcpyAsync(to.data(), from.data(), from.size_bytes(),
                                   cudaMemcpyDeviceToHost, cuda.stream));
    };
    read(b.sent, s.local_rows);
    if constexpr (expert_parallel) read(b.received, s.received);
    MOE_CUDA_TRY(cudaStreamSynchronize(cuda.stream));  // the ragged path's one read-back
    if constexpr (!expert_parallel) b.received = b.sent;
    auto const local_experts = static_cast<std::size_t>(l.expert_shape().experts);
    b.begin.resize(local_experts);
    b.rows.resize(local_experts);
    b.expert_rows = ragged_exchange::lay_out_expert_batch(b.received, l.args_.expert_row_alignment,
                                                          b.begin, b.rows);
    b.local_rows =
        expert_parallel ? std::accumulate(b.sent.begin(), b.sent.end(), index_t{0}) : b.expert_rows;
    b.byte_counts.resize(2 * static_cast<std::size_t>(l.ranks()));
    return b;
  }

  static batch_shape shape_of_batch(layer_type const& l, cuda_backend cuda, routing_state const& s,
                                    index_t tokens) {
    if constexpr (Layout::drops_tokens) {
      batch_shape b;
      gating::capacity_args const cap = layer_type::sizes::capacity_args_of(l.args_, tokens);
      b.capacity = gating::is_dynamic_capacity(cap)
                       ? gating::read_summary(cuda, s.routing).capacity  // synchronises
                       : gating::resolve_capacity(cap, 0);
      b.local_rows = b.expert_rows = l.args_.gate.experts * b.capacity;
      return b;
    } else {
      return read_ragged_shape(l, cuda, s);
    }
  }

  /// The expert batch as the expert's CUDA backend takes it. With expert parallelism the
  /// capacity layout's [E_local, W·C] rows are all computed (no per-rank claimed count fits
  /// `uniform_segments`); rows no assignment claimed arrive zero and go back unread.
  template <class T>
  static auto segments_of(layer_type const& l, device_state<T> const& s, batch_shape const& b) {
    if constexpr (!Layout::drops_tokens)
      return expert::row_segments{{b.begin.data(), b.begin.size()}, {b.rows.data(), b.rows.size()}};
    else if constexpr (expert_parallel)
      return expert::uniform_segments{
          .experts = l.expert_shape().experts, .capacity = l.ranks() * b.capacity, .claimed = {}};
    else
      return expert::uniform_segments{.experts = l.args_.gate.experts,
                                      .capacity = b.capacity,
                                      .claimed = {s.local_rows.data(), s.local_rows.size()}};
  }

  template <class T>
  static void forward(layer_type const& l, cuda_backend cuda, matrix_view<T const> x,
                      typename layer_type::template params<T> const& p, matrix_view<T> y,
                      workspace ws) {
    static_assert(dtype_traits<std::remove_cv_t<T>>::device_supported,
                  "moe::layer: the CUDA backend takes float, __half or __nv_bfloat16 elements.");
    l.template can_implement<T>(cuda, x, p, y, ws).throw_if_failed();
    index_t const tokens = x.extent(0);

    workspace_carver sizing(ws);
    device_state<T> s = carve<T>(l, sizing, tokens, l.max_local_rows(), l.max_expert_rows());
    route(l, cuda, x, p.gate_weight, s);
    lay_out_local_batch(l, cuda, s, tokens);
    batch_shape b = shape_of_batch(l, cuda, s, tokens);
    workspace_carver carver(ws);
    s = carve<T>(l, carver, tokens, b.local_rows, b.expert_rows);

    MOE_CUDA_TRY(cudaMemcpyAsync(s.x.data_handle(), x.data_handle(),
                                 static_cast<std::size_t>(element_count(x)) * sizeof(T),
                                 cudaMemcpyDeviceToDevice, cuda.stream));
    auto const row_of = row_map_of(s);
    layout::gather(cuda, s.routing, row_of, x, s.local_in, s.layout_scratch);
    to_experts(l, cuda, s, b, moe::as_const(s.local_in), s.dispatched);
    Expert::forward(cuda, shape_of(l), p.expert, segments_of(l, s, b), moe::as_const(s.dispatched),
                    s.expert_out, s.expert);
    to_ranks(l, cuda, s, b, moe::as_const(s.expert_out), s.local_out);
    layout::combine(cuda, s.routing, row_of, moe::as_const(s.local_out), y);
  }

  template <class T>
  static void backward(layer_type const& l, cuda_backend cuda, matrix_view<T const> dy,
                       typename layer_type::template params<T> const& p, matrix_view<T> dx,
                       typename layer_type::template gradients<T> const& grads, workspace ws) {
    l.template can_implement<T>(cuda, dy, p, dx, grads, ws).throw_if_failed();
    index_t const tokens = dy.extent(0);

    workspace_carver sizing(ws);
    device_state<T> s = carve<T>(l, sizing, tokens, l.max_local_rows(), l.max_expert_rows());
    batch_shape b = shape_of_batch(l, cuda, s, tokens);
    workspace_carver carver(ws);
    s = carve<T>(l, carver, tokens, b.local_rows, b.expert_rows);
    gating::gate_args const g = layer_type::gate_args_of(l.args_);

    auto const row_of = row_map_of(s);
    layout::combine_backward(cuda, s.routing, row_of, dy, moe::as_const(s.local_out), s.local_d_out,
                             s.d_weight, s.layout_scratch);
    to_experts(l, cuda, s, b, moe::as_const(s.local_d_out), s.d_expert_out);
    Expert::backward(cuda, shape_of(l), p.expert, segments_of(l, s, b), moe::as_const(s.dispatched),
                     moe::as_const(s.d_expert_out), s.d_dispatched, grads.expert, s.expert);
    to_ranks(l, cuda, s, b, moe::as_const(s.d_dispatched), s.local_d_in);
    layout::gather_backward(cuda, s.routing, row_of, moe::as_const(s.local_d_in), dx);
    gating::route_backward(cuda, Gate{}, g, s.routing, moe::as_const(s.d_weight),
                           moe::as_const(s.x), p.gate_weight, s.d_logits, dx, grads.gate_weight,
                           s.route_scratch);
  }

  static layer_stats stats(layer_type const& l, cuda_backend cuda, workspace ws, index_t tokens) {
    layer_args const& a = l.args_;
    MOE_EXPECTS(tokens >= 1 && tokens <= a.gate.tokens, "tokens",
                "must be the forward call's, 1 to " + std::to_string(a.gate.tokens));
    MOE_EXPECTS(ws.data() != nullptr, "ws", "null: no forward call's state");
    {
      workspace_carver counter;
      (void)carve_routing(l, counter, tokens);
      MOE_EXPECTS(
          ws.size() >= counter.bytes(), "ws",
          "holds " + std::to_string(ws.size()) + " bytes, fewer than any forward call's workspace");
    }
    workspace_carver carver(ws);
    routing_state const s = carve_routing(l, carver, tokens);
    gating::device_routing const& r = s.routing;

    gating::routing_summary const summary = gating::read_summary(cuda, r);  // synchronises
    index_t rows = a.gate.experts * summary.capacity;
    if constexpr (!Layout::drops_tokens) rows = read_ragged_shape(l, cuda, s).expert_rows;
    // The call's load and assignments, to the host: what the drops per expert are counted on.
    index_t const k = l.k();
    std::vector<std::int64_t> const load = copy_to_host(cuda, r.load.data_handle(), a.gate.experts);
    std::vector<std::int32_t> const expert = copy_to_host(cuda, r.expert.data_handle(), tokens * k);
    std::vector<std::int64_t> const slot = copy_to_host(cuda, r.slot.data_handle(), tokens * k);
    MOE_CUDA_TRY(cudaStreamSynchronize(cuda.stream));  // one wait for the three copies
    return l.stats_of(summary, rows, {load.data(), load.size()},
                      gating::dropped_per_expert(make_view(expert.data(), tokens, k),
                                                 make_view(slot.data(), tokens, k),
                                                 summary.capacity, a.gate.experts));
  }

 private:
  /// `count` elements of device memory at `from`, copied to the host on `cuda.stream`: read
  /// them once the stream has been synchronised. (A returned vector keeps its buffer.)
  template <class U>
  static std::vector<U> copy_to_host(cuda_backend cuda, U const* from, index_t count) {
    std::vector<U> to(static_cast<std::size_t>(count));
    MOE_CUDA_TRY(cudaMemcpyAsync(to.data(), from, to.size() * sizeof(U), cudaMemcpyDeviceToHost,
                                 cuda.stream));
    return to;
  }

  static span<std::int64_t const> as_span(span<std::int64_t> s) noexcept {
    return {s.data(), s.size()};
  }

  /// The row of each assignment (t, j) in the local batch.
  static layout::segment_rows row_map_of(routing_state const& s) {
    return layout::row_map_of(s.routing, as_span(s.local_begin), as_span(s.local_rows));
  }

  /// Routes x. Dynamic capacity over several ranks takes the largest load of every rank
  /// (Tutel's all-reduce MAX), on the device: nothing synchronises here.
  template <class T>
  static void route(layer_type const& l, cuda_backend cuda, matrix_view<T const> x,
                    matrix_view<T const> gate_weight, device_state<T>& s) {
    gating::gate_args const g = layer_type::gate_args_of(l.args_);
    if constexpr (expert_parallel) {
      index_t const tokens = x.extent(0);
      if (gating::is_dynamic_capacity(layer_type::sizes::capacity_args_of(l.args_, tokens))) {
        comm::communicator_ref comm = *l.comm_;
        comm::max_over_ranks<comm::communicator_ref> const reduce(comm, s.max_load_scratch);
        gating::route(cuda, Gate{}, g, x, gate_weight, s.routing, s.route_scratch, reduce);
        return;
      }
    }
    gating::route(cuda, Gate{}, g, x, gate_weight, s.routing, s.route_scratch);
  }

  /// Each expert's segment of the local batch, on the device; with expert parallelism and the
  /// ragged layout, the rows per (rank, expert) exchanged there too.
  static void lay_out_local_batch(layer_type const& l, cuda_backend cuda, routing_state const& s,
                                  index_t tokens) {
    layout::layout_args const a{.tokens = tokens,
                                .experts = l.args_.gate.experts,
                                .k = l.k(),
                                .capacity = 0,
                                .row_alignment = l.local_row_alignment()};
    if constexpr (Layout::drops_tokens) {
      layout::offsets(cuda, Layout{}, a, s.routing, s.local_begin, s.local_rows);
    } else {
      layout::offsets(cuda, Layout{}, a, s.routing, s.local_begin, s.local_rows, nullptr);
      if constexpr (expert_parallel) {
        comm::communicator_ref comm = *l.comm_;
        ragged_exchange::exchange_counts(cuda, comm, s.local_rows.data(), s.received.data(),
                                         l.expert_shape().experts);
      }
    }
  }

  /// What the exchanges of this call need (expert parallelism).
  template <class T>
  static typename exchange::call exchange_of(device_state<T> const& s, batch_shape& b) {
    return {.capacity = b.capacity,
            .plan = {{b.sent.data(), b.sent.size()}, {b.received.data(), b.received.size()}},
            .begin = {b.begin.data(), b.begin.size()},
            .scratch = s.exchange,
            .byte_counts = {b.byte_counts.data(), b.byte_counts.size()}};
  }

  /// Moves local-batch rows to the ranks that own their experts (nothing on one rank).
  template <class T>
  static void to_experts(layer_type const& l, cuda_backend cuda, device_state<T> const& s,
                         batch_shape& b, matrix_view<T const> local, matrix_view<T> expert) {
    if constexpr (expert_parallel) {
      comm::communicator_ref comm = *l.comm_;
      exchange::to_experts(cuda, comm, exchange_of(s, b), local, expert);
    }
  }

  /// The way back: expert-batch rows to the ranks their tokens live on.
  template <class T>
  static void to_ranks(layer_type const& l, cuda_backend cuda, device_state<T> const& s,
                       batch_shape& b, matrix_view<T const> expert, matrix_view<T> local) {
    if constexpr (expert_parallel) {
      comm::communicator_ref comm = *l.comm_;
      exchange::to_ranks(cuda, comm, exchange_of(s, b), expert, local);
    }
  }
};

}  // namespace moe::detail
