//===- driver.h - the CUDA driver API loaded at run time ------*- C++ -*-===//
//
// The slice of the CUDA driver API the CUDA backend calls, declared with its
// C ABI (no CUDA headers) and reached through a symbol table: the real one is
// filled from libcuda.so.1 with dlopen, tests fill one with fakes.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_RUNTIME_CUDA_DRIVER_H
#define L4C_RUNTIME_CUDA_DRIVER_H

#include "plan.h"

#include <memory>
#include <string>

namespace l4c::cuda {

// The driver's C types, as cuda.h declares them on 64-bit Linux: enums are
// int sized, handles are pointers to opaque structs.
using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUcontext = struct CUctx_st *;
using CUmodule = struct CUmod_st *;
using CUfunction = struct CUfunc_st *;
using CUstream = struct CUstream_st *;
using CUevent = struct CUevent_st *;
using CUgraph = struct CUgraph_st *;
using CUgraphExec = struct CUgraphExec_st *;
using CUjit_option = int;

// The enum values the backend passes or tests for (cuda.h, CUDA 12 and 13).
constexpr CUresult CUDA_SUCCESS = 0;
constexpr CUresult CUDA_ERROR_INVALID_VALUE = 1;
constexpr CUresult CUDA_ERROR_OUT_OF_MEMORY = 2;
constexpr CUresult CUDA_ERROR_NO_DEVICE = 100;
constexpr CUresult CUDA_ERROR_INVALID_IMAGE = 200;
constexpr CUresult CUDA_ERROR_NO_BINARY_FOR_GPU = 209;
constexpr CUresult CUDA_ERROR_NOT_FOUND = 500;
constexpr CUresult CUDA_ERROR_ILLEGAL_ADDRESS = 700;
constexpr CUresult CUDA_ERROR_LAUNCH_FAILED = 719;

constexpr int CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 1;
constexpr int CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16;
constexpr int CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75;
constexpr int CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76;
constexpr int CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97;
constexpr int CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 0;
constexpr int CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES = 1; // static shared memory
constexpr int CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES = 3;  // per thread
constexpr int CU_FUNC_ATTRIBUTE_NUM_REGS = 4;
constexpr int CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8;
constexpr unsigned CU_STREAM_NON_BLOCKING = 1;
constexpr int CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1;
constexpr unsigned CU_EVENT_DEFAULT = 0;
constexpr CUjit_option CU_JIT_ERROR_LOG_BUFFER = 5;
constexpr CUjit_option CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES = 6;

// TMA tensor maps (cuTensorMapEncodeTiled): the enum values of cuda.h's
// CUtensorMapDataType, CUtensorMapInterleave, CUtensorMapSwizzle,
// CUtensorMapL2promotion and CUtensorMapFloatOOBfill the backend passes.
constexpr int CU_TENSOR_MAP_DATA_TYPE_FLOAT32 = 7;
constexpr int CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 = 9;
constexpr int CU_TENSOR_MAP_INTERLEAVE_NONE = 0;
constexpr int CU_TENSOR_MAP_SWIZZLE_NONE = 0; // 1: 32B, 2: 64B, 3: 128B
constexpr int CU_TENSOR_MAP_L2_PROMOTION_L2_256B = 3;
constexpr int CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE = 0; // zeros outside

/// CUtensorMap: 128 opaque bytes, 64-byte aligned, passed to a kernel by
/// value (a `const __grid_constant__` parameter).
struct alignas(64) CUtensorMap {
  unsigned long long opaque[16];
};
static_assert(sizeof(CUtensorMap) == 128, "CUtensorMap is 128 bytes");

// cuLaunchKernelEx's launch configuration (cuda.h's CUlaunchConfig and
// CUlaunchAttribute, CUDA 12 and 13): an attribute is its id, padding to 8
// bytes, and a 64-byte value union, of which the backend sets one int.
constexpr int CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6;
struct alignas(8) CUlaunchAttribute {
  int id;
  char pad[4];
  union {
    char bytes[64];
    int programmaticStreamSerializationAllowed;
  } value;
};
static_assert(sizeof(CUlaunchAttribute) == 72, "CUlaunchAttribute is 72 bytes");
struct CUlaunchConfig {
  unsigned gridDimX, gridDimY, gridDimZ;
  unsigned blockDimX, blockDimY, blockDimZ;
  unsigned sharedMemBytes;
  CUstream hStream;
  CUlaunchAttribute *attrs;
  unsigned numAttrs;
};
static_assert(sizeof(CUlaunchConfig) == 56, "CUlaunchConfig is 56 bytes");

/// The driver entry points, under the names of the symbols they bind (the
/// versioned ones where cuda.h maps the plain name onto a _v2).
struct DriverApi {
  CUresult (*cuInit)(unsigned flags);
  CUresult (*cuDriverGetVersion)(int *version);
  CUresult (*cuDeviceGetCount)(int *count);
  CUresult (*cuDeviceGet)(CUdevice *dev, int ordinal);
  CUresult (*cuDeviceGetAttribute)(int *value, int attrib, CUdevice dev);
  CUresult (*cuDeviceGetName)(char *name, int len, CUdevice dev);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *ctx, CUdevice dev);
  CUresult (*cuDevicePrimaryCtxRelease)(CUdevice dev); // _v2
  CUresult (*cuCtxSetCurrent)(CUcontext ctx);
  CUresult (*cuCtxSynchronize)();
  CUresult (*cuMemAlloc)(CUdeviceptr *ptr, size_t bytes);    // _v2
  CUresult (*cuMemFree)(CUdeviceptr ptr);                    // _v2
  CUresult (*cuMemGetInfo)(size_t *free, size_t *total);     // _v2
  CUresult (*cuMemcpyHtoD)(CUdeviceptr dst, const void *src, // _v2
                           size_t bytes);
  CUresult (*cuMemcpyDtoH)(void *dst, CUdeviceptr src, size_t bytes); // _v2
  CUresult (*cuMemcpyHtoDAsync)(CUdeviceptr dst, const void *src,     // _v2
                                size_t bytes, CUstream stream);
  CUresult (*cuMemcpyDtoHAsync)(void *dst, CUdeviceptr src, // _v2
                                size_t bytes, CUstream stream);
  CUresult (*cuMemsetD8)(CUdeviceptr dst, unsigned char value, // _v2
                         size_t bytes);
  CUresult (*cuMemsetD8Async)(CUdeviceptr dst, unsigned char value,
                              size_t bytes, CUstream stream);
  CUresult (*cuModuleLoadData)(CUmodule *mod, const void *image);
  CUresult (*cuModuleLoadDataEx)(CUmodule *mod, const void *image,
                                 unsigned numOptions, CUjit_option *options,
                                 void **values);
  CUresult (*cuModuleGetFunction)(CUfunction *fn, CUmodule mod,
                                  const char *name);
  CUresult (*cuModuleUnload)(CUmodule mod);
  CUresult (*cuFuncSetAttribute)(CUfunction fn, int attrib, int value);
  CUresult (*cuFuncGetAttribute)(int *value, int attrib, CUfunction fn);
  CUresult (*cuLaunchKernel)(CUfunction fn, unsigned gridX, unsigned gridY,
                             unsigned gridZ, unsigned blockX, unsigned blockY,
                             unsigned blockZ, unsigned sharedBytes,
                             CUstream stream, void **params, void **extra);
  CUresult (*cuStreamCreate)(CUstream *stream, unsigned flags);
  CUresult (*cuStreamSynchronize)(CUstream stream);
  CUresult (*cuStreamDestroy)(CUstream stream);                // _v2
  CUresult (*cuStreamBeginCapture)(CUstream stream, int mode); // _v2
  CUresult (*cuStreamEndCapture)(CUstream stream, CUgraph *graph);
  CUresult (*cuGraphInstantiateWithFlags)(CUgraphExec *exec, CUgraph graph,
                                          unsigned long long flags);
  CUresult (*cuGraphLaunch)(CUgraphExec exec, CUstream stream);
  CUresult (*cuGraphExecDestroy)(CUgraphExec exec);
  CUresult (*cuGraphDestroy)(CUgraph graph);
  CUresult (*cuGetErrorName)(CUresult error, const char **name);
  CUresult (*cuGetErrorString)(CUresult error, const char **text);
  CUresult (*cuEventCreate)(CUevent *event, unsigned flags);
  CUresult (*cuEventRecord)(CUevent event, CUstream stream);
  CUresult (*cuEventSynchronize)(CUevent event);
  CUresult (*cuEventElapsedTime)(float *ms, CUevent start, // _v2 or plain
                                 CUevent end);
  CUresult (*cuEventDestroy)(CUevent event); // _v2
  // Optional: null where the driver lacks it; the backend then launches
  // every kernel with cuLaunchKernel (no programmatic dependent launch).
  CUresult (*cuLaunchKernelEx)(const CUlaunchConfig *config, CUfunction fn,
                               void **params, void **extra);
  // Optional: null where the driver lacks it (older drivers, emulators);
  // only a plan whose kernels take tensor maps needs it.
  CUresult (*cuTensorMapEncodeTiled)(
      CUtensorMap *map, int dataType, unsigned rank, void *address,
      const unsigned long long *dims, const unsigned long long *strides,
      const unsigned *box, const unsigned *elementStrides, int interleave,
      int swizzle, int l2Promotion, int oobFill);
};

