// The flashpack operators: schemas, and the one kernel per op that branches on device.
//
// load() has no tensor argument, so a CPU- or CUDA-keyed kernel would never be chosen;
// each op registers a single CompositeExplicitAutograd kernel instead. Every op reads or
// writes files, so each is declared CONSERVATIVE: TorchScript must never drop a save()
// or merge two load()s as if they were pure.
#include "checksum.h"
#include "io.h"
#include "load.h"

#include <ATen/Context.h>
#include <ATen/core/List.h>
#include <ATen/core/enum_tag.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <future>
#include <iterator>
#include <stdexcept>
#include <system_error>
#include <tuple>

namespace flashpack {

namespace {

// Runs fn, turning our exceptions into torch's, prefixed with the op's name: bad files
// and bad arguments become ValueError, I/O failures RuntimeError.
template <typename Fn>
auto translate_errors(const char* op, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, op, ": ", e.what());
  } catch (const c10::Error&) {
    throw;
  } catch (const std::exception& e) {
    TORCH_CHECK(false, op, ": ", e.what());
  }
}

// Options are checked whatever the device: a CPU load given a CUDA option it ignores is
// still a wrong call, said as the CUDA path says it.
void check_options(const LoadOptions& opts, const std::string& path) {
  const std::pair<int64_t, const char*> counts[] = {{opts.num_threads, "num_threads"},
                                                    {opts.chunk_bytes, "chunk_bytes"},
                                                    {opts.pinned_bytes, "pinned_bytes"},
                                                    {opts.num_streams, "num_streams"}};
  for (const auto& [value, name] : counts) {
    if (value < 0) {
      throw std::invalid_argument("cannot load '" + path + "': " + name + " must be >= 0 (0 picks the default), got " +
                                  std::to_string(value));
    }
  }
  const std::string& r = opts.route;
  const auto known = [&](const char* name) { return r == name; };
  if (!r.empty() && std::none_of(std::begin(kRouteNames), std::end(kRouteNames), known)) {
    throw std::invalid_argument("cannot load '" + path + "': unknown route '" + r + "' (expected " + kRouteChoices + ")");
  }
}

std::vector<at::Tensor> load_any(const char* op, const std::string& path, c10::Device device, const LoadOptions& opts,
                                 Layout* layout) {
  return translate_errors(op, [&] {
    check_options(opts, path);
    if (device.is_cpu()) return load_cpu(path, opts, layout);
    if (device.is_cuda()) {
#ifdef WITH_CUDA
      const InputFile file(path);
      if (!opts.verify) return load_cuda(file, device, opts, layout);
      // NOTE: the check reads the file on the host, through the page cache, on its own
      // threads while the GPU load runs, so it costs little more than the slower of the two.
      // A failed load is reported first; the check's result is only looked at after a success.
      // Both read one open file: a save replacing the path meanwhile cannot split them.
      const auto verify = [&] { verify_file(file, default_threads(opts.num_threads)); };
      std::future<void> check;
      try {
        check = std::async(std::launch::async, verify);
      } catch (const std::system_error&) {
        check = std::async(std::launch::deferred, verify);  // no thread to be had: after the load
      }
      auto tensors = load_cuda(file, device, opts, layout);
      check.get();
      return tensors;
#else
      // Said as what the user can act on: no GPU at all, or only this library lacking CUDA.
      throw std::invalid_argument("cannot load '" + path + "' to " + device.str() + ": " +
                                  (at::hasCUDA() ? "flashpack_ops was built without CUDA (rebuild with a CUDA build "
                                                   "of torch and nvcc on the PATH)"
                                                 : "no CUDA device is available (torch.cuda.is_available() is "
                                                   "False); load to cpu"));
#endif
    }
    throw std::invalid_argument("cannot load '" + path + "' to " + device.str() + ": only cpu and cuda are supported");
  });
}

