// SPDX-License-Identifier: Apache-2.0
#pragma once
// The memory contract (DESIGN §3): every algorithm reports `workspace_bytes(args)` and then
// runs in a caller-provided buffer; nothing is allocated inside a run and nothing is cached.
// `workspace_carver` lays typed arrays out of that buffer. Each algorithm describes its
// layout once and runs that description twice: over no memory to count the bytes, and over
// the caller's buffer to obtain the pointers. The size query and the run cannot disagree.

#include <moe/core/config.hpp>
#include <moe/core/view.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>

namespace moe {

/// A caller-provided scratch buffer: host memory for the host backend, device memory for the
/// CUDA backend.
using workspace = span<std::byte>;

/// Alignment of every array carved from a workspace: enough for 16-byte vector accesses and
/// for cuBLAS's 256-byte preference.
inline constexpr std::size_t workspace_alignment = 256;

/// The most elements of one array carved from a workspace, 2^52. At most 8 bytes an element
/// and far fewer than 256 arrays, any workspace's bytes and every index into it then fit
/// int64; entry points check their sizes against this before they carve.
inline constexpr index_t max_array_elements = index_t{1} << 52;

/// Lays out typed arrays in a workspace. A default-constructed carver only counts bytes and
/// hands out null pointers; one constructed over a buffer hands out pointers into it.
class workspace_carver {
 public:
  constexpr workspace_carver() noexcept = default;
  constexpr explicit workspace_carver(workspace buffer) noexcept : base_(buffer.data()) {}

  /// Reserves `count` elements of T, aligned to `workspace_alignment`.
  template <class T>
  constexpr T* take(index_t count) noexcept {
    offset_ = align_up(offset_);
    T* p = base_ ? reinterpret_cast<T*>(base_ + offset_) : nullptr;
    offset_ += static_cast<std::size_t>(count) * sizeof(T);
    return p;
  }

  /// Bytes reserved so far, rounded up to the alignment.
  [[nodiscard]] constexpr std::size_t bytes() const noexcept { return align_up(offset_); }

 private:
  static constexpr std::size_t align_up(std::size_t n) noexcept {
    return (n + workspace_alignment - 1) / workspace_alignment * workspace_alignment;
  }

  std::byte* base_ = nullptr;
  std::size_t offset_ = 0;
};

/// An owned, aligned host buffer: the workspace of the host backend. Its bytes are left
/// uninitialised, as a device allocation would be.
class host_buffer {
 public:
  host_buffer() = default;
  explicit host_buffer(std::size_t bytes)
      : data_(bytes ? static_cast<std::byte*>(
                          ::operator new (bytes, std::align_val_t{workspace_alignment}))
                    : nullptr),
        bytes_(bytes) {}

  [[nodiscard]] workspace view() const noexcept { return {data_.get(), bytes_}; }
  [[nodiscard]] std::size_t size() const noexcept { return bytes_; }

 private:
  struct aligned_delete {
    void operator()(std::byte* p) const noexcept {
      ::operator delete (p, std::align_val_t{workspace_alignment});
    }
  };
  std::unique_ptr<std::byte, aligned_delete> data_;
  std::size_t bytes_ = 0;
};

}  // namespace moe
