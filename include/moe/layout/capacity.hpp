// SPDX-License-Identifier: Apache-2.0
#pragma once
// The capacity layout (GShard, Tutel): dispatched tokens in a dense [E, C, H] buffer. Token
// t's choice j goes to row (e, slot) with e its expert and slot its position under the
// priority; rows no token claims are zero; slots ≥ C are dropped. Scores are applied at
// combine (Tutel's is_postscore):  y_t = Σ over kept (e, c) of w_{t,e} · out[e, c, :].
//
// Host backend: encode, decode, and the backward of both, in float64.

#include <moe/core/backend.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/view.hpp>
#include <moe/gating/router.hpp>
#include <moe/layout/concepts.hpp>

#include <algorithm>

namespace moe::layout {

/// Dense [experts, capacity, hidden] dispatch; assignments beyond the capacity are dropped.
struct capacity {
  using moe_concept = dispatch_layout_tag;
  static constexpr bool drops_tokens = true;
};
static_assert(dispatch_layout<capacity>);

/// Dispatch: dispatched[e, slot, :] = x[t, :] for every kept (t, j); other rows zero.
/// @param[in]  x          (tokens, hidden)             host memory
/// @param[out] dispatched (experts, capacity, hidden)  host memory
template <element T>
void encode(host_backend, capacity, gating::host_routing const& r, matrix_view<T const> x,
            tensor3_view<double> dispatched) {
  std::fill_n(dispatched.data_handle(), element_count(dispatched), 0.0);
  index_t const hidden = x.extent(1);
  for (index_t t = 0; t < r.tokens(); ++t)
    for (int j = 0; j < r.k(); ++j) {
      if (!r.kept(t, j)) continue;
      for (index_t h = 0; h < hidden; ++h)
        dispatched(r.expert(t, j), r.slot(t, j), h) = to_accumulate(x(t, h));
    }
}

/// Combine: y[t, :] = Σ_j over kept choices of weight(t, j) · expert_out[e, slot, :].
/// Tokens whose every choice was dropped get zero (the caller's residual carries them).
/// @param[in]  expert_out (experts, capacity, hidden)  host memory
/// @param[out] y          (tokens, hidden)             host memory
template <element T>
void decode(host_backend, capacity, gating::host_routing const& r,
            tensor3_view<double const> expert_out, matrix_view<T> y) {
  index_t const hidden = y.extent(1);
  for (index_t t = 0; t < r.tokens(); ++t)
    for (index_t h = 0; h < hidden; ++h) {
      double sum = 0;
      for (int j = 0; j < r.k(); ++j)
        if (r.kept(t, j)) sum += r.weight(t, j) * expert_out(r.expert(t, j), r.slot(t, j), h);
      y(t, h) = from_accumulate<T>(static_cast<accumulate_t<T>>(sum));
    }
}

/// Backward of combine: d_expert_out[e, slot, :] = weight(t, j) · dy[t, :] for kept (t, j),
/// zero elsewhere; d_weight(t, j) = ⟨dy[t, :], expert_out[e, slot, :]⟩, zero when dropped.
template <element T>
void decode_backward(host_backend, capacity, gating::host_routing const& r, matrix_view<T const> dy,
                     tensor3_view<double const> expert_out, tensor3_view<double> d_expert_out,
                     matrix_view<double> d_weight) {
  std::fill_n(d_expert_out.data_handle(), element_count(d_expert_out), 0.0);
  index_t const hidden = dy.extent(1);
  for (index_t t = 0; t < r.tokens(); ++t)
    for (int j = 0; j < r.k(); ++j) {
      d_weight(t, j) = 0;
      if (!r.kept(t, j)) continue;
      index_t const e = r.expert(t, j), c = r.slot(t, j);
      double dot = 0;
      for (index_t h = 0; h < hidden; ++h) {
        double const g = to_accumulate(dy(t, h));
        d_expert_out(e, c, h) = r.weight(t, j) * g;
        dot += g * expert_out(e, c, h);
      }
      d_weight(t, j) = dot;
    }
}

/// Backward of dispatch: dx[t, :] = Σ_j over kept choices of d_dispatched[e, slot, :].
/// @param[out] dx (tokens, hidden) overwritten
inline void encode_backward(host_backend, capacity, gating::host_routing const& r,
                            tensor3_view<double const> d_dispatched, matrix_view<double> dx) {
  index_t const hidden = dx.extent(1);
  for (index_t t = 0; t < r.tokens(); ++t)
    for (index_t h = 0; h < hidden; ++h) {
      double sum = 0;
      for (int j = 0; j < r.k(); ++j)
        if (r.kept(t, j)) sum += d_dispatched(r.expert(t, j), r.slot(t, j), h);
      dx(t, h) = sum;
    }
}

}  // namespace moe::layout
