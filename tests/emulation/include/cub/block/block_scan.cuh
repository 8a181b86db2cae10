// SPDX-License-Identifier: Apache-2.0
#pragma once
// The emulated runtime's stand-in for CUB's BlockScan: a block-wide scan over the threads
// of a block, with CUB's interface (TempStorage, every thread calls, barriers inside). As in
// CUB, reusing the temporary storage needs a __syncthreads first.

#include <moe_emulation/runtime.hpp>

namespace cub {

template <class T, int BLOCK_DIM_X, int ALGORITHM = 0, int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1,
          int LEGACY_PTX_ARCH = 0>
class BlockScan {
  static constexpr int threads = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;

 public:
  struct TempStorage {
    T input[threads];
    T exclusive[threads];
    T total;
  };

  explicit BlockScan(TempStorage& storage) : storage_(storage) {}

  void ExclusiveSum(T input, T& output) {
    T total;
    ExclusiveSum(input, output, total);
  }
  void ExclusiveSum(T input, T& output, T& block_aggregate) {
    unsigned const self = rank();
    storage_.input[self] = input;
    __syncthreads();
    if (self == 0) {
      T running{};
      for (int i = 0; i < threads; ++i) {
        storage_.exclusive[i] = running;
        running = running + storage_.input[i];
      }
      storage_.total = running;
    }
    __syncthreads();
    output = storage_.exclusive[self];
    block_aggregate = storage_.total;
  }
  void InclusiveSum(T input, T& output) {
    T total;
    InclusiveSum(input, output, total);
  }
  void InclusiveSum(T input, T& output, T& block_aggregate) {
    ExclusiveSum(input, output, block_aggregate);
    output = output + input;
  }

 private:
  static unsigned rank() {
    return threadIdx.x + BLOCK_DIM_X * (threadIdx.y + BLOCK_DIM_Y * threadIdx.z);
  }
  TempStorage& storage_;
};

}  // namespace cub
