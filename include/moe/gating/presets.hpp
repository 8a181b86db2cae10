// SPDX-License-Identifier: Apache-2.0
#pragma once
// Presets: gates that compose the policy axes as each framework documents its router, so
// that a layer reproduces that framework's routing (DESIGN §4). Each is a gate type; the
// run-time knobs a framework leaves to its user (capacity factor, min_capacity, the scaling
// factor, noise, the seed, coefficients, the expert bias) stay in gate_args / layer_args.
// Where a framework's detail is not an axis here, the preset's comment says what differs.
// tests/conformance/ runs each against the framework's own code (README: Conformance); the
// differences that code shows against its intent are kept here, said in each comment, and
// pinned by the test named there.
//
//   preset               k      scores        selection           priority      capacity
//   gshard               2      softmax       top-k               choice-major  gshard
//   tutel                any    softmax       top-k               choice-major  tutel
//   deepspeed            1      softmax       top-k               random (RTS)  deepspeed
//   deepspeed_top2       2      softmax       top-k               choice-major  deepspeed
//   megatron             2      softmax_topk  top-k               by_score      megatron
//   switch_transformer   1      softmax       top-k               token order   switch
//   mixtral              2      softmax_topk  top-k               token-major   dropless
//   deepseek_v3          8      sigmoid+bias  8 groups, best 4    token-major   dropless
//   deepseek<K, G, M>    K      sigmoid+bias  G groups, best M    token-major   dropless
//   deepseek_native<…>   as deepseek; groups scored by their top 2, renormalised at every k
//   qwen3                8      softmax       top-k               token-major   dropless
//
//   preset               renormalisation       2nd expert   aux loss
//   gshard               before drops          random       gshard_aux (per local group)
//   tutel                before drops (k > 1)  kept         gshard_aux
//   deepspeed            none                  —            gshard_aux
//   deepspeed_top2       after drops           kept         gshard_aux
//   megatron             over the selected     kept         switch_aux
//   switch_transformer   none                  —            gshard_aux (= Switch's at k = 1)
//   mixtral              over the selected     kept         switch_aux
//   deepseek_v3          before drops (k > 1)  kept         sequence_aux
//   qwen3                before drops          kept         switch_aux
//
// The dropless presets need a dropless layout (layout::ragged): with layout::capacity a layer
// stops at compile time. `switch` is a C++ keyword, hence `switch_transformer`.

#include <moe/core/config.hpp>
#include <moe/gating/args.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/groups.hpp>
#include <moe/gating/losses.hpp>
#include <moe/gating/policies.hpp>
#include <moe/gating/priority.hpp>
#include <moe/gating/random_routing.hpp>
#include <moe/gating/scores.hpp>
#include <moe/gating/top_k.hpp>
#include <moe/gating/weights.hpp>

