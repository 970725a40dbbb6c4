// The CPU path: map the file and hand out views into the mapping (zero-copy), or, with
// copy=True, read the blocks into fresh memory with several threads.
#include "io.h"
#include "load.h"

#include <ATen/ops/empty.h>
#include <c10/core/TensorImpl.h>

#include <memory>

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

std::vector<c10::Storage> read_blocks(const InputFile& file, const Layout& layout, int threads) {
  struct Chunk {
    char* dst;
    uint64_t offset;
    uint64_t bytes;
  };
  std::vector<c10::Storage> storages;
  std::vector<Chunk> chunks;
  for (const Block& b : layout.blocks) {
    at::Tensor buf = at::empty({static_cast<int64_t>(b.length_bytes)}, at::kByte);
    char* base = static_cast<char*>(buf.data_ptr());
    for (uint64_t off = 0; off < b.length_bytes; off += kReadChunkBytes) {
      chunks.push_back({base + off, b.offset_bytes + off, std::min(kReadChunkBytes, b.length_bytes - off)});
    }
    storages.push_back(buf.storage());
  }
  parallel_for(chunks.size(), threads, [&](size_t k) {
    pread_exact(file.fd(), chunks[k].dst, chunks[k].bytes, chunks[k].offset, file.path());
  });
  return storages;
}

}  // namespace

std::vector<at::Tensor> make_views(const Layout& layout, const std::vector<c10::Storage>& blocks, c10::Device device) {
  // NOTE: building each TensorImpl directly costs well under a microsecond, where
  // as_strided() through the dispatcher costs several; it matters for 20,000 tensors.
  const c10::DispatchKeySet keys(c10::computeDispatchKey(std::nullopt, at::kStrided, device));
  std::vector<at::Tensor> out;
  out.reserve(layout.entries.size());
  for (const Entry& e : layout.entries) {
    const Block& b = layout.blocks[e.block];
    auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(blocks[e.block]), keys,
                                                     c10::scalarTypeToTypeMeta(b.dtype));
    impl->set_sizes_contiguous(e.shape);
    impl->set_storage_offset(static_cast<int64_t>(e.offset));
    out.emplace_back(std::move(impl));
  }
  return out;
}

std::vector<at::Tensor> load_cpu(const std::string& path, const LoadOptions& opts, Layout* layout_out) {
  InputFile file(path);
  Layout layout = read_layout(file.fd(), file.size(), path);
  const auto storages = opts.copy ? read_blocks(file, layout, default_threads(static_cast<int>(opts.num_threads)))
                                  : map_blocks(file, layout);
  auto views = make_views(layout, storages, c10::Device(c10::kCPU));
  if (layout_out != nullptr) *layout_out = std::move(layout);
  return views;
}

}  // namespace flashpack
