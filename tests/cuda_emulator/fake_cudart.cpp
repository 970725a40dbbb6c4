// An emulated CUDA runtime, preloaded in place of libcudart on machines without a GPU, so
// that the CUDA load path and tests/test_cuda.py run end to end on a CPU:
//
//   LD_PRELOAD=/path/libfake_cudart.so pytest tests/test_cuda.py
//
// "Device" memory is host memory. Every stream is a thread that runs its queue in order,
// so copies really are asynchronous: work queued by cudaMemcpyAsync runs later, after an
// optional random delay (FAKE_CUDA_DELAY_US), while the caller moves on. That makes the
// ordering mistakes a real GPU punishes visible here, and the emulator aborts with a
// message when it sees one:
//   - a host buffer that changes between cudaMemcpyAsync and the copy running (a staging
//     buffer refilled before its copy finished),
//   - a copy that runs after its pinned buffer was freed or its registered range
//     unregistered,
//   - overlapping or unmatched cudaHostRegister / cudaHostUnregister calls,
//   - copies into memory that is not a live device allocation.
// Kernels are not emulated: cudaLaunchKernel fails, so tests compare results on the CPU.
//
// Knobs: FAKE_CUDA_DEVICES (default 1), FAKE_CUDA_DELAY_US (default 0),
// FAKE_CUDA_REFUSE_REGISTER_AT=N (refuse the N-th read-only cudaHostRegister call, 1-based:
// a file's pages, not the staging ring), FAKE_CUDA_NO_READONLY_REGISTER=1 (report no
// cudaHostRegisterReadOnly support), FAKE_CUDA_REFUSE_WRITABLE_REGISTER=1 (refuse every
// cudaHostRegister without cudaHostRegisterReadOnly: the staging ring's),
// FAKE_CUDA_FAIL_UPLOAD_AT=N (fail the N-th host-to-device cudaMemcpyAsync, 1-based),
// FAKE_CUDA_FAIL_UNREGISTER_AT=N (fail the N-th cudaHostUnregister of a read-only range,
// 1-based, leaving the range registered).
//
// This is a test tool, not a model of a GPU's speed: timings under it mean nothing.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

namespace {

[[noreturn]] void die(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void die(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "fake cudart: ");
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
  va_end(ap);
  std::fflush(stderr);
  std::abort();
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

int device_count() {
  static const int n = env_int("FAKE_CUDA_DEVICES", 1);
  return n;
}

thread_local int current_device = 0;

uint64_t digest(const void* p, size_t n) {
  const unsigned char* b = static_cast<const unsigned char*>(p);
  uint64_t h = 1469598103934665603ull;
  size_t k = 0;
  for (; k + 8 <= n; k += 8) {
    uint64_t w;
    std::memcpy(&w, b + k, 8);
    h = (h ^ w) * 1099511628211ull;
  }
  for (; k < n; ++k) h = (h ^ b[k]) * 1099511628211ull;
  return h;
}

// ---- memory ----------------------------------------------------------------------------

enum class Kind { Pageable, Pinned, Registered, Device };

struct Range {
  size_t bytes;
  int device;              // device allocations only
  bool read_only = false;  // registrations only: cudaHostRegisterReadOnly (a file's pages)
};

std::mutex mem_mutex;
std::map<uintptr_t, Range> pinned_allocs, registered, device_allocs;

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::Pageable: return "pageable";
    case Kind::Pinned: return "pinned";
    case Kind::Registered: return "registered";
    case Kind::Device: return "device";
  }
  return "?";
}

bool within(const std::map<uintptr_t, Range>& m, uintptr_t p, size_t n) {
  auto it = m.upper_bound(p);
  if (it == m.begin()) return false;
  --it;
  return p >= it->first && p + n <= it->first + it->second.bytes;
}

Kind classify(const void* ptr, size_t n) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
  std::lock_guard<std::mutex> lock(mem_mutex);
  if (within(device_allocs, p, n)) return Kind::Device;
  if (within(pinned_allocs, p, n)) return Kind::Pinned;
  if (within(registered, p, n)) return Kind::Registered;
  return Kind::Pageable;
}

// ---- streams and events ------------------------------------------------------------------

struct Event {
  int device = current_device;
  std::mutex m;
  std::condition_variable cv;
  uint64_t recorded = 0;
  uint64_t completed = 0;
};

