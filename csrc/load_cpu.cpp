// The CPU path: map the file and hand out views into the mapping (zero-copy), or, with
// copy=True, read the blocks into fresh memory with several threads.
#include "checksum.h"
#include "io.h"
#include "load.h"

#include <ATen/ops/empty.h>
#include <c10/core/TensorImpl.h>

#include <algorithm>
#include <chrono>
#include <future>
#include <memory>
#include <numeric>
#include <optional>
#include <system_error>
#include <tuple>

namespace flashpack {

namespace {

// NOTE: 16 MiB reads are large enough to run at full page-cache speed and small enough
// that a few big blocks still spread over every thread.
constexpr uint64_t kReadChunkBytes = uint64_t(16) << 20;

void delete_mapping_ref(void* ctx) {
  delete static_cast<std::shared_ptr<Mapping>*>(ctx);
}

std::vector<c10::Storage> map_blocks(const InputFile& file, const Layout& layout) {
  auto mapping = std::make_shared<Mapping>(file);
  std::vector<c10::Storage> storages;
  storages.reserve(layout.blocks.size());
  for (const Block& b : layout.blocks) {
    // Each block's storage keeps the whole mapping alive: it is unmapped when the last
    // tensor viewing any block is freed.
    c10::DataPtr ptr(mapping->data() + b.offset_bytes, new std::shared_ptr<Mapping>(mapping), &delete_mapping_ref,
                     c10::Device(c10::kCPU));
    storages.emplace_back(c10::Storage::use_byte_size_t(), b.length_bytes, std::move(ptr), nullptr, false);
  }
  return storages;
}

// One fresh allocation per block of the layout, for read_into.
std::vector<c10::Storage> allocate_blocks(const Layout& layout) {
  std::vector<c10::Storage> storages;
  storages.reserve(layout.blocks.size());
  for (const Block& b : layout.blocks) {
    at::Tensor buf = at::empty({static_cast<int64_t>(b.length_bytes)}, at::kByte);
    // NOTE: the fresh buffer's page faults, one per 4 KiB, took as long as the reads
    // themselves: with huge pages a copying load of 537 MB took half the time.
    advise_huge_pages(buf.data_ptr(), b.length_bytes);
    storages.push_back(buf.storage());
  }
  return storages;
}

// Reads each block of the layout into its storage, with several threads; with a verifier, in
// its checksum chunks, each checked as it lands.
void read_into(const InputFile& file, const Layout& layout, const std::vector<c10::Storage>& storages, int threads,
               Verifier* verifier) {
  if (verifier == nullptr) {
    struct Chunk {
      char* dst;
      uint64_t offset;
      uint64_t bytes;
    };
    std::vector<Chunk> chunks;
    for (size_t k = 0; k < layout.blocks.size(); ++k) {
      const Block& b = layout.blocks[k];
      char* base = static_cast<char*>(storages[k].mutable_data());
      for (uint64_t off = 0; off < b.length_bytes; off += kReadChunkBytes) {
        chunks.push_back({base + off, b.offset_bytes + off, std::min(kReadChunkBytes, b.length_bytes - off)});
      }
    }
    parallel_for(chunks.size(), threads, [&](size_t k) {
      pread_exact(file.fd(), chunks[k].dst, chunks[k].bytes, chunks[k].offset, file.path());
    });
    return;
  }
  parallel_for(verifier->chunks().size(), threads, [&](size_t k) {
    const Verifier::Chunk& c = verifier->chunks()[k];
    char* dst = static_cast<char*>(storages[c.block].mutable_data()) + (c.offset - layout.blocks[c.block].offset_bytes);
    uint32_t reg = ~0u;
    for (uint64_t done = 0; done < c.bytes; done += kChecksumSliceBytes) {
      const uint64_t n = std::min(kChecksumSliceBytes, c.bytes - done);
      pread_exact(file.fd(), dst + done, n, c.offset + done, file.path());
      reg = crc32c_update(reg, dst + done, n);
    }
    verifier->check(k, ~reg);
  });
  verifier->finish();
}

int64_t since_ns(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
}

Layout layout_from(const Footer& footer, const InputFile& file, const LoadOptions& opts,
                   const std::function<void(const Layout&)>& whole) {
  Layout layout = parse_footer(footer.text, footer.payload_bytes, file.path());
  if (opts.check_layout) opts.check_layout(layout);
  if (whole) whole(layout);
  // Returned by name, not through ?:, which would copy the whole index of every load.
  if (opts.names) return select_entries(layout, *opts.names, file.path());
  return layout;
}

}  // namespace

namespace {

// A tensor's memory keeps its block alive with a reference on the block's StorageImpl,
// held in the DataPtr's context itself: no allocation per tensor for it.
void release_block(void* ctx) {
  c10::raw::intrusive_ptr::decref(static_cast<c10::StorageImpl*>(ctx));
}

}  // namespace

std::vector<at::Tensor> make_views(const Layout& layout, const std::vector<c10::Storage>& blocks, c10::Device device) {
  // Each tensor gets a storage of its own over its bytes of the block, holding the block
  // alive: so torch.compile sees outputs that do not alias, and torch.save of one tensor
  // writes that tensor, not its whole block. Only tied entries (same block, offset and
  // length) share a storage, so they stay views of the same memory.
  // NOTE: building each TensorImpl directly costs well under a microsecond, where
  // as_strided() through the dispatcher costs several; it matters for 20,000 tensors.
  const c10::DispatchKeySet keys(c10::computeDispatchKey(std::nullopt, at::kStrided, device));
  const auto& entries = layout.entries;
  const std::vector<size_t> tied_to = tie_firsts(layout);

  std::vector<at::Tensor> out;
  out.reserve(entries.size());
  for (size_t k = 0; k < entries.size(); ++k) {
    const Entry& e = entries[k];
    const Block& b = layout.blocks[e.block];
    c10::Storage storage;
    if (tied_to[k] != k) {
      storage = out[tied_to[k]].storage();
    } else if (e.length == 0) {
      // An empty tensor holds no bytes: no pointer either. One into the block would be the
      // address of the next block's first tensor (in another dtype), which torch.save refuses
      // ("view the same data as different types").
      storage = c10::Storage(c10::Storage::use_byte_size_t(), 0, c10::DataPtr(nullptr, blocks[e.block].device()),
                             nullptr, false);
    } else {
      const uint64_t esize = c10::elementSize(b.dtype);
      const c10::Storage& block = blocks[e.block];
      char* data = static_cast<char*>(block.mutable_data()) + e.offset * esize;
      c10::StorageImpl* owner = block.unsafeGetStorageImpl();
      c10::raw::intrusive_ptr::incref(owner);
      c10::DataPtr ptr(data, owner, &release_block, block.device());
      storage = c10::Storage(c10::Storage::use_byte_size_t(), e.length * esize, std::move(ptr), nullptr, false);
    }
    auto impl = c10::make_intrusive<c10::TensorImpl>(std::move(storage), keys, c10::scalarTypeToTypeMeta(b.dtype));
    impl->set_sizes_contiguous(e.shape);
    out.emplace_back(std::move(impl));
  }
  return out;
}

std::vector<at::Tensor> block_tensors(const Layout& layout, const std::vector<c10::Storage>& blocks,
                                      c10::Device device) {
  const c10::DispatchKeySet keys(c10::computeDispatchKey(std::nullopt, at::kStrided, device));
  std::vector<at::Tensor> out;
  out.reserve(blocks.size());
  for (size_t k = 0; k < blocks.size(); ++k) {
    const Block& b = layout.blocks[k];
    auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(blocks[k]), keys, c10::scalarTypeToTypeMeta(b.dtype));
    impl->set_sizes_contiguous({static_cast<int64_t>(b.length_elems)});
    out.emplace_back(std::move(impl));
  }
  return out;
}

