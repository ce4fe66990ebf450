//===- executor.cpp - sessions that run a plan on the CPU ----------------===//
//
// Region allocation, weight loading (checkpoint or seed), input validation,
// program runs and the generation loop (greedy or seeded top-p sampling).
//
//===----------------------------------------------------------------------===//
#include "executor.h"
#include "cpu/kernels.h"
#include "cuda/cuda_backend.h"
#include "io/safetensors.h"
#include "random.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <vector>

#include <sys/mman.h>
#include <sys/sysinfo.h>

namespace l4c::rt {

namespace {


std::string shapeStr(const std::vector<int64_t> &shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i)
    s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/// splitmix64: seeds and per-tensor streams, identical on every platform
/// (std::normal_distribution is not).
uint64_t splitmix(uint64_t &state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/// Uniform in [0, 1) with 53 random bits.
double uniform(uint64_t &state) {
  return double(splitmix(state) >> 11) * 0x1.0p-53;
}

io::DType ioDType(plan::DType t) {
  switch (t) {
  case plan::DType::F32:
    return io::DType::F32;
  case plan::DType::BF16:
    return io::DType::BF16;
  case plan::DType::F16:
    return io::DType::F16;
  case plan::DType::I64:
    return io::DType::I64;
  case plan::DType::I32:
    return io::DType::I32;
  }
  return io::DType::F32;
}

/// Draws from softmax(logits / temperature) restricted to the smallest set
/// of most likely tokens whose mass reaches topP.
int64_t sampleRow(const float *logits, size_t V, const Sampling &s,
                  uint64_t &rng, std::vector<double> &prob,
                  std::vector<uint32_t> &order) {
  double maxL = -INFINITY;
  for (size_t i = 0; i < V; ++i)
    if (std::isfinite(logits[i]))
      maxL = std::max(maxL, double(logits[i]));
  prob.assign(V, 0.0);
  double total = 0;
  for (size_t i = 0; i < V; ++i)
    if (std::isfinite(logits[i]))
      total += prob[i] = std::exp((double(logits[i]) - maxL) / s.temperature);
  if (!(total > 0)) {
    int64_t best = 0;
    cpu::argmaxRows(logits, 1, V, &best);
    return best;
  }
  order.resize(V);
  std::iota(order.begin(), order.end(), 0u);
  std::stable_sort(order.begin(), order.end(),
                   [&](uint32_t a, uint32_t b) { return prob[a] > prob[b]; });
  size_t keep = 0;
  double kept = 0;
  while (keep < V && (keep == 0 || kept < s.topP * total))
    kept += prob[order[keep++]];
  double u = uniform(rng) * kept;
  for (size_t i = 0; i < keep; ++i) {
    u -= prob[order[i]];
    if (u < 0)
      return order[i];
  }
  return order[keep - 1];
}

double seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since)
      .count();
}

} // namespace

Status parseDevice(const std::string &device, int &ordinal) {
  if (device.empty() || device == "cpu") {
    ordinal = -1;
    return Status::success();
  }
  if (device == "cuda") {
    ordinal = 0;
    return Status::success();
  }
  if (device.rfind("cuda:", 0) == 0 && device.size() > 5 &&
      device.size() <= 9 &&
      device.find_first_not_of("0123456789", 5) == std::string::npos) {
    ordinal = std::stoi(device.substr(5));
    return Status::success();
  }
  return Status::fail(StatusCode::InvalidArgument,
                      "device '" + device +
                          "' is not one of cpu, cuda, cuda:N");
}

