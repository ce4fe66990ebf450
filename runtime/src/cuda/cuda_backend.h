//===- cuda_backend.h - runs a plan's kernels on one GPU ------*- C++ -*-===//
//
// Owns the device side of one session: the four regions in device memory,
// one module per distinct kernel code object (the plan's cubin, or its source
// compiled with NVRTC at load time through an on-disk cache), a stream, and
// CUDA graphs of programs replayed for repeated (B, T), such as decode steps.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_RUNTIME_CUDA_CUDA_BACKEND_H
#define L4C_RUNTIME_CUDA_CUDA_BACKEND_H

#include "cuda/driver.h"
#include "plan.h"

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

namespace l4c::cuda {

/// The CUDA sources of the runtime's own kernels (loadRuntimeKernel), for
/// tests that compile them: AdamW and the gradient sums, the greedy choice.
extern const char *const kOptimizerCuda;
extern const char *const kArgmaxCuda;

/// Every kernel's first parameter, by value (plan.fbs, table Kernel):
/// struct L4Regions { char *arena, *weights, *cache, *io; }.
struct L4Regions {
  CUdeviceptr arena = 0, weights = 0, cache = 0, io = 0;
};
static_assert(sizeof(L4Regions) == 4 * sizeof(void *),
              "L4Regions must match the kernels' struct of four pointers");

struct CudaOptions {
  /// Where load-time cubins are kept; empty: cacheDirectory()
  /// ($L4C_CACHE_DIR, else ~/.cache/l4c).
  std::string cacheDir;
  bool diskCache = true;
  /// Compile every kernel from its source even where the plan's cubin fits
  /// the device (tests, and plans whose cubins are suspect).
  bool preferSource = false;
  /// Grid cap; 0 means kDefaultMaxBlocks. Kernels loop over their work, so
  /// any grid is correct.
  unsigned maxBlocks = 0;
  /// Synchronize after every launch, so that a kernel that faults is named
  /// (slow; for debugging). L4C_CUDA_SYNC=1 in the environment sets it too.
  bool syncEachLaunch = false;
  /// Hand the driver each module's CUDA source text as its image, for a
  /// driver that builds modules from source (the emulator in
  /// runtime/test/cuemu); a real driver rejects it. L4C_CUDA_IMAGE=source in
  /// the environment sets it too.
  bool sourceImages = false;
  /// Launch the kernels whose entries wait for their predecessors
  /// (Kernel.grid_wait) with programmatic stream serialization, so each
  /// one's blocks are resident before the previous kernel ends (sm_90 and
  /// newer, with a driver that has cuLaunchKernelEx). L4C_PDL=0 in the
  /// environment turns it off, to measure what it saves.
  bool programmaticLaunch = true;
};

/// How the kernels' code was obtained, for logs and tests.
struct LoadStats {
  size_t kernels = 0;   ///< functions resolved
  size_t modules = 0;   ///< distinct code objects loaded
  size_t fromPlan = 0;  ///< modules from the plan's cubins
  size_t fromCache = 0; ///< modules from the disk cache
  size_t compiled = 0;  ///< modules compiled with NVRTC during this load
  /// Kernels launched with programmatic stream serialization.
  size_t programmatic = 0;
  double compileSeconds = 0;
  /// Why the disk cache could not be written (the load still succeeded).
  std::string cacheWarning;
  /// The kernels' code as the driver reports it (cuFuncGetAttribute): the
  /// most registers a thread of any kernel takes, and which kernel; how
  /// many kernels use local memory (register spills or local arrays) and
  /// the most a thread of one uses.
  int maxRegisters = 0;
  std::string maxRegistersKernel;
  size_t localMemoryKernels = 0;
  uint64_t maxLocalBytes = 0;
  std::vector<rt::KernelCode> code; ///< each plan kernel's, by index
};

/// What a plan asks of a device's memory, from the plan alone: its four
/// regions, each rounded up to 256 bytes as allocated, and for a train plan
/// the optimizer state kept on the device (gradient sums, AdamW moments,
/// f32 masters of bf16 weights), and for a generate plan what the device's
/// greedy choice takes (CudaBackend::greedyBytes at the maximum batch):
/// every allocation a session makes.
/// The driver's context and the kernels' code come on top.
struct MemoryNeed {
  uint64_t region[4] = {0, 0, 0, 0}; ///< by plan::Region
  uint64_t optimizer = 0;
  uint64_t greedy = 0;
  uint64_t total() const;
  /// "weights 401.47 GiB, cache 3.00 GiB, arena 1.22 GiB, io 917.25 KiB,
  /// greedy choice 67.00 KiB", largest first, the parts there are.
  std::string describe() const;
};

/// Not thread-safe: one caller at a time (the Session's lock). Every call
/// makes the backend's context current on the calling thread first.
class CudaBackend {
public:
  static constexpr unsigned kDefaultMaxBlocks = 65535;
  /// Graphs kept at once; the least recently replayed is dropped beyond.
  static constexpr size_t kMaxGraphs = 64;

