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
//
// A case with "layer" instead of "gate" runs a whole layer (the host backend, one rank) in
// double: "x" (T, H), "w_gate" (H, E), the expert's weights as flat row-major lists ("w13"
// (E, H, 2F) [gate | up] for a GLU expert, "w1" (E, H, F) for an FFN one; "w2" (E, F, H)),
// "ffn" F, "dy" (T, H) and "args". It returns "y", "dx", "d_w_gate", the expert weights'
// gradients under the same names with "d_", "capacity", "dropped" and "load".

#include <moe/moe.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <exception>
#include <functional>
#include <iostream>
#include <map>
#include <string>
#include <type_traits>
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
  args.aux_loss_coef = a.value("aux_loss_coef", 0.0);
  args.z_loss_coef = a.value("z_loss_coef", 0.0);
  args.training = a.value("training", true);
  args.min_capacity = a.value("min_capacity", index_t{4});
  args.groups = a.value("groups", index_t{1});
  args.scaling_factor = a.value("scaling_factor", 1.0);
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

/// A flat list of doubles.
std::vector<double> flat(json const& list) {
  return list.get<std::vector<double>>();
}

/// Runs one forward and backward of layer L (host, one rank) on the case's tensors.
template <class L>
json run_layer(json const& c) {
  using expert_t = typename L::expert_type;
  constexpr bool gated = std::is_same_v<expert_t, expert::glu<act::silu>>;
  matrix const x = matrix::from(c.at("x")), w_gate = matrix::from(c.at("w_gate")),
               dy = matrix::from(c.at("dy"));
  index_t const tokens = x.rows, hidden = x.cols, experts = w_gate.cols;
  index_t const ffn = c.at("ffn").get<index_t>(), width = gated ? 2 * ffn : ffn;
  std::vector<float> bias;
  layer_args const args{.gate = args_of(c.value("args", json::object()), tokens, experts, bias),
                        .hidden = hidden,
                        .ffn = ffn};
  char const* first_name = gated ? "w13" : "w1";
  std::vector<double> const w1 = flat(c.at(first_name)), w2 = flat(c.at("w2"));
  if (w1.size() != static_cast<std::size_t>(experts * hidden * width) ||
      w2.size() != static_cast<std::size_t>(experts * ffn * hidden))
    throw std::runtime_error("expert weights of the wrong size");
  std::vector<double> y(static_cast<std::size_t>(tokens * hidden)), dx(y.size()),
      d_w_gate(w_gate.values.size()), d_w1(w1.size()), d_w2(w2.size());

  typename L::template params<double> p{w_gate.view(), {}};
  typename L::template gradients<double> g{make_view(d_w_gate.data(), hidden, experts), {}};
  auto const w1_view = make_view(w1.data(), experts, hidden, width);
  auto const w2_view = make_view(w2.data(), experts, ffn, hidden);
  auto const d_w1_view = make_view(d_w1.data(), experts, hidden, width);
  auto const d_w2_view = make_view(d_w2.data(), experts, ffn, hidden);
  if constexpr (gated) {
    p.expert.w13 = w1_view;
    g.expert.w13 = d_w1_view;
  } else {
    p.expert.w1 = w1_view;
    g.expert.w1 = d_w1_view;
  }
  p.expert.w2 = w2_view;
  g.expert.w2 = d_w2_view;

  L const layer(args);
  host_buffer ws(layer.workspace_bytes(host));
  layer.forward(host, x.view(), p, make_view(y.data(), tokens, hidden), ws.view());
  layer_stats const stats = layer.stats(host, ws.view());
  json out{{"capacity", stats.capacity}, {"dropped", stats.dropped}};
  out["load"] = std::vector<std::int64_t>(stats.load.begin(), stats.load.end());
  layer.backward(host, dy.view(), p, make_view(dx.data(), tokens, hidden), g, ws.view());
  out["y"] = rows_of(make_view(std::as_const(y).data(), tokens, hidden));
  out["dx"] = rows_of(make_view(std::as_const(dx).data(), tokens, hidden));
  out["d_w_gate"] = rows_of(make_view(std::as_const(d_w_gate).data(), hidden, experts));
  out[std::string("d_") + first_name] = d_w1;
  out["d_w2"] = d_w2;
  return out;
}

