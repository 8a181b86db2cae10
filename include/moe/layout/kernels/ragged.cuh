// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA backend of the ragged (dropless) layout (ragged.hpp): its offsets, the exclusive
// scan of the padded loads computed on the device with the batch's total rows left there, and
// encode, decode and their backward through the device row map code (row_map.cuh). Nothing
// synchronises with the host; a caller that needs the total on the host (to size a grouped
// GEMM) copies it and says so.
//
// The routing must drop nothing (route with capacity factor 0): every expert's segment holds
// its whole load. The host backend checks this; the device cannot without synchronising, so a
// routing that dropped assignments is laid out here as if it had not.

#include <moe/core/backend.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/kernels/shapes.cuh>
#include <moe/core/launch.cuh>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/gating/device_routing.hpp>
#include <moe/layout/args.hpp>
#include <moe/layout/kernels/row_map.cuh>
#include <moe/layout/ragged.hpp>
#include <moe/layout/row_map.hpp>

#include <cuda_runtime.h>
#include <cub/block/block_scan.cuh>

#include <cstddef>
#include <cstdint>
#include <string>

namespace moe::layout {

namespace kernels {

/// One block: begin = the exclusive scan of padded_rows(load_e, alignment), rows = load, and
/// the total in *total_rows. Each thread scans a contiguous run of experts, so any E fits in
/// one block; integer sums make the result independent of the split.
struct ragged_offsets : moe::detail::single_block<ragged_offsets, 256> {
  using block_scan = cub::BlockScan<std::int64_t, threads>;
  using shared_storage = typename block_scan::TempStorage;
  struct params {
    std::int64_t const* load;  // (experts) device memory
    std::int64_t* begin;       // (experts) device memory
    std::int64_t* rows;        // (experts) device memory
    std::int64_t* total_rows;  // one, device memory, or null
    index_t experts;
    index_t row_alignment;
  };

  __device__ void operator()(params const& p, char* smem) const {
    auto& storage = *reinterpret_cast<shared_storage*>(smem);
    index_t const per_thread = (p.experts + threads - 1) / threads;
    index_t const first = threadIdx.x * per_thread;
    index_t const last = first + per_thread < p.experts ? first + per_thread : p.experts;
    std::int64_t sum = 0;
    for (index_t e = first; e < last; ++e) sum += padded_rows(p.load[e], p.row_alignment);
    std::int64_t offset = 0, total = 0;
    block_scan(storage).ExclusiveSum(sum, offset, total);  // every thread calls it
    for (index_t e = first; e < last; ++e) {
      std::int64_t const load = p.load[e];
      p.begin[e] = offset;
      p.rows[e] = load;
      offset += padded_rows(load, p.row_alignment);
    }
    if (threadIdx.x == 0 && p.total_rows != nullptr) *p.total_rows = total;
  }
};
static_assert(device_algorithm<ragged_offsets>);

}  // namespace kernels

/// The expert batch of the ragged layout on the device: begin = the exclusive scan of
/// padded_rows(load_e, a.row_alignment), rows = load, and the batch's rows Σ_e padded_rows
/// (at most rows_bound(ragged{}, a)) in *total_rows. Asynchronous on `cuda.stream`; no host
/// synchronisation.
/// @param[in]  a          a.experts = E and a.row_alignment ≥ 1; the rest does not apply
/// @param[in]  r          routing of the call: its load (experts), device memory
/// @param[out] begin      (experts) first row of each expert, device memory
/// @param[out] rows       (experts) rows each expert computes, device memory
/// @param[out] total_rows one int64, device memory; may be null when not wanted
inline void offsets(cuda_backend cuda, ragged, layout_args const& a,
                    gating::device_routing const& r, span<std::int64_t> begin,
                    span<std::int64_t> rows, std::int64_t* total_rows) {
  MOE_EXPECTS(a.row_alignment >= 1, "a",
              "row_alignment must be at least 1, got " + std::to_string(a.row_alignment));
  detail::check_offsets_spans(a, r, begin, rows).throw_if_failed();
  launch<kernels::ragged_offsets>(
      {r.load.data_handle(), begin.data(), rows.data(), total_rows, r.experts(), a.row_alignment},
      cuda.stream);
}

/// Dispatch (a gather): dispatched[begin[e] + slot, :] = x[t, :] for every (t, j), bit for
/// bit; padding rows and rows past the batch zero.
/// @param[in]  begin, rows (experts) from `offsets`, device memory
/// @param[in]  x           (tokens, hidden)  device memory
/// @param[out] dispatched  (R, hidden)       device memory, R ≥ the batch's rows
/// @param      scratch     device memory, at least gather_workspace_bytes(R)
template <device_element T>
void encode(cuda_backend cuda, ragged, gating::device_routing const& r,
            span<std::int64_t const> begin, span<std::int64_t const> rows, matrix_view<T const> x,
            matrix_view<T> dispatched, workspace scratch) {
  gather(cuda, r, row_map_of(r, begin, rows), x, dispatched, scratch);
}

/// Combine: y[t, :] = Σ_{j = 0..k−1, in order} weight(t, j) · expert_out[begin[e] + slot, :].
/// Padding rows are never read.
/// @param[in]  expert_out (R, hidden)       device memory
/// @param[out] y          (tokens, hidden)  device memory
template <device_element T>
void decode(cuda_backend cuda, ragged, gating::device_routing const& r,
            span<std::int64_t const> begin, span<std::int64_t const> rows,
            matrix_view<T const> expert_out, matrix_view<T> y) {
  combine(cuda, r, row_map_of(r, begin, rows), expert_out, y);
}

/// Backward of combine: d_expert_out[begin[e] + slot, :] = weight(t, j) · dy[t, :], padding
/// rows zero; d_weight(t, j) = ⟨dy[t, :], expert_out[begin[e] + slot, :]⟩.
/// @param[in]  dy           (tokens, hidden)  device memory
/// @param[in]  expert_out   (R, hidden)       device memory, the forward's
/// @param[out] d_expert_out (R, hidden)       device memory
/// @param[out] d_weight     (tokens, k)       device memory
/// @param      scratch      device memory, at least gather_workspace_bytes(R)
template <device_element T>
void decode_backward(cuda_backend cuda, ragged, gating::device_routing const& r,
                     span<std::int64_t const> begin, span<std::int64_t const> rows,
                     matrix_view<T const> dy, matrix_view<T const> expert_out,
                     matrix_view<T> d_expert_out, matrix_view<float> d_weight, workspace scratch) {
  combine_backward(cuda, r, row_map_of(r, begin, rows), dy, expert_out, d_expert_out, d_weight,
                   scratch);
}

/// Backward of dispatch (the transpose of the gather): dx[t, :] = Σ_{j = 0..k−1, in order}
/// d_dispatched[begin[e] + slot, :].
/// @param[in]  d_dispatched (R, hidden)       device memory
/// @param[out] dx           (tokens, hidden)  device memory, overwritten
template <device_element T>
void encode_backward(cuda_backend cuda, ragged, gating::device_routing const& r,
                     span<std::int64_t const> begin, span<std::int64_t const> rows,
                     matrix_view<T const> d_dispatched, matrix_view<T> dx) {
  gather_backward(cuda, r, row_map_of(r, begin, rows), d_dispatched, dx);
}

}  // namespace moe::layout