  /// Whether the plan can run on this backend at all, without a device:
  /// one rank, and every kernel has an entry and a cubin or source. The
  /// message names the first kernel lacking CUDA code.
  static rt::Status checkPlan(const rt::Plan &plan);
  /// The architecture NVRTC compiles for: sm_90a on compute capability 9.0
  /// (Hopper's wgmma and setmaxnreg need it), sm_XY elsewhere.
  static std::string archFor(int major, int minor);

  /// Opens `device` (an ordinal), allocates and zeroes the regions, and
  /// loads every kernel. `driver` must outlive the backend. A plan whose
  /// memoryNeed exceeds the device's free memory fails at once, with every
  /// figure in the message, before anything is allocated.
  static rt::Status create(std::shared_ptr<const rt::Plan> plan, int device,
                           const Driver &driver,
                           std::unique_ptr<CudaBackend> &out,
                           const CudaOptions &opts = CudaOptions());

  static MemoryNeed memoryNeed(const rt::Plan &plan);
  /// What probe() found.
  struct DeviceReport {
    std::string deviceName, arch;
    int multiprocessors = 0;
    uint64_t freeBytes = 0, totalBytes = 0; ///< device memory, cuMemGetInfo
    MemoryNeed need;
    bool fits() const { return need.total() <= freeBytes; }
    LoadStats load;
  };
  /// Opens `device` and loads every kernel of the plan, each checked against
  /// the device's limits as create() does, but allocates nothing: whether
  /// the plan's code runs on this device, and whether its memory would fit
  /// (a plan too large for one GPU can still have its kernels checked).
  static rt::Status probe(std::shared_ptr<const rt::Plan> plan, int device,
                          const Driver &driver, DeviceReport &out,
                          const CudaOptions &opts = CudaOptions());
  ~CudaBackend();
  CudaBackend(const CudaBackend &) = delete;
  CudaBackend &operator=(const CudaBackend &) = delete;

  const rt::Plan &plan() const { return *plan_; }
  const std::string &deviceName() const { return deviceName_; }
  const std::string &arch() const { return arch_; } ///< "sm_90a"
  int multiprocessors() const { return sms_; }
  const LoadStats &loadStats() const { return stats_; }
  /// Device address and size (bytes, rounded up to 256) of a region; 0 for
  /// a region the plan does not use.
  CUdeviceptr regionBase(plan::Region r) const { return base_[int(r)]; }
  uint64_t regionSize(plan::Region r) const { return size_[int(r)]; }

