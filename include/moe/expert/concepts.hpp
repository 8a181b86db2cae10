// SPDX-License-Identifier: Apache-2.0
#pragma once
// The concept of an expert: a computation applied, per expert, to the rows that the layout
// dispatched to it, and the expert batch those rows form (`row_segments`). The layer sees
// only what this concept names.

#include <moe/core/backend.hpp>
#include <moe/core/concepts.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/parameter_shape.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/gating/concepts.hpp>

#include <concepts>
#include <cstdint>
#include <ranges>
#include <string>

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

/// X describes its parameters, so that containers can own them (moe::host_parameters):
/// `X::parameter_shapes(shape)` lists every tensor (core/parameter_shape.hpp) in a fixed
/// order, and `X::view_parameters<T>(shape, data)` gives `params<T>` over one pointer per
/// tensor in that order (null for an absent bias).
template <class X>
concept describes_parameters = requires(expert_shape const& shape, span<float* const> data) {
  { X::parameter_shapes(shape) } -> std::ranges::random_access_range;
  {
    X::template view_parameters<float>(shape, data)
    } -> std::same_as<typename X::template params<float>>;
};

/// The expert batch: where each expert's rows lie in an (total rows, hidden) row matrix.
/// Expert e owns rows [begin[e], begin[e] + rows[e]); segments come in expert order and do
/// not overlap. Rows outside every segment (a layout's padding, or capacity no assignment
/// claimed) belong to no expert: an expert's forward writes zero output there and its
/// backward zero input gradient. The capacity layout gives begin[e] = e·C and rows[e] =
/// min(load_e, C); the ragged layout gives the exclusive scan of its padded loads and
/// rows[e] = load_e.
struct row_segments {
  span<std::int64_t const> begin;  // (experts) first row of each expert
  span<std::int64_t const> rows;   // (experts) rows of each expert

  [[nodiscard]] constexpr index_t experts() const noexcept {
    return static_cast<index_t>(rows.size());
  }
};

/// Checks that `segments` describes `experts` experts whose rows lie, in expert order and
/// without overlap, inside a matrix of `total_rows` rows. Returns a failure naming
/// `argument` otherwise.
[[nodiscard]] inline status check_segments(row_segments const& segments, index_t experts,
                                           index_t total_rows, char const* argument) {
  if (segments.experts() != experts || static_cast<index_t>(segments.begin.size()) != experts)
    return status::failure(argument, "describes " + std::to_string(segments.begin.size()) +
                                         " begins and " + std::to_string(segments.rows.size()) +
                                         " row counts for " + std::to_string(experts) + " experts");
  index_t next_free = 0;
  for (index_t e = 0; e < experts; ++e) {
    index_t const begin = segments.begin[e], rows = segments.rows[e];
    if (rows < 0 || begin < next_free || begin + rows > total_rows)
      return status::failure(argument, "gives expert " + std::to_string(e) + " rows [" +
                                           std::to_string(begin) + ", " +
                                           std::to_string(begin + rows) + "), which overlaps " +
                                           "an earlier expert or leaves the " +
                                           std::to_string(total_rows) + " rows of the batch");
    next_free = begin + rows;
  }
  return {};
}

/// The capacity layout's expert batch on the CUDA backend: expert e owns rows [e·C, (e+1)·C)
/// of an (E·C, hidden) batch, and every expert computes all C rows, so that the GEMMs have
/// fixed shapes and nothing is read back to the host (CUDA-graph capturable).
///
/// `claimed`, when present, is device memory: expert e's assignments are its first
/// min(max(claimed[e], 0), C) rows, and the rest are rows of no expert (zero output, zero
/// input gradient, no part in any parameter gradient; their input and output gradient must
/// be finite, as the capacity layout's zeros are). When absent, all C rows are the expert's;
/// rows that no assignment claimed then contribute nothing to the gradients exactly when
/// their input and output gradient are zero, which the capacity layout guarantees.
struct uniform_segments {
  index_t experts = 0;               ///< E
  index_t capacity = 0;              ///< C
  span<std::int64_t const> claimed;  ///< (experts) device memory, optional

  [[nodiscard]] constexpr index_t total_rows() const noexcept { return experts * capacity; }
};

