// SPDX-License-Identifier: Apache-2.0
// The ragged (dropless) layout on the host, by hand: offsets are the exclusive scan of the
// padded loads, encode gathers each assignment to offset_e + slot and zeroes the padding,
// decode reduces each token's choices in order and never reads padding, and the backward
// of both. Then the edges: an expert with no tokens, one expert, one token.

#include "../support/expect.hpp"
#include "../support/random.hpp"

#include <doctest/doctest.h>

#include <moe/layout.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

using namespace moe;

// The size math is constexpr (and host/device).
static_assert(layout::padded_rows(5, 4) == 8 && layout::padded_rows(4, 4) == 4);
static_assert(layout::padded_rows(0, 16) == 0);  // an expert with no tokens takes no row
static_assert(layout::padded_rows(3, 1) == 3);
static_assert(layout::ragged_rows_bound(5, 2, 3, 4) == 5 * 2 + 3 * 3);
static_assert(layout::rows_bound(layout::ragged{},
                                 {.tokens = 5, .experts = 3, .k = 2, .row_alignment = 1}) == 10);
static_assert(layout::rows_bound(layout::capacity{},
                                 {.tokens = 5, .experts = 3, .k = 2, .capacity = 4}) == 12);
static_assert(layout::row_in_segment(8, 5, 4) == 12 && layout::row_in_segment(8, 5, 5) == -1);
static_assert(layout::dispatch_layout<layout::ragged> && !layout::ragged::drops_tokens);
static_assert(layout::row_map<layout::segment_rows> && layout::row_map<layout::capacity_rows>);
static_assert(!layout::row_map<layout::ragged>);  // a tag is not a row map

namespace {

/// A routing written out by hand: `experts` and `weights` are (tokens, k), row-major. The
/// slots come from gating::assign_slots under choice-major priority, as the router gives
/// them, and the capacity is the largest load, as the router gives it for a dropless layout.
struct routing {
  index_t tokens, experts;
  int k;
  std::vector<double> logits, scores, weight;
  std::vector<std::int32_t> expert;
  std::vector<std::int64_t> slot, load;
  gating::host_routing r;

  routing(index_t t, index_t e, int k_, std::vector<std::int32_t> experts_of,
          std::vector<double> weights)
      : tokens(t),
        experts(e),
        k(k_),
        logits(t * e),
        scores(t * e),
        weight(std::move(weights)),
        expert(std::move(experts_of)),
        slot(t * k_),
        load(e) {
    r.logits = make_view(logits.data(), t, e);
    r.scores = make_view(scores.data(), t, e);
    r.expert = make_view(expert.data(), t, k);
    r.weight = make_view(weight.data(), t, k);
    r.slot = make_view(slot.data(), t, k);
    r.load = make_view(load.data(), e);
    gating::assign_slots(gating::choice_major{}, as_const(r.expert), r.slot, r.load);
    r.capacity = *std::max_element(load.begin(), load.end());
  }

  /// Runs `offsets` at `alignment`: fills begin and rows, returns the batch's rows.
  index_t offsets(index_t alignment, std::vector<std::int64_t>& begin,
                  std::vector<std::int64_t>& rows) const {
    begin.assign(experts, -7);
    rows.assign(experts, -7);
    return layout::offsets(
        host, layout::ragged{},
        {.tokens = tokens, .experts = experts, .k = k, .row_alignment = alignment}, load, begin,
        rows);
  }
};

/// T = 5, E = 3, k = 2, H = 2.        choice j = 0   j = 1
///                              t0:    e2 (0.75)   e0 (0.25)
///                              t1:    e0 (0.5)    e2 (0.5)
///                              t2:    e2 (0.625)  e1 (0.375)
///                              t3:    e0 (0.875)  e2 (0.125)
///                              t4:    e2 (0.25)   e0 (0.75)
routing five_tokens() {
  return {5,
          3,
          2,
          {2, 0, 0, 2, 2, 1, 0, 2, 2, 0},
          {0.75, 0.25, 0.5, 0.5, 0.625, 0.375, 0.875, 0.125, 0.25, 0.75}};
}

/// What outputs hold before a call: a NaN shows wherever a call failed to write.
double const poison = std::nan("");

/// x_t = (t + 1, 10 (t + 1)).
std::array<float, 10> const x{1, 10, 2, 20, 3, 30, 4, 40, 5, 50};

/// An expert output that says which row it came from: (row + 1, 100 (row + 1)) in the
/// expert's rows, NaN in every other row (padding must never be read).
std::vector<double> marked_output(std::vector<std::int64_t> const& begin,
                                  std::vector<std::int64_t> const& rows, index_t total) {
  std::vector<double> out(total * 2, poison);
  for (std::size_t e = 0; e < begin.size(); ++e)
    for (index_t row = begin[e]; row < begin[e] + rows[e]; ++row) {
      out[row * 2] = static_cast<double>(row + 1);
      out[row * 2 + 1] = 100.0 * static_cast<double>(row + 1);
    }
  return out;
}

}  // namespace

