//===- l4c.cpp - the l4c compiler driver ----------------------------------===//
//
// `l4c compile MODEL ...` lowers a model description to IR (and, as the
// pipeline grows, to a plan); `l4c explain MODEL` reports sizes and layer
// structure.
//
//===----------------------------------------------------------------------===//
#include "l4c/Import/Importer.h"
#include "l4c/InitAll.h"
#include "l4c/Passes/Pipelines.h"
#include "l4c/Plan/PlanWriter.h"
#include "l4c/Plan/Tuning.h"
#include "llvm/ADT/StringExtras.h"
#include "mlir/Pass/PassManager.h"
#include "io/safetensors.h"
#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/IR/DialectRegistry.h"
#include "mlir/IR/MLIRContext.h"
#include "mlir/IR/Verifier.h"
#include "llvm/Support/CommandLine.h"
#include "llvm/Support/FormatVariadic.h"
#include "llvm/Support/InitLLVM.h"
#include "llvm/Support/raw_ostream.h"
#include <map>

using namespace llvm;

static cl::SubCommand compileCmd("compile", "compile a model description");
static cl::SubCommand explainCmd("explain", "report a model's sizes and structure");

static cl::opt<std::string> modelArg(cl::Positional, cl::Required,
                                     cl::desc("<preset | config.json | checkpoint dir>"),
                                     cl::sub(compileCmd), cl::sub(explainCmd));
static cl::opt<std::string> programOpt("program", cl::init("forward"),
                                       cl::desc("forward | generate | train"),
                                       cl::sub(compileCmd));
static cl::opt<int64_t> maxBatch("max-batch", cl::init(1),
                                 cl::desc("largest batch the plan accepts"),
                                 cl::sub(compileCmd));
static cl::opt<int64_t> maxSeq("max-seq", cl::init(128),
                               cl::desc("largest sequence (KV) length"),
                               cl::sub(compileCmd));
static cl::opt<std::string> precisionOpt("precision", cl::init("f32"),
                                         cl::desc("f32 | bf16"),
                                         cl::sub(compileCmd));
static cl::opt<std::string> emitOpt(
    "emit", cl::init(""),
    cl::desc("print a stage instead of writing a plan: l4 | kernel | cuda"),
    cl::sub(compileCmd));
static cl::opt<std::string> outputOpt("o", cl::init(""),
                                      cl::desc("the plan file to write"),
                                      cl::value_desc("PLAN"),
                                      cl::sub(compileCmd));
static cl::opt<std::string> targetOpt(
    "target", cl::init("cpu"),
    cl::desc("cpu | cuda | cuda:sm_XX (cuda builds sm_90a cubins with NVRTC)"),
    cl::sub(compileCmd));
static cl::opt<bool> nvrtcStats(
    "nvrtc-stats", cl::init(false),
    cl::desc("CUDA targets: report each NVRTC program's compile time"),
    cl::sub(compileCmd));
static cl::opt<std::string> recomputeOpt(
    "recompute", cl::init("none"),
    cl::desc("train programs: none (keep every activation) | layers (keep "
             "each decoder layer's input, recompute the rest in backward)"),
    cl::sub(compileCmd));
static cl::opt<std::string> lossChunkOpt(
    "loss-chunk", cl::init("auto"),
    cl::desc("train programs: the lm_head and loss in vocabulary chunks so "
             "the full logits are never stored: auto (only when they exceed "
             "256 MiB) | none | N columns per chunk"),
    cl::sub(compileCmd));
static cl::opt<std::string> fuseOpt(
    "fuse", cl::init("all"),
    cl::desc("kernel fusions (l4c-fuse): all | none | a comma list of swiglu, "
             "epilogue, norm, rope, qkv, cache, router"),
    cl::sub(compileCmd));
static cl::opt<std::string> tuningOpt(
    "tuning", cl::init(""),
    cl::desc("CUDA targets: generate the kernels with the tile "
             "configurations these tuning files (l4-tune's; a comma list) "
             "chose for the target's arch"),
    cl::value_desc("FILE[,FILE...]"), cl::sub(compileCmd));
