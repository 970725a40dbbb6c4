// Integrity: CRC-32C checksums over fixed-size chunks of every block, kept in the footer.
//
// A v4 macroblock may carry three extra keys (the reference ignores keys it does not know):
//   "checksum": "crc32c", "checksum_chunk_bytes": C, "checksums": [u32, ...]
// checksums[i] is the standard CRC-32C (Castagnoli, as in iSCSI and ext4) of block bytes
// [i*C, min((i+1)*C, length_bytes)); a block of n bytes has ceil(n / C) of them. parse_footer
// (format.cpp) validates the keys; this file computes and checks the values. With them, the
// footer's top level has "index_crc32c": the CRC-32C of index_text() (format.h), so that a
// damaged index cannot point intact blocks at the wrong tensors, and, where the file has
// metadata, "metadata_crc32c": the CRC-32C of metadata_text().
#pragma once

#include "format.h"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace flashpack {

class InputFile;

// NOTE: 16 MiB chunks give a 1 GB file 60 independent checks to spread over the threads and
// cost about 11 footer bytes per chunk (70 KB for a 100 GB file); smaller chunks would only
// locate a corruption more finely.
inline constexpr uint64_t kChecksumChunkBytes = uint64_t(16) << 20;

// The CRC-32C register after feeding `n` bytes to it, without the initial and final
// inversions of the standard CRC: crc32c(d) == ~crc32c_update(~0u, d). Uses the SSE4.2
// crc32 instruction where the CPU has it (set FLASHPACK_CRC32C_PORTABLE=1 to force the
// table-driven code, which gives the same values).
uint32_t crc32c_update(uint32_t crc, const void* data, size_t n);

// The standard CRC-32C of a buffer: crc32c("123456789", 9) == 0xE3069283.
inline uint32_t crc32c(const void* data, size_t n) {
  return ~crc32c_update(~0u, data, n);
}

// The register after `n` more zero bytes: crc32c_update(crc, zeros, n) without reading them.
uint32_t crc32c_extend_zeros(uint32_t crc, uint64_t n);

// Collects the checksums of a file being written, from pieces added in any order and from
// any thread. Bytes never added (alignment padding) count as the zeros the file holds there.
class ChecksumBuilder {
 public:
  explicit ChecksumBuilder(const Layout& layout, uint64_t chunk_bytes = kChecksumChunkBytes);

  // Adds `n` bytes that lie at byte `offset` of block `block`. Thread-safe; each byte of a
  // block must be added at most once.
  void add(uint32_t block, uint64_t offset, const void* data, size_t n);

  // Fills in the checksum keys of every block. With `placeholder`, every value is the
  // widest one (4294967295), to size a footer before the payload is written.
  void store(Layout& layout, bool placeholder = false) const;

 private:
  uint64_t chunk_bytes_;
  std::vector<uint64_t> block_bytes_;
  std::vector<size_t> first_chunk_;  // per block, its first slot in acc_
  std::unique_ptr<std::atomic<uint32_t>[]> acc_;
};

// What to check in a file and the verdict, for readers that checksum as they read.
class Verifier {
 public:
  struct Chunk {
    uint32_t block;
    uint32_t index;   // within the block
    uint64_t offset;  // from the start of the file
    uint64_t bytes;
  };

  // Throws std::invalid_argument if the file carries no checksums this build can check.
  Verifier(const std::string& path, const Layout& layout);

  // Every chunk of every block, in file order.
  const std::vector<Chunk>& chunks() const { return chunks_; }

  // Records the CRC-32C computed for chunks()[k]. Thread-safe.
  void check(size_t k, uint32_t crc);

  // Throws std::invalid_argument naming the file, the block, the byte range and the tensors
  // in it if any chunk differed.
  void finish();

 private:
  struct Bad {
    size_t chunk;
    uint32_t computed;
  };
  std::string path_;
  const Layout& layout_;  // must outlive the verifier
  std::vector<Chunk> chunks_;
  std::mutex mutex_;
  std::vector<Bad> bad_;
};

// NOTE: readers that checksum read 1 MiB at a time and checksum each slice at once, while it
// is still in the L2 cache, so verifying costs a few percent instead of a second pass over
// memory.
inline constexpr uint64_t kChecksumSliceBytes = uint64_t(1) << 20;

// Reads a file's payload and checks it against the footer's checksums. Throws
// std::invalid_argument naming the file, the block, the byte range and the tensors in it if
// any chunk differs, or if the file carries no checksums to check.
void verify_file(const std::string& path, int threads);
// The same on a file already open: what a load reads is then what is checked, even if the
// path is replaced meanwhile.
void verify_file(const InputFile& file, int threads);
// The same with the file's layout already read.
void verify_file(const InputFile& file, const Layout& layout, int threads);

}  // namespace flashpack
