// SPDX-License-Identifier: Apache-2.0
#pragma once
// The harness of layer_args_fuzz (see layer_args_fuzz.cpp): decoding the input into a
// fuzz_case, the views of a call, and the checks of one rank and of a simulated world.

#include <moe/comm.hpp>
#include <moe/core/checked.hpp>
#include <moe/expert.hpp>
#include <moe/gating.hpp>
#include <moe/layer.hpp>

#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace moe_fuzz {

using namespace moe;
using comm::simulated_world;

[[noreturn]] inline void fail(char const* what, std::string const& detail = {}) {
  std::fprintf(stderr, "layer_args_fuzz: %s%s%s\n", what, detail.empty() ? "" : ": ",
               detail.c_str());
  std::abort();
}

/// Runs `f`; returns false when it threw moe::error, aborts on any other exception.
template <class F>
bool succeeds(F&& f, std::string* why = nullptr) {
  try {
    f();
    return true;
  } catch (moe::error const& e) {
    if (why) *why = e.what();
    return false;
  } catch (std::exception const& e) {
    fail("an exception that is not a moe::error", e.what());
  } catch (...) {
    fail("an exception that is not a std::exception");
  }
}

inline constexpr std::size_t workspace_cap = std::size_t{64} << 20;  // bytes we allocate at most
// Multiply-adds one call may cost on the host (T·k·H·F for the experts, T·H·E for the router,
// E·H·F to fill the weights): past it the calls are not run, so that no input is slow enough
// (seconds under the sanitizers) to pass for a hang.
inline constexpr index_t work_cap = index_t{1} << 20;

// --- decoding ------------------------------------------------------------------------------

inline index_t decode_size(FuzzedDataProvider& in, index_t small_max, bool huge) {
  static constexpr index_t interesting[] = {0,
                                            -1,
                                            1,
                                            2,
                                            3,
                                            1 << 20,
                                            std::numeric_limits<std::int32_t>::max(),
                                            index_t{1} << 26,
                                            index_t{1} << 52,
                                            (index_t{1} << 52) + 1,
                                            index_t{1} << 62,
                                            std::numeric_limits<index_t>::max(),
                                            std::numeric_limits<index_t>::min()};
  if (huge && in.ConsumeBool()) {
    return in.ConsumeBool() ? in.PickValueInArray(interesting) : in.ConsumeIntegral<index_t>();
  }
  // Mostly 1..small_max; sometimes 0 or -1.
  index_t const v = in.ConsumeIntegralInRange<index_t>(-2, small_max);
  return v < -1 ? 1 : v;
}

inline float decode_float(FuzzedDataProvider& in, float usual) {
  static constexpr float interesting[] = {0.0f,
                                          -0.0f,
                                          1.0f,
                                          -1.0f,
                                          0.5f,
                                          1.25f,
                                          2.0f,
                                          -0.75f,
                                          1e-30f,
                                          1e30f,
                                          -1e30f,
                                          std::numeric_limits<float>::max(),
                                          std::numeric_limits<float>::denorm_min(),
                                          std::numeric_limits<float>::infinity(),
                                          -std::numeric_limits<float>::infinity(),
                                          std::numeric_limits<float>::quiet_NaN()};
  switch (in.ConsumeIntegralInRange(0, 7)) {
    case 0:
      return in.PickValueInArray(interesting);
    case 1:
      return in.ConsumeFloatingPointInRange(-4.0f, 4.0f);
    default:
      return usual;
  }
}

/// How a view of a call is spoilt. `right` most of the time.
enum class fault { right, null_data, grow_first, shrink_first, grow_last, empty };

inline fault decode_fault(FuzzedDataProvider& in) {
  int const v = in.ConsumeIntegralInRange(0, 40);
  return v > 5 ? fault::right : static_cast<fault>(v);
}

/// What the input says about one rank's calls.
struct call_plan {
  index_t tokens = 1;  // rows of x
  fault x = fault::right, y = fault::right, gate_weight = fault::right;
  fault w1 = fault::right, w2 = fault::right, b1 = fault::right, b2 = fault::right;
  bool biases = true;
  std::size_t ws_short = 0;  // bytes missing from the workspace
  bool ws_null = false;
  // backward
  fault dy = fault::right, dx = fault::right, g_gate = fault::right, g_w1 = fault::right,
        g_w2 = fault::right;
  bool g_biases = true;
  bool bwd_fresh_ws = false;  // backward on a workspace no forward wrote
  std::uint64_t seed = 0;

