/*!
 * \file kernel_profile.h
 * \brief Opt-in, process-wide timing of every call a compiled program makes (its TVM kernels,
 *        vendor kernels and VM builtins), read by tvm.contrib.torch.profiler.
 *
 * Off by default: the hot path pays one relaxed atomic load. When on, each program call runs
 * with a Relax VM instrument that times the calls it makes; the totals are kept per
 * (program signature, callee symbol).
 */
#ifndef TVM_CONTRIB_TORCH_KERNEL_PROFILE_H_
#define TVM_CONTRIB_TORCH_KERNEL_PROFILE_H_

#include <c10/core/Device.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <string>

namespace tvm_torch {

/*! \brief The process-wide kernel profile. */
class KernelProfile {
 public:
  /*! \brief Whether profiling is on (checked on every program call). */
  static bool Active();
};

/*!
 * \brief Profiles one program call while alive: sets a Relax VM instrument that adds the time
 *        of each call the program makes to the profile, and clears it when destroyed (also
 *        when the program throws).
 */
class KernelProfileScope {
 public:
  /*!
   * \param vm The VM the program call runs on.
   * \param program The program's signature, which keys its rows.
   * \param device The device the program runs on (synchronised around each CUDA call, so
   *        that a call's time is its own).
   */
  KernelProfileScope(tvm::ffi::Module vm, std::string program, const c10::Device& device);
  ~KernelProfileScope();
  KernelProfileScope(const KernelProfileScope&) = delete;
  KernelProfileScope& operator=(const KernelProfileScope&) = delete;

  /*! \brief Add the whole program call (kernels plus VM overhead) to the profile. */
  void AddProgramCall();

 private:
  tvm::ffi::Function set_instrument_;
  std::string program_;
  int64_t start_ns_;
};

}  // namespace tvm_torch

#endif  // TVM_CONTRIB_TORCH_KERNEL_PROFILE_H_
