//===- KernelOps.h - the kernel dialect -----------------------------------===//
//
// Declares the kernel dialect (kernel.group, kernel.yield).
//
//===----------------------------------------------------------------------===//
#ifndef L4C_DIALECT_KERNEL_KERNELOPS_H
#define L4C_DIALECT_KERNEL_KERNELOPS_H

#include "mlir/Bytecode/BytecodeOpInterface.h"
#include "mlir/IR/Builders.h"
#include "mlir/IR/BuiltinTypes.h"
#include "mlir/IR/Dialect.h"
#include "mlir/IR/OpDefinition.h"
#include "mlir/IR/RegionKindInterface.h"
#include "mlir/Interfaces/ControlFlowInterfaces.h"
#include "mlir/Interfaces/SideEffectInterfaces.h"

#include "l4c/Dialect/Kernel/KernelDialect.h.inc"

#define GET_OP_CLASSES
#include "l4c/Dialect/Kernel/KernelOps.h.inc"

#endif // L4C_DIALECT_KERNEL_KERNELOPS_H
