// SPDX-License-Identifier: Apache-2.0
#pragma once
// Device memory of the GPU tests: a stream of a test's own, owned device arrays that upload,
// download and poison (0xff bytes: NaN in every floating type) on the stream they are given,
// and the check that an output was left poisoned. Runtime API only, so it compiles with the
// host compiler.

#include <moe/core/error.hpp>

#include <cuda_runtime_api.h>
#include <doctest/doctest.h>

#include <algorithm>
#include <cstddef>
#include <utility>
#include <vector>

namespace moe::test {

/// A non-blocking stream of its own; waited for and destroyed at scope exit.
struct owned_stream {
  cudaStream_t stream = nullptr;
  owned_stream() { MOE_CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)); }
  owned_stream(owned_stream const&) = delete;
  owned_stream& operator=(owned_stream const&) = delete;
  ~owned_stream() {
    MOE_CUDA_TRY_LOG(cudaStreamSynchronize(stream));
    MOE_CUDA_TRY_LOG(cudaStreamDestroy(stream));
  }
};

/// `count` elements of T in device memory, freed at scope exit. Copies are ordered on the
/// stream they are given and waited for.
template <class T>
class device_array {
 public:
  explicit device_array(std::size_t n) : count_(n) {
    void* data = nullptr;  // the runtime API has no typed cudaMalloc (cuda_runtime.h has)
    if (n > 0) MOE_CUDA_TRY(cudaMalloc(&data, n * sizeof(T)));
    data_ = static_cast<T*>(data);
  }
  device_array(device_array&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), count_(std::exchange(other.count_, 0)) {}
  device_array(device_array const&) = delete;
  device_array& operator=(device_array const&) = delete;
  device_array& operator=(device_array&&) = delete;
  ~device_array() {
    if (data_ != nullptr) MOE_CUDA_TRY_LOG(cudaFree(data_));
  }

  [[nodiscard]] T* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return count_; }

  void upload(std::vector<T> const& host, cudaStream_t stream) {
    REQUIRE(host.size() == count_);
    if (count_ == 0) return;
    MOE_CUDA_TRY(
        cudaMemcpyAsync(data_, host.data(), count_ * sizeof(T), cudaMemcpyHostToDevice, stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
  }
  [[nodiscard]] std::vector<T> download(cudaStream_t stream) const {
    std::vector<T> host(count_);
    if (count_ > 0)
      MOE_CUDA_TRY(
          cudaMemcpyAsync(host.data(), data_, count_ * sizeof(T), cudaMemcpyDeviceToHost, stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
    return host;
  }
  /// Fills the array with 0xff bytes on `stream`, so that an element never written shows.
  void poison(cudaStream_t stream) {
    if (count_ > 0) MOE_CUDA_TRY(cudaMemsetAsync(data_, 0xff, count_ * sizeof(T), stream));
  }

 private:
  T* data_ = nullptr;
  std::size_t count_ = 0;
};

/// Whether every byte of `v` is still device_array::poison's.
template <class T>
bool all_poisoned(std::vector<T> const& v) {
  auto const* bytes = reinterpret_cast<unsigned char const*>(v.data());
  return std::all_of(bytes, bytes + v.size() * sizeof(T),
                     [](unsigned char c) { return c == 0xff; });
}

}  // namespace moe::test
