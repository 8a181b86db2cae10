// SPDX-License-Identifier: Apache-2.0
#pragma once
// The umbrella header of moe: everything a user composes a layer from. Compiles with the
// host compiler alone; CUDA kernels live in the .cuh headers beside each policy.

#include <moe/comm.hpp>
#include <moe/core.hpp>
#include <moe/expert.hpp>
#include <moe/gating.hpp>
#include <moe/layer.hpp>
#include <moe/layout.hpp>
#include <moe/tune.hpp>
