// SPDX-License-Identifier: Apache-2.0
#pragma once
// The kernels of the row map's CUDA backend (row_map.cuh, which launches them): the inverse
// map's scatter, the row expansion that gather and combine_backward share, and the per-token
// reductions of combine (and gather_backward) and of the weight gradient. Rows move with
// 16-byte accesses when the row width and every base pointer allow it (N = 16 / sizeof(T)),
// one element at a time otherwise (N = 1).

#include <moe/core/backend.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/kernels/shapes.cuh>
#include <moe/core/kernels/warp.cuh>
#include <moe/core/launch.cuh>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/gating/device_routing.hpp>
#include <moe/gating/top_k.hpp>
#include <moe/layout/args.hpp>
#include <moe/layout/concepts.hpp>
#include <moe/layout/row_map.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <type_traits>

namespace moe::layout {

namespace kernels {

/// Most threads of a row kernel's block; a block walks one row (or one token's rows).
inline constexpr int max_threads = 256;

/// Bytes of one vector access.
inline constexpr std::size_t vector_bytes = 16;

/// Elements of T in one vector access.
template <class T>
inline constexpr int vector_width = static_cast<int>(vector_bytes / sizeof(T));

/// Threads of a block that walks rows of `packs` accesses: whole warps (the reduction of
/// weight_gradient shuffles over full warps), at least one, at most `max_threads`.
constexpr int threads_for(index_t packs) noexcept {
  index_t const threads = (packs + 31) / 32 * 32;
  return threads < 32 ? 32 : threads > max_threads ? max_threads : static_cast<int>(threads);
}

/// True when rows of `hidden` elements of T can be moved with 16-byte accesses: the row
/// width is a multiple of 16 bytes and every base pointer is 16-byte aligned (so every row
/// start is). Null pointers (empty views) do not prevent it.
template <class T>
bool vector_access(index_t hidden, std::initializer_list<void const*> pointers) noexcept {
  if (static_cast<std::size_t>(hidden) * sizeof(T) % vector_bytes != 0) return false;
  for (void const* p : pointers)
    if (reinterpret_cast<std::uintptr_t>(p) % vector_bytes != 0) return false;
  return true;
}

/// N consecutive elements moved as one access (16 bytes, or one element when N = 1).
template <class T, int N>
struct alignas(sizeof(T) * N) pack {
  T v[N];
};

/// The row of (t, j), or `no_row` when it is dropped or lies past the `rows` of the view:
/// a view smaller than the batch the device computed loses rows instead of overflowing.
__device__ __forceinline__ index_t row_in_view(segment_rows const& row_of, index_t t, index_t j,
                                               index_t rows) {
  index_t const row = row_of(t, j);
  return 0 <= row && row < rows ? row : no_row;
}

/// Writes the inverse of the row map: row_source[row(t, j)] = t·k + j for every kept (t, j).
/// The caller has set every entry to −1 first (a memset on the same stream).
struct row_source_scatter : moe::detail::thread_per_item<row_source_scatter> {
  struct params {
    segment_rows row_of;
    index_t assignments;  // tokens · k
    int k;
    index_t rows;              // rows of the dispatched view
    std::int32_t* row_source;  // (rows) device memory
  };
  static index_t items(params const& p) { return p.assignments; }

  __device__ void operator()(params const& p, char*) const {
    index_t const a = item();
    if (a >= p.assignments) return;
    index_t const row = row_in_view(p.row_of, a / p.k, a % p.k, p.rows);
    // Distinct kept assignments have distinct rows: no two threads write one entry.
    if (row != no_row) p.row_source[row] = static_cast<std::int32_t>(a);
  }
};
static_assert(device_algorithm<row_source_scatter>);

/// Arguments of expand_rows.
template <class T>
struct expand_params {
  std::int32_t const* row_source;  // (rows)            device memory, −1 where unclaimed
  T const* in;                     // (tokens, hidden)  device memory
  float const* weight;             // (tokens, k)       device memory, or null: copy as is
  T* out;                          // (rows, hidden)    device memory
  index_t rows;
  index_t hidden;
  int k;
};

/// One block per row of the expert batch: out[row] = weight(a) · in[a / k] for the assignment
/// a = row_source[row] that claims it, zero for an unclaimed row. Every row is written once.
/// Without weights the row is copied bit for bit.
template <class T, int N>
struct expand_rows {
  using params = expand_params<T>;
  using vec = pack<T, N>;
  static dim3 grid(params const& p) { return {static_cast<unsigned>(p.rows)}; }
  static dim3 block(params const& p) { return {static_cast<unsigned>(threads_for(p.hidden / N))}; }
  static std::size_t smem_bytes(params const&) { return 0; }

