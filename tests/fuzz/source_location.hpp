// SPDX-License-Identifier: Apache-2.0
#pragma once
// std::source_location for clang 14 over libstdc++ 12, force-included into the fuzz targets
// only. libstdc++'s <source_location> defines the class only when the compiler has
// __builtin_source_location, which clang gained in version 15; Debian 12's clang is 14. Its
// __builtin_FILE/LINE/COLUMN/FUNCTION give the same information. Adding to namespace std is
// not allowed in general; it is confined to this test build, where the class is otherwise
// missing, and steps aside for any compiler that has the real one.

#include <source_location>

#if !defined(__cpp_lib_source_location) && defined(__clang__) && \
    !__has_builtin(__builtin_source_location)
#include <cstdint>

namespace std {
struct source_location {
  // constexpr, not consteval: clang 14 rejects a consteval call in a default argument.
  static constexpr source_location current(
      char const* file = __builtin_FILE(), char const* function = __builtin_FUNCTION(),
      std::uint_least32_t line = __builtin_LINE(),
      std::uint_least32_t column = __builtin_COLUMN()) noexcept {
    source_location s;
    s.file_ = file;
    s.function_ = function;
    s.line_ = line;
    s.column_ = column;
    return s;
  }
  constexpr source_location() noexcept = default;
  constexpr std::uint_least32_t line() const noexcept { return line_; }
  constexpr std::uint_least32_t column() const noexcept { return column_; }
  constexpr char const* file_name() const noexcept { return file_; }
  constexpr char const* function_name() const noexcept { return function_; }

 private:
  char const* file_ = "";
  char const* function_ = "";
  std::uint_least32_t line_ = 0;
  std::uint_least32_t column_ = 0;
};
}  // namespace std
#endif
