// SPDX-License-Identifier: Apache-2.0
#pragma once
// Run-time arguments of a dispatch layout's size math and host backend, as one by-value
// aggregate (STYLE §7). Each layout reads the fields that concern it.

#include <moe/core/config.hpp>
#include <moe/core/view.hpp>

namespace moe::layout {

/// What the rows of an expert batch depend on, apart from the per-expert loads.
struct layout_args {
  index_t tokens = 0;         ///< T: tokens of the call (or the most a call routes, for bounds)
  index_t experts = 0;        ///< E
  int k = 0;                  ///< experts per token
  index_t capacity = 0;       ///< C: slots per expert (capacity layout), resolved or bound
  index_t row_alignment = 1;  ///< each expert's rows padded to a multiple of this (ragged)
};

}  // namespace moe::layout
