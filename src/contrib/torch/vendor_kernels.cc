/*!
 * \file vendor_kernels.cc
 * \brief CPU vendor kernels (oneDNN and MKL, as shipped inside libtorch) exposed to compiled
 *        Relax programs as TVM FFI global functions.
 *
 * tvm.contrib.torch.vendor_kernels rewrites heavy Relax ops into R.call_pure_packed calls of
 * these functions. On CUDA, convolutions and matrix products go to cuDNN/cuBLAS through ATen
 * on the caller's current stream (the runtime makes it TVM's stream too). On CPU,
 * convolutions (in NHWC: a contiguous NHWC tensor is a channels-last NCHW torch tensor, which
 * is what oneDNN's convolution produces) run on oneDNN with weights prepacked once, at the
 * program's first call, into its blocked format (in bfloat16 for bfloat16 programs; as
 * oneDNN primitives on this library's own oneDNN, see onednn_conv.h, or else as compiled
 * oneDNN Graph partitions, see onednn_graph_conv.h), and with the epilogues that
 * oneDNN computes exactly as PyTorch does (bias, residual add, SiLU, sigmoid, tanh,
 * hardswish) fused into the primitive; ReLU and ReLU6 fused only on calls where no NaN can
 * reach them (OneDnnConv checks), else, like hardsigmoid, applied by ATen after it (oneDNN's
 * map NaN to a number). The "_out" variants write into the destination the program passes
 * (its planned memory). Linear layers are in linear_kernels.cc. All tensors cross the
 * boundary through DLPack without copies.
 */
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/object.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "onednn_conv.h"
#include "onednn_graph_conv.h"
#include "tensor_bridge.h"
#include "vendor_dtype.h"

namespace tvm_torch {
namespace {

namespace ffi = tvm::ffi;

std::vector<int64_t> ToVector(const ffi::Shape& shape) {
  return std::vector<int64_t>(shape.begin(), shape.end());
}

/*! \brief NHWC contiguous TVM tensor -> channels-last NCHW torch view (no copy). */
at::Tensor NhwcAsNchw(const ffi::Tensor& t) { return ToTorchTensor(t).permute({0, 3, 1, 2}); }

/*! \brief NCHW torch result -> NHWC contiguous TVM tensor (no copy when channels-last). */
ffi::Tensor NchwAsNhwc(const at::Tensor& y) {
  return ToTvmTensor(y.permute({0, 2, 3, 1}).contiguous());
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef,
                                          c10::IntArrayRef, int64_t,
                                          c10::OptionalArrayRef<int64_t>)>&
ReorderConvWeightOp() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_reorder_convolution_weight", "")
                       .typed<at::Tensor(const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef,
                                         c10::IntArrayRef, int64_t,
                                         c10::OptionalArrayRef<int64_t>)>();
  return op;
}

using ConvPointwiseFn = at::Tensor(const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, c10::IntArrayRef,
                                   c10::IntArrayRef, c10::IntArrayRef, int64_t, c10::string_view,
                                   c10::List<std::optional<c10::Scalar>>,
                                   std::optional<c10::string_view>);

using ConvBinaryFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&, c10::IntArrayRef,
                                c10::IntArrayRef, c10::IntArrayRef, int64_t, c10::string_view,
                                std::optional<c10::Scalar>, std::optional<c10::string_view>,
                                c10::List<std::optional<c10::Scalar>>,
                                std::optional<c10::string_view>);

/*!
 * \brief Which kernel CPU convolutions run on: "primitive" (OneDnnConv, where this library
 *        has oneDNN and oneDNN takes the call site; else as "graph"), "graph" (OneDnnGraphConv
 *        partitions, else "pointwise") or "pointwise" (ATen's mkldnn op); set by
 *        tvm_torch.set_conv_kernel, for A/B runs and as a way out.
 */
std::atomic<int> g_conv_kernel{0};
constexpr const char* kConvKernels[] = {"primitive", "graph", "pointwise"};
enum ConvKernelChoice { kPrimitive = 0, kGraph = 1, kPointwise = 2 };

/*! \brief Primitives and partitions built so far in this process (for diagnostics, tests). */
std::atomic<int64_t> g_primitives_built{0};
std::atomic<int64_t> g_graphs_built{0};

/*! \brief Call sites kept per weight (one per input size and epilogue); past it, pointwise. */
constexpr size_t kMaxKernelsPerWeight = 8;

/*! \brief The kernel a call site runs on: one of the two, or neither (the pointwise op). */
struct ConvKernels {
  const OneDnnConv* primitive = nullptr;
  const OneDnnGraphConv* graph = nullptr;
};

/*!
 * \brief A convolution's weight, prepared at load: the OIHW weight in the compute dtype, from
 *        which each call site's oneDNN primitive (or Graph partition) is built at its first
 *        call, and, where neither takes a chain, oneDNN's blocked weight for the pointwise op.
 */
class ConvWeightObj : public ffi::Object {
 public:
  /*! \brief OIHW, in the compute dtype (float32 or bfloat16). */
  at::Tensor plain;
  ConvGeometry geometry;
  std::vector<int64_t> input_size;

