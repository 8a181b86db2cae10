// SPDX-License-Identifier: Apache-2.0
// The capacity layout on the host, by hand: encode puts kept tokens at (expert, slot) and
// zeroes the rest; decode weights and sums; the backward of both.

#include <doctest/doctest.h>

#include <moe/layout.hpp>

#include <array>

using namespace moe;

namespace {

/// T = 3, k = 2, E = 2, C = 2, H = 2. t0 → (e1 s0, e0 s0), t1 → (e1 s1, e0 s1),
/// t2 → (e1 s2 dropped, e0 s2 dropped): every choice of t2 lost.
struct fixture {
  std::array<double, 6> logits{}, scores{};
  std::array<std::int32_t, 6> expert{1, 0, 1, 0, 1, 0};
  std::array<double, 6> weight{0.75, 0.25, 0.5, 0.5, 0, 0};
  std::array<std::int64_t, 6> slot{0, 0, 1, 1, 2, 2};
  std::array<std::int64_t, 2> load{3, 3};
  gating::host_routing r;
  fixture() {
    r.logits = make_view(logits.data(), 3, 2);
    r.scores = make_view(scores.data(), 3, 2);
    r.expert = make_view(expert.data(), 3, 2);
    r.weight = make_view(weight.data(), 3, 2);
    r.slot = make_view(slot.data(), 3, 2);
    r.load = make_view(load.data(), 2);
    r.capacity = 2;
  }
};

}  // namespace

TEST_CASE("encode and decode of the capacity layout") {
  fixture f;
  std::array<float, 6> const x{1, 2, 3, 4, 5, 6};
  std::array<double, 8> dispatched;
  dispatched.fill(-7);
  layout::encode(host, layout::capacity{}, f.r, make_view(x.data(), 3, 2),
                 make_view(dispatched.data(), 2, 2, 2));
  // e0: slot0 = x0, slot1 = x1; e1: slot0 = x0, slot1 = x1. x2 was dropped everywhere.
  CHECK(dispatched == std::array<double, 8>{1, 2, 3, 4, 1, 2, 3, 4});

  std::array<double, 8> const out{10, 20, 30, 40, 100, 200, 300, 400};
  std::array<float, 6> y;
  y.fill(-7);
  layout::decode(host, layout::capacity{}, f.r, make_view(out.data(), 2, 2, 2),
                 make_view(y.data(), 3, 2));
  // y0 = 0.75·e1s0 + 0.25·e0s0; y1 = 0.5·e1s1 + 0.5·e0s1; y2 = 0 (all dropped).
  CHECK(y == std::array<float, 6>{77.5f, 155, 165, 220, 0, 0});
}

TEST_CASE("backward of decode and encode") {
  fixture f;
  std::array<double, 8> const out{10, 20, 30, 40, 100, 200, 300, 400};
  std::array<float, 6> const dy{1, -1, 2, 0.5f, 9, 9};
  std::array<double, 8> d_out;
  d_out.fill(-7);
  std::array<double, 6> d_weight;
  d_weight.fill(-7);
  layout::decode_backward(host, layout::capacity{}, f.r, make_view(dy.data(), 3, 2),
                          make_view(out.data(), 2, 2, 2), make_view(d_out.data(), 2, 2, 2),
                          make_view(d_weight.data(), 3, 2));
  // d_out[e, s] = w · dy_t; d_weight = ⟨dy_t, out[e, s]⟩; dropped choices get 0.
  CHECK(d_out == std::array<double, 8>{0.25, -0.25, 1, 0.25, 0.75, -0.75, 1, 0.25});
  CHECK(d_weight == std::array<double, 6>{-100, -10, 800, 80, 0, 0});

  std::array<double, 6> dx;
  dx.fill(-7);
  layout::encode_backward(host, layout::capacity{}, f.r,
                          make_view(std::as_const(d_out).data(), 2, 2, 2),
                          make_view(dx.data(), 3, 2));
  CHECK(dx == std::array<double, 6>{1, -1, 2, 0.5, 0, 0});
}
