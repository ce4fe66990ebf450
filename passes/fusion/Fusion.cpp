//===- Fusion.cpp - regroup kernel.groups into fewer, larger kernels ------===//
//
// l4c-fuse merges the one-op groups of convert-l4-to-kernel into the fused
// kernels the CUDA emitter generates (a GEMM with an RMSNorm prologue, a
// second weight matrix and SwiGLU, and residual adds in its epilogue). Every
// merge keeps the l4 ops as they are: a fused group computes exactly what
// its parts did, and the CPU backend still runs the ops one by one.
//
//===----------------------------------------------------------------------===//
#include "l4c/Dialect/Kernel/KernelOps.h"
#include "l4c/Dialect/L4/L4Ops.h"
#include "l4c/Passes/Passes.h"
#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/IR/IRMapping.h"
#include "llvm/ADT/STLExtras.h"
#include "llvm/ADT/StringExtras.h"

namespace l4c {
#define GEN_PASS_DEF_FUSIONPASS
#include "l4c/Passes/Passes.h.inc"
} // namespace l4c

using namespace mlir;
using l4c::kernel::GroupOp;
namespace l4 = l4c::l4;

namespace {

/// The l4 ops of a group, in order.
SmallVector<Operation *> opsOf(GroupOp g) {
  SmallVector<Operation *> ops;
  for (Operation &op : g.getBody().front().without_terminator())
    ops.push_back(&op);
  return ops;
}

/// The group's single op when it has exactly one of type OpT.
template <class OpT> OpT single(GroupOp g) {
  auto ops = opsOf(g);
  return ops.size() == 1 ? dyn_cast<OpT>(ops.front()) : OpT();
}

/// True when every use of every result of `producer` is an operand of
/// `consumer`.
bool onlyFeeds(GroupOp producer, GroupOp consumer) {
  for (Value r : producer.getResults())
    for (Operation *user : r.getUsers())
      if (user != consumer.getOperation())
        return false;
  return !producer->use_empty();
}

/// The last segment of a dotted kernel name ("attn_residual").
StringRef lastSegment(StringRef name) {
  size_t dot = name.rfind('.');
  return dot == StringRef::npos ? name : name.drop_front(dot + 1);
}

/// Replaces `consumer` by one group that runs the ops of `producers` (in
/// order) and then the consumer's, named `name`. Inputs fed by a producer's
/// results become values inside the new group. Producers left without uses
/// are erased; a producer with other uses (a norm cloned into several
/// consumers) stays.
GroupOp fuse(ArrayRef<GroupOp> producers, GroupOp consumer, StringRef name) {
  // The new group's inputs: everything any part reads from outside.
  SmallVector<Value> inputs;
  auto addInput = [&](Value v) {
    for (GroupOp p : producers)
      if (v.getDefiningOp() == p.getOperation())
        return;
    if (!llvm::is_contained(inputs, v))
      inputs.push_back(v);
  };
  for (GroupOp p : producers)
    for (Value v : p.getInputs())
      addInput(v);
  for (Value v : consumer.getInputs())
    addInput(v);

  OpBuilder b(consumer);
  auto fused = GroupOp::create(b, consumer.getLoc(), name, consumer.getKind(),
                               inputs, consumer.getResultTypes());
  Block &body = fused.getBody().front();
  b.setInsertionPointToStart(&body);
  // Outer values -> values inside the new body.
  IRMapping outer;
  for (auto [v, arg] : llvm::zip(inputs, body.getArguments()))
    outer.map(v, arg);
  auto cloneBody = [&](GroupOp g) {
    Block &old = g.getBody().front();
    IRMapping map;
    for (auto [arg, in] : llvm::zip(old.getArguments(), g.getInputs()))
      map.map(arg, outer.lookup(in));
    for (Operation &op : old.without_terminator())
      b.clone(op, map);
    auto yield = cast<l4c::kernel::YieldOp>(old.getTerminator());
    SmallVector<Value> values;
    for (Value v : yield.getValues())
      values.push_back(map.lookup(v));
    return values;
  };
  for (GroupOp p : producers)
    for (auto [res, v] : llvm::zip(p.getResults(), cloneBody(p)))
      outer.map(res, v);
  SmallVector<Value> results = cloneBody(consumer);
  l4c::kernel::YieldOp::create(b, consumer.getLoc(), results);

  consumer.replaceAllUsesWith(fused.getResults());
  consumer.erase();
  for (GroupOp p : producers)
    if (p->use_empty())
      p.erase();
  return fused;
}

/// The shape of a GEMM-centred group the CUDA emitter fuses:
/// [rms_norm] (linear | linear linear swiglu) add*.
struct GemmShape {
  bool norm = false, swiglu = false;
  unsigned adds = 0;
};

std::optional<GemmShape> gemmShape(GroupOp g) {
  auto ops = opsOf(g);
  GemmShape s;
  size_t i = 0;
  if (i < ops.size() && isa<l4::RmsNormOp>(ops[i])) {
    s.norm = true;
    ++i;
  }
  if (i + 2 < ops.size() && isa<l4::LinearOp>(ops[i]) &&
      isa<l4::LinearOp>(ops[i + 1]) && isa<l4::SwigluOp>(ops[i + 2])) {
    s.swiglu = true;
    i += 3;
  } else if (i < ops.size() && isa<l4::LinearOp>(ops[i])) {
    ++i;
  } else {
    return std::nullopt;
  }
  for (; i < ops.size(); ++i) {
    if (!isa<l4::AddOp>(ops[i]))
      return std::nullopt;
    ++s.adds;
  }
  return s;
}

struct FusionPass : public l4c::impl::FusionPassBase<FusionPass> {
  using FusionPassBase::FusionPassBase;