  /// Copies host bytes into [offset, offset + bytes) of a region, after the
  /// work already queued; returns once `src` may be reused.
  rt::Status upload(plan::Region r, uint64_t offset, const void *src,
                    uint64_t bytes);
  /// Copies region bytes to the host after the queued work (so kernel faults
  /// surface here too); returns once `dst` holds them.
  rt::Status download(plan::Region r, uint64_t offset, void *dst,
                      uint64_t bytes);
  /// Sets region bytes to `value`, queued after the work before it.
  rt::Status fill(plan::Region r, uint64_t offset, uint64_t bytes,
                  uint8_t value = 0);

  /// Queues the program's kernels for batch B and length T and returns;
  /// errors of the launches themselves name the kernel.
  rt::Status runProgram(const rt::ProgramDesc &prog, int64_t B, int64_t T);
  /// The same work through a CUDA graph: captured on the first call for a
  /// (program, B, T), replayed on later ones. For programs run many times
  /// with the same extents (decode); B and T are baked into the graph.
  rt::Status runProgramGraph(const rt::ProgramDesc &prog, int64_t B, int64_t T);
  size_t graphCount() const { return graphs_.size(); }
  /// Fills `numel` elements at `offset` of a region with the random weights
  /// of runtime/src/random.h (f32, or bf16 when `bf16`), on the device. The
  /// generator is compiled with NVRTC on first use (through the disk cache);
  /// without NVRTC this fails, and the caller fills on the host instead.
  rt::Status fillRandom(plan::Region r, uint64_t offset, uint64_t numel,
                        bool bf16, uint64_t key, float stddev);
  /// out[i] = the index of the largest of the V logits (f32, or bf16 when
  /// `bf16`) at offset + i * rowStride bytes of a region, for i < rows:
  /// the first NaN if a row has one, else the first index of the maximum
  /// (cpu::argmaxRows's rule), after the queued work; returns once `out`
  /// holds them (cuda_argmax.cpp).
  ///
  /// With a `feed`, each row's choice also goes where the next decode step
  /// reads it (that program's ids, and its positions set to
  /// feed->position) and into column feed->column of a history on the
  /// device, and `out` may be null: then nothing comes back and nothing
  /// waits, so decode steps follow one another without the host.
  struct GreedyFeed {
    plan::Region region = plan::Region::Io; ///< of the ids and positions
    uint64_t ids = 0;       ///< byte offset of the decode program's ids
    uint64_t idsStride = 0; ///< elements from one row's id to the next
    bool idsI32 = false;    ///< i32 ids (else i64)
    int64_t positions = -1; ///< byte offset of its positions; -1: none
    uint64_t posStride = 0;
    bool posI32 = false;
    int64_t position = 0; ///< the position the chosen tokens go in at
    uint64_t column = 0;  ///< history column, < columns
    uint64_t columns = 0; ///< the history's width (the same all generation)
  };
  rt::Status argmaxRows(plan::Region r, uint64_t offset, uint64_t rowStride,
                        int64_t rows, uint64_t V, bool bf16, int64_t *out,
                        const GreedyFeed *feed = nullptr);
  /// The feed's history, [rows, columns] ids, after the queued work.
  rt::Status greedyHistory(int64_t rows, uint64_t columns, int64_t *out);
  /// The device memory argmaxRows takes for `rows` rows of V logits and a
  /// history `columns` wide.
  static uint64_t greedyBytes(int64_t rows, uint64_t V, uint64_t columns = 0);
  /// Waits for all queued work.
  rt::Status synchronize();

