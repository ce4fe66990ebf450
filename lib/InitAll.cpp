//===- InitAll.cpp - register every l4c dialect, pass and pipeline --------===//
//
// Keeps the list of what l4c registers in one place.
//
//===----------------------------------------------------------------------===//
#include "l4c/InitAll.h"
#include "l4c/Dialect/L4/L4Dialect.h"
#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/IR/DialectRegistry.h"
#include "mlir/Transforms/Passes.h"

void l4c::registerAllDialects(mlir::DialectRegistry &registry) {
  registry.insert<l4c::l4::L4Dialect, mlir::func::FuncDialect>();
}

void l4c::registerAllPasses() {
  mlir::registerCanonicalizerPass();
  mlir::registerCSEPass();
  mlir::registerSymbolDCEPass();
}
