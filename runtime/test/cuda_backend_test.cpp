//===- cuda_backend_test.cpp - CUDA backend against a fake driver ---------===//
//
// The CUDA backend's bookkeeping without a GPU: a fake driver records
// allocations, copies, module loads, launches and graphs, and can fail any
// call. The load-time NVRTC path and its disk cache use the real NVRTC where
// it is installed (it builds sm_90a cubins without a GPU) and skip otherwise.
// A TMA kernel runs end to end through the emulator (runtime/test/cuemu).
//
//===----------------------------------------------------------------------===//
#include "cpu/kernels.h"
#include "cuda/cuda_backend.h"
#include "cuda/driver.h"
#include "cuda/kernel_cache.h"
#include "cuda/nvrtc.h"
#include "io/safetensors.h"
#include "l4c/runtime/l4rt.h"
#include "plan.h"
#include "test_plans.h"

#include <gtest/gtest.h>

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>

#include <sys/wait.h>
#include <unistd.h>

// These tests bring their own (fake) drivers and plans with cubins; the
// emulator's settings, if the environment carries them, do not apply.
[[maybe_unused]] static const bool kEmulatorSettingsCleared = [] {
  ::unsetenv("L4C_CUDA_IMAGE");
  ::unsetenv("L4C_CUDA_DRIVER");
  return true;
}();

using namespace l4c;
using namespace l4c::test;
using cuda::CudaBackend;
using cuda::CudaOptions;
using cuda::CUdeviceptr;
using cuda::CUresult;
using cuda::Driver;
using cuda::DriverApi;
using cuda::L4Regions;
using cuda::MemoryNeed;
namespace fs = std::filesystem;

namespace {

//===----------------------------------------------------------------------===//
// The fake driver
//===----------------------------------------------------------------------===//

/// The fake's CUtensorMap contents: what cuTensorMapEncodeTiled was given.
struct FakeTensorMap {
  int dtype = -1;
  unsigned rank = 0;
  CUdeviceptr address = 0;
  std::vector<unsigned long long> dims, strides;
  std::vector<unsigned> box, elementStrides;
  int interleave = -1, swizzle = -1, l2 = -1, oob = -1;
  bool operator==(const FakeTensorMap &o) const {
    return dtype == o.dtype && rank == o.rank && address == o.address &&
           dims == o.dims && strides == o.strides && box == o.box &&
           elementStrides == o.elementStrides && interleave == o.interleave &&
           swizzle == o.swizzle && l2 == o.l2 && oob == o.oob;
  }
};

struct FakeLaunch {
  std::string entry;
  unsigned grid = 0, threads = 0, shared = 0;
  cuda::CUstream stream = nullptr;
  L4Regions regions;
  long long B = 0, T = 0;
  bool fromGraph = false;
  /// Launched by cuLaunchKernelEx with programmatic stream serialization.
  bool programmatic = false;
  /// The tensor maps after B and T (as many as FakeCuda::mapParams says
  /// the entry takes), decoded from the 128 bytes passed.
  std::vector<FakeTensorMap> maps;
};

struct FakeModule {
  std::vector<uint8_t> image;
  bool unloaded = false;
};
struct FakeFunction {
  FakeModule *module = nullptr;
  std::string entry;
  int maxDynamicShared = 48 << 10;
};
struct FakeStream {
  bool capturing = false, destroyed = false;
  std::vector<FakeLaunch> captured;
};
struct FakeGraph {
  std::vector<FakeLaunch> launches;
  bool destroyed = false;
};
struct FakeEvent {
  bool recorded = false;
};

/// Size of a 64-bit ELF image from its header: the later of the section
/// and program header tables ends it (as in the cubins NVRTC writes).
size_t elfSize(const uint8_t *p) {
  auto u64 = [&](size_t at) {
    uint64_t v;
    std::memcpy(&v, p + at, 8);
    return v;
  };
  auto u16 = [&](size_t at) {
    uint16_t v;
    std::memcpy(&v, p + at, 2);
    return uint64_t(v);
  };
  return size_t(std::max(u64(0x28) + u16(0x3a) * u16(0x3c),
                         u64(0x20) + u16(0x36) * u16(0x38)));
}

/// A fake "cubin": this magic, then the entries it defines, NUL-terminated.
constexpr char kFakeMagic[] = "FAKECUBIN";

std::vector<uint8_t> fakeCubin(const std::vector<std::string> &entries) {
  std::string s = kFakeMagic;
  for (const std::string &e : entries)
    s += " " + e;
  return std::vector<uint8_t>(s.begin(), s.end() + 1);
}

class FakeCuda {
public:
  // The device.
  int deviceCount = 1, major = 9, minor = 0, sms = 132, maxThreads = 1024,
      optinShared = 227 << 10;
  std::string name = "Fake H100";
  size_t totalMemory = size_t(80) << 30; ///< cuMemGetInfo's total
  /// What cuFuncGetAttribute reports for an entry (default: 32 registers,
  /// 1024 threads, no local or static shared memory).
  struct Code {
    int maxThreads = 1024, registers = 32, localBytes = 0, staticShared = 0;
  };
  std::map<std::string, Code> code;

  // What happened.
  std::vector<std::string> calls;
  std::map<std::string, int> counts;
  std::map<CUdeviceptr, std::vector<uint8_t>> mem; ///< live allocations
  std::vector<size_t> allocSizes;
  std::vector<std::unique_ptr<FakeModule>> modules;
  std::vector<std::unique_ptr<FakeFunction>> functions;
  std::vector<std::unique_ptr<FakeStream>> streams;
  std::vector<std::unique_ptr<FakeGraph>> graphs, execs;
  std::vector<std::unique_ptr<FakeEvent>> events;
  std::vector<FakeLaunch> launches; ///< executed, directly or by a graph
  std::vector<std::pair<std::string, int>> sharedOptIns;
  int contexts = 0; ///< retained primary contexts

  /// Encoded tensor maps, in order; a CUtensorMap holds its index + 1.
  std::vector<FakeTensorMap> encoded;
  /// Tensor map parameters an entry takes after B and T (the real driver
  /// knows from the kernel's signature); none if absent.
  std::map<std::string, size_t> mapParams;

  /// Kernels to emulate on launch (not on capture), by entry.
  std::map<std::string, std::function<void(FakeCuda &, const FakeLaunch &)>>
      emulate;

  /// Fails the (failSkip + 1)-th call named failCall with failWith.
  std::string failCall;
  int failSkip = 0;
  CUresult failWith = cuda::CUDA_ERROR_INVALID_VALUE;

  CUresult enter(const char *call) {
    calls.push_back(call);
    ++counts[call];
    if (failCall == call && failSkip-- == 0)
      return failWith;
    return cuda::CUDA_SUCCESS;
  }

  /// Host bytes behind [p, p + n) of one allocation, or null.
  uint8_t *at(CUdeviceptr p, size_t n) {
    auto it = mem.upper_bound(p);
    if (it == mem.begin())
      return nullptr;
    --it;
    if (p - it->first + n > it->second.size())
      return nullptr;
    return it->second.data() + (p - it->first);
  }
  template <typename T> T *as(CUdeviceptr p, size_t count = 1) {
    return reinterpret_cast<T *>(at(p, count * sizeof(T)));
  }

  void execute(FakeLaunch l) {
    launches.push_back(l);
    if (auto it = emulate.find(l.entry); it != emulate.end())
      it->second(*this, l);
  }

  static DriverApi table();

private:
  CUdeviceptr next_ = 0x7f0000000000ull;
  friend struct FakeCalls;
};

FakeCuda *gFake = nullptr;

const char *errorName(CUresult r) {
  switch (r) {
  case 0:
    return "CUDA_SUCCESS";
  case 1:
    return "CUDA_ERROR_INVALID_VALUE";
  case 2:
    return "CUDA_ERROR_OUT_OF_MEMORY";
  case 100:
    return "CUDA_ERROR_NO_DEVICE";
  case 200:
    return "CUDA_ERROR_INVALID_IMAGE";
  case 500:
    return "CUDA_ERROR_NOT_FOUND";
  case 700:
    return "CUDA_ERROR_ILLEGAL_ADDRESS";
  }
  return nullptr;
}
const char *errorText(CUresult r) {
  switch (r) {
  case 0:
    return "no error";
  case 1:
    return "invalid argument";
  case 2:
    return "out of memory";
  case 100:
    return "no CUDA-capable device is detected";
  case 200:
    return "device kernel image is invalid";
  case 500:
    return "named symbol not found";
  case 700:
    return "an illegal memory access was encountered";
  }
  return nullptr;
}

/// The fake entry points; each records itself, may be told to fail, and
/// checks its arguments as strictly as the driver would.
struct FakeCalls {
  static FakeCuda &f() { return *gFake; }
  template <typename T> static T handle(void *p) {
    return reinterpret_cast<T>(p);
  }

