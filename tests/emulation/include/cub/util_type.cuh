// SPDX-License-Identifier: Apache-2.0
#pragma once
// The emulated runtime's stand-in for CUB's util_type.cuh: the DoubleBuffer of the radix
// sorts, with CUB's members and meaning.

namespace cub {

template <class T>
struct DoubleBuffer {
  T* d_buffers[2] = {nullptr, nullptr};
  int selector = 0;

  DoubleBuffer() = default;
  DoubleBuffer(T* current, T* alternate) : d_buffers{current, alternate}, selector(0) {}

  T* Current() const { return d_buffers[selector]; }
  T* Alternate() const { return d_buffers[selector ^ 1]; }
};

}  // namespace cub
