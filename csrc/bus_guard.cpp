// The SIGBUS guard (bus_guard.h). While a thread copies under it, a slot names the thread
// and the range it guards; a SIGBUS the kernel raises in that thread for an address in that
// range jumps back to the guard. Any other SIGBUS goes where it went before: the previous
// handler, or the default action.
#include "bus_guard.h"

#include <setjmp.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>

namespace flashpack {

namespace {

struct BusGuard {
  sigjmp_buf env;
  const char* begin;  // nullptr: any address
  const char* end;
  const char* volatile fault;  // set by the handler before it jumps back
};

// The guards of the copies running now, by thread id. NOTE: not a thread_local: in a
// library loaded with dlopen, a thread's first access to one may allocate, which a signal
// handler must not do (the fault may have come in the middle of malloc).
constexpr size_t kGuardSlots = 1024;
struct GuardSlot {
  std::atomic<pid_t> tid{0};
  std::atomic<BusGuard*> guard{nullptr};
};
GuardSlot g_guards[kGuardSlots];
struct sigaction g_previous_bus {};

pid_t this_thread_id() {
  return static_cast<pid_t>(::syscall(SYS_gettid));  // async-signal-safe, unlike most of libc
}

void on_sigbus(int sig, siginfo_t* info, void* context) {
  // si_code > 0: raised by the kernel for a fault, not sent by kill() or raise().
  if (info->si_code > 0) {
    const pid_t me = this_thread_id();
    const char* addr = static_cast<const char*>(info->si_addr);
    for (GuardSlot& slot : g_guards) {
      if (slot.tid.load(std::memory_order_acquire) != me) continue;
      BusGuard* guard = slot.guard.load(std::memory_order_relaxed);
      // A machine check reported ahead of use (BUS_MCEERR_AO) is not this copy's fault.
      const bool caught = guard != nullptr && (guard->begin == nullptr ? info->si_code != BUS_MCEERR_AO
                                                                       : addr >= guard->begin && addr < guard->end);
      if (caught) {
        guard->fault = addr;
        siglongjmp(guard->env, 1);
      }
      break;
    }
  }
  if ((g_previous_bus.sa_flags & SA_SIGINFO) != 0 && g_previous_bus.sa_sigaction != nullptr) {
    g_previous_bus.sa_sigaction(sig, info, context);
    return;
  }
  if (g_previous_bus.sa_handler != SIG_DFL && g_previous_bus.sa_handler != SIG_IGN) {
    g_previous_bus.sa_handler(sig);
    return;
  }
  // The default action (a fault's SIGBUS cannot be ignored): restored, then the faulting
  // access runs again on return, or a sent signal is raised again, and the process dies as it
  // would have without this handler.
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(SIGBUS, &dfl, nullptr);
  if (info->si_code <= 0) raise(sig);
}

// Copies n bytes into memory that this CPU will not read again: with non-temporal stores on
// x86-64, so the destination's lines are written to memory without first being read into the
// cache; memcpy elsewhere. Ends with a store fence, so the bytes are in memory before a copy
// to a device is queued.
void copy_nontemporal(char* dst, const char* src, size_t n) {
#if defined(__x86_64__)
  const size_t head = std::min(n, static_cast<size_t>(-reinterpret_cast<uintptr_t>(dst) % 16));
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  n -= head;
  const size_t body = n / 64 * 64;
  for (size_t i = 0; i < body; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
  }
  std::memcpy(dst + body, src + body, n - body);
  _mm_sfence();
#else
  std::memcpy(dst, src, n);
#endif
}

}  // namespace

bool bus_guard_in_place() {
  static std::mutex mutex;
  static bool installed = false;
  std::lock_guard<std::mutex> lock(mutex);
  struct sigaction current {};
  if (sigaction(SIGBUS, nullptr, &current) != 0) return false;
  if ((current.sa_flags & SA_SIGINFO) != 0 && current.sa_sigaction == &on_sigbus) return true;
  const bool by_default = (current.sa_flags & SA_SIGINFO) == 0 && current.sa_handler == SIG_DFL;
  if (installed && !by_default) return false;
  // g_previous_bus changes only while on_sigbus is not installed, so no handler reads it meanwhile.
  struct sigaction sa {};
  sa.sa_sigaction = &on_sigbus;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  if (sigaction(SIGBUS, &sa, &g_previous_bus) != 0) return false;
  installed = true;
  return true;
}

GuardedCopy copy_guarded(char* dst, const char* src, size_t n, const char* begin, const char* end) {
  const pid_t me = this_thread_id();
  GuardSlot* slot = nullptr;
  for (GuardSlot& s : g_guards) {
    pid_t free_tid = 0;
    if (s.tid.compare_exchange_strong(free_tid, -1, std::memory_order_acquire)) {  // -1: being set up
      slot = &s;
      break;
    }
  }
  if (slot == nullptr) return {};
  BusGuard guard;
  guard.begin = begin;
  guard.end = end;
  guard.fault = nullptr;
  volatile bool copied = false;  // volatile: read after a jump back to sigsetjmp
  // Saves the signal mask: the jump leaves the handler with SIGBUS blocked otherwise.
  if (sigsetjmp(guard.env, 1) == 0) {
    slot->guard.store(&guard, std::memory_order_relaxed);
    slot->tid.store(me, std::memory_order_release);  // the guard is in place before the copy starts
    std::atomic_signal_fence(std::memory_order_seq_cst);
    copy_nontemporal(dst, src, n);
    std::atomic_signal_fence(std::memory_order_seq_cst);
    copied = true;
  } else {
    std::atomic_thread_fence(std::memory_order_seq_cst);  // orders the stores the copy made
  }
  slot->guard.store(nullptr, std::memory_order_relaxed);
  slot->tid.store(0, std::memory_order_release);
  return {copied, copied ? nullptr : guard.fault};
}

}  // namespace flashpack
