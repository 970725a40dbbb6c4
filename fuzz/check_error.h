// What every error the fuzz targets see must satisfy: it names the file, and it is valid
// UTF-8 (Python turns the message into a str; invalid bytes would surface as a
// UnicodeDecodeError that hides the file and the problem).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

namespace flashpack_fuzz {

[[noreturn]] inline void broken(const std::string& what) {
  std::fprintf(stderr, "invariant broken: %s\n", what.c_str());
  std::abort();
}

inline bool valid_utf8(std::string_view s) {
  size_t k = 0;
  while (k < s.size()) {
    const auto c = static_cast<unsigned char>(s[k]);
    const int extra = c < 0x80 ? 0 : c >= 0xC2 && c < 0xE0 ? 1 : c >= 0xE0 && c < 0xF0 ? 2 : c >= 0xF0 && c < 0xF5 ? 3 : -1;
    if (extra < 0 || s.size() - k <= static_cast<size_t>(extra)) return false;
    for (int j = 1; j <= extra; ++j) {
      if ((static_cast<unsigned char>(s[k + j]) & 0xC0) != 0x80) return false;
    }
    k += extra + 1;
  }
  return true;
}

inline void check_error(const char* what, const std::string& path) {
  if (std::string_view(what).find(path) == std::string_view::npos) broken(std::string("unnamed error: ") + what);
  if (!valid_utf8(what)) broken(std::string("error is not valid UTF-8: ") + what);
}

}  // namespace flashpack_fuzz
