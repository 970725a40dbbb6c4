#include "cuda/pinned_pool.h"

#include "io.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include <sys/mman.h>

#include <chrono>
#include <mutex>
#include <set>

namespace flashpack::cuda {

namespace {

class Pool {
 public:
  PinnedLease lease(size_t bytes) {
    char* stale = nullptr;
    size_t stale_bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (idle_ != nullptr && idle_bytes_ >= bytes) {
        return PinnedLease(std::exchange(idle_, nullptr), std::exchange(idle_bytes_, 0));
      }
      // Too small for this load: free it rather than hold both.
      stale = std::exchange(idle_, nullptr);
      stale_bytes = std::exchange(idle_bytes_, 0);
    }
    free_pinned(stale, stale_bytes);
    char* p = allocate_pinned(bytes);
    stats().pinned.add(static_cast<int64_t>(bytes));
    return PinnedLease(p, bytes);
  }

  void give_back(char* data, size_t bytes) noexcept {
    // A ring comes back from a load, on the thread that ran it, whose current device has a
    // context; freeing the ring later, from elsewhere, happens on that device.
    int device = -1;
    if (cudaGetDevice(&device) != cudaSuccess) {
      (void)cudaGetLastError();
      device = -1;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // Keep the larger of the two: the next load of that size then allocates nothing.
      if (bytes > idle_bytes_) {
        std::swap(data, idle_);
        std::swap(bytes, idle_bytes_);
        idle_device_ = device;
      }
    }
    free_pinned(data, bytes);
  }

  int64_t release() {
    char* data = nullptr;
    size_t bytes = 0;
    int device = -1;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      data = std::exchange(idle_, nullptr);
      bytes = std::exchange(idle_bytes_, 0);
      device = idle_device_;
    }
    // NOTE: from a thread whose current device is one the process never used (device 0,
    // in a process that loads to "cuda:1"), cudaFreeHost would create a context there,
    // hundreds of MiB of that GPU's memory.
    c10::cuda::OptionalCUDAGuard guard;
    if (data != nullptr && device >= 0) {
      try {
        guard.set_index(static_cast<c10::DeviceIndex>(device));
      } catch (const std::exception& e) {
        // Freed from the current device all the same: a ring kept back would stay counted.
        TORCH_WARN("flashpack: freeing the idle pinned ring: ", e.what());
      }
    }
    free_pinned(data, bytes);
    return static_cast<int64_t>(bytes);
  }

 private:
  // NOTE: the ring is ordinary anonymous memory registered with the driver rather than
  // cudaHostAlloc's. Direct (O_DIRECT) reads land in it, and the kernel pins the pages of a
  // direct read: cudaHostAlloc's memory is a mapping of the driver's own, which it may refuse
  // to pin (EFAULT, and every direct read would fall back to a buffered one), while
  // registered anonymous pages are plain user memory. DMA runs at the same speed from
  // either. Portable, so a ring allocated while loading to one GPU is pinned for every GPU the
  // process later loads to. Not inherited by forked children (DataLoader workers): each
  // would otherwise get a copy of the pinned pages at fork.
  char* allocate_pinned(size_t bytes) {
    int device = 0;
    int supported = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&supported, cudaDevAttrHostRegisterSupported, device));
    if (supported != 0) {
      void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p != MAP_FAILED) {
        (void)::madvise(p, bytes, MADV_DONTFORK);
        // Registering faults in and pins every page: huge ones cut the faults 512-fold (on
        // the 2-core VM, touching 256 MiB took 40 ms instead of 100-120 ms), a cost the
        // first load of a process pays.
        advise_huge_pages(p, bytes);
        if (cudaHostRegister(p, bytes, cudaHostRegisterPortable) == cudaSuccess) {
          std::lock_guard<std::mutex> lock(mutex_);
          mapped_.insert(static_cast<char*>(p));
          return static_cast<char*>(p);
        }
        (void)cudaGetLastError();
        ::munmap(p, bytes);
      }
    }
    // The driver cannot register host memory here: its own pinned memory, read into buffered.
    void* p = nullptr;
    C10_CUDA_CHECK(cudaHostAlloc(&p, bytes, cudaHostAllocPortable));
    return static_cast<char*>(p);
  }

  void free_pinned(char* data, size_t bytes) noexcept {
    if (data == nullptr) return;
    bool mapped = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      mapped = mapped_.erase(data) != 0;
    }
    if (mapped) {
      // Left mapped if the driver cannot unregister it: a later mapping at the same address
      // would find its pages still registered.
      const cudaError_t err = cudaHostUnregister(data);
      if (err == cudaSuccess) {
        ::munmap(data, bytes);
      } else {
        (void)cudaGetLastError();
        TORCH_WARN("flashpack: unregistering the pinned ring: ", cudaGetErrorString(err));
      }
    } else {
      C10_CUDA_CHECK_WARN(cudaFreeHost(data));
    }
    stats().pinned.add(-static_cast<int64_t>(bytes));
  }

  std::mutex mutex_;
  std::set<char*> mapped_;  // allocations that are registered mappings, not cudaHostAlloc's
  char* idle_ = nullptr;
  size_t idle_bytes_ = 0;
  int idle_device_ = -1;
};

// Never destroyed: freeing pinned memory during static destruction would race the CUDA
// runtime's own teardown. The process exit returns the pages.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

}  // namespace

PinnedLease::~PinnedLease() {
  if (data_ != nullptr) pool().give_back(data_, bytes_);
}

PinnedLease& PinnedLease::operator=(PinnedLease&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) pool().give_back(data_, bytes_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

PinnedLease lease_pinned(size_t bytes) {
  return pool().lease(bytes);
}

int64_t release_pinned_memory() {
  return pool().release();
}

namespace {
int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

StepTimer::StepTimer(std::atomic<int64_t>& counter) : counter_(counter), start_(now_ns()) {}

StepTimer::~StepTimer() {
  counter_ += now_ns() - start_;
}

Stats& stats() {
  static Stats* s = new Stats();
  return *s;
}

std::vector<std::pair<std::string, int64_t>> stats_snapshot(bool reset_peaks) {
  Stats& s = stats();
  std::vector<std::pair<std::string, int64_t>> out = {
      {"pinned_bytes", s.pinned.current()},
      {"pinned_peak_bytes", s.pinned.peak()},
      {"registered_bytes", s.registered.current()},
      {"registered_peak_bytes", s.registered.peak()},
      {"loads", s.loads.load()},
      {"bytes_direct", s.bytes_direct.load()},
      {"bytes_buffered", s.bytes_buffered.load()},
      {"bytes_mapped", s.bytes_mapped.load()},
      {"bytes_registered", s.bytes_registered.load()},
      {"register_fallbacks", s.register_fallbacks.load()},
      {"ns_loads", s.ns_loads.load()},
      {"ns_index", s.ns_index.load()},
      {"ns_copy", s.ns_copy.load()},
      {"ns_views", s.ns_views.load()},
      {"ns_read", s.ns_read.load()},
      {"ns_register", s.ns_register.load()},
      {"ns_unregister", s.ns_unregister.load()},
      {"ns_wait", s.ns_wait.load()},
      {"ns_unmap", s.ns_unmap.load()},
      {"unmapping_bytes", s.unmapping.current()},
  };
  if (reset_peaks) {
    s.pinned.reset_peak();
    s.registered.reset_peak();
  }
  return out;
}

}  // namespace flashpack::cuda