  /// Training on the device (cuda_optimizer.cpp). One tensor the optimizer
  /// updates: a weight (f32, or bf16 with an f32 master copy on the device)
  /// and the plan buffer its train step writes the gradient to.
  struct OptTensor {
    uint64_t weight = 0; ///< offset in the weights region
    bool bf16 = false;
    plan::Region gradRegion = plan::Region::Io;
    uint64_t grad = 0;   ///< offset of the f32 gradient in gradRegion
    uint64_t numel = 0;
  };
  /// What the optimizer keeps per tensor besides the weight itself.
  enum class OptState { GradSum, M, V, Master };
  /// Allocates the optimizer's state (the gradient sum over micro-batches,
  /// AdamW's moments, masters of bf16 weights), zeroed; masters are set
  /// with optUpload.
  rt::Status initOptimizer(const std::vector<OptTensor> &tensors);
  /// The bytes initOptimizer allocates for `tensors` (numel and bf16 count).
  static uint64_t optimizerBytes(const std::vector<OptTensor> &tensors);
  bool hasOptimizer() const { return optBase_ != 0; }
  /// After a train step: the gradient sum becomes the step's gradients
  /// (`first`) or adds them.
  rt::Status accumulateGrads(bool first);
  /// One AdamW step over every tensor in one launch, the gradient being the
  /// sum over `microBatches` divided by their number; the arithmetic of the
  /// CPU's cpu::adamwStep, bit for bit. Scalars as it computes them.
  struct AdamWScalars {
    double decay, stepSize, bc2Sqrt, w1, oneMinusW1, beta2, w2, eps;
    int microBatches;
  };
  rt::Status adamwStep(const AdamWScalars &h);
  /// Copies one tensor's state (numel f32) between host and device.
  rt::Status optDownload(size_t tensor, OptState which, float *dst);
  rt::Status optUpload(size_t tensor, OptState which, const float *src);

  /// Runs the program once with a CUDA event between every two launches;
  /// ms[i] receives the GPU time of prog.steps[i]. Launched plainly (no
  /// programmatic launch), so that no kernel starts before the event
  /// that ends its predecessor's time.
  rt::Status profileProgram(const rt::ProgramDesc &prog, int64_t B, int64_t T,
                            std::vector<double> &ms);

  /// GPU time between startTimer() and stopTimer() on the stream, measured
  /// with CUDA events; stopTimer waits for the work in between.
  rt::Status startTimer();
  rt::Status stopTimer(double &milliseconds);

private:
  struct Launch {
    CUfunction fn = nullptr;
    unsigned grid = 1, threads = 1, sharedBytes = 0;
    bool programmatic = false; ///< cuLaunchKernelEx, see CudaOptions
  };
  struct Graph {
    CUgraphExec exec = nullptr;
    uint64_t lastUse = 0;
  };

  CudaBackend(std::shared_ptr<const rt::Plan> plan, const Driver &driver)
      : plan_(std::move(plan)), drv_(driver) {}
  /// What create() and probe() share: the plan checked, the options set,
  /// the device opened, its memory queried.
  static rt::Status open(std::shared_ptr<const rt::Plan> plan, int device,
                         const Driver &driver, const CudaOptions &opts,
                         std::unique_ptr<CudaBackend> &out);
  void configure(const CudaOptions &opts);
  rt::Status openDevice(int device);
  /// Free and total device memory, into freeBytes_ and totalBytes_.
  rt::Status queryMemory();
  /// Fails (out of memory) where the plan's memoryNeed exceeds freeBytes_.
  rt::Status checkMemory() const;
  rt::Status allocateRegions();
  rt::Status loadKernels(const CudaOptions &opts);
  /// Encodes every kernel's TMA tensor maps over the allocated regions.
  rt::Status encodeTensorMaps();
  /// Launches plan kernel `k` with (regions, B, T, its tensor maps...);
  /// `params` is the caller's scratch (the driver copies the values at
  /// launch and at capture, so locals do). `programmatic`: as the load
  /// decided (Launch::programmatic); false launches it plainly.
  rt::Status launchKernel(uint32_t k, L4Regions &regions, long long &B,
                          long long &T, std::vector<void *> &params,
                          bool programmatic = true);
  rt::Status makeCurrent() const;
  rt::Status checkRange(const char *what, plan::Region r, uint64_t offset,
                        uint64_t bytes) const;
  rt::Status checkExtents(const rt::ProgramDesc &prog, int64_t B,
                          int64_t T) const;
  rt::Status launchSteps(const rt::ProgramDesc &prog, long long B, long long T,
                         bool capturing);
  /// Copies `bytes` from device address `src` to the host after the queued
  /// work and waits for them (download, the greedy ids, optimizer state).
  rt::Status fetch(CUdeviceptr src, void *dst, size_t bytes,
                   const std::string &what);
  /// Adds which program ran last to an asynchronous error.
  rt::Status streamError(rt::Status s) const;
  /// Compiles (NVRTC, through the disk cache) or takes as a source image
  /// one of the runtime's own kernels and loads it, once.
  rt::Status loadRuntimeKernel(std::string_view source, const char *file,
                               const char *entry, const char *what,
                               CUfunction &fn);
  /// Blocks for a grid-stride loop over `work` items.
  unsigned streamGrid(uint64_t work, unsigned threads) const;
  CUdeviceptr optState(size_t tensor, OptState which) const;
  /// Launches one of the optimizer's kernels over its chunks.
  rt::Status launchOptimizer(CUfunction fn, void **params, const char *what);
  rt::Status optCopy(size_t tensor, OptState which, float *host, bool up);
  std::string kernelLabel(uint32_t k) const;

