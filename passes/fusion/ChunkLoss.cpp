//===- ChunkLoss.cpp - the train step's lm_head and loss in vocab chunks --===//
//
// l4c-chunk-loss: the logits of a train step ([B, S, vocab]: 6 GiB in f32
// for Scout at 8192 tokens) are the largest value of the program and are
// read only by the loss and its gradient. Splitting the vocabulary
// projection by weight rows keeps one chunk of logits alive at a time. The
// forward chain of cross_entropy_stats computes each row's log-sum-exp
// online across chunks; the backward recomputes each chunk's logits (one
// more lm_head GEMM over the step), turns them into that chunk's gradient
// and feeds the two linear gradients. Every shape stays static: weight
// rows are views (slice_rows), and the weight gradient's chunks are placed
// inside the whole gradient (concat_rows), so the runtime needs nothing new.
//
//===----------------------------------------------------------------------===//
#include "l4c/Dialect/L4/L4Ops.h"
#include "l4c/Passes/Passes.h"
#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/IR/Builders.h"
#include "mlir/IR/BuiltinTypes.h"
#include "llvm/ADT/STLExtras.h"

namespace l4c {
#define GEN_PASS_DEF_CHUNKLOSSPASS
#include "l4c/Passes/Passes.h.inc"
} // namespace l4c

using namespace mlir;
namespace l4 = l4c::l4;

namespace {

constexpr uint64_t kAutoChunkBytes = 256ull << 20;

/// The pattern autodiff leaves at the end of a train step.
struct LossTail {
  l4::LinearOp head;
  l4::CrossEntropyOp loss;
  l4::CrossEntropyGradOp grad;
  l4::LinearGradInputOp gradInput;
  l4::LinearGradWeightOp gradWeight;
};

std::optional<LossTail> match(l4::CrossEntropyOp ce) {
  LossTail t;
  t.loss = ce;
  t.head = ce.getLogits().getDefiningOp<l4::LinearOp>();
  if (!t.head)
    return std::nullopt;
  for (Operation *user : t.head.getResult().getUsers()) {
    if (user == ce.getOperation())
      continue;
    auto g = dyn_cast<l4::CrossEntropyGradOp>(user);
    if (!g || t.grad || g.getIds() != ce.getIds())
      return std::nullopt;
    t.grad = g;
  }
  if (!t.grad)
    return std::nullopt;
  for (Operation *user : t.grad.getResult().getUsers()) {
    if (auto gi = dyn_cast<l4::LinearGradInputOp>(user);
        gi && !t.gradInput && gi.getWeight() == t.head.getWeight())
      t.gradInput = gi;
    else if (auto gw = dyn_cast<l4::LinearGradWeightOp>(user);
             gw && !t.gradWeight && gw.getInput() == t.head.getInput())
      t.gradWeight = gw;
    else
      return std::nullopt;
  }
  if (!t.gradInput || !t.gradWeight)
    return std::nullopt;
  return t;
}

struct ChunkLossPass : public l4c::impl::ChunkLossPassBase<ChunkLossPass> {
  using ChunkLossPassBase::ChunkLossPassBase;

  void runOnOperation() override {
    SmallVector<LossTail> tails;
    getOperation().walk([&](l4::CrossEntropyOp ce) {
      if (auto t = match(ce))
        tails.push_back(*t);
    });
    for (LossTail &t : tails)
      if (failed(rewrite(t)))
        return signalPassFailure();
  }

  /// Columns per chunk for `logits`, or 0 to leave the loss whole.
  FailureOr<int64_t> columns(Operation *at, RankedTensorType logits) {
    int64_t vocab = logits.getDimSize(2);
    if (chunk == "none")
      return 0;
    if (chunk == "auto") {
      uint64_t bytes = uint64_t(logits.getNumElements()) *
                       std::max<unsigned>(logits.getElementTypeBitWidth() / 8, 1);
      uint64_t n = (bytes + kAutoChunkBytes - 1) / kAutoChunkBytes;
      if (n <= 1)
        return 0;
      int64_t cols = (vocab + int64_t(n) - 1) / int64_t(n);
      return (cols + 127) / 128 * 128;
    }
    int64_t cols = 0;
    if (StringRef(chunk).getAsInteger(10, cols) || cols <= 0)
      return at->emitError() << "l4c-chunk-loss: chunk must be auto, none or "
                                "a positive column count, not '"
                             << chunk << "'";
    return cols;
  }

