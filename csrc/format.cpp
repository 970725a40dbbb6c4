#include "format.h"

#include "io.h"
#include "json.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <map>
#include <stdexcept>
#include <tuple>
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
  _(Bits1x8, "bits1x8") _(Bits2x4, "bits2x4") _(Bits4x2, "bits4x2") _(Bits8, "bits8") \
  _(Bits16, "bits16") _(UInt1, "uint1") _(UInt2, "uint2") _(UInt3, "uint3")          \
  _(UInt4, "uint4") _(UInt5, "uint5") _(UInt6, "uint6") _(UInt7, "uint7")            \
  _(Int1, "int1") _(Int2, "int2") _(Int3, "int3") _(Int4, "int4") _(Int5, "int5")    \
  _(Int6, "int6") _(Int7, "int7")                                                  \
  _(Half, "half") _(Float, "float") _(Double, "double") _(Long, "long")              \
  _(Int, "int") _(Short, "short") _(ComplexHalf, "chalf") _(ComplexFloat, "cfloat") \
  _(ComplexDouble, "cdouble")

// Dtypes newer than torch 2.6, the oldest this builds against: a file holding one loads
// with a torch that has it, and elsewhere names the dtype it does not know.
#if FLASHPACK_TORCH_AT_LEAST(2, 7)
#define FLASHPACK_DTYPES_2_7(_) _(Float8_e8m0fnu, "float8_e8m0fnu")
#else
#define FLASHPACK_DTYPES_2_7(_)
#endif
#if FLASHPACK_TORCH_AT_LEAST(2, 8)
#define FLASHPACK_DTYPES_2_8(_) _(Float4_e2m1fn_x2, "float4_e2m1fn_x2")
#else
#define FLASHPACK_DTYPES_2_8(_)
#endif
#if FLASHPACK_TORCH_AT_LEAST(2, 14)
#define FLASHPACK_DTYPES_2_14(_) _(BComplex32, "bcomplex32")
#else
#define FLASHPACK_DTYPES_2_14(_)
#endif

// Every dtype added after torch 2.6, with the release that added it: a file holding one that
// the torch built against lacks is refused with an error that says which torch reads it.
constexpr std::pair<const char*, const char*> kLaterDTypes[] = {
    {"float8_e8m0fnu", "2.7"}, {"float4_e2m1fn_x2", "2.8"}, {"bcomplex32", "2.14"}};

#define FLASHPACK_ENTRY(T, N) {c10::ScalarType::T, N},
constexpr DTypeName kDTypes[] = {FLASHPACK_DTYPES(FLASHPACK_ENTRY) FLASHPACK_DTYPES_2_7(FLASHPACK_ENTRY)
                                     FLASHPACK_DTYPES_2_8(FLASHPACK_ENTRY) FLASHPACK_DTYPES_2_14(FLASHPACK_ENTRY)};
#undef FLASHPACK_ENTRY

[[noreturn]] void bad(const std::string& path, const std::string& what) {
  throw std::invalid_argument("'" + path + "': " + what);
}

// One scalar field of the footer, kept with its kind so that a type error can name the
// field once the entry it belongs to (and its name) is known. Not copyable: `s` may view
// `storage`.
struct Field {
  bool present = false;
  json::Kind kind = json::Kind::Null;
  json::Number num;
  std::string_view s;
  std::string storage;

  Field() = default;
  Field(const Field&) = delete;
  Field& operator=(const Field&) = delete;

  void read(json::Reader& r) {
    present = true;
    kind = r.peek();
    switch (kind) {
      case json::Kind::Number: num = r.number(); break;
      case json::Kind::String: s = r.string(storage); break;
      case json::Kind::Bool: r.boolean(); break;
      case json::Kind::Null: r.null(); break;
      default: r.skip();
    }
  }
};

// What an error message names ("index entry 'w'", "macroblock 2", "footer"). The text
// is only built when an error is thrown: 20,000 entries must not cost 20,000 strings.
struct Where {
  const char* what;
  size_t k = 0;
  const std::string* name = nullptr;
  bool numbered = false;

  std::string str() const {
    if (name != nullptr) return std::string(what) + " '" + *name + "'";
    if (numbered) return std::string(what) + " " + std::to_string(k);
    return what;
  }
};

void require(bool present, const char* key, const std::string& path, const Where& where) {
  if (!present) bad(path, where.str() + " has no \"" + key + "\" field");
}

// A non-negative integer; anything else (negative, fractional, too large for int64, a
// string) is an error naming the field.
uint64_t count(bool present, json::Kind kind, const json::Number& num, const char* key, const std::string& path,
               const Where& where) {
  require(present, key, path, where);
  if (kind != json::Kind::Number || !num.is_int) bad(path, where.str() + ": \"" + key + "\" must be an integer");
  if (num.i < 0) bad(path, where.str() + ": \"" + key + "\" is negative (" + std::to_string(num.i) + ")");
  return static_cast<uint64_t>(num.i);
}

