// SPDX-License-Identifier: Apache-2.0
// The C++ side of the conformance suite (tests/conformance/*.py): reads cases as JSON on
// standard input, runs each through the host backend in double precision, and writes the
// results as JSON on standard output. JSON numbers carry doubles exactly both ways (Python
// writes the shortest representation that round-trips, nlohmann::json reads it with strtod
// and writes 17 significant digits).
//
//   {"cases": [{"gate": "<name>", "logits": [[...]], "args": {...}, "d_weight": [[...]]}]}
//
// A case gives either "logits" (T, E), routed as one-hot tokens through W_gate = logits so
// that the router sees those logits exactly, or "x" (T, H) and "w_gate" (H, E). "args" sets
// gating::gate_args fields by name. With "d_weight" (T, k) the case also runs the backward
// of ⟨d_weight, weight⟩ + aux_loss_coef · aux + z_loss_coef · z and returns d_w_gate and dx.
// The gate is one of the names in `gates()` below: the presets, and the compositions that
// match a framework's flags.

#include <moe/gating.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <exception>
#include <functional>
#include <iostream>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace {

using namespace moe;
using nlohmann::json;
namespace g = moe::gating;

/// A (rows, cols) matrix read from a JSON list of rows.
struct matrix {
  index_t rows = 0, cols = 0;
  std::vector<double> values;

  static matrix from(json const& rows_json) {
    matrix m;
    m.rows = static_cast<index_t>(rows_json.size());
    m.cols = m.rows > 0 ? static_cast<index_t>(rows_json.at(0).size()) : 0;
    for (auto const& row : rows_json) {
      if (static_cast<index_t>(row.size()) != m.cols)
        throw std::runtime_error("ragged matrix in the request");
      for (auto const& v : row) m.values.push_back(v.get<double>());
    }
    return m;
  }
  static matrix identity(index_t n) {
    matrix m{n, n, std::vector<double>(static_cast<std::size_t>(n * n))};
    for (index_t i = 0; i < n; ++i) m.values[static_cast<std::size_t>(i * n + i)] = 1;
    return m;
  }
  [[nodiscard]] matrix_view<double const> view() const {
    return make_view(values.data(), rows, cols);
  }
};

template <class View>
json rows_of(View v) {
  json out = json::array();
  for (index_t i = 0; i < v.extent(0); ++i) {
    json row = json::array();
    for (index_t j = 0; j < v.extent(1); ++j) row.push_back(v(i, j));
    out.push_back(std::move(row));
  }
  return out;
}

g::renormalize renormalize_of(std::string const& name) {
  if (name == "none") return g::renormalize::none;
  if (name == "before_drops") return g::renormalize::before_drops;
  if (name == "after_drops") return g::renormalize::after_drops;
  throw std::runtime_error("unknown normalize: " + name);
}

/// gate_args from the case's "args"; `bias` holds the expert bias the span points at.
g::gate_args args_of(json const& a, index_t tokens, index_t experts, std::vector<float>& bias) {
  g::gate_args args{.tokens = tokens, .experts = experts};
  args.k = a.value("k", 0);
  args.capacity_factor = a.value("capacity_factor", 1.0);
  args.eval_capacity_factor = a.value("eval_capacity_factor", 1.0);
  args.capacity_alignment = a.value("capacity_alignment", index_t{1});
  args.normalize = renormalize_of(a.value("normalize", std::string("none")));
  args.aux_loss_coef = a.value("aux_loss_coef", 0.0f);
  args.z_loss_coef = a.value("z_loss_coef", 0.0f);
  args.training = a.value("training", true);
  args.min_capacity = a.value("min_capacity", index_t{4});
  args.groups = a.value("groups", index_t{1});
  args.scaling_factor = a.value("scaling_factor", 1.0f);
  args.seed = a.value("seed", std::uint64_t{0});
  if (a.contains("expert_bias")) {
    bias = a.at("expert_bias").get<std::vector<float>>();
    args.expert_bias = bias;
  }
  return args;
}

/// Routes one case through gate G (and its backward when asked).
template <class G>
json run_gate(json const& c) {
  matrix x, w_gate;
  if (c.contains("logits")) {
    w_gate = matrix::from(c.at("logits"));
    x = matrix::identity(w_gate.rows);
  } else {
    x = matrix::from(c.at("x"));
    w_gate = matrix::from(c.at("w_gate"));
  }
  index_t const tokens = x.rows, hidden = x.cols, experts = w_gate.cols;
  std::vector<float> bias;
  g::gate_args const args = args_of(c.value("args", json::object()), tokens, experts, bias);
  G const gate{};
  int const k = gate.k(args);

  workspace_carver counter;
  (void)g::carve_host_routing(counter, tokens, tokens, experts, k);
  host_buffer buffer(counter.bytes());
  workspace_carver carver(buffer.view());
  g::host_routing r = g::carve_host_routing(carver, tokens, tokens, experts, k);
  g::routing_summary const s = g::route(host, gate, args, x.view(), w_gate.view(), r);

  json out{{"capacity", s.capacity}, {"dropped", s.dropped},   {"aux_loss", s.aux_loss},
           {"z_loss", s.z_loss},     {"unrouted", s.unrouted}, {"max_load", s.max_load}};
  out["expert"] = rows_of(r.expert);
  out["weight"] = rows_of(r.weight);
  out["slot"] = rows_of(r.slot);
  out["scores"] = rows_of(r.scores);
  json kept = json::array(), load = json::array();
  for (index_t t = 0; t < tokens; ++t) {
    json row = json::array();
    for (int j = 0; j < k; ++j) row.push_back(r.kept(t, j));
    kept.push_back(std::move(row));
  }
  for (index_t e = 0; e < experts; ++e) load.push_back(r.load(e));
  out["kept"] = std::move(kept);
  out["load"] = std::move(load);

  if (c.contains("d_weight")) {
    matrix const d_weight = matrix::from(c.at("d_weight"));
    std::vector<double> d_logits(static_cast<std::size_t>(tokens * experts)),
        dx(static_cast<std::size_t>(tokens * hidden)),
        d_w_gate(static_cast<std::size_t>(hidden * experts));
    g::route_backward(host, gate, args, r, d_weight.view(), x.view(), w_gate.view(),
                      make_view(d_logits.data(), tokens, experts),
                      make_view(dx.data(), tokens, hidden),
                      make_view(d_w_gate.data(), hidden, experts));
    out["dx"] = rows_of(make_view(std::as_const(dx).data(), tokens, hidden));
    out["d_w_gate"] = rows_of(make_view(std::as_const(d_w_gate).data(), hidden, experts));
  }
  return out;
}

