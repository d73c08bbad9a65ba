/*!
 * \file register_classes.cc
 * \brief All TorchScript registration of the tvm_class library, in one place, and the
 *        tvm_torch.runtime_contract global function that tells Python what this build reads.
 */
#include <torch/custom_class.h>
#include <torch/library.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>

#include <string>

#include "program_manifest.h"
#include "state_format.h"
#include "tensor_bridge.h"
#include "tvm_module.h"

namespace tvm_torch {
namespace {

template <typename Module>
void RegisterModuleClass(torch::Library& lib, const char* name) {
  // Methods live on the shared base class; TorchScript needs `self` typed as the registered
  // class, hence the lambdas.
  using Self = c10::intrusive_ptr<Module>;
  lib.class_<Module>(name)
      .def(torch::init<int64_t, int64_t, std::string>())
      .def("load_tvm_module",
           [](const Self& self, std::vector<std::vector<int64_t>> input_shapes,
              std::string lib_path, std::string graph_path, std::string params_path) {
             self->LoadTvmModule(input_shapes, lib_path, graph_path, params_path);
           })
      .def("load_tvm_module_from_bytes",
           [](const Self& self, at::Tensor lib, std::string graph, at::Tensor params) {
             self->LoadTvmModuleFromBytes(lib, graph, params);
           })
      .def("forward",
           [](const Self& self, std::vector<at::Tensor> inputs) { return self->Forward(inputs); })
      .def("accepts",
           [](const Self& self, std::vector<at::Tensor> inputs) { return self->Accepts(inputs); })
      .def("to", [](const Self& self, std::string device) { self->To(device); })
      .def("device", [](const Self& self) { return self->Device(); })
      .def("signatures", [](const Self& self) { return self->Signatures(); })
      .def("num_inputs", [](const Self& self) { return self->NumInputs(); })
      .def("num_outputs", [](const Self& self) { return self->NumOutputs(); })
      .def("set_bucket_padding",
           [](const Self& self, bool enabled) { self->SetBucketPadding(enabled); })
      .def("bucket_padding", [](const Self& self) { return self->BucketPadding(); })
      .def("call_counts", [](const Self& self) { return self->CallCounts(); })
      .def("last_signature", [](const Self& self) { return self->LastSignature(); })
      .def("load_state",
           [](const Self& self, c10::IValue state) {
             self->Restore(DecodeState(StateFromIValue(state)));
           })
      // torch.export fakes the object from this (tvm.contrib.torch's fake class reads the
      // programs' manifests in the state header); the engine itself is saved by def_pickle.
      .def("__obj_flatten__",
           [](const Self& self) {
             return std::make_tuple(
                 std::make_tuple(std::string("header"), std::get<1>(self->Serialize())));
           })
      .def_pickle(
          [](const c10::intrusive_ptr<Module>& self) -> SerializedState {
            return self->Serialize();
          },
          // Any: a state of the wrong shape gets a message, not torch's internal assert.
          [](c10::IValue state) -> c10::intrusive_ptr<Module> {
            ModuleState decoded = DecodeState(StateFromIValue(state));
            auto module = c10::make_intrusive<Module>(decoded.num_inputs, decoded.num_outputs,
                                                      decoded.device);
            module->Restore(std::move(decoded));
            return module;
          });
}

/*!
 * \brief The formats and dtypes this library accepts, as JSON, so that Python's own constants
 *        (export.MANIFEST_FORMAT_VERSION, its dtype lists) can be checked against them.
 */
std::string RuntimeContract() {
  namespace json = tvm::ffi::json;
  json::Array dtypes;
  for (const SupportedDtype& dtype : kSupportedDtypes) {
    dtypes.push_back(tvm::ffi::String(dtype.name));
  }
  json::Object contract{{"manifest_format_version", kManifestFormatVersion},
                        {"state_format_version", kStateFormatVersion},
                        {"oldest_state_format_version", kOldestStateFormatVersion},
                        {"supported_dtypes", dtypes}};
  return std::string(json::Stringify(contract));
}

}  // namespace
}  // namespace tvm_torch

TVM_FFI_STATIC_INIT_BLOCK() {
  tvm::ffi::reflection::GlobalDef().def("tvm_torch.runtime_contract", tvm_torch::RuntimeContract);
}

TORCH_LIBRARY(tvm_class, m) {
  tvm_torch::RegisterModuleClass<tvm_torch::TvmGraphModule>(
      m, "TvmGraphModule");  // static shapes: one compiled program per input signature
  tvm_torch::RegisterModuleClass<tvm_torch::TvmVMModule>(
      m, "TvmVMModule");  // one compiled program with symbolic input dims
}
