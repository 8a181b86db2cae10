// SPDX-License-Identifier: Apache-2.0
#pragma once
// Umbrella of moe/comm: the communicator and collective concepts, the simulated world and
// the all-to-all collectives. The NCCL communicator needs NCCL: include
// <moe/comm/nccl_communicator.hpp> and link moe::nccl.

#include <moe/comm/all_to_all.hpp>
#include <moe/comm/communicator_ref.hpp>
#include <moe/comm/concepts.hpp>
#include <moe/comm/simulated_world.hpp>
