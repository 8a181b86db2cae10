// SPDX-License-Identifier: Apache-2.0
#pragma once
// The 2nd-expert policy (GShard's `second_expert_policy`): every selected expert is kept
// (`keep_second_expert`, the default), or GShard's random routing keeps a token's 2nd choice
// only when 2 · g2 > u, u ~ U[0, 1) from the counter-based RNG at (seed, token, column 1,
// stream random_routing), training only. g2 is the 2nd choice's weight before drops and
// before the scaling factor: renormalised over the two selected experts when the call
// renormalises before drops, else its score. A 2nd choice that is not kept claims no slot,
// counts in no load and gets weight 0 (its slot is `no_slot`); the losses still count it,
// as they count choices before drops. Random routing needs k = 2.

#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/gating/args.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/philox.hpp>

#include <cstdint>
#include <limits>
#include <string>

namespace moe::gating {

/// The slot of an assignment that claims none (a 2nd choice random routing left out): past
/// every capacity, so it is never kept.
inline constexpr std::int64_t no_slot = std::numeric_limits<std::int64_t>::max();

/// Every selected expert is kept (the default).
struct keep_second_expert {
  using moe_concept = second_expert_tag;
  static constexpr bool random = false;
};
static_assert(second_expert_policy<keep_second_expert>);

/// GShard's random routing of the 2nd expert (k = 2 only).
struct random_routing {
  using moe_concept = second_expert_tag;
  static constexpr bool random = true;

  [[nodiscard]] static status check(gate_args const&, int k) {
    if (k != 2)
      return status::failure("k", "is " + std::to_string(k) +
                                      "; random routing decides a token's 2nd expert and needs "
                                      "k = 2");
    return {};
  }
};
static_assert(second_expert_policy<random_routing>);
namespace detail {
struct second_expert_without_flag {  // near-miss: tagged, but says nothing
  using moe_concept = second_expert_tag;
};
}  // namespace detail
static_assert(!second_expert_policy<int> &&
              !second_expert_policy<detail::second_expert_without_flag>);

/// Whether random routing keeps token `token`'s 2nd choice of weight g2: 2 · g2 > u.
MOE_HOST_DEVICE constexpr bool keeps_second_expert(double g2, std::uint64_t seed,
                                                   std::int64_t token) noexcept {
  return 2 * g2 > rng_uniform(seed, token, 1, rng_stream::random_routing);
}

}  // namespace moe::gating
