/*!
 * \file state_format.h
 * \brief The versioned, self-contained pickle state of a TVM module.
 *
 * Version 1 is a tuple (1, header, blobs):
 *  - header: JSON text {"class", "num_inputs", "num_outputs", "device", "bucket_padding",
 *    "programs": [{"graph": manifest JSON text, "lib_size", "lib_checksum",
 *    "params_size", "params_checksum"}]}
 *  - blobs: for each program, the library bytes then the params bytes, as uint8 CPU tensors
 *    (stored as separate records in the TorchScript archive).
 * Checksums are 64-bit FNV-1a in hex, verified on load so that a corrupted file is reported
 * instead of being dlopen-ed.
 */
#ifndef TVM_CONTRIB_TORCH_STATE_FORMAT_H_
#define TVM_CONTRIB_TORCH_STATE_FORMAT_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "compiled_program.h"

namespace tvm_torch {

/*! \brief Current state format version. */
constexpr int64_t kStateFormatVersion = 1;

/*! \brief The decoded content of a pickled module. */
struct ModuleState {
  std::string class_name;
  int64_t num_inputs = 0;
  int64_t num_outputs = 0;
  std::string device;
  bool bucket_padding = false;
  std::vector<ProgramBlobs> programs;
};

/*! \brief Pickled state: (format version, header JSON, blobs as uint8 CPU tensors). */
using SerializedState = std::tuple<int64_t, std::string, std::vector<at::Tensor>>;

/*! \brief Encode a module state. */
SerializedState EncodeState(const ModuleState& state);

/*! \brief Decode and verify a state; throws c10::Error naming what is wrong. */
ModuleState DecodeState(const SerializedState& encoded);

/*! \brief Copy bytes into a uint8 CPU tensor. */
at::Tensor BytesToTensor(const std::string& bytes);

/*! \brief Copy a uint8 CPU tensor's bytes into a string. */
std::string TensorToBytes(const at::Tensor& tensor, const char* what);

}  // namespace tvm_torch

#endif  // TVM_CONTRIB_TORCH_STATE_FORMAT_H_
