// SPDX-License-Identifier: Apache-2.0
#pragma once
// Errors of the host API: the exception hierarchy, the `status` that `can_implement` returns,
// and the check macros that turn CUDA, cuBLAS and NCCL return codes into exceptions naming the
// failing call, file and line.
//
//   moe::error                     everything the library throws
//   ├── moe::invalid_argument      bad shapes, values or null data; nothing was written
//   ├── moe::cuda_error            a CUDA runtime call failed (carries the cudaError_t)
//   ├── moe::cublas_error          a cuBLAS call failed (carries the cublasStatus_t as int)
//   └── moe::nccl_error            an NCCL call failed (carries the ncclResult_t as int)

#include <moe/core/config.hpp>

#include <cuda_runtime_api.h>

#include <cstdio>
#include <optional>
#include <source_location>
#include <stdexcept>
#include <string>
#include <utility>

namespace moe {

namespace detail {

/// "file:line": where, without the function's signature (which, for a template, runs to
/// hundreds of characters and buries the message).
inline std::string short_location(std::source_location const& where) {
  return std::string(where.file_name()) + ":" + std::to_string(where.line());
}

}  // namespace detail

/// Base of every exception the library throws. `what()` is short: "moe: ", the message (for
/// a rejected argument: which one, what is wrong and what to do), and where the caller
/// called the library from, when a public entry point recorded it (`called_from()`); else
/// the library's own line. `where()` is the library's check that failed, for a debugger.
class error : public std::runtime_error {
 public:
  explicit error(std::string const& message,
                 std::source_location where = std::source_location::current())
      : std::runtime_error(message), message_(message), where_(where) {
    compose();
  }

  [[nodiscard]] char const* what() const noexcept override { return what_.c_str(); }
  /// The message alone, without "moe: " and the location.
  [[nodiscard]] std::string const& message() const noexcept { return message_; }
  /// The library's check that failed.
  [[nodiscard]] std::source_location const& where() const noexcept { return where_; }
  /// The caller's call of the public entry point that failed, when it recorded one.
  [[nodiscard]] std::optional<std::source_location> const& called_from() const noexcept {
    return called_from_;
  }

  /// Records the caller's location; the public entry points do (detail::at_entry_point), the
  /// outermost last, so that what() names the user's own line.
  void set_called_from(std::source_location caller) {
    called_from_ = caller;
    compose();
  }

 private:
  void compose() {
    what_ = "moe: " + message_ +
            (called_from_ ? " [called from " + detail::short_location(*called_from_) + "]"
                          : " [at " + detail::short_location(where_) + "]");
  }

  std::string message_, what_;
  std::source_location where_;
  std::optional<std::source_location> called_from_;
};

namespace detail {

/// Runs a public entry point's `body`; a moe::error out of it is marked as called from
/// `caller` (the entry point's defaulted std::source_location::current() argument).
template <class Body>
decltype(auto) at_entry_point(std::source_location const& caller, Body&& body) {
  try {
    return std::forward<Body>(body)();
  } catch (error& e) {
    e.set_called_from(caller);
    throw;
  }
}

}  // namespace detail

/// A precondition on the caller's input failed. `argument()` names the offending argument
/// (e.g. "k", "x", "capacity_factor"). The call that threw wrote nothing.
class invalid_argument : public error {
 public:
  invalid_argument(std::string argument, std::string const& message,
                   std::source_location where = std::source_location::current())
      : error("invalid argument '" + argument + "': " + message, where),
        argument_(std::move(argument)) {}

  [[nodiscard]] std::string const& argument() const noexcept { return argument_; }

 private:
  std::string argument_;
};

/// A CUDA runtime call failed. The sticky error state was cleared before throwing when the
/// error is not sticky, so the caller can go on after a recoverable error.
class cuda_error : public error {
 public:
  cuda_error(cudaError_t code, char const* call,
             std::source_location where = std::source_location::current())
      : error(std::string(call) + " failed: " + cudaGetErrorName(code) + " (" +
                  cudaGetErrorString(code) + ")",
              where),
        code_(code) {}

  [[nodiscard]] cudaError_t code() const noexcept { return code_; }

 private:
  cudaError_t code_;
};

/// A cuBLAS call failed. The status is kept as an int so that this header needs no cuBLAS.
class cublas_error : public error {
 public:
  cublas_error(int code, char const* call,
               std::source_location where = std::source_location::current())
      : error(std::string(call) + " failed with cublasStatus_t " + std::to_string(code), where),
        code_(code) {}

  [[nodiscard]] int code() const noexcept { return code_; }

 private:
  int code_;
};

/// An NCCL call failed. The result is kept as an int so that this header needs no nccl.h.
class nccl_error : public error {
 public:
  nccl_error(int code, char const* call, char const* description,
             std::source_location where = std::source_location::current())
      : error(std::string(call) + " failed: " + description + " (ncclResult_t " +
                  std::to_string(code) + ")",
              where),
        code_(code) {}

  [[nodiscard]] int code() const noexcept { return code_; }

 private:
  int code_;
};

/// An MPI call failed, or an exchange over MPI went wrong (a byte count that differs from
/// the sender's). The code is MPI's error class or code, kept as an int so that this header
/// needs no mpi.h.
class mpi_error : public error {
 public:
  mpi_error(int code, std::string const& message,
            std::source_location where = std::source_location::current())
      : error(message + " (MPI error " + std::to_string(code) + ")", where), code_(code) {}

  [[nodiscard]] int code() const noexcept { return code_; }