/// Checks that `segments` describes `experts` experts of a batch of `total_rows` rows
/// (E·C == total_rows), with a `claimed` view of E elements or none. The values of
/// `claimed` live on the device and are not read.
[[nodiscard]] inline status check_segments(uniform_segments const& segments, index_t experts,
                                           index_t total_rows, char const* argument) {
  if (segments.experts != experts || segments.capacity < 0)
    return status::failure(argument, "describes " + std::to_string(segments.experts) +
                                         " experts of capacity " +
                                         std::to_string(segments.capacity) + " for " +
                                         std::to_string(experts) + " experts");
  if (segments.total_rows() != total_rows)
    return status::failure(argument, "gives " + std::to_string(segments.experts) + " · " +
                                         std::to_string(segments.capacity) +
                                         " rows for a batch of " + std::to_string(total_rows));
  if (!segments.claimed.empty() && (static_cast<index_t>(segments.claimed.size()) != experts ||
                                    segments.claimed.data() == nullptr))
    return status::failure(argument, "claims rows for " + std::to_string(segments.claimed.size()) +
                                         " experts, not " + std::to_string(experts));
  return {};
}

/// The two descriptions of an expert batch that the CUDA backend takes: `uniform_segments`
/// (capacity layout, sizes on the device) and `row_segments` in host memory (ragged).
template <class S>
concept segment_description = std::same_as<S, uniform_segments> || std::same_as<S, row_segments>;

/// What a device state is laid out for: forward alone (inference), or forward and backward
/// (training: backward's scratch too).
enum class expert_pass : bool { training = false, forward_only = true };

/// X runs on the host backend: it lays out its saved state in a workspace for a batch of up
/// to `max_rows` rows, and computes the forward of every expert's segment of an (rows,
/// hidden) batch.
template <class X>
concept runs_on_host = requires(workspace_carver& carver, expert_shape const& shape,
                                typename X::template params<double const> const& p,
                                typename X::host_state const& state, row_segments const& segments,
                                matrix_view<double const> in, matrix_view<double> out) {
  {
    X::carve_host_state(carver, shape, index_t{}, index_t{})
    } -> std::same_as<typename X::host_state>;
  X::forward(host, shape, p, segments, in, out, state);
};

/// X can be trained: its backward gives the gradient of its input and of its parameters.
template <class X>
concept has_backward = requires(expert_shape const& shape,
                                typename X::template params<double const> const& p,
                                typename X::template params<double> const& g,
                                typename X::host_state const& state, row_segments const& segments,
                                matrix_view<double const> in, matrix_view<double> out) {
  X::backward(host, shape, p, segments, in, in, out, g, state);
};

/// X models expert if:
/// 1. it is a stateless policy (std::semiregular) tagged `expert_tag`;
/// 2. it has parameter views checked against an `expert_shape`;
/// 3. it runs forward on the host backend.
template <class X>
concept expert =
    std::semiregular<X> && tagged_as<X, expert_tag> && has_parameters<X> && runs_on_host<X>;

/// An expert that can also run backward.
template <class X>
concept trainable_expert = expert<X> && has_backward<X>;

/// X models cuda_expert<T> if, with elements T (float, __half, __nv_bfloat16):
/// 1. it models trainable_expert;
/// 2. `X::device_state<T>` is its saved state on the device, laid out in a workspace by
///    `X::carve_device_state<T>(carver, shape, max_rows, rows, pass)`;
/// 3. it runs forward and backward on the CUDA backend over either kind of expert batch:
///    `uniform_segments` (capacity layout) and `row_segments` in host memory (ragged).
/// The declarations satisfy the concept; the definitions come with the expert's
/// `moe/expert/kernels/<name>.cuh`, which the calling .cu file includes.
template <class X, class T>
concept cuda_expert = trainable_expert<X> && element<T> &&
    requires(workspace_carver& carver, expert_shape const& shape, cuda_backend cuda,
             typename X::template params<T const> const& p, typename X::template params<T> const& g,
             typename X::template device_state<T> const& state, uniform_segments const& uniform,
             row_segments const& ragged, matrix_view<T const> in, matrix_view<T> out) {
  {
    X::template carve_device_state<T>(carver, shape, index_t{}, index_t{}, expert_pass{})
    } -> std::same_as<typename X::template device_state<T>>;
  X::forward(cuda, shape, p, uniform, in, out, state);
  X::forward(cuda, shape, p, ragged, in, out, state);
  X::backward(cuda, shape, p, uniform, in, in, out, g, state);
  X::backward(cuda, shape, p, ragged, in, in, out, g, state);
};

}  // namespace moe::expert
