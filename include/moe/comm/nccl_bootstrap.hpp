// SPDX-License-Identifier: Apache-2.0
#pragma once
// Building the `ncclComm_t` that `nccl_communicator` borrows. The library itself never
// creates a communicator (DESIGN §3); these functions are for programs and tests:
//
//   nccl_comm                      owns an ncclComm_t: ncclCommDestroy on destruction,
//                                  abort() for the error path; move-only
//   make_nccl_comm(id, n, rank)    ncclCommInitRank on the current device
//   make_nccl_comms(devices)       ncclCommInitAll: every rank in this process
//   share_unique_id_through_file   rank 0 creates the ncclUniqueId and publishes it in a
//                                  file that all ranks can see; the others wait for it
//
// The MPI variant, share_unique_id_through_mpi, is in nccl_bootstrap_mpi.hpp (it needs
// mpi.h). Host code only; link moe::nccl.

#include <moe/core/config.hpp>
#include <moe/core/error.hpp>

#include <fcntl.h>
#include <nccl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace moe::comm {

/// An owned NCCL communicator: destroyed with ncclCommDestroy when this object dies, unless
/// released or aborted first. Move-only.
///
/// ncclCommDestroy waits for the communicator's outstanding work. After a failure (an
/// `nccl_error` from `nccl_communicator::wait`, say) call `abort()` instead, which releases
/// work that can no longer complete.
class nccl_comm {
 public:
  nccl_comm() noexcept = default;

  /// Adopts `comm` (which may be null: an empty nccl_comm).
  explicit nccl_comm(ncclComm_t comm) noexcept : comm_(comm) {}

  nccl_comm(nccl_comm&& other) noexcept : comm_(std::exchange(other.comm_, nullptr)) {}
  nccl_comm& operator=(nccl_comm&& other) noexcept {
    if (this != &other) {
      reset();
      comm_ = std::exchange(other.comm_, nullptr);
    }
    return *this;
  }
  nccl_comm(nccl_comm const&) = delete;
  nccl_comm& operator=(nccl_comm const&) = delete;
  ~nccl_comm() { reset(); }

  [[nodiscard]] ncclComm_t get() const noexcept { return comm_; }
  explicit operator bool() const noexcept { return comm_ != nullptr; }

  /// Gives up ownership: the caller destroys the returned communicator.
  [[nodiscard]] ncclComm_t release() noexcept { return std::exchange(comm_, nullptr); }

  /// Destroys the communicator now (ncclCommDestroy); a failure is reported on stderr.
  void reset() noexcept {
    if (ncclComm_t const comm = std::exchange(comm_, nullptr))
      MOE_NCCL_TRY_LOG(ncclCommDestroy(comm));
  }

  /// Aborts the communicator (ncclCommAbort): its pending operations are cancelled and its
  /// resources freed without waiting for peers. The object is empty afterwards. Use this,
  /// not destruction, once the communicator has reported an error or timed out.
  void abort() noexcept {
    if (ncclComm_t const comm = std::exchange(comm_, nullptr))
      MOE_NCCL_TRY_LOG(ncclCommAbort(comm));
  }

 private:
  ncclComm_t comm_ = nullptr;
};

/// Creates this rank's communicator of a world of `nranks` ranks (ncclCommInitRank) on the
/// current CUDA device. Every rank calls it with the same `id`, from its own thread or
/// process; it returns once all ranks have joined.
/// @param id the world's ncclUniqueId, created once by one rank and shared with the others
/// @param nranks positive
/// @param rank 0 ≤ rank < nranks, distinct on every rank
inline nccl_comm make_nccl_comm(ncclUniqueId const& id, int nranks, int rank) {
  MOE_EXPECTS(nranks > 0, "nranks", "must be positive, got " + std::to_string(nranks));
  MOE_EXPECTS(rank >= 0 && rank < nranks, "rank",
              "must lie in [0, " + std::to_string(nranks) + "), got " + std::to_string(rank));
  ncclComm_t comm = nullptr;
  MOE_NCCL_TRY(ncclCommInitRank(&comm, nranks, id, rank));
  return nccl_comm(comm);
}

/// Creates a world whose ranks all live in this process (ncclCommInitAll): rank r runs on
/// device `devices[r]`. A device may appear more than once only where NCCL allows several
/// ranks per GPU (2.30 or newer with NCCL_MULTI_RANK_GPU_ENABLE=1 in the environment).
/// @param devices [in] host memory, one CUDA device index per rank, not empty
inline std::vector<nccl_comm> make_nccl_comms(std::span<int const> devices) {
  MOE_EXPECTS(!devices.empty(), "devices", "a world has at least one rank");
  std::vector<ncclComm_t> handles(devices.size(), nullptr);
  std::vector<nccl_comm> comms;
  comms.reserve(handles.size());  // before the handles exist: adopting them cannot throw
  MOE_NCCL_TRY(ncclCommInitAll(handles.data(), static_cast<int>(devices.size()), devices.data()));
  for (ncclComm_t handle : handles) comms.emplace_back(handle);
  return comms;
}

