// SPDX-License-Identifier: Apache-2.0
// Blocks of the emulated device: each CUDA thread is a Boost.Context fiber that runs until
// it reaches a barrier, a warp collective or its end. The scheduler resumes runnable
// threads in the schedule's order (in order, reversed, or shuffled each round), releases a
// barrier when its last thread arrives, and resolves a warp collective when every lane of
// its mask has arrived. Divergence (threads at different barriers, a mask naming an exited
// lane or a lane that called another collective) and deadlock are device faults.

#include "state.hpp"

#include <boost/context/fiber.hpp>
#include <boost/context/stack_context.hpp>

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace moe::emulation {
namespace {

namespace context = boost::context;

// --- fiber stacks, reused across blocks ------------------------------------------------------

/// Fixed stacks with a guard page below each, kept per OS thread.
class stack_pool {
 public:
  static constexpr std::size_t stack_bytes = 256 * 1024;
  static constexpr std::size_t guard_bytes = 4096;

  stack_pool() = default;
  stack_pool(stack_pool const&) = delete;
  stack_pool& operator=(stack_pool const&) = delete;
  ~stack_pool() {
    for (void* region : all_) munmap(region, stack_bytes + guard_bytes);
  }

  context::stack_context allocate() {
    void* region = nullptr;
    if (!free_.empty()) {
      region = free_.back();
      free_.pop_back();
    } else {
      region = mmap(nullptr, stack_bytes + guard_bytes, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (region == MAP_FAILED) throw std::bad_alloc();
      mprotect(region, guard_bytes, PROT_NONE);
      all_.push_back(region);
    }
    context::stack_context stack;
    stack.size = stack_bytes;
    stack.sp = static_cast<char*>(region) + guard_bytes + stack_bytes;
    return stack;
  }
  void deallocate(context::stack_context& stack) noexcept {
    free_.push_back(static_cast<char*>(stack.sp) - stack_bytes - guard_bytes);
  }

 private:
  std::vector<void*> free_;
  std::vector<void*> all_;
};

struct pooled_stack {
  stack_pool* pool;
  context::stack_context allocate() { return pool->allocate(); }
  void deallocate(context::stack_context& stack) noexcept { pool->deallocate(stack); }
};

thread_local stack_pool stacks;

// --- one block ---------------------------------------------------------------------------------

enum class lane_status : std::uint8_t { runnable, at_barrier, at_warp, exited };

struct lane {
  device_thread indices;
  lane_status status = lane_status::runnable;
  context::fiber fiber;      // this thread, while suspended
  context::fiber scheduler;  // the scheduler, while this thread runs
  warp_op op = warp_op::sync;
  unsigned mask = 0;
  std::uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
  std::source_location where;
};

/// Thrown inside a faulting thread's fiber to end it; never leaves the fiber.
struct lane_abort {};

struct block_run {
  std::vector<lane> lanes;
  unsigned arrived = 0;  // threads waiting at the block barrier
  unsigned exited = 0;
  std::source_location barrier_at;
  std::string fault;  // the first fault, empty if none
};

thread_local block_run* current_block = nullptr;
thread_local lane* current_lane = nullptr;

std::string describe(std::source_location const& where) {
  return std::string(where.file_name()) + ":" + std::to_string(where.line());
}

std::string describe_thread(device_thread const& t) {
  char text[160];
  std::snprintf(text, sizeof text, "block (%u, %u, %u) thread (%u, %u, %u)", t.block_idx.x,
                t.block_idx.y, t.block_idx.z, t.thread_idx.x, t.thread_idx.y, t.thread_idx.z);
  return text;
}

bool same_place(std::source_location const& a, std::source_location const& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         (a.file_name() == b.file_name() || std::string_view(a.file_name()) == b.file_name());
}

void suspend(lane& self) {
  self.scheduler = std::move(self.scheduler).resume();
  current_thread = &self.indices;
  current_lane = &self;
}

[[noreturn]] void fault(std::string what) {
  block_run& block = *current_block;
  if (block.fault.empty())
    block.fault = describe_thread(current_lane->indices) + ": " + std::move(what);
  throw lane_abort{};
}

void on_exit(block_run& block, lane& self) {
  if (block.arrived > 0)
    fault("exited while other threads of the block wait at __syncthreads (" +
          describe(block.barrier_at) + ")");
  unsigned const warp_begin = self.indices.linear & ~31u;
  for (unsigned l = warp_begin; l < std::min<std::size_t>(warp_begin + 32, block.lanes.size());
       ++l) {
    lane const& other = block.lanes[l];
    if (other.status == lane_status::at_warp && (other.mask >> (self.indices.linear & 31u) & 1u))
      fault("exited while lane " + std::to_string(l & 31u) +
            " waits for it in a warp collective at " + describe(other.where));
  }
  ++block.exited;
  self.status = lane_status::exited;
}

std::uint64_t lane_result(block_run& block, unsigned warp_begin, lane const& self,
                          unsigned lane_id) {
  unsigned const mask = self.mask;
  auto const value_of = [&](unsigned source) -> std::uint64_t {
    if (!(mask >> source & 1u))
      fault("a shuffle reads lane " + std::to_string(source) + ", which is not in its mask 0x" +
            [&] {
              char hex[16];
              std::snprintf(hex, sizeof hex, "%08x", mask);
              return std::string(hex);
            }());
    return block.lanes[warp_begin + source].value;
  };
  unsigned const width = static_cast<unsigned>(self.width);
  unsigned const segment = lane_id & ~(width - 1u);
  switch (self.op) {
    case warp_op::sync:
      return 0;
    case warp_op::shfl:
      return value_of(segment + (static_cast<unsigned>(self.arg) & (width - 1u)));
    case warp_op::shfl_up: {
      unsigned const source = lane_id - static_cast<unsigned>(self.arg);
      return (lane_id - segment) < static_cast<unsigned>(self.arg) ? self.value : value_of(source);
    }
    case warp_op::shfl_down: {
      unsigned const source = lane_id + static_cast<unsigned>(self.arg);
      return source >= segment + width ? self.value : value_of(source);
    }
    case warp_op::shfl_xor: {
      unsigned const source = lane_id ^ static_cast<unsigned>(self.arg);
      return (source & ~(width - 1u)) != segment ? self.value : value_of(source);
    }
    case warp_op::ballot:
    case warp_op::any:
    case warp_op::all: {
      unsigned ballot = 0;
      for (unsigned l = 0; l < 32; ++l)
        if ((mask >> l & 1u) && block.lanes[warp_begin + l].value != 0) ballot |= 1u << l;
      if (self.op == warp_op::ballot) return ballot;
      if (self.op == warp_op::any) return ballot != 0;
      return ballot == mask;
    }
    case warp_op::match_any:
    case warp_op::match_all: {
      unsigned same = 0;
      for (unsigned l = 0; l < 32; ++l)
        if ((mask >> l & 1u) && block.lanes[warp_begin + l].value == self.value) same |= 1u << l;
      if (self.op == warp_op::match_any) return same;
      return same == mask ? mask : 0u;
    }
  }
  return 0;
}

}  // namespace

// --- what device code calls ---------------------------------------------------------------

void device_fault(char const* what, std::source_location where) {
  fault(std::string(what) + " at " + describe(where));
}

void block_barrier(std::source_location where) {
  block_run& block = *current_block;
  lane& self = *current_lane;
  if (block.exited > 0)
    fault("reached __syncthreads at " + describe(where) + " after " + std::to_string(block.exited) +
          " thread(s) of the block exited");
  if (block.arrived == 0)
    block.barrier_at = where;
  else if (!same_place(block.barrier_at, where))
    fault("waits at __syncthreads at " + describe(where) + " while others wait at " +
          describe(block.barrier_at));
  self.status = lane_status::at_barrier;
  if (++block.arrived < block.lanes.size()) {
    suspend(self);
    return;
  }
  block.arrived = 0;
  for (lane& other : block.lanes) other.status = lane_status::runnable;
}

std::uint64_t warp_collective(warp_op op, unsigned mask, std::uint64_t value, int arg, int width,
                              std::source_location where) {
  block_run& block = *current_block;
  lane& self = *current_lane;
  unsigned const lane_id = self.indices.linear & 31u;
  unsigned const warp_begin = self.indices.linear - lane_id;
  if (!(mask >> lane_id & 1u))
    fault("calls a warp collective at " + describe(where) + " with a mask that leaves it out");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fault("shuffle width " + std::to_string(width) + " at " + describe(where) +
          " is not a power of two in [1, 32]");
  self.op = op;
  self.mask = mask;
  self.value = value;
  self.arg = arg;
  self.width = width;
  self.where = where;
  self.status = lane_status::at_warp;

  bool all_arrived = true;
  for (unsigned l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (warp_begin + l >= block.lanes.size())
      fault("the mask at " + describe(where) + " names lane " + std::to_string(l) +
            ", which the block does not have");
    lane const& other = block.lanes[warp_begin + l];
    if (other.status == lane_status::exited)
      fault("the mask at " + describe(where) + " names lane " + std::to_string(l) +
            ", which has exited");
    if (other.status != lane_status::at_warp) {
      all_arrived = false;
      continue;
    }
    if (other.op != op || other.mask != mask || !same_place(other.where, where))
      fault("a warp collective at " + describe(where) + " meets lane " + std::to_string(l) +
            " at a different one (" + describe(other.where) + ") or with another mask");
  }
  if (!all_arrived) {
    suspend(self);
    return self.result;
  }
  for (unsigned l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    lane& other = block.lanes[warp_begin + l];
    other.result = lane_result(block, warp_begin, other, l);
  }
  for (unsigned l = 0; l < 32; ++l)
    if (mask >> l & 1u) block.lanes[warp_begin + l].status = lane_status::runnable;
  return self.result;
}

unsigned active_mask() {
  block_run const& block = *current_block;
  unsigned const warp_begin = current_lane->indices.linear & ~31u;
  unsigned mask = 0;
  for (unsigned l = 0; l < 32 && warp_begin + l < block.lanes.size(); ++l)
    if (block.lanes[warp_begin + l].status != lane_status::exited) mask |= 1u << l;
  return mask;
}

// --- the grid ---------------------------------------------------------------------------------

namespace {

/// Shared memory of the running block, with an inaccessible page right after its end, so
/// that a read past the dynamic shared memory faults.
class shared_memory {
 public:
  static constexpr std::size_t capacity = 256 * 1024;
  shared_memory() {
    void* region =
        mmap(nullptr, capacity + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) throw std::bad_alloc();
    base_ = static_cast<char*>(region);
    mprotect(base_ + capacity, 4096, PROT_NONE);
  }
  shared_memory(shared_memory const&) = delete;
  shared_memory& operator=(shared_memory const&) = delete;
  ~shared_memory() { munmap(base_, capacity + 4096); }
  char* fresh(std::size_t bytes, std::uint64_t salt) {
    std::size_t const rounded = (bytes + 15) / 16 * 16;
    char* start = base_ + capacity - rounded;
    fill_garbage(start, rounded, salt);
    return start;
  }

 private:
  char* base_ = nullptr;
};

thread_local shared_memory block_shared_memory;

/// SplitMix64: cheap to seed once per launch, unlike the standard engines.
struct random_bits {
  using result_type = std::uint64_t;
  std::uint64_t state;
  static constexpr result_type min() { return 0; }
  static constexpr result_type max() { return ~result_type{0}; }
  result_type operator()() {
    std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
};

/// The order in which `count` blocks, or the threads of a block, are resumed: a fresh
/// permutation each call when shuffled.
void resume_order(std::vector<unsigned>& order, std::size_t count, random_bits& random) {
  bool const fresh = order.size() != count;
  if (fresh) {
    order.resize(count);
    std::iota(order.begin(), order.end(), 0u);
  }
  switch (current_schedule().blocks) {
    case block_order::in_order:
      break;
    case block_order::reversed:
      if (fresh) std::reverse(order.begin(), order.end());
      break;
    case block_order::shuffled:
      std::shuffle(order.begin(), order.end(), random);
      break;
  }
}

/// Runs one block to its end; returns the fault, empty when none.
std::string run_block(dim3 grid, dim3 block_dim, uint3 block_idx, char* shared,
                      std::function<void()> const& thread_body, random_bits& random) {
  block_run block;
  std::size_t const threads = std::size_t{block_dim.x} * block_dim.y * block_dim.z;
  block.lanes.resize(threads);
  for (unsigned i = 0; i < threads; ++i) {
    lane& l = block.lanes[i];
    l.indices.thread_idx = {i % block_dim.x, i / block_dim.x % block_dim.y,
                            i / (block_dim.x * block_dim.y)};
    l.indices.block_idx = block_idx;
    l.indices.block_dim = block_dim;
    l.indices.grid_dim = grid;
    l.indices.dynamic_shared_memory = shared;
    l.indices.linear = i;
    l.fiber = context::fiber(std::allocator_arg, pooled_stack{&stacks},
                             [&block, &l, &thread_body](context::fiber&& scheduler) {
                               l.scheduler = std::move(scheduler);
                               try {
                                 thread_body();
                                 on_exit(block, l);
                               } catch (lane_abort const&) {
                                 l.status = lane_status::exited;
                               }
                               return std::move(l.scheduler);
                             });
  }

  block_run* const outer_block = current_block;
  lane* const outer_lane = current_lane;
  current_block = &block;
  std::size_t live = threads;
  thread_local std::vector<unsigned> order;
  order.clear();
  while (live > 0 && block.fault.empty()) {
    bool resumed = false;
    resume_order(order, threads, random);
    for (unsigned i : order) {
      lane& l = block.lanes[i];
      if (l.status != lane_status::runnable) continue;
      current_lane = &l;
      current_thread = &l.indices;
      l.fiber = std::move(l.fiber).resume();
      resumed = true;
      if (l.status == lane_status::exited) --live;
      if (!block.fault.empty()) break;
    }
    if (!resumed && block.fault.empty()) {
      std::string waits;
      for (lane const& l : block.lanes)
        if (l.status == lane_status::at_warp) {
          waits = "thread " + std::to_string(l.indices.linear) + " waits in a warp collective at " +
                  describe(l.where) + " for lanes that wait elsewhere";
          break;
        }
      block.fault = "deadlock: " + (waits.empty() ? std::string("no thread can run") : waits);
    }
  }
  // Threads still suspended (after a fault) are unwound by their fibers' destructors.
  block.lanes.clear();
  current_block = outer_block;
  current_lane = outer_lane;
  current_thread = outer_lane != nullptr ? &outer_lane->indices : nullptr;
  return block.fault;
}

}  // namespace

void run_grid(char const* name, dim3 grid, dim3 block, std::size_t shared_bytes,
              std::function<void()> const& thread_body) {
  static std::uint64_t launches = 0;
  std::uint64_t const launch = ++launches;
  random_bits random{current_schedule().seed * 0x9e3779b97f4a7c15ull + launch};
  std::size_t const blocks = std::size_t{grid.x} * grid.y * grid.z;
  std::vector<unsigned> block_order;
  resume_order(block_order, blocks, random);
  for (unsigned b : block_order) {
    uint3 const index{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                      static_cast<unsigned>(b / (std::size_t{grid.x} * grid.y))};
    char* shared = block_shared_memory.fresh(shared_bytes, launch * 1315423911u + b);
    std::string const fault = run_block(grid, block, index, shared, thread_body, random);
    if (!fault.empty()) {
      set_sticky_error(cudaErrorLaunchFailure,
                       std::string("device fault in ") + name + ", " + fault);
      return;
    }
  }
}

}  // namespace moe::emulation
