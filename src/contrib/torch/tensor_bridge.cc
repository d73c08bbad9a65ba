/*!
 * \file tensor_bridge.cc
 * \brief Zero-copy torch <-> TVM tensor conversion through DLPack.
 */
#include "tensor_bridge.h"

#include <ATen/DLConvertor.h>
#include <tvm/ffi/container/array.h>

#include <cstdint>
#include <sstream>

namespace tvm_torch {

const char* SupportedDtypeName(at::ScalarType type) {
  for (const SupportedDtype& dtype : kSupportedDtypes) {
    if (dtype.type == type) return dtype.name;
  }
  return nullptr;
}

std::string DtypeName(at::ScalarType type) {
  const char* name = SupportedDtypeName(type);
  return name ? std::string(name) : std::string("unsupported(") + c10::toString(type) + ")";
}

std::string DescribeTensor(const at::Tensor& tensor) {
  std::ostringstream os;
  os << DtypeName(tensor.scalar_type()) << "[";
  for (int64_t i = 0; i < tensor.dim(); ++i) {
    os << (i ? ", " : "") << tensor.size(i);
  }
  os << "]";
  if (!tensor.device().is_cpu()) os << " on " << tensor.device();
  return os.str();
}

c10::Device ParseDevice(const std::string& device) {
  if (device == "cpu") return c10::Device(c10::DeviceType::CPU);
  if (device == "cuda") return c10::Device(c10::DeviceType::CUDA, 0);
  const std::string prefix = "cuda:";
  if (device.compare(0, prefix.size(), prefix) == 0 && device.size() > prefix.size()) {
    const std::string index = device.substr(prefix.size());
    bool digits = index.find_first_not_of("0123456789") == std::string::npos;
    TORCH_CHECK(digits && index.size() < 4, "tvm_class: invalid device '", device,
                "': expected 'cpu', 'cuda' or 'cuda:N'");
    return c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(std::stoi(index)));
  }
  TORCH_CHECK(false, "tvm_class: invalid device '", device,
              "': expected 'cpu', 'cuda' or 'cuda:N'");
}

DLDevice ToDLDevice(const c10::Device& device) {
  if (device.is_cuda()) return DLDevice{kDLCUDA, device.has_index() ? device.index() : 0};
  return DLDevice{kDLCPU, 0};
}

tvm::ffi::Tensor ToTvmTensor(const at::Tensor& tensor) {
  // DLPack has no negative or conjugate bit: such lazy views are materialised first.
  at::Tensor usable = tensor.is_neg() || tensor.is_conj() ? tensor.resolve_conj().resolve_neg()
                                                          : tensor;
  bool aligned = reinterpret_cast<std::uintptr_t>(usable.data_ptr()) % kTvmDataAlignment == 0;
  if (!usable.is_contiguous() || !aligned) {
    // One copy: the caching/CPU allocators hand out storage aligned to at least 64 bytes.
    at::Tensor copy = at::empty(usable.sizes(), usable.options(), at::MemoryFormat::Contiguous);
    copy.copy_(usable);
    usable = copy;
  }
  return tvm::ffi::Tensor::FromDLPackVersioned(at::toDLPackVersioned(usable));
}

at::Tensor ToTorchTensor(const tvm::ffi::Tensor& tensor) {
  return at::fromDLPackVersioned(tensor.ToDLPackVersioned());
}

void FlattenOutputs(const tvm::ffi::Any& value, std::vector<at::Tensor>* out) {
  if (auto tensor = value.as<tvm::ffi::Tensor>()) {
    out->push_back(ToTorchTensor(*tensor));
    return;
  }
  if (auto array = value.as<tvm::ffi::Array<tvm::ffi::Any>>()) {
    for (const tvm::ffi::Any& item : *array) FlattenOutputs(item, out);
    return;
  }
  TORCH_CHECK(false, "tvm_class: the compiled program returned a value of type '",
              value.GetTypeKey(), "'; only tensors and tuples of tensors are supported");
}

}  // namespace tvm_torch
