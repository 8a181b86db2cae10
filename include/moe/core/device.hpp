// SPDX-License-Identifier: Apache-2.0
#pragma once
// Device queries that must not throw on a machine without a driver or a GPU, where the host
// backend is the one that runs.

#include <moe/core/config.hpp>

#include <cuda_runtime_api.h>

namespace moe {

/// Number of usable CUDA devices: 0, not an error, when there is no driver or no device.
inline int cuda_device_count() noexcept {
  int count = 0;  // cudaGetDeviceCount leaves it unwritten when it fails
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // leave no error behind for the caller's next check
    return 0;
  }
  return count;
}

}  // namespace moe
