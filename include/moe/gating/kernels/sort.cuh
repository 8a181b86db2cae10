// SPDX-License-Identifier: Apache-2.0
#pragma once
// The radix sorts of slot assignment (slots.cuh): CUB's stable DoubleBuffer sort of (key,
// assignment) pairs, in scratch sized on the host by an upper bound of what CUB asks, so that
// a workspace can be sized without a device.

#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/core/workspace.hpp>

#include <cub/device/device_radix_sort.cuh>
#include <cub/util_type.cuh>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace moe::gating::detail {

/// An upper bound of CUB's scratch for a stable radix sort of `count` (Key, int32) pairs
/// on `end_bit` key bits, computed on the host, so that a workspace can be sized without a
/// device (CUB's own query asks the device for its architecture). For keys of 32 bits and
/// more, on every architecture the toolkit builds for, CUB sorts DoubleBuffers by its
/// onesweep passes, whose scratch is a histogram of 2^8 digits per pass and portion (of at
/// least 2^27 items), a look-back of 2^8 digits per tile (of at least 256 items; 128 here,
/// for margin), and a counter per pass and portion, each rounded up to 256 bytes. Passes are
/// counted at 4 bits for margin. `sort_pairs` checks CUB's own need against it on every call.
template <class Key>
constexpr std::size_t sort_storage_bound(index_t count, int end_bit) noexcept {
  static_assert(sizeof(Key) >= sizeof(std::uint32_t),
                "slot assignment sorts keys of 32 bits or more (CUB's onesweep path)");
  constexpr std::size_t digits = 256, min_tile = 128, portion = std::size_t{1} << 27, align = 256;
  auto const up = [](std::size_t a, std::size_t b) { return (a + b - 1) / b; };
  auto const n = static_cast<std::size_t>(count > 0 ? count : 1);
  std::size_t const passes = up(static_cast<std::size_t>(end_bit > 0 ? end_bit : 1), 4);
  std::size_t const portions = up(n, portion);
  std::size_t const tiles = up(n < 2 * portion ? n : 2 * portion, min_tile);
  auto const aligned = [&](std::size_t bytes) { return up(bytes, align) * align; };
  return aligned(portions * passes * digits * sizeof(std::int64_t)) +
         aligned(tiles * digits * sizeof(std::int32_t)) +
         aligned(portions * passes * sizeof(std::int32_t)) + 5 * align;
}

/// Stable radix sort of `count` pairs on the low `end_bit` key bits; the buffers that hold
/// the result are chosen on the host, without waiting for the device.
template <class Key>
void sort_pairs(cub::DoubleBuffer<Key>& keys, cub::DoubleBuffer<std::int32_t>& values,
                index_t count, int end_bit, workspace storage, cudaStream_t stream) {
  if (count == 0) return;
  std::size_t needed = 0;  // CUB's own size query: host work, no device synchronisation
  MOE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(nullptr, needed, keys, values,
                                               static_cast<int>(count), 0, end_bit, stream));
  if (needed > storage.size())
    throw error("moe::gating: CUB's radix sort asks " + std::to_string(needed) +
                " bytes of scratch, more than the " + std::to_string(storage.size()) +
                " that sort_storage_bound gave when the workspace was sized; this CUB sizes "
                "its sort differently from what sort.cuh assumes (please report it)");
  std::size_t bytes = storage.size();
  MOE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(storage.data(), bytes, keys, values,
                                               static_cast<int>(count), 0, end_bit, stream));
}

}  // namespace moe::gating::detail