  static CUresult memAlloc(CUdeviceptr *p, size_t n) {
    if (CUresult r = f().enter("cuMemAlloc"))
      return r;
    if (n == 0)
      return cuda::CUDA_ERROR_INVALID_VALUE;
    *p = f().next_;
    f().next_ += (n + 4095) / 4096 * 4096 + 4096;
    // Garbage, so that the backend's zeroing shows.
    f().mem[*p].assign(n, 0xcd);
    f().allocSizes.push_back(n);
    return 0;
  }
  static CUresult memGetInfo(size_t *free, size_t *total) {
    if (CUresult r = f().enter("cuMemGetInfo"))
      return r;
    size_t used = 0;
    for (const auto &m : f().mem)
      used += m.second.size();
    *total = f().totalMemory;
    *free = *total - std::min(*total, used);
    return 0;
  }
  static CUresult getAttribute(int *v, int attrib, cuda::CUfunction fn) {
    if (CUresult r = f().enter("cuFuncGetAttribute"))
      return r;
    auto *func = reinterpret_cast<FakeFunction *>(fn);
    FakeCuda::Code c;
    if (auto it = f().code.find(func->entry); it != f().code.end())
      c = it->second;
    switch (attrib) {
    case cuda::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = c.maxThreads; break;
    case cuda::CU_FUNC_ATTRIBUTE_NUM_REGS: *v = c.registers; break;
    case cuda::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES: *v = c.localBytes; break;
    case cuda::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: *v = c.staticShared; break;
    default: return cuda::CUDA_ERROR_INVALID_VALUE;
    }
    return 0;
  }
  static CUresult memFree(CUdeviceptr p) {
    if (CUresult r = f().enter("cuMemFree"))
      return r;
    return f().mem.erase(p) ? 0 : cuda::CUDA_ERROR_INVALID_VALUE;
  }
  static CUresult copyIn(const char *call, CUdeviceptr dst, const void *src,
                         size_t n) {
    if (CUresult r = f().enter(call))
      return r;
    uint8_t *d = f().at(dst, n);
    if (!d)
      return cuda::CUDA_ERROR_INVALID_VALUE;
    std::memcpy(d, src, n);
    return 0;
  }
  static CUresult copyOut(const char *call, void *dst, CUdeviceptr src,
                          size_t n) {
    if (CUresult r = f().enter(call))
      return r;
    uint8_t *s = f().at(src, n);
    if (!s)
      return cuda::CUDA_ERROR_INVALID_VALUE;
    std::memcpy(dst, s, n);
    return 0;
  }
  static CUresult memset(const char *call, CUdeviceptr dst, unsigned char v,
                         size_t n) {
    if (CUresult r = f().enter(call))
      return r;
    uint8_t *d = f().at(dst, n);
    if (!d)
      return cuda::CUDA_ERROR_INVALID_VALUE;
    std::memset(d, v, n);
    return 0;
  }
  static CUresult loadModule(cuda::CUmodule *m, const void *image,
                             unsigned numOptions, cuda::CUjit_option *keys,
                             void **values) {
    if (CUresult r = f().enter("cuModuleLoadDataEx"))
      return r;
    const uint8_t *p = static_cast<const uint8_t *>(image);
    auto mod = std::make_unique<FakeModule>();
    if (std::memcmp(p, kFakeMagic, sizeof(kFakeMagic) - 1) == 0) {
      const char *s = static_cast<const char *>(image);
      mod->image.assign(p, p + std::strlen(s) + 1);
    } else if (std::memcmp(p,
                           "\x7f"
                           "ELF",
                           4) == 0) {
      mod->image.assign(p, p + elfSize(p));
    } else {
      // As the driver does, say why in the caller's error log.
      for (unsigned i = 0; i < numOptions; ++i)
        if (keys[i] == cuda::CU_JIT_ERROR_LOG_BUFFER)
          std::strcpy(static_cast<char *>(values[i]), "fake: not a cubin");
      return cuda::CUDA_ERROR_INVALID_IMAGE;
    }
    *m = handle<cuda::CUmodule>(mod.get());
    f().modules.push_back(std::move(mod));
    return 0;
  }
  static CUresult getFunction(cuda::CUfunction *fn, cuda::CUmodule m,
                              const char *entry) {
    if (CUresult r = f().enter("cuModuleGetFunction"))
      return r;
    auto *mod = reinterpret_cast<FakeModule *>(m);
    // Fake cubins list their entries between spaces; ELF cubins hold each
    // symbol NUL-terminated in a string table.
    const std::vector<uint8_t> &im = mod->image;
    bool fake = std::memcmp(im.data(), kFakeMagic, sizeof(kFakeMagic) - 1) == 0;
    std::string needle =
        fake ? " " + std::string(entry) : std::string(1, '\0') + entry + '\0';
    std::string hay(im.begin(), im.end());
    if (fake)
      hay.back() = ' ';
    if (fake)
      needle += ' ';
    if (hay.find(needle) == std::string::npos)
      return cuda::CUDA_ERROR_NOT_FOUND;
    auto func = std::make_unique<FakeFunction>();
    func->module = mod;
    func->entry = entry;
    *fn = handle<cuda::CUfunction>(func.get());
    f().functions.push_back(std::move(func));
    return 0;
  }
  static CUresult launch(cuda::CUfunction fn, unsigned gx, unsigned gy,
                         unsigned gz, unsigned bx, unsigned by, unsigned bz,
                         unsigned shared, cuda::CUstream s, void **params,
                         void **extra) {
    if (CUresult r = f().enter("cuLaunchKernel"))
      return r;
    return launchCommon(fn, gx, gy, gz, bx, by, bz, shared, s, params, extra,
                        false);
  }
  static CUresult launchEx(const cuda::CUlaunchConfig *c, cuda::CUfunction fn,
                           void **params, void **extra) {
    if (CUresult r = f().enter("cuLaunchKernelEx"))
      return r;
    if (!c || (c->numAttrs && !c->attrs))
      return cuda::CUDA_ERROR_INVALID_VALUE;
    bool programmatic = false;
    for (unsigned i = 0; i < c->numAttrs; ++i) {
      const cuda::CUlaunchAttribute &a = c->attrs[i];
      if (a.id != cuda::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION ||
          reinterpret_cast<uintptr_t>(&a) % 8)
        return cuda::CUDA_ERROR_INVALID_VALUE;
      programmatic |= a.value.programmaticStreamSerializationAllowed != 0;
    }
    return launchCommon(fn, c->gridDimX, c->gridDimY, c->gridDimZ,
                        c->blockDimX, c->blockDimY, c->blockDimZ,
                        c->sharedMemBytes, c->hStream, params, extra,
                        programmatic);
  }
  static CUresult launchCommon(cuda::CUfunction fn, unsigned gx, unsigned gy,
                               unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned shared, cuda::CUstream s,
                               void **params, void **extra, bool programmatic) {
    auto *func = reinterpret_cast<FakeFunction *>(fn);
    auto *stream = reinterpret_cast<FakeStream *>(s);
    if (!func || !stream || extra || !params || gx < 1 || gy != 1 || gz != 1 ||
        bx < 1 || bx > unsigned(f().maxThreads) || by != 1 || bz != 1 ||
        int(shared) > func->maxDynamicShared)
      return cuda::CUDA_ERROR_INVALID_VALUE;
    FakeLaunch l;
    l.entry = func->entry;
    l.grid = gx;
    l.threads = bx;
    l.shared = shared;
    l.stream = s;
    l.programmatic = programmatic;
    std::memcpy(&l.regions, params[0], sizeof(L4Regions));
    std::memcpy(&l.B, params[1], sizeof(long long));
    std::memcpy(&l.T, params[2], sizeof(long long));
    auto maps = f().mapParams.find(func->entry);
    for (size_t i = 0; maps != f().mapParams.end() && i < maps->second; ++i) {
      // Copied now, as the driver copies kernel parameters at launch.
      if (reinterpret_cast<uintptr_t>(params[3 + i]) % 64)
        return cuda::CUDA_ERROR_INVALID_VALUE;
      cuda::CUtensorMap m;
      std::memcpy(&m, params[3 + i], sizeof(m));
      if (m.opaque[0] < 1 || m.opaque[0] > f().encoded.size() ||
          m.opaque[1] != 0x746d6170) // "tmap"
        return cuda::CUDA_ERROR_INVALID_VALUE;
      l.maps.push_back(f().encoded[m.opaque[0] - 1]);
    }
    if (stream->capturing)
      stream->captured.push_back(l);
    else
      f().execute(l);
    return 0;
  }
  static CUresult encodeMap(cuda::CUtensorMap *map, int dtype, unsigned rank,
                            void *address, const unsigned long long *dims,
                            const unsigned long long *strides,
                            const unsigned *box, const unsigned *elementStrides,
                            int interleave, int swizzle, int l2, int oob) {
    if (CUresult r = f().enter("cuTensorMapEncodeTiled"))
      return r;
    if (reinterpret_cast<uintptr_t>(map) % 64 || rank < 1 || rank > 5 ||
        reinterpret_cast<uintptr_t>(address) % 16)
      return cuda::CUDA_ERROR_INVALID_VALUE;
    FakeTensorMap m;
    m.dtype = dtype;
    m.rank = rank;
    m.address = reinterpret_cast<uintptr_t>(address);
    m.dims.assign(dims, dims + rank);
    m.strides.assign(strides, strides + rank - 1);
    m.box.assign(box, box + rank);
    m.elementStrides.assign(elementStrides, elementStrides + rank);
    m.interleave = interleave;
    m.swizzle = swizzle;
    m.l2 = l2;
    m.oob = oob;
    f().encoded.push_back(m);
    std::memset(map, 0xee, sizeof(*map));
    map->opaque[0] = f().encoded.size();
    map->opaque[1] = 0x746d6170;
    return 0;
  }
  static CUresult setAttribute(cuda::CUfunction fn, int attrib, int value) {
    if (CUresult r = f().enter("cuFuncSetAttribute"))
      return r;
    auto *func = reinterpret_cast<FakeFunction *>(fn);
    if (attrib != cuda::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES ||
        value > f().optinShared)
      return cuda::CUDA_ERROR_INVALID_VALUE;
    func->maxDynamicShared = value;
    f().sharedOptIns.push_back({func->entry, value});
    return 0;
  }
  static CUresult beginCapture(cuda::CUstream s, int mode) {
    if (CUresult r = f().enter("cuStreamBeginCapture"))
      return r;
    auto *stream = reinterpret_cast<FakeStream *>(s);
    if (stream->capturing || mode != cuda::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
      return cuda::CUDA_ERROR_INVALID_VALUE;
    stream->capturing = true;
    stream->captured.clear();
    return 0;
  }
  static CUresult endCapture(cuda::CUstream s, cuda::CUgraph *g) {
    if (CUresult r = f().enter("cuStreamEndCapture"))
      return r;
    auto *stream = reinterpret_cast<FakeStream *>(s);
    if (!stream->capturing)
      return cuda::CUDA_ERROR_INVALID_VALUE;
    stream->capturing = false;
    auto graph = std::make_unique<FakeGraph>();
    graph->launches = std::move(stream->captured);
    *g = handle<cuda::CUgraph>(graph.get());
    f().graphs.push_back(std::move(graph));
    return 0;
  }
  static CUresult instantiate(cuda::CUgraphExec *e, cuda::CUgraph g,
                              unsigned long long) {
    if (CUresult r = f().enter("cuGraphInstantiateWithFlags"))
      return r;
    auto exec = std::make_unique<FakeGraph>();
    exec->launches = reinterpret_cast<FakeGraph *>(g)->launches;
    *e = handle<cuda::CUgraphExec>(exec.get());
    f().execs.push_back(std::move(exec));
    return 0;
  }
  static CUresult graphLaunch(cuda::CUgraphExec e, cuda::CUstream s) {
    if (CUresult r = f().enter("cuGraphLaunch"))
      return r;
    auto *exec = reinterpret_cast<FakeGraph *>(e);
    if (exec->destroyed || reinterpret_cast<FakeStream *>(s)->capturing)
      return cuda::CUDA_ERROR_INVALID_VALUE;
    for (FakeLaunch l : exec->launches) {
      l.fromGraph = true;
      l.stream = s;
      f().execute(l);
    }
    return 0;
  }
};

DriverApi FakeCuda::table() {
  using C = FakeCalls;
  DriverApi a{};
  a.cuInit = [](unsigned) { return C::f().enter("cuInit"); };
  a.cuDriverGetVersion = [](int *v) {
    *v = 13000;
    return C::f().enter("cuDriverGetVersion");
  };
  a.cuDeviceGetCount = [](int *n) {
    *n = C::f().deviceCount;
    return C::f().enter("cuDeviceGetCount");
  };
  a.cuDeviceGet = [](cuda::CUdevice *d, int ordinal) {
    *d = ordinal;
    return C::f().enter("cuDeviceGet");
  };
  a.cuDeviceGetAttribute = [](int *v, int attrib, cuda::CUdevice) {
    FakeCuda &f = C::f();
    switch (attrib) {
    case cuda::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR:
      *v = f.major;
      break;
    case cuda::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR:
      *v = f.minor;
      break;
    case cuda::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT:
      *v = f.sms;
      break;
    case cuda::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK:
      *v = f.maxThreads;
      break;
    case cuda::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN:
      *v = f.optinShared;
      break;
    default:
      return cuda::CUDA_ERROR_INVALID_VALUE;
    }
    return f.enter("cuDeviceGetAttribute");
  };
  a.cuDeviceGetName = [](char *name, int len, cuda::CUdevice) {
    std::snprintf(name, size_t(len), "%s", C::f().name.c_str());
    return C::f().enter("cuDeviceGetName");
  };
  a.cuDevicePrimaryCtxRetain = [](cuda::CUcontext *c, cuda::CUdevice) {
    static int context;
    if (CUresult r = C::f().enter("cuDevicePrimaryCtxRetain"))
      return r;
    *c = reinterpret_cast<cuda::CUcontext>(&context);
    ++C::f().contexts;
    return 0;
  };
  a.cuDevicePrimaryCtxRelease = [](cuda::CUdevice) {
    --C::f().contexts;
    return C::f().enter("cuDevicePrimaryCtxRelease");
  };
  a.cuCtxSetCurrent = [](cuda::CUcontext) {
    return C::f().enter("cuCtxSetCurrent");
  };
  a.cuCtxSynchronize = [] { return C::f().enter("cuCtxSynchronize"); };
  a.cuMemAlloc = C::memAlloc;
  a.cuMemFree = C::memFree;
  a.cuMemGetInfo = C::memGetInfo;
  a.cuMemcpyHtoD = [](CUdeviceptr d, const void *s, size_t n) {
    return C::copyIn("cuMemcpyHtoD", d, s, n);
  };
  a.cuMemcpyDtoH = [](void *d, CUdeviceptr s, size_t n) {
    return C::copyOut("cuMemcpyDtoH", d, s, n);
  };
  a.cuMemcpyHtoDAsync = [](CUdeviceptr d, const void *s, size_t n,
                           cuda::CUstream) {
    return C::copyIn("cuMemcpyHtoDAsync", d, s, n);
  };
  a.cuMemcpyDtoHAsync = [](void *d, CUdeviceptr s, size_t n, cuda::CUstream) {
    return C::copyOut("cuMemcpyDtoHAsync", d, s, n);
  };
  a.cuMemsetD8 = [](CUdeviceptr d, unsigned char v, size_t n) {
    return C::memset("cuMemsetD8", d, v, n);
  };
  a.cuMemsetD8Async = [](CUdeviceptr d, unsigned char v, size_t n,
                         cuda::CUstream) {
    return C::memset("cuMemsetD8Async", d, v, n);
  };
  a.cuModuleLoadData = [](cuda::CUmodule *m, const void *image) {
    return C::loadModule(m, image, 0, nullptr, nullptr);
  };
  a.cuModuleLoadDataEx = C::loadModule;
  a.cuModuleGetFunction = C::getFunction;
  a.cuModuleUnload = [](cuda::CUmodule m) {
    reinterpret_cast<FakeModule *>(m)->unloaded = true;
    return C::f().enter("cuModuleUnload");
  };
  a.cuFuncSetAttribute = C::setAttribute;
  a.cuFuncGetAttribute = C::getAttribute;
  a.cuLaunchKernel = C::launch;
  a.cuLaunchKernelEx = C::launchEx;
  a.cuStreamCreate = [](cuda::CUstream *s, unsigned flags) {
    if (CUresult r = C::f().enter("cuStreamCreate"))
      return r;
    if (flags != cuda::CU_STREAM_NON_BLOCKING)
      return cuda::CUDA_ERROR_INVALID_VALUE;
    C::f().streams.push_back(std::make_unique<FakeStream>());
    *s = reinterpret_cast<cuda::CUstream>(C::f().streams.back().get());
    return 0;
  };
  a.cuStreamSynchronize = [](cuda::CUstream s) {
    if (reinterpret_cast<FakeStream *>(s)->capturing)
      return cuda::CUDA_ERROR_INVALID_VALUE;
    return C::f().enter("cuStreamSynchronize");
  };
  a.cuStreamDestroy = [](cuda::CUstream s) {
    reinterpret_cast<FakeStream *>(s)->destroyed = true;
    return C::f().enter("cuStreamDestroy");
  };
  a.cuStreamBeginCapture = C::beginCapture;
  a.cuStreamEndCapture = C::endCapture;
  a.cuGraphInstantiateWithFlags = C::instantiate;
  a.cuGraphLaunch = C::graphLaunch;
  a.cuGraphExecDestroy = [](cuda::CUgraphExec e) {
    reinterpret_cast<FakeGraph *>(e)->destroyed = true;
    return C::f().enter("cuGraphExecDestroy");
  };
  a.cuGraphDestroy = [](cuda::CUgraph g) {
    reinterpret_cast<FakeGraph *>(g)->destroyed = true;
    return C::f().enter("cuGraphDestroy");
  };
  a.cuGetErrorName = [](CUresult r, const char **s) {
    *s = errorName(r);
    return *s ? 0 : cuda::CUDA_ERROR_INVALID_VALUE;
  };
  a.cuGetErrorString = [](CUresult r, const char **s) {
    *s = errorText(r);
    return *s ? 0 : cuda::CUDA_ERROR_INVALID_VALUE;
  };
  a.cuEventCreate = [](cuda::CUevent *e, unsigned) {
    C::f().events.push_back(std::make_unique<FakeEvent>());
    *e = reinterpret_cast<cuda::CUevent>(C::f().events.back().get());
    return C::f().enter("cuEventCreate");
  };
  a.cuEventRecord = [](cuda::CUevent e, cuda::CUstream) {
    reinterpret_cast<FakeEvent *>(e)->recorded = true;
    return C::f().enter("cuEventRecord");
  };
  a.cuEventSynchronize = [](cuda::CUevent) {
    return C::f().enter("cuEventSynchronize");
  };
  a.cuEventElapsedTime = [](float *ms, cuda::CUevent s, cuda::CUevent e) {
    if (!reinterpret_cast<FakeEvent *>(s)->recorded ||
        !reinterpret_cast<FakeEvent *>(e)->recorded)
      return cuda::CUDA_ERROR_INVALID_VALUE;
    *ms = 1.5f;
    return C::f().enter("cuEventElapsedTime");
  };
  a.cuEventDestroy = [](cuda::CUevent) {
    return C::f().enter("cuEventDestroy");
  };
  a.cuTensorMapEncodeTiled = C::encodeMap;
  return a;
}

//===----------------------------------------------------------------------===//
// Plans with CUDA code
//===----------------------------------------------------------------------===//

struct CudaCode {
  std::string source;
  std::vector<uint8_t> cubin;
  std::string entry;
  unsigned threads = 128, blocks = 4, shared = 0;
  bool gridWait = false; ///< Kernel.grid_wait
};

struct CudaPlan {
  PlanSpec spec;
  std::vector<CudaCode> code; ///< one per kernel; missing ones have none
  std::string arch = "sm_90a";
  /// Store equal sources and cubins once, as the plan writer does.
  bool share = true;