  __device__ void operator()(params const& p, char*) const {
    index_t const row = blockIdx.x;
    index_t const packs = p.hidden / N;  // exact: N = 1, or hidden·sizeof(T) % 16 == 0
    vec* const out = reinterpret_cast<vec*>(p.out + row * p.hidden);
    std::int32_t const source = p.row_source[row];
    if (source < 0) {  // unclaimed capacity or padding
      vec zero;
      for (int c = 0; c < N; ++c) zero.v[c] = from_accumulate<T>(0.0f);
      for (index_t i = threadIdx.x; i < packs; i += blockDim.x) out[i] = zero;
      return;
    }
    index_t const token = source / p.k;
    vec const* const in = reinterpret_cast<vec const*>(p.in + token * p.hidden);
    if (p.weight == nullptr) {
      for (index_t i = threadIdx.x; i < packs; i += blockDim.x) out[i] = in[i];
      return;
    }
    float const w = p.weight[source];
    for (index_t i = threadIdx.x; i < packs; i += blockDim.x) {
      vec v = in[i];
      for (int c = 0; c < N; ++c) v.v[c] = from_accumulate<T>(w * to_accumulate(v.v[c]));
      out[i] = v;
    }
  }
};

/// What the per-token kernels (combine_tokens, weight_gradient) read beside their pointers.
struct token_rows_params {
  segment_rows row_of;
  index_t tokens;
  index_t rows;  // rows of the expert batch's view
  index_t hidden;
  int k;
};

/// The launch shape of a per-token kernel: one block per token, walking rows of hidden / N
/// accesses, with the kernel's `shared_storage` (the token's rows, among others).
template <class Kernel, int N>
struct one_block_per_token {
  static dim3 grid(token_rows_params const& p) { return {static_cast<unsigned>(p.tokens)}; }
  static dim3 block(token_rows_params const& p) {
    return {static_cast<unsigned>(threads_for(p.hidden / N))};
  }
  static std::size_t smem_bytes(token_rows_params const&) {
    return sizeof(typename Kernel::shared_storage);
  }

  /// Token t's rows into `row` (k ≤ 32 ≤ blockDim.x: one thread each); the caller syncs.
  __device__ static void load_rows(token_rows_params const& p, index_t t, index_t* row) {
    if (int const j = static_cast<int>(threadIdx.x); j < p.k)
      row[j] = row_in_view(p.row_of, t, j, p.rows);
  }
};

/// Arguments of combine_tokens.
template <class T>
struct combine_params : token_rows_params {
  float const* weight;  // (tokens, k)       device memory, or null: unit weights
  T const* in;          // (rows, hidden)    device memory
  T* out;               // (tokens, hidden)  device memory
};

/// One block per token: out[t] = Σ_{j = 0..k−1, in order} weight(t, j) · in[row(t, j)] over
/// the kept choices, in float; zero when every choice was dropped. Each output element is one
/// thread's sum in a fixed order: deterministic, no atomics.
template <class T, int N>
struct combine_tokens : one_block_per_token<combine_tokens<T, N>, N> {
  using params = combine_params<T>;
  using vec = pack<T, N>;
  struct shared_storage {
    index_t row[gating::max_k];
    float weight[gating::max_k];
  };

