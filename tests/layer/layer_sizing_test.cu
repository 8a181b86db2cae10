// SPDX-License-Identifier: Apache-2.0
// The CUDA layer's workspace is sized on the host alone: workspace_bytes<T>(cuda) asks no
// device (the router's radix sorts are sized by an upper bound of what CUB asks), so a
// program can size its memory on a machine without a GPU — as this test does in CI.

#include "../support/expect.hpp"

#include <doctest/doctest.h>

#include <moe/expert/kernels/ffn.cuh>
#include <moe/expert/kernels/glu.cuh>
#include <moe/gating/kernels/router.cuh>
#include <moe/layer/kernels/layer.cuh>
#include <moe/moe.hpp>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

using namespace moe;

namespace {

bool has_device() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

template <class Gate, class Layout, class Expert>
using cuda_layer_t = layer<Gate, Layout, comm::single_rank, Expert>;

}  // namespace

TEST_CASE("the CUDA layer's workspace is sized without a device") {
  INFO((has_device() ? "a CUDA device is present" : "no CUDA device: sizes from the host"));
  cuda_backend const no_stream{nullptr, nullptr};
  layer_args const args{
      .gate = {.tokens = 512, .experts = 8, .capacity_factor = 1.25f}, .hidden = 64, .ffn = 128};
  using capacity_layer = cuda_layer_t<gating::top_k<2>, layout::capacity, expert::ffn<act::gelu>>;
  capacity_layer const layer(args);
  std::size_t const in_float = layer.workspace_bytes<float>(no_stream);
  std::size_t const in_bf16 = layer.workspace_bytes<__nv_bfloat16>(no_stream);
  CHECK(in_float > 0);
  CHECK(in_bf16 < in_float);  // the expert batch's elements are half as wide
  CHECK(layer.workspace_bytes<float>(no_stream) == in_float);

  // More tokens, more workspace; a keyed priority (a radix sort of priority keys) too.
  layer_args more = args;
  more.gate.tokens = 4096;
  CHECK(capacity_layer(more).workspace_bytes<float>(no_stream) > in_float);
  using deepspeed_layer =
      cuda_layer_t<gating::preset::deepspeed, layout::capacity, expert::ffn<act::gelu>>;
  CHECK(deepspeed_layer(args).workspace_bytes<float>(no_stream) > 0);

  // The dropless layer of DeepSeek-V3's gate (groups, bias, sigmoid) and GLU experts.
  using deepseek_layer =
      cuda_layer_t<gating::preset::deepseek_v3, layout::ragged, expert::glu<act::silu>>;
  layer_args dropless = args;
  dropless.gate.experts = 16;
  dropless.expert_row_alignment = 16;
  CHECK(deepseek_layer(dropless).workspace_bytes<float>(no_stream) > 0);

  // The router's own size queries, as a program that routes alone would call them.
  CHECK(gating::route_workspace_bytes(gating::preset::deepspeed{}, args.gate) > 0);
  CHECK(gating::route_backward_workspace_bytes<__nv_bfloat16>(gating::top_k<2>{}, args.gate,
                                                              args.hidden) > 0);
}

TEST_CASE("the CUDA router rejects real knobs its float kernels cannot hold") {
  // The host computes in double and takes them; the CUDA router's float would hold inf.
  gating::gate_args large{.tokens = 64, .experts = 8, .scaling_factor = 1e39};
  CHECK(gating::top_k<2>{}.can_implement(large).ok());
  CHECK(test::rejected_argument([&] {
          (void)gating::route_workspace_bytes(gating::top_k<2>{}, large);
        }) == "scaling_factor");
  large.scaling_factor = 3e38;  // float's range holds it
  CHECK(gating::route_workspace_bytes(gating::top_k<2>{}, large) > 0);
  large.z_loss_coef = 1e40;
  CHECK(gating::top_k<2>{}.can_implement(large).ok());
  CHECK(test::rejected_argument([&] {
          (void)gating::route_workspace_bytes(gating::top_k<2>{}, large);
        }) == "z_loss_coef");
}