  LogicalResult rewrite(LossTail &t) {
    auto logitsType = cast<RankedTensorType>(t.head.getResult().getType());
    FailureOr<int64_t> cols = columns(t.head, logitsType);
    if (failed(cols))
      return failure();
    int64_t vocab = logitsType.getDimSize(2);
    if (*cols == 0 || *cols >= vocab)
      return success();

    Value x = t.head.getInput(), w = t.head.getWeight(),
          ids = t.loss.getIds();
    auto wType = cast<RankedTensorType>(w.getType());
    auto dwType = cast<RankedTensorType>(t.gradWeight.getResult().getType());
    OpBuilder b(t.head);
    Location headLoc = t.head.getLoc(), lossLoc = t.loss.getLoc();
    auto statsType = RankedTensorType::get(
        {logitsType.getDimSize(0), logitsType.getDimSize(1), 2},
        b.getF32Type());

    struct Chunk {
      int64_t offset, n;
      Value weight;
      RankedTensorType logits;
    };
    SmallVector<Chunk> chunks;
    for (int64_t o = 0; o < vocab; o += *cols) {
      int64_t n = std::min(*cols, vocab - o);
      Chunk c{o, n, {}, RankedTensorType::get(
                            {logitsType.getDimSize(0),
                             logitsType.getDimSize(1), n},
                            logitsType.getElementType())};
      c.weight = l4::SliceRowsOp::create(
          b, headLoc,
          RankedTensorType::get({n, wType.getDimSize(1)},
                                wType.getElementType()),
          w, b.getI64IntegerAttr(o));
      chunks.push_back(c);
    }

    // Forward: the statistics chain, then the loss.
    b.setInsertionPoint(t.loss);
    Value stats;
    for (Chunk &c : chunks) {
      Value logits = l4::LinearOp::create(b, headLoc, c.logits, x, c.weight);
      stats = l4::CrossEntropyStatsOp::create(
          b, lossLoc, statsType, logits, ids, stats,
          b.getI64IntegerAttr(c.offset), b.getI64IntegerAttr(vocab));
    }
    Value loss = l4::CrossEntropyFromStatsOp::create(
        b, lossLoc, t.loss.getResult().getType(), stats, ids);

    // Backward, where the gradient was: recompute, differentiate, project.
    b.setInsertionPoint(t.grad);
    Location gradLoc = t.grad.getLoc();
    Location giLoc = t.gradInput.getLoc(), gwLoc = t.gradWeight.getLoc();
    // The input gradient's parts are summed in f32 and rounded once at the
    // end, as the whole-vocabulary GEMM rounds its f32 sum once.
    auto dxType = cast<RankedTensorType>(t.gradInput.getResult().getType());
    auto partType = dxType.clone(b.getF32Type());
    Value dx;
    SmallVector<Value> dw;
    for (Chunk &c : chunks) {
      Value logits = l4::LinearOp::create(b, headLoc, c.logits, x, c.weight);
      Value dl = l4::CrossEntropyGradChunkOp::create(
          b, gradLoc, c.logits, logits, ids, stats,
          b.getI64IntegerAttr(c.offset), b.getI64IntegerAttr(vocab));
      Value dxc = l4::LinearGradInputOp::create(b, giLoc, partType, dl, c.weight);
      dx = dx ? l4::AddOp::create(b, giLoc, dx, dxc).getResult() : dxc;
      dw.push_back(l4::LinearGradWeightOp::create(
          b, gwLoc,
          RankedTensorType::get({c.n, dwType.getDimSize(1)},
                                dwType.getElementType()),
          x, dl));
    }
    if (partType != dxType)
      dx = l4::ConvertOp::create(b, giLoc, dxType, dx);
    Value dwAll = l4::ConcatRowsOp::create(b, gwLoc, dwType, dw);

    t.loss.getResult().replaceAllUsesWith(loss);
    t.gradInput.getResult().replaceAllUsesWith(dx);
    t.gradWeight.getResult().replaceAllUsesWith(dwAll);
    t.gradWeight.erase();
    t.gradInput.erase();
    t.grad.erase();
    t.loss.erase();
    t.head.erase();
    return success();
  }
};

} // namespace
