// SPDX-License-Identifier: Apache-2.0
#pragma once
// The shared check of bad-input tests: a call must throw moe::invalid_argument naming the
// argument that is wrong.

#include <moe/core/error.hpp>

#include <doctest/doctest.h>

#include <string>

namespace moe::test {

/// Expects `call` to throw invalid_argument naming `argument`; returns its message ("" when
/// nothing was thrown), for further checks.
template <class Call>
std::string expect_rejected(Call&& call, std::string const& argument) {
  try {
    call();
    FAIL("no exception; expected one naming '" << argument << "'");
  } catch (moe::invalid_argument const& e) {
    INFO(e.what());
    CHECK(e.argument() == argument);
    return e.what();
  }
  return {};
}

}  // namespace moe::test
