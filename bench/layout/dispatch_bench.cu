// SPDX-License-Identifier: Apache-2.0
// Dispatch (encode) and combine (decode) of both layouts on the device in bfloat16, at the
// shapes of Mixtral-8x7B (H 4096, E 8, k 2), DeepSeek-V3 (H 7168, E 256, k 8) and
// Qwen3-30B-A3B (H 2048, E 128, k 8), from decode (T = 32) to prefill (T = 16384), against a
// cudaMemcpyAsync device-to-device that moves the same bytes, timed in the same iteration.
//
//   layout_bench --benchmark_out=layout_bench.json --benchmark_out_format=json
//
// Routing: k distinct experts per token drawn uniformly, slots in choice-major order. The
// capacity layout uses Tutel's capacity with f = 1.25 (so some tokens overflow at small T);
// the ragged layout pads each expert's rows to 128 (grouped GEMM tiles) and its buffer has
// exactly the batch's rows. Offsets are computed once, outside the timed region: the timed
// work is one encode (row_source memset + scatter + one pass over every row of the batch) or
// one decode.
//
// Counters:
//   bytes            the minimal payload traffic of one call (routing metadata excluded, it is
//                    under 1% here): dispatch reads one x row per kept assignment and writes
//                    every row of the batch (zeros included), (kept + rows)·H·2; combine reads
//                    one expert row per kept assignment and writes y, (kept + T)·H·2
//   bytes_per_second those bytes over the measured time
//   copy_us          a cudaMemcpyAsync of bytes/2 (its reads plus writes are `bytes`), from a
//                    flushed L2 like the measured call, mean per iteration
//   fraction_of_copy the copy's time over the call's: 1 means the call moves its bytes as fast
//                    as a plain copy of the same traffic
// Exits 0 with a message when there is no CUDA device.

#include "../support/device.hpp"
#include "../support/fixture.hpp"

#include <moe/core/backend.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/device_routing.hpp>
#include <moe/gating/priority.hpp>
#include <moe/layout/capacity.hpp>
#include <moe/layout/kernels/capacity.cuh>
#include <moe/layout/kernels/ragged.cuh>
#include <moe/layout/ragged.hpp>

#include <benchmark/benchmark.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using moe::index_t;
using bf16 = __nv_bfloat16;

constexpr float capacity_factor = 1.25f;
constexpr index_t row_alignment = 128;

struct config {
  long long tokens, hidden, experts, k;
  [[nodiscard]] std::string name() const {
    return moe::bench::grid_name({{"T", tokens}, {"H", hidden}, {"E", experts}, {"k", k}});
  }
  bool operator==(config const&) const = default;
};

std::vector<config> configs() {
  std::vector<config> out;
  for (auto [hidden, experts, k] : {std::tuple{4096LL, 8LL, 2LL}, std::tuple{7168LL, 256LL, 8LL},
                                    std::tuple{2048LL, 128LL, 8LL}})
    for (long long tokens : {32LL, 256LL, 4096LL, 16384LL})
      out.push_back({tokens, hidden, experts, k});
  return out;
}

/// Device memory freed on destruction.
class device_memory {
 public:
  explicit device_memory(std::size_t bytes) : bytes_(bytes) {
    MOE_CUDA_TRY(cudaMalloc(&data_, bytes > 0 ? bytes : 1));
  }
  device_memory(device_memory const&) = delete;
  device_memory& operator=(device_memory const&) = delete;
  ~device_memory() { MOE_CUDA_TRY_LOG(cudaFree(data_)); }

  template <class T>
  [[nodiscard]] T* as() const noexcept {
    return static_cast<T*>(data_);
  }
  [[nodiscard]] std::size_t bytes() const noexcept { return bytes_; }
  [[nodiscard]] moe::workspace view() const noexcept { return {as<std::byte>(), bytes_}; }

 private:
  void* data_ = nullptr;
  std::size_t bytes_;
};

/// Fills `memory` with random bfloat16 values, never zero.
void fill_random_bf16(device_memory& memory, std::uint64_t seed, cudaStream_t stream) {
  moe::bench::fill_random(memory.as<bf16>(), memory.bytes() / sizeof(bf16), seed, 1.0, stream);
}

