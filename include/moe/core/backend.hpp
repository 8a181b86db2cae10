// SPDX-License-Identifier: Apache-2.0
#pragma once
// The two backends of every algorithm (DESIGN §3). Entry points take one of these tags
// first, so that the memory space of every view is stated at the call.

#include <moe/core/config.hpp>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <concepts>

namespace moe {

/// The host reference backend: synchronous plain C++ over host memory, accumulating in
/// float64 where it matters. It is what runs where no GPU is present and the oracle that
/// every CUDA path is tested against.
struct host_backend {};
inline constexpr host_backend host{};

/// The CUDA backend: work is enqueued on `stream` (the caller's) over device memory.
/// Nothing synchronises the device unless the entry point's documentation says why.
/// `blas` is a borrowed cuBLAS handle for the entry points that run GEMMs (they say so);
/// they set its stream to `stream` before each call.
struct cuda_backend {
  cudaStream_t stream;
  cublasHandle_t blas = nullptr;
};

/// One of the two backends: what an entry point that runs on either takes.
template <class B>
concept backend = std::same_as<B, host_backend> || std::same_as<B, cuda_backend>;

}  // namespace moe
