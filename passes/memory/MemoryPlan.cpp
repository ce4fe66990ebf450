//===- MemoryPlan.cpp - static memory planning for plans ------------------===//
//
// Liveness over kernel order plus offset assignment in one arena; weights,
// caches and program I/O get regions of their own.
//
//===----------------------------------------------------------------------===//
#include "l4c/Passes/MemoryPlan.h"
#include "l4c/Dialect/Kernel/KernelOps.h"
#include "l4c/Dialect/L4/L4Ops.h"
#include "mlir/IR/BuiltinTypes.h"
#include <algorithm>
#include <numeric>

using namespace mlir;

namespace l4c {

llvm::StringRef regionName(MemRegion r) {
  switch (r) {
  case MemRegion::Arena:
    return "arena";
  case MemRegion::Weights:
    return "weights";
  case MemRegion::Cache:
    return "cache";
  case MemRegion::Io:
    return "io";
  }
  return "";
}

static uint64_t alignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

uint64_t assignOffsets(llvm::ArrayRef<Lifetime> values, uint64_t align,
                       std::vector<uint64_t> &offsets) {
  offsets.assign(values.size(), 0);
  std::vector<size_t> order(values.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (values[a].size != values[b].size)
      return values[a].size > values[b].size;
    return values[a].end - values[a].start > values[b].end - values[b].start;
  });
  std::vector<size_t> placed;
  uint64_t total = 0;
  for (size_t i : order) {
    const Lifetime &v = values[i];
    uint64_t size = alignUp(std::max<uint64_t>(v.size, 1), align);
    // Blocks already placed whose lifetime overlaps this one, by offset.
    std::vector<std::pair<uint64_t, uint64_t>> busy;
    for (size_t j : placed) {
      const Lifetime &w = values[j];
      if (w.start <= v.end && v.start <= w.end)
        busy.push_back({offsets[j], offsets[j] + alignUp(std::max<uint64_t>(w.size, 1), align)});
    }
    std::sort(busy.begin(), busy.end());
    uint64_t at = 0;
    for (auto [lo, hi] : busy) {
      if (at + size <= lo)
        break;
      at = std::max(at, hi);
    }
    offsets[i] = at;
    total = std::max(total, at + size);
    placed.push_back(i);
  }
  return total;
}

static uint64_t byteSize(Type t) {
  auto tt = cast<RankedTensorType>(t);
  uint64_t elt = std::max<uint64_t>(tt.getElementTypeBitWidth() / 8, 1);
  return uint64_t(tt.getNumElements()) * elt;
}

namespace {

/// Plans one function; weights and caches are placed module-wide.
class FunctionPlanner {
public:
  FunctionPlanner(ModuleMemoryPlan &m, FunctionMemoryPlan &f) : m(m), f(f) {}
  LogicalResult run(func::FuncOp fn);

private:
  Slot sharedSlot(llvm::StringMap<Slot> &table, StringRef name, Type t,
                  MemRegion region, uint64_t &regionSize);
  /// The value a view (reshape, slice_rows, an input of concat_rows) or
  /// in-place update ultimately stores into.
  Value root(Value v) {
    auto it = aliasOf.find(v);
    return it == aliasOf.end() ? v : root(it->second);
  }
  /// Where v's bytes start within its root's.
  uint64_t rootOffset(Value v) {
    auto it = aliasOf.find(v);
    if (it == aliasOf.end())
      return 0;
    return aliasOffset.lookup(v) + rootOffset(it->second);
  }

  ModuleMemoryPlan &m;
  FunctionMemoryPlan &f;
  llvm::DenseMap<Value, Value> aliasOf;
  llvm::DenseMap<Value, uint64_t> aliasOffset; ///< bytes into aliasOf[v]
  /// Values internal to a fused group, with the group's kernel index.
  SmallVector<std::pair<Value, int64_t>> temps;
};

} // namespace

Slot FunctionPlanner::sharedSlot(llvm::StringMap<Slot> &table, StringRef name,
                                 Type t, MemRegion region,
                                 uint64_t &regionSize) {
  auto it = table.find(name);
  if (it != table.end())
    return it->second;
  Slot s{region, regionSize, byteSize(t)};
  regionSize = alignUp(regionSize + s.size, kBufferAlign);
  table[name] = s;
  return s;
}

