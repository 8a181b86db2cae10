// SPDX-License-Identifier: Apache-2.0
#pragma once
// The testbed of the CUDA router (gating/kernels/router.cuh) against the host backend
// (gating/router.hpp), shared by the router's gpu tests; it includes router.cuh, so only .cu
// files include it. `compare_with_host` routes one random problem forward and backward on both
// backends, every output poisoned first, and compares them output by output.
//
// Selection, slots and capacity are discontinuous, so the inputs make the logits exact on both
// backends: x on ±j/8 (j = 1..8) and W_gate on ±m/2^(b+s) (m = 1..2^b, s growing with H so
// that the logits stay O(1); fill_w). Every product and partial sum is then a float, in float,
// half and bfloat16 alike, whatever order cuBLAS sums in, and top-k on the logits is exact.
// Experts, slots, loads, capacity, drops and left-out 2nd choices must then match exactly;
// scores, weights, losses and gradients to 1e-5 relative to their row (or tensor) scale,
// except dx and dW_gate in half/bfloat16 (1e-2).
//
// Where the device decides on float values that the host holds in double — scores plus an
// expert bias, sigmoid scores of group-limited selection, group sums, noisy or jittered
// logits, by_score weights, batch_prioritized 1st scores, random routing's 2·g2 > u — the
// testbed first measures on the host reference how far each decision is from flipping,
// relative to the scale of the values compared. Below `decision_margin` it draws fresh inputs
// (the next seed) instead: the exact comparisons are never loosened and no token is skipped.
// A tie is safe, and accepted, only when both sides compute it from bit-identical inputs.

#include "../support/random.hpp"

#include <doctest/doctest.h>

#include <moe/core.hpp>
#include <moe/core/blas.hpp>
#include <moe/gating.hpp>
#include <moe/gating/kernels/router.cuh>
#include <moe/gating/kernels/slots.cuh>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace moe::test::router_testbed {

using gating::renormalize;

/// The host routing state of one call of T tokens, E experts and k choices, in memory it owns.
struct owned_host_routing {
  host_buffer memory;
  gating::host_routing r;

  owned_host_routing(index_t tokens, index_t experts, int k) {
    workspace_carver counter;
    (void)gating::carve_host_routing(counter, tokens, tokens, experts, k);
    memory = host_buffer(counter.bytes());
    workspace_carver carver(memory.view());
    r = gating::carve_host_routing(carver, tokens, tokens, experts, k);
  }
};

/// The test's stream and cuBLAS handle; outlives every buffer of a case.
struct cuda_context {
  cudaStream_t stream{};
  blas_handle blas;

  cuda_context() { MOE_CUDA_TRY(cudaStreamCreate(&stream)); }
  cuda_context(cuda_context const&) = delete;
  cuda_context& operator=(cuda_context const&) = delete;
  ~cuda_context() {
    MOE_CUDA_TRY_LOG(cudaStreamSynchronize(stream));
    MOE_CUDA_TRY_LOG(cudaStreamDestroy(stream));
  }
  [[nodiscard]] cuda_backend backend() const { return {stream, blas.get()}; }
};

/// `count` elements of T in device memory.
template <class T>
struct device_array {
  device_buffer<> buffer;
  index_t count;

  device_array(index_t n, cudaStream_t stream)
      : buffer(std::max<std::size_t>(static_cast<std::size_t>(n) * sizeof(T), 1), stream),
        count(n) {}
  /// A copy of `host`.
  device_array(std::vector<T> const& host, cudaStream_t stream)
      : device_array(static_cast<index_t>(host.size()), stream) {
    if (!host.empty())
      MOE_CUDA_TRY(cudaMemcpyAsync(data(), host.data(), host.size() * sizeof(T),
                                   cudaMemcpyHostToDevice, stream));
  }
  [[nodiscard]] T* data() const { return reinterpret_cast<T*>(buffer.view().data()); }
  template <class... Extents>
  [[nodiscard]] auto view(Extents... extents) const {
    return make_view(data(), extents...);
  }
  template <class... Extents>
  [[nodiscard]] auto cview(Extents... extents) const {
    return make_view(static_cast<T const*>(data()), extents...);
  }
};