  /*!
   * \brief The kernel for (post_op, residual), NCHW input size `x_size` and input layout
   *        `x_format`, as g_conv_kernel chooses, each built at its first use: the primitive,
   *        or else the partition, or neither when switched off, past kMaxKernelsPerWeight, or
   *        when oneDNN (or the fuser) did not take the whole chain.
   */
  ConvKernels Kernels(const std::string& post_op, bool residual, at::IntArrayRef x_size,
                      at::MemoryFormat x_format) {
    const int choice = g_conv_kernel.load(std::memory_order_relaxed);
    if (choice == kPointwise) return {};
    std::lock_guard<std::mutex> lock(mutex_);
    Entry* entry = nullptr;
    for (auto& e : kernels_) {
      if (e.post_op == post_op && e.residual == residual && e.x_format == x_format &&
          at::IntArrayRef(e.x_size) == x_size) {
        entry = &e;
        break;
      }
    }
    if (entry == nullptr) {
      if (kernels_.size() >= kMaxKernelsPerWeight) return {};
      kernels_.push_back(
          {post_op, residual, x_size.vec(), x_format, false, nullptr, false, nullptr});
      entry = &kernels_.back();
    }
    if (choice == kPrimitive && !entry->primitive_tried) {
      entry->primitive_tried = true;
      auto conv = std::make_unique<OneDnnConv>(plain, geometry, entry->x_size, post_op,
                                               residual, x_format);
      if (conv->ok()) {
        entry->primitive = std::move(conv);
        ++g_primitives_built;
      }
    }
    if (choice == kPrimitive && entry->primitive) return {entry->primitive.get(), nullptr};
    if (!entry->graph_tried) {
      entry->graph_tried = true;
      // A partition never fuses a clip (oneDNN's maps NaN to a number): the caller applies it.
      const std::string graph_post_op = OneDnnConv::IsClip(post_op) ? "none" : post_op;
      auto conv = std::make_unique<OneDnnGraphConv>(plain, geometry, entry->x_size,
                                                    graph_post_op, residual, x_format);
      if (conv->ok()) {
        entry->graph = std::move(conv);
        ++g_graphs_built;
      }
    }
    return {nullptr, entry->graph.get()};
  }

  /*! \brief oneDNN's blocked weight for the pointwise op, made at its first use. */
  at::Tensor Packed() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!packed_.defined()) {
      packed_ = ReorderConvWeightOp().call(plain, geometry.padding, geometry.stride,
                                           geometry.dilation, geometry.groups, input_size);
    }
    return packed_;
  }

  TVM_FFI_DECLARE_OBJECT_INFO_FINAL("tvm_torch.ConvWeight", ConvWeightObj, ffi::Object);

 private:
  /*! \brief One call site's kernels (a null one: not built yet, or refused). */
  struct Entry {
    std::string post_op;
    bool residual;
    std::vector<int64_t> x_size;
    at::MemoryFormat x_format;
    bool primitive_tried = false;
    std::unique_ptr<OneDnnConv> primitive;
    bool graph_tried = false;
    std::unique_ptr<OneDnnGraphConv> graph;
  };
  std::mutex mutex_;
  at::Tensor packed_;
  std::vector<Entry> kernels_;
};

class ConvWeight : public ffi::ObjectRef {
 public:
  TVM_FFI_DEFINE_OBJECT_REF_METHODS_NULLABLE(ConvWeight, ffi::ObjectRef, ConvWeightObj);
};

/*!
 * \brief Prepare an OIHW weight for the given conv geometry and NCHW input size, in the
 *        compute dtype.
 */
ConvWeight Conv2dPrepack(ffi::Tensor weight, ffi::Shape padding, ffi::Shape stride,
                         ffi::Shape dilation, int64_t groups, ffi::Shape input_size,
                         ffi::String compute_dtype) {
  auto node = ffi::make_object<ConvWeightObj>();
  node->geometry = ConvGeometry{ToVector(padding), ToVector(stride), ToVector(dilation), groups};
  node->input_size = ToVector(input_size);
  // A copy: the params blob may be freed after load.
  node->plain = ToTorchTensor(weight).to(ComputeDtype(compute_dtype), /*non_blocking=*/false,
                                         /*copy=*/true);
  return ConvWeight(std::move(node));
}

ConvWeightObj* UnwrapConv(const ffi::ObjectRef& holder) {
  auto* node = const_cast<ConvWeightObj*>(holder.as<ConvWeightObj>());
  TORCH_CHECK(node != nullptr, "tvm_torch: expected a prepared convolution weight, got ",
              holder.defined() ? holder->GetTypeKey() : "None");
  return node;
}

/*!
 * \brief The oneDNN post-op that computes a convolution epilogue exactly as PyTorch does,
 *        NaN and Inf included, or "none" when it must run after the primitive
 *        (ApplyEpilogue): oneDNN's fused ReLU turns NaN into 0 where PyTorch keeps NaN.
 */
const char* FusedConvEpilogue(const std::string& epilogue) {
  if (epilogue == "silu") return "swish";
  if (epilogue == "sigmoid") return "sigmoid";
  if (epilogue == "tanh") return "tanh";
  if (epilogue == "hardswish") return "hardswish";
  // oneDNN's hardsigmoid and clip map NaN to a number.
  TORCH_CHECK(epilogue == "none" || epilogue == "relu" || epilogue == "relu6" ||
                  epilogue == "hardsigmoid",
              "tvm_torch: unknown epilogue '", epilogue, "'");
  return "none";
}

/*! \brief Apply an epilogue that FusedConvEpilogue left out, in place, with ATen. */
void ApplyEpilogue(at::Tensor& y, const std::string& epilogue, bool fused) {
  if (fused || epilogue == "none") return;
  if (epilogue == "relu") {
    y.relu_();
  } else if (epilogue == "relu6") {
    y.clamp_(0, 6);
  } else if (epilogue == "silu") {
    at::silu_(y);
  } else if (epilogue == "sigmoid") {
    y.sigmoid_();
  } else if (epilogue == "tanh") {
    y.tanh_();
  } else if (epilogue == "hardswish") {
    at::hardswish_(y);
  } else {
    TORCH_CHECK(epilogue == "hardsigmoid", "tvm_torch: unknown epilogue '", epilogue, "'");
    at::hardsigmoid_(y);
  }
}