/// Dims of an activation: batch first, then seq unless the value holds one
/// row per sequence (take_last and what follows it).
static std::vector<DimKind> activationDims(Type t, bool hasSeq) {
  auto tt = cast<RankedTensorType>(t);
  std::vector<DimKind> d(tt.getRank(), DimKind::Static);
  if (tt.getRank() >= 1)
    d[0] = DimKind::Batch;
  if (tt.getRank() >= 2 && hasSeq)
    d[1] = DimKind::Seq;
  return d;
}

static bool hasSeqDim(const std::vector<DimKind> &d) {
  return d.size() >= 2 && d[1] == DimKind::Seq;
}

static std::vector<DimKind> staticDims(Type t) {
  return std::vector<DimKind>(cast<RankedTensorType>(t).getRank(),
                              DimKind::Static);
}

/// Dims of result `idx` of the l4 op `op`, from the dims of its operands.
/// Parameter-shaped results (weight gradients), the scalar loss and the
/// experts' route table (sized for the compiled maxima) have no run-time
/// dims; in-place and gradient results mirror the operand they
/// stand for; everything else follows its first token-major operand.
static std::vector<DimKind>
resultDims(Operation *op, unsigned idx,
           llvm::ArrayRef<std::vector<DimKind>> operands) {
  Type t = op->getResult(idx).getType();
  auto like = [&](unsigned operand) {
    std::vector<DimKind> d = operands[operand];
    d.resize(cast<RankedTensorType>(t).getRank(), DimKind::Static);
    return d;
  };
  if (isa<l4::LinearGradWeightOp, l4::EmbeddingGradOp, l4::CrossEntropyOp,
          l4::CrossEntropyFromStatsOp, l4::MoeRouteOp, l4::MoeDownGradWeightOp, l4::MoeGateUpGradWeightOp>(
          op) ||
      (isa<l4::RmsNormGradOp>(op) && idx == 1) ||
      (isa<l4::MoeExpertsGradOp>(op) && idx >= 2))
    return staticDims(t);
  if (isa<l4::KvCacheUpdateOp, l4::AddOp>(op))
    return like(0);
  if (isa<l4::AttentionGradOp>(op))
    return like(idx == 0 ? 0 : 1);
  if (isa<l4::TakeLastOp>(op))
    return activationDims(t, /*hasSeq=*/false);
  for (const std::vector<DimKind> &d : operands)
    if (!d.empty() && d[0] == DimKind::Batch)
      return activationDims(t, hasSeqDim(d));
  return staticDims(t);
}

