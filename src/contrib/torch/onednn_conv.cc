/*!
 * \file onednn_conv.cc
 * \brief OneDnnConv: a convolution, its bias, fused epilogue and residual add as one oneDNN
 *        primitive, built once per call site and input size; a ReLU/ReLU6 fused on the calls
 *        whose input bounds every sum (see onednn_conv.h).
 */
#include "onednn_conv.h"

#include <utility>

#ifdef TVM_TORCH_WITH_ONEDNN
#include <oneapi/dnnl/dnnl.hpp>

#include <array>
#include <atomic>
#include <bit>
#include <cstdint>
#include <limits>
#include <unordered_map>
#endif

namespace tvm_torch {

#ifdef TVM_TORCH_WITH_ONEDNN

namespace {

using dnnl::memory;

memory::data_type DnnlType(at::ScalarType dtype) {
  return dtype == at::kBFloat16 ? memory::data_type::bf16 : memory::data_type::f32;
}

memory::dims Dims(const std::vector<int64_t>& v) { return memory::dims(v.begin(), v.end()); }

/*! \brief The process's CPU engine (oneDNN engines are thread-safe and cheap to share). */
const dnnl::engine& CpuEngine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

/*!
 * \brief The eltwise post-op computing PyTorch's `post_op`. hardswish, sigmoid, tanh and SiLU
 *        propagate NaN and Inf as PyTorch does. ReLU and ReLU6 (oneDNN's relu and clip) map
 *        NaN to a number: Run uses them only where it has shown that no NaN reaches them.
 */
void AppendEpilogue(dnnl::post_ops& ops, const std::string& post_op) {
  if (post_op == "relu") {
    ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    return;
  }
  if (post_op == "relu6") {
    ops.append_eltwise(dnnl::algorithm::eltwise_clip, 0.f, 6.f);
    return;
  }
  if (post_op == "hardswish") {
    // oneDNN's hardswish is x * max(0, min(1, alpha * x + beta)).
    ops.append_eltwise(dnnl::algorithm::eltwise_hardswish, 1.f / 6.f, 0.5f);
  } else if (post_op == "sigmoid") {
    ops.append_eltwise(dnnl::algorithm::eltwise_logistic, 0.f, 0.f);
  } else if (post_op == "tanh") {
    ops.append_eltwise(dnnl::algorithm::eltwise_tanh, 0.f, 0.f);
  } else if (post_op == "silu") {
    ops.append_eltwise(dnnl::algorithm::eltwise_swish, 1.f, 0.f);
  } else {
    TORCH_CHECK(post_op == "none", "tvm_torch: no oneDNN convolution epilogue '", post_op, "'");
  }
}

/*! \brief The calling thread's stream: executing on a per-thread stream needs no locking. */
dnnl::stream& ThreadStream() {
  thread_local dnnl::stream stream(CpuEngine());
  return stream;
}

/*!
 * \brief Scratch memory of the calling thread, grown as needed and kept: one primitive runs at
 *        a time on a thread, so calls never share it, and none allocates it again.
 */
struct ThreadScratch {
  at::Tensor scratchpad;  //!< oneDNN's scratchpad
  at::Tensor input;       //!< the input reordered to NHWC

  static void* Bytes(at::Tensor& buffer, size_t bytes) {
    if (!buffer.defined() || static_cast<size_t>(buffer.numel()) < bytes) {
      buffer = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
    }
    return buffer.data_ptr();
  }
};

ThreadScratch& Scratch() {
  thread_local ThreadScratch scratch;
  return scratch;
}

// The largest |x| of a buffer, as an integer maximum of the values' bits without the sign
// (the order of non-negative floats; NaN and Inf sort above every finite value), which the
// compiler vectorises for each instruction set (a float maximum it may not reorder).
__attribute__((target_clones("avx512f", "avx2", "default"))) uint32_t MaxMagnitudeBits(
    const uint32_t* words, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, words[i] & 0x7fffffffu);
  return m;
}

__attribute__((target_clones("avx512f", "avx2", "default"))) uint16_t MaxMagnitudeBits16(
    const uint16_t* words, int64_t n) {
  uint16_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max<uint16_t>(m, words[i] & 0x7fffu);
  return m;
}

/*! \brief max |v| of n float32 or bfloat16 values; +Inf when they hold NaN or Inf. */
float MaxMagnitude(const void* data, int64_t n, at::ScalarType dtype) {
  uint32_t bits;
  if (dtype == at::kBFloat16) {
    bits = static_cast<uint32_t>(MaxMagnitudeBits16(static_cast<const uint16_t*>(data), n)) << 16;
  } else {
    bits = MaxMagnitudeBits(static_cast<const uint32_t*>(data), n);
  }
  return bits >= 0x7f800000u ? std::numeric_limits<float>::infinity() : std::bit_cast<float>(bits);
}

/*!
 * \brief Every pre-activation value stays below this (with max |x| * weight_l1 + max |bias|
 *        under it, no partial sum overflows, so none is Inf or NaN); a quarter of FLT_MAX
 *        leaves room for the sums' rounding.
 */
constexpr float kFiniteBound = std::numeric_limits<float>::max() / 4;

/*! \brief Calls that ran with the clip fused, in this process (OneDnnConv::ClipsFused). */
std::atomic<int64_t> g_clips_fused{0};

/*! \brief Whether Run may fuse clips at all (OneDnnConv::SetFuseClips). */
std::atomic<bool> g_fuse_clips{true};

}  // namespace