Status Session::create(std::shared_ptr<const Plan> plan,
                       const SessionOptions &opts,
                       std::unique_ptr<Session> &out) {
  if (!plan)
    return Status::fail(StatusCode::InvalidArgument, "no plan given");
  int ordinal = -1;
  if (Status st = parseDevice(opts.device, ordinal); !st.ok())
    return st;
  std::unique_ptr<Session> s(new Session(std::move(plan)));
  if (Status st = s->checkSupported(); !st.ok())
    return st;
  if (ordinal >= 0) {
    // Checked before any memory is touched: a cpu plan asked to run on
    // the GPU fails at once, naming the kernel without CUDA code.
    if (Status st = cuda::CudaBackend::checkPlan(*s->plan_); !st.ok())
      return st;
  }
  // The device first: a plan too large for it fails at once with its
  // memory account (CudaBackend::memoryNeed), before any weights are read.
  if (ordinal >= 0)
    if (Status st = s->attachGpu(ordinal); !st.ok())
      return st;
  if (Status st = s->allocate(); !st.ok())
    return st;
  // With a GPU the weights go straight to the device (the host region stays
  // untouched until something needs them there, see hostWeights()); the
  // cache starts zeroed on the device.
  if (!opts.weightsPath.empty()) {
    if (Status st = s->loadWeights(opts.weightsPath); !st.ok())
      return st;
  } else {
    if (Status st = s->randomWeights(opts.randomSeed); !st.ok())
      return st;
  }
  if (s->plan_->program("train_step"))
    if (Status st = s->initMasterWeights(opts); !st.ok())
      return st;
  if (s->gpu_) {
    if (Status st = s->gpu_->synchronize(); !st.ok())
      return st;
    // Training runs on the device end to end: train_step, the gradient
    // sums over micro-batches and AdamW (on f32 masters of bf16 weights).
    // The host keeps copies of the initial weights and refreshes them when
    // something reads them (syncHostTrainState).
    if (s->plan_->program("train_step")) {
      if (Status st = s->hostWeights(); !st.ok())
        return st;
      // Without NVRTC the optimizer's kernels cannot be built: AdamW then
      // runs on the host's f32 weights and masters, as before it moved.
      if (Status st = s->initDeviceOptimizer();
          !st.ok() && st.code != StatusCode::Unsupported)
        return st;
    }
  }
  out = std::move(s);
  return Status::success();
}

Status Session::hostWeights() {
  if (!gpu_ || hostWeights_)
    return Status::success();
  Region &w = regions_[int(plan::Region::Weights)];
  if (w.base)
    if (Status s = gpu_->download(plan::Region::Weights, 0, w.base, w.size);
        !s.ok())
      return s;
  hostWeights_ = true;
  return Status::success();
}

Status probeDevice(std::shared_ptr<const Plan> plan, const std::string &device,
                   DeviceProbe &out) {
  if (!plan)
    return Status::fail(StatusCode::InvalidArgument, "no plan given");
  int ordinal = -1;
  if (Status st = parseDevice(device, ordinal); !st.ok())
    return st;
  if (ordinal < 0)
    return Status::fail(StatusCode::InvalidArgument,
                        "a device probe needs a CUDA device (cuda or "
                        "cuda:N), not '" + device + "'");
  const cuda::Driver *drv = nullptr;
  if (Status st = cuda::Driver::load(drv); !st.ok())
    return st;
  cuda::CudaBackend::DeviceReport r;
  if (Status st = cuda::CudaBackend::probe(std::move(plan), ordinal, *drv, r);
      !st.ok())
    return st;
  out.deviceName = r.deviceName;
  out.arch = r.arch;
  out.multiprocessors = r.multiprocessors;
  out.freeBytes = r.freeBytes;
  out.totalBytes = r.totalBytes;
  out.needBytes = r.need.total();
  out.needDetail = r.need.describe();
  out.fits = r.fits();
  out.kernels = r.load.kernels;
  out.modules = r.load.modules;
  out.modulesFromPlan = r.load.fromPlan;
  out.modulesCompiled = r.load.compiled + r.load.fromCache;
  out.maxRegisters = r.load.maxRegisters;
  out.maxRegistersKernel = r.load.maxRegistersKernel;
  out.localMemoryKernels = r.load.localMemoryKernels;
  out.maxLocalBytes = r.load.maxLocalBytes;
  out.code = r.load.code;
  return Status::success();
}

Status Session::attachGpu(int ordinal) {
  const cuda::Driver *drv = nullptr;
  if (Status st = cuda::Driver::load(drv); !st.ok())
    return st;
  return cuda::CudaBackend::create(plan_, ordinal, *drv, gpu_);
}

std::string Session::deviceName() const {
  if (!gpu_)
    return "cpu";
  // How many kernels start with programmatic stream serialization
  // (cuda::CudaOptions::programmaticLaunch): what a timing ran with.
  return "cuda (" + gpu_->deviceName() + ", " + gpu_->arch() +
         ", programmatic launch: " +
         std::to_string(gpu_->loadStats().programmatic) + " of " +
         std::to_string(gpu_->loadStats().kernels) + " kernels)";
}

Session::Session(std::shared_ptr<const Plan> plan) : plan_(std::move(plan)) {}

Session::~Session() {
  gpu_.reset();
  for (Region &r : regions_)
    if (r.base)
      ::munmap(r.base, r.size);
}

