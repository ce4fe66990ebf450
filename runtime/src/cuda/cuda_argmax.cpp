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

// A row is cut into slices of `span` logits (up to 8 a thread, all loaded
// before any is compared, so a thread keeps 8 loads in flight), and each
// (row, slice) is one block's task; blocks stride over the tasks. A block
// reduces its slice (first NaN, maximum, its first index) in shared memory
// and stores it in `parts`; the last of a row's slices to arrive (a counter
// a row, set back to 0 by that block) merges the row's parts. The merge is
// associative and commutative (indices break ties), so the order the
// slices arrive in does not matter: the CPU's answer, on every run.
const char *const kArgmaxCuda = R"cuda(
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
// Every thread's b into red[0] (all threads call it).
__device__ void l4_reduce(L4Best b, L4Best *red) {
  red[threadIdx.x] = b;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s)
      red[threadIdx.x] = l4_merge(red[threadIdx.x], red[threadIdx.x + s]);
    __syncthreads();
  }
}
extern "C" __global__ void __launch_bounds__(256) l4_argmax_rows(
    const unsigned char *logits, unsigned long long rowStride,
    unsigned long long rows, unsigned long long V, int bf16,
    unsigned long long span, unsigned long long slices, long long *out,
    unsigned *arrived, L4Best *parts, long long *hist,
    unsigned long long columns, unsigned long long column,
    unsigned char *feedIds, unsigned long long idsStride, int idsI32,
    unsigned char *feedPos, unsigned long long posStride, int posI32,
    long long position) {
  __shared__ L4Best red[256];
  __shared__ int last;
  for (unsigned long long t = blockIdx.x; t < rows * slices; t += gridDim.x) {
    const unsigned long long r = t / slices, lo = t % slices * span;
    const unsigned long long hi = lo + span < V ? lo + span : V;
    const unsigned char *row = logits + r * rowStride;
    float v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const unsigned long long i = lo + threadIdx.x + k * blockDim.x;
      v[k] = 0.0f;
      if (i < hi)
        v[k] = bf16 ? __uint_as_float((unsigned)reinterpret_cast<
                                          const unsigned short *>(row)[i]
                                      << 16)
                    : reinterpret_cast<const float *>(row)[i];
    }
    L4Best b = {-1, -1, 0.0f};
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const long long i = (long long)(lo + threadIdx.x + k * blockDim.x);
      if ((unsigned long long)i >= hi)
        continue;
      if (v[k] != v[k]) {
        if (b.nan < 0)
          b.nan = i;
      } else if (b.at < 0 || v[k] > b.v) {
        b.at = i;
        b.v = v[k];
      }
    }
    __syncthreads(); // the previous task is done with red and last
    l4_reduce(b, red);
    if (threadIdx.x == 0) {
      parts[t] = red[0];
      __threadfence(); // the part before the arrival
      last = atomicAdd(arrived + r, 1u) == slices - 1;
    }
    __syncthreads();
    if (last) {
      __threadfence(); // then the other blocks' parts, past L1
      L4Best m = {-1, -1, 0.0f};
      for (unsigned long long j = threadIdx.x; j < slices; j += blockDim.x) {
        const L4Best *p = parts + r * slices + j;
        L4Best q = {__ldcg(&p->nan), __ldcg(&p->at), __ldcg(&p->v)};
        m = l4_merge(m, q);
      }
      l4_reduce(m, red); // red is free: the barrier above followed its read
      if (threadIdx.x == 0) {
        const long long id = red[0].nan >= 0 ? red[0].nan : red[0].at;
        out[r] = id;
        // The feed: the history, and the next decode step's inputs.
        if (hist)
          hist[r * columns + column] = id;
        if (feedIds) {
          if (idsI32)
            reinterpret_cast<int *>(feedIds)[r * idsStride] = (int)id;
          else
            reinterpret_cast<long long *>(feedIds)[r * idsStride] = id;
        }
        if (feedPos) {
          if (posI32)
            reinterpret_cast<int *>(feedPos)[r * posStride] = (int)position;
          else
            reinterpret_cast<long long *>(feedPos)[r * posStride] = position;
        }
        arrived[r] = 0u; // for the next call
      }
    }
  }
}
)cuda";

namespace {

/// How argmaxRows cuts a row of V logits: `span` logits a block (256
/// threads, up to 8 each), at least 64 slices where V allows.
struct Slicing {
  uint64_t span, slices;
};
Slicing slicing(uint64_t V) {
  uint64_t per = std::clamp<uint64_t>((V + 256 * 64 - 1) / (256 * 64), 1, 8);
  uint64_t span = 256 * per;
  return {span, (V + span - 1) / span};
}
constexpr uint64_t kPartBytes = 24; // struct L4Best
uint64_t align256(uint64_t v) { return (v + 255) / 256 * 256; }

} // namespace