LoadOptions load_options(bool copy, int64_t num_threads, int64_t chunk_bytes, int64_t pinned_bytes,
                         int64_t num_streams, std::string route, bool verify,
                         std::optional<std::vector<std::string>> names = std::nullopt) {
  LoadOptions opts;
  opts.names = std::move(names);
  opts.copy = copy;
  opts.num_threads = num_threads;
  opts.verify = verify;
  opts.chunk_bytes = chunk_bytes;
  opts.pinned_bytes = pinned_bytes;
  opts.num_streams = num_streams;
  opts.route = std::move(route);
  return opts;
}

// load()'s entries as two lists, names and tensors in index order: what load_file() returns in
// Python, where building and handing over a Dict costs about a sixth more (3 ms for 20,000 tensors).
std::tuple<std::vector<std::string>, std::vector<at::Tensor>> load_named(
    const std::string& path, c10::Device device, bool copy, int64_t num_threads, int64_t chunk_bytes,
    int64_t pinned_bytes, int64_t num_streams, std::string route, bool verify,
    std::optional<std::vector<std::string>> names) {
  Layout layout;
  auto tensors = load_any("flashpack::load", path, device,
                          load_options(copy, num_threads, chunk_bytes, pinned_bytes, num_streams, std::move(route),
                                       verify, std::move(names)),
                          &layout);
  std::vector<std::string> out;
  out.reserve(layout.entries.size());
  for (Entry& e : layout.entries) out.push_back(std::move(e.name));
  return {std::move(out), std::move(tensors)};
}

c10::Dict<std::string, at::Tensor> load(const std::string& path, c10::Device device, bool copy, int64_t num_threads,
                                        int64_t chunk_bytes, int64_t pinned_bytes, int64_t num_streams,
                                        std::string route, bool verify, std::optional<std::vector<std::string>> names) {
  auto [keys, tensors] = load_named(path, device, copy, num_threads, chunk_bytes, pinned_bytes, num_streams,
                                    std::move(route), verify, std::move(names));
  c10::Dict<std::string, at::Tensor> out;
  out.reserve(tensors.size());
  for (size_t k = 0; k < tensors.size(); ++k) out.insert(std::move(keys[k]), std::move(tensors[k]));
  return out;
}

// The tensors of load(), in index order. distinct: each tied entry after the first of its
// group is left out, so that no two outputs share memory, as a traced graph requires of an
// operator's outputs (load_file() under torch.compile ties the names back).
// expect_layout: what the file looked like when a compiled graph was traced (layout_signature).
// The graph zips the names it read then with these tensors, and assumes their shapes, dtypes
// and sharing: a file saved since with another layout must fail here, not come out with
// names on the wrong tensors; it is checked against the whole file, names or not.
// names (here and in load): only these entries are read and returned (format.h select_entries).
std::vector<at::Tensor> load_list(const std::string& path, c10::Device device, bool copy, int64_t num_threads,
                                  int64_t chunk_bytes, int64_t pinned_bytes, int64_t num_streams, std::string route,
                                  bool verify, std::optional<std::string> expect_layout, bool distinct,
                                  std::optional<std::vector<std::string>> names) {
  LoadOptions opts = load_options(copy, num_threads, chunk_bytes, pinned_bytes, num_streams, std::move(route), verify,
                                  std::move(names));
  if (expect_layout) {
    // The whole file's layout, checked before a byte of the payload is read.
    opts.check_layout = [&](const Layout& file_layout) {
      if (layout_signature(file_layout) != *expect_layout) {
        throw std::invalid_argument("'" + path + "' no longer has the layout this compiled code was traced with "
                                    "(its names, shapes, dtypes or tied tensors changed since): trace it again "
                                    "(torch.compiler.reset() for torch.compile, a new torch.export for an "
                                    "exported program)");
      }
    };
  }
  Layout layout;
  auto tensors = load_any("flashpack::load_list", path, device, opts, &layout);
  if (distinct) {
    // Through translate_errors as everything a kernel throws: a std::invalid_argument left
    // bare reaches Python as ValueError up to torch 2.14, as RuntimeError from 2.15.
    translate_errors("flashpack::load_list", [&] {
      if (const auto overlap = partial_overlap(layout)) {
        // A graph takes each output as memory of its own: a write through one entry would not
        // show in the other, as it does in eager mode.
        throw std::invalid_argument("'" + path + "': entries '" + layout.entries[overlap->first].name + "' and '" +
                                    layout.entries[overlap->second].name + "' overlap in part, which a compiled " +
                                    "graph cannot express; load this file outside torch.compile");
      }
    });
    const std::vector<size_t> first = tie_firsts(layout);
    size_t kept = 0;
    for (size_t k = 0; k < tensors.size(); ++k) {
      if (first[k] == k) tensors[kept++] = std::move(tensors[k]);
    }
    tensors.resize(kept);
  }
  return tensors;
}

