// SPDX-License-Identifier: Apache-2.0
#pragma once
// The one kernel trampoline (STYLE §11). A device algorithm is a struct with a nested
// `params`, static `grid(params)`, `block(params)` and `smem_bytes(params)`, and a device
// `operator()(params const&, char* smem)`. `moe::launch` launches any of them on the caller's
// stream and checks the launch, so that no kernel is started without a last-error check.

#include <moe/core/config.hpp>
#include <moe/core/error.hpp>

#include <cuda_runtime.h>

#include <concepts>
#include <cstddef>
#include <source_location>

namespace moe {

/// K models device_algorithm if:
/// 1. `K::params` is its by-value argument block, copied to the device at launch;
/// 2. `K::grid(p)`, `K::block(p)` give the launch shape and `K::smem_bytes(p)` the dynamic
///    shared memory;
/// 3. a default-constructed K, on the device, runs one thread's share as `k(p, smem)`.
template <class K>
concept device_algorithm = std::semiregular<K> && requires(typename K::params const& p) {
  { K::grid(p) } -> std::convertible_to<dim3>;
  { K::block(p) } -> std::convertible_to<dim3>;
  { K::smem_bytes(p) } -> std::convertible_to<std::size_t>;
};

namespace detail {

template <class Kernel>
__global__ void device_kernel(typename Kernel::params const params) {
#if defined(MOE_CUDA_EMULATION)
  char* const shared_storage = ::moe::emulation::dynamic_shared_memory();
#else
  extern __shared__ __align__(16) char shared_storage[];
#endif
  Kernel{}(params, shared_storage);
}

}  // namespace detail

/// Launches `Kernel` with `params` on `stream` and throws `moe::cuda_error` naming the
/// caller's location when the launch fails. An empty grid launches nothing.
template <device_algorithm Kernel>
void launch(typename Kernel::params const& params, cudaStream_t stream,
            std::source_location where = std::source_location::current()) {
  dim3 const grid = Kernel::grid(params);
  dim3 const block = Kernel::block(params);
  std::size_t const smem = Kernel::smem_bytes(params);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  // Above 48 KiB of dynamic shared memory a kernel must opt in.
  if (smem > 48 * 1024) {
    cudaError_t const status =
        cudaFuncSetAttribute(detail::device_kernel<Kernel>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      throw cuda_error(status, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)", where);
    }
  }
#if defined(MOE_CUDA_EMULATION)
  // The host compiler of the emulated tests (tests/emulation/) has no <<<>>>.
  (void)::moe::emulation::launch<&detail::device_kernel<Kernel>>(grid, block, smem, stream, params);
#else
  detail::device_kernel<Kernel><<<grid, block, smem, stream>>>(params);
#endif
  if (cudaError_t const status = cudaGetLastError(); status != cudaSuccess)
    throw cuda_error(status, "kernel launch", where);
}

}  // namespace moe