  std::vector<uint8_t> serialize() const;
};

std::vector<uint8_t> CudaPlan::serialize() const {
  const PlanSpec &p = spec;
  flatbuffers::FlatBufferBuilder fbb(1024);
  std::map<std::string, flatbuffers::Offset<flatbuffers::String>> strings;
  std::map<std::vector<uint8_t>,
           flatbuffers::Offset<flatbuffers::Vector<uint8_t>>>
      blobs;
  auto str = [&](const std::string &s) {
    if (!share || s.empty())
      return fbb.CreateString(s);
    auto it = strings.find(s);
    if (it == strings.end())
      it = strings.emplace(s, fbb.CreateString(s)).first;
    return it->second;
  };
  auto blob = [&](const std::vector<uint8_t> &b) {
    if (!share || b.empty())
      return fbb.CreateVector(b);
    auto it = blobs.find(b);
    if (it == blobs.end())
      it = blobs.emplace(b, fbb.CreateVector(b)).first;
    return it->second;
  };

  std::vector<flatbuffers::Offset<pl::Buffer>> bufs;
  for (const BufferSpec &b : p.buffers)
    bufs.push_back(pl::CreateBuffer(
        fbb, fbb.CreateString(b.name), b.region, b.offset, b.size, b.dtype,
        fbb.CreateVector(b.shape), fbb.CreateVector(b.dims)));
  std::vector<flatbuffers::Offset<pl::WeightBinding>> ws;
  for (auto &[b, n] : p.weights)
    ws.push_back(pl::CreateWeightBinding(fbb, b, fbb.CreateString(n)));
  std::vector<flatbuffers::Offset<pl::Kernel>> ks;
  for (size_t k = 0; k < p.kernels.size(); ++k) {
    const KernelSpec &ker = p.kernels[k];
    std::vector<flatbuffers::Offset<pl::SemanticOp>> ops;
    for (const OpSpec &o : ker.ops) {
      std::vector<flatbuffers::Offset<pl::Attr>> attrs;
      for (const AttrSpec &a : o.attrs)
        attrs.push_back(pl::CreateAttr(
            fbb, fbb.CreateString(a.name), a.kind, a.i, a.f,
            a.kind == pl::AttrKind::String ? fbb.CreateString(a.s) : 0));
      ops.push_back(pl::CreateSemanticOp(
          fbb, fbb.CreateString(o.op), fbb.CreateVector(attrs),
          fbb.CreateVector(o.operands), fbb.CreateVector(o.results)));
    }
    CudaCode c = k < code.size() ? code[k] : CudaCode{};
    ks.push_back(pl::CreateKernel(
        fbb, fbb.CreateString(ker.name), fbb.CreateString(ker.kind),
        fbb.CreateVector(ops), str(c.source), blob(c.cubin),
        fbb.CreateString(c.entry), c.threads, c.blocks, c.shared,
        ker.temps.empty() ? 0 : fbb.CreateVector(ker.temps),
        fbb.CreateString(ker.tileConfig), fbb.CreateString(ker.signature),
        ker.alternativeOf, createTensorMaps(fbb, ker), c.gridWait));
  }
  std::vector<flatbuffers::Offset<pl::Program>> ps;
  for (const ProgramSpec &pr : p.programs) {
    auto io = [&](const std::vector<IoSpec> &v) {
      std::vector<flatbuffers::Offset<pl::IoBinding>> out;
      for (const IoSpec &b : v)
        out.push_back(
            pl::CreateIoBinding(fbb, fbb.CreateString(b.name), b.buffer));
      return fbb.CreateVector(out);
    };
    auto in = io(pr.inputs), out = io(pr.outputs);
    ps.push_back(pl::CreateProgram(fbb, fbb.CreateString(pr.name), in, out,
                                   fbb.CreateVector(pr.steps)));
  }
  auto model = pl::CreateModelInfo(fbb, fbb.CreateString(p.source), p.vocab, 2,
                                   0, fbb.CreateString("{}"));
  auto root = pl::CreatePlan(
      fbb, p.version, model, fbb.CreateString(p.programKind),
      fbb.CreateString("cuda:" + arch), fbb.CreateString(p.precision),
      p.maxBatch, p.maxSeq, p.regionSize[0], p.regionSize[1], p.regionSize[2],
      p.regionSize[3], fbb.CreateVector(bufs), fbb.CreateVector(ws),
      fbb.CreateVector(ks), fbb.CreateVector(ps),
      pl::CreateMesh(fbb, p.meshRanks), fbb.CreateString(arch),
      fbb.CreateString("13.0"), fbb.CreateString("--gpu-architecture=" + arch));
  pl::FinishPlanBuffer(fbb, root);
  return std::vector<uint8_t>(fbb.GetBufferPointer(),
                              fbb.GetBufferPointer() + fbb.GetSize());
}

std::shared_ptr<const rt::Plan> parse(std::vector<uint8_t> bytes) {
  std::shared_ptr<const rt::Plan> plan;
  rt::Status s = rt::Plan::fromBytes(std::move(bytes), "test.l4plan", plan);
  EXPECT_TRUE(s.ok()) << s.message;
  return plan;
}

/// An entry name per kernel, as the compiler derives them.
std::string entryOf(const PlanSpec &p, size_t k) {
  std::string e = "l4k_" + std::to_string(k) + "_";
  for (char c : p.kernels[k].name)
    e += std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
  return e;
}

/// Every kernel of `spec` in one fake cubin for sm_90a (as the plan writer
/// shares one code object among kernels of a body).
CudaPlan withFakeCubin(PlanSpec spec) {
  CudaPlan cp;
  cp.spec = std::move(spec);
  std::vector<std::string> entries;
  for (size_t k = 0; k < cp.spec.kernels.size(); ++k)
    entries.push_back(entryOf(cp.spec, k));
  std::vector<uint8_t> cubin = fakeCubin(entries);
  for (size_t k = 0; k < cp.spec.kernels.size(); ++k) {
    CudaCode c;
    c.cubin = cubin;
    c.entry = entries[k];
    c.threads = 128 + 32 * unsigned(k % 8);
    c.blocks = 2 + unsigned(k);
    cp.code.push_back(c);
  }
  return cp;
}

class TempDir {
public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "l4c-cuda-XXXXXX").string();
    if (::mkdtemp(tmpl.data()))
      path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty())
      fs::remove_all(path_, ec);
  }
  const std::string &path() const { return path_; }

private:
  std::string path_;
};

std::vector<fs::path> filesUnder(const std::string &dir) {
  std::vector<fs::path> out;
  std::error_code ec;
  if (fs::exists(dir, ec))
    for (const auto &e : fs::recursive_directory_iterator(dir))
      if (e.is_regular_file())
        out.push_back(e.path());
  return out;
}

/// Installs a fresh fake for the test's duration.
class CudaBackendTest : public ::testing::Test {
protected:
  CudaBackendTest() : driver(Driver::forTesting(FakeCuda::table())) {
    gFake = &fake;
  }
  ~CudaBackendTest() override {
    backend.reset();
    gFake = nullptr;
  }

  rt::Status create(std::shared_ptr<const rt::Plan> plan,
                    CudaOptions opts = CudaOptions(), int device = 0) {
    if (opts.cacheDir.empty())
      opts.diskCache = false;
    backend.reset();
    return CudaBackend::create(std::move(plan), device, driver, backend, opts);
  }
  void mustCreate(std::shared_ptr<const rt::Plan> plan,
                  CudaOptions opts = CudaOptions()) {
    rt::Status s = create(std::move(plan), opts);
    ASSERT_TRUE(s.ok()) << s.message;
  }

  FakeCuda fake;
  Driver driver;
  std::unique_ptr<CudaBackend> backend;
};

//===----------------------------------------------------------------------===//
// The driver table
//===----------------------------------------------------------------------===//

TEST(CudaDriver, MissingLibraryGivesCleanError) {
  std::unique_ptr<Driver> d;
  rt::Status s = Driver::open("libl4c-no-such-driver.so.1", d);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code, rt::StatusCode::Unsupported);
  EXPECT_EQ(s.message.rfind(
                "cuda driver not found (libl4c-no-such-driver.so.1): ", 0),
            0u)
      << s.message;
  EXPECT_FALSE(d);

  // The system driver: where there is none (CI), the same clean message,
  // and the same answer on every call.
  const Driver *sys = nullptr;
  rt::Status a = Driver::load(sys), b = Driver::load(sys);
  EXPECT_EQ(a.message, b.message);
  if (a.ok()) {
    EXPECT_NE(sys, nullptr);
    EXPECT_EQ(sys->label(), "libcuda.so.1");
  } else {
    EXPECT_EQ(sys, nullptr);
    EXPECT_EQ(a.message.rfind("cuda driver not found (libcuda.so.1): ", 0), 0u)
        << a.message;
  }
}

TEST(CudaDriver, LibraryWithoutDriverSymbolsIsRejected) {
  std::unique_ptr<Driver> d;
  rt::Status s = Driver::open("libm.so.6", d);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message.find("cuda driver unusable (libm.so.6): it has no "
                           "symbol cuInit"),
            std::string::npos)
      << s.message;
}

TEST_F(CudaBackendTest, DriverDescribesErrors) {
  EXPECT_EQ(driver.describe(1), "CUDA_ERROR_INVALID_VALUE (invalid argument)");
  EXPECT_EQ(driver.describe(12345), "CUresult 12345");
  rt::Status s = driver.check(2, "cuMemAlloc", "region 'weights'");
  EXPECT_EQ(s.code, rt::StatusCode::OutOfMemory);
  EXPECT_EQ(s.message, "region 'weights': cuMemAlloc failed: "
                       "CUDA_ERROR_OUT_OF_MEMORY (out of memory)");
  EXPECT_TRUE(driver.check(0, "cuInit").ok());
  EXPECT_EQ(driver.check(100, "cuInit").code, rt::StatusCode::Unsupported);
}

//===----------------------------------------------------------------------===//
// Device, regions and copies
//===----------------------------------------------------------------------===//

TEST_F(CudaBackendTest, AllocatesZeroedRegionsWithThePlansSizes) {
  CudaPlan cp = withFakeCubin(tinyModelPlan("generate", 2, 8));
  auto plan = parse(cp.serialize());
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan));
  EXPECT_EQ(backend->deviceName(), "Fake H100");
  EXPECT_EQ(backend->arch(), "sm_90a");
  EXPECT_EQ(backend->multiprocessors(), 132);
  EXPECT_EQ(fake.contexts, 1);
  ASSERT_EQ(fake.allocSizes.size(), 4u);
  for (int r = 0; r < 4; ++r) {
    auto region = plan::Region(r);
    uint64_t want = (plan->regionSize[r] + 255) / 256 * 256;
    ASSERT_GT(plan->regionSize[r], 0u);
    EXPECT_EQ(fake.allocSizes[r], want) << "region " << r;
    EXPECT_EQ(backend->regionSize(region), want);
    CUdeviceptr base = backend->regionBase(region);
    EXPECT_EQ(base % 256, 0u);
    ASSERT_TRUE(fake.mem.count(base));
    // Zeroed, the KV cache above all.
    const std::vector<uint8_t> &bytes = fake.mem[base];
    EXPECT_TRUE(std::all_of(bytes.begin(), bytes.end(),
                            [](uint8_t b) { return b == 0; }))
        << "region " << r << " is not zeroed";
  }
  EXPECT_EQ(backend->loadStats().kernels, plan->kernels.size());
  EXPECT_EQ(backend->loadStats().modules, 1u);
  EXPECT_EQ(backend->loadStats().fromPlan, 1u);

  // Everything is given back.
  backend.reset();
  EXPECT_TRUE(fake.mem.empty());
  EXPECT_EQ(fake.contexts, 0);
  EXPECT_TRUE(fake.modules[0]->unloaded);
  EXPECT_TRUE(fake.streams[0]->destroyed);
}

TEST_F(CudaBackendTest, UploadsWeightsWhereThePlanSays) {
  CudaPlan cp = withFakeCubin(linearPlan());
  auto plan = parse(cp.serialize());
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan));
  CUdeviceptr base = backend->regionBase(plan::Region::Weights);
  // As the Session will: each weight at its buffer's offset.
  for (size_t w = 0; w < plan->weights.size(); ++w) {
    const rt::BufferDesc &b = plan->buffers[plan->weights[w].buffer];
    ASSERT_EQ(b.region, plan::Region::Weights);
    std::vector<float> values(b.numel);
    for (size_t i = 0; i < values.size(); ++i)
      values[i] = float(w * 1000 + i);
    rt::Status s = backend->upload(b.region, b.offset, values.data(), b.size);
    ASSERT_TRUE(s.ok()) << s.message;
    const float *dev = fake.as<float>(base + b.offset, b.numel);
    ASSERT_NE(dev, nullptr);
    EXPECT_EQ(std::memcmp(dev, values.data(), b.size), 0)
        << plan->weights[w].hfName;
    std::vector<float> back(b.numel);
    s = backend->download(b.region, b.offset, back.data(), b.size);
    ASSERT_TRUE(s.ok()) << s.message;
    EXPECT_EQ(back, values);
  }
  EXPECT_EQ(fake.counts["cuMemcpyHtoDAsync"], int(plan->weights.size()));

  // Out of the region: refused before the driver sees it.
  uint64_t size = plan->regionSize[int(plan::Region::Weights)];
  char byte = 0;
  rt::Status s = backend->upload(plan::Region::Weights, size, &byte, 1);
  EXPECT_EQ(s.code, rt::StatusCode::InvalidArgument);
  EXPECT_NE(s.message.find("exceeds region 'weights'"), std::string::npos)
      << s.message;
  s = backend->download(plan::Region::Io, ~0ull, &byte, 2);
  EXPECT_EQ(s.code, rt::StatusCode::InvalidArgument);

  uint8_t after = fake.as<uint8_t>(base, 13)[12];
  ASSERT_TRUE(backend->fill(plan::Region::Weights, 4, 8, 0xab).ok());
  const uint8_t *bytes = fake.as<uint8_t>(base, 13);
  for (int i = 4; i < 12; ++i)
    EXPECT_EQ(bytes[i], 0xab);
  EXPECT_EQ(bytes[12], after);
}

TEST_F(CudaBackendTest, DeviceAndDriverFailuresAreNamed) {
  CudaPlan cp = withFakeCubin(linearPlan());
  auto plan = parse(cp.serialize());
  rt::Status s = create(plan, CudaOptions(), /*device=*/1);
  EXPECT_EQ(s.code, rt::StatusCode::InvalidArgument);
  EXPECT_EQ(s.message, "cuda device 1 does not exist (this machine has 1)");

  fake.failCall = "cuInit";
  fake.failWith = cuda::CUDA_ERROR_NO_DEVICE;
  s = create(plan);
  EXPECT_EQ(s.code, rt::StatusCode::Unsupported);
  EXPECT_EQ(s.message, "cuda: cuInit failed: CUDA_ERROR_NO_DEVICE (no "
                       "CUDA-capable device is detected)");
}

TEST_F(CudaBackendTest, FailedAllocationNamesTheRegionAndLeaksNothing) {
  CudaPlan cp = withFakeCubin(linearPlan());
  auto plan = parse(cp.serialize());
  fake.failCall = "cuMemAlloc";
  fake.failSkip = 1; // the arena succeeds, the weights fail
  fake.failWith = cuda::CUDA_ERROR_OUT_OF_MEMORY;
  rt::Status s = create(plan);
  EXPECT_EQ(s.code, rt::StatusCode::OutOfMemory);
  uint64_t weights = (plan->regionSize[1] + 255) / 256 * 256;
  EXPECT_EQ(s.message, "region 'weights' (" + std::to_string(weights) +
                           " bytes): cuMemAlloc failed: "
                           "CUDA_ERROR_OUT_OF_MEMORY (out of memory)");
  EXPECT_FALSE(backend);
  EXPECT_TRUE(fake.mem.empty());
  EXPECT_EQ(fake.contexts, 0);
}

