//===- cuda_modules.cpp - the kernels' code, loaded once per object -------===//
//
// Picks each kernel's code (the plan's cubin when it was built for this
// device, else its source compiled by NVRTC through the disk cache), loads
// every distinct code object once and resolves each kernel's entry in it.
//
//===----------------------------------------------------------------------===//
#include "cuda/cuda_backend.h"
#include "cuda/kernel_cache.h"
#include "cuda/nvrtc.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <string_view>
#include <system_error>
#include <thread>

namespace l4c::cuda {

using rt::Status;
using rt::StatusCode;

namespace {

std::string_view view(const flatbuffers::String *s) {
  return s ? std::string_view(s->data(), s->size()) : std::string_view();
}

/// One distinct code object and the kernels that use it.
struct Image {
  enum class Origin { Plan, Cache, Compiled };
  Origin origin = Origin::Plan;
  std::vector<uint8_t> cubin;
  std::string_view source; ///< when built from source
  std::string key;         ///< its cache key
  std::vector<uint32_t> kernels;
  std::string error, log; ///< of the compilation
  CUmodule module = nullptr;
};

void compileOne(Image &im, const std::string &name, const std::string &arch,
                nvrtc::Linking linking) {
  nvrtc::Output out;
  im.error = nvrtc::compile(im.source, name, arch, {}, out, linking);
  im.log = std::move(out.log);
  im.cubin = std::move(out.cubin);
  im.origin = Image::Origin::Compiled;
}

/// Compiles on every core: NVRTC is thread-safe and a plan's distinct
/// programs are independent.
void compileAll(std::vector<Image *> &jobs,
                const std::vector<std::string> &names, const std::string &arch,
                nvrtc::Linking linking) {
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next++) < jobs.size();)
      compileOne(*jobs[i], names[i], arch, linking);
  };
  size_t workers = std::min<size_t>(
      jobs.size(), std::max(1u, std::thread::hardware_concurrency()));
  std::vector<std::thread> threads;
  for (size_t i = 1; i < workers; ++i) {
    try {
      threads.emplace_back(work);
    } catch (const std::system_error &) {
      break; // fewer threads; this one still does the rest
    }
  }
  work();
  for (std::thread &t : threads)
    t.join();
}

} // namespace

std::string CudaBackend::archFor(int major, int minor) {
  std::string arch = "sm_" + std::to_string(major * 10 + minor);
  return major == 9 && minor == 0 ? arch + "a" : arch;
}

Status CudaBackend::checkPlan(const rt::Plan &plan) {
  if (plan.meshRanks != 1)
    return Status::fail(StatusCode::Unsupported,
                        plan.label() + ": a mesh of " +
                            std::to_string(plan.meshRanks) +
                            " ranks needs the multi-rank runtime; the cuda "
                            "backend runs one");
  const auto *kernels = plan.root().kernels();
  for (uint32_t k = 0; kernels && k < kernels->size(); ++k) {
    const plan::Kernel *kernel = kernels->Get(k);
    bool hasCode = (kernel->cubin() && kernel->cubin()->size()) ||
                   !view(kernel->cuda_source()).empty();
    if (hasCode && !view(kernel->entry()).empty())
      continue;
    return Status::fail(
        StatusCode::InvalidPlan,
        plan.label() + ": kernel '" + std::string(view(kernel->name())) +
            "' (#" + std::to_string(k) + ") has no CUDA " +
            (hasCode ? "entry" : "code") + " (plan target '" + plan.target +
            "'); compile the plan with --target=cuda to run it on a GPU");
  }
  return Status::success();
}

