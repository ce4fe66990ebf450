//===- cuda_random.cpp - random weights generated on the device ----------===//
//
// CudaBackend::fillRandom: the generator of runtime/src/random.h, compiled
// once per process and device architecture with NVRTC (and kept in the disk
// cache like plan kernels), launched over a region's bytes; and
// loadRuntimeKernel, which compiles and loads the runtime's own kernels
// (this one and the optimizer's) that way.
//
//===----------------------------------------------------------------------===//
#include "cuda/cuda_backend.h"
#include "cuda/kernel_cache.h"
#include "cuda/nvrtc.h"
#include "random.h"

#include <algorithm>
#include <string_view>

namespace l4c::cuda {

using rt::Status;
using rt::StatusCode;

Status CudaBackend::loadRuntimeKernel(std::string_view source,
                                      const char *file, const char *entry,
                                      const char *what, CUfunction &fn) {
  if (fn)
    return Status::success();
  const DriverApi &a = drv_.api();
  if (!sourceImages_ && !nvrtc::available())
    return Status::fail(StatusCode::Unsupported,
                        std::string(what) + " on the device need NVRTC: " +
                            nvrtc::loadError());
  std::vector<uint8_t> cubin;
  if (sourceImages_) { // CudaOptions::sourceImages
    cubin.assign(source.begin(), source.end());
    cubin.push_back(0);
  }
  KernelCache cache(diskCache_ ? cacheDirectory(cacheDir_) : "");
  std::string text(source);
  std::string k = compileKey(text, nvrtc::defaultOptions(arch_), arch_,
                             nvrtc::version());
  if (cubin.empty() && !cache.lookup(k, cubin)) {
    nvrtc::Output out;
    std::string err = nvrtc::compile(text, file, arch_, {}, out);
    if (!err.empty())
      return Status::fail(StatusCode::Internal,
                          std::string(what) + ": " + err + "\n" + out.log);
    cubin = std::move(out.cubin);
    cache.store(k, cubin); // a cache that cannot be written costs time only
  }
  CUmodule module = nullptr;
  if (Status s = drv_.check(a.cuModuleLoadDataEx(&module, cubin.data(), 0,
                                                 nullptr, nullptr),
                            "cuModuleLoadDataEx", what);
      !s.ok())
    return s;
  modules_.push_back(module);
  return drv_.check(a.cuModuleGetFunction(&fn, module, entry),
                    "cuModuleGetFunction", what);
}

unsigned CudaBackend::streamGrid(uint64_t work, unsigned threads) const {
  uint64_t blocks = (work + threads - 1) / threads;
  return unsigned(std::min<uint64_t>(std::max<uint64_t>(blocks, 1),
                                     uint64_t(sms_ ? sms_ : 1) * 32));
}

Status CudaBackend::fillRandom(plan::Region r, uint64_t offset, uint64_t numel,
                               bool bf16, uint64_t key, float stddev) {
  if (Status s = checkRange("random weights", r, offset,
                            numel * (bf16 ? 2 : 4));
      !s.ok())
    return s;
  if (Status s = makeCurrent(); !s.ok())
    return s;
  if (Status s = loadRuntimeKernel(rt::kRandomFillCuda, "l4_fill_random.cu",
                                   "l4_fill_random", "random weights",
                                   randomFill_);
      !s.ok())
    return s;
  CUdeviceptr dst = base_[int(r)] + offset;
  unsigned long long n = numel, kk = key;
  int half = bf16;
  void *params[] = {&dst, &n, &kk, &stddev, &half};
  unsigned threads = 256;
  return drv_.check(drv_.api().cuLaunchKernel(randomFill_,
                                              streamGrid(numel, threads), 1, 1,
                                              threads, 1, 1, 0, stream_,
                                              params, nullptr),
                    "cuLaunchKernel", "random weights");
}

} // namespace l4c::cuda
