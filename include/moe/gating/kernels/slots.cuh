// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA path of slot assignment (gating/priority.hpp): every assignment (token t, choice j)
// gets its position among its expert's assignments in priority order, the experts' loads,
// and — on the device, so that nothing waits for the host — the capacity and the number of
// dropped assignments. Integer results equal the host's exactly.
//
// Method, deterministic and free of atomics:
//   1. enumerate the T·k assignments in priority order: key = expert, value = position p;
//   2. stable radix sort by key (CUB, only the bits an expert index needs): each expert's
//      assignments become one segment, in priority order;
//   3. per expert, the segment's start by binary search of the sorted keys; load = length;
//      the largest load gives the capacity (resolve_capacity), and Σ max(load − C, 0) the
//      drops;
//   4. slot of sorted item i = i − start[expert], scattered back to r.slot(t, j).

#include <moe/core/backend.hpp>
#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/core/launch.cuh>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/device_routing.hpp>
#include <moe/gating/kernels/reduce.cuh>
#include <moe/gating/priority.hpp>
#include <moe/gating/top_k.hpp>

#include <cub/device/device_radix_sort.cuh>
#include <cub/util_type.cuh>
#include <cuda/std/limits>

#include <bit>
#include <climits>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>

namespace moe::gating {

/// One assignment: token t's j-th choice.
struct assignment_index {
  index_t token;
  int choice;
};

/// The device side of priority P: `at(p, tokens, k)` is the assignment at position p of P's
/// order, for 0 ≤ p < tokens·k. A priority gains a CUDA path by specialising it. (Priorities
/// whose order depends on the data, such as by_score, would sort by their key first; none
/// has a CUDA path yet.)
template <class P>
struct device_priority;

/// A priority with a CUDA path.
template <class P>
concept device_priority_order = priority<P> && requires(index_t p, index_t tokens, int k) {
  { device_priority<P>::at(p, tokens, k) } -> std::same_as<assignment_index>;
};

/// Choice-major: position p = j·T + t.
template <>
struct device_priority<choice_major> {
  MOE_HOST_DEVICE static constexpr assignment_index at(index_t p, index_t tokens, int) noexcept {
    return {p % tokens, static_cast<int>(p / tokens)};
  }
};
static_assert(device_priority_order<choice_major>);

/// Token-major: position p = t·k + j.
template <>
struct device_priority<token_major> {
  MOE_HOST_DEVICE static constexpr assignment_index at(index_t p, index_t, int k) noexcept {
    return {p / k, static_cast<int>(p % k)};
  }
};
static_assert(device_priority_order<token_major>);

namespace detail {

/// Writes the sort's input: key = the expert of the assignment at position p, value = p.
template <class P>
struct enumerate_assignments {
  static constexpr int threads = 256;
  struct params {
    std::int32_t const* expert;  // (tokens, k) device memory
    index_t tokens;
    int k;
    std::uint32_t* keys;   // (tokens·k)
    std::int32_t* values;  // (tokens·k)
  };
  static dim3 grid(params const& p) {
    return dim3(static_cast<unsigned>(ceil_div(p.tokens * p.k, threads)));
  }
  static dim3 block(params const&) { return dim3(threads); }
  static std::size_t smem_bytes(params const&) { return 0; }

  __device__ void operator()(params const& p, char*) const {
    index_t const position = static_cast<index_t>(blockIdx.x) * threads + threadIdx.x;
    if (position >= p.tokens * p.k) return;
    assignment_index const a = device_priority<P>::at(position, p.tokens, p.k);
    // An id outside [0, E) (never from the router) becomes a key ≥ E: it joins no segment.
    p.keys[position] = static_cast<std::uint32_t>(p.expert[a.token * p.k + a.choice]);
    p.values[position] = static_cast<std::int32_t>(position);
  }
};

/// One block: every expert's segment start and load, the largest load, the capacity it
/// gives, and the drops. Integer reductions over a fixed partition: exact and deterministic.
struct expert_segments {
  static constexpr int threads = 1024;
  struct params {
    std::uint32_t const* sorted_keys;  // (count) ascending
    index_t count;                     // tokens·k
    index_t experts;
    capacity_args capacity;
    std::int64_t* segment_start;      // (experts) scratch
    std::int64_t* load;               // (experts) r.load
    device_routing_scalars* scalars;  // capacity, max_load, dropped
  };
  struct shared_storage {
    std::int64_t reduce[warp_size];
  };
  static dim3 grid(params const&) { return dim3(1); }
  static dim3 block(params const&) { return dim3(threads); }
  static std::size_t smem_bytes(params const&) { return sizeof(shared_storage); }