std::vector<at::Tensor> load_outputs(const Layout& layout, const std::vector<c10::Storage>& blocks, c10::Device device,
                                     const LoadOptions& opts) {
  return opts.blocks ? block_tensors(layout, blocks, device) : make_views(layout, blocks, device);
}

Layout layout_to_load(const InputFile& file, const LoadOptions& opts,
                      const std::function<void(const Layout&)>& whole) {
  return layout_from(read_footer_text(file.fd(), file.size(), file.path()), file, opts, whole);
}

std::vector<at::Tensor> load_blocks_first(const InputFile& file, const LoadOptions& opts, c10::Device device,
                                          const AllocateBlocks& allocate, const MoveBlocks& move, Layout* layout_out,
                                          LoadSteps* steps) {
  LoadSteps local;
  LoadSteps& times = steps != nullptr ? *steps : local;
  const Footer footer = read_footer_text(file.fd(), file.size(), file.path());
  // One layout, read and then moved: the whole load in order.
  const auto in_order = [&](Layout layout) {
    const std::vector<c10::Storage> storages = allocate(layout);
    move(layout, storages);
    const auto start = std::chrono::steady_clock::now();
    auto views = load_outputs(layout, storages, device, opts);
    times.views_ns += since_ns(start);
    if (layout_out != nullptr) *layout_out = std::move(layout);
    return views;
  };
  // A selection or a check needs the index before anything moves.
  uint64_t ahead_bytes = opts.index_ahead_bytes;
  if (ahead_bytes == 0) ahead_bytes = static_cast<uint64_t>(env_count("FLASHPACK_INDEX_AHEAD_BYTES"));
  if (ahead_bytes == 0) ahead_bytes = kIndexAheadBytes;
  std::optional<Layout> ahead;
  if (!opts.names && !opts.check_layout && footer.text.size() >= ahead_bytes) {
    ahead = parse_blocks_ahead(footer.text, footer.payload_bytes, file.path());
  }
  if (!ahead) {
    const auto start = std::chrono::steady_clock::now();
    Layout layout = layout_from(footer, file, opts, nullptr);
    times.index_ns += since_ns(start);
    return in_order(std::move(layout));
  }

  std::vector<c10::Storage> storages;
  try {
    storages = allocate(*ahead);
  } catch (...) {
    // No memory for the blocks: a footer the load refuses is still what it says.
    (void)layout_from(footer, file, opts, nullptr);
    throw;
  }
  struct Rest {
    Layout layout;
    std::vector<at::Tensor> views;
    int64_t index_ns = 0;
    int64_t views_ns = 0;
  };
  const auto rest = [&] {
    Rest r;
    auto start = std::chrono::steady_clock::now();
    r.layout = parse_footer(footer.text, footer.payload_bytes, file.path());
    r.index_ns = since_ns(start);
    if (same_blocks(r.layout, *ahead)) {
      start = std::chrono::steady_clock::now();
      r.views = load_outputs(r.layout, storages, device, opts);
      r.views_ns = since_ns(start);
    }
    return r;
  };
  std::future<Rest> reading;
  try {
    reading = std::async(std::launch::async, rest);
  } catch (const std::system_error&) {
    reading = std::async(std::launch::deferred, rest);  // no thread to be had: after the move
  }
  std::exception_ptr moving;
  try {
    move(*ahead, storages);
  } catch (...) {
    moving = std::current_exception();
  }
  // A footer the load refuses is said first, as where it is read before anything moves.
  Rest r = reading.get();
  if (moving) std::rethrow_exception(moving);
  times.index_ns += r.index_ns;
  times.views_ns += r.views_ns;
  if (!same_blocks(r.layout, *ahead)) {
    // A key named twice after the index changed the blocks (JSON's last value wins): the
    // load starts over from the whole layout, the blocks moved so far freed first.
    storages.clear();
    return in_order(std::move(r.layout));
  }
  if (layout_out != nullptr) *layout_out = std::move(r.layout);
  return std::move(r.views);
}

