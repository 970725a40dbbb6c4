#include "format.h"

#include "io.h"
#include "json.h"

#include <cstring>
#include <numeric>
#include <stdexcept>
#include <unordered_set>

namespace flashpack {

namespace {

struct DTypeName {
  c10::ScalarType type;
  const char* name;
};

// Canonical names first: dtype_name() returns the first match, which is what
// str(torch.dtype) prints and what the reference writes.
#define FLASHPACK_DTYPES(_)                                                        \
  _(Bool, "bool") _(Byte, "uint8") _(Char, "int8") _(Short, "int16") _(Int, "int32") \
  _(Long, "int64") _(UInt16, "uint16") _(UInt32, "uint32") _(UInt64, "uint64")    \
  _(Half, "float16") _(BFloat16, "bfloat16") _(Float, "float32") _(Double, "float64") \
  _(ComplexHalf, "complex32") _(ComplexFloat, "complex64") _(ComplexDouble, "complex128") \
  _(Float8_e4m3fn, "float8_e4m3fn") _(Float8_e4m3fnuz, "float8_e4m3fnuz")          \
  _(Float8_e5m2, "float8_e5m2") _(Float8_e5m2fnuz, "float8_e5m2fnuz")              \
  _(Float8_e8m0fnu, "float8_e8m0fnu") _(Float4_e2m1fn_x2, "float4_e2m1fn_x2")      \
  _(Bits1x8, "bits1x8") _(Bits2x4, "bits2x4") _(Bits4x2, "bits4x2") _(Bits8, "bits8") \
  _(Bits16, "bits16") _(UInt1, "uint1") _(UInt2, "uint2") _(UInt3, "uint3")          \
  _(UInt4, "uint4") _(UInt5, "uint5") _(UInt6, "uint6") _(UInt7, "uint7")            \
  _(Int1, "int1") _(Int2, "int2") _(Int3, "int3") _(Int4, "int4") _(Int5, "int5")    \
  _(Int6, "int6") _(Int7, "int7")                                                  \
  _(Half, "half") _(Float, "float") _(Double, "double") _(Long, "long")              \
  _(Int, "int") _(Short, "short") _(ComplexHalf, "chalf") _(ComplexFloat, "cfloat") \
  _(ComplexDouble, "cdouble")

#define FLASHPACK_ENTRY(T, N) {c10::ScalarType::T, N},
constexpr DTypeName kDTypes[] = {FLASHPACK_DTYPES(FLASHPACK_ENTRY)};
#undef FLASHPACK_ENTRY

[[noreturn]] void bad(const std::string& path, const std::string& what) {
  throw std::invalid_argument("'" + path + "': " + what);
}

const json::Value& member(const json::Value& obj, const char* key, const std::string& path, const std::string& where) {
  const json::Value* v = obj.find(key);
  if (v == nullptr) bad(path, where + " has no \"" + key + "\" field");
  return *v;
}

// A non-negative integer field; anything else (negative, fractional, too large for
// int64, a string) is an error naming the field.
uint64_t count(const json::Value& v, const char* key, const std::string& path, const std::string& where) {
  if (v.kind != json::Kind::Int) bad(path, where + ": \"" + key + "\" must be an integer");
  if (v.i < 0) bad(path, where + ": \"" + key + "\" is negative (" + std::to_string(v.i) + ")");
  return static_cast<uint64_t>(v.i);
}

uint64_t count_field(const json::Value& obj, const char* key, const std::string& path, const std::string& where) {
  return count(member(obj, key, path, where), key, path, where);
}

c10::ScalarType dtype_field(const json::Value& obj, const char* key, const std::string& path, const std::string& where) {
  const json::Value& v = member(obj, key, path, where);
  if (v.kind != json::Kind::String) bad(path, where + ": \"" + key + "\" must be a string");
  auto t = dtype_from_name(v.s);
  if (!t) bad(path, where + ": unknown dtype '" + v.s + "'");
  return *t;
}

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}

std::string entry_where(const std::string& name) {
  return "index entry '" + name + "'";
}

}  // namespace

const char* dtype_name(c10::ScalarType t) {
  for (const auto& d : kDTypes) {
    if (d.type == t) return d.name;
  }
  return nullptr;
}

