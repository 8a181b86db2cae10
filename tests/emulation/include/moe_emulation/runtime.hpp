// SPDX-License-Identifier: Apache-2.0
#pragma once
// The emulated CUDA runtime's own interface: kernel launches from the host compiler, work
// that libraries (the emulated cuBLAS and CUB) put on a stream, the schedule it runs under,
// and the counters that let a test assert how many launches, library calls, host
// synchronisations and allocations a call makes.
//
// Schedules, from the environment (read once):
//   MOE_EMULATION_BLOCKS  = in_order | reversed | shuffled   order of blocks, and of the
//                           threads of a block each time they are resumed
//   MOE_EMULATION_STREAMS = eager | lazy   eager runs work when it is issued; lazy queues it
//                           until something waits, so work on different streams runs in
//                           whatever order the events allow, and a missing wait shows
//   MOE_EMULATION_SEED    = the seed of `shuffled`, of the garbage in fresh shared and
//                           device memory, and of which buffer CUB's sorts leave current

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

namespace moe::emulation {

/// What the emulated device has done since the program started (or since `reset_counters`).
struct counters {
  std::int64_t kernel_launches = 0;        // kernels run, library kernels excluded
  std::int64_t library_calls = 0;          // cuBLAS and CUB calls that enqueue work
  std::int64_t host_synchronizations = 0;  // stream, event and device syncs, blocking copies,
                                           // and the implicit syncs of cudaMalloc/cudaFree
  std::int64_t device_allocations = 0;     // cudaMalloc and cudaMallocAsync
  std::int64_t device_frees = 0;           // cudaFree and cudaFreeAsync
  std::int64_t copies = 0;                 // memcpy operations, any direction
  std::int64_t bytes_copied = 0;           // their bytes
  std::int64_t device_to_host_copies = 0;
  std::int64_t legacy_stream_operations = 0;  // work issued on stream 0 (the legacy stream)
};

enum class block_order : std::uint8_t { in_order, reversed, shuffled };

/// How the emulated device orders its work (the environment variables above).
struct schedule {
  block_order blocks = block_order::in_order;
  bool lazy_streams = false;
  std::uint64_t seed = 0;
};

/// The schedule in force: read once from the environment, or the last `set_schedule`.
schedule const& current_schedule();

/// Replaces the schedule, for tests of the emulated runtime itself; call it while no work
/// is queued.
void set_schedule(schedule const& s);

/// What happened between two snapshots.
inline counters operator-(counters const& after, counters const& before) {
  return {after.kernel_launches - before.kernel_launches,
          after.library_calls - before.library_calls,
          after.host_synchronizations - before.host_synchronizations,
          after.device_allocations - before.device_allocations,
          after.device_frees - before.device_frees,
          after.copies - before.copies,
          after.bytes_copied - before.bytes_copied,
          after.device_to_host_copies - before.device_to_host_copies,
          after.legacy_stream_operations - before.legacy_stream_operations};
}

/// A snapshot of the counters.
counters read_counters();
void reset_counters();

/// Whether `pointer` lies in emulated device memory.
bool is_device_pointer(void const* pointer);

/// One piece of stream-ordered work: its kind decides the graph node it becomes under
/// capture and the counter it feeds.
enum class work_kind : std::uint8_t { kernel, library, memcpy, memset, host };

/// Enqueues `work` on `stream` (runs now, queues, or records it into a capturing stream's
/// graph). Returns the error a CUDA call would: a sticky error, or a capture violation.
cudaError_t enqueue(cudaStream_t stream, work_kind kind, std::string name,
                    std::function<void()> work);

/// Records that a part of a test was left out because the emulated runtime cannot run it
/// (MOE_NOT_EMULATED in tests/support/emulation.hpp).
void exclude(char const* reason, char const* file, int line);

/// Everything `exclude` recorded, one "file:line: reason" each.
std::vector<std::string> exclusions();

/// One line naming the schedule in force, for reports.
std::string describe_schedule();

/// Which buffer a CUB sort leaves current, per the schedule's seed.
bool flip_sort_buffers();

namespace detail {
cudaError_t launch(void const* function, char const* name, dim3 grid, dim3 block,
                   std::size_t shared_bytes, cudaStream_t stream,
                   std::function<void()> thread_body);

/// The kernel's name for diagnostics, from the compiler's signature of this function.
template <auto Kernel>
char const* kernel_name() {
  static std::string const name = [signature = std::string_view(__PRETTY_FUNCTION__)] {
    std::size_t const begin = signature.find("Kernel = ");
    std::size_t const end = signature.rfind(']');
    if (begin == std::string_view::npos || end == std::string_view::npos || end < begin)
      return std::string(signature);
    return std::string(signature.substr(begin + 9, end - begin - 9));
  }();
  return name.c_str();
}
}  // namespace detail

/// The host compiler's `Kernel<<<grid, block, shared_bytes, stream>>>(args...)`: checks the
/// configuration, then runs every thread of every block, stream-ordered.
template <auto Kernel, class... Args>
cudaError_t launch(dim3 grid, dim3 block, std::size_t shared_bytes, cudaStream_t stream,
                   Args const&... args) {
  return detail::launch(reinterpret_cast<void const*>(Kernel), detail::kernel_name<Kernel>(), grid,
                        block, shared_bytes, stream, [arguments = std::tuple<Args...>(args...)] {
                          std::apply(Kernel, arguments);
                        });
}

/// The dynamic shared memory of the running block (`extern __shared__` under nvcc).
inline char* dynamic_shared_memory();

}  // namespace moe::emulation

#include <moe_emulation/device.hpp>

inline char* moe::emulation::dynamic_shared_memory() {
  return current_thread->dynamic_shared_memory;
}