uint64_t count(const Field& f, const char* key, const std::string& path, const Where& where) {
  return count(f.present, f.kind, f.num, key, path, where);
}

c10::ScalarType dtype_of(const Field& f, const char* key, const std::string& path, const Where& where) {
  require(f.present, key, path, where);
  if (f.kind != json::Kind::String) bad(path, where.str() + ": \"" + key + "\" must be a string");
  auto t = dtype_from_name(f.s);
  if (!t) {
    for (const auto& [name, since] : kLaterDTypes) {
      if (f.s == name) {
        bad(path, where.str() + ": dtype '" + name + "' needs torch " + since + " or newer (this is torch " +
                      std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + ")");
      }
    }
    bad(path, where.str() + ": unknown dtype '" + std::string(f.s) + "'");
  }
  return *t;
}

// A dimension of a shape: a number, or the kind of whatever stood there instead.
// One dimension as read, kept until the entry's name is known. No initializers: an entry
// holds room for kMaxDims of them, and only those read are filled (zeroing all 64 cost
// 2 KiB of stores per entry).
struct Dim {
  json::Kind kind;
  bool is_int;  // as json::Number's, which has initializers
  int64_t i;
};

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}

// The optional integrity keys of a v4 macroblock (checksum.h), as read; checked by
// apply() once the block's length is known (the keys may come in any order).
struct ChecksumKeys {
  Field algorithm, chunk_bytes;
  bool sums_present = false;
  json::Kind sums_kind = json::Kind::Array;
  std::vector<uint32_t> sums;
  size_t items = 0;
  size_t first_bad = SIZE_MAX;  // the first item that is not an integer in [0, 2^32)

  void read_sums(json::Reader& r) {
    sums_present = true;
    sums_kind = r.peek();
    if (sums_kind != json::Kind::Array) {
      r.skip();
      return;
    }
    sums.clear();
    items = 0;
    first_bad = SIZE_MAX;
    r.begin_array();
    for (bool first = true; r.next_item(first); ++items) {
      if (r.peek() == json::Kind::Number) {
        const json::Number n = r.number();
        if (n.is_int && n.i >= 0 && n.i <= 0xFFFFFFFFll) {
          sums.push_back(static_cast<uint32_t>(n.i));
          continue;
        }
      } else {
        r.skip();
      }
      first_bad = std::min(first_bad, items);
    }
  }

  // All three keys or none. Values of an algorithm we do not know are kept out of the
  // layout, so such a file still loads and only verification refuses it.
  void apply(Block& b, const std::string& path, const Where& where) {
    if (!algorithm.present && !chunk_bytes.present && !sums_present) return;
    if (!algorithm.present || !chunk_bytes.present || !sums_present) {
      bad(path, where.str() + " has only some of \"checksum\", \"checksum_chunk_bytes\" and \"checksums\" (all three "
                              "or none)");
    }
    if (algorithm.kind != json::Kind::String || algorithm.s.empty()) {
      bad(path, where.str() + ": \"checksum\" must be a non-empty string");
    }
    b.checksum = std::string(algorithm.s);
    b.checksum_chunk_bytes = count(chunk_bytes, "checksum_chunk_bytes", path, where);
    // Each chunk costs a record and a read when verifying: a tiny chunk size would turn a
    // small footer into millions of them. Writers use 16 MiB.
    if (b.checksum_chunk_bytes < kMinChecksumChunkBytes) {
      bad(path, where.str() + ": \"checksum_chunk_bytes\" is " + std::to_string(b.checksum_chunk_bytes) +
                    ", less than the smallest allowed, " + std::to_string(kMinChecksumChunkBytes));
    }
    if (sums_kind != json::Kind::Array) bad(path, where.str() + ": \"checksums\" must be an array");
    if (b.checksum != kChecksumCrc32c) return;
    const uint64_t expect = b.length_bytes / b.checksum_chunk_bytes + (b.length_bytes % b.checksum_chunk_bytes != 0);
    if (items != expect) {
      bad(path, where.str() + " has " + std::to_string(items) + " checksums but its " + std::to_string(b.length_bytes) +
                    " bytes in chunks of " + std::to_string(b.checksum_chunk_bytes) + " need " + std::to_string(expect));
    }
    if (first_bad != SIZE_MAX) {
      bad(path, where.str() + ": checksums[" + std::to_string(first_bad) + "] must be an integer from 0 to 4294967295");
    }
    b.checksums = std::move(sums);
  }
};

