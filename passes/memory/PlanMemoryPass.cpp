//===- PlanMemoryPass.cpp - record the memory plan as attributes ----------===//
//
// l4c-plan-memory: exposes the plan writer's memory planner to l4-opt, so
// the arena layout can be inspected and tested.
//
//===----------------------------------------------------------------------===//
#include "l4c/Passes/MemoryPlan.h"
#include "l4c/Passes/Passes.h"
#include "l4c/Dialect/Kernel/KernelOps.h"
#include "mlir/IR/Builders.h"
#include "llvm/Support/FormatVariadic.h"

namespace l4c {
#define GEN_PASS_DEF_PLANMEMORYPASS
#include "l4c/Passes/Passes.h.inc"
} // namespace l4c

using namespace mlir;

namespace {
struct PlanMemoryPass : public l4c::impl::PlanMemoryPassBase<PlanMemoryPass> {
  void runOnOperation() override {
    ModuleOp module = getOperation();
    FailureOr<l4c::ModuleMemoryPlan> plan = l4c::planModuleMemory(module);
    if (failed(plan))
      return signalPassFailure();
    Builder b(module.getContext());
    auto slotAttr = [&](const l4c::Slot &s) {
      return b.getStringAttr(llvm::formatv("{0}:{1}+{2}",
                                           l4c::regionName(s.region), s.offset,
                                           s.size)
                                 .str());
    };
    for (auto fn : module.getOps<func::FuncOp>()) {
      const l4c::FunctionMemoryPlan &f = plan->functions[fn.getSymName()];
      fn->setAttr("l4c.arena_size", b.getI64IntegerAttr(f.arenaSize));
      fn.walk([&](l4c::kernel::GroupOp g) {
        SmallVector<Attribute> slots;
        for (Value r : g.getResults())
          slots.push_back(slotAttr(f.slots.lookup(r)));
        g->setAttr("l4c.memory", b.getArrayAttr(slots));
      });
    }
    module->setAttr("l4c.weights_size", b.getI64IntegerAttr(plan->weightsSize));
    module->setAttr("l4c.cache_size", b.getI64IntegerAttr(plan->cacheSize));
    module->setAttr("l4c.io_size", b.getI64IntegerAttr(plan->ioSize));
  }
};
} // namespace
