/*!
 * \file tvm_module.cc
 * \brief TvmGraphModule / TvmVMModule: program selection, device moves, pickling.
 */
#include "tvm_module.h"

#include <c10/core/GradMode.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <atomic>
#include <iterator>
#include <limits>
#include <mutex>
#include <unordered_map>

#include "state_format.h"
#include "tensor_bridge.h"

namespace tvm_torch {
namespace {

/*! \brief FNV-1a over 64-bit words: the shape hash of tensors and of manifests. */
class ShapeHasher {
 public:
  void Add(int64_t word) {
    hash_ = (hash_ ^ static_cast<uint64_t>(word)) * 1099511628211ULL;
  }
  uint64_t value() const { return hash_; }

 private:
  uint64_t hash_ = 1469598103934665603ULL;
};

/*! \brief Position of a dtype in kSupportedDtypes, -1 when not there. */
int64_t DtypeCode(at::ScalarType type) {
  for (size_t i = 0; i < std::size(kSupportedDtypes); ++i) {
    if (kSupportedDtypes[i].type == type) return static_cast<int64_t>(i);
  }
  return -1;
}

int64_t DtypeCode(const std::string& name) {
  for (size_t i = 0; i < std::size(kSupportedDtypes); ++i) {
    if (name == kSupportedDtypes[i].name) return static_cast<int64_t>(i);
  }
  return -1;
}

/*! \brief Hash of the inputs' dtypes and sizes; the one key computation of a call. */
uint64_t ShapeHash(const std::vector<at::Tensor>& inputs) {
  ShapeHasher h;
  for (const at::Tensor& t : inputs) {
    h.Add(DtypeCode(t.scalar_type()));
    h.Add(t.dim());
    for (int64_t size : t.sizes()) h.Add(size);
  }
  return h.value();
}

/*! \brief ShapeHash of the inputs a static signature takes. */
uint64_t ShapeHash(const ProgramManifest& manifest) {
  ShapeHasher h;
  for (const InputSpec& spec : manifest.inputs) {
    h.Add(DtypeCode(spec.dtype));
    h.Add(static_cast<int64_t>(spec.dims.size()));
    for (int64_t dim : spec.dims) h.Add(dim);
  }
  return h.value();
}

bool SameSignature(const ProgramManifest& a, const ProgramManifest& b) {
  if (a.inputs.size() != b.inputs.size()) return false;
  for (size_t i = 0; i < a.inputs.size(); ++i) {
    if (a.inputs[i].dtype != b.inputs[i].dtype || a.inputs[i].dims != b.inputs[i].dims) {
      return false;
    }
  }
  return true;
}

/*! \brief The inputs zero-padded along dim 0 to a bucket's batch. */
std::vector<at::Tensor> PadBatch(const std::vector<at::Tensor>& inputs, int64_t batch,
                                 int64_t bucket_batch) {
  std::vector<at::Tensor> padded;
  padded.reserve(inputs.size());
  for (const at::Tensor& t : inputs) {
    std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
    shape[0] = bucket_batch;
    at::Tensor p = at::zeros(shape, t.options());
    p.narrow(0, 0, batch).copy_(t);
    padded.push_back(std::move(p));
  }
  return padded;
}

/*!
 * \brief This thread's last served program, by module id. Entries whose program is gone (the
 *        module died, or its programs were reloaded) are pruned whenever the map has doubled
 *        since the last pruning, so it stays proportional to the live modules this thread uses.
 */
struct LastServedMap {
  std::unordered_map<uint64_t, std::weak_ptr<CompiledProgram>> entries;
  size_t prune_at = 16;

