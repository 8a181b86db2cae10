// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA path of slot assignment, the device twin of step 4 of host `route` (router.hpp):
// every assignment (token t, choice j) gets its position among the assignments of its (local
// group, expert) in priority order, the experts' loads, and — on the device, so that nothing
// waits for the host — the capacity, the slots and the number of dropped assignments.
// Integer results equal the host's exactly whenever the float keys of a keyed priority order
// as the host's doubles do.
//
// Method, deterministic and free of atomics; a = t·k + j names an assignment, g = t / S its
// local group (G groups of S tokens):
//   1. keyed priorities (by_score, batch_prioritized, random_order): a stable radix sort of
//      every a, input in token-major order, by a packed key (device_priority<P>::sort_key)
//      gives the priority order, ties by (token, choice). choice_major and token_major know
//      their order (device_priority<P>::at) and skip this sort;
//   2. in priority order, key = g·E + e, value = a; a 2nd choice random routing left out gets
//      G·E, after every segment. A stable radix sort by key makes each (g, e)'s assignments
//      one segment, in priority order;
//   3. per (g, e), the segment's start by binary search of the sorted keys; load_{g,e} = its
//      length, r.load(e) = Σ_g load_{g,e}, max_load = the largest (one block), then the
//      caller's `reduce_max_load` (an all-reduce over ranks, enqueued on the stream);
//   4. C_g and C = G·C_g from max_load (capacity.hpp); per (g, e), the kept and the dropped
//      assignments of expert e in the groups before g: Σ min(load, C_g), Σ max(load − C_g, 0);
//   5. the item at position q of its segment is kept iff q < C_g: slot = kept before + q, else
//      C + dropped before + (q − C_g); scattered to r.slot(t, j). With G = 1 the slot is the
//      position.

#include <moe/core/backend.hpp>
#include <moe/core/checked.hpp>
#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/core/kernels/shapes.cuh>
#include <moe/core/kernels/warp.cuh>
#include <moe/core/launch.cuh>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/device_routing.hpp>
#include <moe/gating/kernels/priority.cuh>
#include <moe/gating/kernels/sort.cuh>
#include <moe/gating/priority.hpp>
#include <moe/gating/random_routing.hpp>
#include <moe/gating/top_k.hpp>

#include <cub/util_type.cuh>
#include <cuda/std/bit>

#include <algorithm>
#include <bit>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>

namespace moe::gating {

/// What slot assignment takes from the call besides the capacity.
struct slot_args {
  std::uint64_t seed = 0;        ///< gate_args::seed (random_order)
  double scaling_factor = 1.0;   ///< gate_args::scaling_factor: by_score orders scaled weights
  bool left_out_marked = false;  ///< r.slot holds no_slot where random routing left a choice out
};

/// The max-load hook of one rank: the local largest load is the call's.
struct local_max_load {
  void operator()(cuda_backend, std::int64_t*) const noexcept {}
};

namespace detail {

/// The first position in the ascending `keys[0, n)` whose key is not below `value`.
MOE_HOST_DEVICE constexpr index_t lower_bound(std::uint32_t const* keys, index_t n,
                                              std::uint32_t value) noexcept {
  index_t low = 0, high = n;
  while (low < high) {
    index_t const middle = low + (high - low) / 2;
    if (keys[middle] < value)
      low = middle + 1;
    else
      high = middle;
  }
  return low;
}

/// Writes the segment sort's input in priority order: key = g·E + e, value = a. A choice
/// random routing left out gets G·E, an id outside [0, E) (never from the router) G·E + 1:
/// both sort after every segment and join none.
template <class P>
struct enumerate_assignments : moe::detail::thread_per_item<enumerate_assignments<P>> {
  struct params {
    std::int32_t const* expert;  // (tokens, k) device memory
    std::int64_t const* slot;    // (tokens, k) no_slot marks a left-out choice; null: none is
    index_t tokens;
    int k;
    index_t experts;
    index_t groups;
    index_t group_tokens;  // S
    std::uint32_t* keys;   // (tokens·k)
    std::int32_t* values;  // (tokens·k) positional: written; keyed: holds the priority order
  };
  static index_t items(params const& p) { return p.tokens * p.k; }

