#include "checksum.h"

#include "io.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define FLASHPACK_CRC32C_X86 1
#endif

namespace flashpack {

namespace {

// CRC-32C in the bit-reflected form: bit 31 of a register is the coefficient of x^0.
constexpr uint32_t kPoly = 0x82F63B78u;

// a * b modulo the polynomial, both reflected.
uint32_t mul_mod(uint32_t a, uint32_t b) {
  uint32_t p = 0;
  for (uint32_t m = 1u << 31; m != 0; m >>= 1) {
    if (a & m) p ^= b;
    b = (b & 1) ? (b >> 1) ^ kPoly : b >> 1;
  }
  return p;
}

// Byte k of a register, multiplied by a fixed polynomial, as four 256-entry tables: the
// product is linear in the register, so four lookups replace a 32-step multiplication.
struct MulTable {
  uint32_t t[4][256];
  void init(uint32_t factor) {
    for (int k = 0; k < 4; ++k) {
      for (uint32_t i = 0; i < 256; ++i) t[k][i] = mul_mod(factor, i << (8 * k));
    }
  }
  uint32_t operator()(uint32_t c) const {
    return t[0][c & 0xFF] ^ t[1][(c >> 8) & 0xFF] ^ t[2][(c >> 16) & 0xFF] ^ t[3][c >> 24];
  }
};

// NOTE: the crc32 instruction has a latency of 3 cycles and a throughput of 1, so one
// dependency chain runs at a third of its speed. Three independent 4 KiB stripes run side by
// side and are merged with two table lookups each; the merge costs ~2% at this stripe size.
constexpr size_t kStripe = 4096;

struct Tables {
  uint32_t bytes[8][256];     // slicing-by-8, for the portable path
  uint32_t x_pow2[68];        // x^(2^k) mod P, for shifting by any number of bytes
  MulTable shift_stripe;      // x^(8 * kStripe)
  MulTable shift_two_stripes; // x^(16 * kStripe)
  bool hardware = false;

  Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
      bytes[0][i] = c;
    }
    for (int k = 1; k < 8; ++k) {
      for (uint32_t i = 0; i < 256; ++i) bytes[k][i] = (bytes[k - 1][i] >> 8) ^ bytes[0][bytes[k - 1][i] & 0xFF];
    }
    x_pow2[0] = 1u << 30;  // x^1
    for (int k = 1; k < 68; ++k) x_pow2[k] = mul_mod(x_pow2[k - 1], x_pow2[k - 1]);
    shift_stripe.init(x_pow_bytes(kStripe));
    shift_two_stripes.init(x_pow_bytes(2 * kStripe));
#ifdef FLASHPACK_CRC32C_X86
    const char* portable = std::getenv("FLASHPACK_CRC32C_PORTABLE");
    hardware = __builtin_cpu_supports("sse4.2") && !(portable != nullptr && std::strcmp(portable, "1") == 0);
#endif
  }

