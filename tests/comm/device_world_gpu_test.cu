// SPDX-License-Identifier: Apache-2.0
// The collectives on the device simulated world: P virtual ranks on one GPU, one stream
// each, messages moved by device-to-device copies. Linear and 2DH must give the direct
// all-to-all bit for bit (up to 64 ranks), and all_to_allv its variable chunks, with every
// receive buffer poisoned first. Skipped (exit 77) without a CUDA device.

#include <doctest/doctest.h>

#include <moe/comm.hpp>
#include <moe/core.hpp>

#include "../support/random.hpp"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace {

using moe::comm::device_simulated_world;
using moe::comm::topology;
using bytes = std::vector<std::byte>;

/// One virtual rank's stream and device buffers.
struct device_rank {
  cudaStream_t stream = nullptr;
  void *send = nullptr, *recv = nullptr, *scratch = nullptr;

  device_rank(std::size_t n, std::size_t scratch_bytes) {
    MOE_CUDA_TRY(cudaStreamCreate(&stream));
    MOE_CUDA_TRY(cudaMalloc(&send, n));
    MOE_CUDA_TRY(cudaMalloc(&recv, n));
    MOE_CUDA_TRY(cudaMalloc(&scratch, scratch_bytes > 0 ? scratch_bytes : 1));
    MOE_CUDA_TRY(cudaMemset(recv, 0xff, n));  // poison
  }
  device_rank(device_rank const&) = delete;
  ~device_rank() {
    MOE_CUDA_TRY_LOG(cudaStreamDestroy(stream));
    MOE_CUDA_TRY_LOG(cudaFree(send));
    MOE_CUDA_TRY_LOG(cudaFree(recv));
    MOE_CUDA_TRY_LOG(cudaFree(scratch));
  }
  std::byte* send_bytes() const { return static_cast<std::byte*>(send); }
  std::byte* recv_bytes() const { return static_cast<std::byte*>(recv); }
  std::byte* scratch_bytes() const { return static_cast<std::byte*>(scratch); }
};

template <class Collective>
std::vector<bytes> run_on_device(topology t, std::vector<bytes> const& sends) {
  std::size_t const n = sends.front().size();
  std::vector<std::unique_ptr<device_rank>> ranks;
  for (auto const& s : sends) {
    ranks.push_back(std::make_unique<device_rank>(n, Collective::scratch_bytes(n, t)));
    MOE_CUDA_TRY(cudaMemcpy(ranks.back()->send, s.data(), n, cudaMemcpyHostToDevice));
  }
  device_simulated_world world(t);
  world.run([&](device_simulated_world::rank_communicator& comm) {
    device_rank const& r = *ranks[static_cast<std::size_t>(comm.rank())];
    Collective::run(moe::cuda_backend{r.stream}, comm,
                    moe::span<std::byte const>(r.send_bytes(), n),
                    moe::span<std::byte>(r.recv_bytes(), n),
                    moe::span<std::byte>(r.scratch_bytes(), Collective::scratch_bytes(n, t)));
  });
  std::vector<bytes> out(sends.size(), bytes(n));
  for (std::size_t r = 0; r < sends.size(); ++r) {
    MOE_CUDA_TRY(cudaStreamSynchronize(ranks[r]->stream));
    MOE_CUDA_TRY(cudaMemcpy(out[r].data(), ranks[r]->recv, n, cudaMemcpyDeviceToHost));
  }
  return out;
}

}  // namespace

TEST_CASE("device simulated world: linear and 2DH equal the direct all-to-all") {
  std::uint64_t const seed = moe::test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (topology const t : {topology{1, 1}, topology{2, 1}, topology{1, 3}, topology{2, 2},
                           topology{3, 5}, topology{4, 4}, topology{8, 2}, topology{8, 8}}) {
    CAPTURE(t.ranks_per_node);
    CAPTURE(t.nodes);
    auto const p = static_cast<std::size_t>(t.size());
    std::size_t const chunk = 1000 + 24;  // several 16-byte vectors and a tail
    std::vector<bytes> sends(p, bytes(chunk * p));
    for (auto& s : sends)
      for (auto& b : s) b = static_cast<std::byte>(rng() & 0xff);
    std::vector<bytes> expected(p, bytes(chunk * p));
    for (std::size_t r = 0; r < p; ++r)
      for (std::size_t q = 0; q < p; ++q)
        std::memcpy(expected[r].data() + q * chunk, sends[q].data() + r * chunk, chunk);
    CHECK(run_on_device<moe::comm::linear_all_to_all>(t, sends) == expected);
    CHECK(run_on_device<moe::comm::all_to_all_2dh>(t, sends) == expected);
  }
}

TEST_CASE("device simulated world: all_to_allv moves variable chunks") {
  topology const t{.ranks_per_node = 2, .nodes = 2};
  std::size_t const p = 4;
  std::vector<std::vector<std::uint64_t>> sizes = {
      {3, 0, 17, 1}, {0, 0, 0, 0}, {5, 9, 2, 0}, {1, 1, 1, 1}};  // sizes[src][dst]
  std::vector<bytes> sends(p);
  std::uint8_t next = 1;
  for (std::size_t s = 0; s < p; ++s)
    for (std::size_t d = 0; d < p; ++d)
      for (std::uint64_t i = 0; i < sizes[s][d]; ++i) sends[s].push_back(std::byte{next++});
  std::size_t const capacity = 64;
  std::vector<std::unique_ptr<device_rank>> ranks;
  for (auto const& s : sends) {
    ranks.push_back(
        std::make_unique<device_rank>(capacity, moe::comm::all_to_allv::scratch_bytes(4)));
    if (!s.empty())
      MOE_CUDA_TRY(cudaMemcpy(ranks.back()->send, s.data(), s.size(), cudaMemcpyHostToDevice));
  }
  std::vector<std::vector<std::uint64_t>> recv_sizes(p, std::vector<std::uint64_t>(p));
  device_simulated_world world(t);
  world.run([&](device_simulated_world::rank_communicator& comm) {
    auto const r = static_cast<std::size_t>(comm.rank());
    device_rank const& d = *ranks[r];
    moe::comm::all_to_allv::run(
        moe::cuda_backend{d.stream}, comm, moe::span<std::byte const>(d.send_bytes(), capacity),
        moe::span<std::uint64_t const>(sizes[r]), moe::span<std::byte>(d.recv_bytes(), capacity),
        moe::span<std::uint64_t>(recv_sizes[r]),
        moe::span<std::byte>(d.scratch_bytes(), moe::comm::all_to_allv::scratch_bytes(4)));
  });
  for (std::size_t d = 0; d < p; ++d) {
    bytes got(capacity);
    MOE_CUDA_TRY(cudaStreamSynchronize(ranks[d]->stream));
    MOE_CUDA_TRY(cudaMemcpy(got.data(), ranks[d]->recv, capacity, cudaMemcpyDeviceToHost));
    bytes expected;
    for (std::size_t s = 0; s < p; ++s) {
      CHECK(recv_sizes[d][s] == sizes[s][d]);
      std::size_t offset = 0;
      for (std::size_t q = 0; q < d; ++q) offset += sizes[s][q];
      expected.insert(expected.end(), sends[s].begin() + offset,
                      sends[s].begin() + offset + sizes[s][d]);
    }
    CHECK(bytes(got.begin(), got.begin() + expected.size()) == expected);
    CHECK(got[expected.size()] == std::byte{0xff});  // poison past the end untouched
  }
}
