//===- Importer.cpp - model description -> l4 IR -------------------------===//
//
// Builds the l4 module for a Llama 4 config, one op per step of HF's
// Llama4ForCausalLM, and checks checkpoints against the config.
//
//===----------------------------------------------------------------------===//
#include "l4c/Import/Importer.h"
#include "l4c/Dialect/L4/L4Ops.h"
#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/IR/Builders.h"
#include "mlir/IR/BuiltinTypes.h"
#include "llvm/ADT/StringMap.h"
#include "llvm/Support/FileSystem.h"
#include "llvm/Support/FormatVariadic.h"
#include "llvm/Support/Path.h"
#include "io/safetensors.h"
#include <cmath>
#include <map>

using namespace mlir;
using llvm::createStringError;
using llvm::formatv;

namespace l4c {

llvm::StringRef programName(Program p) {
  switch (p) {
  case Program::Forward:
    return "forward";
  case Program::Generate:
    return "generate";
  case Program::Train:
    return "train";
  }
  return "";
}

std::optional<Program> parseProgram(llvm::StringRef s) {
  if (s == "forward")
    return Program::Forward;
  if (s == "generate")
    return Program::Generate;
  if (s == "train")
    return Program::Train;
  return std::nullopt;
}

std::optional<Precision> parsePrecision(llvm::StringRef s) {
  if (s == "f32")
    return Precision::F32;
  if (s == "bf16")
    return Precision::BF16;
  return std::nullopt;
}

//===----------------------------------------------------------------------===//
// Resolving and checking model descriptions
//===----------------------------------------------------------------------===//

static std::string shapeStr(llvm::ArrayRef<int64_t> s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i)
    r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

/// Name of a checkpoint tensor as Llama4ForCausalLM sees it; empty when the
/// tensor belongs to the vision side of a multimodal checkpoint.
static std::string textModelName(llvm::StringRef name) {
  if (name.starts_with("vision_model.") ||
      name.starts_with("multi_modal_projector."))
    return "";
  name.consume_front("language_model.");
  return name.str();
}

llvm::Error checkCheckpoint(const Llama4Config &c, llvm::StringRef dir) {
  io::Checkpoint ckpt;
  if (io::Status st = io::Checkpoint::open(dir.str(), ckpt, /*headerOnly=*/true);
      !st.ok())
    return createStringError(st.error);

  std::map<std::string, const io::TensorInfo *> have;
  for (const io::Checkpoint::Entry &e : ckpt.entries()) {
    std::string name = textModelName(e.info->name);
    if (!name.empty())
      have[name] = e.info;
  }

  std::vector<std::string> problems;
  std::map<std::string, bool> expected;
  for (const ParamSpec &p : parameterList(c)) {
    expected[p.name] = true;
    auto it = have.find(p.name);
    if (it == have.end()) {
      problems.push_back(formatv("missing tensor '{0}' (expected shape {1})",
                                 p.name, shapeStr(p.shape)));
      continue;
    }
    const io::TensorInfo *t = it->second;
    if (t->shape != p.shape)
      problems.push_back(formatv("tensor '{0}' has shape {1}, expected {2}",
                                 p.name, shapeStr(t->shape), shapeStr(p.shape)));
    if (t->dtype != io::DType::F32 && t->dtype != io::DType::BF16 &&
        t->dtype != io::DType::F16)
      problems.push_back(formatv("tensor '{0}' has dtype {1}; weights must be "
                                 "F32, BF16 or F16",
                                 p.name, io::dtypeName(t->dtype)));
  }
  for (const auto &[name, info] : have)
    if (!expected.count(name))
      problems.push_back(formatv("unexpected tensor '{0}' (shape {1})", name,
                                 shapeStr(info->shape)));
  if (problems.empty())
    return llvm::Error::success();
  std::string msg = formatv("{0}: checkpoint does not match config.json ({1} "
                            "problem{2})",
                            dir, problems.size(),
                            problems.size() == 1 ? "" : "s");
  for (const std::string &p : problems)
    msg += "\n  " + p;
  return createStringError(msg);
}

llvm::Expected<ModelSource> resolveModel(llvm::StringRef spec) {
  ModelSource src;
  if (!llvm::sys::fs::exists(spec)) {
    auto preset = presetConfig(spec);
    if (!preset)
      return createStringError(
          formatv("'{0}' is neither a file, a directory nor a preset ({1})",
                  spec, llvm::toString(preset.takeError())));
    src.config = std::move(*preset);
    return src;
  }
  auto config = loadConfigFile(spec);
  if (!config)
    return config.takeError();
  src.config = std::move(*config);
  if (llvm::sys::fs::is_directory(spec)) {
    llvm::SmallString<256> single(spec), index(spec);
    llvm::sys::path::append(single, "model.safetensors");
    llvm::sys::path::append(index, "model.safetensors.index.json");
    if (llvm::sys::fs::exists(single) || llvm::sys::fs::exists(index)) {
      if (llvm::Error e = checkCheckpoint(src.config, spec))
        return std::move(e);
      src.checkpointDir = spec.str();
    }
  }
  return src;
}

//===----------------------------------------------------------------------===//
// Building the l4 module
//===----------------------------------------------------------------------===//

namespace {

/// Builds one function of the model. Weights become arguments, created on
/// first use and named by their HF tensor name.
class ModelBuilder {
public:
  ModelBuilder(MLIRContext &ctx, const Llama4Config &c, const ImportOptions &o)
      : ctx(ctx), c(c), opts(o), b(&ctx) {
    elt = opts.precision == Precision::BF16 ? Type(b.getBF16Type())
                                            : Type(b.getF32Type());
    ids = b.getI64Type();
  }