Block read_block(json::Reader& r, size_t k, const std::string& path) {
  const Where where{"macroblock", k, nullptr, true};
  if (r.peek() != json::Kind::Object) bad(path, where.str() + " is not an object");
  Field dtype, offset_bytes, length_bytes, length_elems;
  ChecksumKeys checksums;
  std::string_view key;
  std::string key_storage;
  r.begin_object();
  for (bool first = true; r.next_member(first, key, key_storage);) {
    if (key == "dtype") dtype.read(r);
    else if (key == "offset_bytes") offset_bytes.read(r);
    else if (key == "length_bytes") length_bytes.read(r);
    else if (key == "length_elems") length_elems.read(r);
    else if (key == "checksum") checksums.algorithm.read(r);
    else if (key == "checksum_chunk_bytes") checksums.chunk_bytes.read(r);
    else if (key == "checksums") checksums.read_sums(r);
    else r.skip();
  }
  Block b;
  b.dtype = dtype_of(dtype, "dtype", path, where);
  b.offset_bytes = count(offset_bytes, "offset_bytes", path, where);
  b.length_bytes = count(length_bytes, "length_bytes", path, where);
  b.length_elems = count(length_elems, "length_elems", path, where);
  uint64_t expect = 0;
  if (mul_overflows(b.length_elems, c10::elementSize(b.dtype), &expect) || expect != b.length_bytes) {
    bad(path, where.str() + ": length_bytes " + std::to_string(b.length_bytes) + " does not equal length_elems " +
                  std::to_string(b.length_elems) + " x " + std::to_string(c10::elementSize(b.dtype)) + " bytes");
  }
  checksums.apply(b, path, where);
  return b;
}

// "metadata" as we write it: an object of string values. Anything else there is another
// writer's use of the name, which a load ignores as it ignores any key it does not know: no
// pairs, and `ours` false (a "metadata_crc32c" then cannot match). A key named twice keeps
// its first place and its last value, as Python's json reads it.
std::vector<std::pair<std::string, std::string>> read_metadata(json::Reader& r, bool& ours) {
  std::vector<std::pair<std::string, std::string>> out;
  ours = r.peek() == json::Kind::Object;
  if (!ours) {
    r.skip();
    return out;
  }
  std::map<std::string, size_t, std::less<>> position;
  std::vector<bool> is_string;  // of each key's last value
  std::string_view key;
  std::string key_storage, value_storage;
  r.begin_object();
  for (bool first = true; r.next_member(first, key, key_storage);) {
    auto [it, added] = position.emplace(std::string(key), out.size());
    if (added) {
      out.emplace_back(std::string(key), std::string());
      is_string.push_back(false);
    }
    is_string[it->second] = r.peek() == json::Kind::String;
    if (is_string[it->second]) {
      out[it->second].second = std::string(r.string(value_storage));
    } else {
      r.skip();
    }
  }
  ours = std::all_of(is_string.begin(), is_string.end(), [](bool b) { return b; });
  if (!ours) out.clear();
  return out;
}

