/*!
 * \file linear_kernels.cc
 * \brief Linear layers on CPU (tvm_torch.linear_prepack / linear / linear_add), the GEMM
 *        chosen per layer when its weight is prepacked at the program's first call: MKL's
 *        packed GEMM (float32 weights of 512 KiB or more on Intel CPUs, as Inductor's freezing
 *        runs them; its epilogue an ATen pass after it) or oneDNN's inner product (its
 *        blocked weight in the compute dtype, GELU/SiLU/residual add fused; ReLU after it,
 *        since oneDNN's fused one maps NaN to 0).
 */
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/object.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <atomic>
#include <cstring>
#include <optional>
#include <string>
#include <utility>

#include "tensor_bridge.h"
#include "vendor_dtype.h"

namespace tvm_torch {
namespace {

namespace ffi = tvm::ffi;

/*!
 * \brief Which GEMM float32 linear layers with a static row count run on, chosen per layer
 *        when its weight is prepacked: "auto" (MKL's packed GEMM for weights of 512 KiB or
 *        more on Intel CPUs, oneDNN's inner product otherwise: UseMkl), "onednn" or "mkl";
 *        set by tvm_torch.set_linear_kernel, for A/B runs and as a way out. bfloat16 layers
 *        are always oneDNN's.
 */
std::atomic<int> g_linear_kernel{0};
constexpr const char* kLinearKernels[] = {"auto", "onednn", "mkl"};

/*! \brief Whether the CPU is an Intel one (MKL's kernels are tuned for them, not others). */
bool IsIntelCpu() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
  char vendor[13] = {0};
  std::memcpy(vendor, &b, 4);
  std::memcpy(vendor + 4, &d, 4);
  std::memcpy(vendor + 8, &c, 4);
  return std::strcmp(vendor, "GenuineIntel") == 0;
#else
  return false;
#endif
}

/*!
 * \brief MKL's _mkl_linear and its weight packing, or nullopt when libtorch has no MKL.
 */
struct MklLinearOps {
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, int64_t)> reorder;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&, int64_t)>
      linear;
};

const std::optional<MklLinearOps>& MklLinear() {
  static const std::optional<MklLinearOps> ops = []() -> std::optional<MklLinearOps> {
    if (!at::hasMKL()) return std::nullopt;
    auto& dispatcher = c10::Dispatcher::singleton();
    auto reorder = dispatcher.findSchema({"mkl::_mkl_reorder_linear_weight", ""});
    auto linear = dispatcher.findSchema({"mkl::_mkl_linear", ""});
    if (!reorder.has_value() || !linear.has_value()) return std::nullopt;
    return MklLinearOps{
        reorder->typed<at::Tensor(const at::Tensor&, int64_t)>(),
        linear->typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, int64_t)>()};
  }();
  return ops;
}

/*!
 * \brief A linear layer's weight, prepacked for the GEMM chosen for it: oneDNN's blocked
 *        layout, or MKL's packed GEMM operand (which is specific to one row count).
 */
class LinearWeightObj : public ffi::Object {
 public:
  /*! \brief oneDNN's blocked weight, or MKL's packed one. */
  at::Tensor packed;
  /*!
   * \brief MKL: a zero-strided [out, in] float32 tensor that gives _mkl_linear the weight's
   *        shape. The weight itself is not kept twice: it would only serve _mkl_linear's
   *        fallback for another row count, which MklLinearCall refuses.
   */
  at::Tensor shape_only;
  /*! \brief MKL: the row count the weight is packed for. */
  int64_t rows = 0;
  /*! \brief Whether the layer runs on MKL's packed GEMM (else oneDNN's inner product). */
  bool mkl = false;
  TVM_FFI_DECLARE_OBJECT_INFO_FINAL("tvm_torch.LinearWeight", LinearWeightObj, ffi::Object);
};

class LinearWeight : public ffi::ObjectRef {
 public:
  TVM_FFI_DEFINE_OBJECT_REF_METHODS_NULLABLE(LinearWeight, ffi::ObjectRef, LinearWeightObj);
};

