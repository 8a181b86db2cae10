// SPDX-License-Identifier: Apache-2.0
#pragma once
// Umbrella of moe/expert: expert concepts, activations and expert policies.

#include <moe/expert/activation.hpp>
#include <moe/expert/concepts.hpp>
#include <moe/expert/ffn.hpp>