/*! \brief One convolution primitive, with its scratchpad's size and its weight. */
struct ConvPrimitive {
  dnnl::convolution_forward primitive;
  memory::desc scratchpad;
  /*! \brief The weight in the primitive's layout, owned by oneDNN. */
  memory weights;
};

/*!
 * \brief oneDNN memory objects for one call, pointed at its buffers per call: making them per
 *        call (each a few heap allocations) cost as much as a small convolution.
 */
struct CallMemories {
  memory input, src, bias, dst, other;
  memory scratchpad[2];  //!< for the exact primitive, and the clipped one
};

/*! \brief CallMemories that one call at a time holds (busy), made at its first use. */
struct MemorySlot {
  std::atomic<bool> busy{false};
  std::unique_ptr<CallMemories> memories;
};

/*! \brief Slots per primitive: calls from more threads at once make their own memories. */
constexpr size_t kMemorySlots = 4;

struct OneDnnConv::Impl {
  /*! \brief The convolution with its epilogue (without it, for a clip). */
  ConvPrimitive exact;
  /*!
   * \brief For a ReLU or ReLU6 epilogue: the convolution with it fused, which Run takes when
   *        the input and bias bound every pre-activation value (clip_bound); else ATen applies
   *        the clip after `exact`.
   */
  std::optional<ConvPrimitive> clipped;
  /*! \brief max over output channels of the sum of |weight|; +Inf when a weight is not finite. */
  float weight_l1 = std::numeric_limits<float>::infinity();
  memory::desc src, bias, dst;
  /*!
   * \brief For an NCHW input that oneDNN has no fast kernel for: its reorder to NHWC (`src`)
   *        before the primitive, and the layout it comes in.
   */
  std::optional<dnnl::reorder> input_reorder;
  memory::desc input;
  at::ScalarType dtype;
  bool residual;
  /*! \brief The residual add's place in the post-op chain (after the epilogue, if any). */
  int residual_index = 0;
  std::vector<int64_t> input_size, input_strides, output_size, output_strides;
  int64_t input_numel = 0;
  mutable std::array<MemorySlot, kMemorySlots> slots;

  std::unique_ptr<CallMemories> MakeMemories() const {
    auto made = std::make_unique<CallMemories>();
    const dnnl::engine& engine = CpuEngine();
    made->input = memory(input, engine, nullptr);
    made->src = memory(src, engine, nullptr);
    made->bias = memory(bias, engine, nullptr);
    made->dst = memory(dst, engine, nullptr);
    made->other = memory(dst, engine, nullptr);
    if (exact.scratchpad.get_size() > 0) {
      made->scratchpad[0] = memory(exact.scratchpad, engine, nullptr);
    }
    if (clipped.has_value() && clipped->scratchpad.get_size() > 0) {
      made->scratchpad[1] = memory(clipped->scratchpad, engine, nullptr);
    }
    return made;
  }
};