/*!
 * \brief The epilogue a call site's kernel is built with (ConvWeightObj::Kernels' key): the
 *        fused one by its PyTorch name ("silu", not oneDNN's "swish"), or a clip (which the
 *        primitive may fuse, call by call) when nothing is added after; else "none".
 * \param post_op FusedConvEpilogue(epilogue).
 */
std::string KernelEpilogue(const std::string& epilogue, const char* post_op, bool residual) {
  const bool clip = OneDnnConv::IsClip(epilogue) && !residual;
  return std::string(post_op) != "none" || clip ? epilogue : "none";
}

/*!
 * \brief conv2d(input NCHW, laid out as `input_format` says: channels-last, or contiguous)
 *        + bias, then oneDNN's post-op `post_op` (or the residual `other`, with "none"), in
 *        the weight's dtype: on the call site's oneDNN primitive or Graph partition, or else
 *        on the pointwise op. `input`, `bias` and `other` come in the weight's dtype.
 */
at::Tensor RunConv(ConvWeightObj* weight, const at::Tensor& input, const at::Tensor& bias,
                   const std::string& epilogue, const char* post_op,
                   const std::optional<at::Tensor>& other, const ffi::Shape& padding,
                   const ffi::Shape& stride, const ffi::Shape& dilation, int64_t groups,
                   at::MemoryFormat input_format = at::MemoryFormat::ChannelsLast,
                   const std::optional<at::Tensor>& out = std::nullopt,
                   bool* clipped = nullptr) {
  if (clipped != nullptr) *clipped = false;
  const ConvKernels kernels =
      weight->Kernels(KernelEpilogue(epilogue, post_op, other.has_value()), other.has_value(),
                      input.sizes(), input_format);
  if (kernels.primitive != nullptr) {
    return kernels.primitive->Run(input, bias, other, out, clipped);
  }
  if (kernels.graph != nullptr) return kernels.graph->Run(input, bias, other);
  const at::Tensor w = weight->Packed();
  if (!other.has_value()) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mkldnn::_convolution_pointwise", "")
                         .typed<ConvPointwiseFn>();
    return op.call(input, w, bias, ToVector(padding), ToVector(stride), ToVector(dilation),
                   groups, post_op, c10::List<std::optional<c10::Scalar>>(), std::nullopt);
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_convolution_pointwise", "binary")
                       .typed<ConvBinaryFn>();
  return op.call(input, *other, w, bias, ToVector(padding), ToVector(stride),
                 ToVector(dilation), groups, "add", std::nullopt, std::nullopt,
                 c10::List<std::optional<c10::Scalar>>(), std::nullopt);
}

/*!
 * \brief conv2d(input NCHW, laid out as `input_format` says) with a prepared weight and bias,
 *        then `epilogue` (fused where oneDNN computes it as PyTorch does, else ATen's), in the
 *        weight's dtype; the result comes back channels-last, in the input's dtype: written
 *        into `out` where the kernel can, else allocated.
 */
at::Tensor ConvWithEpilogue(const at::Tensor& input, const ffi::ObjectRef& packed,
                            const ffi::Tensor& bias, const ffi::Shape& padding,
                            const ffi::Shape& stride, const ffi::Shape& dilation,
                            int64_t groups, const std::string& epilogue,
                            at::MemoryFormat input_format,
                            const std::optional<at::Tensor>& out = std::nullopt) {
  const char* post_op = FusedConvEpilogue(epilogue);
  ConvWeightObj* weight = UnwrapConv(packed);
  bool clipped = false;
  at::Tensor y = RunConv(weight, AsComputeDtype(input, weight->plain),
                         AsComputeDtype(ToTorchTensor(bias), weight->plain), epilogue, post_op,
                         std::nullopt, padding, stride, dilation, groups, input_format, out,
                         &clipped);
  ApplyEpilogue(y, epilogue, std::string(post_op) != "none" || clipped);
  return InDtype(y, input.scalar_type());
}

/*!
 * \brief Put a result into the destination a program passed (a no-op when the kernel wrote it
 *        there already), converting its dtype if needed.
 */
void WriteResult(const at::Tensor& y, const at::Tensor& target) {
  TORCH_CHECK(target.sizes() == y.sizes(), "tvm_torch: the program passed a destination of size ",
              target.sizes(), " for a convolution result of size ", y.sizes());
  if (y.data_ptr() != target.data_ptr()) target.copy_(y);
}

/*!
 * \brief The data of a dense CPU tensor of `dtype` and exactly `sizes`; null for anything else
 *        (the caller then takes the general path, which converts, or checks and reports).
 */
void* DenseData(const ffi::Tensor& t, at::ScalarType dtype, at::IntArrayRef sizes) {
  const DLTensor* d = t.GetDLTensorPtr();
  const bool type_ok = dtype == at::kBFloat16
                           ? d->dtype.code == kDLBfloat && d->dtype.bits == 16
                           : dtype == at::kFloat && d->dtype.code == kDLFloat && d->dtype.bits == 32;
  if (!type_ok || d->dtype.lanes != 1 || d->device.device_type != kDLCPU ||
      d->ndim != static_cast<int>(sizes.size()) || !ffi::IsContiguous(*d)) {
    return nullptr;
  }
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (d->shape[i] != sizes[i]) return nullptr;
  }
  return static_cast<char*>(d->data) + d->byte_offset;
}

