//===- Ops.cpp - l4 dialect op verifiers and folds ------------------------===//
//
// Shape, dtype and attribute checks for every l4 op. Diagnostics name the
// operand at fault and the value that was expected.
//
//===----------------------------------------------------------------------===//
#include "l4c/Dialect/L4/L4Ops.h"
#include "mlir/IR/Builders.h"
#include "mlir/IR/BuiltinTypes.h"
#include "mlir/IR/PatternMatch.h"

using namespace mlir;
using namespace l4c::l4;

namespace {

std::string shapeStr(ArrayRef<int64_t> shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i)
    s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/// Checks the rank of a ranked tensor value.
LogicalResult expectRank(Operation *op, StringRef what, Value v, int64_t rank) {
  auto t = cast<RankedTensorType>(v.getType());
  if (t.getRank() != rank)
    return op->emitOpError() << what << " must have rank " << rank << ", got "
                             << shapeStr(t.getShape());
  return success();
}

LogicalResult expectDim(Operation *op, StringRef what, Value v, int64_t dim,
                        int64_t expected, StringRef why) {
  auto t = cast<RankedTensorType>(v.getType());
  if (t.getDimSize(dim) != expected)
    return op->emitOpError() << what << " dimension " << dim << " must be "
                             << expected << " (" << why << "), got "
                             << t.getDimSize(dim);
  return success();
}

LogicalResult expectShape(Operation *op, StringRef what, Value v,
                          ArrayRef<int64_t> expected) {
  auto t = cast<RankedTensorType>(v.getType());
  if (t.getShape() != expected)
    return op->emitOpError() << what << " must have shape "
                             << shapeStr(expected) << ", got "
                             << shapeStr(t.getShape());
  return success();
}

LogicalResult expectSameElementType(Operation *op, StringRef what, Value v,
                                    Value ref, StringRef refName) {
  Type a = cast<RankedTensorType>(v.getType()).getElementType();
  Type b = cast<RankedTensorType>(ref.getType()).getElementType();
  if (a != b)
    return op->emitOpError() << what << " element type " << a
                             << " must match " << refName << " element type "
                             << b;
  return success();
}

ArrayRef<int64_t> shapeOf(Value v) {
  return cast<RankedTensorType>(v.getType()).getShape();
}

/// positions must be [B, S] matching the leading dims of an activation.
LogicalResult verifyPositions(Operation *op, Value positions, Value act) {
  if (failed(expectRank(op, "positions", positions, 2)))
    return failure();
  return expectShape(op, "positions", positions, shapeOf(act).take_front(2));
}

/// nn.Embedding's padding_idx: a row of the [vocab, hidden] table.
LogicalResult verifyPaddingIdx(Operation *op, std::optional<int64_t> idx,
                               int64_t vocab) {
  if (!idx || ShapedType::isDynamic(vocab) || (*idx >= 0 && *idx < vocab))
    return success();
  return op->emitOpError() << "padding_idx must be in [0, " << vocab
                           << ") (the table's rows), got " << *idx;
}

} // namespace

LogicalResult EmbeddingOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "table", getTable(), 2)) ||
      failed(expectRank(op, "ids", getIds(), 2)))
    return failure();
  ArrayRef<int64_t> ids = shapeOf(getIds());
  int64_t d = shapeOf(getTable())[1];
  if (failed(expectShape(op, "result", getResult(), {ids[0], ids[1], d})))
    return failure();
  if (failed(verifyPaddingIdx(op, getPaddingIdx(), shapeOf(getTable())[0])))
    return failure();
  return expectSameElementType(op, "result", getResult(), getTable(), "table");
}

