//===- PlanWriter.cpp - kernel IR -> FlatBuffers plan ---------------------===//
//
// Walks each function of a kernel-level module in order: arguments and
// values become buffers at their planned offsets, kernel.groups become
// kernels with their l4 ops as the semantic op list, functions programs.
//
//===----------------------------------------------------------------------===//
#include "l4c/Plan/PlanWriter.h"
#include "l4c/Dialect/Kernel/KernelOps.h"
#include "l4c/Dialect/L4/L4Ops.h"
#include "l4c/Passes/MemoryPlan.h"
#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "llvm/ADT/StringMap.h"
#include "llvm/Support/FormatVariadic.h"
#include "io/safetensors.h"
#include "l4c/runtime/plan_generated.h"

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

class Writer {
public:
  Writer(const ModuleMemoryPlan &mem) : mem(mem) {}
  LogicalResult addFunction(func::FuncOp fn);
  std::string finish(const Llama4Config &c, const PlanOptions &opts);

private:
  FailureOr<uint32_t> buffer(Value v, const FunctionMemoryPlan &f,
                             StringRef name);
  LogicalResult addKernel(kernel::GroupOp g, const FunctionMemoryPlan &f,
                          DenseMap<Value, uint32_t> &bufs);

  const ModuleMemoryPlan &mem;
  fb::FlatBufferBuilder fbb{1 << 16};
  std::vector<fb::Offset<pl::Buffer>> buffers;
  std::vector<fb::Offset<pl::WeightBinding>> weights;
  std::vector<fb::Offset<pl::Kernel>> kernels;
  std::vector<fb::Offset<pl::Program>> programs;
  llvm::StringMap<uint32_t> sharedBuffers; ///< weights and caches by name
};

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
  for (Operation &op : body.without_terminator()) {
    std::vector<uint32_t> operands, results;
    for (Value v : op.getOperands()) {
      auto it = local.find(v);
      if (it == local.end())
        return op.emitOpError() << "operand has no buffer (intermediates "
                                   "inside a fused kernel are not placed yet)";
      operands.push_back(it->second);
    }
    for (Value v : op.getResults()) {
      auto it = local.find(v);
      if (it == local.end())
        return op.emitOpError() << "result is not yielded by its kernel";
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
  kernels.push_back(pl::CreateKernel(fbb, fbb.CreateString(g.getName().str()),
                                     fbb.CreateString(g.getKind().str()),
                                     fbb.CreateVector(ops)));
  return success();
}

LogicalResult Writer::addFunction(func::FuncOp fn) {
  const FunctionMemoryPlan &f = mem.functions.lookup(fn.getSymName());
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
    if (auto reshape = dyn_cast<l4::ReshapeOp>(op)) {
      auto idx = buffer(reshape.getResult(), f, "view");
      if (failed(idx))
        return reshape.emitOpError() << "has no memory slot";
      bufs[reshape.getResult()] = *idx;
      continue;
    }
    auto g = dyn_cast<kernel::GroupOp>(op);
    if (!g)
      return op.emitOpError() << "cannot be written to a plan; expected "
                                 "kernel.group or l4.reshape";
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

std::string Writer::finish(const Llama4Config &c, const PlanOptions &opts) {
  auto model = pl::CreateModelInfo(fbb, fbb.CreateString(c.source),
                                   c.vocabSize, c.numLayers, c.hiddenSize,
                                   fbb.CreateString(configToJson(c)));
  auto plan = pl::CreatePlan(
      fbb, kPlanVersion, model, fbb.CreateString(opts.programKind),
      fbb.CreateString(opts.target), fbb.CreateString(opts.precision),
      opts.maxBatch, opts.maxSeq, mem.arenaSize, mem.weightsSize,
      mem.cacheSize, mem.ioSize, fbb.CreateVector(buffers),
      fbb.CreateVector(weights), fbb.CreateVector(kernels),
      fbb.CreateVector(programs), pl::CreateMesh(fbb, 1));
  pl::FinishPlanBuffer(fbb, plan);
  return std::string(reinterpret_cast<const char *>(fbb.GetBufferPointer()),
                     fbb.GetSize());
}

} // namespace

llvm::Expected<std::string> serializePlan(ModuleOp module,
                                          const Llama4Config &config,
                                          const PlanOptions &opts) {
  FailureOr<ModuleMemoryPlan> mem = planModuleMemory(module);
  if (failed(mem))
    return llvm::createStringError("memory planning failed");
  Writer w(*mem);
  for (auto fn : module.getOps<func::FuncOp>())
    if (failed(w.addFunction(fn)))
      return llvm::createStringError(
          llvm::formatv("cannot write function @{0} to a plan",
                        fn.getSymName()));
  return w.finish(config, opts);
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
