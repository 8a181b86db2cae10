// SPDX-License-Identifier: Apache-2.0
#pragma once
// Cross-policy rules of a layer. Each rule is a named concept; `moe::layer` checks each with
// one static_assert whose message says what is wrong and how to fix it.

#include <moe/comm/concepts.hpp>
#include <moe/expert/concepts.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/layout/concepts.hpp>

namespace moe {

/// The four policies of a layer each model their concept.
template <class Gate, class Layout, class Collective, class Expert>
concept layer_policies = gating::gate<Gate> && layout::dispatch_layout<Layout> &&
    comm::collective<Collective> && expert::expert<Expert>;

}  // namespace moe