LogicalResult RmsNormOp::verify() {
  Operation *op = getOperation();
  if (getEps().convertToDouble() <= 0)
    return emitOpError() << "eps must be positive, got "
                         << getEps().convertToDouble();
  if (failed(expectRank(op, "weight", getWeight(), 1)) ||
      failed(expectDim(op, "weight", getWeight(), 0, shapeOf(getInput()).back(),
                       "the input's last dimension")))
    return failure();
  if (getResult().getType() != getInput().getType())
    return emitOpError() << "result type " << getResult().getType()
                         << " must equal the input type "
                         << getInput().getType();
  return success();
}

LogicalResult L2NormOp::verify() {
  if (getEps().convertToDouble() <= 0)
    return emitOpError() << "eps must be positive, got "
                         << getEps().convertToDouble();
  return success();
}

LogicalResult LinearOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "weight", getWeight(), 2)))
    return failure();
  ArrayRef<int64_t> x = shapeOf(getInput()), w = shapeOf(getWeight());
  if (x.empty())
    return emitOpError() << "input must have rank >= 1";
  if (x.back() != w[1])
    return emitOpError() << "weight dimension 1 must be " << x.back()
                         << " (the input's last dimension), got " << w[1];
  SmallVector<int64_t> out(x.drop_back());
  out.push_back(w[0]);
  if (failed(expectShape(op, "result", getResult(), out)))
    return failure();
  return expectSameElementType(op, "result", getResult(), getInput(), "input");
}

LogicalResult ReshapeOp::verify() {
  auto in = cast<RankedTensorType>(getInput().getType());
  auto out = cast<RankedTensorType>(getResult().getType());
  if (in.getElementType() != out.getElementType())
    return emitOpError() << "result element type " << out.getElementType()
                         << " must match the input's " << in.getElementType();
  if (in.getNumElements() != out.getNumElements())
    return emitOpError() << "result shape " << shapeStr(out.getShape())
                         << " must hold as many elements as the input shape "
                         << shapeStr(in.getShape());
  return success();
}

OpFoldResult ReshapeOp::fold(FoldAdaptor) {
  if (getInput().getType() == getResult().getType())
    return getInput();
  return {};
}

namespace {
/// reshape(reshape(x)) -> reshape(x): a row-major view of a view is a view.
struct FoldReshapeChain : public OpRewritePattern<ReshapeOp> {
  using OpRewritePattern::OpRewritePattern;
  LogicalResult matchAndRewrite(ReshapeOp op,
                                PatternRewriter &rewriter) const override {
    auto inner = op.getInput().getDefiningOp<ReshapeOp>();
    if (!inner)
      return rewriter.notifyMatchFailure(op, "input is not a reshape");
    rewriter.replaceOpWithNewOp<ReshapeOp>(op, op.getType(), inner.getInput());
    return success();
  }
};
} // namespace

void ReshapeOp::getCanonicalizationPatterns(RewritePatternSet &results,
                                            MLIRContext *context) {
  results.add<FoldReshapeChain>(context);
}

LogicalResult RopeOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "input", getInput(), 4)) ||
      failed(verifyPositions(op, getPositions(), getInput())))
    return failure();
  if (shapeOf(getInput())[3] % 2 != 0)
    return emitOpError() << "head dimension must be even, got "
                         << shapeOf(getInput())[3];
  if (getResult().getType() != getInput().getType())
    return emitOpError() << "result type must equal the input type";
  if (getTheta().convertToDouble() <= 0)
    return emitOpError() << "theta must be positive";
  if (getScaling() == RopeScaling::llama3) {
    if (getFactor().convertToDouble() <= 0 ||
        getLowFreqFactor().convertToDouble() <= 0 ||
        getHighFreqFactor().convertToDouble() <= 0)
      return emitOpError()
             << "llama3 scaling needs positive factor, low_freq_factor and "
                "high_freq_factor";
    if (getOriginalMaxPositionAttr().getInt() <= 0)
      return emitOpError() << "llama3 scaling needs original_max_position > 0";
  }
  return success();
}

