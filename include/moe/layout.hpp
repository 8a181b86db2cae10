// SPDX-License-Identifier: Apache-2.0
#pragma once
// Umbrella of moe/layout: dispatch/combine layouts.

#include <moe/layout/capacity.hpp>
#include <moe/layout/concepts.hpp>