//===----------------------------------------------------------------------===//
// Kernels: loading and launching
//===----------------------------------------------------------------------===//

TEST_F(CudaBackendTest, LaunchesEveryStepWithThePlansGridAndRegions) {
  CudaPlan cp = withFakeCubin(linearPlan());
  cp.code[2].shared = 64 << 10; // beyond the default 48 KiB
  auto plan = parse(cp.serialize());
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan));
  ASSERT_EQ(fake.sharedOptIns.size(), 1u);
  EXPECT_EQ(fake.sharedOptIns[0],
            std::make_pair(cp.code[2].entry, int(64 << 10)));

  const rt::ProgramDesc *fwd = plan->program("forward");
  ASSERT_NE(fwd, nullptr);
  rt::Status s = backend->runProgram(*fwd, 2, 3);
  ASSERT_TRUE(s.ok()) << s.message;
  ASSERT_TRUE(backend->synchronize().ok());
  ASSERT_EQ(fake.launches.size(), fwd->steps.size());
  for (size_t i = 0; i < fwd->steps.size(); ++i) {
    const FakeLaunch &l = fake.launches[i];
    const CudaCode &c = cp.code[fwd->steps[i]];
    EXPECT_EQ(l.entry, c.entry);
    EXPECT_EQ(l.grid, c.blocks);
    EXPECT_EQ(l.threads, c.threads);
    EXPECT_EQ(l.shared, c.shared);
    EXPECT_EQ(l.B, 2);
    EXPECT_EQ(l.T, 3);
    EXPECT_EQ(l.stream, fake.launches[0].stream);
    EXPECT_FALSE(l.fromGraph);
    EXPECT_EQ(l.regions.arena, backend->regionBase(plan::Region::Arena));
    EXPECT_EQ(l.regions.weights, backend->regionBase(plan::Region::Weights));
    EXPECT_EQ(l.regions.cache, backend->regionBase(plan::Region::Cache));
    EXPECT_EQ(l.regions.io, backend->regionBase(plan::Region::Io));
  }
  // linearPlan has no cache: a null base, which no kernel reads.
  EXPECT_EQ(backend->regionBase(plan::Region::Cache), 0u);

  // Extents are checked against the plan.
  s = backend->runProgram(*fwd, 3, 1);
  EXPECT_EQ(s.code, rt::StatusCode::InvalidArgument);
  EXPECT_EQ(s.message, "program 'forward': batch 3 is outside [1, 2]");
  s = backend->runProgram(*fwd, 1, 5);
  EXPECT_EQ(s.message, "program 'forward': length 5 is outside [1, 4]");
  EXPECT_EQ(fake.launches.size(), fwd->steps.size());
}

TEST_F(CudaBackendTest, GridsAreCapped) {
  CudaPlan cp = withFakeCubin(linearPlan());
  cp.code[0].blocks = 1u << 20;
  cp.code[1].blocks = 7;
  auto plan = parse(cp.serialize());
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan));
  const rt::ProgramDesc &fwd = *plan->program("forward");
  ASSERT_TRUE(backend->runProgram(fwd, 1, 1).ok());
  EXPECT_EQ(fake.launches[0].grid, CudaBackend::kDefaultMaxBlocks);
  EXPECT_EQ(fake.launches[1].grid, 7u);

  CudaOptions opts;
  opts.maxBlocks = 4;
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan, opts));
  fake.launches.clear();
  ASSERT_TRUE(backend->runProgram(fwd, 1, 1).ok());
  EXPECT_EQ(fake.launches[0].grid, 4u);
  EXPECT_EQ(fake.launches[1].grid, 4u);
  EXPECT_EQ(fake.launches[2].grid, 4u);
}

TEST_F(CudaBackendTest, GraphIsCapturedOnceThenReplayed) {
  CudaPlan cp = withFakeCubin(tinyModelPlan("generate", 2, 8));
  auto plan = parse(cp.serialize());
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan));
  const rt::ProgramDesc &decode = *plan->program("decode");
  size_t steps = decode.steps.size();
  for (int i = 0; i < 3; ++i) {
    rt::Status s = backend->runProgramGraph(decode, 2, 1);
    ASSERT_TRUE(s.ok()) << s.message;
  }
  EXPECT_EQ(fake.counts["cuStreamBeginCapture"], 1);
  EXPECT_EQ(fake.counts["cuGraphInstantiateWithFlags"], 1);
  EXPECT_EQ(fake.counts["cuGraphLaunch"], 3);
  EXPECT_EQ(fake.counts["cuGraphDestroy"], 1); // the exec is independent
  EXPECT_EQ(backend->graphCount(), 1u);
  ASSERT_EQ(fake.launches.size(), 3 * steps);
  for (size_t i = 0; i < fake.launches.size(); ++i) {
    const FakeLaunch &l = fake.launches[i];
    EXPECT_TRUE(l.fromGraph);
    EXPECT_EQ(l.entry, cp.code[decode.steps[i % steps]].entry);
    EXPECT_EQ(l.B, 2);
    EXPECT_EQ(l.T, 1);
    EXPECT_EQ(l.regions.cache, backend->regionBase(plan::Region::Cache));
  }

  // Other extents make another graph; direct runs do not touch graphs.
  ASSERT_TRUE(backend->runProgramGraph(decode, 1, 1).ok());
  EXPECT_EQ(backend->graphCount(), 2u);
  EXPECT_EQ(fake.counts["cuStreamBeginCapture"], 2);
  ASSERT_TRUE(backend->runProgram(*plan->program("prefill"), 2, 8).ok());
  EXPECT_EQ(fake.counts["cuStreamBeginCapture"], 2);

  backend.reset();
  ASSERT_EQ(fake.execs.size(), 2u);
  EXPECT_TRUE(fake.execs[0]->destroyed);
  EXPECT_TRUE(fake.execs[1]->destroyed);
}

TEST_F(CudaBackendTest, LeastRecentlyUsedGraphIsDroppedBeyondTheLimit) {
  CudaPlan cp = withFakeCubin(linearPlan(9, 8));
  auto plan = parse(cp.serialize());
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan));
  const rt::ProgramDesc &fwd = *plan->program("forward");
  // 72 extents, with (1, 1) replayed between every two so it stays hot.
  ASSERT_TRUE(backend->runProgramGraph(fwd, 1, 1).ok());
  for (int64_t B = 1; B <= 9; ++B)
    for (int64_t T = 1; T <= 8; ++T) {
      if (B == 1 && T == 1)
        continue;
      ASSERT_TRUE(backend->runProgramGraph(fwd, B, T).ok());
      ASSERT_TRUE(backend->runProgramGraph(fwd, 1, 1).ok());
    }
  EXPECT_EQ(backend->graphCount(), CudaBackend::kMaxGraphs);
  EXPECT_EQ(fake.counts["cuStreamBeginCapture"], 72);
  ASSERT_TRUE(backend->runProgramGraph(fwd, 1, 1).ok());
  EXPECT_EQ(fake.counts["cuStreamBeginCapture"], 72);
  // (1, 2) was the oldest of the rest: dropped, so captured again.
  ASSERT_TRUE(backend->runProgramGraph(fwd, 1, 2).ok());
  EXPECT_EQ(fake.counts["cuStreamBeginCapture"], 73);
  EXPECT_EQ(fake.counts["cuGraphExecDestroy"], 72 - 64 + 1);
}

TEST_F(CudaBackendTest, FailedLaunchNamesTheKernel) {
  CudaPlan cp = withFakeCubin(linearPlan());
  auto plan = parse(cp.serialize());
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan));
  const rt::ProgramDesc &fwd = *plan->program("forward");
  fake.failCall = "cuLaunchKernel";
  fake.failSkip = 1;
  rt::Status s = backend->runProgram(fwd, 1, 1);
  EXPECT_EQ(s.code, rt::StatusCode::Internal);
  EXPECT_EQ(s.message, "kernel 'model.norm' (#1): cuLaunchKernel failed: "
                       "CUDA_ERROR_INVALID_VALUE (invalid argument)");

  // During a capture: the same message, the capture is ended and nothing
  // is kept, so the next attempt captures afresh.
  fake.failSkip = 2;
  s = backend->runProgramGraph(fwd, 1, 1);
  EXPECT_EQ(s.message, "kernel 'lm_head' (#2): cuLaunchKernel failed: "
                       "CUDA_ERROR_INVALID_VALUE (invalid argument)");
  EXPECT_FALSE(fake.streams[0]->capturing);
  EXPECT_EQ(backend->graphCount(), 0u);
  EXPECT_EQ(fake.counts["cuGraphDestroy"], 1);
  fake.failCall.clear();
  s = backend->runProgramGraph(fwd, 1, 1);
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_EQ(backend->graphCount(), 1u);
}

TEST_F(CudaBackendTest, AsynchronousFaultsPointAtTheProgramOrKernel) {
  CudaPlan cp = withFakeCubin(linearPlan());
  auto plan = parse(cp.serialize());
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan));
  const rt::ProgramDesc &fwd = *plan->program("forward");
  ASSERT_TRUE(backend->runProgram(fwd, 2, 3).ok());
  fake.failCall = "cuStreamSynchronize";
  fake.failWith = cuda::CUDA_ERROR_ILLEGAL_ADDRESS;
  rt::Status s = backend->synchronize();
  EXPECT_EQ(s.message,
            "cuda stream: cuStreamSynchronize failed: "
            "CUDA_ERROR_ILLEGAL_ADDRESS (an illegal memory access was "
            "encountered) (after program 'forward' (B=2, T=3); set "
            "L4C_CUDA_SYNC=1 to name the kernel)");

  // Synchronizing after each launch names the kernel.
  fake.failCall.clear();
  CudaOptions opts;
  opts.syncEachLaunch = true;
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan, opts));
  fake.failCall = "cuStreamSynchronize";
  fake.failSkip = 1;
  s = backend->runProgram(fwd, 2, 3);
  EXPECT_EQ(s.message, "kernel 'model.norm' (#1): cuStreamSynchronize "
                       "failed: CUDA_ERROR_ILLEGAL_ADDRESS (an illegal "
                       "memory access was encountered)");
}

TEST_F(CudaBackendTest, EmulatedKernelsComputeThroughTheRegions) {
  // Kernels that follow the ABI, emulated on the fake's memory: ids -> h
  // (embed), h -> x (norm, times two), x -> logits (head, plus one).
  PlanSpec spec = linearPlan(2, 4, 16, 8);
  CudaPlan cp = withFakeCubin(spec);
  auto plan = parse(cp.serialize());
  auto buf = [&](const std::string &name) -> const rt::BufferDesc & {
    for (const rt::BufferDesc &b : plan->buffers)
      if (b.name == name)
        return b;
    ADD_FAILURE() << "no buffer " << name;
    return plan->buffers[0];
  };
  const rt::BufferDesc &ids = buf("input_ids"), &h = buf("h"), &x = buf("x"),
                       &logits = buf("logits");
  auto base = [](const L4Regions &r, const rt::BufferDesc &b) {
    CUdeviceptr bases[4] = {r.arena, r.weights, r.cache, r.io};
    return bases[int(b.region)] + b.offset;
  };
  auto rows = [&](FakeCuda &f, const FakeLaunch &l, const rt::BufferDesc &in,
                  const rt::BufferDesc &out, auto op) {
    for (long long b = 0; b < l.B; ++b)
      for (long long t = 0; t < l.T; ++t) {
        uint64_t i = b * in.batchStride + t * in.rowStride;
        uint64_t o = b * out.batchStride + t * out.rowStride;
        op(f, base(l.regions, in), i, base(l.regions, out), o);
      }
  };
  fake.emulate[cp.code[0].entry] = [&](FakeCuda &f, const FakeLaunch &l) {
    rows(f, l, ids, h,
         [](FakeCuda &f, CUdeviceptr in, uint64_t i, CUdeviceptr out,
            uint64_t o) {
           f.as<float>(out, o + 1)[o] = float(f.as<int64_t>(in, i + 1)[i]);
         });
  };
  fake.emulate[cp.code[1].entry] = [&](FakeCuda &f, const FakeLaunch &l) {
    rows(f, l, h, x,
         [](FakeCuda &f, CUdeviceptr in, uint64_t i, CUdeviceptr out,
            uint64_t o) {
           f.as<float>(out, o + 1)[o] = 2 * f.as<float>(in, i + 1)[i];
         });
  };
  fake.emulate[cp.code[2].entry] = [&](FakeCuda &f, const FakeLaunch &l) {
    rows(f, l, x, logits,
         [](FakeCuda &f, CUdeviceptr in, uint64_t i, CUdeviceptr out,
            uint64_t o) {
           f.as<float>(out, o + 1)[o] = f.as<float>(in, i + 1)[i] + 1;
         });
  };
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan));
  const int64_t B = 2, T = 3, S = 4, V = 16;
  std::vector<int64_t> idv(B * S, 0);
  for (int64_t i = 0; i < B * S; ++i)
    idv[i] = 10 + i;
  ASSERT_TRUE(
      backend->upload(ids.region, ids.offset, idv.data(), ids.size).ok());
  for (bool graph : {false, true}) {
    const rt::ProgramDesc &fwd = *plan->program("forward");
    rt::Status s = graph ? backend->runProgramGraph(fwd, B, T)
                         : backend->runProgram(fwd, B, T);
    ASSERT_TRUE(s.ok()) << s.message;
    std::vector<float> out(B * S * V, -1);
    s = backend->download(logits.region, logits.offset, out.data(),
                          logits.size);
    ASSERT_TRUE(s.ok()) << s.message;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < S; ++t)
        EXPECT_EQ(out[(b * S + t) * V],
                  t < T ? 2.0f * float(idv[b * S + t]) + 1 : 0.0f)
            << "b=" << b << " t=" << t << " graph=" << graph;
  }
}

//===----------------------------------------------------------------------===//
// TMA tensor maps
//===----------------------------------------------------------------------===//

/// linearPlan whose lm_head takes two tensor maps: its weight (f32 [16, 8]
/// at weights offset 576, 32-byte swizzle) and the logits (io offset 128,
/// f32 rows of 16).
CudaPlan withTensorMaps() {
  PlanSpec spec = linearPlan(2, 4, 16, 8);
  TensorMapSpec w;
  w.region = pl::Region::Weights;
  w.offset = 576;
  w.dtype = pl::DType::F32;
  w.dims = {8, 16};
  w.strides = {32};
  w.box = {4, 8};
  w.swizzle = 1;
  TensorMapSpec o;
  o.region = pl::Region::Io;
  o.offset = 128;
  o.dtype = pl::DType::BF16;
  o.dims = {32, 8};
  o.strides = {64};
  o.box = {32, 4};
  o.swizzle = 2;
  spec.kernels[2].tensorMaps = {w, o};
  return withFakeCubin(spec);
}

