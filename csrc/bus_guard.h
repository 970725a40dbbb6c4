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
  bool copied = false;           // every byte copied
  const char* fault = nullptr;   // where a SIGBUS stopped the copy part way; nullptr if none
};

// Runs copy(arg), which must do nothing but copy memory, under the guard. A SIGBUS raised by
// this thread's copy at an address in [begin, end), or at any address when begin is nullptr,
// stops it: `copied` is false, `fault` says where, and the destination holds some of the
// bytes. With no guard slot free (over 1024 copies at once), nothing is copied and `fault` is
// nullptr. Call only while bus_guard_in_place() holds.
GuardedCopy run_guarded(void (*copy)(void*), void* arg, const char* begin = nullptr, const char* end = nullptr);

// Copies n bytes from src to dst under the guard, with non-temporal stores when
// `nontemporal` (copy_nontemporal); as run_guarded.
GuardedCopy copy_guarded(char* dst, const char* src, size_t n, bool nontemporal, const char* begin = nullptr,
                         const char* end = nullptr);

// Copies n bytes into memory that this CPU will not read again: with non-temporal stores on
// x86-64, so the destination's lines are written to memory without first being read into the
// cache (a device's DMA reads them next, not this core); memcpy elsewhere. Ends with a store
// fence, so the bytes are in memory before a copy to a device is queued.
void copy_nontemporal(char* dst, const char* src, size_t n);

}  // namespace flashpack
