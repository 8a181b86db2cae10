// SPDX-License-Identifier: Apache-2.0
#pragma once
// The concepts of gating: score functions, priorities, the other policy axes (capacity,
// expert selection, the 2nd-expert policy, the aux loss, renormalisation) and gates. A
// policy opts in with one member, `using moe_concept = moe::gating::<kind>_tag;`, and is
// checked right after its definition with a namespace-scope static_assert.

#include <moe/core/concepts.hpp>
#include <moe/core/config.hpp>
#include <moe/gating/args.hpp>

#include <concepts>
#include <cstdint>
#include <type_traits>

namespace moe::gating {

struct score_function_tag {};
struct priority_tag {};
struct gate_tag {};
struct capacity_policy_tag {};
struct selection_tag {};
struct second_expert_tag {};
struct aux_loss_tag {};
struct renormalization_tag {};

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

/// C models capacity_policy if it is a stateless policy tagged `capacity_policy_tag` whose
/// `C::rounding` names its rule (capacity.hpp: tutel_capacity, gshard_capacity, …, dropless).
template <class C>
concept capacity_policy = std::semiregular<C> && tagged_as<C, capacity_policy_tag> && requires {
  { C::rounding } -> std::convertible_to<capacity_rounding>;
};

/// S models selection_policy if it is a stateless policy tagged `selection_tag` whose host
/// `S::select(selection_scores, experts)` picks one token's experts (groups.hpp:
/// all_experts, group_limited).
template <class S>
concept selection_policy = std::semiregular<S> && tagged_as<S, selection_tag> &&
    requires(span<double> scores, span<std::int32_t> experts) {
  S::select(scores, experts);
};

/// P models second_expert_policy if it is a stateless policy tagged `second_expert_tag` that
/// says with `P::random` whether the 2nd choice is kept at random (random_routing.hpp).
template <class P>
concept second_expert_policy = std::semiregular<P> && tagged_as<P, second_expert_tag> && requires {
  { P::random } -> std::convertible_to<bool>;
};

/// A models aux_loss_policy if it is a stateless policy tagged `aux_loss_tag` that says which
/// choices it counts (`A::first_choice_only`), whether it averages over the local groups
/// (`A::per_group`) and its name in reports (`A::name`) (losses.hpp: gshard_aux, switch_aux,
/// sequence_aux).
template <class A>
concept aux_loss_policy = std::semiregular<A> && tagged_as<A, aux_loss_tag> && requires {
  { A::first_choice_only } -> std::convertible_to<bool>;
  { A::per_group } -> std::convertible_to<bool>;
  { A::name } -> std::convertible_to<char const*>;
};

/// R models renormalization_policy if it is a stateless policy tagged `renormalization_tag`
/// whose `R::resolve(args, k)` says how a call renormalises (weights.hpp).
template <class R>
concept renormalization_policy = std::semiregular<R> && tagged_as<R, renormalization_tag> &&
    requires(gate_args const& args, int k) {
  { R::resolve(args, k) } -> std::same_as<renormalize>;
};

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

namespace detail {
// The optional policies a gate may name, each as the member type that names it.
template <class G>
using capacity_member = typename G::capacity;
template <class G>
using selection_member = typename G::selection;
template <class G>
using second_expert_member = typename G::second_expert;
template <class G>
using aux_loss_member = typename G::aux_loss;
template <class G>
using renormalization_member = typename G::renormalization;
}  // namespace detail

/// Whether G names the optional policy that Member (one of detail::*_member) reads.
template <class G, template <class> class Member>
concept names_policy = requires {
  typename Member<G>;
};

// Each optional policy is either absent or models its concept.
template <class G>
concept valid_capacity =
    !names_policy<G, detail::capacity_member> || capacity_policy<detail::capacity_member<G>>;
template <class G>
concept valid_selection =
    !names_policy<G, detail::selection_member> || selection_policy<detail::selection_member<G>>;
template <class G>
concept valid_second_expert = !names_policy<G, detail::second_expert_member> ||
                              second_expert_policy<detail::second_expert_member<G>>;
template <class G>
concept valid_aux_loss =
    !names_policy<G, detail::aux_loss_member> || aux_loss_policy<detail::aux_loss_member<G>>;
template <class G>
concept valid_renormalization = !names_policy<G, detail::renormalization_member> ||
                                renormalization_policy<detail::renormalization_member<G>>;

/// The policies a gate may name besides its score function and priority: each is optional
/// (policies.hpp gives the defaults), but one that is named must model its concept.
template <class G>
concept has_valid_policies = valid_capacity<G> && valid_selection<G> && valid_second_expert<G> &&
    valid_aux_loss<G> && valid_renormalization<G>;

/// G models gate if:
/// 1. it is a stateless policy (std::semiregular) tagged `gate_tag`;
/// 2. it names a score function and a slot priority;
/// 3. it selects k experts per token, k fixed at compile time or given at run time;
/// 4. the optional policies it names (`capacity`, `selection`, `second_expert`, `aux_loss`,
///    `renormalization`) model their concepts.
template <class G>
concept gate = std::semiregular<G> && tagged_as<G, gate_tag> && has_score_function<G> &&
    has_priority<G> && selects_k<G> && has_valid_policies<G>;

/// A gate whose k is a compile-time constant `G::static_k`.
template <class G>
concept static_k_gate = gate<G> && requires {
  { std::integral_constant<int, G::static_k>::value } -> std::convertible_to<int>;
};

}  // namespace moe::gating
