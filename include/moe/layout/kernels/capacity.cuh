// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA backend of the capacity layout (capacity.hpp): its offsets, computed on the device
// from the capacity the router resolved there, and encode, decode and their backward through
// the device row map code (row_map.cuh). Nothing synchronises with the host, so the capacity
// path can be captured in a CUDA graph.
//
// The batch the device lays out is [E, C, H] with C = r.scalars->capacity, packed at the start
// of the caller's [E, C', H] buffer, where C' ≥ C is the bound the buffer was sized for (with a
// fixed capacity factor, C' = C). Rows of the buffer past E·C are zero on encode.

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
#include <moe/layout/capacity.hpp>
#include <moe/layout/kernels/row_map.cuh>
#include <moe/layout/row_map.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace moe::layout {

namespace kernels {

/// begin[e] = e·C and rows[e] = min(load[e], C), with C read from the routing's device
/// scalars (a dynamic capacity is known only there).
struct capacity_offsets : moe::detail::thread_per_item<capacity_offsets> {
  struct params {
    std::int64_t const* load;                       // (experts) device memory
    gating::device_routing_scalars const* scalars;  // device memory
    std::int64_t* begin;                            // (experts) device memory
    std::int64_t* rows;                             // (experts) device memory
    index_t experts;
  };
  static index_t items(params const& p) { return p.experts; }

  __device__ void operator()(params const& p, char*) const {
    index_t const e = item();
    if (e >= p.experts) return;
    std::int64_t const capacity = p.scalars->capacity;
    std::int64_t const load = p.load[e];
    p.begin[e] = e * capacity;
    p.rows[e] = load < capacity ? load : capacity;
  }
};
static_assert(device_algorithm<capacity_offsets>);

}  // namespace kernels

namespace detail {

/// The capacity layout's [E, C', H] buffer `v`: checks it holds E experts of `hidden` and
/// returns it as the (E·C', H) row matrix that the row map indexes.
template <class T>
matrix_view<T> capacity_rows_of(tensor3_view<T> v, gating::device_routing const& r, index_t hidden,
                                char const* argument) {
  check_extents(v, argument, {r.experts(), v.extent(1), hidden}).throw_if_failed();
  return as_rows(v);
}

}  // namespace detail

/// The expert batch of the capacity layout on the device: begin[e] = e·C, rows[e] =
/// min(load_e, C), with C = r.scalars->capacity read on the device. Asynchronous on
/// `cuda.stream`; no host synchronisation.
/// @param[in]  a     a.experts = E; the rest does not apply
/// @param[in]  r     routing of the call: its load (experts) and scalars, device memory
/// @param[out] begin (experts) first row of each expert, device memory
/// @param[out] rows  (experts) rows each expert computes, device memory
inline void offsets(cuda_backend cuda, capacity, layout_args const& a,
                    gating::device_routing const& r, span<std::int64_t> begin,
                    span<std::int64_t> rows) {
  detail::check_offsets_spans(a, r, begin, rows).throw_if_failed();
  MOE_EXPECTS(r.scalars != nullptr, "r", "null scalars: the capacity is read from them");
  launch<kernels::capacity_offsets>(
      {r.load.data_handle(), r.scalars, begin.data(), rows.data(), r.experts()}, cuda.stream);
}

/// Dispatch: dispatched[e, slot, :] = x[t, :] for every kept (t, j), bit for bit; every other
/// row of the buffer zero. The batch is packed at stride C = the device capacity, so a C' > C
/// buffer holds it in its first E·C rows.
/// @param[in]  begin, rows (experts) from `offsets`, device memory
/// @param[in]  x           (tokens, hidden)       device memory
/// @param[out] dispatched  (experts, C', hidden)  device memory
/// @param      scratch     device memory, at least encode_workspace_bytes(capacity{}, a)
///                         with a.capacity = C'
template <device_element T>
void encode(cuda_backend cuda, capacity, gating::device_routing const& r,
            span<std::int64_t const> begin, span<std::int64_t const> rows, matrix_view<T const> x,
            tensor3_view<T> dispatched, workspace scratch) {
  gather(cuda, r, row_map_of(r, begin, rows), x,
         detail::capacity_rows_of(dispatched, r, x.extent(1), "dispatched"), scratch);
}

/// Combine: y[t, :] = Σ_j over kept choices, in order, of weight(t, j) · expert_out[e, slot, :];
/// zero for a token whose every choice was dropped.
/// @param[in]  expert_out (experts, C', hidden)  device memory
/// @param[out] y          (tokens, hidden)       device memory
template <device_element T>
void decode(cuda_backend cuda, capacity, gating::device_routing const& r,
            span<std::int64_t const> begin, span<std::int64_t const> rows,
            tensor3_view<T const> expert_out, matrix_view<T> y) {
  combine(cuda, r, row_map_of(r, begin, rows),
          detail::capacity_rows_of(expert_out, r, y.extent(1), "expert_out"), y);
}

/// Backward of combine: d_expert_out[e, slot, :] = weight(t, j) · dy[t, :] for kept (t, j),
/// zero elsewhere; d_weight(t, j) = ⟨dy[t, :], expert_out[e, slot, :]⟩, zero when dropped.
/// @param[in]  dy           (tokens, hidden)       device memory
/// @param[in]  expert_out   (experts, C', hidden)  device memory, the forward's
/// @param[out] d_expert_out (experts, C', hidden)  device memory
/// @param[out] d_weight     (tokens, k)            device memory
/// @param      scratch      device memory, at least
///                          decode_backward_workspace_bytes(capacity{}, a) with a.capacity = C'
template <device_element T>
void decode_backward(cuda_backend cuda, capacity, gating::device_routing const& r,
                     span<std::int64_t const> begin, span<std::int64_t const> rows,
                     matrix_view<T const> dy, tensor3_view<T const> expert_out,
                     tensor3_view<T> d_expert_out, matrix_view<float> d_weight, workspace scratch) {
  combine_backward(cuda, r, row_map_of(r, begin, rows), dy,
                   detail::capacity_rows_of(expert_out, r, dy.extent(1), "expert_out"),
                   detail::capacity_rows_of(d_expert_out, r, dy.extent(1), "d_expert_out"),
                   d_weight, scratch);
}

/// Backward of dispatch: dx[t, :] = Σ_j over kept choices, in order, of d_dispatched[e, slot, :].
/// @param[in]  d_dispatched (experts, C', hidden)  device memory
/// @param[out] dx           (tokens, hidden)       device memory, overwritten
template <device_element T>
void encode_backward(cuda_backend cuda, capacity, gating::device_routing const& r,
                     span<std::int64_t const> begin, span<std::int64_t const> rows,
                     tensor3_view<T const> d_dispatched, matrix_view<T> dx) {
  gather_backward(cuda, r, row_map_of(r, begin, rows),
                  detail::capacity_rows_of(d_dispatched, r, dx.extent(1), "d_dispatched"), dx);
}

}  // namespace moe::layout
