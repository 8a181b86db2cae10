// SPDX-License-Identifier: Apache-2.0
#pragma once
// The concept of an expert: a computation applied, per expert, to the rows that the layout
// dispatched to it. The layer sees only what this concept names.

#include <moe/core/backend.hpp>
#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/gating/concepts.hpp>

#include <concepts>
#include <cstdint>

namespace moe::expert {

struct expert_tag {};

/// The shape of a bank of experts on one rank.
struct expert_shape {
  index_t experts = 0;  ///< experts on this rank
  index_t hidden = 0;   ///< H: width of a token
  index_t ffn = 0;      ///< F: inner width of an expert
};

/// X has parameter views `X::params<T>` (T const for parameters, T for gradients) that it
/// checks against a shape.
template <class X>
concept has_parameters = requires(expert_shape const& shape,
                                  typename X::template params<float const> const& p,
                                  typename X::template params<float> const& g) {
  { X::check(p, shape, "params") } -> std::same_as<status>;
  { X::check(g, shape, "gradients") } -> std::same_as<status>;
};

/// X runs on the host backend: it lays out its saved state in a workspace and computes the
/// forward of `rows[e]` rows per expert from an (experts, rows, hidden) buffer.
template <class X>
concept runs_on_host = requires(workspace_carver& carver, expert_shape const& shape,
                                typename X::template params<double const> const& p,
                                typename X::host_state const& state, span<std::int64_t const> rows,
                                tensor3_view<double const> in, tensor3_view<double> out) {
  {
    X::carve_host_state(carver, shape, index_t{}, index_t{})
    } -> std::same_as<typename X::host_state>;
  X::forward(host, shape, p, rows, in, out, state);
};

/// X can be trained: its backward gives the gradient of its input and of its parameters.
template <class X>
concept has_backward = requires(expert_shape const& shape,
                                typename X::template params<double const> const& p,
                                typename X::template params<double> const& g,
                                typename X::host_state const& state, span<std::int64_t const> rows,
                                tensor3_view<double const> in, tensor3_view<double> out) {
  X::backward(host, shape, p, rows, in, in, out, g, state);
};

/// X models expert if:
/// 1. it is a stateless policy (std::semiregular) tagged `expert_tag`;
/// 2. it has parameter views checked against an `expert_shape`;
/// 3. it runs forward on the host backend.
template <class X>
concept expert =
    std::semiregular<X> && gating::tagged_as<X, expert_tag> && has_parameters<X> && runs_on_host<X>;

/// An expert that can also run backward.
template <class X>
concept trainable_expert = expert<X> && has_backward<X>;

}  // namespace moe::expert
