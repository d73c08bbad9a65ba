/*!
 * \file program_manifest.cc
 * \brief Parsing and checking of the compiled-program manifest.
 */
#include "program_manifest.h"

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/string.h>

#include <limits>
#include <sstream>

#include "load_checks.h"
#include "tensor_bridge.h"

namespace tvm_torch {
namespace {

namespace json = tvm::ffi::json;

json::Value Field(const json::Object& obj, const char* key, const char* where) {
  auto it = obj.find(tvm::ffi::String(key));
  TORCH_CHECK(it != obj.end(), "tvm_class: malformed graph manifest: ", where, " has no '", key,
              "' field");
  return (*it).second;
}

json::Object AsObject(const json::Value& value, const char* where) {
  auto obj = value.as<json::Object>();
  TORCH_CHECK(obj.has_value(), "tvm_class: malformed graph manifest: ", where,
              " must be a JSON object");
  return *obj;
}

json::Array AsArray(const json::Value& value, const char* where) {
  auto arr = value.as<json::Array>();
  TORCH_CHECK(arr.has_value(), "tvm_class: malformed graph manifest: ", where,
              " must be a JSON array");
  return *arr;
}

std::string AsString(const json::Value& value, const char* where) {
  auto str = value.as<tvm::ffi::String>();
  TORCH_CHECK(str.has_value(), "tvm_class: malformed graph manifest: ", where,
              " must be a string");
  return std::string(*str);
}

int64_t AsInt(const json::Value& value, const char* where) {
  auto num = value.try_cast<int64_t>();
  TORCH_CHECK(num.has_value(), "tvm_class: malformed graph manifest: ", where,
              " must be an integer");
  return *num;
}

}  // namespace

ProgramManifest ProgramManifest::Parse(const std::string& json_text) {
  CheckJsonDepth(json_text, "the graph manifest");
  tvm::ffi::String error;
  json::Value root = json::Parse(json_text, &error);
  TORCH_CHECK(error.empty(), "tvm_class: the graph manifest is not valid JSON: ",
              std::string(error));
  json::Object obj = AsObject(root, "the manifest");
  int64_t version = AsInt(Field(obj, "format_version", "the manifest"), "format_version");
  TORCH_CHECK(version == kManifestFormatVersion, "tvm_class: graph manifest format version ",
              version, " is not supported (this library reads version ", kManifestFormatVersion,
              "); re-export the model with this version of tvm.contrib.torch");

  ProgramManifest manifest;
  manifest.entry = AsString(Field(obj, "entry", "the manifest"), "entry");
  manifest.num_outputs = AsInt(Field(obj, "num_outputs", "the manifest"), "num_outputs");
  for (const json::Value& name : AsArray(Field(obj, "params", "the manifest"), "params")) {
    manifest.param_names.push_back(AsString(name, "a param name"));
  }
  manifest.device_type = AsString(Field(obj, "device_type", "the manifest"), "device_type");
  auto features = obj.find(tvm::ffi::String("cpu_features"));
  if (features != obj.end()) {
    for (const json::Value& name : AsArray((*features).second, "cpu_features")) {
      manifest.cpu_features.push_back(AsString(name, "a CPU feature"));
    }
  }
  json::Value transform = Field(obj, "transform_params", "the manifest");
  if (transform != nullptr) manifest.transform_params = AsString(transform, "transform_params");

  json::Object dim_ranges = AsObject(Field(obj, "dim_ranges", "the manifest"), "dim_ranges");
  for (const json::Value& item : AsArray(Field(obj, "inputs", "the manifest"), "inputs")) {
    json::Object input = AsObject(item, "an input");
    InputSpec spec;
    spec.name = AsString(Field(input, "name", "an input"), "input name");
    spec.dtype = AsString(Field(input, "dtype", "an input"), "input dtype");
    for (const json::Value& dim : AsArray(Field(input, "shape", "an input"), "input shape")) {
      if (auto sym = dim.as<tvm::ffi::String>()) {
        std::string name(*sym);
        int64_t lo = 0, hi = std::numeric_limits<int64_t>::max();
        auto it = dim_ranges.find(tvm::ffi::String(name));
        if (it != dim_ranges.end()) {
          json::Array range = AsArray((*it).second, "a dim range");
          TORCH_CHECK(range.size() == 2, "tvm_class: malformed graph manifest: range of '", name,
                      "' must be [min, max]");
          lo = AsInt(range[0], "range min");
          hi = AsInt(range[1], "range max");
        }
        spec.dims.push_back(-1);
        spec.dim_names.push_back(name);
        spec.ranges.emplace_back(lo, hi);
        manifest.dynamic = true;
      } else {
        int64_t value = AsInt(dim, "a shape dim");
        spec.dims.push_back(value);
        spec.dim_names.push_back(std::to_string(value));
        spec.ranges.emplace_back(value, value);
      }
    }
    manifest.inputs.push_back(std::move(spec));
  }
  return manifest;
}

std::string ProgramManifest::SignatureString() const {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < inputs.size(); ++i) {
    const InputSpec& spec = inputs[i];
    os << (i ? ", " : "") << spec.dtype << "[";
    for (size_t d = 0; d < spec.dims.size(); ++d) {
      os << (d ? ", " : "") << spec.dim_names[d];
      if (spec.dims[d] < 0 && spec.ranges[d].second != std::numeric_limits<int64_t>::max()) {
        os << " in " << spec.ranges[d].first << ".." << spec.ranges[d].second;
      }
    }
    os << "]";
  }
  os << ")";
  return os.str();
}

