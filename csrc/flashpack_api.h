// The flashpack operators for C++ programs: LibTorch alone, no Python.
//
// Each function calls the registered op through the dispatcher, exactly as TorchScript
// and Python do, so a program needs this header and the flashpack ops library linked in
// (the ops register themselves when the library loads). Link it with
// -Wl,--no-as-needed: nothing here references a symbol of it, and without the flag the
// linker drops it. See torchscript/CMakeLists.txt.
//
//   auto weights = flashpack::api::load("model.flashpack", torch::kCUDA);
//   flashpack::api::save(weights, "copy.flashpack");
#pragma once

#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace flashpack {
namespace api {

namespace detail {

inline c10::OperatorHandle op(const char* name) {
  auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  TORCH_CHECK(handle.has_value(), name,
              " is not registered: link the flashpack ops library (flashpack_ops/_C*.so, or csrc/ built as a "
              "library) with -Wl,--no-as-needed, or load it with dlopen before the first call");
  return *handle;
}

// NOTE: boxed calls depend only on the schemas, not on the C++ types the kernels happen
// to be written with; the cost, a few IValues per call, is nothing next to a file read.
inline torch::jit::Stack call(const c10::OperatorHandle& handle, torch::jit::Stack stack) {
  handle.callBoxed(stack);
  return stack;
}

inline c10::IValue names(const std::optional<std::vector<std::string>>& names) {
  return names ? c10::IValue(c10::List<std::string>(*names)) : c10::IValue();
}

}  // namespace detail

// flashpack::load: the file's tensors by name, in file order. On the CPU they view a
// private memory map of the file (copy=false); on CUDA the payload is streamed to the GPU.
// chunk_bytes, pinned_bytes, num_streams and route tune the CUDA path (docs/cuda.md); 0 and
// "auto" pick the defaults. verify=true checks the payload against the checksums saved with
// checksum=true. names: only these entries are read and returned (all when nullopt).
inline c10::Dict<std::string, at::Tensor> load(const std::string& path, c10::Device device = c10::kCPU,
                                               bool copy = false, int64_t num_threads = 0, int64_t chunk_bytes = 0,
                                               int64_t pinned_bytes = 0, int64_t num_streams = 0,
                                               const std::string& route = "auto", bool verify = false,
                                               const std::optional<std::vector<std::string>>& names = std::nullopt) {
  static const c10::OperatorHandle handle = detail::op("flashpack::load");
  auto out = detail::call(handle, {path, device, copy, num_threads, chunk_bytes, pinned_bytes, num_streams, route,
                                   verify, detail::names(names)});
  return c10::impl::toTypedDict<std::string, at::Tensor>(std::move(out.at(0)).toGenericDict());
}

// flashpack::load_list: the same tensors, in index order; distinct=true leaves out each
// tied entry after the first of its group (no two outputs then share memory); names as in load.
inline std::vector<at::Tensor> load_list(const std::string& path, c10::Device device = c10::kCPU,
                                         bool copy = false, int64_t num_threads = 0, int64_t chunk_bytes = 0,
                                         int64_t pinned_bytes = 0, int64_t num_streams = 0,
                                         const std::string& route = "auto", bool verify = false,
                                         bool distinct = false,
                                         const std::optional<std::vector<std::string>>& names = std::nullopt) {
  static const c10::OperatorHandle handle = detail::op("flashpack::load_list");
  auto out =
      detail::call(handle, {path, device, copy, num_threads, chunk_bytes, pinned_bytes, num_streams, route, verify,
                            c10::IValue(), distinct, detail::names(names)});
  return std::move(out.at(0)).toTensorVector();
}

// flashpack::save: writes the tensors atomically (temporary file, fsync, rename).
// align_bytes defaults to the schema's 128; checksum=true stores CRC-32C checksums;
// durable=false skips the fsyncs (still atomic for other processes, not for power loss);
// target_dtype converts the floating-point tensors (floating_only=false: every tensor); metadata: string
// pairs kept in the footer (safetensors' metadata).
inline void save(const c10::Dict<std::string, at::Tensor>& tensors, const std::string& path,
                 std::optional<c10::ScalarType> target_dtype = std::nullopt, int64_t align_bytes = 128,
                 int64_t num_threads = 0, bool checksum = false, bool durable = true, bool floating_only = true,
                 const std::optional<c10::Dict<std::string, std::string>>& metadata = std::nullopt) {
  static const c10::OperatorHandle handle = detail::op("flashpack::save");
  detail::call(handle, {tensors, path, target_dtype, align_bytes, num_threads, checksum, durable, floating_only,
                        metadata ? c10::IValue(*metadata) : c10::IValue()});
}

// flashpack::metadata: the footer's metadata pairs (empty if none).
inline c10::Dict<std::string, std::string> metadata(const std::string& path) {
  static const c10::OperatorHandle handle = detail::op("flashpack::metadata");
  auto out = detail::call(handle, {path});
  return c10::impl::toTypedDict<std::string, std::string>(std::move(out.at(0)).toGenericDict());
}

// flashpack::verify: checks the payload against its checksums; throws naming the bad range.
inline void verify(const std::string& path, int64_t num_threads = 0) {
  static const c10::OperatorHandle handle = detail::op("flashpack::verify");
  detail::call(handle, {path, num_threads});
}

// flashpack::read_footer: the file's footer JSON, validated, without reading the payload.
inline std::string read_footer(const std::string& path) {
  static const c10::OperatorHandle handle = detail::op("flashpack::read_footer");
  auto out = detail::call(handle, {path});
  return out.at(0).toStringRef();
}

// flashpack::built_with_cuda: whether the library has the CUDA load path.
inline bool built_with_cuda() {
  static const c10::OperatorHandle handle = detail::op("flashpack::built_with_cuda");
  return detail::call(handle, {}).at(0).toBool();
}

}  // namespace api
}  // namespace flashpack
