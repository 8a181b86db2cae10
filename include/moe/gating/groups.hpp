// SPDX-License-Identifier: Apache-2.0
#pragma once
// Expert selection: which k experts a token picks from its selection scores (its scores plus
// the expert bias). `all_experts` (the default) takes the top k of all E. `group_limited`
// (DeepSeek-V3's node-limited routing) splits the E experts into N groups of E/N, scores
// each group by the sum of its top-c selection scores, keeps the best M groups (ties: lower
// group index) and takes the top k inside them. Ties between experts go to the lower index,
// and a NaN never beats a number, as in `select_top_k`.
//
// c is the group score policy's, and the frameworks disagree on it (they agree at
// DeepSeek-V3's shape, k = 8 of 8 groups keeping 4, where both give c = 2):
//   top_share_group_score  c = ⌊k/M⌋, at least 1   Megatron-Core's group_limited_topk
//                                                  (its 0 when k < M is raised to 1 here)
//   top_two_group_score    c = 2, whatever k and M  DeepSeek-V3's own inference code (with
//                                                  its bias) and Hugging Face's
//                                                  DeepseekV3TopkRouter
//
// The token groups of GShard's local groups are another thing: gate_args::groups.

#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/gating/args.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/top_k.hpp>

#include <cmath>
#include <cstdint>
#include <string>

namespace moe::gating {

/// The top k of all experts (the default).
struct all_experts {
  using moe_concept = selection_tag;

  /// [in, scratch] selection scores of one token (experts); [out] its experts (k), by
  /// descending selection score.
  static void select(span<double> scores, span<std::int32_t> experts) noexcept {
    select_top_k(scores, experts);
  }
};
static_assert(selection_policy<all_experts>);

/// Megatron-Core's group score (the default): the sum of a group's top ⌊k/M⌋ selection
/// scores. Megatron sums none when k < M (every group then scores 0 and torch.topk keeps
/// arbitrary groups); here a group is scored by at least its best expert.
struct top_share_group_score {
  [[nodiscard]] MOE_HOST_DEVICE static constexpr int count(int k, int top_groups) noexcept {
    return k / top_groups > 1 ? k / top_groups : 1;
  }
};

/// DeepSeek-V3's group score, as its inference code (with the expert bias V3 always has) and
/// Hugging Face's DeepseekV3TopkRouter compute it: the sum of a group's top 2 selection
/// scores, whatever k and M. Groups need at least 2 experts.
struct top_two_group_score {
  [[nodiscard]] MOE_HOST_DEVICE static constexpr int count(int, int) noexcept { return 2; }
};

namespace detail {

/// a ranks above b: greater, or a number against a NaN.
inline bool ranks_above(double a, double b) noexcept {
  return a > b || (std::isnan(b) && !std::isnan(a));
}

}  // namespace detail

/// Group-limited selection: N groups of E/N experts, the best M groups, top k inside them.
/// @tparam Groups     N, the expert groups (DeepSeek-V3: 8)
/// @tparam TopGroups  M, the groups a token may use (DeepSeek-V3: 4)
/// @tparam Experts    E when fixed at compile time (checked against gate_args::experts), or 0
///                    to check only at run time that N divides E
/// @tparam GroupScore how many of a group's best scores make its score: top_share_group_score
///                    (Megatron-Core's, the default) or top_two_group_score (DeepSeek-V3's)
template <int Groups, int TopGroups, int Experts = 0, class GroupScore = top_share_group_score>
struct group_limited {
  static_assert(Groups >= 1 && TopGroups >= 1 && TopGroups <= Groups,
                "moe::gating::group_limited: TopGroups must be in [1, Groups]. Keep at most as "
                "many groups as there are.");
  static_assert(Experts >= 0 && Experts % Groups == 0,
                "moe::gating::group_limited: the group count does not divide the static expert "
                "count. Choose Groups dividing Experts, or leave Experts at 0.");
  using moe_concept = selection_tag;
  static constexpr int groups = Groups;
  static constexpr int top_groups = TopGroups;
  static constexpr int static_experts = Experts;
  using group_score = GroupScore;

  /// c: how many of a group's best selection scores make its score.
  [[nodiscard]] MOE_HOST_DEVICE static constexpr int per_group(int k) noexcept {
    return GroupScore::count(k, TopGroups);
  }

  /// [in, scratch] selection scores of one token (experts), overwritten: the experts outside
  /// the kept groups become −∞; [out] its experts (k), by descending selection score.
  static void select(span<double> scores, span<std::int32_t> experts) noexcept {
    auto const size = static_cast<std::int32_t>(scores.size() / Groups);
    int const c = per_group(static_cast<int>(experts.size()));
    double group_score[Groups];
    std::int32_t best[max_k];
    for (int g = 0; g < Groups; ++g) {
      select_top_k(
          scores.subspan(static_cast<std::size_t>(g * size), static_cast<std::size_t>(size)),
          span<std::int32_t>(best, static_cast<std::size_t>(c)));
      double sum = 0;
      for (int i = 0; i < c; ++i) sum += scores[static_cast<std::size_t>(g * size + best[i])];
      group_score[g] = sum;
    }
    bool kept[Groups] = {};
    for (int m = 0; m < TopGroups; ++m) {
      int pick = -1;
      for (int g = 0; g < Groups; ++g)
        if (!kept[g] && (pick < 0 || detail::ranks_above(group_score[g], group_score[pick])))
          pick = g;
      kept[pick] = true;
    }
    for (int g = 0; g < Groups; ++g)
      if (!kept[g])
        for (std::int32_t i = 0; i < size; ++i)
          scores[static_cast<std::size_t>(g * size + i)] = -INFINITY;
    select_top_k(scores, experts);
  }

  /// N divides E (and E is Experts when fixed), and the kept groups hold k experts.
  [[nodiscard]] static status check(gate_args const& args, int k) {
    if (Experts != 0 && args.experts != Experts)
      return status::failure("experts", "is " + std::to_string(args.experts) +
                                            " but the gate's group_limited fixes " +
                                            std::to_string(Experts));
    if (args.experts % Groups != 0)
      return status::failure("experts", std::to_string(args.experts) +
                                            " experts do not split into " + std::to_string(Groups) +
                                            " equal groups");
    index_t const size = args.experts / Groups;
    if (size * TopGroups < k)
      return status::failure("k", "selects " + std::to_string(k) + " experts from " +
                                      std::to_string(TopGroups) + " groups of " +
                                      std::to_string(size) + " experts");
    if (size < per_group(k))
      return status::failure("experts", "groups of " + std::to_string(size) +
                                            " experts cannot be scored by their best " +
                                            std::to_string(per_group(k)));
    return {};
  }
};
static_assert(selection_policy<group_limited<8, 4>> && selection_policy<group_limited<2, 1, 4>> &&
              selection_policy<group_limited<8, 4, 0, top_two_group_score>>);

namespace detail {
struct selection_without_select {  // near-miss: tagged, but selects nothing
  using moe_concept = selection_tag;
};
}  // namespace detail
static_assert(!selection_policy<int> && !selection_policy<detail::selection_without_select>);

}  // namespace moe::gating