  [[nodiscard]] bool forward_views_right() const {
    return x == fault::right && y == fault::right && gate_weight == fault::right &&
           w1 == fault::right && w2 == fault::right && b1 == fault::right && b2 == fault::right &&
           ws_short == 0 && !ws_null;
  }
  [[nodiscard]] bool backward_views_right() const {
    return dy == fault::right && dx == fault::right && g_gate == fault::right &&
           g_w1 == fault::right && g_w2 == fault::right && !bwd_fresh_ws;
  }
};

inline call_plan decode_call(FuzzedDataProvider& in, index_t max_tokens) {
  call_plan c;
  c.tokens = in.ConsumeIntegralInRange(0, 5) == 0 ? in.ConsumeIntegralInRange<index_t>(0, 20)
                                                  : std::max<index_t>(max_tokens, 1);
  c.x = decode_fault(in);
  c.y = decode_fault(in);
  c.gate_weight = decode_fault(in);
  c.w1 = decode_fault(in);
  c.w2 = decode_fault(in);
  c.b1 = decode_fault(in);
  c.b2 = decode_fault(in);
  c.biases = in.ConsumeBool();
  if (in.ConsumeIntegralInRange(0, 15) == 0) c.ws_short = in.ConsumeIntegralInRange(1, 4096);
  c.ws_null = in.ConsumeIntegralInRange(0, 31) == 0;
  c.dy = decode_fault(in);
  c.dx = decode_fault(in);
  c.g_gate = decode_fault(in);
  c.g_w1 = decode_fault(in);
  c.g_w2 = decode_fault(in);
  c.g_biases = in.ConsumeBool();
  c.bwd_fresh_ws = in.ConsumeIntegralInRange(0, 31) == 0;
  c.seed = in.ConsumeIntegral<std::uint64_t>();
  return c;
}

struct fuzz_case {
  layer_args args;
  std::vector<float> bias;  // expert_bias's storage
  bool huge = false;
  comm::topology topology{};
  bool two_dh = false;
  std::vector<call_plan> calls;  // one per rank
};

inline fuzz_case decode_case(FuzzedDataProvider& in) {
  fuzz_case c;
  c.huge = in.ConsumeIntegralInRange(0, 7) == 0;
  layer_args& a = c.args;
  a.gate.tokens = decode_size(in, 12, c.huge);
  a.hidden = decode_size(in, 6, c.huge);
  a.ffn = decode_size(in, 6, c.huge);
  a.gate.experts = decode_size(in, 8, c.huge);
  a.gate.k = in.ConsumeIntegralInRange(-1, 9);
  a.gate.capacity_factor = decode_float(in, 1.0f);
  a.gate.capacity_alignment = in.ConsumeIntegralInRange(0, 7) == 0 ? decode_size(in, 8, true) : 1;
  a.expert_row_alignment = in.ConsumeIntegralInRange(0, 5) == 0 ? decode_size(in, 16, true) : 1;
  a.gate.normalize = static_cast<gating::renormalize>(in.ConsumeIntegralInRange(0, 2));
  a.gate.aux_loss_coef = decode_float(in, 0.01f);
  a.gate.z_loss_coef = decode_float(in, 0.0f);
  a.gate.training = in.ConsumeBool();
  a.gate.eval_capacity_factor = decode_float(in, 1.0f);
  a.gate.min_capacity = in.ConsumeIntegralInRange(0, 7) == 0 ? decode_size(in, 16, true) : 4;
  a.gate.groups = in.ConsumeIntegralInRange(0, 3) == 0 ? decode_size(in, 4, c.huge) : 1;
  a.gate.scaling_factor = decode_float(in, 1.0f);
  a.gate.jitter = decode_float(in, 0.0f);
  a.gate.jitter_on =
      in.ConsumeBool() ? gating::jitter_target::input : gating::jitter_target::logits;
  a.gate.gate_noise = decode_float(in, 0.0f);
  a.gate.seed = in.ConsumeIntegral<std::uint64_t>();
  switch (in.ConsumeIntegralInRange(0, 5)) {
    case 1:  // one value per expert
      c.bias.resize(static_cast<std::size_t>(std::clamp<index_t>(a.gate.experts, 0, 64)));
      for (auto& b : c.bias) b = decode_float(in, in.ConsumeFloatingPointInRange(-1.0f, 1.0f));
      a.gate.expert_bias = {c.bias.data(), c.bias.size()};
      break;
    case 2:  // null data behind a non-empty span
      a.gate.expert_bias = {static_cast<float const*>(nullptr),
                            in.ConsumeIntegralInRange<std::size_t>(0, 9)};
      break;
    case 3:  // the wrong length
      c.bias.resize(in.ConsumeIntegralInRange<std::size_t>(0, 9));
      a.gate.expert_bias = {c.bias.data(), c.bias.size()};
      break;
    default:
      break;  // none
  }
  int const ranks = in.ConsumeIntegralInRange(0, 3) == 0 ? in.ConsumeIntegralInRange(2, 4) : 1;
  c.topology = ranks == 4 && in.ConsumeBool() ? comm::topology{2, 2}
               : in.ConsumeBool()             ? comm::topology{ranks, 1}
                                              : comm::topology{1, ranks};
  c.two_dh = in.ConsumeBool();
  for (int r = 0; r < ranks; ++r) c.calls.push_back(decode_call(in, a.gate.tokens));
  return c;
}