Status CudaBackend::loadKernels(const CudaOptions &opts) {
  const plan::Plan &root = plan_->root();
  const auto &kernels = *root.kernels();
  std::string planArch(view(root.cuda_arch()));
  // A cubin runs only on the architecture it was built for; one for plain
  // sm_90 also runs where we would build sm_90a.
  bool cubinFits = !opts.preferSource && !planArch.empty() &&
                   (planArch == arch_ || planArch + "a" == arch_);


  // Kernels of identical layers share one code object with an entry each;
  // the plan writer stores it once, so most share the same bytes, and equal
  // bytes stored twice still share one module.
  std::vector<Image> images;
  std::map<std::pair<const void *, size_t>, size_t> byAddress;
  std::map<Digest, size_t> byDigest;
  std::vector<size_t> imageOf(kernels.size());
  for (uint32_t k = 0; k < kernels.size(); ++k) {
    const plan::Kernel *kernel = kernels.Get(k);
    const auto *cubin = kernel->cubin();
    std::string_view source = view(kernel->cuda_source());
    if (sourceImages_) { // CudaOptions::sourceImages
      if (source.empty())
        return Status::fail(StatusCode::Unsupported,
                            plan_->label() + ": " + kernelLabel(k) +
                                " has no CUDA source to use as its module image");
      auto [at, fresh] = byAddress.try_emplace({source.data(), source.size()},
                                               images.size());
      if (fresh) {
        Image im;
        im.cubin.assign(source.begin(), source.end());
        im.cubin.push_back(0);
        images.push_back(std::move(im));
      }
      imageOf[k] = at->second;
      images[at->second].kernels.push_back(k);
      continue;
    }
    bool useCubin = cubinFits && cubin && cubin->size();
    if (!useCubin && source.empty()) {
      std::string built = planArch.empty()
                              ? "an architecture the plan does not name"
                              : "'" + planArch + "'";
      std::string reason = opts.preferSource
                               ? "compiling from source was asked for"
                               : deviceName_ + " needs " + arch_;
      return Status::fail(StatusCode::Unsupported,
                          plan_->label() + ": " + kernelLabel(k) +
                              " has a cubin for " + built + " only, and " +
                              reason +
                              "; the plan carries no CUDA source to compile "
                              "for it");
    }
    const void *bytes = useCubin ? static_cast<const void *>(cubin->data())
                                 : static_cast<const void *>(source.data());
    size_t size = useCubin ? cubin->size() : source.size();
    auto [at, fresh] = byAddress.try_emplace({bytes, size}, 0);
    if (fresh) {
      Sha256 h;
      h.field(useCubin ? "cubin" : "source");
      h.update(bytes, size);
      auto [same, isNew] = byDigest.try_emplace(h.finish(), images.size());
      if (isNew) {
        Image im;
        if (useCubin)
          // A copy: the driver may want more alignment than a FlatBuffers
          // vector of bytes promises.
          im.cubin.assign(cubin->begin(), cubin->end());
        else
          im.source = source;
        images.push_back(std::move(im));
      }
      at->second = same->second;
    }
    imageOf[k] = at->second;
    images[at->second].kernels.push_back(k);
  }

  auto imageLabel = [&](const Image &im) {
    std::string s = kernelLabel(im.kernels.front());
    if (im.kernels.size() > 1)
      s += " and " + std::to_string(im.kernels.size() - 1) +
           " more sharing its code";
    return s;
  };

  // NVRTC's name for the program, which its messages quote.
  auto programName = [&](const Image &im) {
    return std::string(view(kernels.Get(im.kernels.front())->entry())) + ".cu";
  };

  // Source: the disk cache first, then NVRTC for the rest, in parallel.
  KernelCache cache(opts.diskCache ? cacheDirectory(opts.cacheDir) : "");
  nvrtc::Linking linking = nvrtc::Linking::WholeProgram;
  std::vector<Image *> misses;
  std::vector<std::string> names;
  for (Image &im : images) {
    if (im.source.empty())
      continue;
    if (!nvrtc::available())
      return Status::fail(StatusCode::Unsupported,
                          imageLabel(im) + ": compiling its CUDA source for " +
                              arch_ + " needs NVRTC: " + nvrtc::loadError());
    // Separate compilation compiles a body shared by many entries once, as
    // the plan writer does; it needs nvJitLink.
    if (nvrtc::linkerLoadError().empty())
      linking = nvrtc::Linking::Separate;
    im.key = compileKey(im.source, nvrtc::defaultOptions(arch_, linking), arch_,
                        nvrtc::version());
    if (cache.lookup(im.key, im.cubin)) {
      im.origin = Image::Origin::Cache;
      continue;
    }
    misses.push_back(&im);
    names.push_back(programName(im));
  }
  if (!misses.empty()) {
    auto t0 = std::chrono::steady_clock::now();
    compileAll(misses, names, arch_, linking);
    stats_.compileSeconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
            .count();
    for (Image *im : misses) {
      if (!im->error.empty())
        return Status::fail(StatusCode::InvalidPlan,
                            imageLabel(*im) + ": " + im->error +
                                (im->log.empty() ? "" : "\n" + im->log));
      std::string warning = cache.store(im->key, im->cubin);
      if (!warning.empty() && stats_.cacheWarning.empty())
        stats_.cacheWarning = warning;
    }
  }

  const DriverApi &a = drv_.api();
  for (Image &im : images) {
    char log[4096] = {0};
    auto load = [&]() {
      CUjit_option keys[] = {CU_JIT_ERROR_LOG_BUFFER,
                             CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES};
      void *values[] = {log, reinterpret_cast<void *>(uintptr_t(sizeof(log)))};
      return a.cuModuleLoadDataEx(&im.module, im.cubin.data(), 2, keys, values);
    };
    CUresult r = load();
    if (r != CUDA_SUCCESS && im.origin == Image::Origin::Cache) {
      // A damaged or stale entry: build it afresh and replace it.
      cache.remove(im.key);
      compileOne(im, programName(im), arch_, linking);
      if (!im.error.empty())
        return Status::fail(StatusCode::InvalidPlan,
                            imageLabel(im) + ": " + im.error +
                                (im.log.empty() ? "" : "\n" + im.log));
      cache.store(im.key, im.cubin);
      r = load();
    }
    if (r != CUDA_SUCCESS) {
      Status s = drv_.check(r, "cuModuleLoadDataEx", imageLabel(im));
      if (log[0])
        s.message += "\n" + std::string(log);
      return s;
    }
    modules_.push_back(im.module);
    ++stats_.modules;
    switch (im.origin) {
    case Image::Origin::Plan:
      ++stats_.fromPlan;
      break;
    case Image::Origin::Cache:
      ++stats_.fromCache;
      break;
    case Image::Origin::Compiled:
      ++stats_.compiled;
      break;
    }
    im.cubin = std::vector<uint8_t>(); // the driver has its own copy
  }

  launches_.resize(kernels.size());
  // Programmatic dependent launch: Hopper (compute capability 9.0) onwards,
  // unless the caller or L4C_PDL=0 turns it off.
  const char *pdl = std::getenv("L4C_PDL");
  const bool programmatic = opts.programmaticLaunch &&
                            !(pdl && std::strcmp(pdl, "0") == 0) &&
                            ccMajor_ >= 9 && drv_.api().cuLaunchKernelEx;
  for (uint32_t k = 0; k < kernels.size(); ++k) {
    const plan::Kernel *kernel = kernels.Get(k);
    std::string entry(view(kernel->entry()));
    std::string what = kernelLabel(k) + ", entry '" + entry + "'";
    Launch &l = launches_[k];
    if (Status s =
            drv_.check(a.cuModuleGetFunction(&l.fn, images[imageOf[k]].module,
                                             entry.c_str()),
                       "cuModuleGetFunction", what);
        !s.ok())
      return s;
    if (kernel->threads() < 1 || kernel->threads() > unsigned(maxThreads_))
      return Status::fail(StatusCode::InvalidPlan,
                          what + ": " + std::to_string(kernel->threads()) +
                              " threads per block is outside [1, " +
                              std::to_string(maxThreads_) + "] on " +
                              deviceName_);
    if (kernel->blocks() < 1)
      return Status::fail(StatusCode::InvalidPlan,
                          what + ": a grid of 0 blocks");
    // What the code itself needs, which the plan cannot know: registers
    // bound the threads a block may have, static shared memory adds to the
    // dynamic. Checked here so that a kernel that could never launch fails
    // the load with its name, not the first run with a launch error.
    int fnThreads = 0, regs = 0, localBytes = 0, staticShared = 0;
    struct {
      int attrib;
      int *value;
    } fnAttrs[] = {
        {CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, &fnThreads},
        {CU_FUNC_ATTRIBUTE_NUM_REGS, &regs},
        {CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, &localBytes},
        {CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, &staticShared},
    };
    for (auto &at : fnAttrs)
      if (Status s = drv_.check(a.cuFuncGetAttribute(at.value, at.attrib, l.fn),
                                "cuFuncGetAttribute", what);
          !s.ok())
        return s;
    if (kernel->threads() > unsigned(fnThreads))
      return Status::fail(StatusCode::Unsupported,
                          what + ": launched with " +
                              std::to_string(kernel->threads()) +
                              " threads a block, but its code (" +
                              std::to_string(regs) +
                              " registers a thread) allows at most " +
                              std::to_string(fnThreads) + " on " + deviceName_);
    uint64_t shared = uint64_t(kernel->shared_bytes()) + uint64_t(staticShared);
    if (shared > uint64_t(maxSharedOptin_))
      return Status::fail(
          StatusCode::Unsupported,
          what + ": " + std::to_string(kernel->shared_bytes()) +
              " bytes of dynamic shared memory" +
              (staticShared ? " and " + std::to_string(staticShared) +
                                  " of static"
                            : std::string()) +
              " exceed the " + std::to_string(maxSharedOptin_) + " of " +
              deviceName_);
    stats_.code.push_back({regs, localBytes, staticShared, fnThreads});
    if (regs > stats_.maxRegisters) {
      stats_.maxRegisters = regs;
      stats_.maxRegistersKernel = kernelLabel(k);
    }
    if (localBytes > 0) {
      ++stats_.localMemoryKernels;
      stats_.maxLocalBytes =
          std::max<uint64_t>(stats_.maxLocalBytes, uint64_t(localBytes));
    }
    // Beyond 48 KiB of dynamic shared memory a function must opt in.
    if (kernel->shared_bytes() > (48u << 10))
      if (Status s = drv_.check(
              a.cuFuncSetAttribute(
                  l.fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                  int(kernel->shared_bytes())),
              "cuFuncSetAttribute", what);
          !s.ok())
        return s;
    l.grid = std::min(kernel->blocks(), maxBlocks_);
    l.threads = kernel->threads();
    l.sharedBytes = kernel->shared_bytes();
    // The launch attribute only where the entry waits (an older plan's
    // entries do not).
    l.programmatic = programmatic && kernel->grid_wait();
    stats_.programmatic += l.programmatic;
  }
  stats_.kernels = kernels.size();
  return Status::success();
}

} // namespace l4c::cuda
