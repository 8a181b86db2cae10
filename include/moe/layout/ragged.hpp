// SPDX-License-Identifier: Apache-2.0
#pragma once
// The ragged layout (dropless; MegaBlocks, Megatron's grouped GEMM path): every assignment
// is kept, and the dispatched rows are sorted by expert, stable in priority order. Expert e's
// rows begin at offset_e, the exclusive scan of the padded loads, and hold its load_e
// assignments; each expert's rows are padded to a multiple of `row_alignment` (16, 32, 128:
// GEMM tiles). Padding rows are zero on dispatch and never combined.
//
// As a row map (row_map.hpp): the row of (t, j) is offset_e + slot(t, j). With nothing
// dropped, the router's slot is the position of (t, j) in expert e's queue in priority
// order, so the ragged layout is the router run with no capacity limit, plus offsets.
//
//   dispatch  gather:  dispatched[offset_e + slot(t, j), :] = x[t, :]
//   combine   y_t = Σ_{j = 0..k−1, in order} w_{t,j} · out[offset_e + slot(t, j), :]
//
// The size math (constexpr, host and device), the offsets, and the host backend of encode,
// decode and their backward, in float64, through the shared row map code.

#include <moe/core/backend.hpp>
#include <moe/core/checked.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/host_routing.hpp>
#include <moe/layout/args.hpp>
#include <moe/layout/concepts.hpp>
#include <moe/layout/row_map.hpp>

#include <cstdint>
#include <string>

namespace moe::layout {

/// Dropless dispatch: assignments sorted by expert, each expert's rows padded to a multiple
/// of `layout_args::row_alignment`. No capacity applies.
struct ragged {
  using moe_concept = dispatch_layout_tag;
  static constexpr bool drops_tokens = false;
};
static_assert(dispatch_layout<ragged>);

/// Rows an expert with `load` assignments occupies: its load rounded up to a multiple of
/// `row_alignment` (zero for an expert with no assignment).
MOE_HOST_DEVICE constexpr index_t padded_rows(index_t load, index_t row_alignment) noexcept {
  return round_up(load, row_alignment);
}

/// An upper bound of the ragged rows of T tokens with k choices each over E experts, for
/// sizing buffers: the loads sum to T·k, and padding adds at most (alignment − 1) per expert.
/// `size_overflow` when the bound does not fit index_t.
MOE_HOST_DEVICE constexpr index_t ragged_rows_bound(index_t tokens, index_t k, index_t experts,
                                                    index_t row_alignment) noexcept {
  return checked_add(checked_mul(tokens, k), checked_mul(experts, row_alignment - 1));
}

/// `ragged_rows_bound` of `a` (T, k, E and the row alignment).
MOE_HOST_DEVICE constexpr index_t rows_bound(ragged, layout_args const& a) noexcept {
  return ragged_rows_bound(a.tokens, a.k, a.experts, a.row_alignment);
}

/// The expert batch of the ragged layout: begin = the exclusive scan of the padded loads,
/// rows = the loads. Rows between begin[e] + rows[e] and begin[e + 1] are padding.
/// `a.capacity` does not apply.
/// @param[in]  load  (experts) assignments per expert, host memory
/// @param[out] begin (experts) first row of each expert (its offset), host memory
/// @param[out] rows  (experts) rows each expert computes, host memory
/// @return rows of the batch: Σ_e padded_rows(load_e), at most rows_bound(ragged{}, a)
inline index_t offsets(host_backend, ragged, layout_args const& a, span<std::int64_t const> load,
                       span<std::int64_t> begin, span<std::int64_t> rows) {
  index_t next = 0;
  for (std::size_t e = 0; e < load.size(); ++e) {
    begin[e] = next;
    rows[e] = load[e];
    next += padded_rows(load[e], a.row_alignment);
  }
  return next;
}

/// The row map of routing `r` in the ragged layout whose offsets are `begin`: (t, j) →
/// begin[e] + slot(t, j). Throws `invalid_argument` when `r` dropped an assignment (its
/// capacity is below an expert's load): the ragged layout drops nothing, so route without a
/// capacity limit (capacity factor 0).
inline segment_rows row_map_of(ragged, gating::host_routing const& r,
                               span<std::int64_t const> begin) {
  index_t const experts = r.load.extent(0);
  MOE_EXPECTS(static_cast<index_t>(begin.size()) == experts, "begin",
              "holds " + std::to_string(begin.size()) + " offsets for " + std::to_string(experts) +
                  " experts");
  for (index_t e = 0; e < experts; ++e)
    MOE_EXPECTS(r.load(e) <= r.capacity, "r",
                "dropped assignments of expert " + std::to_string(e) + " (load " +
                    std::to_string(r.load(e)) + " over capacity " + std::to_string(r.capacity) +
                    "); the ragged layout drops nothing: route with capacity factor 0");
  span<std::int64_t const> const load{r.load.data_handle(), static_cast<std::size_t>(experts)};
  return {as_const(r.expert), as_const(r.slot), begin, load};
}

/// Dispatch (a gather): dispatched[begin[e] + slot, :] = x[t, :] for every (t, j); padding
/// rows zero.
/// @param[in]  begin      (experts)         offsets, from `offsets`
/// @param[in]  x          (tokens, hidden)  host memory
/// @param[out] dispatched (rows, hidden)    host memory, rows ≥ the batch's rows
template <element T>
void encode(host_backend, ragged, gating::host_routing const& r, span<std::int64_t const> begin,
            matrix_view<T const> x, matrix_view<double> dispatched) {
  gather(host, r, row_map_of(ragged{}, r, begin), x, dispatched);
}

/// Combine: y[t, :] = Σ_{j = 0..k−1, in order} weight(t, j) · expert_out[begin[e] + slot, :].
/// Padding rows are never read.
/// @param[in]  expert_out (rows, hidden)    host memory
/// @param[out] y          (tokens, hidden)  host memory
template <element T>
void decode(host_backend, ragged, gating::host_routing const& r, span<std::int64_t const> begin,
            matrix_view<double const> expert_out, matrix_view<T> y) {
  combine(host, r, row_map_of(ragged{}, r, begin), expert_out, y);
}

/// Backward of combine: d_expert_out[begin[e] + slot, :] = weight(t, j) · dy[t, :], padding
/// rows zero; d_weight(t, j) = ⟨dy[t, :], expert_out[begin[e] + slot, :]⟩.
/// @param[in]  dy           (tokens, hidden)  host memory
/// @param[in]  expert_out   (rows, hidden)    host memory, the forward's
/// @param[out] d_expert_out (rows, hidden)    host memory
/// @param[out] d_weight     (tokens, k)       host memory
template <element T>
void decode_backward(host_backend, ragged, gating::host_routing const& r,
                     span<std::int64_t const> begin, matrix_view<T const> dy,
                     matrix_view<double const> expert_out, matrix_view<double> d_expert_out,
                     matrix_view<double> d_weight) {
  combine_backward(host, r, row_map_of(ragged{}, r, begin), dy, expert_out, d_expert_out, d_weight);
}

/// Backward of dispatch (the transpose of the gather): dx[t, :] = Σ_{j = 0..k−1, in order}
/// d_dispatched[begin[e] + slot, :].
/// @param[out] dx (tokens, hidden) host memory, overwritten
inline void encode_backward(host_backend, ragged, gating::host_routing const& r,
                            span<std::int64_t const> begin, matrix_view<double const> d_dispatched,
                            matrix_view<double> dx) {
  gather_backward(host, r, row_map_of(ragged{}, r, begin), d_dispatched, dx);
}

}  // namespace moe::layout