Status Session::fetchBuffer(const BufferDesc &d) {
  if (!gpu_)
    return Status::success();
  return gpu_->download(d.region, d.offset,
                        regions_[int(d.region)].base + d.offset, d.size);
}

Status Session::pushBuffer(const BufferDesc &d) {
  if (!gpu_)
    return Status::success();
  return gpu_->upload(d.region, d.offset,
                      regions_[int(d.region)].base + d.offset, d.size);
}

Status Session::uploadInputs(const ProgramDesc &prog, int64_t B, int64_t T) {
  for (int64_t idx : {int64_t(prog.inputIds), int64_t(prog.positions)}) {
    if (idx < 0)
      continue;
    const BufferDesc &d = plan_->buffers[size_t(idx)];
    uint64_t elem = dtypeSize(d.dtype);
    uint64_t bytes = (uint64_t(B - 1) * d.batchStride + uint64_t(T)) * elem;
    if (Status s = gpu_->upload(d.region, d.offset,
                                regions_[int(d.region)].base + d.offset, bytes);
        !s.ok())
      return s;
  }
  return Status::success();
}

Status Session::fetchLogits(const ProgramDesc &prog, int64_t B, int64_t r0,
                            int64_t r1) {
  if (!gpu_)
    return Status::success();
  const BufferDesc &d = plan_->buffers[size_t(prog.logits)];
  uint64_t V = uint64_t(d.lastDim());
  uint64_t elem = dtypeSize(d.dtype);
  uint8_t *host = regions_[int(d.region)].base;
  for (int64_t b = 0; b < B; ++b) {
    uint64_t at =
        d.offset + (uint64_t(b) * d.batchStride + uint64_t(r0) * V) * elem;
    if (Status s = gpu_->download(d.region, at, host + at,
                                  uint64_t(r1 - r0) * V * elem);
        !s.ok())
      return s;
  }
  return Status::success();
}

Status Session::checkSupported() const {
  const Plan &p = *plan_;
  if (p.meshRanks != 1)
    return Status::fail(
        StatusCode::Unsupported,
        p.label() + ": a mesh of " + std::to_string(p.meshRanks) +
            " ranks needs the multi-rank runtime; the cpu executor runs one");
  // The CPU kernels compute in f32; other float types would need a
  // conversion at every op boundary.
  auto check = [&](uint32_t i) -> Status {
    const BufferDesc &b = p.buffers[i];
    if (b.dtype == plan::DType::F16)
      return Status::fail(
          StatusCode::Unsupported,
          p.label() + ": buffer " + std::to_string(i) + " '" + b.name +
              "' has dtype " + dtypeName(b.dtype) +
              "; the runtime runs f32 and bf16 plans (precision " +
              p.precision + ")");
    return Status::success();
  };
  for (const KernelDesc &k : p.kernels)
    for (const OpDesc &op : k.ops) {
      for (uint32_t b : op.operands)
        if (Status s = check(b); !s.ok())
          return s;
      for (uint32_t b : op.results)
        if (Status s = check(b); !s.ok())
          return s;
    }
  for (const ProgramDesc &pr : p.programs)
    if (pr.logits >= 0)
      if (Status s = check(uint32_t(pr.logits)); !s.ok())
        return s;
  // AdamW updates f32 weights in place, and f32 masters of bf16 ones.
  if (p.program("train_step"))
    for (const WeightDesc &w : p.weights)
      if (p.buffers[w.buffer].dtype != plan::DType::F32 &&
          p.buffers[w.buffer].dtype != plan::DType::BF16)
        return Status::fail(StatusCode::Unsupported,
                            p.label() + ": weight '" + w.hfName +
                                "' has dtype " +
                                dtypeName(p.buffers[w.buffer].dtype) +
                                "; training needs f32 weights (compile "
                                "train plans with --precision=f32)");
  return Status::success();
}

