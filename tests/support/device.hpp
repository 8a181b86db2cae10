// SPDX-License-Identifier: Apache-2.0
#pragma once
// Device memory of the GPU tests: the owned stream and buffer of device_memory.hpp, device
// arrays that upload, download and poison (0xff bytes: NaN in every floating type) on the
// stream they are given, and the check that an output was left poisoned. Runtime API only,
// so it compiles with the host compiler.

#include "device_memory.hpp"

#include <moe/core/error.hpp>

#include <cuda_runtime_api.h>
#include <doctest/doctest.h>

#include <algorithm>
#include <cstddef>
#include <vector>

namespace moe::test {

/// `count` elements of T in device memory (device_buffer) that upload, download and poison.
/// Copies are ordered on the stream they are given and waited for.
template <class T>
class device_array : public device_buffer<T> {
 public:
  using device_buffer<T>::device_buffer;
  using device_buffer<T>::data;
  using device_buffer<T>::size;

  void upload(std::vector<T> const& host, cudaStream_t stream) {
    REQUIRE(host.size() == size());
    if (size() == 0) return;
    MOE_CUDA_TRY(
        cudaMemcpyAsync(data(), host.data(), size() * sizeof(T), cudaMemcpyHostToDevice, stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
  }
  [[nodiscard]] std::vector<T> download(cudaStream_t stream) const {
    std::vector<T> host(size());
    if (size() > 0)
      MOE_CUDA_TRY(
          cudaMemcpyAsync(host.data(), data(), size() * sizeof(T), cudaMemcpyDeviceToHost, stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
    return host;
  }
  /// Fills the array with 0xff bytes on `stream`, so that an element never written shows.
  void poison(cudaStream_t stream) {
    if (size() > 0) MOE_CUDA_TRY(cudaMemsetAsync(data(), 0xff, size() * sizeof(T), stream));
  }
};

/// Whether every byte of `v` is still device_array::poison's.
template <class T>
bool all_poisoned(std::vector<T> const& v) {
  auto const* bytes = reinterpret_cast<unsigned char const*>(v.data());
  return std::all_of(bytes, bytes + v.size() * sizeof(T),
                     [](unsigned char c) { return c == 0xff; });
}

}  // namespace moe::test
