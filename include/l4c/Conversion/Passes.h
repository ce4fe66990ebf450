//===- Passes.h - l4c conversion passes -----------------------------------===//
//
// Declarations and registration of the convert-* passes.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_CONVERSION_PASSES_H
#define L4C_CONVERSION_PASSES_H

#include "mlir/IR/PatternMatch.h"
#include "mlir/Pass/Pass.h"

namespace l4c {
#define GEN_PASS_DECL
#include "l4c/Conversion/Passes.h.inc"

/// Patterns that wrap each l4 compute op in a kernel.group of its own.
void populateL4ToKernelPatterns(mlir::RewritePatternSet &patterns);
/// The template kind of an l4 op's kernel ("gemm", "norm", ...).
llvm::StringRef kernelKindOf(mlir::Operation *op);

#define GEN_PASS_REGISTRATION
#include "l4c/Conversion/Passes.h.inc"
} // namespace l4c

#endif // L4C_CONVERSION_PASSES_H
