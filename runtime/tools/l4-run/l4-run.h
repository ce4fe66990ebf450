//===- l4-run.h - options and helpers shared by l4-run's modes -*- C++ -*-===//
//
// The parsed command line and the error helpers that l4-run.cpp (inference
// modes, argument parsing) and train.cpp (train plans: the reference I/O
// contract and the training loop) share.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_TOOLS_L4_RUN_H
#define L4C_TOOLS_L4_RUN_H

#include "l4c/runtime/l4rt.h"

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace l4run {

struct Options {
  std::string plan, weights, inputs, out, prompt;
  std::string device = "cpu"; ///< --device: cpu, cuda, cuda:N
  std::optional<double> checkKernels; ///< --check-kernels=TOL
  /// --kernel-tol=NAME=TOL (repeatable, with --check-kernels): kernels
  /// whose name contains NAME are held to TOL instead (the first match).
  std::vector<std::pair<std::string, double>> kernelTols;
  bool bench = false;                 ///< --bench (with --batch, --seq)
  bool profile = false;               ///< --profile (with --bench, cuda)
  /// --profile-json=FILE (implies --profile): every kernel's time of every
  /// profiled program, as JSON, for scripts (bench/kernels.py).
  std::string profileJson;
  int64_t repeats = 5;                ///< --repeats (bench)
  bool info = false, hasPrompt = false;
  bool kernels = false; ///< --info --kernels: every program's kernels
  std::optional<uint64_t> randomSeed;
  std::optional<int64_t> maxNewTokens;
  std::optional<double> temperature, topP;
  std::optional<uint64_t> seed;
  // Train plans.
  std::optional<l4rt_adamw> adamw; ///< --adamw, torch's defaults elsewhere
  std::string trainData, dataFormat = "bytes", save, resume, log;
  std::optional<int64_t> steps, batch, seq, saveEvery;
  int64_t gradAccum = 1;
};

[[noreturn]] void die(const std::string &msg);
[[noreturn]] void usage(const std::string &msg);
/// Dies with l4rt_last_error() unless s is L4RT_OK.
void check(l4rt_status s);

/// input_ids (i64 [B, T]) of a safetensors file; dies with a message.
std::vector<int64_t> readInputIds(const std::string &path, int64_t &B,
                                  int64_t &T);

/// The hyperparameters to use: --adamw's, else torch's defaults.
l4rt_adamw adamwOf(const Options &o);

/// l4-run PLAN --weights CKPT --inputs IN --out OUT on a train plan: loss,
/// grad.<name> and adamw.<name> (after one step) into OUT.
int runTrainFiles(const Options &o, l4rt_session session);

/// l4-run PLAN ... --train-data FILE --steps N: the training loop. Creates
/// its own session (weights, seed or --resume).
int runTraining(const Options &o, l4rt_plan plan, const l4rt_plan_summary &s);

} // namespace l4run

#endif // L4C_TOOLS_L4_RUN_H
