// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA backend of expert::glu (glu.hpp declares it): include this header in the .cu file
// that calls glu<Act>::forward or ::backward with a cuda_backend. It is the two-GEMM expert's
// (two_layer.cuh): one GEMM gives the [gate | up] halves of W13 side by side; the kernel
// after it forms act(gate) ⊙ up.

#include <moe/expert/glu.hpp>
#include <moe/expert/kernels/two_layer.cuh>
