// Moving bytes between files and memory: opening, mapping, parallel positional reads,
// and crash-safe writes (temporary file + fsync + rename).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>

#include <sys/mman.h>
#include <sys/uio.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14; older headers lack the name
#endif

namespace flashpack {

// A file opened for reading. Refuses directories and other non-regular files.
class InputFile {
 public:
  explicit InputFile(const std::string& path, bool direct = false);
  ~InputFile();
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;

  int fd() const { return fd_; }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  int fd_ = -1;
  uint64_t size_ = 0;
  std::string path_;
};

// A private, copy-on-write mapping of a whole file. Tensors viewing it hold a
// shared_ptr, so the mapping lives as long as any of them. Writes to the pages
// stay in this process and never reach the file.
class Mapping {
 public:
  Mapping(const InputFile& file);
  ~Mapping();
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  char* data() const { return static_cast<char*>(addr_); }
  size_t size() const { return size_; }

 private:
  void* addr_ = nullptr;
  size_t size_ = 0;
};

// Reads exactly n bytes at offset, retrying short reads and EINTR.
// Throws std::runtime_error naming the file if the file ends early or read fails.
void pread_exact(int fd, void* buf, size_t n, uint64_t offset, const std::string& path);

// Asks for transparent huge pages over the whole 2 MiB pages inside [p, p + n), memory not
// yet touched that is about to be filled: one page fault per 2 MiB instead of one per 4 KiB.
// Advice only; nothing happens where the kernel has huge pages off.
void advise_huge_pages(void* p, size_t n);

// Runs fn(0..tasks-1) on up to `threads` threads (the caller's included); where no more
// threads can be started, on those that could (at least the caller's). The first
// exception thrown by any task is rethrown after all threads have stopped; tasks not
// yet started when it happened are skipped.
void parallel_for(size_t tasks, int threads, const std::function<void(size_t)>& fn);

// The number of worker threads to use when the caller passed 0 (auto).
int default_threads(int64_t requested);

// A non-negative integer from the environment, 0 when unset or empty; throws
// std::invalid_argument naming the variable for anything else.
int64_t env_count(const char* name);

// How much a durable save writes before it starts that range's write-back.
inline constexpr size_t kWritebackSliceBytes = size_t(1) << 20;

// Thrown by AtomicWriter when the memory to be written cannot be read (EFAULT), and by
// check_readable: the caller knows which tensor that memory holds.
struct UnreadableMemory : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Has the kernel fault in the pages of [p, p + n) (MADV_POPULATE_READ) and throws
// UnreadableMemory where one cannot be had (a mapping of a file truncated since, a disk
// error), before code in user space reads them and dies of SIGBUS. Memory cut after the
// check still raises SIGBUS. Checks nothing where the kernel cannot populate the range
// (before Linux 5.14; a device's or a driver's mapping).
void check_readable(const void* p, size_t n);

// Writes a new file at `path` atomically: the bytes go to a temporary file in the same
// directory; commit() fsyncs it, renames it over `path` and fsyncs the directory. If the
// writer is destroyed without commit() (an exception, say), the temporary file is
// removed and whatever was at `path` is untouched. With durable=false there is no fsync:
// other processes still see the old file or the new one, but a power loss may leave
// neither on disk.
//
// Where the file's space could be reserved on a local filesystem (ext4, XFS, tmpfs),
// ranges of kWritebackSliceBytes or more go in through a shared, writable mapping of the
// file rather than pwrite(): ext4, XFS and tmpfs hold an inode's lock through each
// write(), so threads writing one file take turns, while copies into the mapping run side
// by side.
// FLASHPACK_SAVE_MAPPED=0 writes with pwrite() everywhere.
class AtomicWriter {
 public:
  AtomicWriter(const std::string& path, uint64_t size, bool durable = true);
  ~AtomicWriter();
  AtomicWriter(const AtomicWriter&) = delete;
  AtomicWriter& operator=(const AtomicWriter&) = delete;

  // Thread-safe: distinct ranges may be written from several threads at once. A durable
  // writer writes a range of kWritebackSliceBytes or more a slice of that size at a time,
  // starting each slice's write-back (start_writeback).
  void pwrite_all(const void* buf, size_t n, uint64_t offset) const;
  // Writes `count` buffers one after the other from `offset`; may change the entries of
  // `iov`. Thread-safe, as pwrite_all.
  void pwritev_all(iovec* iov, size_t count, uint64_t offset) const;
  // Starts writing a range already written to the disk, without waiting, so that commit()'s
  // fsync has less left to do. Nothing without durable.
  void start_writeback(uint64_t offset, uint64_t n) const;
  void commit();

 private:
  // The file that is replaced: path_, or where path_ leads when it is a symbolic link.
  const std::string& target() const { return target_.empty() ? path_ : target_; }
  // Maps the reserved file for writing (map_), where that is safe and allowed.
  void map_for_writes(uint64_t size);
  // Writes with pwrite(), retrying short writes.
  void write_at(const char* p, size_t n, uint64_t offset) const;
  // Copies into map_ under the SIGBUS guard; where a fault stops the copy, writes again
  // with pwrite(), which names the problem as an error.
  void write_mapped(const char* p, size_t n, uint64_t offset) const;
  // Drops this process's page-table entries over a range written through map_ (the file's
  // pages stay in the page cache), so that its resident memory stays small.
  void drop_mapped(uint64_t offset, uint64_t n) const;

  std::string path_;
  std::string target_;
  std::string tmp_path_;
  int fd_ = -1;
  uint64_t size_ = 0;
  bool durable_ = true;
  bool committed_ = false;
  bool local_reserved_ = false;  // fallocate reserved the whole file on ext4, XFS or tmpfs
  char* map_ = nullptr;  // the whole file (size_ bytes), shared and writable; nullptr: writes use pwrite()
};

}  // namespace flashpack