/// Copies `count` elements from device memory; waits for the stream.
template <class T>
std::vector<T> download(T const* data, index_t count, cudaStream_t stream) {
  std::vector<T> host(static_cast<std::size_t>(count));
  if (count > 0)
    MOE_CUDA_TRY(cudaMemcpyAsync(host.data(), data, host.size() * sizeof(T), cudaMemcpyDeviceToHost,
                                 stream));
  MOE_CUDA_TRY(cudaStreamSynchronize(stream));
  return host;
}

template <class T, class E, class L, class A>
std::vector<std::remove_cv_t<T>> download(mdspan_of<T, E, L, A> const& view, cudaStream_t stream) {
  return download(static_cast<std::remove_cv_t<T> const*>(view.data_handle()), element_count(view),
                  stream);
}

inline void poison(void* data, std::size_t bytes, cudaStream_t stream) {
  MOE_CUDA_TRY(cudaMemsetAsync(data, 0xff, bytes, stream));
}

inline bool all_poisoned(std::vector<std::byte> const& bytes) {
  return std::all_of(bytes.begin(), bytes.end(), [](std::byte b) { return b == std::byte{0xff}; });
}

template <class T, class E, class L, class A>
std::vector<double> to_doubles(mdspan_of<T, E, L, A> const& view) {
  std::vector<double> out(static_cast<std::size_t>(element_count(view)));
  for (std::size_t i = 0; i < out.size(); ++i)
    out[i] = static_cast<double>(to_accumulate(view.data_handle()[i]));
  return out;
}

/// The elements of a host view, as they are.
template <class T, class E, class L, class A>
std::vector<std::remove_cv_t<T>> host_copy(mdspan_of<T, E, L, A> const& view) {
  return {view.data_handle(), view.data_handle() + element_count(view)};
}

template <class T>
std::vector<double> to_doubles(std::vector<T> const& v) {
  return to_doubles(make_view(v.data(), static_cast<index_t>(v.size())));
}

/// Checks |device − host| ≤ tol · scale element by element, scale being the largest |host|
/// of the element's row of `columns`, floored at 1e-3 of the whole tensor's (a row that
/// cancels to nearly nothing is judged against the tensor). Reports the worst element once.
inline void check_close(char const* what, std::vector<double> const& device,
                        std::vector<double> const& host, index_t columns, double tol) {
  REQUIRE(device.size() == host.size());
  double tensor_scale = 0;
  for (double h : host) tensor_scale = std::max(tensor_scale, std::abs(h));
  double worst = 0;  // error / allowed; > 1 fails; NaN fails
  std::size_t worst_at = 0;
  bool failed = false;
  auto const cols = static_cast<std::size_t>(std::max<index_t>(columns, 1));
  for (std::size_t row = 0; row * cols < host.size(); ++row) {
    double scale = 0;
    for (std::size_t c = 0; c < cols; ++c) scale = std::max(scale, std::abs(host[row * cols + c]));
    scale = std::max({scale, 1e-3 * tensor_scale, 1e-30});
    for (std::size_t c = 0; c < cols; ++c) {
      std::size_t const i = row * cols + c;
      double const ratio = std::abs(device[i] - host[i]) / (tol * scale);
      if (!(ratio <= 1)) failed = true;
      if (!(ratio <= worst)) {
        worst = ratio;
        worst_at = i;
      }
    }
  }
  CHECK_MESSAGE(!failed, std::string(what)
                             << ": worst element " << worst_at << " (row " << worst_at / cols
                             << "): device " << device[worst_at] << ", host " << host[worst_at]
                             << ", error/allowed " << worst);
}

template <class D, class H>
void check_equal(char const* what, std::vector<D> const& device, std::vector<H> const& host) {
  REQUIRE(device.size() == host.size());
  auto const [d, h] = std::mismatch(device.begin(), device.end(), host.begin(),
                                    [](D a, H b) { return static_cast<H>(a) == b; });
  CHECK_MESSAGE(d == device.end(), std::string(what)
                                       << ": first difference at " << (d - device.begin())
                                       << ": device " << (d == device.end() ? 0 : *d) << ", host "
                                       << (h == host.end() ? 0 : *h));
}

