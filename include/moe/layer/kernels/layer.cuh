// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA backend of moe::layer on one GPU: the same composition as the host backend
// (layer.hpp), over device memory, on the caller's stream.
//
//   x ─ route ─▶ routing ─ offsets ─▶ segments ─ gather ─▶ batch ─ expert ─▶ out ─ combine ─▶ y
//
// Everything is stream-ordered. The expert GEMMs need the batch's shape on the host: with
// the capacity layout and a fixed capacity factor it is known before routing (E·C rows), so
// nothing synchronises and a CUDA graph can capture forward and backward; dynamic capacity
// reads C, and the ragged layout reads each expert's rows, from the device once per call (one
// stream synchronisation, documented on the layer's entry points).
//
// The workspace is carved the same way by forward and backward, from the layer's arguments
// and the call's token count alone, so backward finds what forward left there.

#include <moe/core/backend.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/gating/device_routing.hpp>
#include <moe/gating/kernels/router.cuh>
#include <moe/layer/layer.hpp>
#include <moe/layout/kernels/capacity.cuh>
#include <moe/layout/kernels/ragged.cuh>
#include <moe/layout/kernels/row_map.cuh>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace moe::detail {

template <class Gate, class Layout, class Collective, class Expert>
struct cuda_layer<layer<Gate, Layout, Collective, Expert>> {
  using layer_type = layer<Gate, Layout, Collective, Expert>;
  static_assert(Collective::is_identity,
                "moe::layer: the CUDA backend runs one rank (moe::comm::single_rank) for now; "
                "run expert parallelism on the host backend.");

  /// The layer's device workspace, carved for a call of `tokens` tokens; views of the expert
  /// batch have `rows` rows (the most, `max_rows`, when sizing).
  template <class T>
  struct device_state {
    gating::device_routing routing;
    workspace route_scratch;      // the router's, forward and backward
    span<std::int64_t> begin;     // (experts) first row of each expert, device memory
    span<std::int64_t> rows;      // (experts) rows of each expert, device memory
    std::int64_t* total_rows;     // one, device memory (ragged)
    workspace layout_scratch;     // gather's and combine_backward's row sources
    matrix_view<T> x;             // (tokens, hidden)  forward's input, for dW_gate
    matrix_view<T> dispatched;    // (rows, hidden)
    matrix_view<T> expert_out;    // (rows, hidden)
    matrix_view<T> d_expert_out;  // (rows, hidden)
    matrix_view<T> d_dispatched;  // (rows, hidden)
    matrix_view<float> d_weight;  // (tokens, k)
    matrix_view<float> d_logits;  // (tokens, experts)
    typename Expert::template device_state<T> expert;
  };

  static expert::expert_shape shape_of(layer_type const& l) noexcept { return l.expert_shape(); }

  /// Rows of the largest expert batch: what the workspace is sized for.
  static index_t max_rows(layer_type const& l) { return l.max_expert_rows(); }

  template <class T>
  static device_state<T> carve(layer_type const& l, workspace_carver& carver, index_t tokens,
                               index_t rows) {
    layer_args const& a = l.args_;
    gating::gate_args const g = layer_type::gate_args_of(a);
    int const k = l.k();
    index_t const most = max_rows(l), h = a.hidden;
    auto bytes = [&](std::size_t n) { return workspace{carver.take<std::byte>(n), n}; };
    auto batch = [&] { return make_view(carver.take<T>(most * h), rows, h); };
    auto integers = [&](index_t n) {
      return span<std::int64_t>(carver.take<std::int64_t>(n), static_cast<std::size_t>(n));
    };
    device_state<T> s;
    // First what does not depend on T, so that `stats` can find it without knowing T.
    s.routing =
        gating::carve_device_routing(carver, a.gate.tokens, tokens, a.gate.experts, k, g.groups);
    s.begin = integers(a.gate.experts);
    s.rows = integers(a.gate.experts);
    s.total_rows = carver.take<std::int64_t>(1);
    s.route_scratch = bytes(std::max(gating::route_workspace_bytes<T>(Gate{}, g, h),
                                     gating::route_backward_workspace_bytes<T>(Gate{}, g, h)));
    s.layout_scratch = bytes(layout::gather_workspace_bytes(most));
    s.x = make_view(carver.take<T>(a.gate.tokens * h), tokens, h);
    s.dispatched = batch();
    s.expert_out = batch();
    s.d_expert_out = batch();
    s.d_dispatched = batch();
    s.d_weight = make_view(carver.take<float>(a.gate.tokens * k), tokens, k);
    s.d_logits =
        make_view(carver.take<float>(a.gate.tokens * a.gate.experts), tokens, a.gate.experts);
    s.expert = Expert::template carve_device_state<T>(carver, shape_of(l), most, rows,
                                                      expert::expert_pass::training);
    return s;
  }

