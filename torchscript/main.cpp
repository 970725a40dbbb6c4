// A LibTorch program with no Python in it, using the flashpack ops two ways:
//   (a) through the dispatcher (flashpack_api.h): load, load_list, read_footer, save;
//   (b) from TorchScript: a module scripted in Python whose load_weights() calls flashpack::load.
//
//   flashpack_example DIR    DIR written by make_inputs.py; exits 0 when every check passes
#include "flashpack_api.h"

#include <torch/cuda.h>
#include <torch/script.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

void check(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error("FAILED: " + what);
  std::cout << "ok: " << what << std::endl;
}

// The point of the program: the library works where Python is not even mapped.
void check_no_python() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    if (line.find("libpython") != std::string::npos || line.find("libtorch_python") != std::string::npos) {
      throw std::runtime_error("FAILED: Python is loaded in this process: " + line);
    }
  }
  check(true, "no libpython or libtorch_python in the process");
}

bool gpu_usable() {
  static const bool usable = [] {
    const bool ok = torch::cuda::is_available() && flashpack::api::built_with_cuda();
    if (!ok) std::cout << "skipped: CUDA checks (no GPU, or the library was built without CUDA)" << std::endl;
    return ok;
  }();
  return usable;
}

// The tensors make_inputs.py saved, rebuilt here with the same ops.
c10::Dict<std::string, at::Tensor> expected_weights() {
  c10::Dict<std::string, at::Tensor> w;
  w.insert("linear.weight", torch::arange(12, torch::kFloat32).reshape({3, 4}) / 8 - 0.5);
  w.insert("linear.bias", torch::arange(3, torch::kFloat32) - 1);
  w.insert("scale", torch::arange(1, 4, torch::kFloat32) / 2);
  w.insert("table", torch::arange(6).reshape({2, 3}).to(torch::kBFloat16));
  w.insert("steps", torch::tensor({int64_t{3}}, torch::kInt64));
  return w;
}

bool same(const c10::Dict<std::string, at::Tensor>& a, const c10::Dict<std::string, at::Tensor>& b) {
  if (a.size() != b.size()) return false;
  auto ia = a.begin();
  auto ib = b.begin();
  for (; ia != a.end(); ++ia, ++ib) {
    const at::Tensor x = ia->value().cpu();
    const at::Tensor y = ib->value().cpu();
    if (ia->key() != ib->key() || x.dtype() != y.dtype() || !torch::equal(x, y)) return false;
  }
  return true;
}

