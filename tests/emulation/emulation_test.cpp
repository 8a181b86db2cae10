// SPDX-License-Identifier: Apache-2.0
// The emulated CUDA runtime catches what it promises to catch: divergent barriers, warp
// collectives whose masks are wrong, host reads of device memory, a missing wait between
// streams, launches past an H100's limits, synchronisation inside a capture, and copies
// outside an allocation; and it runs correct code as CUDA does (shuffles, votes, block scan,
// events, graph replay, garbage in fresh shared memory). A device fault is sticky for the
// whole process, so each faulting case runs in a child process.

#include "../support/emulation.hpp"

#include <doctest/doctest.h>

#include <moe/core/launch.cuh>

#include <cub/block/block_scan.cuh>
#include <moe_emulation/runtime.hpp>

#include <cuda_runtime.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

/// Runs `body` in a child process; its exit status, or 128 + the signal that ended it.
template <class Body>
int in_child(Body&& body) {
  std::fflush(nullptr);
  pid_t const pid = fork();
  if (pid == 0) {
    int code = 1;
    try {
      code = body();
    } catch (...) {
      code = 100;
    }
    std::fflush(nullptr);
    _exit(code);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

/// 0 when `error` is what a synchronisation returns after `launch`: a device fault may show
/// at the launch already (eager streams run it there) or at the synchronisation.
template <class Launch>
int expect_after(Launch&& launch, cudaError_t error) {
  try {
    launch();
  } catch (moe::cuda_error const&) {
  }
  return cudaDeviceSynchronize() == error ? 0 : 1;
}

// --- kernels -----------------------------------------------------------------------------

/// Thread `skipper` leaves before the barrier when `diverge`.
struct barrier_kernel {
  struct params {
    int* out;
    int threads;
    bool diverge;
  };
  static dim3 grid(params const&) { return {1}; }
  static dim3 block(params const& p) { return {static_cast<unsigned>(p.threads)}; }
  static std::size_t smem_bytes(params const& p) { return sizeof(int) * p.threads; }
  __device__ void operator()(params const& p, char* smem) const {
    int* shared = reinterpret_cast<int*>(smem);
    int const t = static_cast<int>(threadIdx.x);
    if (p.diverge && t == 5) return;
    shared[t] = t;
    __syncthreads();
    p.out[t] = shared[(t + 1) % p.threads];
  }
};

/// Sums the lanes by xor shuffles under `mask`, ballots the odd lanes and matches lane / 8.
struct warp_kernel {
  struct params {
    unsigned mask;
    int* sums;
    unsigned* ballots;
    unsigned* matches;
  };
  static dim3 grid(params const&) { return {1}; }
  static dim3 block(params const&) { return {64}; }
  static std::size_t smem_bytes(params const&) { return 0; }
  __device__ void operator()(params const& p, char*) const {
    int const t = static_cast<int>(threadIdx.x), lane = t % 32;
    int sum = lane;
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(p.mask, sum, offset);
    p.sums[t] = sum;
    p.ballots[t] = __ballot_sync(0xffffffffu, lane % 2);
    p.matches[t] = __match_any_sync(0xffffffffu, lane / 8);
  }
};

/// Reads shared memory it never wrote.
struct uninitialised_shared_kernel {
  struct params {
    float* out;
  };
  static dim3 grid(params const&) { return {1}; }
  static dim3 block(params const&) { return {32}; }
  static std::size_t smem_bytes(params const&) { return 32 * sizeof(float); }
  __device__ void operator()(params const& p, char* smem) const {
    p.out[threadIdx.x] = reinterpret_cast<float const*>(smem)[threadIdx.x];
  }
};

/// out[i] = in[i] + 1, one block of 256 threads per 256 elements.
struct add_one_kernel {
  struct params {
    int const* in;
    int* out;
    int n;
  };
  static dim3 grid(params const& p) { return {static_cast<unsigned>((p.n + 255) / 256)}; }
  static dim3 block(params const&) { return {256}; }
  static std::size_t smem_bytes(params const&) { return 0; }
  __device__ void operator()(params const& p, char*) const {
    int const i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    if (i < p.n) p.out[i] = p.in[i] + 1;
  }
};

/// An exclusive block scan of 1, 2, 3, ... over 128 threads.
struct scan_kernel {
  using block_scan = cub::BlockScan<int, 128>;
  struct params {
    int* out;
    int* total;
  };
  static dim3 grid(params const&) { return {1}; }
  static dim3 block(params const&) { return {128}; }
  static std::size_t smem_bytes(params const&) { return sizeof(block_scan::TempStorage); }
  __device__ void operator()(params const& p, char* smem) const {
    auto& storage = *reinterpret_cast<block_scan::TempStorage*>(smem);
    int offset = 0, total = 0;
    block_scan(storage).ExclusiveSum(static_cast<int>(threadIdx.x) + 1, offset, total);
    p.out[threadIdx.x] = offset;
    if (threadIdx.x == 0) *p.total = total;
  }
};

template <class T>
T* device_alloc(std::size_t n) {
  void* p = nullptr;
  MOE_CUDA_TRY(cudaMalloc(&p, n * sizeof(T)));
  return static_cast<T*>(p);
}

template <class T>
std::vector<T> download(T const* p, std::size_t n) {
  std::vector<T> host(n);
  MOE_CUDA_TRY(cudaMemcpy(host.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

}  // namespace

TEST_CASE("emulation: barriers release together and divergent barriers fault") {
  int* out = device_alloc<int>(64);
  moe::launch<barrier_kernel>({out, 64, false}, nullptr);
  std::vector<int> const got = download(out, 64);
  for (int t = 0; t < 64; ++t) CHECK(got[static_cast<std::size_t>(t)] == (t + 1) % 64);
  MOE_CUDA_TRY(cudaFree(out));

  CHECK(in_child([] {
          int* out = device_alloc<int>(64);
          int const faulted = expect_after(
              [&] {
                moe::launch<barrier_kernel>({out, 64, true}, nullptr);
              },
              cudaErrorLaunchFailure);
          // Sticky: every later call fails too.
          return faulted + (cudaGetLastError() == cudaErrorLaunchFailure ? 0 : 2) +
                 (cudaMemset(out, 0, 4) == cudaErrorLaunchFailure ? 0 : 4);
        }) == 0);
}

TEST_CASE("emulation: shuffles, votes and match give CUDA's results; wrong masks fault") {
  int* sums = device_alloc<int>(64);
  auto* ballots = device_alloc<unsigned>(64);
  auto* matches = device_alloc<unsigned>(64);
  moe::launch<warp_kernel>({0xffffffffu, sums, ballots, matches}, nullptr);
  auto const s = download(sums, 64);
  auto const b = download(ballots, 64);
  auto const m = download(matches, 64);
  for (int t = 0; t < 64; ++t) {
    CHECK(s[static_cast<std::size_t>(t)] == 31 * 32 / 2);
    CHECK(b[static_cast<std::size_t>(t)] == 0xaaaaaaaau);
    CHECK(m[static_cast<std::size_t>(t)] == 0xffu << (8 * (t % 32 / 8)));
  }
  // Lanes 16-31 call with a mask that leaves them out.
  CHECK(in_child([&] {
          return expect_after(
              [&] {
                moe::launch<warp_kernel>({0x0000ffffu, sums, ballots, matches}, nullptr);
              },
              cudaErrorLaunchFailure);
        }) == 0);
  MOE_CUDA_TRY(cudaFree(sums));
  MOE_CUDA_TRY(cudaFree(ballots));
  MOE_CUDA_TRY(cudaFree(matches));
}

TEST_CASE("emulation: host code that reads device memory faults") {
  int* data = device_alloc<int>(16);
  MOE_CUDA_TRY(cudaMemset(data, 0, 16 * sizeof(int)));
  int const status = in_child([&] {
    std::signal(SIGSEGV, SIG_DFL);       // the test framework's handler would report a crash
    volatile int const value = data[3];  // a host read of a device pointer
    return value == 0 ? 0 : 1;           // not reached
  });
  CHECK(status == 128 + SIGSEGV);
  CHECK(download(data, 16)[3] == 0);  // the runtime itself reads it inside device work
  MOE_CUDA_TRY(cudaFree(data));
}

TEST_CASE("emulation: lazy streams expose a missing wait, and an event orders them") {
  CHECK(in_child([] {
          moe::emulation::set_schedule({moe::emulation::block_order::shuffled, true, 3});
          int const n = 1000;
          int* a = device_alloc<int>(n);
          int* b = device_alloc<int>(n);
          int* c = device_alloc<int>(n);
          MOE_CUDA_TRY(cudaMemset(a, 0, n * sizeof(int)));
          cudaStream_t producer = nullptr, consumer = nullptr;
          cudaEvent_t done = nullptr;
          MOE_CUDA_TRY(cudaStreamCreateWithFlags(&producer, cudaStreamNonBlocking));
          MOE_CUDA_TRY(cudaStreamCreateWithFlags(&consumer, cudaStreamNonBlocking));
          MOE_CUDA_TRY(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
          int failures = 0;
          for (bool wait : {false, true}) {
            moe::launch<add_one_kernel>({a, b, n}, producer);  // b = 1
            if (wait) {
              MOE_CUDA_TRY(cudaEventRecord(done, producer));
              MOE_CUDA_TRY(cudaStreamWaitEvent(consumer, done, 0));
            }
            moe::launch<add_one_kernel>({b, c, n}, consumer);  // c = 2 once b is written
            MOE_CUDA_TRY(cudaStreamSynchronize(consumer));
            bool const ordered = download(c, n)[0] == 2;
            if (ordered != wait) ++failures;
            MOE_CUDA_TRY(cudaDeviceSynchronize());
            MOE_CUDA_TRY(cudaMemset(b, 0xff, n * sizeof(int)));
          }
          return failures;
        }) == 0);
}

TEST_CASE("emulation: launches past an H100's limits fail without a sticky error") {
  int* out = device_alloc<int>(2048);
  CHECK_THROWS_AS(moe::launch<barrier_kernel>({out, 2048, false}, nullptr), moe::cuda_error);
  CHECK(cudaGetLastError() == cudaSuccess);  // the launch error was not sticky
  moe::launch<barrier_kernel>({out, 64, false}, nullptr);
  CHECK(cudaDeviceSynchronize() == cudaSuccess);
  MOE_CUDA_TRY(cudaFree(out));
}

TEST_CASE("emulation: a synchronisation inside a capture invalidates it; replay reruns kernels") {
  cudaStream_t stream = nullptr;
  MOE_CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  int const n = 300;
  int* a = device_alloc<int>(n);
  int* b = device_alloc<int>(n);
  MOE_CUDA_TRY(cudaMemset(a, 0, n * sizeof(int)));

  cudaGraph_t graph = nullptr;
  MOE_CUDA_TRY(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  moe::launch<add_one_kernel>({a, b, n}, stream);
  moe::launch<add_one_kernel>({b, a, n}, stream);
  MOE_CUDA_TRY(cudaStreamEndCapture(stream, &graph));
  std::size_t nodes = 0;
  MOE_CUDA_TRY(cudaGraphGetNodes(graph, nullptr, &nodes));
  CHECK(nodes == 2);
  CHECK(download(a, n)[0] == 0);  // captured, not run
  cudaGraphExec_t exec = nullptr;
  MOE_CUDA_TRY(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 3; ++replay) MOE_CUDA_TRY(cudaGraphLaunch(exec, stream));
  MOE_CUDA_TRY(cudaStreamSynchronize(stream));
  CHECK(download(a, n)[n - 1] == 6);
  MOE_CUDA_TRY(cudaGraphExecDestroy(exec));
  MOE_CUDA_TRY(cudaGraphDestroy(graph));

  MOE_CUDA_TRY(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  moe::launch<add_one_kernel>({a, b, n}, stream);
  CHECK(cudaStreamSynchronize(stream) == cudaErrorStreamCaptureUnsupported);
  CHECK(cudaStreamEndCapture(stream, &graph) == cudaErrorStreamCaptureInvalidated);
  CHECK(graph == nullptr);
  (void)cudaGetLastError();
  MOE_CUDA_TRY(cudaStreamDestroy(stream));
  MOE_CUDA_TRY(cudaFree(a));
  MOE_CUDA_TRY(cudaFree(b));
}

TEST_CASE("emulation: copies outside an allocation and frees of non-allocations are rejected") {
  int* data = device_alloc<int>(8);
  std::vector<int> host(16, 1);
  CHECK(cudaMemcpy(data, host.data(), 16 * sizeof(int), cudaMemcpyHostToDevice) ==
        cudaErrorInvalidValue);
  CHECK(cudaMemcpy(data, host.data(), 8 * sizeof(int), cudaMemcpyDeviceToHost) ==
        cudaErrorInvalidValue);  // the kind names the wrong side
  CHECK(cudaFree(data + 1) == cudaErrorInvalidValue);
  CHECK(cudaGetLastError() == cudaErrorInvalidValue);
  CHECK(cudaGetLastError() == cudaSuccess);
  MOE_CUDA_TRY(cudaFree(data));
}

TEST_CASE("emulation: fresh shared memory is garbage, and CUB's block scan scans") {
  auto* out = device_alloc<float>(32);
  moe::launch<uninitialised_shared_kernel>({out}, nullptr);
  std::vector<float> const garbage = download(out, 32);
  if (moe::emulation::current_schedule().blocks == moe::emulation::block_order::in_order) {
    for (float v : garbage) CHECK(std::isnan(v));  // 0xff bytes
  } else {
    std::vector<float> const zeros(32, 0.0f);
    CHECK(std::memcmp(garbage.data(), zeros.data(), 32 * sizeof(float)) != 0);  // random bytes
  }
  MOE_CUDA_TRY(cudaFree(out));

  int* scanned = device_alloc<int>(128);
  int* total = device_alloc<int>(1);
  moe::launch<scan_kernel>({scanned, total}, nullptr);
  auto const got = download(scanned, 128);
  for (int t = 0; t < 128; ++t) CHECK(got[static_cast<std::size_t>(t)] == t * (t + 1) / 2);
  CHECK(download(total, 1)[0] == 128 * 129 / 2);
  MOE_CUDA_TRY(cudaFree(scanned));
  MOE_CUDA_TRY(cudaFree(total));
}

TEST_CASE("emulation: a part marked MOE_NOT_EMULATED is left out and reported") {
  std::size_t const before = moe::emulation::exclusions().size();
  bool reached = false;
  [&] {
    MOE_NOT_EMULATED("the exclusion mechanism's own test");
    reached = true;
  }();
  CHECK_FALSE(reached);
  std::vector<std::string> const after = moe::emulation::exclusions();
  REQUIRE(after.size() == before + 1);
  CHECK(after.back().find("the exclusion mechanism's own test") != std::string::npos);
}