  template <class T>
  static std::size_t workspace_bytes(layer_type const& l, cuda_backend) {
    static_assert(expert::cuda_expert<Expert, T>,
                  "moe::layer: Expert has no CUDA backend for this element type. Include its "
                  "kernels header (<moe/expert/kernels/ffn.cuh>, <moe/expert/kernels/glu.cuh>).");
    workspace_carver counter;
    (void)carve<T>(l, counter, l.args_.gate.tokens, max_rows(l));
    return counter.bytes();
  }

  /// The expert batch of the call, as the host must know it for the expert GEMMs: the capacity
  /// layout's E·C rows (C read from the device only when it is dynamic), or the ragged
  /// layout's segments read from the device.
  struct batch_shape {
    index_t rows = 0;
    index_t capacity = 0;                        // capacity layout
    std::vector<std::int64_t> begin, row_count;  // ragged, host copies
  };

  template <class T>
  static batch_shape shape_of_batch(layer_type const& l, cuda_backend cuda,
                                    device_state<T> const& s, index_t tokens) {
    batch_shape b;
    index_t const experts = l.args_.gate.experts;
    if constexpr (Layout::drops_tokens) {
      gating::capacity_args const cap = layer_type::sizes::capacity_args_of(l.args_, tokens);
      b.capacity = gating::is_dynamic_capacity(cap)
                       ? gating::read_summary(cuda, s.routing).capacity  // synchronises
                       : gating::resolve_capacity(cap, 0);
      b.rows = experts * b.capacity;
    } else {
      b.begin.resize(static_cast<std::size_t>(experts));
      b.row_count.resize(static_cast<std::size_t>(experts));
      std::int64_t total = 0;
      std::size_t const n = static_cast<std::size_t>(experts) * sizeof(std::int64_t);
      MOE_CUDA_TRY(
          cudaMemcpyAsync(b.begin.data(), s.begin.data(), n, cudaMemcpyDeviceToHost, cuda.stream));
      MOE_CUDA_TRY(cudaMemcpyAsync(b.row_count.data(), s.rows.data(), n, cudaMemcpyDeviceToHost,
                                   cuda.stream));
      MOE_CUDA_TRY(
          cudaMemcpyAsync(&total, s.total_rows, sizeof total, cudaMemcpyDeviceToHost, cuda.stream));
      MOE_CUDA_TRY(cudaStreamSynchronize(cuda.stream));  // the ragged path's one read-back
      b.rows = total;
    }
    return b;
  }

  /// The expert batch as the expert's CUDA backend takes it.
  template <class T>
  static auto segments_of(layer_type const& l, device_state<T> const& s, batch_shape const& b) {
    if constexpr (Layout::drops_tokens)
      return expert::uniform_segments{.experts = l.args_.gate.experts,
                                      .capacity = b.capacity,
                                      .claimed = {s.rows.data(), s.rows.size()}};
    else
      return expert::row_segments{{b.begin.data(), b.begin.size()},
                                  {b.row_count.data(), b.row_count.size()}};
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
    device_state<T> s = carve<T>(l, sizing, tokens, max_rows(l));
    gating::gate_args const g = layer_type::gate_args_of(l.args_);
    gating::route(cuda, Gate{}, g, x, p.gate_weight, s.routing, s.route_scratch);
    lay_out(l, cuda, s, tokens);
    batch_shape const b = shape_of_batch(l, cuda, s, tokens);
    workspace_carver carver(ws);
    s = carve<T>(l, carver, tokens, b.rows);

    MOE_CUDA_TRY(cudaMemcpyAsync(s.x.data_handle(), x.data_handle(),
                                 static_cast<std::size_t>(element_count(x)) * sizeof(T),
                                 cudaMemcpyDeviceToDevice, cuda.stream));
    auto const row_of = layout::row_map_of(s.routing, as_span(s.begin), as_span(s.rows));
    layout::gather(cuda, s.routing, row_of, x, s.dispatched, s.layout_scratch);
    Expert::forward(cuda, shape_of(l), p.expert, segments_of(l, s, b), moe::as_const(s.dispatched),
                    s.expert_out, s.expert);
    layout::combine(cuda, s.routing, row_of, moe::as_const(s.expert_out), y);
  }

