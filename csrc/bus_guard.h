// Copying through a file mapping without dying of SIGBUS.
//
// Touching a page of a shared or private file mapping that the file no longer has (it was
// truncated under the mapping), or that the filesystem cannot give (a disk error, a
// filesystem shut down), raises SIGBUS, which kills the process. A copy made under the guard
// reports such a fault instead, and the caller redoes the work with read() or write(), which
// name the problem as an error.
#pragma once

#include <cstddef>

namespace flashpack {

// Whether a SIGBUS comes to the guard's handler now. The first call installs it, chained to
// the handler there was; a later call installs it again once the signal is back at its
// default action. A handler installed since (Python's faulthandler enabled after the first
// call) is left in place: the guard is then off, and callers must not copy through a mapping.
bool bus_guard_in_place();

// How a guarded copy ended.
struct GuardedCopy {
  bool copied = false;          // every byte copied
  const char* fault = nullptr;  // where a SIGBUS stopped the copy part way; nullptr if none
};

// Copies n bytes from src to dst under the guard, with non-temporal stores where the CPU has
// them: dst is memory this CPU will not read again (a pinned buffer a GPU's DMA reads next,
// or file pages the disk's does). A SIGBUS raised by this thread's copy at an address in
// [begin, end), or at any address when begin is nullptr, stops it: `copied` is false, `fault` says where, and dst holds some of the bytes. With no guard
// slot free (over 1024 copies at once), nothing is copied and `fault` is nullptr. Call only
// while bus_guard_in_place() holds.
GuardedCopy copy_guarded(char* dst, const char* src, size_t n, const char* begin = nullptr,
                         const char* end = nullptr);

}  // namespace flashpack
