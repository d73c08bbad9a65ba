/*!
 * \file state_format.h
 * \brief The versioned, self-contained pickle state of a TVM module.
 *
 * Version 2 (written) is a tuple (2, header, blobs):
 *  - header: JSON text {"class", "num_inputs", "num_outputs", "device", "bucket_padding",
 *    "programs": [{"graph": manifest JSON text, "lib_size", "lib_sha256", "params_size",
 *    "params_sha256"}], "state_sha256"}
 *  - blobs: for each program, the library bytes then the params bytes, as uint8 CPU tensors
 *    (stored as separate records in the TorchScript archive).
 * "state_sha256" is one SHA-256 over everything the module is made of (StateDigest): the
 * header's fields, each manifest and each blob, so that no part (a manifest's param order
 * included) can change unnoticed. The per-blob digests say which blob is damaged. All are
 * verified on load, before any library is opened.
 *
 * Version 1 (still read) had the same layout with 64-bit FNV-1a "lib_checksum" and
 * "params_checksum" per blob and no digest over the manifests.
 */
#ifndef TVM_CONTRIB_TORCH_STATE_FORMAT_H_
#define TVM_CONTRIB_TORCH_STATE_FORMAT_H_

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "compiled_program.h"

namespace tvm_torch {

/*! \brief State format version written by this library. */
constexpr int64_t kStateFormatVersion = 2;
/*! \brief Oldest state format version this library still reads. */
constexpr int64_t kOldestStateFormatVersion = 1;

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

/*!
 * \brief The state as pickled, checked to be a (version, header, blobs) tuple; anything else
 *        (None, a number, a tuple of another length) is refused with a clear message.
 */
SerializedState StateFromIValue(const c10::IValue& value);

/*! \brief Copy bytes into a uint8 CPU tensor. */
at::Tensor BytesToTensor(const std::string& bytes);

/*! \brief Copy a uint8 CPU tensor's bytes into a string. */
std::string TensorToBytes(const at::Tensor& tensor, const char* what);

}  // namespace tvm_torch

#endif  // TVM_CONTRIB_TORCH_STATE_FORMAT_H_
