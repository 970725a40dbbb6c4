// Page-locked host memory for the CUDA load path, and the counters that prove where
// bytes went.
//
// Pinned staging memory is slow to allocate (the kernel locks every page), so it is kept
// in a process-wide pool and reused. A load leases one allocation (its "ring") for its
// whole duration: two loads running at once never share a ring, each holds its own, and
// nothing ever waits for another load's ring, so concurrent loads cannot deadlock. When
// no load runs, the pool holds at most one idle allocation, so the pinned memory a
// process keeps is bounded by the largest ring it has used (FLASHPACK_PINNED_BYTES,
// 256 MiB by default). release_pinned_memory() frees it.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace flashpack::cuda {

// A leased pinned allocation; returned to the pool when destroyed. Only the load that
// holds the lease may touch its bytes.
class PinnedLease {
 public:
  PinnedLease() = default;
  PinnedLease(char* data, size_t bytes) : data_(data), bytes_(bytes) {}
  ~PinnedLease();
  PinnedLease(PinnedLease&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
  PinnedLease& operator=(PinnedLease&& other) noexcept;
  PinnedLease(const PinnedLease&) = delete;
  PinnedLease& operator=(const PinnedLease&) = delete;

  char* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  char* data_ = nullptr;
  size_t bytes_ = 0;
};

// At least `bytes` of page-aligned pinned memory, reused from the pool when the idle
// allocation is large enough, else freshly allocated. Throws c10::Error if the driver
// cannot pin that much.
PinnedLease lease_pinned(size_t bytes);

// Frees the idle allocation; returns how many bytes were freed. Leased memory is untouched.
int64_t release_pinned_memory();

// Keeps the maximum of a gauge up to date.
class Gauge {
 public:
  void add(int64_t delta) {
    const int64_t now = current_.fetch_add(delta) + delta;
    int64_t peak = peak_.load();
    while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
    }
  }
  int64_t current() const { return current_.load(); }
  int64_t peak() const { return peak_.load(); }
  void reset_peak() { peak_.store(current_.load()); }

 private:
  std::atomic<int64_t> current_{0};
  std::atomic<int64_t> peak_{0};
};

// Process-wide counters, readable from Python through flashpack::cuda_stats(). The byte
// counters only ever grow; callers compare them before and after a load.
struct Stats {
  Gauge pinned;      // staging memory held by the pool, leased or idle
  Gauge registered;  // file pages registered with the driver (cudaHostRegister) right now
  std::atomic<int64_t> loads{0};                // CUDA loads completed
  std::atomic<int64_t> bytes_direct{0};         // copied to a GPU after an O_DIRECT read
  std::atomic<int64_t> bytes_buffered{0};       // copied to a GPU after a buffered read
  std::atomic<int64_t> bytes_mapped{0};         // copied to a GPU after a copy out of the mapped file
  std::atomic<int64_t> bytes_registered{0};     // copied to a GPU straight from the registered mapping
  std::atomic<int64_t> register_fallbacks{0};   // loads that fell back to staging after a refused registration
  // Where the time goes, in nanoseconds, for tuning (docs/cuda.md). Steps run on several
  // threads at once, so their sums can exceed ns_loads, the loads' wall time.
  std::atomic<int64_t> ns_loads{0};       // CUDA loads, from opening the file to returning
  std::atomic<int64_t> ns_index{0};       // reading and checking the index (beside the copies where it is large)
  std::atomic<int64_t> ns_copy{0};        // moving the blocks to the GPU: the pipeline's wall time
  std::atomic<int64_t> ns_views{0};       // making the output tensors (beside the copies with a large index)
  std::atomic<int64_t> ns_read{0};        // reading chunks into the staging ring
  std::atomic<int64_t> ns_register{0};    // cudaHostRegister of chunks of the mapping
  std::atomic<int64_t> ns_unregister{0};  // cudaHostUnregister of them
  std::atomic<int64_t> ns_wait{0};        // waiting for a slot's copies to finish before reusing it
  std::atomic<int64_t> ns_unmap{0};       // unmapping registered mappings, after the load returned
  Gauge unmapping;  // bytes of registered mappings not yet unmapped
};

// Adds the time from its construction to its destruction to a counter.
class StepTimer {
 public:
  explicit StepTimer(std::atomic<int64_t>& counter);
  ~StepTimer();
  StepTimer(const StepTimer&) = delete;
  StepTimer& operator=(const StepTimer&) = delete;

 private:
  std::atomic<int64_t>& counter_;
  int64_t start_;
};

Stats& stats();

// The counters as (name, value) pairs, in a fixed order; optionally restarts the peaks
// from the current values.
std::vector<std::pair<std::string, int64_t>> stats_snapshot(bool reset_peaks);

}  // namespace flashpack::cuda
