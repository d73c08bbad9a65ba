/*!
 * \file compiled_program.cc
 * \brief Loading a compiled Relax program from bytes and running it through the Relax VM.
 */
#include "compiled_program.h"

#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <dlfcn.h>
#include <link.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <optional>

#include "kernel_profile.h"
#include "load_checks.h"
#include "tensor_bridge.h"

// Exported by libtvm_runtime (declared in its src/runtime/threading_backend.h, which is not
// among the installed headers). The limit is per calling thread.
namespace tvm::runtime::threading {
__attribute__((visibility("default"))) int MaxConcurrency();
__attribute__((visibility("default"))) void SetMaxConcurrency(int value);
}  // namespace tvm::runtime::threading

namespace tvm_torch {
namespace {

/*!
 * \brief Give TVM's kernels on this thread the threads torch.set_num_threads allows, at most
 *        TVM's own default (one per physical core), unless TVM_NUM_THREADS says otherwise.
 *        Left alone, TVM takes one per physical core whatever torch is told (a serving
 *        process set to one thread per worker would run every TVM kernel on all cores), and
 *        counts the CPUs again at each parallel kernel (a syscall).
 */
void MatchTvmThreadsToTorch() {
  static const bool user_set = std::getenv("TVM_NUM_THREADS") != nullptr;
  if (user_set) return;
  thread_local const int tvm_default = tvm::runtime::threading::MaxConcurrency();
  thread_local int applied = 0;
  const int wanted = std::max(1, std::min(at::get_num_threads(), tvm_default));
  if (wanted != applied) {
    tvm::runtime::threading::SetMaxConcurrency(wanted);
    applied = wanted;
  }
}

/*! \brief Relax VM allocator kind: pooled (memory reused across calls). */
constexpr int kPooledAllocator = 2;

/*! \brief Convert a TVM FFI error raised inside `fn` into a c10::Error with context. */
template <typename Fn>
auto RethrowTvmErrors(const char* what, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const tvm::ffi::Error& err) {
    TORCH_CHECK(false, "tvm_class: ", what, " failed: ", err.kind(), ": ", err.message());
  }
}

/*! \brief Load libtvm_runtime_cuda.so (beside libtvm_runtime.so) once, for CUDA programs. */
void EnsureCudaBackend() {
  static std::once_flag once;
  static std::string failure;
  std::call_once(once, [] {
    if (tvm::ffi::Function::GetGlobal("device_api.cuda").has_value()) return;
    void* runtime = dlopen("libtvm_runtime.so", RTLD_LAZY | RTLD_NOLOAD);
    char origin[PATH_MAX] = {0};
    if (runtime == nullptr || dlinfo(runtime, RTLD_DI_ORIGIN, origin) != 0) {
      failure = "libtvm_runtime.so is not loaded";
      return;
    }
    std::string path = std::string(origin) + "/libtvm_runtime_cuda.so";
    if (dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
      const char* reason = dlerror();
      failure = "cannot load " + path + ": " + (reason ? reason : "unknown error");
    }
  });
  TORCH_CHECK(failure.empty(), "tvm_class: TVM's CUDA runtime is unavailable (", failure, ")");
}

/*! \brief A private temp file holding compiled code, removed when this goes out of scope. */
class TempCodeFile {
 public:
  explicit TempCodeFile(const std::string& bytes) {
    const char* dir = std::getenv("TMPDIR");
    dir_ = dir && *dir ? dir : "/tmp";
    path_ = dir_ + "/tvm_torch_code_XXXXXX.so";
    int fd = mkstemps(path_.data(), 3);  // unique, unpredictable name, mode 0600
    TORCH_CHECK(fd >= 0, "tvm_class: cannot create a temp file for compiled code in ", dir_,
                " ($TMPDIR): ", std::strerror(errno));
    size_t written = 0;
    while (written < bytes.size()) {
      ssize_t n = write(fd, bytes.data() + written, bytes.size() - written);
      if (n <= 0) {
        int err = errno;
        close(fd);
        unlink(path_.c_str());
        TORCH_CHECK(false, "tvm_class: cannot write compiled code to ", path_, ": ",
                    std::strerror(err));
      }
      written += static_cast<size_t>(n);
    }
    close(fd);
  }
  ~TempCodeFile() { unlink(path_.c_str()); }
  const std::string& path() const { return path_; }
  const std::string& dir() const { return dir_; }

  /*! \brief Whether the file system of the temp dir forbids mapping code (mounted noexec). */
  bool NoExec() const {
    struct statvfs fs;
    return statvfs(dir_.c_str(), &fs) == 0 && (fs.f_flag & ST_NOEXEC) != 0;
  }

 private:
  std::string dir_;
  std::string path_;
};

/*! \brief Make the caller's current torch CUDA stream TVM's stream for the device. */
class ScopedTvmStream {
 public:
  explicit ScopedTvmStream(const c10::Device& device) : device_(device) {
    if (!device.is_cuda()) return;
    const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    void* stream = impl->getStream(device).native_handle();
    TVMFFIEnvSetStream(kDLCUDA, device.index(), stream, &previous_);
    active_ = true;
  }
  ~ScopedTvmStream() {
    if (active_) TVMFFIEnvSetStream(kDLCUDA, device_.index(), previous_, nullptr);
  }

