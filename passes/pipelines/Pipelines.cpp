//===- Pipelines.cpp - l4c pass pipelines ---------------------------------===//
//
// One builder per pipeline, shared by l4c and l4-opt.
//
//===----------------------------------------------------------------------===//
#include "l4c/Passes/Pipelines.h"
#include "l4c/Conversion/Passes.h"
#include "l4c/Passes/Passes.h"
#include "mlir/Pass/PassRegistry.h"
#include "mlir/Transforms/Passes.h"

void l4c::buildLowerToKernelPipeline(mlir::OpPassManager &pm,
                                     const LowerToKernelOptions &opts) {
  l4c::AutodiffPassOptions ad;
  ad.recompute = opts.recompute;
  pm.addPass(l4c::createAutodiffPass(ad));
  pm.addPass(mlir::createCanonicalizerPass());
  pm.addPass(mlir::createCSEPass());
  pm.addPass(l4c::createSplitExpertsPass());
  // After CSE: the chunks' recomputed projections must stay separate ops.
  l4c::ChunkLossPassOptions chunk;
  chunk.chunk = opts.lossChunk;
  pm.addPass(l4c::createChunkLossPass(chunk));
  pm.addPass(l4c::createConvertL4ToKernelPass());
  l4c::FusionPassOptions fuse;
  fuse.fusions = opts.fusions;
  pm.addPass(l4c::createFusionPass(fuse));
  pm.addPass(l4c::createPlanMemoryPass());
}

void l4c::registerPipelines() {
  mlir::PassPipelineRegistration<LowerToKernelOptions>(
      "l4c-lower-to-kernel",
      "l4 IR to kernel groups with a memory plan (what l4c compile runs)",
      [](mlir::OpPassManager &pm, const LowerToKernelOptions &opts) {
        buildLowerToKernelPipeline(pm, opts);
      });
}