  enum class Kind { Forward, Prefill, Decode, Train };
  func::FuncOp build(ModuleOp module, StringRef name, Kind kind);

private:
  RankedTensorType tensor(ArrayRef<int64_t> shape, Type t = {}) {
    return RankedTensorType::get(shape, t ? t : elt);
  }
  Location loc(const Twine &name) {
    return NameLoc::get(b.getStringAttr(name));
  }
  Value weight(const std::string &name);
  Value linear(Value x, const std::string &w, int64_t out, const Twine &where);
  Value reshape(Value x, ArrayRef<int64_t> shape, const Twine &where);
  Value mlp(Value x, const std::string &prefix, int64_t width);
  Value attention(Value h, int64_t layer);
  Value feedForward(Value h, int64_t layer);

  MLIRContext &ctx;
  const Llama4Config &c;
  const ImportOptions &opts;
  OpBuilder b;
  Type elt, ids;
  Kind kind = Kind::Forward;
  int64_t batch = 0, seq = 0;
  Block *entry = nullptr;
  Value positions;
  llvm::StringMap<Value> weights;
  /// Per layer, the incoming and updated k/v caches (generate only).
  SmallVector<Value> cacheIn, cacheOut;
  SmallVector<std::string> cacheNames;
  std::map<std::string, std::vector<int64_t>> paramShapes;
};

Value ModelBuilder::weight(const std::string &name) {
  auto it = weights.find(name);
  if (it != weights.end())
    return it->second;
  auto shape = paramShapes.find(name);
  assert(shape != paramShapes.end() && "weight not in the parameter list");
  Value arg = entry->addArgument(tensor(shape->second), loc(name));
  weights[name] = arg;
  return arg;
}

Value ModelBuilder::linear(Value x, const std::string &w, int64_t out,
                           const Twine &where) {
  auto xt = cast<RankedTensorType>(x.getType());
  SmallVector<int64_t> shape(xt.getShape().drop_back());
  shape.push_back(out);
  return l4::LinearOp::create(b, loc(where), tensor(shape), x, weight(w));
}

Value ModelBuilder::reshape(Value x, ArrayRef<int64_t> shape,
                            const Twine &where) {
  return l4::ReshapeOp::create(b, loc(where), tensor(shape), x);
}

Value ModelBuilder::mlp(Value x, const std::string &prefix, int64_t width) {
  int64_t d = c.hiddenSize;
  Value gate = linear(x, prefix + "gate_proj.weight", width, prefix + "gate_proj");
  Value up = linear(x, prefix + "up_proj.weight", width, prefix + "up_proj");
  Value act = l4::SwigluOp::create(b, loc(prefix + "act"), gate, up);
  return linear(act, prefix + "down_proj.weight", d, prefix + "down_proj");
}

Value ModelBuilder::attention(Value x, int64_t i) {
  std::string p = formatv("model.layers.{0}.self_attn.", i);
  int64_t h = c.numHeads, hkv = c.numKvHeads, d = c.headDim;
  Value q = reshape(linear(x, p + "q_proj.weight", h * d, p + "q_proj"),
                    {batch, seq, h, d}, p + "q");
  Value k = reshape(linear(x, p + "k_proj.weight", hkv * d, p + "k_proj"),
                    {batch, seq, hkv, d}, p + "k");
  Value v = reshape(linear(x, p + "v_proj.weight", hkv * d, p + "v_proj"),
                    {batch, seq, hkv, d}, p + "v");
  if (c.usesRope(i)) {
    const RopeConfig &r = c.rope;
    bool llama3 = r.type == "llama3";
    auto rope = [&](Value t, StringRef what) -> Value {
      return l4::RopeOp::create(
          b, loc(p + what), t.getType(), t, positions,
          b.getF64FloatAttr(r.theta),
          l4::RopeScalingAttr::get(&ctx, llama3 ? l4::RopeScaling::llama3
                                                : l4::RopeScaling::none),
          b.getF64FloatAttr(llama3 ? r.factor : 1.0),
          b.getF64FloatAttr(llama3 ? r.lowFreqFactor : 1.0),
          b.getF64FloatAttr(llama3 ? r.highFreqFactor : 1.0),
          b.getI64IntegerAttr(llama3 ? r.originalMaxPositionEmbeddings : 0));
    };
    q = rope(q, "q_rope");
    k = rope(k, "k_rope");
  }
  if (c.hasQkNorm(i)) {
    q = l4::L2NormOp::create(b, loc(p + "q_norm"), q,
                             b.getF64FloatAttr(c.rmsNormEps));
    k = l4::L2NormOp::create(b, loc(p + "k_norm"), k,
                             b.getF64FloatAttr(c.rmsNormEps));
  }
  if (c.hasTemperature(i))
    q = l4::TemperatureScaleOp::create(b, loc(p + "temperature"), q.getType(),
                                       q, positions,
                                       b.getF64FloatAttr(c.floorScale),
                                       b.getF64FloatAttr(c.attnScale));
  if (kind == Kind::Prefill || kind == Kind::Decode) {
    Value kc = cacheIn[2 * i], vc = cacheIn[2 * i + 1];
    k = l4::KvCacheUpdateOp::create(b, loc(p + "k_cache"), kc.getType(), kc, k,
                                    positions);
    v = l4::KvCacheUpdateOp::create(b, loc(p + "v_cache"), vc.getType(), vc, v,
                                    positions);
    cacheOut[2 * i] = k;
    cacheOut[2 * i + 1] = v;
  }
  int64_t chunk = c.isChunked(i) ? c.attentionChunkSize : 0;
  Value o = l4::AttentionOp::create(b, loc(p + "attention"), q.getType(), q, k,
                                    v, positions,
                                    b.getF64FloatAttr(1.0 / std::sqrt(double(d))),
                                    b.getI64IntegerAttr(chunk));
  o = reshape(o, {batch, seq, h * d}, p + "merge_heads");
  return linear(o, p + "o_proj.weight", c.hiddenSize, p + "o_proj");
}

Value ModelBuilder::feedForward(Value x, int64_t i) {
  std::string p = formatv("model.layers.{0}.feed_forward.", i);
  if (!c.isMoe(i))
    return mlp(x, p, c.intermediateSizeMlp);
  Value logits = linear(x, p + "router.weight", c.numExperts, p + "router");
  Value scores = l4::RouterScoresOp::create(b, loc(p + "router_scores"), logits,
                                            b.getI64IntegerAttr(c.topK));
  Value routed = l4::MoeExpertsOp::create(
      b, loc(p + "experts"), x.getType(), x, scores,
      weight(p + "experts.gate_up_proj"), weight(p + "experts.down_proj"));
  Value shared = mlp(x, p + "shared_expert.", c.intermediateSize);
  return l4::AddOp::create(b, loc(p + "combine"), shared, routed);
}

func::FuncOp ModelBuilder::build(ModuleOp module, StringRef name, Kind k) {
  kind = k;
  batch = opts.maxBatch;
  seq = k == Kind::Decode ? 1 : opts.maxSeq;
  weights.clear();
  for (const ParamSpec &p : parameterList(c))
    paramShapes[p.name] = p.shape;

  b.setInsertionPointToEnd(module.getBody());
  auto fn = func::FuncOp::create(b, loc(name), name, b.getFunctionType({}, {}));
  entry = fn.addEntryBlock();
  b.setInsertionPointToStart(entry);

  Value input = entry->addArgument(tensor({batch, seq}, ids), loc("input_ids"));
  positions = entry->addArgument(tensor({batch, seq}, ids), loc("positions"));
  cacheIn.clear();
  cacheNames.clear();
  if (k == Kind::Prefill || k == Kind::Decode) {
    auto cacheType = tensor({batch, opts.maxSeq, c.numKvHeads, c.headDim});
    for (int64_t i = 0; i < c.numLayers; ++i)
      for (const char *kv : {"k", "v"}) {
        cacheNames.push_back(formatv("layers.{0}.{1}", i, kv));
        cacheIn.push_back(entry->addArgument(cacheType, loc(cacheNames.back())));
      }
  }
  cacheOut.assign(cacheIn.size(), Value());

  // pad_token_id is nn.Embedding's padding_idx: it rides on the lookup so
  // that l4c-autodiff can drop that row from the lookup's gradient.
  IntegerAttr paddingIdx =
      c.padTokenId ? b.getI64IntegerAttr(*c.padTokenId) : IntegerAttr();
  Value h = l4::EmbeddingOp::create(
      b, loc("model.embed_tokens"), tensor({batch, seq, c.hiddenSize}),
      weight("model.embed_tokens.weight"), input, paddingIdx);
  for (int64_t i = 0; i < c.numLayers; ++i) {
    std::string p = formatv("model.layers.{0}.", i);
    auto eps = b.getF64FloatAttr(c.rmsNormEps);
    Value x = l4::RmsNormOp::create(b, loc(p + "input_layernorm"), h.getType(),
                                    h, weight(p + "input_layernorm.weight"), eps);
    h = l4::AddOp::create(b, loc(p + "attn_residual"), h, attention(x, i));
    x = l4::RmsNormOp::create(b, loc(p + "post_attention_layernorm"),
                              h.getType(), h,
                              weight(p + "post_attention_layernorm.weight"), eps);
    h = l4::AddOp::create(b, loc(p + "ffn_residual"), h, feedForward(x, i));
  }
  // Prefill keeps the last token only; the norm is per row, so taking the
  // row first normalises one row instead of S (and lets the norm join the
  // vocabulary projection as a prologue).
  if (k == Kind::Prefill)
    h = l4::TakeLastOp::create(b, loc("last_token"),
                               tensor({batch, 1, c.hiddenSize}), h);
  h = l4::RmsNormOp::create(b, loc("model.norm"), h.getType(), h,
                            weight("model.norm.weight"),
                            b.getF64FloatAttr(c.rmsNormEps));
  std::string head =
      c.tieWordEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  Value logits = linear(h, head, c.vocabSize, "lm_head");
  if (k == Kind::Train)
    logits = l4::CrossEntropyOp::create(
        b, loc("loss"), RankedTensorType::get({}, b.getF32Type()), logits,
        input);

  SmallVector<Value> results{logits};
  results.append(cacheOut.begin(), cacheOut.end());
  func::ReturnOp::create(b, loc("return"), results);
  fn.setType(b.getFunctionType(entry->getArgumentTypes(),
                               ValueRange(results).getTypes()));

  // Name every argument and result for the plan and for readers of the IR.
  fn.setArgAttr(0, l4::kInputAttr, b.getStringAttr("input_ids"));
  fn.setArgAttr(1, l4::kInputAttr, b.getStringAttr("positions"));
  for (size_t i = 0; i < cacheNames.size(); ++i) {
    fn.setArgAttr(2 + i, l4::kCacheAttr, b.getStringAttr(cacheNames[i]));
    fn.setResultAttr(1 + i, l4::kCacheAttr, b.getStringAttr(cacheNames[i]));
  }
  for (const auto &entryW : weights) {
    auto arg = cast<BlockArgument>(entryW.second);
    fn.setArgAttr(arg.getArgNumber(), l4::kWeightAttr,
                  b.getStringAttr(entryW.first()));
  }
  fn.setResultAttr(0, l4::kOutputAttr,
                   b.getStringAttr(k == Kind::Train ? "loss" : "logits"));
  if (k == Kind::Train)
    fn->setAttr("l4.autodiff", b.getUnitAttr());
  return fn;
}

} // namespace

llvm::Expected<OwningOpRef<ModuleOp>>
buildModule(MLIRContext &ctx, const Llama4Config &c, const ImportOptions &opts) {
  if (opts.maxBatch < 1)
    return createStringError(formatv("--max-batch must be >= 1, got {0}",
                                     opts.maxBatch));
  if (opts.maxSeq < 1)
    return createStringError(formatv("--max-seq must be >= 1, got {0}",
                                     opts.maxSeq));
  if (opts.program == Program::Train && c.attentionDropout != 0)
    return createStringError(formatv(
        "{0}: attention_dropout {1} is not supported for training (l4c "
        "trains without dropout)",
        c.source, c.attentionDropout));
  ctx.loadDialect<l4::L4Dialect, func::FuncDialect>();
  OpBuilder b(&ctx);
  OwningOpRef<ModuleOp> module = ModuleOp::create(b.getUnknownLoc());
  (*module)->setAttr("l4.source", b.getStringAttr(c.source));
  (*module)->setAttr("l4.program", b.getStringAttr(programName(opts.program)));
  ModelBuilder mb(ctx, c, opts);
  if (opts.program == Program::Forward) {
    mb.build(*module, "forward", ModelBuilder::Kind::Forward);
  } else if (opts.program == Program::Train) {
    mb.build(*module, "train_step", ModelBuilder::Kind::Train);
  } else {
    mb.build(*module, "prefill", ModelBuilder::Kind::Prefill);
    mb.build(*module, "decode", ModelBuilder::Kind::Decode);
  }
  return module;
}

} // namespace l4c