using gate_table = std::map<std::string, std::function<json(json const&)>>;

/// The layers a case may name: Hugging Face's MoE blocks, their router's preset (or, where
/// a block's k or normalisation is a config knob, the composition that matches it) with a
/// SwiGLU expert, dropless; the Switch Transformers block with its capacity and a ReLU FFN.
gate_table const& layers() {
  using swiglu = expert::glu<act::silu>;
  // Qwen3-MoE with any num_experts_per_tok, norm_topk_prob as gate_args::normalize.
  using qwen3_any = g::with<g::top_any<g::softmax, g::token_major>, g::dropless, g::switch_aux>;
  using mixtral_any =
      g::with<g::top_any<g::softmax_topk, g::token_major>, g::dropless, g::switch_aux>;
  static gate_table const table{
      {"mixtral", run_layer<layer<g::preset::mixtral, layout::ragged, comm::single_rank, swiglu>>},
      {"mixtral_any", run_layer<layer<mixtral_any, layout::ragged, comm::single_rank, swiglu>>},
      {"qwen3", run_layer<layer<g::preset::qwen3, layout::ragged, comm::single_rank, swiglu>>},
      {"qwen3_any", run_layer<layer<qwen3_any, layout::ragged, comm::single_rank, swiglu>>},
      {"deepseek_v3",
       run_layer<layer<g::preset::deepseek_v3, layout::ragged, comm::single_rank, swiglu>>},
      {"deepseek_native_2_4_2",
       run_layer<
           layer<g::preset::deepseek_native<2, 4, 2>, layout::ragged, comm::single_rank, swiglu>>},
      {"deepseek_native_1_4_2",
       run_layer<
           layer<g::preset::deepseek_native<1, 4, 2>, layout::ragged, comm::single_rank, swiglu>>},
      {"deepseek_native_6_8_2",
       run_layer<
           layer<g::preset::deepseek_native<6, 8, 2>, layout::ragged, comm::single_rank, swiglu>>},
      {"deepseek_2_4_2",
       run_layer<layer<g::preset::deepseek<2, 4, 2>, layout::ragged, comm::single_rank, swiglu>>},
      {"deepseek_1_4_2",
       run_layer<layer<g::preset::deepseek<1, 4, 2>, layout::ragged, comm::single_rank, swiglu>>},
      {"switch_transformer", run_layer<layer<g::preset::switch_transformer, layout::capacity,
                                             comm::single_rank, expert::ffn<act::relu>>>},
  };
  return table;
}

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
        {"mixtral", run_gate<g::preset::mixtral>},
        {"qwen3", run_gate<g::preset::qwen3>},
        {"switch_transformer", run_gate<g::preset::switch_transformer>},
        {"deepseek_v3", run_gate<g::preset::deepseek_v3>},
        {"deepseek_native_2_4_2", run_gate<g::preset::deepseek_native<2, 4, 2>>},
        {"deepseek_native_1_4_2", run_gate<g::preset::deepseek_native<1, 4, 2>>},
        {"deepseek_native_6_8_2", run_gate<g::preset::deepseek_native<6, 8, 2>>},
        {"deepseek_2_4_2", run_gate<g::preset::deepseek<2, 4, 2>>},
        {"deepseek_1_4_2", run_gate<g::preset::deepseek<1, 4, 2>>},
        {"deepseek_6_8_2", run_gate<g::preset::deepseek<6, 8, 2>>},
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
      bool const is_layer = c.contains("layer");
      gate_table const& table = is_layer ? layers() : gates();
      std::string const name = c.at(is_layer ? "layer" : "gate").get<std::string>();
      auto const found = table.find(name);
      if (found == table.end())
        throw std::runtime_error(std::string("unknown ") + (is_layer ? "layer: " : "gate: ") +
                                 name);
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
