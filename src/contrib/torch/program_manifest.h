/*!
 * \file program_manifest.h
 * \brief The "graph" of a compiled program: the JSON manifest written by
 *        tvm.contrib.torch at export time (inputs, outputs, params, entry function).
 */
#ifndef TVM_CONTRIB_TORCH_PROGRAM_MANIFEST_H_
#define TVM_CONTRIB_TORCH_PROGRAM_MANIFEST_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace tvm_torch {

/*! \brief Manifest format version this library reads and writes. */
constexpr int64_t kManifestFormatVersion = 1;

/*! \brief One input of a compiled program. A dim of -1 is symbolic (named in dim_names). */
struct InputSpec {
  std::string name;
  std::string dtype;
  std::vector<int64_t> dims;
  std::vector<std::string> dim_names;
  /*! \brief Inclusive [min, max] per dim; static dims have min == max. */
  std::vector<std::pair<int64_t, int64_t>> ranges;
};

/*! \brief Parsed manifest of one compiled program. */
struct ProgramManifest {
  std::string entry = "main";
  std::vector<InputSpec> inputs;
  int64_t num_outputs = 0;
  std::vector<std::string> param_names;
  /*! \brief Name of the function that prepares params once, at the first call (empty when none). */
  std::string transform_params;
  bool dynamic = false;
  /*! \brief The device kind the code was built for: "cpu" or "cuda". */
  std::string device_type = "cpu";
  /*!
   * \brief LLVM features of the CPU the host code was compiled for (optional; checked against
   *        this CPU before the library is opened).
   */
  std::vector<std::string> cpu_features;

  /*! \brief Parse the manifest JSON text; throws c10::Error naming the problem. */
  static ProgramManifest Parse(const std::string& json_text);

  /*! \brief "float32[1, 3, 224, 224], int64[batch, 8]" description of the input signature. */
  std::string SignatureString() const;

  /*! \brief Whether inputs match this signature; allocates nothing (the per-call check). */
  bool Matches(const std::vector<at::Tensor>& inputs) const;

  /*!
   * \brief Check inputs against this signature.
   * \return An empty string if they match, otherwise why not.
   */
  std::string Mismatch(const std::vector<at::Tensor>& inputs) const;
};

}  // namespace tvm_torch

#endif  // TVM_CONTRIB_TORCH_PROGRAM_MANIFEST_H_
