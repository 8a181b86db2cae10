// SPDX-License-Identifier: Apache-2.0
#pragma once
// The concepts of gating: score functions, priorities and gates. A policy opts in with one
// member, `using moe_concept = moe::gating::<kind>_tag;`, and is checked right after its
// definition with a namespace-scope static_assert.

#include <moe/core/config.hpp>
#include <moe/gating/args.hpp>

#include <concepts>
#include <type_traits>

namespace moe::gating {

struct score_function_tag {};
struct priority_tag {};
struct gate_tag {};

/// T opts in to the concept whose tag is Tag.
template <class T, class Tag>
concept tagged_as = requires {
  typename T::moe_concept;
}
&&std::same_as<typename T::moe_concept, Tag>;

/// S models score_function if:
/// 1. it is a stateless policy (std::semiregular) tagged `score_function_tag`;
/// 2. `S::apply(logits, scores)` maps one token's logits to its scores on the host
///    (float64), and `S::backward(scores, d_scores, d_logits)` is its vector–Jacobian product.
template <class S>
concept score_function = std::semiregular<S> && tagged_as<S, score_function_tag> &&
    requires(span<double const> in, span<double> out) {
  S::apply(in, out);
  S::backward(in, in, out);
};

/// P models priority if it is a stateless policy tagged `priority_tag` that names the order
/// in which assignments claim an expert's slots (see priority.hpp).
template <class P>
concept priority = std::semiregular<P> && tagged_as<P, priority_tag>;

/// G names its score function with `G::score_function`.
template <class G>
concept has_score_function = requires {
  typename G::score_function;
}
&&score_function<typename G::score_function>;

/// G names its slot priority with `G::priority`.
template <class G>
concept has_priority = requires {
  typename G::priority;
}
&&priority<typename G::priority>;

/// G selects a number of experts per token: `g.k(args)`, and `g.can_implement(args)` says
/// whether the run-time arguments suit it.
template <class G>
concept selects_k = requires(G const& g, gate_args const& args) {
  { g.k(args) } -> std::same_as<int>;
  { g.can_implement(args) } -> std::same_as<status>;
};

/// G models gate if:
/// 1. it is a stateless policy (std::semiregular) tagged `gate_tag`;
/// 2. it names a score function and a slot priority;
/// 3. it selects k experts per token, k fixed at compile time or given at run time.
template <class G>
concept gate = std::semiregular<G> && tagged_as<G, gate_tag> && has_score_function<G> &&
    has_priority<G> && selects_k<G>;

/// A gate whose k is a compile-time constant `G::static_k`.
template <class G>
concept static_k_gate = gate<G> && requires {
  { std::integral_constant<int, G::static_k>::value } -> std::convertible_to<int>;
};

}  // namespace moe::gating