/*!
 * \brief A destination-passing convolution straight on its oneDNN primitive, without making
 *        ATen tensors, which cost as much as a small convolution's kernel. Taken where x
 *        (NHWC, or the program's NCHW input), other and out are dense, of the weight's dtype
 *        and the primitive's sizes.
 * \param other The residual (NHWC), or null.
 * \param unary For a residual: "relu" (ATen's, after the add) or "none".
 * \return false, having written nothing, where the general path must run instead (another
 *         kernel, a dtype to convert).
 */
bool RunPrimitiveDirect(const ffi::ObjectRef& packed, const ffi::Tensor& x, bool nchw_input,
                        const ffi::Tensor& bias, const ffi::Tensor* other,
                        const ffi::Tensor& out, const std::string& epilogue,
                        const std::string& unary) {
  ConvWeightObj* weight = UnwrapConv(packed);
  const at::ScalarType dtype = weight->plain.scalar_type();
  const DLTensor* xd = x.GetDLTensorPtr();
  if (xd->ndim != 4) return false;
  const std::array<int64_t, 4> x_dims{xd->shape[0], xd->shape[1], xd->shape[2], xd->shape[3]};
  const void* x_data = DenseData(x, dtype, x_dims);
  if (x_data == nullptr) return false;
  const std::array<int64_t, 4> x_size =
      nchw_input ? x_dims : std::array<int64_t, 4>{x_dims[0], x_dims[3], x_dims[1], x_dims[2]};
  const char* post_op = other == nullptr ? FusedConvEpilogue(epilogue) : "none";
  const ConvKernels kernels = weight->Kernels(
      KernelEpilogue(epilogue, post_op, other != nullptr), other != nullptr, x_size,
      nchw_input ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast);
  if (kernels.primitive == nullptr || kernels.primitive->dtype() != dtype) return false;
  const std::vector<int64_t>& y = kernels.primitive->output_size();
  const std::array<int64_t, 4> y_nhwc{y[0], y[2], y[3], y[1]};
  void* out_data = DenseData(out, dtype, y_nhwc);
  const void* other_data = other == nullptr ? nullptr : DenseData(*other, dtype, y_nhwc);
  const void* bias_data = DenseData(bias, dtype, {y[1]});
  if (out_data == nullptr || (other != nullptr && other_data == nullptr) || bias_data == nullptr) {
    return false;
  }
  bool clipped = false;
  kernels.primitive->Execute({x_data, bias_data, other_data, out_data}, &clipped);
  // What the primitive left out: ATen's, on the result in place (as ConvWithEpilogue and
  // ConvAdd apply it).
  const bool fused = std::string(post_op) != "none" || clipped;
  const bool epilogue_left = other == nullptr && !fused && epilogue != "none";
  if (epilogue_left || unary == "relu") {
    at::Tensor result = NhwcAsNchw(out);
    ApplyEpilogue(result, epilogue, fused);
    if (unary == "relu") result.relu_();
  }
  return true;
}

/*!
 * \brief conv2d(x NHWC) with a prepared weight (ConvWeightObj) and bias, then an epilogue:
 *        "none", "relu", "relu6", "silu", "sigmoid", "tanh", "hardswish" or "hardsigmoid" (see
 *        FusedConvEpilogue). It computes in the weight's dtype and returns x's: in a bfloat16
 *        program, bfloat16 in and out between oneDNN kernels, or float32 converted around it.
 */
ffi::Tensor Conv2dNhwc(ffi::Tensor x, ffi::ObjectRef packed, ffi::Tensor bias,
                       ffi::Shape padding, ffi::Shape stride, ffi::Shape dilation,
                       int64_t groups, ffi::String attr) {
  return NchwAsNhwc(ConvWithEpilogue(NhwcAsNchw(x), packed, bias, padding, stride, dilation,
                                     groups, std::string(attr), at::MemoryFormat::ChannelsLast));
}

/*!
 * \brief Conv2dNhwc in destination-passing style: the result goes into `out` (NHWC, of the
 *        result's size and dtype), which the program's memory plan allocated, instead of
 *        memory allocated per call.
 */
void Conv2dNhwcOut(ffi::Tensor x, ffi::ObjectRef packed, ffi::Tensor bias, ffi::Shape padding,
                   ffi::Shape stride, ffi::Shape dilation, int64_t groups, ffi::String attr,
                   ffi::Tensor out) {
  if (RunPrimitiveDirect(packed, x, false, bias, nullptr, out, std::string(attr), "none")) return;
  const at::Tensor target = NhwcAsNchw(out);
  WriteResult(ConvWithEpilogue(NhwcAsNchw(x), packed, bias, padding, stride, dilation, groups,
                               std::string(attr), at::MemoryFormat::ChannelsLast, target),
              target);
}

/*! \brief x as a contiguous NCHW torch tensor (a program's input), checked. */
at::Tensor NchwInput(const ffi::Tensor& x) {
  const at::Tensor input = ToTorchTensor(x);
  TORCH_CHECK(input.dim() == 4 && input.is_contiguous(),
              "tvm_torch.conv2d_nchw_input: expected a contiguous NCHW input, got ",
              input.sizes(), " / ", input.strides());
  return input;
}

/*!
 * \brief Conv2dNhwc on a contiguous NCHW x (a program's input: oneDNN reads it as it is,
 *        instead of a TVM kernel transposing it to NHWC first); the result is NHWC.
 */