namespace detail {

inline std::string errno_text(int code) {
  return std::strerror(code);
}

/// Writes `bytes` bytes to `path` so that a reader sees either no file or the whole of it:
/// a temporary file in the same directory (the same file system), flushed, then renamed.
inline void write_file_atomically(std::filesystem::path const& path, void const* data,
                                  std::size_t bytes) {
  std::filesystem::path temporary = path;
  temporary += ".tmp." + std::to_string(::getpid());
  int const fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) throw error("cannot create '" + temporary.string() + "': " + errno_text(errno));
  auto fail = [&](char const* what) {
    int const code = errno;
    ::close(fd);
    ::unlink(temporary.c_str());
    throw error(std::string(what) + " '" + temporary.string() + "': " + errno_text(code));
  };
  auto const* cursor = static_cast<char const*>(data);
  for (std::size_t left = bytes; left > 0;) {
    ssize_t const written = ::write(fd, cursor, left);
    if (written < 0 && errno == EINTR) continue;
    if (written <= 0) fail("cannot write");
    cursor += written;
    left -= static_cast<std::size_t>(written);
  }
  // Readers on other nodes see the file through a shared file system: flush before it
  // appears under its name.
  if (::fsync(fd) != 0) fail("cannot flush");
  if (::close(fd) != 0) {
    int const code = errno;
    ::unlink(temporary.c_str());
    throw error("cannot close '" + temporary.string() + "': " + errno_text(code));
  }
  if (::rename(temporary.c_str(), path.c_str()) != 0) {
    int const code = errno;
    ::unlink(temporary.c_str());
    throw error("cannot rename '" + temporary.string() + "' to '" + path.string() +
                "': " + errno_text(code));
  }
}

/// The id in `path` once the file exists with its full size; nullopt while it does not.
/// Throws when the file cannot be an ncclUniqueId (too large) or cannot be read.
inline std::optional<ncclUniqueId> try_read_unique_id(std::filesystem::path const& path) {
  int const fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return std::nullopt;
    throw error("cannot open '" + path.string() + "': " + errno_text(errno));
  }
  struct ::stat info {};
  if (::fstat(fd, &info) != 0) {
    int const code = errno;
    ::close(fd);
    throw error("cannot stat '" + path.string() + "': " + errno_text(code));
  }
  auto const size = static_cast<std::size_t>(info.st_size);
  if (size > sizeof(ncclUniqueId)) {
    ::close(fd);
    throw error("'" + path.string() + "' holds " + std::to_string(size) +
                " bytes, not an ncclUniqueId (" + std::to_string(sizeof(ncclUniqueId)) +
                " bytes): is another program using this path?");
  }
  ncclUniqueId id{};
  std::size_t got = 0;
  while (got < sizeof id) {
    ssize_t const n = ::read(fd, reinterpret_cast<char*>(&id) + got, sizeof id - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // not all there yet: a writer that does not rename
    got += static_cast<std::size_t>(n);
  }
  ::close(fd);
  if (got < sizeof id) return std::nullopt;
  return id;
}

}  // namespace detail

/// Shares one ncclUniqueId among the ranks of a world through a file that all of them can
/// see (a shared file system across nodes, or a local path when all ranks are on one node).
///
/// Rank 0 creates the id (ncclGetUniqueId), writes it to `path` atomically (a temporary
/// file in the same directory, then a rename) and returns it at once. Every other rank
/// polls until the file exists with its full size, reads it and returns it, or throws
/// `moe::error` naming `path` when `timeout` passes first.
///
/// Use a path unique to the run (e.g. containing the job id) and remove it once every rank
/// has its communicator: a rank that reads a file left over by an earlier run, before rank
/// 0 replaces it, joins a world that no longer exists. The file is created with mode 0600.
/// @param path the file; its directory must exist and be writable by rank 0
/// @param rank this rank in the world, ≥ 0
/// @param timeout how long ranks other than 0 wait for the file, ≥ 0
inline ncclUniqueId share_unique_id_through_file(std::filesystem::path const& path, int rank,
                                                 std::chrono::milliseconds timeout) {
  MOE_EXPECTS(!path.empty(), "path", "an empty path");
  MOE_EXPECTS(rank >= 0, "rank", "must not be negative, got " + std::to_string(rank));
  MOE_EXPECTS(timeout.count() >= 0, "timeout",
              "must not be negative, got " + std::to_string(timeout.count()) + " ms");
  if (rank == 0) {
    ncclUniqueId id{};
    MOE_NCCL_TRY(ncclGetUniqueId(&id));
    detail::write_file_atomically(path, &id, sizeof id);
    return id;
  }
  using clock = std::chrono::steady_clock;
  auto const deadline = clock::now() + timeout;
  for (int poll = 0;; ++poll) {
    if (auto const id = detail::try_read_unique_id(path)) return *id;
    if (clock::now() >= deadline)
      throw error("rank " + std::to_string(rank) + " found no complete ncclUniqueId at '" +
                  path.string() + "' within " + std::to_string(timeout.count()) +
                  " ms: has rank 0 started, and do all ranks use this path?");
    std::this_thread::sleep_for(std::chrono::milliseconds(poll < 100 ? 1 : 10));
  }
}

}  // namespace moe::comm