 private:
  c10::Device device_;
  TVMFFIStreamHandle previous_ = nullptr;
  bool active_ = false;
};

}  // namespace

std::string ReadFileBytes(const std::string& path, const char* what) {
  return ReadRegularFile(path, what);
}

const std::string& ProgramBlobs::LibDigest() {
  if (lib_sha256.empty()) lib_sha256 = Sha256Hex(lib);
  return lib_sha256;
}

static const ProgramManifest& CheckDeviceKind(const ProgramManifest& manifest,
                                              const c10::Device& device) {
  const char* kind = device.is_cuda() ? "cuda" : "cpu";
  TORCH_CHECK(manifest.device_type == kind, "tvm_class: the program was compiled for ",
              manifest.device_type, " and cannot run on ", device,
              "; compile it for that device (option 'device')");
  return manifest;
}

/*!
 * \brief Open the compiled library, after every check that can be made without running any of
 *        its code: the trust policy, the ELF image, the CPU features it was compiled for.
 */
static tvm::ffi::Module LoadExecutable(ProgramBlobs* blobs, const ProgramManifest& manifest,
                                       const c10::Device& device) {
  const std::string& lib = blobs->lib;
  TORCH_CHECK(!lib.empty(), "tvm_class: the compiled library is empty");
  CheckTrustedLibrary(blobs->LibDigest());
  CheckElfImage(lib);
  std::vector<std::string> missing = MissingCpuFeatures(manifest.cpu_features);
  if (!missing.empty()) {
    std::string names;
    for (const std::string& name : missing) names += (names.empty() ? "" : ", ") + name;
    TORCH_CHECK(false, "tvm_class: the program was compiled for a CPU with features this CPU "
                "lacks (", names, "); its code would stop with an illegal instruction. "
                "Compile it on this machine, or for an older CPU (option 'target', e.g. "
                "{\"kind\": \"llvm\", \"mcpu\": \"x86-64-v3\"})");
  }
  if (device.is_cuda()) EnsureCudaBackend();
  TempCodeFile file(lib);
  try {
    return tvm::ffi::Module::LoadFromFile(file.path());
  } catch (const tvm::ffi::Error& err) {
    TORCH_CHECK(!file.NoExec(), "tvm_class: cannot load the compiled library: the temp "
                "directory ", file.dir(), " ($TMPDIR) is on a file system mounted noexec, where "
                "shared libraries cannot be mapped; set TMPDIR to a directory that allows it (",
                err.kind(), ": ", err.message(), ")");
    TORCH_CHECK(false, "tvm_class: loading the compiled library failed: ", err.kind(), ": ",
                err.message());
  }
}

CompiledProgram::CompiledProgram(ProgramBlobs blobs, c10::Device device)
    : blobs_(std::move(blobs)),
      manifest_(CheckDeviceKind(ProgramManifest::Parse(blobs_.graph), device)),
      device_(device),
      executable_(LoadExecutable(&blobs_, manifest_, device_)) {
  LoadParams();
  // Fail at load time, not at the first call, if the VM cannot start or lacks the params'
  // transform (which itself runs at the first call: see PrepareParams).
  std::unique_ptr<VMInstance> vm = NewVM();
  TORCH_CHECK(manifest_.transform_params.empty() ||
                  vm->vm->GetFunction(manifest_.transform_params).has_value(),
              "tvm_class: the compiled library has no function '", manifest_.transform_params,
              "'");
  ReleaseVM(std::move(vm));
}

CompiledProgram::~CompiledProgram() = default;

std::unique_ptr<CompiledProgram::VMInstance> CompiledProgram::NewVM() const {
  return RethrowTvmErrors("starting the Relax VM", [&] {
    auto load = executable_->GetFunction("vm_load_executable");
    TORCH_CHECK(load.has_value(), "tvm_class: the library holds no Relax VM executable");
    auto vm = (*load)().cast<tvm::ffi::Module>();
    DLDevice dev = ToDLDevice(device_);
    auto init = vm->GetFunction("vm_initialization").value();
    if (dev.device_type == kDLCPU) {
      init(static_cast<int>(kDLCPU), 0, kPooledAllocator);
    } else {
      init(static_cast<int>(dev.device_type), dev.device_id, kPooledAllocator,
           static_cast<int>(kDLCPU), 0, kPooledAllocator);
    }
    auto entry = vm->GetFunction(manifest_.entry);
    TORCH_CHECK(entry.has_value(), "tvm_class: the compiled library has no function '",
                manifest_.entry, "'");
    return std::make_unique<VMInstance>(VMInstance{vm, *entry});
  });
}

