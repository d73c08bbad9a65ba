/*!
 * \file pt_tvm_infer.cc
 * \brief Serve a TorchScript model saved by tvm.contrib.torch from plain C++ (libtorch only).
 *
 * Usage: pt_tvm_infer RUNTIME_LIB MODEL.pt INPUT.bin SHAPE [--dtype float32|float16]
 *                     [--output OUT.bin] [--repeat N]
 *   RUNTIME_LIB  libtvm_torch_runtime.so (tvm.contrib.torch.runtime_library_path())
 *   INPUT.bin    raw little-endian tensor data; SHAPE like 1x3x224x224
 * A module from compile() is called as model.forward([input]) and returns a list of tensors;
 * a drop-in module from partition() / the CLI is called as model.forward(input) and returns a
 * tensor or a tuple of tensors. Each output's shape and first values are printed, the first output's raw data is written to OUT.bin, and
 * the median latency over N calls is printed.
 */
#include <dlfcn.h>
#include <torch/script.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::vector<int64_t> ParseShape(const std::string& text) {
  std::vector<int64_t> shape;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, 'x')) shape.push_back(std::stoll(item));
  return shape;
}

int Fail(const std::string& message) {
  std::cerr << "pt_tvm_infer: " << message << std::endl;
  return 1;
}

}  // namespace

/*! \brief The tensors of a forward result: a tensor, a list or a tuple of tensors. */
std::vector<torch::Tensor> Tensors(const torch::jit::IValue& result) {
  if (result.isTensor()) return {result.toTensor()};
  if (result.isTensorList()) return result.toTensorVector();
  std::vector<torch::Tensor> out;
  if (result.isTuple()) {
    for (const auto& element : result.toTupleRef().elements()) out.push_back(element.toTensor());
    return out;
  }
  throw std::runtime_error("forward returned " + result.tagKind() +
                           "; expected a tensor, a list or a tuple of tensors");
}

int main(int argc, char** argv) {
  if (argc < 5) {
    return Fail("usage: pt_tvm_infer RUNTIME_LIB MODEL.pt INPUT.bin SHAPE [--dtype D] "
                "[--output OUT.bin] [--repeat N]");
  }
  std::string runtime_lib = argv[1], model_path = argv[2], input_path = argv[3];
  std::vector<int64_t> shape = ParseShape(argv[4]);
  std::string dtype = "float32", output_path;
  int repeat = 10;
  for (int i = 5; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "--dtype") dtype = argv[i + 1];
    else if (flag == "--output") output_path = argv[i + 1];
    else if (flag == "--repeat") repeat = std::atoi(argv[i + 1]);
    else return Fail("unknown flag " + flag);
  }
  // The runtime library registers torch.classes.tvm_class.*; load it before the model.
  if (dlopen(runtime_lib.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    return Fail(std::string("cannot load the runtime library: ") + dlerror());
  }
  try {
    torch::jit::Module model = torch::jit::load(model_path);
    model.eval();
    auto scalar = dtype == "float16" ? torch::kHalf : torch::kFloat;
    torch::Tensor input = torch::empty(shape, torch::TensorOptions().dtype(scalar));
    std::ifstream in(input_path, std::ios::binary);
    if (!in) return Fail("cannot open " + input_path);
    in.read(static_cast<char*>(input.data_ptr()), input.nbytes());
    if (in.gcount() != static_cast<std::streamsize>(input.nbytes())) {
      return Fail("input file holds fewer bytes than shape x dtype needs");
    }
    const auto& arguments = model.get_method("forward").function().getSchema().arguments();
    const bool takes_list = arguments.size() > 1 &&
                            arguments[1].type()->kind() == c10::TypeKind::ListType;
    std::vector<torch::jit::IValue> args;
    if (takes_list) {
      args.emplace_back(c10::List<torch::Tensor>({input}));
    } else {
      args.emplace_back(input);
    }
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> outputs = Tensors(model.forward(args));
    std::vector<double> times;
    for (int i = 0; i < repeat; ++i) {
      auto start = std::chrono::steady_clock::now();
      model.forward(args);
      times.push_back(std::chrono::duration<double, std::milli>(
                          std::chrono::steady_clock::now() - start).count());
    }
    for (size_t i = 0; i < outputs.size(); ++i) {
      torch::Tensor out = outputs[i].contiguous();
      std::cout << "output " << i << " shape " << out.sizes() << " first "
                << out.flatten().slice(0, 0, 5).to(torch::kFloat) << std::endl;
    }
    if (!output_path.empty()) {
      torch::Tensor out = outputs[0].contiguous().to(torch::kFloat);
      std::ofstream os(output_path, std::ios::binary);
      os.write(static_cast<const char*>(out.data_ptr()), out.nbytes());
    }
    if (!times.empty()) {
      std::sort(times.begin(), times.end());
      std::cout << "median latency ms " << times[times.size() / 2] << std::endl;
    }
  } catch (const c10::Error& err) {
    return Fail(err.what_without_backtrace());
  } catch (const std::exception& err) {
    return Fail(err.what());
  }
  return 0;
}