// Reads one index entry and checks what it says of itself; its block is checked later,
// once every block is known (the keys may come in any order).
// A missing "macroblock" means block 0, as the reference reads v3 files.
Entry read_entry(json::Reader& r, size_t k, const std::string& path) {
  if (r.peek() != json::Kind::Object) bad(path, "index entry " + std::to_string(k) + " is not an object");
  Field name, offset, length, block;
  Dim dims[kMaxDims];
  size_t ndim = 0;
  bool shape_present = false;
  json::Kind shape_kind = json::Kind::Null;
  std::string_view key;
  std::string key_storage;
  r.begin_object();
  for (bool first = true; r.next_member(first, key, key_storage);) {
    if (key == "name") {
      name.read(r);
    } else if (key == "shape") {
      shape_present = true;
      shape_kind = r.peek();
      if (shape_kind != json::Kind::Array) {
        r.skip();
        continue;
      }
      ndim = 0;
      r.begin_array();
      for (bool first_dim = true; r.next_item(first_dim); ++ndim) {
        const json::Kind kind = r.peek();
        if (ndim < kMaxDims && kind == json::Kind::Number) {
          const json::Number n = r.number();
          dims[ndim] = {kind, n.is_int, n.i};
        } else {
          if (ndim < kMaxDims) dims[ndim] = {kind, false, 0};
          r.skip();  // a bad dimension is reported below, with the entry's name
        }
      }
    } else if (key == "offset") {
      offset.read(r);
    } else if (key == "length") {
      length.read(r);
    } else if (key == "macroblock") {
      block.read(r);
    } else {
      r.skip();
    }
  }

  const Where numbered{"index entry", k, nullptr, true};
  require(name.present, "name", path, numbered);
  if (name.kind != json::Kind::String) bad(path, numbered.str() + ": \"name\" must be a string");
  Entry e;
  e.name = std::string(name.s);
  const Where where{"index entry", k, &e.name};
  require(shape_present, "shape", path, where);
  if (shape_kind != json::Kind::Array) bad(path, where.str() + ": \"shape\" must be an array");
  if (ndim > kMaxDims) {
    bad(path, where.str() + " has " + std::to_string(ndim) + " dimensions, more than " + std::to_string(kMaxDims));
  }
  uint64_t numel = 1;
  bool numel_overflow = false;
  // torch gives a contiguous tensor strides that are products of the later dimensions,
  // zeros counted as 1, and refuses any past int64 even when a zero dimension leaves the
  // tensor empty ([0, 2^62, 2^62]): so the largest stride ("span", the product of every
  // dimension but the first) is bounded too. The first dimension is in no stride:
  // [2^40, 0, 2^40] is a valid empty tensor.
  uint64_t span = 1;
  bool span_overflow = false;
  e.shape.resize(ndim);
  for (size_t d = 0; d < ndim; ++d) {
    json::Number num;
    num.is_int = dims[d].is_int;
    num.i = dims[d].i;
    const uint64_t dim = count(true, dims[d].kind, num, "shape", path, where);
    e.shape[d] = static_cast<int64_t>(dim);
    numel_overflow |= mul_overflows(numel, dim, &numel);
    if (d > 0) span_overflow |= mul_overflows(span, std::max<uint64_t>(dim, 1), &span);
  }
  e.offset = count(offset, "offset", path, where);
  e.length = count(length, "length", path, where);
  if (numel_overflow || numel != e.length) {
    bad(path, where.str() + ": the shape holds " + (numel_overflow ? std::string("more than 2^64") : std::to_string(numel)) +
                  " elements but \"length\" says " + std::to_string(e.length));
  }
  if (span_overflow || span > uint64_t(INT64_MAX)) {
    std::string text;
    for (int64_t dim : e.shape) text += (text.empty() ? "" : ", ") + std::to_string(dim);
    bad(path, where.str() + " has shape [" + text + "], too large for a tensor (its size or strides exceed 2^63 - 1)");
  }
  if (block.present) {
    const uint64_t id = count(block, "macroblock", path, where);
    e.block = static_cast<uint32_t>(std::min<uint64_t>(id, UINT32_MAX));
  }
  return e;
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

size_t first_repeated_name(const std::vector<Entry>& entries, bool hashed) {
  const size_t n = entries.size();
  if (hashed) {
    // NOTE: an open-addressing table of entry numbers, not a std::unordered_set, whose node
    // per name cost a tenth of the parse of 20,000 entries. Names made to collide (a hostile
    // file) would make the probing quadratic: past a budget the names are sorted instead.
    size_t slots = 1;
    while (slots < 2 * n) slots *= 2;
    std::vector<uint32_t> table(slots, 0);  // an entry's number + 1; 0: free
    const std::hash<std::string_view> hash;
    uint64_t budget = 16 * uint64_t(n) + 1024;
    for (size_t k = 0; k < n; ++k) {
      for (size_t slot = hash(entries[k].name) & (slots - 1);; slot = (slot + 1) & (slots - 1)) {
        if (table[slot] == 0) {
          table[slot] = static_cast<uint32_t>(k + 1);
          break;
        }
        if (entries[table[slot] - 1].name == entries[k].name) return k;
        if (--budget == 0) return first_repeated_name(entries, false);
      }
    }
    return n;
  }
  // A stable sort keeps equal names in index order: each after the first of its group repeats one.
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return entries[a].name < entries[b].name; });
  size_t first = n;
  for (size_t i = 1; i < n; ++i) {
    if (entries[order[i]].name == entries[order[i - 1]].name) first = std::min(first, order[i]);
  }
  return first;
}

