// SPDX-License-Identifier: Apache-2.0
#pragma once
// Umbrella of moe/gating: gate concepts and policies, capacity, priority, losses, and the
// host backend of routing.

#include <moe/gating/args.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/losses.hpp>
#include <moe/gating/priority.hpp>
#include <moe/gating/router.hpp>
#include <moe/gating/scores.hpp>
#include <moe/gating/top_k.hpp>
