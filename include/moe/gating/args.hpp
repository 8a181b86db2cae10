// SPDX-License-Identifier: Apache-2.0
#pragma once
// Run-time knobs of a gate, as one by-value aggregate (STYLE §7): the capacity factor and
// k are never template parameters, except a static k in `top_k<K>`.

#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>

namespace moe::gating {

/// When the k combine weights of a token are renormalised to sum to one.
enum class renormalize {
  none,          ///< weights are the selected scores as they are
  before_drops,  ///< divide by the sum over the k selected experts (Tutel's normalize_gate)
  after_drops,   ///< divide by the sum over the kept experts only
};

/// The run-time arguments of a gate.
struct gate_args {
  index_t tokens = 0;              ///< T: tokens routed in one call (an upper bound for sizing)
  index_t experts = 0;             ///< E: experts over all ranks
  int k = 0;                       ///< experts per token for `top_any`; 0 = the gate's static k
  float capacity_factor = 1.0f;    ///< f: > 0 fixed, == 0 dynamic, < 0 dynamic capped by |f|
  index_t capacity_alignment = 1;  ///< capacity rounded up to a multiple of this
  renormalize normalize = renormalize::none;
  float aux_loss_coef = 0.0f;  ///< coefficient of the GShard aux loss; 0 disables it
  float z_loss_coef = 0.0f;    ///< coefficient of the router z-loss; 0 disables it
};

}  // namespace moe::gating
