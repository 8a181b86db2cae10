// SPDX-License-Identifier: Apache-2.0
#pragma once
// Expert capacity: how many slots each expert's buffer has in the capacity layout
// [E, C, H]. The math is constexpr and host/device, shared by both backends.
//
// The tokens of a call may be split into G local groups of S = T/G tokens (GShard); each
// group has its own capacity C_g, and the call's capacity is C = G · C_g (G = 1, S = T by
// default). The rounding rule is a policy, applied to |f|:
//
//   tutel_capacity      k · ⌊f · ⌈S/E⌉⌋                              (the default; Tutel)
//   gshard_capacity     ⌊S · f / E⌋, 0 → 4, rounded up to a multiple of 4  (f includes k)
//   deepspeed_capacity  ⌈S/E · f · k⌉, at least min_capacity          (DeepSpeed)
//   megatron_capacity   min(⌈S · k / E · f⌉, S): an expert receives each token at most once,
//                       so C ≥ S drops nothing (Megatron-Core skips dropping then)
//   switch_capacity     max(4, min(S, ⌊S · f / E⌋))                   (Switch Transformer)
//   dropless            no capacity: C_g is the largest load, nothing is dropped
//
// and then, whatever the rule:
//   f > 0:   C_g = the rule at f
//   f == 0:  C_g = the largest per-(group, expert) load (all choices, before drops; with
//            several ranks, the maximum over the ranks)
//   f < 0:   C_g = min(largest load, the rule at |f|)
// rounded up to a multiple of `alignment`. f is the double the user wrote, and each rule does
// its framework's arithmetic on it: DeepSpeed's in float32, because its _capacity multiplies
// the Python float S/E by torch.tensor(f · k), a float32 tensor under torch's default dtype
// (f = 1.1 at S = 40, E = 4 gives 11 there, and 12 in double from a float 1.1); the others in
// double, as Python's floats (Megatron-Core's get_capacity, Tutel, GShard). The integer steps
// saturate (core/checked.hpp): a capacity that does not fit index_t comes out as
// `size_overflow`, which the layer rejects.
//
// The rules' S is that of `capacity_tokens` when set (expert parallelism with a different T
// on each rank: the largest T, so that every rank has the same C), else the call's. At S = 0
// (an empty call) they give tutel 0, gshard 4, deepspeed min_capacity, megatron 0, switch 4.

#include <moe/core/checked.hpp>
#include <moe/core/config.hpp>
#include <moe/core/view.hpp>
#include <moe/gating/args.hpp>
#include <moe/gating/concepts.hpp>

