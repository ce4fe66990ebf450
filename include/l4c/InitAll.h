//===- InitAll.h - register every l4c dialect, pass and pipeline ----------===//
//
// One registration point for l4c, l4-opt and tests, so any l4c pipeline can
// be replayed in l4-opt.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_INITALL_H
#define L4C_INITALL_H

namespace mlir {
class DialectRegistry;
} // namespace mlir

namespace l4c {
/// Dialects l4c produces or consumes (l4, func, ...).
void registerAllDialects(mlir::DialectRegistry &registry);
/// l4c passes and pipelines, plus the upstream passes l4c pipelines use.
void registerAllPasses();
} // namespace l4c

#endif // L4C_INITALL_H
