// SPDX-License-Identifier: Apache-2.0
#pragma once
// Umbrella of moe/expert: expert concepts, activations and expert policies (ffn and glu, the
// two policies of two_layer), with their host backends. Their CUDA backends are in
// moe/expert/kernels/*.cuh (nvcc).

#include <moe/expert/activation.hpp>
#include <moe/expert/concepts.hpp>
#include <moe/expert/device_state.hpp>
#include <moe/expert/ffn.hpp>
#include <moe/expert/glu.hpp>
#include <moe/expert/two_layer.hpp>