  __device__ void operator()(params const& p, char* smem) const {
    auto& shared = *reinterpret_cast<shared_storage*>(smem);
    std::int64_t largest = 0;
    for (index_t e = threadIdx.x; e < p.experts; e += threads) {
      index_t const start = lower_bound(p.sorted_keys, p.count, static_cast<std::uint32_t>(e));
      index_t const end = lower_bound(p.sorted_keys, p.count, static_cast<std::uint32_t>(e + 1));
      p.segment_start[e] = start;
      p.load[e] = end - start;
      largest = end - start > largest ? end - start : largest;
    }
    std::int64_t const max_load =
        block_all_reduce(largest, maximum{}, std::int64_t{0}, shared.reduce);
    std::int64_t const capacity = resolve_capacity(p.capacity, max_load);

    // Each thread rereads the loads it wrote itself.
    std::int64_t excess = 0;
    for (index_t e = threadIdx.x; e < p.experts; e += threads)
      excess += p.load[e] > capacity ? p.load[e] - capacity : 0;
    std::int64_t const dropped = block_all_reduce(excess, plus{}, std::int64_t{0}, shared.reduce);

    if (threadIdx.x == 0) {
      p.scalars->capacity = capacity;
      p.scalars->max_load = max_load;
      p.scalars->dropped = dropped;
    }
  }
};

/// Gives sorted item i the slot i − start[expert] and writes it to r.slot(t, j).
template <class P>
struct scatter_slots {
  static constexpr int threads = 256;
  struct params {
    std::uint32_t const* sorted_keys;   // (count)
    std::int32_t const* sorted_values;  // (count) positions in priority order
    std::int64_t const* segment_start;  // (experts)
    index_t tokens;
    int k;
    index_t experts;
    std::int64_t* slot;  // (tokens, k) r.slot
  };
  static dim3 grid(params const& p) {
    return dim3(static_cast<unsigned>(ceil_div(p.tokens * p.k, threads)));
  }
  static dim3 block(params const&) { return dim3(threads); }
  static std::size_t smem_bytes(params const&) { return 0; }

  __device__ void operator()(params const& p, char*) const {
    index_t const i = static_cast<index_t>(blockIdx.x) * threads + threadIdx.x;
    if (i >= p.tokens * p.k) return;
    std::uint32_t const e = p.sorted_keys[i];
    assignment_index const a = device_priority<P>::at(p.sorted_values[i], p.tokens, p.k);
    // A key outside [0, E) has no segment: never kept, and no read out of bounds.
    p.slot[a.token * p.k + a.choice] =
        e < p.experts ? i - p.segment_start[e] : cuda::std::numeric_limits<std::int64_t>::max();
  }
};

/// The scratch of slot assignment, laid out by `carve_slots_scratch`.
struct slots_scratch {
  std::uint32_t* keys[2];
  std::int32_t* values[2];
  std::int64_t* segment_start;
  void* sort_storage;
  std::size_t sort_storage_bytes;
};

/// The key bits the sort looks at: enough for expert ids 0 … E − 1 (at least one).
inline int sort_end_bit(index_t experts) noexcept {
  int const bits = static_cast<int>(std::bit_width(static_cast<std::uint64_t>(experts - 1)));
  return bits > 0 ? bits : 1;
}

/// CUB's scratch for sorting `count` pairs. CUB asks the current device for its
/// architecture, so this needs a CUDA device; it throws cuda_error otherwise.
inline std::size_t sort_storage_bytes(index_t count, index_t experts) {
  cub::DoubleBuffer<std::uint32_t> keys(nullptr, nullptr);
  cub::DoubleBuffer<std::int32_t> values(nullptr, nullptr);
  std::size_t bytes = 0;
  MOE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys, values,
                                               static_cast<int>(count), 0, sort_end_bit(experts)));
  return bytes;
}

/// Lays out the scratch of slot assignment for `tokens` tokens; a counting carver (no
/// buffer) gives its size. The same code sizes and runs.
inline slots_scratch carve_slots_scratch(workspace_carver& carver, index_t tokens, int k,
                                         index_t experts) {
  index_t const count = tokens * k;
  slots_scratch s{};
  for (auto& keys : s.keys) keys = carver.take<std::uint32_t>(count);
  for (auto& values : s.values) values = carver.take<std::int32_t>(count);
  s.segment_start = carver.take<std::int64_t>(experts);
  s.sort_storage_bytes = sort_storage_bytes(count, experts);
  s.sort_storage = carver.take<std::byte>(static_cast<index_t>(s.sort_storage_bytes));
  return s;
}

