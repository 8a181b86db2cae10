// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA backend of the two-GEMM experts (ffn, glu), as far as the host compiler sees it:
// the state they keep in device memory between forward and backward, how it is carved from
// a workspace, and the checks every CUDA entry point runs before any device work. The
// kernels and the GEMM sequence are in kernels/two_layer.cuh (nvcc).
//
// Both experts are x ─ W1 ─▶ pre (rows, F1) ─ act ─▶ activated (rows, F) ─ W2 ─▶ out, with
// F1 = F for ffn and F1 = 2·F for glu (gate and up halves side by side).

#include <moe/core/backend.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/expert/concepts.hpp>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

namespace moe::expert {

/// What the CUDA backend of a two-GEMM expert keeps in device memory, for a batch of `rows`
/// rows: F1 is the first GEMM's width (ffn: F; glu: 2·F). The pre-activation is saved in
/// float (the first GEMM accumulates in float and writes float), so backward's activation
/// derivatives see the unrounded value; the activation is saved in T because it is the
/// second GEMM's operand and dW2's.
template <element T>
struct device_state {
  matrix_view<float> pre_activation;  // (rows, F1)  x · W1 + b1, written by forward
  matrix_view<T> activated;           // (rows, F)   act(pre), glu: act(gate) ⊙ up; forward
  /// Backward's scratch, absent (empty) in a state carved for `expert_pass::forward_only`:
  matrix_view<float> d_pre_activation;  // (rows, F1)  float: bias gradients sum it
  matrix_view<T> d_pre_activation_t;    // (rows, F1)  rounded to T for the GEMMs; the same
                                        //             memory as the float one when T is float
  span<std::int64_t> segment_begin;     // (experts)   a ragged batch's segments, on the device
  span<std::int64_t> segment_rows;      // (experts)   (each call writes them)
};

namespace detail {

template <class X>
inline constexpr bool always_false = false;

/// The CUDA backend of expert X. Its definition is in X's kernels header, which needs nvcc;
/// the primary template only explains where to find it.
template <class X>
struct cuda_backend_of {
  static_assert(always_false<X>,
                "moe::expert: the CUDA backend of this expert is defined in its kernels header: "
                "include <moe/expert/kernels/ffn.cuh> or <moe/expert/kernels/glu.cuh> in a .cu "
                "file compiled by nvcc.");
};

/// Lays out the device state of a two-GEMM expert of first-GEMM width `width` for up to
/// `max_rows` rows; views of `rows` rows.
template <element T>
device_state<T> carve_two_layer_state(workspace_carver& carver, expert_shape const& s,
                                      index_t width, index_t max_rows, index_t rows,
                                      expert_pass pass) {
  device_state<T> state;
  state.pre_activation = make_view(carver.take<float>(max_rows * width), rows, width);
  state.activated = make_view(carver.take<T>(max_rows * s.ffn), rows, s.ffn);
  if (pass == expert_pass::training) {
    state.d_pre_activation = make_view(carver.take<float>(max_rows * width), rows, width);
    if constexpr (std::is_same_v<std::remove_cv_t<T>, float>)
      state.d_pre_activation_t = state.d_pre_activation;
    else
      state.d_pre_activation_t = make_view(carver.take<T>(max_rows * width), rows, width);
  }
  auto const integers = [&] {
    return span<std::int64_t>(carver.take<std::int64_t>(s.experts),
                              static_cast<std::size_t>(s.experts));
  };
  state.segment_begin = integers();
  state.segment_rows = integers();
  return state;
}

/// Bytes of device workspace that `carve_two_layer_state` takes.
template <element T>
std::size_t two_layer_state_bytes(expert_shape const& s, index_t width, index_t max_rows,
                                  expert_pass pass) {
  workspace_carver counter;
  (void)carve_two_layer_state<T>(counter, s, width, max_rows, max_rows, pass);
  return counter.bytes();
}

/// Whether `value` fits cuBLAS's 32-bit int.
[[nodiscard]] inline status check_blas_int(index_t value, char const* argument, char const* what) {
  if (value > INT_MAX)
    return status::failure(argument, std::string(what) + " is " + std::to_string(value) +
                                         ", beyond cuBLAS's 32-bit int");
  return {};
}

/// The largest GEMM row count of a batch: C, or the largest segment.
[[nodiscard]] inline index_t largest_segment(uniform_segments const& segments) noexcept {
  return segments.capacity;
}
[[nodiscard]] inline index_t largest_segment(row_segments const& segments) noexcept {
  index_t most = 0;
  for (auto const rows : segments.rows) most = std::max<index_t>(most, rows);
  return most;
}

/// The checks of a CUDA call of a two-GEMM expert of first-GEMM width `width` that do not
/// depend on the direction: the handle, the segments against the batch's `rows`, the state,
/// and cuBLAS's int range. Reads nothing on the device.
template <element T, segment_description Segments>
[[nodiscard]] status check_device_batch(cuda_backend const& cuda, expert_shape const& s,
                                        index_t width, Segments const& segments, index_t rows,
                                        device_state<T> const& state, expert_pass pass) {
  if (cuda.blas == nullptr)
    return status::failure("cuda.blas",
                           "is null: the experts' CUDA backend runs cuBLAS; lend it a handle "
                           "(moe::blas_handle)");
  if (auto st = check_segments(segments, s.experts, rows, "segments"); !st) return st;
  if (auto st = check_extents(state.pre_activation, "state.pre_activation", {rows, width}); !st)
    return st;
  if (auto st = check_extents(state.activated, "state.activated", {rows, s.ffn}); !st) return st;
  if (pass == expert_pass::training) {
    if (rows > 0 && state.d_pre_activation.data_handle() == nullptr)
      return status::failure("state",
                             "was carved for expert_pass::forward_only; backward needs "
                             "a state carved for expert_pass::training");
    if (auto st = check_extents(state.d_pre_activation, "state.d_pre_activation", {rows, width});
        !st)
      return st;
    if (auto st =
            check_extents(state.d_pre_activation_t, "state.d_pre_activation_t", {rows, width});
        !st)
      return st;
  }
  if (static_cast<index_t>(state.segment_begin.size()) != s.experts ||
      static_cast<index_t>(state.segment_rows.size()) != s.experts ||
      (s.experts > 0 &&
       (state.segment_begin.data() == nullptr || state.segment_rows.data() == nullptr)))
    return status::failure("state", "holds segments for " +
                                        std::to_string(state.segment_begin.size()) +
                                        " experts, not " + std::to_string(s.experts));
  if (auto st = check_blas_int(s.hidden, "hidden", "hidden"); !st) return st;
  if (auto st = check_blas_int(width, "ffn", "the first GEMM's width"); !st) return st;
  if (auto st = check_blas_int(s.experts, "experts", "the number of experts"); !st) return st;
  return check_blas_int(largest_segment(segments), "segments", "an expert's row count");
}

/// A two-GEMM expert's CUDA forward checks: its parameters (`params`, the expert's own
/// check), then the batch's views and check_device_batch.
template <element T, segment_description Segments>
[[nodiscard]] status check_forward_call(cuda_backend const& cuda, expert_shape const& s,
                                        index_t width, status params, Segments const& segments,
                                        matrix_view<T const> in, matrix_view<T> out,
                                        device_state<T> const& state) {
  if (!params) return params;
  index_t const rows = in.extent(0);
  if (auto st = check_extents(in, "in", {rows, s.hidden}); !st) return st;
  if (auto st = check_extents(out, "out", {rows, s.hidden}); !st) return st;
  return check_device_batch(cuda, s, width, segments, rows, state, expert_pass::forward_only);
}

/// A two-GEMM expert's CUDA backward checks: parameters and gradients (the expert's own
/// checks), then the batch's views and check_device_batch.
template <element T, segment_description Segments>
[[nodiscard]] status check_backward_call(cuda_backend const& cuda, expert_shape const& s,
                                         index_t width, status params, status gradients,
                                         Segments const& segments, matrix_view<T const> in,
                                         matrix_view<T const> d_out, matrix_view<T> d_in,
                                         device_state<T> const& state) {
  if (!params) return params;
  if (!gradients) return gradients;
  index_t const rows = in.extent(0);
  if (auto st = check_extents(in, "in", {rows, s.hidden}); !st) return st;
  if (auto st = check_extents(d_out, "d_out", {rows, s.hidden}); !st) return st;
  if (auto st = check_extents(d_in, "d_in", {rows, s.hidden}); !st) return st;
  return check_device_batch(cuda, s, width, segments, rows, state, expert_pass::training);
}

}  // namespace detail
}  // namespace moe::expert
