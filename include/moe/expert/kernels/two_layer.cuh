// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA backend of the two-GEMM expert (two_layer.hpp), both policies: ffn (F1 = F) and
// glu (F1 = 2·F, [gate | up]): the sequence of cuBLAS GEMMs and kernels. kernels/ffn.cuh and
// kernels/glu.cuh include it under the policies' names.
//
//   forward   pre (float)  = in · W1                      GEMM, float output
//             activated    = act(pre + b1)  (glu: act(g) ⊙ u)    activation_forward
//             out          = bias rows, then += activated · W2   fill_rows, GEMM (beta 1)
//   backward  dh (float)   = d_out · W2ᵀ                  GEMM into d_pre[:, 0:F]
//             d_pre        = dh ⊙ act'(pre)  (glu: [dg | du])     activation_backward
//             dW2 = activatedᵀ · d_out,  db2 = Σ d_out    GEMM, column_sums
//             dW1 = inᵀ · d_pre,         db1 = Σ d_pre    GEMM, column_sums (of the float)
//             d_in = d_pre · W1ᵀ                          GEMM
//
// A uniform batch runs each GEMM as one strided-batched call over all E·C rows: fixed
// shapes, nothing read back, capturable. A ragged batch runs one cublasGemmEx per non-empty
// expert, with its sizes from the host. (cublasGemmGroupedBatchedEx, CUDA 12.5+, could run
// each of those loops as one call; it takes its pointer arrays in device memory, which the
// state would then hold and a kernel would fill: left for when the per-expert launches show
// in a profile. cuBLASLt epilogues could fuse the bias and activation into the first GEMM;
// they are left out: one elementwise pass over (rows, F1) floats is cheap beside the GEMMs.)

#include <moe/core/backend.hpp>
#include <moe/core/blas.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/launch.cuh>
#include <moe/core/view.hpp>
#include <moe/expert/activation.hpp>
#include <moe/expert/concepts.hpp>
#include <moe/expert/device_state.hpp>
#include <moe/expert/kernels/activation.cuh>
#include <moe/expert/kernels/rows.cuh>
#include <moe/expert/kernels/segments.cuh>
#include <moe/expert/two_layer.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace moe::expert::detail {

/// How the kernels see a batch, and what the host knows of it.
struct batch_plan {
  kernels::span_launch spans;  // all experts; launch_over_experts splits them
  bool has_gaps = false;       // rows that no GEMM writes (a ragged batch's rows of no expert)
};

template <element T>
batch_plan plan_batch(cuda_backend const&, expert_shape const& s, uniform_segments const& segments,
                      device_state<T> const&) {
  return {
      .spans = {.segments = {.experts = s.experts,
                             .total_rows = segments.total_rows(),
                             .capacity = segments.capacity,
                             .begin = nullptr,
                             .rows = segments.claimed.empty() ? nullptr : segments.claimed.data()},
                .first_expert = 0,
                .experts = s.experts,
                .longest = segments.capacity},
      .has_gaps = false};
}

/// A ragged batch: copies the segments into the state on the device (store_segments) and
/// measures the longest span and the rows of no expert on the host.
template <element T>
batch_plan plan_batch(cuda_backend const& cuda, expert_shape const& s, row_segments const& segments,
                      device_state<T> const& state) {
  index_t const experts = s.experts;
  index_t const total = state.pre_activation.extent(0);
  batch_plan plan{.spans = {.segments = {.experts = experts,
                                         .total_rows = total,
                                         .capacity = -1,
                                         .begin = state.segment_begin.data(),
                                         .rows = state.segment_rows.data()},
                            .first_expert = 0,
                            .experts = experts,
                            .longest = 0}};
  index_t claimed = 0;
  for (index_t e = 0; e < experts; ++e) {
    index_t const span_begin = e == 0 ? 0 : segments.begin[e];
    index_t const span_end = e + 1 < experts ? segments.begin[e + 1] : total;
    plan.spans.longest = std::max(plan.spans.longest, span_end - span_begin);
    claimed += segments.rows[e];
  }
  plan.has_gaps = claimed < total;
  using store = kernels::store_segments;
  for (index_t first = 0; first < experts; first += store::chunk) {
    store::params p{};
    p.count = static_cast<int>(std::min<index_t>(store::chunk, experts - first));
    for (int j = 0; j < p.count; ++j) {
      p.begin[j] = segments.begin[first + j];
      p.rows[j] = segments.rows[first + j];
    }
    p.begin_out = state.segment_begin.data() + first;
    p.rows_out = state.segment_rows.data() + first;
    launch<store>(p, cuda.stream);
  }
  return plan;
}