std::vector<at::Tensor> load_cpu(const std::string& path, const LoadOptions& opts, Layout* layout_out) {
  InputFile file(path);
  const int threads = default_threads(opts.num_threads);
  if (opts.copy && !opts.verify) {
    try {
      return load_blocks_first(
          file, opts, c10::Device(c10::kCPU), allocate_blocks,
          [&](const Layout& layout, const std::vector<c10::Storage>& storages) {
            read_into(file, layout, storages, threads, nullptr);
          },
          layout_out);
    } catch (c10::Error& e) {
      e.add_context("while loading '" + path + "' to cpu");  // as below
      throw;
    }
  }
  // A selection's blocks carry no checksums: the whole file is verified before it is made.
  const bool verify_whole = opts.verify && opts.names.has_value();
  Layout layout = layout_to_load(file, opts, [&](const Layout& all) {
    if (verify_whole) verify_file(file, all, threads);
  });
  std::optional<Verifier> verifier;
  if (opts.verify && !verify_whole) verifier.emplace(path, layout);
  std::vector<at::Storage> storages;
  try {
    if (opts.copy) {
      storages = allocate_blocks(layout);
      read_into(file, layout, storages, threads, verifier ? &*verifier : nullptr);
    } else {
      storages = map_blocks(file, layout);
    }
  } catch (c10::Error& e) {
    // The allocator's own error (no memory for a block), kept as it is (torch.OutOfMemoryError
    // where torch raises one), with the file added.
    e.add_context("while loading '" + path + "' to cpu");
    throw;
  }
  if (opts.verify && !verify_whole && !opts.copy) {
    // NOTE: read with pread from the descriptor the mapping was made from (the same file),
    // not through the mapping: touching every page of it would put the whole file in this
    // process's RSS for as long as the tensors live.
    verify_file(file, layout, threads);
  }
  auto views = load_outputs(layout, storages, c10::Device(c10::kCPU), opts);
  if (layout_out != nullptr) *layout_out = std::move(layout);
  return views;
}

