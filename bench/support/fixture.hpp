// SPDX-License-Identifier: Apache-2.0
#pragma once
// The one fixture of moe's benchmarks (STYLE §20, after RAFT's): timers that feed Google
// Benchmark's manual time, cache flushes, bytes and FLOPs counters, random data, and
// parameter grids registered from structs. A benchmark reads:
//
//   for (auto _ : state) {          // through timed_loop(state, timer, flush, work)
//     flush();                      // untimed: host_cache_flush, or l2_flush on a stream
//     timer.start();  work();  timer.stop(state);
//   }
//   set_bytes_and_flops(state, bytes, flops);
//
// The CUDA parts (cuda_event_timer, l2_flush) use the runtime API only, so this header
// compiles with the host compiler; only benchmarks that found a GPU construct them.

#include <moe/core/error.hpp>

#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace moe::bench {

// --- timers ------------------------------------------------------------------------------
// Both timers have the same interface: start() before the timed region, stop(state) after
// it, which reports the region's seconds with state.SetIterationTime. Benchmarks that use
// them are registered with UseManualTime() (register_grid does so).

/// Times a region of host code with the steady clock.
class host_timer {
 public:
  void start() noexcept { start_ = clock::now(); }

  /// Ends the region; returns its seconds and reports them to `state`.
  double stop(benchmark::State& state) noexcept {
    double const seconds = std::chrono::duration<double>(clock::now() - start_).count();
    state.SetIterationTime(seconds);
    return seconds;
  }

 private:
  using clock = std::chrono::steady_clock;
  clock::time_point start_{};
};

/// Times the work enqueued on a stream between start() and stop() with a pair of CUDA
/// events. stop() waits for the stop event, not for the whole device.
class cuda_event_timer {
 public:
  /// @param stream the caller's stream, on which the timed work is enqueued
  explicit cuda_event_timer(cudaStream_t stream) : stream_(stream) {
    MOE_CUDA_TRY(cudaEventCreate(&start_));
    if (cudaError_t const e = cudaEventCreate(&stop_); e != cudaSuccess) {
      (void)cudaGetLastError();
      MOE_CUDA_TRY_LOG(cudaEventDestroy(start_));
      throw cuda_error(e, "cudaEventCreate(&stop_)");
    }
  }
  cuda_event_timer(cuda_event_timer const&) = delete;
  cuda_event_timer& operator=(cuda_event_timer const&) = delete;
  ~cuda_event_timer() {
    MOE_CUDA_TRY_LOG(cudaEventDestroy(start_));
    MOE_CUDA_TRY_LOG(cudaEventDestroy(stop_));
  }

  void start() { MOE_CUDA_TRY(cudaEventRecord(start_, stream_)); }

  /// Ends the region; waits for it and returns its seconds, reporting them to no one (a
  /// baseline measured beside the timed region, a ceiling).
  double stop() {
    MOE_CUDA_TRY(cudaEventRecord(stop_, stream_));
    MOE_CUDA_TRY(cudaEventSynchronize(stop_));
    float milliseconds = 0;
    MOE_CUDA_TRY(cudaEventElapsedTime(&milliseconds, start_, stop_));
    return static_cast<double>(milliseconds) * 1e-3;
  }

  /// Ends the region; waits for it, returns its seconds and reports them to `state`.
  double stop(benchmark::State& state) {
    double const seconds = stop();
    state.SetIterationTime(seconds);
    return seconds;
  }

 private:
  cudaStream_t stream_;
  cudaEvent_t start_ = nullptr;
  cudaEvent_t stop_ = nullptr;
};

// --- cache flushes -----------------------------------------------------------------------
// Each timed iteration starts with cold caches, as a layer does in a real model where other
// layers ran in between; without a flush, small problems are measured from cache.

/// Evicts the host's caches by writing a buffer larger than the last-level cache: 64 MiB,
/// or twice the L3 size where the system reports a larger one.
class host_cache_flush {
 public:
  host_cache_flush() : buffer_(flush_bytes()) {}

  void operator()() noexcept {
    ++value_;  // a new value each time, so that no write can be skipped as redundant
    std::memset(buffer_.data(), value_, buffer_.size());
    benchmark::DoNotOptimize(buffer_);
    benchmark::ClobberMemory();
  }

  [[nodiscard]] std::size_t bytes() const noexcept { return buffer_.size(); }

  /// One flush buffer per process, allocated on first use: allocating and faulting in 64 MiB
  /// on each of Google Benchmark's repeated calls of a benchmark would dominate its run.
  static host_cache_flush& shared() {
    static host_cache_flush flush;
    return flush;
  }

 private:
  static std::size_t flush_bytes() noexcept {
    std::size_t bytes = std::size_t{64} << 20;
#ifdef _SC_LEVEL3_CACHE_SIZE
    if (long const l3 = ::sysconf(_SC_LEVEL3_CACHE_SIZE); l3 > 0)
      bytes = std::max(bytes, 2 * static_cast<std::size_t>(l3));
#endif
    return bytes;
  }

  std::vector<unsigned char> buffer_;
  unsigned char value_ = 0;
};

