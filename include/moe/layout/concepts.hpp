// SPDX-License-Identifier: Apache-2.0
#pragma once
// The concept of a dispatch/combine layout: how the assignments of tokens to experts are
// laid out in memory for the experts, and gathered back.

#include <moe/core/concepts.hpp>
#include <moe/core/config.hpp>
#include <moe/gating/concepts.hpp>

#include <concepts>

namespace moe::layout {

struct dispatch_layout_tag {};

/// L models dispatch_layout if:
/// 1. it is a stateless policy (std::semiregular) tagged `dispatch_layout_tag`;
/// 2. `L::drops_tokens` says whether assignments beyond a capacity are dropped (true for
///    the capacity layout, false for a dropless one).
/// Beside the policy, its header gives the expert batch's size math and host backend, by
/// overloads on the tag that the layer calls: `rows_bound(L{}, layout_args)` bounds the
/// rows, and `offsets(host, L{}, layout_args, load, begin, rows)` lays out each expert's
/// segment of them; dispatch and combine are then the shared row map code (row_map.hpp).
template <class L>
concept dispatch_layout = std::semiregular<L> && tagged_as<L, dispatch_layout_tag> && requires {
  { L::drops_tokens } -> std::convertible_to<bool>;
};

}  // namespace moe::layout