/// One layout's expert batch on the device: its offsets, buffers and scratch.
struct layout_batch {
  index_t rows;  // rows of the buffer: E·C, or the ragged batch's padded rows
  index_t kept;  // assignments that reach an expert
  device_memory begin, row_count, dispatched, expert_out, scratch;

  layout_batch(index_t rows_, index_t kept_, index_t experts, index_t hidden,
               std::size_t scratch_bytes)
      : rows(rows_),
        kept(kept_),
        begin(static_cast<std::size_t>(experts) * sizeof(std::int64_t)),
        row_count(static_cast<std::size_t>(experts) * sizeof(std::int64_t)),
        dispatched(static_cast<std::size_t>(rows_ * hidden) * sizeof(bf16)),
        expert_out(static_cast<std::size_t>(rows_ * hidden) * sizeof(bf16)),
        scratch(scratch_bytes) {}

  [[nodiscard]] moe::span<std::int64_t const> begin_span(index_t experts) const {
    return {begin.as<std::int64_t>(), static_cast<std::size_t>(experts)};
  }
  [[nodiscard]] moe::span<std::int64_t const> rows_span(index_t experts) const {
    return {row_count.as<std::int64_t>(), static_cast<std::size_t>(experts)};
  }
};

/// Everything one configuration needs: a routing on the device, x, y, both layouts' batches
/// with their offsets computed, and a copy source and destination for the ceiling.
struct world {
  config c;
  index_t tokens, hidden, experts, k, capacity;
  moe::bench::owned_stream owned;
  cudaStream_t stream = owned.stream;
  device_memory routing_memory;
  moe::gating::device_routing r;
  device_memory x, y;
  std::unique_ptr<layout_batch> capacity_batch, ragged_batch;
  std::unique_ptr<device_memory> copy_from, copy_to;

  static std::size_t routing_bytes(config const& c) {
    moe::workspace_carver counter;
    (void)moe::gating::carve_device_routing(counter, c.tokens, c.tokens, c.experts,
                                            static_cast<int>(c.k));
    return counter.bytes();
  }