namespace {

// parse_footer, or with `ahead` the blocks alone (see parse_blocks_ahead): the top level is
// read up to the index, which must come after everything the blocks need (*ready then true),
// and only the blocks are checked.
Layout parse(std::string_view footer, uint64_t payload_bytes, const std::string& path, bool ahead, bool* ready) {
  Layout layout;
  layout.payload_bytes = payload_bytes;
  Field format, align, target_dtype, total_elems, index_crc, metadata_crc;
  bool has_blocks = false, has_index = false;
  json::Kind blocks_kind = json::Kind::Array;
  std::vector<Block> blocks;
  try {
    json::Reader r(footer);
    if (r.peek() != json::Kind::Object) bad(path, "footer is not a JSON object");
    std::string_view key;
    std::string key_storage;
    r.begin_object();
    for (bool first = true; r.next_member(first, key, key_storage);) {
      if (key == "format") {
        format.read(r);
      } else if (key == "align_bytes") {
        align.read(r);
      } else if (key == "target_dtype") {
        target_dtype.read(r);
      } else if (key == "total_elems") {
        total_elems.read(r);
      } else if (key == "index_crc32c") {
        index_crc.read(r);
      } else if (key == "metadata") {
        layout.metadata = read_metadata(r, layout.metadata_is_ours);
      } else if (key == "metadata_crc32c") {
        metadata_crc.read(r);
      } else if (key == "macroblocks") {
        has_blocks = true;
        blocks_kind = r.peek();
        if (blocks_kind != json::Kind::Array) {
          r.skip();
          continue;
        }
        blocks.clear();
        r.begin_array();
        for (bool first_block = true; r.next_item(first_block);) blocks.push_back(read_block(r, blocks.size(), path));
      } else if (key == "index") {
        has_index = true;
        if (ahead) {
          *ready = format.present && format.kind == json::Kind::String &&
                   ((format.s == kFormatV4 && has_blocks) ||
                    (format.s == kFormatV3 && target_dtype.present && total_elems.present));
          break;
        }
        if (r.peek() != json::Kind::Array) bad(path, "footer: \"index\" must be an array");
        layout.entries.clear();
        // NOTE: room for as many entries as the footer could hold at some 48 bytes each (the
        // smallest a writer makes, a one-letter name and no dimensions, is about that): no
        // copies of the entries as the vector grows, and pages of the room left over are
        // never touched. Capped, so that a footer of junk reserves no more than a real index
        // of a million entries would take.
        layout.entries.reserve(std::min<size_t>(footer.size() / 48, size_t(1) << 20));
        r.begin_array();
        for (bool first_entry = true; r.next_item(first_entry);) {
          layout.entries.push_back(read_entry(r, layout.entries.size(), path));
        }
      } else {
        r.skip();
      }
    }
    if (ahead) {
      if (!*ready) return layout;
    } else {
      r.finish();
    }
  } catch (const json::SyntaxError& e) {
    bad(path, std::string("footer is not valid JSON (") + e.what() + ")");
  }

  const Where footer_where{"footer"};
  require(format.present, "format", path, footer_where);
  if (format.kind != json::Kind::String) bad(path, "footer: \"format\" must be a string");
  layout.format = std::string(format.s);
  if (align.present) layout.align_bytes = static_cast<int64_t>(count(align, "align_bytes", path, footer_where));
  if (index_crc.present) {
    const uint64_t crc = count(index_crc, "index_crc32c", path, footer_where);
    if (crc > 0xFFFFFFFFull) bad(path, "footer: \"index_crc32c\" must be an integer from 0 to 4294967295");
    layout.index_crc = static_cast<uint32_t>(crc);
  }
  if (metadata_crc.present) {
    const uint64_t crc = count(metadata_crc, "metadata_crc32c", path, footer_where);
    if (crc > 0xFFFFFFFFull) bad(path, "footer: \"metadata_crc32c\" must be an integer from 0 to 4294967295");
    layout.metadata_crc = static_cast<uint32_t>(crc);
  }

  if (layout.format == kFormatV3) {
    Block b;
    b.dtype = dtype_of(target_dtype, "target_dtype", path, footer_where);
    b.offset_bytes = 0;
    b.length_elems = count(total_elems, "total_elems", path, footer_where);
    if (mul_overflows(b.length_elems, c10::elementSize(b.dtype), &b.length_bytes)) {
      bad(path, "footer: total_elems " + std::to_string(b.length_elems) + " overflows when counted in bytes");
    }
    layout.blocks.push_back(b);
  } else if (layout.format == kFormatV4) {
    if (!has_blocks) bad(path, "footer has no \"macroblocks\" field");
    if (blocks_kind != json::Kind::Array) bad(path, "footer: \"macroblocks\" must be an array");
    layout.blocks = std::move(blocks);
  } else {
    bad(path, "unknown format '" + layout.format + "' (expected " + kFormatV3 + " or " + kFormatV4 + ")");
  }
  if (!has_index) bad(path, "footer has no \"index\" field");

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
      bad(path, where + " ends past the payload end " + std::to_string(payload_bytes) + " (offset_bytes " +
                    std::to_string(b.offset_bytes) + " + length_bytes " + std::to_string(b.length_bytes) +
                    "); the file is truncated or the footer is wrong");
    }
  }

  // Writers lay the blocks one after another. Blocks that share bytes would make a copying
  // load allocate the shared bytes once per block: a small file listing the same range a
  // thousand times could ask for a thousand times its size.
  std::vector<size_t> by_offset;
  for (size_t k = 0; k < layout.blocks.size(); ++k) {
    if (layout.blocks[k].length_bytes > 0) by_offset.push_back(k);
  }
  std::sort(by_offset.begin(), by_offset.end(), [&](size_t a, size_t b) {
    return layout.blocks[a].offset_bytes < layout.blocks[b].offset_bytes;
  });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const Block& prev = layout.blocks[by_offset[i - 1]];
    const Block& next = layout.blocks[by_offset[i]];
    if (prev.offset_bytes + prev.length_bytes > next.offset_bytes) {
      bad(path, "macroblocks " + std::to_string(by_offset[i - 1]) + " and " + std::to_string(by_offset[i]) +
                    " overlap (bytes " + std::to_string(prev.offset_bytes) + "-" +
                    std::to_string(prev.offset_bytes + prev.length_bytes) + " and " +
                    std::to_string(next.offset_bytes) + "-" + std::to_string(next.offset_bytes + next.length_bytes) +
                    "); the footer is corrupt");
    }
  }

  for (size_t k = 0; k < layout.entries.size(); ++k) {
    const Entry& e = layout.entries[k];
    const Where where{"index entry", k, &e.name};
    if (e.block >= layout.blocks.size()) {
      bad(path, where.str() + " refers to macroblock " + std::to_string(e.block) + " but the file has " +
                    std::to_string(layout.blocks.size()));
    }
    const Block& b = layout.blocks[e.block];
    uint64_t end = 0;
    if (__builtin_add_overflow(e.offset, e.length, &end) || end > b.length_elems) {
      bad(path, where.str() + " ends at element " + (end < e.offset ? std::string("past 2^64") : std::to_string(end)) +
                    ", past the end of macroblock " + std::to_string(e.block) + " (" + std::to_string(b.length_elems) +
                    " elements)");
    }
  }
  const size_t repeat = first_repeated_name(layout.entries);
  if (repeat < layout.entries.size()) {
    bad(path, Where{"index entry", repeat, &layout.entries[repeat].name}.str() + " appears twice in the index");
  }
  return layout;
}

}  // namespace