LogicalResult TemperatureScaleOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "input", getInput(), 4)) ||
      failed(verifyPositions(op, getPositions(), getInput())))
    return failure();
  if (getResult().getType() != getInput().getType())
    return emitOpError() << "result type must equal the input type";
  if (getFloorScale().convertToDouble() <= 0)
    return emitOpError() << "floor_scale must be positive, got "
                         << getFloorScale().convertToDouble();
  return success();
}

LogicalResult KvCacheUpdateOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "cache", getCache(), 4)) ||
      failed(expectRank(op, "update", getUpdate(), 4)) ||
      failed(verifyPositions(op, getPositions(), getUpdate())))
    return failure();
  ArrayRef<int64_t> c = shapeOf(getCache()), u = shapeOf(getUpdate());
  if (c[0] != u[0] || c[2] != u[2] || c[3] != u[3])
    return emitOpError() << "update shape " << shapeStr(u)
                         << " must match cache shape " << shapeStr(c)
                         << " in batch, kv heads and head_dim";
  if (u[1] > c[1])
    return emitOpError() << "update length " << u[1]
                         << " exceeds the cache length " << c[1];
  if (getResult().getType() != getCache().getType())
    return emitOpError() << "result type must equal the cache type";
  return expectSameElementType(op, "update", getUpdate(), getCache(), "cache");
}

LogicalResult AttentionOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "query", getQuery(), 4)) ||
      failed(expectRank(op, "key", getKey(), 4)) ||
      failed(verifyPositions(op, getPositions(), getQuery())))
    return failure();
  ArrayRef<int64_t> q = shapeOf(getQuery()), k = shapeOf(getKey());
  if (getValue().getType() != getKey().getType())
    return emitOpError() << "value type " << getValue().getType()
                         << " must equal the key type " << getKey().getType();
  if (k[0] != q[0])
    return emitOpError() << "key batch " << k[0] << " must equal query batch "
                         << q[0];
  if (k[3] != q[3])
    return emitOpError() << "key head_dim " << k[3]
                         << " must equal query head_dim " << q[3];
  if (k[2] <= 0 || q[2] % k[2] != 0)
    return emitOpError() << "query heads " << q[2]
                         << " must be a multiple of kv heads " << k[2];
  if (getChunkSizeAttr().getInt() < 0)
    return emitOpError() << "chunk_size must be >= 0 (0 = full causal), got "
                         << getChunkSizeAttr().getInt();
  if (getScale().convertToDouble() <= 0)
    return emitOpError() << "scale must be positive";
  if (getResult().getType() != getQuery().getType())
    return emitOpError() << "result type must equal the query type";
  return expectSameElementType(op, "key", getKey(), getQuery(), "query");
}

LogicalResult RouterScoresOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "logits", getLogits(), 3)))
    return failure();
  int64_t e = shapeOf(getLogits())[2];
  int64_t k = getTopKAttr().getInt();
  if (k < 1 || k > e)
    return emitOpError() << "top_k must be in [1, " << e
                         << "] (the number of experts), got " << k;
  return success();
}

LogicalResult MoeExpertsOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "input", getInput(), 3)) ||
      failed(expectRank(op, "scores", getScores(), 3)) ||
      failed(expectRank(op, "gate_up", getGateUp(), 3)) ||
      failed(expectRank(op, "down", getDown(), 3)))
    return failure();
  ArrayRef<int64_t> x = shapeOf(getInput()), gu = shapeOf(getGateUp());
  int64_t e = gu[0], d = x[2];
  if (gu[2] % 2 != 0)
    return emitOpError() << "gate_up dimension 2 must be even (gate | up), got "
                         << gu[2];
  int64_t i = gu[2] / 2;
  if (failed(expectShape(op, "scores", getScores(), {x[0], x[1], e})) ||
      failed(expectShape(op, "gate_up", getGateUp(), {e, d, 2 * i})) ||
      failed(expectShape(op, "down", getDown(), {e, i, d})))
    return failure();
  if (getResult().getType() != getInput().getType())
    return emitOpError() << "result type must equal the input type";
  return success();
}

