// A small strict JSON reader and writer for the flashpack footer.
//
// Torch wheels ship no JSON library, and the footer is untrusted input, so the reader
// is strict and bounded: nesting depth is capped (no stack overflow from "[[[[..."),
// strings must be valid UTF-8, and every error names the byte offset where it was found.
//
// NOTE: the reader is a pull parser, not a document tree. A footer indexing 20,000
// tensors is ~1.5 MB of JSON read on every load, and a tree costs an allocation per
// value; worse, a hostile footer of N bytes could expand to a tree of 20-40 N bytes.
// Pulling values straight into the index keeps memory proportional to what is kept.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

namespace flashpack::json {

// Thrown for text that is not well-formed JSON.
struct SyntaxError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

enum class Kind : uint8_t { Null, Bool, Number, String, Array, Object };

// NOTE: 64 levels is far deeper than any footer (which nests 4 deep).
constexpr int kMaxDepth = 64;

struct Number {
  bool is_int = false;  // an integer that fits in int64
  int64_t i = 0;
  double f = 0.0;
};

// Reads one JSON document from a text that must outlive the reader. Every method
// throws SyntaxError("malformed JSON at byte N: ...") on bad input.
//
//   reader.begin_object();
//   for (bool first = true; reader.next_member(first, key);) { ... read or skip the value ... }
class Reader {
 public:
  explicit Reader(std::string_view text);

  // The kind of the next value (after white space), without consuming it.
  Kind peek() {
    skip_space();
    if (p_ != end_) {
      switch (*p_) {
        case '{': return Kind::Object;
        case '[': return Kind::Array;
        case '"': return Kind::String;
        case 't':
        case 'f': return Kind::Bool;
        case 'n': return Kind::Null;
        default:
          if (*p_ == '-' || (*p_ >= '0' && *p_ <= '9')) return Kind::Number;
      }
    }
    fail_peek();
  }

  void begin_object();
  // Advances to the next member: false at the closing '}', else the key is stored in
  // `key` (a view into the text or into `key_storage` when it held escapes).
  bool next_member(bool& first, std::string_view& key, std::string& key_storage);

  void begin_array();
  // Advances to the next item: false at the closing ']'.
  bool next_item(bool& first) {
    skip_space();
    if (p_ == end_) fail_item();
    if (*p_ == ']') {
      ++p_;
      --depth_;
      return false;
    }
    if (!first) {
      if (*p_ != ',') fail_item();
      ++p_;
    }
    first = false;
    return true;
  }

  // A string value; the view points into the text, or into `storage` if it held escapes.
  std::string_view string(std::string& storage);
  Number number();
  bool boolean();
  void null();
  // Skips one value of any kind.
  void skip();
  // Fails unless only white space is left.
  void finish();

  [[noreturn]] void fail(const std::string& what) const;

 private:
  // NOTE: inline, with the failures out of line: a footer indexing 20,000 tensors is read
  // on every load, and these run a few times per value (a call each cost a tenth of a parse).
  void skip_space() {
    while (p_ != end_ && static_cast<unsigned char>(*p_) <= ' ' &&
           (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) {
      ++p_;
    }
  }
  [[noreturn]] void fail_peek() const;
  [[noreturn]] void fail_item() const;
  void enter();
  void utf8_sequence();
  unsigned hex4();

  const char* p_;
  const char* begin_;
  const char* end_;
  int depth_ = 0;
};

// Appends `s` as a JSON string literal (quotes and escapes) to `out`.
void append_quoted(std::string& out, std::string_view s);

// Whether `s` is valid UTF-8, as a Reader requires of every string (append_quoted passes
// bytes through: a string that is not would make a footer no reader accepts).
bool valid_utf8(std::string_view s);

}  // namespace flashpack::json
