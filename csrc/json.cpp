#include "json.h"

#include <charconv>
#include <cstring>
#include <stdexcept>

namespace flashpack::json {

namespace {

// Raw bytes never go into messages: they may not be valid UTF-8.
std::string describe(char c) {
  if (c >= 0x20 && c < 0x7F) return std::string("'") + c + "'";
  static const char* hex = "0123456789abcdef";
  const auto u = static_cast<unsigned char>(c);
  return std::string("byte 0x") + hex[u >> 4] + hex[u & 0xF];
}

void put_utf8(std::string& out, unsigned cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

}  // namespace

Reader::Reader(std::string_view text) : p_(text.data()), begin_(text.data()), end_(text.data() + text.size()) {}

void Reader::fail(const std::string& what) const {
  throw SyntaxError("malformed JSON at byte " + std::to_string(p_ - begin_) + ": " + what);
}

void Reader::enter() {
  if (++depth_ > kMaxDepth) fail("nesting deeper than " + std::to_string(kMaxDepth) + " levels");
}

void Reader::fail_peek() const {
  if (p_ == end_) fail("unexpected end of input");
  fail("unexpected character " + describe(*p_));
}

void Reader::begin_object() {
  if (peek() != Kind::Object) fail("expected an object");
  ++p_;
  enter();
}

bool Reader::next_member(bool& first, std::string_view& key, std::string& key_storage) {
  skip_space();
  if (p_ == end_) fail("unterminated object");
  if (*p_ == '}') {
    ++p_;
    --depth_;
    return false;
  }
  if (!first) {
    if (*p_ != ',') fail("expected ',' or '}' in an object");
    ++p_;
    skip_space();
  }
  first = false;
  if (p_ == end_ || *p_ != '"') fail("expected a string key");
  key = string(key_storage);
  skip_space();
  if (p_ == end_ || *p_ != ':') fail("expected ':' after an object key");
  ++p_;
  return true;
}

void Reader::begin_array() {
  if (peek() != Kind::Array) fail("expected an array");
  ++p_;
  enter();
}

void Reader::fail_item() const {
  if (p_ == end_) fail("unterminated array");
  fail("expected ',' or ']' in an array");
}

// Validates one UTF-8 sequence starting at p_ and steps over it.
void Reader::utf8_sequence() {
  const auto c = static_cast<unsigned char>(*p_);
  int extra;
  unsigned cp;
  if (c < 0xC2) {
    fail("invalid UTF-8 lead byte");
  } else if (c < 0xE0) {
    extra = 1;
    cp = c & 0x1F;
  } else if (c < 0xF0) {
    extra = 2;
    cp = c & 0x0F;
  } else if (c < 0xF5) {
    extra = 3;
    cp = c & 0x07;
  } else {
    fail("invalid UTF-8 lead byte");
  }
  if (end_ - p_ <= extra) fail("truncated UTF-8 sequence");
  for (int k = 1; k <= extra; ++k) {
    const auto cc = static_cast<unsigned char>(p_[k]);
    if ((cc & 0xC0) != 0x80) fail("invalid UTF-8 continuation byte");
    cp = (cp << 6) | (cc & 0x3F);
  }
  if ((extra == 2 && cp < 0x800) || (extra == 3 && cp < 0x10000) || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
    fail("overlong or out-of-range UTF-8 sequence");
  }
  p_ += extra + 1;
}

std::string_view Reader::string(std::string& storage) {
  if (peek() != Kind::String) fail("expected a string");
  ++p_;
  const char* start = p_;
  // NOTE: plain ASCII, eight bytes at a time: footers are mostly names and keys, and the
  // byte-by-byte loop below was an eighth of a parse of 20,000 entries. A word holding a
  // quote, a backslash, a control character or a non-ASCII byte is left to that loop.
  constexpr uint64_t kOnes = 0x0101010101010101ull;
  constexpr uint64_t kHighs = 0x8080808080808080ull;
  const auto has_zero = [](uint64_t v) { return (v - kOnes) & ~v & kHighs; };
  while (end_ - p_ >= 8) {
    uint64_t w;
    std::memcpy(&w, p_, 8);
    const uint64_t special = has_zero(w ^ (kOnes * '"')) | has_zero(w ^ (kOnes * '\\')) |
                             ((w - kOnes * 0x20) & ~w & kHighs) | (w & kHighs);
    if (special != 0) break;
    p_ += 8;
  }
  bool escaped = false;  // once an escape is seen, the value is built in `storage`
  while (true) {
    if (p_ == end_) fail("unterminated string");
    const auto c = static_cast<unsigned char>(*p_);
    if (c == '"') {
      const std::string_view view = escaped ? std::string_view(storage) : std::string_view(start, p_ - start);
      ++p_;
      return view;
    }
    if (c < 0x20) fail("control character in a string");
    if (c == '\\') {
      if (!escaped) {
        storage.assign(start, p_);
        escaped = true;
      }
      ++p_;
      if (p_ == end_) fail("unterminated escape");
      const char e = *p_++;
      switch (e) {
        case '"': storage += '"'; break;
        case '\\': storage += '\\'; break;
        case '/': storage += '/'; break;
        case 'b': storage += '\b'; break;
        case 'f': storage += '\f'; break;
        case 'n': storage += '\n'; break;
        case 'r': storage += '\r'; break;
        case 't': storage += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (end_ - p_ < 6 || p_[0] != '\\' || p_[1] != 'u') fail("unpaired surrogate in \\u escape");
            p_ += 2;
            const unsigned lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("invalid low surrogate in \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail("unpaired surrogate in \\u escape");
          }
          put_utf8(storage, cp);
          break;
        }
        default: fail("invalid escape character " + describe(e));
      }
    } else if (c < 0x80) {
      if (escaped) storage += static_cast<char>(c);
      ++p_;
    } else {
      const char* seq = p_;
      utf8_sequence();
      if (escaped) storage.append(seq, p_);
    }
  }
}

unsigned Reader::hex4() {
  if (end_ - p_ < 4) fail("truncated \\u escape");
  unsigned cp = 0;
  for (int k = 0; k < 4; ++k) {
    const char c = *p_++;
    cp <<= 4;
    if (c >= '0' && c <= '9') cp |= c - '0';
    else if (c >= 'a' && c <= 'f') cp |= c - 'a' + 10;
    else if (c >= 'A' && c <= 'F') cp |= c - 'A' + 10;
    else fail("invalid hex digit in \\u escape");
  }
  return cp;
}

Number Reader::number() {
  if (peek() != Kind::Number) fail("expected a number");
  const char* start = p_;
  const bool neg = *p_ == '-';
  if (neg) ++p_;
  if (p_ == end_ || !(*p_ >= '0' && *p_ <= '9')) fail("invalid number");
  if (*p_ == '0' && p_ + 1 != end_ && p_[1] >= '0' && p_[1] <= '9') fail("leading zero in a number");
  // Accumulate with an explicit overflow check: strtoll would clamp silently. Nineteen
  // digits always fit in 64 bits; only a longer number is checked digit by digit.
  uint64_t mag = 0;
  bool overflow = false;
  const char* digits = p_;
  for (; p_ != end_ && *p_ >= '0' && *p_ <= '9' && p_ - digits < 19; ++p_) mag = mag * 10 + unsigned(*p_ - '0');
  for (; p_ != end_ && *p_ >= '0' && *p_ <= '9'; ++p_) {
    const unsigned d = *p_ - '0';
    overflow |= mag > (UINT64_MAX - d) / 10;
    mag = mag * 10 + d;
  }
  bool is_int = true;
  if (p_ != end_ && *p_ == '.') {
    is_int = false;
    ++p_;
    if (p_ == end_ || !(*p_ >= '0' && *p_ <= '9')) fail("invalid fraction");
    while (p_ != end_ && *p_ >= '0' && *p_ <= '9') ++p_;
  }
  if (p_ != end_ && (*p_ == 'e' || *p_ == 'E')) {
    is_int = false;
    ++p_;
    if (p_ != end_ && (*p_ == '+' || *p_ == '-')) ++p_;
    if (p_ == end_ || !(*p_ >= '0' && *p_ <= '9')) fail("invalid exponent");
    while (p_ != end_ && *p_ >= '0' && *p_ <= '9') ++p_;
  }
  Number n;
  const uint64_t limit = neg ? uint64_t(INT64_MAX) + 1 : uint64_t(INT64_MAX);
  if (is_int && !overflow && mag <= limit) {
    n.is_int = true;
    n.i = neg ? static_cast<int64_t>(0 - mag) : static_cast<int64_t>(mag);
    n.f = static_cast<double>(n.i);
  } else {
    std::from_chars(start, p_, n.f);  // only informative: such numbers are rejected where integers are needed
  }
  return n;
}

bool Reader::boolean() {
  skip_space();
  if (end_ - p_ >= 4 && std::string_view(p_, 4) == "true") {
    p_ += 4;
    return true;
  }
  if (end_ - p_ >= 5 && std::string_view(p_, 5) == "false") {
    p_ += 5;
    return false;
  }
  fail("invalid literal");
}

void Reader::null() {
  skip_space();
  if (end_ - p_ >= 4 && std::string_view(p_, 4) == "null") {
    p_ += 4;
    return;
  }
  fail("invalid literal");
}

void Reader::skip() {
  std::string storage;
  switch (peek()) {
    case Kind::Object: {
      begin_object();
      std::string_view key;
      for (bool first = true; next_member(first, key, storage);) skip();
      break;
    }
    case Kind::Array:
      begin_array();
      for (bool first = true; next_item(first);) skip();
      break;
    case Kind::String: string(storage); break;
    case Kind::Number: number(); break;
    case Kind::Bool: boolean(); break;
    case Kind::Null: null(); break;
  }
}

void Reader::finish() {
  skip_space();
  if (p_ != end_) fail("unexpected data after the JSON value");
}

void append_quoted(std::string& out, std::string_view s) {
  static const char* hex = "0123456789abcdef";
  out += '"';
  for (const char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += "\\u00";
          out += hex[(c >> 4) & 0xF];
          out += hex[c & 0xF];
        } else {
          out += c;  // UTF-8 passes through, as the reference writes it (ensure_ascii=False)
        }
    }
  }
  out += '"';
}

bool valid_utf8(std::string_view s) {
  std::string quoted, storage;
  append_quoted(quoted, s);
  try {
    Reader r(quoted);
    r.string(storage);
    return true;
  } catch (const SyntaxError&) {
    return false;
  }
}

}  // namespace flashpack::json
