/*!
 * \file conv_geometry.h
 * \brief The geometry of a 2-D convolution, shared by the CPU convolution kernels (oneDNN
 *        primitives, oneDNN Graph partitions).
 */
#ifndef TVM_CONTRIB_TORCH_CONV_GEOMETRY_H_
#define TVM_CONTRIB_TORCH_CONV_GEOMETRY_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace tvm_torch {

/*! \brief The geometry of a 2-D convolution (NCHW sizes, OIHW weight). */
struct ConvGeometry {
  std::vector<int64_t> padding;
  std::vector<int64_t> stride;
  std::vector<int64_t> dilation;
  int64_t groups = 1;
};

/*! \brief The NCHW size of the convolution's result for an NCHW input of `input_size`. */
inline std::vector<int64_t> ConvOutputSize(const std::vector<int64_t>& input_size,
                                           c10::IntArrayRef weight_size,
                                           const ConvGeometry& g) {
  std::vector<int64_t> out{input_size[0], weight_size[0]};
  for (size_t i = 0; i < 2; ++i) {
    const int64_t extent = g.dilation[i] * (weight_size[2 + i] - 1) + 1;
    out.push_back((input_size[2 + i] + 2 * g.padding[i] - extent) / g.stride[i] + 1);
  }
  return out;
}

/*!
 * \brief Whether `t` has these sizes and, along every dim longer than 1, these strides: the
 *        layout a convolution kernel was built for (strides of size-1 dims do not matter).
 */
inline bool HasLayout(const at::Tensor& t, const std::vector<int64_t>& sizes,
                      const std::vector<int64_t>& strides) {
  if (t.sizes() != c10::IntArrayRef(sizes)) return false;
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] > 1 && t.stride(i) != strides[i]) return false;
  }
  return true;
}

}  // namespace tvm_torch

#endif  // TVM_CONTRIB_TORCH_CONV_GEOMETRY_H_