Status Session::allocate() {
  // The weights are all touched (loaded or drawn): refuse a plan whose
  // weights exceed the machine's memory instead of thrashing into the OOM
  // killer. The arena is touched only as far as the shapes run need it.
  uint64_t weights = plan_->regionSize[int(plan::Region::Weights)];
  struct sysinfo si;
  if (!gpu_ && ::sysinfo(&si) == 0) {
    uint64_t ram = uint64_t(si.totalram) * si.mem_unit;
    uint64_t swap = uint64_t(si.totalswap) * si.mem_unit;
    if (weights > ram + swap)
      return Status::fail(
          StatusCode::OutOfMemory,
          plan_->label() + ": the weights need " + byteSize(weights) +
              " of host memory but this machine has " + byteSize(ram) +
              " (+ " + byteSize(swap) + " swap); the cpu backend cannot run this "
              "plan");
  }
  // Anonymous mappings: page aligned (beyond the 64 bytes the kernels want),
  // zero filled, and only pages that are touched cost memory.
  for (int r = 0; r < 4; ++r) {
    uint64_t size = plan_->regionSize[r];
    if (size == 0)
      continue;
    void *m = size > SIZE_MAX / 2
                  ? MAP_FAILED
                  : ::mmap(nullptr, size_t(size), PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED)
      return Status::fail(StatusCode::OutOfMemory,
                          plan_->label() + ": cannot allocate the " +
                              regionName(plan::Region(r)) + " region of " +
                              std::to_string(size) + " bytes");
    regions_[r] = {static_cast<uint8_t *>(m), size_t(size)};
  }
  return Status::success();
}

Status Session::loadWeights(const std::string &path) {
  io::Checkpoint ckpt;
  if (io::Status s = io::Checkpoint::open(path, ckpt); !s.ok())
    return Status::fail(StatusCode::Io, s.error);
  std::vector<uint8_t> staging; // GPU sessions: one tensor at a time
  for (const WeightDesc &w : plan_->weights) {
    const BufferDesc &b = plan_->buffers[w.buffer];
    io::Checkpoint::Entry e;
    if (!ckpt.find(w.hfName, e))
      return Status::fail(StatusCode::InvalidArgument,
                          path + ": tensor '" + w.hfName +
                              "' is missing (the plan binds it to buffer " +
                              std::to_string(w.buffer) + ")");
    if (e.info->shape != b.shape)
      return Status::fail(StatusCode::InvalidArgument,
                          path + ": tensor '" + w.hfName + "' has shape " +
                              shapeStr(e.info->shape) +
                              " but the plan expects " + shapeStr(b.shape));
    uint8_t *dst = regions_[int(b.region)].base + b.offset;
    if (gpu_) {
      staging.resize(b.size);
      dst = staging.data();
    }
    if (io::Status s = ckpt.read(w.hfName, ioDType(b.dtype), dst, b.numel);
        !s.ok())
      return Status::fail(StatusCode::InvalidArgument, s.error);
    if (gpu_)
      if (Status s = gpu_->upload(b.region, b.offset, dst, b.size); !s.ok())
        return s;
  }
  return Status::success();
}

/// --random-weights' standard deviation for a weight buffer: 1/sqrt(fan_in)
/// with fan_in the input dim of nn.Linear [out, in] or of HF's input-major
/// expert weights [E, in, out]; rank-1 (norm) weights are ones instead.
static float randomStddev(const BufferDesc &b) {
  int64_t fanIn = b.shape.size() <= 1   ? 1
                  : b.shape.size() == 2 ? b.shape[1]
                                        : b.shape[b.shape.size() - 2];
  return float(1.0 / std::sqrt(double(fanIn)));
}

Status Session::initMasterWeights(const SessionOptions &opts) {
  const Plan &p = *plan_;
  bool any = false;
  for (const WeightDesc &w : p.weights)
    any |= p.buffers[w.buffer].dtype == plan::DType::BF16;
  if (!any)
    return Status::success();
  master_.assign(p.weights.size(), {});
  io::Checkpoint ckpt;
  if (!opts.weightsPath.empty())
    if (io::Status s = io::Checkpoint::open(opts.weightsPath, ckpt); !s.ok())
      return Status::fail(StatusCode::Io, s.error);
  for (size_t i = 0; i < p.weights.size(); ++i) {
    const BufferDesc &b = p.buffers[p.weights[i].buffer];
    if (b.dtype != plan::DType::BF16)
      continue;
    std::vector<float> &m = master_[i];
    m.resize(b.numel);
    if (!opts.weightsPath.empty()) {
      if (io::Status s = ckpt.read(p.weights[i].hfName, io::DType::F32,
                                   m.data(), b.numel);
          !s.ok())
        return Status::fail(StatusCode::InvalidArgument, s.error);
    } else if (b.shape.size() == 1) {
      std::fill(m.begin(), m.end(), 1.0f);
    } else {
      fillRandom(m.data(), b.numel, randomKey(opts.randomSeed,
                                              p.weights[i].hfName),
                 randomStddev(b));
    }
  }
  return Status::success();
}