Layout parse_footer(std::string_view footer, uint64_t payload_bytes, const std::string& path) {
  return parse(footer, payload_bytes, path, false, nullptr);
}

std::optional<Layout> parse_blocks_ahead(std::string_view footer, uint64_t payload_bytes, const std::string& path) {
  try {
    bool ready = false;
    Layout layout = parse(footer, payload_bytes, path, true, &ready);
    if (ready) return layout;
  } catch (const std::exception&) {
    // parse_footer says what is wrong, as for any load.
  }
  return std::nullopt;
}

bool same_blocks(const Layout& a, const Layout& b) {
  return a.blocks.size() == b.blocks.size() &&
         std::equal(a.blocks.begin(), a.blocks.end(), b.blocks.begin(), [](const Block& x, const Block& y) {
           return x.dtype == y.dtype && x.offset_bytes == y.offset_bytes && x.length_bytes == y.length_bytes &&
                  x.length_elems == y.length_elems;
         });
}

namespace {

// What a file that is not ours looks like, for the error: the checkpoints people convert.
std::string other_format(int fd, uint64_t file_size, const std::string& path) {
  unsigned char head[9];
  if (file_size < sizeof(head)) return "";
  pread_exact(fd, head, sizeof(head), 0, path);
  const std::string convert = "; convert it with `flashpack convert`";
  if (std::memcmp(head, "PK\x03\x04", 4) == 0) return "; it looks like a torch.save file (a zip archive)" + convert;
  uint64_t header_len = 0;  // safetensors: u64 LE header length, then the JSON header
  for (int k = 7; k >= 0; --k) header_len = (header_len << 8) | head[k];
  if (head[8] == '{' && header_len <= file_size - 8) return "; it looks like a safetensors file" + convert;
  return "";
}

}  // namespace

