//===- L4Ops.h - l4 dialect operations ------------------------------------===//
//
// Declares the ops generated from L4Ops.td.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_DIALECT_L4_L4OPS_H
#define L4C_DIALECT_L4_L4OPS_H

#include "l4c/Dialect/L4/L4Dialect.h"
#include "mlir/Bytecode/BytecodeOpInterface.h"
#include "mlir/IR/BuiltinTypes.h"
#include "mlir/IR/OpDefinition.h"
#include "mlir/IR/PatternMatch.h"
#include "mlir/Interfaces/InferTypeOpInterface.h"
#include "mlir/Interfaces/SideEffectInterfaces.h"

#define GET_OP_CLASSES
#include "l4c/Dialect/L4/L4Ops.h.inc"

#endif // L4C_DIALECT_L4_L4OPS_H