// --- views ---------------------------------------------------------------------------------

inline constexpr std::uint64_t poison_bits = 0x7ff4deadbeef0bad;  // a NaN no computation makes

/// Storage for a view with (possibly spoilt) extents; exactly as many elements as the view
/// claims, so that a read past it is an AddressSanitizer report.
template <std::size_t Rank>
struct owned {
  std::vector<double> data;
  tensor_view<double, Rank> view;
  std::vector<double> before;  // a copy taken after poisoning, for `untouched`

  owned() = default;
  owned(std::array<index_t, Rank> extents, fault f, std::uint64_t& rng, bool poison) {
    switch (f) {
      case fault::grow_first:
        ++extents[0];
        break;
      case fault::shrink_first:
        extents[0] = std::max<index_t>(extents[0] - 1, 0);
        break;
      case fault::grow_last:
        ++extents[Rank - 1];
        break;
      case fault::empty:
        extents[0] = 0;
        break;
      default:
        break;
    }
    index_t n = 1;
    for (index_t e : extents) n *= e;
    data.resize(static_cast<std::size_t>(n));
    for (auto& v : data) {
      if (poison) {
        std::memcpy(&v, &poison_bits, sizeof v);
      } else {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        v = static_cast<double>(static_cast<std::int64_t>(rng >> 11) % 2001 - 1000) / 1000.0;
      }
    }
    before = data;
    double* const p = f == fault::null_data ? nullptr : data.data();
    view = std::apply([&](auto... e) { return tensor_view<double, Rank>(p, e...); }, extents);
  }
  [[nodiscard]] bool untouched() const {
    return data.empty() ||
           std::memcmp(data.data(), before.data(), data.size() * sizeof(double)) == 0;
  }
  [[nodiscard]] auto cview() const {
    return cuda::std::mdspan<double const, cuda::std::dextents<index_t, Rank>>(view.data_handle(),
                                                                               view.mapping());
  }
};

/// The first Rank extents of a parameter.
template <std::size_t Rank>
std::array<index_t, Rank> extents_of(parameter_shape const& p) {
  std::array<index_t, Rank> extents{};
  for (std::size_t a = 0; a < Rank; ++a) extents[a] = p.axes[a].extent;
  return extents;
}

/// A layer's parameters (or gradients) in the extents of its `parameter_shapes` (W_gate,
/// W1, b1, W2, b2), each spoilt as its fault says: faults are in the order W_gate, W1, W2,
/// b1, b2.
template <class Expert>
struct owned_bank {
  owned<2> gate_weight;
  owned<3> w1, w2;
  owned<2> b1, b2;

  owned_bank(std::vector<parameter_shape> const& shapes, bool biases, std::array<fault, 5> faults,
             std::uint64_t& rng, bool poison)
      : gate_weight(extents_of<2>(shapes[0]), faults[0], rng, poison),
        w1(extents_of<3>(shapes[1]), faults[1], rng, poison),
        w2(extents_of<3>(shapes[3]), faults[2], rng, poison) {
    if (biases) {
      b1 = owned<2>(extents_of<2>(shapes[2]), faults[3], rng, poison);
      b2 = owned<2>(extents_of<2>(shapes[4]), faults[4], rng, poison);
    }
  }

  template <class U>
  layer_params<U, Expert> views() const {
    auto v = [](auto const& o) {
      using view_t = decltype(o.view);
      using out_t = cuda::std::mdspan<U, typename view_t::extents_type>;
      return out_t(const_cast<double*>(o.view.data_handle()), o.view.mapping());
    };
    return {v(gate_weight), {v(w1), v(b1), v(w2), v(b2)}};
  }
  [[nodiscard]] bool untouched() const {
    return gate_weight.untouched() && w1.untouched() && w2.untouched() && b1.untouched() &&
           b2.untouched();
  }
};

// --- one rank's calls ----------------------------------------------------------------------

