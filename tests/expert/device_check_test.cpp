// SPDX-License-Identifier: Apache-2.0
// The host side of the experts' CUDA backend, which runs anywhere: the device state's layout
// and size, and the checks that every CUDA entry point runs before any device work (so that
// a rejected call writes nothing). Nothing here touches a device: the views point into host
// memory that the checks never read.

#include <doctest/doctest.h>

#include <moe/expert.hpp>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

using namespace moe;

namespace {

expert::expert_shape const shape{.experts = 3, .hidden = 8, .ffn = 5};

template <class X, class T>
typename X::template device_state<T> carve(
    host_buffer const& buffer, index_t rows,
    expert::expert_pass pass = expert::expert_pass::training) {
  workspace_carver carver(buffer.view());
  return X::template carve_device_state<T>(carver, shape, rows, rows, pass);
}

/// Parameters (and gradients) of shape `shape` over host memory, for the checks only.
template <class T>
struct fake_params {
  index_t width;
  std::vector<T> w1 = std::vector<T>(shape.experts * shape.hidden * width);
  std::vector<T> b1 = std::vector<T>(shape.experts * width);
  std::vector<T> w2 = std::vector<T>(shape.experts * shape.ffn * shape.hidden);
  std::vector<T> b2 = std::vector<T>(shape.experts * shape.hidden);

  template <class X, class U>
  typename X::template params<U> views() {
    return {make_view(static_cast<U*>(w1.data()), shape.experts, shape.hidden, width),
            make_view(static_cast<U*>(b1.data()), shape.experts, width),
            make_view(static_cast<U*>(w2.data()), shape.experts, shape.ffn, shape.hidden),
            make_view(static_cast<U*>(b2.data()), shape.experts, shape.hidden)};
  }
};

}  // namespace

TEST_CASE("the device state: float pre-activation, T activation, forward-only is smaller") {
  using glu = expert::glu<act::silu>;
  using ffn = expert::ffn<act::gelu>;
  index_t const rows = 40;
  auto const train = glu::device_workspace_bytes<__nv_bfloat16>(shape, rows);
  auto const infer =
      glu::device_workspace_bytes<__nv_bfloat16>(shape, rows, expert::expert_pass::forward_only);
  CHECK(infer < train);
  // forward: float (rows, 2F) + bf16 (rows, F) + 2 · (experts) integers, each 256-aligned.
  auto const aligned = [](std::size_t n) { return (n + 255) / 256 * 256; };
  CHECK(infer == aligned(rows * 10 * 4) + aligned(rows * 5 * 2) + 2 * aligned(3 * 8));
  CHECK(train == infer + aligned(rows * 10 * 4) + aligned(rows * 10 * 2));
  // In float, backward's rounded copy is the float scratch itself.
  CHECK(ffn::device_workspace_bytes<float>(shape, rows) ==
        2 * aligned(rows * 5 * 4) + aligned(rows * 5 * 4) + 2 * aligned(3 * 8));

  host_buffer buffer(train);
  auto const s = carve<glu, __nv_bfloat16>(buffer, rows);
  CHECK(s.pre_activation.extent(0) == rows);
  CHECK(s.pre_activation.extent(1) == 10);
  CHECK(s.activated.extent(1) == 5);
  CHECK(s.d_pre_activation_t.extent(1) == 10);
  CHECK(static_cast<void*>(s.d_pre_activation_t.data_handle()) !=
        static_cast<void*>(s.d_pre_activation.data_handle()));
  host_buffer float_buffer(ffn::device_workspace_bytes<float>(shape, rows));
  auto const f = carve<ffn, float>(float_buffer, rows);
  CHECK(f.d_pre_activation_t.data_handle() == f.d_pre_activation.data_handle());
  auto const forward_only =
      carve<ffn, float>(float_buffer, rows, expert::expert_pass::forward_only);
  CHECK(forward_only.d_pre_activation.data_handle() == nullptr);
}

