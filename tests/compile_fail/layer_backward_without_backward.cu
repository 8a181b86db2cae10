// SPDX-License-Identifier: Apache-2.0
// Training a layer whose expert has no backward stops the build with moe's message.
// expected-error: "moe::layer::backward: Expert has no backward"

#include <moe/moe.hpp>

#include <vector>

using moe::index_t;
using ffn = moe::expert::ffn<moe::act::relu>;

/// The FFN expert with its backward hidden: an inference-only expert.
struct forward_only_ffn {
  using moe_concept = moe::expert::expert_tag;
  template <class T>
  using params = ffn::params<T>;
  using host_state = ffn::host_state;
  template <class T>
  static moe::status check(params<T> const& p, moe::expert::expert_shape const& s,
                           char const* name) {
    return ffn::check(p, s, name);
  }
  static host_state carve_host_state(moe::workspace_carver& carver,
                                     moe::expert::expert_shape const& s, index_t max_rows,
                                     index_t rows) {
    return ffn::carve_host_state(carver, s, max_rows, rows);
  }
  template <class T>
  static void forward(moe::host_backend, moe::expert::expert_shape const& s,
                      params<T const> const& p, moe::expert::row_segments const& segments,
                      moe::matrix_view<double const> in, moe::matrix_view<double> out,
                      host_state const& state) {
    ffn::forward(moe::host, s, p, segments, in, out, state);
  }
};
static_assert(moe::expert::expert<forward_only_ffn> &&
              !moe::expert::trainable_expert<forward_only_ffn>);

#ifdef MOE_PASSING_TWIN
using expert_t = ffn;
#else
using expert_t = forward_only_ffn;
#endif

int main() {
  using layer_t =
      moe::layer<moe::gating::top_k<1>, moe::layout::capacity, moe::comm::single_rank, expert_t>;
  layer_t const layer(moe::layer_args{.gate = {.tokens = 4, .experts = 2}, .hidden = 2, .ffn = 2});
  std::vector<float> buffer(64, 0.5f);
  auto const x = moe::make_view(static_cast<float const*>(buffer.data()), 4, 2);
  auto const dx = moe::make_view(buffer.data() + 8, 4, 2);
  layer_t::params<float> p{};
  layer_t::gradients<float> g{};
  try {
    layer.backward(moe::host, x, p, dx, g, moe::workspace{});
  } catch (moe::error const&) {
    return 0;  // no forward came first: the call is rejected, as it should be
  }
  return 1;
}