struct Stream {
  explicit Stream(int d) : device(d) {}
  int device;
  std::mutex m;
  std::condition_variable cv;
  std::deque<std::function<void()>> queue;
  uint64_t queued = 0;
  uint64_t done = 0;
  bool started = false;

  void push(std::function<void()> fn) {
    std::lock_guard<std::mutex> lock(m);
    if (!started) {
      started = true;
      std::thread([this] { loop(); }).detach();
    }
    queue.push_back(std::move(fn));
    ++queued;
    cv.notify_all();
  }

  void loop() {
    for (;;) {
      std::function<void()> fn;
      {
        std::unique_lock<std::mutex> lock(m);
        cv.wait(lock, [&] { return !queue.empty(); });
        fn = std::move(queue.front());
        queue.pop_front();
      }
      fn();
      std::lock_guard<std::mutex> lock(m);
      ++done;
      cv.notify_all();
    }
  }

  void synchronize() {
    std::unique_lock<std::mutex> lock(m);
    const uint64_t target = queued;
    cv.wait(lock, [&] { return done >= target; });
  }

  bool idle() {
    std::lock_guard<std::mutex> lock(m);
    return done == queued;
  }
};

std::mutex streams_mutex;
std::vector<Stream*> all_streams;  // never freed: their threads outlive everything

Stream* default_stream(int device) {
  static std::vector<Stream*>* defaults = [] {
    auto* v = new std::vector<Stream*>();
    for (int d = 0; d < device_count(); ++d) {
      v->push_back(new Stream(d));
      std::lock_guard<std::mutex> lock(streams_mutex);
      all_streams.push_back(v->back());
    }
    return v;
  }();
  return (*defaults)[device];
}

Stream* stream_of(cudaStream_t s) {
  const uintptr_t v = reinterpret_cast<uintptr_t>(s);
  if (v == 0 || v == reinterpret_cast<uintptr_t>(cudaStreamLegacy) ||
      v == reinterpret_cast<uintptr_t>(cudaStreamPerThread)) {
    return default_stream(current_device);
  }
  return reinterpret_cast<Stream*>(s);
}

void delay() {
  static const int max_us = env_int("FAKE_CUDA_DELAY_US", 0);
  if (max_us <= 0) return;
  thread_local std::mt19937 rng(std::random_device{}());
  std::this_thread::sleep_for(std::chrono::microseconds(rng() % static_cast<unsigned>(max_us)));
}

void sync_device(int device) {
  std::vector<Stream*> streams;
  {
    std::lock_guard<std::mutex> lock(streams_mutex);
    streams = all_streams;
  }
  for (Stream* s : streams) {
    if (s->device == device) s->synchronize();
  }
}

cudaError_t copy(void* dst, const void* src, size_t n, cudaStream_t stream, bool async) {
  if (n == 0) return cudaSuccess;
  const Kind from = classify(src, n);
  const Kind to = classify(dst, n);
  if (from != Kind::Device && to != Kind::Device) {
    std::memcpy(dst, src, n);
    return cudaSuccess;
  }
  Stream* s = stream_of(stream);
  if (to == Kind::Device) {
    std::lock_guard<std::mutex> lock(mem_mutex);
    auto it = device_allocs.upper_bound(reinterpret_cast<uintptr_t>(dst)); --it;
    if (it->second.device != s->device) die("copy into device %d memory on a stream of device %d", it->second.device, s->device);
  }
  // Real CUDA copies pageable host memory synchronously with respect to the host.
  const bool waits = !async || (from == Kind::Pageable) || (to == Kind::Pageable);
  const uint64_t before = from == Kind::Device ? 0 : digest(src, n);
  s->push([=] {
    delay();
    const Kind from_now = classify(src, n);
    if (from_now != from) {
      die("a copy of %zu bytes from %s memory %p ran after that memory became %s (freed or unregistered while "
          "the copy was queued)", n, kind_name(from), src, kind_name(from_now));
    }
    if (classify(dst, n) != to) die("a copy of %zu bytes into %p ran after its destination was freed", n, dst);
    if (from != Kind::Device && digest(src, n) != before) {
      die("the %zu-byte %s source %p of a queued copy changed before the copy ran (buffer reused too early)", n,
          kind_name(from), src);
    }
    std::memcpy(dst, src, n);
  });
  if (waits) s->synchronize();
  return cudaSuccess;
}

}  // namespace

