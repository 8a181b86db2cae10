// SPDX-License-Identifier: Apache-2.0
// Device memory of the emulated runtime: one reserved range that is inaccessible except
// while device work runs (device_section), so a host read of a device pointer faults and the
// fault names the address. Allocations are 256-byte aligned, start as garbage, and are
// checked on free and on every copy.

#include "state.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <map>

namespace moe::emulation {
namespace {

constexpr std::size_t reserved_bytes = std::size_t{1} << 36;  // 64 GiB of address space
constexpr std::size_t alignment = 256;
constexpr std::size_t page = 4096;

struct arena {
  char* base = nullptr;
  std::size_t high_water = 0;                    // bytes handed out at least once
  std::size_t accessible = 0;                    // bytes now readable (inside a section)
  std::map<std::size_t, std::size_t> free_runs;  // offset -> bytes
  std::map<std::size_t, std::size_t> live;       // offset -> bytes asked for
  std::map<std::size_t, std::size_t> reserved;   // offset -> bytes taken (256-aligned)
  std::size_t live_bytes = 0;
  int depth = 0;  // nested device sections

  arena() {
    void* region = mmap(nullptr, reserved_bytes, PROT_NONE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (region == MAP_FAILED) {
      std::perror("moe emulation: reserving device memory");
      std::abort();
    }
    base = static_cast<char*>(region);
  }

  void protect(std::size_t bytes, int protection) {
    std::size_t const rounded = (bytes + page - 1) / page * page;
    if (rounded > 0 && mprotect(base, rounded, protection) != 0) {
      std::perror("moe emulation: mprotect");
      std::abort();
    }
  }
};

struct sigaction previous_segv_action {};

void on_segv(int signal, siginfo_t* info, void* context);

arena& memory() {
  // Installed with the first allocation, after a test framework's own handler, which then
  // still reports the crash after this names the address.
  static arena a = [] {
    struct sigaction action {};
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &previous_segv_action);
    return arena{};
  }();
  return a;
}

void on_segv(int signal, siginfo_t* info, void*) {
  arena& a = memory();
  auto const* address = static_cast<char const*>(info->si_addr);
  if (address >= a.base && address < a.base + reserved_bytes) {
    char text[200];
    int const n = std::snprintf(
        text, sizeof text,
        "moe emulation: %s touched device memory at %p (offset %zu), outside device work: "
        "device pointers are for kernels, copies and libraries only\n",
        a.depth > 0 ? "device work" : "host code", info->si_addr,
        static_cast<std::size_t>(address - a.base));
    (void)!write(2, text, static_cast<std::size_t>(n));
  }
  // The fault repeats and reaches the handler that was there before, or ends the process.
  sigaction(signal, &previous_segv_action, nullptr);
}

}  // namespace

device_section::device_section() {
  arena& a = memory();
  if (a.depth++ == 0) {
    a.protect(a.high_water, PROT_READ | PROT_WRITE);
    a.accessible = a.high_water;
  }
}

device_section::~device_section() {
  arena& a = memory();
  if (--a.depth == 0) {
    a.protect(a.accessible, PROT_NONE);
    a.accessible = 0;
  }
}

std::uint64_t garbage_word(std::uint64_t salt) {
  if (current_schedule().blocks == block_order::in_order) return ~std::uint64_t{0};
  std::uint64_t z = salt + current_schedule().seed * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void fill_garbage(void* data, std::size_t bytes, std::uint64_t salt) {
  std::uint64_t const word = garbage_word(salt);
  auto* out = static_cast<unsigned char*>(data);
  std::size_t i = 0;
  for (; i + 8 <= bytes; i += 8) std::memcpy(out + i, &word, 8);
  for (; i < bytes; ++i) out[i] = static_cast<unsigned char>(word >> (8 * (i % 8)));
}

bool is_device_pointer(void const* pointer) {
  std::lock_guard lock(device_mutex());
  return is_device_range(pointer, 1);
}

bool is_device_range(void const* pointer, std::size_t bytes) {
  arena& a = memory();
  auto const* p = static_cast<char const*>(pointer);
  if (p < a.base || p >= a.base + a.high_water) return false;
  std::size_t const offset = static_cast<std::size_t>(p - a.base);
  auto it = a.live.upper_bound(offset);
  if (it == a.live.begin()) return false;
  --it;
  return offset + bytes <= it->first + it->second;
}

/// Allocates `bytes` of device memory filled with garbage; null when out of range.
void* allocate_device(std::size_t bytes) {
  arena& a = memory();
  std::size_t const size =
      (std::max<std::size_t>(bytes, 1) + alignment - 1) / alignment * alignment;
  std::size_t offset = 0;
  auto run = std::find_if(a.free_runs.begin(), a.free_runs.end(),
                          [&](auto const& r) { return r.second >= size; });
  if (run != a.free_runs.end()) {
    offset = run->first;
    std::size_t const left = run->second - size;
    a.free_runs.erase(run);
    if (left > 0) a.free_runs.emplace(offset + size, left);
  } else {
    if (a.high_water + size > reserved_bytes) return nullptr;
    offset = a.high_water;
    a.high_water += size;
  }
  a.live.emplace(offset, bytes);
  a.reserved.emplace(offset, size);
  a.live_bytes += size;
  device_section section;
  if (a.accessible < a.high_water) {
    a.protect(a.high_water, PROT_READ | PROT_WRITE);
    a.accessible = a.high_water;
  }
  fill_garbage(a.base + offset, size, offset);
  return a.base + offset;
}

/// Frees an allocation; false when `pointer` is not the start of a live one.
bool free_device(void* pointer) {
  arena& a = memory();
  auto const* p = static_cast<char const*>(pointer);
  if (p < a.base || p >= a.base + a.high_water) return false;
  auto it = a.reserved.find(static_cast<std::size_t>(p - a.base));
  if (it == a.reserved.end()) return false;
  std::size_t offset = it->first, size = it->second;
  a.reserved.erase(it);
  a.live.erase(offset);
  a.live_bytes -= size;
  if (size >= (std::size_t{1} << 20)) {
    std::size_t const first = (offset + page - 1) / page * page;
    std::size_t const last = (offset + size) / page * page;
    if (last > first) madvise(a.base + first, last - first, MADV_DONTNEED);
  }
  auto next = a.free_runs.lower_bound(offset);
  if (next != a.free_runs.end() && next->first == offset + size) {
    size += next->second;
    a.free_runs.erase(next);
  }
  auto previous = a.free_runs.lower_bound(offset);
  if (previous != a.free_runs.begin()) {
    --previous;
    if (previous->first + previous->second == offset) {
      offset = previous->first;
      size += previous->second;
      a.free_runs.erase(previous);
    }
  }
  a.free_runs.emplace(offset, size);
  return true;
}

std::size_t device_bytes_in_use() {
  return memory().live_bytes;
}

}  // namespace moe::emulation
