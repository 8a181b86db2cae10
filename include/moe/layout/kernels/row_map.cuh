// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA backend of the shared row map code (row_map.hpp): dispatch (gather), combine and
// their backward over `segment_rows` in device memory, for float, half and bfloat16, on the
// caller's stream. Both layouts are segment row maps on the device (capacity.cuh and
// ragged.cuh lay out the segments), so these kernels serve every layout.
//
//   gather            dispatched[row(t, j)] = x[t]; every other row zero
//   combine           y[t] = Σ_{j = 0..k−1, in order} w(t, j) · expert_out[row(t, j)]
//   combine_backward  d_expert_out[row(t, j)] = w(t, j) · dy[t], zero elsewhere;
//                     d_weight(t, j) = ⟨dy[t], expert_out[row(t, j)]⟩
//   gather_backward   dx[t] = Σ_{j in order} d_dispatched[row(t, j)]  (combine, unit weights)
//
// Writes into the expert batch go through its inverse map `row_source` (the assignment
// t·k + j that claims each row, or −1), built in the caller's scratch by a memset and a
// scatter; then one pass over all rows writes each row exactly once, coalesced. Reductions
// over a token's choices run in the fixed order j = 0..k−1 in float, with no atomics:
// results are deterministic. Rows are moved with 16-byte accesses when the row width and
// every base pointer allow it, one element at a time otherwise.

#include <moe/core/backend.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/kernels/warp.cuh>
#include <moe/core/launch.cuh>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/gating/device_routing.hpp>
#include <moe/gating/top_k.hpp>
#include <moe/layout/args.hpp>
#include <moe/layout/concepts.hpp>
#include <moe/layout/kernels/row_kernels.cuh>
#include <moe/layout/row_map.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <type_traits>