Status CudaBackend::argmaxRows(plan::Region r, uint64_t offset,
                               uint64_t rowStride, int64_t rows, uint64_t V,
                               bool bf16, int64_t *out,
                               const GreedyFeed *feed) {
  if (rows <= 0)
    return Status::success();
  if (V == 0)
    return Status::fail(StatusCode::InvalidArgument,
                        "greedy choice over an empty vocabulary");
  if (!out && !feed)
    return Status::fail(StatusCode::InvalidArgument,
                        "greedy choice with nowhere to put it");
  uint64_t elem = bf16 ? 2 : 4;
  if (Status s = checkRange("greedy choice", r, offset,
                            uint64_t(rows - 1) * rowStride + V * elem);
      !s.ok())
    return s;
  const uint64_t columns = feed ? feed->columns : 0;
  if (feed) {
    if (feed->column >= columns)
      return Status::fail(StatusCode::InvalidArgument,
                          "greedy choice: history column " +
                              std::to_string(feed->column) + " of " +
                              std::to_string(columns));
    // rows entries `stride` elements apart, i32 or i64.
    auto rowsAt = [&](uint64_t stride, bool i32) {
      return (uint64_t(rows - 1) * stride + 1) * (i32 ? 4 : 8);
    };
    if (Status s = checkRange("greedy feed ids", feed->region, feed->ids,
                              rowsAt(feed->idsStride, feed->idsI32));
        !s.ok())
      return s;
    if (feed->positions >= 0)
      if (Status s = checkRange("greedy feed positions", feed->region,
                                uint64_t(feed->positions),
                                rowsAt(feed->posStride, feed->posI32));
          !s.ok())
        return s;
  }
  if (Status s = makeCurrent(); !s.ok())
    return s;
  if (Status s = loadRuntimeKernel(kArgmaxCuda, "l4_argmax_rows.cu",
                                   "l4_argmax_rows", "greedy choice", argmax_);
      !s.ok())
    return s;
  // One allocation: the ids, the rows' arrival counters (zero between
  // calls), the slices' parts, the feed's history. A generation's calls
  // share rows, V and columns, so only its first may reallocate.
  const DriverApi &a = drv_.api();
  const Slicing sl = slicing(V);
  const uint64_t bytes = greedyBytes(rows, V, columns);
  if (bytes > argmaxCapacity_) {
    if (argmaxOut_)
      a.cuMemFree(argmaxOut_);
    argmaxOut_ = 0;
    argmaxCapacity_ = 0;
    greedyHist_ = 0;
    std::string what = "greedy choice (" + std::to_string(bytes) + " bytes)";
    if (Status s = drv_.check(a.cuMemAlloc(&argmaxOut_, size_t(bytes)),
                              "cuMemAlloc", what);
        !s.ok())
      return s;
    if (Status s = drv_.check(a.cuMemsetD8Async(argmaxOut_, 0, size_t(bytes),
                                                stream_),
                              "cuMemsetD8Async", what);
        !s.ok())
      return streamError(s);
    argmaxCapacity_ = bytes;
  }
  const uint64_t n = uint64_t(rows);
  CUdeviceptr src = base_[int(r)] + offset;
  CUdeviceptr ids = argmaxOut_;
  CUdeviceptr arrived = ids + align256(n * 8);
  CUdeviceptr parts = arrived + align256(n * 4);
  CUdeviceptr hist = feed ? parts + align256(n * sl.slices * kPartBytes) : 0;
  CUdeviceptr feedIds = 0, feedPos = 0;
  unsigned long long idsStride = 0, posStride = 0, column = 0;
  long long position = 0;
  int idsI32 = 0, posI32 = 0;
  if (feed) {
    feedIds = base_[int(feed->region)] + feed->ids;
    idsStride = feed->idsStride;
    idsI32 = feed->idsI32;
    if (feed->positions >= 0) {
      feedPos = base_[int(feed->region)] + uint64_t(feed->positions);
      posStride = feed->posStride;
      posI32 = feed->posI32;
      position = feed->position;
    }
    column = feed->column;
    greedyHist_ = hist;
    greedyHistRows_ = n;
    greedyHistColumns_ = columns;
  }
  unsigned long long stride = rowStride, nRows = n, nV = V, span = sl.span,
                     slices = sl.slices, cols = columns;
  int half = bf16;
  void *params[] = {&src,     &stride,    &nRows,  &nV,      &half,
                    &span,    &slices,    &ids,    &arrived, &parts,
                    &hist,    &cols,      &column, &feedIds, &idsStride,
                    &idsI32,  &feedPos,   &posStride, &posI32, &position};
  unsigned blocks = unsigned(std::min<uint64_t>(n * sl.slices, maxBlocks_));
  if (Status s = drv_.check(a.cuLaunchKernel(argmax_, blocks, 1, 1, 256, 1, 1,
                                             0, stream_, params, nullptr),
                            "cuLaunchKernel", "greedy choice");
      !s.ok())
    return streamError(s);
  if (!out)
    return syncEachLaunch_ ? synchronize() : Status::success();
  return fetch(ids, out, size_t(n) * 8, "greedy choice");
}

Status CudaBackend::greedyHistory(int64_t rows, uint64_t columns,
                                  int64_t *out) {
  const uint64_t n = uint64_t(std::max<int64_t>(rows, 0));
  if (n == 0 || columns == 0)
    return Status::success();
  if (!greedyHist_ || n > greedyHistRows_ || columns != greedyHistColumns_)
    return Status::fail(StatusCode::Internal,
                        "greedy history of " + std::to_string(n) + " x " +
                            std::to_string(columns) +
                            " read, but the last greedy choice kept " +
                            std::to_string(greedyHistRows_) + " x " +
                            std::to_string(greedyHistColumns_));
  if (Status s = makeCurrent(); !s.ok())
    return s;
  return fetch(greedyHist_, out, size_t(n * columns) * 8, "greedy history");
}

uint64_t CudaBackend::greedyBytes(int64_t rows, uint64_t V, uint64_t columns) {
  uint64_t n = uint64_t(std::max<int64_t>(rows, 0));
  return align256(n * 8) + align256(n * 4) +
         align256(n * slicing(V).slices * kPartBytes) +
         align256(n * columns * 8);
}

} // namespace l4c::cuda
