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
struct row_source_scatter {
  static constexpr int threads = 256;
  struct params {
    segment_rows row_of;
    index_t assignments;  // tokens · k
    int k;
    index_t rows;              // rows of the dispatched view
    std::int32_t* row_source;  // (rows) device memory
  };
  static dim3 grid(params const& p) {
    return {static_cast<unsigned>((p.assignments + threads - 1) / threads)};
  }
  static dim3 block(params const&) { return {threads}; }
  static std::size_t smem_bytes(params const&) { return 0; }

  __device__ void operator()(params const& p, char*) const {
    index_t const a = static_cast<index_t>(blockIdx.x) * threads + threadIdx.x;
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