  template <class T>
  static void backward(layer_type const& l, cuda_backend cuda, matrix_view<T const> dy,
                       typename layer_type::template params<T> const& p, matrix_view<T> dx,
                       typename layer_type::template gradients<T> const& grads, workspace ws) {
    l.template can_implement<T>(cuda, dy, p, dx, grads, ws).throw_if_failed();
    index_t const tokens = dy.extent(0);

    workspace_carver sizing(ws);
    device_state<T> s = carve<T>(l, sizing, tokens, max_rows(l));
    batch_shape const b = shape_of_batch(l, cuda, s, tokens);
    workspace_carver carver(ws);
    s = carve<T>(l, carver, tokens, b.rows);
    gating::gate_args const g = layer_type::gate_args_of(l.args_);

    auto const row_of = layout::row_map_of(s.routing, as_span(s.begin), as_span(s.rows));
    layout::combine_backward(cuda, s.routing, row_of, dy, moe::as_const(s.expert_out),
                             s.d_expert_out, s.d_weight, s.layout_scratch);
    Expert::backward(cuda, shape_of(l), p.expert, segments_of(l, s, b), moe::as_const(s.dispatched),
                     moe::as_const(s.d_expert_out), s.d_dispatched, grads.expert, s.expert);
    layout::gather_backward(cuda, s.routing, row_of, moe::as_const(s.d_dispatched), dx);
    gating::route_backward(cuda, Gate{}, g, s.routing, moe::as_const(s.d_weight),
                           moe::as_const(s.x), p.gate_weight, s.d_logits, dx, grads.gate_weight,
                           s.route_scratch);
  }

  static layer_stats stats(layer_type const& l, cuda_backend cuda, workspace ws, index_t tokens) {
    layer_args const& a = l.args_;
    MOE_EXPECTS(tokens >= 1 && tokens <= a.gate.tokens, "tokens",
                "must be the forward call's, 1 to " + std::to_string(a.gate.tokens));
    MOE_EXPECTS(ws.data() != nullptr, "ws", "null: no forward call's state");
    // The prefix of `carve`, which does not depend on the element type.
    auto prefix = [&](workspace_carver& carver) {
      gating::device_routing const r = gating::carve_device_routing(
          carver, a.gate.tokens, tokens, a.gate.experts, l.k(), a.gate.groups);
      (void)carver.take<std::int64_t>(a.gate.experts);  // begin
      (void)carver.take<std::int64_t>(a.gate.experts);  // rows
      return std::pair{r, carver.take<std::int64_t>(1)};
    };
    {
      workspace_carver counter;
      (void)prefix(counter);
      MOE_EXPECTS(
          ws.size() >= counter.bytes(), "ws",
          "holds " + std::to_string(ws.size()) + " bytes, fewer than any forward call's workspace");
    }
    workspace_carver carver(ws);
    auto const [r, total_rows] = prefix(carver);

    gating::routing_summary const summary = gating::read_summary(cuda, r);  // synchronises
    index_t rows = a.gate.experts * summary.capacity;
    if constexpr (!Layout::drops_tokens) rows = copy_to_host(cuda, total_rows, 1)[0];
    // The call's load and assignments, to the host: what the drops per expert are counted on.
    index_t const k = l.k();
    std::vector<std::int64_t> const load = copy_to_host(cuda, r.load.data_handle(), a.gate.experts);
    std::vector<std::int32_t> const expert = copy_to_host(cuda, r.expert.data_handle(), tokens * k);
    std::vector<std::int64_t> const slot = copy_to_host(cuda, r.slot.data_handle(), tokens * k);
    return l.stats_of(summary, rows, {load.data(), load.size()},
                      gating::dropped_per_expert(make_view(expert.data(), tokens, k),
                                                 make_view(slot.data(), tokens, k),
                                                 summary.capacity, a.gate.experts));
  }

 private:
  /// `count` elements of device memory at `from`, on the host once the stream has them.
  template <class U>
  static std::vector<U> copy_to_host(cuda_backend cuda, U const* from, index_t count) {
    std::vector<U> to(static_cast<std::size_t>(count));
    MOE_CUDA_TRY(cudaMemcpyAsync(to.data(), from, to.size() * sizeof(U), cudaMemcpyDeviceToHost,
                                 cuda.stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(cuda.stream));
    return to;
  }

  static span<std::int64_t const> as_span(span<std::int64_t> s) noexcept {
    return {s.data(), s.size()};
  }

  /// Each expert's segment of the batch, on the device.
  template <class T>
  static void lay_out(layer_type const& l, cuda_backend cuda, device_state<T> const& s,
                      index_t tokens) {
    layout::layout_args const a{.tokens = tokens,
                                .experts = l.args_.gate.experts,
                                .k = l.k(),
                                .capacity = 0,
                                .row_alignment = l.args_.expert_row_alignment};
    if constexpr (Layout::drops_tokens)
      layout::offsets(cuda, Layout{}, a, s.routing, s.begin, s.rows);
    else
      layout::offsets(cuda, Layout{}, a, s.routing, s.begin, s.rows, s.total_rows);
  }
};

}  // namespace moe::detail