  explicit world(config const& c_)
      : c(c_),
        tokens(c_.tokens),
        hidden(c_.hidden),
        experts(c_.experts),
        k(c_.k),
        capacity(0),
        routing_memory(routing_bytes(c_)),
        x(static_cast<std::size_t>(c_.tokens * c_.hidden) * sizeof(bf16)),
        y(static_cast<std::size_t>(c_.tokens * c_.hidden) * sizeof(bf16)) {
    moe::workspace_carver carver(routing_memory.view());
    r = moe::gating::carve_device_routing(carver, tokens, tokens, experts, static_cast<int>(k));

    // The routing on the host: k distinct experts per token, choice-major slots.
    std::mt19937_64 rng(0x6c61796f7574 + static_cast<std::uint64_t>(tokens));
    std::uniform_int_distribution<std::int32_t> pick(0, static_cast<std::int32_t>(experts - 1));
    std::uniform_real_distribution<float> weight_of(0.05f, 1.0f);
    std::vector<std::int32_t> expert(static_cast<std::size_t>(tokens * k));
    std::vector<std::int64_t> slot(expert.size()), load(static_cast<std::size_t>(experts));
    std::vector<float> weight(expert.size());
    for (index_t t = 0; t < tokens; ++t)
      for (index_t j = 0; j < k; ++j) {
        std::int32_t* const row = &expert[static_cast<std::size_t>(t * k)];
        do row[j] = pick(rng);
        while (std::find(row, row + j, row[j]) != row + j);
        weight[static_cast<std::size_t>(t * k + j)] = weight_of(rng);
      }
    moe::gating::assign_slots(
        moe::gating::choice_major{}, moe::make_view(std::as_const(expert).data(), tokens, k),
        moe::make_view(slot.data(), tokens, k), moe::make_view(load.data(), experts));
    index_t const max_load = *std::max_element(load.begin(), load.end());
    capacity = moe::gating::resolve_capacity({.tokens = tokens,
                                              .experts = experts,
                                              .k = static_cast<int>(k),
                                              .factor = capacity_factor,
                                              .alignment = 1},
                                             max_load);
    // Dropped assignments get weight 0, as the router gives them.
    for (std::size_t i = 0; i < slot.size(); ++i)
      if (slot[i] >= capacity) weight[i] = 0;
    moe::gating::device_routing_scalars const scalars{.capacity = capacity,
                                                      .max_load = max_load,
                                                      .dropped = 0,
                                                      .unrouted = 0,
                                                      .aux_loss = 0,
                                                      .z_loss = 0};
    MOE_CUDA_TRY(cudaMemcpy(r.expert.data_handle(), expert.data(),
                            expert.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice));
    MOE_CUDA_TRY(cudaMemcpy(r.slot.data_handle(), slot.data(), slot.size() * sizeof(std::int64_t),
                            cudaMemcpyHostToDevice));
    MOE_CUDA_TRY(cudaMemcpy(r.weight.data_handle(), weight.data(), weight.size() * sizeof(float),
                            cudaMemcpyHostToDevice));
    MOE_CUDA_TRY(cudaMemcpy(r.load.data_handle(), load.data(), load.size() * sizeof(std::int64_t),
                            cudaMemcpyHostToDevice));
    MOE_CUDA_TRY(cudaMemcpy(r.scalars, &scalars, sizeof(scalars), cudaMemcpyHostToDevice));

    // Both layouts' batches, offsets on the device.
    moe::layout::layout_args const a{.tokens = tokens,
                                     .experts = experts,
                                     .k = static_cast<int>(k),
                                     .capacity = capacity,
                                     .row_alignment = row_alignment};
    index_t capacity_kept = 0, ragged_rows = 0;
    for (std::int64_t l : load) {
      capacity_kept += std::min<index_t>(l, capacity);
      ragged_rows += moe::layout::padded_rows(l, row_alignment);
    }
    capacity_batch = std::make_unique<layout_batch>(
        experts * capacity, capacity_kept, experts, hidden,
        moe::layout::encode_workspace_bytes(moe::layout::capacity{}, a));
    ragged_batch = std::make_unique<layout_batch>(ragged_rows, tokens * k, experts, hidden,
                                                  moe::layout::gather_workspace_bytes(ragged_rows));
    moe::cuda_backend const cuda{stream};
    auto span_of = [&](device_memory const& m) {
      return moe::span<std::int64_t>(m.as<std::int64_t>(), static_cast<std::size_t>(experts));
    };
    moe::layout::offsets(cuda, moe::layout::capacity{}, a, r, span_of(capacity_batch->begin),
                         span_of(capacity_batch->row_count));
    moe::layout::offsets(cuda, moe::layout::ragged{}, a, r, span_of(ragged_batch->begin),
                         span_of(ragged_batch->row_count), nullptr);
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));

    fill_random_bf16(x, 1, stream);
    fill_random_bf16(capacity_batch->expert_out, 2, stream);
    fill_random_bf16(ragged_batch->expert_out, 3, stream);
    std::size_t copy_bytes = 0;
    for (layout_batch const* b : {capacity_batch.get(), ragged_batch.get()})
      copy_bytes = std::max(
          {copy_bytes, copy_bytes_of(dispatch_bytes(*b)), copy_bytes_of(combine_bytes(*b))});
    copy_from = std::make_unique<device_memory>(copy_bytes);
    copy_to = std::make_unique<device_memory>(copy_bytes);
    fill_random_bf16(*copy_from, 4, stream);
  }
  world(world const&) = delete;
  world& operator=(world const&) = delete;

  [[nodiscard]] double dispatch_bytes(layout_batch const& b) const {
    return static_cast<double>((b.kept + b.rows) * hidden) * sizeof(bf16);
  }
  [[nodiscard]] double combine_bytes(layout_batch const& b) const {
    return static_cast<double>((b.kept + tokens) * hidden) * sizeof(bf16);
  }
  /// The copy whose reads plus writes are `bytes`: half of them, in whole 16-byte units.
  static std::size_t copy_bytes_of(double bytes) {
    return static_cast<std::size_t>(bytes / 2) / 16 * 16;
  }

  void copy(double bytes) const {
    MOE_CUDA_TRY(cudaMemcpyAsync(copy_to->as<std::byte>(), copy_from->as<std::byte>(),
                                 copy_bytes_of(bytes), cudaMemcpyDeviceToDevice, stream));
  }
};