TEST_F(CudaBackendTest, EncodesTensorMapsAndPassesThemAfterBAndT) {
  CudaPlan cp = withTensorMaps();
  auto plan = parse(cp.serialize());
  ASSERT_EQ(plan->buffers[plan->weights[2].buffer].offset, 576u);
  fake.mapParams[cp.code[2].entry] = 2;
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan));

  // Encoded once, at load, over the allocated regions.
  FakeTensorMap w;
  w.dtype = 7; // CU_TENSOR_MAP_DATA_TYPE_FLOAT32
  w.rank = 2;
  w.address = backend->regionBase(plan::Region::Weights) + 576;
  w.dims = {8, 16};
  w.strides = {32};
  w.box = {4, 8};
  w.elementStrides = {1, 1};
  w.interleave = 0; // none
  w.swizzle = 1;    // 32B
  w.l2 = 3;         // 256B promotion
  w.oob = 0;        // zeros
  FakeTensorMap o = w;
  o.dtype = 9; // CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
  o.address = backend->regionBase(plan::Region::Io) + 128;
  o.dims = {32, 8};
  o.strides = {64};
  o.box = {32, 4};
  o.swizzle = 2;
  ASSERT_EQ(fake.encoded.size(), 2u);
  EXPECT_TRUE(fake.encoded[0] == w);
  EXPECT_TRUE(fake.encoded[1] == o);

  // Direct launches, graph captures and profiles all pass them.
  const rt::ProgramDesc &fwd = *plan->program("forward");
  ASSERT_TRUE(backend->runProgram(fwd, 2, 3).ok());
  ASSERT_TRUE(backend->runProgramGraph(fwd, 1, 2).ok());
  std::vector<double> ms;
  rt::Status s = backend->profileProgram(fwd, 2, 4, ms);
  ASSERT_TRUE(s.ok()) << s.message;
  ASSERT_EQ(fake.launches.size(), 9u);
  for (const FakeLaunch &l : fake.launches) {
    SCOPED_TRACE(l.entry + (l.fromGraph ? " (graph)" : ""));
    EXPECT_EQ(l.regions.weights, backend->regionBase(plan::Region::Weights));
    if (l.entry != cp.code[2].entry) {
      EXPECT_TRUE(l.maps.empty());
      continue;
    }
    ASSERT_EQ(l.maps.size(), 2u);
    EXPECT_TRUE(l.maps[0] == w);
    EXPECT_TRUE(l.maps[1] == o);
  }
  EXPECT_EQ(fake.launches[2].B, 2);
  EXPECT_EQ(fake.launches[5].T, 2);
  EXPECT_TRUE(fake.launches[5].fromGraph);
  EXPECT_EQ(fake.counts["cuTensorMapEncodeTiled"], 2);
}

TEST_F(CudaBackendTest, TensorMapsNeedTheDriversEncoder) {
  // A driver without cuTensorMapEncodeTiled runs plans without maps...
  DriverApi api = FakeCuda::table();
  api.cuTensorMapEncodeTiled = nullptr;
  Driver old = Driver::forTesting(api);
  CudaPlan plain = withFakeCubin(linearPlan(2, 4, 16, 8));
  std::unique_ptr<CudaBackend> b;
  rt::Status s = CudaBackend::create(parse(plain.serialize()), 0, old, b);
  ASSERT_TRUE(s.ok()) << s.message;
  b.reset();
  // ...and refuses, naming the kernel, a plan whose kernels take them.
  s = CudaBackend::create(parse(withTensorMaps().serialize()), 0, old, b);
  EXPECT_EQ(s.code, rt::StatusCode::Unsupported);
  EXPECT_EQ(s.message,
            "test.l4plan: kernel 'lm_head' (#2) takes 2 TMA tensor map(s), "
            "but the cuda driver (fake cuda driver) has no "
            "cuTensorMapEncodeTiled (it needs a CUDA 12 or newer driver)");
  EXPECT_FALSE(b);
  EXPECT_EQ(fake.counts["cuModuleLoadDataEx"], 1); // the plain plan's only
  EXPECT_TRUE(fake.mem.empty());

  // A map the driver refuses: named, and nothing is leaked.
  fake.failCall = "cuTensorMapEncodeTiled";
  fake.failSkip = 1;
  s = create(parse(withTensorMaps().serialize()));
  EXPECT_EQ(s.message, "kernel 'lm_head' (#2) tensor map 1: "
                       "cuTensorMapEncodeTiled failed: "
                       "CUDA_ERROR_INVALID_VALUE (invalid argument)");
  EXPECT_FALSE(backend);
  EXPECT_TRUE(fake.mem.empty());
  EXPECT_EQ(fake.contexts, 0);
}

TEST(CudaPlanCApi, ListsProgramsAndKernels) {
  // What `l4-run --info --kernels` prints comes from these calls.
  CudaPlan cp = withFakeCubin(tinyModelPlan("generate", 2, 8));
  cp.spec.kernels[1].tileConfig = "v4";
  cp.spec.kernels[1].signature = "l4_gemm_0123456789abcdef";
  cp.code[2].shared = 4096;
  cp.code[3].gridWait = true;
  cp.code[4].cubin.clear(); // this one is compiled at load
  cp.code[4].source = "extern \"C\" __global__ void k() {}";
  std::vector<uint8_t> bytes = cp.serialize();
  l4rt_plan plan = nullptr;
  ASSERT_EQ(l4rt_plan_load_memory(bytes.data(), bytes.size(), &plan), L4RT_OK)
      << l4rt_last_error();
  l4rt_plan_summary s;
  ASSERT_EQ(l4rt_plan_info(plan, &s), L4RT_OK);
  ASSERT_EQ(s.num_kernels, cp.spec.kernels.size());

  uint32_t n = 0;
  ASSERT_EQ(l4rt_plan_num_programs(plan, &n), L4RT_OK);
  ASSERT_EQ(n, cp.spec.programs.size());
  for (uint32_t i = 0; i < n; ++i) {
    l4rt_program_info p;
    ASSERT_EQ(l4rt_plan_program(plan, i, &p), L4RT_OK);
    EXPECT_EQ(p.name, cp.spec.programs[i].name);
    EXPECT_EQ(std::vector<uint32_t>(p.steps, p.steps + p.num_steps),
              cp.spec.programs[i].steps);
  }
  for (uint32_t i = 0; i < s.num_kernels; ++i) {
    SCOPED_TRACE("kernel " + std::to_string(i));
    l4rt_kernel_info k;
    ASSERT_EQ(l4rt_plan_kernel(plan, i, &k), L4RT_OK);
    const KernelSpec &spec = cp.spec.kernels[i];
    EXPECT_EQ(k.name, spec.name);
    EXPECT_EQ(k.kind, spec.kind);
    EXPECT_EQ(k.num_ops, spec.ops.size());
    EXPECT_EQ(k.tile_config, spec.tileConfig);
    EXPECT_EQ(k.signature, spec.signature);
    EXPECT_EQ(k.alternative_of, -1);
    EXPECT_EQ(k.blocks, cp.code[i].blocks);
    EXPECT_EQ(k.threads, cp.code[i].threads);
    EXPECT_EQ(k.shared_bytes, cp.code[i].shared);
    EXPECT_EQ(k.cubin_bytes, cp.code[i].cubin.size());
    EXPECT_EQ(k.num_tensor_maps, 0u);
    EXPECT_EQ(k.grid_wait, i == 3 ? 1 : 0);
  }

  // Past the end, and null pointers, are refused with a message.
  l4rt_kernel_info k;
  EXPECT_EQ(l4rt_plan_kernel(plan, s.num_kernels, &k),
            L4RT_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(std::string(l4rt_last_error()),
            "l4rt_plan_kernel: index " + std::to_string(s.num_kernels) +
                " is past the plan's " + std::to_string(s.num_kernels) +
                " kernels");
  l4rt_program_info p;
  EXPECT_EQ(l4rt_plan_program(plan, n, &p), L4RT_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(l4rt_plan_program(plan, 0, nullptr), L4RT_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(l4rt_plan_kernel(nullptr, 0, &k), L4RT_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(l4rt_plan_num_programs(plan, nullptr),
            L4RT_ERROR_INVALID_ARGUMENT);
  l4rt_plan_free(plan);
}

TEST_F(CudaBackendTest, KernelsThatWaitAreLaunchedProgrammatically) {
  // Every kernel of a generate plan waits (as l4c writes them) but #1, a
  // kernel of an older plan.
  CudaPlan cp = withFakeCubin(tinyModelPlan("generate", 2, 8));
  for (CudaCode &c : cp.code)
    c.gridWait = true;
  cp.code[1].gridWait = false;
  auto plan = parse(cp.serialize());
  EXPECT_TRUE(plan->kernels[0].gridWait);
  EXPECT_FALSE(plan->kernels[1].gridWait);
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan));
  EXPECT_EQ(backend->loadStats().programmatic, cp.code.size() - 1);

  const rt::ProgramDesc &prefill = *plan->program("prefill");
  const rt::ProgramDesc &decode = *plan->program("decode");
  ASSERT_TRUE(backend->runProgram(prefill, 2, 8).ok());
  ASSERT_TRUE(backend->runProgramGraph(decode, 2, 1).ok());
  ASSERT_EQ(fake.launches.size(), prefill.steps.size() + decode.steps.size());
  size_t plain = 0;
  for (size_t i = 0; i < fake.launches.size(); ++i) {
    uint32_t k = i < prefill.steps.size()
                     ? prefill.steps[i]
                     : decode.steps[i - prefill.steps.size()];
    const FakeLaunch &l = fake.launches[i];
    EXPECT_EQ(l.programmatic, k != 1) << "kernel " << k;
    // The same grid, block, shared memory and parameters either way.
    EXPECT_EQ(l.entry, cp.code[k].entry);
    EXPECT_EQ(l.grid, cp.code[k].blocks);
    EXPECT_EQ(l.threads, cp.code[k].threads);
    EXPECT_EQ(l.B, 2);
    EXPECT_EQ(l.regions.arena, backend->regionBase(plan::Region::Arena));
    plain += k == 1;
  }
  EXPECT_EQ(fake.counts["cuLaunchKernel"], int(plain));
  EXPECT_EQ(fake.counts["cuLaunchKernelEx"], int(fake.launches.size() - plain));

  // The kernel profile launches plainly: each kernel's time is its own.
  fake.launches.clear();
  std::vector<double> ms;
  rt::Status p = backend->profileProgram(prefill, 2, 8, ms);
  ASSERT_TRUE(p.ok()) << p.message;
  ASSERT_EQ(fake.launches.size(), prefill.steps.size());
  for (const FakeLaunch &l : fake.launches)
    EXPECT_FALSE(l.programmatic);

  // A failed programmatic launch names the kernel.
  fake.failCall = "cuLaunchKernelEx";
  rt::Status s = backend->runProgram(prefill, 1, 1);
  EXPECT_EQ(s.message.find("kernel '"), 0u) << s.message;
  EXPECT_NE(s.message.find("cuLaunchKernelEx failed"), std::string::npos)
      << s.message;
}

TEST_F(CudaBackendTest, ProgrammaticLaunchNeedsHopperTheDriverAndConsent) {
  CudaPlan cp = withFakeCubin(linearPlan());
  for (CudaCode &c : cp.code)
    c.gridWait = true;
  auto plan = parse(cp.serialize());
  const rt::ProgramDesc &fwd = *plan->program("forward");
  auto runPlain = [&](const std::string &why) {
    fake.launches.clear();
    ASSERT_TRUE(backend->runProgram(fwd, 1, 1).ok()) << why;
    EXPECT_EQ(backend->loadStats().programmatic, 0u) << why;
    for (const FakeLaunch &l : fake.launches)
      EXPECT_FALSE(l.programmatic) << why;
  };
  // Turned off by the option...
  CudaOptions off;
  off.programmaticLaunch = false;
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan, off));
  runPlain("option");
  // ...or by L4C_PDL=0.
  ::setenv("L4C_PDL", "0", 1);
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan));
  ::unsetenv("L4C_PDL");
  runPlain("L4C_PDL=0");
  // Before Hopper the attribute means nothing: not used.
  fake.major = 8;
  CudaPlan cp80 = cp;
  cp80.arch = "sm_80";
  auto plan80 = parse(cp80.serialize());
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan80));
  fake.launches.clear();
  ASSERT_TRUE(backend->runProgram(*plan80->program("forward"), 1, 1).ok());
  EXPECT_EQ(backend->loadStats().programmatic, 0u);
  for (const FakeLaunch &l : fake.launches)
    EXPECT_FALSE(l.programmatic);
  fake.major = 9;
  // A driver without cuLaunchKernelEx runs the plan with cuLaunchKernel.
  DriverApi api = FakeCuda::table();
  api.cuLaunchKernelEx = nullptr;
  Driver old = Driver::forTesting(api);
  backend.reset();
  ASSERT_TRUE(CudaBackend::create(plan, 0, old, backend).ok());
  runPlain("no cuLaunchKernelEx");
  EXPECT_EQ(fake.counts["cuLaunchKernelEx"], 0);
  backend.reset(); // before `old`, which it uses
}

TEST_F(CudaBackendTest, TimerUsesEvents) {
  CudaPlan cp = withFakeCubin(linearPlan());
  auto plan = parse(cp.serialize());
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan));
  double ms = -1;
  rt::Status s = backend->stopTimer(ms);
  EXPECT_EQ(s.code, rt::StatusCode::InvalidArgument);
  ASSERT_TRUE(backend->startTimer().ok());
  ASSERT_TRUE(backend->runProgram(*plan->program("forward"), 1, 1).ok());
  s = backend->stopTimer(ms);
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_EQ(ms, 1.5);
  EXPECT_EQ(fake.counts["cuEventRecord"], 2);
  EXPECT_EQ(fake.counts["cuEventSynchronize"], 1);
  backend.reset();
  EXPECT_EQ(fake.counts["cuEventDestroy"], 2);
}

TEST_F(CudaBackendTest, PlanWithoutCudaCodeIsRejectedNamingTheKernel) {
  // A CPU plan: rejected before any device work.
  auto cpu = parse(linearPlan().serialize());
  rt::Status s = create(cpu);
  EXPECT_EQ(s.code, rt::StatusCode::InvalidPlan);
  EXPECT_EQ(s.message, "test.l4plan: kernel 'model.embed_tokens' (#0) has no "
                       "CUDA code (plan target 'cpu'); compile the plan with "
                       "--target=cuda to run it on a GPU");
  EXPECT_TRUE(fake.calls.empty());
  EXPECT_FALSE(CudaBackend::checkPlan(*cpu).ok());

  // The first kernel lacking code is named; code without an entry counts.
  CudaPlan cp = withFakeCubin(linearPlan());
  cp.code[1] = CudaCode();
  s = create(parse(cp.serialize()));
  EXPECT_NE(s.message.find("kernel 'model.norm' (#1) has no CUDA code"),
            std::string::npos)
      << s.message;
  cp = withFakeCubin(linearPlan());
  cp.code[2].entry.clear();
  s = create(parse(cp.serialize()));
  EXPECT_NE(s.message.find("kernel 'lm_head' (#2) has no CUDA entry"),
            std::string::npos)
      << s.message;

  // Several ranks need the multi-rank runtime.
  cp = withFakeCubin(linearPlan());
  cp.spec.meshRanks = 2;
  s = create(parse(cp.serialize()));
  EXPECT_EQ(s.code, rt::StatusCode::Unsupported);
  EXPECT_NE(s.message.find("a mesh of 2 ranks"), std::string::npos);
}