// ---- the runtime API ---------------------------------------------------------------------

extern "C" {

cudaError_t cudaGetDeviceCount(int* count) {
  *count = device_count();
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = current_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= device_count()) return cudaErrorInvalidDevice;
  current_device = device;
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
  sync_device(current_device);
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* v) {
  *v = 13000;
  return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 13000;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp* prop, int device) {
  if (device < 0 || device >= device_count()) return cudaErrorInvalidDevice;
  std::memset(prop, 0, sizeof(*prop));
  std::snprintf(prop->name, sizeof(prop->name), "Emulated GPU %d (fake cudart)", device);
  prop->major = 9;
  prop->minor = 0;
  prop->totalGlobalMem = size_t(80) << 30;
  prop->multiProcessorCount = 132;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->maxThreadsPerMultiProcessor = 2048;
  prop->sharedMemPerBlock = 48 << 10;
  prop->sharedMemPerBlockOptin = 227 << 10;
  prop->regsPerBlock = 65536;
  prop->l2CacheSize = 50 << 20;
  prop->pciBusID = device;
  prop->hostRegisterSupported = 1;
  prop->hostRegisterReadOnlySupported = env_int("FAKE_CUDA_NO_READONLY_REGISTER", 0) ? 0 : 1;
  prop->unifiedAddressing = 1;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= device_count()) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrHostRegisterSupported: *value = 1; break;
    case cudaDevAttrHostRegisterReadOnlySupported: *value = env_int("FAKE_CUDA_NO_READONLY_REGISTER", 0) ? 0 : 1; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMultiProcessorCount: *value = 132; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrUnifiedAddressing: *value = 1; break;
    default: *value = 0;
  }
  return cudaSuccess;
}

cudaError_t cudaDeviceGetStreamPriorityRange(int* least, int* greatest) {
  if (least) *least = 0;
  if (greatest) *greatest = -5;
  return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total) {
  *free_bytes = size_t(80) << 30;
  *total = size_t(80) << 30;
  return cudaSuccess;
}

cudaError_t cudaDeviceCanAccessPeer(int* can, int, int) {
  *can = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceEnablePeerAccess(int, unsigned int) { return cudaSuccess; }

cudaError_t cudaDeviceGetPCIBusId(char* bus, int len, int device) {
  std::snprintf(bus, static_cast<size_t>(len), "0000:%02x:00.0", device);
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaPeekAtLastError(void) { return cudaSuccess; }

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorHostMemoryAlreadyRegistered: return "part or all of the requested memory range is already mapped";
    case cudaErrorHostMemoryNotRegistered: return "pointer does not correspond to a registered memory region";
    case cudaErrorNotSupported: return "operation not supported (fake cudart)";
    default: return "emulated CUDA error";
  }
}

const char* cudaGetErrorName(cudaError_t e) { return cudaGetErrorString(e); }

cudaError_t cudaGetDriverEntryPointByVersion(const char*, void** fn, unsigned int, unsigned long long,
                                             cudaDriverEntryPointQueryResult* status) {
  if (fn) *fn = nullptr;
  if (status) *status = cudaDriverEntryPointSymbolNotFound;
  return cudaErrorNotSupported;
}

// Memory.

