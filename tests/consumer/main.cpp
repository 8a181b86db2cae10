// SPDX-License-Identifier: Apache-2.0
//
// The consumer test's program: it compiles against the installed headers and needs no GPU.
#include <moe/core/config.hpp>
#include <moe/version.hpp>

#include <cstdio>
#include <cstring>

#ifdef MOE_CONSUMER_CUDA
// Defined in kernel.cu: the __cplusplus that nvcc saw there.
long moe_consumer_cuda_cplusplus();
#endif

int main() {
  static_assert(moe::version_major == MOE_VERSION_MAJOR);
  std::printf("moe %s (host C++ %ld)\n", moe::version_string, static_cast<long>(__cplusplus));
  if (std::strlen(MOE_VERSION) == 0) return 1;
#ifdef MOE_CONSUMER_CUDA
  long const cuda_cplusplus = moe_consumer_cuda_cplusplus();
  std::printf("nvcc C++ %ld\n", cuda_cplusplus);
  if (cuda_cplusplus < 202002L) return 1;
#endif
  return 0;
}