OneDnnConv::OneDnnConv(const at::Tensor& weight, const ConvGeometry& geometry,
                       const std::vector<int64_t>& input_size, const std::string& post_op,
                       bool residual, at::MemoryFormat input_format) {
  const at::ScalarType dtype = weight.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && weight.dim() == 4 &&
                  input_size.size() == 4,
              "tvm_torch: oneDNN convolutions take a float32 or bfloat16 OIHW weight and NCHW "
              "sizes");
  TORCH_CHECK(input_format == at::MemoryFormat::ChannelsLast ||
                  input_format == at::MemoryFormat::Contiguous,
              "tvm_torch: oneDNN convolutions take channels-last or contiguous inputs");
  auto impl = std::make_unique<Impl>();
  impl->dtype = dtype;
  impl->residual = residual;
  impl->input_size = input_size;
  impl->output_size = ConvOutputSize(input_size, weight.sizes(), geometry);
  impl->input_numel = c10::multiply_integers(input_size);
  impl->input_strides = at::empty(input_size, input_format).strides().vec();
  impl->output_strides =
      at::empty(impl->output_size, at::MemoryFormat::ChannelsLast).strides().vec();

  const memory::data_type type = DnnlType(dtype);
  const int64_t groups = geometry.groups;
  const at::Tensor plain = weight.contiguous();
  // Grouped weights are (groups, O/groups, I/groups, kh, kw): the same bytes as OIHW.
  const memory::dims weight_dims =
      groups > 1 ? memory::dims{groups, plain.size(0) / groups, plain.size(1), plain.size(2),
                                plain.size(3)}
                 : Dims(plain.sizes().vec());
  const memory::desc plain_weights(weight_dims, type,
                                   groups > 1 ? memory::format_tag::goihw
                                              : memory::format_tag::oihw);
  const memory::desc any_weights(weight_dims, type, memory::format_tag::any);
  const memory::desc nhwc_input(Dims(input_size), type, memory::format_tag::nhwc);
  impl->input = input_format == at::MemoryFormat::Contiguous
                    ? memory::desc(Dims(input_size), type, memory::format_tag::nchw)
                    : nhwc_input;
  impl->bias = memory::desc({plain.size(0)}, type, memory::format_tag::a);
  impl->dst = memory::desc(Dims(impl->output_size), type, memory::format_tag::nhwc);
  // oneDNN counts dilation from 0 (1 in PyTorch is 0 here).
  const memory::dims dilation{geometry.dilation[0] - 1, geometry.dilation[1] - 1};
  const memory::dims stride = Dims(geometry.stride);
  const memory::dims padding = Dims(geometry.padding);

  // oneDNN refuses what it has no kernel for (an error): the call site then runs elsewhere.
  try {
    // Scratch memory comes from the calling thread (ThreadScratch), so that calls from several
    // threads never share it.
    auto describe = [&](const memory::desc& src, const std::string& epilogue) {
      dnnl::post_ops ops;
      AppendEpilogue(ops, epilogue);
      if (residual) ops.append_binary(dnnl::algorithm::binary_add, impl->dst);
      dnnl::primitive_attr attr;
      attr.set_post_ops(ops);
      attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
      return dnnl::convolution_forward::primitive_desc(
          CpuEngine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
          src, any_weights, impl->bias, impl->dst, stride, dilation, padding, padding, attr);
    };
    // oneDNN's reference kernels are for correctness checks, 1000x slower than its JIT ones.
    auto is_reference = [](const dnnl::convolution_forward::primitive_desc& pd) {
      return std::string(pd.impl_info_str()).find("ref") != std::string::npos;
    };
    const bool clip = OneDnnConv::IsClip(post_op);
    const std::string exact_epilogue = clip ? "none" : post_op;
    impl->residual_index = exact_epilogue == "none" ? 0 : 1;
    dnnl::convolution_forward::primitive_desc pd = describe(impl->input, exact_epilogue);
    impl->src = impl->input;
    if (is_reference(pd) && input_format == at::MemoryFormat::Contiguous) {
      // oneDNN 3.2 has no JIT kernel for an NCHW input with an NHWC result: reorder the input
      // (a program's image, 3 channels: a small copy) and convolve NHWC.
      pd = describe(nhwc_input, exact_epilogue);
      impl->src = nhwc_input;
      impl->input_reorder = dnnl::reorder(
          dnnl::reorder::primitive_desc(CpuEngine(), impl->input, CpuEngine(), nhwc_input));
    }
    // Anything else without a JIT kernel runs on the Graph partitions instead.
    if (is_reference(pd)) return;
    dnnl::stream stream(CpuEngine());
    memory source(plain_weights, CpuEngine(), plain.data_ptr());
    auto make = [&](const dnnl::convolution_forward::primitive_desc& desc,
                    const ConvPrimitive* share) {
      ConvPrimitive made{dnnl::convolution_forward(desc), desc.scratchpad_desc(), memory()};
      if (share != nullptr && share->weights.get_desc() == desc.weights_desc()) {
        made.weights = share->weights;
      } else {
        made.weights = memory(desc.weights_desc(), CpuEngine());
        dnnl::reorder(source, made.weights).execute(stream, source, made.weights);
      }
      return made;
    };
    impl->exact = make(pd, nullptr);
    // The fused clip saves ATen's pass over the result (a read and a write) at the price of a
    // read of the input: taken where the input is at most twice the result's size.
    const int64_t input_numel = c10::multiply_integers(input_size);
    const int64_t output_numel = c10::multiply_integers(impl->output_size);
    if (clip && !residual && input_numel <= 2 * output_numel) {
      const auto clipped = describe(impl->src, post_op);
      if (!is_reference(clipped)) impl->clipped = make(clipped, &impl->exact);
      // In double: a sum past FLT_MAX (or a NaN weight) leaves weight_l1 at +Inf.
      const double l1 = plain.abs().to(at::kDouble).sum({1, 2, 3}).max().item<double>();
      if (l1 < kFiniteBound) {
        impl->weight_l1 = static_cast<float>(l1);
      } else {
        impl->clipped.reset();
      }
    }
    stream.wait();
  } catch (const dnnl::error&) {
    return;
  }
  impl_ = std::move(impl);
}