/// Per-slot expert values: f32, or the element type of `ref`.
static LogicalResult expectF32OrLike(Operation *op, StringRef what, Value v,
                                     Value ref, StringRef refName) {
  if (cast<RankedTensorType>(v.getType()).getElementType().isF32())
    return success();
  return expectSameElementType(op, what, v, ref, refName);
}

/// `route` is l4.moe_route's table for [b, s, e] scores with `slots` slots.
static LogicalResult expectRoute(Operation *op, Value route, int64_t b,
                                 int64_t s, int64_t e, int64_t slots) {
  if (failed(expectRank(op, "route", route, 1)))
    return failure();
  if (!cast<RankedTensorType>(route.getType()).getElementType().isInteger(32))
    return op->emitOpError() << "route must be i32";
  return expectShape(op, "route", route, {e + 1 + b * s * slots});
}

LogicalResult MoeRouteOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "scores", getScores(), 3)))
    return failure();
  ArrayRef<int64_t> sc = shapeOf(getScores());
  int64_t slots = getSlots();
  if (slots < 1 || slots > sc[2])
    return emitOpError() << "slots " << slots << " must be in [1, " << sc[2]
                         << "] (the experts a token may use)";
  return expectRoute(op, getResult(), sc[0], sc[1], sc[2], slots);
}

LogicalResult MoeHiddenOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "input", getInput(), 3)) ||
      failed(expectRank(op, "scores", getScores(), 3)) ||
      failed(expectRank(op, "gate_up", getGateUp(), 3)) ||
      failed(expectRank(op, "result", getResult(), 4)))
    return failure();
  ArrayRef<int64_t> x = shapeOf(getInput()), gu = shapeOf(getGateUp()),
                    h = shapeOf(getResult());
  int64_t e = gu[0], d = x[2];
  if (gu[2] % 2 != 0)
    return emitOpError() << "gate_up dimension 2 must be even (gate | up), got "
                         << gu[2];
  int64_t i = gu[2] / 2;
  if (failed(expectShape(op, "scores", getScores(), {x[0], x[1], e})) ||
      failed(expectShape(op, "gate_up", getGateUp(), {e, d, 2 * i})))
    return failure();
  if (h[2] < 1 || h[2] > e)
    return emitOpError() << "result slots " << h[2] << " must be in [1, " << e
                         << "] (the experts a token may use)";
  if (failed(expectShape(op, "result", getResult(), {x[0], x[1], h[2], i})))
    return failure();
  if (failed(expectRoute(op, getRoute(), x[0], x[1], e, h[2])))
    return failure();
  if (failed(expectF32OrLike(op, "result", getResult(), getInput(), "input")))
    return failure();
  return success();
}

LogicalResult MoeDownOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "hidden", getHidden(), 4)) ||
      failed(expectRank(op, "scores", getScores(), 3)) ||
      failed(expectRank(op, "down", getDown(), 3)) ||
      failed(expectRank(op, "result", getResult(), 3)))
    return failure();
  ArrayRef<int64_t> h = shapeOf(getHidden()), dn = shapeOf(getDown());
  int64_t e = dn[0];
  if (h[2] < 1 || h[2] > e)
    return emitOpError() << "hidden slots " << h[2] << " must be in [1, " << e
                         << "]";
  if (failed(expectShape(op, "scores", getScores(), {h[0], h[1], e})) ||
      failed(expectShape(op, "down", getDown(), {e, h[3], dn[2]})) ||
      failed(expectShape(op, "result", getResult(), {h[0], h[1], dn[2]})))
    return failure();
  if (failed(expectRoute(op, getRoute(), h[0], h[1], e, h[2])))
    return failure();
  if (failed(expectF32OrLike(op, "hidden", getHidden(), getResult(), "result")))
    return failure();
  return success();
}