Footer read_footer_text(int fd, uint64_t file_size, const std::string& path) {
  if (file_size < kTrailerBytes) {
    bad(path, "file is " + std::to_string(file_size) + " bytes, too small to be a flashpack file (the trailer alone is 16)");
  }
  unsigned char trailer[kTrailerBytes];
  pread_exact(fd, trailer, kTrailerBytes, file_size - kTrailerBytes, path);
  if (std::memcmp(trailer + 8, kMagic, 8) != 0) {
    bad(path, "not a flashpack file (the last 8 bytes are not the magic \"FLASHPK\\0\")" +
                  other_format(fd, file_size, path));
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
  Footer footer;
  footer.payload_bytes = file_size - kTrailerBytes - footer_len;
  footer.text.resize(footer_len);
  pread_exact(fd, footer.text.data(), footer_len, footer.payload_bytes, path);
  return footer;
}

Layout read_layout(int fd, uint64_t file_size, const std::string& path, std::string* raw_footer) {
  Footer footer = read_footer_text(fd, file_size, path);
  Layout layout = parse_footer(footer.text, footer.payload_bytes, path);
  if (raw_footer != nullptr) *raw_footer = std::move(footer.text);
  return layout;
}

std::string index_text(const Layout& layout) {
  std::string out;
  for (const Block& b : layout.blocks) {
    out += std::string(dtype_name(b.dtype)) + " " + std::to_string(b.offset_bytes) + " " +
           std::to_string(b.length_bytes) + " " + std::to_string(b.length_elems) + "\n";
  }
  for (const Entry& e : layout.entries) {
    out += std::to_string(e.name.size()) + ":" + e.name + " [";
    for (int64_t dim : e.shape) out += std::to_string(dim) + ",";
    out += "] " + std::to_string(e.offset) + " " + std::to_string(e.length) + " " + std::to_string(e.block) + "\n";
  }
  return out;
}

std::string metadata_text(const Layout& layout) {
  std::string out;
  for (const auto& [key, value] : layout.metadata) {
    out += std::to_string(key.size()) + ":" + key + " " + std::to_string(value.size()) + ":" + value + "\n";
  }
  return out;
}

std::vector<size_t> tie_firsts(const Layout& layout) {
  // After a stable sort by position, each entry equal to its predecessor takes the first
  // (lowest-index) entry of its group: O(n log n), for indexes of 100,000 entries.
  const auto& entries = layout.entries;
  const auto position = [&](size_t k) { return std::tie(entries[k].block, entries[k].offset, entries[k].length); };
  std::vector<size_t> order(entries.size());
  std::iota(order.begin(), order.end(), size_t{0});
  // Writers lay entries out in index order: then there is nothing to sort.
  const auto before = [&](size_t a, size_t b) { return position(a) < position(b); };
  if (!std::is_sorted(order.begin(), order.end(), before)) std::stable_sort(order.begin(), order.end(), before);
  std::vector<size_t> first(entries.size());
  std::iota(first.begin(), first.end(), size_t{0});
  for (size_t i = 1; i < order.size(); ++i) {
    if (entries[order[i]].length > 0 && position(order[i]) == position(order[i - 1])) {
      first[order[i]] = first[order[i - 1]];
    }
  }
  return first;
}

std::optional<std::pair<size_t, size_t>> partial_overlap(const Layout& layout) {
  const auto& entries = layout.entries;
  const auto position = [&](size_t k) { return std::tie(entries[k].block, entries[k].offset, entries[k].length); };
  std::vector<size_t> order;
  for (size_t k = 0; k < entries.size(); ++k) {
    if (entries[k].length > 0) order.push_back(k);
  }
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return position(a) < position(b); });
  // reach: of the entries so far in this block, the one that ends last.
  size_t reach = 0;
  for (size_t i = 0; i < order.size(); ++i) {
    const Entry& e = entries[order[i]];
    if (i > 0 && e.block == entries[reach].block && e.offset < entries[reach].offset + entries[reach].length &&
        position(order[i]) != position(reach)) {
      return std::make_pair(std::min(reach, order[i]), std::max(reach, order[i]));
    }
    if (i == 0 || e.block != entries[reach].block ||
        e.offset + e.length > entries[reach].offset + entries[reach].length) {
      reach = order[i];
    }
  }
  return std::nullopt;
}

