// A small strict JSON reader and writer for the flashpack footer.
//
// Torch wheels ship no JSON library, and the footer is untrusted input, so the
// parser is deliberately strict and bounded: nesting depth is capped (no stack
// overflow from "[[[[..."), numbers must be integers or plain decimals, strings
// must be valid UTF-8, and every error names the byte offset where it was found.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace flashpack::json {

enum class Kind { Null, Bool, Int, Float, String, Array, Object };

struct Value {
  Kind kind = Kind::Null;
  bool b = false;
  int64_t i = 0;        // Kind::Int (the integer fits in int64)
  double f = 0.0;       // Kind::Float, or an integer too large for int64
  std::string s;        // Kind::String
  std::vector<Value> items;                            // Kind::Array
  std::vector<std::pair<std::string, Value>> members;  // Kind::Object, in file order

  // First member with this key, or nullptr. Objects in the footer are small,
  // so a linear scan beats building a map.
  const Value* find(std::string_view key) const;
};

// NOTE: 64 levels is far deeper than any footer (which nests 4 deep) and keeps
// the recursive parser's stack use to a few KiB.
constexpr int kMaxDepth = 64;

// Parses a whole document; trailing non-space bytes are an error.
// Throws std::invalid_argument with the offset and the problem.
Value parse(std::string_view text);

// Appends `s` as a JSON string literal (quotes and escapes) to `out`.
void append_quoted(std::string& out, std::string_view s);

}  // namespace flashpack::json
