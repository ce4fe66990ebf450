//===- L4ToKernel.cpp - wrap l4 ops into kernel.group ---------------------===//
//
// convert-l4-to-kernel: one kernel per l4 compute op, named after the op's
// location, so every later stage (fusion, codegen, the plan) sees kernels.
//
//===----------------------------------------------------------------------===//
#include "l4c/Conversion/Passes.h"
#include "l4c/Dialect/Kernel/KernelOps.h"
#include "l4c/Dialect/L4/L4Ops.h"
#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/IR/IRMapping.h"
#include "mlir/Transforms/GreedyPatternRewriteDriver.h"
#include "llvm/ADT/TypeSwitch.h"

namespace l4c {
#define GEN_PASS_DEF_CONVERTL4TOKERNELPASS
#include "l4c/Conversion/Passes.h.inc"
} // namespace l4c

using namespace mlir;
using namespace l4c;

llvm::StringRef l4c::kernelKindOf(Operation *op) {
  return llvm::TypeSwitch<Operation *, StringRef>(op)
      .Case<l4::EmbeddingOp, l4::EmbeddingGradOp>([](auto) { return "gather"; })
      .Case<l4::RmsNormOp, l4::L2NormOp, l4::RmsNormGradOp, l4::L2NormGradOp>(
          [](auto) { return "norm"; })
      .Case<l4::LinearOp, l4::LinearGradInputOp, l4::LinearGradWeightOp>(
          [](auto) { return "gemm"; })
      .Case<l4::RopeOp>([](auto) { return "rope"; })
      .Case<l4::KvCacheUpdateOp>([](auto) { return "cache"; })
      .Case<l4::AttentionOp, l4::AttentionGradOp>(
          [](auto) { return "attention"; })
      .Case<l4::RouterScoresOp, l4::RouterScoresGradOp>(
          [](auto) { return "router"; })
      .Case<l4::CrossEntropyOp, l4::CrossEntropyGradOp,
            l4::CrossEntropyStatsOp, l4::CrossEntropyFromStatsOp,
            l4::CrossEntropyGradChunkOp>(
          [](auto) { return "loss"; })
      .Case<l4::MoeExpertsOp, l4::MoeRouteOp, l4::MoeHiddenOp, l4::MoeDownOp,
            l4::MoeExpertsGradOp, l4::MoeGateUpOp, l4::MoeDownGradOp,
            l4::MoeDownGradWeightOp, l4::MoeGateUpGradInputOp,
            l4::MoeCombineGradOp, l4::MoeGateUpGradWeightOp>(
          [](auto) { return "moe"; })
      .Case<l4::TakeLastOp>([](auto) { return "copy"; })
      .Default([](auto) { return "elementwise"; });
}

/// The kernel's name: the op's NameLoc when it has one, else the op name.
static std::string kernelName(Operation *op) {
  if (auto name = dyn_cast<NameLoc>(op->getLoc()))
    return name.getName().str();
  return op->getName().stripDialect().str();
}

namespace {
struct WrapInGroup : public RewritePattern {
  WrapInGroup(MLIRContext *ctx)
      : RewritePattern(MatchAnyOpTypeTag(), /*benefit=*/1, ctx) {}

  LogicalResult matchAndRewrite(Operation *op,
                                PatternRewriter &rewriter) const override {
    if (!isa<l4::L4Dialect>(op->getDialect()))
      return rewriter.notifyMatchFailure(op, "not an l4 op");
    if (isa<l4::ReshapeOp, l4::SliceRowsOp, l4::ConcatRowsOp>(op))
      return rewriter.notifyMatchFailure(op, "views stay views");
    if (op->getParentOfType<kernel::GroupOp>())
      return rewriter.notifyMatchFailure(op, "already in a kernel");
    auto group = kernel::GroupOp::create(rewriter, op->getLoc(), kernelName(op),
                                         l4c::kernelKindOf(op),
                                         op->getOperands(), op->getResultTypes());
    Block &body = group.getBody().front();
    IRMapping map;
    map.map(op->getOperands(), body.getArguments());
    OpBuilder::InsertionGuard guard(rewriter);
    rewriter.setInsertionPointToStart(&body);
    Operation *inner = rewriter.clone(*op, map);
    kernel::YieldOp::create(rewriter, op->getLoc(), inner->getResults());
    rewriter.replaceOp(op, group.getResults());
    return success();
  }
};

struct ConvertL4ToKernelPass
    : public l4c::impl::ConvertL4ToKernelPassBase<ConvertL4ToKernelPass> {
  void runOnOperation() override {
    RewritePatternSet patterns(&getContext());
    l4c::populateL4ToKernelPatterns(patterns);
    if (failed(applyPatternsGreedily(getOperation(), std::move(patterns))))
      return signalPassFailure();
  }
};
} // namespace

void l4c::populateL4ToKernelPatterns(RewritePatternSet &patterns) {
  patterns.add<WrapInGroup>(patterns.getContext());
}