cudaError_t cudaMalloc(void** ptr, size_t size) {
  const size_t bytes = (std::max<size_t>(size, 1) + 511) / 512 * 512;
  void* p = std::aligned_alloc(512, bytes);
  if (p == nullptr) return cudaErrorMemoryAllocation;
  std::lock_guard<std::mutex> lock(mem_mutex);
  device_allocs[reinterpret_cast<uintptr_t>(p)] = {bytes, current_device};
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  if (ptr == nullptr) return cudaSuccess;
  sync_device(current_device);  // as the real one does
  {
    std::lock_guard<std::mutex> lock(mem_mutex);
    if (device_allocs.erase(reinterpret_cast<uintptr_t>(ptr)) == 0) die("cudaFree(%p): not a device allocation", ptr);
  }
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaHostAlloc(void** ptr, size_t size, unsigned int) {
  const size_t bytes = (std::max<size_t>(size, 1) + 4095) / 4096 * 4096;
  void* p = std::aligned_alloc(4096, bytes);
  if (p == nullptr) return cudaErrorMemoryAllocation;
  std::lock_guard<std::mutex> lock(mem_mutex);
  pinned_allocs[reinterpret_cast<uintptr_t>(p)] = {bytes, -1};
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaMallocHost(void** ptr, size_t size) { return cudaHostAlloc(ptr, size, 0); }

cudaError_t cudaFreeHost(void* ptr) {
  if (ptr == nullptr) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lock(mem_mutex);
    if (pinned_allocs.erase(reinterpret_cast<uintptr_t>(ptr)) == 0) die("cudaFreeHost(%p): not a pinned allocation", ptr);
  }
  // Not freed: a queued copy that still reads it must find it classified as pageable and
  // report the mistake, rather than read reused memory.
  return cudaSuccess;
}

cudaError_t cudaHostRegister(void* ptr, size_t size, unsigned int flags) {
  static std::atomic<int> calls{0};
  static const int refuse_at = env_int("FAKE_CUDA_REFUSE_REGISTER_AT", 0);
  const bool read_only = (flags & cudaHostRegisterReadOnly) != 0;
  if (read_only && refuse_at > 0 && ++calls == refuse_at) return cudaErrorNotSupported;
  if (read_only && env_int("FAKE_CUDA_NO_READONLY_REGISTER", 0)) return cudaErrorNotSupported;
  if (!read_only && env_int("FAKE_CUDA_REFUSE_WRITABLE_REGISTER", 0)) return cudaErrorNotSupported;
  if (size == 0) return cudaErrorInvalidValue;
  const uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
  // Touch every page, as pinning does (and as a real driver would fault them in).
  volatile unsigned char sink = 0;
  for (size_t k = 0; k < size; k += 4096) sink ^= static_cast<const unsigned char*>(ptr)[k];
  (void)sink;
  std::lock_guard<std::mutex> lock(mem_mutex);
  // Whole pages: two ranges sharing a page overlap for the driver.
  const uintptr_t first = p / 4096 * 4096;
  const uintptr_t last = (p + size + 4095) / 4096 * 4096;
  for (const auto& [base, r] : registered) {
    const uintptr_t b0 = base / 4096 * 4096;
    const uintptr_t b1 = (base + r.bytes + 4095) / 4096 * 4096;
    if (first < b1 && b0 < last) return cudaErrorHostMemoryAlreadyRegistered;
  }
  registered[p] = {size, -1, read_only};
  return cudaSuccess;
}

cudaError_t cudaHostUnregister(void* ptr) {
  static std::atomic<int> calls{0};
  static const int fail_at = env_int("FAKE_CUDA_FAIL_UNREGISTER_AT", 0);
  std::lock_guard<std::mutex> lock(mem_mutex);
  auto it = registered.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == registered.end()) return cudaErrorHostMemoryNotRegistered;
  if (it->second.read_only && fail_at > 0 && ++calls == fail_at) return cudaErrorUnknown;
  registered.erase(it);
  return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes* attr, const void* ptr) {
  std::memset(attr, 0, sizeof(*attr));
  const uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
  std::lock_guard<std::mutex> lock(mem_mutex);
  auto device_it = device_allocs.upper_bound(p);
  if (device_it != device_allocs.begin() && within(device_allocs, p, 1)) {
    --device_it;
    attr->type = cudaMemoryTypeDevice;
    attr->device = device_it->second.device;
    attr->devicePointer = const_cast<void*>(ptr);
  } else if (within(pinned_allocs, p, 1) || within(registered, p, 1)) {
    attr->type = cudaMemoryTypeHost;
    attr->hostPointer = const_cast<void*>(ptr);
    attr->devicePointer = const_cast<void*>(ptr);
  } else {
    attr->type = cudaMemoryTypeUnregistered;
    attr->device = -2;
  }
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, enum cudaMemcpyKind) {
  sync_device(current_device);
  return copy(dst, src, n, nullptr, false);
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, enum cudaMemcpyKind, cudaStream_t stream) {
  static std::atomic<int> uploads{0};
  static const int fail_at = env_int("FAKE_CUDA_FAIL_UPLOAD_AT", 0);
  if (fail_at > 0 && classify(src, n) != Kind::Device && classify(dst, n) == Kind::Device && ++uploads == fail_at) {
    return cudaErrorInvalidValue;
  }
  return copy(dst, src, n, stream, true);
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t n, cudaStream_t stream) {
  stream_of(stream)->push([=] { std::memset(dst, value, n); });
  return cudaSuccess;
}