ffi::Tensor Conv2dNchwInput(ffi::Tensor x, ffi::ObjectRef packed, ffi::Tensor bias,
                            ffi::Shape padding, ffi::Shape stride, ffi::Shape dilation,
                            int64_t groups, ffi::String attr) {
  return NchwAsNhwc(ConvWithEpilogue(NchwInput(x), packed, bias, padding, stride, dilation,
                                     groups, std::string(attr), at::MemoryFormat::Contiguous));
}

/*! \brief Conv2dNchwInput in destination-passing style (as Conv2dNhwcOut). */
void Conv2dNchwInputOut(ffi::Tensor x, ffi::ObjectRef packed, ffi::Tensor bias,
                        ffi::Shape padding, ffi::Shape stride, ffi::Shape dilation,
                        int64_t groups, ffi::String attr, ffi::Tensor out) {
  if (RunPrimitiveDirect(packed, x, true, bias, nullptr, out, std::string(attr), "none")) return;
  const at::Tensor target = NhwcAsNchw(out);
  WriteResult(ConvWithEpilogue(NchwInput(x), packed, bias, padding, stride, dilation, groups,
                               std::string(attr), at::MemoryFormat::Contiguous, target),
              target);
}

/*! \brief Conv2dAddNhwc's result, channels-last: written into `out` where the kernel can. */
at::Tensor ConvAdd(const ffi::Tensor& x, const ffi::Tensor& other, const ffi::ObjectRef& packed,
                   const ffi::Tensor& bias, const ffi::Shape& padding, const ffi::Shape& stride,
                   const ffi::Shape& dilation, int64_t groups, const std::string& unary,
                   const std::optional<at::Tensor>& out = std::nullopt) {
  ConvWeightObj* weight = UnwrapConv(packed);
  const at::Tensor input = NhwcAsNchw(x);
  const at::Tensor residual = NhwcAsNchw(other);
  const at::ScalarType out_dtype =
      at::promote_types(input.scalar_type(), residual.scalar_type());
  const at::Tensor compute_input = AsComputeDtype(input, weight->plain);
  const at::Tensor compute_bias = AsComputeDtype(ToTorchTensor(bias), weight->plain);
  at::Tensor y;
  if (residual.scalar_type() == weight->plain.scalar_type()) {
    y = RunConv(weight, compute_input, compute_bias, "none", "none", residual, padding, stride,
                dilation, groups, at::MemoryFormat::ChannelsLast, out);
  } else {
    y = InDtype(RunConv(weight, compute_input, compute_bias, "none", "none", std::nullopt,
                        padding, stride, dilation, groups),
                out_dtype);
    y.add_(residual);
  }
  if (unary == "relu") y.relu_();
  return InDtype(y, out_dtype);
}

/*!
 * \brief conv2d(x NHWC) + other (NHWC), then "relu" or "none" (ATen's, as in Conv2dNhwc). The
 *        result has the dtype of x + other (bfloat16 when both are, as torch.autocast's type
 *        promotion makes it); an other in another dtype than the weight's is added in that
 *        promoted dtype after the convolution.
 */
ffi::Tensor Conv2dAddNhwc(ffi::Tensor x, ffi::Tensor other, ffi::ObjectRef packed,
                          ffi::Tensor bias, ffi::Shape padding, ffi::Shape stride,
                          ffi::Shape dilation, int64_t groups, ffi::String unary_attr) {
  return NchwAsNhwc(ConvAdd(x, other, packed, bias, padding, stride, dilation, groups,
                            std::string(unary_attr)));
}

/*! \brief Conv2dAddNhwc in destination-passing style (as Conv2dNhwcOut). */
void Conv2dAddNhwcOut(ffi::Tensor x, ffi::Tensor other, ffi::ObjectRef packed, ffi::Tensor bias,
                      ffi::Shape padding, ffi::Shape stride, ffi::Shape dilation,
                      int64_t groups, ffi::String unary_attr, ffi::Tensor out) {
  if (RunPrimitiveDirect(packed, x, false, bias, &other, out, "none", std::string(unary_attr))) {
    return;
  }
  const at::Tensor target = NhwcAsNchw(out);
  WriteResult(ConvAdd(x, other, packed, bias, padding, stride, dilation, groups,
                      std::string(unary_attr), target),
              target);
}

/*!
 * \brief Transcendental elementwise functions on ATen's vectorised kernels (TVM's default
 * code calls scalar libm for them: 10-30x slower on CPU).
 * \param op "gelu", "gelu_tanh", "sigmoid", "tanh", "silu" or "exp".
 */
ffi::Tensor Unary(ffi::Tensor x, ffi::String op) {
  at::Tensor t = ToTorchTensor(x);
  const std::string name(op);
  if (name == "gelu") return ToTvmTensor(at::gelu(t));
  if (name == "gelu_tanh") return ToTvmTensor(at::gelu(t, "tanh"));
  if (name == "sigmoid") return ToTvmTensor(at::sigmoid(t));
  if (name == "tanh") return ToTvmTensor(at::tanh(t));
  if (name == "silu") return ToTvmTensor(at::silu(t));
  if (name == "exp") return ToTvmTensor(at::exp(t));
  TORCH_CHECK(false, "tvm_torch.unary: unknown function '", name, "'");
}

/*!
 * \brief mean over `axes` on ATen's vectorised reduction (TVM's untuned code walks an NHWC
 * tensor's spatial axes with the channel stride: ~5x slower).
 */