Status Session::randomWeights(uint64_t seed) {
  // Element i of tensor N depends on (seed, N, i) only (random.h), so the
  // values do not depend on binding order or backend. Norm weights (rank 1)
  // are ones; matrices have standard deviation 1/sqrt(fan_in) with fan_in
  // the input dim of nn.Linear [out, in] or of HF's input-major expert
  // weights [E, in, out].
  std::vector<float> wide;
  for (const WeightDesc &w : plan_->weights) {
    const BufferDesc &b = plan_->buffers[w.buffer];
    bool bf16 = b.dtype == plan::DType::BF16;
    if (b.dtype != plan::DType::F32 && !bf16)
      continue;
    bool ones = b.shape.size() == 1;
    float stddev = randomStddev(b);
    uint64_t key = randomKey(seed, w.hfName);
    if (gpu_ && !ones) {
      Status s = gpu_->fillRandom(b.region, b.offset, b.numel, bf16, key,
                                  stddev);
      if (s.ok())
        continue;
      if (s.code != StatusCode::Unsupported) // no NVRTC: fill on the host
        return s;
    }
    float *dst = reinterpret_cast<float *>(regions_[int(b.region)].base +
                                           b.offset);
    if (bf16 || gpu_) {
      wide.resize(b.numel);
      dst = wide.data();
    }
    if (ones)
      std::fill(dst, dst + b.numel, 1.0f);
    else
      fillRandom(dst, b.numel, key, stddev);
    if (bf16) {
      // Rounded in place: the first half of `wide` becomes the bf16 bytes.
      uint16_t *h = reinterpret_cast<uint16_t *>(wide.data());
      for (uint64_t i = 0; i < b.numel; ++i)
        h[i] = io::f32ToBf16(wide[i]);
    }
    if (gpu_) {
      if (Status s = gpu_->upload(b.region, b.offset, wide.data(),
                                  b.numel * dtypeSize(b.dtype));
          !s.ok())
        return s;
    } else if (bf16) {
      std::memcpy(regions_[int(b.region)].base + b.offset, wide.data(),
                  b.numel * 2);
    }
  }
  return Status::success();
}

Status Session::checkIds(const int64_t *ids, int64_t B, int64_t T,
                         int64_t ld) const {
  if (!ids)
    return Status::fail(StatusCode::InvalidArgument, "input_ids is null");
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      int64_t id = ids[b * ld + t];
      if (id < 0 || id >= plan_->vocabSize)
        return Status::fail(StatusCode::InvalidArgument,
                            "input_ids[" + std::to_string(b) + ", " +
                                std::to_string(t) +
                                "] = " + std::to_string(id) +
                                " is outside the vocabulary [0, " +
                                std::to_string(plan_->vocabSize) + ")");
    }
  return Status::success();
}

void Session::stageInputs(const ProgramDesc &prog, const int64_t *ids,
                          int64_t ldIds, int64_t B, int64_t T, int64_t pos0) {
  const Plan &p = *plan_;
  // Inputs: ids, then positions pos0 + s (the executor owns positions).
  auto fill = [&](int64_t bufIdx, auto value) {
    const BufferDesc &d = p.buffers[bufIdx];
    uint8_t *base = regions_[int(d.region)].base + d.offset;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < T; ++s) {
        int64_t v = value(b, s);
        uint64_t at = uint64_t(b) * d.batchStride + uint64_t(s);
        if (d.dtype == plan::DType::I64)
          reinterpret_cast<int64_t *>(base)[at] = v;
        else
          reinterpret_cast<int32_t *>(base)[at] = int32_t(v);
      }
  };
  fill(prog.inputIds, [&](int64_t b, int64_t s) { return ids[b * ldIds + s]; });
  if (prog.positions >= 0)
    fill(prog.positions, [&](int64_t, int64_t s) { return pos0 + s; });
}

Status Session::runProgram(const ProgramDesc &prog, const int64_t *ids,
                           int64_t ldIds, int64_t B, int64_t T, int64_t pos0) {
  const Plan &p = *plan_;
  if (T > prog.seqCapacity)
    return Status::fail(
        StatusCode::InvalidArgument,
        "sequence length " + std::to_string(T) + " exceeds the " + prog.name +
            " program's capacity " + std::to_string(prog.seqCapacity));
  uint8_t *bases[4];
  for (int r = 0; r < 4; ++r)
    bases[r] = regions_[r].base;
  stageInputs(prog, ids, ldIds, B, T, pos0);
  if (gpu_) {
    if (Status s = uploadInputs(prog, B, T); !s.ok())
      return s;
    // Decode steps repeat with the same extents: replay one CUDA graph.
    return prog.name == "decode" ? gpu_->runProgramGraph(prog, B, T)
                                 : gpu_->runProgram(prog, B, T);
  }
  for (uint32_t k : prog.steps)
    if (Status s = runCpuKernel(p, bases, p.kernels[k], size_t(B), size_t(T));
        !s.ok())
      return s;
  return Status::success();
}