cudaError_t cudaMemset(void* dst, int value, size_t n) {
  sync_device(current_device);
  std::memset(dst, value, n);
  return cudaSuccess;
}

// Streams.

cudaError_t cudaStreamCreateWithPriority(cudaStream_t* s, unsigned int, int) {
  auto* st = new Stream(current_device);
  {
    std::lock_guard<std::mutex> lock(streams_mutex);
    all_streams.push_back(st);
  }
  *s = reinterpret_cast<cudaStream_t>(st);
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned int flags) {
  return cudaStreamCreateWithPriority(s, flags, 0);
}

cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithPriority(s, 0, 0); }

cudaError_t cudaStreamDestroy(cudaStream_t s) {
  stream_of(s)->synchronize();  // kept alive: its thread may still hold it
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  stream_of(s)->synchronize();
  return cudaSuccess;
}

cudaError_t cudaStreamQuery(cudaStream_t s) { return stream_of(s)->idle() ? cudaSuccess : cudaErrorNotReady; }

cudaError_t cudaStreamGetPriority(cudaStream_t, int* priority) {
  *priority = 0;
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t, enum cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

cudaError_t cudaStreamGetCaptureInfo(cudaStream_t, enum cudaStreamCaptureStatus* status, unsigned long long* id,
                                     cudaGraph_t* graph, const cudaGraphNode_t** deps, const cudaGraphEdgeData** edges,
                                     size_t* num_deps) {
  *status = cudaStreamCaptureStatusNone;
  if (id) *id = 0;
  if (graph) *graph = nullptr;
  if (deps) *deps = nullptr;
  if (edges) *edges = nullptr;
  if (num_deps) *num_deps = 0;
  return cudaSuccess;
}

cudaError_t cudaThreadExchangeStreamCaptureMode(enum cudaStreamCaptureMode*) { return cudaSuccess; }

cudaError_t cudaLaunchHostFunc(cudaStream_t s, cudaHostFn_t fn, void* data) {
  stream_of(s)->push([=] { fn(data); });
  return cudaSuccess;
}

// Events.

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned int) {
  *e = reinterpret_cast<cudaEvent_t>(new Event());
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, 0); }

cudaError_t cudaEventDestroy(cudaEvent_t) {
  return cudaSuccess;  // leaked on purpose: a queued record may still point at it
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  auto* e = reinterpret_cast<Event*>(event);
  if (stream_of(stream)->device != e->device) die("cudaEventRecord: event of device %d recorded on a stream of device %d", e->device, stream_of(stream)->device);
  uint64_t target;
  {
    std::lock_guard<std::mutex> lock(e->m);
    target = ++e->recorded;
  }
  stream_of(stream)->push([e, target] {
    std::lock_guard<std::mutex> lock(e->m);
    e->completed = std::max(e->completed, target);
    e->cv.notify_all();
  });
  return cudaSuccess;
}

cudaError_t cudaEventRecordWithFlags(cudaEvent_t event, cudaStream_t stream, unsigned int) {
  return cudaEventRecord(event, stream);
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  auto* e = reinterpret_cast<Event*>(event);
  std::unique_lock<std::mutex> lock(e->m);
  const uint64_t target = e->recorded;
  e->cv.wait(lock, [&] { return e->completed >= target; });
  return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t event) {
  auto* e = reinterpret_cast<Event*>(event);
  std::lock_guard<std::mutex> lock(e->m);
  return e->completed >= e->recorded ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) {
  *ms = 0.0f;
  return cudaSuccess;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int) {
  auto* e = reinterpret_cast<Event*>(event);
  uint64_t target;
  {
    std::lock_guard<std::mutex> lock(e->m);
    target = e->recorded;
  }
  stream_of(stream)->push([e, target] {
    std::unique_lock<std::mutex> lock(e->m);
    e->cv.wait(lock, [&] { return e->completed >= target; });
  });
  return cudaSuccess;
}

// Kernels are not emulated.
cudaError_t cudaLaunchKernel(const void*, dim3, dim3, void**, size_t, cudaStream_t) {
  std::fprintf(stderr, "fake cudart: a kernel was launched; kernels are not emulated (compare on the CPU)\n");
  return cudaErrorNotSupported;
}

}  // extern "C"
