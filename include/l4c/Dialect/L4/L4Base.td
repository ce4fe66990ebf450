//===- L4Base.td - the l4 dialect ------------------------------*- tablegen -*-===//
//
// The model-graph dialect: value-semantics tensor ops at transformer
// granularity, one op per step of the Hugging Face Llama 4 computation.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_DIALECT_L4_BASE
#define L4C_DIALECT_L4_BASE

include "mlir/IR/OpBase.td"
include "mlir/IR/AttrTypeBase.td"
include "mlir/IR/EnumAttr.td"

def L4_Dialect : Dialect {
  let name = "l4";
  let cppNamespace = "::l4c::l4";
  let summary = "Llama 4 model graph";
  let description = [{
    Ops on ranked tensors with value semantics. Activations are laid out
    token-major, `[batch, seq, ...]`; the two leading dimensions are compile
    time maxima whose actual extents are run-time arguments of a plan. Weights
    are function arguments carrying their Hugging Face name in the
    `l4.weight` argument attribute.
  }];
  let useDefaultAttributePrinterParser = 1;
}

class L4_Op<string mnemonic, list<Trait> traits = []>
    : Op<L4_Dialect, mnemonic, traits>;

//===----------------------------------------------------------------------===//
// Attributes
//===----------------------------------------------------------------------===//

def L4_RopeScaling : I32EnumAttr<"RopeScaling", "RoPE frequency scaling", [
    I32EnumAttrCase<"none", 0>,
    I32EnumAttrCase<"llama3", 1>
  ]> {
  let cppNamespace = "::l4c::l4";
  let genSpecializedAttr = 0;
}
def L4_RopeScalingAttr : EnumAttr<L4_Dialect, L4_RopeScaling, "rope_scaling">;

#endif // L4C_DIALECT_L4_BASE
