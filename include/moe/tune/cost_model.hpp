// SPDX-License-Identifier: Apache-2.0
#pragma once
// The alpha–beta cost model of the all-to-all and the planner built on it (DESIGN §5): what
// one rank sends in each phase of `linear_all_to_all` and `all_to_all_2dh` (`plan`), how long
// each takes (`predict`), which is faster (`choose`, `crossover_bytes`), and how to fit a
// link's constants to measured times (`calibrate`). Host-only arithmetic.
//
// With P = N·M ranks (N per node, M nodes) and S bytes sent per rank in all (S/P to each
// rank, itself included):
//
//   linear   one phase: N − 1 messages of S/P over NVLink, P − N of S/P over the network,
//            and the own chunk S/P copied locally.
//   2DH      reorder S; phase 0: N − 1 messages of S/N over NVLink (own S/N copied);
//            reorder S; phase 1: M − 1 messages of S/M over the network (own S/M copied).
//            With N == 1 or M == 1 one level is trivial and 2DH is the linear exchange: one
//            phase, no reorders (as `comm::all_to_all_2dh` runs it).
//   Both send (M − 1)·S/M bytes over the network; 2DH does it in M − 1 messages instead of
//   P − N, for two reorders and a second phase.
//
// How costs combine (a choice; `cost_model`'s fields say what each constant is):
//   - m messages of b bytes in all over one link class take m·alpha + b/beta: a rank's
//     messages on one class share its bandwidth and pay their latencies one after another.
//   - Inside a phase the two link classes run concurrently (NCCL drives NVLink and the NIC
//     from separate channels): the exchange takes the longer of the two.
//   - Each phase that sends a message is one collective (one group of sends and receives,
//     launched and synchronised on its own, and phase 1 needs phase 0's data): it pays
//     `fixed` once. A phase that sends nothing (one rank) issues no group and pays no `fixed`.
//   - Reorders and the copy of the own chunk (made before the group, on the same stream, as
//     `comm`'s algorithms do) read and write their bytes in HBM: 2·bytes / hbm.beta plus
//     hbm.alpha per pass. Copies, reorders and phases run one after another.
// So, for one rank, with c the chunk a phase's messages carry:
//   t(phase) = reorder + hbm(1, 2c) + fixed·[it sends]
//              + max(nvlink(m_intra, m_intra·c), network(m_inter, m_inter·c))
//   t(algorithm) = Σ over its phases.
//
// Why one crossover: 2DH's time grows with S at least as fast as any branch of the linear
// algorithm's max does (equal network bytes; its NVLink chunks are larger and no longer
// hidden behind the network; larger own chunks; reorders on top), so t_2dh − t_linear never
// decreases as S grows, whatever the constants. 2DH is faster below one size and the linear
// algorithm from there on (`crossover_bytes`).

#include <moe/comm/concepts.hpp>
#include <moe/core/error.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>

namespace moe::tune {

/// The all-to-all algorithms the planner chooses between, as values: the choice is made at
/// run time from sizes. `linear` is `comm::linear_all_to_all`,
/// `two_dimensional_hierarchical` is `comm::all_to_all_2dh`.
enum class all_to_all_algorithm { linear, two_dimensional_hierarchical };

/// "linear" or "2dh", for tables and logs.
[[nodiscard]] constexpr std::string_view name(all_to_all_algorithm algorithm) noexcept {
  return algorithm == all_to_all_algorithm::linear ? "linear" : "2dh";
}

/// One link class: m messages carrying b bytes in all take m·alpha + b/beta seconds.
/// Default-constructed it has no bandwidth (beta == 0), which `predict` rejects: give both
/// fields when replacing a link (`.network = {.alpha = 2e-6, .beta = 25e9}`), or assign one
/// member of a `cost_model` after constructing it.
struct link {
  double alpha = 0;  ///< seconds per message (latency)
  double beta = 0;   ///< bytes per second (bandwidth)

