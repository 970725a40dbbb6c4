#include "json.h"

#include <cmath>
#include <cstdlib>
#include <stdexcept>

namespace flashpack::json {

const Value* Value::find(std::string_view key) const {
  for (const auto& kv : members) {
    if (kv.first == key) return &kv.second;
  }
  return nullptr;
}

namespace {

class Parser {
 public:
  explicit Parser(std::string_view text) : p_(text.data()), begin_(text.data()), end_(text.data() + text.size()) {}

  Value document() {
    Value v = value(0);
    skip_space();
    if (p_ != end_) fail("unexpected data after the JSON value");
    return v;
  }

 private:
  const char* p_;
  const char* begin_;
  const char* end_;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::invalid_argument("malformed JSON at byte " + std::to_string(p_ - begin_) + ": " + what);
  }

  // Raw bytes never go into messages: they may not be valid UTF-8.
  static std::string describe(char c) {
    if (c >= 0x20 && c < 0x7F) return std::string("'") + c + "'";
    static const char* hex = "0123456789abcdef";
    const auto u = static_cast<unsigned char>(c);
    return std::string("byte 0x") + hex[u >> 4] + hex[u & 0xF];
  }

  void skip_space() {
    while (p_ != end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }

  bool literal(std::string_view word) {
    if (static_cast<size_t>(end_ - p_) >= word.size() && std::string_view(p_, word.size()) == word) {
      p_ += word.size();
      return true;
    }
    return false;
  }

  Value value(int depth) {
    if (depth >= kMaxDepth) fail("nesting deeper than " + std::to_string(kMaxDepth) + " levels");
    skip_space();
    if (p_ == end_) fail("unexpected end of input");
    Value v;
    switch (*p_) {
      case '{': object(v, depth); break;
      case '[': array(v, depth); break;
      case '"': v.kind = Kind::String; string(v.s); break;
      case 't':
        if (!literal("true")) fail("invalid literal");
        v.kind = Kind::Bool;
        v.b = true;
        break;
      case 'f':
        if (!literal("false")) fail("invalid literal");
        v.kind = Kind::Bool;
        break;
      case 'n':
        if (!literal("null")) fail("invalid literal");
        break;
      default:
        if (*p_ == '-' || (*p_ >= '0' && *p_ <= '9')) {
          number(v);
        } else {
          fail("unexpected character " + describe(*p_));
        }
    }
    return v;
  }

  void object(Value& v, int depth) {
    v.kind = Kind::Object;
    ++p_;  // '{'
    skip_space();
    if (p_ != end_ && *p_ == '}') {
      ++p_;
      return;
    }
    while (true) {
      skip_space();
      if (p_ == end_ || *p_ != '"') fail("expected a string key");
      std::string key;
      string(key);
      skip_space();
      if (p_ == end_ || *p_ != ':') fail("expected ':' after an object key");
      ++p_;
      Value member = value(depth + 1);
      v.members.emplace_back(std::move(key), std::move(member));
      skip_space();
      if (p_ == end_) fail("unterminated object");
      if (*p_ == ',') {
        ++p_;
        continue;
      }
      if (*p_ == '}') {
        ++p_;
        return;
      }
      fail("expected ',' or '}' in an object");
    }
  }

  void array(Value& v, int depth) {
    v.kind = Kind::Array;
    ++p_;  // '['
    skip_space();
    if (p_ != end_ && *p_ == ']') {
      ++p_;
      return;
    }
    while (true) {
      v.items.push_back(value(depth + 1));
      skip_space();
      if (p_ == end_) fail("unterminated array");
      if (*p_ == ',') {
        ++p_;
        continue;
      }
      if (*p_ == ']') {
        ++p_;
        return;
      }
      fail("expected ',' or ']' in an array");
    }
  }

  unsigned hex4() {
    if (end_ - p_ < 4) fail("truncated \\u escape");
    unsigned cp = 0;
    for (int k = 0; k < 4; ++k) {
      char c = *p_++;
      cp <<= 4;
      if (c >= '0' && c <= '9') cp |= c - '0';
      else if (c >= 'a' && c <= 'f') cp |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') cp |= c - 'A' + 10;
      else fail("invalid hex digit in \\u escape");
    }
    return cp;
  }

  static void put_utf8(std::string& out, unsigned cp) {
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

  // Validates one UTF-8 sequence starting at p_ and copies it to out.
  void utf8_sequence(std::string& out) {
    const auto c = static_cast<unsigned char>(*p_);
    int extra;
    unsigned cp;
    if (c < 0xC2) fail("invalid UTF-8 lead byte");
    if (c < 0xE0) {
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
    if ((extra == 2 && cp < 0x800) || (extra == 3 && cp < 0x10000) || cp > 0x10FFFF ||
        (cp >= 0xD800 && cp <= 0xDFFF)) {
      fail("overlong or out-of-range UTF-8 sequence");
    }
    out.append(p_, extra + 1);
    p_ += extra + 1;
  }

  void string(std::string& out) {
    ++p_;  // opening quote
    while (true) {
      if (p_ == end_) fail("unterminated string");
      const char c = *p_;
      if (c == '"') {
        ++p_;
        return;
      }
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in a string");
      if (c == '\\') {
        ++p_;
        if (p_ == end_) fail("unterminated escape");
        const char e = *p_++;
        switch (e) {
          case '"': out += '"'; break;
          case '\\': out += '\\'; break;
          case '/': out += '/'; break;
          case 'b': out += '\b'; break;
          case 'f': out += '\f'; break;
          case 'n': out += '\n'; break;
          case 'r': out += '\r'; break;
          case 't': out += '\t'; break;
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
            put_utf8(out, cp);
            break;
          }
          default: fail("invalid escape character " + describe(e));
        }
      } else if (static_cast<unsigned char>(c) < 0x80) {
        out += c;
        ++p_;
      } else {
        utf8_sequence(out);
      }
    }
  }

  void number(Value& v) {
    const char* start = p_;
    if (*p_ == '-') ++p_;
    if (p_ == end_ || !(*p_ >= '0' && *p_ <= '9')) fail("invalid number");
    if (*p_ == '0' && p_ + 1 != end_ && p_[1] >= '0' && p_[1] <= '9') fail("leading zero in a number");
    while (p_ != end_ && *p_ >= '0' && *p_ <= '9') ++p_;
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
    const std::string text(start, p_);
    if (is_int) {
      // Accumulate with an explicit overflow check: strtoll would clamp silently.
      const bool neg = text[0] == '-';
      uint64_t mag = 0;
      bool overflow = false;
      for (size_t k = neg ? 1 : 0; k < text.size(); ++k) {
        const unsigned d = text[k] - '0';
        if (mag > (UINT64_MAX - d) / 10) {
          overflow = true;
          break;
        }
        mag = mag * 10 + d;
      }
      const uint64_t limit = neg ? (uint64_t(INT64_MAX) + 1) : uint64_t(INT64_MAX);
      if (!overflow && mag <= limit) {
        v.kind = Kind::Int;
        v.i = neg ? static_cast<int64_t>(0 - mag) : static_cast<int64_t>(mag);
        return;
      }
    }
    v.kind = Kind::Float;
    v.f = std::strtod(text.c_str(), nullptr);
  }
};

}  // namespace

Value parse(std::string_view text) {
  return Parser(text).document();
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

}  // namespace flashpack::json
