// SPDX-License-Identifier: Apache-2.0
//
// Proves that find_package(moe) + target_link_libraries(moe::moe) alone puts nvcc in C++20
// mode: concepts and requires-expressions do not parse in C++17. Also includes a .cuh header,
// which only nvcc can compile, from the installed tree. Without nvcc (MOE_CONSUMER_CUDA off)
// the host compiler builds the host half.
#include <moe/core/config.hpp>
#include <moe/version.hpp>

#include <concepts>

#ifdef __CUDACC__
#include <moe/core/launch.cuh>
#endif

static_assert(__cplusplus >= 202002L, "moe::moe must compile .cu files as C++20");
static_assert(requires(int i) { i + 1; });

namespace {

template <class T>
concept scalar = std::floating_point<T> || std::integral<T>;

#ifdef __CUDACC__
template <scalar T>
__global__ void scale(T* data, T factor, int n) {
  int const i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) data[i] *= factor;
}
#endif

}  // namespace

long moe_consumer_kernel_cplusplus() {
#ifdef __CUDACC__
  // Naming the kernel instantiates it for the device without launching it.
  void (*const kernel)(float*, float, int) = &scale<float>;
  if (kernel == nullptr) return 0L;
#endif
  return static_cast<long>(__cplusplus);
}
