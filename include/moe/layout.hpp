// SPDX-License-Identifier: Apache-2.0
#pragma once
// Umbrella of moe/layout: dispatch/combine layouts.

#include <moe/layout/args.hpp>
#include <moe/layout/capacity.hpp>
#include <moe/layout/concepts.hpp>
#include <moe/layout/ragged.hpp>
#include <moe/layout/row_map.hpp>