at::Tensor read_range(const std::string& path, int64_t offset, int64_t length, c10::Device device,
                      int64_t num_threads) {
  if (!device.is_cpu() && !device.is_cuda()) {
    throw std::invalid_argument("cannot read '" + path + "' to " + device.str() + ": only cpu and cuda are supported");
  }
  InputFile file(path);
  if (offset < 0 || length < 0 || static_cast<uint64_t>(offset) > file.size() ||
      static_cast<uint64_t>(length) > file.size() - static_cast<uint64_t>(offset)) {
    throw std::invalid_argument("'" + path + "': cannot read " + std::to_string(length) + " bytes at offset " +
                                std::to_string(offset) + ": the file has " + std::to_string(file.size()) + " bytes");
  }
  // NOTE: for CUDA the bytes land in pinned memory first, so the copy to the GPU runs at
  // full PCIe speed instead of going through the driver's pageable staging.
  at::Tensor buf = at::empty({length}, at::TensorOptions().dtype(at::kByte).pinned_memory(device.is_cuda()));
  char* base = static_cast<char*>(buf.data_ptr());
  const uint64_t n = static_cast<uint64_t>(length);
  if (device.is_cpu()) advise_huge_pages(base, n);
  parallel_for((n + kReadChunkBytes - 1) / kReadChunkBytes, default_threads(num_threads),
               [&](size_t k) {
                 const uint64_t off = k * kReadChunkBytes;
                 pread_exact(file.fd(), base + off, std::min(kReadChunkBytes, n - off), offset + off, path);
               });
  return device.is_cpu() ? buf : buf.to(device);
}

}  // namespace flashpack