LogicalResult FunctionPlanner::run(func::FuncOp fn) {
  Block &body = fn.getBody().front();
  auto ret = cast<func::ReturnOp>(body.getTerminator());

  // Arguments: run-time inputs, weights and caches.
  for (BlockArgument arg : body.getArguments()) {
    unsigned i = arg.getArgNumber();
    if (auto w = fn.getArgAttrOfType<StringAttr>(i, "l4.weight")) {
      f.slots[arg] = sharedSlot(m.weightSlots, w.getValue(), arg.getType(),
                                MemRegion::Weights, m.weightsSize);
      f.dims[arg] = std::vector<DimKind>(
          cast<RankedTensorType>(arg.getType()).getRank(), DimKind::Static);
    } else if (auto c = fn.getArgAttrOfType<StringAttr>(i, "l4.kv_cache")) {
      f.slots[arg] = sharedSlot(m.cacheSlots, c.getValue(), arg.getType(),
                                MemRegion::Cache, m.cacheSize);
      f.dims[arg] = activationDims(arg.getType(), /*hasSeq=*/false);
    } else {
      Slot s{MemRegion::Io, f.ioSize, byteSize(arg.getType())};
      f.ioSize = alignUp(f.ioSize + s.size, kBufferAlign);
      f.slots[arg] = s;
      f.dims[arg] = activationDims(arg.getType(), /*hasSeq=*/true);
    }
  }

  // Kernel order, aliases and dims.
  llvm::DenseMap<Operation *, int64_t> index;
  SmallVector<std::pair<Value, Value>> inPlace; // (result, operand) candidates
  int64_t n = 0;
  for (Operation &op : body.without_terminator()) {
    index[&op] = n++;
    if (auto reshape = dyn_cast<l4::ReshapeOp>(op)) {
      aliasOf[reshape.getResult()] = reshape.getInput();
      const std::vector<DimKind> &in = f.dims[reshape.getInput()];
      f.dims[reshape.getResult()] =
          in.empty() || in[0] != DimKind::Batch
              ? staticDims(reshape.getType())
              : activationDims(reshape.getType(), hasSeqDim(in));
      continue;
    }
    // Rows of a parameter-shaped value: a view at a byte offset.
    if (auto slice = dyn_cast<l4::SliceRowsOp>(op)) {
      auto t = cast<RankedTensorType>(slice.getType());
      aliasOf[slice.getResult()] = slice.getInput();
      aliasOffset[slice.getResult()] =
          uint64_t(slice.getOffset()) * (byteSize(t) / uint64_t(t.getDimSize(0)));
      f.dims[slice.getResult()] = staticDims(t);
      continue;
    }
    // The inputs are placed inside the result, so the kernels computing
    // them write the whole in place.
    if (auto concat = dyn_cast<l4::ConcatRowsOp>(op)) {
      uint64_t at = 0;
      for (Value in : concat.getInputs()) {
        if (aliasOf.count(in) || isa<BlockArgument>(in) ||
            !in.hasOneUse() || !in.getDefiningOp<kernel::GroupOp>())
          return concat.emitOpError()
                 << "inputs must be kernel results read only here";
        aliasOf[in] = concat.getResult();
        aliasOffset[in] = at;
        at += byteSize(in.getType());
      }
      f.dims[concat.getResult()] = staticDims(concat.getType());
      continue;
    }
    auto group = dyn_cast<kernel::GroupOp>(op);
    if (!group)
      return op.emitOpError() << "memory planning expects only kernel.group "
                                 "ops and views (l4.reshape, l4.slice_rows, "
                                 "l4.concat_rows); run convert-l4-to-kernel "
                                 "first";
    Block &inner = group.getBody().front();
    auto yield = cast<kernel::YieldOp>(inner.getTerminator());
    // Dims inside the group: block arguments take their input's dims.
    llvm::DenseMap<Value, std::vector<DimKind>> local;
    for (auto [arg, in] : llvm::zip(inner.getArguments(), group.getInputs()))
      local[arg] = f.dims[in];
    for (Operation &innerOp : inner.without_terminator()) {
      std::vector<std::vector<DimKind>> operandDims;
      for (Value v : innerOp.getOperands())
        operandDims.push_back(local[v]);
      for (unsigned r = 0; r < innerOp.getNumResults(); ++r)
        local[innerOp.getResult(r)] = resultDims(&innerOp, r, operandDims);
    }
    // Values a fused group computes and consumes itself: the CUDA kernel
    // keeps them in registers, the CPU backend needs bytes for them. They
    // live in the arena for the kernel's duration only.
    for (Operation &innerOp : inner.without_terminator())
      for (Value v : innerOp.getResults())
        if (!llvm::is_contained(yield.getValues(), v)) {
          f.dims[v] = local[v];
          temps.push_back({v, index[&op]});
        }
    for (auto [res, yielded] : llvm::zip(group.getResults(), yield.getValues())) {
      Operation *def = yielded.getDefiningOp();
      f.dims[res] = local[yielded];
      if (auto upd = dyn_cast_or_null<l4::KvCacheUpdateOp>(def)) {
        auto arg = dyn_cast<BlockArgument>(upd.getCache());
        if (!arg || arg.getOwner() != &group.getBody().front())
          return group.emitOpError() << "cache update must read a group input";
        aliasOf[res] = group.getInputs()[arg.getArgNumber()];
        f.dims[res] = f.dims[group.getInputs()[arg.getArgNumber()]];
      }
      // The loss gradient may overwrite the logits it reads (the kernels
      // read a row before writing it): one [B, T, V] buffer instead of two.
      Value logits;
      if (auto ceg = dyn_cast_or_null<l4::CrossEntropyGradOp>(def))
        logits = ceg.getLogits();
      if (auto ceg = dyn_cast_or_null<l4::CrossEntropyGradChunkOp>(def))
        logits = ceg.getLogits();
      if (auto arg = dyn_cast_or_null<BlockArgument>(logits);
          arg && arg.getOwner() == &inner &&
          group.getInputs()[arg.getArgNumber()].getType() == res.getType())
        inPlace.push_back({res, group.getInputs()[arg.getArgNumber()]});
    }
  }
  // Legal only where the logits live in the arena and nothing reads them
  // after the gradient kernel.
  for (auto [res, src] : inPlace) {
    Value r = root(src);
    if (isa<BlockArgument>(r))
      continue;
    auto group = res.getDefiningOp<kernel::GroupOp>();
    bool laterUse = false;
    for (Operation &op : body.getOperations()) {
      if (&op == group.getOperation())
        continue;
      bool reads = llvm::any_of(op.getOperands(),
                                [&](Value v) { return root(v) == r; });
      if (reads && (isa<func::ReturnOp>(op) ||
                    index.lookup(&op) > index.lookup(group)))
        laterUse = true;
    }
    if (!laterUse)
      aliasOf[res] = src;
  }

  // An in-place update must be the last reader of the cache it overwrites.
  for (auto &[res, src] : aliasOf) {
    auto group = res.getDefiningOp<kernel::GroupOp>();
    if (!group || !isa<BlockArgument>(root(src)))
      continue;
    for (Operation *user : src.getUsers())
      if (user != group.getOperation() && user->getBlock() == &body &&
          index.lookup(user) > index.lookup(group))
        return group.emitOpError()
               << "in-place cache update would clobber a value still read by "
                  "a later kernel";
  }

  // Outputs go to the I/O region: the kernel producing one writes it there.
  llvm::DenseMap<Value, Slot> outputSlot;
  for (auto [i, v] : llvm::enumerate(ret.getOperands())) {
    if (!fn.getResultAttrOfType<StringAttr>(i, "l4.output"))
      continue;
    Value r = root(v);
    if (f.slots.count(r))
      continue; // already placed (an input or weight returned as is)
    Slot s{MemRegion::Io, f.ioSize, byteSize(r.getType())};
    f.ioSize = alignUp(f.ioSize + s.size, kBufferAlign);
    outputSlot[r] = s;
  }

  // Lifetimes of arena roots: first write (the root's or a value placed
  // inside it) to last use through views.
  llvm::DenseMap<Value, Lifetime> life;
  SmallVector<Value> roots;
  for (Operation &op : body.without_terminator())
    for (Value res : op.getResults()) {
      Value r = root(res);
      if (f.slots.count(r) || outputSlot.count(r))
        continue;
      auto it = life.find(r);
      if (it == life.end()) {
        life[r] = Lifetime{index[&op], index[&op], byteSize(r.getType())};
        roots.push_back(r);
      } else {
        it->second.start = std::min(it->second.start, index[&op]);
      }
    }
  for (Operation &op : body.getOperations())
    for (Value v : op.getOperands()) {
      auto it = life.find(root(v));
      if (it == life.end())
        continue;
      int64_t at = isa<func::ReturnOp>(op) ? n : index[&op];
      it->second.end = std::max(it->second.end, at);
    }
  for (auto [v, at] : temps) {
    life[v] = Lifetime{at, at, byteSize(v.getType())};
    roots.push_back(v);
  }
  std::vector<Lifetime> lifetimes;
  for (Value r : roots)
    lifetimes.push_back(life[r]);
  std::vector<uint64_t> offsets;
  f.arenaSize = assignOffsets(lifetimes, kBufferAlign, offsets);
  for (auto [r, off] : llvm::zip(roots, offsets))
    f.slots[r] = Slot{MemRegion::Arena, off, life[r].size};
  for (auto &[r, s] : outputSlot)
    f.slots[r] = s;

  // Views and in-place results share their root's bytes.
  for (Operation &op : body.without_terminator())
    for (Value res : op.getResults()) {
      Slot s = f.slots[root(res)];
      s.offset += rootOffset(res);
      s.size = byteSize(res.getType());
      f.slots[res] = s;
    }
  return success();
}

FailureOr<ModuleMemoryPlan> planModuleMemory(ModuleOp module) {
  ModuleMemoryPlan plan;
  for (auto fn : module.getOps<func::FuncOp>()) {
    FunctionMemoryPlan &f = plan.functions[fn.getSymName()];
    FunctionPlanner planner(plan, f);
    if (failed(planner.run(fn)))
      return failure();
    plan.arenaSize = std::max(plan.arenaSize, f.arenaSize);
    plan.ioSize = std::max(plan.ioSize, f.ioSize);
  }
  return plan;
}

} // namespace l4c
