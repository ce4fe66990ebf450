//===- driver.cpp - the CUDA driver API loaded at run time ----------------===//
//
// Binds the driver's symbols with dlopen/dlsym (no link-time dependency on
// libcuda, so a binary without a GPU driver starts) and words its errors.
//
//===----------------------------------------------------------------------===//
#include "cuda/driver.h"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>

namespace l4c::cuda {

namespace {

using rt::Status;
using rt::StatusCode;

/// Binds `fn` to the first of `syms` the library exports; remembers the
/// first symbol that none of its spellings resolved.
template <typename F>
void bind(void *handle, std::initializer_list<const char *> syms, F &fn,
          std::string &missing) {
  fn = nullptr;
  for (const char *sym : syms)
    if ((fn = reinterpret_cast<F>(dlsym(handle, sym))))
      return;
  if (missing.empty())
    missing = *syms.begin();
}

/// Fills the table from an open library; returns the first missing symbol.
std::string bindAll(void *h, DriverApi &a) {
  std::string m;
  bind(h, {"cuInit"}, a.cuInit, m);
  bind(h, {"cuDriverGetVersion"}, a.cuDriverGetVersion, m);
  bind(h, {"cuDeviceGetCount"}, a.cuDeviceGetCount, m);
  bind(h, {"cuDeviceGet"}, a.cuDeviceGet, m);
  bind(h, {"cuDeviceGetAttribute"}, a.cuDeviceGetAttribute, m);
  bind(h, {"cuDeviceGetName"}, a.cuDeviceGetName, m);
  bind(h, {"cuDevicePrimaryCtxRetain"}, a.cuDevicePrimaryCtxRetain, m);
  bind(h, {"cuDevicePrimaryCtxRelease_v2"}, a.cuDevicePrimaryCtxRelease, m);
  bind(h, {"cuCtxSetCurrent"}, a.cuCtxSetCurrent, m);
  bind(h, {"cuCtxSynchronize"}, a.cuCtxSynchronize, m);
  bind(h, {"cuMemAlloc_v2"}, a.cuMemAlloc, m);
  bind(h, {"cuMemFree_v2"}, a.cuMemFree, m);
  bind(h, {"cuMemGetInfo_v2"}, a.cuMemGetInfo, m);
  bind(h, {"cuMemcpyHtoD_v2"}, a.cuMemcpyHtoD, m);
  bind(h, {"cuMemcpyDtoH_v2"}, a.cuMemcpyDtoH, m);
  bind(h, {"cuMemcpyHtoDAsync_v2"}, a.cuMemcpyHtoDAsync, m);
  bind(h, {"cuMemcpyDtoHAsync_v2"}, a.cuMemcpyDtoHAsync, m);
  bind(h, {"cuMemsetD8_v2"}, a.cuMemsetD8, m);
  bind(h, {"cuMemsetD8Async"}, a.cuMemsetD8Async, m);
  bind(h, {"cuModuleLoadData"}, a.cuModuleLoadData, m);
  bind(h, {"cuModuleLoadDataEx"}, a.cuModuleLoadDataEx, m);
  bind(h, {"cuModuleGetFunction"}, a.cuModuleGetFunction, m);
  bind(h, {"cuModuleUnload"}, a.cuModuleUnload, m);
  bind(h, {"cuFuncSetAttribute"}, a.cuFuncSetAttribute, m);
  bind(h, {"cuFuncGetAttribute"}, a.cuFuncGetAttribute, m);
  bind(h, {"cuLaunchKernel"}, a.cuLaunchKernel, m);
  bind(h, {"cuStreamCreate"}, a.cuStreamCreate, m);
  bind(h, {"cuStreamSynchronize"}, a.cuStreamSynchronize, m);
  bind(h, {"cuStreamDestroy_v2"}, a.cuStreamDestroy, m);
  bind(h, {"cuStreamBeginCapture_v2"}, a.cuStreamBeginCapture, m);
  bind(h, {"cuStreamEndCapture"}, a.cuStreamEndCapture, m);
  bind(h, {"cuGraphInstantiateWithFlags"}, a.cuGraphInstantiateWithFlags, m);
  bind(h, {"cuGraphLaunch"}, a.cuGraphLaunch, m);
  bind(h, {"cuGraphExecDestroy"}, a.cuGraphExecDestroy, m);
  bind(h, {"cuGraphDestroy"}, a.cuGraphDestroy, m);
  bind(h, {"cuGetErrorName"}, a.cuGetErrorName, m);
  bind(h, {"cuGetErrorString"}, a.cuGetErrorString, m);
  bind(h, {"cuEventCreate"}, a.cuEventCreate, m);
  bind(h, {"cuEventRecord"}, a.cuEventRecord, m);
  bind(h, {"cuEventSynchronize"}, a.cuEventSynchronize, m);
  // CUDA 12.8 added the _v2 (same signature); older drivers have only the
  // plain symbol.
  bind(h, {"cuEventElapsedTime_v2", "cuEventElapsedTime"}, a.cuEventElapsedTime,
       m);
  bind(h, {"cuEventDestroy_v2"}, a.cuEventDestroy, m);
  // Optional (CUDA 12.0+, sm_90 TMA): a driver without it still loads, and
  // the backend refuses only plans whose kernels take tensor maps.
  std::string optional;
  bind(h, {"cuTensorMapEncodeTiled"}, a.cuTensorMapEncodeTiled, optional);
  bind(h, {"cuLaunchKernelEx"}, a.cuLaunchKernelEx, optional);
  return m;
}

} // namespace

Status Driver::open(const std::string &library, std::unique_ptr<Driver> &out) {
  void *h = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char *why = dlerror();
    return Status::fail(StatusCode::Unsupported,
                        "cuda driver not found (" + library +
                            "): " + (why ? why : "not loadable"));
  }
  DriverApi api{};
  std::string missing = bindAll(h, api);
  if (!missing.empty()) {
    dlclose(h);
    return Status::fail(StatusCode::Unsupported,
                        "cuda driver unusable (" + library +
                            "): it has no symbol " + missing +
                            " (the backend needs a CUDA 12 or newer driver)");
  }
  // The handle stays open for the life of the process: modules, streams
  // and graphs made through it may outlive any one Driver object.
  out.reset(new Driver(api, library));
  return Status::success();
}

