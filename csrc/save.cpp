// Saving: plan the layout, write every tensor straight from its memory into a temporary
// file with several threads, append the footer, then fsync and rename (io.h).
#include "checksum.h"
#include "io.h"
#include "json.h"
#include "load.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/ScalarType.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include <unistd.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <tuple>

namespace flashpack {

namespace {

// NOTE: tasks of 32 MiB keep every thread busy on LLM-sized tensors while each is still
// large enough for the page cache to run at full speed (a durable save writes them in
// slices of 1 MiB, io.h).
constexpr uint64_t kWriteChunkBytes = uint64_t(32) << 20;

// NOTE: tensors under 1 MiB are written in runs of neighbours spanning up to 8 MiB of the
// file, and a durable save starts the write-back of each run's slices as soon as they are
// written: 20,000 tensors of 32 KiB would otherwise leave the whole payload to the final
// fsync (0.51 s against 0.36 s durable on the 2-core VM).
constexpr uint64_t kSmallTensorBytes = uint64_t(1) << 20;
constexpr uint64_t kRunBytes = uint64_t(8) << 20;

std::string where(const std::string& path, const std::string& name) {
  return "'" + path + "': tensor '" + name + "'";
}

// NOTE: messages are put together from strings and std::to_string, never through an ostream
// (c10::str, <<): a library linked with a libstdc++ of its own (-static-libstdc++, which some
// compilers add by default) shares no locale with the libstdc++ torch loaded: a number sent
// through its streams came out empty with GCC 12's and crashed the process with GCC 13's.
std::string shape_text(c10::IntArrayRef sizes) {  // "[2, 3]"
  std::string text = "[";
  for (size_t d = 0; d < sizes.size(); ++d) text += (d ? ", " : "") + std::to_string(sizes[d]);
  return text + "]";
}

std::string layout_name(c10::Layout layout) {  // as torch prints it
  switch (layout) {
    case c10::kStrided: return "Strided";
    case c10::kSparse: return "Sparse";
    case c10::kSparseCsr: return "SparseCsr";
    case c10::kSparseCsc: return "SparseCsc";
    case c10::kSparseBsr: return "SparseBsr";
    case c10::kSparseBsc: return "SparseBsc";
    case c10::kMkldnn: return "Mkldnn";
    case c10::kJagged: return "Jagged";
    default: return "number " + std::to_string(static_cast<int>(layout));
  }
}

void check_storable(const at::Tensor& t, const std::string& path, const std::string& name) {
  if (!t.defined()) throw std::invalid_argument(where(path, name) + " is an undefined tensor");
  if (t.is_nested()) {
    throw std::invalid_argument(where(path, name) + " is a nested tensor; save its components (unbind()) instead");
  }
  if (t.layout() != at::kStrided) {
    throw std::invalid_argument(where(path, name) + " has layout " + layout_name(t.layout()) +
                                "; only dense (strided) tensors can be saved, call .to_dense() first");
  }
  if (c10::isQIntType(t.scalar_type())) {
    throw std::invalid_argument(where(path, name) + " is quantized (" + c10::toString(t.scalar_type()) +
                                "); its scale and zero point cannot be stored, save int_repr() and the "
                                "quantization parameters instead");
  }
  if (dtype_name(t.scalar_type()) == nullptr) {
    throw std::invalid_argument(where(path, name) + " has dtype " + c10::toString(t.scalar_type()) +
                                ", which flashpack cannot store");
  }
  if (t.is_meta() || (t.numel() > 0 && !t.has_storage())) {
    throw std::invalid_argument(where(path, name) + " is on the " + t.device().str() +
                                " device and has no data to save");
  }
  // Readers refuse more (format.h): a file they would refuse is not written.
  if (t.dim() > static_cast<int64_t>(kMaxDims)) {
    throw std::invalid_argument(where(path, name) + " has " + std::to_string(t.dim()) + " dimensions, more than the " +
                                std::to_string(kMaxDims) + " a flashpack file may hold");
  }
  // The largest stride of the contiguous tensor a load builds: a shape whose strides would
  // pass 2^63 - 1 (possible only for an empty tensor) is one no reader could rebuild.
  uint64_t span = 1;
  for (size_t d = 1; d < t.sizes().size(); ++d) {
    if (__builtin_mul_overflow(span, std::max<uint64_t>(t.sizes()[d], 1), &span) || span > uint64_t(INT64_MAX)) {
      throw std::invalid_argument(where(path, name) + " has shape " + shape_text(t.sizes()) +
                                  ", whose contiguous strides exceed 2^63 - 1; no reader could rebuild it");
    }
  }
  if (t.numel() == 0) return;
  // Written straight from memory, so the memory must be there: a fake or wrapper-subclass
  // tensor, or a parameter whose storage was freed (resize_(0), as FSDP does), has none.
  const c10::Storage& storage = t.storage();
  uint64_t last = static_cast<uint64_t>(t.storage_offset());
  for (size_t d = 0; d < t.sizes().size(); ++d) {
    last += static_cast<uint64_t>(t.sizes()[d] - 1) * static_cast<uint64_t>(t.strides()[d]);
  }
  const uint64_t needed = (last + 1) * t.element_size();
  if (storage.data() == nullptr || needed > storage.nbytes()) {
    throw std::invalid_argument(where(path, name) + " has no data in memory to save: it needs " + std::to_string(needed) +
                                " bytes of storage but its storage holds " +
                                std::to_string(storage.data() == nullptr ? 0 : storage.nbytes()) +
                                " (a fake or tensor-subclass wrapper, or a tensor whose storage was freed or resized)");
  }
}

at::ScalarType bits_dtype(size_t element_size) {
  switch (element_size) {
    case 1: return at::kByte;
    case 2: return at::kShort;
    case 4: return at::kInt;
    case 8: return at::kLong;
    default: return at::kComplexDouble;  // 16 bytes, the widest element
  }
}

}  // namespace

void save(const c10::Dict<std::string, at::Tensor>& tensors, const std::string& path,
          std::optional<c10::ScalarType> target_dtype, int64_t align_bytes, int64_t num_threads, bool checksum,
          bool durable, bool floating_only, const std::vector<std::pair<std::string, std::string>>& metadata) {
  if (align_bytes < 0 || align_bytes > (int64_t(1) << 30)) {
    throw std::invalid_argument("'" + path + "': align_bytes must be between 0 and 2^30, got " + std::to_string(align_bytes));
  }
  if (target_dtype && (dtype_name(*target_dtype) == nullptr || c10::isQIntType(*target_dtype))) {
    throw std::invalid_argument("'" + path + "': target_dtype " + c10::toString(*target_dtype) + " cannot be stored");
  }
  if (target_dtype && floating_only && !at::isFloatingType(*target_dtype)) {
    throw std::invalid_argument("'" + path + "': target_dtype " + dtype_name(*target_dtype) +
                                " is not a floating-point dtype: the floating-point tensors converted to it would lose "
                                "their values");
  }

  // Requests in dict order. A tensor that is exactly another one (same memory, shape,
  // strides and dtype: a tied weight) is stored once and both entries point at it.
  std::vector<SaveRequest> requests;
  std::vector<at::Tensor> sources;
  requests.reserve(tensors.size());
  sources.reserve(tensors.size());
  // x and x.conj() share memory and shape but not values: the lazy conj and neg bits count too.
  using TieKey =
      std::tuple<const void*, int, int, at::ScalarType, bool, bool, std::vector<int64_t>, std::vector<int64_t>>;
  std::map<TieKey, int64_t> first_of;
  for (const auto& item : tensors) {
    const std::string& name = item.key();
    const at::Tensor& t = item.value();
    if (!json::valid_utf8(name)) {
      // Not in the message: its bytes are not text.
      throw std::invalid_argument("'" + path + "': a tensor name is not valid UTF-8 (entry " +
                                  std::to_string(requests.size()) + ")");
    }
    check_storable(t, path, name);
    SaveRequest r;
    r.name = name;
    // floating_only: as nn.Module.to(dtype), integer, bool and complex tensors keep theirs
    // (a BatchNorm's num_batches_tracked must stay int64 for the model to load it back).
    const bool convert = target_dtype && (!floating_only || at::isFloatingType(t.scalar_type()));
    r.dtype = convert ? *target_dtype : t.scalar_type();
    if (convert && t.is_complex() && !at::isComplexType(r.dtype)) {
      throw std::invalid_argument(where(path, name) + " is " + dtype_name(t.scalar_type()) + " and target_dtype " +
                                  dtype_name(r.dtype) + " is not complex: its imaginary part would be lost");
    }
    r.shape = t.sizes().vec();
    if (t.numel() > 0) {
      TieKey key{t.const_data_ptr(), static_cast<int>(t.device().type()), t.device().index(), t.scalar_type(),
                 t.is_conj(), t.is_neg(), t.sizes().vec(), t.strides().vec()};
      auto [it, inserted] = first_of.emplace(std::move(key), static_cast<int64_t>(requests.size()));
      if (!inserted) r.tie = it->second;
    }
    requests.push_back(std::move(r));
    sources.push_back(t);
  }

  Layout layout = plan_layout(requests, align_bytes);
  for (const auto& [key, value] : metadata) {
    if (!json::valid_utf8(key) || !json::valid_utf8(value)) {
      throw std::invalid_argument("'" + path + "': a metadata key or value is not valid UTF-8");
    }
  }
  layout.metadata = metadata;
  // Checksums are known only once the payload is written, but the file's size is fixed up
  // front: reserve the footer the widest checksums would give and pad the real one with
  // spaces (JSON whitespace, which every reader skips) to that length.
  std::optional<ChecksumBuilder> sums;
  if (checksum) {
    const std::string index = index_text(layout);
    layout.index_crc = crc32c(index.data(), index.size());
    if (!metadata.empty()) {
      const std::string text = metadata_text(layout);
      layout.metadata_crc = crc32c(text.data(), text.size());
    }
    sums.emplace(layout);
    sums->store(layout, /*placeholder=*/true);
  }
  std::string footer = footer_json(layout);
  if (footer.size() > kMaxFooterBytes) {
    throw std::invalid_argument("'" + path + "': the index of " + std::to_string(requests.size()) + " tensors " +
                                (metadata.empty() ? "" : "and the metadata ") + "takes " +
                                std::to_string(footer.size()) + " bytes, more than the " +
                                std::to_string(kMaxFooterBytes) + " a reader accepts (names or metadata too long, "
                                "or too many tensors for one file)");
  }
  const uint64_t file_size = layout.payload_bytes + footer.size() + kTrailerBytes;
  AtomicWriter out(path, file_size, durable);

  // Tensors already in their final form (CPU, contiguous, right dtype) are written
  // straight from their memory: large ones in chunks, small ones in runs of neighbours
  // (kRunBytes); the others are converted inside the task that writes them, so
  // conversions run in parallel too.
  struct Task {
    size_t entry;    // a run: its first entry, in `run_entries`
    uint64_t begin;  // byte range within the tensor; a convert task (bytes == 0): first row
    uint64_t bytes;
    size_t count = 0;  // a run: how many entries, from `entry` on
    int64_t rows = 0;  // a convert task: how many rows (along dim 0); 0: the whole tensor
  };
  auto file_offset = [&](size_t k) {
    const Entry& e = layout.entries[k];
    const Block& b = layout.blocks[e.block];
    return b.offset_bytes + e.offset * c10::elementSize(b.dtype);
  };
  std::vector<Task> tasks;
  std::vector<size_t> stored;  // the entries with bytes of their own
  std::vector<bool> in_run(requests.size(), false);
  for (size_t k = 0; k < requests.size(); ++k) {
    const at::Tensor& t = sources[k];
    if (requests[k].tie >= 0 || t.numel() == 0) continue;
    stored.push_back(k);
    // A lazy conj or neg view holds the original's bits: it is resolved in a convert task.
    const bool direct = t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == requests[k].dtype &&
                        !t.is_conj() && !t.is_neg();
    if (!direct) {
      // NOTE: converted a slice of rows at a time, about kWriteChunkBytes of output each: a
      // large tensor then costs one slice of memory per thread rather than a whole second
      // copy of it (a 4 GB non-contiguous tensor used to need 4 GB more), and its slices
      // convert in parallel.
      const int64_t rows = t.dim() == 0 ? 1 : t.size(0);  // not empty: numel() > 0
      const uint64_t row_bytes = t.numel() / rows * c10::elementSize(requests[k].dtype);
      const int64_t step = std::max<int64_t>(1, kWriteChunkBytes / row_bytes);
      if (step >= rows) {
        tasks.push_back({k, 0, 0});
      } else {
        for (int64_t r = 0; r < rows; r += step) tasks.push_back({k, uint64_t(r), 0, 0, std::min(step, rows - r)});
      }
      continue;
    }
    const uint64_t nbytes = t.nbytes();
    if (nbytes < kSmallTensorBytes) {
      in_run[k] = true;
      continue;
    }
    for (uint64_t off = 0; off < nbytes; off += kWriteChunkBytes) {
      tasks.push_back({k, off, std::min(kWriteChunkBytes, nbytes - off)});
    }
  }
  // A run is small tensors that follow each other in the file with nothing but padding
  // between them, so that the padding can be written as zeros along with them.
  std::stable_sort(stored.begin(), stored.end(), [&](size_t a, size_t b) { return file_offset(a) < file_offset(b); });
  std::vector<size_t> run_entries;  // the entries of each run, run after run
  for (size_t i = 0; i < stored.size();) {
    if (!in_run[stored[i]]) {
      ++i;
      continue;
    }
    const uint64_t start = file_offset(stored[i]);
    size_t n = 1;
    while (i + n < stored.size() && in_run[stored[i + n]] &&
           file_offset(stored[i + n]) + sources[stored[i + n]].nbytes() - start <= kRunBytes) {
      ++n;
    }
    tasks.push_back({run_entries.size(), 0, 0, n});
    run_entries.insert(run_entries.end(), stored.begin() + i, stored.begin() + i + n);
    i += n;
  }

  // The caller's current stream on each device a source lives on. A worker thread starts on
  // the device's default stream, which does not wait for the caller's: the kernels that write
  // a tensor on a side stream may still be running when the save reads it.
  std::vector<std::optional<c10::Stream>> streams(sources.size());
  for (const Task& task : tasks) {
    if (task.count > 0) continue;  // a run's tensors are all on the CPU
    const c10::Device device = sources[task.entry].device();
    if (task.bytes == 0 && !device.is_cpu() && c10::impl::hasDeviceGuardImpl(device.type())) {
      streams[task.entry] = c10::impl::VirtualGuardImpl(device.type()).getStream(device);
    }
  }

  // NOTE: converted slices go to buffers of kWriteChunkBytes taken from this list and
  // given back after the write: at most one per thread, for the whole save. A fresh tensor
  // per slice, in sizes that vary with the tensors' rows, made glibc's malloc keep freed
  // slices in its heaps (its mmap threshold rises to the largest size freed): a 1 GB model
  // saved as bfloat16 peaked at about 300 MiB instead of two slices, and kept 150-250 MiB
  // after the save returned. A buffer of kWriteChunkBytes is always mapped, and unmapped
  // when freed.
  std::vector<at::Tensor> free_buffers;
  std::mutex buffers_mutex;
  auto write_task = [&](size_t i) {
    const Task& task = tasks[i];
    if (task.count > 0) {
      // NOTE: one pwritev for many tensors, the padding between them written as the zeros it
      // holds anyway: each write call has a fixed cost in the kernel, and 20,000 tensors of
      // 32 KiB went to the page cache in 0.08 s instead of 0.12 s with one pwrite each. A
      // durable save writes a run 1 MiB at a time and starts each slice's write-back at once,
      // as pwrite_all does for large tensors: the same 20,000 tensors saved durably in
      // 0.505-0.545 s (medians of 5, eleven series) against 0.521-0.897 s with the write-back
      // started once per 8 MiB run, on the 2-core VM. With checksums, a write every 1 MiB
      // copies what the checksum left in the L2 cache.
      static const char zeros[4096] = {};
      const uint64_t slice = sums ? kChecksumSliceBytes : durable ? kWritebackSliceBytes : kRunBytes;
      if (sums) {
        // The checksum reads the tensors in user space, where memory that is gone (a mapped
        // file truncated since) raises SIGBUS: checked first through the kernel, one call per
        // span of neighbouring tensors (most runs are one span). NOTE: a check rather than
        // checksumming after the write (which fails with EFAULT there): the write then copies
        // from memory, not from the cache, and 20,000 tensors of 32 KiB saved with checksums
        // in 0.24 s instead of 0.21 s on the 2-core VM (large tensors: 5% slower).
        static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
        uintptr_t span_begin = 0, span_end = 0;
        for (size_t j = task.entry; j < task.entry + task.count; ++j) {
          const uintptr_t begin = reinterpret_cast<uintptr_t>(sources[run_entries[j]].const_data_ptr());
          const uintptr_t end = begin + sources[run_entries[j]].nbytes();
          // Joined only across no whole page of memory that holds none of their bytes.
          if (span_end != 0 && begin >= span_begin && begin / page <= (span_end - 1) / page + 1) {
            span_end = std::max(span_end, end);
            continue;
          }
          if (span_end != 0) check_readable(reinterpret_cast<const void*>(span_begin), span_end - span_begin);
          span_begin = begin;
          span_end = end;
        }
        check_readable(reinterpret_cast<const void*>(span_begin), span_end - span_begin);
      }
      std::vector<iovec> iov;
      iov.reserve(task.count);
      uint64_t batch_start = file_offset(run_entries[task.entry]), end = batch_start;
      auto flush = [&] {
        out.pwritev_all(iov.data(), iov.size(), batch_start);
        out.start_writeback(batch_start, end - batch_start);
        iov.clear();
      };
      for (size_t j = task.entry; j < task.entry + task.count; ++j) {
        const size_t k = run_entries[j];
        const Entry& e = layout.entries[k];
        const uint64_t off = file_offset(k);
        const char* src = static_cast<const char*>(sources[k].const_data_ptr());
        const uint64_t nbytes = sources[k].nbytes();
        if (sums) sums->add(e.block, off - layout.blocks[e.block].offset_bytes, src, nbytes);
        if (off - end > sizeof(zeros)) {
          flush();
          batch_start = off;
        } else if (off > end) {
          iov.push_back({const_cast<char*>(zeros), static_cast<size_t>(off - end)});
        }
        iov.push_back({const_cast<char*>(src), static_cast<size_t>(nbytes)});
        end = off + nbytes;
        if (end - batch_start >= slice) {
          flush();
          batch_start = end;
        }
      }
      if (!iov.empty()) flush();
      return;
    }
    const Entry& e = layout.entries[task.entry];
    const Block& b = layout.blocks[e.block];
    const uint64_t in_block = e.offset * c10::elementSize(b.dtype);
    const uint64_t file_off = b.offset_bytes + in_block;
    if (task.bytes > 0) {
      const char* src = static_cast<const char*>(sources[task.entry].const_data_ptr());
      if (!sums) {
        out.pwrite_all(src + task.begin, task.bytes, file_off + task.begin);
        return;
      }
      // The checksum reads the tensor in user space, where memory that is gone (a mapped file
      // truncated since) raises SIGBUS: checked first through the kernel.
      check_readable(src + task.begin, task.bytes);
      // NOTE: checksumming a slice just before writing it lets the write copy bytes the
      // checksum left in the L2 cache, instead of reading the tensor from memory twice.
      for (uint64_t off = task.begin; off < task.begin + task.bytes; off += kChecksumSliceBytes) {
        const uint64_t n = std::min(kChecksumSliceBytes, task.begin + task.bytes - off);
        sums->add(e.block, in_block + off, src + off, n);
        out.pwrite_all(src + off, n, file_off + off);
      }
      return;
    }
    at::Tensor converted;
    at::Tensor buffer;  // given back to free_buffers once the slice is written
    std::optional<c10::StreamGuard> on_callers_stream;
    if (streams[task.entry]) on_callers_stream.emplace(*streams[task.entry]);
    uint64_t slice_off = 0;  // where the task's rows start, in bytes of the stored tensor
    try {
      at::Tensor src = sources[task.entry];
      if (task.rows > 0) {
        slice_off = task.begin * (src.numel() / src.size(0)) * c10::elementSize(b.dtype);
        src = src.narrow(0, static_cast<int64_t>(task.begin), task.rows);
      }
      if (src.device().is_cpu()) {
        // The conversion reads the tensor in user space, where memory that is gone (a mapped
        // file truncated since) raises SIGBUS: checked first through the kernel.
        uint64_t last = 0;  // the last element, counted from the first (strides are not negative)
        for (int64_t d = 0; d < src.dim(); ++d) last += uint64_t(src.size(d) - 1) * uint64_t(src.stride(d));
        check_readable(src.const_data_ptr(), (last + 1) * src.element_size());
      }
      src = src.resolve_conj().resolve_neg();
      // Same dtype: move the bits through an integer view of the same width, which every
      // dtype has (uint4 or float4_e2m1fn_x2 have no copy kernel of their own).
      const bool same = src.scalar_type() == b.dtype;
      if (same) src = src.view(bits_dtype(c10::elementSize(b.dtype)));
      const c10::ScalarType stored = same ? src.scalar_type() : b.dtype;
      const uint64_t nbytes = static_cast<uint64_t>(src.numel()) * c10::elementSize(stored);
      if (nbytes <= kWriteChunkBytes) {
        {
          std::lock_guard<std::mutex> lock(buffers_mutex);
          if (!free_buffers.empty()) {
            buffer = std::move(free_buffers.back());
            free_buffers.pop_back();
          }
        }
        if (!buffer.defined()) buffer = at::empty({static_cast<int64_t>(kWriteChunkBytes)}, at::kByte);
        converted = at::from_blob(buffer.data_ptr(), src.sizes(), at::TensorOptions().dtype(stored));
        converted.copy_(src);
      } else {
        converted = src.to(c10::Device(c10::kCPU), stored).contiguous();
      }
    } catch (const c10::Error& err) {
      throw std::invalid_argument(where(path, e.name) + " cannot be converted to " + dtype_name(b.dtype) + " on the CPU: " +
                                  err.what_without_backtrace());
    }
    out.pwrite_all(converted.const_data_ptr(), converted.nbytes(), file_off + slice_off);
    if (sums) sums->add(e.block, in_block + slice_off, converted.const_data_ptr(), converted.nbytes());
    if (buffer.defined()) {
      std::lock_guard<std::mutex> lock(buffers_mutex);
      free_buffers.push_back(std::move(buffer));
    }
  };
  parallel_for(tasks.size(), default_threads(num_threads), [&](size_t i) {
    try {
      write_task(i);
    } catch (const UnreadableMemory& err) {
      const Task& task = tasks[i];
      const std::string which =
          task.count == 0   ? where(path, layout.entries[task.entry].name)
          : task.count == 1 ? where(path, layout.entries[run_entries[task.entry]].name)
                            : "'" + path + "': one of the tensors '" + layout.entries[run_entries[task.entry]].name +
                                  "' to '" + layout.entries[run_entries[task.entry + task.count - 1]].name + "'";
      throw std::runtime_error(which + " could not be read (" + err.what() + "): its memory is gone, as when it "
                               "views a file that was truncated after it was loaded");
    }
  });

  if (sums) {
    const size_t reserved = footer.size();
    sums->store(layout);
    footer = footer_json(layout);
    footer.resize(reserved, ' ');
  }

  std::string trailer = footer;
  const uint64_t len = footer.size();
  for (int k = 0; k < 8; ++k) trailer += static_cast<char>((len >> (8 * k)) & 0xFF);
  trailer.append(kMagic, 8);
  out.pwrite_all(trailer.data(), trailer.size(), layout.payload_bytes);
  out.commit();
}

}  // namespace flashpack