namespace moe::gating::preset {

/// GShard (Lepikhin et al. 2021, Algorithm 1; Lingvo): top-2 of a softmax, g1 and g2
/// renormalised over the two before capacity, the 2nd expert kept iff 2 · g2 > u in
/// training, all 1st choices before all 2nd choices, capacity ⌊S · f / E⌋ in fours per local
/// group (gate_args::groups; f includes k, e.g. 2.0), aux loss per group over 1st choices.
struct gshard : with<top_k<2, softmax, choice_major>, gshard_capacity, random_routing,
                     fixed_renormalization<renormalize::before_drops>, gshard_aux> {};
static_assert(gate<gshard> && static_k_gate<gshard>);

/// Tutel's top-ANY gate with its defaults (normalize_gate = True): k per call, softmax,
/// weights renormalised over the selected before drops when k > 1, choice-major, Tutel's
/// capacity (dynamic when f ≤ 0), gshard_aux; gate_noise in training.
struct tutel : with<top_any<softmax, choice_major>, tutel_capacity,
                    fixed_renormalization<renormalize::before_drops, 2>, gshard_aux> {};
static_assert(gate<tutel> && !static_k_gate<tutel>);

/// DeepSpeed's default MoE (TopKGate, k = 1, top1gating with use_rts = True): softmax, the
/// kept tokens of an overflowing expert drawn at random (RTS), capacity ⌈S/E · f⌉ at least
/// min_capacity (default 4), the weight the softmax score, gshard_aux over 1st choices before
/// drops. noisy_gate_policy "Jitter" is gate_args::jitter on the input; "RSample" (Gumbel
/// noise on the selection) is not modelled. DeepSpeed's l_aux takes ce as a float32 mean, so
/// it differs from this exact one by float32 rounding (test_l_aux_float32_ce); without RTS its
/// torch.topk keeps an arbitrary one of tied tokens on the CPU where this keeps the first
/// (test_topk_ties_on_cpu).
struct deepspeed : with<top_k<1, softmax, random_order>, deepspeed_capacity, gshard_aux> {};
static_assert(gate<deepspeed> && static_k_gate<deepspeed>);

/// DeepSpeed's top2gating: capacity ⌈S/E · 2f⌉ at least min_capacity, 2nd choices after all
/// 1st, the two weights renormalised after drops, gshard_aux over 1st choices. DeepSpeed
/// samples the 2nd expert with Gumbel noise by default (top2_2nd_expert_sampling); this
/// preset selects it greedily, as that flag set to False does. DeepSpeed's top2gating runs in
/// float32 only (with float64 logits it raises).
struct deepspeed_top2 : with<top_k<2, softmax, choice_major>, deepspeed_capacity,
                             fixed_renormalization<renormalize::after_drops>, gshard_aux> {};
static_assert(gate<deepspeed_top2>);

/// Megatron-Core's TopKRouter with token dropping (moe_router_topk = 2, score function
/// softmax without pre-softmax, load balancing "aux_loss", drop policy "probs"): top-k on the
/// logits and a softmax over the k, capacity get_capacity(T·k, E, f) capped at S, the
/// assignments of larger probability kept, switch_aux. The scaling factor is
/// moe_router_topk_scaling_factor. With layout::ragged it is dropless (capacity_factor None).
/// Megatron takes its softmax and sigmoid in float32 whatever the router dtype, so its weights
/// carry float32 rounding; its aux loss counts the plain top-k of the unbiased scores, without
/// the expert bias and the group limit, where switch_aux counts the experts selected
/// (test_aux_loss_counts_unbiased_top_k); "position" keeps an arbitrary one of tied tokens.
struct megatron : with<top_k<2, softmax_topk, by_score>, megatron_capacity, switch_aux> {};
static_assert(gate<megatron>);

/// The Switch Transformer (Fedus et al. 2022; Mesh TensorFlow): top-1 of a softmax, the weight
/// the score, tokens in order, capacity max(4, min(S, ⌊S · f / E⌋)) per local group, its aux
/// loss E · Σ f_e · P_e per group (gshard_aux at k = 1); router z-loss and input jitter
/// (gate_args::jitter, Switch's 1e-2) are knobs. Hugging Face's router takes an integer
/// expert_capacity per sequence (f = (C + ½) · E / S gives it here, a sequence per local
/// group) and its dtype from router_dtype, which its config limits to float32, float16 and
/// bfloat16.
struct switch_transformer : with<top_k<1, softmax, token_major>, switch_capacity, gshard_aux> {};
static_assert(gate<switch_transformer>);

/// Mixtral (Hugging Face MixtralSparseMoeBlock): top-2 of a softmax renormalised over the two,
/// i.e. a softmax over the two largest logits; no capacity; tokens gathered in token order;
/// aux loss switch_aux (Hugging Face's value is 2 · switch_aux: router_aux_loss_coef · 2).
/// Hugging Face's router takes its softmax of logits.float(): in a float64 model its weights
/// carry float32 rounding (test_routers_round_to_float32).
struct mixtral : with<top_k<2, softmax_topk, token_major>, dropless, switch_aux> {};
static_assert(gate<mixtral> && is_dropless<mixtral>);

/// DeepSeek-V3's gate at another shape, as Megatron-Core generalises it (moe_router_num_groups,
/// moe_router_group_topk, score function sigmoid with expert bias): k of a sigmoid, the
/// experts ranked by s + b (the expert bias, gate_args::expert_bias), Groups expert groups of
/// which the TopGroups with the largest sum of their top ⌊k/TopGroups⌋ biased scores are kept
/// (top_share_group_score; at least the best one, where Megatron sums none when k <
/// TopGroups), the k weights the unbiased scores renormalised over the selected when k > 1,
/// times the scaling factor (2.5 in V3), no capacity, the sequence-level aux loss over the
/// local groups (a sequence each). `deepseek_native` is the other generalisation.
template <int K, int Groups, int TopGroups>
struct deepseek : with<top_k<K, sigmoid, token_major>, group_limited<Groups, TopGroups>, dropless,
                       fixed_renormalization<renormalize::before_drops, 2>, sequence_aux> {};
static_assert(gate<deepseek<2, 2, 1>>);

/// DeepSeek-V3's gate at another shape, as DeepSeek-V3's own inference code and Hugging
/// Face's DeepseekV3TopkRouter write it: as `deepseek`, but a group scores the sum of its top
/// 2 biased scores whatever k and TopGroups (top_two_group_score; groups need 2 experts), and
/// the weights are renormalised at every k, so that at k = 1 the weight is the scaling factor.
/// (DeepSeek's code scores a group by its best score when the model has no bias; V3 has one,
/// and Hugging Face always sums two.) Both agree at V3's shape, k = 8 of 8 groups keeping 4.
template <int K, int Groups, int TopGroups>
struct deepseek_native
    : with<top_k<K, sigmoid, token_major>, group_limited<Groups, TopGroups, 0, top_two_group_score>,
           dropless, fixed_renormalization<renormalize::before_drops>, sequence_aux> {};
static_assert(gate<deepseek_native<1, 4, 2>>);

/// DeepSeek-V3: k = 8, 8 groups, the best 4 (256 experts in the model), where `deepseek` and
/// `deepseek_native` agree. Hugging Face's DeepseekV3TopkRouter computes its logits from
/// x.type(torch.float32): float32 rounding in a float64 model (test_routers_round_to_float32);
/// its block's shared experts are not part of this gate.
struct deepseek_v3 : deepseek<8, 8, 4> {};
static_assert(gate<deepseek_v3> && is_dropless<deepseek_v3> && deepseek_v3::static_k == 8);

/// Qwen3 MoE (Qwen3-30B-A3B, Qwen3-235B-A22B; norm_topk_prob = True): top-8 of a softmax over
/// all experts, renormalised over the eight, no capacity, switch_aux (Hugging Face's value is
/// 8 · switch_aux). Hugging Face's router takes its softmax with dtype=torch.float: float32
/// rounding in a float64 model (test_routers_round_to_float32).
struct qwen3 : with<top_k<8, softmax, token_major>, dropless,
                    fixed_renormalization<renormalize::before_drops>, switch_aux> {};
static_assert(gate<qwen3> && is_dropless<qwen3>);

}  // namespace moe::gating::preset