Status Driver::load(const Driver *&out) {
  static std::once_flag once;
  static std::unique_ptr<Driver> driver;
  static Status status;
  // L4C_CUDA_DRIVER names another library with the driver's symbols: one
  // outside the loader's path, or the test emulator (runtime/test/cuemu).
  std::call_once(once, [] {
    const char *lib = std::getenv("L4C_CUDA_DRIVER");
    status = open(lib && *lib ? lib : "libcuda.so.1", driver);
  });
  out = driver.get();
  return status;
}

Driver Driver::forTesting(const DriverApi &api, std::string label) {
  return Driver(api, std::move(label));
}

std::string Driver::describe(CUresult r) const {
  const char *name = nullptr, *text = nullptr;
  if (!api_.cuGetErrorName || api_.cuGetErrorName(r, &name) != CUDA_SUCCESS ||
      !name)
    return "CUresult " + std::to_string(r);
  std::string s = name;
  if (api_.cuGetErrorString &&
      api_.cuGetErrorString(r, &text) == CUDA_SUCCESS && text)
    s += std::string(" (") + text + ")";
  return s;
}

Status Driver::check(CUresult r, const char *call,
                     const std::string &context) const {
  if (r == CUDA_SUCCESS)
    return Status::success();
  StatusCode code = StatusCode::Internal;
  if (r == CUDA_ERROR_OUT_OF_MEMORY)
    code = StatusCode::OutOfMemory;
  else if (r == CUDA_ERROR_NO_DEVICE || r == CUDA_ERROR_NO_BINARY_FOR_GPU)
    code = StatusCode::Unsupported;
  return Status::fail(code, (context.empty() ? "" : context + ": ") + call +
                                " failed: " + describe(r));
}

} // namespace l4c::cuda
