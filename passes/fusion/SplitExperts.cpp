//===- SplitExperts.cpp - routed experts as grouped GEMMs -----------------===//
//
// l4c-split-experts rewrites l4.moe_experts as l4.moe_route (each expert's
// tokens), l4.moe_hidden (each token's selected experts' SwiGLU
// activations, [B, S, K, I]) and l4.moe_down (their down projections,
// summed), and l4.moe_experts_grad as the grouped GEMMs and row kernels of
// its backward (l4.moe_gate_up, l4.moe_down_grad, l4.moe_down_grad_weight,
// l4.moe_gate_up_grad_input, l4.moe_combine_grad,
// l4.moe_gate_up_grad_weight). Between the parts the activations are
// values like any other, so the memory planner gives them bytes and each
// part is a kernel that can spread the work over the whole GPU (the fused
// ops need every activation of a token before its first down product,
// which one kernel can only do within one block).
//
//===----------------------------------------------------------------------===//
#include "l4c/Dialect/L4/L4Ops.h"
#include "l4c/Passes/Passes.h"
#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/IR/Builders.h"
#include "mlir/IR/BuiltinTypes.h"
#include "llvm/ADT/DenseMap.h"
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

/// Slots per token: the router's k when the scores come from one, else
/// every expert (the scores could then be nonzero anywhere).
int64_t slotsFor(Value scores, int64_t experts) {
  if (auto router = scores.getDefiningOp<l4::RouterScoresOp>())
    return std::min<int64_t>(experts, router.getTopK());
  return experts;
}

/// [B, S, K, width] f32 (per-slot values between the experts' parts): the
/// precision they have inside the fused ops, so splitting changes no CPU
/// number (in bf16 plans the GPU's tensor cores take them as hi + lo bf16
/// pairs).
RankedTensorType slotted(Value like, int64_t slots, int64_t width) {
  auto t = cast<RankedTensorType>(like.getType());
  return RankedTensorType::get({t.getShape()[0], t.getShape()[1], slots, width},
                               Float32Type::get(like.getContext()));
}

void copyAttrs(Operation *from, std::initializer_list<Operation *> to) {
  for (NamedAttribute a : from->getDiscardableAttrs())
    for (Operation *op : to)
      op->setAttr(a.getName(), a.getValue());
}

