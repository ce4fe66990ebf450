//===- executor.h - sessions that run a plan on the CPU -------*- C++ -*-===//
//
// A Session owns the memory regions of one verified plan (arena, weights,
// KV cache, program I/O), fills the weights from a checkpoint or a seed and
// runs the plan's programs: a forward pass, prefill + decode generation, or
// training steps with AdamW and checkpoints (train.cpp).
//
//===----------------------------------------------------------------------===//
#ifndef L4C_RUNTIME_EXECUTOR_H
#define L4C_RUNTIME_EXECUTOR_H

#include "plan.h"

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace l4c::cuda {
class CudaBackend;
} // namespace l4c::cuda

namespace l4c::rt {

struct SessionOptions {
  /// Checkpoint directory (or single .safetensors file); empty means fill
  /// the weights from `randomSeed` instead.
  std::string weightsPath;
  uint64_t randomSeed = 0;
  /// Where the programs run: "cpu" (the reference backend), "cuda" (device
  /// 0) or "cuda:N". The CUDA backend needs a plan compiled with
  /// --target=cuda and the driver (libcuda.so.1, loaded with dlopen).
  std::string device = "cpu";
};

/// Parses a device string ("cpu", "cuda", "cuda:N"): ordinal -1 means the
/// CPU, otherwise the CUDA device number.
Status parseDevice(const std::string &device, int &ordinal);

/// What a CUDA device makes of a plan without running it (probeDevice).
struct DeviceProbe {
  std::string deviceName, arch;
  int multiprocessors = 0;
  uint64_t freeBytes = 0, totalBytes = 0; ///< the device's memory, now
  /// The plan's regions (rounded as allocated) plus, for a train plan, the
  /// optimizer state on the device; and "weights 1.2 GiB, ..." of the parts.
  uint64_t needBytes = 0;
  std::string needDetail;
  bool fits = false; ///< needBytes <= freeBytes
  size_t kernels = 0, modules = 0, modulesFromPlan = 0, modulesCompiled = 0;
  int maxRegisters = 0; ///< 0 where the driver does not say
  std::string maxRegistersKernel;
  size_t localMemoryKernels = 0;
  uint64_t maxLocalBytes = 0;
  std::vector<KernelCode> code; ///< per plan kernel
};
/// Opens `device` ("cuda" or "cuda:N"), loads every kernel of the plan there
/// (each checked against the device's limits as a session's load does) and
/// compares the plan's memory with the device's free memory, allocating
/// nothing: whether a plan's code runs on a device even where its weights
/// do not fit.
Status probeDevice(std::shared_ptr<const Plan> plan, const std::string &device,
                   DeviceProbe &out);

/// Temperature and nucleus sampling; the same seed gives the same tokens.
struct Sampling {
  double temperature = 1.0; ///< > 0
  double topP = 1.0;        ///< in (0, 1]
  uint64_t seed = 0;
};

/// torch.optim.AdamW's hyperparameters, torch's defaults.
struct AdamWParams {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weightDecay = 0.01;
};

/// Wall-clock split of the last forward or generate call (a train step
/// counts as a prefill of B * T tokens).
struct Timing {
  double prefillSeconds = 0, decodeSeconds = 0;
  int64_t prefillTokens = 0, decodeTokens = 0; ///< summed over the batch
};

/// One kernel of a differential GPU-against-CPU run (Session::checkKernels):
/// the worst of its results.
struct KernelCheck {
  uint32_t kernel = 0;
  std::string name, program, buffer; ///< buffer: the worst result's name
  bool integer = false;              ///< an integer result (router indices)
  double maxAbsErr = 0, maxAbsRef = 0; ///< float results, live elements
  uint64_t mismatches = 0;            ///< integer results: elements differing
  uint64_t elements = 0;              ///< live result elements compared
  /// Bytes outside the kernel's results that are not what they were before
  /// it (a write out of bounds or to another buffer), and the first one's
  /// place ("arena byte N (in buffer 'x')").
  uint64_t strayBytes = 0;
  std::string strayAt;
  /// maxAbsErr / maxAbsRef (0 for an all-zero reference with no error).
  double relErr() const {
    return maxAbsRef > 0 ? maxAbsErr / maxAbsRef : (maxAbsErr > 0 ? 1e30 : 0);
  }
};

/// One kernel's GPU time in a profile (Session::profileKernels).
struct KernelTime {
  uint32_t kernel = 0;
  std::string name, kind;
  double ms = 0; ///< median over the repeats
};

/// One tile configuration of a tunable kernel (Session::tuneKernels).
struct KernelTuning {
  uint32_t kernel = 0; ///< the configuration's kernel (a candidate or `of`)
  uint32_t of = 0;     ///< the kernel a program runs
  std::string name, signature, config;
  double ms = 0; ///< median GPU time over the repeats
  /// Against the results of kernel `of` on the same inputs (live elements).
  double maxAbsErr = 0, maxAbsRef = 0;
};

class Session {
public:
  static Status create(std::shared_ptr<const Plan> plan,
                       const SessionOptions &opts,
                       std::unique_ptr<Session> &out);
  ~Session();
  Session(const Session &) = delete;
  Session &operator=(const Session &) = delete;

