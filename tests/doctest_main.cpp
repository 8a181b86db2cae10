// SPDX-License-Identifier: Apache-2.0
//
// doctest's main(), compiled once and shared by every cpu test executable.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