TEST_F(CudaBackendTest, CubinForAnotherArchNeedsSource) {
  fake.major = 8;
  fake.minor = 0;
  CudaPlan cp = withFakeCubin(linearPlan());
  rt::Status s = create(parse(cp.serialize()));
  EXPECT_EQ(s.code, rt::StatusCode::Unsupported);
  EXPECT_EQ(s.message, "test.l4plan: kernel 'model.embed_tokens' (#0) has a "
                       "cubin for 'sm_90a' only, and Fake H100 needs sm_80; "
                       "the plan carries no CUDA source to compile for it");
  EXPECT_EQ(fake.counts["cuModuleLoadDataEx"], 0);
  fake.major = 9;
  CudaOptions opts;
  opts.preferSource = true;
  s = create(parse(cp.serialize()), opts);
  EXPECT_NE(s.message.find("has a cubin for 'sm_90a' only, and compiling "
                           "from source was asked for"),
            std::string::npos)
      << s.message;

  // A plain sm_90 cubin runs where sm_90a would be built.
  fake.major = 9;
  cp.arch = "sm_90";
  ASSERT_NO_FATAL_FAILURE(mustCreate(parse(cp.serialize())));
  EXPECT_EQ(backend->loadStats().fromPlan, 1u);
}

TEST_F(CudaBackendTest, MissingEntryOrBadImageNamesTheKernel) {
  CudaPlan cp = withFakeCubin(linearPlan());
  cp.code[2].entry = "l4k_nowhere";
  rt::Status s = create(parse(cp.serialize()));
  EXPECT_EQ(s.message, "kernel 'lm_head' (#2), entry 'l4k_nowhere': "
                       "cuModuleGetFunction failed: CUDA_ERROR_NOT_FOUND "
                       "(named symbol not found)");

  cp = withFakeCubin(linearPlan());
  for (CudaCode &c : cp.code)
    c.cubin = std::vector<uint8_t>(16, 1);
  s = create(parse(cp.serialize()));
  EXPECT_EQ(s.message, "kernel 'model.embed_tokens' (#0) and 2 more sharing "
                       "its code: cuModuleLoadDataEx failed: "
                       "CUDA_ERROR_INVALID_IMAGE (device kernel image is "
                       "invalid)\nfake: not a cubin");

  cp = withFakeCubin(linearPlan());
  cp.code[1].threads = 2048;
  s = create(parse(cp.serialize()));
  EXPECT_EQ(s.code, rt::StatusCode::InvalidPlan);
  EXPECT_NE(s.message.find("kernel 'model.norm' (#1), entry "
                           "'l4k_1_model_norm': 2048 threads per block is "
                           "outside [1, 1024]"),
            std::string::npos)
      << s.message;
}

TEST_F(CudaBackendTest, KernelsTheirOwnCodeCannotLaunchFailTheLoad) {
  // Registers bound a function's block size below the device's 1024, and
  // static shared memory adds to the plan's dynamic bytes: found when the
  // kernel loads, with its name, not at its first launch.
  CudaPlan cp = withFakeCubin(linearPlan());
  fake.code[cp.code[1].entry] = {/*maxThreads=*/128, /*registers=*/255, 0, 0};
  rt::Status s = create(parse(cp.serialize()));
  EXPECT_EQ(s.code, rt::StatusCode::Unsupported);
  EXPECT_EQ(s.message, "kernel 'model.norm' (#1), entry 'l4k_1_model_norm': "
                       "launched with 160 threads a block, but its code (255 "
                       "registers a thread) allows at most 128 on Fake H100");
  EXPECT_FALSE(backend);
  EXPECT_TRUE(fake.mem.empty());

  fake.code.clear();
  cp = withFakeCubin(linearPlan());
  cp.code[2].shared = 200 << 10;
  fake.code[cp.code[2].entry] = {1024, 64, 0, 40 << 10};
  s = create(parse(cp.serialize()));
  EXPECT_EQ(s.code, rt::StatusCode::Unsupported);
  EXPECT_EQ(s.message, "kernel 'lm_head' (#2), entry 'l4k_2_lm_head': 204800 "
                       "bytes of dynamic shared memory and 40960 of static "
                       "exceed the 232448 of Fake H100");

  // Within the limits: the load keeps the most registers and local memory.
  fake.code.clear();
  cp = withFakeCubin(linearPlan());
  fake.code[cp.code[1].entry] = {1024, 96, 0, 0};
  fake.code[cp.code[2].entry] = {1024, 40, 24, 0};
  mustCreate(parse(cp.serialize()));
  EXPECT_EQ(backend->loadStats().maxRegisters, 96);
  EXPECT_EQ(backend->loadStats().maxRegistersKernel, "kernel 'model.norm' (#1)");
  EXPECT_EQ(backend->loadStats().localMemoryKernels, 1u);
  EXPECT_EQ(backend->loadStats().maxLocalBytes, 24u);
}

TEST_F(CudaBackendTest, PlanLargerThanTheFreeMemoryFailsBeforeAllocating) {
  CudaPlan cp = withFakeCubin(linearPlan());
  auto plan = parse(cp.serialize());
  MemoryNeed need = CudaBackend::memoryNeed(*plan);
  uint64_t regions = 0;
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(need.region[r], (plan->regionSize[r] + 255) / 256 * 256);
    regions += need.region[r];
  }
  EXPECT_EQ(need.optimizer, 0u); // not a train plan
  EXPECT_EQ(need.total(), regions);

  // Room for the weights but not for the rest: smaller extents help.
  fake.totalMemory = need.region[int(plan::Region::Weights)] + 256;
  rt::Status s = create(plan);
  EXPECT_EQ(s.code, rt::StatusCode::OutOfMemory);
  std::string account = "test.l4plan: needs " + rt::byteSize(need.total()) +
                        " of device memory (" + need.describe() +
                        "), but Fake H100 has " +
                        rt::byteSize(fake.totalMemory) + " free of " +
                        rt::byteSize(fake.totalMemory) + "; ";
  EXPECT_EQ(s.message, account + "the weights fit, the rest does not; a "
                                 "smaller --max-batch or --max-seq shrinks "
                                 "the arena and the KV cache");
  EXPECT_EQ(fake.counts["cuMemAlloc"], 0);
  EXPECT_FALSE(backend);
  EXPECT_EQ(fake.contexts, 0);

  // Not even the weights fit: one device cannot hold this model.
  fake.totalMemory = need.region[int(plan::Region::Weights)] - 256;
  s = create(plan);
  EXPECT_EQ(s.code, rt::StatusCode::OutOfMemory);
  EXPECT_NE(s.message.find("; the weights alone exceed it: the model needs "
                           "several GPUs (sharding a plan over devices is not "
                           "implemented yet) or bf16 weights "
                           "(--precision=bf16 halves them)"),
            std::string::npos)
      << s.message;
  EXPECT_EQ(fake.counts["cuMemAlloc"], 0);

  // Exactly enough.
  fake.totalMemory = need.total();
  mustCreate(plan);
}

TEST_F(CudaBackendTest, ProbeLoadsEveryKernelAndAllocatesNothing) {
  CudaPlan cp = withFakeCubin(linearPlan());
  auto plan = parse(cp.serialize());
  fake.code[cp.code[0].entry] = {1024, 72, 0, 0};
  // Too small for the plan: its kernels are probed all the same.
  fake.totalMemory = CudaBackend::memoryNeed(*plan).total() - 256;
  CudaBackend::DeviceReport r;
  CudaOptions opts;
  opts.diskCache = false;
  rt::Status s = CudaBackend::probe(plan, 0, driver, r, opts);
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_EQ(r.deviceName, "Fake H100");
  EXPECT_EQ(r.arch, "sm_90a");
  EXPECT_EQ(r.multiprocessors, 132);
  EXPECT_EQ(r.totalBytes, fake.totalMemory);
  EXPECT_EQ(r.freeBytes, fake.totalMemory);
  EXPECT_EQ(r.need.total(), CudaBackend::memoryNeed(*plan).total());
  EXPECT_FALSE(r.fits());
  EXPECT_EQ(r.load.kernels, 3u);
  EXPECT_EQ(r.load.modules, 1u);
  EXPECT_EQ(r.load.fromPlan, 1u);
  EXPECT_EQ(r.load.maxRegisters, 72);
  EXPECT_EQ(r.load.maxRegistersKernel, "kernel 'model.embed_tokens' (#0)");
  ASSERT_EQ(r.load.code.size(), 3u); // by plan kernel
  EXPECT_EQ(r.load.code[0].registers, 72);
  EXPECT_EQ(r.load.code[1].registers, 32);
  EXPECT_EQ(r.load.code[2].maxThreads, 1024);
  EXPECT_EQ(fake.counts["cuMemAlloc"], 0);
  EXPECT_EQ(fake.counts["cuFuncGetAttribute"], 3 * 4);
  EXPECT_EQ(fake.contexts, 0); // released on return
  for (const auto &m : fake.modules)
    EXPECT_TRUE(m->unloaded);

  // A kernel that cannot load fails the probe as it fails a session.
  cp.code[2].entry = "l4k_nowhere";
  s = CudaBackend::probe(parse(cp.serialize()), 0, driver, r, opts);
  EXPECT_EQ(s.message, "kernel 'lm_head' (#2), entry 'l4k_nowhere': "
                       "cuModuleGetFunction failed: CUDA_ERROR_NOT_FOUND "
                       "(named symbol not found)");
}

TEST_F(CudaBackendTest, EqualCodeIsLoadedOnce) {
  // Stored once (as the plan writer does), stored three times over, and
  // three distinct objects.
  CudaPlan cp = withFakeCubin(linearPlan());
  ASSERT_NO_FATAL_FAILURE(mustCreate(parse(cp.serialize())));
  EXPECT_EQ(fake.counts["cuModuleLoadDataEx"], 1);
  EXPECT_EQ(fake.counts["cuModuleGetFunction"], 3);

  cp.share = false;
  ASSERT_NO_FATAL_FAILURE(mustCreate(parse(cp.serialize())));
  EXPECT_EQ(fake.counts["cuModuleLoadDataEx"], 2);
  EXPECT_EQ(backend->loadStats().modules, 1u);

  for (size_t k = 0; k < cp.code.size(); ++k)
    cp.code[k].cubin = fakeCubin({cp.code[k].entry});
  ASSERT_NO_FATAL_FAILURE(mustCreate(parse(cp.serialize())));
  EXPECT_EQ(backend->loadStats().modules, 3u);
  EXPECT_EQ(backend->loadStats().kernels, 3u);
}

//===----------------------------------------------------------------------===//
// The disk cache
//===----------------------------------------------------------------------===//