ffi::Tensor Mean(ffi::Tensor x, ffi::Shape axes, bool keepdim) {
  return ToTvmTensor(at::mean(ToTorchTensor(x), ToVector(axes), keepdim));
}

/*! \brief max_pool2d of an NHWC tensor on ATen's vectorised channels-last kernel. */
ffi::Tensor MaxPool2dNhwc(ffi::Tensor x, ffi::Shape kernel, ffi::Shape stride,
                          ffi::Shape padding, ffi::Shape dilation, bool ceil_mode) {
  return NchwAsNhwc(at::max_pool2d(NhwcAsNchw(x), ToVector(kernel), ToVector(stride),
                                   ToVector(padding), ToVector(dilation), ceil_mode));
}

/*! \brief avg_pool2d of an NHWC tensor on ATen's vectorised channels-last kernel. */
ffi::Tensor AvgPool2dNhwc(ffi::Tensor x, ffi::Shape kernel, ffi::Shape stride,
                          ffi::Shape padding, bool ceil_mode, bool count_include_pad) {
  return NchwAsNhwc(at::avg_pool2d(NhwcAsNchw(x), ToVector(kernel), ToVector(stride),
                                   ToVector(padding), ceil_mode, count_include_pad));
}

/*! \brief y = conv2d(x, w) + bias in NCHW on whatever torch picks for the device (cuDNN on CUDA). */
at::Tensor ConvolutionNchw(const ffi::Tensor& x, const ffi::Tensor& weight, const ffi::Tensor& bias,
                           const ffi::Shape& padding, const ffi::Shape& stride,
                           const ffi::Shape& dilation, int64_t groups) {
  return at::convolution(ToTorchTensor(x), ToTorchTensor(weight), ToTorchTensor(bias),
                         ToVector(stride), ToVector(padding), ToVector(dilation),
                         /*transposed=*/false, /*output_padding=*/{0, 0}, groups);
}

/*!
 * \brief conv2d (NCHW, OIHW) + bias, then an epilogue as Conv2dNhwc's (by ATen); runs on the
 *        caller's current stream.
 */
ffi::Tensor Conv2dNchw(ffi::Tensor x, ffi::Tensor weight, ffi::Tensor bias, ffi::Shape padding,
                       ffi::Shape stride, ffi::Shape dilation, int64_t groups,
                       ffi::String attr) {
  at::Tensor y = ConvolutionNchw(x, weight, bias, padding, stride, dilation, groups);
  ApplyEpilogue(y, std::string(attr), /*fused=*/false);
  return ToTvmTensor(y);
}

/*! \brief conv2d (NCHW, OIHW) + bias + other (+ relu). */
ffi::Tensor Conv2dAddNchw(ffi::Tensor x, ffi::Tensor other, ffi::Tensor weight, ffi::Tensor bias,
                          ffi::Shape padding, ffi::Shape stride, ffi::Shape dilation,
                          int64_t groups, ffi::String attr) {
  at::Tensor y = ConvolutionNchw(x, weight, bias, padding, stride, dilation, groups);
  y.add_(ToTorchTensor(other));
  if (std::string(attr) == "relu") y.relu_();
  return ToTvmTensor(y);
}

/*!
 * \brief x @ w + bias, then an epilogue as Conv2dNhwc's (by ATen), through ATen's addmm: cuBLAS
 * on CUDA; on CPU, MKL for the GEMV-sized 1x1 convolutions of squeeze-excite gates, where it
 * takes a few microseconds against oneDNN's ~25 us of per-call set-up. w is [in, out], x is
 * [..., in]. Leading dims are flattened so that the bias is added inside the GEMM for N-D
 * inputs too.
 */
ffi::Tensor MatmulBias(ffi::Tensor x, ffi::Tensor w, ffi::Tensor bias, ffi::String attr) {
  at::Tensor a = ToTorchTensor(x);
  at::Tensor b = ToTorchTensor(w);
  at::Tensor y;
  if (a.dim() == 2) {
    y = at::addmm(ToTorchTensor(bias), a, b);
  } else {
    std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end());
    shape.back() = b.size(1);
    y = at::addmm(ToTorchTensor(bias), a.reshape({-1, a.size(-1)}), b).view(shape);
  }
  ApplyEpilogue(y, std::string(attr), /*fused=*/false);
  return ToTvmTensor(y);
}

/*! \brief layer_norm over the trailing dims covered by gamma (ATen's vectorised kernel). */
ffi::Tensor LayerNorm(ffi::Tensor x, ffi::Tensor gamma, ffi::Tensor beta, double eps) {
  at::Tensor g = ToTorchTensor(gamma);
  return ToTvmTensor(at::layer_norm(ToTorchTensor(x), g.sizes(), g, ToTorchTensor(beta), eps));
}

/*!
 * \brief RMS norm over the last dim, x * rsqrt(mean(x^2) + eps) * weight (ATen's, which gives
 *        what Hugging Face's T5/Llama RMSNorm modules compute in float32, bit for bit).
 */
ffi::Tensor RmsNorm(ffi::Tensor x, ffi::Tensor weight, double eps) {
  at::Tensor w = ToTorchTensor(weight);
  TORCH_CHECK(w.dim() == 1, "tvm_torch.rms_norm: expected a 1-D weight, got ", w.sizes());
  return ToTvmTensor(at::rms_norm(ToTorchTensor(x), {w.size(0)}, w, eps));
}

/*!
 * \brief Flush-to-zero and denormals-are-zero on the calling thread while in scope (x86's
 *        MXCSR; nothing elsewhere): subnormal results become 0 instead of taking the CPU's
 *        slow path.
 */
