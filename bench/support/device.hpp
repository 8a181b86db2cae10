// SPDX-License-Identifier: Apache-2.0
#pragma once
// What the CUDA benchmarks share beside the fixture: owned device memory and streams, random
// device data, the loop that times a call against a baseline in the same iteration, the
// measured ceilings (a large cuBLAS bf16 GEMM, a device copy) and the main() of a benchmark
// that needs a CUDA device.
//
// Like fixture.hpp, it uses the runtime API and cuBLAS only, so it compiles with the host
// compiler; only benchmarks that found a GPU construct its types.

#include "../../tests/support/device_memory.hpp"
#include "fixture.hpp"

#include <moe/core/blas.hpp>
#include <moe/core/device.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>

#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <vector>

namespace moe::bench {

// --- device memory and streams -----------------------------------------------------------

// The GPU tests' owned memory and stream: one definition for both trees.
template <class T>
using device_array = test::device_buffer<T>;
using test::owned_stream;

// --- random device data ------------------------------------------------------------------

/// Fills `count` elements of T at `out` (device memory) with fill_random's values, never
/// zero: a 16 MiB random block, uploaded once and copied over the rest on the device
/// (filling tens of GB from the host would dominate the setup). Waits for `stream`.
template <class T>
void fill_random(T* out, std::size_t count, std::uint64_t seed, double scale, cudaStream_t stream) {
  std::size_t const block = std::min(count, (std::size_t{16} << 20) / sizeof(T));
  if (block == 0) return;
  std::vector<float> values(block);
  fill_random(std::span(values), seed, scale);
  std::vector<T> host(block);
  for (std::size_t i = 0; i < block; ++i) host[i] = moe::from_accumulate<T>(values[i]);
  MOE_CUDA_TRY(
      cudaMemcpyAsync(out, host.data(), block * sizeof(T), cudaMemcpyHostToDevice, stream));
  for (std::size_t at = block; at < count; at += block)
    MOE_CUDA_TRY(cudaMemcpyAsync(out + at, out, std::min(block, count - at) * sizeof(T),
                                 cudaMemcpyDeviceToDevice, stream));
  MOE_CUDA_TRY(cudaStreamSynchronize(stream));  // `host` dies here
}

template <class T>
void fill_random(device_array<T>& out, std::uint64_t seed, double scale, cudaStream_t stream) {
  fill_random(out.data(), out.size(), seed, scale, stream);
}

// --- timing beside the fixture's loop ----------------------------------------------------

/// Seconds of the work `work()` enqueues on the timer's stream, reported to no one.
template <class Work>
double seconds_of(cuda_event_timer& timer, Work&& work) {
  timer.start();
  work();
  return timer.stop();
}

/// Seconds of the two, summed over a benchmark's iterations.
struct baseline_and_measured {
  double baseline_seconds = 0;
  double measured_seconds = 0;
};

/// The loop of a call measured against a baseline (a copy of the same bytes): each iteration
/// times `baseline()` untimed for Google Benchmark, then `work()` with the fixture's timer,
/// both on `stream` from a flushed L2. Returns both sums, for the benchmark's counters.
template <class Baseline, class Work>
baseline_and_measured timed_loop_against(benchmark::State& state, cudaStream_t stream,
                                         Baseline&& baseline, Work&& work) {
  cuda_event_timer timer(stream), baseline_timer(stream);
  l2_flush l2;
  baseline_and_measured sums;
  for (auto _ : state) {
    l2.flush(stream);
    sums.baseline_seconds += seconds_of(baseline_timer, baseline);
    l2.flush(stream);
    timer.start();
    work();
    sums.measured_seconds += timer.stop(state);
  }
  return sums;
}

// --- ceilings ----------------------------------------------------------------------------

/// Seconds per call of `work` on `stream`: the best of five timed batches of `reps` calls,
/// after a warm-up.
template <class Work>
double best_seconds(cudaStream_t stream, int reps, Work&& work) {
  for (int i = 0; i < 3; ++i) work();
  cuda_event_timer timer(stream);
  double best = 0;
  for (int batch = 0; batch < 5; ++batch) {
    double const seconds = seconds_of(timer, [&] {
      for (int i = 0; i < reps; ++i) work();
    });
    if (batch == 0 || seconds < best) best = seconds;
  }
  return best / reps;
}

/// A large cuBLAS bf16 GEMM (8192³, float accumulation, bf16 output) on random operands:
/// the ceiling an expert GEMM can reach on this device.
struct ceiling_gemm {
  static constexpr index_t n = 8192;
  device_array<__nv_bfloat16> a{n * n}, b{n * n}, c{n * n};