/// Evicts the current device's L2 cache: before each timed iteration, `flush(stream)`
/// writes a device buffer of the L2's size with cudaMemsetAsync on the caller's stream.
class l2_flush {
 public:
  l2_flush() {
    int device = 0, l2_bytes = 0;
    MOE_CUDA_TRY(cudaGetDevice(&device));
    MOE_CUDA_TRY(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
    bytes_ = static_cast<std::size_t>(std::max(l2_bytes, 0));
    if (bytes_ > 0) MOE_CUDA_TRY(cudaMalloc(&buffer_, bytes_));
  }
  l2_flush(l2_flush const&) = delete;
  l2_flush& operator=(l2_flush const&) = delete;
  ~l2_flush() {
    if (buffer_ != nullptr) MOE_CUDA_TRY_LOG(cudaFree(buffer_));
  }

  /// Enqueues the flush on `stream`, before the timer's start event.
  void flush(cudaStream_t stream) {
    if (buffer_ != nullptr) MOE_CUDA_TRY(cudaMemsetAsync(buffer_, 0, bytes_, stream));
  }

  [[nodiscard]] std::size_t bytes() const noexcept { return bytes_; }

 private:
  void* buffer_ = nullptr;
  std::size_t bytes_ = 0;
};

// --- the timed loop ----------------------------------------------------------------------

/// The loop of every benchmark: `flush()` untimed, then `work()` between the timer's start
/// and stop. `work` must leave its results where the compiler cannot discard them (device
/// memory, or benchmark::DoNotOptimize).
template <class Timer, class Flush, class Work>
void timed_loop(benchmark::State& state, Timer& timer, Flush&& flush, Work&& work) {
  for (auto _ : state) {
    flush();
    timer.start();
    work();
    timer.stop(state);
  }
}

// --- counters ----------------------------------------------------------------------------

/// Reports the bytes and useful FLOPs of one iteration (padding and dropped slots excluded),
/// and their rates over the measured (manual) time: the console shows bytes_per_second as
/// e.g. "1.2G/s" (GB/s) and flops_per_second likewise (GFLOP/s). Units are decimal.
inline void set_bytes_and_flops(benchmark::State& state, double bytes, double flops) {
  using counter = benchmark::Counter;
  state.counters["bytes"] = counter(bytes, counter::kDefaults, counter::kIs1000);
  state.counters["flops"] = counter(flops, counter::kDefaults, counter::kIs1000);
  state.counters["bytes_per_second"] =
      counter(bytes, counter::kIsIterationInvariantRate, counter::kIs1000);
  state.counters["flops_per_second"] =
      counter(flops, counter::kIsIterationInvariantRate, counter::kIs1000);
}

// --- random data -------------------------------------------------------------------------

/// Fills `out` with uniform values in [-scale, -scale/100] ∪ [scale/100, scale]: random,
/// reproducible from `seed`, and never zero, so that a kernel that skips work shows.
template <class T>
void fill_random(std::span<T> out, std::uint64_t seed, double scale = 1.0) {
  std::mt19937_64 engine(seed);
  for (auto& v : out) {
    double const u = static_cast<double>(engine() >> 11) * 0x1.0p-53;  // [0, 1)
    double const magnitude = scale * (0.01 + 0.99 * u);
    v = static_cast<T>((engine() & 1) ? magnitude : -magnitude);
  }
}

// --- parameter grids ---------------------------------------------------------------------
// A benchmark's configurations are a struct with the fields it varies and a name() that
// spells them as "T:256/H:32/…"; register_grid registers one benchmark per configuration.

/// "T:256/H:32": key:value pairs joined by '/'.
inline std::string grid_name(std::initializer_list<std::pair<std::string_view, long long>> fields) {
  std::string name;
  for (auto const& [key, value] : fields) {
    if (!name.empty()) name += '/';
    name.append(key).append(":").append(std::to_string(value));
  }
  return name;
}

/// Every combination of the lists, as `Config{a, b, …}`, the last list varying fastest:
/// product<config>(std::vector{64, 256}, std::vector{32, 64}) gives four configurations.
template <class Config, class... Values>
std::vector<Config> product(std::vector<Values> const&... lists) {
  constexpr std::size_t rank = sizeof...(Values);
  std::array<std::size_t, rank> const sizes{lists.size()...};
  std::size_t total = 1;
  for (std::size_t s : sizes) total *= s;
  auto const all = std::forward_as_tuple(lists...);
  std::vector<Config> out;
  out.reserve(total);
  for (std::size_t flat = 0; flat < total; ++flat) {
    std::array<std::size_t, rank> index{};
    for (std::size_t r = rank, rest = flat; r-- > 0; rest /= sizes[r]) index[r] = rest % sizes[r];
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      out.push_back(Config{std::get<I>(all)[index[I]]...});
    }
    (std::make_index_sequence<rank>{});
  }
  return out;
}

/// Runs `body`, turning an exception into a benchmark error (SkipWithError) rather than an
/// abort: the run goes on with the next benchmark and the report names what failed.
template <class Body>
void report_errors(benchmark::State& state, Body&& body) {
  try {
    body();
  } catch (std::exception const& e) {
    state.SkipWithError(e.what());
  }
}

/// Registers `body(state, config)` for each configuration as "<family>/<config.name()>",
/// with manual time (the fixture's timers) in microseconds. Returns the registered
/// benchmarks, for further options.
template <class Config, class Body>
std::vector<benchmark::internal::Benchmark*> register_grid(std::string const& family,
                                                           std::vector<Config> const& configs,
                                                           Body body) {
  std::vector<benchmark::internal::Benchmark*> registered;
  for (Config const& config : configs) {
    std::string const name = family + "/" + config.name();
    auto* b = benchmark::RegisterBenchmark(name.c_str(), [config, body](benchmark::State& state) {
      report_errors(state, [&] { body(state, config); });
    });
    registered.push_back(b->UseManualTime()->Unit(benchmark::kMicrosecond));
  }
  return registered;
}

}  // namespace moe::bench
