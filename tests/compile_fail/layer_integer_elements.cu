// SPDX-License-Identifier: Apache-2.0
// A layer run on integer elements stops the build with moe's message naming the element rule.
// expected-error: "moe::layer: the elements of x, y and the parameters must be float"

#include <moe/moe.hpp>

#include <vector>

#ifdef MOE_PASSING_TWIN
using element_t = float;
#else
using element_t = int;
#endif

int main() {
  using layer_t = moe::layer<moe::gating::top_k<1>, moe::layout::capacity, moe::comm::single_rank,
                             moe::expert::ffn<moe::act::relu>>;
  layer_t const layer(moe::layer_args{.gate = {.tokens = 4, .experts = 2}, .hidden = 2, .ffn = 2});
  std::vector<element_t> buffer(16, element_t{1});
  auto const x = moe::make_view(static_cast<element_t const*>(buffer.data()), 4, 2);
  auto const y = moe::make_view(buffer.data() + 8, 4, 2);
  layer_t::params<element_t> p{};
  try {
    layer.forward(moe::host, x, p, y, moe::workspace{});
  } catch (moe::error const&) {
    return 0;  // empty parameters: the call is rejected, as it should be
  }
  return 1;
}