namespace moe::layout {

namespace detail {

/// Checks that `v` (a layout's begin or rows) holds one entry per expert, in memory.
inline status check_per_expert(span<std::int64_t const> v, char const* name, index_t experts) {
  if (static_cast<index_t>(v.size()) != experts)
    return status::failure(name, "holds " + std::to_string(v.size()) + " entries for " +
                                     std::to_string(experts) + " experts");
  if (experts > 0 && v.data() == nullptr) return status::failure(name, "null data");
  return {};
}

/// Checks the routing and row map that the row kernels read: (tokens, k) assignments with
/// k ≤ 32, begin and rows for every expert, and index ranges the kernels' 32-bit grid and
/// row_source can hold. With `weights`, also the routing's combine weights.
inline status check_row_map(gating::device_routing const& r, segment_rows const& row_of,
                            bool weights) {
  index_t const tokens = r.tokens(), experts = r.experts();
  int const k = r.k();
  constexpr index_t int32_max = std::numeric_limits<std::int32_t>::max();
  if (k < 0 || k > gating::max_k)
    return status::failure(
        "r", "k must be in [0, " + std::to_string(gating::max_k) + "], got " + std::to_string(k));
  if (tokens > int32_max || tokens * k > int32_max)
    return status::failure("r", std::to_string(tokens) + " tokens × k " + std::to_string(k) +
                                    " assignments exceed the 2^31 − 1 the kernels index");
  if (status s = check_extents(row_of.expert, "r", {tokens, k}); !s)
    return status::failure("r", "expert: " + s.message());
  if (status s = check_extents(row_of.slot, "r", {tokens, k}); !s)
    return status::failure("r", "slot: " + s.message());
  if (weights)
    if (status s = check_extents(r.weight, "r", {tokens, k}); !s)
      return status::failure("r", "weight: " + s.message());
  if (status s = check_per_expert(row_of.begin, "begin", experts); !s) return s;
  return check_per_expert(row_of.rows, "rows", experts);
}

/// Checks the arguments of a layout's `offsets`: E experts in `a`, the routing's load, and
/// `begin` and `rows` of E entries.
inline status check_offsets_spans(layout_args const& a, gating::device_routing const& r,
                                  span<std::int64_t> begin, span<std::int64_t> rows) {
  index_t const experts = r.experts();
  if (a.experts != experts)
    return status::failure("a", "experts is " + std::to_string(a.experts) +
                                    " but the routing has " + std::to_string(experts));
  if (status s = check_extents(r.load, "r", {experts}); !s)
    return status::failure("r", "load: " + s.message());
  if (status s = check_per_expert(begin, "begin", experts); !s) return s;
  return check_per_expert(rows, "rows", experts);
}

/// Checks that a batch of `rows` rows fits the kernels' 32-bit grid and row_source.
inline status check_batch_rows(index_t rows, char const* argument) {
  if (rows > std::numeric_limits<std::int32_t>::max())
    return status::failure(argument,
                           std::to_string(rows) + " rows exceed the 2^31 − 1 the kernels index");
  return {};
}

/// Checks that `scratch` can hold row_source for `rows` rows (`bytes`), or says why not.
inline status check_scratch(workspace scratch, index_t rows, std::size_t bytes) {
  if (scratch.size() < bytes)
    return status::failure("scratch", "holds " + std::to_string(scratch.size()) + " bytes, " +
                                          std::to_string(bytes) + " needed for " +
                                          std::to_string(rows) + " rows");
  if (bytes > 0 && scratch.data() == nullptr) return status::failure("scratch", "null data");
  if (reinterpret_cast<std::uintptr_t>(scratch.data()) % alignof(std::int32_t) != 0)
    return status::failure("scratch", "must be aligned to 4 bytes");
  return {};
}

/// Fills row_source (rows) with −1, then scatters t·k + j to each kept row(t, j).
inline void build_row_source(cuda_backend cuda, gating::device_routing const& r,
                             segment_rows const& row_of, index_t rows, std::int32_t* row_source) {
  MOE_CUDA_TRY(cudaMemsetAsync(row_source, 0xff,
                               static_cast<std::size_t>(rows) * sizeof(*row_source), cuda.stream));
  launch<kernels::row_source_scatter>({row_of, r.tokens() * r.k(), r.k(), rows, row_source},
                                      cuda.stream);
}

}  // namespace detail

/// The row map of routing `r` over the expert segments `begin` and `rows` (from a layout's
/// `offsets`): (t, j) → begin[e] + slot(t, j) while slot < rows[e]. All device memory.
inline segment_rows row_map_of(gating::device_routing const& r, span<std::int64_t const> begin,
                               span<std::int64_t const> rows) noexcept {
  return {moe::as_const(r.expert), moe::as_const(r.slot), begin, rows};
}

/// Scratch bytes of `gather` and `combine_backward` for an expert batch of `rows` rows: its
/// inverse map row_source, one int32 per row.
inline std::size_t gather_workspace_bytes(index_t rows) noexcept {
  workspace_carver carver;
  (void)carver.take<std::int32_t>(rows);
  return carver.bytes();
}

/// Scratch bytes of layout L's `encode` on the device, for a buffer of rows_bound(L{}, a)
/// rows: any batch the layout lays out for `a` fits.
template <dispatch_layout L>
std::size_t encode_workspace_bytes(L, layout_args const& a) noexcept {
  return gather_workspace_bytes(rows_bound(L{}, a));
}

/// Scratch bytes of layout L's `decode_backward` on the device (as encode's).
template <dispatch_layout L>
std::size_t decode_backward_workspace_bytes(L, layout_args const& a) noexcept {
  return encode_workspace_bytes(L{}, a);
}

namespace detail {

/// What gather and combine_backward share: row_source from the row map, then
/// rows_out[row] = (weight ? weight(t, j) : 1) · source[t] for the row's assignment (t, j),
/// zero for rows no assignment claims.
template <class T>
void expand_to_rows(cuda_backend cuda, gating::device_routing const& r, segment_rows const& row_of,
                    bool vectorized, T const* source, float const* weight, T* rows_out,
                    index_t rows, index_t hidden, workspace scratch) {
  workspace_carver carver(scratch);
  std::int32_t* const row_source = carver.take<std::int32_t>(rows);
  build_row_source(cuda, r, row_of, rows, row_source);
  kernels::launch_rows<kernels::expand_rows, T>(
      vectorized, {row_source, source, weight, rows_out, rows, hidden, r.k()}, cuda.stream);
}

/// What combine (weights) and gather_backward (no weights: 1) share: out[t, :] = Σ over kept
/// choices j, in order, of weight(t, j) · in[row(t, j), :], checked first.
template <class T>
void sum_rows_per_token(cuda_backend cuda, gating::device_routing const& r,
                        segment_rows const& row_of, float const* weight, matrix_view<T const> in,
                        char const* in_name, matrix_view<T> out, char const* out_name) {
  index_t const hidden = out.extent(1), rows = in.extent(0);
  check_row_map(r, row_of, weight != nullptr).throw_if_failed();
  check_extents(in, in_name, {rows, hidden}).throw_if_failed();
  check_extents(out, out_name, {r.tokens(), hidden}).throw_if_failed();
  if (r.tokens() == 0 || hidden == 0) return;

  using U = std::remove_cv_t<T>;
  kernels::launch_rows<kernels::combine_tokens, U>(
      kernels::vector_access<U>(hidden, {in.data_handle(), out.data_handle()}),
      {{row_of, r.tokens(), rows, hidden, r.k()}, weight, in.data_handle(), out.data_handle()},
      cuda.stream);
}

}  // namespace detail

/// Dispatch on the device: dispatched[row(t, j), :] = x[t, :] for every kept (t, j), bit for
/// bit; every other row of `dispatched` (unclaimed capacity, padding, rows past the batch) is
/// zero. Asynchronous on `cuda.stream`; a rejected call throws `invalid_argument` and writes
/// nothing.
/// @param[in]  r          routing of the call (tokens, k), device memory
/// @param[in]  row_of     the row map, over device memory (begin, rows per expert)
/// @param[in]  x          (tokens, hidden)  device memory
/// @param[out] dispatched (rows, hidden)    device memory
/// @param      scratch    device memory, at least gather_workspace_bytes(rows)
template <device_element T>
void gather(cuda_backend cuda, gating::device_routing const& r, segment_rows const& row_of,
            matrix_view<T const> x, matrix_view<T> dispatched, workspace scratch) {
  index_t const hidden = x.extent(1), rows = dispatched.extent(0);
  std::size_t const bytes = gather_workspace_bytes(rows);
  detail::check_row_map(r, row_of, false).throw_if_failed();
  check_extents(x, "x", {r.tokens(), hidden}).throw_if_failed();
  check_extents(dispatched, "dispatched", {rows, hidden}).throw_if_failed();
  detail::check_batch_rows(rows, "dispatched").throw_if_failed();
  detail::check_scratch(scratch, rows, bytes).throw_if_failed();
  if (rows == 0 || hidden == 0) return;

  using U = std::remove_cv_t<T>;
  detail::expand_to_rows<U>(
      cuda, r, row_of,
      kernels::vector_access<U>(hidden, {x.data_handle(), dispatched.data_handle()}),
      x.data_handle(), nullptr, dispatched.data_handle(), rows, hidden, scratch);
}

/// Combine on the device: y[t, :] = Σ over kept choices j = 0..k−1, in order, of
/// weight(t, j) · expert_out[row(t, j), :], accumulated in float; zero for a token whose every
/// choice was dropped. Rows of dropped choices and unclaimed rows are never read.
/// @param[in]  r          routing of the call; its weights (tokens, k), device memory
/// @param[in]  expert_out (rows, hidden)    device memory
/// @param[out] y          (tokens, hidden)  device memory
template <device_element T>
void combine(cuda_backend cuda, gating::device_routing const& r, segment_rows const& row_of,
             matrix_view<T const> expert_out, matrix_view<T> y) {
  detail::sum_rows_per_token(cuda, r, row_of, r.weight.data_handle(), expert_out, "expert_out", y,
                             "y");
}

/// Backward of combine on the device: d_expert_out[row(t, j), :] = weight(t, j) · dy[t, :] for
/// kept (t, j), zero in every other row; d_weight(t, j) = ⟨dy[t, :], expert_out[row(t, j), :]⟩
/// in float with a fixed-order reduction, zero when dropped.
/// @param[in]  dy           (tokens, hidden)  device memory
/// @param[in]  expert_out   (rows, hidden)    device memory, the forward's
/// @param[out] d_expert_out (rows, hidden)    device memory
/// @param[out] d_weight     (tokens, k)       device memory
/// @param      scratch      device memory, at least gather_workspace_bytes(rows)
template <device_element T>
void combine_backward(cuda_backend cuda, gating::device_routing const& r,
                      segment_rows const& row_of, matrix_view<T const> dy,
                      matrix_view<T const> expert_out, matrix_view<T> d_expert_out,
                      matrix_view<float> d_weight, workspace scratch) {
  index_t const hidden = dy.extent(1), rows = expert_out.extent(0);
  std::size_t const bytes = gather_workspace_bytes(rows);
  detail::check_row_map(r, row_of, true).throw_if_failed();
  check_extents(dy, "dy", {r.tokens(), hidden}).throw_if_failed();
  check_extents(expert_out, "expert_out", {rows, hidden}).throw_if_failed();
  check_extents(d_expert_out, "d_expert_out", {rows, hidden}).throw_if_failed();
  check_extents(d_weight, "d_weight", {r.tokens(), r.k()}).throw_if_failed();
  detail::check_batch_rows(rows, "expert_out").throw_if_failed();
  detail::check_scratch(scratch, rows, bytes).throw_if_failed();

  using U = std::remove_cv_t<T>;
  bool const vectorized = kernels::vector_access<U>(
      hidden, {dy.data_handle(), expert_out.data_handle(), d_expert_out.data_handle()});
  if (rows > 0 && hidden > 0)
    detail::expand_to_rows<U>(cuda, r, row_of, vectorized, dy.data_handle(), r.weight.data_handle(),
                              d_expert_out.data_handle(), rows, hidden, scratch);
  // Also with hidden = 0: every d_weight is then an empty sum, written as zero.
  kernels::launch_rows<kernels::weight_gradient, U>(vectorized,
                                                    {{row_of, r.tokens(), rows, hidden, r.k()},
                                                     dy.data_handle(),
                                                     expert_out.data_handle(),
                                                     d_weight.data_handle()},
                                                    cuda.stream);
}

/// Backward of dispatch on the device (the transpose of the gather): dx[t, :] = Σ over kept
/// choices j = 0..k−1, in order, of d_dispatched[row(t, j), :], in float; overwritten.
/// @param[in]  d_dispatched (rows, hidden)    device memory
/// @param[out] dx           (tokens, hidden)  device memory
template <device_element T>
void gather_backward(cuda_backend cuda, gating::device_routing const& r, segment_rows const& row_of,
                     matrix_view<T const> d_dispatched, matrix_view<T> dx) {
  detail::sum_rows_per_token(cuda, r, row_of, nullptr, d_dispatched, "d_dispatched", dx, "dx");
}

}  // namespace moe::layout
