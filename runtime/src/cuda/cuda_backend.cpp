//===- cuda_backend.cpp - runs a plan's kernels on one GPU ----------------===//
//
// Device setup, region memory, copies, program launches (direct and through
// CUDA graphs) and event timing. Kernel loading lives in cuda_modules.cpp.
//
//===----------------------------------------------------------------------===//
#include "cuda/cuda_backend.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace l4c::cuda {

using rt::Status;
using rt::StatusCode;

namespace {


constexpr uint64_t kAlign = 256;

} // namespace

Status CudaBackend::open(std::shared_ptr<const rt::Plan> plan, int device,
                         const Driver &driver, const CudaOptions &opts,
                         std::unique_ptr<CudaBackend> &out) {
  if (!plan)
    return Status::fail(StatusCode::InvalidArgument, "no plan given");
  if (Status s = checkPlan(*plan); !s.ok())
    return s;
  // The destructor releases whatever a failed step left behind.
  std::unique_ptr<CudaBackend> b(new CudaBackend(std::move(plan), driver));
  b->configure(opts);
  if (Status s = b->openDevice(device); !s.ok())
    return s;
  if (Status s = b->queryMemory(); !s.ok())
    return s;
  out = std::move(b);
  return Status::success();
}

Status CudaBackend::create(std::shared_ptr<const rt::Plan> plan, int device,
                           const Driver &driver,
                           std::unique_ptr<CudaBackend> &out,
                           const CudaOptions &opts) {
  std::unique_ptr<CudaBackend> b;
  if (Status s = open(std::move(plan), device, driver, opts, b); !s.ok())
    return s;
  // Before any allocation: a plan too large for the device fails with the
  // whole account, not with the first region the driver refuses.
  if (Status s = b->checkMemory(); !s.ok())
    return s;
  if (Status s = b->allocateRegions(); !s.ok())
    return s;
  // Before the kernels: a driver that cannot encode them fails the load
  // before any compiling.
  if (Status s = b->encodeTensorMaps(); !s.ok())
    return s;
  if (Status s = b->loadKernels(opts); !s.ok())
    return s;
  out = std::move(b);
  return Status::success();
}

Status CudaBackend::probe(std::shared_ptr<const rt::Plan> plan, int device,
                          const Driver &driver, DeviceReport &out,
                          const CudaOptions &opts) {
  std::unique_ptr<CudaBackend> b;
  if (Status s = open(std::move(plan), device, driver, opts, b); !s.ok())
    return s;
  if (Status s = b->loadKernels(opts); !s.ok())
    return s;
  out.deviceName = b->deviceName_;
  out.arch = b->arch_;
  out.multiprocessors = b->sms_;
  out.freeBytes = b->freeBytes_;
  out.totalBytes = b->totalBytes_;
  out.need = memoryNeed(*b->plan_);
  out.load = b->stats_;
  return Status::success();
}

void CudaBackend::configure(const CudaOptions &opts) {
  maxBlocks_ = opts.maxBlocks ? opts.maxBlocks : kDefaultMaxBlocks;
  cacheDir_ = opts.cacheDir;
  diskCache_ = opts.diskCache;
  const char *image = std::getenv("L4C_CUDA_IMAGE");
  sourceImages_ =
      opts.sourceImages || (image && std::strcmp(image, "source") == 0);
  const char *sync = std::getenv("L4C_CUDA_SYNC");
  syncEachLaunch_ =
      opts.syncEachLaunch || (sync && *sync && std::strcmp(sync, "0") != 0);
}

uint64_t MemoryNeed::total() const {
  return region[0] + region[1] + region[2] + region[3] + optimizer + greedy;
}

