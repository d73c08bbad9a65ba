/*!
 * \file compiled_program.h
 * \brief One TVM-compiled Relax program loaded for one device: its code, its params,
 *        and a pool of Relax VM instances so that concurrent callers never share one.
 */
#ifndef TVM_CONTRIB_TORCH_COMPILED_PROGRAM_H_
#define TVM_CONTRIB_TORCH_COMPILED_PROGRAM_H_

#include <ATen/ATen.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "program_manifest.h"

namespace tvm_torch {

/*! \brief The three artifacts of an export: compiled code, graph manifest, params. */
struct ProgramBlobs {
  /*! \brief Bytes of the shared library written by Executable.export_library. */
  std::string lib;
  /*! \brief The graph manifest (JSON text). */
  std::string graph;
  /*! \brief Params in TVM's param-dict format (runtime.SaveParams). */
  std::string params;
  /*! \brief SHA-256 of `lib` once computed (hex; empty until then). */
  std::string lib_sha256;

  /*! \brief SHA-256 of `lib`, computed once. */
  const std::string& LibDigest();
};

/*!
 * \brief Read a whole regular file into memory (never a device or FIFO); throws c10::Error
 *        naming the file on failure.
 */
std::string ReadFileBytes(const std::string& path, const char* what);

/*! \brief A compiled program ready to run on one device. Thread-safe. */
class CompiledProgram {
 public:
  /*! \brief Load code and params for a device. Throws c10::Error with the reason on failure. */
  CompiledProgram(ProgramBlobs blobs, c10::Device device);
  ~CompiledProgram();

  CompiledProgram(const CompiledProgram&) = delete;
  CompiledProgram& operator=(const CompiledProgram&) = delete;

  /*! \brief Run the entry function; inputs must already match the manifest's signature. */
  std::vector<at::Tensor> Run(const std::vector<at::Tensor>& inputs);

  const ProgramManifest& manifest() const { return manifest_; }
  /*! \brief Number of calls this program served. */
  int64_t calls() const { return calls_.load(std::memory_order_relaxed); }
  /*! \brief Count one served call. */
  void CountCall() { calls_.fetch_add(1, std::memory_order_relaxed); }
  const ProgramBlobs& blobs() const { return blobs_; }

 private:
  /*! \brief One Relax VM with its cached entry function; used by one caller at a time. */
  struct VMInstance {
    tvm::ffi::Module vm;
    tvm::ffi::Function entry;
  };

  std::unique_ptr<VMInstance> NewVM() const;
  std::unique_ptr<VMInstance> AcquireVM();
  void ReleaseVM(std::unique_ptr<VMInstance> vm);
  void LoadParams();
  /*! \brief Run the program's param transform once, at the first call (thread-safe). */
  void PrepareParams();

  ProgramBlobs blobs_;
  ProgramManifest manifest_;
  c10::Device device_;
  tvm::ffi::Module executable_;
  /*!
   * \brief Trailing arguments of the entry function: the params, or what the program's
   *        transform function made of them once, at the first call (e.g. prepacked weights).
   */
  std::vector<tvm::ffi::Any> params_;
  /*! \brief The loaded params until PrepareParams has transformed them. */
  std::vector<tvm::ffi::Tensor> raw_params_;
  std::atomic<bool> params_ready_{false};
  std::mutex prepare_mutex_;
  std::atomic<int64_t> calls_{0};
  std::mutex pool_mutex_;
  std::vector<std::unique_ptr<VMInstance>> idle_vms_;
};

}  // namespace tvm_torch

#endif  // TVM_CONTRIB_TORCH_COMPILED_PROGRAM_H_
