// SPDX-License-Identifier: Apache-2.0
// A dropless gate (capacity policy gating::dropless, e.g. preset::mixtral) with the capacity
// layout, which drops assignments past C, stops the build with moe's message.
// expected-error: "moe::layer: the gate is dropless .* but layout::capacity drops"

#include <moe/moe.hpp>

#ifdef MOE_PASSING_TWIN
using layout_t = moe::layout::ragged;
#else
using layout_t = moe::layout::capacity;
#endif

using layer_t = moe::layer<moe::gating::preset::mixtral, layout_t, moe::comm::single_rank,
                           moe::expert::ffn<moe::act::relu>>;

int main() {
  layer_t const layer(moe::layer_args{.gate = {.tokens = 8, .experts = 4}, .hidden = 4, .ffn = 4});
  return layer.k() == 2 ? 0 : 1;
}