  // x^(8n) mod P: the factor that moves a register past n zero bytes.
  uint32_t x_pow_bytes(uint64_t n) const {
    uint32_t p = 1u << 31;  // x^0
    for (int k = 3; n != 0; n >>= 1, ++k) {
      if (n & 1) p = mul_mod(x_pow2[k], p);
    }
    return p;
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

uint64_t load_u64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;  // little-endian, as both the table and the instruction expect
}

uint32_t crc_portable(const Tables& t, uint32_t crc, const unsigned char* p, size_t n) {
  while (n >= 8) {
    const uint64_t v = load_u64(p) ^ crc;
    crc = t.bytes[7][v & 0xFF] ^ t.bytes[6][(v >> 8) & 0xFF] ^ t.bytes[5][(v >> 16) & 0xFF] ^
          t.bytes[4][(v >> 24) & 0xFF] ^ t.bytes[3][(v >> 32) & 0xFF] ^ t.bytes[2][(v >> 40) & 0xFF] ^
          t.bytes[1][(v >> 48) & 0xFF] ^ t.bytes[0][v >> 56];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) crc = (crc >> 8) ^ t.bytes[0][(crc ^ *p++) & 0xFF];
  return crc;
}

#ifdef FLASHPACK_CRC32C_X86
__attribute__((target("sse4.2"))) uint32_t crc_sse42(const Tables& t, uint32_t crc, const unsigned char* p, size_t n) {
  uint64_t c0 = crc;
  while (n >= 3 * kStripe) {
    uint64_t c1 = 0, c2 = 0;
    for (size_t i = 0; i < kStripe; i += 8) {
      c0 = _mm_crc32_u64(c0, load_u64(p + i));
      c1 = _mm_crc32_u64(c1, load_u64(p + kStripe + i));
      c2 = _mm_crc32_u64(c2, load_u64(p + 2 * kStripe + i));
    }
    // The register is linear: running A, B, C from c0 equals c0 run through A then shifted
    // past B and C, plus B's register (from zero) shifted past C, plus C's.
    c0 = t.shift_two_stripes(static_cast<uint32_t>(c0)) ^ t.shift_stripe(static_cast<uint32_t>(c1)) ^
         static_cast<uint32_t>(c2);
    p += 3 * kStripe;
    n -= 3 * kStripe;
  }
  for (; n >= 8; p += 8, n -= 8) c0 = _mm_crc32_u64(c0, load_u64(p));
  uint32_t c = static_cast<uint32_t>(c0);
  while (n-- > 0) c = _mm_crc32_u8(c, *p++);
  return c;
}
#endif

std::string hex32(uint32_t v) {
  char buf[11];
  std::snprintf(buf, sizeof(buf), "0x%08x", v);
  return buf;
}

std::string block_where(const Layout& layout, size_t k) {
  return "macroblock " + std::to_string(k) + " (" + dtype_name(layout.blocks[k].dtype) + ")";
}

// A part of the footer (index_text, metadata_text) against the CRC-32C stored for it.
void check_footer_crc(const std::string& path, const std::string& text, uint32_t expected, const char* what) {
  const uint32_t crc = crc32c(text.data(), text.size());
  if (crc == expected) return;
  char buf[64];
  std::snprintf(buf, sizeof(buf), "crc32c 0x%08x, expected 0x%08x", crc, expected);
  throw std::invalid_argument("'" + path + "': " + what + " does not match its checksum (" + buf +
                              "): the footer is damaged; restore or re-save the file");
}

}  // namespace

uint32_t crc32c_update(uint32_t crc, const void* data, size_t n) {
  const Tables& t = tables();
  const auto* p = static_cast<const unsigned char*>(data);
#ifdef FLASHPACK_CRC32C_X86
  if (t.hardware) return crc_sse42(t, crc, p, n);
#endif
  return crc_portable(t, crc, p, n);
}

uint32_t crc32c_extend_zeros(uint32_t crc, uint64_t n) {
  if (crc == 0 || n == 0) return crc;
  const Tables& t = tables();
  return mul_mod(t.x_pow_bytes(n), crc);
}

ChecksumBuilder::ChecksumBuilder(const Layout& layout, uint64_t chunk_bytes) : chunk_bytes_(chunk_bytes) {
  size_t total = 0;
  for (const Block& b : layout.blocks) {
    block_bytes_.push_back(b.length_bytes);
    first_chunk_.push_back(total);
    total += (b.length_bytes + chunk_bytes - 1) / chunk_bytes;
  }
  acc_ = std::make_unique<std::atomic<uint32_t>[]>(total);
  // Each chunk's register starts at ~0 (the standard initial value), carried through the
  // whole chunk as if every byte were zero; the pieces' contributions are XORed in later.
  for (size_t k = 0; k < block_bytes_.size(); ++k) {
    for (uint64_t begin = 0; begin < block_bytes_[k]; begin += chunk_bytes_) {
      const uint64_t len = std::min(chunk_bytes_, block_bytes_[k] - begin);
      acc_[first_chunk_[k] + begin / chunk_bytes_].store(crc32c_extend_zeros(~0u, len), std::memory_order_relaxed);
    }
  }
}

