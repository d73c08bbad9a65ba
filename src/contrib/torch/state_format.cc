/*!
 * \file state_format.cc
 * \brief Encoding and verification of the pickled module state.
 */
#include "state_format.h"

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/string.h>

#include <array>
#include <cstdio>
#include <cstring>

#include "load_checks.h"

namespace tvm_torch {
namespace {

namespace json = tvm::ffi::json;

/*! \brief Version 1's per-blob checksum: 64-bit FNV-1a in hex. */
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
  TORCH_CHECK(tensor.scalar_type() == at::kByte && tensor.dim() == 1 && !tensor.is_meta(),
              "tvm_class: ", what, " must be a 1-D uint8 tensor with data, got ",
              c10::toString(tensor.scalar_type()), " with ", tensor.dim(), " dims on ",
              tensor.device());
  // torch.jit.load(..., map_location="cuda") moves these blobs with every other saved tensor.
  at::Tensor c = tensor.to(at::kCPU).contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), static_cast<size_t>(c.numel()));
}

/*!
 * \brief One SHA-256 over a whole state: the header's fields and, per program, the digests of
 *        its manifest, library and params, in a fixed text form (no JSON re-serialisation).
 */
static std::string StateDigest(const ModuleState& state,
                        const std::vector<std::array<std::string, 3>>& program_digests) {
  std::string text = "tvm.contrib.torch state 2\n";
  text += "class " + state.class_name + "\n";
  text += "num_inputs " + std::to_string(state.num_inputs) + "\n";
  text += "num_outputs " + std::to_string(state.num_outputs) + "\n";
  text += "device " + state.device + "\n";
  text += std::string("bucket_padding ") + (state.bucket_padding ? "1" : "0") + "\n";
  text += "programs " + std::to_string(program_digests.size()) + "\n";
  for (size_t i = 0; i < program_digests.size(); ++i) {
    const auto& [graph, lib, params] = program_digests[i];
    text += "program " + std::to_string(i) + " graph " + graph + " lib " + lib + " params " +
            params + "\n";
  }
  return Sha256Hex(text);
}

SerializedState EncodeState(const ModuleState& state) {
  json::Array programs;
  std::vector<at::Tensor> blobs;
  std::vector<std::array<std::string, 3>> digests;
  for (const ProgramBlobs& p : state.programs) {
    const std::string lib_sha = p.lib_sha256.empty() ? Sha256Hex(p.lib) : p.lib_sha256;
    const std::string params_sha = Sha256Hex(p.params);
    digests.push_back({Sha256Hex(p.graph), lib_sha, params_sha});
    json::Object entry{{"graph", tvm::ffi::String(p.graph)},
                       {"lib_size", static_cast<int64_t>(p.lib.size())},
                       {"lib_sha256", tvm::ffi::String(lib_sha)},
                       {"params_size", static_cast<int64_t>(p.params.size())},
                       {"params_sha256", tvm::ffi::String(params_sha)}};
    programs.push_back(entry);
    blobs.push_back(BytesToTensor(p.lib));
    blobs.push_back(BytesToTensor(p.params));
  }
  json::Object header{{"class", tvm::ffi::String(state.class_name)},
                      {"num_inputs", state.num_inputs},
                      {"num_outputs", state.num_outputs},
                      {"device", tvm::ffi::String(state.device)},
                      {"bucket_padding", state.bucket_padding},
                      {"programs", programs},
                      {"state_sha256", tvm::ffi::String(StateDigest(state, digests))}};
  return {kStateFormatVersion, std::string(json::Stringify(header)), std::move(blobs)};
}

SerializedState StateFromIValue(const c10::IValue& value) {
  auto describe = [](const c10::IValue& v) {
    return v.isTuple() ? "a tuple of " + std::to_string(v.toTupleRef().elements().size()) +
                             " elements"
                       : std::string(v.tagKind());
  };
  TORCH_CHECK(value.isTuple() && value.toTupleRef().elements().size() == 3,
              "tvm_class: the saved TVM module state must be a tuple (format version, header, "
              "blobs), got ", describe(value), "; the file is corrupted or was not written by "
              "tvm.contrib.torch");
  const auto& items = value.toTupleRef().elements();
  TORCH_CHECK(items[0].isInt(), "tvm_class: the saved TVM module state's format version must be "
              "an int, got ", describe(items[0]));
  TORCH_CHECK(items[1].isString(), "tvm_class: the saved TVM module state's header must be a "
              "string, got ", describe(items[1]));
  TORCH_CHECK(items[2].isTensorList() || (items[2].isList() && items[2].toListRef().empty()),
              "tvm_class: the saved TVM module state's blobs must be a list of tensors, got ",
              describe(items[2]));
  std::vector<at::Tensor> blobs;
  if (items[2].isTensorList()) blobs = items[2].toTensorVector();
  return {items[0].toInt(), items[1].toStringRef(), std::move(blobs)};
}

ModuleState DecodeState(const SerializedState& encoded) {
  const auto& [version, header_text, blobs] = encoded;
  TORCH_CHECK(version >= kOldestStateFormatVersion && version <= kStateFormatVersion,
              "tvm_class: the saved TVM module uses state format version ", version,
              ", but this library reads versions ", kOldestStateFormatVersion, " to ",
              kStateFormatVersion, "; load it with the tvm.contrib.torch version that saved it "
              "or re-export the model");
  CheckJsonDepth(header_text, "the saved TVM module's header");
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
  std::vector<std::array<std::string, 3>> digests;
  for (size_t i = 0; i < programs->size(); ++i) {
    auto entry = (*programs)[i].as<json::Object>();
    if (!entry.has_value()) Corrupt("a program entry is not a JSON object");
    const std::string where = "program " + std::to_string(i);
    // Sizes first: a blob of another size is reported without hashing it.
    if (blobs[2 * i].numel() != GetInt(*entry, "lib_size")) {
      Corrupt(where + ": the compiled library does not match its recorded size/checksum");
    }
    if (blobs[2 * i + 1].numel() != GetInt(*entry, "params_size")) {
      Corrupt(where + ": the params do not match their recorded size/checksum");
    }
    ProgramBlobs p;
    p.graph = GetString(*entry, "graph");
    p.lib = TensorToBytes(blobs[2 * i], "a saved library blob");
    p.params = TensorToBytes(blobs[2 * i + 1], "a saved params blob");
    if (version == 1) {
      if (Checksum(p.lib) != GetString(*entry, "lib_checksum")) {
        Corrupt(where + ": the compiled library does not match its recorded size/checksum");
      }
      if (Checksum(p.params) != GetString(*entry, "params_checksum")) {
        Corrupt(where + ": the params do not match their recorded size/checksum");
      }
    } else {
      if (p.LibDigest() != GetString(*entry, "lib_sha256")) {
        Corrupt(where + ": the compiled library does not match its recorded size/checksum");
      }
      std::string params_sha = Sha256Hex(p.params);
      if (params_sha != GetString(*entry, "params_sha256")) {
        Corrupt(where + ": the params do not match their recorded size/checksum");
      }
      digests.push_back({Sha256Hex(p.graph), p.lib_sha256, std::move(params_sha)});
    }
    state.programs.push_back(std::move(p));
  }
  if (version >= 2 && StateDigest(state, digests) != GetString(*header, "state_sha256")) {
    Corrupt("the header or a program's manifest differs from what was saved (the state's "
            "SHA-256 does not match)");
  }
  return state;
}

}  // namespace tvm_torch