using gate_table = std::map<std::string, std::function<json(json const&)>>;

/// Megatron-Core's TopKRouter under capacity policy Capacity and aux loss Aux, as
/// "<prefix>_<score>_<drop policy>": score softmax_topk (pre-softmax off), softmax
/// (pre-softmax on) or sigmoid (renormalised over the k when k > 1); drop policy "probs"
/// (by_score) or "position" (token_major); and the group-limited selections of the tests.
template <class Capacity, class Aux>
void add_megatron_gates(std::string const& prefix, gate_table& table) {
  using sigmoid_renormalized = g::fixed_renormalization<g::renormalize::before_drops, 2>;
  auto const add = [&]<class Priority>(std::string const& policy, Priority) {
    table.emplace(prefix + "_softmax_topk_" + policy,
                  run_gate<g::with<g::top_any<g::softmax_topk, Priority>, Capacity, Aux>>);
    table.emplace(prefix + "_softmax_" + policy,
                  run_gate<g::with<g::top_any<g::softmax, Priority>, Capacity, Aux>>);
    table.emplace(
        prefix + "_sigmoid_" + policy,
        run_gate<g::with<g::top_any<g::sigmoid, Priority>, Capacity, Aux, sigmoid_renormalized>>);
    table.emplace(
        prefix + "_softmax_groups_4_2_" + policy,
        run_gate<g::with<g::top_any<g::softmax, Priority>, g::group_limited<4, 2>, Capacity, Aux>>);
    table.emplace(prefix + "_sigmoid_groups_4_2_" + policy,
                  run_gate<g::with<g::top_any<g::sigmoid, Priority>, g::group_limited<4, 2>,
                                   Capacity, Aux, sigmoid_renormalized>>);
    table.emplace(prefix + "_sigmoid_groups_8_4_" + policy,
                  run_gate<g::with<g::top_any<g::sigmoid, Priority>, g::group_limited<8, 4>,
                                   Capacity, Aux, sigmoid_renormalized>>);
  };
  add("probs", g::by_score{});
  add("position", g::token_major{});
}

/// The gates a case may name.
gate_table const& gates() {
  // DeepSpeed's topkgating: top-k of a softmax, capacity ⌈S/E · f · k⌉, the weights
  // renormalised over the kept experts (gate_args::normalize = after_drops, at every k), its
  // l_aux E² / k · mean_e(me · ce) with ce over all k choices: switch_aux.
  using deepspeed_topk_probs =
      g::with<g::top_any<g::softmax, g::by_score>, g::deepspeed_capacity, g::switch_aux>;
  using deepspeed_topk_position = g::with<deepspeed_topk_probs, g::token_major>;
  static gate_table const table = [] {
    gate_table t{
        {"deepspeed", run_gate<g::preset::deepspeed>},
        {"deepspeed_top2", run_gate<g::preset::deepspeed_top2>},
        {"deepspeed_topk_probs", run_gate<deepspeed_topk_probs>},
        {"deepspeed_topk_position", run_gate<deepspeed_topk_position>},
        {"megatron", run_gate<g::preset::megatron>},
    };
    add_megatron_gates<g::megatron_capacity, g::switch_aux>("megatron", t);
    // capacity_factor None; seq_aux_loss over the local groups (one sequence each).
    add_megatron_gates<g::dropless, g::switch_aux>("megatron_dropless", t);
    add_megatron_gates<g::dropless, g::sequence_aux>("megatron_dropless_seq", t);
    return t;
  }();
  return table;
}

}  // namespace

int main() {
  try {
    json const request = json::parse(std::cin);
    json results = json::array();
    for (json const& c : request.at("cases")) {
      std::string const name = c.at("gate").get<std::string>();
      auto const found = gates().find(name);
      if (found == gates().end()) throw std::runtime_error("unknown gate: " + name);
      try {
        results.push_back(found->second(c));
      } catch (moe::error const& e) {
        results.push_back(json{{"error", e.what()}});
      }
    }
    std::cout << json{{"results", std::move(results)}}.dump() << '\n';
    return 0;
  } catch (std::exception const& e) {
    std::cerr << "conformance_driver: " << e.what() << '\n';
    return 1;
  }
}
