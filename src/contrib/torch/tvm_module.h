/*!
 * \file tvm_module.h
 * \brief The TorchScript custom classes TvmGraphModule (one program per static input
 *        signature) and TvmVMModule (one program with symbolic dims).
 */
#ifndef TVM_CONTRIB_TORCH_TVM_MODULE_H_
#define TVM_CONTRIB_TORCH_TVM_MODULE_H_

#include <ATen/core/Dict.h>
#include <torch/custom_class.h>

#include <cstdint>
#include <memory>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "compiled_program.h"
#include "state_format.h"

namespace tvm_torch {

/*!
 * \brief The program that serves a call. Choosing it copies nothing: padding a smaller batch
 *        up to its bucket is left to Forward, so Accepts can ask the same question for free.
 */
struct Selection {
  /*! \brief Null when no loaded program takes the inputs. */
  std::shared_ptr<CompiledProgram> program;
  /*! \brief The caller's batch and the bucket's when the inputs must be padded, else -1. */
  int64_t batch = -1;
  int64_t bucket_batch = -1;
};

/*! \brief Shared behaviour of both custom classes. */
class TvmModule : public torch::CustomClassHolder {
 public:
  TvmModule(int64_t num_inputs, int64_t num_outputs, const std::string& device);

  /*! \brief Seed API: load one compiled program from its three exported files. */
  void LoadTvmModule(const std::vector<std::vector<int64_t>>& input_shapes,
                     const std::string& lib_path, const std::string& graph_path,
                     const std::string& params_path);

  /*! \brief Load one compiled program from in-memory bytes (uint8 CPU tensors for binaries). */
  void LoadTvmModuleFromBytes(const at::Tensor& lib, const std::string& graph,
                              const at::Tensor& params);

  /*! \brief Run the program that matches the inputs' shapes and dtypes. */
  std::vector<at::Tensor> Forward(const std::vector<at::Tensor>& inputs);

  /*!
   * \brief Whether forward would run these inputs: right count and device, and a compiled
   * program for their shapes and dtypes (what a partitioned graph checks before calling, to
   * fall back to TorchScript otherwise).
   */
  bool Accepts(const std::vector<at::Tensor>& inputs) const;

  /*! \brief Move to another device, reloading every program for it. */
  void To(const std::string& device);

  /*! \brief The device as "cpu" or "cuda:N". */
  std::string Device() const;

  /*! \brief Signatures of the loaded programs, e.g. "(float32[1, 3, 224, 224])". */
  std::vector<std::string> Signatures() const;

  int64_t NumInputs() const { return num_inputs_; }
  int64_t NumOutputs() const { return num_outputs_; }

  /*! \brief Self-contained, versioned state for def_pickle. */
  SerializedState Serialize() const;

  /*! \brief Load the programs of a decoded state written by Serialize(). */
  void Restore(ModuleState state);

  /*! \brief Opt-in: pad a smaller batch (dim 0) up to the nearest compiled bucket. */
  void SetBucketPadding(bool enabled);
  bool BucketPadding() const { return bucket_padding_; }

  /*! \brief Calls served per program signature (for logs and metrics). */
  c10::Dict<std::string, int64_t> CallCounts() const;

  /*! \brief Signature of the program that served this thread's last call ("" before any). */
  std::string LastSignature() const;

  /*! \brief Name of the registered class ("TvmGraphModule" or "TvmVMModule"). */
  virtual const char* ClassName() const = 0;

 protected:
  /*! \brief Accept or reject a newly loaded program (called under the write lock). */
  virtual void AddProgram(std::shared_ptr<CompiledProgram> program) = 0;
  /*!
   * \brief The program for these inputs (null program when none), called under the read lock
   *        on every forward and accepts call: it throws nothing and builds no strings.
   */
  virtual Selection TrySelect(const std::vector<at::Tensor>& inputs) const = 0;
  /*! \brief Why no program takes these inputs; made only when forward raises it. */
  virtual std::string NoMatchMessage(const std::vector<at::Tensor>& inputs) const = 0;
  /*! \brief All loaded programs, in load order. */
  virtual std::vector<std::shared_ptr<CompiledProgram>> Programs() const = 0;
  /*! \brief Drop every loaded program. */
  virtual void ClearPrograms() = 0;

  /*! \brief Prepare() a program and add it. */
  void Load(ProgramBlobs blobs, const std::vector<std::vector<int64_t>>* expected_shapes);
  /*!
   * \brief Load a program for this module's device and check it against the module (input and
   *        output counts, expected shapes when given) without adding it.
   */
  std::shared_ptr<CompiledProgram> Prepare(
      ProgramBlobs blobs, const std::vector<std::vector<int64_t>>* expected_shapes) const;
  std::string SignatureList() const;

  int64_t num_inputs_;
  int64_t num_outputs_;
  c10::Device device_;
  bool bucket_padding_ = false;
  /*! \brief Readers: forward. Writers: load, to(). */
  mutable std::shared_mutex mutex_;
  /*!
   * \brief Identifies the module in each thread's last-served map. Unlike `this`, an id is
   *        never reused, so a new module cannot see a dead one's entry.
   */
  const uint64_t id_;
};

/*! \brief Static shapes: one compiled program per input signature, in a signature-keyed map. */
class TvmGraphModule : public TvmModule {
 public:
  using TvmModule::TvmModule;
  const char* ClassName() const override { return "TvmGraphModule"; }

 protected:
  void AddProgram(std::shared_ptr<CompiledProgram> program) override;
  Selection TrySelect(const std::vector<at::Tensor>& inputs) const override;
  std::string NoMatchMessage(const std::vector<at::Tensor>& inputs) const override;
  std::vector<std::shared_ptr<CompiledProgram>> Programs() const override;
  void ClearPrograms() override;

 private:
  /*! \brief The smallest bucket whose batch (dim 0) holds the inputs (null when none). */
  Selection FindBucket(const std::vector<at::Tensor>& inputs) const;

  /*! \brief Loaded programs in load order; one per signature. */
  std::vector<std::shared_ptr<CompiledProgram>> programs_;
  /*!
   * \brief programs_ by a hash of their static signature: a call hashes its inputs' dtypes
   *        and sizes once (no allocation) and checks the few candidates.
   */
  std::unordered_multimap<uint64_t, std::shared_ptr<CompiledProgram>> by_shape_;
};

/*! \brief Dynamic shapes: one compiled program whose inputs have symbolic dims. */
class TvmVMModule : public TvmModule {
 public:
  using TvmModule::TvmModule;
  const char* ClassName() const override { return "TvmVMModule"; }

 protected:
  void AddProgram(std::shared_ptr<CompiledProgram> program) override;
  Selection TrySelect(const std::vector<at::Tensor>& inputs) const override;
  std::string NoMatchMessage(const std::vector<at::Tensor>& inputs) const override;
  std::vector<std::shared_ptr<CompiledProgram>> Programs() const override;
  void ClearPrograms() override;

 private:
  std::shared_ptr<CompiledProgram> program_;
};

}  // namespace tvm_torch

#endif  // TVM_CONTRIB_TORCH_TVM_MODULE_H_