std::optional<c10::ScalarType> dtype_from_name(std::string_view name) {
  for (const auto& d : kDTypes) {
    if (name == d.name) return d.type;
  }
  return std::nullopt;
}

Layout parse_footer(std::string_view footer, uint64_t payload_bytes, const std::string& path) {
  json::Value root;
  try {
    root = json::parse(footer);
  } catch (const std::invalid_argument& e) {
    bad(path, std::string("footer is not valid JSON (") + e.what() + ")");
  }
  if (root.kind != json::Kind::Object) bad(path, "footer is not a JSON object");

  Layout layout;
  layout.payload_bytes = payload_bytes;
  const json::Value& fmt = member(root, "format", path, "footer");
  if (fmt.kind != json::Kind::String) bad(path, "footer: \"format\" must be a string");
  layout.format = fmt.s;
  if (const json::Value* a = root.find("align_bytes")) {
    layout.align_bytes = static_cast<int64_t>(count(*a, "align_bytes", path, "footer"));
  }

  if (layout.format == kFormatV3) {
    Block b;
    b.dtype = dtype_field(root, "target_dtype", path, "footer");
    b.offset_bytes = 0;
    b.length_elems = count_field(root, "total_elems", path, "footer");
    if (mul_overflows(b.length_elems, c10::elementSize(b.dtype), &b.length_bytes)) {
      bad(path, "footer: total_elems " + std::to_string(b.length_elems) + " overflows when counted in bytes");
    }
    layout.blocks.push_back(b);
  } else if (layout.format == kFormatV4) {
    const json::Value& mbs = member(root, "macroblocks", path, "footer");
    if (mbs.kind != json::Kind::Array) bad(path, "footer: \"macroblocks\" must be an array");
    layout.blocks.reserve(mbs.items.size());
    for (size_t k = 0; k < mbs.items.size(); ++k) {
      const json::Value& mb = mbs.items[k];
      const std::string where = "macroblock " + std::to_string(k);
      if (mb.kind != json::Kind::Object) bad(path, where + " is not an object");
      Block b;
      b.dtype = dtype_field(mb, "dtype", path, where);
      b.offset_bytes = count_field(mb, "offset_bytes", path, where);
      b.length_bytes = count_field(mb, "length_bytes", path, where);
      b.length_elems = count_field(mb, "length_elems", path, where);
      uint64_t expect = 0;
      if (mul_overflows(b.length_elems, c10::elementSize(b.dtype), &expect) || expect != b.length_bytes) {
        bad(path, where + ": length_bytes " + std::to_string(b.length_bytes) + " does not equal length_elems " +
                      std::to_string(b.length_elems) + " x " + std::to_string(c10::elementSize(b.dtype)) + " bytes");
      }
      layout.blocks.push_back(b);
    }
  } else {
    bad(path, "unknown format '" + layout.format + "' (expected " + kFormatV3 + " or " + kFormatV4 + ")");
  }

  for (size_t k = 0; k < layout.blocks.size(); ++k) {
    const Block& b = layout.blocks[k];
    const std::string where = "macroblock " + std::to_string(k) + " (" + dtype_name(b.dtype) + ")";
    const uint64_t esize = c10::elementSize(b.dtype);
    if (b.offset_bytes % esize != 0) {
      bad(path, where + ": offset_bytes " + std::to_string(b.offset_bytes) + " is not a multiple of the " +
                    std::to_string(esize) + "-byte element size");
    }
    uint64_t end = 0;
    if (__builtin_add_overflow(b.offset_bytes, b.length_bytes, &end) || end > payload_bytes) {
      bad(path, where + " ends past the payload end " + std::to_string(payload_bytes) +
                    " (offset_bytes " + std::to_string(b.offset_bytes) + " + length_bytes " +
                    std::to_string(b.length_bytes) + "); the file is truncated or the footer is wrong");
    }
  }

  const json::Value& index = member(root, "index", path, "footer");
  if (index.kind != json::Kind::Array) bad(path, "footer: \"index\" must be an array");
  layout.entries.reserve(index.items.size());
  std::unordered_set<std::string_view> seen;
  seen.reserve(index.items.size());
  for (size_t k = 0; k < index.items.size(); ++k) {
    const json::Value& rec = index.items[k];
    if (rec.kind != json::Kind::Object) bad(path, "index entry " + std::to_string(k) + " is not an object");
    const json::Value& name = member(rec, "name", path, "index entry " + std::to_string(k));
    if (name.kind != json::Kind::String) bad(path, "index entry " + std::to_string(k) + ": \"name\" must be a string");
    Entry e;
    e.name = name.s;
    const std::string where = entry_where(e.name);

    const json::Value& shape = member(rec, "shape", path, where);
    if (shape.kind != json::Kind::Array) bad(path, where + ": \"shape\" must be an array");
    if (shape.items.size() > kMaxDims) {
      bad(path, where + " has " + std::to_string(shape.items.size()) + " dimensions, more than " + std::to_string(kMaxDims));
    }
    uint64_t numel = 1;
    bool numel_overflow = false;
    for (const json::Value& d : shape.items) {
      const uint64_t dim = count(d, "shape", path, where);
      e.shape.push_back(static_cast<int64_t>(dim));
      numel_overflow |= mul_overflows(numel, dim, &numel);
    }
    e.offset = count_field(rec, "offset", path, where);
    e.length = count_field(rec, "length", path, where);
    if (numel_overflow || numel != e.length) {
      bad(path, where + ": the shape holds " + (numel_overflow ? std::string("more than 2^64") : std::to_string(numel)) +
                    " elements but \"length\" says " + std::to_string(e.length));
    }
    if (const json::Value* mb = rec.find("macroblock")) {
      const uint64_t id = count(*mb, "macroblock", path, where);
      if (id >= layout.blocks.size()) {
        bad(path, where + " refers to macroblock " + std::to_string(id) + " but the file has " +
                      std::to_string(layout.blocks.size()));
      }
      e.block = static_cast<uint32_t>(id);
    } else if (layout.blocks.empty()) {
      bad(path, where + " refers to macroblock 0 but the file has none");
    }
    const Block& b = layout.blocks[e.block];
    uint64_t end = 0;
    if (__builtin_add_overflow(e.offset, e.length, &end) || end > b.length_elems) {
      bad(path, where + " ends at element " + (end < e.offset ? std::string("past 2^64") : std::to_string(end)) +
                    ", past the end of macroblock " + std::to_string(e.block) + " (" + std::to_string(b.length_elems) +
                    " elements)");
    }
    // The set views the names inside the parsed document, which outlives it.
    if (!seen.insert(name.s).second) bad(path, where + " appears twice in the index");
    layout.entries.push_back(std::move(e));
  }
  return layout;
}

