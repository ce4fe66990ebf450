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
#include <string>

namespace l4c {

/// Must equal the runtime's kPlanVersion.
constexpr uint32_t kPlanVersion = 1;

struct PlanOptions {
  std::string programKind = "forward"; ///< forward | generate | train
  std::string target = "cpu";
  std::string precision = "f32";
  int64_t maxBatch = 1, maxSeq = 1;
};

/// Builds the plan bytes. The module must hold only kernel.group and
/// l4.reshape ops in its functions (the output of l4c-lower-to-kernel).
llvm::Expected<std::string> serializePlan(mlir::ModuleOp module,
                                          const Llama4Config &config,
                                          const PlanOptions &opts);

/// serializePlan, then an atomic write to `path` (nothing is left behind on
/// failure).
llvm::Error writePlan(mlir::ModuleOp module, const Llama4Config &config,
                      const PlanOptions &opts, llvm::StringRef path);

} // namespace l4c

#endif // L4C_PLAN_PLANWRITER_H