/// What slot assignment needs of its sizes: positions and expert ids fit the sort's 32-bit
/// keys and values.
inline status check_slot_sizes(index_t tokens, int k, index_t experts) {
  if (experts < 1 || experts > INT32_MAX)
    return status::failure("experts", "must be in [1, 2^31 - 1], got " + std::to_string(experts));
  if (k < 1 || k > max_k)
    return status::failure("k", "must be in [1, 32], got " + std::to_string(k));
  if (tokens < 0 || tokens > INT32_MAX / k)
    return status::failure("tokens", std::to_string(tokens) + " tokens × k = " + std::to_string(k) +
                                         " assignments exceed the 2^31 - 1 that slot "
                                         "assignment sorts");
  return {};
}

/// Slot assignment without argument checks: the caller checked `r`, `cap` and `scratch`.
template <device_priority_order P>
void assign_slots_unchecked(cuda_backend cuda, capacity_args const& cap, device_routing& r,
                            workspace scratch) {
  index_t const tokens = cap.tokens, count = tokens * cap.k;
  workspace_carver carver(scratch);
  slots_scratch const s = carve_slots_scratch(carver, tokens, cap.k, cap.experts);

  launch<enumerate_assignments<P>>({r.expert.data_handle(), tokens, cap.k, s.keys[0], s.values[0]},
                                   cuda.stream);
  cub::DoubleBuffer<std::uint32_t> keys(s.keys[0], s.keys[1]);
  cub::DoubleBuffer<std::int32_t> values(s.values[0], s.values[1]);
  if (count > 0) {
    // Radix sort is stable: each expert's assignments stay in priority order. The buffers
    // that hold the result are chosen on the host, without waiting for the device.
    std::size_t bytes = s.sort_storage_bytes;
    MOE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(s.sort_storage, bytes, keys, values,
                                                 static_cast<int>(count), 0,
                                                 sort_end_bit(cap.experts), cuda.stream));
  }
  launch<expert_segments>(
      {keys.Current(), count, cap.experts, cap, s.segment_start, r.load.data_handle(), r.scalars},
      cuda.stream);
  launch<scatter_slots<P>>({keys.Current(), values.Current(), s.segment_start, tokens, cap.k,
                            cap.experts, r.slot.data_handle()},
                           cuda.stream);
}

}  // namespace detail

/// Scratch bytes of `assign_slots` for up to `max_tokens` tokens. Needs a CUDA device (CUB
/// sizes its sort for the device's architecture); throws cuda_error without one.
inline std::size_t slots_workspace_bytes(index_t max_tokens, int k, index_t experts) {
  detail::check_slot_sizes(max_tokens, k, experts).throw_if_failed();
  workspace_carver counter;
  (void)detail::carve_slots_scratch(counter, max_tokens, k, experts);
  return counter.bytes();
}

/// Slot assignment on the CUDA backend, the device twin of the host `assign_slots`
/// (priority.hpp) followed by `resolve_capacity`. Stream-ordered on `cuda.stream`; nothing
/// synchronises, and the capacity stays on the device.
/// @param cap         T, E, k and the capacity factor and alignment of the call
/// @param[inout] r    device memory. In: r.expert (T, k), ids in [0, E). Out: r.slot (T, k),
///                    r.load (E), r.scalars->capacity, ->max_load and ->dropped.
/// @param scratch     device memory, at least slots_workspace_bytes(T, k, E)
/// @throws invalid_argument when an extent, a size or the scratch does not fit; nothing
///         was written then
template <priority P>
void assign_slots(cuda_backend cuda, P, capacity_args const& cap, device_routing& r,
                  workspace scratch) {
  static_assert(device_priority_order<P>,
                "moe::gating::assign_slots: this priority has no CUDA path; specialise "
                "moe::gating::device_priority<P> with at(p, tokens, k).");
  detail::check_slot_sizes(cap.tokens, cap.k, cap.experts).throw_if_failed();
  check_extents(r.expert, "r.expert", {cap.tokens, cap.k}).throw_if_failed();
  check_extents(r.slot, "r.slot", {cap.tokens, cap.k}).throw_if_failed();
  check_extents(r.load, "r.load", {cap.experts}).throw_if_failed();
  MOE_EXPECTS(r.scalars != nullptr, "r.scalars", "null: the call's scalars need device memory");
  std::size_t const needed = slots_workspace_bytes(cap.tokens, cap.k, cap.experts);
  MOE_EXPECTS(scratch.size() >= needed && (needed == 0 || scratch.data() != nullptr), "scratch",
              "holds " + std::to_string(scratch.size()) + " bytes; slot assignment needs " +
                  std::to_string(needed));
  detail::assign_slots_unchecked<P>(cuda, cap, r, scratch);
}

}  // namespace moe::gating
