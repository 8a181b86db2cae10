// SPDX-License-Identifier: Apache-2.0
#pragma once
// What the parts of the emulated runtime share: the schedule, the one lock every call
// holds, sticky errors, and the window in which device memory may be touched.

#include <moe_emulation/runtime.hpp>

#include <cstdint>
#include <functional>
#include <mutex>
#include <string>

namespace moe::emulation {

/// Held by every runtime, cuBLAS and CUB call: one piece of device work runs at a time.
std::recursive_mutex& device_mutex();

/// Records a device fault: every later call returns `error` (CUDA's sticky errors).
void set_sticky_error(cudaError_t error, std::string const& message);
cudaError_t sticky_error();

/// Device memory is readable only inside a device_section (device work in progress); host
/// code that touches it between device calls faults, and the fault names the address.
class device_section {
 public:
  device_section();
  ~device_section();
  device_section(device_section const&) = delete;
  device_section& operator=(device_section const&) = delete;
};

/// Device allocations (memory.cpp), under the device mutex.
void* allocate_device(std::size_t bytes);
bool free_device(void* pointer);
std::size_t device_bytes_in_use();

/// Whether [pointer, pointer + bytes) lies inside one live device allocation.
bool is_device_range(void const* pointer, std::size_t bytes);

/// Eight bytes of garbage for fresh memory under the schedule: all 0xff (NaN in every
/// floating type) in order, seeded random bytes otherwise.
std::uint64_t garbage_word(std::uint64_t salt);

/// Fills `bytes` at `data` with garbage_word(salt).
void fill_garbage(void* data, std::size_t bytes, std::uint64_t salt);

/// Runs every thread of every block of a kernel (block.cpp). Faults become sticky errors.
void run_grid(char const* name, dim3 grid, dim3 block, std::size_t shared_bytes,
              std::function<void()> const& thread_body);

/// Counters, updated under the device mutex.
counters& mutable_counters();

/// Sets the calling host thread's last error (cudaGetLastError) and returns `error`.
cudaError_t fail(cudaError_t error);

}  // namespace moe::emulation
