/*!
 * \file state_format.cc
 * \brief Encoding and verification of the pickled module state.
 */
#include "state_format.h"

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/string.h>

#include <cstdio>
#include <cstring>

namespace tvm_torch {
namespace {

namespace json = tvm::ffi::json;

std::string Checksum(const std::string& bytes) {
  uint64_t hash = 1469598103934665603ULL;
  for (unsigned char c : bytes) {
    hash ^= c;
    hash *= 1099511628211ULL;
  }
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(hash));
  return buf;
}

[[noreturn]] void Corrupt(const std::string& why) {
  TORCH_CHECK(false, "tvm_class: the saved TVM module state is corrupted or incomplete: ", why);
}

json::Value Get(const json::Object& obj, const char* key) {
  auto it = obj.find(tvm::ffi::String(key));
  if (it == obj.end()) Corrupt(std::string("the header has no '") + key + "'");
  return (*it).second;
}

int64_t GetInt(const json::Object& obj, const char* key) {
  auto v = Get(obj, key).try_cast<int64_t>();
  if (!v.has_value()) Corrupt(std::string("'") + key + "' is not an integer");
  return *v;
}

std::string GetString(const json::Object& obj, const char* key) {
  auto v = Get(obj, key).as<tvm::ffi::String>();
  if (!v.has_value()) Corrupt(std::string("'") + key + "' is not a string");
  return std::string(*v);
}

}  // namespace

at::Tensor BytesToTensor(const std::string& bytes) {
  at::Tensor t = at::empty({static_cast<int64_t>(bytes.size())}, at::kByte);
  if (!bytes.empty()) std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
  return t;
}

std::string TensorToBytes(const at::Tensor& tensor, const char* what) {
  TORCH_CHECK(tensor.scalar_type() == at::kByte && tensor.dim() == 1 && tensor.device().is_cpu(),
              "tvm_class: ", what, " must be a 1-D uint8 CPU tensor, got ",
              c10::toString(tensor.scalar_type()), " with ", tensor.dim(), " dims on ",
              tensor.device());
  at::Tensor c = tensor.contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), static_cast<size_t>(c.numel()));
}

SerializedState EncodeState(const ModuleState& state) {
  json::Array programs;
  std::vector<at::Tensor> blobs;
  for (const ProgramBlobs& p : state.programs) {
    json::Object entry{{"graph", tvm::ffi::String(p.graph)},
                       {"lib_size", static_cast<int64_t>(p.lib.size())},
                       {"lib_checksum", tvm::ffi::String(Checksum(p.lib))},
                       {"params_size", static_cast<int64_t>(p.params.size())},
                       {"params_checksum", tvm::ffi::String(Checksum(p.params))}};
    programs.push_back(entry);
    blobs.push_back(BytesToTensor(p.lib));
    blobs.push_back(BytesToTensor(p.params));
  }
  json::Object header{{"class", tvm::ffi::String(state.class_name)},
                      {"num_inputs", state.num_inputs},
                      {"num_outputs", state.num_outputs},
                      {"device", tvm::ffi::String(state.device)},
                      {"bucket_padding", state.bucket_padding},
                      {"programs", programs}};
  return {kStateFormatVersion, std::string(json::Stringify(header)), std::move(blobs)};
}

ModuleState DecodeState(const SerializedState& encoded) {
  const auto& [version, header_text, blobs] = encoded;
  TORCH_CHECK(version == kStateFormatVersion, "tvm_class: the saved TVM module uses state format "
              "version ", version, ", but this library reads version ", kStateFormatVersion,
              "; load it with the tvm.contrib.torch version that saved it or re-export the model");
  tvm::ffi::String error;
  json::Value root = json::Parse(header_text, &error);
  if (!error.empty()) Corrupt("the header is not valid JSON (" + std::string(error) + ")");
  auto header = root.as<json::Object>();
  if (!header.has_value()) Corrupt("the header is not a JSON object");

  ModuleState state;
  state.class_name = GetString(*header, "class");
  state.num_inputs = GetInt(*header, "num_inputs");
  state.num_outputs = GetInt(*header, "num_outputs");
  state.device = GetString(*header, "device");
  auto padding = Get(*header, "bucket_padding").try_cast<bool>();
  if (!padding.has_value()) Corrupt("'bucket_padding' is not a bool");
  state.bucket_padding = *padding;
  auto programs = Get(*header, "programs").as<json::Array>();
  if (!programs.has_value()) Corrupt("'programs' is not a list");
  if (blobs.size() != 2 * programs->size()) {
    Corrupt("expected " + std::to_string(2 * programs->size()) + " blobs, found " +
            std::to_string(blobs.size()));
  }
  for (size_t i = 0; i < programs->size(); ++i) {
    auto entry = (*programs)[i].as<json::Object>();
    if (!entry.has_value()) Corrupt("a program entry is not a JSON object");
    ProgramBlobs p;
    p.graph = GetString(*entry, "graph");
    p.lib = TensorToBytes(blobs[2 * i], "a saved library blob");
    p.params = TensorToBytes(blobs[2 * i + 1], "a saved params blob");
    const std::string where = "program " + std::to_string(i);
    if (static_cast<int64_t>(p.lib.size()) != GetInt(*entry, "lib_size") ||
        Checksum(p.lib) != GetString(*entry, "lib_checksum")) {
      Corrupt(where + ": the compiled library does not match its recorded size/checksum");
    }
    if (static_cast<int64_t>(p.params.size()) != GetInt(*entry, "params_size") ||
        Checksum(p.params) != GetString(*entry, "params_checksum")) {
      Corrupt(where + ": the params do not match their recorded size/checksum");
    }
    state.programs.push_back(std::move(p));
  }
  return state;
}

}  // namespace tvm_torch
