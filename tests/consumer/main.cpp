// SPDX-License-Identifier: Apache-2.0
//
// The consumer test's program: it includes every public host header from the installed tree,
// composes the README's layer and checks its arguments. It needs no GPU.
#include <moe/moe.hpp>
#include <moe/version.hpp>

#include <cstdio>
#include <cstring>

// Defined in kernel.cu: the __cplusplus that nvcc (or, without nvcc, g++) saw there.
long moe_consumer_kernel_cplusplus();

int main() {
  static_assert(moe::version_major == MOE_VERSION_MAJOR);
  std::printf("moe %s (host C++ %ld)\n", moe::version_string, static_cast<long>(__cplusplus));
  if (std::strlen(MOE_VERSION) == 0) return 1;

  using layer_t = moe::layer<moe::gating::top_k<2>, moe::layout::capacity, moe::comm::single_rank,
                             moe::expert::ffn<moe::act::gelu>>;
  moe::layer_args const args{.gate = {.tokens = 16, .experts = 4}, .hidden = 8, .ffn = 16};
  if (auto const s = layer_t::can_implement(args); !s) {
    std::printf("can_implement: %s\n", s.message().c_str());
    return 1;
  }

  long const kernel_cplusplus = moe_consumer_kernel_cplusplus();
  std::printf("kernel.cu C++ %ld\n", kernel_cplusplus);
  return kernel_cplusplus >= 202002L ? 0 : 1;
}