  /// Seconds that `messages` messages of `bytes` bytes in all take.
  [[nodiscard]] constexpr double seconds(double messages, double bytes) const noexcept {
    return messages * alpha + bytes / beta;
  }
  friend constexpr bool operator==(link, link) = default;
};

/// The constants of the model. Defaults describe one rank of an 8-GPU HGX H100/H200 node;
/// override them with designated initialisers or fit them with `calibrate`.
struct cost_model {
  /// Between the ranks of a node: per direction per GPU, and the latency of one message.
  link nvlink{.alpha = 0.5e-6, .beta = 360e9};
  /// Between nodes, per GPU (one 400 Gb/s NIC each); per-message latency is 0.5–2 µs on
  /// InfiniBand, 1 µs taken.
  link network{.alpha = 1e-6, .beta = 45e9};
  /// Local reorders and copies; beta counts bytes read plus bytes written, alpha is paid per
  /// pass (0: a reorder's launch hides in its phase's `fixed`).
  link hbm{.alpha = 0, .beta = 4e12};
  /// Seconds per collective (launch, group setup, synchronisation), paid once per phase.
  double fixed = 15e-6;

  friend constexpr bool operator==(cost_model const&, cost_model const&) = default;
};

/// Messages and their bytes (in all) that one rank sends over one link class.
struct traffic {
  std::int64_t messages = 0;
  std::int64_t bytes = 0;

  friend constexpr traffic operator+(traffic a, traffic b) noexcept {
    return {a.messages + b.messages, a.bytes + b.bytes};
  }
  friend constexpr bool operator==(traffic, traffic) = default;
};

/// What one rank does in one phase of an all-to-all: one group of sends and receives (none
/// when it sends no message), preceded by a local reorder in 2DH. By symmetry every rank
/// sends and receives the same.
struct phase_plan {
  std::int64_t reorder_bytes = 0;  ///< read by the reorder before the exchange (as many written)
  std::int64_t self_bytes = 0;     ///< the own chunk, copied locally: not a message
  traffic intra_node{};            ///< to the other ranks of its node (NVLink)
  traffic inter_node{};            ///< to ranks on other nodes (network)

  [[nodiscard]] constexpr traffic sent() const noexcept { return intra_node + inter_node; }
  friend constexpr bool operator==(phase_plan const&, phase_plan const&) = default;
};

/// The messages one rank sends in an all-to-all, phase by phase in issue order: phase i is
/// the i-th group the rank issues, the `phase` of a `comm::message_record` when the trace
/// holds one all-to-all. The linear algorithm, and 2DH on one node or one rank per node,
/// has one phase; 2DH otherwise two (intra-node, then inter-node).
struct message_plan {
  static constexpr int max_phases = 2;

  all_to_all_algorithm algorithm = all_to_all_algorithm::linear;
  int phase_count = 0;
  std::array<phase_plan, max_phases> phases{};

  /// Totals over the phases.
  [[nodiscard]] constexpr traffic intra_node() const noexcept {
    return sum([](phase_plan const& p) { return p.intra_node; }, traffic{});
  }
  [[nodiscard]] constexpr traffic inter_node() const noexcept {
    return sum([](phase_plan const& p) { return p.inter_node; }, traffic{});
  }
  [[nodiscard]] constexpr traffic sent() const noexcept { return intra_node() + inter_node(); }
  [[nodiscard]] constexpr std::int64_t reorder_bytes() const noexcept {
    return sum([](phase_plan const& p) { return p.reorder_bytes; }, std::int64_t{0});
  }
  [[nodiscard]] constexpr std::int64_t self_bytes() const noexcept {
    return sum([](phase_plan const& p) { return p.self_bytes; }, std::int64_t{0});
  }
  friend constexpr bool operator==(message_plan const&, message_plan const&) = default;

