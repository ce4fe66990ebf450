//===- PlanWriter.cpp - kernel IR -> FlatBuffers plan ---------------------===//
//
// Walks each function of a kernel-level module in order: arguments and
// values become buffers at their planned offsets, kernel.groups become
// kernels with their l4 ops as the semantic op list, functions programs.
// CUDA targets add generated source and NVRTC cubins to every kernel.
//
//===----------------------------------------------------------------------===//
#include "l4c/Plan/PlanWriter.h"
#include "llvm/ADT/StringExtras.h"
#include "l4c/Dialect/Kernel/KernelOps.h"
#include "l4c/Dialect/L4/L4Ops.h"
#include "l4c/Passes/MemoryPlan.h"
#include "l4c/Target/Cuda/CudaEmitter.h"
#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "llvm/ADT/MapVector.h"
#include "llvm/ADT/StringMap.h"
#include "llvm/Support/FormatVariadic.h"
#include "llvm/Support/ThreadPool.h"
#include "llvm/Support/Threading.h"
#include "cuda/nvrtc.h"
#include "io/safetensors.h"
#include "l4c/runtime/plan_generated.h"
#include <chrono>
#include <optional>

using namespace mlir;
namespace fb = flatbuffers;
namespace pl = l4c::plan;

namespace l4c {
namespace {

FailureOr<pl::DType> dtypeOf(Type t) {
  Type e = cast<RankedTensorType>(t).getElementType();
  if (e.isF32())
    return pl::DType::F32;
  if (e.isBF16())
    return pl::DType::BF16;
  if (e.isF16())
    return pl::DType::F16;
  if (e.isInteger(64))
    return pl::DType::I64;
  if (e.isInteger(32))
    return pl::DType::I32;
  return failure();
}

pl::Region regionOf(MemRegion r) {
  switch (r) {
  case MemRegion::Arena:
    return pl::Region::Arena;
  case MemRegion::Weights:
    return pl::Region::Weights;
  case MemRegion::Cache:
    return pl::Region::Cache;
  case MemRegion::Io:
    return pl::Region::Io;
  }
  return pl::Region::Arena;
}

pl::DimKind dimOf(DimKind d) {
  switch (d) {
  case DimKind::Static:
    return pl::DimKind::Static;
  case DimKind::Batch:
    return pl::DimKind::Batch;
  case DimKind::Seq:
    return pl::DimKind::Seq;
  }
  return pl::DimKind::Static;
}

/// A kernel whose table is built once its cubin exists.
struct PendingKernel {
  fb::Offset<fb::String> name, kind;
  fb::Offset<fb::Vector<fb::Offset<pl::SemanticOp>>> ops;
  fb::Offset<fb::Vector<uint32_t>> temps;
  std::optional<CudaKernel> cuda;
  std::string program; ///< the function it belongs to (for --emit=cuda)
  /// Tunable kernels: the name of the default configuration's body, which
  /// tuning files key their choices by.
  std::string signature;
  int32_t alternativeOf = -1; ///< a candidate: the kernel it could replace
};

class Writer {
public:
  /// `emitCuda`: generate CUDA source for every kernel, with the tile
  /// configurations `opts.tuning` chooses (and, with
  /// `opts.tuneCandidates`, the others as candidates) for `arch`.
  Writer(const ModuleMemoryPlan &mem, bool emitCuda, llvm::StringRef arch,
         const PlanOptions &opts)
      : mem(mem), emitCuda(emitCuda), arch(arch), opts(opts) {}
  LogicalResult addFunction(func::FuncOp fn);
  llvm::Expected<std::string> finish(const Llama4Config &c,
                                     const PlanOptions &opts,
                                     llvm::StringRef arch);
  llvm::ArrayRef<PendingKernel> pending() const { return kernels; }
  /// CUDA kernels' scratch (multi-block reductions) sits past every planned
  /// value of the arena, so the arena size stays the exact device bound.
  uint64_t workspaceOffset() const { return llvm::alignTo(mem.arenaSize, 256); }
  /// The largest scratch any kernel needs (0 when none does).
  uint64_t workspace() const { return workspaceSize; }
  uint64_t arenaSize() const {
    return workspaceSize ? workspaceOffset() + workspaceSize : mem.arenaSize;
  }
  /// The error of a failed CUDA emission, if any.
  llvm::Error takeCudaError() {
    if (cudaError.empty())
      return llvm::Error::success();
    return llvm::createStringError(cudaError);
  }

private:
  FailureOr<uint32_t> buffer(Value v, const FunctionMemoryPlan &f,
                             StringRef name);
  LogicalResult addKernel(kernel::GroupOp g, const FunctionMemoryPlan &f,
                          DenseMap<Value, uint32_t> &bufs);
  FailureOr<CudaBuffer> cudaBuffer(Value v, const FunctionMemoryPlan &f);
  /// Compiles each distinct body with the entries of its kernels, in
  /// parallel; fills the program source and cubin of each body.
  llvm::Error compileCuda(llvm::StringRef arch, bool stats,
                          llvm::StringMap<std::vector<uint8_t>> &cubins,
                          llvm::StringMap<std::string> &sources,
                          std::string &options);

