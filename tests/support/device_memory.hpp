// SPDX-License-Identifier: Apache-2.0
#pragma once
// Owned device memory and streams, shared by the GPU tests (device.hpp) and the benchmarks
// (bench/support/device.hpp): no test framework, runtime API only, so it compiles with the
// host compiler.

#include <moe/core/error.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <utility>

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

/// `count` elements of T in device memory, freed at scope exit.
template <class T>
class device_buffer {
 public:
  explicit device_buffer(std::size_t count) : count_(count) {
    void* data = nullptr;  // the runtime API has no typed cudaMalloc (cuda_runtime.h has)
    if (count > 0) MOE_CUDA_TRY(cudaMalloc(&data, count * sizeof(T)));
    data_ = static_cast<T*>(data);
  }
  device_buffer(device_buffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), count_(std::exchange(other.count_, 0)) {}
  device_buffer(device_buffer const&) = delete;
  device_buffer& operator=(device_buffer const&) = delete;
  device_buffer& operator=(device_buffer&&) = delete;
  ~device_buffer() {
    if (data_ != nullptr) MOE_CUDA_TRY_LOG(cudaFree(data_));
  }

  [[nodiscard]] T* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return count_; }

 private:
  T* data_ = nullptr;
  std::size_t count_ = 0;
};

}  // namespace moe::test