LogicalResult TakeLastOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "input", getInput(), 3)))
    return failure();
  ArrayRef<int64_t> x = shapeOf(getInput());
  if (failed(expectShape(op, "result", getResult(), {x[0], 1, x[2]})))
    return failure();
  return expectSameElementType(op, "result", getResult(), getInput(), "input");
}

//===----------------------------------------------------------------------===//
// Training ops
//===----------------------------------------------------------------------===//

/// `v` must have exactly the type of `ref` (a gradient and its primal).
static LogicalResult expectSameType(Operation *op, StringRef what, Value v,
                                    StringRef refName, Value ref) {
  if (v.getType() != ref.getType())
    return op->emitOpError() << what << " type " << v.getType()
                             << " must equal the " << refName << " type "
                             << ref.getType();
  return success();
}

/// A weight's gradient: the weight's shape, and its element type or f32
/// (bf16 plans keep weight gradients in f32 for the optimizer).
static LogicalResult expectWeightGradType(Operation *op, StringRef what,
                                          Value v, StringRef refName,
                                          Value ref) {
  auto t = cast<RankedTensorType>(v.getType());
  auto r = cast<RankedTensorType>(ref.getType());
  if (t.getShape() != r.getShape() ||
      (t.getElementType() != r.getElementType() &&
       !t.getElementType().isF32()))
    return op->emitOpError()
           << what << " type " << v.getType() << " must be the " << refName
           << " type " << ref.getType() << ", or that shape in f32";
  return success();
}

LogicalResult CrossEntropyOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "logits", getLogits(), 3)) ||
      failed(expectRank(op, "ids", getIds(), 2)))
    return failure();
  return expectShape(op, "ids", getIds(), shapeOf(getLogits()).take_front(2));
}

LogicalResult CrossEntropyGradOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "logits", getLogits(), 3)) ||
      failed(expectShape(op, "ids", getIds(), shapeOf(getLogits()).take_front(2))))
    return failure();
  return expectSameType(op, "result", getResult(), "logits", getLogits());
}

/// The vocabulary window [offset, offset + n) of a chunked loss op.
static LogicalResult verifyVocabChunk(Operation *op, Value logits, Value ids,
                                      int64_t offset, int64_t vocab) {
  if (failed(expectRank(op, "logits", logits, 3)) ||
      failed(expectShape(op, "ids", ids, shapeOf(logits).take_front(2))))
    return failure();
  int64_t n = shapeOf(logits)[2];
  if (offset < 0 || vocab <= 0 || offset + n > vocab)
    return op->emitOpError() << "vocabulary columns [" << offset << ", "
                             << offset + n << ") do not lie in [0, " << vocab
                             << ")";
  return success();
}

/// Chunk statistics: f32 [B, S, 2] over the logits' rows.
static LogicalResult expectStats(Operation *op, StringRef what, Value stats,
                                 Value logits) {
  ArrayRef<int64_t> l = shapeOf(logits);
  if (failed(expectShape(op, what, stats, {l[0], l[1], 2})))
    return failure();
  if (!cast<RankedTensorType>(stats.getType()).getElementType().isF32())
    return op->emitOpError() << what << " must be f32";
  return success();
}

LogicalResult CrossEntropyStatsOp::verify() {
  Operation *op = getOperation();
  if (failed(verifyVocabChunk(op, getLogits(), getIds(), getVocabOffset(),
                              getVocabSize())) ||
      failed(expectStats(op, "result", getResult(), getLogits())))
    return failure();
  if (getPrev())
    return expectStats(op, "prev", getPrev(), getLogits());
  if (getVocabOffset() != 0)
    return emitOpError() << "a chain's first chunk (no prev) must start at "
                            "column 0, not "
                         << getVocabOffset();
  return success();
}

LogicalResult CrossEntropyFromStatsOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "stats", getStats(), 3)) ||
      failed(expectRank(op, "ids", getIds(), 2)))
    return failure();
  if (failed(expectShape(op, "ids", getIds(), shapeOf(getStats()).take_front(2))))
    return failure();
  return expectShape(op, "stats", getStats(),
                     {shapeOf(getIds())[0], shapeOf(getIds())[1], 2});
}

