// SPDX-License-Identifier: Apache-2.0
#pragma once
// What device code sees under the emulated CUDA runtime: the built-in indices, barriers,
// warp shuffles, votes and match, atomics and the rounding intrinsics, for kernels compiled
// by the host compiler. Each CUDA thread runs as a fiber (block.cpp); a thread leaves the
// processor only at a barrier or a warp collective, which is where CUDA lets other threads'
// writes become visible, so a missing barrier shows as a stale or garbage read under the
// reversed and shuffled schedules.

#include <cuda_runtime.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <type_traits>

namespace moe::emulation {

/// The indices of the CUDA thread now running on this OS thread.
struct device_thread {
  uint3 thread_idx{};
  uint3 block_idx{};
  dim3 block_dim{};
  dim3 grid_dim{};
  char* dynamic_shared_memory = nullptr;
  unsigned linear = 0;  // thread index in its block, x fastest
};

inline thread_local device_thread* current_thread = nullptr;

inline device_thread& this_thread() noexcept {
  return *current_thread;
}

/// Warp collectives, resolved once every lane named in the mask has arrived.
enum class warp_op : std::uint8_t {
  sync,
  shfl,
  shfl_up,
  shfl_down,
  shfl_xor,
  ballot,
  any,
  all,
  match_any,
  match_all
};

/// Waits for every thread of the block; reports divergence (threads at different barriers,
/// or a thread that exited) as a device fault.
void block_barrier(std::source_location where);

/// Runs warp collective `op` for the calling lane and returns its result (8 bytes).
/// `arg` is the source lane, delta or lane mask; `width` the shuffle's segment.
std::uint64_t warp_collective(warp_op op, unsigned mask, std::uint64_t value, int arg, int width,
                              std::source_location where);

/// Lanes of the calling warp that have not exited.
unsigned active_mask();

/// Ends the kernel with a device fault (a sticky error), naming the thread and `what`.
[[noreturn]] void device_fault(char const* what, std::source_location where);

/// What every atomic does: *address = update(old), returning old. One kernel runs at a time
/// and a fiber never yields inside this, so the plain update is atomic.
template <class T, class Update>
T read_modify_write(T* address, Update update) {
  T const old = *address;
  *address = update(old);
  return old;
}

template <class T>
std::uint64_t to_bits(T value) noexcept {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>,
                "moe emulation: warp collectives take values of at most 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <class T>
T from_bits(std::uint64_t bits) noexcept {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

/// A vote (ballot, any, all) of the calling lane's predicate.
inline std::uint64_t vote(warp_op op, unsigned mask, int predicate, std::source_location where) {
  return warp_collective(op, mask, predicate != 0, 0, 32, where);
}

/// A match (any, all) of the calling lane's value: the mask of lanes it agrees with.
template <class T>
unsigned match(warp_op op, unsigned mask, T value, std::source_location where) {
  return static_cast<unsigned>(warp_collective(op, mask, to_bits(value), 0, 32, where));
}

}  // namespace moe::emulation

// --- built-in variables ------------------------------------------------------------------
#define threadIdx (::moe::emulation::current_thread->thread_idx)
#define blockIdx (::moe::emulation::current_thread->block_idx)
#define blockDim (::moe::emulation::current_thread->block_dim)
#define gridDim (::moe::emulation::current_thread->grid_dim)
inline constexpr int warpSize = 32;

// --- barriers ----------------------------------------------------------------------------
inline void __syncthreads(std::source_location where = std::source_location::current()) {
  ::moe::emulation::block_barrier(where);
}
inline void __syncwarp(unsigned mask = 0xffffffffu,
                       std::source_location where = std::source_location::current()) {
  (void)::moe::emulation::warp_collective(::moe::emulation::warp_op::sync, mask, 0, 0, 32, where);
}
inline void __threadfence() {}
inline void __threadfence_block() {}
[[noreturn]] inline void __trap(std::source_location where = std::source_location::current()) {
  ::moe::emulation::device_fault("__trap()", where);
}

// --- shuffles, votes, match --------------------------------------------------------------
#define MOE_EMULATION_SHUFFLE(name, op, Arg)                                 \
  template <class T>                                                         \
  T name(unsigned mask, T var, Arg arg, int width = 32,                      \
         std::source_location where = std::source_location::current()) {     \
    return ::moe::emulation::from_bits<T>(::moe::emulation::warp_collective( \
        ::moe::emulation::warp_op::op, mask, ::moe::emulation::to_bits(var), \
        static_cast<int>(arg), width, where));                               \
  }
MOE_EMULATION_SHUFFLE(__shfl_sync, shfl, int)
MOE_EMULATION_SHUFFLE(__shfl_up_sync, shfl_up, unsigned)
MOE_EMULATION_SHUFFLE(__shfl_down_sync, shfl_down, unsigned)
MOE_EMULATION_SHUFFLE(__shfl_xor_sync, shfl_xor, int)
#undef MOE_EMULATION_SHUFFLE

inline unsigned __ballot_sync(unsigned mask, int predicate,
                              std::source_location where = std::source_location::current()) {
  return static_cast<unsigned>(
      ::moe::emulation::vote(::moe::emulation::warp_op::ballot, mask, predicate, where));
}
inline int __any_sync(unsigned mask, int predicate,
                      std::source_location where = std::source_location::current()) {
  return static_cast<int>(
      ::moe::emulation::vote(::moe::emulation::warp_op::any, mask, predicate, where));
}
inline int __all_sync(unsigned mask, int predicate,
                      std::source_location where = std::source_location::current()) {
  return static_cast<int>(
      ::moe::emulation::vote(::moe::emulation::warp_op::all, mask, predicate, where));
}
template <class T>
unsigned __match_any_sync(unsigned mask, T value,
                          std::source_location where = std::source_location::current()) {
  return ::moe::emulation::match(::moe::emulation::warp_op::match_any, mask, value, where);
}
template <class T>
unsigned __match_all_sync(unsigned mask, T value, int* predicate,
                          std::source_location where = std::source_location::current()) {
  unsigned const result =
      ::moe::emulation::match(::moe::emulation::warp_op::match_all, mask, value, where);
  *predicate = result != 0;
  return result;
}
inline unsigned __activemask() {
  return ::moe::emulation::active_mask();
}

// --- atomics: one kernel runs at a time and a fiber never yields inside one ------------------
template <class T>
T atomicAdd(T* address, T value) {
  return ::moe::emulation::read_modify_write(address, [&](T old) { return T(old + value); });
}
template <class T>
T atomicSub(T* address, T value) {
  return ::moe::emulation::read_modify_write(address, [&](T old) { return T(old - value); });
}
template <class T>
T atomicExch(T* address, T value) {
  return ::moe::emulation::read_modify_write(address, [&](T) { return value; });
}
template <class T>
T atomicMin(T* address, T value) {
  return ::moe::emulation::read_modify_write(address,
                                             [&](T old) { return value < old ? value : old; });
}
template <class T>
T atomicMax(T* address, T value) {
  return ::moe::emulation::read_modify_write(address,
                                             [&](T old) { return old < value ? value : old; });
}
template <class T>
T atomicCAS(T* address, T compare, T value) {
  return ::moe::emulation::read_modify_write(address,
                                             [&](T old) { return old == compare ? value : old; });
}
template <class T>
T atomicAnd(T* address, T value) {
  return ::moe::emulation::read_modify_write(address, [&](T old) { return T(old & value); });
}
template <class T>
T atomicOr(T* address, T value) {
  return ::moe::emulation::read_modify_write(address, [&](T old) { return T(old | value); });
}
template <class T>
T atomicXor(T* address, T value) {
  return ::moe::emulation::read_modify_write(address, [&](T old) { return T(old ^ value); });
}
inline unsigned atomicInc(unsigned* address, unsigned limit) {
  return ::moe::emulation::read_modify_write(
      address, [&](unsigned old) { return old >= limit ? 0u : old + 1u; });
}
inline unsigned atomicDec(unsigned* address, unsigned limit) {
  return ::moe::emulation::read_modify_write(
      address, [&](unsigned old) { return (old == 0u || old > limit) ? limit : old - 1u; });
}

// --- loads and intrinsics ----------------------------------------------------------------
// The intrinsics that the library's kernels, its tests and CCCL's device code call, and no
// more: a kernel that needs another fails to compile under emulation, and adds it here.
template <class T>
T __ldg(T const* address) {
  return *address;
}

// IEEE round-to-nearest operations: the emulated build compiles with -ffp-contract=off, so
// each is one rounding, as on the device.
inline float __fadd_rn(float a, float b) {
  return a + b;
}
inline double __dmul_rn(double a, double b) {
  return a * b;
}
inline double __ddiv_rn(double a, double b) {
  return a / b;
}
inline double __fma_rn(double a, double b, double c) {
  return std::fma(a, b, c);
}
inline double __dsqrt_rn(double a) {
  return std::sqrt(a);
}
inline int __popc(unsigned a) {
  return std::popcount(a);
}
inline int __popcll(unsigned long long a) {
  return std::popcount(a);
}
inline int __clz(int a) {
  return std::countl_zero(static_cast<unsigned>(a));
}
inline int __clzll(long long a) {
  return std::countl_zero(static_cast<unsigned long long>(a));
}
inline int __ffs(int a) {
  return a == 0 ? 0 : std::countr_zero(static_cast<unsigned>(a)) + 1;
}
inline unsigned __brev(unsigned a) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((a >> i) & 1u) << (31 - i);
  return r;
}