bool OneDnnConv::CanWriteTo(const at::Tensor& out) const {
  return ok() && out.scalar_type() == impl_->dtype && out.is_cpu() &&
         HasLayout(out, impl_->output_size, impl_->output_strides);
}

at::Tensor OneDnnConv::Run(const at::Tensor& x, const at::Tensor& bias,
                           const std::optional<at::Tensor>& other,
                           const std::optional<at::Tensor>& out, bool* clipped) const {
  TORCH_CHECK(ok(), "tvm_torch: this convolution has no oneDNN primitive");
  const Impl& p = *impl_;
  TORCH_CHECK(HasLayout(x, p.input_size, p.input_strides) && x.scalar_type() == p.dtype &&
                  x.is_cpu(),
              "tvm_torch: oneDNN convolution built for ", p.dtype, " CPU input of size ",
              p.input_size, " and strides ", p.input_strides, ", got ", x.scalar_type(), " ",
              x.sizes(), " / ", x.strides());
  TORCH_CHECK(bias.dim() == 1 && bias.is_contiguous() && bias.scalar_type() == p.dtype &&
                  bias.size(0) == p.output_size[1],
              "tvm_torch: oneDNN convolution expects a contiguous ", p.dtype, " bias of ",
              p.output_size[1], " channels, got ", bias.scalar_type(), " ", bias.sizes());
  TORCH_CHECK(other.has_value() == p.residual, "tvm_torch: oneDNN convolution built ",
              p.residual ? "with" : "without", " a residual input, called ",
              other.has_value() ? "with" : "without", " one");
  if (other.has_value()) {
    TORCH_CHECK(HasLayout(*other, p.output_size, p.output_strides) &&
                    other->scalar_type() == p.dtype,
                "tvm_torch: oneDNN convolution's residual must be ", p.dtype, " of size ",
                p.output_size, " and strides ", p.output_strides, ", got ",
                other->scalar_type(), " ", other->sizes(), " / ", other->strides());
  }
  at::Tensor y = out.has_value() && CanWriteTo(*out)
                     ? *out
                     : at::empty(p.output_size, x.options(), at::MemoryFormat::ChannelsLast);
  Execute({x.const_data_ptr(), bias.const_data_ptr(),
           other.has_value() ? other->const_data_ptr() : nullptr, y.data_ptr()},
          clipped);
  return y;
}