/// ±j/8, j = 1..8: every x is exact in half and bfloat16.
template <class T>
void fill_x(host_tensor<T>& x, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> j(1, 8), sign(0, 1);
  for (auto& v : x.data)
    v = from_accumulate<T>(static_cast<float>(sign(rng) ? j(rng) : -j(rng)) / 8.0f);
}

/// ±m/2^(b+s), m = 1..2^b, s = max(0, ⌊log2(H)/2⌋ − 1): the logits stay O(1) for large H,
/// and lie on a grid of 2^-(3+b+s) with Σ_h |x·w| ≤ H/2^s, which needs log2(H) + 3 + b bits:
/// b = 6 keeps them exact in float up to H = 2^15. A finer grid (`w_bits`) makes distinct
/// logits rarely differ by the same few steps, so that weights computed from differences of
/// logits (renormalised softmax weights) rarely tie without being equal; W_gate must then still
/// hold m exactly (b ≤ 8 in bfloat16, 11 in half).
template <class T>
void fill_w(host_tensor<T>& w, index_t hidden, std::mt19937_64& rng, int bits = 6) {
  int const s =
      std::max(0, static_cast<int>(std::bit_width(static_cast<std::uint64_t>(hidden)) - 1) / 2 - 1);
  float const unit = std::ldexp(1.0f, -(bits + s));
  std::uniform_int_distribution<int> m(1, 1 << bits), sign(0, 1);
  for (auto& v : w.data)
    v = from_accumulate<T>(static_cast<float>(sign(rng) ? m(rng) : -m(rng)) * unit);
}

/// One case of the testbed: the shape, and the run-time knobs of gate_args it sets.
struct case_config {
  index_t tokens, experts, hidden;
  int k;
  float factor = 1.25f;
  index_t alignment = 1;
  renormalize normalize = renormalize::none;
  float aux_coef = 0.5f;
  float z_coef = 0.25f;
  float scaling = 1.0f;
  bool training = true;
  float eval_factor = 1.0f;
  index_t groups = 1;  ///< local groups
  index_t min_capacity = 4;
  float jitter = 0.0f;
  gating::jitter_target jitter_on = gating::jitter_target::input;
  float gate_noise = 0.0f;
  float bias = 0.0f;  ///< an expert bias uniform in [−bias, bias] (device memory); 0: none
  /// b of W_gate's grid (fill_w); 0: 6, or the finest grid T and H keep exact (at most 12)
  /// when the priority orders by weight
  int w_bits = 0;
  index_t capacity_tokens = 0;  ///< gate_args::capacity_tokens: T the capacity is sized for
};

/// The finest grid of W_gate (fill_w's b) that keeps m exact in T and the logits in float.
template <class T>
int finest_w_bits(index_t hidden) {
  int const mantissa = dtype_of<T> == dtype::f32 ? 24 : dtype_of<T> == dtype::f16 ? 11 : 8;
  int const sum = 21 - static_cast<int>(std::bit_width(static_cast<std::uint64_t>(hidden - 1)));
  return std::max(1, std::min({12, mantissa, sum}));
}

inline char const* name_of(renormalize n) {
  constexpr char const* names[] = {"none", "before_drops", "after_drops"};
  return names[static_cast<int>(n)];
}

/// The smallest relative margin a decision needs for float to decide it as double does. Float
/// moves each value compared by a few ulp of its scale (expf, a division, a sum: ≤ 1e-6), so
/// this leaves a factor of ten. (1e-4 would redraw nearly every draw of T = 300 tokens over 256
/// biased sigmoid experts, whose nine best keys lie a few 1e-3 apart.)
inline constexpr double decision_margin = 1e-5;

/// Draws of inputs `compare_with_host` tries before it gives up on finding safe margins; the
/// largest cases pass one draw in five.
inline constexpr int max_draws = 200;

/// The closest call among the decisions float rounding could flip, relative to its scale.
struct closest_decision {
  double margin = INFINITY;
  std::string what;

  template <class Describe>
  void take(double m, Describe&& describe) {
    if (!(m >= margin)) {  // NaN counts as no margin at all
      margin = std::isnan(m) ? 0 : m;
      std::ostringstream out;
      describe(out);
      what = out.str();
    }
  }
};

template <class S>
inline constexpr bool is_group_limited = false;
template <int N, int M, int E>
inline constexpr bool is_group_limited<gating::group_limited<N, M, E>> = true;