  void Record(uint64_t module_id, const std::shared_ptr<CompiledProgram>& program) {
    auto [it, inserted] = entries.try_emplace(module_id, program);
    if (!inserted) {
      it->second = program;
      return;
    }
    if (entries.size() < prune_at) return;
    std::erase_if(entries, [](const auto& entry) { return entry.second.expired(); });
    prune_at = std::max<size_t>(16, 2 * entries.size());
  }
};

LastServedMap& LastServed() {
  // No entry is erased by ~TvmModule: a module may die on another thread, or after this
  // thread's thread_locals are gone (a static model at exit); pruning covers both.
  static thread_local LastServedMap last;
  return last;
}

uint64_t NextModuleId() {
  static std::atomic<uint64_t> next{0};
  return next.fetch_add(1, std::memory_order_relaxed);
}

std::string DeviceString(const c10::Device& device) {
  return device.is_cpu() ? "cpu" : "cuda:" + std::to_string(device.index());
}

/*!
 * \brief ParseDevice, and the index must survive the conversion to torch's 8-bit device index
 *        ("cuda:200" must not become cuda:-56).
 */
c10::Device ParseCheckedDevice(const std::string& text) {
  c10::Device device = ParseDevice(text);
  const std::string prefix = "cuda:";
  if (text.compare(0, prefix.size(), prefix) == 0) {
    const std::string index = text.substr(prefix.size());
    TORCH_CHECK(device.index() >= 0 && std::to_string(device.index()) == index.substr(
                    std::min(index.find_first_not_of('0'), index.size() - 1)),
                "tvm_class: invalid device '", text, "': CUDA device index ", index,
                " is out of range");
  }
  return device;
}

void CheckDeviceAvailable(const c10::Device& device) {
  if (!device.is_cuda()) return;
  TORCH_CHECK(c10::impl::hasDeviceGuardImpl(c10::DeviceType::CUDA),
              "tvm_class: device ", DeviceString(device),
              " was requested but this torch build has no CUDA support");
  int count = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->deviceCount();
  TORCH_CHECK(device.index() < count, "tvm_class: device ", DeviceString(device),
              " was requested but ", count, " CUDA device(s) are available");
}

}  // namespace

TvmModule::TvmModule(int64_t num_inputs, int64_t num_outputs, const std::string& device)
    : num_inputs_(num_inputs),
      num_outputs_(num_outputs),
      device_(ParseCheckedDevice(device)),
      id_(NextModuleId()) {
  TORCH_CHECK(num_inputs > 0, "tvm_class: num_inputs must be positive, got ", num_inputs);
  TORCH_CHECK(num_outputs > 0, "tvm_class: num_outputs must be positive, got ", num_outputs);
  CheckDeviceAvailable(device_);
}

void TvmModule::Load(ProgramBlobs blobs, const std::vector<std::vector<int64_t>>* expected) {
  auto program = Prepare(std::move(blobs), expected);
  std::unique_lock<std::shared_mutex> lock(mutex_);
  AddProgram(std::move(program));
}

std::shared_ptr<CompiledProgram> TvmModule::Prepare(
    ProgramBlobs blobs, const std::vector<std::vector<int64_t>>* expected) const {
  auto program = std::make_shared<CompiledProgram>(std::move(blobs), device_);
  const ProgramManifest& m = program->manifest();
  TORCH_CHECK(static_cast<int64_t>(m.inputs.size()) == num_inputs_, "tvm_class: the module was "
              "created with num_inputs=", num_inputs_, " but the compiled program takes ",
              m.inputs.size(), " inputs ", m.SignatureString());
  TORCH_CHECK(m.num_outputs == num_outputs_, "tvm_class: the module was created with "
              "num_outputs=", num_outputs_, " but the compiled program returns ", m.num_outputs);
  if (expected != nullptr) {
    TORCH_CHECK(expected->size() == m.inputs.size(), "tvm_class: input_shapes lists ",
                expected->size(), " inputs but the graph manifest has ", m.inputs.size());
    for (size_t i = 0; i < expected->size(); ++i) {
      const InputSpec& spec = m.inputs[i];
      bool same = (*expected)[i].size() == spec.dims.size();
      for (size_t d = 0; same && d < spec.dims.size(); ++d) {
        same = spec.dims[d] < 0 || spec.dims[d] == (*expected)[i][d];
      }
      TORCH_CHECK(same, "tvm_class: input_shapes[", i, "] = ", c10::IntArrayRef((*expected)[i]),
                  " does not match the compiled program's signature ", m.SignatureString());
    }
  }
  return program;
}

void TvmModule::LoadTvmModule(const std::vector<std::vector<int64_t>>& input_shapes,
                              const std::string& lib_path, const std::string& graph_path,
                              const std::string& params_path) {
  ProgramBlobs blobs;
  blobs.lib = ReadFileBytes(lib_path, "compiled library");
  blobs.graph = ReadFileBytes(graph_path, "graph manifest");
  blobs.params = ReadFileBytes(params_path, "params");
  Load(std::move(blobs), &input_shapes);
}

void TvmModule::LoadTvmModuleFromBytes(const at::Tensor& lib, const std::string& graph,
                                       const at::Tensor& params) {
  ProgramBlobs blobs;
  blobs.lib = TensorToBytes(lib, "lib");
  blobs.graph = graph;
  blobs.params = TensorToBytes(params, "params");
  Load(std::move(blobs), nullptr);
}

std::vector<at::Tensor> TvmModule::Forward(const std::vector<at::Tensor>& inputs) {
  TORCH_CHECK(static_cast<int64_t>(inputs.size()) == num_inputs_, "tvm_class: ", ClassName(),
              ".forward expected ", num_inputs_, " input tensor(s), got ", inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    TORCH_CHECK(inputs[i].defined(), "tvm_class: input ", i, " is an undefined tensor");
    TORCH_CHECK(inputs[i].device() == device_, "tvm_class: input ", i, " is on ",
                inputs[i].device(), " but the module is on ", DeviceString(device_),
                "; move the input or the module (.to())");
    // Returning outputs without a graph would silently cut the caller's backward pass.
    TORCH_CHECK(!(inputs[i].requires_grad() && c10::GradMode::is_enabled()),
                "tvm_class: input ", i, " requires grad, but compiled modules are inference-only "
                "(a TVM program has no backward); call it under torch.no_grad() or "
                "torch.inference_mode(), or pass a detached tensor");
  }
  Selection selection;
  {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    selection = TrySelect(inputs);
    // The message lists the loaded programs, so it is made under the same lock.
    if (selection.program == nullptr) TORCH_CHECK(false, NoMatchMessage(inputs));
  }
  std::vector<at::Tensor> outputs;
  if (selection.batch < 0) {
    outputs = selection.program->Run(inputs);
  } else {
    outputs = selection.program->Run(PadBatch(inputs, selection.batch, selection.bucket_batch));
  }
  TORCH_CHECK(static_cast<int64_t>(outputs.size()) == num_outputs_, "tvm_class: the compiled "
              "program returned ", outputs.size(), " tensors, expected ", num_outputs_);
  if (selection.batch >= 0) {
    for (at::Tensor& out : outputs) {
      if (out.dim() > 0 && out.size(0) == selection.bucket_batch) {
        out = out.narrow(0, 0, selection.batch);
      }
    }
  }
  selection.program->CountCall();
  LastServed().Record(id_, selection.program);  // the signature string is made only when asked
  return outputs;
}

bool TvmModule::Accepts(const std::vector<at::Tensor>& inputs) const {
  if (static_cast<int64_t>(inputs.size()) != num_inputs_) return false;
  const bool grad = c10::GradMode::is_enabled();
  for (const at::Tensor& t : inputs) {
    if (!t.defined() || t.device() != device_) return false;
    // A gradient must flow through: the TorchScript fallback computes it, TVM cannot.
    if (grad && t.requires_grad()) return false;
  }
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return TrySelect(inputs).program != nullptr;
}

void TvmModule::SetBucketPadding(bool enabled) {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  bucket_padding_ = enabled;
}

c10::Dict<std::string, int64_t> TvmModule::CallCounts() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  c10::Dict<std::string, int64_t> counts;
  for (const auto& program : Programs()) {
    counts.insert(program->manifest().SignatureString(), program->calls());
  }
  return counts;
}

