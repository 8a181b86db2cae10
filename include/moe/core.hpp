// SPDX-License-Identifier: Apache-2.0
#pragma once
// Umbrella of moe/core: configuration, errors, element types, views, workspace, resources,
// backends and device queries. (The kernel trampoline, core/launch.cuh, needs nvcc.)

#include <moe/core/backend.hpp>
#include <moe/core/checked.hpp>
#include <moe/core/config.hpp>
#include <moe/core/device.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/resource.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