/// How close the decisions of the host's routing `r` of gate G under `args` (host memory) came
/// to flipping, for those the device takes on float values (see the top of this file).
template <class G>
closest_decision closest_call(gating::gate_args const& args, gating::host_routing const& r) {
  using Score = typename G::score_function;
  using Priority = typename G::priority;
  using Selection = gating::selection_of<G>;
  constexpr bool sigmoid_scores = std::is_same_v<Score, gating::sigmoid>;
  index_t const tokens = r.tokens(), experts = r.experts();
  int const k = r.k();
  bool const biased = !args.expert_bias.empty();
  bool const noisy = args.training && (args.gate_noise > 0 || args.jitter > 0);
  auto const bias = [&](index_t e) {
    return biased ? static_cast<double>(args.expert_bias[static_cast<std::size_t>(e)]) : 0.0;
  };
  auto const same_row = [&](index_t a, index_t b) {
    for (index_t e = 0; e < experts; ++e)
      if (r.logits(a, e) != r.logits(b, e)) return false;
    return true;
  };
  closest_decision closest;

  // Selection: without noise, bias or group sums the device ranks the exact logits.
  if (noisy || biased || is_group_limited<Selection>) {
    std::vector<double> key(static_cast<std::size_t>(experts));
    std::vector<index_t> order(static_cast<std::size_t>(experts));
    for (index_t t = 0; t < tokens; ++t) {
      double score_scale = 0, bias_scale = 0;
      for (index_t e = 0; e < experts; ++e) {
        key[static_cast<std::size_t>(e)] = r.scores(t, e) + bias(e);
        score_scale = std::max(score_scale, std::abs(r.scores(t, e)));
        bias_scale = std::max(bias_scale, std::abs(bias(e)));
      }
      double const scale = score_scale + bias_scale;
      // Two experts' keys are one float function of bit-identical inputs: a tie both share.
      auto const same_inputs = [&](index_t a, index_t b) {
        return r.logits(t, a) == r.logits(t, b) && bias(a) == bias(b);
      };
      // Descending key, ties to the lower index: the host's order.
      auto const by_key = [&](index_t a, index_t b) {
        double const ka = key[static_cast<std::size_t>(a)], kb = key[static_cast<std::size_t>(b)];
        return ka > kb || (ka == kb && a < b);
      };
      if constexpr (is_group_limited<Selection>) {
        constexpr int groups = Selection::groups, top_groups = Selection::top_groups;
        index_t const size = experts / groups;
        int const c = Selection::per_group(k);
        double group_score[groups];
        index_t best[groups][gating::max_k];
        for (int g = 0; g < groups; ++g) {
          std::vector<index_t> members(static_cast<std::size_t>(size));
          for (index_t i = 0; i < size; ++i) members[static_cast<std::size_t>(i)] = g * size + i;
          std::sort(members.begin(), members.end(), by_key);
          group_score[g] = 0;
          for (int i = 0; i < c; ++i) {
            best[g][i] = members[static_cast<std::size_t>(i)];
            group_score[g] += key[static_cast<std::size_t>(best[g][i])];
          }
        }
        int rank[groups];
        for (int g = 0; g < groups; ++g) rank[g] = g;
        std::sort(rank, rank + groups, [&](int a, int b) {
          return group_score[a] > group_score[b] || (group_score[a] == group_score[b] && a < b);
        });
        if (top_groups < groups) {
          int const kept = rank[top_groups - 1], next = rank[top_groups];
          bool same = group_score[kept] == group_score[next];
          for (int i = 0; i < c && same; ++i)
            same = r.logits(t, best[kept][i]) == r.logits(t, best[next][i]) &&
                   bias(best[kept][i]) == bias(best[next][i]);
          if (!same)
            closest.take((group_score[kept] - group_score[next]) / (c * scale), [&](auto& out) {
              out << "token " << t << ": group " << kept << " (sum " << group_score[kept]
                  << ") kept over group " << next << " (sum " << group_score[next] << ")";
            });
          for (int m = top_groups; m < groups; ++m)
            for (index_t i = 0; i < size; ++i)
              key[static_cast<std::size_t>(rank[m] * size + i)] = -INFINITY;
        }
      }
      for (index_t e = 0; e < experts; ++e) order[static_cast<std::size_t>(e)] = e;
      std::sort(order.begin(), order.end(), by_key);
      // Each selected expert against the next: the order of the k and the one left out.
      for (index_t j = 0; j < k && j + 1 < experts; ++j) {
        index_t const a = order[static_cast<std::size_t>(j)];
        index_t const b = order[static_cast<std::size_t>(j + 1)];
        double const ka = key[static_cast<std::size_t>(a)], kb = key[static_cast<std::size_t>(b)];
        if (std::isinf(kb) || (ka == kb && same_inputs(a, b))) continue;
        closest.take((ka - kb) / scale, [&](auto& out) {
          out << "token " << t << ": choice " << j << ", expert " << a << " (key " << ka
              << ") over expert " << b << " (key " << kb << ")";
        });
      }
    }
  }

  // Weights before drops and before scaling: what random routing and by_score read.
  renormalize const normalize =
      gating::effective_renormalize<Score, gating::renormalization_of<G>>(args, k);
  auto const weight_before_drops = [&](index_t t, int j) {
    double sum = 0;
    for (int i = 0; i < k; ++i) sum += r.scores(t, r.expert(t, i));
    double const s = r.scores(t, r.expert(t, j));
    return normalize == renormalize::before_drops && sum > 0 ? s / sum : s;
  };

  if constexpr (gating::second_expert_of<G>::random)
    if (args.training)
      for (index_t t = 0; t < tokens; ++t) {
        double const g2 = weight_before_drops(t, 1);
        double const u = gating::rng_uniform(args.seed, t, 1, gating::rng_stream::random_routing);
        closest.take(std::abs(2 * g2 - u) / std::max(2 * g2, u), [&](auto& out) {
          out << "token " << t << ": random routing, 2·g2 = " << 2 * g2 << " against u = " << u;
        });
      }

  // Keyed priorities on float values: the order inside each (local group, expert) bucket.
  constexpr bool weighted = std::is_same_v<Priority, gating::by_score>;
  constexpr bool first_scored = std::is_same_v<Priority, gating::batch_prioritized>;
  if constexpr (weighted || first_scored) {
    struct assignment {
      index_t token;
      int choice;
      std::int32_t expert;
      double key;  // descending claims first
    };
    // Inputs whose keys are one float function of bit-identical values.
    auto const same_inputs = [&](assignment const& a, assignment const& b) {
      if constexpr (weighted) {
        if (normalize == renormalize::before_drops && k == 1) return true;  // s / s = 1
        if constexpr (sigmoid_scores) {
          if (normalize != renormalize::before_drops)
            return r.logits(a.token, a.expert) == r.logits(b.token, b.expert);
          if (a.choice != b.choice) return false;
          for (int i = 0; i < k; ++i)
            if (r.logits(a.token, r.expert(a.token, i)) != r.logits(b.token, r.expert(b.token, i)))
              return false;
          return true;
        } else {
          return a.choice == b.choice && same_row(a.token, b.token);
        }
      } else if constexpr (sigmoid_scores) {
        return r.logits(a.token, r.expert(a.token, 0)) == r.logits(b.token, r.expert(b.token, 0));
      } else {
        return same_row(a.token, b.token);
      }
    };
    index_t const size = tokens / args.groups;
    std::vector<assignment> bucket;
    for (index_t g = 0; g < args.groups; ++g) {
      bucket.clear();
      for (index_t t = g * size; t < (g + 1) * size; ++t)
        for (int j = 0; j < k; ++j)
          if (r.slot(t, j) != gating::no_slot)
            bucket.push_back({t, j, r.expert(t, j),
                              weighted ? weight_before_drops(t, j) : r.scores(t, r.expert(t, 0))});
      // Ordered as the host claims slots; only the order within an expert (and, for
      // batch_prioritized, within a choice rank) decides anything.
      auto const bucket_of = [&](assignment const& a) {
        return std::pair{a.expert, weighted ? 0 : a.choice};
      };
      std::sort(bucket.begin(), bucket.end(), [&](assignment const& a, assignment const& b) {
        if (bucket_of(a) != bucket_of(b)) return bucket_of(a) < bucket_of(b);
        if (a.key != b.key) return a.key > b.key;
        return a.token != b.token ? a.token < b.token : a.choice < b.choice;
      });
      for (std::size_t i = 1; i < bucket.size(); ++i) {
        assignment const& a = bucket[i - 1];
        assignment const& b = bucket[i];
        if (bucket_of(a) != bucket_of(b) || (a.key == b.key && same_inputs(a, b))) continue;
        closest.take((a.key - b.key) / std::max(std::abs(a.key), std::abs(b.key)), [&](auto& out) {
          out << "expert " << a.expert << ": (token " << a.token << ", choice " << a.choice
              << ", key " << a.key << ") before (token " << b.token << ", choice " << b.choice
              << ", key " << b.key << ")";
        });
      }
    }
  }
  return closest;
}

