// SPDX-License-Identifier: Apache-2.0
#pragma once
// Run-time knobs of a gate, as one by-value aggregate (STYLE §7): the capacity factor and
// k are never template parameters, except a static k in `top_k<K>`. Every field has a
// default that reproduces the plain Tutel gate (no noise, one group, no bias, scale 1).

#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>

#include <cstdint>

namespace moe::gating {

/// When the k combine weights of a token are renormalised to sum to one.
enum class renormalize {
  none,          ///< weights are the selected scores as they are
  before_drops,  ///< divide by the sum over the k selected experts (Tutel's normalize_gate)
  after_drops,   ///< divide by the sum over the kept experts only
};

/// How a capacity policy turns the factor into slots per expert (capacity.hpp).
enum class capacity_rounding {
  tutel,      ///< k · ⌊f · ⌈S/E⌉⌋
  gshard,     ///< ⌊S · f / E⌋, 0 → 4, rounded up to a multiple of 4
  deepspeed,  ///< ⌈S/E · f · k⌉ in float32, at least min_capacity
  megatron,   ///< ⌈S · k / E · f⌉, at most S
  switch_tf,  ///< max(4, min(S, ⌊S · f / E⌋)) (Switch Transformer, Mesh TensorFlow)
  dropless,   ///< no capacity: the largest load
};

/// What the multiplicative jitter U[1−ε, 1+ε] multiplies (training only).
enum class jitter_target {
  input,   ///< each element of the router's input x (Switch, DeepSpeed "Jitter", Megatron)
  logits,  ///< each router logit
};

/// The run-time arguments of a gate.
struct gate_args {
  index_t tokens = 0;   ///< T: tokens routed in one call (an upper bound for sizing)
  index_t experts = 0;  ///< E: experts over all ranks
  int k = 0;            ///< experts per token for `top_any`; 0 = the gate's static k
  /// f: > 0 fixed, == 0 dynamic, < 0 dynamic capped by |f|. A double, as the frameworks'
  /// Python gives it: each capacity rule does its framework's arithmetic on it (capacity.hpp).
  double capacity_factor = 1.0;
  index_t capacity_alignment = 1;  ///< capacity rounded up to a multiple of this
  renormalize normalize = renormalize::none;
  // The real knobs the frameworks take as Python floats are doubles, so that a coefficient
  // such as 1e-2 or a scaling factor such as 2.5 or 1.1 is the value the user wrote.
  double aux_loss_coef = 0.0;  ///< coefficient of the gate's aux loss; 0 disables it
  double z_loss_coef = 0.0;    ///< coefficient of the router z-loss; 0 disables it

  // --- added with the policy axes (DESIGN §4); the defaults change nothing above --------
  /// Training or evaluation: noise and random routing apply only in training, and
  /// evaluation uses `eval_capacity_factor` instead of `capacity_factor`.
  bool training = true;
  double eval_capacity_factor = 1.0;  ///< f while !training (DeepSpeed's and GShard's default 1)
  /// `deepspeed_capacity` only: C is at least this (DeepSpeed's `min_capacity`, default 4).
  index_t min_capacity = 4;
  /// G local groups (GShard): the call's T tokens split into G contiguous groups of S = T/G,
  /// each with its own capacity and slot priority; the aux losses average over the groups.
  /// T must be a multiple of G.
  index_t groups = 1;
  /// The combine weights are multiplied by this after renormalisation (DeepSeek-V3's
  /// routed_scaling_factor, Megatron's moe_router_topk_scaling_factor). Must be > 0.
  double scaling_factor = 1.0;
  /// The noise knobs stay float: the frameworks draw their noise in float32 from them
  /// (DeepSpeed's Uniform(1 − ε, 1 + ε) on float32 tensors), and no draw is comparable anyway.
  float jitter = 0.0f;  ///< ε of the multiplicative jitter U[1−ε, 1+ε], 0 ≤ ε < 1; training only
  jitter_target jitter_on = jitter_target::input;
  /// Additive Gaussian logit noise with standard deviation gate_noise / E (Tutel's
  /// gate_noise); training only. The scores, weights and losses all see the noisy logits.
  float gate_noise = 0.0f;
  /// Key of the counter-based RNG (gating/philox.hpp) behind noise, random routing and the
  /// random priority. Fold the step and the rank into it: token indices restart on every
  /// call and every rank.
  std::uint64_t seed = 0;
  /// Per-expert selection bias b (E values, or empty for none; host memory for the host
  /// backend, device memory for the CUDA one): experts are ranked by s_e + b_e, but the
  /// weights are the unbiased s_e (aux-loss-free balancing, DeepSeek-V3). Update it between
  /// steps with `update_expert_bias` (losses.hpp).
  span<float const> expert_bias = {};
  /// The tokens the capacity is sized for, in place of the call's T; 0 = the call's T. With
  /// expert parallelism and a different T on each rank, the largest T over the ranks: every
  /// rank then has the same C, so that the capacity layout's all-to-all moves equal blocks
  /// (Tutel's `inequivalent_tokens`). At least the call's T, a multiple of the local groups.
  /// moe::layer sets it itself, and takes 0 here.
  index_t capacity_tokens = 0;
};

}  // namespace moe::gating
