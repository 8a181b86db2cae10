// SPDX-License-Identifier: Apache-2.0
#pragma once
// The opt-in spelling every concept of the library shares: a policy names the concept it
// models with one member type, `using moe_concept = <the concept's tag>;` (STYLE 6), so that
// a type never models a concept by accident of its shape.

#include <concepts>

namespace moe {

/// T opts in to the concept whose tag is Tag.
template <class T, class Tag>
concept tagged_as = requires {
  typename T::moe_concept;
}
&&std::same_as<typename T::moe_concept, Tag>;

}  // namespace moe
