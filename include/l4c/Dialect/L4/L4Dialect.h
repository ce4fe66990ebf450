//===- L4Dialect.h - the l4 dialect ---------------------------------------===//
//
// Declares the l4 model-graph dialect and its attributes.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_DIALECT_L4_L4DIALECT_H
#define L4C_DIALECT_L4_L4DIALECT_H

#include "mlir/IR/Attributes.h"
#include "mlir/IR/Dialect.h"
#include "mlir/IR/DialectImplementation.h"

#include "l4c/Dialect/L4/L4Dialect.h.inc"
#include "l4c/Dialect/L4/L4Enums.h.inc"

#define GET_ATTRDEF_CLASSES
#include "l4c/Dialect/L4/L4Attrs.h.inc"

namespace l4c::l4 {
/// Argument attribute naming the HF tensor a weight argument binds to.
constexpr llvm::StringLiteral kWeightAttr = "l4.weight";
/// Argument attribute naming a run-time input ("input_ids", "positions").
constexpr llvm::StringLiteral kInputAttr = "l4.input";
/// Argument/result attribute naming a KV cache tensor ("layers.3.k").
constexpr llvm::StringLiteral kCacheAttr = "l4.kv_cache";
/// Result attribute naming a program output ("logits").
constexpr llvm::StringLiteral kOutputAttr = "l4.output";
} // namespace l4c::l4

#endif // L4C_DIALECT_L4_L4DIALECT_H