  __device__ void operator()(params const& p, char*) const {
    index_t const position = this->item();
    if (position >= p.tokens * p.k) return;
    index_t a;
    if constexpr (positional_device_priority<P>) {
      assignment_index const i = device_priority<P>::at(position, p.tokens, p.k);
      a = i.token * p.k + i.choice;
      p.values[position] = static_cast<std::int32_t>(a);
    } else {
      a = p.values[position];
    }
    index_t const segments = p.groups * p.experts;
    std::int32_t const e = p.expert[a];
    index_t key;
    if (p.slot != nullptr && p.slot[a] == no_slot)
      key = segments;
    else if (e < 0 || e >= p.experts)
      key = segments + 1;
    else
      key = a / p.k / p.group_tokens * p.experts + e;
    p.keys[position] = static_cast<std::uint32_t>(key);
  }
};

/// One block: every (group, expert) segment's start, the experts' loads, the largest
/// (group, expert) load and the left-out count. Integer reductions over a fixed partition:
/// exact and deterministic.
struct expert_segments : moe::detail::single_block<expert_segments> {
  struct params {
    std::uint32_t const* sorted_keys;  // (count) ascending
    index_t count;                     // tokens·k
    index_t experts;
    index_t groups;
    std::int64_t* segment_start;      // (groups·experts + 1) scratch; the last: the left-out's
    std::int64_t* load;               // (experts) r.load
    device_routing_scalars* scalars;  // out: max_load (this rank's), unrouted
  };
  struct shared_storage {
    std::int64_t reduce[moe::detail::warp_size];
  };

  __device__ void operator()(params const& p, char* smem) const {
    auto& shared = *reinterpret_cast<shared_storage*>(smem);
    index_t const segments = p.groups * p.experts;
    for (index_t i = threadIdx.x; i <= segments; i += threads)
      p.segment_start[i] = lower_bound(p.sorted_keys, p.count, static_cast<std::uint32_t>(i));
    __syncthreads();  // makes the block's global writes visible to the whole block

    std::int64_t largest = 0;
    for (index_t e = threadIdx.x; e < p.experts; e += threads) {
      std::int64_t total = 0;
      for (index_t g = 0; g < p.groups; ++g) {
        index_t const i = g * p.experts + e;
        std::int64_t const load = p.segment_start[i + 1] - p.segment_start[i];
        total += load;
        largest = load > largest ? load : largest;
      }
      p.load[e] = total;
    }
    std::int64_t const max_load = moe::detail::block_all_reduce(largest, moe::detail::maximum{},
                                                                std::int64_t{0}, shared.reduce);
    if (threadIdx.x == 0) {
      p.scalars->max_load = max_load;
      p.scalars->unrouted =
          lower_bound(p.sorted_keys, p.count, static_cast<std::uint32_t>(segments + 1)) -
          p.segment_start[segments];
    }
  }
};

/// One block, after the max-load hook: the capacity, the drops, and per (group, expert) the
/// kept and dropped assignments of the groups before.
struct expert_capacity : moe::detail::single_block<expert_capacity> {
  struct params {
    std::int64_t const* segment_start;  // (groups·experts + 1)
    index_t experts;
    capacity_args capacity;
    std::int64_t* kept_before;        // (groups·experts) scratch
    std::int64_t* dropped_before;     // (groups·experts) scratch
    device_routing_scalars* scalars;  // in: max_load (the call's); out: capacity, dropped
  };
  struct shared_storage {
    std::int64_t reduce[moe::detail::warp_size];
  };

