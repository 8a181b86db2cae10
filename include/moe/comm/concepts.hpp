// SPDX-License-Identifier: Apache-2.0
#pragma once
// The concept of a collective policy: how the dispatched buffer reaches the ranks that own
// its experts and comes back. With one rank it is the identity.

#include <moe/core/config.hpp>
#include <moe/gating/concepts.hpp>

#include <concepts>

namespace moe::comm {

struct collective_tag {};

/// C models collective if it is a stateless policy (std::semiregular) tagged
/// `collective_tag` that says whether it moves data at all (`C::is_identity`).
template <class C>
concept collective = std::semiregular<C> && gating::tagged_as<C, collective_tag> && requires {
  { C::is_identity } -> std::convertible_to<bool>;
};

/// The collective of a layer on one rank: every expert is local, nothing moves.
struct single_rank {
  using moe_concept = collective_tag;
  static constexpr bool is_identity = true;
};
static_assert(collective<single_rank>);

}  // namespace moe::comm
