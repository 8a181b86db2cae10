// SPDX-License-Identifier: Apache-2.0
#pragma once
// Compiler and language configuration: the C++20 gate and the host/device annotations that
// every other header uses. Only this header defines MOE_HOST_DEVICE and its friends.

#if defined(_MSVC_LANG)
#define MOE_CPLUSPLUS _MSVC_LANG
#else
#define MOE_CPLUSPLUS __cplusplus
#endif

#if MOE_CPLUSPLUS < 202002L
#error \
    "moe requires C++20: compile with -std=c++20 (nvcc: -std=c++20; CMake: link moe::moe, \
which requests cxx_std_20 and cuda_std_20)."
#endif

// True inside nvcc's device compilation pass.
#if defined(__CUDA_ARCH__)
#define MOE_DEVICE_COMPILATION 1
#else
#define MOE_DEVICE_COMPILATION 0
#endif

// Functions shared by the host backend and the kernels (size, capacity, slot and offset math)
// are MOE_HOST_DEVICE; under a host-only compiler the annotations disappear.
#if defined(__CUDACC__)
#define MOE_HOST_DEVICE __host__ __device__
#define MOE_DEVICE __device__
#define MOE_FORCEINLINE __forceinline__
#else
#define MOE_HOST_DEVICE
#define MOE_DEVICE
#define MOE_FORCEINLINE inline
#endif

namespace moe {

/// Whether the translation unit including this was compiled with optimisation (-O1 and up
/// define __OPTIMIZE__ on GCC, Clang and nvcc's host side): the host backend, loops over
/// double, runs tens of times slower without it. Programs can say so (the examples do).
/// Not inline: each translation unit has its own, so units built differently do not clash.
#if defined(__OPTIMIZE__) || (defined(_MSC_VER) && !defined(_DEBUG))
constexpr bool optimized_build = true;
#else
constexpr bool optimized_build = false;
#endif

}  // namespace moe
