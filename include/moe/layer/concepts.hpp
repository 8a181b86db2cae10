// SPDX-License-Identifier: Apache-2.0
#pragma once
// Cross-policy rules of a layer. Each rule is a named concept; `moe::layer` checks each with
// one static_assert whose message says what is wrong and how to fix it.

#include <moe/comm/concepts.hpp>
#include <moe/expert/concepts.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/policies.hpp>
#include <moe/layout/concepts.hpp>

namespace moe {

/// The four policies of a layer each model their concept.
template <class Gate, class Layout, class Collective, class Expert>
concept layer_policies = gating::gate<Gate> && layout::dispatch_layout<Layout> &&
    comm::collective<Collective> && expert::expert<Expert>;

/// A gate fits a layout unless the gate is dropless (capacity policy gating::dropless) and
/// the layout drops assignments past a capacity (layout::capacity): a dropless gate needs a
/// dropless layout (layout::ragged).
template <class Gate, class Layout>
concept gate_capacity_fits_layout = gating::gate<Gate> && layout::dispatch_layout<Layout> &&
    !(gating::is_dropless<Gate> && Layout::drops_tokens);

}  // namespace moe
