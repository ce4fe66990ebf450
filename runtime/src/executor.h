//===- executor.h - sessions that run a plan on the CPU -------*- C++ -*-===//
//
// A Session owns the memory regions of one verified plan (arena, weights,
// KV cache, program I/O), fills the weights from a checkpoint or a seed and
// runs the plan's programs: a forward pass, or prefill + decode generation.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_RUNTIME_EXECUTOR_H
#define L4C_RUNTIME_EXECUTOR_H

#include "plan.h"

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

namespace l4c::rt {

struct SessionOptions {
  /// Checkpoint directory (or single .safetensors file); empty means fill
  /// the weights from `randomSeed` instead.
  std::string weightsPath;
  uint64_t randomSeed = 0;
};

/// Temperature and nucleus sampling; the same seed gives the same tokens.
struct Sampling {
  double temperature = 1.0; ///< > 0
  double topP = 1.0;        ///< in (0, 1]
  uint64_t seed = 0;
};

/// Wall-clock split of the last forward or generate call.
struct Timing {
  double prefillSeconds = 0, decodeSeconds = 0;
  int64_t prefillTokens = 0, decodeTokens = 0; ///< summed over the batch
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

  /// Runs the "forward" program on ids [B, T]; logits receives [B, T, V].
  Status forward(const int64_t *ids, int64_t B, int64_t T, float *logits);

  /// Continues ids [B, T] by G tokens (greedy when sampling is null) into
  /// outIds [B, T + G]; *outLen receives T + G. Uses prefill + decode with the
  /// KV cache, or re-runs the forward program when the plan has only that.
  Status generate(const int64_t *ids, int64_t B, int64_t T, int64_t G,
                  const Sampling *sampling, int64_t *outIds, int64_t *outLen);

  Timing lastTiming() const;

  /// Bytes of region r (for tests that inspect buffers).
  uint8_t *regionData(plan::Region r) { return regions_[int(r)].base; }

private:
  explicit Session(std::shared_ptr<const Plan> plan) : plan_(std::move(plan)) {}
  Status checkSupported() const;
  Status allocate();
  Status loadWeights(const std::string &path);
  void randomWeights(uint64_t seed);
  Status checkIds(const int64_t *ids, int64_t B, int64_t T, int64_t ld) const;
  Status runProgram(const ProgramDesc &prog, const int64_t *ids, int64_t ldIds,
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
  Region regions_[4];
  mutable std::mutex mu_; ///< one program run at a time
  Timing timing_;
};

/// Runs one semantic op for batch entries [0, B) over run-time length T
/// (cpu/ops.cpp). `regions` are the bases of the session's four regions.
Status runCpuOp(const Plan &plan, uint8_t *const regions[4],
                const KernelDesc &kernel, const OpDesc &op, size_t B, size_t T);

} // namespace l4c::rt

#endif // L4C_RUNTIME_EXECUTOR_H
