//===- Passes.h - l4c passes ----------------------------------------------===//
//
// Declarations and registration of l4c's transformation passes.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_PASSES_PASSES_H
#define L4C_PASSES_PASSES_H

#include "mlir/Pass/Pass.h"

namespace l4c {
#define GEN_PASS_DECL
#include "l4c/Passes/Passes.h.inc"

#define GEN_PASS_REGISTRATION
#include "l4c/Passes/Passes.h.inc"
} // namespace l4c

#endif // L4C_PASSES_PASSES_H