/// What one rank saw; read after the world has joined.
struct rank_report {
  bool forward_accepted = false;  // can_implement(views) said yes
  bool forward_threw = false;
  bool forward_wrote_when_rejected = false;
  bool backward_ran = false, backward_threw = false, backward_wrote_when_rejected = false;
  std::string why;
};

/// Runs the rank's calls; false when its workspace or its work is too large to try.
template <class Layer>
bool run_calls(Layer const& layer, layer_args const& a, call_plan const& c, rank_report& report) {
  std::size_t const ws_bytes = layer.workspace_bytes(host);
  if (ws_bytes > workspace_cap) return false;
  index_t const k = std::clamp<index_t>(a.gate.k, 2, 32);
  index_t const work = moe::checked_add(
      moe::checked_mul(moe::checked_mul(moe::checked_mul(a.gate.tokens, k), a.hidden), a.ffn),
      moe::checked_mul(moe::checked_mul(a.hidden, a.gate.experts), std::max(a.gate.tokens, a.ffn)));
  if (work > work_cap) return false;
  std::uint64_t rng = c.seed;
  owned<2> x({c.tokens, a.hidden}, c.x, rng, false);
  owned<2> y({c.tokens, a.hidden}, c.y, rng, true);
  auto const shapes = layer.parameter_shapes();
  owned_bank<typename Layer::expert_type> p(shapes, c.biases,
                                            {c.gate_weight, c.w1, c.w2, c.b1, c.b2}, rng, false);
  std::vector<std::byte> ws(ws_bytes - std::min(ws_bytes, c.ws_short), std::byte{0x5a});
  workspace const w{c.ws_null ? nullptr : ws.data(), ws.size()};

  auto const params = p.template views<double const>();
  report.forward_accepted =
      layer.template can_implement<double>(moe::host, x.cview(), params, y.view, w).ok();
  report.forward_threw = true;  // until forward returns
  auto forward = [&] {
    try {
      layer.forward(host, x.cview(), params, y.view, w);
    } catch (moe::error const&) {
      report.forward_wrote_when_rejected = !report.forward_accepted && !y.untouched();
      throw;
    }
  };
  if (!succeeds(forward, &report.why)) return true;
  report.forward_threw = false;
  auto const stats = layer.stats(host, w);
  if (stats.load.size() != static_cast<std::size_t>(a.gate.experts))
    fail("stats.load has a wrong size");
  if (!a.gate.training) return true;

  report.backward_ran = true;
  report.backward_threw = true;
  // Backward's right extents are those of the x forward ran on, which a spoilt x (grown
  // from c.tokens and matched by a grown y) may have changed.
  index_t const forward_tokens = x.view.extent(0);
  owned<2> dy({forward_tokens, a.hidden}, c.dy, rng, false);
  owned<2> dx({forward_tokens, a.hidden}, c.dx, rng, true);
  owned_bank<typename Layer::expert_type> g(
      shapes, c.g_biases, {c.g_gate, c.g_w1, c.g_w2, fault::right, fault::right}, rng, true);
  std::vector<std::byte> fresh(c.bwd_fresh_ws ? ws.size() : 0, std::byte{0});
  workspace const bw = c.bwd_fresh_ws ? workspace{fresh.data(), fresh.size()} : w;
  auto backward = [&] {
    try {
      layer.backward(host, dy.cview(), params, dx.view, g.template views<double>(), bw);
    } catch (moe::error const&) {
      report.backward_wrote_when_rejected =
          !c.backward_views_right() && (!dx.untouched() || !g.untouched());
      throw;
    }
  };
  if (succeeds(backward, &report.why)) report.backward_threw = false;
  return true;
}

template <class Gate, class Layout, class Expert>
void fuzz_one_rank(fuzz_case const& c) {
  using layer_t = moe::layer<Gate, Layout, comm::single_rank, Expert>;
  layer_args const& a = c.args;
  bool const implementable = layer_t::can_implement(a).ok();
  std::unique_ptr<layer_t> layer;
  std::string why;
  bool const built = succeeds([&] { layer = std::make_unique<layer_t>(a); }, &why);
  if (built != implementable)
    fail(built ? "the constructor accepted what can_implement rejected"
               : "can_implement accepted what the constructor rejected",
         why);
  if (!built) return;
  std::size_t const ws_bytes = layer->workspace_bytes(host);
  // The workspace keeps a copy of x: fewer bytes means a size computation wrapped.
  if (static_cast<double>(ws_bytes) <
      static_cast<double>(a.gate.tokens) * static_cast<double>(a.hidden) * sizeof(double))
    fail("workspace_bytes is smaller than the input it keeps");
  rank_report report;
  if (!run_calls(*layer, a, c.calls[0], report)) return;
  call_plan const& call = c.calls[0];
  if (report.forward_wrote_when_rejected) fail("a rejected forward wrote y", report.why);
  if (report.forward_accepted && report.forward_threw)
    fail("can_implement accepted a forward call that then threw", report.why);
  if (!report.forward_accepted && !report.forward_threw)
    fail("forward ran a call that can_implement rejected");
  if (report.backward_wrote_when_rejected) fail("a rejected backward wrote an output", report.why);
  if (report.backward_ran && report.backward_threw && call.backward_views_right())
    fail("backward threw on right arguments", report.why);
}