namespace {

/*!
 * \brief The first way inputs fail a signature, as indices only, so that matching allocates
 *        nothing and the message is made only by Mismatch().
 */
struct InputCheck {
  enum Kind { kMatch, kCount, kDtype, kRank, kSize, kSymbolic } kind = kMatch;
  /*! \brief The input and dim at fault. */
  size_t input = 0, dim = 0;
  /*! \brief For kSymbolic: the earlier input and dim that gave the dim another value. */
  size_t other_input = 0, other_dim = 0;
};

InputCheck CheckInputs(const ProgramManifest& m, const std::vector<at::Tensor>& given) {
  const std::vector<InputSpec>& inputs = m.inputs;
  if (given.size() != inputs.size()) return {InputCheck::kCount};
  for (size_t i = 0; i < inputs.size(); ++i) {
    const InputSpec& spec = inputs[i];
    const at::Tensor& t = given[i];
    const char* dtype = SupportedDtypeName(t.scalar_type());
    if (dtype == nullptr || spec.dtype != dtype) return {InputCheck::kDtype, i};
    if (static_cast<size_t>(t.dim()) != spec.dims.size()) return {InputCheck::kRank, i};
    for (size_t d = 0; d < spec.dims.size(); ++d) {
      int64_t size = t.size(static_cast<int64_t>(d));
      if (size < spec.ranges[d].first || size > spec.ranges[d].second) {
        return {InputCheck::kSize, i, d};
      }
    }
  }
  if (!m.dynamic) return {};
  // A symbolic dim named in several places must have one value.
  for (size_t i = 0; i < inputs.size(); ++i) {
    for (size_t d = 0; d < inputs[i].dims.size(); ++d) {
      if (inputs[i].dims[d] >= 0) continue;
      for (size_t j = 0; j <= i; ++j) {
        for (size_t e = 0; e < inputs[j].dims.size() && (j < i || e < d); ++e) {
          if (inputs[j].dims[e] >= 0 || inputs[j].dim_names[e] != inputs[i].dim_names[d]) continue;
          if (given[j].size(static_cast<int64_t>(e)) != given[i].size(static_cast<int64_t>(d))) {
            return {InputCheck::kSymbolic, i, d, j, e};
          }
        }
      }
    }
  }
  return {};
}

}  // namespace

bool ProgramManifest::Matches(const std::vector<at::Tensor>& given) const {
  return CheckInputs(*this, given).kind == InputCheck::kMatch;
}

std::string ProgramManifest::Mismatch(const std::vector<at::Tensor>& given) const {
  const InputCheck check = CheckInputs(*this, given);
  auto which = [&](size_t i) {
    return "input " + std::to_string(i) + " ('" + inputs[i].name + "')";
  };
  const size_t i = check.input, d = check.dim;
  switch (check.kind) {
    case InputCheck::kMatch:
      return "";
    case InputCheck::kCount:
      return "expected " + std::to_string(inputs.size()) + " inputs, got " +
             std::to_string(given.size());
    case InputCheck::kDtype:
      return which(i) + " has dtype " + DtypeName(given[i].scalar_type()) + ", expected " +
             inputs[i].dtype;
    case InputCheck::kRank:
      return which(i) + " has rank " + std::to_string(given[i].dim()) + ", expected " +
             std::to_string(inputs[i].dims.size());
    case InputCheck::kSize: {
      const InputSpec& spec = inputs[i];
      std::string msg = which(i) + " has size " +
                        std::to_string(given[i].size(static_cast<int64_t>(d))) + " at dim " +
                        std::to_string(d) + ", expected " + spec.dim_names[d];
      if (spec.dims[d] < 0) {
        msg += " in [" + std::to_string(spec.ranges[d].first) + ", " +
               std::to_string(spec.ranges[d].second) + "]";
      }
      return msg;
    }
    case InputCheck::kSymbolic: {
      const size_t j = check.other_input, e = check.other_dim;
      return "symbolic dim '" + inputs[i].dim_names[d] + "' is " +
             std::to_string(given[j].size(static_cast<int64_t>(e))) + " in " + which(j) +
             " and " + std::to_string(given[i].size(static_cast<int64_t>(d))) + " in " + which(i);
    }
  }
  return "";
}

}  // namespace tvm_torch
