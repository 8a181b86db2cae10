// SPDX-License-Identifier: Apache-2.0
// Host-callable math run inside a one-thread kernel through moe::launch (mdspan's pattern):
// capacity math, dtype conversions and activations must give the device the same answers
// as the host backend. Skipped (exit 77) without a CUDA device.

#include <doctest/doctest.h>

#include <moe/core.hpp>
#include <moe/core/launch.cuh>
#include <moe/expert/activation.hpp>
#include <moe/gating/capacity.hpp>

#include <cmath>
#include <vector>

namespace {

using namespace moe;

constexpr int results = 8;

/// One thread evaluates every function at `x` and writes the answers.
struct device_math {
  struct params {
    float x;
    double* out;  // (results) device memory
  };
  static dim3 grid(params const&) { return {1}; }
  static dim3 block(params const&) { return {1}; }
  static std::size_t smem_bytes(params const&) { return 0; }

  MOE_HOST_DEVICE static void evaluate(float x, double* out) {
    gating::capacity_args const a{
        .tokens = 1000, .experts = 64, .k = 2, .factor = 1.25f, .alignment = 8};
    out[0] = static_cast<double>(gating::resolve_capacity(a, 0));
    out[1] = static_cast<double>(gating::capacity_bound(
        {.tokens = 1000, .experts = 64, .k = 2, .factor = -1.5f, .alignment = 4}));
    out[2] = to_accumulate(from_accumulate<__nv_bfloat16>(x));
    out[3] = to_accumulate(from_accumulate<__half>(x));
    out[4] = act::gelu::forward(x);
    out[5] = act::silu::forward(x);
    out[6] = act::gelu::derivative(x);
    out[7] = act::silu::derivative(x);
  }

  __device__ void operator()(params const& p, char*) const { evaluate(p.x, p.out); }
};
static_assert(device_algorithm<device_math>);

/// Asks for more threads per block than any device has.
struct too_wide {
  struct params {};
  static dim3 grid(params const&) { return {1}; }
  static dim3 block(params const&) { return {4096}; }
  static std::size_t smem_bytes(params const&) { return 0; }
  __device__ void operator()(params const&, char*) const {}
};

}  // namespace

TEST_CASE("host-device math agrees between the host and a one-thread kernel") {
  cudaStream_t stream{};
  MOE_CUDA_TRY(cudaStreamCreate(&stream));
  device_buffer<> out(results * sizeof(double), stream);
  for (float x : {-2.5f, -0.3f, 0.7f, 3.1f}) {
    MOE_CUDA_TRY(cudaMemsetAsync(out.view().data(), 0xff, out.size(), stream));  // poison
    launch<device_math>({x, reinterpret_cast<double*>(out.view().data())}, stream);
    std::vector<double> device(results), expected(results);
    MOE_CUDA_TRY(cudaMemcpyAsync(device.data(), out.view().data(), out.size(),
                                 cudaMemcpyDeviceToHost, stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
    device_math::evaluate(x, expected.data());
    for (int i = 0; i < results; ++i) {
      INFO("result " << i << " at x = " << x);
      CHECK(std::abs(device[i] - expected[i]) <= 1e-5 * std::max(1.0, std::abs(expected[i])));
    }
  }
  MOE_CUDA_TRY(cudaStreamDestroy(stream));
}

TEST_CASE("a failed launch throws cuda_error naming the caller") {
  CHECK_THROWS_AS(launch<too_wide>({}, nullptr), cuda_error);
  CHECK(cudaGetLastError() == cudaSuccess);  // the launch error was consumed
}
