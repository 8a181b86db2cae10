// SPDX-License-Identifier: Apache-2.0
//
// The README's first program, verbatim between the markers: a top-2 SwiGLU layer on the
// host backend, from composition to backward. The consumer tests build and run it against
// the installed package, so that what the README shows is what a new user can compile.
// example-begin first_layer
#include <moe/moe.hpp>

#include <cmath>
#include <iostream>
#include <vector>

int main() {
  using layer_t = moe::layer<moe::gating::top_k<2>, moe::layout::capacity, moe::comm::single_rank,
                             moe::expert::glu<moe::act::silu>>;
  moe::index_t const tokens = 64, hidden = 32;
  layer_t const layer({.gate = {.tokens = tokens, .experts = 8, .capacity_factor = 1.25},
                       .hidden = hidden,
                       .ffn = 64});               // throws moe::invalid_argument, naming it
  moe::host_parameters<layer_t, float> w(layer);  // owns the parameters and their gradients
  w.initialize(moe::initializer::torch_linear(), /*seed=*/1);

  std::vector<float> x(tokens * hidden), y(x.size()), dy(x.size(), 1.0f), dx(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * float(i));
  auto rows = [&](auto& v) { return moe::make_view(v.data(), tokens, hidden); };
  moe::host_buffer ws(layer.workspace_bytes(moe::host));  // CUDA: workspace_bytes<T>(cuda)

  layer.forward(moe::host, rows(x), w.params(), rows(y), ws.view());
  std::cout << layer.stats(moe::host, ws.view()) << "\n";  // loads, drops, the aux loss
  layer.backward(moe::host, rows(dy), w.params(), rows(dx), w.gradients(), ws.view());
  for (moe::parameter_shape const& p : layer.parameter_shapes())  // names, axes, PyTorch
    std::cout << p.name << " " << moe::describe(p) << ": " << p.torch << "\n";
}
// example-end