const LinearWeightObj& UnwrapLinear(const ffi::ObjectRef& holder) {
  const auto* node = holder.as<LinearWeightObj>();
  TORCH_CHECK(node != nullptr, "tvm_torch: expected a prepacked linear weight, got ",
              holder.defined() ? holder->GetTypeKey() : "None");
  return *node;
}

/*! \brief The smallest float32 weight (in bytes) "auto" runs on MKL's packed GEMM. */
constexpr int64_t kMklMinWeightBytes = 512 * 1024;

/*!
 * \brief Whether a layer runs on MKL's packed GEMM. In a model, whose weights stream from
 *        memory at every call, MKL's packed GEMM ran a DistilBERT's 36 float32 layers 10%
 *        faster than oneDNN's inner product on an Intel Xeon (Emerald Rapids); on AMD's Zen 4
 *        oneDNN's was the faster one. Weights of under 512 KiB stay on oneDNN: there it was
 *        level or 10-18% faster (ConvNeXt's and Swin's first stage: 3136 rows, 96 -> 384)
 *        and fuses the epilogue (docs/performance.md). A layer whose row count is only known
 *        per call stays on oneDNN too: MKL's packing is for one row count.
 */
bool UseMkl(const at::Tensor& weight, int64_t rows) {
  if (weight.scalar_type() != at::kFloat || rows <= 0 || !MklLinear().has_value()) return false;
  const int choice = g_linear_kernel.load(std::memory_order_relaxed);
  if (choice != 0) return choice == 2;
  static const bool intel = IsIntelCpu();
  return intel && weight.numel() * static_cast<int64_t>(sizeof(float)) >= kMklMinWeightBytes;
}

/*!
 * \brief Prepack a linear layer's [out, in] weight, in the compute dtype, for inputs of
 *        `rows` rows (0: any number of rows), for the GEMM UseMkl chooses.
 */
LinearWeight LinearPrepack(ffi::Tensor weight, int64_t rows, ffi::String compute_dtype) {
  using Reorder = at::Tensor(const at::Tensor&, std::optional<int64_t>);
  static auto onednn_reorder = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("mkldnn::_reorder_linear_weight", "")
                                   .typed<Reorder>();
  auto node = ffi::make_object<LinearWeightObj>();
  // A copy: the params blob may be freed after load.
  at::Tensor w = ToTorchTensor(weight).to(ComputeDtype(compute_dtype), /*non_blocking=*/false,
                                          /*copy=*/true);
  if (UseMkl(w, rows)) {
    node->packed = MklLinear()->reorder.call(w, rows);
    node->shape_only = at::zeros({1}, w.options()).expand(w.sizes());
    node->rows = rows;
    node->mkl = true;
  } else {
    node->packed =
        onednn_reorder.call(w, rows > 0 ? std::optional<int64_t>(rows) : std::nullopt);
  }
  return LinearWeight(std::move(node));
}

/*! \brief x @ W^T + bias on MKL's packed GEMM (x float32, [..., in]). */
at::Tensor MklLinearCall(const LinearWeightObj& w, const at::Tensor& x, const at::Tensor& bias) {
  const int64_t in = w.shape_only.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in && x.numel() == w.rows * in,
              "tvm_torch.linear: the weight is packed for ", w.rows, " rows of ", in,
              " features, got an input of shape ", x.sizes());
  return MklLinear()->linear.call(x.is_contiguous() ? x : x.contiguous(), w.packed,
                                  w.shape_only, InDtype(bias, at::kFloat), w.rows);
}

/*!
 * \brief y = x @ W^T + bias with a prepacked weight (LinearPrepack), x [..., in], then
 *        `attr`: "none", "relu", "gelu" (erf), "gelu_tanh" or "silu".
 *
 * On oneDNN, GELU and SiLU run as its fused post-ops (they keep NaN/Inf as PyTorch does);
 * ReLU is ATen's, since oneDNN's fused one maps NaN to 0. MKL's GEMM has no epilogue: there
 * ATen's in-place GELU, SiLU or ReLU runs after it, as in PyTorch.
 */