Layout select_entries(const Layout& layout, const std::vector<std::string>& names, const std::string& path) {
  const std::unordered_set<std::string> wanted(names.begin(), names.end());
  std::unordered_set<std::string> found;
  std::vector<size_t> chosen;
  for (size_t k = 0; k < layout.entries.size(); ++k) {
    if (wanted.count(layout.entries[k].name)) {
      chosen.push_back(k);
      found.insert(layout.entries[k].name);
    }
  }
  if (found.size() < wanted.size()) {
    // In the order asked for, each once: a set, not a search of the list, which a load of
    // 100,000 names from another model's index made quadratic (minutes before the error).
    std::vector<std::string> missing;
    std::unordered_set<std::string_view> listed_once;
    for (const std::string& name : names) {
      if (!found.count(name) && listed_once.insert(name).second) missing.push_back(name);
    }
    std::string listed;
    for (size_t k = 0; k < missing.size() && k < 5; ++k) listed += (k ? ", '" : "'") + missing[k] + "'";
    if (missing.size() > 5) listed += " and " + std::to_string(missing.size() - 5) + " more";
    // torch.ops.flashpack.load(path, device, names="embed.weight") takes the str as a list of
    // its characters: say so, rather than leave the user puzzling over 'e', 'm', 'b'...
    // The entry the str spells, or a run of several such characters missing.
    bool characters = names.size() > 1 && std::all_of(names.begin(), names.end(),
                                                      [](const std::string& n) { return n.size() == 1; });
    if (characters && missing.size() < 2) {
      const std::string spelled = std::accumulate(names.begin(), names.end(), std::string());
      characters = std::any_of(layout.entries.begin(), layout.entries.end(),
                               [&](const Entry& e) { return e.name == spelled; });
    }
    throw std::invalid_argument("'" + path + "' has no entr" + (missing.size() == 1 ? "y " : "ies ") + listed +
                                " (of the names asked for" +
                                (characters ? "; a str passed as names is taken as a list of its characters: "
                                              "pass a list of names)"
                                            : ")"));
  }

  Layout out;
  out.format = layout.format;
  out.align_bytes = layout.align_bytes;
  out.payload_bytes = layout.payload_bytes;
  out.metadata = layout.metadata;
  out.metadata_is_ours = layout.metadata_is_ours;
  out.entries.reserve(chosen.size());
  // Per block, the chosen entries by position; each run of close ones becomes a block.
  std::vector<size_t> order = chosen;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const Entry& x = layout.entries[a];
    const Entry& y = layout.entries[b];
    return std::tie(x.block, x.offset) < std::tie(y.block, y.offset);
  });
  std::vector<uint32_t> block_of(layout.entries.size());
  std::vector<uint64_t> start_of(layout.entries.size());
  for (size_t i = 0; i < order.size();) {
    const Entry& head = layout.entries[order[i]];
    const Block& src = layout.blocks[head.block];
    const uint64_t esize = c10::elementSize(src.dtype);
    const uint64_t gap = std::max<uint64_t>(1, kSelectGapBytes / esize);
    const uint64_t begin = head.offset;
    uint64_t end = head.offset + head.length;
    size_t j = i;
    for (; j < order.size(); ++j) {
      const Entry& e = layout.entries[order[j]];
      if (e.block != head.block || e.offset > end + gap) break;
      end = std::max(end, e.offset + e.length);
      block_of[order[j]] = static_cast<uint32_t>(out.blocks.size());
      start_of[order[j]] = begin;
    }
    Block b;
    b.dtype = src.dtype;
    b.offset_bytes = src.offset_bytes + begin * esize;
    b.length_elems = end - begin;
    b.length_bytes = b.length_elems * esize;
    out.blocks.push_back(std::move(b));
    i = j;
  }
  for (size_t k : chosen) {
    Entry e = layout.entries[k];
    e.offset -= start_of[k];
    e.block = block_of[k];
    out.entries.push_back(std::move(e));
  }
  return out;
}

std::string layout_signature(const Layout& layout) {
  std::string out;
  const std::vector<size_t> first = tie_firsts(layout);
  for (size_t k = 0; k < layout.entries.size(); ++k) {
    const Entry& e = layout.entries[k];
    // Length-prefixed, so that no name can run into the next field.
    out += std::to_string(e.name.size()) + ":" + e.name + " " + dtype_name(layout.blocks[e.block].dtype) + " [";
    for (int64_t dim : e.shape) out += std::to_string(dim) + ",";
    out += "] " + std::to_string(first[k]) + "\n";
  }
  return out;
}

std::string footer_json(const Layout& layout) {
  std::string out;
  out.reserve(128 + layout.blocks.size() * 128 + layout.entries.size() * 96);
  uint64_t total_elems = 0;
  for (const Block& b : layout.blocks) total_elems += b.length_elems;
  out += "{\"format\":\"flashpack_v4\",\"align_bytes\":" + std::to_string(layout.align_bytes);
  out += ",\"total_payload_bytes\":" + std::to_string(layout.payload_bytes);
  out += ",\"total_elems\":" + std::to_string(total_elems);
  if (layout.index_crc) out += ",\"index_crc32c\":" + std::to_string(*layout.index_crc);
  if (!layout.metadata.empty()) {
    out += ",\"metadata\":{";
    for (size_t k = 0; k < layout.metadata.size(); ++k) {
      if (k) out += ',';
      json::append_quoted(out, layout.metadata[k].first);
      out += ':';
      json::append_quoted(out, layout.metadata[k].second);
    }
    out += '}';
    if (layout.metadata_crc) out += ",\"metadata_crc32c\":" + std::to_string(*layout.metadata_crc);
  }
  out += ",\"macroblocks\":[";
  for (size_t k = 0; k < layout.blocks.size(); ++k) {
    const Block& b = layout.blocks[k];
    if (k) out += ',';
    out += "{\"dtype\":\"";
    out += dtype_name(b.dtype);
    out += "\",\"offset_bytes\":" + std::to_string(b.offset_bytes) + ",\"length_bytes\":" +
           std::to_string(b.length_bytes) + ",\"length_elems\":" + std::to_string(b.length_elems);
    if (!b.checksum.empty()) {
      out += ",\"checksum\":";
      json::append_quoted(out, b.checksum);
      out += ",\"checksum_chunk_bytes\":" + std::to_string(b.checksum_chunk_bytes) + ",\"checksums\":[";
      for (size_t i = 0; i < b.checksums.size(); ++i) {
        if (i) out += ',';
        out += std::to_string(b.checksums[i]);
      }
      out += ']';
    }
    out += '}';
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
      e.shape.assign(r.shape.begin(), r.shape.end());
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
