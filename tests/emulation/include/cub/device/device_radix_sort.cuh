// SPDX-License-Identifier: Apache-2.0
#pragma once
// The emulated runtime's stand-in for CUB's DeviceRadixSort: a stable sort on key bits
// [begin_bit, end_bit), stream-ordered, with CUB's two-phase calls (a null temporary
// storage asks for its size). With DoubleBuffers the sorted pairs end up in the buffers that
// the schedule picks (either, as in CUB, whose choice depends on the pass count), so a
// caller that ignores Current() after the call sees stale data.

#include <cub/util_type.cuh>
#include <moe_emulation/runtime.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

namespace cub {

struct DeviceRadixSort {
  template <class Key, class Value>
  static cudaError_t SortPairs(void* d_temp_storage, std::size_t& temp_storage_bytes,
                               DoubleBuffer<Key>& d_keys, DoubleBuffer<Value>& d_values,
                               int num_items, int begin_bit = 0, int end_bit = sizeof(Key) * 8,
                               cudaStream_t stream = nullptr) {
    cudaError_t status = cudaSuccess;
    if (!sorts<Key>(d_temp_storage, temp_storage_bytes, num_items, begin_bit, end_bit, status))
      return status;
    int const from = d_keys.selector;
    int const to = ::moe::emulation::flip_sort_buffers() ? from ^ 1 : from;
    Key* keys_in = d_keys.d_buffers[from];
    Key* keys_out = d_keys.d_buffers[to];
    Value* values_in = d_values.d_buffers[d_values.selector];
    Value* values_out = d_values.d_buffers[to == from ? d_values.selector : d_values.selector ^ 1];
    d_keys.selector = to;
    d_values.selector = to == from ? d_values.selector : d_values.selector ^ 1;
    return sort(keys_in, keys_out, values_in, values_out, num_items, begin_bit, end_bit,
                static_cast<char*>(d_temp_storage), temp_storage_bytes, stream);
  }

  template <class Key, class Value>
  static cudaError_t SortPairs(void* d_temp_storage, std::size_t& temp_storage_bytes,
                               Key const* d_keys_in, Key* d_keys_out, Value const* d_values_in,
                               Value* d_values_out, int num_items, int begin_bit = 0,
                               int end_bit = sizeof(Key) * 8, cudaStream_t stream = nullptr) {
    cudaError_t status = cudaSuccess;
    if (!sorts<Key>(d_temp_storage, temp_storage_bytes, num_items, begin_bit, end_bit, status))
      return status;
    return sort(d_keys_in, d_keys_out, d_values_in, d_values_out, num_items, begin_bit, end_bit,
                static_cast<char*>(d_temp_storage), temp_storage_bytes, stream);
  }

 private:
  static std::size_t storage_bytes(int num_items) {
    return 512 + static_cast<std::size_t>(num_items > 0 ? num_items : 0) * 4;
  }

  /// CUB's two phases: null storage asks for its size. Whether the call goes on to sort;
  /// when it does not, `status` says why (cudaSuccess for the size query or no items).
  template <class Key>
  static bool sorts(void* d_temp_storage, std::size_t& temp_storage_bytes, int num_items,
                    int begin_bit, int end_bit, cudaError_t& status) {
    static_assert(std::is_integral_v<Key> && std::is_unsigned_v<Key>,
                  "moe emulation: the emulated radix sort takes unsigned integer keys");
    if (d_temp_storage == nullptr) {
      temp_storage_bytes = storage_bytes(num_items);
      return false;
    }
    if (num_items < 0 || begin_bit < 0 || end_bit > static_cast<int>(sizeof(Key) * 8) ||
        begin_bit > end_bit || temp_storage_bytes < storage_bytes(num_items)) {
      status = cudaErrorInvalidValue;
      return false;
    }
    return num_items > 0;
  }

  template <class Key, class Value>
  static cudaError_t sort(Key const* keys_in, Key* keys_out, Value const* values_in,
                          Value* values_out, int n, int begin_bit, int end_bit, char* temp,
                          std::size_t temp_bytes, cudaStream_t stream) {
    return ::moe::emulation::enqueue(
        stream, ::moe::emulation::work_kind::library, "cub::DeviceRadixSort::SortPairs", [=] {
          std::size_t const count = static_cast<std::size_t>(n);
          Key const mask = end_bit - begin_bit >= static_cast<int>(sizeof(Key) * 8)
                               ? static_cast<Key>(~Key{0})
                               : static_cast<Key>((Key{1} << (end_bit - begin_bit)) - 1);
          std::vector<Key> keys(keys_in, keys_in + count);
          std::vector<Value> values(values_in, values_in + count);
          std::vector<std::size_t> order(count);
          std::iota(order.begin(), order.end(), std::size_t{0});
          std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
            return static_cast<Key>((keys[a] >> begin_bit) & mask) <
                   static_cast<Key>((keys[b] >> begin_bit) & mask);
          });
          for (std::size_t i = 0; i < count; ++i) {
            keys_out[i] = keys[order[i]];
            values_out[i] = values[order[i]];
          }
          // CUB uses its temporary storage as scratch: leave garbage there.
          std::memset(temp, 0xa5, temp_bytes);
        });
  }
};

}  // namespace cub
