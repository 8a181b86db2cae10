// SPDX-License-Identifier: Apache-2.0
#pragma once
// Deterministic warp and block reductions shared by every kernel of the library. They use
// fixed shuffle trees over fixed partitions and never atomics, so a result depends on the
// data and the launch shape only, not on scheduling (DESIGN §3: determinism). Every lane of
// every warp that calls one must take part: the shuffles name the full warp.

#include <moe/core/config.hpp>

namespace moe::detail {

inline constexpr int warp_size = 32;
inline constexpr unsigned full_warp = 0xffffffffu;

/// Returns op over the 32 lanes' values to every lane (a butterfly). Two lanes combine the
/// same pair of values at each level, so with a commutative op every lane gets the same bits.
template <class T, class Op>
__device__ MOE_FORCEINLINE T warp_all_reduce(T value, Op op) {
  for (int mask = warp_size / 2; mask > 0; mask /= 2)
    value = op(value, __shfl_xor_sync(full_warp, value, mask));
  return value;
}

struct plus {
  template <class T>
  __device__ MOE_FORCEINLINE T operator()(T a, T b) const {
    return a + b;
  }
};

struct maximum {
  template <class T>
  __device__ MOE_FORCEINLINE T operator()(T a, T b) const {
    return b > a ? b : a;
  }
};

/// Returns op over all threads of a one-dimensional block to every thread. The block size
/// must be a multiple of 32 (at most 1024), and every thread of the block must call it (it
/// holds __syncthreads). `scratch` is 32 values of shared memory; consecutive calls may share
/// it, since the first barrier waits for the previous call's readers.
template <class T, class Op>
__device__ T block_all_reduce(T value, Op op, T identity, T* scratch) {
  int const lane = static_cast<int>(threadIdx.x) % warp_size;
  int const warp = static_cast<int>(threadIdx.x) / warp_size;
  int const warps = static_cast<int>(blockDim.x) / warp_size;
  value = warp_all_reduce(value, op);
  __syncthreads();
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  // Every warp reduces the same 32 values the same way: the same result everywhere.
  return warp_all_reduce(lane < warps ? scratch[lane] : identity, op);
}

}  // namespace moe::detail