struct SplitExpertsPass
    : public l4c::impl::SplitExpertsPassBase<SplitExpertsPass> {
  /// One route per scores value: the forward's serves the backward too.
  llvm::DenseMap<Value, Value> routes;

  /// Which (token, slot) pairs each expert has: the GPU runs an expert's
  /// tokens as one GEMM instead of reading its weights once per token.
  Value routeFor(OpBuilder &b, Operation *user, Value scores, int64_t experts,
                 int64_t slots) {
    if (Value r = routes.lookup(scores))
      return r;
    auto sType = cast<RankedTensorType>(scores.getType());
    auto type = RankedTensorType::get(
        {experts + 1 + sType.getShape()[0] * sType.getShape()[1] * slots},
        b.getI32Type());
    auto route =
        l4::MoeRouteOp::create(b, suffixed(user->getLoc(), ".route"), type,
                               scores, b.getI64IntegerAttr(slots));
    copyAttrs(user, {route});
    routes[scores] = route.getResult();
    return route.getResult();
  }

  /// `differentiated`: a training program, whose backward recomputes the
  /// activations. Its forward keeps them f32 like the rest of the per-slot
  /// values (in bf16, storing them as bf16 moved a training golden's
  /// gradient over ARCHITECTURE.md's bound). A forward-only program stores
  /// them in the input's type, as HF's bf16 experts round them, so bf16
  /// plans read them in 16-byte pieces of bf16 on the GPU.
  void split(l4::MoeExpertsOp op, bool differentiated) {
    auto gu = cast<RankedTensorType>(op.getGateUp().getType());
    int64_t experts = gu.getShape()[0], inter = gu.getShape()[2] / 2;
    int64_t slots = slotsFor(op.getScores(), experts);
    OpBuilder b(op);
    Value route = routeFor(b, op, op.getScores(), experts, slots);
    RankedTensorType hType = slotted(op.getInput(), slots, inter);
    if (!differentiated)
      hType = hType.clone(
          cast<RankedTensorType>(op.getInput().getType()).getElementType());
    auto h = l4::MoeHiddenOp::create(b, suffixed(op.getLoc(), ".gate_up"),
                                     hType,
                                     op.getInput(), op.getScores(),
                                     op.getGateUp(), route);
    auto y = l4::MoeDownOp::create(b, suffixed(op.getLoc(), ".down"),
                                   op.getType(), h.getResult(), op.getScores(),
                                   op.getDown(), route);
    copyAttrs(op, {h, y});
    op.replaceAllUsesWith(y.getResult());
    op.erase();
  }

  /// The backward as grouped GEMMs: recompute the gate and up projections,
  /// back through the down projection and SwiGLU, its weight gradient, back
  /// through the gate and up projections, their weight gradient, and the
  /// input and score gradients from the slots'.
  void split(l4::MoeExpertsGradOp op) {
    auto gu = cast<RankedTensorType>(op.getGateUp().getType());
    int64_t experts = gu.getShape()[0], width = gu.getShape()[2],
            dim = gu.getShape()[1];
    int64_t slots = slotsFor(op.getScores(), experts);
    OpBuilder b(op);
    Location loc = op.getLoc();
    Value x = op.getInput(), s = op.getScores(), dy = op.getGrad();
    Value route = routeFor(b, op, s, experts, slots);
    auto recompute = l4::MoeGateUpOp::create(
        b, suffixed(loc, ".gate_up_recompute"), slotted(x, slots, width), x, s,
        op.getGateUp(), route);
    Value g = recompute.getResult();
    auto dgu =
        l4::MoeDownGradOp::create(b, suffixed(loc, ".down_grad"), g.getType(),
                                  g, s, op.getDown(), dy, route);
    auto dDown = l4::MoeDownGradWeightOp::create(
        b, suffixed(loc, ".down_grad_weight"), op.getDownGrad().getType(), g, s,
        dy, route);
    auto dz = l4::MoeGateUpGradInputOp::create(
        b, suffixed(loc, ".gate_up_grad_input"), slotted(x, slots, dim),
        dgu.getResult(), s, op.getGateUp(), route);
    auto combine = l4::MoeCombineGradOp::create(
        b, suffixed(loc, ".combine_grad"), op.getInputGrad().getType(),
        op.getScoresGrad().getType(), dz.getResult(), x, s);
    auto dGateUp = l4::MoeGateUpGradWeightOp::create(
        b, suffixed(loc, ".gate_up_grad_weight"), op.getGateUpGrad().getType(),
        x, s, dgu.getResult(), route);
    copyAttrs(op, {recompute, dgu, dDown, dz, combine, dGateUp});
    op.getInputGrad().replaceAllUsesWith(combine.getInputGrad());
    op.getScoresGrad().replaceAllUsesWith(combine.getScoresGrad());
    op.getGateUpGrad().replaceAllUsesWith(dGateUp.getResult());
    op.getDownGrad().replaceAllUsesWith(dDown.getResult());
    op.erase();
  }

  void runOnOperation() override {
    routes.clear();
    SmallVector<Operation *> ops;
    bool differentiated = false;
    getOperation().walk([&](Operation *op) {
      if (isa<l4::MoeExpertsOp, l4::MoeExpertsGradOp>(op))
        ops.push_back(op);
      differentiated |= isa<l4::MoeExpertsGradOp>(op);
    });
    for (Operation *op : ops) {
      if (auto fwd = dyn_cast<l4::MoeExpertsOp>(op))
        split(fwd, differentiated);
      else
        split(cast<l4::MoeExpertsGradOp>(op));
    }
  }
};

} // namespace
