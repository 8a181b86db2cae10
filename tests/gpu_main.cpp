// SPDX-License-Identifier: Apache-2.0
//
// main() of every gpu test executable. Without a usable CUDA device it exits with 77, which
// ctest reports as "skipped" (SKIP_RETURN_CODE) rather than passed. On the GPU machine set
// MOE_REQUIRE_GPU=1 so that a missing or broken device fails the run instead of hiding it.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int skip_exit_code = 77;

bool gpu_required() {
  char const* value = std::getenv("MOE_REQUIRE_GPU");
  return value != nullptr && std::strcmp(value, "1") == 0;
}

}  // namespace

int main(int argc, char** argv) {
  int count = 0;  // cudaGetDeviceCount leaves it unwritten when it fails
  cudaError_t const status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    char const* why = status != cudaSuccess ? cudaGetErrorString(status) : "no CUDA device";
    if (gpu_required()) {
      std::fprintf(stderr, "MOE_REQUIRE_GPU=1 but no usable CUDA device: %s\n", why);
      return 1;
    }
    std::printf("skipped: no usable CUDA device (%s); set MOE_REQUIRE_GPU=1 to fail instead\n",
                why);
    return skip_exit_code;
  }

  doctest::Context context(argc, argv);
#if defined(MOE_CUDA_EMULATION)
  // The emulated twin of a gpu test (tests/emulation/): say how it ran and what it left out.
  std::printf("emulated CUDA runtime: %s\n", moe::emulation::describe_schedule().c_str());
  int const result = context.run();
  std::vector<std::string> const excluded = moe::emulation::exclusions();
  std::printf("emulated CUDA runtime: %zu part(s) not emulated%s\n", excluded.size(),
              excluded.empty() ? "" : ":");
  for (std::string const& e : excluded) std::printf("  %s\n", e.c_str());
  return result;
#else
  return context.run();
#endif
}