// The blocks themselves, one 1-D tensor each (load.h block_tensors), for the reference
// package's read_flashpack_file.
std::vector<at::Tensor> load_blocks(const std::string& path, c10::Device device, bool copy, int64_t num_threads,
                                    int64_t chunk_bytes, int64_t pinned_bytes, int64_t num_streams, std::string route,
                                    bool verify) {
  LoadOptions opts = load_options(copy, num_threads, chunk_bytes, pinned_bytes, num_streams, std::move(route), verify);
  opts.blocks = true;
  return load_any("flashpack::load_blocks", path, device, opts, nullptr);
}

// A negative thread count, said with the file it was for.
void check_threads(const char* verb, const std::string& path, int64_t num_threads) {
  if (num_threads < 0) {
    throw std::invalid_argument(std::string("cannot ") + verb + " '" + path +
                                "': num_threads must be >= 0 (0 picks the default), got " + std::to_string(num_threads));
  }
}

void save_op(const c10::Dict<std::string, at::Tensor>& tensors, const std::string& path,
             std::optional<c10::ScalarType> target_dtype, int64_t align_bytes, int64_t num_threads, bool checksum,
             bool durable, bool floating_only, const std::optional<c10::Dict<std::string, std::string>>& metadata) {
  std::vector<std::pair<std::string, std::string>> pairs;
  if (metadata) {
    for (const auto& item : *metadata) pairs.emplace_back(item.key(), item.value());
  }
  translate_errors("flashpack::save", [&] {
    check_threads("save", path, num_threads);
    save(tensors, path, target_dtype, align_bytes, num_threads, checksum, durable, floating_only, pairs);
  });
}

void verify_op(const std::string& path, int64_t num_threads) {
  translate_errors("flashpack::verify", [&] {
    check_threads("verify", path, num_threads);
    verify_file(path, default_threads(num_threads));
  });
}

at::Tensor read_range_op(const std::string& path, int64_t offset, int64_t length, c10::Device device,
                         int64_t num_threads) {
  return translate_errors("flashpack::read_range", [&] {
    check_threads("read", path, num_threads);
    return read_range(path, offset, length, device, num_threads);
  });
}

// The footer as the file holds it, once validated: what Python needs to know about a file (names,
// shapes, dtypes) without reading its payload.
std::string read_footer(const std::string& path) {
  return translate_errors("flashpack::read_footer", [&] {
    InputFile file(path);
    std::string footer;
    read_layout(file.fd(), file.size(), path, &footer);
    return footer;
  });
}

// The footer's "metadata" pairs (empty if it has none of ours): what safe_open().metadata()
// gives, without handing Python the whole index to parse.
c10::Dict<std::string, std::string> metadata_op(const std::string& path) {
  return translate_errors("flashpack::metadata", [&] {
    InputFile file(path);
    c10::Dict<std::string, std::string> out;
    for (auto& [key, value] : read_layout(file.fd(), file.size(), path).metadata) out.insert(key, value);
    return out;
  });
}

std::string layout_signature_op(const std::string& path) {
  return translate_errors("flashpack::layout_signature", [&] {
    InputFile file(path);
    return layout_signature(read_layout(file.fd(), file.size(), path));
  });
}

bool built_with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Empty (and 0) in a build without CUDA.
c10::Dict<std::string, int64_t> cuda_stats_op(bool reset_peaks) {
  c10::Dict<std::string, int64_t> out;
#ifdef WITH_CUDA
  for (auto& [name, value] : cuda_stats(reset_peaks)) out.insert(name, value);
#endif
  return out;
}

int64_t release_pinned_memory_op() {
#ifdef WITH_CUDA
  return release_pinned_memory();
#else
  return 0;
#endif
}

}  // namespace

