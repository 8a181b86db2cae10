// SPDX-License-Identifier: Apache-2.0
#pragma once
// Umbrella of moe/tune: the all-to-all cost model and planner.

#include <moe/tune/cost_model.hpp>