TEST(CudaKernelCache, Sha256KnownAnswers) {
  EXPECT_EQ(cuda::hex(cuda::sha256("")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(cuda::hex(cuda::sha256("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  std::string two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  EXPECT_EQ(cuda::hex(cuda::sha256(two)),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // A million a's, fed in uneven pieces.
  cuda::Sha256 h;
  std::string a(1000, 'a');
  for (int i = 0; i < 1000; ++i)
    h.update(a.data(), a.size() - (i % 7)), h.update(a.data(), i % 7);
  EXPECT_EQ(cuda::hex(h.finish()),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  // Keys separate their fields.
  EXPECT_NE(cuda::compileKey("ab", "c", "sm_90a", "13.0"),
            cuda::compileKey("a", "bc", "sm_90a", "13.0"));
  EXPECT_NE(cuda::compileKey("s", "o", "sm_90a", "13.0"),
            cuda::compileKey("s", "o", "sm_90a", "13.1"));
}

TEST(CudaKernelCache, EntriesAreWholeOrMissing) {
  TempDir dir;
  cuda::KernelCache cache(dir.path() + "/nested/cache");
  std::string key = cuda::compileKey("src", "opts", "sm_90a", "13.0");
  std::vector<uint8_t> cubin(1000), got;
  for (size_t i = 0; i < cubin.size(); ++i)
    cubin[i] = uint8_t(i * 7);
  EXPECT_FALSE(cache.lookup(key, got));
  ASSERT_EQ(cache.store(key, cubin), "");
  ASSERT_TRUE(cache.lookup(key, got));
  EXPECT_EQ(got, cubin);
  // Only the entry: no temporary files left behind.
  auto files = filesUnder(cache.directory());
  ASSERT_EQ(files.size(), 1u);
  EXPECT_EQ(files[0].string(), cache.pathOf(key));

  // Another key misses; a damaged or truncated entry misses.
  EXPECT_FALSE(
      cache.lookup(cuda::compileKey("src2", "opts", "sm_90a", "13.0"), got));
  {
    std::fstream f(cache.pathOf(key),
                   std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(200);
    f.put('\x55');
  }
  EXPECT_FALSE(cache.lookup(key, got));
  ASSERT_EQ(cache.store(key, cubin), "");
  fs::resize_file(cache.pathOf(key), fs::file_size(cache.pathOf(key)) - 1);
  EXPECT_FALSE(cache.lookup(key, got));
  EXPECT_FALSE(cache.lookup("../../etc/passwd", got));

  // Disabled: nothing is stored.
  cuda::KernelCache off("");
  EXPECT_EQ(off.store(key, cubin), "");
  EXPECT_FALSE(off.lookup(key, got));
}

TEST(CudaKernelCache, DirectoryFromTheEnvironment) {
  std::string oldCache = std::getenv("L4C_CACHE_DIR")
                             ? std::getenv("L4C_CACHE_DIR")
                             : std::string();
  ::setenv("L4C_CACHE_DIR", "/tmp/l4c-env-cache", 1);
  EXPECT_EQ(cuda::cacheDirectory(), "/tmp/l4c-env-cache");
  EXPECT_EQ(cuda::cacheDirectory("/explicit"), "/explicit");
  ::unsetenv("L4C_CACHE_DIR");
  if (const char *home = std::getenv("HOME")) {
    EXPECT_EQ(cuda::cacheDirectory(), std::string(home) + "/.cache/l4c");
  }
  if (!oldCache.empty())
    ::setenv("L4C_CACHE_DIR", oldCache.c_str(), 1);
}

//===----------------------------------------------------------------------===//
// Load-time compilation with the real NVRTC
//===----------------------------------------------------------------------===//

/// One program with an entry per kernel of linearPlan, as the plan writer
/// emits kernels sharing a body; `salt` changes the code.
std::string kernelSource(const PlanSpec &p, int salt = 0) {
  std::string s = "struct L4Regions { char *arena, *weights, *cache, *io; };\n"
                  "__device__ void body(float *out, long long n, float k) {\n"
                  "  for (long long i = blockIdx.x * blockDim.x + threadIdx.x;"
                  " i < n; i += gridDim.x * blockDim.x)\n"
                  "    out[i] = out[i] * k + " +
                  std::to_string(salt) + ".0f;\n}\n";
  for (size_t k = 0; k < p.kernels.size(); ++k)
    s += "extern \"C\" __global__ void " + entryOf(p, k) +
         "(L4Regions r, long long B, long long T) {\n"
         "  body(reinterpret_cast<float *>(r.arena + " +
         std::to_string(64 * k) + "), B * T, " + std::to_string(k + 1) +
         ".0f);\n}\n";
  return s;
}

CudaPlan withSource(PlanSpec spec, int salt = 0) {
  CudaPlan cp;
  cp.spec = std::move(spec);
  cp.arch = "";
  std::string src = kernelSource(cp.spec, salt);
  for (size_t k = 0; k < cp.spec.kernels.size(); ++k) {
    CudaCode c;
    c.source = src;
    c.entry = entryOf(cp.spec, k);
    cp.code.push_back(c);
  }
  return cp;
}

class CudaNvrtcTest : public CudaBackendTest {
protected:
  void SetUp() override {
    if (!nvrtc::available())
      GTEST_SKIP() << nvrtc::loadError();
  }
  CudaOptions cached() {
    CudaOptions o;
    o.cacheDir = dir.path();
    return o;
  }
  TempDir dir;
};

TEST_F(CudaNvrtcTest, CompilesSourceAtLoadThenHitsTheCache) {
  CudaPlan cp = withSource(linearPlan());
  auto plan = parse(cp.serialize());
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan, cached()));
  const cuda::LoadStats &first = backend->loadStats();
  EXPECT_EQ(first.compiled, 1u);
  EXPECT_EQ(first.fromCache, 0u);
  EXPECT_EQ(first.modules, 1u);
  EXPECT_EQ(first.kernels, 3u);
  EXPECT_EQ(first.cacheWarning, "");
  ASSERT_EQ(fake.modules.size(), 1u);
  std::vector<uint8_t> image = fake.modules[0]->image;
  ASSERT_GT(image.size(), 4u);
  EXPECT_EQ(std::memcmp(image.data(),
                        "\x7f"
                        "ELF",
                        4),
            0);
  auto files = filesUnder(dir.path());
  ASSERT_EQ(files.size(), 1u);
  // The fake sized the image from its ELF header: the whole entry payload.
  std::vector<uint8_t> stored;
  cuda::KernelCache cache(dir.path());
  ASSERT_TRUE(cache.lookup(files[0].stem().string(), stored));
  EXPECT_EQ(stored, image);

  // Second load: from the cache, every entry of the shared source resolved.
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan, cached()));
  EXPECT_EQ(backend->loadStats().compiled, 0u);
  EXPECT_EQ(backend->loadStats().fromCache, 1u);
  ASSERT_EQ(fake.modules.size(), 2u);
  EXPECT_EQ(fake.modules[1]->image, image);
  EXPECT_EQ(fake.counts["cuModuleGetFunction"], 6);
  ASSERT_TRUE(backend->runProgram(*plan->program("forward"), 2, 4).ok());

  // Different source: a different entry, never the cached one.
  ASSERT_NO_FATAL_FAILURE(
      mustCreate(parse(withSource(linearPlan(), 1).serialize()), cached()));
  EXPECT_EQ(backend->loadStats().compiled, 1u);
  EXPECT_EQ(filesUnder(dir.path()).size(), 2u);
}

TEST_F(CudaNvrtcTest, DamagedOrUnloadableCacheEntriesAreRebuilt) {
  CudaPlan cp = withSource(linearPlan());
  auto plan = parse(cp.serialize());
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan, cached()));
  auto files = filesUnder(dir.path());
  ASSERT_EQ(files.size(), 1u);
  std::string key = files[0].stem().string();
  cuda::KernelCache cache(dir.path());

  // An entry that reads back whole but does not load.
  ASSERT_EQ(cache.store(key, std::vector<uint8_t>(16, 1)), "");
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan, cached()));
  EXPECT_EQ(backend->loadStats().compiled, 1u);
  EXPECT_EQ(backend->loadStats().fromCache, 0u);
  std::vector<uint8_t> got;
  ASSERT_TRUE(cache.lookup(key, got));
  EXPECT_EQ(std::memcmp(got.data(),
                        "\x7f"
                        "ELF",
                        4),
            0);

  // A damaged file is a miss.
  {
    std::ofstream f(files[0], std::ios::binary | std::ios::trunc);
    f << "garbage";
  }
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan, cached()));
  EXPECT_EQ(backend->loadStats().compiled, 1u);
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan, cached()));
  EXPECT_EQ(backend->loadStats().fromCache, 1u);
}

TEST_F(CudaNvrtcTest, CubinWhenItFitsSourceOtherwise) {
  CudaPlan cp = withSource(linearPlan());
  cp.arch = "sm_90a";
  std::vector<std::string> entries;
  for (const CudaCode &c : cp.code)
    entries.push_back(c.entry);
  for (CudaCode &c : cp.code)
    c.cubin = fakeCubin(entries);
  auto plan = parse(cp.serialize());

  ASSERT_NO_FATAL_FAILURE(mustCreate(plan, cached()));
  EXPECT_EQ(backend->loadStats().fromPlan, 1u);
  EXPECT_EQ(backend->loadStats().compiled, 0u);
  EXPECT_TRUE(filesUnder(dir.path()).empty());

  CudaOptions opts = cached();
  opts.preferSource = true;
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan, opts));
  EXPECT_EQ(backend->loadStats().compiled, 1u);

  // Another device: compiled for its own arch.
  fake.major = 8;
  fake.minor = 0;
  ASSERT_NO_FATAL_FAILURE(mustCreate(plan, cached()));
  EXPECT_EQ(backend->arch(), "sm_80");
  EXPECT_EQ(backend->loadStats().compiled, 1u);
  EXPECT_EQ(filesUnder(dir.path()).size(), 2u);
}

TEST_F(CudaNvrtcTest, CompileErrorNamesTheKernels) {
  CudaPlan cp = withSource(linearPlan());
  for (CudaCode &c : cp.code)
    c.source = "this is not CUDA";
  rt::Status s = create(parse(cp.serialize()), cached());
  EXPECT_EQ(s.code, rt::StatusCode::InvalidPlan);
  EXPECT_EQ(s.message.rfind("kernel 'model.embed_tokens' (#0) and 2 more "
                            "sharing its code: NVRTC failed to compile",
                            0),
            0u)
      << s.message;
  EXPECT_TRUE(filesUnder(dir.path()).empty());
}

//===----------------------------------------------------------------------===//
// The emulator (runtime/test/cuemu) as the driver
//===----------------------------------------------------------------------===//

/// Kernels as l4c emits them for the emulator: 0 and 1 do nothing, 2 copies
/// the box of its tensor map (lm_head's weight, 32-byte swizzle) with TMA
/// onto an mbarrier, then stores the swizzled stage as it lies into the
/// logits.
constexpr char kTmaSource[] = R"cuda(
struct L4Regions { char *arena, *weights, *cache, *io; };
struct __align__(64) L4TensorMap { unsigned long long v[16]; };
extern "C" __global__ void l4k_0(L4Regions r, long long B, long long T) {}
extern "C" __global__ void l4k_1(L4Regions r, long long B, long long T) {}
extern "C" __global__ void l4k_2(L4Regions r, long long B, long long T,
                                 const __grid_constant__ L4TensorMap tm0) {
  unsigned char *smem = l4emu::dynamicShared;
  unsigned long long *bar = reinterpret_cast<unsigned long long *>(smem + 1024);
  if (threadIdx.x == 0)
    l4emu::mbarInit(bar, 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    l4emu::mbarArriveExpectTx(bar, 512);
    l4emu::tmaLoad(smem, &tm0, bar, 0, 0, 0, 0, 0);
  }
  l4emu::mbarWait(bar, 0);
  float *logits = reinterpret_cast<float *>(r.io + 128);
  for (unsigned i = threadIdx.x; i < 128; i += blockDim.x)
    logits[i] = reinterpret_cast<const float *>(smem)[i] + float(B * 1000 + T * 100);
}
)cuda";

/// A backend on the emulator: each module built from its kernels' CUDA
/// source, no disk cache.
rt::Status createOnEmulator(std::shared_ptr<const rt::Plan> plan,
                            const Driver &emu,
                            std::unique_ptr<CudaBackend> &backend) {
  CudaOptions opts;
  opts.sourceImages = true;
  opts.diskCache = false;
  return CudaBackend::create(std::move(plan), 0, emu, backend, opts);
}

TEST(CudaEmulator, TmaKernelRunsThroughTheBackend) {
  std::unique_ptr<Driver> emu;
  rt::Status s = Driver::open(L4CUEMU_LIB, emu);
  ASSERT_TRUE(s.ok()) << s.message;
  ASSERT_NE(emu->api().cuTensorMapEncodeTiled, nullptr);

  PlanSpec spec = linearPlan(2, 4, 16, 8);
  TensorMapSpec w;
  w.region = pl::Region::Weights;
  w.offset = 576; // lm_head.weight, f32 [16, 8]
  w.dtype = pl::DType::F32;
  w.dims = {8, 16};
  w.strides = {32};
  w.box = {8, 16};
  w.swizzle = 1;
  spec.kernels[2].tensorMaps = {w};
  CudaPlan cp;
  cp.spec = spec;
  for (unsigned k = 0; k < 3; ++k) {
    CudaCode c;
    c.source = kTmaSource;
    c.entry = "l4k_" + std::to_string(k);
    c.threads = 64;
    c.blocks = 1;
    c.shared = 1024 + 64;
    cp.code.push_back(c);
  }
  auto plan = parse(cp.serialize());
  ASSERT_TRUE(plan);
  const rt::BufferDesc &head = plan->buffers[plan->weights[2].buffer];
  ASSERT_EQ(head.offset, 576u);
  const rt::ProgramDesc &fwd = *plan->program("forward");
  const rt::BufferDesc &logits = plan->buffers[fwd.logits];
  ASSERT_EQ(logits.offset, 128u);

  std::unique_ptr<CudaBackend> backend;
  s = createOnEmulator(plan, *emu, backend);
  ASSERT_TRUE(s.ok()) << s.message;
  std::vector<float> weight(128);
  for (size_t i = 0; i < weight.size(); ++i)
    weight[i] = float(i + 1);
  ASSERT_TRUE(
      backend->upload(head.region, head.offset, weight.data(), 512).ok());
  for (bool graph : {false, true}) {
    SCOPED_TRACE(graph ? "graph" : "direct");
    s = graph ? backend->runProgramGraph(fwd, 1, 3)
              : backend->runProgram(fwd, 2, 4);
    ASSERT_TRUE(s.ok()) << s.message;
    std::vector<float> out(128);
    s = backend->download(logits.region, logits.offset, out.data(), 512);
    ASSERT_TRUE(s.ok()) << s.message;
    // Rows of 32 bytes; in each 128 bytes the second half's 16-byte chunks
    // swap places (32-byte swizzle: address bit 4 ^= bit 7).
    float extra = graph ? 1300 : 2400;
    for (unsigned i = 0; i < 128; ++i) {
      unsigned at = i * 4;
      at ^= ((at >> 7) & 1) << 4;
      EXPECT_EQ(out[at / 4], weight[i] + extra) << "element " << i;
    }
  }
}

/// linearPlan's kernels (embedding, rms_norm, lm_head) as CUDA for the
/// emulator, in the ABI l4c emits, with one bug or none: "stray" (the norm
/// also flips the bits of its input h's first element per row, a write
/// outside its results), "stale" (lm_head adds 0 * x's last row, dead when
/// T < S: a harmless read until the bytes there are NaN), "undeclared"
/// (lm_head adds 0 * h, a live buffer but not one of its operands: the
/// memory planner could have given its bytes to another), "overrun"
/// (lm_head writes the first float past the end of the io region).
std::string linearKernels(const PlanSpec &p, const std::string &bug) {
  std::string src = R"cuda(
struct L4Regions { char *arena, *weights, *cache, *io; };
#define S 4
#define D 8
#define V 16
extern "C" __global__ void l4k_0(L4Regions r, long long B, long long T) {
  const long long *ids = (const long long *)(r.io + @input_ids@);
  const float *embed = (const float *)(r.weights + @model.embed_tokens.weight@);
  float *h = (float *)(r.arena + @h@);
  for (long long i = threadIdx.x; i < B * T * D; i += blockDim.x) {
    long long row = i / D, at = row / T * S + row % T;
    h[at * D + i % D] = embed[ids[at] * D + i % D];
  }
}
extern "C" __global__ void l4k_1(L4Regions r, long long B, long long T) {
  float *h = (float *)(r.arena + @h@);
  const float *w = (const float *)(r.weights + @model.norm.weight@);
  float *x = (float *)(r.arena + @x@);
  for (long long row = threadIdx.x; row < B * T; row += blockDim.x) {
    long long at = (row / T * S + row % T) * D;
    float ss = 0;
    for (int d = 0; d < D; ++d)
      ss += h[at + d] * h[at + d];
    float inv = 1.0f / sqrtf(ss / D + 1e-5f);
    for (int d = 0; d < D; ++d)
      x[at + d] = h[at + d] * inv * w[d];
    @stray@
  }
}
extern "C" __global__ void l4k_2(L4Regions r, long long B, long long T) {
  const float *x = (const float *)(r.arena + @x@);
  const float *head = (const float *)(r.weights + @lm_head.weight@);
  float *logits = (float *)(r.io + @logits@);
  for (long long i = threadIdx.x; i < B * T * V; i += blockDim.x) {
    long long row = i / V, v = i % V, b = row / T, at = b * S + row % T;
    float acc = 0;
    for (int d = 0; d < D; ++d)
      acc += x[at * D + d] * head[v * D + d] @stale@;
    logits[at * V + v] = acc;
  }
  @overrun@
}
)cuda";
  auto offsetOf = [&](const std::string &name) {
    for (const BufferSpec &b : p.buffers)
      if (b.name == name)
        return std::to_string(b.offset);
    ADD_FAILURE() << "no buffer " << name;
    return std::string("0");
  };
  std::map<std::string, std::string> subst = {
      {"stray", bug == "stray" ? "((unsigned *)h)[at] ^= 0xffffffffu;"
                : bug == "misaligned"
                    // A 16-byte load 4 bytes past a row's start: right on
                    // the host, a fault on a GPU.
                    ? "x[at] += 0.0f * ((const float4 *)(h + at + 1))->x;"
                    : ""},
      {"stale", bug == "stale" ? "+ 0.0f * x[(b * S + S - 1) * D + d]"
                : bug == "undeclared"
                    ? "+ 0.0f * ((const float *)(r.arena + " +
                          offsetOf("h") + "))[at * D + d]"
                    : ""},
      {"overrun",
       bug == "overrun"
           ? "if (threadIdx.x == 0) *(float *)(r.io + " +
                 std::to_string((p.regionSize[int(pl::Region::Io)] + 255) /
                                256 * 256) +
                 ") = 1.0f;"
           : ""}};
  for (const BufferSpec &b : p.buffers)
    subst[b.name] = std::to_string(b.offset);
  std::string out;
  for (size_t i = 0; i < src.size(); ++i) {
    size_t end = src[i] == '@' ? src.find('@', i + 1) : std::string::npos;
    if (end == std::string::npos) {
      out += src[i];
      continue;
    }
    out += subst.at(src.substr(i + 1, end - i - 1));
    i = end;
  }
  return out;
}

