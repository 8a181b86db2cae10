// SPDX-License-Identifier: Apache-2.0
//
// Compiled by nvcc against the Conan package: C++20 (from moe::moe), moe's device launch
// header, and the version Conan packaged. Runs without a GPU.
#include <moe/core/launch.cuh>
#include <moe/version.hpp>

#include <concepts>
#include <cstdio>
#include <cstring>

static_assert(__cplusplus >= 202002L, "moe::moe must compile .cu files as C++20");

namespace {

template <std::floating_point T>
__global__ void scale(T* data, T factor, int n) {
  int const i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) data[i] *= factor;
}

}  // namespace

int main() {
  void (*const kernel)(float*, float, int) = &scale<float>;  // instantiated, not launched
  std::printf("moe %s from Conan (nvcc C++ %ld)\n", moe::version_string,
              static_cast<long>(__cplusplus));
  return kernel != nullptr && std::strcmp(MOE_VERSION, MOE_EXPECTED_VERSION) == 0 ? 0 : 1;
}
