/*!
 * \file onednn_graph_conv.cc
 * \brief OneDnnGraphConv: a convolution chain as a TorchScript graph that libtorch's oneDNN
 *        Graph fuser turns into one compiled partition.
 */
#include "onednn_graph_conv.h"

#include <torch/csrc/jit/codegen/onednn/interface.h>
#include <torch/csrc/jit/ir/ir.h>

#include <functional>
#include <utility>

namespace tvm_torch {
namespace {

namespace jit = torch::jit;

/*! \brief A complete (sizes and strides) CPU tensor type, in `format`. */
c10::TypePtr DenseType(const std::vector<int64_t>& sizes, at::ScalarType dtype,
                       at::MemoryFormat format = at::MemoryFormat::ChannelsLast) {
  return c10::TensorType::create(at::empty(sizes, at::TensorOptions().dtype(dtype), format));
}

/*! \brief The single oneDNN Graph fusion group of `g`, or null when there is not exactly one. */
jit::Node* OnlyFusionGroup(const std::shared_ptr<jit::Graph>& g) {
  static const c10::Symbol kGroup = c10::Symbol::fromQualString("prim::oneDNNFusionGroup");
  jit::Node* found = nullptr;
  int count = 0;
  std::function<void(jit::Block*)> visit = [&](jit::Block* block) {
    for (jit::Node* node : block->nodes()) {
      if (node->kind() == kGroup) {
        found = node;
        ++count;
      }
      for (jit::Block* inner : node->blocks()) visit(inner);
    }
  };
  visit(g->block());
  return count == 1 ? found : nullptr;
}

/*! \brief The number of nodes of `g` other than constants. */
size_t ComputeNodes(const std::shared_ptr<jit::Graph>& g) {
  size_t n = 0;
  for (jit::Node* node : g->nodes()) {
    if (node->kind() != c10::prim::Constant) ++n;
  }
  return n;
}

}  // namespace

OneDnnGraphConv::OneDnnGraphConv(const at::Tensor& weight, const ConvGeometry& geometry,
                                 const std::vector<int64_t>& input_size,
                                 const std::string& post_op, bool residual,
                                 at::MemoryFormat input_format)
    : graph_(std::make_shared<jit::Graph>()), dtype_(weight.scalar_type()),
      input_size_(input_size) {
  TORCH_CHECK((dtype_ == at::kFloat || dtype_ == at::kBFloat16) && weight.dim() == 4 &&
                  input_size.size() == 4,
              "tvm_torch: oneDNN Graph convolutions take a float32 or bfloat16 OIHW weight and "
              "NCHW sizes");
  const at::TensorOptions options = at::TensorOptions().dtype(dtype_);
  output_size_ = ConvOutputSize(input_size, weight.sizes(), geometry);
  TORCH_CHECK(input_format == at::MemoryFormat::ChannelsLast ||
                  input_format == at::MemoryFormat::Contiguous,
              "tvm_torch: oneDNN Graph convolutions take channels-last or contiguous inputs");
  input_strides_ = at::empty(input_size, input_format).strides().vec();
  output_strides_ = at::empty(output_size_, at::MemoryFormat::ChannelsLast).strides().vec();

  jit::Graph& g = *graph_;
  jit::Value* x = g.addInput("x");
  x->setType(DenseType(input_size, dtype_, input_format));
  jit::Value* bias = g.addInput("bias");
  bias->setType(c10::TensorType::create(at::empty({weight.size(0)}, options)));
  jit::Value* other = nullptr;
  if (residual) {
    other = g.addInput("other");
    other->setType(DenseType(output_size_, dtype_));
  }
  const c10::TypePtr out_type = DenseType(output_size_, dtype_);
  // The fuser needs complete types (sizes and strides) on every value it takes.
  auto typed = [&](jit::Value* v) {
    v->setType(out_type);
    return v;
  };
  jit::Value* y;
  {
    jit::WithInsertPoint guard(g.block());
    // A constant, so that oneDNN reorders it once and keeps it (its constant tensor cache).
    jit::Value* w = g.insertConstant(weight.contiguous());
    y = typed(g.insert(c10::aten::conv2d, {x, w, bias, geometry.stride, geometry.padding,
                                           geometry.dilation, geometry.groups}));
    if (post_op == "hardswish") {
      y = typed(g.insert(c10::aten::hardswish, {y}));
    } else if (post_op == "sigmoid") {
      y = typed(g.insert(c10::aten::sigmoid, {y}));
    } else if (post_op == "tanh") {
      y = typed(g.insert(c10::aten::tanh, {y}));
    } else if (post_op == "silu") {
      // The fuser takes SiLU as x * sigmoid(x) (oneDNN's swish).
      jit::Value* gate = typed(g.insert(c10::aten::sigmoid, {y}));
      y = typed(g.insert(c10::aten::mul, {y, gate}));
    } else {
      TORCH_CHECK(post_op == "none", "tvm_torch: no oneDNN Graph epilogue '", post_op, "'");
    }
    if (residual) y = typed(g.insert(c10::aten::add, {y, other}));
  }
  g.registerOutput(y);
  const size_t expected = ComputeNodes(graph_);

  // The fuser and the partition's compilation may refuse what they cannot take (an error
  // from libtorch): the call site then runs on the pointwise op instead.
  try {
    Fuse(x, bias, other, expected);
    if (!ok()) return;
    // Compile the partition now, on zeros, rather than in a caller's first Run.
    at::Tensor zeros_x = at::empty(input_size_, options, input_format).zero_();
    std::optional<at::Tensor> zeros_other;
    if (residual) {
      zeros_other = at::empty(output_size_, options, at::MemoryFormat::ChannelsLast).zero_();
    }
    Run(zeros_x, at::zeros({weight.size(0)}, options), zeros_other);
  } catch (const std::exception&) {
    operation_.reset();
  }
}

void OneDnnGraphConv::Fuse(torch::jit::Value* x, torch::jit::Value* bias,
                           torch::jit::Value* other, size_t expected) {
  torch::jit::fuser::onednn::fuseGraph(graph_);
  jit::Node* group = OnlyFusionGroup(graph_);
  if (group == nullptr) return;
  // Fewer nodes in the group than in the chain: the fuser left part of it outside.
  if (ComputeNodes(group->g(c10::attr::Subgraph)) < expected) return;
  static const c10::Symbol kGuard = c10::Symbol::fromQualString("prim::oneDNNFusionGuard");
  for (jit::Value* input : group->inputs()) {
    // The group reads its inputs through the fuser's type guard, which passes them through.
    if (input->node()->kind() == kGuard) input = input->node()->input(input->offset());
    if (input == x) {
      input_order_.push_back(0);
    } else if (input == bias) {
      input_order_.push_back(1);
    } else if (input == other && other != nullptr) {
      input_order_.push_back(2);
    } else {
      input_order_.clear();
      return;
    }
  }
  operation_ = std::make_unique<std::function<void(jit::Stack&)>>(group->getOperation());
}

OneDnnGraphConv::~OneDnnGraphConv() = default;

at::Tensor OneDnnGraphConv::Run(const at::Tensor& x, const at::Tensor& bias,
                                const std::optional<at::Tensor>& other) const {
  TORCH_CHECK(ok(), "tvm_torch: this convolution has no oneDNN Graph partition");
  // The partition was compiled for these sizes and strides: check them (the fuser's own type
  // guard is bypassed by calling the group's kernel directly).
  TORCH_CHECK(HasLayout(x, input_size_, input_strides_) && x.scalar_type() == dtype_ &&
                  x.is_cpu(),
              "tvm_torch: oneDNN Graph convolution compiled for ", dtype_,
              " CPU input of size ", input_size_, " and strides ", input_strides_, ", got ",
              x.scalar_type(), " ", x.sizes(), " / ", x.strides());
  TORCH_CHECK(bias.dim() == 1 && bias.is_contiguous() && bias.scalar_type() == dtype_,
              "tvm_torch: oneDNN Graph convolution expects a contiguous ", dtype_, " bias, got ",
              bias.scalar_type());
  const at::Tensor* args[3] = {&x, &bias, nullptr};
  if (other.has_value()) {
    TORCH_CHECK(HasLayout(*other, output_size_, output_strides_) &&
                    other->scalar_type() == dtype_,
                "tvm_torch: oneDNN Graph convolution's residual must be ", dtype_, " of size ",
                output_size_, " and strides ", output_strides_, ", got ", other->sizes(),
                " / ", other->strides());
    args[2] = &*other;
  }
  jit::Stack stack;
  stack.reserve(input_order_.size());
  for (int index : input_order_) {
    TORCH_CHECK(args[index] != nullptr, "tvm_torch: oneDNN Graph convolution needs a residual");
    stack.emplace_back(*args[index]);
  }
  (*operation_)(stack);
  TORCH_CHECK(stack.size() == 1, "tvm_torch: oneDNN Graph partition returned ", stack.size(),
              " values");
  at::Tensor y = stack.back().toTensor();
  TORCH_CHECK(y.sizes() == at::IntArrayRef(output_size_) && !y.is_mkldnn(),
              "tvm_torch: oneDNN Graph partition returned a tensor of size ", y.sizes());
  return y;
}

}  // namespace tvm_torch
