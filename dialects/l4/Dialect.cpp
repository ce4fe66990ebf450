//===- Dialect.cpp - the l4 dialect ---------------------------------------===//
//
// Registers the l4 dialect's ops and attributes.
//
//===----------------------------------------------------------------------===//
#include "l4c/Dialect/L4/L4Dialect.h"
#include "l4c/Dialect/L4/L4Ops.h"
#include "mlir/IR/Builders.h"
#include "llvm/ADT/TypeSwitch.h"

using namespace mlir;
using namespace l4c::l4;

#include "l4c/Dialect/L4/L4Dialect.cpp.inc"
#include "l4c/Dialect/L4/L4Enums.cpp.inc"
#define GET_ATTRDEF_CLASSES
#include "l4c/Dialect/L4/L4Attrs.cpp.inc"

void L4Dialect::initialize() {
  addOperations<
#define GET_OP_LIST
#include "l4c/Dialect/L4/L4Ops.cpp.inc"
      >();
  addAttributes<
#define GET_ATTRDEF_LIST
#include "l4c/Dialect/L4/L4Attrs.cpp.inc"
      >();
}