TEST_CASE("ragged by hand: slots, offsets, gather and combine") {
  routing f = five_tokens();
  // Choice-major priority: the 1st choices in token order claim e2 s0 (t0), e0 s0 (t1),
  // e2 s1 (t2), e0 s1 (t3), e2 s2 (t4); then the 2nd choices: e0 s2 (t0), e2 s3 (t1),
  // e1 s0 (t2), e2 s4 (t3), e0 s3 (t4). Loads: e0 4, e1 1, e2 5; nothing is dropped.
  CHECK(f.slot == std::vector<std::int64_t>{0, 2, 0, 3, 1, 0, 1, 4, 2, 3});
  CHECK(f.load == std::vector<std::int64_t>{4, 1, 5});

  // Offsets: the exclusive scan of the loads (alignment 1), 10 = T·k rows in all.
  std::vector<std::int64_t> begin, rows;
  CHECK(f.offsets(1, begin, rows) == 10);
  CHECK(begin == std::vector<std::int64_t>{0, 4, 5});
  CHECK(rows == std::vector<std::int64_t>{4, 1, 5});

  // Gather: row offset_e + slot. e0: t1, t3, t0, t4; e1: t2; e2: t0, t2, t4, t1, t3.
  std::vector<double> dispatched(10 * 2, poison);
  layout::encode(host, layout::ragged{}, f.r, begin, make_view(x.data(), 5, 2),
                 make_view(dispatched.data(), 10, 2));
  CHECK(dispatched == std::vector<double>{2, 20, 4, 40, 1, 10, 5, 50,           // e0
                                          3, 30,                                // e1
                                          1, 10, 3, 30, 5, 50, 2, 20, 4, 40});  // e2

  // Combine with out[row] = (row + 1)·(1, 100). The rows of (t, j): t0 (5, 2), t1 (0, 8),
  // t2 (6, 4), t3 (1, 9), t4 (7, 3), so
  //   y0 = 0.75·6 + 0.25·3 = 5.25     y1 = 0.5·1 + 0.5·9 = 5       y2 = 0.625·7 + 0.375·5 = 6.25
  //   y3 = 0.875·2 + 0.125·10 = 3     y4 = 0.25·8 + 0.75·4 = 5     (× (1, 100))
  std::vector<double> const out = marked_output(begin, rows, 10);
  std::array<float, 10> y;
  y.fill(std::nanf(""));
  layout::decode(host, layout::ragged{}, f.r, begin, make_view(out.data(), 10, 2),
                 make_view(y.data(), 5, 2));
  CHECK(y == std::array<float, 10>{5.25f, 525, 5, 500, 6.25f, 625, 3, 300, 5, 500});
}