  const Plan &plan() const { return *plan_; }
  /// "cpu", or "cuda:N (<device name>, sm_XX)".
  std::string deviceName() const;

  /// Runs the "forward" program on ids [B, T]; logits receives [B, T, V].
  Status forward(const int64_t *ids, int64_t B, int64_t T, float *logits);

  /// Continues ids [B, T] by G tokens (greedy when sampling is null) into
  /// outIds [B, T + G]; *outLen receives T + G. Uses prefill + decode with the
  /// KV cache, or re-runs the forward program when the plan has only that.
  Status generate(const int64_t *ids, int64_t B, int64_t T, int64_t G,
                  const Sampling *sampling, int64_t *outIds, int64_t *outLen);

  Timing lastTiming() const;

  /// The differential test of every kernel (CUDA sessions): runs `program`
  /// ("forward", "prefill", "decode") on ids [B, T] at position pos0 kernel
  /// by kernel on the CPU backend and on the GPU, compares each kernel's
  /// results over their live elements, then gives the GPU the CPU's results,
  /// so every kernel is checked on identical inputs. Leaves the regions as
  /// the CPU computed them (a prefill check may be followed by a decode one).
  Status checkKernels(const std::string &program, const int64_t *ids,
                      int64_t B, int64_t T, int64_t pos0,
                      std::vector<KernelCheck> &out);

  /// CUDA sessions: the GPU time of every kernel of `program` on ids [B, T]
  /// at position pos0, the median of `repeats` runs, in program order. The
  /// run changes what the program writes (a decode profile appends to the
  /// KV cache at pos0).
  Status profileKernels(const std::string &program, const int64_t *ids,
                        int64_t B, int64_t T, int64_t pos0, int64_t repeats,
                        std::vector<KernelTime> &out);

  /// CUDA sessions, plans with tuning candidates (l4c compile
  /// --tune-candidates): runs `program` on ids [B, T] at pos0 kernel by
  /// kernel; at each kernel that has candidates, runs the kernel and each
  /// candidate from the same saved values of the buffers it touches, once
  /// to compare their results with the kernel's and `repeats` times to take
  /// the median time, then continues from the kernel's own results. One row
  /// per configuration, the kernel's own first, in program order.
  Status tuneKernels(const std::string &program, const int64_t *ids, int64_t B,
                     int64_t T, int64_t pos0, int64_t repeats,
                     std::vector<KernelTuning> &out);

  // Training (train.cpp). Gradients of micro-batches are summed in the
  // session; the optimizer applies their mean, then clears them.

  /// Runs train_step on ids [B, T] (T >= 2): *loss (may be null) receives
  /// the mean next-token loss, and the step's gradients are added to the
  /// session's sum.
  Status trainStep(const int64_t *ids, int64_t B, int64_t T, float *loss);
  /// Drops the summed gradients.
  void zeroGrad();
  /// One torch.optim.AdamW step from the mean of the summed gradients; then
  /// clears them. Fails when no train step ran since the last one.
  Status adamwStep(const AdamWParams &h);
  /// "<hf>" (the current weight), "grad.<hf>" (the mean of the summed
  /// gradients), "m.<hf>", "v.<hf>" (AdamW's moments).
  Status tensorShape(std::string_view name, std::vector<int64_t> &shape) const;
  Status readTensor(std::string_view name, float *dst, uint64_t numel) const;
  /// Small integers saved with the optimizer state (e.g. a data cursor).
  /// "step" is AdamW's step count; "micro_batches" (read only) the number
  /// of gradients summed since the last step.
  Status setCounter(const std::string &name, int64_t value);
  Status getCounter(const std::string &name, int64_t &value) const;
  /// Writes DIR/config.json, DIR/model.safetensors and
  /// DIR/optimizer.safetensors as one atomic replacement of DIR. `hook`,
  /// when set, runs between stages ("written": every file is in the
  /// temporary directory, nothing is renamed yet); a failure it returns
  /// aborts the save like any other (tests simulate interruptions with it).
  using SaveHook = std::function<Status(const std::string &stage)>;
  Status saveCheckpoint(const std::string &dir, const SaveHook &hook = {});
  /// Restores AdamW's moments, step and counters from DIR's
  /// optimizer.safetensors (or that file itself); drops summed gradients.
  Status loadOptimizer(const std::string &path);