/// An operand of the per-expert GEMMs: rows of the batch (offset by the segment's first
/// row) or a per-expert weight (offset by e · expert_stride). `ld` is its row stride.
template <class P>
struct gemm_operand {
  P* data;
  index_t ld;
  index_t expert_stride = 0;  // 0: rows of the batch

  [[nodiscard]] P* at(index_t expert, index_t first_row) const noexcept {
    return expert_stride != 0 ? data + expert * expert_stride : data + first_row * ld;
  }
  [[nodiscard]] index_t batch_stride(index_t capacity) const noexcept {
    return expert_stride != 0 ? expert_stride : capacity * ld;
  }
};

template <class P>
gemm_operand<P> batch_rows(P* data, index_t ld) noexcept {
  return {data, ld, 0};
}
template <class P>
gemm_operand<P> per_expert(P* data, index_t ld, index_t expert_stride) noexcept {
  return {data, ld, expert_stride};
}

/// Every expert's GEMM C_e = alpha · op(A_e) · op(B_e) + beta · C_e, where `shape_of(n)`
/// gives the shape for an expert of n rows. Uniform: one strided-batched call with n = C.
template <class A, class B, class C, class ShapeOf>
void expert_gemms(cuda_backend const& cuda, uniform_segments const& segments, ShapeOf shape_of,
                  float alpha, gemm_operand<A> a, gemm_operand<B> b, float beta,
                  gemm_operand<C> c) {
  index_t const capacity = segments.capacity;
  if (capacity == 0 || segments.experts == 0) return;
  gemm_shape shape = shape_of(capacity);
  shape.lda = a.ld;
  shape.ldb = b.ld;
  shape.ldc = c.ld;
  gemm_strided_batched(cuda.blas, cuda.stream, shape, segments.experts, alpha, a.data,
                       a.batch_stride(capacity), b.data, b.batch_stride(capacity), beta, c.data,
                       c.batch_stride(capacity));
}

/// Ragged: one GEMM per expert with rows, sized from the host's segments.
template <class A, class B, class C, class ShapeOf>
void expert_gemms(cuda_backend const& cuda, row_segments const& segments, ShapeOf shape_of,
                  float alpha, gemm_operand<A> a, gemm_operand<B> b, float beta,
                  gemm_operand<C> c) {
  for (index_t e = 0; e < segments.experts(); ++e) {
    index_t const rows = segments.rows[e], first = segments.begin[e];
    if (rows == 0) continue;
    gemm_shape shape = shape_of(rows);
    shape.lda = a.ld;
    shape.ldb = b.ld;
    shape.ldc = c.ld;
    gemm(cuda.blas, cuda.stream, shape, alpha, a.at(e, first), b.at(e, first), beta,
         c.at(e, first));
  }
}

/// Zeroes the per-expert slices (`per_expert` elements each) of the experts with no rows,
/// which no GEMM writes: consecutive empty experts in one memset.
template <class G>
void zero_empty_experts(cuda_backend const& cuda, row_segments const& segments, G* data,
                        index_t per_expert) {
  index_t const experts = segments.experts();
  for (index_t e = 0; e < experts;) {
    if (segments.rows[e] != 0) {
      ++e;
      continue;
    }
    index_t end = e;
    while (end < experts && segments.rows[end] == 0) ++end;
    MOE_CUDA_TRY(cudaMemsetAsync(data + e * per_expert, 0,
                                 static_cast<std::size_t>((end - e) * per_expert) * sizeof(G),
                                 cuda.stream));
    e = end;
  }
}