namespace moe::gating {

/// What capacity depends on, apart from the loads.
struct capacity_args {
  index_t tokens = 0;  ///< T of the call, all groups together
  /// T the rule sizes C for (gate_args::capacity_tokens), at least `tokens`; 0 = `tokens`.
  index_t capacity_tokens = 0;
  index_t experts = 0;
  int k = 0;
  double factor = 1.0;  ///< f of the call (the training or the evaluation factor)
  index_t alignment = 1;
  capacity_rounding rounding = capacity_rounding::tutel;
  index_t min_capacity = 4;  ///< deepspeed_capacity only
  index_t groups = 1;        ///< G local groups
};

/// The capacity policy of rule R; the named policies below are the frameworks' rules.
template <capacity_rounding R>
struct capacity_rule {
  using moe_concept = capacity_policy_tag;
  static constexpr capacity_rounding rounding = R;
};

/// Tutel's rule (the default).
struct tutel_capacity : capacity_rule<capacity_rounding::tutel> {};
/// GShard's rule: f is the whole factor (2.0 for top-2 at capacity 1), slots in fours.
struct gshard_capacity : capacity_rule<capacity_rounding::gshard> {};
/// DeepSpeed's rule: ⌈S/E · f · k⌉, at least gate_args::min_capacity.
struct deepspeed_capacity : capacity_rule<capacity_rounding::deepspeed> {};
/// Megatron-Core's rule: get_capacity(T·k, E, f), no dropping once it reaches S.
struct megatron_capacity : capacity_rule<capacity_rounding::megatron> {};
/// The Switch Transformer's rule (Mesh TensorFlow's expert capacity, at least 4).
struct switch_capacity : capacity_rule<capacity_rounding::switch_tf> {};
/// No capacity: every assignment is kept. Only a dropless layout (layout::ragged) can hold
/// it; a layer with layout::capacity rejects it at compile time.
struct dropless : capacity_rule<capacity_rounding::dropless> {};
static_assert(capacity_policy<tutel_capacity> && capacity_policy<gshard_capacity> &&
              capacity_policy<deepspeed_capacity> && capacity_policy<megatron_capacity> &&
              capacity_policy<switch_capacity> && capacity_policy<dropless>);
static_assert(!capacity_policy<int> && !capacity_policy<capacity_args>);

namespace detail {

/// The largest finite float, 0x1.fffffep+127.
inline constexpr double float_max = 3.4028234663852886e+38;

/// ⌊x⌋ and ⌈x⌉ of a non-negative double, as index_t; `size_overflow` past index_t.
MOE_HOST_DEVICE constexpr index_t floor_index(double x) noexcept {
  return checked_floor(x);
}
MOE_HOST_DEVICE constexpr index_t ceil_index(double x) noexcept {
  return checked_ceil(x);
}
MOE_HOST_DEVICE constexpr index_t min_index(index_t a, index_t b) noexcept {
  return a < b ? a : b;
}
MOE_HOST_DEVICE constexpr index_t max_index(index_t a, index_t b) noexcept {
  return a < b ? b : a;
}

}  // namespace detail

/// S: the tokens of one local group of the call.
MOE_HOST_DEVICE constexpr index_t group_tokens(capacity_args const& a) noexcept {
  return a.groups > 1 ? a.tokens / a.groups : a.tokens;
}

/// The S the rule sizes C for: that of `capacity_tokens` when set, else the call's. It also
/// bounds every group's load over the ranks that size for it.
MOE_HOST_DEVICE constexpr index_t sized_group_tokens(capacity_args const& a) noexcept {
  index_t const t = a.capacity_tokens > 0 ? a.capacity_tokens : a.tokens;
  return a.groups > 1 ? t / a.groups : t;
}

/// The per-group capacity a factor of magnitude |f| gives under `a.rounding`, before the
/// alignment (0 for dropless, which has none). Tutel's: k · ⌊|f| · ⌈S/E⌉⌋.
MOE_HOST_DEVICE constexpr index_t factor_capacity(capacity_args const& a) noexcept {
  double const f = a.factor < 0 ? -a.factor : a.factor;
  index_t const s = sized_group_tokens(a), e = a.experts > 0 ? a.experts : 1;
  auto const k = static_cast<index_t>(a.k);
  switch (a.rounding) {
    case capacity_rounding::tutel:
      return checked_mul(k, detail::floor_index(f * static_cast<double>(ceil_div(s, e))));
    case capacity_rounding::gshard: {
      index_t const c = detail::floor_index(static_cast<double>(s) * f / static_cast<double>(e));
      return c == 0 ? 4 : round_up(c, 4);
    }
    case capacity_rounding::deepspeed: {
      // torch.ceil((S / E) * torch.tensor(f · k)): both operands rounded to float32, their
      // product (exact in double) rounded to float32. A factor or product past float32's
      // range (torch's inf) saturates: converting such a double to float is undefined.
      double const factor = f * static_cast<double>(k);
      if (!(factor <= detail::float_max)) return size_overflow;
      double const product =
          static_cast<double>(static_cast<float>(static_cast<double>(s) / static_cast<double>(e))) *
          static_cast<double>(static_cast<float>(factor));
      if (!(product <= detail::float_max)) return size_overflow;
      return detail::max_index(detail::ceil_index(static_cast<double>(static_cast<float>(product))),
                               a.min_capacity);
    }
    case capacity_rounding::megatron:
      return detail::min_index(detail::ceil_index(static_cast<double>(s) * static_cast<double>(k) /
                                                  static_cast<double>(e) * f),
                               s);
    case capacity_rounding::switch_tf:
      return detail::max_index(
          4, detail::min_index(
                 s, detail::floor_index(static_cast<double>(s) * f / static_cast<double>(e))));
    case capacity_rounding::dropless:
      return 0;
  }
  return 0;
}

/// True when capacity depends on the loads (f ≤ 0, or dropless): it is known only after
/// routing.
MOE_HOST_DEVICE constexpr bool is_dynamic_capacity(capacity_args const& a) noexcept {
  return !(a.factor > 0) || a.rounding == capacity_rounding::dropless;
}

/// C_g: one local group's capacity for the given largest per-(group, expert) load (ignored
/// when the capacity is fixed), aligned.
MOE_HOST_DEVICE constexpr index_t group_capacity(capacity_args const& a,
                                                 index_t max_load) noexcept {
  index_t c = factor_capacity(a);
  if (a.rounding == capacity_rounding::dropless || a.factor == 0)
    c = max_load;
  else if (a.factor < 0)
    c = max_load < c ? max_load : c;
  return round_up(c, a.alignment);
}

/// The call's capacity C = G · C_g for the given largest per-(group, expert) load.
MOE_HOST_DEVICE constexpr index_t resolve_capacity(capacity_args const& a,
                                                   index_t max_load) noexcept {
  return checked_mul(a.groups > 1 ? a.groups : 1, group_capacity(a, max_load));
}

/// An upper bound of the capacity over all routings of up to `a.tokens` tokens, for sizing
/// buffers: an expert receives each token at most once, so no group's load exceeds S.
MOE_HOST_DEVICE constexpr index_t capacity_bound(capacity_args const& a) noexcept {
  return is_dynamic_capacity(a) ? resolve_capacity(a, sized_group_tokens(a))
                                : resolve_capacity(a, 0);
}

/// The capacity arguments of a call of `tokens` tokens with gate arguments `args`, k experts
/// per token and rounding `rounding`: the training or the evaluation factor, as `args` says.
MOE_HOST_DEVICE constexpr capacity_args capacity_args_of(gate_args const& args, int k,
                                                         capacity_rounding rounding,
                                                         index_t tokens) noexcept {
  return {.tokens = tokens,
          .capacity_tokens = args.capacity_tokens,
          .experts = args.experts,
          .k = k,
          .factor = args.training ? args.capacity_factor : args.eval_capacity_factor,
          .alignment = args.capacity_alignment,
          .rounding = rounding,
          .min_capacity = args.min_capacity,
          .groups = args.groups};
}

}  // namespace moe::gating
