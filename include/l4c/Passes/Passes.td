//===- Passes.td - l4c passes ----------------------------------*- tablegen -*-===//
//
// Every l4c transformation pass, grouped by area.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_PASSES
#define L4C_PASSES

include "mlir/Pass/PassBase.td"

//===----------------------------------------------------------------------===//
// Memory
//===----------------------------------------------------------------------===//

def PlanMemoryPass : Pass<"l4c-plan-memory", "mlir::ModuleOp"> {
  let summary = "assign every value of a kernel-level module a region and offset";
  let description = [{
    Runs the plan writer's memory planner and records its result as
    attributes, so the arena layout can be read and tested. Weights, KV
    caches and program inputs/outputs get their own regions; intermediates
    share one arena, where two values get overlapping bytes only when their
    lifetimes (kernel index of definition to last use, through reshape
    views) do not overlap. `l4.kv_cache_update` writes its cache in place.

    After (on a kernel.group):
    ```mlir
    %y = kernel.group "model.norm" kind "norm" (...) {l4c.memory = ["arena:0+1024"]} ...
    ```
    and `l4c.arena_size` on each function, `l4c.weights_size` and
    `l4c.cache_size` on the module.
  }];
}

#endif // L4C_PASSES