  std::shared_ptr<const rt::Plan> plan_;
  const Driver &drv_;
  CUdevice device_ = 0;
  CUcontext ctx_ = nullptr;
  bool ctxRetained_ = false;
  CUstream stream_ = nullptr;
  std::string deviceName_, arch_;
  int sms_ = 0, maxThreads_ = 1024, maxSharedOptin_ = 48 << 10;
  int ccMajor_ = 0; ///< compute capability
  uint64_t freeBytes_ = 0, totalBytes_ = 0; ///< at queryMemory()
  unsigned maxBlocks_ = kDefaultMaxBlocks;
  bool syncEachLaunch_ = false;
  CUdeviceptr base_[4] = {0, 0, 0, 0};
  uint64_t size_[4] = {0, 0, 0, 0};
  std::vector<CUmodule> modules_;
  std::vector<Launch> launches_; ///< per plan kernel
  /// Per plan kernel: its encoded tensor maps, passed by value after B, T.
  std::vector<std::vector<CUtensorMap>> tensorMaps_;
  std::map<std::tuple<std::string, int64_t, int64_t>, Graph> graphs_;
  uint64_t graphClock_ = 0;
  CUevent timerStart_ = nullptr, timerStop_ = nullptr;
  std::string lastRun_; ///< "program 'decode' (B=1, T=1)"
  bool sourceImages_ = false;       ///< CudaOptions::sourceImages
  CUfunction randomFill_ = nullptr; ///< fillRandom's kernel, once loaded
  CUfunction argmax_ = nullptr;     ///< argmaxRows's kernel, once loaded
  CUdeviceptr argmaxOut_ = 0;       ///< its ids, counters, parts, history
  uint64_t argmaxCapacity_ = 0;     ///< bytes at argmaxOut_
  CUdeviceptr greedyHist_ = 0;      ///< the last feed's history
  uint64_t greedyHistRows_ = 0, greedyHistColumns_ = 0;
  // The optimizer (initOptimizer): one allocation holding every tensor's
  // state and, at its start, the table of tensors the kernels read.
  std::vector<OptTensor> optTensors_;
  std::vector<uint64_t> optOffsets_; ///< per tensor: its state's offset
  CUdeviceptr optBase_ = 0, optTable_ = 0, optChunks_ = 0;
  uint64_t optChunkCount_ = 0;
  CUfunction gradAccumulate_ = nullptr, adamw_ = nullptr;
  std::string cacheDir_;            ///< CudaOptions::cacheDir, resolved
  bool diskCache_ = true;
  LoadStats stats_;
};

} // namespace l4c::cuda

#endif // L4C_RUNTIME_CUDA_CUDA_BACKEND_H
