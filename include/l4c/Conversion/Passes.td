//===- Passes.td - l4c conversion passes -----------------------*- tablegen -*-===//
//
// Conversions between l4c's dialects.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_CONVERSION_PASSES
#define L4C_CONVERSION_PASSES

include "mlir/Pass/PassBase.td"

def ConvertL4ToKernelPass : Pass<"convert-l4-to-kernel", "mlir::ModuleOp"> {
  let summary = "wrap every l4 compute op in its own kernel.group";
  let description = [{
    Gives every l4 op except `l4.reshape` (a view, free after memory
    planning) a `kernel.group` of its own, named after the op's location and
    tagged with its template kind. Fusion passes regroup afterwards.

    Before:
    ```mlir
    %y = l4.rms_norm %x, %w {eps = 1.0e-5 : f64} : (...) -> tensor<1x8x32xf32>
    ```
    After:
    ```mlir
    %y = kernel.group "model.norm" kind "norm" (%x, %w) : (...) -> tensor<1x8x32xf32> {
    ^bb0(%a: tensor<1x8x32xf32>, %b: tensor<32xf32>):
      %0 = l4.rms_norm %a, %b {eps = 1.0e-5 : f64} : (...) -> tensor<1x8x32xf32>
      kernel.yield %0 : tensor<1x8x32xf32>
    }
    ```
  }];
  let dependentDialects = ["l4c::kernel::KernelDialect"];
}

#endif // L4C_CONVERSION_PASSES