/// ∂aux_loss/∂p_{t,e} of the host's routing `r`, one row per loss group (G local groups when
/// Aux averages per group, else one): E · f_{g,e} / (G' · S'), f the fraction the loss
/// multiplies the mean probability by (losses.hpp).
template <class Aux>
std::vector<double> aux_gradient_of(gating::host_routing const& r, index_t local_groups) {
  index_t const tokens = r.tokens(), experts = r.experts();
  int const k = r.k();
  index_t const groups = Aux::per_group ? local_groups : 1, size = tokens / groups;
  int const counted = Aux::first_choice_only ? 1 : k;
  std::vector<double> gradient(static_cast<std::size_t>(groups * experts), 0.0);
  for (index_t g = 0; g < groups; ++g) {
    double* row = gradient.data() + g * experts;
    for (index_t t = g * size; t < (g + 1) * size; ++t)
      for (int j = 0; j < counted; ++j) row[r.expert(t, j)] += 1;
    for (index_t e = 0; e < experts; ++e)
      row[e] = static_cast<double>(experts) * (row[e] / (counted * static_cast<double>(size))) /
               (static_cast<double>(groups) * static_cast<double>(size));
  }
  return gradient;
}

/// Routes one random problem forward and backward with gate G on both backends and compares
/// every output (see the top of this file). T is the element type of x and W_gate. Returns the
/// host's scalars, for checks of the case's own.
template <class G, class T>
gating::routing_summary compare_with_host(cuda_context& cuda, G const& gate, case_config const& c) {
  // Weights renormalised over the selected experts depend on differences of logits, which
  // the coarse grid makes equal up to rounding in many tokens: by_score compares them.
  int const w_bits = c.w_bits > 0 ? c.w_bits
                     : std::is_same_v<typename G::priority, gating::by_score>
                         ? finest_w_bits<T>(c.hidden)
                         : 6;
  std::uint64_t const first_seed = fresh_seed();
  std::uint64_t seed = first_seed;
  int redraws = 0;
  INFO("seed " << seed << " (" << redraws << " draws before it), dtype "
               << std::string(dtype_traits<T>::name) << ", T " << c.tokens << ", E " << c.experts
               << ", H " << c.hidden << ", k " << c.k << ", static k "
               << gating::detail::static_k_or<G>(0) << ", f " << c.factor << ", alignment "
               << c.alignment << ", normalize " << std::string(name_of(c.normalize)) << ", α "
               << c.scaling << ", training " << c.training << ", groups " << c.groups << ", jitter "
               << c.jitter << " on "
               << std::string(c.jitter_on == gating::jitter_target::input ? "input" : "logits")
               << ", gate_noise " << c.gate_noise << ", bias " << c.bias << ", W_gate grid "
               << w_bits << " bits");
  index_t const T_ = c.tokens, E = c.experts, H = c.hidden;
  int const k = c.k;
  gating::gate_args args{.tokens = T_,
                         .experts = E,
                         .k = gating::static_k_gate<G> ? 0 : k,
                         .capacity_factor = c.factor,
                         .capacity_alignment = c.alignment,
                         .normalize = c.normalize,
                         .aux_loss_coef = c.aux_coef,
                         .z_loss_coef = c.z_coef,
                         .training = c.training,
                         .eval_capacity_factor = c.eval_factor,
                         .min_capacity = c.min_capacity,
                         .groups = c.groups,
                         .scaling_factor = c.scaling,
                         .jitter = c.jitter,
                         .jitter_on = c.jitter_on,
                         .gate_noise = c.gate_noise,
                         .capacity_tokens = c.capacity_tokens};
  REQUIRE(gate.k(args) == k);

  host_tensor<T> x(T_ * H), w(H * E), dx0(T_ * H);
  host_tensor<float> d_weight(T_ * k);
  std::vector<float> bias(c.bias > 0 ? static_cast<std::size_t>(E) : 0);

  // --- host reference, on the first draw whose decisions float takes as double does ---
  owned_host_routing host_state(T_, E, k);
  gating::host_routing& hr = host_state.r;
  gating::routing_summary expected;
  for (;; ++redraws) {
    seed = first_seed + static_cast<std::uint64_t>(redraws);
    std::mt19937_64 rng(seed);
    fill_x(x, rng);
    fill_w(w, H, rng, w_bits);
    dx0.randomize(rng);
    d_weight.randomize(rng);
    std::uniform_real_distribution<float> spread(-c.bias, c.bias);
    for (float& b : bias) b = spread(rng);
    args.seed = rng();
    args.expert_bias = {bias.data(), bias.size()};
    expected = gating::route(host, gate, args, x.cview(T_, H), w.cview(H, E), hr);
    closest_decision const closest = closest_call<G>(args, hr);
    if (closest.margin >= decision_margin) break;
    if (redraws + 1 == max_draws) {
      FAIL_CHECK("no draw in " << max_draws << " keeps every decision " << decision_margin
                               << " from flipping; the last: " << closest.what << ", margin "
                               << closest.margin);
      return expected;
    }
  }

  host_tensor<double> x_d(T_ * H), d_weight_d(T_ * k), d_logits_h(T_ * E), dx_h(T_ * H);
  for (std::size_t i = 0; i < x.data.size(); ++i) x_d.data[i] = to_accumulate(x.data[i]);
  for (std::size_t i = 0; i < d_weight.data.size(); ++i) d_weight_d.data[i] = d_weight.data[i];
  for (std::size_t i = 0; i < dx0.data.size(); ++i) dx_h.data[i] = to_accumulate(dx0.data[i]);
  host_tensor<T> d_w_gate_h(H * E);
  gating::route_backward(host, gate, args, hr, d_weight_d.cview(T_, k), x_d.cview(T_, H),
                         w.cview(H, E), d_logits_h.view(T_, E), dx_h.view(T_, H),
                         d_w_gate_h.view(H, E));

  // --- device ---
  cudaStream_t const stream = cuda.stream;
  device_array const x_dev(x.data, stream);
  device_array const w_dev(w.data, stream);
  device_array const bias_dev(bias, stream);
  gating::gate_args device_args = args;
  device_args.expert_bias = {static_cast<float const*>(bias_dev.data()), bias.size()};
  workspace_carver counter;
  (void)gating::carve_device_routing(counter, T_, T_, E, k, c.groups);
  device_buffer<> routing_memory(counter.bytes(), stream);
  poison(routing_memory.view().data(), routing_memory.size(), stream);
  workspace_carver carver(routing_memory.view());
  gating::device_routing r = gating::carve_device_routing(carver, T_, T_, E, k, c.groups);
  device_buffer<> scratch(gating::route_workspace_bytes<T>(gate, device_args, H), stream);
  poison(scratch.view().data(), scratch.size(), stream);

  gating::route(cuda.backend(), gate, device_args, x_dev.cview(T_, H), w_dev.cview(H, E), r,
                scratch.view());
  gating::routing_summary const summary = gating::read_summary(cuda.backend(), r);

  // Exact logits are exact on both sides, by construction of the inputs; the noise of the
  // logits is computed in double and rounded once to float. Jitter on the input leaves the
  // product x' · W_gate to float.
  bool const jittered_input =
      args.training && args.jitter > 0 && args.jitter_on == gating::jitter_target::input;
  if (jittered_input) {
    check_close("logits", to_doubles(download(r.logits, stream)), to_doubles(hr.logits), E, 1e-5);
  } else {
    std::vector<float> rounded(static_cast<std::size_t>(T_ * E));
    for (std::size_t i = 0; i < rounded.size(); ++i)
      rounded[i] = static_cast<float>(hr.logits.data_handle()[i]);
    check_equal("logits", download(r.logits, stream), rounded);
  }
  check_close("scores", to_doubles(download(r.scores, stream)), to_doubles(hr.scores), E, 1e-5);
  check_equal("expert", download(r.expert, stream), host_copy(hr.expert));
  check_equal("slot", download(r.slot, stream), host_copy(hr.slot));
  check_equal("load", download(r.load, stream), host_copy(hr.load));
  auto const weight = to_doubles(download(r.weight, stream));
  check_close("weight", weight, to_doubles(hr.weight), k, 1e-5);
  for (index_t i = 0; i < T_ * k; ++i)  // dropped weights are exactly zero, kept ones not
    if ((hr.weight.data_handle()[i] == 0) != (weight[static_cast<std::size_t>(i)] == 0)) {
      FAIL_CHECK("weight " << i << " is zero on one backend only");
      break;
    }
  check_close("mean_score", to_doubles(download(r.mean_score, stream)),
              std::vector<double>(hr.mean_score.begin(), hr.mean_score.end()), E, 1e-5);
  check_close("first_choice", to_doubles(download(r.first_choice, stream)),
              std::vector<double>(hr.first_choice.begin(), hr.first_choice.end()), E, 1e-5);
  // The rows the aux loss uses: one per local group when it averages per group, else row 0.
  std::vector<double> const aux_gradient = aux_gradient_of<gating::aux_loss_of<G>>(hr, c.groups);
  check_close("aux_gradient",
              to_doubles(download(r.aux_gradient.data_handle(),
                                  static_cast<index_t>(aux_gradient.size()), stream)),
              aux_gradient, E, 1e-5);

  CHECK(summary.tokens == expected.tokens);
  CHECK(summary.capacity == expected.capacity);
  CHECK(summary.dropped == expected.dropped);
  CHECK(summary.unrouted == expected.unrouted);
  CHECK(summary.max_load == expected.max_load);
  check_close("aux_loss", {summary.aux_loss}, {expected.aux_loss}, 1, 1e-5);
  check_close("z_loss", {summary.z_loss}, {expected.z_loss}, 1, 1e-5);

  // --- backward ---
  device_array const d_weight_dev(d_weight.data, stream);
  device_array const dx_dev(dx0.data, stream);
  device_array<float> d_logits_dev(T_ * E, stream);
  device_array<T> d_w_gate_dev(H * E, stream);
  poison(d_logits_dev.data(), static_cast<std::size_t>(T_ * E) * sizeof(float), stream);
  poison(d_w_gate_dev.data(), static_cast<std::size_t>(H * E) * sizeof(T), stream);
  device_buffer<> backward_scratch(gating::route_backward_workspace_bytes<T>(gate, device_args, H),
                                   stream);
  gating::route_backward(cuda.backend(), gate, device_args, std::as_const(r),
                         d_weight_dev.cview(T_, k), x_dev.cview(T_, H), w_dev.cview(H, E),
                         d_logits_dev.view(T_, E), dx_dev.view(T_, H), d_w_gate_dev.view(H, E),
                         backward_scratch.view());

  double const gemm_tol = dtype_of<T> == dtype::f32 ? 1e-5 : 1e-2;
  // d_logits against the tensor's scale: where the renormalisation's gradient cancels (all
  // selected kept, weights summing to one), a row holds only what float leaves of O(α · dw)
  // terms, and its own scale says nothing of the error.
  check_close("d_logits", to_doubles(download(d_logits_dev.data(), T_ * E, stream)),
              d_logits_h.data, T_ * E, 1e-5);
  // GEMM outputs against the tensor's scale: a half/bfloat16 element is one rounding away.
  check_close("dx", to_doubles(download(dx_dev.data(), T_ * H, stream)), dx_h.data, T_ * H,
              gemm_tol);
  check_close("d_w_gate", to_doubles(download(d_w_gate_dev.data(), H * E, stream)),
              to_doubles(d_w_gate_h.data), H * E, gemm_tol);
  return expected;
}

/// Runs `body(T{})` for float, __half and __nv_bfloat16 (STYLE §17: a loop, not
/// TEST_CASE_TEMPLATE).
template <class Body>
void for_each_dtype(Body&& body) {
  body(float{});
  body(__half{});
  body(__nv_bfloat16{});
}

}  // namespace moe::test::router_testbed
