// SPDX-License-Identifier: Apache-2.0
// moe/core: errors name the call, file and line; dtype conversions; view shape checks;
// workspace layout; device queries on a machine without a GPU.

#include <doctest/doctest.h>

#include <moe/core.hpp>

#include <cmath>
#include <string>

using namespace moe;

TEST_CASE("check macros name the failing call, the file and the line") {
  try {
    MOE_CUDA_TRY(cudaErrorInvalidValue);
    FAIL("MOE_CUDA_TRY did not throw");
  } catch (cuda_error const& e) {
    std::string const what = e.what();
    CHECK(e.code() == cudaErrorInvalidValue);
    CHECK(what.find("cudaErrorInvalidValue") != std::string::npos);
    CHECK(what.find("core_test.cpp") != std::string::npos);
    CHECK(std::string(e.where().file_name()).find("core_test.cpp") != std::string::npos);
    CHECK(e.where().line() > 0);
  }
  CHECK_THROWS_AS(MOE_EXPECTS(1 + 1 == 3, "sum", "arithmetic"), moe::invalid_argument);
  try {
    MOE_EXPECTS(false, "k", "must be positive");
  } catch (moe::invalid_argument const& e) {
    CHECK(e.argument() == "k");
    CHECK(std::string(e.what()).find("invalid argument 'k': must be positive") !=
          std::string::npos);
  }
  CHECK_NOTHROW(MOE_CUDA_TRY(cudaSuccess));
  CHECK_THROWS_AS(MOE_CUBLAS_TRY(13), cublas_error);
}

TEST_CASE("status carries the argument and throws invalid_argument") {
  status const ok;
  CHECK(ok.ok());
  CHECK_NOTHROW(ok.throw_if_failed());
  auto const bad = status::failure("x", "too wide");
  CHECK_FALSE(bad.ok());
  CHECK(bad.argument() == "x");
  CHECK_THROWS_AS(bad.throw_if_failed(), moe::invalid_argument);
}

TEST_CASE("dtype conversions round to nearest even and name their types") {
  CHECK(to_accumulate(from_accumulate<__half>(1.5f)) == 1.5f);
  CHECK(to_accumulate(from_accumulate<__nv_bfloat16>(-2.25f)) == -2.25f);
  // 1 + 2^-9 lies between two bfloat16 values (1 and 1 + 2^-7)... nearest is 1.
  CHECK(to_accumulate(from_accumulate<__nv_bfloat16>(1.0f + 1.0f / 512)) == 1.0f);
  // 1 + 3·2^-9 rounds up to 1 + 2^-7.
  CHECK(to_accumulate(from_accumulate<__nv_bfloat16>(1.0f + 3.0f / 512)) == 1.0f + 1.0f / 128);
  CHECK(to_accumulate(from_accumulate<__half>(65504.0f)) == 65504.0f);
  CHECK(std::isinf(to_accumulate(from_accumulate<__half>(70000.0f))));
  static_assert(std::is_same_v<accumulate_t<__nv_bfloat16>, float>);
  static_assert(std::is_same_v<accumulate_t<double>, double>);
  static_assert(dtype_of<__half> == dtype::f16);
  CHECK(std::string(name_of(dtype::bf16)) == "bfloat16");
}

TEST_CASE("view checks name the argument and the extents") {
  float data[6] = {1, 2, 3, 4, 5, 6};
  auto const m = make_view(data, 2, 3);
  CHECK(m(1, 2) == 6);
  CHECK(element_count(m) == 6);
  CHECK(check_extents(m, "m", {2, 3}).ok());
  auto const wrong = check_extents(m, "m", {3, 2});
  CHECK_FALSE(wrong.ok());
  CHECK(wrong.argument() == "m");
  CHECK(wrong.message() == "expected extents (3, 2), got (2, 3)");
  auto const null = check_extents(make_view(static_cast<float*>(nullptr), 2, 3), "p", {2, 3});
  CHECK_FALSE(null.ok());
  CHECK(null.message().find("null data") != std::string::npos);
  CHECK(check_optional_extents(matrix_view<float>{}, "bias", {2, 3}).ok());
  CHECK_FALSE(check_optional_extents(make_view(data, 1, 6), "bias", {2, 3}).ok());
  CHECK_FALSE(is_present(matrix_view<float>{}));
}

TEST_CASE("workspace carver counts and lays out the same aligned arrays") {
  workspace_carver counter;
  CHECK(counter.take<double>(3) == nullptr);
  CHECK(counter.take<int>(1) == nullptr);
  CHECK(counter.bytes() == 2 * workspace_alignment);

  host_buffer buffer(counter.bytes());
  workspace_carver carver(buffer.view());
  auto* a = carver.take<double>(3);
  auto* b = carver.take<int>(1);
  CHECK(reinterpret_cast<std::byte*>(a) == buffer.view().data());
  CHECK(reinterpret_cast<std::byte*>(b) - reinterpret_cast<std::byte*>(a) ==
        static_cast<std::ptrdiff_t>(workspace_alignment));
  CHECK(reinterpret_cast<std::uintptr_t>(buffer.view().data()) % workspace_alignment == 0);
  CHECK(carver.bytes() == counter.bytes());
}

TEST_CASE("cuda_device_count answers without throwing, the same each time") {
  // Without a driver every runtime call fails with cudaErrorInsufficientDriver; the query
  // must turn that into 0 devices, every time.
  int const count = cuda_device_count();
  CHECK(count >= 0);
  CHECK(cuda_device_count() == count);
  int raw = 0;
  if (cudaGetDeviceCount(&raw) != cudaSuccess)
    CHECK(count == 0);
  else
    CHECK(count == raw);
}