LogicalResult CrossEntropyGradChunkOp::verify() {
  Operation *op = getOperation();
  if (failed(verifyVocabChunk(op, getLogits(), getIds(), getVocabOffset(),
                              getVocabSize())) ||
      failed(expectStats(op, "stats", getStats(), getLogits())))
    return failure();
  return expectSameType(op, "result", getResult(), "logits", getLogits());
}

LogicalResult ConvertOp::verify() {
  return expectShape(getOperation(), "result", getResult(),
                     shapeOf(getInput()));
}

LogicalResult SliceRowsOp::verify() {
  auto in = cast<RankedTensorType>(getInput().getType());
  auto out = cast<RankedTensorType>(getResult().getType());
  if (in.getElementType() != out.getElementType() || in.getRank() < 1 ||
      in.getRank() != out.getRank() ||
      in.getShape().drop_front() != out.getShape().drop_front())
    return emitOpError() << "result " << out
                         << " must be rows of the input " << in;
  int64_t offset = int64_t(getOffset());
  if (offset < 0 || offset + out.getDimSize(0) > in.getDimSize(0))
    return emitOpError() << "rows [" << offset << ", "
                         << offset + out.getDimSize(0)
                         << ") do not lie in the input's " << in.getDimSize(0);
  return success();
}

LogicalResult ConcatRowsOp::verify() {
  auto out = cast<RankedTensorType>(getResult().getType());
  if (getInputs().empty() || out.getRank() < 1)
    return emitOpError() << "needs inputs and a result of rank >= 1";
  int64_t rows = 0;
  for (Value v : getInputs()) {
    auto t = cast<RankedTensorType>(v.getType());
    if (t.getElementType() != out.getElementType() ||
        t.getRank() != out.getRank() ||
        t.getShape().drop_front() != out.getShape().drop_front())
      return emitOpError() << "input " << t << " is not rows of the result "
                           << out;
    rows += t.getDimSize(0);
  }
  if (rows != out.getDimSize(0))
    return emitOpError() << "inputs hold " << rows << " rows, the result "
                         << out.getDimSize(0);
  return success();
}

LogicalResult LinearGradInputOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "weight", getWeight(), 2)))
    return failure();
  ArrayRef<int64_t> dy = shapeOf(getGrad()), w = shapeOf(getWeight());
  if (dy.empty() || dy.back() != w[0])
    return emitOpError() << "grad's last dimension must be " << w[0]
                         << " (the weight's output size)";
  SmallVector<int64_t> out(dy.drop_back());
  out.push_back(w[1]);
  return expectShape(op, "result", getResult(), out);
}

LogicalResult LinearGradWeightOp::verify() {
  Operation *op = getOperation();
  ArrayRef<int64_t> x = shapeOf(getInput()), dy = shapeOf(getGrad());
  if (x.size() != dy.size() || x.empty() ||
      x.drop_back() != dy.drop_back())
    return emitOpError() << "input " << shapeStr(x) << " and grad "
                         << shapeStr(dy)
                         << " must agree in all but the last dimension";
  return expectShape(op, "result", getResult(), {dy.back(), x.back()});
}

LogicalResult RmsNormGradOp::verify() {
  Operation *op = getOperation();
  if (failed(expectSameType(op, "grad", getGrad(), "input", getInput())) ||
      failed(expectSameType(op, "input_grad", getInputGrad(), "input",
                            getInput())))
    return failure();
  return expectWeightGradType(op, "weight_grad", getWeightGrad(), "weight",
                              getWeight());
}

LogicalResult L2NormGradOp::verify() {
  Operation *op = getOperation();
  if (failed(expectSameType(op, "grad", getGrad(), "input", getInput())))
    return failure();
  return expectSameType(op, "result", getResult(), "input", getInput());
}

