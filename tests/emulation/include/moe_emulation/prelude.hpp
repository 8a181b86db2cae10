// SPDX-License-Identifier: Apache-2.0
#pragma once
// Included before every source of an emulated test (-include): the toolkit's own runtime
// headers for every type and declaration, then the execution-space keywords the host
// compiler does not know, and the device built-ins of the emulated runtime. The library's
// headers and the gpu tests then compile unchanged, except for the one launch in
// core/launch.cuh, which under MOE_CUDA_EMULATION calls moe::emulation::launch.
//
// Not emulated (excluded where used, each under a named reason): inline PTX, wgmma, TMA,
// CUTLASS kernels, NCCL.

#ifndef MOE_CUDA_EMULATION
#define MOE_CUDA_EMULATION 1
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __managed__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
// A static __shared__ array is one per OS thread, and blocks run one after another on it;
// unlike dynamic shared memory it starts zeroed, not as garbage (the library's kernels take
// all their shared memory from the launch, core/launch.cuh).
#define __shared__ static thread_local

#include <moe_emulation/runtime.hpp>

// nvcc's typed overload, which cuda_runtime.h offers only to nvcc.
template <class T>
cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attribute, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<void const*>(entry), attribute, value);
}
