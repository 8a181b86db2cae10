// SPDX-License-Identifier: Apache-2.0
#pragma once
// Umbrella of moe/comm: collectives.

#include <moe/comm/concepts.hpp>
