// SPDX-License-Identifier: Apache-2.0
#pragma once
// What a parameter tensor is, so that a user can ask instead of reading headers: its name,
// its axes by name and extent, whether it is an optional bias, its fan-in (what initialisers
// scale by), and the PyTorch tensor it corresponds to. Experts and the layer describe their
// parameters with it (`parameter_shapes`); the owning containers (layer/parameters.hpp) lay
// them out from it, and the checks print it:
//
//   'params.expert.w13': expected (experts, hidden, 2·ffn) = (8, 64, 256), got (8, 256, 64)

#include <moe/core/checked.hpp>
#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <string>

namespace moe {

/// One axis of a parameter: its name ("experts", "hidden", "2·ffn") and extent.
struct parameter_axis {
  char const* name = "";
  index_t extent = 0;
};

/// One parameter tensor, row-major over its axes.
struct parameter_shape {
  std::string name;                    ///< as the parameter views name it: "gate_weight", "w13"
  int rank = 0;                        ///< axes used, 1 to 3
  std::array<parameter_axis, 3> axes;  ///< outermost first
  bool bias = false;                   ///< optional: an empty view means "no bias"
  index_t fan_in = 0;                  ///< inputs summed into each output: the initialisers' scale
  /// The PyTorch tensor it holds, and how it is laid out against it.
  char const* torch = "";

  [[nodiscard]] index_t elements() const noexcept {
    index_t n = 1;
    for (int a = 0; a < rank; ++a) n = checked_mul(n, axes[static_cast<std::size_t>(a)].extent);
    return n;
  }
};

/// "(experts, hidden, 2·ffn) = (8, 64, 256)": the axes by name, then by extent.
[[nodiscard]] inline std::string describe(parameter_shape const& p) {
  std::string names = "(", extents = "(";
  for (int a = 0; a < p.rank; ++a) {
    auto const& axis = p.axes[static_cast<std::size_t>(a)];
    if (a > 0) {
      names.append(", ");
      extents.append(", ");
    }
    names.append(axis.name);
    extents.append(std::to_string(axis.extent));
  }
  return names.append(") = ").append(extents).append(")");
}

/// Checks `view` against `p` (an empty view passes for a bias), naming `prefix` + p.name.
/// The message gives the expected axes by name and, for a view of the transposed extents, the
/// likely cause: PyTorch's nn.Linear stores (out, in) where moe stores (in, out).
template <class T, class E, class L, class A>
[[nodiscard]] status check_parameter(mdspan_of<T, E, L, A> const& view, parameter_shape const& p,
                                     std::string const& prefix) {
  std::string const argument = prefix + p.name;
  if (p.bias && element_count(view) == 0) return {};
  std::array<index_t, E::rank()> expected{};
  for (std::size_t a = 0; a < E::rank(); ++a) expected[a] = p.axes[a].extent;
  auto const actual = detail::extents_of(view);
  if (static_cast<int>(E::rank()) != p.rank || actual != expected) {
    std::string message = "expected " + describe(p) + ", got " + detail::format_extents(actual);
    if constexpr (E::rank() >= 2) {
      auto swapped = actual;
      std::swap(swapped[E::rank() - 2], swapped[E::rank() - 1]);
      if (swapped == expected && actual != expected)
        message += ", the transpose: moe stores " + std::string(p.torch) +
                   ", (in, out) where nn.Linear stores (out, in); transpose the last two axes "
                   "when loading";
    }
    return status::failure(argument, message);
  }
  if (view.data_handle() == nullptr && element_count(view) > 0)
    return status::failure(argument, "null data for " + describe(p));
  return {};
}

}  // namespace moe