/// Uniform: every expert computes C rows; only C = 0 leaves the gradients unwritten.
template <class G>
void zero_empty_experts(cuda_backend const& cuda, uniform_segments const& segments, G* data,
                        index_t per_expert) {
  if (segments.capacity == 0 && segments.experts > 0)
    MOE_CUDA_TRY(cudaMemsetAsync(
        data, 0, static_cast<std::size_t>(segments.experts * per_expert) * sizeof(G), cuda.stream));
}

/// Launches a span kernel `K` once per range of experts, which it sets in `p.spans`.
template <class K>
void launch_over_experts(typename K::params p, cuda_backend const& cuda) {
  kernels::for_each_expert_range(p.spans.segments.experts, [&](index_t first, index_t count) {
    p.spans.first_expert = first;
    p.spans.experts = count;
    launch<K>(p, cuda.stream);
  });
}

/// The CUDA backend of the two-GEMM expert, on the first GEMM's weight of width F1 (see
/// detail::first_layer). Its caller (two_layer) has checked every argument; nothing here throws but
/// cuda_error and cublas_error.
/// @tparam Gated false: ffn; true: glu, whose first GEMM's columns are [gate | up]
template <act::activation Act, bool Gated>
struct cuda_backend_of<two_layer<Act, Gated>> {
  template <element T, segment_description Segments>
  static void forward(cuda_backend cuda, expert_shape const& s, ffn_params<T const> const& p,
                      Segments const& segments, matrix_view<T const> in, matrix_view<T> out,
                      device_state<T> const& state) {
    static_assert(dtype_traits<std::remove_cv_t<T>>::device_supported,
                  "moe::expert: the CUDA backend takes float, __half or __nv_bfloat16.");
    index_t const hidden = s.hidden, ffn = s.ffn, f1 = two_layer<Act, Gated>::first_width(s);
    if (in.extent(0) == 0 || s.experts == 0) return;
    batch_plan const plan = plan_batch(cuda, s, segments, state);

    expert_gemms(
        cuda, segments, [&](index_t n) { return gemm_shape{.m = n, .n = f1, .depth = hidden}; },
        1.0f, batch_rows(in.data_handle(), hidden), per_expert(p.w1.data_handle(), f1, hidden * f1),
        0.0f, batch_rows(state.pre_activation.data_handle(), f1));

    launch_over_experts<kernels::activation_forward<Act, Gated, T>>(
        {.spans = plan.spans,
         .ffn = ffn,
         .pre = state.pre_activation.data_handle(),
         .bias = is_present(p.b1) ? p.b1.data_handle() : nullptr,
         .activated = state.activated.data_handle()},
        cuda);

    bool const with_bias = is_present(p.b2);
    if (with_bias || plan.has_gaps)
      launch_over_experts<kernels::fill_rows<T>>({.spans = plan.spans,
                                                  .cols = hidden,
                                                  .out = out.data_handle(),
                                                  .bias = with_bias ? p.b2.data_handle() : nullptr},
                                                 cuda);
    expert_gemms(
        cuda, segments, [&](index_t n) { return gemm_shape{.m = n, .n = hidden, .depth = ffn}; },
        1.0f, batch_rows(static_cast<T const*>(state.activated.data_handle()), ffn),
        per_expert(p.w2.data_handle(), hidden, ffn * hidden), with_bias ? 1.0f : 0.0f,
        batch_rows(out.data_handle(), hidden));
  }

