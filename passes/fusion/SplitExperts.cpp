//===- SplitExperts.cpp - routed experts as two kernels -------------------===//
//
// l4c-split-experts rewrites l4.moe_experts as l4.moe_hidden (each token's
// selected experts' SwiGLU activations, [B, S, K, I]) and l4.moe_down (their
// down projections, summed). Between the two the activations are a value
// like any other, so the memory planner gives them bytes and each half is a
// kernel that can spread one token's expert weights over the whole GPU
// (the fused op needs every activation of a token before its first down
// product, which one kernel can only do within one block).
//
//===----------------------------------------------------------------------===//
#include "l4c/Dialect/L4/L4Ops.h"
#include "l4c/Passes/Passes.h"
#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/IR/Builders.h"
#include "mlir/IR/BuiltinTypes.h"
#include "llvm/ADT/SmallVector.h"

namespace l4c {
#define GEN_PASS_DEF_SPLITEXPERTSPASS
#include "l4c/Passes/Passes.h.inc"
} // namespace l4c

using namespace mlir;
namespace l4 = l4c::l4;

namespace {

/// A location named `name + suffix` when `loc` is named (kernel names come
/// from NameLocs), else `loc`.
Location suffixed(Location loc, StringRef suffix) {
  if (auto n = dyn_cast<NameLoc>(loc))
    return NameLoc::get(StringAttr::get(loc.getContext(),
                                        n.getName().str() + suffix.str()),
                        n.getChildLoc());
  return loc;
}

struct SplitExpertsPass
    : public l4c::impl::SplitExpertsPassBase<SplitExpertsPass> {
  void runOnOperation() override {
    SmallVector<l4::MoeExpertsOp> ops;
    getOperation().walk([&](l4::MoeExpertsOp op) { ops.push_back(op); });
    for (l4::MoeExpertsOp op : ops) {
      auto x = cast<RankedTensorType>(op.getInput().getType());
      auto gu = cast<RankedTensorType>(op.getGateUp().getType());
      int64_t experts = gu.getShape()[0], inter = gu.getShape()[2] / 2;
      // Slots: the router's k when the scores come from one, else every
      // expert (the scores could then be nonzero anywhere).
      int64_t slots = experts;
      if (auto router = op.getScores().getDefiningOp<l4::RouterScoresOp>())
        slots = std::min<int64_t>(experts, router.getTopK());
      OpBuilder b(op);
      // f32 whatever the plan's precision: the activations keep the
      // precision they have inside l4.moe_experts, so splitting changes no
      // number.
      auto hType = RankedTensorType::get(
          {x.getShape()[0], x.getShape()[1], slots, inter},
          b.getF32Type());
      auto h = l4::MoeHiddenOp::create(b, suffixed(op.getLoc(), ".gate_up"),
                                       hType, op.getInput(), op.getScores(),
                                       op.getGateUp());
      auto y = l4::MoeDownOp::create(b, suffixed(op.getLoc(), ".down"),
                                     op.getType(), h.getResult(),
                                     op.getScores(), op.getDown());
      for (NamedAttribute a : op->getDiscardableAttrs()) {
        h->setAttr(a.getName(), a.getValue());
        y->setAttr(a.getName(), a.getValue());
      }
      op.replaceAllUsesWith(y.getResult());
      op.erase();
    }
  }
};

} // namespace
