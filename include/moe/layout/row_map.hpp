// SPDX-License-Identifier: Apache-2.0
#pragma once
// What every dispatch layout shares: the row of each assignment (token t, choice j) in the
// dispatched matrix. Expert e's assignments fill a segment of rows [begin_e, begin_e + rows_e)
// in slot order (the priority order of gating::assign_slots), so
//
//   row(t, j) = begin_e + slot(t, j)   while slot(t, j) < rows_e;   no_row (dropped) past it.
//
// The capacity layout is begin_e = e·C with C rows per expert; the ragged layout is begin_e =
// the exclusive scan of the padded loads with load_e rows per expert, so it drops nothing.
// A layout is its row map: dispatch, combine and their backward below serve every layout.
//
// Host backend, in float64: dispatch is a gather into those rows (all other rows zero);
// combine is a weighted reduction over each token's choices j = 0..k−1 in that order, so the
// result does not depend on how the rows are laid out, and no atomics are needed on device.

#include <moe/core/backend.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/gating/host_routing.hpp>
#include <moe/gating/top_k.hpp>

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <string>

namespace moe::layout {

/// The row of a dropped assignment: none.
inline constexpr index_t no_row = -1;

/// The row of the assignment at `slot` of an expert whose segment starts at `begin` and
/// holds `rows` rows; `no_row` when the slot lies past the segment (the assignment is dropped).
MOE_HOST_DEVICE constexpr index_t row_in_segment(index_t begin, index_t rows,
                                                 index_t slot) noexcept {
  return slot < rows ? begin + slot : no_row;
}

/// M models row_map if `m(t, j)` gives the row of assignment (t, j) in the dispatched matrix,
/// or `no_row` when it is dropped. Distinct kept assignments have distinct rows.
template <class M>
concept row_map = std::copy_constructible<M> && requires(M const& m, index_t t, index_t j) {
  { m(t, j) } -> std::convertible_to<index_t>;
};

/// The row map of an expert batch given by segments: (t, j) of expert e goes to
/// row_in_segment(begin[e], rows[e], slot(t, j)).
struct segment_rows {
  matrix_view<std::int32_t const> expert;  // (tokens, k)  the expert of each assignment
  matrix_view<std::int64_t const> slot;    // (tokens, k)  its position in the expert's queue
  span<std::int64_t const> begin;          // (experts)    first row of each expert
  span<std::int64_t const> rows;           // (experts)    rows each expert holds

