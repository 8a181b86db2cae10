// SPDX-License-Identifier: Apache-2.0
#pragma once
// Local byte moves of the collectives, on either backend: a plain copy, zeroing, and the
// reorder of a grid of equal chunks (a transpose whose elements are chunks). Device moves are
// copies enqueued on the caller's stream; no kernel is needed.

#include <moe/core/backend.hpp>
#include <moe/core/error.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstring>

namespace moe::comm::detail {

inline cudaStream_t stream_of(host_backend) noexcept {
  return nullptr;
}
inline cudaStream_t stream_of(cuda_backend b) noexcept {
  return b.stream;
}

inline void copy_bytes(host_backend, std::byte* dst, std::byte const* src, std::size_t bytes) {
  if (bytes) std::memcpy(dst, src, bytes);
}

inline void copy_bytes(cuda_backend b, std::byte* dst, std::byte const* src, std::size_t bytes) {
  if (bytes) MOE_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, b.stream));
}

inline void zero_bytes(host_backend, std::byte* dst, std::size_t bytes) {
  if (bytes) std::memset(dst, 0, bytes);
}

inline void zero_bytes(cuda_backend b, std::byte* dst, std::size_t bytes) {
  if (bytes) MOE_CUDA_TRY(cudaMemsetAsync(dst, 0, bytes, b.stream));
}

/// dst[c][r] = src[r][c] for a `rows` × `cols` grid of chunks of `chunk` bytes.
inline void transpose_chunks(host_backend, std::byte* dst, std::byte const* src, int rows, int cols,
                             std::size_t chunk) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c)
      copy_bytes(host, dst + (static_cast<std::size_t>(c) * rows + r) * chunk,
                 src + (static_cast<std::size_t>(r) * cols + c) * chunk, chunk);
}

/// The device version: one strided 2-D copy per column of the source grid.
inline void transpose_chunks(cuda_backend b, std::byte* dst, std::byte const* src, int rows,
                             int cols, std::size_t chunk) {
  if (chunk == 0) return;
  for (int c = 0; c < cols; ++c)
    MOE_CUDA_TRY(cudaMemcpy2DAsync(dst + static_cast<std::size_t>(c) * rows * chunk, chunk,
                                   src + static_cast<std::size_t>(c) * chunk, cols * chunk, chunk,
                                   static_cast<std::size_t>(rows), cudaMemcpyDeviceToDevice,
                                   b.stream));
}

}  // namespace moe::comm::detail