/// The world of the configuration being measured; main releases it before exiting.
std::unique_ptr<world>& current_world() {
  static std::unique_ptr<world> current;
  return current;
}

/// The configuration's world, built on first use; one at a time, so that the largest
/// configurations do not hold their buffers together.
world& world_for(config const& c) {
  std::unique_ptr<world>& current = current_world();
  if (!current || !(current->c == c)) {
    current.reset();
    current = std::make_unique<world>(c);
  }
  return *current;
}

/// `work()` timed per iteration, with the copy of the same traffic timed before it in the
/// same iteration; both start from a flushed L2.
template <class Work>
void against_copy(benchmark::State& state, world& w, double bytes, Work work) {
  auto const [copy_seconds, measured_seconds] = moe::bench::timed_loop_against(
      state, w.stream, [&] { w.copy(bytes); }, work);
  moe::bench::set_bytes_and_flops(state, bytes, 0);
  using counter = benchmark::Counter;
  state.counters["copy_us"] = counter(copy_seconds * 1e6, counter::kAvgIterations);
  state.counters["fraction_of_copy"] =
      counter(measured_seconds > 0 ? copy_seconds / measured_seconds : 0);
}

void capacity_dispatch(benchmark::State& state, config const& c) {
  world& w = world_for(c);
  layout_batch& b = *w.capacity_batch;
  moe::cuda_backend const cuda{w.stream};
  against_copy(state, w, w.dispatch_bytes(b), [&] {
    moe::layout::encode(
        cuda, moe::layout::capacity{}, w.r, b.begin_span(w.experts), b.rows_span(w.experts),
        moe::make_view(w.x.as<bf16 const>(), w.tokens, w.hidden),
        moe::make_view(b.dispatched.as<bf16>(), w.experts, w.capacity, w.hidden), b.scratch.view());
  });
}

void capacity_combine(benchmark::State& state, config const& c) {
  world& w = world_for(c);
  layout_batch& b = *w.capacity_batch;
  moe::cuda_backend const cuda{w.stream};
  against_copy(state, w, w.combine_bytes(b), [&] {
    moe::layout::decode(
        cuda, moe::layout::capacity{}, w.r, b.begin_span(w.experts), b.rows_span(w.experts),
        moe::make_view(b.expert_out.as<bf16 const>(), w.experts, w.capacity, w.hidden),
        moe::make_view(w.y.as<bf16>(), w.tokens, w.hidden));
  });
}

void ragged_dispatch(benchmark::State& state, config const& c) {
  world& w = world_for(c);
  layout_batch& b = *w.ragged_batch;
  moe::cuda_backend const cuda{w.stream};
  against_copy(state, w, w.dispatch_bytes(b), [&] {
    moe::layout::encode(
        cuda, moe::layout::ragged{}, w.r, b.begin_span(w.experts), b.rows_span(w.experts),
        moe::make_view(w.x.as<bf16 const>(), w.tokens, w.hidden),
        moe::make_view(b.dispatched.as<bf16>(), b.rows, w.hidden), b.scratch.view());
  });
}

void ragged_combine(benchmark::State& state, config const& c) {
  world& w = world_for(c);
  layout_batch& b = *w.ragged_batch;
  moe::cuda_backend const cuda{w.stream};
  against_copy(state, w, w.combine_bytes(b), [&] {
    moe::layout::decode(cuda, moe::layout::ragged{}, w.r, b.begin_span(w.experts),
                        b.rows_span(w.experts),
                        moe::make_view(b.expert_out.as<bf16 const>(), b.rows, w.hidden),
                        moe::make_view(w.y.as<bf16>(), w.tokens, w.hidden));
  });
}

}  // namespace

int main(int argc, char** argv) {
  return moe::bench::cuda_benchmark_main(argc, argv, "layout_bench", [] {
    // One configuration's four families together, so that they share its world.
    for (config const& c : configs()) {
      std::vector<config> const one{c};
      moe::bench::register_grid("capacity_dispatch", one, capacity_dispatch);
      moe::bench::register_grid("capacity_combine", one, capacity_combine);
      moe::bench::register_grid("ragged_dispatch", one, ragged_dispatch);
      moe::bench::register_grid("ragged_combine", one, ragged_combine);
    }
    benchmark::RunSpecifiedBenchmarks();
    current_world().reset();
  });
}