void check_ops(const std::string& dir) {
  const std::string path = dir + "/weights.flashpack";
  const auto expected = expected_weights();

  const auto loaded = flashpack::api::load(path);
  check(same(loaded, expected), "flashpack::load returns the saved names, dtypes and values, in order");
  check(same(flashpack::api::load(path, c10::kCPU, /*copy=*/true), expected), "flashpack::load with copy=True");

  const auto list = flashpack::api::load_list(path);
  bool list_ok = list.size() == expected.size();
  size_t k = 0;
  for (auto it = expected.begin(); list_ok && it != expected.end(); ++it, ++k) {
    list_ok = torch::equal(list[k], it->value());
  }
  check(list_ok, "flashpack::load_list returns the same tensors in index order");

  const auto part = flashpack::api::load(path, c10::kCPU, false, 0, 0, 0, 0, "auto", false,
                                         std::vector<std::string>{"linear.bias"});
  check(part.size() == 1 && torch::equal(part.at("linear.bias"), expected.at("linear.bias")),
        "flashpack::load with names returns only those entries");

  const std::string footer = flashpack::api::read_footer(path);
  check(footer.find("\"flashpack_v4\"") != std::string::npos && footer.find("\"linear.bias\"") != std::string::npos,
        "flashpack::read_footer returns the index");

  // Written here, read back here and, by the test that runs this program, from Python.
  c10::Dict<std::string, at::Tensor> mine;
  mine.insert("doubled", loaded.at("linear.weight") * 2);
  mine.insert("table", loaded.at("table"));
  const std::string written = dir + "/from_cpp.flashpack";
  flashpack::api::save(mine, written);
  check(same(flashpack::api::load(written), mine), "flashpack::save from C++ round-trips");

  c10::Dict<std::string, at::Tensor> tied;
  tied.insert("embed", loaded.at("table"));
  tied.insert("lm_head", loaded.at("table"));
  const std::string tied_path = dir + "/tied.flashpack";
  flashpack::api::save(tied, tied_path);
  const auto every = flashpack::api::load_list(tied_path);
  const auto distinct = flashpack::api::load_list(tied_path, c10::kCPU, false, 0, 0, 0, 0, "auto", false,
                                                  /*distinct=*/true);
  check(every.size() == 2 && every[0].is_alias_of(every[1]) && distinct.size() == 1 &&
            torch::equal(distinct[0], loaded.at("table")),
        "flashpack::load_list ties saved tensors, and distinct=true returns each once");

  if (gpu_usable()) {
    check(same(flashpack::api::load(path, c10::Device(c10::kCUDA)), expected), "flashpack::load to cuda");
  }

  // From C++ a string can hold any bytes; the footer is JSON, which only UTF-8 text can go in.
  c10::Dict<std::string, std::string> metadata;
  metadata.insert("format", "pt");
  const std::string with_metadata = dir + "/metadata.flashpack";
  flashpack::api::save(mine, with_metadata, std::nullopt, 128, 0, false, true, false, metadata);
  const auto read_back = flashpack::api::metadata(with_metadata);
  check(read_back.size() == 1 && read_back.at("format") == "pt" && flashpack::api::metadata(path).empty(),
        "flashpack::save stores metadata in the footer, flashpack::metadata reads it back");
  for (const bool in_name : {true, false}) {
    c10::Dict<std::string, at::Tensor> bad_name;
    c10::Dict<std::string, std::string> bad_metadata;
    bad_name.insert(in_name ? "bad\xff" : "fine", loaded.at("table"));
    bad_metadata.insert("key", in_name ? "fine" : "bad\xff");
    try {
      flashpack::api::save(bad_name, dir + "/bad.flashpack", std::nullopt, 128, 0, false, true, false, bad_metadata);
      check(false, "flashpack::save refuses bytes that are not UTF-8");
    } catch (const c10::Error& e) {
      const std::string msg = e.what_without_backtrace();
      check(msg.find("not valid UTF-8") != std::string::npos,
            std::string("flashpack::save refuses a ") + (in_name ? "name" : "metadata value") +
                " that is not UTF-8: " + msg);
    }
  }

  const std::string missing = dir + "/missing.flashpack";
  try {
    flashpack::api::load(missing);
    check(false, "loading a missing file throws");
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    check(msg.find("flashpack::load") != std::string::npos && msg.find(missing) != std::string::npos,
          "loading a missing file throws, naming the op and the file: " + msg);
  }
}

void check_torchscript(const std::string& dir) {
  torch::jit::Module model = torch::jit::load(dir + "/model.pt");
  const auto io = flashpack::api::load(dir + "/io.flashpack");
  const at::Tensor x = io.at("x");
  const at::Tensor expected = io.at("expected");
  torch::NoGradGuard no_grad;

  const at::Tensor before = model.forward({x}).toTensor();
  check(!torch::equal(before, expected), "the scripted model starts with other weights");

  model.run_method("load_weights", dir + "/weights.flashpack");
  check(torch::equal(model.forward({x}).toTensor(), expected),
        "the scripted model's load_weights() (flashpack::load in TorchScript) gives Python's output");

  if (!gpu_usable()) return;
  model.run_method("load_weights", dir + "/weights.flashpack", std::string("cuda"));
  const at::Tensor weight = model.attr("linear").toModule().attr("weight").toTensor();
  check(weight.is_cuda() && torch::equal(weight.cpu(), expected_weights().at("linear.weight")),
        "load_weights(path, \"cuda\") puts the file's weights on the GPU");
  // No bitwise comparison with Python's CPU output here: GPU matmuls round differently.
  check(model.forward({x.cuda()}).toTensor().is_cuda(), "the scripted model runs on the GPU");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " DIR   (DIR written by make_inputs.py)" << std::endl;
    return 2;
  }
  try {
    check_no_python();
    check_ops(argv[1]);
    check_torchscript(argv[1]);
  } catch (const std::exception& e) {
    std::cerr << e.what() << std::endl;
    return 1;
  }
  std::cout << "all checks passed" << std::endl;
  return 0;
}
