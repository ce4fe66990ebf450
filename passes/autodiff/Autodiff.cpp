//===- Autodiff.cpp - reverse-mode autodiff of the l4 dialect -------------===//
//
// l4c-autodiff: walks a loss function backwards, applying one
// vector-Jacobian rule per l4 op, and returns every weight's gradient.
//
//===----------------------------------------------------------------------===//
#include "l4c/Dialect/L4/L4Ops.h"
#include "l4c/Passes/Passes.h"
#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/IR/Builders.h"
#include "mlir/IR/IRMapping.h"
#include "llvm/ADT/TypeSwitch.h"

namespace l4c {
#define GEN_PASS_DEF_AUTODIFFPASS
#include "l4c/Passes/Passes.h.inc"
} // namespace l4c

using namespace mlir;
using namespace l4c;

namespace {

/// Adjoints of the values of one function, accumulated as the backward
/// sweep reaches each use.
class Adjoints {
public:
  explicit Adjoints(OpBuilder &b) : b(b) {}

  Value get(Value v) const { return adj.lookup(v); }

  void accumulate(Location loc, Value v, Value g) {
    if (!isa<FloatType>(cast<RankedTensorType>(v.getType()).getElementType()))
      return; // ids and positions carry no gradient
    auto it = adj.find(v);
    if (it == adj.end()) {
      adj[v] = g;
      return;
    }
    it->second = l4::AddOp::create(b, loc, it->second, g);
  }

private:
  OpBuilder &b;
  DenseMap<Value, Value> adj;
};

/// The type of a weight's gradient: the weight's shape in f32, whatever the
/// weight's own precision (bf16 plans accumulate and apply their weight
/// gradients in f32, as mixed-precision training does).
Type weightGradType(Value weight) {
  auto t = cast<RankedTensorType>(weight.getType());
  return RankedTensorType::get(t.getShape(),
                               Float32Type::get(weight.getContext()));
}

/// Emits the vector-Jacobian product of `op` given its result adjoints.
LogicalResult backprop(Operation *op, Adjoints &adj, OpBuilder &b) {
  Location loc = op->getLoc();
  auto grad = [&](unsigned i = 0) { return adj.get(op->getResult(i)); };
  return llvm::TypeSwitch<Operation *, LogicalResult>(op)
      .Case([&](l4::CrossEntropyOp ce) {
        Value d = l4::CrossEntropyGradOp::create(b, loc, ce.getLogits().getType(),
                                                 ce.getLogits(), ce.getIds());
        adj.accumulate(loc, ce.getLogits(), d);
        return success();
      })
      .Case([&](l4::LinearOp l) {
        Value dy = grad();
        adj.accumulate(loc, l.getInput(),
                       l4::LinearGradInputOp::create(
                           b, loc, l.getInput().getType(), dy, l.getWeight()));
        adj.accumulate(loc, l.getWeight(),
                       l4::LinearGradWeightOp::create(
                           b, loc, weightGradType(l.getWeight()), l.getInput(),
                           dy));
        return success();
      })
      .Case([&](l4::RmsNormOp n) {
        auto g = l4::RmsNormGradOp::create(
            b, loc, n.getInput().getType(), weightGradType(n.getWeight()),
            n.getInput(), n.getWeight(), grad(), n.getEpsAttr());
        adj.accumulate(loc, n.getInput(), g.getInputGrad());
        adj.accumulate(loc, n.getWeight(), g.getWeightGrad());
        return success();
      })
      .Case([&](l4::L2NormOp n) {
        adj.accumulate(loc, n.getInput(),
                       l4::L2NormGradOp::create(b, loc, n.getType(),
                                                n.getInput(), grad(),
                                                n.getEpsAttr()));
        return success();
      })
      .Case([&](l4::ReshapeOp r) {
        adj.accumulate(loc, r.getInput(),
                       l4::ReshapeOp::create(b, loc, r.getInput().getType(),
                                             grad()));
        return success();
      })
      .Case([&](l4::RopeOp r) {
        // A rotation's adjoint is the rotation by the negated angle.
        auto inv = l4::RopeOp::create(
            b, loc, r.getType(), grad(), r.getPositions(), r.getThetaAttr(),
            r.getScalingAttr(), r.getFactorAttr(), r.getLowFreqFactorAttr(),
            r.getHighFreqFactorAttr(), r.getOriginalMaxPositionAttr(),
            b.getBoolAttr(!r.getInverse()));
        adj.accumulate(loc, r.getInput(), inv);
        return success();
      })
      .Case([&](l4::TemperatureScaleOp t) {
        // A per-position scalar multiply is its own adjoint.
        adj.accumulate(loc, t.getInput(),
                       l4::TemperatureScaleOp::create(
                           b, loc, t.getType(), grad(), t.getPositions(),
                           t.getFloorScaleAttr(), t.getAttnScaleAttr()));
        return success();
      })
      .Case([&](l4::AttentionOp a) {
        auto g = l4::AttentionGradOp::create(
            b, loc, a.getQuery().getType(), a.getKey().getType(),
            a.getValue().getType(), a.getQuery(), a.getKey(), a.getValue(),
            a.getPositions(), grad(), a.getScaleAttr(), a.getChunkSizeAttr());
        adj.accumulate(loc, a.getQuery(), g.getQueryGrad());
        adj.accumulate(loc, a.getKey(), g.getKeyGrad());
        adj.accumulate(loc, a.getValue(), g.getValueGrad());
        return success();
      })
      .Case([&](l4::RouterScoresOp r) {
        adj.accumulate(loc, r.getLogits(),
                       l4::RouterScoresGradOp::create(b, loc, r.getType(),
                                                      r.getLogits(), grad(),
                                                      r.getTopKAttr()));
        return success();
      })
      .Case([&](l4::MoeExpertsOp m) {
        auto g = l4::MoeExpertsGradOp::create(
            b, loc, m.getInput().getType(), m.getScores().getType(),
            weightGradType(m.getGateUp()), weightGradType(m.getDown()),
            m.getInput(),
            m.getScores(), m.getGateUp(), m.getDown(), grad());
        adj.accumulate(loc, m.getInput(), g.getInputGrad());
        adj.accumulate(loc, m.getScores(), g.getScoresGrad());
        adj.accumulate(loc, m.getGateUp(), g.getGateUpGrad());
        adj.accumulate(loc, m.getDown(), g.getDownGrad());
        return success();
      })
      .Case([&](l4::SwigluOp s) {
        auto g = l4::SwigluGradOp::create(b, loc, s.getType(), s.getType(),
                                          s.getGate(), s.getUp(), grad());
        adj.accumulate(loc, s.getGate(), g.getGateGrad());
        adj.accumulate(loc, s.getUp(), g.getUpGrad());
        return success();
      })
      .Case([&](l4::AddOp a) {
        adj.accumulate(loc, a.getLhs(), grad());
        adj.accumulate(loc, a.getRhs(), grad());
        return success();
      })
      .Case([&](l4::EmbeddingOp e) {
        // nn.Embedding's padding_idx: the lookup adds nothing to that row.
        // Only this contribution skips it; a tied lm_head's linear_grad_weight
        // still reaches every row of the same table.
        adj.accumulate(loc, e.getTable(),
                       l4::EmbeddingGradOp::create(
                           b, loc, weightGradType(e.getTable()), e.getIds(),
                           grad(),
                           e.getPaddingIdxAttr()));
        return success();
      })
      .Default([&](Operation *other) {
        return other->emitOpError()
               << "has no vector-Jacobian rule; it cannot appear in a "
                  "differentiated function";
      });
}

/// The decoder layer an op belongs to, from its location
/// ("model.layers.<i>.<...>"); -1 for ops outside the layers.
int64_t layerOf(Operation *op) {
  auto name = dyn_cast<NameLoc>(op->getLoc());
  if (!name)
    return -1;
  StringRef s = name.getName().getValue();
  if (!s.consume_front("model.layers."))
    return -1;
  int64_t layer = -1;
  if (s.consumeInteger(10, layer) || !(s.empty() || s.starts_with(".")))
    return -1;
  return layer;
}

LogicalResult differentiate(func::FuncOp fn, bool recompute) {
  Block &body = fn.getBody().front();
  auto ret = cast<func::ReturnOp>(body.getTerminator());
  if (ret.getNumOperands() != 1 ||
      !ret.getOperand(0).getDefiningOp<l4::CrossEntropyOp>())
    return fn.emitOpError()
           << "a function marked l4.autodiff must return exactly one value, "
              "an l4.cross_entropy loss";

  OpBuilder b(ret);
  Adjoints adj(b);
  SmallVector<Operation *> forward;
  for (Operation &op : body.without_terminator())
    forward.push_back(&op);
  // Activation checkpointing: each layer's forward ops, in order.
  DenseMap<int64_t, SmallVector<Operation *>> layerOps;
  if (recompute)
    for (Operation *op : forward)
      if (int64_t l = layerOf(op); l >= 0)
        layerOps[l].push_back(op);
  DenseMap<Operation *, Operation *> recomputed; // original -> clone
  // The loss is the root: its own op seeds the sweep.
  for (Operation *op : llvm::reverse(forward)) {
    int64_t layer = recompute ? layerOf(op) : -1;
    // Inside a recomputed layer the adjoints live on the recomputed values.
    Operation *rule = recomputed.lookup(op);
    if (!rule)
      rule = op;
    bool reached = isa<l4::CrossEntropyOp>(op) && op->getResult(0) == ret.getOperand(0);
    for (Value r : rule->getResults())
      reached |= bool(adj.get(r));
    if (!reached)
      continue;
    if (layer >= 0 && !recomputed.count(op)) {
      // The sweep enters this layer: re-run its forward from the values
      // it takes from outside (its input, weights, positions), and move
      // the adjoints gathered so far onto the recomputed results.
      IRMapping map;
      for (Operation *f : layerOps[layer]) {
        Operation *c = b.clone(*f, map);
        c->setAttr("l4.recomputed", b.getUnitAttr());
        recomputed[f] = c;
        for (auto [orig, copy] : llvm::zip(f->getResults(), c->getResults()))
          if (Value g = adj.get(orig))
            adj.accumulate(f->getLoc(), copy, g);
      }
    }
    if (layer >= 0)
      rule = recomputed.lookup(op);
    // The rules assume every result has an adjoint; forward l4 ops have one
    // result, so this only rejects IR that no importer produces.
    for (Value r : rule->getResults())
      if (!adj.get(r) && !isa<l4::CrossEntropyOp>(rule))
        return op->emitOpError() << "result " << cast<OpResult>(r).getResultNumber()
                                 << " does not reach the loss; partial "
                                    "adjoints are not supported";
    if (failed(backprop(rule, adj, b)))
      return failure();
  }

  SmallVector<Value> results{ret.getOperand(0)};
  SmallVector<std::string> names;
  for (BlockArgument arg : body.getArguments()) {
    auto w = fn.getArgAttrOfType<StringAttr>(arg.getArgNumber(), "l4.weight");
    if (!w)
      continue;
    Value g = adj.get(arg);
    if (!g)
      return fn.emitOpError() << "weight '" << w.getValue()
                              << "' does not influence the loss";
    results.push_back(g);
    names.push_back(("grad." + w.getValue()).str());
  }
  ret->setOperands(results);
  fn.setType(b.getFunctionType(fn.getArgumentTypes(),
                               ValueRange(results).getTypes()));
  for (auto [i, n] : llvm::enumerate(names))
    fn.setResultAttr(i + 1, "l4.output", b.getStringAttr(n));
  fn->removeAttr("l4.autodiff");
  return success();
}

struct AutodiffPass : public l4c::impl::AutodiffPassBase<AutodiffPass> {
  using AutodiffPassBase::AutodiffPassBase;
  void runOnOperation() override {
    if (recompute != "none" && recompute != "layers") {
      getOperation().emitError()
          << "l4c-autodiff: recompute must be none or layers, got '"
          << recompute << "'";
      return signalPassFailure();
    }
    for (auto fn : getOperation().getOps<func::FuncOp>())
      if (fn->hasAttr("l4.autodiff") &&
          failed(differentiate(fn, recompute == "layers")))
        return signalPassFailure();
  }
};

} // namespace
