// SPDX-License-Identifier: Apache-2.0
//
// libFuzzer target: moe::layer on the host backend with every knob of layer_args decoded
// from the input (sizes, factors including 0, negative, NaN, inf and huge ones, alignments,
// groups, noise, expert_bias with null data), a few gates, both layouts, FFN and GLU
// experts, one rank or a simulated world of 2 to 4 ranks (linear or 2DH all-to-all), and
// calls on views with wrong extents, null data and short workspaces. Outputs are poisoned
// first. It aborts on
//   - a crash or a sanitizer report;
//   - an exception that is not a moe::error;
//   - a rejected call (can_implement said no, or it threw moe::error) that wrote an output;
//   - can_implement saying yes, then the constructor, forward or backward throwing on
//     arguments that are all right;
//   - a workspace size smaller than the input it keeps (a wrapped size computation).
// Huge sizes go only through can_implement and the constructor: nothing huge is allocated.

#include "layer_args_fuzz.hpp"

#include <fuzzer/FuzzedDataProvider.h>

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  using namespace moe_fuzz;
  FuzzedDataProvider in(data, size);
  int const gate = in.ConsumeIntegralInRange(0, 4);
  bool const ragged = in.ConsumeBool();
  bool const glu = in.ConsumeBool();
  fuzz_case const c = decode_case(in);
  if (glu)
    fuzz_glu_layers(c, gate, ragged);
  else
    fuzz_ffn_layers(c, gate, ragged);
  return 0;
}
