// libFuzzer target: the whole CPU load (csrc/load_cpu.cpp: open, read_layout, map or
// read the blocks, make_views) on arbitrary file contents.
//
// Every input must end in std::invalid_argument or std::runtime_error naming the file
// (anything else escaping, a c10::Error say, reaches users without the file's name),
// or in tensors that agree with the footer: the mapped load, the copying load (which reads
// the index on another thread while it reads the blocks, load_blocks_first) and the
// input bytes at the footer's offsets must all be equal. Reading the copy and the
// input (both on the heap) lets AddressSanitizer catch any read past a block.
#include "check_error.h"
#include "io.h"
#include "load.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>

namespace {

using flashpack_fuzz::broken;

// The input lives in one memory file, rewritten for each run: no disk I/O, and the
// loader opens it by path like any other file.
const std::string& input_path() {
  static const std::string path = [] {
    const int fd = memfd_create("fuzz.flashpack", MFD_CLOEXEC);
    if (fd < 0) broken("memfd_create failed");
    return "/proc/self/fd/" + std::to_string(fd);
  }();
  return path;
}

void write_input(const uint8_t* data, size_t size) {
  const int fd = std::stoi(input_path().substr(std::strlen("/proc/self/fd/")));
  if (ftruncate(fd, 0) != 0) broken("ftruncate failed");
  size_t done = 0;
  while (done < size) {
    const ssize_t n = pwrite(fd, data + done, size - done, static_cast<off_t>(done));
    if (n <= 0) broken("pwrite failed");
    done += static_cast<size_t>(n);
  }
}

// Loads with the given options; returns false if the loader rejected the file properly.
bool try_load(bool copy, std::vector<at::Tensor>* out, flashpack::Layout* layout) {
  flashpack::LoadOptions opts;
  opts.copy = copy;
  opts.num_threads = 1;
  opts.index_ahead_bytes = 1;  // a copying load reads every index while its blocks move
  try {
    *out = flashpack::load_cpu(input_path(), opts, layout);
    return true;
  } catch (const std::invalid_argument& e) {
    flashpack_fuzz::check_error(e.what(), input_path());
  } catch (const std::runtime_error& e) {
    flashpack_fuzz::check_error(e.what(), input_path());
  } catch (const std::exception& e) {
    broken(std::string("unexpected exception type: ") + e.what());
  }
  return false;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  write_input(data, size);
  std::vector<at::Tensor> mapped, copied;
  flashpack::Layout layout, layout2;
  const bool ok_mapped = try_load(false, &mapped, &layout);
  const bool ok_copied = try_load(true, &copied, &layout2);
  if (ok_mapped != ok_copied) broken("the mapped and the copying load disagree on whether the file is valid");
  if (!ok_mapped) return 0;
  if (mapped.size() != layout.entries.size() || copied.size() != layout.entries.size()) broken("tensor count");
  {
    // With verify: the checksum keys parsed and the payload checked (a file without
    // checksums is an error too, which must name the file as well).
    flashpack::LoadOptions opts;
    opts.verify = true;
    opts.num_threads = 1;
    try {
      flashpack::load_cpu(input_path(), opts, nullptr);
    } catch (const std::invalid_argument& e) {
      flashpack_fuzz::check_error(e.what(), input_path());
    } catch (const std::runtime_error& e) {
      flashpack_fuzz::check_error(e.what(), input_path());
    }
  }

  for (size_t k = 0; k < layout.entries.size(); ++k) {
    const flashpack::Entry& e = layout.entries[k];
    const flashpack::Block& b = layout.blocks[e.block];
    const uint64_t esize = c10::elementSize(b.dtype);
    for (const at::Tensor* t : {&mapped[k], &copied[k]}) {
      if (t->scalar_type() != b.dtype) broken("dtype differs from the footer for '" + e.name + "'");
      if (t->sizes() != c10::IntArrayRef(e.shape)) broken("shape differs from the footer for '" + e.name + "'");
      if (!t->is_contiguous()) broken("'" + e.name + "' is not contiguous");
      const uint64_t end = (static_cast<uint64_t>(t->storage_offset()) + static_cast<uint64_t>(t->numel())) * esize;
      if (end > t->storage().nbytes()) broken("'" + e.name + "' reaches past its storage");
    }
    const uint64_t nbytes = e.length * esize;
    const uint64_t file_off = b.offset_bytes + e.offset * esize;
    if (file_off + nbytes > size) broken("'" + e.name + "' lies past the end of the input");
    if (nbytes == 0) continue;
    const void* m = mapped[k].const_data_ptr();
    const void* c = copied[k].const_data_ptr();
    if (std::memcmp(c, data + file_off, nbytes) != 0) broken("copied bytes differ from the file for '" + e.name + "'");
    if (std::memcmp(m, data + file_off, nbytes) != 0) broken("mapped bytes differ from the file for '" + e.name + "'");
  }
  return 0;
}