 private:
  template <class Field, class T>
  constexpr T sum(Field field, T total) const noexcept {
    for (int i = 0; i < phase_count; ++i)
      total = total + field(phases[static_cast<std::size_t>(i)]);
    return total;
  }
};

/// One measured transfer over a link class, for `calibrate`.
struct calibration_sample {
  std::int64_t messages = 0;  ///< messages sent one after another over the link
  std::int64_t bytes = 0;     ///< their bytes in all
  double seconds = 0;         ///< the time they took
};

namespace detail {

/// The structure of one phase, independent of S: its messages each carry S / divisor bytes,
/// and so does the own chunk.
struct phase_shape {
  bool reorder = false;
  std::int64_t divisor = 1;
  std::int64_t intra_node = 0;
  std::int64_t inter_node = 0;
};

struct algorithm_shape {
  int phase_count = 0;
  std::array<phase_shape, message_plan::max_phases> phases{};
};

constexpr algorithm_shape shape_of(all_to_all_algorithm algorithm, comm::topology t) noexcept {
  std::int64_t const n = t.ranks_per_node, m = t.nodes, p = n * m;
  if (algorithm == all_to_all_algorithm::linear || n == 1 || m == 1)
    return {
        1, {phase_shape{.reorder = false, .divisor = p, .intra_node = n - 1, .inter_node = p - n}}};
  return {2,
          {phase_shape{.reorder = true, .divisor = n, .intra_node = n - 1, .inter_node = 0},
           phase_shape{.reorder = true, .divisor = m, .intra_node = 0, .inter_node = m - 1}}};
}

inline void check_topology(comm::topology t) {
  MOE_EXPECTS(t.ranks_per_node >= 1, "topology",
              "ranks_per_node is " + std::to_string(t.ranks_per_node) + "; it must be ≥ 1");
  MOE_EXPECTS(t.nodes >= 1, "topology", "nodes is " + std::to_string(t.nodes) + "; it must be ≥ 1");
  MOE_EXPECTS(
      static_cast<std::int64_t>(t.ranks_per_node) * t.nodes <= std::numeric_limits<int>::max(),
      "topology", "has more ranks than an int holds");
}

inline void check_link(link l, std::string_view which) {
  MOE_EXPECTS(
      std::isfinite(l.alpha) && l.alpha >= 0, "model",
      std::string(which) + ".alpha is " + std::to_string(l.alpha) + "; it must be finite and ≥ 0");
  MOE_EXPECTS(l.beta > 0, "model",
              std::string(which) + ".beta is " + std::to_string(l.beta) +
                  "; it must be > 0 (bytes per second)");
}

inline void check_model(cost_model const& model) {
  check_link(model.nvlink, "nvlink");
  check_link(model.network, "network");
  check_link(model.hbm, "hbm");
  MOE_EXPECTS(std::isfinite(model.fixed) && model.fixed >= 0, "model",
              "fixed is " + std::to_string(model.fixed) + "; it must be finite and ≥ 0");
}

/// A time linear in S: at_zero + per_byte·S seconds.
struct affine_time {
  double at_zero = 0;
  double per_byte = 0;

  [[nodiscard]] constexpr double at(double bytes_per_rank) const noexcept {
    return at_zero + per_byte * bytes_per_rank;
  }
  friend constexpr affine_time operator+(affine_time a, affine_time b) noexcept {
    return {a.at_zero + b.at_zero, a.per_byte + b.per_byte};
  }
  friend constexpr affine_time operator-(affine_time a, affine_time b) noexcept {
    return {a.at_zero - b.at_zero, a.per_byte - b.per_byte};
  }
};

/// One phase: `serial` (reorder, own copy, fixed cost), then the longer of the two classes.
struct phase_time {
  affine_time serial, nvlink, network;

  [[nodiscard]] constexpr double at(double bytes_per_rank) const noexcept {
    return serial.at(bytes_per_rank) +
           std::max(nvlink.at(bytes_per_rank), network.at(bytes_per_rank));
  }
};

struct algorithm_time {
  int phase_count = 0;
  std::array<phase_time, message_plan::max_phases> phases{};

