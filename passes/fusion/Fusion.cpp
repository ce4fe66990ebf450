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
#include "l4c/Target/Cuda/CudaEmitter.h"
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

/// The function's groups made of a single OpT, in order (collected first:
/// the fusions erase groups while they go).
template <class OpT> SmallVector<GroupOp> groupsOf(func::FuncOp fn) {
  SmallVector<GroupOp> out;
  fn.walk([&](GroupOp g) {
    if (single<OpT>(g))
      out.push_back(g);
  });
  return out;
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

/// What the groups `parts` read from outside them, each value once, in
/// order: the inputs of a group merging them.
SmallVector<Value> outsideInputs(ArrayRef<GroupOp> parts) {
  SmallVector<Value> inputs;
  for (GroupOp g : parts)
    for (Value v : g.getInputs())
      if (!llvm::is_contained(parts, v.getDefiningOp<GroupOp>()) &&
          !llvm::is_contained(inputs, v))
        inputs.push_back(v);
  return inputs;
}

/// A new group at b's insertion point, b then inside its body; `outer` maps
/// each of `inputs` to its body argument.
GroupOp newGroup(OpBuilder &b, Location loc, StringRef name, StringRef kind,
                 ArrayRef<Value> inputs, TypeRange types, IRMapping &outer) {
  auto g = GroupOp::create(b, loc, name, kind, inputs, types);
  Block &body = g.getBody().front();
  b.setInsertionPointToStart(&body);
  for (auto [v, arg] : llvm::zip(inputs, body.getArguments()))
    outer.map(v, arg);
  return g;
}

/// Clones g's ops at b's insertion point, reading g's inputs through
/// `outer`, and maps g's results in `outer` to what the clones yield. With
/// `seen`, an op repeating one of `seen` (the same name, operands,
/// attributes and result types: an input norm each part recomputed) is not
/// cloned again; the earlier op's results stand for its.
void cloneGroupInto(OpBuilder &b, GroupOp g, IRMapping &outer,
                    SmallVectorImpl<Operation *> *seen = nullptr) {
  Block &old = g.getBody().front();
  IRMapping map;
  for (auto [arg, in] : llvm::zip(old.getArguments(), g.getInputs()))
    map.map(arg, outer.lookup(in));
  for (Operation &op : old.without_terminator()) {
    Operation *c = b.clone(op, map);
    if (!seen)
      continue;
    auto same = llvm::find_if(*seen, [&](Operation *prev) {
      return prev->getName() == c->getName() &&
             prev->getOperands() == c->getOperands() &&
             prev->getAttrDictionary() == c->getAttrDictionary() &&
             prev->getResultTypes() == c->getResultTypes();
    });
    if (same == seen->end()) {
      seen->push_back(c);
      continue;
    }
    for (auto [r, p] : llvm::zip(op.getResults(), (*same)->getResults()))
      map.map(r, p);
    c->erase();
  }
  auto yield = cast<l4c::kernel::YieldOp>(old.getTerminator());
  for (auto [res, v] : llvm::zip(g.getResults(), yield.getValues()))
    outer.map(res, map.lookup(v));
}

/// Replaces `consumer` by one group that runs the ops of `producers` (in
/// order) and then the consumer's, named `name`. Inputs fed by a producer's
/// results become values inside the new group. Producers left without uses
/// are erased; a producer with other uses (a norm cloned into several
/// consumers) stays.
GroupOp fuse(ArrayRef<GroupOp> producers, GroupOp consumer, StringRef name) {
  SmallVector<GroupOp> parts(producers);
  parts.push_back(consumer);
  OpBuilder b(consumer);
  IRMapping outer;
  GroupOp fused = newGroup(b, consumer.getLoc(), name, consumer.getKind(),
                           outsideInputs(parts), consumer.getResultTypes(),
                           outer);
  for (GroupOp g : parts)
    cloneGroupInto(b, g, outer);
  SmallVector<Value> results;
  for (Value r : consumer.getResults())
    results.push_back(outer.lookup(r));
  l4c::kernel::YieldOp::create(b, consumer.getLoc(), results);

  consumer.replaceAllUsesWith(fused.getResults());
  consumer.erase();
  for (GroupOp p : producers)
    if (p->use_empty())
      p.erase();
  return fused;
}

/// Replaces `members` (groups in block order) by one group placed before
/// `before`, named `name`, of kind `kind`: it runs the members' ops in
/// order, drops an op repeating an earlier one (cloneGroupInto's `seen`),
/// and yields every member result something outside the members reads.
GroupOp fuseSiblings(ArrayRef<GroupOp> members, Operation *before,
                     StringRef name, StringRef kind) {
  SmallVector<Value> outs;
  SmallVector<Type> types;
  for (GroupOp g : members)
    for (Value r : g.getResults())
      if (llvm::any_of(r.getUsers(), [&](Operation *u) {
            return !llvm::is_contained(members, dyn_cast<GroupOp>(u));
          })) {
        outs.push_back(r);
        types.push_back(r.getType());
      }
  Location loc = GroupOp(members.front()).getLoc();
  OpBuilder b(before);
  IRMapping outer;
  GroupOp fused =
      newGroup(b, loc, name, kind, outsideInputs(members), types, outer);
  SmallVector<Operation *> seen;
  for (GroupOp g : members)
    cloneGroupInto(b, g, outer, &seen);
  SmallVector<Value> yielded;
  for (Value r : outs)
    yielded.push_back(outer.lookup(r));
  l4c::kernel::YieldOp::create(b, loc, yielded);
  for (auto [r, f] : llvm::zip(outs, fused.getResults()))
    r.replaceAllUsesWith(f);
  for (GroupOp g : llvm::reverse(members))
    g.erase();
  return fused;
}

/// The value a group's body argument stands for outside it.
Value outerValue(GroupOp g, Value inner) {
  auto arg = dyn_cast<BlockArgument>(inner);
  return arg && arg.getOwner() == &g.getBody().front()
             ? g.getInputs()[arg.getArgNumber()]
             : Value();
}

/// The group producing `v` with exactly these ops (by type), or null.
template <class... OpTs> GroupOp producedBy(Value v) {
  auto g = v ? v.getDefiningOp<GroupOp>() : GroupOp();
  if (!g || g.getNumResults() != 1)
    return GroupOp();
  auto ops = opsOf(g);
  if (ops.size() != sizeof...(OpTs))
    return GroupOp();
  size_t i = 0;
  bool ok = (isa<OpTs>(ops[i++]) && ...);
  return ok ? g : GroupOp();
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

  bool epilogue = false, swiglu = false, norm = false, rope = false,
       qkv = false, cache = false, router = false;

  LogicalResult parseFusions() {
    for (StringRef f : llvm::split(fusions, ',')) {
      f = f.trim();
      if (f == "all")
        epilogue = swiglu = norm = rope = qkv = cache = router = true;
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
      else if (f == "qkv")
        qkv = true;
      else if (f == "cache")
        cache = true;
      else if (f == "router")
        router = true;
      else
        return emitError(UnknownLoc::get(&getContext()))
               << "l4c-fuse: unknown fusion '" << f
               << "' (expected all, none, epilogue, swiglu, norm, rope, qkv, "
                  "cache or router)";
    }
    return success();
  }

  /// gate = linear(x, Wg), up = linear(x, Wu), swiglu(gate, up) -> one group.
  void fuseSwiglu(func::FuncOp fn) {
    SmallVector<GroupOp> acts = groupsOf<l4::SwigluOp>(fn);
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
      SmallVector<GroupOp> adds = groupsOf<l4::AddOp>(fn);
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
    SmallVector<GroupOp> norms = groupsOf<l4::RmsNormOp>(fn);
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
    SmallVector<GroupOp> norms = groupsOf<l4::L2NormOp>(fn);
    for (GroupOp n : norms) {
      auto r = n.getInputs()[0].getDefiningOp<GroupOp>();
      auto ropeOp = r ? single<l4::RopeOp>(r) : l4::RopeOp();
      if (!ropeOp || ropeOp.getInverse() || !onlyFeeds(r, n))
        continue;
      std::string name = (r.getName() + "+" + lastSegment(n.getName())).str();
      fuse({r}, n, name).setKindAttr(StringAttr::get(&getContext(), "rope"));
    }
  }

  /// Decode-shaped projections (at most kGemvMaxRows rows, where the CUDA
  /// target streams the weights one warp per output column): the linears
  /// of one input (or of one norm of it, fused as a prologue in each) with
  /// nothing else in their groups -> one kernel over all their columns.
  /// Attention's q, k and v: one launch and one pass over x instead of
  /// three.
  void fuseProjections(func::FuncOp fn) {
    SmallVector<GroupOp> atts = groupsOf<l4::AttentionOp>(fn);
    for (GroupOp att : atts) {
      auto op = single<l4::AttentionOp>(att);
      // q, k and v back through the views and the groups between them
      // and their projections (RoPE, norms, cache updates, temperature).
      SmallVector<GroupOp> projs;
      for (Value v : {op.getQuery(), op.getKey(), op.getValue()}) {
        Value cur = outerValue(att, v);
        for (int hops = 0; cur && hops < 4; ++hops) {
          if (auto rs = cur.getDefiningOp<l4::ReshapeOp>()) {
            cur = rs.getInput();
            continue;
          }
          auto g = cur.getDefiningOp<GroupOp>();
          if (!g || g.getNumResults() != 1)
            break;
          std::optional<GemmShape> s = gemmShape(g);
          if (s && !s->swiglu && s->adds == 0) {
            projs.push_back(g);
            break;
          }
          // Follow the op's data operand (a cache update's update).
          Operation *first = opsOf(g).front();
          Value data = isa<l4::KvCacheUpdateOp>(first) ? first->getOperand(1)
                                                       : first->getOperand(0);
          cur = outerValue(g, data);
        }
      }
      if (projs.size() != 3 || projs[0] == projs[1] || projs[1] == projs[2] ||
          projs[0] == projs[2])
        continue;
      // One input, the same norm (or none), decode-shaped, each read by
      // its reshape alone.
      auto x = projs[0].getInputs()[0];
      auto xt = cast<RankedTensorType>(x.getType());
      int64_t rows = xt.getNumElements() / xt.getShape().back();
      bool ok = rows <= int64_t(l4c::kGemvMaxRows);
      auto normOf = [](GroupOp g) {
        return dyn_cast<l4::RmsNormOp>(opsOf(g).front());
      };
      for (GroupOp p : projs) {
        auto n0 = normOf(projs[0]), n = normOf(p);
        ok &= p.getInputs()[0] == x && bool(n) == bool(n0) &&
              p.getResult(0).hasOneUse() &&
              isa<l4::ReshapeOp>(*p.getResult(0).getUsers().begin());
        if (ok && n)
          ok = outerValue(p, n.getWeight()) == outerValue(projs[0], n0.getWeight()) &&
               n.getEps() == n0.getEps();
      }
      if (!ok)
        continue;
      llvm::sort(projs, [](GroupOp a, GroupOp b) {
        return a->isBeforeInBlock(b);
      });
      // "...self_attn.q_proj+input_layernorm" -> "...self_attn.qkv_proj+...".
      std::string name = projs[0].getName().str();
      std::string seg = lastSegment(name.substr(0, name.find('+'))).str();
      std::string merged = seg;
      for (GroupOp p : ArrayRef(projs).drop_front()) {
        StringRef n = p.getName();
        merged += "+" + lastSegment(n.substr(0, n.find('+'))).str();
      }
      if (seg == "q_proj")
        merged = "qkv_proj";
      name.replace(name.rfind(seg), seg.size(), merged);
      fuseSiblings(projs, projs[0], name, "gemm");
    }
  }

  /// What follows attention's projections, before attention: q's RoPE (and
  /// QK norm) or temperature scale, k's RoPE (and QK norm) and the two KV
  /// cache updates -> one kernel (one block per token row, its cos and sin
  /// computed once for q and k; k goes into the cache rotated).
  void fuseCacheUpdates(func::FuncOp fn) {
    SmallVector<GroupOp> atts = groupsOf<l4::AttentionOp>(fn);
    for (GroupOp att : atts) {
      auto op = single<l4::AttentionOp>(att);
      GroupOp kc = producedBy<l4::KvCacheUpdateOp>(outerValue(att, op.getKey()));
      GroupOp vc = producedBy<l4::KvCacheUpdateOp>(outerValue(att, op.getValue()));
      if (!kc || !vc || kc == vc)
        continue;
      Value q = outerValue(att, op.getQuery());
      GroupOp qpart = producedBy<l4::RopeOp, l4::L2NormOp>(q);
      if (!qpart)
        qpart = producedBy<l4::RopeOp>(q);
      if (!qpart)
        qpart = producedBy<l4::TemperatureScaleOp>(q);
      auto kop = cast<l4::KvCacheUpdateOp>(opsOf(kc).front());
      Value k = outerValue(kc, kop.getUpdate());
      GroupOp kpart = producedBy<l4::RopeOp, l4::L2NormOp>(k);
      if (!kpart)
        kpart = producedBy<l4::RopeOp>(k);
      // Parts that rotate backwards (inverse RoPE) are not attention's.
      auto forward = [](GroupOp g) {
        auto r = g ? dyn_cast<l4::RopeOp>(opsOf(g).front()) : l4::RopeOp();
        return !r || !r.getInverse();
      };
      if ((qpart && (!q.hasOneUse() || !forward(qpart))) ||
          (kpart && (!k.hasOneUse() || !forward(kpart))))
        continue;
      SmallVector<GroupOp> members;
      for (GroupOp g : {qpart, kpart, kc, vc})
        if (g)
          members.push_back(g);
      llvm::sort(members, [](GroupOp a, GroupOp b) {
        return a->isBeforeInBlock(b);
      });
      // Nothing before attention may read what moves to just before it.
      bool early = false;
      for (GroupOp g : members)
        for (Operation *u : g->getUsers())
          early |= u != att.getOperation() && !llvm::is_contained(members, dyn_cast<GroupOp>(u)) &&
                   u->isBeforeInBlock(att);
      if (early)
        continue;
      // "...self_attn.k_cache" -> "...self_attn.q_rope+q_norm+k_rope+...".
      std::string name = kc.getName().str();
      size_t dot = name.rfind('.');
      std::string parts;
      for (GroupOp g : members)
        parts += (parts.empty() ? "" : "+") + lastSegment(g.getName()).str();
      name = name.substr(0, dot + 1) + parts;
      fuseSiblings(members, att, name, "cache");
    }
  }

  /// Decode-shaped MoE routing (at most kGemvMaxRows rows): the norm that
  /// feeds the router and the experts, the router's linear, router_scores
  /// and moe_route -> one kernel (cuda::emitRouterGroup), whose last block
  /// scores and routes once every block has its logits. Four launches per
  /// MoE layer become one, and the logits are never stored.
  void fuseRouters(func::FuncOp fn) {
    SmallVector<GroupOp> routes = groupsOf<l4::MoeRouteOp>(fn);
    for (GroupOp r : routes) {
      auto s = r.getInputs()[0].getDefiningOp<GroupOp>();
      if (!s || !single<l4::RouterScoresOp>(s) || s.getNumResults() != 1)
        continue;
      auto lin = s.getInputs()[0].getDefiningOp<GroupOp>();
      if (!lin || !single<l4::LinearOp>(lin) || !onlyFeeds(lin, s))
        continue;
      auto x = cast<RankedTensorType>(lin.getInputs()[0].getType());
      auto logits = cast<RankedTensorType>(lin.getResult(0).getType());
      uint64_t rows = x.getNumElements() / x.getShape().back();
      if (rows > l4c::kGemvMaxRows ||
          rows * uint64_t(logits.getShape().back()) > l4c::kRouterFuseMaxLogits)
        continue;
      // The norm group before it: in Llama 4 the experts read the norm's
      // result too, so it stays a result of the fused kernel.
      auto n = lin.getInputs()[0].getDefiningOp<GroupOp>();
      if (!n || !single<l4::RmsNormOp>(n) || n.getNumResults() != 1 ||
          llvm::all_of(n->getUsers(),
                       [&](Operation *u) { return u == lin.getOperation(); }))
        continue;
      // "...router" -> "...router+router_scores+route+post_attention_layernorm".
      std::string name = (lin.getName() + "+" + lastSegment(s.getName()) +
                          "+" + lastSegment(r.getName()) + "+" +
                          lastSegment(n.getName()))
                             .str();
      fuseSiblings({n, lin, s, r}, n, name, "router");
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
      // qkv finds the projections through the one-result groups the cache
      // fusion merges, so it runs first.
      if (qkv)
        fuseProjections(fn);
      if (cache)
        fuseCacheUpdates(fn);
      // Last: it takes the norm group the other fusions leave standing
      // (the experts read it too).
      if (router)
        fuseRouters(fn);
    });
  }
};

} // namespace