/// A filled symbol table and how to word its errors. The real driver is
/// loaded once per process and never unloaded; a fake one lives as long as
/// the test that made it. Drivers are immutable, so threads may share one.
class Driver {
public:
  /// The system's driver (libcuda.so.1), loaded on the first call; later
  /// calls give the same answer. Fails with "cuda driver not found
  /// (libcuda.so.1): <why>" where there is none, which is the CPU-only
  /// machine's normal state: call this only when CUDA is asked for.
  static rt::Status load(const Driver *&out);
  /// Loads the driver from `library` (a soname or a path), uncached: for
  /// tests and for drivers outside the loader's search path.
  static rt::Status open(const std::string &library,
                         std::unique_ptr<Driver> &out);
  /// A driver over a table of fakes.
  static Driver forTesting(const DriverApi &api,
                           std::string label = "fake cuda driver");

  const DriverApi &api() const { return api_; }
  const DriverApi *operator->() const { return &api_; }
  /// Where the table came from: the library loaded, or the fake's label.
  const std::string &label() const { return label_; }

  /// "CUDA_ERROR_INVALID_VALUE (invalid argument)"; falls back to the
  /// number when the driver cannot name it.
  std::string describe(CUresult r) const;
  /// Success, or "<context>: <call> failed: <describe(r)>" with a status
  /// code that follows the error (out of memory, no device, ...).
  rt::Status check(CUresult r, const char *call,
                   const std::string &context = std::string()) const;

private:
  Driver(const DriverApi &api, std::string label)
      : api_(api), label_(std::move(label)) {}
  DriverApi api_;
  std::string label_;
};

} // namespace l4c::cuda

#endif // L4C_RUNTIME_CUDA_DRIVER_H