std::string MemoryNeed::describe() const {
  std::vector<std::pair<uint64_t, std::string>> parts;
  for (int r = 0; r < 4; ++r)
    if (region[r])
      parts.push_back({region[r], rt::regionName(plan::Region(r))});
  if (optimizer)
    parts.push_back({optimizer, "optimizer state"});
  if (greedy)
    parts.push_back({greedy, "greedy choice"});
  std::stable_sort(parts.begin(), parts.end(),
                   [](const auto &x, const auto &y) { return x.first > y.first; });
  std::string s;
  for (const auto &[bytes, name] : parts)
    s += (s.empty() ? "" : ", ") + name + " " + rt::byteSize(bytes);
  return s;
}

MemoryNeed CudaBackend::memoryNeed(const rt::Plan &plan) {
  MemoryNeed n;
  for (int r = 0; r < 4; ++r)
    n.region[r] = (plan.regionSize[r] + kAlign - 1) / kAlign * kAlign;
  if (plan.program("train_step")) {
    std::vector<OptTensor> tensors;
    for (const rt::WeightDesc &w : plan.weights) {
      const rt::BufferDesc &b = plan.buffers[w.buffer];
      OptTensor t;
      t.numel = b.numel;
      t.bf16 = b.dtype == plan::DType::BF16;
      tensors.push_back(t);
    }
    n.optimizer = optimizerBytes(tensors);
  }
  // argmaxRows' memory, for at most one row a batch entry and a history
  // as long as a generation can be.
  if (plan.program("decode"))
    n.greedy = greedyBytes(plan.maxBatch, uint64_t(plan.vocabSize),
                           uint64_t(plan.maxSeq));
  return n;
}

Status CudaBackend::queryMemory() {
  size_t freeBytes = 0, totalBytes = 0;
  if (Status s = drv_.check(drv_->cuMemGetInfo(&freeBytes, &totalBytes),
                            "cuMemGetInfo", deviceName_);
      !s.ok())
    return s;
  freeBytes_ = freeBytes;
  totalBytes_ = totalBytes;
  return Status::success();
}

Status CudaBackend::checkMemory() const {
  MemoryNeed need = memoryNeed(*plan_);
  if (need.total() <= freeBytes_)
    return Status::success();
  uint64_t fixed = need.region[int(plan::Region::Weights)] + need.optimizer;
  std::string model = need.optimizer ? "the weights and optimizer state"
                                     : "the weights";
  std::string why;
  if (fixed <= freeBytes_) {
    why = model + " fit, the rest does not; a smaller --max-batch or "
                  "--max-seq shrinks the arena and the KV cache";
  } else {
    why = model + " alone exceed it: the model needs several GPUs (sharding "
                  "a plan over devices is not implemented yet)";
    if (plan_->precision == "f32")
      why += " or bf16 weights (--precision=bf16 halves them)";
  }
  return Status::fail(StatusCode::OutOfMemory,
                      plan_->label() + ": needs " + rt::byteSize(need.total()) +
                          " of device memory (" + need.describe() + "), but " +
                          deviceName_ + " has " + rt::byteSize(freeBytes_) +
                          " free of " + rt::byteSize(totalBytes_) + "; " + why);
}