  [[nodiscard]] constexpr double at(double bytes_per_rank) const noexcept {
    double total = 0;
    for (int i = 0; i < phase_count; ++i)
      total += phases[static_cast<std::size_t>(i)].at(bytes_per_rank);
    return total;
  }
};

/// `count` transfers of S / divisor bytes each over `l`, one after another. The per-byte
/// factor is formed as (count / divisor) / beta so that equal fractions give equal doubles
/// (the network bytes of the two algorithms, (P − N)/P and (M − 1)/M of S, then cancel).
constexpr affine_time transfers(link l, std::int64_t count, std::int64_t divisor) noexcept {
  if (count == 0) return {};
  auto const c = static_cast<double>(count);
  return {c * l.alpha, c / static_cast<double>(divisor) / l.beta};
}

/// The model's time of an algorithm as a function of S (the formula of the file comment).
constexpr algorithm_time time_of(all_to_all_algorithm algorithm, comm::topology t,
                                 cost_model const& model) noexcept {
  algorithm_shape const shape = shape_of(algorithm, t);
  algorithm_time out{.phase_count = shape.phase_count};
  for (int i = 0; i < shape.phase_count; ++i) {
    phase_shape const& p = shape.phases[static_cast<std::size_t>(i)];
    // An HBM pass reads and writes its bytes: two transfers' worth.
    affine_time serial = transfers(model.hbm, 1, p.divisor);
    serial.per_byte *= 2;
    if (p.reorder) serial = serial + affine_time{model.hbm.alpha, 2 / model.hbm.beta};
    if (p.intra_node + p.inter_node > 0) serial.at_zero += model.fixed;
    out.phases[static_cast<std::size_t>(i)] = {
        .serial = serial,
        .nvlink = transfers(model.nvlink, p.intra_node, p.divisor),
        .network = transfers(model.network, p.inter_node, p.divisor)};
  }
  return out;
}

}  // namespace detail

/// The messages one rank sends in an all-to-all of `bytes_per_rank` bytes per rank.
/// @param algorithm       which all-to-all
/// @param bytes_per_rank  S: bytes each rank sends in all, S/P to each rank (itself included)
/// @param topology        N ranks per node, M nodes
/// @throws invalid_argument naming `bytes_per_rank` (not positive, or not a multiple of P:
///         chunks are whole bytes) or `topology` (a count below 1)
[[nodiscard]] inline message_plan plan(all_to_all_algorithm algorithm, std::int64_t bytes_per_rank,
                                       comm::topology topology) {
  detail::check_topology(topology);
  std::int64_t const p = topology.size();
  MOE_EXPECTS(bytes_per_rank > 0, "bytes_per_rank",
              "is " + std::to_string(bytes_per_rank) + "; it must be positive");
  MOE_EXPECTS(bytes_per_rank % p == 0, "bytes_per_rank",
              "is " + std::to_string(bytes_per_rank) + ", not a multiple of the " +
                  std::to_string(p) + " ranks");
  detail::algorithm_shape const shape = detail::shape_of(algorithm, topology);
  message_plan result{.algorithm = algorithm, .phase_count = shape.phase_count};
  for (int i = 0; i < shape.phase_count; ++i) {
    detail::phase_shape const& s = shape.phases[static_cast<std::size_t>(i)];
    std::int64_t const chunk = bytes_per_rank / s.divisor;
    result.phases[static_cast<std::size_t>(i)] = {
        .reorder_bytes = s.reorder ? bytes_per_rank : 0,
        .self_bytes = chunk,
        .intra_node = {s.intra_node, s.intra_node * chunk},
        .inter_node = {s.inter_node, s.inter_node * chunk}};
  }
  return result;
}

/// Predicted seconds of one all-to-all (see the file comment for the formula).
/// @param bytes_per_rank  S > 0; need not be a multiple of P (chunks may be fractional)
/// @throws invalid_argument naming `bytes_per_rank`, `topology` or `model` (a negative or
///         non-finite alpha or fixed cost, a bandwidth that is not positive)
[[nodiscard]] inline double predict(all_to_all_algorithm algorithm, std::int64_t bytes_per_rank,
                                    comm::topology topology, cost_model const& model = {}) {
  detail::check_topology(topology);
  detail::check_model(model);
  MOE_EXPECTS(bytes_per_rank > 0, "bytes_per_rank",
              "is " + std::to_string(bytes_per_rank) + "; it must be positive");
  return detail::time_of(algorithm, topology, model).at(static_cast<double>(bytes_per_rank));
}

/// The faster algorithm for this size and shape; `linear` on a tie (it needs no scratch), so
/// always on one node or one rank per node, where the two are the same exchange.
/// @throws invalid_argument as `predict`
[[nodiscard]] inline all_to_all_algorithm choose(std::int64_t bytes_per_rank,
                                                 comm::topology topology,
                                                 cost_model const& model = {}) {
  double const linear = predict(all_to_all_algorithm::linear, bytes_per_rank, topology, model);
  double const two_dim =
      detail::time_of(all_to_all_algorithm::two_dimensional_hierarchical, topology, model)
          .at(static_cast<double>(bytes_per_rank));
  return two_dim < linear ? all_to_all_algorithm::two_dimensional_hierarchical
                          : all_to_all_algorithm::linear;
}

/// The size S* below which 2DH is predicted faster and from which the linear algorithm is:
/// `choose` picks 2DH for S < S* (to within rounding next to S*). 0 when 2DH never wins (one
/// node, one rank per node, or a latency saving smaller than 2DH's extra phase); +infinity
/// when it wins at every size (only when its extra work per byte is free: infinite HBM and
/// NVLink bandwidth). Exists because t_2dh − t_linear never decreases with S (file comment).
/// @throws invalid_argument naming `topology` or `model`
[[nodiscard]] inline double crossover_bytes(comm::topology topology, cost_model const& model = {}) {
  detail::check_topology(topology);
  detail::check_model(model);
  detail::algorithm_time const two_dim =
      detail::time_of(all_to_all_algorithm::two_dimensional_hierarchical, topology, model);
  if (two_dim.phase_count == 1) return 0;  // one level is trivial: the same exchange
  // Each 2DH phase uses one link class, so its time is affine in S; the linear algorithm's is
  // `serial` plus the larger of two affine branches. 2DH wins where it beats either branch
  // alone: S below the larger of the two roots.
  detail::affine_time two_dim_total{};
  for (detail::phase_time const& p : two_dim.phases)
    two_dim_total = two_dim_total + p.serial + p.nvlink + p.network;
  detail::phase_time const linear =
      detail::time_of(all_to_all_algorithm::linear, topology, model).phases[0];
  double crossover = 0;
  for (detail::affine_time const branch : {linear.nvlink, linear.network}) {
    detail::affine_time const gap = two_dim_total - (linear.serial + branch);
    double const slope = std::max(gap.per_byte, 0.0);  // ≥ 0 but for rounding
    if (gap.at_zero < 0)
      crossover = std::max(
          crossover, slope > 0 ? -gap.at_zero / slope : std::numeric_limits<double>::infinity());
  }
  return crossover;
}

/// Fits one link's alpha and beta to measured transfers: minimises the relative residuals
/// Σ ((alpha·messages + bytes/beta) / seconds − 1)², so that microsecond and second samples
/// weigh alike, under alpha ≥ 0 (a negative fit is refitted with alpha = 0).
/// @param samples  [in] at least two whose (messages, bytes) are not proportional, or alpha
///                 and beta cannot be told apart; no negative counts, times > 0 and finite
/// @throws invalid_argument naming `samples`, also when the times do not grow with the bytes
///         (no positive bandwidth fits)
[[nodiscard]] inline link calibrate(std::span<calibration_sample const> samples) {
  MOE_EXPECTS(
      samples.size() >= 2, "samples",
      "holds " + std::to_string(samples.size()) + " samples; alpha and beta need at least two");
  // Normal equations of the weighted least squares in (alpha, g = 1/beta), weights 1/t².
  double mm = 0, mb = 0, bb = 0, mt = 0, bt = 0;
  for (std::size_t i = 0; i < samples.size(); ++i) {
    calibration_sample const& s = samples[i];
    std::string const at = "samples[" + std::to_string(i) + "]";
    MOE_EXPECTS(s.messages >= 0 && s.bytes >= 0, "samples",
                at + " has a negative message or byte count");
    MOE_EXPECTS(s.messages > 0 || s.bytes > 0, "samples", at + " sends nothing");
    MOE_EXPECTS(
        std::isfinite(s.seconds) && s.seconds > 0, "samples",
        at + ".seconds is " + std::to_string(s.seconds) + "; it must be positive and finite");
    double const m = static_cast<double>(s.messages) / s.seconds;
    double const b = static_cast<double>(s.bytes) / s.seconds;
    mm += m * m;
    mb += m * b;
    bb += b * b;
    mt += m;
    bt += b;
  }
  double const det = mm * bb - mb * mb;  // ≥ 0 (Cauchy–Schwarz); 0 iff all proportional
  MOE_EXPECTS(det > 1e-12 * mm * bb, "samples",
              "have proportional (messages, bytes): alpha and beta cannot be told apart; "
              "measure at least two message sizes");
  double alpha = (bb * mt - mb * bt) / det;
  double inverse_beta = (mm * bt - mb * mt) / det;
  if (alpha < 0) {
    alpha = 0;
    inverse_beta = bt / bb;
  }
  MOE_EXPECTS(inverse_beta > 0, "samples",
              "do not take longer with more bytes: no positive bandwidth fits them");
  return {.alpha = alpha, .beta = 1 / inverse_beta};
}

}  // namespace moe::tune