  bool epilogue = false, swiglu = false, norm = false, rope = false;

  LogicalResult parseFusions() {
    for (StringRef f : llvm::split(fusions, ',')) {
      f = f.trim();
      if (f == "all")
        epilogue = swiglu = norm = rope = true;
      else if (f == "none" || f.empty())
        continue;
      else if (f == "epilogue")
        epilogue = true;
      else if (f == "swiglu")
        swiglu = true;
      else if (f == "norm")
        norm = true;
      else if (f == "rope")
        rope = true;
      else
        return emitError(UnknownLoc::get(&getContext()))
               << "l4c-fuse: unknown fusion '" << f
               << "' (expected all, none, epilogue, swiglu, norm or rope)";
    }
    return success();
  }

  /// gate = linear(x, Wg), up = linear(x, Wu), swiglu(gate, up) -> one group.
  void fuseSwiglu(func::FuncOp fn) {
    SmallVector<GroupOp> acts;
    fn.walk([&](GroupOp g) {
      if (single<l4::SwigluOp>(g))
        acts.push_back(g);
    });
    for (GroupOp act : acts) {
      auto gate = act.getInputs()[0].getDefiningOp<GroupOp>();
      auto up = act.getInputs()[1].getDefiningOp<GroupOp>();
      if (!gate || !up || gate == up)
        continue;
      auto lg = single<l4::LinearOp>(gate), lu = single<l4::LinearOp>(up);
      if (!lg || !lu || gate.getInputs()[0] != up.getInputs()[0] ||
          gate.getInputs()[1].getType() != up.getInputs()[1].getType() ||
          !onlyFeeds(gate, act) || !onlyFeeds(up, act))
        continue;
      std::string name = (gate.getName() + "+" + lastSegment(up.getName()) +
                          "+" + lastSegment(act.getName()))
                             .str();
      GroupOp f = fuse({gate, up}, act, name);
      f.setKindAttr(StringAttr::get(&getContext(), "gemm"));
    }
  }