void ChecksumBuilder::add(uint32_t block, uint64_t offset, const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  while (n > 0) {
    const uint64_t chunk = offset / chunk_bytes_;
    const uint64_t chunk_end = std::min((chunk + 1) * chunk_bytes_, block_bytes_[block]);
    const size_t take = static_cast<size_t>(std::min<uint64_t>(n, chunk_end - offset));
    // A piece's register from zero, moved past the rest of its chunk, is its exact share of
    // the chunk's register: XOR makes the order in which threads add pieces irrelevant.
    const uint32_t share = crc32c_extend_zeros(crc32c_update(0, p, take), chunk_end - offset - take);
    acc_[first_chunk_[block] + chunk].fetch_xor(share, std::memory_order_relaxed);
    p += take;
    offset += take;
    n -= take;
  }
}

void ChecksumBuilder::store(Layout& layout, bool placeholder) const {
  for (size_t k = 0; k < layout.blocks.size(); ++k) {
    Block& b = layout.blocks[k];
    b.checksum = kChecksumCrc32c;
    b.checksum_chunk_bytes = chunk_bytes_;
    const size_t count = (block_bytes_[k] + chunk_bytes_ - 1) / chunk_bytes_;
    b.checksums.resize(count);
    for (size_t i = 0; i < count; ++i) {
      b.checksums[i] = placeholder ? 0xFFFFFFFFu : ~acc_[first_chunk_[k] + i].load(std::memory_order_relaxed);
    }
  }
}

Verifier::Verifier(const std::string& path, const Layout& layout) : path_(path), layout_(layout) {
  bool any = false;
  for (const Block& b : layout.blocks) any |= !b.checksum.empty();
  if (!layout.blocks.empty() && !any) {
    throw std::invalid_argument("'" + path + "': nothing to verify: no checksums were stored in this " + layout.format +
                                " file; save it with checksum=True");
  }
  for (size_t k = 0; k < layout.blocks.size(); ++k) {
    const Block& b = layout.blocks[k];
    if (b.checksum.empty()) {
      throw std::invalid_argument("'" + path + "': " + block_where(layout, k) +
                                  " has no checksums while other blocks do; the footer was edited, save the "
                                  "file again with checksum=True");
    }
    if (b.checksum != kChecksumCrc32c) {
      throw std::invalid_argument("'" + path + "': " + block_where(layout, k) + " uses checksum algorithm '" +
                                  b.checksum + "', which this version of flashpack_ops cannot check (it knows " +
                                  kChecksumCrc32c + ")");
    }
    for (size_t i = 0; i < b.checksums.size(); ++i) {
      const uint64_t begin = i * b.checksum_chunk_bytes;
      chunks_.push_back({static_cast<uint32_t>(k), static_cast<uint32_t>(i), b.offset_bytes + begin,
                         std::min(b.checksum_chunk_bytes, b.length_bytes - begin)});
    }
  }
  // The blocks' checksums say the bytes are intact, not that the footer still points at the
  // right ones: a flipped bit in a name, an offset or a "macroblock" key loads other bytes
  // (or the right bytes under another name) with every block checksum passing.
  if (layout.blocks.empty()) return;
  if (!layout.index_crc) {
    throw std::invalid_argument("'" + path + "': the footer has checksums of its blocks but none of its index "
                                "(\"index_crc32c\"): it was damaged, or written before flashpack_ops checked the "
                                "index; save the file again with checksum=True");
  }
  check_footer_crc(path, index_text(layout), *layout.index_crc, "the index (tensor names, shapes and offsets)");
  if (layout.metadata_crc) {
    // Only our save writes "metadata_crc32c", and only beside string pairs.
    if (!layout.metadata_is_ours || layout.metadata.empty()) {
      throw std::invalid_argument("'" + path + "': the footer has a checksum of its metadata (\"metadata_crc32c\") but " +
                                  (layout.metadata_is_ours ? "no \"metadata\"" : "its \"metadata\" is not string pairs") +
                                  ": the footer is damaged; restore or re-save the file");
    }
    check_footer_crc(path, metadata_text(layout), *layout.metadata_crc, "the metadata");
  }
}

