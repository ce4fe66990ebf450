//===- cuda_optimizer.cpp - gradient accumulation and AdamW on the device -===//
//
// A train session on the GPU keeps its optimizer on the device: a train
// step's gradients are summed there over micro-batches, and one launch runs
// AdamW over every tensor, so no gradient or weight crosses PCIe per step.
// The update is cpu::adamwStep's arithmetic, operation for operation in
// double with no contractions, so both backends produce the same bits.
//
//===----------------------------------------------------------------------===//
#include "cuda/cuda_backend.h"

#include <algorithm>
#include <string>

namespace l4c::cuda {

using rt::Status;
using rt::StatusCode;

// Per tensor: where its weight, gradient and state live; the work is cut
// into chunks of up to L4_CHUNK elements of one tensor (multi-tensor apply),
// and blocks stride over the chunks.
const char *const kOptimizerCuda = R"cuda(
struct L4OptTensor {
  unsigned long long weight, grad, sum, m, v, master, numel;
  unsigned long long bf16;
};
struct L4OptChunk {
  unsigned long long tensor, start;
};
constexpr unsigned long long L4_CHUNK = 1ull << 16;

extern "C" __global__ void l4_grad_accumulate(const L4OptTensor *ts,
                                              const L4OptChunk *chunks,
                                              unsigned long long nChunks,
                                              int first) {
  for (unsigned long long c = blockIdx.x; c < nChunks; c += gridDim.x) {
    const L4OptTensor t = ts[chunks[c].tensor];
    const unsigned long long start = chunks[c].start;
    const unsigned long long end =
        t.numel - start < L4_CHUNK ? t.numel : start + L4_CHUNK;
    const float *g = reinterpret_cast<const float *>(t.grad);
    float *s = reinterpret_cast<float *>(t.sum);
    for (unsigned long long i = start + threadIdx.x; i < end; i += blockDim.x)
      s[i] = first ? g[i] : s[i] + g[i];
  }
}

extern "C" __global__ void l4_adamw(const L4OptTensor *ts,
                                    const L4OptChunk *chunks,
                                    unsigned long long nChunks, double decay,
                                    double stepSize, double bc2Sqrt, double w1,
                                    double oneMinusW1, double beta2, double w2,
                                    double eps, int microBatches) {
  for (unsigned long long c = blockIdx.x; c < nChunks; c += gridDim.x) {
  const L4OptTensor t = ts[chunks[c].tensor];
  const unsigned long long start = chunks[c].start;
  const unsigned long long end =
      t.numel - start < L4_CHUNK ? t.numel : start + L4_CHUNK;
  const float *sum = reinterpret_cast<const float *>(t.sum);
  float *m = reinterpret_cast<float *>(t.m);
  float *v = reinterpret_cast<float *>(t.v);
  float *p32 = reinterpret_cast<float *>(t.bf16 ? t.master : t.weight);
  unsigned short *p16 = reinterpret_cast<unsigned short *>(t.weight);
  const float k = (float)microBatches;
  for (unsigned long long i = start + threadIdx.x; i < end; i += blockDim.x) {
    float gf = sum[i];
    if (microBatches > 1)
      gf = gf / k;
    double p = __dmul_rn((double)p32[i], decay);
    const double g = gf, mo = m[i];
    // exp_avg.lerp_(grad, 1 - beta1), as torch takes its two branches.
    const double mi = w1 < 0.5 ? __dadd_rn(mo, __dmul_rn(w1, __dsub_rn(g, mo)))
                               : __dsub_rn(g, __dmul_rn(__dsub_rn(g, mo), oneMinusW1));
    const double vi = __dadd_rn(__dmul_rn((double)v[i], beta2),
                                __dmul_rn(__dmul_rn(w2, g), g));
    const double denom = __dadd_rn(sqrt(vi) / bc2Sqrt, eps);
    p = __dsub_rn(p, __dmul_rn(stepSize, mi) / denom);
    const float pf = (float)p;
    p32[i] = pf;
    m[i] = (float)mi;
    v[i] = (float)vi;
    if (t.bf16) {
      // Round to nearest even, a NaN staying a quiet NaN: the CPU's f32ToBf16.
      const unsigned u = __float_as_uint(pf);
      p16[i] = (u & 0x7fffffffu) > 0x7f800000u
                   ? (unsigned short)((u >> 16) | 0x40u)
                   : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  }
}
)cuda";

namespace {

/// The table entries the kernels read (kOptimizerCuda's L4OptTensor and
/// L4OptChunk).
struct TableEntry {
  unsigned long long weight, grad, sum, m, v, master, numel, bf16;
};
struct ChunkEntry {
  unsigned long long tensor, start;
};
constexpr uint64_t kChunk = uint64_t(1) << 16; // L4_CHUNK

constexpr uint64_t kAlign = 256;
uint64_t alignUp(uint64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

/// The optimizer's allocation: its two tables, then each tensor's state.
uint64_t tablesBytes(size_t tensors, uint64_t chunks) {
  return alignUp(tensors * sizeof(TableEntry)) +
         alignUp(chunks * sizeof(ChunkEntry));
}
uint64_t stateBytes(const CudaBackend::OptTensor &t) {
  return alignUp(t.numel * sizeof(float)) * (t.bf16 ? 4 : 3);
}

} // namespace

Status CudaBackend::launchOptimizer(CUfunction fn, void **params,
                                    const char *what) {
  if (optChunkCount_ == 0)
    return Status::success();
  if (Status s = makeCurrent(); !s.ok())
    return s;
  // Blocks stride over the chunks; a few per SM keep the memory busy.
  uint64_t most = uint64_t(sms_ ? sms_ : 1) * 8;
  unsigned grid = unsigned(std::max<uint64_t>(1, std::min(optChunkCount_, most)));
  return streamError(drv_.check(drv_.api().cuLaunchKernel(fn, grid, 1, 1, 256,
                                                          1, 1, 0, stream_,
                                                          params, nullptr),
                                "cuLaunchKernel", what));
}

CUdeviceptr CudaBackend::optState(size_t tensor, OptState which) const {
  const OptTensor &t = optTensors_[tensor];
  uint64_t bytes = alignUp(t.numel * sizeof(float));
  return optBase_ + optOffsets_[tensor] + uint64_t(which) * bytes;
}

uint64_t CudaBackend::optimizerBytes(const std::vector<OptTensor> &tensors) {
  uint64_t chunks = 0, state = 0;
  for (const OptTensor &t : tensors) {
    chunks += (t.numel + kChunk - 1) / kChunk;
    state += stateBytes(t);
  }
  return tablesBytes(tensors.size(), chunks) + state;
}

Status CudaBackend::initOptimizer(const std::vector<OptTensor> &tensors) {
  if (optBase_)
    return Status::fail(StatusCode::Internal, "the optimizer exists already");
  if (Status s = makeCurrent(); !s.ok())
    return s;
  // The kernels first: without NVRTC this fails (Unsupported) before any
  // memory is taken, and the caller may keep the optimizer on the host.
  if (Status s = loadRuntimeKernel(kOptimizerCuda, "l4_optimizer.cu",
                                   "l4_grad_accumulate", "gradient sums",
                                   gradAccumulate_);
      !s.ok())
    return s;
  if (Status s = loadRuntimeKernel(kOptimizerCuda, "l4_optimizer.cu",
                                   "l4_adamw", "AdamW", adamw_);
      !s.ok())
    return s;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const OptTensor &t = tensors[i];
    if (Status s = checkRange("optimizer weight", plan::Region::Weights,
                              t.weight, t.numel * (t.bf16 ? 2 : 4));
        !s.ok())
      return s;
    if (Status s = checkRange("optimizer gradient", t.gradRegion, t.grad,
                              t.numel * 4);
        !s.ok())
      return s;
  }
  // Layout: the tensor table, the chunk table, then per tensor sum, m, v
  // (and the master).
  std::vector<ChunkEntry> chunks;
  for (size_t i = 0; i < tensors.size(); ++i)
    for (uint64_t at = 0; at < tensors[i].numel; at += kChunk)
      chunks.push_back({i, at});
  uint64_t total = tablesBytes(tensors.size(), chunks.size());
  std::vector<uint64_t> offsets;
  for (const OptTensor &t : tensors) {
    offsets.push_back(total);
    total += stateBytes(t);
  }
  const DriverApi &a = drv_.api();
  std::string what =
      "optimizer state (" + std::to_string(total) + " bytes: gradient sums, "
      "AdamW moments and bf16 masters of " + std::to_string(tensors.size()) +
      " tensors)";
  CUdeviceptr base = 0;
  if (Status s = drv_.check(a.cuMemAlloc(&base, size_t(total)), "cuMemAlloc",
                            what);
      !s.ok())
    return s;
  optBase_ = base;
  optTable_ = base;
  optChunks_ = base + alignUp(tensors.size() * sizeof(TableEntry));
  optChunkCount_ = chunks.size();
  optTensors_ = tensors;
  optOffsets_ = offsets;
  std::vector<TableEntry> table;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const OptTensor &t = tensors[i];
    TableEntry e{};
    e.weight = base_[int(plan::Region::Weights)] + t.weight;
    e.grad = base_[int(t.gradRegion)] + t.grad;
    e.sum = optState(i, OptState::GradSum);
    e.m = optState(i, OptState::M);
    e.v = optState(i, OptState::V);
    e.master = t.bf16 ? optState(i, OptState::Master) : 0;
    e.numel = t.numel;
    e.bf16 = t.bf16;
    table.push_back(e);
  }
  if (Status s = drv_.check(a.cuMemsetD8Async(base, 0, size_t(total), stream_),
                            "cuMemsetD8Async", what);
      !s.ok())
    return s;
  if (!table.empty())
    if (Status s = drv_.check(a.cuMemcpyHtoDAsync(optTable_, table.data(),
                                                  table.size() *
                                                      sizeof(TableEntry),
                                                  stream_),
                              "cuMemcpyHtoDAsync", what);
        !s.ok())
      return s;
  if (!chunks.empty())
    if (Status s = drv_.check(a.cuMemcpyHtoDAsync(optChunks_, chunks.data(),
                                                  chunks.size() *
                                                      sizeof(ChunkEntry),
                                                  stream_),
                              "cuMemcpyHtoDAsync", what);
        !s.ok())
      return s;
  return drv_.check(a.cuStreamSynchronize(stream_), "cuStreamSynchronize",
                    what);
}

Status CudaBackend::accumulateGrads(bool first) {
  if (!optBase_)
    return Status::fail(StatusCode::Internal, "no optimizer on the device");
  CUdeviceptr table = optTable_, chunks = optChunks_;
  unsigned long long n = optChunkCount_;
  int f = first;
  void *params[] = {&table, &chunks, &n, &f};
  return launchOptimizer(gradAccumulate_, params, "gradient sums");
}

Status CudaBackend::adamwStep(const AdamWScalars &h) {
  if (!optBase_)
    return Status::fail(StatusCode::Internal, "no optimizer on the device");
  CUdeviceptr table = optTable_, chunks = optChunks_;
  unsigned long long n = optChunkCount_;
  AdamWScalars c = h;
  void *params[] = {&table,  &chunks,       &n,       &c.decay,
                    &c.stepSize, &c.bc2Sqrt, &c.w1,   &c.oneMinusW1,
                    &c.beta2, &c.w2,         &c.eps,  &c.microBatches};
  return launchOptimizer(adamw_, params, "AdamW");
}

Status CudaBackend::optCopy(size_t tensor, OptState which, float *host,
                            bool up) {
  if (!optBase_ || tensor >= optTensors_.size() ||
      (which == OptState::Master && !optTensors_[tensor].bf16))
    return Status::fail(StatusCode::Internal,
                        "no such optimizer state on the device");
  if (Status s = makeCurrent(); !s.ok())
    return s;
  const DriverApi &a = drv_.api();
  size_t bytes = size_t(optTensors_[tensor].numel * sizeof(float));
  CUdeviceptr d = optState(tensor, which);
  std::string what = std::string(up ? "upload of" : "download of") +
                     " optimizer state of tensor " + std::to_string(tensor);
  if (!up)
    return fetch(d, host, bytes, what);
  if (Status s = drv_.check(a.cuMemcpyHtoDAsync(d, host, bytes, stream_),
                            "cuMemcpyHtoDAsync", what);
      !s.ok())
    return streamError(s);
  return streamError(
      drv_.check(a.cuStreamSynchronize(stream_), "cuStreamSynchronize", what));
}

Status CudaBackend::optDownload(size_t tensor, OptState which, float *dst) {
  return optCopy(tensor, which, dst, false);
}

Status CudaBackend::optUpload(size_t tensor, OptState which,
                              const float *src) {
  return optCopy(tensor, which, const_cast<float *>(src), true);
}

} // namespace l4c::cuda