TEST_CASE("CUDA entry points check everything on the host first, naming the argument") {
  using glu = expert::glu<act::gelu>;
  using T = __nv_bfloat16;
  index_t const capacity = 4, rows = shape.experts * capacity, h = shape.hidden;
  fake_params<T> params{2 * shape.ffn}, grads{2 * shape.ffn};
  auto const p = params.views<glu, T const>();
  auto const g = grads.views<glu, T>();
  std::vector<T> in(rows * h), out(rows * h);
  auto const in_v = make_view(static_cast<T const*>(in.data()), rows, h);
  auto const out_v = make_view(out.data(), rows, h);
  host_buffer buffer(glu::device_workspace_bytes<T>(shape, rows));
  auto const state = carve<glu, T>(buffer, rows);
  int handle_stand_in = 0;  // never used as a handle: only its being non-null is checked
  cuda_backend const cuda{nullptr, reinterpret_cast<cublasHandle_t>(&handle_stand_in)};
  std::array<std::int64_t, 3> const claimed{4, 0, 2};
  expert::uniform_segments const uniform{shape.experts, capacity, claimed};
  std::array<std::int64_t, 3> const begin{0, 5, 5}, counts{3, 0, 6};
  expert::row_segments const ragged{begin, counts};

  auto argument_of = [](status const& st) { return st.ok() ? std::string("(ok)") : st.argument(); };
  CHECK(glu::can_implement(cuda, shape, p, uniform, in_v, out_v, state).ok());
  CHECK(glu::can_implement(cuda, shape, p, ragged, in_v, out_v, state).ok());
  CHECK(glu::can_implement(cuda, shape, p, uniform, in_v, in_v, out_v, g, state).ok());
  CHECK(glu::can_implement(cuda, shape, p, ragged, in_v, in_v, out_v, g, state).ok());
  // float gradients of bfloat16 parameters are allowed too.
  fake_params<float> float_grads{2 * shape.ffn};
  CHECK(glu::can_implement(cuda, shape, p, uniform, in_v, in_v, out_v,
                           float_grads.views<glu, float>(), state)
            .ok());

  cuda_backend const no_blas{nullptr, nullptr};
  CHECK(argument_of(glu::can_implement(no_blas, shape, p, uniform, in_v, out_v, state)) ==
        "cuda.blas");
  auto bad_p = p;
  bad_p.w13 = make_view(p.w13.data_handle(), shape.experts, h, shape.ffn);
  CHECK(argument_of(glu::can_implement(cuda, shape, bad_p, uniform, in_v, out_v, state)) ==
        "params.w13");
  auto bad_g = g;
  bad_g.b2 = make_view(g.b2.data_handle(), shape.experts, h - 1);
  CHECK(argument_of(glu::can_implement(cuda, shape, p, uniform, in_v, in_v, out_v, bad_g, state)) ==
        "gradients.b2");
  // A uniform batch must be E·C rows, with counts for every expert or none.
  CHECK(argument_of(glu::can_implement(cuda, shape, p,
                                       expert::uniform_segments{shape.experts, capacity - 1, {}},
                                       in_v, out_v, state)) == "segments");
  CHECK(argument_of(
            glu::can_implement(cuda, shape, p,
                               expert::uniform_segments{shape.experts, capacity,
                                                        span<std::int64_t const>(claimed).first(2)},
                               in_v, out_v, state)) == "segments");
  // A ragged batch's segments must not overlap nor leave the batch.
  std::array<std::int64_t, 3> const overlapping{0, 2, 5};
  CHECK(argument_of(glu::can_implement(cuda, shape, p, expert::row_segments{overlapping, counts},
                                       in_v, out_v, state)) == "segments");
  std::array<std::int64_t, 3> const too_long{3, 0, 8};
  CHECK(argument_of(glu::can_implement(cuda, shape, p, expert::row_segments{begin, too_long}, in_v,
                                       out_v, state)) == "segments");
  CHECK(argument_of(glu::can_implement(cuda, shape, p, uniform, in_v,
                                       make_view(out.data(), rows - 1, h), state)) == "out");
  CHECK(argument_of(glu::can_implement(cuda, shape, p, uniform, in_v,
                                       make_view(static_cast<T const*>(in.data()), rows, h - 1),
                                       out_v, g, state)) == "d_out");
  // The state must be carved for the batch's rows, and for training before a backward.
  host_buffer small(glu::device_workspace_bytes<T>(shape, rows - 1));
  CHECK(argument_of(glu::can_implement(cuda, shape, p, uniform, in_v, out_v,
                                       carve<glu, T>(small, rows - 1))) == "state.pre_activation");
  auto const inference = carve<glu, T>(buffer, rows, expert::expert_pass::forward_only);
  CHECK(glu::can_implement(cuda, shape, p, uniform, in_v, out_v, inference).ok());
  CHECK(argument_of(glu::can_implement(cuda, shape, p, uniform, in_v, in_v, out_v, g, inference)) ==
        "state");
  // The state of an ffn (F1 = F) does not fit a glu (F1 = 2·F).
  using ffn = expert::ffn<act::gelu>;
  host_buffer ffn_buffer(ffn::device_workspace_bytes<T>(shape, rows));
  CHECK(argument_of(glu::can_implement(cuda, shape, p, uniform, in_v, out_v,
                                       carve<ffn, T>(ffn_buffer, rows))) == "state.pre_activation");
}
