/*!
 * \file kernel_profile.cc
 * \brief The kernel profile behind tvm_torch.profile_start / tvm_torch.profile_stop.
 */
#include "kernel_profile.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

namespace tvm_torch {
namespace {

namespace ffi = tvm::ffi;

/*! \brief Callee name under which the time of whole program calls is recorded. */
constexpr const char* kProgramTotal = "";

struct Totals {
  int64_t calls = 0;
  int64_t nanoseconds = 0;
};

std::atomic<bool> g_active{false};
std::mutex g_mutex;
std::map<std::pair<std::string, std::string>, Totals> g_totals;

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void Add(const std::string& program, const std::string& callee, int64_t ns) {
  std::lock_guard<std::mutex> lock(g_mutex);
  Totals& t = g_totals[{program, callee}];
  t.calls += 1;
  t.nanoseconds += ns;
}

void Synchronize(const c10::Device& device) {
  if (device.is_cuda()) {
    c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->synchronizeDevice(device.index());
  }
}

/*! \brief Clear the profile and start recording. */
void ProfileStart() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_totals.clear();
  g_active.store(true, std::memory_order_relaxed);
}

/*!
 * \brief Stop recording and return the rows: [program, callee, calls, nanoseconds], callee ""
 *        being the program's whole calls.
 */
ffi::Array<ffi::Array<ffi::Any>> ProfileStop() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_active.store(false, std::memory_order_relaxed);
  ffi::Array<ffi::Array<ffi::Any>> rows;
  for (const auto& [key, totals] : g_totals) {
    rows.push_back(ffi::Array<ffi::Any>{ffi::String(key.first), ffi::String(key.second),
                                        totals.calls, totals.nanoseconds});
  }
  g_totals.clear();
  return rows;
}

}  // namespace

bool KernelProfile::Active() { return g_active.load(std::memory_order_relaxed); }

namespace {

/*! \brief A Relax VM instrument that adds the time of each call to the profile. */
ffi::Function Instrument(const std::string& program, const c10::Device& device) {
  // A VM runs its calls one after another on the calling thread, so one start time suffices.
  auto start = std::make_shared<int64_t>(0);
  return ffi::Function::FromPacked([program, device, start](ffi::PackedArgs args,
                                                            ffi::Any* ret) {
    // Arguments: (callee, callee symbol, before_run, return value, callee args...).
    const bool before = args[2].cast<bool>();
    if (before) {
      Synchronize(device);
      *start = NowNs();
    } else {
      Synchronize(device);
      Add(program, args[1].cast<ffi::String>(), NowNs() - *start);
    }
    *ret = 0;  // VMInstrumentReturnKind::kNoOp: run the call as usual
  });
}

}  // namespace

KernelProfileScope::KernelProfileScope(ffi::Module vm, std::string program,
                                       const c10::Device& device)
    : set_instrument_(vm->GetFunction("set_instrument").value()),
      program_(std::move(program)) {
  set_instrument_(Instrument(program_, device));
  start_ns_ = NowNs();
}

KernelProfileScope::~KernelProfileScope() { set_instrument_(ffi::Function(nullptr)); }

void KernelProfileScope::AddProgramCall() { Add(program_, kProgramTotal, NowNs() - start_ns_); }

}  // namespace tvm_torch

TVM_FFI_STATIC_INIT_BLOCK() {
  tvm::ffi::reflection::GlobalDef()
      .def("tvm_torch.profile_start", tvm_torch::ProfileStart)
      .def("tvm_torch.profile_stop", tvm_torch::ProfileStop);
}
