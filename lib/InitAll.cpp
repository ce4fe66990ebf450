//===- InitAll.cpp - register every l4c dialect, pass and pipeline --------===//
//
// Keeps the list of what l4c registers in one place.
//
//===----------------------------------------------------------------------===//
#include "l4c/InitAll.h"
#include "l4c/Conversion/Passes.h"
#include "l4c/Dialect/Kernel/KernelOps.h"
#include "l4c/Dialect/L4/L4Dialect.h"
#include "l4c/Passes/Passes.h"
#include "l4c/Passes/Pipelines.h"
#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/IR/DialectRegistry.h"
#include "mlir/Transforms/Passes.h"

void l4c::registerAllDialects(mlir::DialectRegistry &registry) {
  registry.insert<l4c::l4::L4Dialect, l4c::kernel::KernelDialect,
                  mlir::func::FuncDialect>();
}

void l4c::registerAllPasses() {
  mlir::registerCanonicalizerPass();
  mlir::registerCSEPass();
  mlir::registerSymbolDCEPass();
  l4c::registerL4CConversionPasses();
  l4c::registerL4CPasses();
  l4c::registerPipelines();
}