  MOE_HOST_DEVICE constexpr index_t operator()(index_t t, index_t j) const noexcept {
    auto const e = static_cast<std::size_t>(expert(t, j));
    return row_in_segment(begin[e], rows[e], slot(t, j));
  }
};
static_assert(row_map<segment_rows>);

namespace detail {

/// The check every host row operation runs first, so that a rejected call writes nothing:
/// the routing's (tokens, k) assignments over its experts, the token-side view
/// (tokens, hidden), the row-side view (rows, hidden), and every kept row of the map inside
/// the row side (the map's offsets are the caller's: a row past them would be written out of
/// bounds).
template <row_map Map, class TokenView, class RowView>
[[nodiscard]] status check_host_rows(gating::host_routing const& r, Map const& row_of,
                                     TokenView token_side, char const* token_name, RowView row_side,
                                     char const* row_name) noexcept {
  index_t const tokens = r.tokens(), experts = r.experts(), k = r.k();
  index_t const hidden = token_side.extent(1), rows = row_side.extent(0);
  if (auto st = check_extents(r.slot, "r.slot", {tokens, k}); !st) return st;
  if (auto st = check_extents(token_side, token_name, {tokens, hidden}); !st) return st;
  if (auto st = check_extents(row_side, row_name, {rows, hidden}); !st) return st;
  for (index_t t = 0; t < tokens; ++t)
    for (index_t j = 0; j < k; ++j) {
      if (r.expert(t, j) < 0 || r.expert(t, j) >= experts)
        return status::failure("r.expert", "assignment (" + std::to_string(t) + ", " +
                                               std::to_string(j) + ") names expert " +
                                               std::to_string(r.expert(t, j)) + " of " +
                                               std::to_string(experts));
      if (index_t const row = row_of(t, j); row != no_row && (row < 0 || row >= rows))
        return status::failure(row_name,
                               "holds " + std::to_string(rows) + " rows, but assignment (" +
                                   std::to_string(t) + ", " + std::to_string(j) + ") goes to row " +
                                   std::to_string(row) + ": size it for the layout's offsets");
    }
  return {};
}

}  // namespace detail

/// Dispatch: dispatched[row(t, j), :] = x[t, :] for every kept (t, j); every other row zero.
/// Checks every argument first and throws `invalid_argument`, writing nothing.
/// @param[in]  r          routing of the call (tokens and k)
/// @param[in]  x          (tokens, hidden)  host memory
/// @param[out] dispatched (rows, hidden)    host memory
template <row_map Map, element T>
void gather(host_backend, gating::host_routing const& r, Map const& row_of, matrix_view<T const> x,
            matrix_view<double> dispatched) {
  detail::check_host_rows(r, row_of, x, "x", dispatched, "dispatched").throw_if_failed();
  std::fill_n(dispatched.data_handle(), element_count(dispatched), 0.0);
  index_t const hidden = x.extent(1);
  for (index_t t = 0; t < r.tokens(); ++t)
    for (index_t j = 0; j < r.k(); ++j)
      if (index_t const row = row_of(t, j); row != no_row)
        for (index_t h = 0; h < hidden; ++h) dispatched(row, h) = to_accumulate(x(t, h));
}

namespace detail {

/// What combine and gather_backward share: for every token t and column h, the sum over kept
/// choices j = 0..k−1, in that order, of weight(t, j) · in[row(t, j), h], handed to
/// `store(t, h, sum)`.
template <row_map Map, class Weight, class Store>
void sum_rows_per_token(host_backend, gating::host_routing const& r, Map const& row_of,
                        matrix_view<double const> in, index_t hidden, Weight weight, Store store) {
  index_t const k = r.k();
  index_t rows[gating::max_k];
  for (index_t t = 0; t < r.tokens(); ++t) {
    for (index_t j = 0; j < k; ++j) rows[j] = row_of(t, j);
    for (index_t h = 0; h < hidden; ++h) {
      double sum = 0;
      for (index_t j = 0; j < k; ++j)
        if (rows[j] != no_row) sum += weight(t, j) * in(rows[j], h);
      store(t, h, sum);
    }
  }
}

}  // namespace detail

/// Combine: y[t, :] = Σ over kept choices j = 0..k−1, in order, of weight(t, j) ·
/// expert_out[row(t, j), :]. A token whose every choice was dropped gets zero (the caller's
/// residual carries it).
/// @param[in]  expert_out (rows, hidden)    host memory
/// @param[out] y          (tokens, hidden)  host memory
template <row_map Map, element T>
void combine(host_backend, gating::host_routing const& r, Map const& row_of,
             matrix_view<double const> expert_out, matrix_view<T> y) {
  detail::check_host_rows(r, row_of, y, "y", expert_out, "expert_out").throw_if_failed();
  check_extents(r.weight, "r.weight", {r.tokens(), r.k()}).throw_if_failed();
  detail::sum_rows_per_token(
      host, r, row_of, expert_out, y.extent(1),
      [&](index_t t, index_t j) { return r.weight(t, j); },
      [&](index_t t, index_t h, double sum) {
        y(t, h) = from_accumulate<T>(static_cast<accumulate_t<T>>(sum));
      });
}

/// Backward of combine: d_expert_out[row(t, j), :] = weight(t, j) · dy[t, :] for kept (t, j),
/// zero in every other row; d_weight(t, j) = ⟨dy[t, :], expert_out[row(t, j), :]⟩, zero when
/// dropped.
/// @param[in]  dy           (tokens, hidden)  host memory
/// @param[in]  expert_out   (rows, hidden)    host memory, the forward's
/// @param[out] d_expert_out (rows, hidden)    host memory
/// @param[out] d_weight     (tokens, k)       host memory
template <row_map Map, element T>
void combine_backward(host_backend, gating::host_routing const& r, Map const& row_of,
                      matrix_view<T const> dy, matrix_view<double const> expert_out,
                      matrix_view<double> d_expert_out, matrix_view<double> d_weight) {
  detail::check_host_rows(r, row_of, dy, "dy", expert_out, "expert_out").throw_if_failed();
  check_extents(d_expert_out, "d_expert_out", {expert_out.extent(0), dy.extent(1)})
      .throw_if_failed();
  check_extents(r.weight, "r.weight", {r.tokens(), r.k()}).throw_if_failed();
  check_extents(d_weight, "d_weight", {r.tokens(), r.k()}).throw_if_failed();
  std::fill_n(d_expert_out.data_handle(), element_count(d_expert_out), 0.0);
  index_t const hidden = dy.extent(1);
  for (index_t t = 0; t < r.tokens(); ++t)
    for (index_t j = 0; j < r.k(); ++j) {
      d_weight(t, j) = 0;
      index_t const row = row_of(t, j);
      if (row == no_row) continue;
      double dot = 0;
      for (index_t h = 0; h < hidden; ++h) {
        double const g = to_accumulate(dy(t, h));
        d_expert_out(row, h) = r.weight(t, j) * g;
        dot += g * expert_out(row, h);
      }
      d_weight(t, j) = dot;
    }
}

/// Backward of dispatch (the transpose of the gather): dx[t, :] = Σ over kept choices
/// j = 0..k−1, in order, of d_dispatched[row(t, j), :].
/// @param[in]  d_dispatched (rows, hidden)    host memory
/// @param[out] dx           (tokens, hidden)  host memory, overwritten
template <row_map Map>
void gather_backward(host_backend, gating::host_routing const& r, Map const& row_of,
                     matrix_view<double const> d_dispatched, matrix_view<double> dx) {
  detail::check_host_rows(r, row_of, dx, "dx", d_dispatched, "d_dispatched").throw_if_failed();
  // Unit weights: 1 · x is x exactly, so this is the plain sum.
  detail::sum_rows_per_token(
      host, r, row_of, d_dispatched, dx.extent(1), [](index_t, index_t) { return 1.0; },
      [&](index_t t, index_t h, double sum) { dx(t, h) = sum; });
}

}  // namespace moe::layout
