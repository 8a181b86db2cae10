// SPDX-License-Identifier: Apache-2.0
#pragma once
// Stream-ordered device memory for the convenience overloads. The main entry points take
// caller-provided workspace; an overload that takes a `stream_ordered_resource` allocates
// on the caller's stream, runs, and always frees, also when the run throws.

#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/core/workspace.hpp>

#include <cuda_runtime_api.h>

#include <concepts>
#include <cstddef>
#include <utility>

namespace moe {

/// R models stream_ordered_resource if:
/// 1. `r.allocate(bytes, stream)` returns a `void*` usable by work ordered after it on stream;
/// 2. `r.deallocate(p, bytes, stream)` releases it once work ordered before it has finished,
///    and does not throw.
template <class R>
concept stream_ordered_resource = requires(R& r, std::size_t bytes, void* p, cudaStream_t stream) {
  { r.allocate(bytes, stream) } -> std::same_as<void*>;
  { r.deallocate(p, bytes, stream) }
  noexcept;
};

/// `cudaMallocAsync` / `cudaFreeAsync` on the current device's default memory pool.
class async_resource {
 public:
  void* allocate(std::size_t bytes, cudaStream_t stream) const {
    void* p = nullptr;
    if (bytes) MOE_CUDA_TRY(cudaMallocAsync(&p, bytes, stream));
    return p;
  }
  void deallocate(void* p, std::size_t, cudaStream_t stream) const noexcept {
    if (p) MOE_CUDA_TRY_LOG(cudaFreeAsync(p, stream));
  }
};
static_assert(stream_ordered_resource<async_resource>);

/// A device buffer whose lifetime is ordered on one stream: allocated on construction,
/// released (stream-ordered) on destruction.
template <stream_ordered_resource Resource = async_resource>
class device_buffer {
 public:
  device_buffer(std::size_t bytes, cudaStream_t stream, Resource resource = {})
      : resource_(std::move(resource)),
        data_(static_cast<std::byte*>(resource_.allocate(bytes, stream))),
        bytes_(bytes),
        stream_(stream) {}
  device_buffer(device_buffer const&) = delete;
  device_buffer& operator=(device_buffer const&) = delete;
  ~device_buffer() { resource_.deallocate(data_, bytes_, stream_); }

  [[nodiscard]] workspace view() const noexcept { return {data_, bytes_}; }
  [[nodiscard]] std::size_t size() const noexcept { return bytes_; }
  [[nodiscard]] cudaStream_t stream() const noexcept { return stream_; }

 private:
  Resource resource_;
  std::byte* data_;
  std::size_t bytes_;
  cudaStream_t stream_;
};

}  // namespace moe
