// SPDX-License-Identifier: Apache-2.0
// layer_args_fuzz's layers with expert::ffn<act::gelu> experts (see layer_args_fuzz.cpp).

#include "layer_args_fuzz.hpp"

void moe_fuzz::fuzz_ffn_layers(fuzz_case const& c, int gate, bool ragged) {
  fuzz_expert<expert::ffn<act::gelu>>(c, gate, ragged);
}