class FlushSubnormalsScope {
 public:
  FlushSubnormalsScope() {
#if defined(__x86_64__) || defined(__i386__)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | kFtz | kDaz);
#endif
  }
  ~FlushSubnormalsScope() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_setcsr(saved_);
#endif
  }
  FlushSubnormalsScope(const FlushSubnormalsScope&) = delete;
  FlushSubnormalsScope& operator=(const FlushSubnormalsScope&) = delete;

 private:
  static constexpr unsigned kFtz = 0x8000;
  static constexpr unsigned kDaz = 0x0040;
  unsigned saved_ = 0;
};

/*! \brief softmax along one axis (ATen's vectorised kernel). */
ffi::Tensor Softmax(ffi::Tensor x, int64_t axis) {
  return ToTvmTensor(at::softmax(ToTorchTensor(x), axis));
}

/*!
 * \brief Softmax for attention probabilities that nothing reads but matrix products (the
 *        compiler checks): Softmax with its subnormal results (float32 and bfloat16, below
 *        1.2e-38) set to 0. That moves a product with the values by at most keys x 1.2e-38
 *        x max|v|, far below its rounding, while GEMMs run 10-50x slower on subnormal
 *        operands. The softmax runs with FTZ/DAZ
 *        on this thread (its subnormal exponentials take the slow path too); ATen's worker
 *        threads do not share this thread's mode, so the result is flushed after it as well.
 */
ffi::Tensor SoftmaxProbabilities(ffi::Tensor x, int64_t axis) {
  const at::Tensor input = ToTorchTensor(x);
  const at::ScalarType dtype = input.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kBFloat16) || input.device().type() != at::kCPU) {
    return ToTvmTensor(at::softmax(input, axis));
  }
  at::Tensor y;
  {
    FlushSubnormalsScope scope;
    y = at::softmax(input, axis);
  }
  // threshold_ sets y <= the dtype's largest subnormal to 0 and keeps NaN (probabilities
  // are >= 0); that value is exact in float32 and, for bfloat16's, in bfloat16.
  const float largest_subnormal =
      dtype == at::kFloat
          ? std::nextafter(std::numeric_limits<float>::min(), 0.0f)
          : static_cast<float>(c10::BFloat16(0x007F, c10::BFloat16::from_bits()));
  return ToTvmTensor(at::threshold_(y, largest_subnormal, 0.0));
}

/*!
 * \brief ATen's fused scaled_dot_product_attention (flash attention on CPU and CUDA) on q, k
 *        and v in relax.nn.attention's layout (batch, seq, heads, head_dim), with an optional
 *        mask; the result in that layout, contiguous, in q's dtype.
 * \param scale The softmax scale; <= 0 means 1/sqrt(head_dim).
 * \param causal Whether to apply a top-left causal mask.
 */
ffi::Tensor SeqFirstAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& mask, double scale,
                              bool causal) {
  std::optional<double> softmax_scale;
  if (scale > 0) softmax_scale = scale;
  std::optional<at::Tensor> attn_mask = mask;
  if (mask.has_value() && mask->is_floating_point() && mask->scalar_type() != q.scalar_type()) {
    // A float32 additive mask of a bfloat16 attention, cast as torch.autocast casts it.
    attn_mask = mask->to(q.scalar_type());
  }
  at::Tensor out = at::scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                    v.transpose(1, 2), attn_mask, 0.0, causal,
                                                    softmax_scale);
  return ToTvmTensor(out.transpose(1, 2).contiguous());
}

/*! \brief Attention (SeqFirstAttention) on TVM tensors. */
ffi::Tensor Attention(ffi::Tensor q, ffi::Tensor k, ffi::Tensor v, double scale, bool causal) {
  return SeqFirstAttention(ToTorchTensor(q), ToTorchTensor(k), ToTorchTensor(v), std::nullopt,
                           scale, causal);
}

/*!
 * \brief q, k and v as the strided views of contiguous tensors that `views` describes: for
 *        each in turn, the view's 4 sizes (relax.nn.attention's layout), 4 strides and
 *        storage offset (e.g. the three thirds of a fused QKV projection).
 */
std::array<at::Tensor, 3> AttentionInputViews(const ffi::Tensor& q, const ffi::Tensor& k,
                                              const ffi::Tensor& v, const ffi::Shape& views) {
  TORCH_CHECK(views.size() == 27, "tvm_torch.attention_views: expected 27 view numbers, got ",
              views.size());
  auto view = [&](const ffi::Tensor& base, size_t which) {
    at::Tensor t = ToTorchTensor(base);
    const int64_t* v = views.data() + 9 * which;
    const std::vector<int64_t> sizes(v, v + 4);
    const std::vector<int64_t> strides(v + 4, v + 8);
    int64_t last = v[8];
    for (size_t i = 0; i < 4; ++i) last += (sizes[i] - 1) * strides[i];
    // The view was computed at compile time for a contiguous tensor of this size.
    TORCH_CHECK(t.is_contiguous() && v[8] >= 0 && last < t.numel(),
                "tvm_torch.attention_views: view ", sizes, " / ", strides, " + ", v[8],
                " does not fit a contiguous tensor of ", t.numel(), " elements");
    return t.as_strided(sizes, strides, v[8]);
  };
  return {view(q, 0), view(k, 1), view(v, 2)};
}

