/*!
 * \file onednn_graph_conv.h
 * \brief A CPU convolution with its fused epilogue as one compiled oneDNN Graph partition,
 *        through libtorch's TorchScript oneDNN Graph (LLGA) fuser.
 *
 * libtorch exports no oneDNN symbols, so its convolutions are reached through ATen ops. The
 * pointwise op (mkldnn::_convolution_pointwise) builds a new oneDNN primitive descriptor at
 * every call: 20-40 us per call, as much as the kernel itself for MobileNet-sized layers. A
 * compiled oneDNN Graph partition is built once and then only executed; libtorch makes one
 * from a TorchScript graph, which is what this class builds, for one geometry and one input
 * size, with the weight as a graph constant (so oneDNN keeps its reordered copy).
 */
#ifndef TVM_CONTRIB_TORCH_ONEDNN_GRAPH_CONV_H_
#define TVM_CONTRIB_TORCH_ONEDNN_GRAPH_CONV_H_

#include <ATen/ATen.h>
#include <ATen/core/stack.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "conv_geometry.h"

namespace torch {
namespace jit {
struct Graph;
struct Value;
}  // namespace jit
}  // namespace torch

namespace tvm_torch {

/*!
 * \brief conv2d(x, weight) + bias, then `post_op` ("none", "hardswish", "sigmoid", "tanh",
 *        "silu"), then + other when `residual`, in the weight's dtype (float32 or bfloat16), as
 *        one oneDNN Graph partition for channels-last inputs of one size.
 */
class OneDnnGraphConv {
 public:
  /*!
   * \brief Build and fuse the graph, and compile its partition. \ref ok says whether oneDNN
   *        Graph took all of it (and compiled it).
   * \param weight The float32 or bfloat16 OIHW weight (kept as a graph constant); x, bias
   *        and other come in its dtype.
   * \param input_size The NCHW size of x.
   * \param input_format How x is laid out: channels-last (a result of the program), or
   *        contiguous NCHW (the program's own input, read without a transpose).
   */
  OneDnnGraphConv(const at::Tensor& weight, const ConvGeometry& geometry,
                  const std::vector<int64_t>& input_size, const std::string& post_op,
                  bool residual,
                  at::MemoryFormat input_format = at::MemoryFormat::ChannelsLast);
  ~OneDnnGraphConv();

  /*! \brief Whether the whole chain became one partition (Run may be called). */
  bool ok() const { return operation_ != nullptr; }

  /*!
   * \brief Run on x in the input format (and other, of the result's size and layout).
   * \return The channels-last NCHW result.
   */
  at::Tensor Run(const at::Tensor& x, const at::Tensor& bias,
                 const std::optional<at::Tensor>& other) const;

 private:
  /*! \brief Run the fuser; set operation_ when it made one group of `expected`+ nodes. */
  void Fuse(torch::jit::Value* x, torch::jit::Value* bias, torch::jit::Value* other,
            size_t expected);

  std::shared_ptr<torch::jit::Graph> graph_;
  /*! \brief The fusion group's kernel; null when the fuser left part of the chain out. */
  std::unique_ptr<std::function<void(torch::jit::Stack&)>> operation_;
  /*! \brief Which of (x, bias, other) feeds each input of the fusion group, in order. */
  std::vector<int> input_order_;
  at::ScalarType dtype_;
  std::vector<int64_t> input_size_;
  std::vector<int64_t> input_strides_;
  std::vector<int64_t> output_size_;
  std::vector<int64_t> output_strides_;
};

}  // namespace tvm_torch

#endif  // TVM_CONTRIB_TORCH_ONEDNN_GRAPH_CONV_H_
