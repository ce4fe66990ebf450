//===- MemoryPlan.h - static memory planning for plans --------------------===//
//
// Places every value of a kernel-level module in a region (arena, weights,
// KV cache, program I/O) at a byte offset. The arena is shared by values
// whose lifetimes do not overlap, so its size, the peak scratch memory of a
// run, is known at compile time.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_PASSES_MEMORYPLAN_H
#define L4C_PASSES_MEMORYPLAN_H

#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/IR/BuiltinOps.h"
#include "llvm/ADT/DenseMap.h"
#include "llvm/ADT/StringMap.h"
#include <cstdint>
#include <vector>

namespace l4c {

/// Every buffer offset and size is a multiple of this (one GPU cache line
/// pair; enough for 16-byte vector and TMA alignment).
constexpr uint64_t kBufferAlign = 256;

enum class MemRegion { Arena, Weights, Cache, Io };
llvm::StringRef regionName(MemRegion r);

/// How a value's dimensions relate to the run-time extents.
enum class DimKind { Static, Batch, Seq };

struct Slot {
  MemRegion region = MemRegion::Arena;
  uint64_t offset = 0;
  uint64_t size = 0; ///< bytes at the compiled shape
};

/// A value's lifetime in kernel order (inclusive) and its size in bytes.
struct Lifetime {
  int64_t start = 0, end = 0;
  uint64_t size = 0;
};

/// Offsets such that two lifetimes that overlap never share a byte; every
/// offset is a multiple of `align`. Returns the total size needed. Larger
/// and longer-lived values are placed first, each at the lowest offset that
/// fits between the blocks already placed.
uint64_t assignOffsets(llvm::ArrayRef<Lifetime> values, uint64_t align,
                       std::vector<uint64_t> &offsets);

struct FunctionMemoryPlan {
  llvm::DenseMap<mlir::Value, Slot> slots;
  llvm::DenseMap<mlir::Value, std::vector<DimKind>> dims;
  uint64_t arenaSize = 0;
  uint64_t ioSize = 0;
};

struct ModuleMemoryPlan {
  llvm::StringMap<FunctionMemoryPlan> functions;
  uint64_t arenaSize = 0;   ///< max over functions (they run one at a time)
  uint64_t weightsSize = 0; ///< weights shared by name across functions
  uint64_t cacheSize = 0;   ///< KV caches shared by name across functions
  uint64_t ioSize = 0;      ///< max over functions
  llvm::StringMap<Slot> weightSlots; ///< by HF tensor name
  llvm::StringMap<Slot> cacheSlots;  ///< by cache name ("layers.0.k")
};

/// Plans a module of functions whose bodies hold kernel.group and
/// l4.reshape ops. Fails (with a diagnostic on the op) on IR it cannot place,
/// such as an in-place cache update whose old value is still used.
mlir::FailureOr<ModuleMemoryPlan> planModuleMemory(mlir::ModuleOp module);

} // namespace l4c

#endif // L4C_PASSES_MEMORYPLAN_H