void Verifier::check(size_t k, uint32_t crc) {
  const Chunk& c = chunks_[k];
  if (crc == layout_.blocks[c.block].checksums[c.index]) return;
  std::lock_guard<std::mutex> lock(mutex_);
  bad_.push_back({k, crc});
}

void Verifier::finish() {
  if (bad_.empty()) return;
  const Bad first = *std::min_element(bad_.begin(), bad_.end(), [](const Bad& a, const Bad& b) { return a.chunk < b.chunk; });
  const Chunk& c = chunks_[first.chunk];
  const Block& b = layout_.blocks[c.block];
  std::string msg = "'" + path_ + "': checksum mismatch in " + block_where(layout_, c.block) + ": file bytes [" +
                    std::to_string(c.offset) + ", " + std::to_string(c.offset + c.bytes) + ") (chunk " +
                    std::to_string(c.index) + " of the block) have crc32c " + hex32(first.computed) +
                    " but the footer says " + hex32(b.checksums[c.index]);
  // The tensors a user would lose: those whose bytes overlap the range.
  const uint64_t esize = c10::elementSize(b.dtype);
  const uint64_t lo = c.offset - b.offset_bytes;
  const uint64_t hi = lo + c.bytes;
  std::vector<std::string> names;
  size_t overlapping = 0;
  for (const Entry& e : layout_.entries) {
    if (e.block != c.block || e.length == 0) continue;
    if (e.offset * esize < hi && (e.offset + e.length) * esize > lo) {
      if (names.size() < 3) names.push_back("'" + e.name + "'");
      ++overlapping;
    }
  }
  if (!names.empty()) {
    msg += "; the range holds ";
    for (size_t i = 0; i < names.size(); ++i) msg += (i ? ", " : "") + names[i];
    if (overlapping > names.size()) msg += " and " + std::to_string(overlapping - names.size()) + " more";
  }
  if (bad_.size() > 1) msg += "; " + std::to_string(bad_.size()) + " of " + std::to_string(chunks_.size()) + " chunks differ";
  msg += ". The file is corrupt: restore or re-save it";
  throw std::invalid_argument(msg);
}

void verify_file(const std::string& path, int threads) {
  InputFile file(path);
  verify_file(file, threads);
}

void verify_file(const InputFile& file, int threads) {
  verify_file(file, read_layout(file.fd(), file.size(), file.path()), threads);
}

void verify_file(const InputFile& file, const Layout& layout, int threads) {
  const std::string& path = file.path();
  Verifier v(path, layout);
  // Each thread reads its chunk slice by slice into one small buffer: the bytes are needed
  // only for the checksum, and mapping the file would pay a page fault per 4 KiB instead.
  parallel_for(v.chunks().size(), threads, [&](size_t k) {
    const Verifier::Chunk& c = v.chunks()[k];
    std::unique_ptr<char[]> buf(new char[std::min(kChecksumSliceBytes, c.bytes)]);
    uint32_t reg = ~0u;
    for (uint64_t done = 0; done < c.bytes;) {
      const uint64_t n = std::min(kChecksumSliceBytes, c.bytes - done);
      pread_exact(file.fd(), buf.get(), n, c.offset + done, path);
      reg = crc32c_update(reg, buf.get(), n);
      done += n;
    }
    v.check(k, ~reg);
  });
  v.finish();
}

}  // namespace flashpack