void OneDnnConv::Execute(const Buffers& buffers, bool* clipped) const {
  TORCH_CHECK(ok(), "tvm_torch: this convolution has no oneDNN primitive");
  const Impl& p = *impl_;
  // The fused clip where no pre-activation value can be NaN: finite inputs and bias, and sums
  // bounded below overflow. Else the exact primitive, and the caller's clip keeps NaN.
  const bool fuse_clip =
      p.clipped.has_value() && g_fuse_clips.load(std::memory_order_relaxed) &&
      MaxMagnitude(buffers.x, p.input_numel, p.dtype) * p.weight_l1 +
              MaxMagnitude(buffers.bias, p.output_size[1], p.dtype) <
          kFiniteBound;
  const ConvPrimitive& kernel = fuse_clip ? *p.clipped : p.exact;
  if (clipped != nullptr) *clipped = fuse_clip;
  if (fuse_clip) g_clips_fused.fetch_add(1, std::memory_order_relaxed);
  // A free slot's memories, or (more calls at once than slots) this call's own.
  MemorySlot* slot = nullptr;
  for (MemorySlot& candidate : p.slots) {
    if (!candidate.busy.exchange(true, std::memory_order_acquire)) {
      slot = &candidate;
      break;
    }
  }
  struct Release {
    MemorySlot* slot;
    ~Release() {
      if (slot != nullptr) slot->busy.store(false, std::memory_order_release);
    }
  } release{slot};
  std::unique_ptr<CallMemories> own;
  CallMemories* m;
  try {
    if (slot == nullptr) {
      own = p.MakeMemories();
      m = own.get();
    } else {
      if (slot->memories == nullptr) slot->memories = p.MakeMemories();
      m = slot->memories.get();
    }
    ThreadScratch& scratch = Scratch();
    dnnl::stream& stream = ThreadStream();
    m->input.set_data_handle(const_cast<void*>(buffers.x));
    const memory* src = &m->input;
    if (p.input_reorder.has_value()) {
      m->src.set_data_handle(ThreadScratch::Bytes(scratch.input, p.src.get_size()));
      p.input_reorder->execute(stream, m->input, m->src);
      src = &m->src;
    }
    m->bias.set_data_handle(const_cast<void*>(buffers.bias));
    m->dst.set_data_handle(buffers.out);
    // The C API takes the arguments as an array: the C++ one builds a hash map per call.
    dnnl_exec_arg_t args[6] = {{DNNL_ARG_SRC, src->get()},
                               {DNNL_ARG_WEIGHTS, kernel.weights.get()},
                               {DNNL_ARG_BIAS, m->bias.get()},
                               {DNNL_ARG_DST, m->dst.get()}};
    int count = 4;
    if (p.residual) {
      m->other.set_data_handle(const_cast<void*>(buffers.other));
      args[count++] = {DNNL_ARG_ATTR_MULTIPLE_POST_OP(p.residual_index) | DNNL_ARG_SRC_1,
                       m->other.get()};
    }
    if (kernel.scratchpad.get_size() > 0) {
      const memory& pad = m->scratchpad[fuse_clip ? 1 : 0];
      pad.set_data_handle(ThreadScratch::Bytes(scratch.scratchpad, kernel.scratchpad.get_size()));
      args[count++] = {DNNL_ARG_SCRATCHPAD, pad.get()};
    }
    const dnnl_status_t status =
        dnnl_primitive_execute(kernel.primitive.get(), stream.get(), count, args);
    TORCH_CHECK(status == dnnl_success, "tvm_torch: oneDNN convolution failed (status ",
                static_cast<int>(status), ")");
    stream.wait();
  } catch (const dnnl::error& err) {
    TORCH_CHECK(false, "tvm_torch: oneDNN convolution failed: ", err.what());
  }
}

const std::vector<int64_t>& OneDnnConv::input_size() const { return impl_->input_size; }

const std::vector<int64_t>& OneDnnConv::output_size() const { return impl_->output_size; }

at::ScalarType OneDnnConv::dtype() const { return impl_->dtype; }

bool OneDnnConv::Available() { return true; }

int64_t OneDnnConv::ClipsFused() { return g_clips_fused.load(); }

bool OneDnnConv::SetFuseClips(bool enabled) { return g_fuse_clips.exchange(enabled); }

#else  // !TVM_TORCH_WITH_ONEDNN

struct OneDnnConv::Impl {};

OneDnnConv::OneDnnConv(const at::Tensor&, const ConvGeometry&, const std::vector<int64_t>&,
                       const std::string&, bool, at::MemoryFormat) {}

bool OneDnnConv::CanWriteTo(const at::Tensor&) const { return false; }

at::Tensor OneDnnConv::Run(const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, bool*) const {
  TORCH_CHECK(false, "tvm_torch: this library was built without oneDNN");
}

void OneDnnConv::Execute(const Buffers&, bool*) const {
  TORCH_CHECK(false, "tvm_torch: this library was built without oneDNN");
}

const std::vector<int64_t>& OneDnnConv::input_size() const {
  TORCH_CHECK(false, "tvm_torch: this library was built without oneDNN");
}

const std::vector<int64_t>& OneDnnConv::output_size() const {
  TORCH_CHECK(false, "tvm_torch: this library was built without oneDNN");
}

at::ScalarType OneDnnConv::dtype() const {
  TORCH_CHECK(false, "tvm_torch: this library was built without oneDNN");
}

bool OneDnnConv::Available() { return false; }

int64_t OneDnnConv::ClipsFused() { return 0; }

bool OneDnnConv::SetFuseClips(bool) { return false; }

#endif  // TVM_TORCH_WITH_ONEDNN

OneDnnConv::~OneDnnConv() = default;

bool OneDnnConv::IsClip(const std::string& post_op) {
  return post_op == "relu" || post_op == "relu6";
}

}  // namespace tvm_torch