  /// linear(...) then add(its result, r) -> the add in the GEMM's epilogue;
  /// repeated, so chains of adds (the MoE combine, then the residual) join.
  void fuseEpilogues(func::FuncOp fn) {
    bool changed = true;
    while (changed) {
      changed = false;
      SmallVector<GroupOp> adds;
      fn.walk([&](GroupOp g) {
        if (single<l4::AddOp>(g))
          adds.push_back(g);
      });
      for (GroupOp add : adds) {
        // The GEMM operand: the one a GEMM-shaped group produces for this
        // add alone; the other operand becomes the epilogue's addend.
        GroupOp gemm;
        for (Value v : add.getInputs()) {
          auto p = v.getDefiningOp<GroupOp>();
          if (p && p.getNumResults() == 1 && gemmShape(p) &&
              add.getInputs()[0] != add.getInputs()[1] && onlyFeeds(p, add)) {
            gemm = p;
            break;
          }
        }
        if (!gemm)
          continue;
        std::string name =
            (gemm.getName() + "+" + lastSegment(add.getName())).str();
        GroupOp f = fuse({gemm}, add, name);
        f.setKindAttr(StringAttr::get(&getContext(), "gemm"));
        changed = true;
      }
    }
  }

  /// rms_norm(x, g) read only as the input of GEMM groups -> a prologue of
  /// each of them (recomputed per consumer; a row's norm is cheap next to
  /// its GEMM).
  void fuseNorms(func::FuncOp fn) {
    SmallVector<GroupOp> norms;
    fn.walk([&](GroupOp g) {
      if (single<l4::RmsNormOp>(g))
        norms.push_back(g);
    });
    for (GroupOp n : norms) {
      Value y = n.getResult(0);
      SmallVector<GroupOp> consumers;
      bool ok = !y.use_empty();
      for (OpOperand &use : y.getUses()) {
        auto g = dyn_cast<GroupOp>(use.getOwner());
        std::optional<GemmShape> s = g ? gemmShape(g) : std::nullopt;
        if (!s || s->norm) {
          ok = false;
          break;
        }
        // The norm must be the GEMM's x (every linear's, with SwiGLU), and
        // nothing else in the group may read it.
        Value arg = g.getBody().front().getArgument(use.getOperandNumber());
        for (OpOperand &inner : arg.getUses())
          if (!isa<l4::LinearOp>(inner.getOwner()) ||
              inner.getOperandNumber() != 0)
            ok = false;
        for (Operation *op : opsOf(g))
          if (auto lin = dyn_cast<l4::LinearOp>(op); lin && lin.getInput() != arg)
            ok = false;
        if (!llvm::is_contained(consumers, g))
          consumers.push_back(g);
      }
      if (!ok)
        continue;
      for (GroupOp g : consumers) {
        std::string name = (g.getName() + "+" + lastSegment(n.getName())).str();
        fuse({n}, g, name).setKindAttr(
            StringAttr::get(&getContext(), "gemm"));
      }
    }
  }

  /// rope(x) read only by l2_norm (the QK norm after RoPE) -> one kernel
  /// that rotates and normalises each head vector.
  void fuseRopeNorms(func::FuncOp fn) {
    SmallVector<GroupOp> norms;
    fn.walk([&](GroupOp g) {
      if (single<l4::L2NormOp>(g))
        norms.push_back(g);
    });
    for (GroupOp n : norms) {
      auto r = n.getInputs()[0].getDefiningOp<GroupOp>();
      auto ropeOp = r ? single<l4::RopeOp>(r) : l4::RopeOp();
      if (!ropeOp || ropeOp.getInverse() || !onlyFeeds(r, n))
        continue;
      std::string name = (r.getName() + "+" + lastSegment(n.getName())).str();
      fuse({r}, n, name).setKindAttr(StringAttr::get(&getContext(), "rope"));
    }
  }

  void runOnOperation() override {
    if (failed(parseFusions()))
      return signalPassFailure();
    getOperation().walk([&](func::FuncOp fn) {
      if (rope)
        fuseRopeNorms(fn);
      if (swiglu)
        fuseSwiglu(fn);
      if (epilogue)
        fuseEpilogues(fn);
      if (norm)
        fuseNorms(fn);
    });
  }
};

} // namespace
