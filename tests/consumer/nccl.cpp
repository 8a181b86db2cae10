// SPDX-License-Identifier: Apache-2.0
//
// The consumer test's NCCL program: moe::nccl brings nccl.h and libnccl, enough for moe's
// NCCL communicator. ncclGetVersion needs no GPU.
#include <moe/comm/nccl_communicator.hpp>
#include <moe/version.hpp>

#include <nccl.h>

#include <cstdio>

int main() {
  int version = 0;
  if (ncclGetVersion(&version) != ncclSuccess) return 1;
  std::printf("moe %s with NCCL %d (headers %d)\n", moe::version_string, version,
              NCCL_VERSION_CODE);
  return version > 0 ? 0 : 1;
}
