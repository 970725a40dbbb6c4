// libFuzzer target: the footer parser (csrc/json.cpp, csrc/format.cpp parse_footer).
//
// Any input must either be rejected with std::invalid_argument or give a layout whose
// every block and entry lies inside the payload; an accepted layout must also survive
// footer_json() -> parse_footer() unchanged, so the writer never emits a footer the
// reader refuses or reads differently.
#include "check_error.h"
#include "format.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string_view>

namespace {

// NOTE: a large, fixed payload lets block and entry bounds pass often enough for the
// fuzzer to reach the index checks; the whole-file target covers small payloads.
constexpr uint64_t kPayloadBytes = uint64_t(1) << 40;

using flashpack_fuzz::broken;

void check_inside(const flashpack::Layout& l) {
  for (const auto& b : l.blocks) {
    if (b.offset_bytes + b.length_bytes > l.payload_bytes || b.offset_bytes + b.length_bytes < b.offset_bytes) {
      broken("a block ends past the payload");
    }
    if (b.length_elems * c10::elementSize(b.dtype) != b.length_bytes) broken("block bytes != elems x element size");
  }
  for (const auto& e : l.entries) {
    if (e.block >= l.blocks.size()) broken("an entry refers to a missing block");
    if (e.offset + e.length > l.blocks[e.block].length_elems || e.offset + e.length < e.offset) {
      broken("an entry ends past its block");
    }
    // The shape must make a tensor: its element count and its contiguous strides
    // (products of later dimensions, zeros counted as 1: the first dimension is in none)
    // fit in int64.
    uint64_t numel = 1;
    uint64_t span = 1;
    for (size_t k = 0; k < e.shape.size(); ++k) {
      const int64_t d = e.shape[k];
      if (d < 0) broken("a negative dimension");
      if (k > 0 && __builtin_mul_overflow(span, std::max<uint64_t>(d, 1), &span)) {
        broken("a shape whose strides overflow");
      }
      numel *= static_cast<uint64_t>(d);
    }
    if (span > uint64_t(INT64_MAX)) broken("a shape whose strides overflow int64");
    if (numel != e.length) broken("shape and length disagree");
  }
}

bool same(const flashpack::Layout& a, const flashpack::Layout& b) {
  if (a.align_bytes != b.align_bytes || a.blocks.size() != b.blocks.size() || a.entries.size() != b.entries.size()) {
    return false;
  }
  for (size_t k = 0; k < a.blocks.size(); ++k) {
    const auto &x = a.blocks[k], &y = b.blocks[k];
    if (x.dtype != y.dtype || x.offset_bytes != y.offset_bytes || x.length_bytes != y.length_bytes ||
        x.length_elems != y.length_elems) {
      return false;
    }
  }
  for (size_t k = 0; k < a.entries.size(); ++k) {
    const auto &x = a.entries[k], &y = b.entries[k];
    if (x.name != y.name || x.shape != y.shape || x.offset != y.offset || x.length != y.length || x.block != y.block) {
      return false;
    }
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view footer(reinterpret_cast<const char*>(data), size);
  // The blocks a load moves before it has read the index: checked as parse_footer checks
  // them, whatever else the footer holds (it may still refuse the rest).
  const std::optional<flashpack::Layout> ahead = flashpack::parse_blocks_ahead(footer, kPayloadBytes, "fuzz.flashpack");
  if (ahead) {
    if (!ahead->entries.empty()) broken("the blocks read ahead came with entries");
    check_inside(*ahead);
  }
  flashpack::Layout layout;
  try {
    layout = flashpack::parse_footer(footer, kPayloadBytes, "fuzz.flashpack");
  } catch (const std::invalid_argument& e) {
    flashpack_fuzz::check_error(e.what(), "'fuzz.flashpack'");
    return 0;
  }
  check_inside(layout);
  // Repeated names: the hashed check (the one parse_footer ran) and the sorted one agree,
  // here where there are none and with one made from the input's last bytes.
  const size_t n = layout.entries.size();
  if (flashpack::first_repeated_name(layout.entries, false) != n) broken("a name the parser let through twice");
  if (n >= 2) {
    const size_t from = data[size - 1] % n, to = data[size - 2] % n;
    flashpack::Layout twice = layout;
    twice.entries[to].name = twice.entries[from].name;
    const size_t hashed = flashpack::first_repeated_name(twice.entries);
    if (hashed != flashpack::first_repeated_name(twice.entries, false)) broken("the two repeated-name checks disagree");
    if (from != to && hashed != std::max(from, to)) broken("the repeated name found is not the later entry");
  }
  (void)flashpack::layout_signature(layout);  // what a compiled load compares: any valid layout has one
  const std::string rewritten = flashpack::footer_json(layout);
  flashpack::Layout again;
  try {
    again = flashpack::parse_footer(rewritten, kPayloadBytes, "fuzz.flashpack");
  } catch (const std::invalid_argument& e) {
    broken(std::string("footer_json wrote a footer that parse_footer rejects: ") + e.what());
  }
  if (!same(layout, again)) broken("footer_json -> parse_footer changed the layout");
  return 0;
}
