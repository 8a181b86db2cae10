// SPDX-License-Identifier: Apache-2.0
#pragma once
// The capacity layout (GShard, Tutel): dispatched tokens in a dense [E, C, H] buffer. Token
// t's choice j goes to row (e, slot) with e its expert and slot its position under the
// priority; rows no token claims are zero; slots ≥ C are dropped. Scores are applied at
// combine (Tutel's is_postscore):  y_t = Σ over kept (e, c) of w_{t,e} · out[e, c, :].
//
// As a row map (row_map.hpp): expert e's segment begins at e·C and holds C rows, so the row
// of (t, j) is e·C + slot while slot < C. The size math, the expert batch, and the host
// backend of encode, decode and their backward, in float64, through the shared row map code.

#include <moe/core/backend.hpp>
#include <moe/core/checked.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/view.hpp>
#include <moe/gating/host_routing.hpp>
#include <moe/layout/args.hpp>
#include <moe/layout/concepts.hpp>
#include <moe/layout/row_map.hpp>

#include <cstdint>

namespace moe::layout {

/// Dense [experts, capacity, hidden] dispatch; assignments beyond the capacity are dropped.
struct capacity {
  using moe_concept = dispatch_layout_tag;
  static constexpr bool drops_tokens = true;
};
static_assert(dispatch_layout<capacity>);

/// Rows of the capacity layout's expert batch, E·C, for `a.capacity` = C (or its bound);
/// `size_overflow` when E·C does not fit index_t.
MOE_HOST_DEVICE constexpr index_t rows_bound(capacity, layout_args const& a) noexcept {
  return checked_mul(a.experts, a.capacity);
}

/// The capacity layout's row map: (t, j) → e·C + slot while slot < C, `no_row` past it.
struct capacity_rows {
  matrix_view<std::int32_t const> expert;  // (tokens, k)
  matrix_view<std::int64_t const> slot;    // (tokens, k)
  index_t capacity = 0;

  MOE_HOST_DEVICE constexpr index_t operator()(index_t t, index_t j) const noexcept {
    index_t const e = expert(t, j);
    return row_in_segment(e * capacity, capacity, slot(t, j));
  }
};
static_assert(row_map<capacity_rows>);

/// The row map of routing `r` in the capacity layout (C = r.capacity).
inline capacity_rows row_map_of(capacity, gating::host_routing const& r) noexcept {
  return {as_const(r.expert), as_const(r.slot), r.capacity};
}

/// The expert batch of the capacity layout: expert e's rows begin at e·C and are its kept
/// assignments, min(load_e, C); the rest of its C rows are unclaimed (zero). `a.row_alignment`
/// does not apply (the capacity itself is aligned instead).
/// @param[in]  load  (experts) assignments per expert, before drops
/// @param[out] begin (experts) first row of each expert
/// @param[out] rows  (experts) rows each expert computes
/// @return rows of the batch, E·C
inline index_t offsets(host_backend, capacity, layout_args const& a, span<std::int64_t const> load,
                       span<std::int64_t> begin, span<std::int64_t> rows) {
  for (std::size_t e = 0; e < load.size(); ++e) {
    begin[e] = static_cast<index_t>(e) * a.capacity;
    rows[e] = load[e] < a.capacity ? load[e] : a.capacity;
  }
  return rows_bound(capacity{}, a);
}

namespace detail {

/// The [E, C, H] buffer as the (E·C, H) row matrix that the row map indexes.
template <class T>
matrix_view<T> as_rows(tensor3_view<T> v) noexcept {
  return make_view(v.data_handle(), v.extent(0) * v.extent(1), v.extent(2));
}

}  // namespace detail

/// Dispatch: dispatched[e, slot, :] = x[t, :] for every kept (t, j); other rows zero.
/// @param[in]  x          (tokens, hidden)             host memory
/// @param[out] dispatched (experts, capacity, hidden)  host memory
template <element T>
void encode(host_backend, capacity, gating::host_routing const& r, matrix_view<T const> x,
            tensor3_view<double> dispatched) {
  gather(host, r, row_map_of(capacity{}, r), x, detail::as_rows(dispatched));
}

/// Combine: y[t, :] = Σ_j over kept choices of weight(t, j) · expert_out[e, slot, :].
/// Tokens whose every choice was dropped get zero (the caller's residual carries them).
/// @param[in]  expert_out (experts, capacity, hidden)  host memory
/// @param[out] y          (tokens, hidden)             host memory
template <element T>
void decode(host_backend, capacity, gating::host_routing const& r,
            tensor3_view<double const> expert_out, matrix_view<T> y) {
  combine(host, r, row_map_of(capacity{}, r), detail::as_rows(expert_out), y);
}

/// Backward of combine: d_expert_out[e, slot, :] = weight(t, j) · dy[t, :] for kept (t, j),
/// zero elsewhere; d_weight(t, j) = ⟨dy[t, :], expert_out[e, slot, :]⟩, zero when dropped.
template <element T>
void decode_backward(host_backend, capacity, gating::host_routing const& r, matrix_view<T const> dy,
                     tensor3_view<double const> expert_out, tensor3_view<double> d_expert_out,
                     matrix_view<double> d_weight) {
  combine_backward(host, r, row_map_of(capacity{}, r), dy, detail::as_rows(expert_out),
                   detail::as_rows(d_expert_out), d_weight);
}

/// Backward of dispatch: dx[t, :] = Σ_j over kept choices of d_dispatched[e, slot, :].
/// @param[out] dx (tokens, hidden) overwritten
inline void encode_backward(host_backend, capacity, gating::host_routing const& r,
                            tensor3_view<double const> d_dispatched, matrix_view<double> dx) {
  gather_backward(host, r, row_map_of(capacity{}, r), detail::as_rows(d_dispatched), dx);
}

}  // namespace moe::layout