Status CudaBackend::openDevice(int device) {
  const DriverApi &a = drv_.api();
  if (Status s = drv_.check(a.cuInit(0), "cuInit", "cuda"); !s.ok())
    return s;
  int count = 0;
  if (Status s =
          drv_.check(a.cuDeviceGetCount(&count), "cuDeviceGetCount", "cuda");
      !s.ok())
    return s;
  if (device < 0 || device >= count)
    return Status::fail(StatusCode::InvalidArgument,
                        "cuda device " + std::to_string(device) +
                            " does not exist (this machine has " +
                            std::to_string(count) + ")");
  std::string where = "cuda device " + std::to_string(device);
  if (Status s =
          drv_.check(a.cuDeviceGet(&device_, device), "cuDeviceGet", where);
      !s.ok())
    return s;
  char name[256] = {0};
  if (Status s = drv_.check(a.cuDeviceGetName(name, sizeof(name) - 1, device_),
                            "cuDeviceGetName", where);
      !s.ok())
    return s;
  deviceName_ = name;
  int major = 0, minor = 0;
  struct {
    int attrib;
    int *value;
  } attrs[] = {
      {CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, &major},
      {CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, &minor},
      {CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, &sms_},
      {CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK, &maxThreads_},
      {CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, &maxSharedOptin_},
  };
  for (auto &at : attrs)
    if (Status s =
            drv_.check(a.cuDeviceGetAttribute(at.value, at.attrib, device_),
                       "cuDeviceGetAttribute", where);
        !s.ok())
      return s;
  arch_ = archFor(major, minor);
  ccMajor_ = major;
  where += " (" + deviceName_ + ")";
  if (Status s = drv_.check(a.cuDevicePrimaryCtxRetain(&ctx_, device_),
                            "cuDevicePrimaryCtxRetain", where);
      !s.ok())
    return s;
  ctxRetained_ = true;
  if (Status s = makeCurrent(); !s.ok())
    return s;
  // Non-blocking: work other libraries queue on the legacy default stream
  // neither waits for ours nor breaks a capture in progress.
  return drv_.check(a.cuStreamCreate(&stream_, CU_STREAM_NON_BLOCKING),
                    "cuStreamCreate", where);
}

Status CudaBackend::allocateRegions() {
  const DriverApi &a = drv_.api();
  for (int r = 0; r < 4; ++r) {
    uint64_t size = plan_->regionSize[r];
    if (size == 0)
      continue;
    size = (size + kAlign - 1) / kAlign * kAlign;
    std::string what = std::string("region '") + rt::regionName(plan::Region(r)) +
                       "' (" + std::to_string(size) + " bytes)";
    if (Status s = drv_.check(a.cuMemAlloc(&base_[r], size_t(size)),
                              "cuMemAlloc", what);
        !s.ok())
      return s;
    size_[r] = size;
    if (base_[r] % kAlign != 0)
      return Status::fail(StatusCode::Internal,
                          what + ": the driver returned an address that is "
                                 "not 256-byte aligned");
    // Zero everything, as the CPU backend's fresh mappings are: the KV
    // cache must start empty, and padding rows then read as zeros on both.
    if (Status s =
            drv_.check(a.cuMemsetD8Async(base_[r], 0, size_t(size), stream_),
                       "cuMemsetD8Async", what);
        !s.ok())
      return s;
  }
  return drv_.check(a.cuStreamSynchronize(stream_), "cuStreamSynchronize",
                    "zeroing the regions");
}