LogicalResult AttentionGradOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "query", getQuery(), 4)) ||
      failed(expectRank(op, "key", getKey(), 4)) ||
      failed(verifyPositions(op, getPositions(), getQuery())) ||
      failed(expectSameType(op, "value", getValue(), "key", getKey())) ||
      failed(expectSameType(op, "grad", getGrad(), "query", getQuery())) ||
      failed(expectSameType(op, "query_grad", getQueryGrad(), "query",
                            getQuery())) ||
      failed(expectSameType(op, "key_grad", getKeyGrad(), "key", getKey())) ||
      failed(expectSameType(op, "value_grad", getValueGrad(), "value",
                            getValue())))
    return failure();
  if (shapeOf(getQuery())[2] % shapeOf(getKey())[2] != 0)
    return emitOpError() << "query heads must be a multiple of kv heads";
  return success();
}

LogicalResult RouterScoresGradOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "logits", getLogits(), 3)) ||
      failed(expectSameType(op, "grad", getGrad(), "logits", getLogits())) ||
      failed(expectSameType(op, "result", getResult(), "logits", getLogits())))
    return failure();
  int64_t k = getTopKAttr().getInt(), e = shapeOf(getLogits())[2];
  if (k < 1 || k > e)
    return emitOpError() << "top_k must be in [1, " << e << "], got " << k;
  return success();
}

LogicalResult MoeExpertsGradOp::verify() {
  Operation *op = getOperation();
  if (failed(expectSameType(op, "grad", getGrad(), "input", getInput())) ||
      failed(expectSameType(op, "input_grad", getInputGrad(), "input",
                            getInput())) ||
      failed(expectSameType(op, "scores_grad", getScoresGrad(), "scores",
                            getScores())) ||
      failed(expectWeightGradType(op, "gate_up_grad", getGateUpGrad(),
                                  "gate_up", getGateUp())))
    return failure();
  return expectWeightGradType(op, "down_grad", getDownGrad(), "down",
                              getDown());
}

namespace {
/// The shapes the split experts' gradient ops share: x-like token rows
/// [B, S, D], scores [B, S, E], per-slot rows [B, S, K, W] and the route.
struct ExpertDims {
  int64_t b = 0, s = 0, e = 0, k = 0;
};

/// Checks `slotted` is [B, S, K, width] over `scores` [B, S, E] and `route`
/// is the table for them; fills `d`.
LogicalResult expectSlotted(Operation *op, StringRef what, Value slotted,
                            int64_t width, Value scores, Value route,
                            ExpertDims &d) {
  if (failed(expectRank(op, what, slotted, 4)) ||
      failed(expectRank(op, "scores", scores, 3)))
    return failure();
  ArrayRef<int64_t> sl = shapeOf(slotted), sc = shapeOf(scores);
  d = {sc[0], sc[1], sc[2], sl[2]};
  if (d.k < 1 || d.k > d.e)
    return op->emitOpError()
           << what << " slots " << d.k << " must be in [1, " << d.e << "]";
  if (failed(expectShape(op, what, slotted, {d.b, d.s, d.k, width})))
    return failure();
  return route ? expectRoute(op, route, d.b, d.s, d.e, d.k) : success();
}
} // namespace

LogicalResult MoeGateUpOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "input", getInput(), 3)) ||
      failed(expectRank(op, "gate_up", getGateUp(), 3)))
    return failure();
  ArrayRef<int64_t> gu = shapeOf(getGateUp());
  ExpertDims d;
  if (failed(expectSlotted(op, "result", getResult(), gu[2], getScores(),
                           getRoute(), d)) ||
      failed(expectShape(op, "input", getInput(), {d.b, d.s, gu[1]})) ||
      failed(expectDim(op, "gate_up", getGateUp(), 0, d.e, "the experts")))
    return failure();
  return expectF32OrLike(op, "result", getResult(), getInput(), "input");
}

