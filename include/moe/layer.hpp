// SPDX-License-Identifier: Apache-2.0
#pragma once
// Umbrella of moe/layer: the MoE layer and its composition rules.

#include <moe/layer/concepts.hpp>
#include <moe/layer/layer.hpp>
#include <moe/layer/parameters.hpp>