Layout read_layout(int fd, uint64_t file_size, const std::string& path, std::string* raw_footer) {
  if (file_size < kTrailerBytes) {
    bad(path, "file is " + std::to_string(file_size) + " bytes, too small to be a flashpack file (the trailer alone is 16)");
  }
  unsigned char trailer[kTrailerBytes];
  pread_exact(fd, trailer, kTrailerBytes, file_size - kTrailerBytes, path);
  if (std::memcmp(trailer + 8, kMagic, 8) != 0) {
    bad(path, "not a flashpack file (the last 8 bytes are not the magic \"FLASHPK\\0\")");
  }
  uint64_t footer_len = 0;
  for (int k = 7; k >= 0; --k) footer_len = (footer_len << 8) | trailer[k];
  if (footer_len > file_size - kTrailerBytes) {
    bad(path, "footer length " + std::to_string(footer_len) + " is larger than the file (" + std::to_string(file_size) +
                  " bytes); the file is truncated or corrupt");
  }
  if (footer_len > kMaxFooterBytes) {
    bad(path, "footer length " + std::to_string(footer_len) + " exceeds the limit of " + std::to_string(kMaxFooterBytes) + " bytes");
  }
  const uint64_t payload_bytes = file_size - kTrailerBytes - footer_len;
  std::string footer(footer_len, '\0');
  pread_exact(fd, footer.data(), footer_len, payload_bytes, path);
  Layout layout = parse_footer(footer, payload_bytes, path);
  if (raw_footer != nullptr) *raw_footer = std::move(footer);
  return layout;
}

