/*!
 * \file onednn_conv.h
 * \brief A CPU convolution with its fused epilogue as one oneDNN primitive, on this library's
 *        own oneDNN (the onednn-cpu-gomp wheel).
 *
 * libtorch exports no oneDNN symbols, so its convolutions can only be reached through ATen
 * ops or its TorchScript oneDNN Graph fuser (OneDnnGraphConv). Each of those layers costs time
 * per call: MobileNetV2's 52 convolutions take 9.9 ms as direct primitives against 11.9 ms as
 * Graph partitions (same process, interleaved). This class builds the primitive once per call
 * site and input size, with the weight reordered once to the primitive's blocked layout, and
 * then only executes it. Without oneDNN at build time (TVM_TORCH_WITH_ONEDNN unset) it is
 * never ok(), and convolutions run on the Graph partitions as before.
 */
#ifndef TVM_CONTRIB_TORCH_ONEDNN_CONV_H_
#define TVM_CONTRIB_TORCH_ONEDNN_CONV_H_

#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "conv_geometry.h"

namespace tvm_torch {

/*!
 * \brief conv2d(x, weight) + bias, then `post_op` ("none", "hardswish", "sigmoid", "tanh",
 *        "silu"), then + other when `residual`, in the weight's dtype (float32 or bfloat16), as
 *        one oneDNN convolution primitive for inputs of one size and layout.
 *
 * With post_op "relu" or "relu6" (and no residual), Run fuses the clip only on calls where no
 * NaN can reach it (oneDNN's clips map NaN to a number, PyTorch's keep it): where the input
 * and bias are finite and max |x| times the largest per-channel sum of |weight|, plus
 * max |bias|, is far below FLT_MAX, no partial sum can overflow, so no pre-activation value is
 * NaN. That costs a read of the input, so it is built only where the input is at most twice
 * the result's size (a pointwise expansion, a stride-1 depthwise convolution); elsewhere, and
 * on calls that fail the check, the caller applies the clip after the exact primitive.
 */
class OneDnnConv {
 public:
  /*!
   * \brief Create the primitive and reorder the weight for it. \ref ok says whether oneDNN
   *        took the convolution (it may refuse a dtype or post-op this CPU has no kernel for).
   * \param post_op As in the class comment; "relu" and "relu6" are applied by Run only where
   *        it says so (see Run's `clipped`).
   * \param weight The float32 or bfloat16 OIHW weight; x, bias and other come in its dtype.
   * \param input_size The NCHW size of x.
   * \param input_format How x is laid out: channels-last (a result of the program), or
   *        contiguous NCHW (the program's own input).
   */
  OneDnnConv(const at::Tensor& weight, const ConvGeometry& geometry,
             const std::vector<int64_t>& input_size, const std::string& post_op, bool residual,
             at::MemoryFormat input_format = at::MemoryFormat::ChannelsLast);
  ~OneDnnConv();

  /*! \brief Whether the primitive was created (Run may be called). */
  bool ok() const { return impl_ != nullptr; }

  /*!
   * \brief Run on x in the input format (and other, of the result's size, channels-last).
   *        Safe to call from several threads at once.
   * \param out Where to write the result, when it is a channels-last tensor of the result's
   *        size and dtype (memory the program planned); else the result is allocated.
   * \param clipped Set to whether the ReLU/ReLU6 epilogue was applied (fused); when false,
   *        the caller applies it. Other epilogues are always applied.
   * \return The channels-last NCHW result (`out` when it was written).
   */
  at::Tensor Run(const at::Tensor& x, const at::Tensor& bias,
                 const std::optional<at::Tensor>& other,
                 const std::optional<at::Tensor>& out = std::nullopt,
                 bool* clipped = nullptr) const;


  /*! \brief Whether Run can write its result into `out`. */
  bool CanWriteTo(const at::Tensor& out) const;

  /*! \brief The buffers of one call to Execute. */
  struct Buffers {
    const void* x;      //!< input_size() in the input format
    const void* bias;   //!< output_size()[1] values
    const void* other;  //!< the residual, like the result; null without one
    void* out;          //!< output_size(), channels-last
  };
  /*!
   * \brief Run on buffers the caller has checked: each of this primitive's dtype, laid out as
   *        Run requires, `other` given exactly when built with a residual. What Run does after
   *        its checks, without ATen tensors. Making tensors and oneDNN memory objects per
   *        call cost 4-8 us, as much as a small convolution's kernel.
   *        Safe to call from several threads at once.
   * \param clipped As in Run.
   */
  void Execute(const Buffers& buffers, bool* clipped) const;
  /*! \brief The NCHW size of x (ok() only). */
  const std::vector<int64_t>& input_size() const;
  /*! \brief The NCHW size of the result (ok() only). */
  const std::vector<int64_t>& output_size() const;
  /*! \brief The dtype of x, bias, other and the result (ok() only). */
  at::ScalarType dtype() const;

  /*! \brief Whether `post_op` is a ReLU or ReLU6, which Run fuses only on calls it checks. */
  static bool IsClip(const std::string& post_op);

  /*! \brief Whether this library was built with oneDNN (else no instance is ever ok()). */
  static bool Available();

  /*! \brief How many calls ran with their ReLU/ReLU6 fused, in this process (diagnostics). */
  static int64_t ClipsFused();

  /*!
   * \brief Allow or forbid fusing ReLU/ReLU6 (every call then applies ATen's after the exact
   *        primitive), for every loaded program: for A/B runs and as a way out.
   * \return The previous setting.
   */
  static bool SetFuseClips(bool enabled);

 private:
  struct Impl;
  /*! \brief The primitive and its reordered weight; null when oneDNN refused. */
  std::unique_ptr<Impl> impl_;
};

}  // namespace tvm_torch

#endif  // TVM_CONTRIB_TORCH_ONEDNN_CONV_H_
