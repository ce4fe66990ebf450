//===- KernelOps.td - the kernel dialect -----------------------*- tablegen -*-===//
//
// The kernel level: one op per kernel instance. A kernel.group holds the l4
// ops it computes (its semantic op list); fusion passes only regroup them.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_DIALECT_KERNEL_OPS
#define L4C_DIALECT_KERNEL_OPS

include "mlir/IR/OpBase.td"
include "mlir/IR/RegionKindInterface.td"
include "mlir/Interfaces/ControlFlowInterfaces.td"
include "mlir/Interfaces/SideEffectInterfaces.td"

def Kernel_Dialect : Dialect {
  let name = "kernel";
  let cppNamespace = "::l4c::kernel";
  let summary = "kernel instances of an l4c plan";
  let description = [{
    Each `kernel.group` becomes one kernel of the plan: a template kind
    (gemm, norm, attention, ...), the l4 ops it fuses, and its operands.
    Values between groups become buffers; reshapes between groups are views.
  }];
}

def Kernel_GroupOp : Op<Kernel_Dialect, "group", [
    IsolatedFromAbove, SingleBlockImplicitTerminator<"YieldOp">, Pure]> {
  let summary = "one kernel instance and the l4 ops it computes";
  let description = [{
    ```mlir
    %y = kernel.group "model.layers.0.input_layernorm" kind "norm"
        (%h, %w) : (tensor<1x8x32xf32>, tensor<32xf32>) -> tensor<1x8x32xf32> {
    ^bb0(%x: tensor<1x8x32xf32>, %g: tensor<32xf32>):
      %n = l4.rms_norm %x, %g {eps = 1.0e-5 : f64} : ...
      kernel.yield %n : tensor<1x8x32xf32>
    }
    ```
  }];
  let arguments = (ins StrAttr:$name, StrAttr:$kind, Variadic<AnyType>:$inputs);
  let results = (outs Variadic<AnyType>:$results);
  let regions = (region SizedRegion<1>:$body);
  let assemblyFormat = [{
    $name `kind` $kind `(` $inputs `)` attr-dict `:` functional-type($inputs, $results) $body
  }];
  let hasVerifier = 1;
  let skipDefaultBuilders = 1;
  let builders = [
    OpBuilder<(ins "::llvm::StringRef":$name, "::llvm::StringRef":$kind,
                   "::mlir::ValueRange":$inputs, "::mlir::TypeRange":$resultTypes)>
  ];
}

def Kernel_YieldOp : Op<Kernel_Dialect, "yield", [
    Pure, Terminator, HasParent<"GroupOp">, ReturnLike]> {
  let summary = "the values a kernel.group produces";
  let arguments = (ins Variadic<AnyType>:$values);
  let assemblyFormat = "($values^ `:` type($values))? attr-dict";
  let builders = [OpBuilder<(ins), [{ /* nothing */ }]>];
}

#endif // L4C_DIALECT_KERNEL_OPS