template <class Gate, class Layout, class Collective, class Expert>
void fuzz_world(fuzz_case const& c) {
  using layer_t = moe::layer<Gate, Layout, Collective, Expert>;
  layer_args const& a = c.args;
  if (!layer_t::can_implement(a).ok()) return;  // the one-rank path checks the rejection
  simulated_world world(c.topology);
  int const p = world.size();
  std::vector<rank_report> reports(static_cast<std::size_t>(p));
  std::vector<char> built(static_cast<std::size_t>(p), 0);
  std::string why;
  bool const ok = succeeds(
      [&] {
        world.run([&](simulated_world::rank_communicator& comm) {
          auto const r = static_cast<std::size_t>(comm.rank());
          layer_t layer(a, comm);
          built[r] = 1;
          if (!run_calls(layer, a, c.calls[r], reports[r])) return;
          if (reports[r].forward_threw || reports[r].backward_threw)
            throw moe::invalid_argument("fuzz",
                                        "rank " + std::to_string(r) + ": " + reports[r].why);
        });
      },
      &why);
  if (ok || std::count(built.begin(), built.end(), 1) == 0) return;
  // Rejections must be clean, whatever the other ranks did.
  for (auto const& r : reports) {
    if (r.forward_wrote_when_rejected) fail("a rejected forward wrote y", r.why);
    if (r.backward_wrote_when_rejected) fail("a rejected backward wrote an output", r.why);
  }
  // When every rank's call is right, nothing may throw, whatever each rank's tokens (none
  // included, and different on each rank with either layout).
  bool all_right = true;
  for (int r = 0; r < p; ++r) {
    auto const& call = c.calls[static_cast<std::size_t>(r)];
    auto const& report = reports[static_cast<std::size_t>(r)];
    all_right = all_right && report.forward_accepted && call.forward_views_right() &&
                (!a.gate.training || call.backward_views_right());
  }
  if (all_right && std::count(built.begin(), built.end(), 1) == p)
    fail("a world of right calls threw", why);
}

template <class Gate, class Layout, class Expert>
void fuzz_layer(fuzz_case const& c) {
  if (c.calls.size() == 1)
    fuzz_one_rank<Gate, Layout, Expert>(c);
  else if (c.two_dh)
    fuzz_world<Gate, Layout, comm::all_to_all_2dh, Expert>(c);
  else
    fuzz_world<Gate, Layout, comm::linear_all_to_all, Expert>(c);
}

template <class Gate, class Expert>
void fuzz_gate(fuzz_case const& c, bool ragged) {
  if constexpr (gating::is_dropless<Gate>) {
    fuzz_layer<Gate, layout::ragged, Expert>(c);
  } else {
    if (ragged)
      fuzz_layer<Gate, layout::ragged, Expert>(c);
    else
      fuzz_layer<Gate, layout::capacity, Expert>(c);
  }
}

template <class Expert>
void fuzz_expert(fuzz_case const& c, int gate, bool ragged) {
  switch (gate) {
    case 0:
      fuzz_gate<gating::top_k<2>, Expert>(c, ragged);
      break;
    case 1:
      fuzz_gate<gating::top_any<>, Expert>(c, ragged);
      break;
    case 2:
      fuzz_gate<gating::preset::gshard, Expert>(c, ragged);
      break;
    case 3:
      fuzz_gate<gating::preset::deepspeed, Expert>(c, ragged);
      break;
    default:
      fuzz_gate<gating::preset::mixtral, Expert>(c, ragged);
      break;
  }
}

/// Defined in layer_args_fuzz_<expert>.cpp (two translation units, so
/// that the heavy layer instantiations build in parallel).
void fuzz_ffn_layers(fuzz_case const& c, int gate, bool ragged);
void fuzz_glu_layers(fuzz_case const& c, int gate, bool ragged);

}  // namespace moe_fuzz
