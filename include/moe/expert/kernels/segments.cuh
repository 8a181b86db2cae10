// SPDX-License-Identifier: Apache-2.0
#pragma once
// The expert batch as the experts' kernels see it. Every row of an (rows, hidden) batch lies
// in exactly one expert's span, and the part of the span the expert's assignments claimed is
// its segment; the rest of the span is rows of no expert (a ragged layout's padding, or
// capacity no assignment claimed), whose outputs the kernels write as zero.
//
//   uniform (capacity): span e = [e·C, (e+1)·C), segment = its first claimed[e] rows (all C
//                       when no counts are given); everything from the device, nothing from
//                       the host but C.
//   ragged:             span e = [begin[e], begin[e+1]) (expert 0's from row 0, the last's
//                       to the end of the batch), segment = [begin[e], begin[e] + rows[e]);
//                       begin and rows are copied from the host by `store_segments`.
//
// Kernels put one expert per blockIdx.y (a launch covers at most `max_grid_experts`
// experts from `first_expert`) and stride over the span's rows with blockIdx.x.

#include <moe/core/config.hpp>
#include <moe/core/launch.cuh>
#include <moe/core/view.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace moe::expert::kernels {

/// Where each expert's rows lie, in device memory (or computed from C).
struct segment_table {
  index_t experts = 0;                  ///< E
  index_t total_rows = 0;               ///< rows of the batch
  index_t capacity = -1;                ///< C ≥ 0: a uniform batch; < 0: a ragged one
  std::int64_t const* begin = nullptr;  ///< ragged: (experts) first row of each segment
  std::int64_t const* rows = nullptr;   ///< (experts) rows of each segment; uniform: optional
};

/// One expert's span and segment: rows [span_begin, span_end) of the batch are its span,
/// [claimed_begin, claimed_end) ⊆ span its segment.
struct expert_rows {
  index_t span_begin, span_end, claimed_begin, claimed_end;

  [[nodiscard]] MOE_HOST_DEVICE constexpr bool claims(index_t row) const noexcept {
    return row >= claimed_begin && row < claimed_end;
  }
};

/// Expert e's rows in the batch described by `t`. Uniform counts are clamped to [0, C].
MOE_DEVICE MOE_FORCEINLINE expert_rows rows_of(segment_table const& t, index_t e) {
  if (t.capacity >= 0) {
    index_t const first = e * t.capacity;
    index_t claimed = t.capacity;
    if (t.rows != nullptr) {
      index_t const count = t.rows[e];
      claimed = count < 0 ? 0 : (count < t.capacity ? count : t.capacity);
    }
    return {first, first + t.capacity, first, first + claimed};
  }
  index_t const begin = t.begin[e];
  index_t const span_begin = e == 0 ? 0 : begin;
  index_t const span_end = e + 1 < t.experts ? t.begin[e + 1] : t.total_rows;
  return {span_begin, span_end, begin, begin + t.rows[e]};
}

/// The most experts one launch covers (the grid's y extent).
inline constexpr index_t max_grid_experts = 65535;

/// Blocks along x of a launch that strides over spans of up to `longest` rows.
inline unsigned span_blocks(index_t longest) noexcept {
  constexpr index_t most = 4096;  // enough to fill an H200 several times over with y ≥ 1
  return static_cast<unsigned>(std::min(longest, most));
}

/// The experts one launch of a span kernel covers, in the batch `segments` describes.
struct span_launch {
  segment_table segments;
  index_t first_expert;  // this launch: experts [first_expert, first_expert + experts)
  index_t experts;
  index_t longest;  // rows of the longest span, for the grid

  /// The expert of this block.
  [[nodiscard]] MOE_DEVICE MOE_FORCEINLINE index_t block_expert() const {
    return first_expert + static_cast<index_t>(blockIdx.y);
  }
};

/// The launch shape of a kernel whose params hold a `span_launch spans`: one expert per
/// blockIdx.y, blocks along x striding over its span's rows, `threads` along a row.
struct span_kernel {
  static constexpr int threads = 256;
  template <class Params>
  static dim3 grid(Params const& p) {
    return {span_blocks(p.spans.longest), static_cast<unsigned>(p.spans.experts)};
  }
  template <class Params>
  static dim3 block(Params const&) {
    return {threads};
  }
  template <class Params>
  static std::size_t smem_bytes(Params const&) {
    return 0;
  }
};

/// Calls `body(first, count)` for consecutive ranges of at most max_grid_experts experts.
template <class Body>
void for_each_expert_range(index_t experts, Body&& body) {
  for (index_t first = 0; first < experts; first += max_grid_experts)
    body(first, std::min(max_grid_experts, experts - first));
}

/// Copies a ragged batch's segments from kernel parameters into device memory: one launch
/// per `chunk` experts, so that the host's copy can be reused as soon as the launch returns
/// (no pinned memory, no host synchronisation, capturable).
struct store_segments {
  static constexpr int chunk = 64;
  struct params {
    std::int64_t begin[chunk];
    std::int64_t rows[chunk];
    int count;                // experts in this launch, ≤ chunk
    std::int64_t* begin_out;  // (count) device memory
    std::int64_t* rows_out;   // (count) device memory
  };
  static dim3 grid(params const& p) { return {p.count > 0 ? 1u : 0u}; }
  static dim3 block(params const&) { return {chunk}; }
  static std::size_t smem_bytes(params const&) { return 0; }

  __device__ void operator()(params const& p, char*) const {
    int const j = static_cast<int>(threadIdx.x);
    if (j < p.count) {
      p.begin_out[j] = p.begin[j];
      p.rows_out[j] = p.rows[j];
    }
  }
};
static_assert(device_algorithm<store_segments>);

}  // namespace moe::expert::kernels