Status CudaBackend::encodeTensorMaps() {
  const DriverApi &a = drv_.api();
  tensorMaps_.assign(plan_->kernels.size(), {});
  for (uint32_t k = 0; k < plan_->kernels.size(); ++k) {
    const std::vector<rt::TensorMapDesc> &descs = plan_->kernels[k].tensorMaps;
    if (descs.empty())
      continue;
    if (!a.cuTensorMapEncodeTiled)
      return Status::fail(
          StatusCode::Unsupported,
          plan_->label() + ": " + kernelLabel(k) + " takes " +
              std::to_string(descs.size()) +
              " TMA tensor map(s), but the cuda driver (" + drv_.label() +
              ") has no cuTensorMapEncodeTiled (it needs a CUDA 12 or newer "
              "driver)");
    std::vector<CUtensorMap> &maps = tensorMaps_[k];
    maps.resize(descs.size());
    for (size_t i = 0; i < descs.size(); ++i) {
      // The plan verifier checked every rule of cuTensorMapEncodeTiled that
      // does not depend on the address, and that the map stays inside its
      // region; the regions are 256-byte aligned.
      const rt::TensorMapDesc &d = descs[i];
      unsigned rank = unsigned(d.dims.size());
      unsigned long long dims[5] = {0}, strides[4] = {0};
      unsigned box[5] = {0}, elementStrides[5] = {1, 1, 1, 1, 1};
      for (unsigned j = 0; j < rank; ++j) {
        dims[j] = d.dims[j];
        box[j] = d.box[j];
        if (j + 1 < rank)
          strides[j] = d.strides[j];
      }
      void *address =
          reinterpret_cast<void *>(uintptr_t(base_[int(d.region)] + d.offset));
      int dtype = d.dtype == plan::DType::BF16
                      ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                      : CU_TENSOR_MAP_DATA_TYPE_FLOAT32;
      if (Status s =
              drv_.check(a.cuTensorMapEncodeTiled(
                             &maps[i], dtype, rank, address, dims, strides, box,
                             elementStrides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                             int(d.swizzle), CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
                         "cuTensorMapEncodeTiled",
                         kernelLabel(k) + " tensor map " + std::to_string(i));
          !s.ok())
        return s;
    }
  }
  return Status::success();
}

CudaBackend::~CudaBackend() {
  // Best effort: a destructor has no one to report to, and a failed call
  // here must not stop the rest from being released.
  const DriverApi &a = drv_.api();
  if (!ctx_)
    return;
  a.cuCtxSetCurrent(ctx_);
  if (stream_)
    a.cuStreamSynchronize(stream_);
  for (auto &entry : graphs_)
    a.cuGraphExecDestroy(entry.second.exec);
  if (timerStart_)
    a.cuEventDestroy(timerStart_);
  if (timerStop_)
    a.cuEventDestroy(timerStop_);
  for (CUmodule m : modules_)
    a.cuModuleUnload(m);
  for (CUdeviceptr p : base_)
    if (p)
      a.cuMemFree(p);
  if (optBase_)
    a.cuMemFree(optBase_);
  if (argmaxOut_)
    a.cuMemFree(argmaxOut_);
  if (stream_)
    a.cuStreamDestroy(stream_);
  if (ctxRetained_)
    a.cuDevicePrimaryCtxRelease(device_);
}

Status CudaBackend::makeCurrent() const {
  return drv_.check(drv_->cuCtxSetCurrent(ctx_), "cuCtxSetCurrent",
                    "cuda device '" + deviceName_ + "'");
}

std::string CudaBackend::kernelLabel(uint32_t k) const {
  return "kernel '" + plan_->kernels[k].name + "' (#" + std::to_string(k) + ")";
}

Status CudaBackend::checkRange(const char *what, plan::Region r,
                               uint64_t offset, uint64_t bytes) const {
  uint64_t size = plan_->regionSize[int(r)];
  if (offset > size || bytes > size - offset)
    return Status::fail(StatusCode::InvalidArgument,
                        std::string(what) + " of " + std::to_string(bytes) +
                            " bytes at offset " + std::to_string(offset) +
                            " exceeds region '" + rt::regionName(r) + "' of " +
                            std::to_string(size) + " bytes");
  return Status::success();
}

Status CudaBackend::streamError(Status s) const {
  if (s.ok() || lastRun_.empty())
    return s;
  s.message +=
      " (after " + lastRun_ +
      (syncEachLaunch_ ? ")" : "; set L4C_CUDA_SYNC=1 to name the kernel)");
  return s;
}

Status CudaBackend::upload(plan::Region r, uint64_t offset, const void *src,
                           uint64_t bytes) {
  if (Status s = checkRange("upload", r, offset, bytes); !s.ok())
    return s;
  if (bytes == 0)
    return Status::success();
  if (Status s = makeCurrent(); !s.ok())
    return s;
  std::string what = std::string("upload to region '") + rt::regionName(r) + "' [" +
                     std::to_string(offset) + ", +" + std::to_string(bytes) +
                     ")";
  const DriverApi &a = drv_.api();
  if (Status s = drv_.check(a.cuMemcpyHtoDAsync(base_[int(r)] + offset, src,
                                                size_t(bytes), stream_),
                            "cuMemcpyHtoDAsync", what);
      !s.ok())
    return streamError(s);
  // Pageable memory may still be read after the call returns: wait, so the
  // caller can reuse `src` at once.
  return streamError(
      drv_.check(a.cuStreamSynchronize(stream_), "cuStreamSynchronize", what));
}

Status CudaBackend::download(plan::Region r, uint64_t offset, void *dst,
                             uint64_t bytes) {
  if (Status s = checkRange("download", r, offset, bytes); !s.ok())
    return s;
  if (bytes == 0)
    return Status::success();
  if (Status s = makeCurrent(); !s.ok())
    return s;
  std::string what = std::string("download from region '") + rt::regionName(r) +
                     "' [" + std::to_string(offset) + ", +" +
                     std::to_string(bytes) + ")";
  return fetch(base_[int(r)] + offset, dst, size_t(bytes), what);
}

Status CudaBackend::fetch(CUdeviceptr src, void *dst, size_t bytes,
                          const std::string &what) {
  const DriverApi &a = drv_.api();
  if (Status s = drv_.check(a.cuMemcpyDtoHAsync(dst, src, bytes, stream_),
                            "cuMemcpyDtoHAsync", what);
      !s.ok())
    return streamError(s);
  return streamError(
      drv_.check(a.cuStreamSynchronize(stream_), "cuStreamSynchronize", what));
}

Status CudaBackend::fill(plan::Region r, uint64_t offset, uint64_t bytes,
                         uint8_t value) {
  if (Status s = checkRange("fill", r, offset, bytes); !s.ok())
    return s;
  if (bytes == 0)
    return Status::success();
  if (Status s = makeCurrent(); !s.ok())
    return s;
  return drv_.check(drv_->cuMemsetD8Async(base_[int(r)] + offset, value,
                                          size_t(bytes), stream_),
                    "cuMemsetD8Async",
                    std::string("fill of region '") + rt::regionName(r) + "'");
}

Status CudaBackend::checkExtents(const rt::ProgramDesc &prog, int64_t B,
                                 int64_t T) const {
  if (B < 1 || B > plan_->maxBatch)
    return Status::fail(StatusCode::InvalidArgument,
                        "program '" + prog.name + "': batch " +
                            std::to_string(B) + " is outside [1, " +
                            std::to_string(plan_->maxBatch) + "]");
  if (T < 1 || (prog.seqCapacity > 0 && T > prog.seqCapacity))
    return Status::fail(StatusCode::InvalidArgument,
                        "program '" + prog.name + "': length " +
                            std::to_string(T) + " is outside [1, " +
                            std::to_string(prog.seqCapacity) + "]");
  for (uint32_t k : prog.steps)
    if (k >= launches_.size())
      return Status::fail(StatusCode::InvalidArgument,
                          "program '" + prog.name + "' runs kernel " +
                              std::to_string(k) + ", which the plan lacks");
  return Status::success();
}

Status CudaBackend::launchKernel(uint32_t k, L4Regions &regions, long long &B,
                                 long long &T, std::vector<void *> &params,
                                 bool programmatic) {
  const Launch &l = launches_[k];
  params.assign({&regions, &B, &T});
  for (CUtensorMap &m : tensorMaps_[k])
    params.push_back(&m);
  if (l.programmatic && programmatic) {
    CUlaunchAttribute attr{};
    attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    CUlaunchConfig config{l.grid,          1,       1,     l.threads, 1, 1,
                          l.sharedBytes, stream_, &attr, 1};
    return drv_.check(drv_->cuLaunchKernelEx(&config, l.fn, params.data(),
                                             nullptr),
                      "cuLaunchKernelEx", kernelLabel(k));
  }
  return drv_.check(drv_->cuLaunchKernel(l.fn, l.grid, 1, 1, l.threads, 1, 1,
                                         l.sharedBytes, stream_, params.data(),
                                         nullptr),
                    "cuLaunchKernel", kernelLabel(k));
}

Status CudaBackend::launchSteps(const rt::ProgramDesc &prog, long long B,
                                long long T, bool capturing) {
  const DriverApi &a = drv_.api();
  L4Regions regions{base_[0], base_[1], base_[2], base_[3]};
  std::vector<void *> params;
  for (uint32_t k : prog.steps) {
    if (Status s = launchKernel(k, regions, B, T, params); !s.ok())
      return s;
    if (syncEachLaunch_ && !capturing)
      if (Status s = drv_.check(a.cuStreamSynchronize(stream_),
                                "cuStreamSynchronize", kernelLabel(k));
          !s.ok())
        return s;
  }
  return Status::success();
}

Status CudaBackend::runProgram(const rt::ProgramDesc &prog, int64_t B,
                               int64_t T) {
  if (Status s = checkExtents(prog, B, T); !s.ok())
    return s;
  if (Status s = makeCurrent(); !s.ok())
    return s;
  lastRun_ = "program '" + prog.name + "' (B=" + std::to_string(B) +
             ", T=" + std::to_string(T) + ")";
  return launchSteps(prog, B, T, /*capturing=*/false);
}

Status CudaBackend::profileProgram(const rt::ProgramDesc &prog, int64_t B,
                                   int64_t T, std::vector<double> &ms) {
  if (Status s = checkExtents(prog, B, T); !s.ok())
    return s;
  if (Status s = makeCurrent(); !s.ok())
    return s;
  const DriverApi &a = drv_.api();
  lastRun_ = "profile of program '" + prog.name + "' (B=" + std::to_string(B) +
             ", T=" + std::to_string(T) + ")";
  std::vector<CUevent> events(prog.steps.size() + 1, nullptr);
  auto release = [&] {
    for (CUevent e : events)
      if (e)
        a.cuEventDestroy(e);
  };
  for (CUevent &e : events)
    if (Status s = drv_.check(a.cuEventCreate(&e, 0), "cuEventCreate",
                              "kernel profile");
        !s.ok()) {
      release();
      return s;
    }
  long long b = B, t = T;
  L4Regions regions{base_[0], base_[1], base_[2], base_[3]};
  std::vector<void *> params;
  Status st = drv_.check(a.cuEventRecord(events[0], stream_), "cuEventRecord",
                         "kernel profile");
  for (size_t i = 0; st.ok() && i < prog.steps.size(); ++i) {
    uint32_t k = prog.steps[i];
    st = launchKernel(k, regions, b, t, params, /*programmatic=*/false);
    if (st.ok())
      st = drv_.check(a.cuEventRecord(events[i + 1], stream_),
                      "cuEventRecord", kernelLabel(k));
  }
  if (st.ok())
    st = streamError(drv_.check(a.cuEventSynchronize(events.back()),
                                "cuEventSynchronize", "kernel profile"));
  ms.assign(prog.steps.size(), 0.0);
  for (size_t i = 0; st.ok() && i < prog.steps.size(); ++i) {
    float v = 0;
    st = drv_.check(a.cuEventElapsedTime(&v, events[i], events[i + 1]),
                    "cuEventElapsedTime", kernelLabel(prog.steps[i]));
    ms[i] = v;
  }
  release();
  return st;
}

Status CudaBackend::runProgramGraph(const rt::ProgramDesc &prog, int64_t B,
                                    int64_t T) {
  if (Status s = checkExtents(prog, B, T); !s.ok())
    return s;
  if (Status s = makeCurrent(); !s.ok())
    return s;
  const DriverApi &a = drv_.api();
  lastRun_ = "graph of program '" + prog.name + "' (B=" + std::to_string(B) +
             ", T=" + std::to_string(T) + ")";
  auto key = std::make_tuple(prog.name, B, T);
  auto it = graphs_.find(key);
  if (it == graphs_.end()) {
    if (graphs_.size() >= kMaxGraphs) {
      auto oldest = std::min_element(
          graphs_.begin(), graphs_.end(), [](const auto &x, const auto &y) {
            return x.second.lastUse < y.second.lastUse;
          });
      // Allowed with a replay in flight: the driver frees the graph once
      // that replay completes.
      a.cuGraphExecDestroy(oldest->second.exec);
      graphs_.erase(oldest);
    }
    std::string what = "capturing program '" + prog.name + "'";
    if (Status s = drv_.check(a.cuStreamBeginCapture(
                                  stream_, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
                              "cuStreamBeginCapture", what);
        !s.ok())
      return s;
    Status launched = launchSteps(prog, B, T, /*capturing=*/true);
    // End the capture even after a failed launch: it returns the stream to
    // normal use, and the partial graph is dropped.
    CUgraph graph = nullptr;
    Status ended = drv_.check(a.cuStreamEndCapture(stream_, &graph),
                              "cuStreamEndCapture", what);
    if (!launched.ok() || !ended.ok()) {
      if (graph)
        a.cuGraphDestroy(graph);
      return launched.ok() ? ended : launched;
    }
    CUgraphExec exec = nullptr;
    Status inst = drv_.check(a.cuGraphInstantiateWithFlags(&exec, graph, 0),
                             "cuGraphInstantiateWithFlags", what);
    // The executable graph is independent of the graph it came from.
    a.cuGraphDestroy(graph);
    if (!inst.ok())
      return inst;
    it = graphs_.emplace(key, Graph{exec, 0}).first;
  }
  it->second.lastUse = ++graphClock_;
  if (Status s =
          drv_.check(a.cuGraphLaunch(it->second.exec, stream_), "cuGraphLaunch",
                     "graph of program '" + prog.name + "'");
      !s.ok())
    return s;
  if (syncEachLaunch_)
    return drv_.check(a.cuStreamSynchronize(stream_), "cuStreamSynchronize",
                      "graph of program '" + prog.name + "'");
  return Status::success();
}

Status CudaBackend::synchronize() {
  if (Status s = makeCurrent(); !s.ok())
    return s;
  return streamError(drv_.check(drv_->cuStreamSynchronize(stream_),
                                "cuStreamSynchronize", "cuda stream"));
}

Status CudaBackend::startTimer() {
  if (Status s = makeCurrent(); !s.ok())
    return s;
  const DriverApi &a = drv_.api();
  for (CUevent *e : {&timerStart_, &timerStop_})
    if (!*e)
      if (Status s = drv_.check(a.cuEventCreate(e, CU_EVENT_DEFAULT),
                                "cuEventCreate", "timer");
          !s.ok())
        return s;
  return drv_.check(a.cuEventRecord(timerStart_, stream_), "cuEventRecord",
                    "timer start");
}

Status CudaBackend::stopTimer(double &milliseconds) {
  milliseconds = 0;
  if (!timerStart_)
    return Status::fail(StatusCode::InvalidArgument,
                        "stopTimer without startTimer");
  if (Status s = makeCurrent(); !s.ok())
    return s;
  const DriverApi &a = drv_.api();
  if (Status s = drv_.check(a.cuEventRecord(timerStop_, stream_),
                            "cuEventRecord", "timer stop");
      !s.ok())
    return s;
  if (Status s = drv_.check(a.cuEventSynchronize(timerStop_),
                            "cuEventSynchronize", "timer stop");
      !s.ok())
    return streamError(s);
  float ms = 0;
  if (Status s = drv_.check(a.cuEventElapsedTime(&ms, timerStart_, timerStop_),
                            "cuEventElapsedTime", "timer");
      !s.ok())
    return s;
  milliseconds = ms;
  return Status::success();
}

} // namespace l4c::cuda