 private:
  int code_;
};

/// A communication did not complete in the time allowed: where NCCL would hang (a receive
/// that no rank sends, ranks that issue different exchanges), a communicator with a timeout
/// throws this instead, naming what was still pending.
class timeout_error : public error {
 public:
  // Not `using error::error`: nvcc 13.0 fails on inheriting a defaulted source_location.
  explicit timeout_error(std::string const& message,
                         std::source_location where = std::source_location::current())
      : error(message, where) {}
};

/// What `can_implement` answers: either ok, or the argument at fault and why.
/// `can_implement` is noexcept and returns one; `run` throws it as `invalid_argument`.
class status {
 public:
  constexpr status() = default;

  /// A failure naming `argument`; `where` is the library's check (invalid_argument::where).
  [[nodiscard]] static status failure(
      std::string argument, std::string message,
      std::source_location where = std::source_location::current()) {
    status s;
    s.argument_ = std::move(argument);
    s.message_ = std::move(message);
    s.where_ = where;
    s.ok_ = false;
    return s;
  }

  [[nodiscard]] bool ok() const noexcept { return ok_; }
  explicit operator bool() const noexcept { return ok_; }
  [[nodiscard]] std::string const& argument() const noexcept { return argument_; }
  [[nodiscard]] std::string const& message() const noexcept { return message_; }
  /// "ok", or "invalid argument 'x': …" as the exception would say it.
  [[nodiscard]] std::string to_string() const {
    return ok_ ? "ok" : "invalid argument '" + argument_ + "': " + message_;
  }

  /// Throws `invalid_argument` when this status is a failure.
  void throw_if_failed() const {
    if (!ok_) throw invalid_argument(argument_, message_, where_);
  }

 private:
  bool ok_ = true;
  std::string argument_;
  std::string message_;
  std::source_location where_;
};

namespace detail {

/// Reports a failed call on stderr: the noexcept paths (destructors, cleanup) cannot throw.
inline void log_failure(char const* call, char const* description,
                        std::source_location where) noexcept {
  std::fprintf(stderr, "moe: %s failed: %s at %s:%u\n", call, description, where.file_name(),
               static_cast<unsigned>(where.line()));
}

/// What MOE_CUDA_TRY expands to.
inline void throw_if_cuda_failed(cudaError_t code, char const* call, std::source_location where) {
  if (code == cudaSuccess) return;
  (void)cudaGetLastError();
  throw cuda_error(code, call, where);
}

/// What MOE_CUDA_TRY_LOG expands to.
inline void log_if_cuda_failed(cudaError_t code, char const* call,
                               std::source_location where) noexcept {
  if (code == cudaSuccess) return;
  (void)cudaGetLastError();
  log_failure(call, cudaGetErrorName(code), where);
}

/// What MOE_NCCL_TRY does with a failed call.
[[noreturn]] inline void throw_nccl_error(int code, char const* call, char const* description,
                                          std::source_location where) {
  throw nccl_error(code, call, description, where);
}

/// What MOE_NCCL_TRY_LOG does with a failed call.
inline void log_nccl_failure(int, char const* call, char const* description,
                             std::source_location where) noexcept {
  log_failure(call, description, where);
}

}  // namespace detail

}  // namespace moe

/// Throws `moe::invalid_argument` naming `argument` when `condition` is false.
#define MOE_EXPECTS(condition, argument, message)                                            \
  do {                                                                                       \
    if (!(condition))                                                                        \
      throw ::moe::invalid_argument((argument), (message), std::source_location::current()); \
  } while (0)

/// Throws `moe::cuda_error` naming the call when a CUDA runtime call fails; clears the
/// (non-sticky) last-error state first so that later calls do not report it again.
#define MOE_CUDA_TRY(call) \
  ::moe::detail::throw_if_cuda_failed((call), #call, std::source_location::current())

/// The noexcept variant for destructors and cleanup paths: reports on stderr, never throws.
#define MOE_CUDA_TRY_LOG(call) \
  ::moe::detail::log_if_cuda_failed((call), #call, std::source_location::current())

/// Throws `moe::cublas_error` when a cuBLAS call does not return CUBLAS_STATUS_SUCCESS (0).
#define MOE_CUBLAS_TRY(call)                                                 \
  do {                                                                       \
    auto const moe_cublas_status_ = (call);                                  \
    if (static_cast<int>(moe_cublas_status_) != 0)                           \
      throw ::moe::cublas_error(static_cast<int>(moe_cublas_status_), #call, \
                                std::source_location::current());            \
  } while (0)

/// Throws `moe::nccl_error` when an NCCL call does not return ncclSuccess. The expansion
/// site includes nccl.h; this header does not.
#define MOE_NCCL_TRY(call) MOE_DETAIL_NCCL_CHECK(call, ::moe::detail::throw_nccl_error)

/// The noexcept NCCL variant for destructors: reports on stderr, never throws.
#define MOE_NCCL_TRY_LOG(call) MOE_DETAIL_NCCL_CHECK(call, ::moe::detail::log_nccl_failure)

/// Hands a failed NCCL call's result, name and description to `report`.
#define MOE_DETAIL_NCCL_CHECK(call, report)                                                   \
  do {                                                                                        \
    auto const moe_nccl_status_ = (call);                                                     \
    if (moe_nccl_status_ != ncclSuccess)                                                      \
      report(static_cast<int>(moe_nccl_status_), #call, ncclGetErrorString(moe_nccl_status_), \
             std::source_location::current());                                                \
  } while (0)
