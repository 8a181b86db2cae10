// SPDX-License-Identifier: Apache-2.0
#pragma once
// The launch shapes kernels share, as bases that give a device algorithm (core/launch.cuh)
// its grid, block and shared-memory size: a thread per item, a warp per token, one block,
// and blocks of 32 experts by 8 rows. A kernel derives from one and keeps its params, its
// shared storage and its operator().

#include <moe/core/checked.hpp>
#include <moe/core/config.hpp>
#include <moe/core/kernels/warp.cuh>
#include <moe/core/view.hpp>

#include <cuda_runtime.h>

#include <cstddef>

namespace moe::detail {

/// A thread per item, in blocks of Threads; `Kernel::items(p)` says how many items.
template <class Kernel, int Threads = 256>
struct thread_per_item {
  static constexpr int threads = Threads;
  template <class Params>
  static dim3 grid(Params const& p) {
    return dim3(static_cast<unsigned>(ceil_div(Kernel::items(p), threads)));
  }
  template <class Params>
  static dim3 block(Params const&) {
    return dim3(threads);
  }
  template <class Params>
  static std::size_t smem_bytes(Params const&) {
    return 0;
  }
  /// This thread's item; past the last one in the last block.
  __device__ static index_t item() {
    return static_cast<index_t>(blockIdx.x) * threads + threadIdx.x;
  }
};

/// A warp per token, 8 warps to a block; `p.tokens` tokens. Whole warps leave together (the
/// token is the same on every lane), so that shuffles always see 32 lanes.
struct warp_per_token {
  static constexpr int warps_per_block = 8;
  template <class Params>
  static dim3 grid(Params const& p) {
    return dim3(static_cast<unsigned>(ceil_div(p.tokens, warps_per_block)));
  }
  template <class Params>
  static dim3 block(Params const&) {
    return dim3(warps_per_block * warp_size);
  }
  template <class Params>
  static std::size_t smem_bytes(Params const&) {
    return 0;
  }
  __device__ static int lane() { return static_cast<int>(threadIdx.x) % warp_size; }
  /// This warp's token; past the last one in the last block.
  __device__ static index_t token() {
    return static_cast<index_t>(blockIdx.x) * warps_per_block + threadIdx.x / warp_size;
  }
};

/// One block of Threads threads with `Kernel::shared_storage`: the reductions over a whole
/// call that end in one value.
template <class Kernel, int Threads = 1024>
struct single_block {
  static constexpr int threads = Threads;
  template <class Params>
  static dim3 grid(Params const&) {
    return dim3(1);
  }
  template <class Params>
  static dim3 block(Params const&) {
    return dim3(threads);
  }
  template <class Params>
  static std::size_t smem_bytes(Params const&) {
    return sizeof(typename Kernel::shared_storage);
  }
};

/// Blocks of 32 experts (x, so that a warp reads neighbouring experts) by 8 rows (y) with
/// `Kernel::shared_storage`; the kernel gives its grid.
template <class Kernel>
struct expert_columns {
  static constexpr int columns = warp_size, rows = 8;
  template <class Params>
  static dim3 block(Params const&) {
    return dim3(columns, rows);
  }
  template <class Params>
  static std::size_t smem_bytes(Params const&) {
    return sizeof(typename Kernel::shared_storage);
  }
  /// This thread's expert, the block's `block_index`-th 32.
  __device__ static index_t expert(unsigned block_index) {
    return static_cast<index_t>(block_index) * columns + threadIdx.x;
  }
};

}  // namespace moe::detail
