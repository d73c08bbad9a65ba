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
#include <tvm/ffi/function.h>

#include <cstdint>
#include <string>

namespace tvm_torch {

/*! \brief The process-wide kernel profile. */
class KernelProfile {
 public:
  /*! \brief Whether profiling is on (checked on every program call). */
  static bool Active();

  /*!
   * \brief A Relax VM instrument that adds the time of each call to the profile.
   * \param program The program's signature, which keys its rows.
   * \param device The device the program runs on (synchronised around each CUDA call, so
   *        that a call's time is its own).
   */
  static tvm::ffi::Function Instrument(const std::string& program, const c10::Device& device);

  /*! \brief Add one whole program call (kernels plus VM overhead) to the profile. */
  static void AddProgramCall(const std::string& program, int64_t nanoseconds);
};

}  // namespace tvm_torch

#endif  // TVM_CONTRIB_TORCH_KERNEL_PROFILE_H_