std::string TvmModule::LastSignature() const {
  const auto& entries = LastServed().entries;
  auto it = entries.find(id_);
  if (it == entries.end()) return "";
  auto program = it->second.lock();
  return program ? program->manifest().SignatureString() : "";
}

void TvmModule::To(const std::string& device) {
  c10::Device target = ParseCheckedDevice(device);
  CheckDeviceAvailable(target);
  std::unique_lock<std::shared_mutex> lock(mutex_);
  if (target == device_) return;
  std::vector<std::shared_ptr<CompiledProgram>> reloaded;
  for (const auto& program : Programs()) {
    reloaded.push_back(std::make_shared<CompiledProgram>(program->blobs(), target));
  }
  ClearPrograms();
  device_ = target;
  for (auto& program : reloaded) AddProgram(std::move(program));
}

std::string TvmModule::Device() const { return DeviceString(device_); }

std::vector<std::string> TvmModule::Signatures() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  std::vector<std::string> out;
  for (const auto& program : Programs()) out.push_back(program->manifest().SignatureString());
  return out;
}

std::string TvmModule::SignatureList() const {
  std::string out;
  for (const auto& program : Programs()) {
    out += out.empty() ? "" : ", ";
    out += program->manifest().SignatureString();
  }
  return out.empty() ? "none (call load_tvm_module first)" : out;
}

SerializedState TvmModule::Serialize() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  ModuleState state;
  state.class_name = ClassName();
  state.num_inputs = num_inputs_;
  state.num_outputs = num_outputs_;
  state.device = DeviceString(device_);
  state.bucket_padding = bucket_padding_;
  for (const auto& program : Programs()) state.programs.push_back(program->blobs());
  return EncodeState(state);
}

void TvmModule::Restore(ModuleState state) {
  TORCH_CHECK(state.class_name == ClassName(), "tvm_class: the saved state is of a ",
              state.class_name, ", not of a ", ClassName());
  TORCH_CHECK(state.num_inputs == num_inputs_ && state.num_outputs == num_outputs_,
              "tvm_class: the saved state has ", state.num_inputs, " inputs and ",
              state.num_outputs, " outputs; this module has ", num_inputs_, " and ",
              num_outputs_);
  // All programs are loaded and checked first; the module changes only if every one is
  // accepted, so a state that fails half-way leaves it as it was.
  std::vector<std::shared_ptr<CompiledProgram>> loaded;
  for (ProgramBlobs& blobs : state.programs) loaded.push_back(Prepare(std::move(blobs), nullptr));
  std::unique_lock<std::shared_mutex> lock(mutex_);
  const std::vector<std::shared_ptr<CompiledProgram>> before = Programs();
  try {
    for (auto& program : loaded) AddProgram(std::move(program));
  } catch (...) {
    ClearPrograms();
    for (const auto& program : before) AddProgram(program);
    throw;
  }
  bucket_padding_ = state.bucket_padding;
}

