// SPDX-License-Identifier: Apache-2.0
#pragma once
// Views at every boundary: cuda::std::span and cuda::std::mdspan (row-major, 64-bit extents)
// behind moe:: aliases, and the shape checks that entry points run before touching memory.
// A view says nothing about the memory space; each entry point documents whether it takes
// host or device memory.

#include <moe/core/config.hpp>
#include <moe/core/error.hpp>

#include <cuda/std/mdspan>
#include <cuda/std/span>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

namespace moe {

/// Index and extent type of every view: 64-bit, so that T·E·C·H never overflows.
using index_t = std::int64_t;

inline constexpr std::size_t dynamic_extent = cuda::std::dynamic_extent;

template <class T, std::size_t Extent = dynamic_extent>
using span = cuda::std::span<T, Extent>;

/// A row-major view of rank `Rank` with run-time extents.
template <class T, std::size_t Rank>
using tensor_view = cuda::std::mdspan<T, cuda::std::dextents<index_t, Rank>>;

template <class T>
using vector_view = tensor_view<T, 1>;
template <class T>
using matrix_view = tensor_view<T, 2>;
template <class T>
using tensor3_view = tensor_view<T, 3>;

/// A row-major view of `data` with the given extents; its rank is the number of extents.
template <class T, class... Extents>
constexpr tensor_view<T, sizeof...(Extents)> make_view(T* data, Extents... extents) noexcept {
  return tensor_view<T, sizeof...(Extents)>(data, static_cast<index_t>(extents)...);
}

/// Any mdspan (the parameters a function template deduces from a `tensor_view`).
template <class T, class Extents, class Layout, class Accessor>
using mdspan_of = cuda::std::mdspan<T, Extents, Layout, Accessor>;

/// The same view with const elements.
template <class T, class E, class L, class A>
constexpr auto as_const(mdspan_of<T, E, L, A> const& v) noexcept {
  return cuda::std::mdspan<T const, E, L>(v.data_handle(), v.mapping());
}

namespace detail {
/// What a conversion from writable to read-only views converts to when the views are read-only
/// already: a type nothing asks for (a conversion to the type itself is never called, and
/// nvcc warns about one).
struct already_read_only {};
}  // namespace detail

/// The target of a conversion operator from views of T to views of T const (`Const`), for a
/// parameter-view struct: `operator read_only_target<T, S<T const>>() const`.
template <class T, class Const>
using read_only_target = std::conditional_t<std::is_const_v<T>, detail::already_read_only, Const>;

/// Number of elements of a view.
template <class T, class E, class L, class A>
constexpr index_t element_count(mdspan_of<T, E, L, A> const& v) noexcept {
  index_t n = 1;
  for (std::size_t r = 0; r < E::rank(); ++r) n *= static_cast<index_t>(v.extent(r));
  return n;
}

namespace detail {

template <std::size_t Rank>
std::string format_extents(std::array<index_t, Rank> const& e) {
  std::string s = "(";
  for (std::size_t r = 0; r < Rank; ++r) s += (r ? ", " : "") + std::to_string(e[r]);
  return s + ")";
}

template <class T, class E, class L, class A>
std::array<index_t, E::rank()> extents_of(mdspan_of<T, E, L, A> const& v) {
  std::array<index_t, E::rank()> e{};
  for (std::size_t r = 0; r < E::rank(); ++r) e[r] = static_cast<index_t>(v.extent(r));
  return e;
}

}  // namespace detail

/// Checks that `view` has exactly the extents `expected` and, when it holds any element, a
/// non-null pointer. Returns a failure naming `argument` otherwise.
template <class T, class E, class L, class A>
[[nodiscard]] status check_extents(mdspan_of<T, E, L, A> const& view, char const* argument,
                                   std::array<index_t, E::rank()> const& expected) {
  auto const actual = detail::extents_of(view);
  if (actual != expected)
    return status::failure(argument, "expected extents " + detail::format_extents(expected) +
                                         ", got " + detail::format_extents(actual));
  if (view.data_handle() == nullptr && element_count(view) > 0)
    return status::failure(
        argument, "null data for a view of " + detail::format_extents(actual) + " elements");
  return {};
}

/// Like `check_extents`, but an empty view (no elements) means "absent" and passes: for
/// optional operands such as biases.
template <class T, class E, class L, class A>
[[nodiscard]] status check_optional_extents(mdspan_of<T, E, L, A> const& view, char const* argument,
                                            std::array<index_t, E::rank()> const& expected) {
  if (element_count(view) == 0 && view.data_handle() == nullptr) return {};
  return check_extents(view, argument, expected);
}

/// True when an optional view is present (holds elements).
template <class T, class E, class L, class A>
constexpr bool is_present(mdspan_of<T, E, L, A> const& view) noexcept {
  return view.data_handle() != nullptr && element_count(view) > 0;
}

}  // namespace moe