TORCH_LIBRARY(flashpack, m) {
  constexpr auto kSideEffects = c10::AliasAnalysisKind::CONSERVATIVE;
  // NOTE: a load to CUDA reads the file, registers host memory and waits on the host, none of
  // which a CUDA graph can capture: torch.compile(mode="reduce-overhead") keeps these ops
  // out of its graphs.
#if FLASHPACK_TORCH_AT_LEAST(2, 8)
  const std::vector<at::Tag> kNotInCudaGraphs = {at::Tag::cudagraph_unsafe};
#else
  const std::vector<at::Tag> kNotInCudaGraphs = {};  // the tag came with torch 2.8
#endif
  m.def(torch::schema(
      "load(str path, Device device=\"cpu\", *, bool copy=False, int num_threads=0, int chunk_bytes=0, "
      "int pinned_bytes=0, int num_streams=0, str route=\"auto\", bool verify=False, str[]? names=None) "
      "-> Dict(str, Tensor)",
      kSideEffects), kNotInCudaGraphs);
  m.def(torch::schema(
      "load_named(str path, Device device=\"cpu\", *, bool copy=False, int num_threads=0, int chunk_bytes=0, "
      "int pinned_bytes=0, int num_streams=0, str route=\"auto\", bool verify=False, str[]? names=None) "
      "-> (str[], Tensor[])",
      kSideEffects), kNotInCudaGraphs);
  m.def(torch::schema(
      "load_list(str path, Device device=\"cpu\", *, bool copy=False, int num_threads=0, int chunk_bytes=0, "
      "int pinned_bytes=0, int num_streams=0, str route=\"auto\", bool verify=False, str? expect_layout=None, "
      "bool distinct=False, str[]? names=None) -> Tensor[]",
      kSideEffects), kNotInCudaGraphs);
  m.def(torch::schema(
      "load_blocks(str path, Device device=\"cpu\", *, bool copy=False, int num_threads=0, int chunk_bytes=0, "
      "int pinned_bytes=0, int num_streams=0, str route=\"auto\", bool verify=False) -> Tensor[]",
      kSideEffects), kNotInCudaGraphs);
  m.def(torch::schema(
      "save(Dict(str, Tensor) tensors, str path, *, ScalarType? target_dtype=None, int align_bytes=128, "
      "int num_threads=0, bool checksum=False, bool durable=True, bool floating_only=True, "
      "Dict(str, str)? metadata=None) -> ()",
      kSideEffects));
  m.def(torch::schema("read_footer(str path) -> str", kSideEffects));
  m.def(torch::schema("layout_signature(str path) -> str", kSideEffects));
  m.def(torch::schema("metadata(str path) -> Dict(str, str)", kSideEffects));
  m.def(torch::schema("verify(str path, *, int num_threads=0) -> ()", kSideEffects));
  m.def(torch::schema(
      "read_range(str path, int offset, int length, Device device=\"cpu\", *, int num_threads=0) -> Tensor",
      kSideEffects), kNotInCudaGraphs);
  m.def("built_with_cuda() -> bool");
  // Process-wide state of the CUDA path: read (and peaks reset) by tests and benchmarks.
  m.def(torch::schema("cuda_stats(bool reset_peaks=False) -> Dict(str, int)", kSideEffects));
  m.def(torch::schema("release_pinned_memory() -> int", kSideEffects));
}

TORCH_LIBRARY_IMPL(flashpack, CompositeExplicitAutograd, m) {
  m.impl("load", &load);
  m.impl("load_named", &load_named);
  m.impl("load_list", &load_list);
  m.impl("load_blocks", &load_blocks);
  m.impl("save", &save_op);
  m.impl("read_footer", &read_footer);
  m.impl("layout_signature", &layout_signature_op);
  m.impl("metadata", &metadata_op);
  m.impl("verify", &verify_op);
  m.impl("read_range", &read_range_op);
  m.impl("built_with_cuda", &built_with_cuda);
  m.impl("cuda_stats", &cuda_stats_op);
  m.impl("release_pinned_memory", &release_pinned_memory_op);
}

}  // namespace flashpack
