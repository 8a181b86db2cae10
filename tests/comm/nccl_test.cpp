// SPDX-License-Identifier: Apache-2.0
// moe/comm NCCL parts that need no GPU: argument and topology checks of the communicator,
// the owning nccl_comm, and the file bootstrap of the ncclUniqueId (ncclGetUniqueId needs
// no device). The real communication is in nccl_gpu_test.cu.

#include "../support/expect.hpp"

#include <doctest/doctest.h>

#include <moe/comm/nccl_bootstrap.hpp>
#include <moe/comm/nccl_communicator.hpp>

#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <random>
#include <string>
#include <thread>
#include <vector>

using namespace moe;
using namespace std::chrono_literals;

static_assert(comm::communicator<comm::nccl_communicator>);
static_assert(std::is_nothrow_move_constructible_v<comm::nccl_comm>);
static_assert(!std::is_copy_constructible_v<comm::nccl_comm>);

namespace {

/// A fresh directory under the system's temporary directory, removed with its contents.
struct temporary_directory {
  std::filesystem::path path;

  temporary_directory() {
    std::random_device random;
    path = std::filesystem::temp_directory_path() /
           ("moe_nccl_test_" + std::to_string(::getpid()) + "_" + std::to_string(random()));
    std::filesystem::create_directories(path);
  }
  temporary_directory(temporary_directory const&) = delete;
  temporary_directory& operator=(temporary_directory const&) = delete;
  ~temporary_directory() {
    std::error_code ignored;
    std::filesystem::remove_all(path, ignored);
  }
};

void write_bytes(std::filesystem::path const& path, std::vector<char> const& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

/// Bytes that no ncclGetUniqueId would produce by chance: a fake rank 0's id.
ncclUniqueId patterned_id() {
  ncclUniqueId id{};
  for (std::size_t i = 0; i < sizeof id.internal; ++i)
    id.internal[i] = static_cast<char>((i * 37 + 11) & 0xff);
  return id;
}

std::vector<char> bytes_of(ncclUniqueId const& id) {
  return {id.internal, id.internal + sizeof id.internal};
}

bool same(ncclUniqueId const& a, ncclUniqueId const& b) {
  return std::memcmp(&a, &b, sizeof a) == 0;
}

}  // namespace

TEST_CASE("a topology is checked against the world size") {
  CHECK(comm::detail::make_topology(4, 2) == comm::topology{.ranks_per_node = 2, .nodes = 2});
  CHECK(comm::detail::make_topology(6, 6) == comm::topology{.ranks_per_node = 6, .nodes = 1});
  CHECK(comm::detail::make_topology(3, 1) == comm::topology{.ranks_per_node = 1, .nodes = 3});
  for (int ranks_per_node : {0, -2, 3, 8}) {
    INFO("ranks_per_node = " << ranks_per_node);
    try {
      (void)comm::detail::make_topology(4, ranks_per_node);
      FAIL("no exception");
    } catch (moe::invalid_argument const& e) {
      CHECK(e.argument() == "ranks_per_node");
    }
  }
  CHECK_THROWS_AS((void)comm::detail::make_topology(0, 1), moe::invalid_argument);
}

TEST_CASE("nccl_communicator rejects a null communicator before calling NCCL") {
  try {
    comm::nccl_communicator c(nullptr);
    FAIL("no exception");
  } catch (moe::invalid_argument const& e) {
    CHECK(e.argument() == "comm");
  }
  CHECK_THROWS_AS(comm::nccl_communicator(nullptr, 2), moe::invalid_argument);
}

TEST_CASE("nccl_comm owns nothing by default and moves ownership") {
  comm::nccl_comm empty;
  CHECK_FALSE(empty);
  CHECK(empty.get() == nullptr);
  empty.reset();  // no-ops on an empty object
  empty.abort();
  comm::nccl_comm moved(std::move(empty));
  CHECK_FALSE(moved);
  // A fake handle, released before destruction: NCCL never sees it.
  auto* const fake = reinterpret_cast<ncclComm_t>(std::uintptr_t{0x1000});
  comm::nccl_comm owner(fake);
  CHECK(owner.get() == fake);
  comm::nccl_comm other(std::move(owner));
  CHECK_FALSE(owner);  // NOLINT(bugprone-use-after-move): moved-from is empty by contract
  CHECK(other.release() == fake);
  CHECK_FALSE(other);
}

TEST_CASE("make_nccl_comm and make_nccl_comms check their arguments first") {
  ncclUniqueId const id = patterned_id();
  CHECK(test::rejected_argument([&] { (void)comm::make_nccl_comm(id, 0, 0); }) == "nranks");
  CHECK(test::rejected_argument([&] { (void)comm::make_nccl_comm(id, 2, 2); }) == "rank");
  CHECK(test::rejected_argument([&] { (void)comm::make_nccl_comm(id, 2, -1); }) == "rank");
  CHECK(test::rejected_argument([&] { (void)comm::make_nccl_comms({}); }) == "devices");
}

TEST_CASE("share_unique_id_through_file checks its arguments") {
  temporary_directory dir;
  auto const path = dir.path / "id";
  CHECK_THROWS_AS((void)comm::share_unique_id_through_file(path, -1, 10ms), moe::invalid_argument);
  CHECK_THROWS_AS((void)comm::share_unique_id_through_file(path, 1, -1ms), moe::invalid_argument);
  CHECK_THROWS_AS((void)comm::share_unique_id_through_file({}, 1, 10ms), moe::invalid_argument);
}

TEST_CASE("a rank other than 0 times out naming the path when no id appears") {
  temporary_directory dir;
  auto const path = dir.path / "never_written";
  auto const start = std::chrono::steady_clock::now();
  try {
    (void)comm::share_unique_id_through_file(path, 1, 50ms);
    FAIL("no exception");
  } catch (moe::invalid_argument const&) {
    FAIL("a timeout is not an invalid argument");
  } catch (moe::error const& e) {
    std::string const what = e.what();
    CHECK(what.find(path.string()) != std::string::npos);
    CHECK(what.find("50 ms") != std::string::npos);
  }
  CHECK(std::chrono::steady_clock::now() - start >= 50ms);
}

TEST_CASE("a partly written id file is waited for, not read") {
  temporary_directory dir;
  auto const path = dir.path / "partial";
  auto const id = bytes_of(patterned_id());
  write_bytes(path, {id.begin(), id.begin() + id.size() / 2});
  CHECK_THROWS_AS((void)comm::share_unique_id_through_file(path, 2, 30ms), moe::error);
}

TEST_CASE("a file too large to be an id is an error at once") {
  temporary_directory dir;
  auto const path = dir.path / "large";
  write_bytes(path, std::vector<char>(sizeof(ncclUniqueId) + 1, 'x'));
  try {
    (void)comm::share_unique_id_through_file(path, 1, 10s);
    FAIL("no exception");
  } catch (moe::error const& e) {
    CHECK(std::string(e.what()).find("not an ncclUniqueId") != std::string::npos);
  }
}

TEST_CASE("ranks other than 0 read the id a fake rank 0 wrote") {
  temporary_directory dir;
  auto const path = dir.path / "id";
  ncclUniqueId const expected = patterned_id();
  write_bytes(path, bytes_of(expected));
  for (int rank : {1, 2, 7}) {
    INFO("rank " << rank);
    CHECK(same(comm::share_unique_id_through_file(path, rank, 1s), expected));
  }
}

TEST_CASE("rank 0 creates the id and publishes it atomically; waiting ranks get it") {
  temporary_directory dir;
  auto const path = dir.path / "id";
  // Rank 1 starts waiting before rank 0 writes, as it would in a real launch.
  auto waiting = std::async(std::launch::async,
                            [&] { return comm::share_unique_id_through_file(path, 1, 20s); });
  std::this_thread::sleep_for(20ms);
  ncclUniqueId const created = comm::share_unique_id_through_file(path, 0, 0ms);
  CHECK(same(waiting.get(), created));
  CHECK(same(comm::share_unique_id_through_file(path, 3, 0ms), created));
  CHECK(std::filesystem::file_size(path) == sizeof(ncclUniqueId));
  // Only the published file remains: the temporary one was renamed, not copied.
  std::vector<std::filesystem::path> entries;
  for (auto const& entry : std::filesystem::directory_iterator(dir.path))
    entries.push_back(entry.path());
  CHECK(entries == std::vector{path});

  // A second run's rank 0 replaces the id.
  ncclUniqueId const next = comm::share_unique_id_through_file(path, 0, 0ms);
  CHECK_FALSE(same(next, created));
  CHECK(same(comm::share_unique_id_through_file(path, 1, 0ms), next));
}

TEST_CASE("rank 0 names the path it cannot write") {
  temporary_directory dir;
  auto const path = dir.path / "missing_directory" / "id";
  try {
    (void)comm::share_unique_id_through_file(path, 0, 0ms);
    FAIL("no exception");
  } catch (moe::error const& e) {
    CHECK(std::string(e.what()).find("missing_directory") != std::string::npos);
  }
}
