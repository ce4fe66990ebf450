//===- l4-opt.cpp - run l4c passes and pipelines on MLIR files ------------===//
//
// mlir-opt with l4c's dialects, passes and pipelines registered; the driver
// of the lit tests.
//
//===----------------------------------------------------------------------===//
#include "l4c/InitAll.h"
#include "mlir/IR/DialectRegistry.h"
#include "mlir/Tools/mlir-opt/MlirOptMain.h"

int main(int argc, char **argv) {
  mlir::DialectRegistry registry;
  l4c::registerAllDialects(registry);
  l4c::registerAllPasses();
  return mlir::asMainReturnCode(
      mlir::MlirOptMain(argc, argv, "l4c optimizer driver\n", registry));
}