TEST_CASE("ragged by hand: backward of decode and encode") {
  routing f = five_tokens();
  std::vector<std::int64_t> begin, rows;
  REQUIRE(f.offsets(1, begin, rows) == 10);
  std::vector<double> const out = marked_output(begin, rows, 10);
  std::array<float, 10> const dy{1, -1, 2, 0.5f, -1, 1, 0.5f, 2, 1, 1};
  std::vector<double> d_out(10 * 2, poison), d_weight(5 * 2, poison);
  layout::decode_backward(host, layout::ragged{}, f.r, begin, make_view(dy.data(), 5, 2),
                          make_view(out.data(), 10, 2), make_view(d_out.data(), 10, 2),
                          make_view(d_weight.data(), 5, 2));
  // d_out[row(t, j)] = w_tj · dy_t:
  CHECK(d_out == std::vector<double>{1,      0.25,    // row 0: t1 j0, 0.5 · (2, 0.5)
                                     0.4375, 1.75,    // row 1: t3 j0, 0.875 · (0.5, 2)
                                     0.25,   -0.25,   // row 2: t0 j1, 0.25 · (1, −1)
                                     0.75,   0.75,    // row 3: t4 j1, 0.75 · (1, 1)
                                     -0.375, 0.375,   // row 4: t2 j1, 0.375 · (−1, 1)
                                     0.75,   -0.75,   // row 5: t0 j0, 0.75 · (1, −1)
                                     -0.625, 0.625,   // row 6: t2 j0, 0.625 · (−1, 1)
                                     0.25,   0.25,    // row 7: t4 j0, 0.25 · (1, 1)
                                     1,      0.25,    // row 8: t1 j1, 0.5 · (2, 0.5)
                                     0.0625, 0.25});  // row 9: t3 j1, 0.125 · (0.5, 2)
  // d_weight(t, j) = ⟨dy_t, out[row]⟩ = (row + 1)·(dy_t0 + 100 dy_t1):
  //   t0: −99·(6, 3)   t1: 52·(1, 9)   t2: 99·(7, 5)   t3: 200.5·(2, 10)   t4: 101·(8, 4)
  CHECK(d_weight == std::vector<double>{-594, -297, 52, 468, 693, 495, 401, 2005, 808, 404});

  // The transpose of the gather: dx_t = Σ_j d_dispatched[row(t, j)], here with
  // d_dispatched[row] = (row + 1, (row + 1)²): t0 rows (5, 2) → (6 + 3, 36 + 9), …
  std::vector<double> d_dispatched(10 * 2);
  for (index_t row = 0; row < 10; ++row) {
    d_dispatched[row * 2] = static_cast<double>(row + 1);
    d_dispatched[row * 2 + 1] = static_cast<double>((row + 1) * (row + 1));
  }
  std::vector<double> dx(5 * 2, poison);
  layout::encode_backward(host, layout::ragged{}, f.r, begin,
                          make_view(std::as_const(d_dispatched).data(), 10, 2),
                          make_view(dx.data(), 5, 2));
  CHECK(dx == std::vector<double>{9, 45, 10, 82, 12, 74, 12, 104, 12, 80});
}

TEST_CASE("ragged with padding: rows padded to a multiple, padding zero and never read") {
  routing f = five_tokens();
  std::vector<std::int64_t> begin, rows;
  // Alignment 4: e0's 4 rows need no padding, e1's 1 row pads to 4, e2's 5 rows pad to 8.
  CHECK(f.offsets(4, begin, rows) == 4 + 4 + 8);
  CHECK(begin == std::vector<std::int64_t>{0, 4, 8});
  CHECK(rows == std::vector<std::int64_t>{4, 1, 5});
  CHECK(16 <= layout::ragged_rows_bound(5, 2, 3, 4));

  std::vector<double> dispatched(16 * 2, poison);
  layout::encode(host, layout::ragged{}, f.r, begin, make_view(x.data(), 5, 2),
                 make_view(dispatched.data(), 16, 2));
  CHECK(dispatched == std::vector<double>{2, 20, 4, 40, 1, 10, 5, 50,         // e0
                                          3, 30, 0, 0,  0, 0,  0, 0,          // e1 + 3 pad
                                          1, 10, 3, 30, 5, 50, 2, 20, 4, 40,  // e2
                                          0, 0,  0, 0,  0, 0});               // 3 pad

  // The same expert outputs as without padding, moved to the padded rows; NaN in padding.
  std::vector<std::int64_t> packed_begin, packed_rows;
  REQUIRE(f.offsets(1, packed_begin, packed_rows) == 10);
  std::vector<double> const packed_out = marked_output(packed_begin, packed_rows, 10);
  std::vector<double> out(16 * 2, poison);
  for (std::size_t e = 0; e < 3; ++e)
    for (index_t i = 0; i < rows[e]; ++i)
      for (index_t h = 0; h < 2; ++h)
        out[(begin[e] + i) * 2 + h] = packed_out[(packed_begin[e] + i) * 2 + h];
  std::array<float, 10> y;
  y.fill(std::nanf(""));
  layout::decode(host, layout::ragged{}, f.r, begin, make_view(std::as_const(out).data(), 16, 2),
                 make_view(y.data(), 5, 2));
  CHECK(y == std::array<float, 10>{5.25f, 525, 5, 500, 6.25f, 625, 3, 300, 5, 500});

  // Backward: padding rows of d_out are zero, and padding in d_dispatched is never read.
  std::array<float, 10> const dy{1, -1, 2, 0.5f, -1, 1, 0.5f, 2, 1, 1};
  std::vector<double> d_out(16 * 2, poison), d_weight(10, poison);
  layout::decode_backward(host, layout::ragged{}, f.r, begin, make_view(dy.data(), 5, 2),
                          make_view(std::as_const(out).data(), 16, 2),
                          make_view(d_out.data(), 16, 2), make_view(d_weight.data(), 5, 2));
  CHECK(d_weight == std::vector<double>{-594, -297, 52, 468, 693, 495, 401, 2005, 808, 404});
  for (index_t row : {5, 6, 7, 13, 14, 15})
    for (index_t h = 0; h < 2; ++h) CHECK(d_out[row * 2 + h] == 0);
  std::vector<double> d_dispatched = d_out;
  for (index_t row : {5, 6, 7, 13, 14, 15})
    for (index_t h = 0; h < 2; ++h) d_dispatched[row * 2 + h] = poison;
  std::vector<double> dx(10, poison);
  layout::encode_backward(host, layout::ragged{}, f.r, begin,
                          make_view(std::as_const(d_dispatched).data(), 16, 2),
                          make_view(dx.data(), 5, 2));
  // Σ_j w_tj dy_t = dy_t: every token's weights sum to one.
  for (std::size_t i = 0; i < dx.size(); ++i) CHECK(dx[i] == dy[i]);
}