LogicalResult MoeDownGradOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "down", getDown(), 3)))
    return failure();
  ArrayRef<int64_t> dn = shapeOf(getDown());
  ExpertDims d;
  if (failed(expectSlotted(op, "gate_up_out", getGateUpOut(), 2 * dn[1],
                           getScores(), getRoute(), d)) ||
      failed(expectDim(op, "down", getDown(), 0, d.e, "the experts")) ||
      failed(expectShape(op, "grad", getGrad(), {d.b, d.s, dn[2]})))
    return failure();
  return expectSameType(op, "result", getResult(), "gate_up_out",
                        getGateUpOut());
}

LogicalResult MoeDownGradWeightOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "grad", getGrad(), 3)) ||
      failed(expectRank(op, "result", getResult(), 3)))
    return failure();
  ArrayRef<int64_t> w = shapeOf(getResult());
  ExpertDims d;
  if (failed(expectSlotted(op, "gate_up_out", getGateUpOut(), 2 * w[1],
                           getScores(), getRoute(), d)) ||
      failed(expectShape(op, "grad", getGrad(), {d.b, d.s, w[2]})) ||
      failed(expectDim(op, "result", getResult(), 0, d.e, "the experts")))
    return failure();
  return success();
}

LogicalResult MoeGateUpGradInputOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "gate_up", getGateUp(), 3)) ||
      failed(expectRank(op, "result", getResult(), 4)))
    return failure();
  ArrayRef<int64_t> gu = shapeOf(getGateUp());
  ExpertDims d;
  if (failed(expectSlotted(op, "grad", getGrad(), gu[2], getScores(),
                           getRoute(), d)) ||
      failed(expectDim(op, "gate_up", getGateUp(), 0, d.e, "the experts")) ||
      failed(expectShape(op, "result", getResult(), {d.b, d.s, d.k, gu[1]})))
    return failure();
  return expectF32OrLike(op, "result", getResult(), getGrad(), "grad");
}

LogicalResult MoeCombineGradOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "input", getInput(), 3)))
    return failure();
  ArrayRef<int64_t> x = shapeOf(getInput());
  ExpertDims d;
  if (failed(expectSlotted(op, "grad", getGrad(), x[2], getScores(), Value(),
                           d)) ||
      failed(expectShape(op, "input", getInput(), {d.b, d.s, x[2]})) ||
      failed(expectSameType(op, "input_grad", getInputGrad(), "input",
                            getInput())))
    return failure();
  return expectSameType(op, "scores_grad", getScoresGrad(), "scores",
                        getScores());
}

LogicalResult MoeGateUpGradWeightOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "input", getInput(), 3)) ||
      failed(expectRank(op, "result", getResult(), 3)))
    return failure();
  ArrayRef<int64_t> w = shapeOf(getResult());
  ExpertDims d;
  if (failed(expectSlotted(op, "grad", getGrad(), w[2], getScores(), getRoute(),
                           d)) ||
      failed(expectShape(op, "input", getInput(), {d.b, d.s, w[1]})) ||
      failed(expectDim(op, "result", getResult(), 0, d.e, "the experts")))
    return failure();
  return success();
}

LogicalResult EmbeddingGradOp::verify() {
  Operation *op = getOperation();
  if (failed(expectRank(op, "ids", getIds(), 2)) ||
      failed(expectRank(op, "grad", getGrad(), 3)) ||
      failed(expectRank(op, "result", getResult(), 2)))
    return failure();
  ArrayRef<int64_t> ids = shapeOf(getIds()), dy = shapeOf(getGrad());
  if (failed(expectShape(op, "grad", getGrad(), {ids[0], ids[1], dy[2]})))
    return failure();
  if (failed(expectDim(op, "result", getResult(), 1, dy[2], "the hidden size")))
    return failure();
  return verifyPaddingIdx(op, getPaddingIdx(), shapeOf(getResult())[0]);
}

#define GET_OP_CLASSES
#include "l4c/Dialect/L4/L4Ops.cpp.inc"