  /// Bytes of region r (for tests that inspect buffers).
  uint8_t *regionData(plan::Region r) { return regions_[int(r)].base; }

private:
  explicit Session(std::shared_ptr<const Plan> plan); // executor.cpp
  /// profileKernels and tuneKernels (`what`: "profiling", "tuning"): checks
  /// the session, program and extents, then stages and uploads the inputs.
  Status stageTimedRun(const char *what, const std::string &program,
                       const int64_t *ids, int64_t B, int64_t T, int64_t pos0,
                       int64_t repeats, const ProgramDesc *&prog);
  Status checkSupported() const;
  const ProgramDesc *trainProgram(Status &st) const;
  float *weightData(size_t w) const;
  int64_t weightIndex(std::string_view hfName) const;
  void ensureMoments();
  Status writeCheckpointFiles(const std::string &dir) const;
  Status allocate();
  Status loadWeights(const std::string &path);
  Status randomWeights(uint64_t seed);
  /// bf16 train plans: the f32 master weights, from the checkpoint's f32
  /// values or the seed's, before any rounding to bf16.
  Status initMasterWeights(const SessionOptions &opts);
  /// GPU sessions keep the weights on the device only; this copies them to
  /// the host region once, for what needs them there (kernel checks).
  Status hostWeights();
  /// GPU train sessions: AdamW, its moments, the bf16 masters and the
  /// gradient sums live on the device (train.cpp).
  Status initDeviceOptimizer();
  /// Brings the host's copies of the weights, masters and moments up to
  /// date after device optimizer steps, for what reads them there
  /// (checkpoints, readTensor, kernel checks). Const for those readers: it
  /// refreshes mirrors, not the session's state.
  Status syncHostTrainState() const;
  Status attachGpu(int ordinal);
  /// CUDA: copies the program's inputs for [0, B) x [0, T) to the device.
  Status uploadInputs(const ProgramDesc &prog, int64_t B, int64_t T);
  /// CUDA: a whole buffer from the device to the host region, or back.
  Status fetchBuffer(const BufferDesc &d);
  Status pushBuffer(const BufferDesc &d);
  /// CUDA: copies logits rows [r0, r1) of each batch entry to the host
  /// mirror (a no-op on the CPU, where the mirror is the buffer).
  Status fetchLogits(const ProgramDesc &prog, int64_t B, int64_t r0,
                     int64_t r1);
  Status checkIds(const int64_t *ids, int64_t B, int64_t T, int64_t ld) const;
  Status runProgram(const ProgramDesc &prog, const int64_t *ids, int64_t ldIds,
                    int64_t B, int64_t T, int64_t pos0);
  /// generate's greedy path on a GPU with prefill and decode programs: the
  /// choices stay on the device until the end (outIds' prompts are set).
  /// Taken where feedable: the decode program's ids and positions, which
  /// the choice writes, share a region and overlap neither program's logits.
  bool feedable(const ProgramDesc &prefill, const ProgramDesc &decode) const;
  Status generateOnDevice(const ProgramDesc &prefill, const ProgramDesc &decode,
                          int64_t *outIds, int64_t B, int64_t T, int64_t G,
                          size_t V);
  /// Writes ids and positions pos0 + s into the host input buffers.
  void stageInputs(const ProgramDesc &prog, const int64_t *ids, int64_t ldIds,
                   int64_t B, int64_t T, int64_t pos0);
  /// Copies the logits row of the last token of each batch entry into out [B,
  /// V].
  void lastLogits(const ProgramDesc &prog, int64_t B, int64_t T,
                  float *out) const;

  struct Region {
    uint8_t *base = nullptr;
    size_t size = 0;
  };
  std::shared_ptr<const Plan> plan_;
  /// The host regions; with a GPU they mirror the device's (weights as
  /// loaded, inputs before upload, logits after download).
  Region regions_[4];
  std::unique_ptr<cuda::CudaBackend> gpu_;
  bool hostWeights_ = false; ///< GPU sessions: host weights region filled
  bool deviceOptimizer_ = false; ///< initDeviceOptimizer ran
  /// The device's weights, masters and moments are newer than the host's.
  mutable bool hostTrainStale_ = false;
  mutable std::mutex mu_; ///< one program run at a time
  Timing timing_;
  // Training state, per Plan::weights entry.
  std::vector<std::vector<float>> gradSum_, m_, v_;
  /// bf16 train plans: f32 master weights (empty for f32 weights).
  std::vector<std::vector<float>> master_;
  int64_t microBatches_ = 0, step_ = 0;
  std::map<std::string, int64_t> counters_;
};

/// Runs a kernel's semantic ops for batch entries [0, B) over run-time
/// length T (cpu/ops.cpp). `regions` are the bases of the session's four
/// regions.
Status runCpuKernel(const Plan &plan, uint8_t *const regions[4],
                    const KernelDesc &kernel, size_t B, size_t T);

} // namespace l4c::rt

#endif // L4C_RUNTIME_EXECUTOR_H