TEST_CASE("ragged edges: an expert with no tokens, one expert, one token") {
  SUBCASE("an expert with no tokens takes no row, even padded") {
    // T = 2, E = 3, k = 2: t0 → (e2, e0), t1 → (e0, e2); e1 gets nothing.
    routing f(2, 3, 2, {2, 0, 0, 2}, {0.5, 0.5, 0.25, 0.75});
    std::vector<std::int64_t> begin, rows;
    CHECK(f.offsets(1, begin, rows) == 4);
    CHECK(begin == std::vector<std::int64_t>{0, 2, 2});
    CHECK(rows == std::vector<std::int64_t>{2, 0, 2});
    CHECK(f.offsets(4, begin, rows) == 8);
    CHECK(begin == std::vector<std::int64_t>{0, 4, 4});  // e1's segment is empty
    std::vector<double> dispatched(8 * 2, poison);
    layout::encode(host, layout::ragged{}, f.r, begin, make_view(x.data(), 2, 2),
                   make_view(dispatched.data(), 8, 2));
    // e0: t1 (1st choice), t0 (2nd); e2: t0 (1st), t1 (2nd).
    CHECK(dispatched == std::vector<double>{2, 20, 1, 10, 0, 0, 0, 0, 1, 10, 2, 20, 0, 0, 0, 0});
  }
  SUBCASE("one expert") {
    // T = 3, E = 1, k = 1, alignment 2: rows 0..2 are the tokens in order, row 3 padding.
    routing f(3, 1, 1, {0, 0, 0}, {1, 0.5, 0.25});
    std::vector<std::int64_t> begin, rows;
    CHECK(f.offsets(2, begin, rows) == 4);
    CHECK(begin == std::vector<std::int64_t>{0});
    CHECK(rows == std::vector<std::int64_t>{3});
    std::vector<double> dispatched(4 * 2, poison);
    layout::encode(host, layout::ragged{}, f.r, begin, make_view(x.data(), 3, 2),
                   make_view(dispatched.data(), 4, 2));
    CHECK(dispatched == std::vector<double>{1, 10, 2, 20, 3, 30, 0, 0});
    std::vector<double> out{4, 8, 16, 32, 64, 128, poison, poison};
    std::array<double, 6> y;
    y.fill(poison);
    layout::decode(host, layout::ragged{}, f.r, begin, make_view(std::as_const(out).data(), 4, 2),
                   make_view(y.data(), 3, 2));
    CHECK(y == std::array<double, 6>{4, 8, 8, 16, 16, 32});  // w_t · out[t]
  }
  SUBCASE("one token") {
    // T = 1, E = 3, k = 2: t0 → (e1 0.75, e2 0.25); alignment 16.
    routing f(1, 3, 2, {1, 2}, {0.75, 0.25});
    std::vector<std::int64_t> begin, rows;
    CHECK(f.offsets(16, begin, rows) == 32);
    CHECK(begin == std::vector<std::int64_t>{0, 0, 16});
    CHECK(rows == std::vector<std::int64_t>{0, 1, 1});
    std::vector<double> dispatched(32 * 2, poison);
    layout::encode(host, layout::ragged{}, f.r, begin, make_view(x.data(), 1, 2),
                   make_view(dispatched.data(), 32, 2));
    for (index_t row = 0; row < 32; ++row) {
      bool const used = row == 0 || row == 16;
      CHECK(dispatched[row * 2] == (used ? 1 : 0));
      CHECK(dispatched[row * 2 + 1] == (used ? 10 : 0));
    }
    std::vector<double> out(32 * 2, poison);
    out[0] = 4, out[1] = -4, out[32] = 8, out[33] = 12;
    std::array<float, 2> y;
    y.fill(std::nanf(""));
    layout::decode(host, layout::ragged{}, f.r, begin, make_view(std::as_const(out).data(), 32, 2),
                   make_view(y.data(), 1, 2));
    CHECK(y == std::array<float, 2>{0.75f * 4 + 0.25f * 8, 0.75f * -4 + 0.25f * 12});
  }
}