ffi::Tensor LinearPacked(ffi::Tensor x, ffi::ObjectRef packed, ffi::Tensor bias,
                         ffi::String attr) {
  using Fn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                        c10::string_view, c10::List<std::optional<c10::Scalar>>,
                        std::optional<c10::string_view>);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<Fn>();
  const std::string name(attr);
  const bool gelu = name == "gelu" || name == "gelu_tanh";
  TORCH_CHECK(gelu || name == "none" || name == "relu" || name == "silu",
              "tvm_torch.linear: unknown epilogue '", name, "'");
  const LinearWeightObj& w = UnwrapLinear(packed);
  const at::Tensor input = ToTorchTensor(x);
  at::Tensor y;
  if (w.mkl) {
    y = MklLinearCall(w, AsComputeDtype(input, w.packed), ToTorchTensor(bias));
    if (gelu) y = at::gelu_(y, name == "gelu_tanh" ? "tanh" : "none");
    if (name == "silu") y = at::silu_(y);
  } else {
    const char* post_op = gelu ? "gelu" : name == "silu" ? "swish" : "none";
    y = op.call(AsComputeDtype(input, w.packed), w.packed, ToTorchTensor(bias), post_op,
                c10::List<std::optional<c10::Scalar>>(), name == "gelu_tanh" ? "tanh" : "none");
  }
  if (name == "relu") y.relu_();
  return ToTvmTensor(InDtype(y, input.scalar_type()));
}

/*!
 * \brief y = x @ W^T + bias + other with a prepacked weight (on oneDNN, the residual add
 *        fused into the GEMM); other has y's shape. The result has the dtype of x + other, as
 *        in Conv2dAddNhwc.
 */
ffi::Tensor LinearAddPacked(ffi::Tensor x, ffi::Tensor other, ffi::ObjectRef packed,
                            ffi::Tensor bias) {
  using Fn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const std::optional<at::Tensor>&, c10::string_view);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "binary")
                       .typed<Fn>();
  const LinearWeightObj& w = UnwrapLinear(packed);
  const at::Tensor input = ToTorchTensor(x);
  const at::Tensor residual = ToTorchTensor(other);
  const at::ScalarType dtype = w.packed.scalar_type();
  if (!w.mkl && input.scalar_type() == dtype && residual.scalar_type() == dtype) {
    // (The binary op, unlike the unary one, takes a bias only in the weight's dtype.)
    return ToTvmTensor(op.call(input, residual, w.packed,
                               AsComputeDtype(ToTorchTensor(bias), w.packed), "add"));
  }
  // MKL, or dtypes that differ (a float32 residual in a bfloat16 program): the GEMM, then
  // the sum in the promoted dtype, in the GEMM's result where it has that dtype.
  at::Tensor y = ToTorchTensor(LinearPacked(x, packed, bias, "none"));
  const at::ScalarType out_dtype = at::promote_types(y.scalar_type(), residual.scalar_type());
  return ToTvmTensor(y.scalar_type() == out_dtype ? y.add_(residual) : at::add(residual, y));
}

/*!
 * \brief Set the GEMM of float32 linear layers prepacked from now on: "auto", "onednn" or
 *        "mkl" (UseMkl). \return The previous setting.
 */
ffi::String SetLinearKernel(ffi::String kernel) {
  const std::string name(kernel);
  for (int i = 0; i < 3; ++i) {
    if (name == kLinearKernels[i]) return kLinearKernels[g_linear_kernel.exchange(i)];
  }
  TORCH_CHECK(false, "tvm_torch.set_linear_kernel: expected 'auto', 'onednn' or 'mkl', got '",
              name, "'");
}

/*! \brief Whether a prepacked linear weight runs on MKL's packed GEMM (for tests). */
bool LinearRunsOnMkl(ffi::ObjectRef packed) { return UnwrapLinear(packed).mkl; }

}  // namespace
}  // namespace tvm_torch

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::ObjectDef<tvm_torch::LinearWeightObj>();
  refl::GlobalDef()
      .def("tvm_torch.linear_prepack", tvm_torch::LinearPrepack)
      .def("tvm_torch.linear", tvm_torch::LinearPacked)
      .def("tvm_torch.linear_add", tvm_torch::LinearAddPacked)
      .def("tvm_torch.set_linear_kernel", tvm_torch::SetLinearKernel)
      .def("tvm_torch.linear_runs_on_mkl", tvm_torch::LinearRunsOnMkl);
}