  template <element T, class G, segment_description Segments>
  static void backward(cuda_backend cuda, expert_shape const& s, ffn_params<T const> const& p,
                       Segments const& segments, matrix_view<T const> in,
                       matrix_view<T const> d_out, matrix_view<T> d_in, ffn_params<G> const& g,
                       device_state<T> const& state) {
    static_assert(dtype_traits<std::remove_cv_t<T>>::device_supported,
                  "moe::expert: the CUDA backend takes float, __half or __nv_bfloat16.");
    index_t const hidden = s.hidden, ffn = s.ffn, f1 = two_layer<Act, Gated>::first_width(s);
    if (s.experts == 0) return;
    batch_plan const plan = plan_batch(cuda, s, segments, state);
    constexpr bool separate_cast = !std::is_same_v<std::remove_cv_t<T>, float>;
    T const* d_pre_t = state.d_pre_activation_t.data_handle();

    // dh = d_out · W2ᵀ, into the first F columns of the float d_pre.
    expert_gemms(
        cuda, segments,
        [&](index_t n) {
          return gemm_shape{.m = n, .n = ffn, .depth = hidden, .trans_b = transpose::yes};
        },
        1.0f, batch_rows(d_out.data_handle(), hidden),
        per_expert(p.w2.data_handle(), hidden, ffn * hidden), 0.0f,
        batch_rows(state.d_pre_activation.data_handle(), f1));
    launch_over_experts<kernels::activation_backward<Act, Gated, T>>(
        {.spans = plan.spans,
         .ffn = ffn,
         .pre = state.pre_activation.data_handle(),
         .d_pre = state.d_pre_activation.data_handle(),
         .d_pre_t = separate_cast ? state.d_pre_activation_t.data_handle() : nullptr},
        cuda);

    // dW2 = activatedᵀ · d_out and db2 = Σ d_out, over each expert's rows.
    expert_gemms(
        cuda, segments,
        [&](index_t n) {
          return gemm_shape{.m = ffn, .n = hidden, .depth = n, .trans_a = transpose::yes};
        },
        1.0f, batch_rows(static_cast<T const*>(state.activated.data_handle()), ffn),
        batch_rows(d_out.data_handle(), hidden), 0.0f,
        per_expert(g.w2.data_handle(), hidden, ffn * hidden));
    zero_empty_experts(cuda, segments, g.w2.data_handle(), ffn * hidden);
    if (is_present(g.b2))
      launch_over_experts<kernels::column_sums<T, G>>({.spans = plan.spans,
                                                       .cols = hidden,
                                                       .src = d_out.data_handle(),
                                                       .out = g.b2.data_handle()},
                                                      cuda);

    // dW1 = inᵀ · d_pre and db1 = Σ d_pre (of the float d_pre).
    expert_gemms(
        cuda, segments,
        [&](index_t n) {
          return gemm_shape{.m = hidden, .n = f1, .depth = n, .trans_a = transpose::yes};
        },
        1.0f, batch_rows(in.data_handle(), hidden), batch_rows(d_pre_t, f1), 0.0f,
        per_expert(g.w1.data_handle(), f1, hidden * f1));
    zero_empty_experts(cuda, segments, g.w1.data_handle(), hidden * f1);
    if (is_present(g.b1))
      launch_over_experts<kernels::column_sums<float, G>>(
          {.spans = plan.spans,
           .cols = f1,
           .src = state.d_pre_activation.data_handle(),
           .out = g.b1.data_handle()},
          cuda);

    // d_in = d_pre · W1ᵀ; zero on rows no GEMM writes.
    if (plan.has_gaps)
      launch_over_experts<kernels::fill_rows<T>>(
          {.spans = plan.spans, .cols = hidden, .out = d_in.data_handle(), .bias = nullptr}, cuda);
    expert_gemms(
        cuda, segments,
        [&](index_t n) {
          return gemm_shape{.m = n, .n = hidden, .depth = f1, .trans_b = transpose::yes};
        },
        1.0f, batch_rows(d_pre_t, f1), per_expert(p.w1.data_handle(), f1, hidden * f1), 0.0f,
        batch_rows(d_in.data_handle(), hidden));
  }
};

}  // namespace moe::expert::detail