  explicit ceiling_gemm(cudaStream_t stream) {
    fill_random(a, 1, 0.05, stream);
    fill_random(b, 2, 0.05, stream);
  }
  void run(cublasHandle_t blas, cudaStream_t stream) {
    moe::gemm(blas, stream, {.m = n, .n = n, .depth = n, .lda = n, .ldb = n, .ldc = n}, 1.0f,
              a.data(), b.data(), 0.0f, c.data());
  }
  static constexpr double flops() { return 2.0 * n * n * n; }
  static constexpr double bytes() { return 3.0 * n * n * sizeof(__nv_bfloat16); }
};

/// FLOP/s of ceiling_gemm.
inline double measure_gemm_ceiling(cublasHandle_t blas, cudaStream_t stream) {
  ceiling_gemm g(stream);
  return ceiling_gemm::flops() / best_seconds(stream, 10, [&] { g.run(blas, stream); });
}

/// Bytes per second (read plus written) of a 1 GiB device-to-device copy: what reading
/// weights from HBM can reach.
inline double measure_copy_ceiling(cudaStream_t stream) {
  constexpr std::size_t bytes = std::size_t{1} << 30;
  device_array<std::byte> from(bytes), to(bytes);
  MOE_CUDA_TRY(cudaMemsetAsync(from.data(), 1, bytes, stream));
  double const seconds = best_seconds(stream, 5, [&] {
    MOE_CUDA_TRY(cudaMemcpyAsync(to.data(), from.data(), bytes, cudaMemcpyDeviceToDevice, stream));
  });
  return 2.0 * static_cast<double>(bytes) / seconds;
}

/// The ceilings a benchmark's rates are reported against.
struct ceilings {
  double gemm_flops_per_second = 0;  // ceiling_gemm
  double copy_bytes_per_second = 0;  // measure_copy_ceiling; 0 where not measured
};

/// Measures the GEMM ceiling, and the copy ceiling when `with_copy`; prints them as
/// `program` and adds them to the report's context (bf16_gemm_tflops, copy_tb_per_s).
inline ceilings measure_ceilings(char const* program, cublasHandle_t blas, cudaStream_t stream,
                                 bool with_copy) {
  ceilings c;
  c.gemm_flops_per_second = measure_gemm_ceiling(blas, stream);
  std::printf("%s: ceilings: cuBLAS bf16 GEMM 8192^3 %.1f TFLOP/s", program,
              c.gemm_flops_per_second * 1e-12);
  benchmark::AddCustomContext("bf16_gemm_tflops", std::to_string(c.gemm_flops_per_second * 1e-12));
  if (with_copy) {
    c.copy_bytes_per_second = measure_copy_ceiling(stream);
    std::printf(", device copy %.2f TB/s (read + written)", c.copy_bytes_per_second * 1e-12);
    benchmark::AddCustomContext("copy_tb_per_s", std::to_string(c.copy_bytes_per_second * 1e-12));
  }
  std::printf("\n");
  return c;
}

/// What the benchmarks of a program that calls cuBLAS borrow: its stream, its cuBLAS handle
/// and the ceilings measured on them.
struct blas_context {
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  ceilings ceiling{};
};

/// Owns what a blas_context borrows: a stream of the program's own and a cuBLAS handle; the
/// ceilings are measured on construction (measure_ceilings).
struct blas_session {
  owned_stream stream;  // outlives the handle, which is bound to it
  moe::blas_handle blas;
  blas_context context;

  blas_session(char const* program, bool with_copy)
      : context{.stream = stream.stream,
                .blas = blas.get(),
                .ceiling = measure_ceilings(program, blas.get(), stream.stream, with_copy)} {}
};

// --- main --------------------------------------------------------------------------------

/// The main() of a benchmark that needs a CUDA device: initialises Google Benchmark, exits
/// 0 with a message when there is no device, then runs `body()`, which registers and runs
/// the benchmarks (benchmark::RunSpecifiedBenchmarks) while what they borrow is alive. A
/// moe::error out of `body` is printed as `program` and exits 1.
template <class Body>
int cuda_benchmark_main(int argc, char** argv, char const* program, Body&& body) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (moe::cuda_device_count() == 0) {
    std::printf("%s: skipped, no CUDA device\n", program);
    return 0;
  }
  int status = 0;
  try {
    body();
  } catch (moe::error const& e) {
    std::fprintf(stderr, "%s: %s\n", program, e.what());
    status = 1;
  }
  benchmark::Shutdown();
  return status;
}

/// cuda_benchmark_main for benchmarks that run cuBLAS: `body(context)` gets the blas_context
/// of a blas_session (ceilings measured first, with the copy ceiling when `with_copy`).
template <class Body>
int cuda_blas_benchmark_main(int argc, char** argv, char const* program, bool with_copy,
                             Body&& body) {
  return cuda_benchmark_main(argc, argv, program, [&] {
    blas_session const session(program, with_copy);
    body(session.context);
  });
}

/// Iterations that last about a third of a second at `seconds` each (an estimate from the
/// work and the device's peaks), at least 5 and at most `most`: a fixed count keeps a
/// benchmark's cost steady whatever Google Benchmark's timing heuristics would choose.
inline benchmark::IterationCount iterations_lasting(double seconds, double most) {
  return static_cast<benchmark::IterationCount>(std::clamp(0.3 / seconds, 5.0, most));
}

}  // namespace moe::bench
