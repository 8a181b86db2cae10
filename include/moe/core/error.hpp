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
#include <source_location>
#include <stdexcept>
#include <string>
#include <utility>

namespace moe {

namespace detail {

inline std::string describe_location(std::source_location const& where) {
  return std::string(where.file_name()) + ":" + std::to_string(where.line()) + " in " +
         where.function_name();
}

}  // namespace detail

/// Base of every exception the library throws. `where()` is the place the check failed.
class error : public std::runtime_error {
 public:
  explicit error(std::string const& message,
                 std::source_location where = std::source_location::current())
      : std::runtime_error("moe: " + message + " [at " + detail::describe_location(where) + "]"),
        where_(where) {}

  [[nodiscard]] std::source_location const& where() const noexcept { return where_; }

 private:
  std::source_location where_;
};

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

/// What `can_implement` answers: either ok, or the argument at fault and why.
/// `can_implement` is noexcept and returns one; `run` throws it as `invalid_argument`.
class status {
 public:
  constexpr status() = default;

  [[nodiscard]] static status failure(std::string argument, std::string message) {
    status s;
    s.argument_ = std::move(argument);
    s.message_ = std::move(message);
    s.ok_ = false;
    return s;
  }

  [[nodiscard]] bool ok() const noexcept { return ok_; }
  explicit operator bool() const noexcept { return ok_; }
  [[nodiscard]] std::string const& argument() const noexcept { return argument_; }
  [[nodiscard]] std::string const& message() const noexcept { return message_; }

  /// Throws `invalid_argument` when this status is a failure.
  void throw_if_failed(std::source_location where = std::source_location::current()) const {
    if (!ok_) throw invalid_argument(argument_, message_, where);
  }

 private:
  bool ok_ = true;
  std::string argument_;
  std::string message_;
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
