// SPDX-License-Identifier: Apache-2.0
// Group-limited routing splits the experts into equal groups: a group count that does not
// divide a static expert count stops the build.
// expected-error: "moe::gating::group_limited: the group count does not divide the static"

#include <moe/gating.hpp>

#ifdef MOE_PASSING_TWIN
using selection_t = moe::gating::group_limited<4, 2, 16>;
#else
using selection_t = moe::gating::group_limited<3, 2, 16>;
#endif

using gate_t = moe::gating::with<moe::gating::top_k<4, moe::gating::sigmoid>, selection_t>;

int main() {
  gate_t const gate;
  return gate.k({}) == 4 ? 0 : 1;
}
