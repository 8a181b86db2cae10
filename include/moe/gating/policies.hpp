// SPDX-License-Identifier: Apache-2.0
#pragma once
// The policy axes of a gate and how to compose them. A gate names its score function and
// slot priority, and may name five more policies; the ones it leaves out take the defaults,
// which reproduce the plain Tutel gate:
//
//   member            concept                  default               others
//   capacity          capacity_policy          tutel_capacity        gshard_, deepspeed_,
//                                                                    megatron_, switch_capacity,
//                                                                    dropless
//   selection         selection_policy         all_experts           group_limited<N, M>
//   second_expert     second_expert_policy     keep_second_expert    random_routing
//   aux_loss          aux_loss_policy          gshard_aux            switch_aux, sequence_aux
//   renormalization   renormalization_policy   args_renormalization  fixed_renormalization<R>
//
// `capacity_of<G>` and its siblings read them. `with<Gate, Policies...>` is Gate with the
// given policies in place of its own (any order, at most one of each kind), and checks the
// static rules of their combination:
//
//   using gate_t = gating::with<gating::top_k<2>, gating::gshard_capacity,
//                               gating::random_routing>;

#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/gating/args.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/groups.hpp>
#include <moe/gating/losses.hpp>
#include <moe/gating/random_routing.hpp>
#include <moe/gating/top_k.hpp>
#include <moe/gating/weights.hpp>

#include <type_traits>

namespace moe::gating {

namespace detail {

/// G's optional policy that Member reads, or Default when G names none.
template <class G, template <class> class Member, class Default>
struct policy_or {
  using type = Default;
};
template <class G, template <class> class Member, class Default>
requires names_policy<G, Member>
struct policy_or<G, Member, Default> {
  using type = Member<G>;
};

}  // namespace detail

/// G's capacity policy (tutel_capacity when it names none).
template <class G>
using capacity_of = typename detail::policy_or<G, detail::capacity_member, tutel_capacity>::type;
/// G's expert selection (all_experts when it names none).
template <class G>
using selection_of = typename detail::policy_or<G, detail::selection_member, all_experts>::type;
/// G's 2nd-expert policy (keep_second_expert when it names none).
template <class G>
using second_expert_of =
    typename detail::policy_or<G, detail::second_expert_member, keep_second_expert>::type;
/// G's aux loss (gshard_aux when it names none).
template <class G>
using aux_loss_of = typename detail::policy_or<G, detail::aux_loss_member, gshard_aux>::type;
/// G's renormalisation (args_renormalization when it names none).
template <class G>
using renormalization_of =
    typename detail::policy_or<G, detail::renormalization_member, args_renormalization>::type;

/// Whether G drops nothing by construction (its capacity policy is `dropless`).
template <class G>
inline constexpr bool is_dropless = capacity_of<G>::rounding == capacity_rounding::dropless;

namespace detail {

/// P's run-time check, when it has one.
template <class P>
status check_policy(gate_args const& args, int k) {
  if constexpr (requires {
                  { P::check(args, k) } -> std::same_as<status>;
                })
    return P::check(args, k);
  else
    return {};
}

/// The last of Policies tagged Tag, or Fallback.
template <class Tag, class Fallback, class... Policies>
struct pick {
  using type = Fallback;
};
template <class Tag, class Fallback, class P, class... Policies>
struct pick<Tag, Fallback, P, Policies...>
    : pick<Tag, std::conditional_t<tagged_as<P, Tag>, P, Fallback>, Policies...> {};

template <class Tag, class... Policies>
inline constexpr int count_tagged = (0 + ... + (tagged_as<Policies, Tag> ? 1 : 0));

template <class P>
inline constexpr bool is_gate_policy =
    score_function<P> || priority<P> || capacity_policy<P> || selection_policy<P> ||
    second_expert_policy<P> || aux_loss_policy<P> || renormalization_policy<P>;

template <class G>
constexpr int static_k_or(int fallback) noexcept {
  if constexpr (requires { G::static_k; })
    return G::static_k;
  else
    return fallback;
}

}  // namespace detail

template <gate Gate, class... Policies>
struct with;

namespace detail {

/// The checks of G itself, without those of its policies: a gate composed by `with<Inner, …>`
/// (and not overriding `can_implement`) answers with Inner's own checks, so that a policy it
/// replaced is never checked.
template <class G>
[[nodiscard]] status own_checks(G const& gate, gate_args const& args) {
  if constexpr (requires { typename G::composition; }) {
    using composition = typename G::composition;
    if constexpr (std::is_same_v<decltype(&G::can_implement),
                                 decltype(&composition::can_implement)>)
      return own_checks(static_cast<typename composition::inner_gate const&>(gate), args);
    else
      return gate.can_implement(args);
  } else {
    return gate.can_implement(args);
  }
}

}  // namespace detail

/// The run-time checks of all of G's policies, and the knobs every gate shares, after G's
/// own `can_implement`: what the router checks before any work.
template <gate G>
[[nodiscard]] status check_gate(G const& gate, gate_args const& args) {
  if (auto s = gate.can_implement(args); !s) return s;
  if (auto s = detail::check_knobs(args); !s) return s;
  int const k = gate.k(args);
  if (auto s = detail::check_policy<capacity_of<G>>(args, k); !s) return s;
  if (auto s = detail::check_policy<selection_of<G>>(args, k); !s) return s;
  if (auto s = detail::check_policy<second_expert_of<G>>(args, k); !s) return s;
  if (auto s = detail::check_policy<aux_loss_of<G>>(args, k); !s) return s;
  return detail::check_policy<renormalization_of<G>>(args, k);
}

/// Gate with Policies in place of its own: any of a score function, a priority and the five
/// policies of the table at the top of this file, in any order, at most one of each kind.
/// Rejected at compile time: a type that is no gating policy, two policies of one kind, and
/// random routing with a static k other than 2.
template <gate Gate, class... Policies>
struct with : Gate {
  static_assert((detail::is_gate_policy<Policies> && ...),
                "moe::gating::with: a type given is not a gating policy. Give score functions, "
                "priorities, and capacity, selection, second-expert, aux-loss or "
                "renormalization policies.");
  static_assert(detail::count_tagged<score_function_tag, Policies...> <= 1 &&
                    detail::count_tagged<priority_tag, Policies...> <= 1 &&
                    detail::count_tagged<capacity_policy_tag, Policies...> <= 1 &&
                    detail::count_tagged<selection_tag, Policies...> <= 1 &&
                    detail::count_tagged<second_expert_tag, Policies...> <= 1 &&
                    detail::count_tagged<aux_loss_tag, Policies...> <= 1 &&
                    detail::count_tagged<renormalization_tag, Policies...> <= 1,
                "moe::gating::with: two policies of one kind. Give at most one of each kind.");

