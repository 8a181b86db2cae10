// SPDX-License-Identifier: Apache-2.0
#pragma once
// What the gpu tests say about the emulated CUDA runtime (tests/emulation/). A test case, or
// the rest of one, that runs code the emulated runtime cannot run (inline PTX, wgmma, TMA,
// CUTLASS kernels, NCCL) starts with MOE_NOT_EMULATED("reason"): on a GPU nothing happens;
// emulated, the reason is recorded, the test case ends there, and the program's report lists
// it after the results.

#if defined(MOE_CUDA_EMULATION)
#include <moe_emulation/runtime.hpp>
#define MOE_NOT_EMULATED(reason)                             \
  do {                                                       \
    ::moe::emulation::exclude((reason), __FILE__, __LINE__); \
    return;                                                  \
  } while (false)
#else
#define MOE_NOT_EMULATED(reason) static_cast<void>(0)
#endif