  const ModuleMemoryPlan &mem;
  bool emitCuda;
  /// The GPU architecture kernels are generated for (sm_90a for the cpu
  /// target, whose --emit=cuda shows them).
  std::string arch;
  const PlanOptions &opts;
  uint64_t workspaceSize = 0;
  std::string cudaError;
  StringRef currentFunction;
  fb::FlatBufferBuilder fbb{1 << 16};
  std::vector<fb::Offset<pl::Buffer>> buffers;
  std::vector<fb::Offset<pl::WeightBinding>> weights;
  std::vector<PendingKernel> kernels;
  /// Other tile configurations of the kernels (--tune-candidates), written
  /// after every kernel a program runs.
  std::vector<PendingKernel> candidates;
  std::vector<fb::Offset<pl::Program>> programs;
  llvm::StringMap<uint32_t> sharedBuffers; ///< weights and caches by name
};

FailureOr<CudaBuffer> Writer::cudaBuffer(Value v, const FunctionMemoryPlan &f) {
  auto slot = f.slots.find(v);
  auto dims = f.dims.find(v);
  if (slot == f.slots.end() || dims == f.dims.end())
    return failure();
  auto type = cast<RankedTensorType>(v.getType());
  CudaBuffer b;
  b.region = slot->second.region;
  b.offset = slot->second.offset;
  b.shape.assign(type.getShape().begin(), type.getShape().end());
  b.dims.assign(dims->second.begin(), dims->second.end());
  b.elementType = type.getElementType();
  return b;
}

FailureOr<uint32_t> Writer::buffer(Value v, const FunctionMemoryPlan &f,
                                   StringRef name) {
  auto slot = f.slots.find(v);
  auto dims = f.dims.find(v);
  if (slot == f.slots.end() || dims == f.dims.end())
    return failure();
  auto dtype = dtypeOf(v.getType());
  if (failed(dtype))
    return failure();
  auto shape = cast<RankedTensorType>(v.getType()).getShape();
  std::vector<pl::DimKind> dk;
  for (DimKind d : dims->second)
    dk.push_back(dimOf(d));
  auto nameOff = fbb.CreateString(name.str());
  auto shapeOff = fbb.CreateVector(std::vector<int64_t>(shape.begin(), shape.end()));
  auto dimsOff = fbb.CreateVector(dk);
  buffers.push_back(pl::CreateBuffer(fbb, nameOff, regionOf(slot->second.region),
                                     slot->second.offset, slot->second.size,
                                     *dtype, shapeOff, dimsOff));
  return uint32_t(buffers.size() - 1);
}

static fb::Offset<pl::Attr> makeAttr(fb::FlatBufferBuilder &fbb,
                                     NamedAttribute a) {
  auto name = fbb.CreateString(a.getName().str());
  // BoolAttr is an i1 IntegerAttr whose getInt() would give -1 for true.
  if (auto flag = dyn_cast<BoolAttr>(a.getValue()))
    return pl::CreateAttr(fbb, name, pl::AttrKind::Int, flag.getValue());
  if (auto f = dyn_cast<FloatAttr>(a.getValue()))
    return pl::CreateAttr(fbb, name, pl::AttrKind::Float, 0,
                          f.getValueAsDouble());
  if (auto i = dyn_cast<IntegerAttr>(a.getValue()))
    return pl::CreateAttr(fbb, name, pl::AttrKind::Int, i.getInt());
  std::string s;
  if (auto str = dyn_cast<StringAttr>(a.getValue()))
    s = str.getValue().str();
  else if (auto r = dyn_cast<l4::RopeScalingAttr>(a.getValue()))
    s = l4::stringifyRopeScaling(r.getValue()).str();
  auto sOff = fbb.CreateString(s);
  return pl::CreateAttr(fbb, name, pl::AttrKind::String, 0, 0.0, sOff);
}

LogicalResult Writer::addKernel(kernel::GroupOp g, const FunctionMemoryPlan &f,
                                DenseMap<Value, uint32_t> &bufs) {
  Block &body = g.getBody().front();
  auto yield = cast<kernel::YieldOp>(body.getTerminator());
  // Inside the group, block arguments stand for the group's inputs and
  // yielded values for its results.
  DenseMap<Value, uint32_t> local;
  for (auto [arg, in] : llvm::zip(body.getArguments(), g.getInputs()))
    local[arg] = bufs.lookup(in);
  for (auto [i, res] : llvm::enumerate(g.getResults())) {
    std::string name = g.getName().str();
    if (g.getNumResults() > 1)
      name += "#" + std::to_string(i);
    auto idx = buffer(res, f, name);
    if (failed(idx))
      return g.emitOpError() << "result " << i << " has no memory slot";
    bufs[res] = *idx;
    local[yield.getValues()[i]] = *idx;
  }
  std::vector<fb::Offset<pl::SemanticOp>> ops;
  std::vector<uint32_t> temps;
  for (Operation &op : body.without_terminator()) {
    std::vector<uint32_t> operands, results;
    for (Value v : op.getOperands()) {
      auto it = local.find(v);
      if (it == local.end())
        return op.emitOpError() << "operand has no buffer";
      operands.push_back(it->second);
    }
    for (Value v : op.getResults()) {
      auto it = local.find(v);
      if (it == local.end()) {
        // A value the fused kernel consumes itself.
        auto idx = buffer(v, f,
                          (g.getName() + ".t" + Twine(temps.size())).str());
        if (failed(idx))
          return op.emitOpError() << "intermediate result has no memory slot";
        it = local.try_emplace(v, *idx).first;
        temps.push_back(*idx);
      }
      results.push_back(it->second);
    }
    std::vector<fb::Offset<pl::Attr>> attrs;
    for (NamedAttribute a : op.getAttrs())
      attrs.push_back(makeAttr(fbb, a));
    ops.push_back(pl::CreateSemanticOp(
        fbb, fbb.CreateString(op.getName().stripDialect().str()),
        fbb.CreateVector(attrs), fbb.CreateVector(operands),
        fbb.CreateVector(results)));
  }
  PendingKernel k;
  k.name = fbb.CreateString(g.getName().str());
  k.kind = fbb.CreateString(g.getKind().str());
  k.ops = fbb.CreateVector(ops);
  k.temps = fbb.CreateVector(temps);
  k.program = currentFunction.str();
  if (emitCuda) {
    SmallVector<CudaBuffer> ins, outs;
    for (Value v : g.getInputs()) {
      auto b = cudaBuffer(v, f);
      if (failed(b))
        return g.emitOpError() << "operand has no memory slot";
      ins.push_back(std::move(*b));
    }
    for (Value v : g.getResults()) {
      auto b = cudaBuffer(v, f);
      if (failed(b))
        return g.emitOpError() << "result has no memory slot";
      outs.push_back(std::move(*b));
    }
    std::string entry = cudaEntryName(kernels.size(), g.getName());
    auto emit = [&](StringRef config,
                    StringRef entryName) -> FailureOr<CudaKernel> {
      auto cuda = emitCudaKernel(g, ins, outs, entryName, workspaceOffset(),
                                 config, arch);
      if (!cuda) {
        cudaError = toString(cuda.takeError());
        return failure();
      }
      workspaceSize = std::max(workspaceSize, cuda->workspaceBytes);
      return std::move(*cuda);
    };
    FailureOr<CudaKernel> cuda = emit("", entry);
    if (failed(cuda))
      return failure();
    if (!cuda->configs.empty()) {
      k.signature = cuda->bodyName;
      auto tuned = opts.tuning.find(k.signature);
      if (tuned != opts.tuning.end() && tuned->second != cuda->config) {
        cuda = emit(tuned->second, entry);
        if (failed(cuda)) {
          cudaError = "the tuning file's choice for " + k.signature + ": " +
                      cudaError;
          return failure();
        }
      }
    }
    if (opts.tuneCandidates)
      for (const std::string &config : cuda->configs) {
        if (config == cuda->config)
          continue;
        FailureOr<CudaKernel> alt = emit(config, entry + "_" + config);
        if (failed(alt))
          return failure();
        PendingKernel c = k;
        c.cuda = std::move(*alt);
        c.alternativeOf = int32_t(kernels.size());
        candidates.push_back(std::move(c));
      }
    k.cuda = std::move(*cuda);
  }
  kernels.push_back(std::move(k));
  return success();
}

LogicalResult Writer::addFunction(func::FuncOp fn) {
  const FunctionMemoryPlan &f = mem.functions.lookup(fn.getSymName());
  currentFunction = fn.getSymName();
  Block &body = fn.getBody().front();
  DenseMap<Value, uint32_t> bufs;
  std::vector<fb::Offset<pl::IoBinding>> inputs, outputs;

  for (BlockArgument arg : body.getArguments()) {
    unsigned i = arg.getArgNumber();
    auto weight = fn.getArgAttrOfType<StringAttr>(i, "l4.weight");
    auto cache = fn.getArgAttrOfType<StringAttr>(i, "l4.kv_cache");
    auto input = fn.getArgAttrOfType<StringAttr>(i, "l4.input");
    StringAttr name = weight ? weight : cache ? cache : input;
    if (!name)
      return fn.emitOpError() << "argument " << i
                              << " is neither a weight, a cache nor an input";
    if (weight || cache) {
      std::string key = (weight ? "w:" : "c:") + name.getValue().str();
      auto it = sharedBuffers.find(key);
      if (it != sharedBuffers.end()) {
        bufs[arg] = it->second;
        continue;
      }
    }
    auto idx = buffer(arg, f, name.getValue());
    if (failed(idx))
      return fn.emitOpError() << "argument " << i << " cannot be placed";
    bufs[arg] = *idx;
    if (weight) {
      sharedBuffers["w:" + name.getValue().str()] = *idx;
      weights.push_back(pl::CreateWeightBinding(
          fbb, *idx, fbb.CreateString(name.getValue().str())));
    } else if (cache) {
      sharedBuffers["c:" + name.getValue().str()] = *idx;
    } else {
      inputs.push_back(pl::CreateIoBinding(
          fbb, fbb.CreateString(name.getValue().str()), *idx));
    }
  }

  std::vector<uint32_t> steps;
  for (Operation &op : body.without_terminator()) {
    if (isa<l4::ReshapeOp, l4::SliceRowsOp, l4::ConcatRowsOp>(op)) {
      auto idx = buffer(op.getResult(0), f, "view");
      if (failed(idx))
        return op.emitOpError() << "has no memory slot";
      bufs[op.getResult(0)] = *idx;
      continue;
    }
    auto g = dyn_cast<kernel::GroupOp>(op);
    if (!g)
      return op.emitOpError() << "cannot be written to a plan; expected "
                                 "kernel.group or a view";
    if (failed(addKernel(g, f, bufs)))
      return failure();
    steps.push_back(kernels.size() - 1);
  }

  auto ret = cast<func::ReturnOp>(body.getTerminator());
  for (auto [i, v] : llvm::enumerate(ret.getOperands()))
    if (auto out = fn.getResultAttrOfType<StringAttr>(i, "l4.output"))
      outputs.push_back(pl::CreateIoBinding(
          fbb, fbb.CreateString(out.getValue().str()), bufs.lookup(v)));

  programs.push_back(pl::CreateProgram(
      fbb, fbb.CreateString(fn.getSymName().str()), fbb.CreateVector(inputs),
      fbb.CreateVector(outputs), fbb.CreateVector(steps)));
  return success();
}

llvm::Error Writer::compileCuda(llvm::StringRef arch, bool stats,
                                llvm::StringMap<std::vector<uint8_t>> &cubins,
                                llvm::StringMap<std::string> &sources,
                                std::string &options) {
  // Kernels of identical layers differ only in their entries' offsets:
  // one NVRTC program per distinct body compiles them all at once, and
  // separate compilation (-rdc, then nvJitLink) compiles that body once
  // rather than once per entry, which is most of the time saved.
  llvm::MapVector<StringRef, std::vector<const CudaKernel *>> families;
  for (const auto *list : {&kernels, &candidates})
    for (const PendingKernel &k : *list)
      families[k.cuda->bodyName].push_back(&*k.cuda);
  struct Job {
    StringRef body;
    std::string source, error, log;
    std::vector<uint8_t> cubin;
    double seconds = 0;
    size_t numKernels = 0;
    nvrtc::Linking linking = nvrtc::Linking::Separate;
  };
  std::vector<Job> jobs(families.size());
  for (auto [i, fam] : llvm::enumerate(families)) {
    jobs[i].body = fam.first;
    jobs[i].source = cudaProgramSource(fam.second);
    jobs[i].numKernels = fam.second.size();
  }
  auto t0 = std::chrono::steady_clock::now();
  {
    llvm::DefaultThreadPool pool(llvm::hardware_concurrency());
    for (Job &job : jobs)
      pool.async([&job, arch] {
        auto start = std::chrono::steady_clock::now();
        nvrtc::Output out;
        job.error = nvrtc::compile(job.source, job.body.str() + ".cu",
                                   arch.str(), {}, out,
                                   nvrtc::Linking::Separate);
        job.linking = out.linking;
        job.cubin = std::move(out.cubin);
        job.log = std::move(out.log);
        job.seconds = std::chrono::duration<double>(
                          std::chrono::steady_clock::now() - start)
                          .count();
      });
    pool.wait();
  }
  double total = std::chrono::duration<double>(
                     std::chrono::steady_clock::now() - t0)
                     .count();
  for (const Job &job : jobs) {
    if (job.error.empty())
      continue;
    const std::vector<const CudaKernel *> &fam = families[job.body];
    std::string more;
    if (fam.size() > 1)
      more = llvm::formatv(" and {0} more sharing its body", fam.size() - 1)
                 .str();
    return llvm::createStringError(
        llvm::formatv("kernel '{0}' (entry {1}){2}: {3}\n{4}",
                      fam.front()->name, fam.front()->entry, more, job.error,
                      job.log)
            .str());
  }
  if (stats) {
    double sum = 0;
    for (const Job &job : jobs) {
      sum += job.seconds;
      llvm::errs() << llvm::formatv(
          "l4c: nvrtc: {0,7:F3} s {1,9} bytes {2,4} kernel(s) {3}\n",
          job.seconds, job.cubin.size(), job.numKernels, job.body);
      if (!job.log.empty())
        llvm::errs() << job.log << "\n";
    }
    llvm::errs() << llvm::formatv(
        "l4c: nvrtc: compiled {0} kernels as {1} programs for {2} in {3:F2} s "
        "({4:F2} s of compile time on {5} threads)\n",
        kernels.size() + candidates.size(), jobs.size(), arch, total, sum,
        llvm::hardware_concurrency().compute_thread_count());
  }
  nvrtc::Linking linking =
      jobs.empty() ? nvrtc::Linking::Separate : jobs.front().linking;
  // Exactly the NVRTC flags; with -rdc the cubin was then linked by
  // nvJitLink (nvrtc::Linking::Separate).
  options = nvrtc::defaultOptions(arch, linking);
  for (Job &job : jobs) {
    cubins[job.body] = std::move(job.cubin);
    sources[job.body] = std::move(job.source);
  }
  return llvm::Error::success();
}

llvm::Expected<std::string> Writer::finish(const Llama4Config &c,
                                           const PlanOptions &opts,
                                           llvm::StringRef arch) {
  std::vector<fb::Offset<pl::Kernel>> tables;
  std::string nvrtcVersion, nvrtcOptions;
  if (emitCuda) {
    if (!nvrtc::available())
      return llvm::createStringError("--target=" + opts.target +
                                     " needs NVRTC to build cubins: " +
                                     nvrtc::loadError());
    llvm::StringMap<std::vector<uint8_t>> cubins;
    llvm::StringMap<std::string> sources;
    if (llvm::Error e = compileCuda(arch, opts.cudaStats, cubins, sources,
                                    nvrtcOptions))
      return std::move(e);
    // Kernels that share a body share its program's source and cubin (one
    // copy in the file); each names its own entry.
    llvm::StringMap<std::pair<fb::Offset<fb::String>,
                              fb::Offset<fb::Vector<uint8_t>>>>
        shared;
    for (const auto *list : {&kernels, &candidates})
      for (const PendingKernel &k : *list) {
        const CudaKernel &ck = *k.cuda;
        auto it = shared.find(ck.bodyName);
        if (it == shared.end()) {
          auto src = fbb.CreateString(sources[ck.bodyName]);
          auto bin = fbb.CreateVector(cubins[ck.bodyName]);
          it = shared.try_emplace(ck.bodyName, src, bin).first;
        }
        std::vector<fb::Offset<pl::TensorMap>> maps;
        for (const CudaTensorMap &m : ck.tensorMaps)
          maps.push_back(pl::CreateTensorMap(
              fbb, regionOf(m.region), m.offset,
              m.bf16 ? pl::DType::BF16 : pl::DType::F32,
              fbb.CreateVector(std::vector<uint64_t>(m.dims.begin(), m.dims.end())),
              fbb.CreateVector(
                  std::vector<uint64_t>(m.strides.begin(), m.strides.end())),
              fbb.CreateVector(std::vector<uint32_t>(m.box.begin(), m.box.end())),
              m.swizzle));
        tables.push_back(pl::CreateKernel(
            fbb, k.name, k.kind, k.ops, it->second.first, it->second.second,
            fbb.CreateString(ck.entry), ck.threads, ck.blocks, ck.sharedBytes,
            k.temps, fbb.CreateString(ck.config),
            fbb.CreateString(k.signature), k.alternativeOf,
            maps.empty() ? 0 : fbb.CreateVector(maps),
            /*grid_wait=*/true)); // every entry starts with l4_grid_wait
      }
    nvrtcVersion = nvrtc::version();
  } else {
    for (const PendingKernel &k : kernels)
      tables.push_back(pl::CreateKernel(fbb, k.name, k.kind, k.ops, 0, 0, 0,
                                        0, 0, 0, k.temps));
  }
  std::string target = arch.empty() ? opts.target : "cuda:" + arch.str();
  auto model = pl::CreateModelInfo(fbb, fbb.CreateString(c.source),
                                   c.vocabSize, c.numLayers, c.hiddenSize,
                                   fbb.CreateString(configToJson(c)));
  auto plan = pl::CreatePlan(
      fbb, kPlanVersion, model, fbb.CreateString(opts.programKind),
      fbb.CreateString(target), fbb.CreateString(opts.precision),
      opts.maxBatch, opts.maxSeq, arenaSize(), mem.weightsSize,
      mem.cacheSize, mem.ioSize, fbb.CreateVector(buffers),
      fbb.CreateVector(weights), fbb.CreateVector(tables),
      fbb.CreateVector(programs), pl::CreateMesh(fbb, 1),
      fbb.CreateString(arch.str()), fbb.CreateString(nvrtcVersion),
      fbb.CreateString(nvrtcOptions));
  pl::FinishPlanBuffer(fbb, plan);
  return std::string(reinterpret_cast<const char *>(fbb.GetBufferPointer()),
                     fbb.GetSize());
}

} // namespace

llvm::Expected<std::string> cudaArchOf(llvm::StringRef target) {
  if (target == "cpu")
    return std::string();
  if (target == "cuda")
    return std::string("sm_90a");
  llvm::StringRef arch = target;
  if (arch.consume_front("cuda:") && arch.consume_front("sm_")) {
    llvm::StringRef digits = arch;
    digits.consume_back("a");
    unsigned v;
    if (!digits.empty() && !digits.getAsInteger(10, v))
      return "sm_" + arch.str();
  }
  return llvm::createStringError(
      "--target must be cpu, cuda or cuda:sm_XX (e.g. cuda:sm_90a), got '" +
      target.str() + "'");
}

/// Plans memory and walks every function; `emitCuda` adds each kernel's
/// CUDA source, generated for `arch`.
static llvm::Expected<std::unique_ptr<Writer>>
walkModule(ModuleOp module, bool emitCuda, llvm::StringRef arch,
           const PlanOptions &opts,
           ModuleMemoryPlan &mem) {
  FailureOr<ModuleMemoryPlan> planned = planModuleMemory(module);
  if (failed(planned))
    return llvm::createStringError("memory planning failed");
  mem = std::move(*planned);
  auto w = std::make_unique<Writer>(mem, emitCuda, arch, opts);
  for (auto fn : module.getOps<func::FuncOp>())
    if (failed(w->addFunction(fn))) {
      if (llvm::Error e = w->takeCudaError())
        return std::move(e);
      return llvm::createStringError(
          llvm::formatv("cannot write function @{0} to a plan",
                        fn.getSymName()));
    }
  return w;
}

llvm::Expected<std::string> serializePlan(ModuleOp module,
                                          const Llama4Config &config,
                                          const PlanOptions &opts) {
  auto arch = cudaArchOf(opts.target);
  if (!arch)
    return arch.takeError();
  ModuleMemoryPlan mem;
  auto w = walkModule(module, !arch->empty(), *arch, opts, mem);
  if (!w)
    return w.takeError();
  if (uint64_t ws = (*w)->workspace())
    module->setAttr("l4c.cuda_workspace_size",
                    Builder(module.getContext()).getI64IntegerAttr(int64_t(ws)));
  return (*w)->finish(config, opts, *arch);
}

llvm::Error printCudaSources(ModuleOp module, const PlanOptions &opts,
                             llvm::raw_ostream &os) {
  auto arch = cudaArchOf(opts.target);
  if (!arch)
    return arch.takeError();
  ModuleMemoryPlan mem;
  // A cpu target's kernels print as sm_90a's.
  std::string kernelArch = arch->empty() ? "sm_90a" : *arch;
  auto w = walkModule(module, /*emitCuda=*/true, kernelArch, opts, mem);
  if (!w)
    return w.takeError();
  os << "// l4c --emit=cuda: " << opts.programKind << " program, max batch "
     << opts.maxBatch << ", max seq " << opts.maxSeq << ", for "
     << kernelArch << "\n";
  os << cudaPrelude();
  llvm::StringMap<unsigned> firstUse;
  for (auto [i, k] : llvm::enumerate((*w)->pending())) {
    const CudaKernel &c = *k.cuda;
    os << llvm::formatv("\n//===- kernel {0} in @{1}: {2} ({3}), entry {4}, "
                        "{5} blocks x {6} threads, {7} dynamic shared bytes",
                        i, k.program, c.name, c.kind, c.entry, c.blocks,
                        c.threads, c.sharedBytes);
    if (!k.signature.empty())
      os << ", tiles " << c.config << " of " << llvm::join(c.configs, "|")
         << " (signature " << k.signature << ")";
    os << "\n";
    auto [it, fresh] = firstUse.try_emplace(c.bodyName, unsigned(i));
    if (fresh)
      os << c.body;
    else
      os << "// body " << c.bodyName << ": as in kernel " << it->second
         << "\n";
    os << c.launcher;
  }
  return llvm::Error::success();
}

llvm::Error writePlan(ModuleOp module, const Llama4Config &config,
                      const PlanOptions &opts, llvm::StringRef path) {
  auto bytes = serializePlan(module, config, opts);
  if (!bytes)
    return bytes.takeError();
  io::Status st = io::writeFileAtomic(path.str(), *bytes);
  if (!st.ok())
    return llvm::createStringError(st.error);
  return llvm::Error::success();
}

} // namespace l4c