  __device__ void operator()(params const& p, char* smem) const {
    auto& s = *reinterpret_cast<shared_storage*>(smem);
    index_t const t = blockIdx.x;
    int const thread = static_cast<int>(threadIdx.x);
    // The token's rows and weights, once per block.
    this->load_rows(p, t, s.row);
    if (thread < p.k) s.weight[thread] = p.weight != nullptr ? p.weight[t * p.k + thread] : 1.0f;
    __syncthreads();
    index_t const packs = p.hidden / N;
    vec* const out = reinterpret_cast<vec*>(p.out + t * p.hidden);
    for (index_t i = thread; i < packs; i += blockDim.x) {
      float sum[N] = {};
      for (int j = 0; j < p.k; ++j) {
        index_t const row = s.row[j];
        if (row == no_row) continue;  // dropped: contributes nothing, its row is never read
        vec const v = reinterpret_cast<vec const*>(p.in + row * p.hidden)[i];
        float const w = s.weight[j];
        for (int c = 0; c < N; ++c) sum[c] += w * to_accumulate(v.v[c]);
      }
      vec result;
      for (int c = 0; c < N; ++c) result.v[c] = from_accumulate<T>(sum[c]);
      out[i] = result;
    }
  }
};

/// Arguments of weight_gradient.
template <class T>
struct weight_gradient_params : token_rows_params {
  T const* dy;          // (tokens, hidden)  device memory
  T const* expert_out;  // (rows, hidden)    device memory
  float* d_weight;      // (tokens, k)       device memory
};

/// One block per token: d_weight(t, j) = ⟨dy[t], expert_out[row(t, j)]⟩ in float, 0 for a
/// dropped choice. Each thread sums its accesses in order, then a fixed tree (warp shuffles,
/// then the warps' totals in order) adds them: the same result on every run.
template <class T, int N>
struct weight_gradient : one_block_per_token<weight_gradient<T, N>, N> {
  using params = weight_gradient_params<T>;
  using vec = pack<T, N>;
  struct shared_storage {
    index_t row[gating::max_k];
    float warp_total[max_threads / 32];
  };

  __device__ void operator()(params const& p, char* smem) const {
    auto& s = *reinterpret_cast<shared_storage*>(smem);
    index_t const t = blockIdx.x;
    int const thread = static_cast<int>(threadIdx.x);
    int const lane = thread % 32, warp = thread / 32, warps = static_cast<int>(blockDim.x) / 32;
    this->load_rows(p, t, s.row);
    __syncthreads();
    index_t const packs = p.hidden / N;
    vec const* const dy = reinterpret_cast<vec const*>(p.dy + t * p.hidden);
    // Every thread runs every iteration (k and the rows are the block's), so the barriers
    // below are never divergent and every warp is full for the shuffles.
    for (int j = 0; j < p.k; ++j) {
      index_t const row = s.row[j];
      float partial = 0;
      if (row != no_row) {
        vec const* const out = reinterpret_cast<vec const*>(p.expert_out + row * p.hidden);
        for (index_t i = thread; i < packs; i += blockDim.x) {
          vec const a = dy[i], b = out[i];
          for (int c = 0; c < N; ++c) partial += to_accumulate(a.v[c]) * to_accumulate(b.v[c]);
        }
      }
      partial = moe::detail::warp_all_reduce(partial, moe::detail::plus{});
      if (lane == 0) s.warp_total[warp] = partial;
      __syncthreads();
      if (thread == 0) {
        float total = 0;  // stays +0 for a dropped choice: every partial was +0
        for (int w = 0; w < warps; ++w) total += s.warp_total[w];
        p.d_weight[t * p.k + j] = total;
      }
      __syncthreads();  // warp_total is rewritten by the next choice
    }
  }
};

/// Launches Kernel<T, 16 / sizeof(T)> when `vectorized`, else Kernel<T, 1>.
template <template <class, int> class Kernel, class T>
void launch_rows(bool vectorized, typename Kernel<T, 1>::params const& p, cudaStream_t stream) {
  if (vectorized)
    launch<Kernel<T, vector_width<T>>>(p, stream);
  else
    launch<Kernel<T, 1>>(p, stream);
}

}  // namespace kernels

}  // namespace moe::layout
