// SPDX-License-Identifier: Apache-2.0
// GShard's random routing decides a token's 2nd expert: a gate with a static k other than 2
// cannot take it.
// expected-error: "moe::gating::random_routing: random routing .* needs k = 2"

#include <moe/gating.hpp>

#ifdef MOE_PASSING_TWIN
using gate_t = moe::gating::with<moe::gating::top_k<2>, moe::gating::random_routing>;
#else
using gate_t = moe::gating::with<moe::gating::top_k<3>, moe::gating::random_routing>;
#endif

int main() {
  gate_t const gate;
  return gate.k({}) == 2 ? 0 : 1;
}