TEST_CASE("the ragged layout rejects a routing that dropped assignments") {
  routing f = five_tokens();
  std::vector<std::int64_t> begin, rows;
  REQUIRE(f.offsets(1, begin, rows) == 10);
  f.r.capacity = 4;  // e2's load is 5: its 5th assignment would have been dropped
  std::vector<double> dispatched(10 * 2, poison);
  CHECK_THROWS_AS(layout::encode(host, layout::ragged{}, f.r, begin, make_view(x.data(), 5, 2),
                                 make_view(dispatched.data(), 10, 2)),
                  moe::invalid_argument);
  for (double v : dispatched) CHECK(std::isnan(v));  // nothing written
}

TEST_CASE("the host row operations reject views that do not fit, writing nothing") {
  routing f = five_tokens();
  std::vector<std::int64_t> begin, rows;
  REQUIRE(f.offsets(1, begin, rows) == 10);
  std::vector<double> dispatched(10 * 2, poison), d_weight(5 * 2, poison);
  std::vector<float> y(5 * 2, std::nanf(""));
  auto const x_view = make_view(x.data(), 5, 2);
  auto const untouched = [](auto const& v) {
    return std::all_of(v.begin(), v.end(), [](auto e) { return std::isnan(e); });
  };
  // 9 rows where the offsets need 10: row 9 (e2's last) would be written past the end.
  CHECK(test::rejected_argument([&] {
          layout::encode(host, layout::ragged{}, f.r, begin, x_view,
                         make_view(dispatched.data(), 9, 2));
        }) == "dispatched");
  // x of 4 tokens for a routing of 5.
  CHECK(test::rejected_argument([&] {
          layout::encode(host, layout::ragged{}, f.r, begin, make_view(x.data(), 4, 2),
                         make_view(dispatched.data(), 10, 2));
        }) == "x");
  CHECK(untouched(dispatched));
  // expert_out one column narrower than y.
  CHECK(test::rejected_argument([&] {
          layout::decode(host, layout::ragged{}, f.r, begin,
                         make_view(std::as_const(dispatched).data(), 10, 1),
                         make_view(y.data(), 5, 2));
        }) == "expert_out");
  CHECK(untouched(y));
  // d_weight of (tokens, 1) for k = 2.
  std::vector<double> d_expert_out(10 * 2, poison);
  CHECK(test::rejected_argument([&] {
          layout::decode_backward(
              host, layout::ragged{}, f.r, begin, make_view(std::as_const(y).data(), 5, 2),
              make_view(std::as_const(dispatched).data(), 10, 2),
              make_view(d_expert_out.data(), 10, 2), make_view(d_weight.data(), 5, 1));
        }) == "d_weight");
  CHECK(untouched(d_expert_out));
  // An expert id past the routing's experts.
  f.expert[3] = 7;
  CHECK(test::rejected_argument([&] {
          layout::encode(host, layout::ragged{}, f.r, begin, x_view,
                         make_view(dispatched.data(), 10, 2));
        }) == "r.expert");
  CHECK(untouched(dispatched));
}

TEST_CASE("both layouts are row maps: capacity's rows through its offsets") {
  // The segment row map over capacity's offsets (begin e·C, rows min(load, C)) is the
  // capacity layout's own row map, e·C + slot while slot < C; the layer relies on it.
  routing f = five_tokens();
  for (index_t c : {1, 2, 4, 5, 6}) {
    f.r.capacity = c;
    std::vector<std::int64_t> begin(3), rows(3);
    layout::layout_args const a{.tokens = 5, .experts = 3, .k = 2, .capacity = c};
    CHECK(layout::offsets(host, layout::capacity{}, a, f.load, begin, rows) == 3 * c);
    layout::segment_rows const segments{as_const(f.r.expert), as_const(f.r.slot), begin, rows};
    auto const capacity_rows = layout::row_map_of(layout::capacity{}, f.r);
    for (index_t t = 0; t < 5; ++t)
      for (index_t j = 0; j < 2; ++j) {
        CHECK(segments(t, j) == capacity_rows(t, j));
        CHECK((capacity_rows(t, j) == layout::no_row) == !f.r.kept(t, j));
      }
  }
}