/*! \brief Attention (SeqFirstAttention) on strided views (AttentionInputViews). */
ffi::Tensor AttentionViews(ffi::Tensor q, ffi::Tensor k, ffi::Tensor v, ffi::Shape views,
                           double scale, bool causal) {
  auto [qv, kv, vv] = AttentionInputViews(q, k, v, views);
  return SeqFirstAttention(qv, kv, vv, std::nullopt, scale, causal);
}

/*!
 * \brief Attention with a mask (as AttentionMasked) on strided views (AttentionInputViews).
 */
ffi::Tensor AttentionViewsMasked(ffi::Tensor q, ffi::Tensor k, ffi::Tensor v,
                                 ffi::Shape views, ffi::Tensor mask, double scale,
                                 bool causal) {
  auto [qv, kv, vv] = AttentionInputViews(q, k, v, views);
  return SeqFirstAttention(qv, kv, vv, ToTorchTensor(mask), scale, causal);
}

/*!
 * \brief Attention with a mask in PyTorch's (batch, heads, query, key) layout, broadcast as
 * scaled_dot_product_attention broadcasts it: boolean (true = attend) or additive, in the
 * queries' dtype.
 */
ffi::Tensor AttentionMasked(ffi::Tensor q, ffi::Tensor k, ffi::Tensor v, ffi::Tensor mask,
                            double scale, bool causal) {
  return SeqFirstAttention(ToTorchTensor(q), ToTorchTensor(k), ToTorchTensor(v),
                           ToTorchTensor(mask), scale, causal);
}

/*! \brief Batched a @ b (numpy broadcasting semantics, as relax.matmul) on MKL. */
ffi::Tensor Matmul(ffi::Tensor a, ffi::Tensor b) {
  return ToTvmTensor(at::matmul(ToTorchTensor(a), ToTorchTensor(b)));
}

/*!
 * \brief Switch CPU convolutions, for every loaded program, between "primitive" (the
 *        default), "graph" and "pointwise" (see g_conv_kernel). \return The previous setting.
 */
ffi::String SetConvKernel(ffi::String kernel) {
  const std::string name(kernel);
  for (int i = 0; i < 3; ++i) {
    if (name == kConvKernels[i]) return kConvKernels[g_conv_kernel.exchange(i)];
  }
  TORCH_CHECK(false, "tvm_torch.set_conv_kernel: expected 'primitive', 'graph' or 'pointwise', "
              "got '", name, "'");
}

/*! \brief How many convolution partitions this process has built (for diagnostics and tests). */
int64_t OneDnnGraphConvsBuilt() { return g_graphs_built.load(); }

/*! \brief How many convolution primitives this process has built (for diagnostics and tests). */
int64_t OneDnnPrimitiveConvsBuilt() { return g_primitives_built.load(); }

}  // namespace
}  // namespace tvm_torch

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::ObjectDef<tvm_torch::ConvWeightObj>();
  refl::GlobalDef()
      .def("tvm_torch.conv2d_nhwc_prepack", tvm_torch::Conv2dPrepack)
      .def("tvm_torch.conv2d_nhwc", tvm_torch::Conv2dNhwc)
      .def("tvm_torch.conv2d_nchw_input", tvm_torch::Conv2dNchwInput)
      .def("tvm_torch.conv2d_add_nhwc", tvm_torch::Conv2dAddNhwc)
      .def("tvm_torch.conv2d_nhwc_out", tvm_torch::Conv2dNhwcOut)
      .def("tvm_torch.conv2d_nchw_input_out", tvm_torch::Conv2dNchwInputOut)
      .def("tvm_torch.conv2d_add_nhwc_out", tvm_torch::Conv2dAddNhwcOut)
      .def("tvm_torch.conv2d_nchw", tvm_torch::Conv2dNchw)
      .def("tvm_torch.conv2d_add_nchw", tvm_torch::Conv2dAddNchw)
      .def("tvm_torch.matmul_bias", tvm_torch::MatmulBias)
      .def("tvm_torch.matmul", tvm_torch::Matmul)
      .def("tvm_torch.layer_norm", tvm_torch::LayerNorm)
      .def("tvm_torch.rms_norm", tvm_torch::RmsNorm)
      .def("tvm_torch.softmax", tvm_torch::Softmax)
      .def("tvm_torch.softmax_probabilities", tvm_torch::SoftmaxProbabilities)
      .def("tvm_torch.attention", tvm_torch::Attention)
      .def("tvm_torch.attention_masked", tvm_torch::AttentionMasked)
      .def("tvm_torch.attention_views", tvm_torch::AttentionViews)
      .def("tvm_torch.attention_views_masked", tvm_torch::AttentionViewsMasked)
      .def("tvm_torch.mean", tvm_torch::Mean)
      .def("tvm_torch.max_pool2d_nhwc", tvm_torch::MaxPool2dNhwc)
      .def("tvm_torch.avg_pool2d_nhwc", tvm_torch::AvgPool2dNhwc)
      .def("tvm_torch.unary", tvm_torch::Unary)
      .def("tvm_torch.set_conv_kernel", tvm_torch::SetConvKernel)
      .def("tvm_torch.onednn_graph_convs_built", tvm_torch::OneDnnGraphConvsBuilt)
      .def("tvm_torch.onednn_primitive_convs_built", tvm_torch::OneDnnPrimitiveConvsBuilt)
      .def("tvm_torch.onednn_available", tvm_torch::OneDnnConv::Available)
      .def("tvm_torch.onednn_clips_fused", tvm_torch::OneDnnConv::ClipsFused)
      .def("tvm_torch.set_fused_clips", tvm_torch::OneDnnConv::SetFuseClips);
}