static cl::opt<bool> tuneCandidates(
    "tune-candidates", cl::init(false),
    cl::desc("CUDA targets: also write every other tile configuration of "
             "each tunable kernel, for l4-tune to time"),
    cl::sub(compileCmd));
static cl::opt<bool> printLocs(
    "print-locations", cl::init(false),
    cl::desc("print each op's location (its HF module path) inline"),
    cl::sub(compileCmd));
static cl::opt<int64_t> contextOpt("context", cl::init(8192),
                                   cl::desc("context length for FLOP counts"),
                                   cl::sub(explainCmd));

static int fail(const Twine &msg) {
  errs() << "l4c: error: " << msg << "\n";
  return 1;
}

static std::string withCommas(int64_t v) {
  std::string s = std::to_string(v), out;
  int n = 0;
  for (auto it = s.rbegin(); it != s.rend(); ++it) {
    if (n && n % 3 == 0 && *it != '-')
      out.push_back(',');
    out.push_back(*it);
    ++n;
  }
  return std::string(out.rbegin(), out.rend());
}

static std::string bytesStr(double b) {
  const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  return formatv("{0:F2} {1}", b, units[u]).str();
}

static int runCompile() {
  auto src = l4c::resolveModel(modelArg);
  if (!src)
    return fail(toString(src.takeError()));
  l4c::ImportOptions opts;
  auto program = l4c::parseProgram(programOpt);
  if (!program)
    return fail("--program must be forward, generate or train, got '" +
                programOpt + "'");
  auto precision = l4c::parsePrecision(precisionOpt);
  if (!precision)
    return fail("--precision must be f32 or bf16, got '" + precisionOpt + "'");
  if (emitOpt != "" && emitOpt != "l4" && emitOpt != "kernel" &&
      emitOpt != "cuda")
    return fail("--emit must be l4, kernel or cuda, got '" + emitOpt + "'");
  if (emitOpt.empty() && outputOpt.empty())
    return fail("nothing to do: give -o PLAN or --emit=l4|kernel|cuda");
  auto arch = l4c::cudaArchOf(targetOpt);
  if (!arch)
    return fail(toString(arch.takeError()));
  if (arch->empty() && (!tuningOpt.empty() || tuneCandidates))
    return fail(Twine(tuningOpt.empty() ? "--tune-candidates" : "--tuning") +
                " goes with a CUDA --target");
  std::map<std::string, std::string> tuning;
  for (StringRef file : llvm::split(StringRef(tuningOpt), ',')) {
    if (file.empty())
      continue;
    auto t = l4c::readTuningFile(file, *arch);
    if (!t)
      return fail(toString(t.takeError()));
    for (auto &[sig, config] : *t) {
      auto [it, fresh] = tuning.try_emplace(sig, config);
      if (!fresh && it->second != config)
        return fail("tuning files disagree on " + sig + ": " + it->second +
                    " and " + config + " (" + file + ")");
    }
  }
  opts.program = *program;
  opts.precision = *precision;
  opts.maxBatch = maxBatch;
  opts.maxSeq = maxSeq;

  mlir::DialectRegistry registry;
  l4c::registerAllDialects(registry);
  mlir::MLIRContext ctx(registry);
  auto module = l4c::buildModule(ctx, src->config, opts);
  if (!module)
    return fail(toString(module.takeError()));
  if (failed(mlir::verify(**module)))
    return fail("internal error: the imported module does not verify");
  mlir::OpPrintingFlags printing;
  if (printLocs)
    printing.enableDebugInfo(/*enable=*/true, /*prettyForm=*/false)
        .useLocalScope();
  if (emitOpt == "l4") {
    (*module)->print(outs(), printing);
    outs() << "\n";
    return 0;
  }

  if (recomputeOpt != "none" && recomputeOpt != "layers")
    return fail("--recompute must be none or layers, got '" + recomputeOpt +
                "'");
  if (recomputeOpt != "none" && *program != l4c::Program::Train)
    return fail("--recompute goes with --program=train");
  {
    int64_t cols = 0;
    if (lossChunkOpt != "auto" && lossChunkOpt != "none" &&
        (llvm::StringRef(lossChunkOpt).getAsInteger(10, cols) || cols <= 0))
      return fail("--loss-chunk must be auto, none or a positive column "
                  "count, got '" +
                  lossChunkOpt + "'");
    if (lossChunkOpt.getNumOccurrences() && *program != l4c::Program::Train)
      return fail("--loss-chunk goes with --program=train");
  }
  for (llvm::StringRef f : llvm::split(llvm::StringRef(fuseOpt), ','))
    if (!llvm::is_contained(
            {"all", "none", "swiglu", "epilogue", "norm", "rope", "qkv",
             "cache", "router"},
            f.trim()))
      return fail("--fuse takes all, none or a comma list of swiglu, "
                  "epilogue, norm, rope, qkv, cache and router; got '" +
                  fuseOpt + "'");
  mlir::PassManager pm(&ctx);
  l4c::LowerToKernelOptions lopts;
  lopts.recompute = recomputeOpt;
  lopts.fusions = fuseOpt;
  lopts.lossChunk = lossChunkOpt;
  l4c::buildLowerToKernelPipeline(pm, lopts);
  if (failed(pm.run(**module)))
    return fail("lowering to kernels failed");
  if (emitOpt == "kernel") {
    (*module)->print(outs(), printing);
    outs() << "\n";
  }
  l4c::PlanOptions popts;
  popts.programKind = programOpt;
  popts.target = targetOpt;
  popts.precision = precisionOpt;
  popts.maxBatch = maxBatch;
  popts.maxSeq = maxSeq;
  popts.cudaStats = nvrtcStats;
  popts.tuning = std::move(tuning);
  popts.tuneCandidates = tuneCandidates;
  if (emitOpt == "cuda")
    if (Error e = l4c::printCudaSources(**module, popts, outs()))
      return fail(toString(std::move(e)));
  if (outputOpt.empty())
    return 0;
  if (Error e = l4c::writePlan(**module, src->config, popts, outputOpt))
    return fail(toString(std::move(e)));
  if (emitOpt.empty()) {
    // The memory plan's sizes: the whole device footprint of a run is known
    // before it starts (arena = peak scratch, shared by the programs).
    auto attr = [](mlir::Operation *op, StringRef name) -> int64_t {
      auto a = op->getAttrOfType<mlir::IntegerAttr>(name);
      return a ? a.getInt() : 0;
    };
    int64_t arena = 0;
    (*module)->walk([&](mlir::func::FuncOp fn) {
      arena = std::max(arena, attr(fn, "l4c.arena_size"));
    });
    // CUDA kernels' scratch for multi-block reductions ends the arena.
    int64_t workspace = attr(**module, "l4c.cuda_workspace_size");
    if (workspace)
      arena = int64_t(llvm::alignTo(uint64_t(arena), 256)) + workspace;
    int64_t weights = attr(**module, "l4c.weights_size");
    int64_t cache = attr(**module, "l4c.cache_size");
    int64_t io = attr(**module, "l4c.io_size");
    // As the runtime allocates the regions: each rounded up to 256 bytes.
    uint64_t total = 0;
    for (int64_t r : {weights, cache, arena, io})
      total += llvm::alignTo(uint64_t(std::max<int64_t>(r, 0)), 256);
    errs() << formatv("l4c: wrote {0} ({1} program, max batch {2}, max seq "
                      "{3}); memory: weights {4}, kv cache {5}, arena {6}, "
                      "io {7}: {8} in all\n",
                      outputOpt, programOpt, int64_t(maxBatch), int64_t(maxSeq),
                      bytesStr(weights), bytesStr(cache), bytesStr(arena),
                      bytesStr(io), bytesStr(int64_t(total)));
    if (workspace)
      errs() << formatv("l4c: the arena includes {0} of CUDA kernel "
                        "workspace\n",
                        bytesStr(workspace));
  }
  return 0;
}