/// Copies n elements of a float buffer from element `at` into out, widening
/// bf16.
static void readFloats(const BufferDesc &d, const uint8_t *base, uint64_t at,
                       float *out, size_t n) {
  if (d.dtype == plan::DType::BF16) {
    const uint16_t *src = reinterpret_cast<const uint16_t *>(base) + at;
    for (size_t i = 0; i < n; ++i)
      out[i] = io::bf16ToF32(src[i]);
    return;
  }
  std::memcpy(out, reinterpret_cast<const float *>(base) + at,
              n * sizeof(float));
}

void Session::lastLogits(const ProgramDesc &prog, int64_t B, int64_t T,
                         float *out) const {
  const BufferDesc &d = plan_->buffers[prog.logits];
  const uint8_t *lg = regions_[int(d.region)].base + d.offset;
  size_t V = size_t(d.lastDim());
  size_t row = d.hasSeq ? size_t(T - 1) : 0;
  for (int64_t b = 0; b < B; ++b)
    readFloats(d, lg, b * d.batchStride + row * V, out + b * V, V);
}

Status Session::forward(const int64_t *ids, int64_t B, int64_t T,
                        float *logits) {
  std::lock_guard<std::mutex> lock(mu_);
  timing_ = Timing();
  const Plan &p = *plan_;
  const ProgramDesc *prog = p.program("forward");
  if (!prog)
    return Status::fail(StatusCode::InvalidArgument,
                        p.label() +
                            ": the plan has no forward program (program_kind " +
                            p.programKind + "); use generate");
  if (B < 1 || B > p.maxBatch)
    return Status::fail(StatusCode::InvalidArgument,
                        "batch " + std::to_string(B) +
                            " is outside the plan's range [1, " +
                            std::to_string(p.maxBatch) + "] (max_batch)");
  if (T < 1 || T > prog->seqCapacity)
    return Status::fail(StatusCode::InvalidArgument,
                        "sequence length " + std::to_string(T) +
                            " is outside the plan's range [1, " +
                            std::to_string(prog->seqCapacity) + "] (max_seq)");
  if (!logits)
    return Status::fail(StatusCode::InvalidArgument, "logits output is null");
  if (Status s = checkIds(ids, B, T, T); !s.ok())
    return s;
  const BufferDesc &d = p.buffers[prog->logits];
  if (!d.hasSeq)
    return Status::fail(
        StatusCode::Unsupported,
        p.label() + ": the forward program's logits hold one row per sequence, "
                    "not one per token");
  auto t0 = std::chrono::steady_clock::now();
  if (Status s = runProgram(*prog, ids, T, B, T, 0); !s.ok())
    return s;
  if (Status s = fetchLogits(*prog, B, 0, T); !s.ok())
    return s;
  const uint8_t *lg = regions_[int(d.region)].base + d.offset;
  size_t V = size_t(d.lastDim());
  for (int64_t b = 0; b < B; ++b)
    readFloats(d, lg, b * d.batchStride, logits + size_t(b * T) * V,
               size_t(T) * V);
  timing_.prefillSeconds = seconds(t0);
  timing_.prefillTokens = B * T;
  return Status::success();
}

