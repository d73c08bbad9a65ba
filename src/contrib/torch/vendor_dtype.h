/*!
 * \file vendor_dtype.h
 * \brief The dtype a vendor kernel computes in, and moving tensors to and from it: shared by
 *        vendor_kernels.cc and linear_kernels.cc.
 */
#ifndef TVM_CONTRIB_TORCH_VENDOR_DTYPE_H_
#define TVM_CONTRIB_TORCH_VENDOR_DTYPE_H_

#include <ATen/ATen.h>
#include <tvm/ffi/string.h>

#include <string>

namespace tvm_torch {

/*!
 * \brief The dtype a vendor kernel computes in: "float32", or "bfloat16" (oneDNN's bf16
 *        kernels, as torch.autocast runs them, on float32 or bfloat16 tensors).
 */
inline at::ScalarType ComputeDtype(const tvm::ffi::String& name) {
  const std::string dtype(name);
  TORCH_CHECK(dtype == "float32" || dtype == "bfloat16", "tvm_torch: unknown compute dtype '",
              dtype, "'");
  return dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
}

/*! \brief y in `dtype` (a no-op when it is): a result back in its input's dtype. */
inline at::Tensor InDtype(const at::Tensor& y, at::ScalarType dtype) {
  return y.scalar_type() == dtype ? y : y.to(dtype);
}

/*! \brief x in the prepared weight's dtype (a no-op when it is). */
inline at::Tensor AsComputeDtype(const at::Tensor& x, const at::Tensor& weight) {
  return InDtype(x, weight.scalar_type());
}

}  // namespace tvm_torch

#endif  // TVM_CONTRIB_TORCH_VENDOR_DTYPE_H_
