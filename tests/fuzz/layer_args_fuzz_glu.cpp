// SPDX-License-Identifier: Apache-2.0
// layer_args_fuzz's layers with expert::glu<act::silu> experts (see layer_args_fuzz.cpp).

#include "layer_args_fuzz.hpp"

void moe_fuzz::fuzz_glu_layers(fuzz_case const& c, int gate, bool ragged) {
  fuzz_expert<expert::glu<act::silu>>(c, gate, ragged);
}
