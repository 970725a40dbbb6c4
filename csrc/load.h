// What the load and save kernels share: options, and turning blocks into named views.
#pragma once

#include "format.h"

#include <ATen/core/Dict.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Storage.h>

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace flashpack {

class InputFile;

// The CUDA routes a load may ask for (LoadOptions::route), as errors list them.
inline constexpr const char* kRouteNames[] = {"auto", "direct", "buffered", "mapped", "register"};
inline constexpr const char* kRouteChoices = "auto, direct, buffered, mapped or register";

// NOTE: an index smaller than this parses in well under a millisecond (about 250 ns an
// entry of some 90 bytes on the 2-core VM), too little to be worth a thread of its own.
inline constexpr uint64_t kIndexAheadBytes = uint64_t(64) << 10;

struct LoadOptions {
  bool copy = false;        // CPU: read into fresh memory instead of mapping the file
  int64_t num_threads = 0;  // 0: FLASHPACK_NUM_THREADS, else min(cores, 16)
  bool verify = false;      // check the payload against the footer's checksums (checksum.h)
  // CUDA only (docs/cuda.md); 0 or "auto": the environment variable, else the default.
  int64_t chunk_bytes = 0;     // FLASHPACK_CHUNK_BYTES: bytes per read / registration
  int64_t pinned_bytes = 0;    // FLASHPACK_PINNED_BYTES: pinned memory one load may hold (256 MiB)
  int64_t num_streams = 0;     // FLASHPACK_NUM_STREAMS: copy streams (4)
  std::string route = "auto";  // FLASHPACK_CUDA_ROUTE: auto, direct, buffered, mapped or register
  bool blocks = false;         // return the blocks themselves (see block_tensors), not the entries
  // Only these entries (format.h select_entries); the file's other bytes are not read.
  std::optional<std::vector<std::string>> names;
  // load_blocks_first: an index of at least this many bytes is read while the blocks move;
  // 0: FLASHPACK_INDEX_AHEAD_BYTES, else kIndexAheadBytes.
  uint64_t index_ahead_bytes = 0;
  // Called with the file's whole layout before any payload byte is read; throws to refuse it.
  std::function<void(const Layout&)> check_layout;
};

// The layout a load works from: the file's, checked by opts.check_layout and shown to
// `whole` (if given), then cut down to opts.names.
Layout layout_to_load(const InputFile& file, const LoadOptions& opts,
                      const std::function<void(const Layout&)>& whole = nullptr);

// One tensor per index entry, in index order, each a view into its block's storage
// (so tied entries share memory). `blocks[k]` must hold layout.blocks[k]'s bytes.
std::vector<at::Tensor> make_views(const Layout& layout, const std::vector<c10::Storage>& blocks, c10::Device device);

// One 1-D tensor per block, of the block's dtype and length, over `blocks[k]` itself: what
// the reference package's read_flashpack_file returns, for callers that slice blocks.
std::vector<at::Tensor> block_tensors(const Layout& layout, const std::vector<c10::Storage>& blocks,
                                      c10::Device device);

// Where a load_blocks_first() spent its time, in nanoseconds (the CUDA path's counters).
struct LoadSteps {
  int64_t index_ns = 0;  // reading and checking the index: parse_footer, names, check_layout
  int64_t views_ns = 0;  // making the outputs (load_outputs)
};

// A load that moves whole blocks into memory of its own (CUDA; the CPU with copy=True):
// `allocate` returns a storage for each block of a layout, `move` fills them with the file's
// bytes. Where the index is large and listed after the blocks, the blocks are moved while the
// index is read and the outputs made on another thread; a footer the load refuses is still
// said first, before any error of the move. Otherwise one after the other, as layout_to_load
// reads the layout.
using AllocateBlocks = std::function<std::vector<c10::Storage>(const Layout&)>;
using MoveBlocks = std::function<void(const Layout&, const std::vector<c10::Storage>&)>;
std::vector<at::Tensor> load_blocks_first(const InputFile& file, const LoadOptions& opts, c10::Device device,
                                          const AllocateBlocks& allocate, const MoveBlocks& move, Layout* layout_out,
                                          LoadSteps* steps = nullptr);

// make_views or block_tensors, as `opts.blocks` asks.
std::vector<at::Tensor> load_outputs(const Layout& layout, const std::vector<c10::Storage>& blocks, c10::Device device,
                                     const LoadOptions& opts);

std::vector<at::Tensor> load_cpu(const std::string& path, const LoadOptions& opts, Layout* layout_out);

// Bytes [offset, offset + length) of a file as a uint8 tensor on `device`, read with several
// threads (through pinned memory for CUDA). For callers that split a file among processes.
at::Tensor read_range(const std::string& path, int64_t offset, int64_t length, c10::Device device,
                      int64_t num_threads);

#ifdef WITH_CUDA
// `file` is open already, so that a check of it running beside the load reads the same file.
std::vector<at::Tensor> load_cuda(const InputFile& file, c10::Device device, const LoadOptions& opts,
                                  Layout* layout_out);
// The CUDA path's counters (pinned memory held, bytes moved by each route), by name;
// reset_peaks restarts the peak gauges from their current values.
std::vector<std::pair<std::string, int64_t>> cuda_stats(bool reset_peaks);
// Frees the idle pinned staging memory the CUDA path keeps between loads; returns the bytes freed.
int64_t release_pinned_memory();
#endif

// metadata: string pairs stored in the footer's "metadata" (as safetensors' save_file takes them).
void save(const c10::Dict<std::string, at::Tensor>& tensors, const std::string& path,
          std::optional<c10::ScalarType> target_dtype, int64_t align_bytes, int64_t num_threads,
          bool checksum = false, bool durable = true, bool floating_only = false,
          const std::vector<std::pair<std::string, std::string>>& metadata = {});

}  // namespace flashpack
