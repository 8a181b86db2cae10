// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA backend of expert::ffn (ffn.hpp declares it): include this header in the .cu file
// that calls ffn<Act>::forward or ::backward with a cuda_backend. It is the two-GEMM expert's
// (two_layer.cuh), shared with glu.

#include <moe/expert/ffn.hpp>
#include <moe/expert/kernels/two_layer.cuh>
