/*!
 * \file tvm_module.cc
 * \brief TvmGraphModule / TvmVMModule: program selection, device moves, pickling.
 */
#include "tvm_module.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <limits>
#include <mutex>
#include <sstream>
#include <unordered_map>

#include "state_format.h"
#include "tensor_bridge.h"

namespace tvm_torch {
namespace {

/*! \brief "float32[1,3,224,224];int64[4]": the key of a static signature. */
std::string TensorsKey(const std::vector<at::Tensor>& inputs) {
  std::string key;
  for (const at::Tensor& t : inputs) {
    key += DtypeName(t.scalar_type());
    key += '[';
    for (int64_t d = 0; d < t.dim(); ++d) {
      if (d) key += ',';
      key += std::to_string(t.size(d));
    }
    key += "];";
  }
  return key;
}

std::string ManifestKey(const ProgramManifest& manifest) {
  std::string key;
  for (const InputSpec& spec : manifest.inputs) {
    key += spec.dtype;
    key += '[';
    for (size_t d = 0; d < spec.dims.size(); ++d) {
      if (d) key += ',';
      key += std::to_string(spec.dims[d]);
    }
    key += "];";
  }
  return key;
}

/*! \brief Per thread and module: the program that served the thread's last call. */
std::unordered_map<const TvmModule*, std::weak_ptr<CompiledProgram>>& LastServed() {
  static thread_local std::unordered_map<const TvmModule*, std::weak_ptr<CompiledProgram>> last;
  return last;
}

std::string DeviceString(const c10::Device& device) {
  return device.is_cpu() ? "cpu" : "cuda:" + std::to_string(device.index());
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
    : num_inputs_(num_inputs), num_outputs_(num_outputs), device_(ParseDevice(device)) {
  TORCH_CHECK(num_inputs > 0, "tvm_class: num_inputs must be positive, got ", num_inputs);
  TORCH_CHECK(num_outputs > 0, "tvm_class: num_outputs must be positive, got ", num_outputs);
  CheckDeviceAvailable(device_);
}

void TvmModule::Load(ProgramBlobs blobs, const std::vector<std::vector<int64_t>>* expected) {
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
  std::unique_lock<std::shared_mutex> lock(mutex_);
  AddProgram(std::move(program));
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
  }
  Selection selection;
  {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    selection = Select(inputs);
  }
  std::vector<at::Tensor> outputs =
      selection.program->Run(selection.padded.empty() ? inputs : selection.padded);
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
  LastServed()[this] = selection.program;  // the signature string is made only when asked
  return outputs;
}

bool TvmModule::Accepts(const std::vector<at::Tensor>& inputs) const {
  if (static_cast<int64_t>(inputs.size()) != num_inputs_) return false;
  for (const at::Tensor& t : inputs) {
    if (!t.defined() || t.device() != device_) return false;
  }
  std::shared_lock<std::shared_mutex> lock(mutex_);
  try {
    return Select(inputs).program != nullptr;
  } catch (const c10::Error&) {
    return false;
  }
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
  auto it = LastServed().find(this);
  if (it == LastServed().end()) return "";
  auto program = it->second.lock();
  return program ? program->manifest().SignatureString() : "";
}

void TvmModule::To(const std::string& device) {
  c10::Device target = ParseDevice(device);
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
  for (ProgramBlobs& blobs : state.programs) Load(std::move(blobs), nullptr);
  SetBucketPadding(state.bucket_padding);
}

// ---- TvmGraphModule ----

void TvmGraphModule::AddProgram(std::shared_ptr<CompiledProgram> program) {
  const ProgramManifest& m = program->manifest();
  TORCH_CHECK(!m.dynamic, "tvm_class: TvmGraphModule takes static-shape programs; ",
              m.SignatureString(), " has symbolic dims (use TvmVMModule)");
  std::string key = ManifestKey(m);
  if (by_signature_.find(key) == by_signature_.end()) load_order_.push_back(key);
  by_signature_[key] = std::move(program);  // a reload of the same signature replaces it
}

Selection TvmGraphModule::Select(const std::vector<at::Tensor>& inputs) const {
  auto it = by_signature_.find(TensorsKey(inputs));
  if (it != by_signature_.end()) return Selection{it->second, {}, -1, -1};
  if (bucket_padding_) {
    Selection padded = PadToBucket(inputs);
    if (padded.program != nullptr) return padded;
  }
  std::string given;
  for (const at::Tensor& t : inputs) given += (given.empty() ? "" : ", ") + DescribeTensor(t);
  TORCH_CHECK(false, "tvm_class: no compiled program for inputs (", given,
              "); compiled signatures: ", SignatureList(),
              bucket_padding_ ? " (bucket padding found no larger batch bucket)" : "");
}

Selection TvmGraphModule::PadToBucket(const std::vector<at::Tensor>& inputs) const {
  const int64_t batch = inputs[0].dim() > 0 ? inputs[0].size(0) : -1;
  if (batch < 0) return {};
  std::shared_ptr<CompiledProgram> best;
  int64_t best_batch = std::numeric_limits<int64_t>::max();
  for (const auto& [key, program] : by_signature_) {
    const ProgramManifest& m = program->manifest();
    const int64_t bucket = m.inputs[0].dims.empty() ? -1 : m.inputs[0].dims[0];
    if (bucket < batch || bucket >= best_batch) continue;
    bool fits = true;
    for (size_t i = 0; fits && i < inputs.size(); ++i) {
      const InputSpec& spec = m.inputs[i];
      const at::Tensor& t = inputs[i];
      fits = DtypeName(t.scalar_type()) == spec.dtype &&
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
  Selection selection{best, {}, batch, best_batch};
  for (const at::Tensor& t : inputs) {
    std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
    shape[0] = best_batch;
    at::Tensor padded = at::zeros(shape, t.options());
    padded.narrow(0, 0, batch).copy_(t);
    selection.padded.push_back(padded);
  }
  return selection;
}

std::vector<std::shared_ptr<CompiledProgram>> TvmGraphModule::Programs() const {
  std::vector<std::shared_ptr<CompiledProgram>> out;
  for (const std::string& key : load_order_) out.push_back(by_signature_.at(key));
  return out;
}

void TvmGraphModule::ClearPrograms() {
  by_signature_.clear();
  load_order_.clear();
}

// ---- TvmVMModule ----

void TvmVMModule::AddProgram(std::shared_ptr<CompiledProgram> program) {
  program_ = std::move(program);  // one executable: loading again replaces it
}

Selection TvmVMModule::Select(const std::vector<at::Tensor>& inputs) const {
  TORCH_CHECK(program_ != nullptr, "tvm_class: TvmVMModule has no compiled program; call "
              "load_tvm_module first");
  std::string mismatch = program_->manifest().Mismatch(inputs);
  TORCH_CHECK(mismatch.empty(), "tvm_class: ", mismatch, "; compiled signature: ",
              program_->manifest().SignatureString());
  return Selection{program_, {}, -1, -1};
}

std::vector<std::shared_ptr<CompiledProgram>> TvmVMModule::Programs() const {
  if (program_ == nullptr) return {};
  return {program_};
}

void TvmVMModule::ClearPrograms() { program_.reset(); }

}  // namespace tvm_torch