  __device__ void operator()(params const& p, char* smem) const {
    auto& shared = *reinterpret_cast<shared_storage*>(smem);
    std::int64_t const max_load = p.scalars->max_load;
    std::int64_t const group_cap = group_capacity(p.capacity, max_load);
    std::int64_t excess = 0;
    for (index_t e = threadIdx.x; e < p.experts; e += threads) {
      std::int64_t kept = 0, over = 0;
      for (index_t g = 0; g < p.capacity.groups; ++g) {
        index_t const i = g * p.experts + e;
        std::int64_t const load = p.segment_start[i + 1] - p.segment_start[i];
        p.kept_before[i] = kept;
        p.dropped_before[i] = over;
        kept += load < group_cap ? load : group_cap;
        over += load > group_cap ? load - group_cap : 0;
      }
      excess += over;
    }
    std::int64_t const dropped =
        moe::detail::block_all_reduce(excess, moe::detail::plus{}, std::int64_t{0}, shared.reduce);
    if (threadIdx.x == 0) {
      p.scalars->capacity = resolve_capacity(p.capacity, max_load);
      p.scalars->dropped = dropped;
    }
  }
};

/// Gives the sorted item at position q of its segment its slot and writes it to r.slot.
struct scatter_slots : moe::detail::thread_per_item<scatter_slots> {
  struct params {
    std::uint32_t const* sorted_keys;    // (count)
    std::int32_t const* sorted_values;   // (count) assignments t·k + j
    std::int64_t const* segment_start;   // (groups·experts + 1)
    std::int64_t const* kept_before;     // (groups·experts)
    std::int64_t const* dropped_before;  // (groups·experts)
    index_t count;
    index_t segments;  // groups·experts
    index_t groups;
    device_routing_scalars const* scalars;  // capacity
    std::int64_t* slot;                     // (tokens, k) r.slot
  };
  static index_t items(params const& p) { return p.count; }

