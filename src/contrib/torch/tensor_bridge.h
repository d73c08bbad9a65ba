/*!
 * \file tensor_bridge.h
 * \brief Zero-copy conversion between torch tensors and TVM FFI tensors, and
 *        the small vocabulary (dtype names, devices) both sides share.
 */
#ifndef TVM_CONTRIB_TORCH_TENSOR_BRIDGE_H_
#define TVM_CONTRIB_TORCH_TENSOR_BRIDGE_H_

#include <ATen/ATen.h>
#include <tvm/ffi/container/tensor.h>

#include <string>
#include <vector>

namespace tvm_torch {

/*! \brief Alignment TVM-generated kernels assume for tensor data (bytes). */
constexpr size_t kTvmDataAlignment = 64;

/*! \brief A dtype that crosses the bridge: its TVM name and its torch scalar type. */
struct SupportedDtype {
  const char* name;
  at::ScalarType type;
};

/*!
 * \brief Every dtype a compiled program's inputs may have. The one C++ list: Python's dtype
 *        checks are compared with it through tvm_torch.runtime_contract.
 */
inline constexpr SupportedDtype kSupportedDtypes[] = {
    {"float32", at::kFloat}, {"float16", at::kHalf}, {"bfloat16", at::kBFloat16},
    {"float64", at::kDouble}, {"int8", at::kChar},  {"int16", at::kShort},
    {"int32", at::kInt},      {"int64", at::kLong}, {"uint8", at::kByte},
    {"bool", at::kBool}};

/*! \brief TVM dtype name of a torch scalar type, or nullptr when it is not supported. */
const char* SupportedDtypeName(at::ScalarType type);

/*! \brief TVM dtype name ("float32", "int64", ...) of a torch scalar type. */
std::string DtypeName(at::ScalarType type);

/*! \brief Human-readable "float32[1, 3, 224, 224]" description of a tensor. */
std::string DescribeTensor(const at::Tensor& tensor);

/*! \brief Parse "cpu", "cuda", "cuda:N" into a torch device, with a clear error otherwise. */
c10::Device ParseDevice(const std::string& device);

/*! \brief DLPack device type and id of a torch device. */
DLDevice ToDLDevice(const c10::Device& device);

/*!
 * \brief Wrap a torch tensor as a TVM tensor without copying when it is contiguous and aligned.
 *
 * Otherwise one contiguous, aligned copy is made. The TVM tensor keeps the torch storage alive.
 */
tvm::ffi::Tensor ToTvmTensor(const at::Tensor& tensor);

/*! \brief Wrap a TVM tensor as a torch tensor without copying; the torch tensor keeps it alive. */
at::Tensor ToTorchTensor(const tvm::ffi::Tensor& tensor);

/*! \brief Flatten a Relax return value (a tensor or nested tuples of tensors) into torch tensors. */
void FlattenOutputs(const tvm::ffi::Any& value, std::vector<at::Tensor>* out);

}  // namespace tvm_torch

#endif  // TVM_CONTRIB_TORCH_TENSOR_BRIDGE_H_