static int runExplain() {
  auto src = l4c::resolveModel(modelArg);
  if (!src)
    return fail(toString(src.takeError()));
  const l4c::Llama4Config &c = src->config;
  l4c::ModelCounts n = l4c::countModel(c, contextOpt);
  raw_ostream &os = outs();
  os << "model: " << c.source << "\n";
  os << formatv("  vocab {0}, hidden {1}, {2} layers, {3} heads / {4} kv heads "
                "x head_dim {5}\n",
                c.vocabSize, c.hiddenSize, c.numLayers, c.numHeads,
                c.numKvHeads, c.headDim);
  os << formatv("  {0} experts, top-{1}, expert/shared width {2}, dense MLP "
                "width {3}\n",
                c.numExperts, c.topK, c.intermediateSize, c.intermediateSizeMlp);
  os << formatv("  rope {0} (theta {1}", c.rope.type, c.rope.theta);
  if (c.rope.type == "llama3")
    os << formatv(", factor {0}, low {1}, high {2}, original {3}",
                  c.rope.factor, c.rope.lowFreqFactor, c.rope.highFreqFactor,
                  c.rope.originalMaxPositionEmbeddings);
  os << formatv("), chunk {0}, rms eps {1:e}, tied embeddings {2}\n",
                c.attentionChunkSize, c.rmsNormEps,
                c.tieWordEmbeddings ? "yes" : "no");
  os << "parameters:\n";
  os << "  total            " << withCommas(n.totalParams) << "\n";
  os << "  active per token " << withCommas(n.activeParams)
     << " (embedding table excluded)\n";

  os << "weight bytes:\n";
  if (!src->checkpointDir.empty()) {
    l4c::io::Checkpoint ckpt;
    if (auto st = l4c::io::Checkpoint::open(src->checkpointDir, ckpt, true);
        !st.ok())
      return fail(st.error);
    std::map<std::string, double> perType;
    for (const auto &e : ckpt.entries())
      perType[l4c::io::dtypeName(e.info->dtype)] +=
          double(e.info->end - e.info->begin);
    for (const auto &[t, bytes] : perType)
      os << formatv("  {0,-5} {1} (checkpoint)\n", t, bytesStr(bytes));
  } else {
    os << formatv("  F32   {0}\n  BF16  {1}\n", bytesStr(4.0 * n.totalParams),
                  bytesStr(2.0 * n.totalParams));
  }
  os << formatv("flops per token at context {0}:\n", int64_t(contextOpt));
  os << formatv("  forward  {0:F3} GFLOP\n  training {1:F3} GFLOP\n",
                n.forwardFlopsPerToken / 1e9, n.trainFlopsPerToken / 1e9);

  os << "layers:\n  layer  ffn                          attention          "
        "rope  qk-norm  temperature\n";
  for (int64_t i = 0; i < c.numLayers; ++i) {
    std::string ffn =
        c.isMoe(i) ? formatv("moe {0}x top-{1} + shared", c.numExperts, c.topK)
                         .str()
                   : formatv("dense {0}", c.intermediateSizeMlp).str();
    std::string attn =
        c.isChunked(i) ? formatv("chunked {0}", c.attentionChunkSize).str()
                       : std::string("global");
    os << formatv("  {0,5}  {1,-27}  {2,-17}  {3,-4}  {4,-7}  {5}\n", i, ffn,
                  attn, c.usesRope(i) ? "yes" : "no",
                  c.hasQkNorm(i) ? "yes" : "no",
                  c.hasTemperature(i) ? "yes" : "no");
  }
  return 0;
}

int main(int argc, char **argv) {
  InitLLVM init(argc, argv);
  // The LLVM and MLIR libraries register hundreds of top-level options
  // (code generation flags of every backend); none concerns an l4c user,
  // so `l4c --help` lists only the subcommands and the help options.
  for (auto &entry : cl::getRegisteredOptions(cl::SubCommand::getTopLevel()))
    if (!entry.first.starts_with("help") && entry.first != "version")
      entry.second->setHiddenFlag(cl::ReallyHidden);
  cl::ParseCommandLineOptions(argc, argv, "l4c: the Llama 4 compiler\n");
  if (compileCmd)
    return runCompile();
  if (explainCmd)
    return runExplain();
  errs() << "l4c: expected a command: compile or explain (see l4c --help)\n";
  return 1;
}
