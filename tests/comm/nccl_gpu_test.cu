// SPDX-License-Identifier: Apache-2.0
// nccl_communicator on a real NCCL: a one-rank world (self send/recv, both all-to-all
// algorithms, argument checks, wait), and where the NCCL library is 2.30 or newer, worlds
// of two to four ranks sharing the one GPU, running both algorithms against the direct
// all-to-all computed on the host. Skipped (exit 77) without a CUDA device.
//
// Several ranks in one process: NCCL's rule for one thread driving several ranks is one
// ncclGroupStart/End spanning all of them, but inside a group NCCL defers its sends and
// receives to the group's end while the 2DH algorithm's reorders (copies on the stream) are
// enqueued at once, so they would run before the exchanges they depend on. Each rank
// therefore gets its own host thread, as NCCL's "one device per thread" model has it.

#include "../support/expect.hpp"

#include <doctest/doctest.h>

#include <moe/comm/all_to_all.hpp>
#include <moe/comm/nccl_bootstrap.hpp>
#include <moe/comm/nccl_communicator.hpp>
#include <moe/core/backend.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <future>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

using namespace moe;
using namespace std::chrono_literals;

namespace {

/// Long enough for any healthy exchange here; a hang becomes a failure after it.
constexpr std::chrono::milliseconds exchange_timeout = 60s;

/// NCCL's version code of the library loaded at run time (not the headers').
int nccl_runtime_version() {
  int version = 0;
  MOE_NCCL_TRY(ncclGetVersion(&version));
  return version;
}

constexpr int multi_rank_gpu_version = 23000;  // 2.30.0

/// NCCL reads each environment variable once, on first use, and ncclCommInitAll reads
/// NCCL_MULTI_RANK_GPU_ENABLE even for one rank: it must be set before any communicator
/// exists, hence at static initialisation. NCCL_MAX_CTAS bounds the channels of each of the
/// ranks sharing the GPU (NCCL's advice for this experimental mode), unless already set.
bool const multi_rank_environment = [] {
  int version = 0;
  if (ncclGetVersion(&version) != ncclSuccess || version < multi_rank_gpu_version) return false;
  ::setenv("NCCL_MULTI_RANK_GPU_ENABLE", "1", 1);
  ::setenv("NCCL_MAX_CTAS", "8", 0);
  return true;
}();

int current_device() {
  int device = 0;
  MOE_CUDA_TRY(cudaGetDevice(&device));
  return device;
}

class stream {
 public:
  stream() { MOE_CUDA_TRY(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
  stream(stream const&) = delete;
  stream& operator=(stream const&) = delete;
  ~stream() { MOE_CUDA_TRY_LOG(cudaStreamDestroy(stream_)); }
  operator cudaStream_t() const noexcept { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

/// Device bytes, allocated and freed synchronously (test code, outside any timed region).
class device_bytes {
 public:
  explicit device_bytes(std::size_t size) : size_(size) {
    if (size_ > 0) MOE_CUDA_TRY(cudaMalloc(&data_, size_));
  }
  device_bytes(device_bytes&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  device_bytes(device_bytes const&) = delete;
  device_bytes& operator=(device_bytes const&) = delete;
  ~device_bytes() {
    if (data_ != nullptr) MOE_CUDA_TRY_LOG(cudaFree(data_));
  }

  [[nodiscard]] std::byte* data() const noexcept { return static_cast<std::byte*>(data_); }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] span<std::byte> view() const noexcept { return {data(), size_}; }
  [[nodiscard]] span<std::byte const> cview() const noexcept { return {data(), size_}; }

  void upload(std::vector<std::byte> const& host, cudaStream_t s) const {
    REQUIRE(host.size() == size_);
    MOE_CUDA_TRY(cudaMemcpyAsync(data_, host.data(), size_, cudaMemcpyHostToDevice, s));
  }
  void poison(cudaStream_t s) const { MOE_CUDA_TRY(cudaMemsetAsync(data_, 0xff, size_, s)); }
  [[nodiscard]] std::vector<std::byte> download(cudaStream_t s) const {
    std::vector<std::byte> host(size_);
    MOE_CUDA_TRY(cudaMemcpyAsync(host.data(), data_, size_, cudaMemcpyDeviceToHost, s));
    MOE_CUDA_TRY(cudaStreamSynchronize(s));
    return host;
  }

 private:
  void* data_ = nullptr;
  std::size_t size_;
};

std::uint64_t test_seed() {
  if (char const* s = std::getenv("MOE_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  return std::random_device{}();
}

std::vector<std::byte> random_bytes(std::size_t n, std::mt19937_64& rng) {
  std::vector<std::byte> bytes(n);
  for (auto& b : bytes) b = static_cast<std::byte>(rng() & 0xff);
  return bytes;
}

/// The direct all-to-all: rank r's chunk p is rank p's chunk r.
std::vector<std::vector<std::byte>> direct_all_to_all(
    std::vector<std::vector<std::byte>> const& send, std::size_t chunk) {
  std::size_t const p = send.size();
  std::vector<std::vector<std::byte>> recv(p, std::vector<std::byte>(p * chunk));
  for (std::size_t r = 0; r < p; ++r)
    for (std::size_t q = 0; q < p; ++q)
      std::memcpy(recv[r].data() + q * chunk, send[q].data() + r * chunk, chunk);
  return recv;
}

/// Runs `body(rank)` on one host thread per rank and rethrows the first rank's error. After
/// an error every communicator is aborted (the ranks are done by then: a rank whose peer
/// failed ends with `wait`'s timeout). Ranks still running after twice that timeout are stuck
/// inside NCCL; aborting the communicators from this thread is then the last resort that
/// releases them.
template <class Body>
void on_rank_threads(std::vector<comm::nccl_comm>& comms, Body body) {
  int const device = current_device();
  std::vector<std::future<void>> ranks;
  for (int r = 0; r < static_cast<int>(comms.size()); ++r)
    ranks.push_back(std::async(std::launch::async, [&body, r, device] {
      MOE_CUDA_TRY(cudaSetDevice(device));
      body(r);
    }));
  auto const deadline = std::chrono::steady_clock::now() + 2 * exchange_timeout;
  bool finished = true;
  for (auto& f : ranks) finished = finished && f.wait_until(deadline) == std::future_status::ready;
  if (!finished) {
    for (auto& c : comms) c.abort();
    for (auto& f : ranks) f.wait();
    FAIL("ranks still running after " << 2 * exchange_timeout.count() << " ms");
  }
  std::exception_ptr first;
  for (auto& f : ranks) {
    try {
      f.get();
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }
  if (first) {
    for (auto& c : comms) c.abort();
    std::rethrow_exception(first);
  }
}

/// One all-to-all with `Algorithm` over the ranks of `comms` (P chunks of `chunk` bytes per
/// rank), compared with the direct all-to-all on the host.
template <class Algorithm>
void check_all_to_all(std::vector<comm::nccl_comm>& comms, int ranks_per_node, std::size_t chunk,
                      std::mt19937_64& rng) {
  auto const p = comms.size();
  std::vector<comm::nccl_communicator> communicators;
  for (auto& c : comms) communicators.emplace_back(c.get(), ranks_per_node);
  comm::topology const topology = communicators.front().topology();

  std::vector<std::vector<std::byte>> send_host(p);
  std::vector<stream> streams(p);
  std::vector<device_bytes> send, recv, scratch;
  for (std::size_t r = 0; r < p; ++r) {
    send_host[r] = random_bytes(p * chunk, rng);
    send.emplace_back(p * chunk);
    recv.emplace_back(p * chunk);
    scratch.emplace_back(Algorithm::scratch_bytes(p * chunk, topology));
    send[r].upload(send_host[r], streams[r]);
    recv[r].poison(streams[r]);
    scratch[r].poison(streams[r]);
    MOE_CUDA_TRY(cudaStreamSynchronize(streams[r]));
  }

  on_rank_threads(comms, [&](int r) {
    auto const i = static_cast<std::size_t>(r);
    Algorithm::run(cuda_backend{streams[i]}, communicators[i], send[i].cview(), recv[i].view(),
                   scratch[i].view());
    communicators[i].wait(streams[i], exchange_timeout);
  });

  auto const expected = direct_all_to_all(send_host, chunk);
  for (std::size_t r = 0; r < p; ++r) {
    INFO("rank " << r << " of " << p << ", " << ranks_per_node << " per node, chunk " << chunk
                 << " bytes");
    CHECK(recv[r].download(streams[r]) == expected[r]);
  }
}

}  // namespace

TEST_CASE("one rank: self send/recv moves random bytes") {
  int const device = current_device();
  auto comms = comm::make_nccl_comms(std::vector{device});
  comm::nccl_communicator c(comms.front().get());
  CHECK(c.rank() == 0);
  CHECK(c.size() == 1);
  CHECK(c.topology() == comm::topology{.ranks_per_node = 1, .nodes = 1});
  CHECK(c.native_handle() == comms.front().get());

  auto const seed = test_seed();
  INFO("seed " << seed << " (MOE_TEST_SEED)");
  std::mt19937_64 rng(seed);
  stream s;
  for (std::size_t bytes : {std::size_t{1}, std::size_t{4099}, (std::size_t{1} << 20) + 3}) {
    INFO(bytes << " bytes");
    auto const host = random_bytes(bytes, rng);
    device_bytes src(bytes), dst(bytes);
    src.upload(host, s);
    dst.poison(s);
    c.group_start();
    c.send(src.data(), bytes, 0, s);
    c.recv(dst.data(), bytes, 0, s);
    c.group_end();
    c.wait(s, exchange_timeout);
    CHECK(dst.download(s) == host);
  }
  // Nothing to move is allowed, with null pointers.
  c.group_start();
  c.send(nullptr, 0, 0, s);
  c.recv(nullptr, 0, 0, s);
  c.group_end();
  c.wait(s, exchange_timeout);
}

TEST_CASE("one rank: both all-to-all algorithms copy the one chunk") {
  int const device = current_device();
  auto const seed = test_seed();
  INFO("seed " << seed << " (MOE_TEST_SEED)");
  std::mt19937_64 rng(seed);
  auto comms = comm::make_nccl_comms(std::vector{device});
  for (std::size_t chunk : {std::size_t{1}, std::size_t{4099}, std::size_t{1} << 18}) {
    check_all_to_all<comm::linear_all_to_all>(comms, 1, chunk, rng);
    check_all_to_all<comm::all_to_all_2dh>(comms, 1, chunk, rng);
  }
}

TEST_CASE("one rank: arguments and topology are checked before NCCL sees them") {
  int const device = current_device();
  auto comms = comm::make_nccl_comms(std::vector{device});
  ncclComm_t const handle = comms.front().get();
  for (int ranks_per_node : {0, -1, 2}) {
    INFO("ranks_per_node = " << ranks_per_node);
    try {
      comm::nccl_communicator bad(handle, ranks_per_node);
      FAIL("no exception");
    } catch (moe::invalid_argument const& e) {
      CHECK(e.argument() == "ranks_per_node");
    }
  }
  CHECK_NOTHROW(comm::nccl_communicator(handle, 1));

  comm::nccl_communicator c(handle);
  stream s;
  device_bytes buffer(16);
  CHECK(test::rejected_argument([&] { c.send(buffer.data(), 16, 1, s); }) == "peer");
  CHECK(test::rejected_argument([&] { c.recv(buffer.data(), 16, -1, s); }) == "peer");
  CHECK(test::rejected_argument([&] { c.send(nullptr, 16, 0, s); }) == "src");
  CHECK(test::rejected_argument([&] { c.recv(nullptr, 16, 0, s); }) == "dst");
  CHECK(test::rejected_argument([&] { c.wait(s, -1ms); }) == "timeout");
}

TEST_CASE("one rank: wait returns once the work is done and times out while it is not") {
  int const device = current_device();
  auto comms = comm::make_nccl_comms(std::vector{device});
  comm::nccl_communicator c(comms.front().get());
  stream s;
  CHECK_NOTHROW(c.wait(s, 0ms));  // nothing enqueued: done at the first poll
  CHECK_NOTHROW(c.check_async_error());

  device_bytes src(1 << 16), dst(1 << 16);
  c.group_start();
  c.send(src.data(), src.size(), 0, s);
  c.recv(dst.data(), dst.size(), 0, s);
  c.group_end();
  CHECK_NOTHROW(c.wait(s, exchange_timeout));
  CHECK_NOTHROW(c.wait(s, 0ms));  // completed work stays completed

  // A host function that sleeps keeps the stream busy without involving any peer.
  MOE_CUDA_TRY(cudaLaunchHostFunc(
      s, [](void*) { std::this_thread::sleep_for(std::chrono::milliseconds(500)); }, nullptr));
  auto const start = std::chrono::steady_clock::now();
  try {
    c.wait(s, 20ms);
    FAIL("no timeout");
  } catch (moe::nccl_error const& e) {
    CHECK(e.code() == static_cast<int>(ncclInProgress));
    CHECK(std::string(e.what()).find("peers may have failed") != std::string::npos);
  }
  CHECK(std::chrono::steady_clock::now() - start >= 20ms);
  CHECK_NOTHROW(c.wait(s, exchange_timeout));  // the stream drains; the communicator is fine
  CHECK_NOTHROW(c.check_async_error());
}

TEST_CASE("two to four ranks sharing the GPU run both algorithms (NCCL 2.30 or newer)") {
  int const version = nccl_runtime_version();
  if (version < multi_rank_gpu_version || !multi_rank_environment) {
    MESSAGE(
        "SKIPPED: several ranks on one GPU need NCCL 2.30 or newer (NCCL_MULTI_RANK_GPU_"
        "ENABLE); the loaded NCCL is "
        << version << ". Only the one-rank cases ran.");
    return;
  }
  int const device = current_device();
  auto const seed = test_seed();
  INFO("seed " << seed << " (MOE_TEST_SEED), NCCL " << version);
  std::mt19937_64 rng(seed);
  struct world {
    int ranks;
    int ranks_per_node;
  };
  // 2 ranks as 2 nodes and 3 as 1 node exercise the degenerate 2DH (one level); 4 as 2 × 2
  // exercises both of its levels and both reorders.
  for (world w : {world{2, 1}, world{3, 3}, world{3, 1}, world{4, 2}}) {
    INFO(w.ranks << " ranks, " << w.ranks_per_node << " per node");
    auto comms = comm::make_nccl_comms(std::vector<int>(static_cast<std::size_t>(w.ranks), device));
    REQUIRE(comms.size() == static_cast<std::size_t>(w.ranks));
    for (std::size_t chunk : {std::size_t{1}, std::size_t{4099}, std::size_t{1} << 18}) {
      check_all_to_all<comm::linear_all_to_all>(comms, w.ranks_per_node, chunk, rng);
      check_all_to_all<comm::all_to_all_2dh>(comms, w.ranks_per_node, chunk, rng);
    }
  }
}
