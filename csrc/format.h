// The flashpack file format.
//
//   [payload: one contiguous block per dtype, each block and each tensor aligned]
//   [footer: UTF-8 JSON]  [footer length: u64 little-endian]  [magic: "FLASHPK\0"]
//
// Two footer formats exist, both written by the reference `flashpack` package:
//   flashpack_v3  one dtype: {format, target_dtype, align_bytes, total_elems, index}
//   flashpack_v4  several:   {format, align_bytes, total_payload_bytes, total_elems,
//                             macroblocks: [{dtype, offset_bytes, length_bytes, length_elems,
//                                            and optionally checksum, checksum_chunk_bytes, checksums}],
//                             index: [{name, shape, offset, length, macroblock}]}
// Offsets and lengths in the index count elements of the block's dtype. We read both
// and write v4. Everything here is plain C++ over c10::ScalarType: no tensors.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/SmallVector.h>
#include <torch/version.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

// Whether the torch built against is at least major.minor. The dtypes and operator tags
// added after torch 2.6, the oldest this builds against, are used where they exist.
#define FLASHPACK_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

namespace flashpack {

inline constexpr char kMagic[8] = {'F', 'L', 'A', 'S', 'H', 'P', 'K', '\0'};
inline constexpr uint64_t kTrailerBytes = 16;  // u64 footer length + magic
inline constexpr const char* kFormatV3 = "flashpack_v3";
inline constexpr const char* kFormatV4 = "flashpack_v4";
inline constexpr const char* kChecksumCrc32c = "crc32c";  // the one checksum algorithm (checksum.h)

// NOTE: the reference aligns tensors to 128 bytes; we keep that for tensors (it is
// cache-line friendly and wastes little on 20,000 small tensors) but start every block
// on a 4096-byte boundary so the CUDA path can read whole blocks with O_DIRECT.
inline constexpr int64_t kDefaultAlignBytes = 128;
inline constexpr uint64_t kBlockAlignBytes = 4096;

// Limits on untrusted footers. A footer is ~100 bytes per tensor, so 256 MiB allows
// millions of tensors, far past any real checkpoint, while a hostile footer of empty
// tensors (~45 bytes each, ~750 bytes each once loaded) stays within a few GB.
inline constexpr uint64_t kMaxFooterBytes = uint64_t(256) << 20;
inline constexpr size_t kMaxDims = 64;
inline constexpr uint64_t kMinChecksumChunkBytes = 4096;
// NOTE: a load of selected entries reads the bytes between two of them when they are this
// close: one more block (one more allocation and copy) costs more than reading 1 MiB, and
// entries left out between selected ones are usually small (a bias between two weights).
inline constexpr uint64_t kSelectGapBytes = uint64_t(1) << 20;

// The torch name of a dtype ("bfloat16"), or nullptr if flashpack cannot store it.
const char* dtype_name(c10::ScalarType t);
// Accepts torch's canonical names and their aliases ("half", "float", "cfloat", ...).
std::optional<c10::ScalarType> dtype_from_name(std::string_view name);

struct Block {
  c10::ScalarType dtype = c10::ScalarType::Byte;
  uint64_t offset_bytes = 0;  // from the start of the file
  uint64_t length_bytes = 0;
  uint64_t length_elems = 0;
  // Integrity keys (checksum.h), our extension of v4. `checksum` is the algorithm, empty
  // when none was stored; `checksums` is filled only for an algorithm this build knows.
  std::string checksum;
  uint64_t checksum_chunk_bytes = 0;
  std::vector<uint32_t> checksums;
};

struct Entry {
  std::string name;
  // NOTE: inline up to 6 dimensions: one allocation less per entry, which counts when an
  // index of 20,000 entries is read on every load.
  c10::SmallVector<int64_t, 6> shape;
  uint64_t offset = 0;  // elements from the start of the block
  uint64_t length = 0;  // elements
  uint32_t block = 0;
};

struct Layout {
  std::string format = kFormatV4;
  int64_t align_bytes = kDefaultAlignBytes;
  uint64_t payload_bytes = 0;  // bytes before the footer
  std::vector<Block> blocks;
  std::vector<Entry> entries;  // in file (and dict) order
  // "index_crc32c", written with checksums: the CRC-32C of index_text(). The blocks'
  // checksums cover the tensor bytes; this covers where the footer says they are.
  std::optional<uint32_t> index_crc;
  // "metadata": free-form string pairs, as safetensors keeps them ({"format": "pt"}), in
  // file order; empty when the footer has none, or has something else under that name
  // (metadata_is_ours false: another writer's, ignored as unknown keys are).
  std::vector<std::pair<std::string, std::string>> metadata;
  bool metadata_is_ours = true;
  // "metadata_crc32c", written with checksums where there is metadata: the CRC-32C of
  // metadata_text(). Apart from index_crc32c, so that readers that do not know the metadata
  // still verify the index.
  std::optional<uint32_t> metadata_crc;
};

// Parses and validates a footer. `payload_bytes` is the size of the file before the
// footer; every block must fit in it. `path` is only used in error messages.
// Throws std::invalid_argument naming the entry and the problem.
Layout parse_footer(std::string_view footer, uint64_t payload_bytes, const std::string& path);

// The blocks of a footer that lists them before its index (as every writer does), checked as
// parse_footer checks them, in a layout without entries; nullopt for any other footer, and
// for one that parse_footer would refuse there (it then says why). For a load that starts
// moving the payload while parse_footer reads the index: the blocks it moved must then be
// parse_footer's (same_blocks), which a key named twice could change.
std::optional<Layout> parse_blocks_ahead(std::string_view footer, uint64_t payload_bytes, const std::string& path);

// Whether two layouts have the same blocks (dtypes, offsets and lengths; checksums aside).
bool same_blocks(const Layout& a, const Layout& b);

// A file's footer as read: its JSON text, and the size of the file before it.
struct Footer {
  std::string text;
  uint64_t payload_bytes = 0;
};

// Reads the trailer and footer of an open file, checking the footer's length against the
// file size (and a limit) before anything is allocated for it.
Footer read_footer_text(int fd, uint64_t file_size, const std::string& path);

// Reads the trailer and footer of an open file and validates them (see parse_footer).
// Nothing larger than the footer itself is allocated, and only after its length has
// been checked against the file size. If `raw_footer` is given it receives the JSON text.
Layout read_layout(int fd, uint64_t file_size, const std::string& path, std::string* raw_footer = nullptr);

// The v4 footer JSON for a layout, as the reference writes it (compact separators).
std::string footer_json(const Layout& layout);

// Every block and entry of a layout (dtypes, offsets, lengths, names, shapes), in one string:
// what "index_crc32c" is computed over.
std::string index_text(const Layout& layout);

// The metadata pairs in one string: what "metadata_crc32c" is computed over.
std::string metadata_text(const Layout& layout);

// The first entry whose name an earlier entry also has, or entries.size() when every name
// is distinct. hashed: through a hash table, falling back to sorting when the names collide
// too often; false sorts at once (both give the same answer).
size_t first_repeated_name(const std::vector<Entry>& entries, bool hashed = true);

// What a load's outputs look like, in one string: each entry's name, dtype and shape, and
// which earlier entry it shares memory with. Two files with the same signature load as the
// same outputs (values aside): what a compiled graph traced on one of them may assume.
std::string layout_signature(const Layout& layout);

// For each entry, the index of the first entry that shares its bytes (same block, offset
// and length: a tied weight), or its own index. Empty entries share nothing. A load gives
// tied entries one storage; a traced graph must see them as one tensor.
std::vector<size_t> tie_firsts(const Layout& layout);

// Two entries whose bytes overlap without being the same range (a tie), as (first, second)
// in index order; none when there are none. Our writer never makes them; a crafted file may.
std::optional<std::pair<size_t, size_t>> partial_overlap(const Layout& layout);

// The part of a layout that holds the entries named: those entries, in index order (every
// entry of a name the file holds twice), over blocks that cover only their bytes. Each
// block's selected byte ranges become blocks of their own, ranges closer than
// kSelectGapBytes merged into one (the bytes between them are read too, not returned), so
// a load reads and allocates about what it returns. Tied entries stay tied. The blocks
// carry no checksums: verify the whole file first. Throws std::invalid_argument naming
// the names the file lacks.
Layout select_entries(const Layout& layout, const std::vector<std::string>& names, const std::string& path);

// One tensor to be written: its final dtype, shape, and the index of an earlier
// request whose bytes it shares (a tied weight), or -1.
struct SaveRequest {
  std::string name;
  c10::ScalarType dtype;
  std::vector<int64_t> shape;
  int64_t tie = -1;
};

// Places every request: one block per dtype in order of first appearance, tensors
// aligned to `align_bytes` within it, blocks on kBlockAlignBytes. Ties share offsets.
Layout plan_layout(const std::vector<SaveRequest>& requests, int64_t align_bytes);

}  // namespace flashpack