  using score_function =
      typename detail::pick<score_function_tag, typename Gate::score_function, Policies...>::type;
  using priority = typename detail::pick<priority_tag, typename Gate::priority, Policies...>::type;
  using capacity = typename detail::pick<capacity_policy_tag, capacity_of<Gate>, Policies...>::type;
  using selection = typename detail::pick<selection_tag, selection_of<Gate>, Policies...>::type;
  using second_expert =
      typename detail::pick<second_expert_tag, second_expert_of<Gate>, Policies...>::type;
  using aux_loss = typename detail::pick<aux_loss_tag, aux_loss_of<Gate>, Policies...>::type;
  using renormalization =
      typename detail::pick<renormalization_tag, renormalization_of<Gate>, Policies...>::type;

  static_assert(!second_expert::random || detail::static_k_or<Gate>(2) == 2,
                "moe::gating::random_routing: random routing decides the 2nd expert and needs "
                "k = 2, but the gate's static k is not 2. Use top_k<2> (or top_any with k = 2), "
                "or leave random_routing out.");

  /// This composition, and the gate whose policies it replaces (read by detail::own_checks).
  using composition = with;
  using inner_gate = Gate;

  /// Gate's own checks and the shared knobs, then those of every policy in effect: a policy
  /// of Gate that Policies replaced is not checked.
  [[nodiscard]] status can_implement(gate_args const& args) const {
    if (auto s = detail::own_checks(static_cast<Gate const&>(*this), args); !s) return s;
    if (auto s = detail::check_knobs(args); !s) return s;
    return check_policies(args);
  }

 private:
  [[nodiscard]] status check_policies(gate_args const& args) const {
    int const k = this->k(args);
    if (auto s = detail::check_policy<capacity>(args, k); !s) return s;
    if (auto s = detail::check_policy<selection>(args, k); !s) return s;
    if (auto s = detail::check_policy<second_expert>(args, k); !s) return s;
    if (auto s = detail::check_policy<aux_loss>(args, k); !s) return s;
    return detail::check_policy<renormalization>(args, k);
  }
};

}  // namespace moe::gating