TEST(CudaEmulator, GreedyChoiceSplitsRowsAcrossBlocksAsTheCpuChooses) {
  // argmaxRows cuts each row into slices (768 logits a block at this V: 53)
  // and the last slice of a row to finish merges them: the CPU's rule
  // (first NaN, else the first index of the maximum) across slice borders.
  std::unique_ptr<Driver> emu;
  rt::Status s = Driver::open(L4CUEMU_LIB, emu);
  ASSERT_TRUE(s.ok()) << s.message;
  const int64_t B = 6, V = 40000; // 20 slices of 2048
  CudaPlan cp;
  cp.spec = linearPlan(B, 1, V, 2);
  for (unsigned k = 0; k < 3; ++k) {
    CudaCode c;
    c.source = linearKernels(cp.spec, "");
    c.entry = "l4k_" + std::to_string(k);
    c.threads = 32;
    c.blocks = 1;
    cp.code.push_back(c);
  }
  auto plan = parse(cp.serialize());
  ASSERT_TRUE(plan);
  const rt::BufferDesc &logits =
      plan->buffers[plan->program("forward")->logits];
  std::unique_ptr<CudaBackend> backend;
  s = createOnEmulator(plan, *emu, backend);
  ASSERT_TRUE(s.ok()) << s.message;

  std::vector<float> x(size_t(B * V));
  uint32_t seed = 7;
  for (float &v : x) {
    seed = seed * 1664525u + 1013904223u;
    v = float(seed >> 8) / float(1 << 24) - 0.5f;
  }
  const float nan = std::nanf(""), inf = INFINITY;
  auto at = [&](int64_t r, int64_t i) -> float & { return x[size_t(r * V + i)]; };
  at(1, 300) = at(1, 30000) = 2.0f;     // a tie across slices: the first
  at(2, 100) = 3.0f;                    // a maximum before a NaN, which wins
  at(2, 39999) = nan;
  at(3, 25000) = nan;                   // two NaNs: the first
  at(3, 4097) = nan;
  for (int64_t i = 0; i < V; ++i)       // all equal: index 0
    at(4, i) = -inf;
  at(5, V - 1) = 9.0f;                  // the last slice's last logit
  std::vector<int64_t> want(B), got(B);
  cpu::argmaxRows(x.data(), size_t(B), size_t(V), want.data());
  EXPECT_EQ(want[1], 300);
  EXPECT_EQ(want[2], 39999);
  EXPECT_EQ(want[3], 4097);
  EXPECT_EQ(want[4], 0);
  EXPECT_EQ(want[5], V - 1);

  ASSERT_TRUE(backend->upload(logits.region, logits.offset, x.data(),
                              x.size() * 4).ok());
  s = backend->argmaxRows(logits.region, logits.offset, uint64_t(V) * 4, B,
                          uint64_t(V), false, got.data());
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_EQ(got, want);
  // Again (the arrival counters are back at 0), over fewer rows.
  std::fill(got.begin(), got.end(), -1);
  s = backend->argmaxRows(logits.region, logits.offset, uint64_t(V) * 4, 3,
                          uint64_t(V), false, got.data());
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_EQ(std::vector<int64_t>(got.begin(), got.begin() + 3),
            std::vector<int64_t>(want.begin(), want.begin() + 3));

  // bf16 rows (the upper halves of the same floats), packed at V * 2.
  std::vector<uint16_t> h(x.size());
  std::vector<float> widened(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &x[i], 4);
    h[i] = uint16_t(bits >> 16);
    bits &= 0xffff0000u;
    std::memcpy(&widened[i], &bits, 4);
  }
  cpu::argmaxRows(widened.data(), size_t(B), size_t(V), want.data());
  ASSERT_TRUE(backend->upload(logits.region, logits.offset, h.data(),
                              h.size() * 2).ok());
  s = backend->argmaxRows(logits.region, logits.offset, uint64_t(V) * 2, B,
                          uint64_t(V), true, got.data());
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_EQ(got, want);
}

TEST(CudaEmulator, KernelCheckCatchesStrayWritesStaleReadsOverrunsMisalignment) {
  // l4-run --check-kernels through the emulator: before each kernel the
  // device's copy of what it must not read is NaN, and after it every byte
  // outside its results must be as it was.
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  int64_t ids[] = {3, 1, 4, 1, 5, 9}; // [2, 3]: T = 3 < S = 4
  ASSERT_TRUE(io::writeSafetensors(dir.path() + "/in.safetensors",
                                   {{"input_ids", io::DType::I64, {2, 3}, ids}})
                  .ok());
  auto run = [&](const std::string &bug) {
    CudaPlan cp;
    cp.spec = linearPlan(2, 4, 16, 8);
    for (unsigned k = 0; k < 3; ++k) {
      CudaCode c;
      c.source = linearKernels(cp.spec, bug);
      c.entry = "l4k_" + std::to_string(k);
      c.threads = 32;
      c.blocks = 1;
      cp.code.push_back(c);
    }
    std::string plan = dir.path() + "/" + (bug.empty() ? "ok" : bug) + ".l4plan";
    std::vector<uint8_t> bytes = cp.serialize();
    std::ofstream(plan, std::ios::binary)
        .write(reinterpret_cast<const char *>(bytes.data()),
               std::streamsize(bytes.size()));
    std::string cmd = "L4C_CUDA_DRIVER=" + std::string(L4CUEMU_LIB) +
                      " L4C_CUDA_IMAGE=source L4C_CUEMU_DIR=" + dir.path() +
                      "/emu " + L4RUN_PATH + " " + plan +
                      " --device=cuda --random-weights=1 --inputs " +
                      dir.path() + "/in.safetensors --check-kernels 2>&1";
    std::string out;
    FILE *f = ::popen(cmd.c_str(), "r");
    if (!f)
      return std::make_pair(-1, out);
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0)
      out.append(buf, n);
    int status = ::pclose(f);
    return std::make_pair(WIFEXITED(status) ? WEXITSTATUS(status) : -1, out);
  };
  auto has = [](const std::string &out, const std::string &want) {
    return out.find(want) != std::string::npos;
  };

  auto [rc, out] = run("");
  EXPECT_EQ(rc, 0) << out;
  EXPECT_TRUE(has(out, "check-kernels: 3 kernels, 192 result elements, 0 "
                       "wrote outside their results"))
      << out;

  std::tie(rc, out) = run("stray");
  EXPECT_EQ(rc, 1) << out;
  // 2 x 3 rows, 4 bytes each; the results themselves still match.
  EXPECT_TRUE(has(out, "check-kernels: forward kernel 1 model.norm changed 24 "
                       "bytes outside its results, the first at arena byte 0 "
                       "(in buffer 'h')"))
      << out;
  EXPECT_TRUE(has(out, "1 wrote outside their results")) << out;
  EXPECT_TRUE(has(out, "0 above 1.0e-03: FAIL")) << out;

  std::tie(rc, out) = run("stale");
  EXPECT_EQ(rc, 1) << out;
  EXPECT_TRUE(has(out, "0 wrote outside their results")) << out;
  EXPECT_TRUE(has(out, "1 above 1.0e-03: FAIL")) << out;
  // lm_head's row: NaN where the CPU has numbers, an infinite error.
  size_t row = out.find("forward  2     lm_head");
  ASSERT_NE(row, std::string::npos) << out;
  std::string line = out.substr(row, out.find('\n', row) - row);
  EXPECT_TRUE(has(line, " inf ")) << line;

  std::tie(rc, out) = run("undeclared");
  EXPECT_EQ(rc, 1) << out;
  EXPECT_TRUE(has(out, "1 above 1.0e-03: FAIL")) << out;

  // Past the end of a region: the emulator's guard page faults, and the
  // handler names the kernel.
  std::tie(rc, out) = run("overrun");
  EXPECT_NE(rc, 0) << out;
  EXPECT_TRUE(has(out, "cuemu: kernel l4k_2 touched address 0x")) << out;
  EXPECT_TRUE(has(out, ", 0 bytes past the end of the 768-byte allocation"))
      << out;

  // The emulator compiles kernels with -fsanitize=alignment.
  std::tie(rc, out) = run("misaligned");
  EXPECT_NE(rc, 0) << out;
  EXPECT_TRUE(has(out, "runtime error: member access within misaligned "
                       "address"))
      << out;
  EXPECT_TRUE(has(out, "which requires 16 byte alignment")) << out;
  EXPECT_TRUE(has(out, "cuemu: kernel l4k_1 aborted (the message above says "
                       "why)"))
      << out;
}

//===----------------------------------------------------------------------===//
// The real driver (GPU machines only)
//===----------------------------------------------------------------------===//

TEST(CudaGpu, RunsKernelsOnTheDevice) {
  const Driver *driver = nullptr;
  if (rt::Status s = Driver::load(driver); !s.ok())
    GTEST_SKIP() << s.message;
  if (!nvrtc::available())
    GTEST_SKIP() << nvrtc::loadError();
  TempDir dir;
  CudaOptions opts;
  opts.cacheDir = dir.path();
  CudaPlan cp = withSource(linearPlan(2, 4));
  auto plan = parse(cp.serialize());
  std::unique_ptr<CudaBackend> gpu;
  rt::Status s = CudaBackend::create(plan, 0, *driver, gpu, opts);
  if (!s.ok() && s.message.find("cuInit failed") != std::string::npos)
    GTEST_SKIP() << s.message;
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_FALSE(gpu->deviceName().empty());
  EXPECT_EQ(gpu->loadStats().compiled, 1u);

  // Kernel k scales floats [16k, 16k + B*T) of the arena by k + 1.
  const int64_t B = 2, T = 3;
  uint64_t arena = plan->regionSize[int(plan::Region::Arena)];
  std::vector<float> init(arena / sizeof(float)), out(init.size());
  for (size_t i = 0; i < init.size(); ++i)
    init[i] = float(i % 17) + 0.5f;
  auto expect = [&](int times) {
    for (size_t i = 0; i < init.size(); ++i) {
      size_t k = i / 16;
      bool touched = k < 3 && i % 16 < size_t(B * T);
      float want = init[i];
      for (int n = 0; touched && n < times; ++n)
        want *= float(k + 1);
      ASSERT_EQ(out[i], want) << "float " << i << " after " << times;
    }
  };
  ASSERT_TRUE(gpu->upload(plan::Region::Arena, 0, init.data(), arena).ok());
  const rt::ProgramDesc &fwd = *plan->program("forward");
  ASSERT_TRUE(gpu->startTimer().ok());
  s = gpu->runProgram(fwd, B, T);
  ASSERT_TRUE(s.ok()) << s.message;
  double ms = -1;
  s = gpu->stopTimer(ms);
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_GE(ms, 0);
  ASSERT_TRUE(gpu->download(plan::Region::Arena, 0, out.data(), arena).ok());
  expect(1);
  for (int replay = 0; replay < 2; ++replay) {
    s = gpu->runProgramGraph(fwd, B, T);
    ASSERT_TRUE(s.ok()) << s.message;
  }
  ASSERT_TRUE(gpu->synchronize().ok());
  ASSERT_TRUE(gpu->download(plan::Region::Arena, 0, out.data(), arena).ok());
  expect(3);
  EXPECT_EQ(gpu->graphCount(), 1u);

  // A second backend loads the cubin from the cache.
  gpu.reset();
  s = CudaBackend::create(plan, 0, *driver, gpu, opts);
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_EQ(gpu->loadStats().fromCache, 1u);
}

} // namespace

//===----------------------------------------------------------------------===//
// Random weights (runtime/src/random.h)
//===----------------------------------------------------------------------===//

#include "random.h"

TEST(RandomWeights, DeterministicUnitVarianceAndOrderFree) {
  uint64_t key = l4c::rt::randomKey(7, "model.layers.0.mlp.up_proj.weight");
  EXPECT_NE(key, l4c::rt::randomKey(8, "model.layers.0.mlp.up_proj.weight"));
  EXPECT_NE(key, l4c::rt::randomKey(7, "model.layers.1.mlp.up_proj.weight"));
  const uint64_t n = 1 << 18;
  std::vector<float> a(n), b(n);
  l4c::rt::fillRandom(a.data(), n, key, 0.5f);
  // Element i depends on i alone: filling the second half on its own (any
  // order, any thread) gives the same values.
  for (uint64_t i = n / 2; i < n; ++i)
    b[i] = l4c::rt::randomUnit(key, i) * 0.5f;
  for (uint64_t i = n / 2; i < n; ++i)
    ASSERT_EQ(a[i], b[i]) << i;
  double sum = 0, sq = 0, maxAbs = 0;
  for (float x : a) {
    sum += x;
    sq += double(x) * x;
    maxAbs = std::max(maxAbs, double(std::fabs(x)));
  }
  double mean = sum / n, var = sq / n - mean * mean;
  EXPECT_NEAR(mean, 0.0, 3e-3);
  EXPECT_NEAR(var, 0.25, 3e-3); // stddev 0.5
  EXPECT_LE(maxAbs, 0.5 * 1.7320508075688772 * 2 + 1e-6); // Irwin-Hall bound
  EXPECT_GT(maxAbs, 0.5 * 2.5);                          // but has tails
}

TEST(CudaRuntimeKernels, CompileWithNvrtc) {
  // The runtime's own kernels are compiled when first used, on the GPU
  // machine; CI compiles them here so that one that does not build fails
  // before any GPU run.
  if (!nvrtc::available())
    GTEST_SKIP() << nvrtc::loadError();
  for (auto [file, source] : {std::pair{"l4_optimizer.cu", cuda::kOptimizerCuda},
                              std::pair{"l4_argmax_rows.cu", cuda::kArgmaxCuda}}) {
    nvrtc::Output out;
    std::string err = nvrtc::compile(source, file, "sm_90a", {}, out);
    EXPECT_EQ(err, "") << file << "\n" << out.log;
    EXPECT_FALSE(out.cubin.empty()) << file;
  }
}

TEST(RandomWeights, DeviceGeneratorCompiles) {
  if (!nvrtc::available())
    GTEST_SKIP() << nvrtc::loadError();
  nvrtc::Output out;
  std::string err = nvrtc::compile(l4c::rt::kRandomFillCuda,
                                   "l4_fill_random.cu", "sm_90a", {}, out);
  EXPECT_EQ(err, "") << out.log;
  EXPECT_FALSE(out.cubin.empty());
}
