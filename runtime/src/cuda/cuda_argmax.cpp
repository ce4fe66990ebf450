//===- cuda_argmax.cpp - greedy token choice on the device ----------------===//
//
// CudaBackend::argmaxRows: the index of each row's largest logit, found on
// the device so a greedy decode step downloads B token ids instead of B
// rows of the vocabulary (Scout: 808 KB a row) and the host does not scan
// them. cpu::argmaxRows's rule, which the CPU backend applies: the first
// NaN if a row has one, else the first index of the maximum.
//
//===----------------------------------------------------------------------===//
#include "cuda/cuda_backend.h"

#include <algorithm>

namespace l4c::cuda {

using rt::Status;
using rt::StatusCode;

namespace {

// A block per row (blocks stride over the rows): each thread scans a
// stride of the row, then the block merges (first NaN, maximum, its first
// index) pairwise in shared memory.
const char *kArgmaxCuda = R"cuda(
struct L4Best {
  long long nan, at; // first NaN's index (or -1); the maximum's first index
  float v;
};
__device__ L4Best l4_merge(L4Best a, L4Best b) {
  if (b.nan >= 0 && (a.nan < 0 || b.nan < a.nan))
    a.nan = b.nan;
  if (b.at >= 0 && (a.at < 0 || b.v > a.v || (b.v == a.v && b.at < a.at))) {
    a.at = b.at;
    a.v = b.v;
  }
  return a;
}
extern "C" __global__ void __launch_bounds__(256) l4_argmax_rows(
    const unsigned char *logits, unsigned long long rowStride,
    unsigned long long rows, unsigned long long V, int bf16, long long *out) {
  __shared__ L4Best part[256];
  for (unsigned long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const unsigned char *row = logits + r * rowStride;
    L4Best b = {-1, -1, 0.0f};
    for (unsigned long long i = threadIdx.x; i < V; i += blockDim.x) {
      float v;
      if (bf16)
        v = __uint_as_float(
            (unsigned)reinterpret_cast<const unsigned short *>(row)[i] << 16);
      else
        v = reinterpret_cast<const float *>(row)[i];
      if (v != v) {
        if (b.nan < 0)
          b.nan = (long long)i;
      } else if (b.at < 0 || v > b.v) {
        b.at = (long long)i;
        b.v = v;
      }
    }
    __syncthreads(); // the previous row is done with part
    part[threadIdx.x] = b;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s /= 2) {
      if (threadIdx.x < s)
        part[threadIdx.x] = l4_merge(part[threadIdx.x], part[threadIdx.x + s]);
      __syncthreads();
    }
    if (threadIdx.x == 0)
      out[r] = part[0].nan >= 0 ? part[0].nan : part[0].at;
  }
}
)cuda";

} // namespace

Status CudaBackend::argmaxRows(plan::Region r, uint64_t offset,
                               uint64_t rowStride, int64_t rows, uint64_t V,
                               bool bf16, int64_t *out) {
  if (rows <= 0)
    return Status::success();
  if (V == 0)
    return Status::fail(StatusCode::InvalidArgument,
                        "greedy choice over an empty vocabulary");
  uint64_t elem = bf16 ? 2 : 4;
  if (Status s = checkRange("greedy choice", r, offset,
                            uint64_t(rows - 1) * rowStride + V * elem);
      !s.ok())
    return s;
  if (Status s = makeCurrent(); !s.ok())
    return s;
  if (Status s = loadRuntimeKernel(kArgmaxCuda, "l4_argmax_rows.cu",
                                   "l4_argmax_rows", "greedy choice", argmax_);
      !s.ok())
    return s;
  const DriverApi &a = drv_.api();
  if (uint64_t(rows) > argmaxCapacity_) {
    if (argmaxOut_)
      a.cuMemFree(argmaxOut_);
    argmaxOut_ = 0;
    argmaxCapacity_ = 0;
    if (Status s = drv_.check(a.cuMemAlloc(&argmaxOut_, size_t(rows) * 8),
                              "cuMemAlloc", "greedy choice");
        !s.ok())
      return s;
    argmaxCapacity_ = uint64_t(rows);
  }
  CUdeviceptr src = base_[int(r)] + offset;
  unsigned long long stride = rowStride, nRows = uint64_t(rows), n = V;
  int half = bf16;
  void *params[] = {&src, &stride, &nRows, &n, &half, &argmaxOut_};
  unsigned blocks = unsigned(std::min<uint64_t>(nRows, maxBlocks_));
  if (Status s = drv_.check(a.cuLaunchKernel(argmax_, blocks, 1, 1, 256, 1, 1,
                                             0, stream_, params, nullptr),
                            "cuLaunchKernel", "greedy choice");
      !s.ok())
    return streamError(s);
  if (Status s = drv_.check(a.cuMemcpyDtoHAsync(out, argmaxOut_,
                                                size_t(rows) * 8, stream_),
                            "cuMemcpyDtoHAsync", "greedy choice");
      !s.ok())
    return streamError(s);
  return streamError(drv_.check(a.cuStreamSynchronize(stream_),
                                "cuStreamSynchronize", "greedy choice"));
}

} // namespace l4c::cuda