std::string footer_json(const Layout& layout) {
  std::string out;
  out.reserve(128 + layout.blocks.size() * 128 + layout.entries.size() * 96);
  uint64_t total_elems = 0;
  for (const Block& b : layout.blocks) total_elems += b.length_elems;
  out += "{\"format\":\"flashpack_v4\",\"align_bytes\":" + std::to_string(layout.align_bytes);
  out += ",\"total_payload_bytes\":" + std::to_string(layout.payload_bytes);
  out += ",\"total_elems\":" + std::to_string(total_elems);
  out += ",\"macroblocks\":[";
  for (size_t k = 0; k < layout.blocks.size(); ++k) {
    const Block& b = layout.blocks[k];
    if (k) out += ',';
    out += "{\"dtype\":\"";
    out += dtype_name(b.dtype);
    out += "\",\"offset_bytes\":" + std::to_string(b.offset_bytes) + ",\"length_bytes\":" +
           std::to_string(b.length_bytes) + ",\"length_elems\":" + std::to_string(b.length_elems) + "}";
  }
  out += "],\"index\":[";
  for (size_t k = 0; k < layout.entries.size(); ++k) {
    const Entry& e = layout.entries[k];
    if (k) out += ',';
    out += "{\"name\":";
    json::append_quoted(out, e.name);
    out += ",\"shape\":[";
    for (size_t d = 0; d < e.shape.size(); ++d) {
      if (d) out += ',';
      out += std::to_string(e.shape[d]);
    }
    out += "],\"offset\":" + std::to_string(e.offset) + ",\"length\":" + std::to_string(e.length) +
           ",\"macroblock\":" + std::to_string(e.block) + "}";
  }
  out += "]}";
  return out;
}

Layout plan_layout(const std::vector<SaveRequest>& requests, int64_t align_bytes) {
  Layout layout;
  layout.align_bytes = align_bytes;
  std::vector<int> block_of_dtype(static_cast<int>(c10::ScalarType::NumOptions), -1);
  std::vector<std::vector<size_t>> members;
  for (size_t k = 0; k < requests.size(); ++k) {
    const int t = static_cast<int>(requests[k].dtype);
    if (block_of_dtype[t] < 0) {
      block_of_dtype[t] = static_cast<int>(layout.blocks.size());
      Block b;
      b.dtype = requests[k].dtype;
      layout.blocks.push_back(b);
      members.emplace_back();
    }
    members[block_of_dtype[t]].push_back(k);
  }

  layout.entries.resize(requests.size());
  uint64_t cursor = 0;
  for (size_t bi = 0; bi < layout.blocks.size(); ++bi) {
    Block& b = layout.blocks[bi];
    const uint64_t esize = c10::elementSize(b.dtype);
    // Tensors start on multiples of lcm(align, esize) bytes, the rule the reference
    // checks on load: offset % (align / gcd(align, esize)) == 0 in elements.
    const uint64_t align_elems = align_bytes > 0 ? uint64_t(align_bytes) / std::gcd(uint64_t(align_bytes), esize) : 1;
    cursor = (cursor + kBlockAlignBytes - 1) / kBlockAlignBytes * kBlockAlignBytes;
    b.offset_bytes = cursor;
    uint64_t elems = 0;
    for (size_t k : members[bi]) {
      const SaveRequest& r = requests[k];
      Entry& e = layout.entries[k];
      e.name = r.name;
      e.shape = r.shape;
      e.block = static_cast<uint32_t>(bi);
      e.length = 1;
      for (int64_t d : r.shape) e.length *= static_cast<uint64_t>(d);
      if (r.tie >= 0) {
        e.offset = layout.entries[r.tie].offset;
        continue;
      }
      elems = (elems + align_elems - 1) / align_elems * align_elems;
      e.offset = elems;
      elems += e.length;
    }
    b.length_elems = elems;
    b.length_bytes = elems * esize;
    cursor += b.length_bytes;
  }
  layout.payload_bytes = cursor;
  return layout;
}

}  // namespace flashpack
