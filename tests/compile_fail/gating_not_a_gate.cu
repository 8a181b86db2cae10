// SPDX-License-Identifier: Apache-2.0
// A type that is not a gate, used as a layer's gate, stops the build with moe's message.
// expected-error: "moe::layer: Gate is not a moe::gating::gate"

#include <moe/moe.hpp>

struct not_a_gate {};  // no moe_concept tag, no score function, no k

#ifdef MOE_PASSING_TWIN
using gate_t = moe::gating::top_k<2>;
#else
using gate_t = not_a_gate;
#endif

using layer_t = moe::layer<gate_t, moe::layout::capacity, moe::comm::single_rank,
                           moe::expert::ffn<moe::act::relu>>;

int main() {
  layer_t const layer(moe::layer_args{.gate = {.tokens = 8, .experts = 4}, .hidden = 4, .ffn = 4});
  return layer.k() == 2 ? 0 : 1;
}
