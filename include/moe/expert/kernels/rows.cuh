// SPDX-License-Identifier: Apache-2.0
#pragma once
// Row-wise kernels of the experts' CUDA backend: `fill_rows` writes each expert's bias on its
// segment (the second GEMM then accumulates onto it, beta = 1, so that the output is rounded
// once) and zero on rows of no expert; `column_sums` gives bias gradients as per-expert
// column sums over the segment's rows, in a fixed order (no atomics): deterministic.

#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/launch.cuh>
#include <moe/core/view.hpp>
#include <moe/expert/kernels/segments.cuh>

#include <cuda_runtime.h>

#include <cstddef>

namespace moe::expert::kernels {

/// out[row, :] = bias[e, :] on expert e's segment (left alone when there is no bias) and 0
/// on the rest of its span.
template <class T>
struct fill_rows : span_kernel {
  struct params {
    span_launch spans;
    index_t cols;
    T* out;         // (rows, cols) device memory
    T const* bias;  // (experts, cols) device memory, or null
  };

  __device__ void operator()(params const& p, char*) const {
    index_t const e = p.spans.block_expert();
    expert_rows const r = rows_of(p.spans.segments, e);
    for (index_t row = r.span_begin + blockIdx.x; row < r.span_end; row += gridDim.x) {
      bool const claimed = r.claims(row);
      if (claimed && p.bias == nullptr) continue;
      T* out = p.out + row * p.cols;
      T const* bias = p.bias != nullptr ? p.bias + e * p.cols : nullptr;
      for (index_t c = threadIdx.x; c < p.cols; c += threads)
        out[c] = claimed ? bias[c] : from_accumulate<T>(0.0f);
    }
  }
};

/// out[e, c] = Σ src[row, c] over expert e's segment, in float, rounded once to G. A block
/// sums 32 columns of one expert: each of its 8 row lanes strides over the rows, then lane 0
/// adds the 8 partial sums in lane order, so the order of every sum is fixed.
template <class Src, class G>
struct column_sums {
  static constexpr int columns = 32;
  static constexpr int lanes = 8;
  struct params {
    span_launch spans;  // its `longest` unused: the grid is over columns
    index_t cols;
    Src const* src;  // (rows, cols) device memory
    G* out;          // (experts, cols) device memory
  };
  static dim3 grid(params const& p) {
    return {static_cast<unsigned>((p.cols + columns - 1) / columns),
            static_cast<unsigned>(p.spans.experts)};
  }
  static dim3 block(params const&) { return {columns, lanes}; }
  static std::size_t smem_bytes(params const&) { return columns * lanes * sizeof(float); }

  __device__ void operator()(params const& p, char* smem) const {
    index_t const e = p.spans.block_expert();
    expert_rows const r = rows_of(p.spans.segments, e);
    index_t const c = static_cast<index_t>(blockIdx.x) * columns + threadIdx.x;
    float sum = 0;
    if (c < p.cols)
      for (index_t row = r.claimed_begin + threadIdx.y; row < r.claimed_end; row += lanes)
        sum += to_accumulate(p.src[row * p.cols + c]);
    float* partial = reinterpret_cast<float*>(smem);
    partial[threadIdx.y * columns + threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && c < p.cols) {
      float total = 0;
      for (int lane = 0; lane < lanes; ++lane) total += partial[lane * columns + threadIdx.x];
      p.out[e * p.cols + c] = from_accumulate<G>(total);
    }
  }
};

}  // namespace moe::expert::kernels
