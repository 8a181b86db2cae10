// SPDX-License-Identifier: Apache-2.0
#pragma once
// Umbrella of moe/gating: gate concepts and policies (scores, selection, priority, capacity,
// renormalisation, random routing, losses), their composition and presets, the
// counter-based RNG, and the host backend of routing.

#include <moe/gating/args.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/groups.hpp>
#include <moe/gating/losses.hpp>
#include <moe/gating/philox.hpp>
#include <moe/gating/policies.hpp>
#include <moe/gating/presets.hpp>
#include <moe/gating/priority.hpp>
#include <moe/gating/random_routing.hpp>
#include <moe/gating/router.hpp>
#include <moe/gating/scores.hpp>
#include <moe/gating/top_k.hpp>
#include <moe/gating/weights.hpp>
