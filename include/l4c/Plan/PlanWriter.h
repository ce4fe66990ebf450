//===- PlanWriter.h - kernel IR -> FlatBuffers plan -----------------------===//
//
// Serialises a memory-planned kernel-level module into the plan format of
// runtime/schema/plan.fbs, which libl4rt loads and executes.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_PLAN_PLANWRITER_H
#define L4C_PLAN_PLANWRITER_H

#include "l4c/Import/Config.h"
#include "mlir/IR/BuiltinOps.h"
#include "llvm/Support/Error.h"
#include "llvm/Support/raw_ostream.h"
#include <map>
#include <string>

namespace l4c {

/// Must equal the runtime's kPlanVersion.
constexpr uint32_t kPlanVersion = 2;

struct PlanOptions {
  std::string programKind = "forward"; ///< forward | generate | train
  std::string target = "cpu";          ///< cpu | cuda | cuda:sm_XX[a]
  std::string precision = "f32";
  int64_t maxBatch = 1, maxSeq = 1;
  /// CUDA targets: print each NVRTC program's compile time to stderr.
  bool cudaStats = false;
  /// CUDA targets: a tuning file's choices for the target's arch, tile
  /// configuration by kernel signature (the name of the kernel's default
  /// body; see l4-tune).
  std::map<std::string, std::string> tuning;
  /// CUDA targets: also write every other tile configuration of each
  /// tunable kernel, as candidates for l4-tune (no program runs them).
  bool tuneCandidates = false;
};

/// The GPU architecture a target names: "" for cpu, "sm_90a" for cuda (the
/// default) or cuda:sm_90a; fails on any other spelling.
llvm::Expected<std::string> cudaArchOf(llvm::StringRef target);

/// Prints the CUDA C++ of every kernel of a kernel-level module, each under a
/// comment naming it; each distinct body once, so the text is one program.
llvm::Error printCudaSources(mlir::ModuleOp module, const PlanOptions &opts,
                             llvm::raw_ostream &os);

/// Builds the plan bytes. The module must hold only kernel.group and
/// l4.reshape ops in its functions (the output of l4c-lower-to-kernel).
/// For CUDA targets every kernel also gets its CUDA source and a cubin built
/// with NVRTC (kernels sharing a body compile as one program).
llvm::Expected<std::string> serializePlan(mlir::ModuleOp module,
                                          const Llama4Config &config,
                                          const PlanOptions &opts);

/// serializePlan, then an atomic write to `path` (nothing is left behind on
/// failure).
llvm::Error writePlan(mlir::ModuleOp module, const Llama4Config &config,
                      const PlanOptions &opts, llvm::StringRef path);

} // namespace l4c

#endif // L4C_PLAN_PLANWRITER_H
