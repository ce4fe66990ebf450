//===- Dialect.cpp - the kernel dialect -----------------------------------===//
//
// Registers the kernel dialect and verifies kernel.group.
//
//===----------------------------------------------------------------------===//
#include "l4c/Dialect/Kernel/KernelOps.h"
#include "mlir/IR/Builders.h"
#include "mlir/IR/OpImplementation.h"

using namespace mlir;
using namespace l4c::kernel;

#include "l4c/Dialect/Kernel/KernelDialect.cpp.inc"

void KernelDialect::initialize() {
  addOperations<
#define GET_OP_LIST
#include "l4c/Dialect/Kernel/KernelOps.cpp.inc"
      >();
}

void GroupOp::build(OpBuilder &b, OperationState &state, StringRef name,
                    StringRef kind, ValueRange inputs, TypeRange resultTypes) {
  state.addAttribute(getNameAttrName(state.name), b.getStringAttr(name));
  state.addAttribute(getKindAttrName(state.name), b.getStringAttr(kind));
  state.addOperands(inputs);
  state.addTypes(resultTypes);
  Region *body = state.addRegion();
  Block *block = new Block();
  body->push_back(block);
  for (Value v : inputs)
    block->addArgument(v.getType(), state.location);
}

LogicalResult GroupOp::verify() {
  Block &block = getBody().front();
  if (block.getNumArguments() != getInputs().size())
    return emitOpError() << "body has " << block.getNumArguments()
                         << " arguments but the group has "
                         << getInputs().size() << " inputs";
  for (auto [i, pair] : llvm::enumerate(
           llvm::zip(block.getArgumentTypes(), getInputs().getTypes())))
    if (std::get<0>(pair) != std::get<1>(pair))
      return emitOpError() << "body argument " << i << " has type "
                           << std::get<0>(pair) << " but input " << i
                           << " has type " << std::get<1>(pair);
  auto yield = cast<YieldOp>(block.getTerminator());
  if (yield.getValues().getTypes() != getResultTypes())
    return emitOpError() << "yielded types must equal the result types";
  for (Operation &op : block.without_terminator())
    if (op.getDialect()->getNamespace() != "l4")
      return op.emitOpError() << "only l4 ops may appear in a kernel.group";
  return success();
}

#define GET_OP_CLASSES
#include "l4c/Dialect/Kernel/KernelOps.cpp.inc"