Status Session::generate(const int64_t *ids, int64_t B, int64_t T, int64_t G,
                         const Sampling *sampling, int64_t *outIds,
                         int64_t *outLen) {
  std::lock_guard<std::mutex> lock(mu_);
  timing_ = Timing();
  const Plan &p = *plan_;
  const ProgramDesc *prefill = p.program("prefill"),
                    *decode = p.program("decode");
  const ProgramDesc *fwd = p.program("forward");
  bool cached = prefill && decode;
  if (!cached && !fwd)
    return Status::fail(
        StatusCode::InvalidArgument,
        p.label() +
            ": the plan has neither prefill + decode nor forward programs");
  if (B < 1 || B > p.maxBatch)
    return Status::fail(StatusCode::InvalidArgument,
                        "batch " + std::to_string(B) +
                            " is outside the plan's range [1, " +
                            std::to_string(p.maxBatch) + "] (max_batch)");
  if (T < 1)
    return Status::fail(StatusCode::InvalidArgument, "prompt length " +
                                                         std::to_string(T) +
                                                         " must be at least 1");
  if (G < 0)
    return Status::fail(StatusCode::InvalidArgument,
                        "max_new_tokens " + std::to_string(G) + " is negative");
  if (T + G > p.maxSeq)
    return Status::fail(StatusCode::InvalidArgument,
                        "prompt of " + std::to_string(T) + " tokens + " +
                            std::to_string(G) +
                            " new tokens exceeds the plan's max_seq " +
                            std::to_string(p.maxSeq));
  if (!outIds || !outLen)
    return Status::fail(StatusCode::InvalidArgument,
                        "output ids or length is null");
  if (sampling &&
      (!(sampling->temperature > 0) || !std::isfinite(sampling->temperature)))
    return Status::fail(StatusCode::InvalidArgument,
                        "temperature " + std::to_string(sampling->temperature) +
                            " must be a positive number");
  if (sampling && !(sampling->topP > 0 && sampling->topP <= 1))
    return Status::fail(StatusCode::InvalidArgument,
                        "top_p " + std::to_string(sampling->topP) +
                            " must lie in (0, 1]");
  if (Status s = checkIds(ids, B, T, T); !s.ok())
    return s;
  const ProgramDesc &first = cached ? *prefill : *fwd;
  // Without a cache every step re-runs forward over the whole prefix.
  int64_t longest = cached ? T : T + G - 1;
  if (longest > first.seqCapacity)
    return Status::fail(StatusCode::InvalidArgument,
                        "sequence length " + std::to_string(longest) +
                            " exceeds the " + first.name +
                            " program's capacity " +
                            std::to_string(first.seqCapacity));

  const int64_t L = T + G;
  for (int64_t b = 0; b < B; ++b)
    std::copy_n(ids + b * T, T, outIds + b * L);
  *outLen = L;
  if (G == 0)
    return Status::success();

  size_t V = size_t(p.buffers[first.logits].lastDim());
  if (gpu_ && !sampling && cached && feedable(*prefill, *decode))
    return generateOnDevice(*prefill, *decode, outIds, B, T, G, V);
  // The host's copy of the rows the next tokens come from; greedy on the
  // GPU chooses there and needs none.
  std::vector<float> last(gpu_ && !sampling ? 0 : size_t(B) * V);
  std::vector<int64_t> next(static_cast<size_t>(B));
  uint64_t rng = sampling ? sampling->seed : 0;
  if (sampling)
    splitmix(rng);
  std::vector<double> prob;
  std::vector<uint32_t> order;
  auto pick = [&]() {
    if (!sampling) {
      cpu::argmaxRows(last.data(), size_t(B), V, next.data());
      return;
    }
    for (int64_t b = 0; b < B; ++b)
      next[b] = sampleRow(last.data() + b * V, V, *sampling, rng, prob, order);
  };

  // The next tokens from the logits `prog` left for length `len`: greedy
  // on the GPU finds them there (B ids come back, not B rows of V);
  // otherwise the rows come to the host.
  auto choose = [&](const ProgramDesc &prog, int64_t len) -> Status {
    const BufferDesc &d = plan_->buffers[size_t(prog.logits)];
    int64_t row = d.hasSeq ? len - 1 : 0;
    if (gpu_ && !sampling) {
      uint64_t elem = dtypeSize(d.dtype);
      return gpu_->argmaxRows(d.region, d.offset + uint64_t(row) * V * elem,
                              d.batchStride * elem, B, V,
                              d.dtype == plan::DType::BF16, next.data());
    }
    if (Status s = fetchLogits(prog, B, row, row + 1); !s.ok())
      return s;
    lastLogits(prog, B, len, last.data());
    pick();
    return Status::success();
  };

  auto t0 = std::chrono::steady_clock::now();
  if (Status s = runProgram(first, outIds, L, B, T, 0); !s.ok())
    return s;
  if (Status s = choose(first, T); !s.ok())
    return s;
  for (int64_t b = 0; b < B; ++b)
    outIds[b * L + T] = next[b];
  timing_.prefillSeconds = seconds(t0);
  timing_.prefillTokens = B * T;

  auto t1 = std::chrono::steady_clock::now();
  for (int64_t len = T + 1; len < L; ++len) {
    if (cached) {
      // The newest token goes in at position len - 1; the cache holds the rest.
      if (Status s = runProgram(*decode, next.data(), 1, B, 1, len - 1);
          !s.ok())
        return s;
      if (Status s = choose(*decode, 1); !s.ok())
        return s;
    } else {
      if (Status s = runProgram(*fwd, outIds, L, B, len, 0); !s.ok())
        return s;
      if (Status s = choose(*fwd, len); !s.ok())
        return s;
    }
    for (int64_t b = 0; b < B; ++b)
      outIds[b * L + len] = next[b];
  }
  timing_.decodeSeconds = seconds(t1);
  timing_.decodeTokens = B * (G - 1);
  return Status::success();
}