// ---- TvmGraphModule ----

void TvmGraphModule::AddProgram(std::shared_ptr<CompiledProgram> program) {
  const ProgramManifest& m = program->manifest();
  TORCH_CHECK(!m.dynamic, "tvm_class: TvmGraphModule takes static-shape programs; ",
              m.SignatureString(), " has symbolic dims (use TvmVMModule)");
  auto same = std::find_if(programs_.begin(), programs_.end(), [&](const auto& loaded) {
    return SameSignature(loaded->manifest(), m);
  });
  if (same != programs_.end()) {
    *same = std::move(program);  // a reload of the same signature replaces it, in place
  } else {
    programs_.push_back(std::move(program));
  }
  by_shape_.clear();  // loading is rare: rebuild the index rather than patch it
  for (const auto& loaded : programs_) by_shape_.emplace(ShapeHash(loaded->manifest()), loaded);
}

Selection TvmGraphModule::TrySelect(const std::vector<at::Tensor>& inputs) const {
  auto [first, last] = by_shape_.equal_range(ShapeHash(inputs));
  for (auto it = first; it != last; ++it) {
    if (it->second->manifest().Matches(inputs)) return Selection{it->second};
  }
  return bucket_padding_ ? FindBucket(inputs) : Selection{};
}

std::string TvmGraphModule::NoMatchMessage(const std::vector<at::Tensor>& inputs) const {
  std::string given;
  for (const at::Tensor& t : inputs) given += (given.empty() ? "" : ", ") + DescribeTensor(t);
  return "tvm_class: no compiled program for inputs (" + given + "); compiled signatures: " +
         SignatureList() +
         (bucket_padding_ ? " (bucket padding found no larger batch bucket)" : "");
}

Selection TvmGraphModule::FindBucket(const std::vector<at::Tensor>& inputs) const {
  const int64_t batch = inputs[0].dim() > 0 ? inputs[0].size(0) : -1;
  if (batch < 0) return {};
  std::shared_ptr<CompiledProgram> best;
  int64_t best_batch = std::numeric_limits<int64_t>::max();
  for (const auto& program : programs_) {
    const ProgramManifest& m = program->manifest();
    const int64_t bucket = m.inputs[0].dims.empty() ? -1 : m.inputs[0].dims[0];
    if (bucket < batch || bucket >= best_batch) continue;
    bool fits = true;
    for (size_t i = 0; fits && i < inputs.size(); ++i) {
      const InputSpec& spec = m.inputs[i];
      const at::Tensor& t = inputs[i];
      const char* dtype = SupportedDtypeName(t.scalar_type());
      fits = dtype != nullptr && spec.dtype == dtype &&
             static_cast<size_t>(t.dim()) == spec.dims.size() && t.dim() > 0 &&
             t.size(0) == batch && spec.dims[0] == bucket;
      for (int64_t d = 1; fits && d < t.dim(); ++d) fits = t.size(d) == spec.dims[d];
    }
    if (fits) {
      best = program;
      best_batch = bucket;
    }
  }
  if (best == nullptr) return {};
  return Selection{std::move(best), batch, best_batch};
}

std::vector<std::shared_ptr<CompiledProgram>> TvmGraphModule::Programs() const {
  return programs_;
}

void TvmGraphModule::ClearPrograms() {
  programs_.clear();
  by_shape_.clear();
}

// ---- TvmVMModule ----

void TvmVMModule::AddProgram(std::shared_ptr<CompiledProgram> program) {
  program_ = std::move(program);  // one executable: loading again replaces it
}

Selection TvmVMModule::TrySelect(const std::vector<at::Tensor>& inputs) const {
  if (program_ == nullptr || !program_->manifest().Matches(inputs)) return {};
  return Selection{program_};
}

std::string TvmVMModule::NoMatchMessage(const std::vector<at::Tensor>& inputs) const {
  if (program_ == nullptr) {
    return "tvm_class: TvmVMModule has no compiled program; call load_tvm_module first";
  }
  return "tvm_class: " + program_->manifest().Mismatch(inputs) +
         "; compiled signature: " + program_->manifest().SignatureString();
}

std::vector<std::shared_ptr<CompiledProgram>> TvmVMModule::Programs() const {
  if (program_ == nullptr) return {};
  return {program_};
}

void TvmVMModule::ClearPrograms() { program_.reset(); }

}  // namespace tvm_torch
