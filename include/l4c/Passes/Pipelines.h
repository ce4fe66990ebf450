//===- Pipelines.h - l4c pass pipelines -----------------------------------===//
//
// The pipelines `l4c` runs, as functions over options, also registered for
// l4-opt so every l4c run can be replayed there.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_PASSES_PIPELINES_H
#define L4C_PASSES_PIPELINES_H

#include "mlir/Pass/PassManager.h"
#include "mlir/Pass/PassOptions.h"

namespace l4c {

/// l4 IR -> kernel IR with every value placed in memory:
/// l4c-autodiff (train programs), canonicalize, cse, l4c-split-experts,
/// l4c-chunk-loss, convert-l4-to-kernel, l4c-fuse, l4c-plan-memory.
struct LowerToKernelOptions
    : public mlir::PassPipelineOptions<LowerToKernelOptions> {
  Option<std::string> recompute{
      *this, "recompute",
      llvm::cl::desc("train programs: none | layers (l4c-autodiff)"),
      llvm::cl::init("none")};
  Option<std::string> lossChunk{
      *this, "loss-chunk",
      llvm::cl::desc("train programs: vocabulary columns per loss chunk, "
                     "auto | none | N (l4c-chunk-loss)"),
      llvm::cl::init("auto")};
  Option<std::string> fusions{
      *this, "fusions",
      llvm::cl::desc("all | none | a list of swiglu, epilogue, norm, rope "
                     "(l4c-fuse)"),
      llvm::cl::init("all")};
};
void buildLowerToKernelPipeline(mlir::OpPassManager &pm,
                                const LowerToKernelOptions &opts = {});

/// Registers the pipelines above as `l4c-lower-to-kernel`.
void registerPipelines();

} // namespace l4c

#endif // L4C_PASSES_PIPELINES_H