  __device__ void operator()(params const& p, char*) const {
    index_t const i = item();
    if (i >= p.count) return;
    std::uint32_t const key = p.sorted_keys[i];
    std::int64_t slot = no_slot;  // left out, or no expert: never kept
    if (key < p.segments) {
      std::int64_t const capacity = p.scalars->capacity, group_cap = capacity / p.groups;
      std::int64_t const q = i - p.segment_start[key];
      slot = q < group_cap ? p.kept_before[key] + q
                           : capacity + p.dropped_before[key] + (q - group_cap);
    }
    p.slot[p.sorted_values[i]] = slot;
  }
};

/// The scratch of slot assignment, laid out by `carve_slots_scratch`.
struct slots_scratch {
  void* keys[2];                 // (tokens·k) the priority sort's keys, then the segment sort's
  std::int32_t* values[2];       // (tokens·k)
  std::int64_t* segment_start;   // (groups·experts + 1)
  std::int64_t* kept_before;     // (groups·experts)
  std::int64_t* dropped_before;  // (groups·experts)
  workspace sort_storage;        // CUB's, for either sort
};

/// The key bits the segment sort looks at: keys up to G·E + 1, so that the left-out and
/// unknown ids never fold onto a segment.
inline int segment_key_bits(index_t segments) noexcept {
  return static_cast<int>(std::bit_width(static_cast<std::uint64_t>(segments + 1)));
}

/// Bytes of one key of the scratch: the wider of the two sorts'.
template <class P>
constexpr std::size_t sort_key_bytes() noexcept {
  if constexpr (positional_device_priority<P>)
    return sizeof(std::uint32_t);
  else
    return std::max(sizeof(std::uint32_t), sizeof(typename device_priority<P>::key_type));
}

/// Lays out the scratch of slot assignment for `tokens` tokens under priority P; a counting
/// carver (no buffer) gives its size. The same code sizes and runs.
template <class P>
slots_scratch carve_slots_scratch(workspace_carver& carver, index_t tokens, int k, index_t experts,
                                  index_t groups) {
  static_assert(device_priority_order<P>);
  index_t const count = tokens * k, segments = groups * experts;
  slots_scratch s{};
  for (auto& keys : s.keys)
    keys = carver.take<std::byte>(count * static_cast<index_t>(sort_key_bytes<P>()));
  for (auto& values : s.values) values = carver.take<std::int32_t>(count);
  s.segment_start = carver.take<std::int64_t>(segments + 1);
  s.kept_before = carver.take<std::int64_t>(segments);
  s.dropped_before = carver.take<std::int64_t>(segments);
  std::size_t sort_bytes = sort_storage_bound<std::uint32_t>(count, segment_key_bits(segments));
  if constexpr (!positional_device_priority<P>)
    sort_bytes = std::max(sort_bytes, sort_storage_bound<typename device_priority<P>::key_type>(
                                          count, device_priority<P>::key_bits(k)));
  s.sort_storage = {carver.take<std::byte>(static_cast<index_t>(sort_bytes)), sort_bytes};
  return s;
}

/// What slot assignment needs of its sizes: assignments fit the sorts' 32-bit values, and
/// the G·E segments plus the two past them the segment sort's 32-bit keys.
inline status check_slot_sizes(index_t tokens, int k, index_t experts, index_t groups = 1) {
  if (experts < 1 || experts > INT32_MAX)
    return status::failure("experts", "must be in [1, 2^31 - 1], got " + std::to_string(experts));
  if (k < 1 || k > max_k)
    return status::failure("k", "must be in [1, 32], got " + std::to_string(k));
  if (groups < 1)
    return status::failure("groups", "must be at least 1, got " + std::to_string(groups));
  if (groups > (index_t{UINT32_MAX} - 1) / experts)
    return status::failure("groups", std::to_string(groups) + " groups × " +
                                         std::to_string(experts) +
                                         " experts + 1 exceed 2^32 - 1, the largest key of slot "
                                         "assignment's sort");
  if (tokens < 0 || tokens > INT32_MAX / k)
    return status::failure("tokens", std::to_string(tokens) + " tokens × k = " + std::to_string(k) +
                                         " assignments exceed the 2^31 - 1 that slot "
                                         "assignment sorts");
  return {};
}

/// Slot assignment without argument checks: the caller checked `r`, `cap` (T a multiple of
/// G) and `scratch`. `reduce_max_load(cuda, max_load)` is called once, on the host, between
/// the loads and the capacity: it may enqueue work on cuda.stream that rewrites the device
/// int64 at `max_load` (this rank's largest (group, expert) load) with the call's.
template <class P, class ReduceMaxLoad>
void assign_slots_unchecked(cuda_backend cuda, capacity_args const& cap, slot_args const& args,
                            device_routing& r, workspace scratch, ReduceMaxLoad&& reduce_max_load) {
  static_assert(device_priority_order<P>);
  static_assert(std::invocable<ReduceMaxLoad&, cuda_backend, std::int64_t*>);
  index_t const tokens = cap.tokens, count = tokens * cap.k, experts = cap.experts;
  index_t const groups = cap.groups, segments = groups * experts;
  workspace_carver carver(scratch);
  slots_scratch const s = carve_slots_scratch<P>(carver, tokens, cap.k, experts, groups);
  cub::DoubleBuffer<std::int32_t> values(s.values[0], s.values[1]);

  if constexpr (!positional_device_priority<P>) {
    // Token-major input and a stable sort: ties go by (token, choice), as on the host.
    using key_type = typename device_priority<P>::key_type;
    cub::DoubleBuffer<key_type> keys(static_cast<key_type*>(s.keys[0]),
                                     static_cast<key_type*>(s.keys[1]));
    launch<priority_keys<P>>(
        {r.expert.data_handle(), r.weight.data_handle(), r.scores.data_handle(), tokens, cap.k,
         experts, args.scaling_factor, args.seed, keys.Current(), values.Current()},
        cuda.stream);
    sort_pairs(keys, values, count, device_priority<P>::key_bits(cap.k), s.sort_storage,
               cuda.stream);
  }

  cub::DoubleBuffer<std::uint32_t> keys(static_cast<std::uint32_t*>(s.keys[0]),
                                        static_cast<std::uint32_t*>(s.keys[1]));
  launch<enumerate_assignments<P>>(
      {r.expert.data_handle(), args.left_out_marked ? r.slot.data_handle() : nullptr, tokens, cap.k,
       experts, groups, group_tokens(cap), keys.Current(), values.Current()},
      cuda.stream);
  // Radix sort is stable: each (group, expert)'s assignments stay in priority order.
  sort_pairs(keys, values, count, segment_key_bits(segments), s.sort_storage, cuda.stream);

  launch<expert_segments>(
      {keys.Current(), count, experts, groups, s.segment_start, r.load.data_handle(), r.scalars},
      cuda.stream);
  reduce_max_load(cuda, &r.scalars->max_load);
  launch<expert_capacity>(
      {s.segment_start, experts, cap, s.kept_before, s.dropped_before, r.scalars}, cuda.stream);
  launch<scatter_slots>(
      {keys.Current(), values.Current(), s.segment_start, s.kept_before, s.dropped_before, count,
       segments, groups, r.scalars, r.slot.data_handle()},
      cuda.stream);
}

}  // namespace detail

/// Scratch bytes of `assign_slots` under priority P for up to `max_tokens` tokens in
/// `groups` local groups; needs no device (the sorts' scratch is sort_storage_bound).
template <class P>
std::size_t slots_workspace_bytes(index_t max_tokens, int k, index_t experts, index_t groups = 1) {
  static_assert(device_priority_order<P>,
                "moe::gating::slots_workspace_bytes: this priority has no CUDA path; specialise "
                "moe::gating::device_priority<P>.");
  detail::check_slot_sizes(max_tokens, k, experts, groups).throw_if_failed();
  workspace_carver counter;
  (void)detail::carve_slots_scratch<P>(counter, max_tokens, k, experts, groups);
  return counter.bytes();
}

/// Slot assignment on the CUDA backend, the device twin of step 4 of host `route`
/// (router.hpp): priority order and positions per local group, capacity, slots. Stream-
/// ordered on `cuda.stream`; nothing synchronises, and the capacity stays on the device.
/// @param cap         T, E, k, G and the capacity factor, rule and alignment of the call
/// @param[inout] r    device memory. In: r.expert (T, k), ids in [0, E); keyed priorities:
///                    r.weight (T, k) before drops and scaling, r.scores (T, E); with
///                    `args.left_out_marked`: r.slot (T, k), no_slot where a choice is left
///                    out. Out: r.slot (T, k), r.load (E), r.scalars->capacity, ->max_load,
///                    ->dropped and ->unrouted.
/// @param scratch     device memory, at least slots_workspace_bytes<P>(T, k, E, G)
/// @param args        the seed and scaling factor of keyed priorities; whether r.slot marks
///                    left-out choices
/// @throws invalid_argument when an extent, a size or the scratch does not fit; nothing
///         was written then
template <priority P>
void assign_slots(cuda_backend cuda, P, capacity_args const& cap, device_routing& r,
                  workspace scratch, slot_args const& args = {}) {
  static_assert(device_priority_order<P>,
                "moe::gating::assign_slots: this priority has no CUDA path; specialise "
                "moe::gating::device_priority<P> with at(p, tokens, k) or sort_key(facts).");
  detail::check_slot_sizes(cap.tokens, cap.k, cap.experts, cap.groups).throw_if_failed();
  MOE_EXPECTS(cap.tokens % cap.groups == 0, "cap.groups",
              std::to_string(cap.tokens) + " tokens do not split into " +
                  std::to_string(cap.groups) + " local groups");
  check_extents(r.expert, "r.expert", {cap.tokens, cap.k}).throw_if_failed();
  check_extents(r.slot, "r.slot", {cap.tokens, cap.k}).throw_if_failed();
  check_extents(r.load, "r.load", {cap.experts}).throw_if_failed();
  if constexpr (!positional_device_priority<P>) {
    check_extents(r.weight, "r.weight", {cap.tokens, cap.k}).throw_if_failed();
    check_extents(r.scores, "r.scores", {cap.tokens, cap.experts}).throw_if_failed();
  }
  MOE_EXPECTS(r.scalars != nullptr, "r.scalars", "null: the call's scalars need device memory");
  std::size_t const needed = slots_workspace_bytes<P>(cap.tokens, cap.k, cap.experts, cap.groups);
  MOE_EXPECTS(scratch.size() >= needed && (needed == 0 || scratch.data() != nullptr), "scratch",
              "holds " + std::to_string(scratch.size()) + " bytes; slot assignment needs " +
                  std::to_string(needed));
  detail::assign_slots_unchecked<P>(cuda, cap, args, r, scratch, local_max_load{});
}

}  // namespace moe::gating