bool Session::feedable(const ProgramDesc &prefill,
                       const ProgramDesc &decode) const {
  // The choice is written into the decode program's inputs while other
  // blocks still read the logits; programs share the io region, so the
  // two must not overlap (the memory plan puts inputs first, so they do
  // not), and the ids and positions must be in one region.
  const Plan &p = *plan_;
  if (decode.inputIds < 0)
    return false;
  std::vector<const BufferDesc *> written = {&p.buffers[decode.inputIds]};
  if (decode.positions >= 0)
    written.push_back(&p.buffers[decode.positions]);
  for (const ProgramDesc *prog : {&prefill, &decode}) {
    if (prog->logits < 0)
      return false;
    const BufferDesc &read = p.buffers[prog->logits];
    for (const BufferDesc *w : written)
      if (w->region != written[0]->region ||
          (w->region == read.region && w->offset < read.offset + read.size &&
           read.offset < w->offset + w->size))
        return false;
  }
  return true;
}

Status Session::generateOnDevice(const ProgramDesc &prefill,
                                 const ProgramDesc &decode, int64_t *outIds,
                                 int64_t B, int64_t T, int64_t G, size_t V) {
  // Greedy decoding with the host out of the loop: each step's choice is
  // written on the device where the next decode step reads its input (its
  // ids, and its positions), and into a history that comes back once, at
  // the end. No step waits for the one before it to reach the host.
  const Plan &p = *plan_;
  const int64_t L = T + G;
  const BufferDesc &ids = p.buffers[decode.inputIds];
  cuda::CudaBackend::GreedyFeed feed;
  feed.region = ids.region;
  feed.ids = ids.offset;
  feed.idsStride = ids.batchStride;
  feed.idsI32 = ids.dtype == plan::DType::I32;
  if (decode.positions >= 0) {
    const BufferDesc &pos = p.buffers[decode.positions]; // ids' region
    feed.positions = int64_t(pos.offset);
    feed.posStride = pos.batchStride;
    feed.posI32 = pos.dtype == plan::DType::I32;
  }
  feed.columns = uint64_t(G);
  // The token chosen from `prog`'s logits for length `len` is the row's
  // token `index`: the next step reads it at position `index`.
  auto choose = [&](const ProgramDesc &prog, int64_t len,
                    int64_t index) -> Status {
    const BufferDesc &d = p.buffers[size_t(prog.logits)];
    uint64_t elem = dtypeSize(d.dtype);
    int64_t row = d.hasSeq ? len - 1 : 0;
    feed.position = index;
    feed.column = uint64_t(index - T);
    return gpu_->argmaxRows(d.region, d.offset + uint64_t(row) * V * elem,
                            d.batchStride * elem, B, V,
                            d.dtype == plan::DType::BF16, nullptr, &feed);
  };

  auto t0 = std::chrono::steady_clock::now();
  if (Status s = runProgram(prefill, outIds, L, B, T, 0); !s.ok())
    return s;
  if (Status s = choose(prefill, T, T); !s.ok())
    return s;
  if (Status s = gpu_->synchronize(); !s.ok()) // for the prefill's time
    return s;
  timing_.prefillSeconds = seconds(t0);
  timing_.prefillTokens = B * T;

  auto t1 = std::chrono::steady_clock::now();
  for (int64_t index = T + 1; index < L; ++index) {
    if (Status s = gpu_->runProgramGraph(decode, B, 1); !s.ok())
      return s;
    if (Status s = choose(decode, 1, index); !s.ok())
      return s;
  }
  std::vector<int64_t> history(size_t(B * G));
  if (Status s = gpu_->greedyHistory(B, uint64_t(G), history.data()); !s.ok())
    return s;
  for (int64_t b = 0; b < B; ++b)
    std::copy_n(history.data() + b * G, G, outIds + b * L + T);
  timing_.decodeSeconds = seconds(t1);
  timing_.decodeTokens = B * (G - 1);
  return Status::success();
}

Timing Session::lastTiming() const {
  std::lock_guard<std::mutex> lock(mu_);
  return timing_;
}

} // namespace l4c::rt