std::unique_ptr<CompiledProgram::VMInstance> CompiledProgram::AcquireVM() {
  {
    std::lock_guard<std::mutex> lock(pool_mutex_);
    if (!idle_vms_.empty()) {
      auto vm = std::move(idle_vms_.back());
      idle_vms_.pop_back();
      return vm;
    }
  }
  return NewVM();
}

void CompiledProgram::ReleaseVM(std::unique_ptr<VMInstance> vm) {
  std::lock_guard<std::mutex> lock(pool_mutex_);
  idle_vms_.push_back(std::move(vm));
}

void CompiledProgram::LoadParams() {
  if (manifest_.param_names.empty()) {
    params_ready_.store(true, std::memory_order_release);
    return;
  }
  auto loaded = RethrowTvmErrors("loading params", [&] {
    auto load = tvm::ffi::Function::GetGlobalRequired("runtime.LoadParams");
    return load(tvm::ffi::Bytes(blobs_.params)).cast<tvm::ffi::Map<tvm::ffi::String, tvm::ffi::Tensor>>();
  });
  std::vector<tvm::ffi::Tensor> raw;
  for (const std::string& name : manifest_.param_names) {
    auto it = loaded.find(tvm::ffi::String(name));
    TORCH_CHECK(it != loaded.end(), "tvm_class: the params blob has no param '", name,
                "' that the graph manifest lists");
    at::Tensor host = ToTorchTensor((*it).second);
    raw.push_back(ToTvmTensor(device_.is_cpu() ? host : host.to(device_)));
  }
  if (manifest_.transform_params.empty()) {
    params_.assign(raw.begin(), raw.end());
    params_ready_.store(true, std::memory_order_release);
    return;
  }
  raw_params_ = std::move(raw);
}

void CompiledProgram::PrepareParams() {
  if (params_ready_.load(std::memory_order_acquire)) return;
  std::lock_guard<std::mutex> lock(prepare_mutex_);
  if (params_ready_.load(std::memory_order_relaxed)) return;
  // Prepare params once (weight prepacking, layout changes) with the program's own function,
  // which takes the params as one tuple and returns the entry function's trailing arguments.
  // This runs at the first call, not at load: prepacking runs oneDNN's thread pool, and a
  // process that loads a model and then forks (gunicorn --preload, multiprocessing) must not
  // have started it, or the child hangs in it.
  const std::vector<tvm::ffi::Tensor>& raw = raw_params_;
  auto vm = NewVM();
  c10::OptionalDeviceGuard guard(device_.is_cuda() ? std::make_optional(device_) : std::nullopt);
  ScopedTvmStream stream(device_);
  tvm::ffi::Any result = RethrowTvmErrors("preparing params", [&] {
    auto fn = vm->vm->GetFunction(manifest_.transform_params);
    TORCH_CHECK(fn.has_value(), "tvm_class: the compiled library has no function '",
                manifest_.transform_params, "'");
    return (*fn)(tvm::ffi::Array<tvm::ffi::Tensor>(raw.begin(), raw.end()));
  });
  auto prepared = result.as<tvm::ffi::Array<tvm::ffi::Any>>();
  TORCH_CHECK(prepared.has_value(), "tvm_class: '", manifest_.transform_params,
              "' returned a ", result.GetTypeKey(), ", expected a tuple");
  params_.assign(prepared->begin(), prepared->end());
  raw_params_.clear();  // the prepared params replace them
  params_ready_.store(true, std::memory_order_release);
}

std::vector<at::Tensor> CompiledProgram::Run(const std::vector<at::Tensor>& inputs) {
  PrepareParams();
  std::vector<tvm::ffi::Tensor> tvm_inputs;
  tvm_inputs.reserve(inputs.size());
  for (const at::Tensor& t : inputs) tvm_inputs.push_back(ToTvmTensor(t));
  std::vector<tvm::ffi::AnyView> args;
  args.reserve(tvm_inputs.size() + params_.size());
  for (const auto& t : tvm_inputs) args.emplace_back(t);
  for (const auto& p : params_) args.emplace_back(p);

  c10::OptionalDeviceGuard guard(device_.is_cuda() ? std::make_optional(device_) : std::nullopt);
  ScopedTvmStream stream(device_);
  MatchTvmThreadsToTorch();
  std::unique_ptr<VMInstance> vm = AcquireVM();
  tvm::ffi::Any result;
  {
    std::optional<KernelProfileScope> profile;
    if (KernelProfile::Active()) profile.emplace(vm->vm, manifest_.SignatureString(), device_);
    try {
      vm->entry.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    } catch (const tvm::ffi::Error& err) {
      profile.reset();
      ReleaseVM(std::move(vm));
      TORCH_CHECK(false, "tvm_class: running the compiled program failed: ", err.kind(), ": ",
                  err.message());
    }
    if (profile) profile->AddProgramCall();
  }
  ReleaseVM(std::move(vm));
  std::vector<at::Tensor> outputs;
  outputs.reserve(static_cast<size_t>(manifest_.num_outputs));
  FlattenOutputs(result, &outputs);
  return outputs;
}

}  // namespace tvm_torch
