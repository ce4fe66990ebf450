//===- CudaEmitter.h - kernel.group -> CUDA C++ source ----------*- C++ -*-===//
//
// Generates the CUDA C++ of one plan kernel from its kernel.group and the
// memory slots of its operands and results, following the kernel ABI of
// runtime/schema/plan.fbs. Text only: NVRTC compiles it later.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_TARGET_CUDA_CUDAEMITTER_H
#define L4C_TARGET_CUDA_CUDAEMITTER_H

#include "l4c/Dialect/Kernel/KernelOps.h"
#include "l4c/Passes/MemoryPlan.h"
#include "mlir/IR/Types.h"
#include "llvm/ADT/ArrayRef.h"
#include "llvm/ADT/SmallVector.h"
#include "llvm/Support/Error.h"
#include <cstdint>
#include <string>

namespace l4c {

/// Plans with at most this many rows (batch x live length at the compiled
/// maxima) get the weight-streaming GEMV form of a GEMM (and l4c-fuse's
/// `qkv` fusion, which only that form generates).
constexpr uint64_t kGemvMaxRows = 32;
/// l4c-fuse's `router` kernel (norm, router GEMV, scores and route in one
/// launch) holds the rows' logits in shared memory: at most this many
/// (rows x experts at the compiled maxima; 32 KiB of f32).
constexpr uint64_t kRouterFuseMaxLogits = 8192;

/// Where a kernel operand or result lives and how it is laid out: the
/// shape is at the compiled maxima; `dims` say which extents are the
/// run-time batch and sequence length.
struct CudaBuffer {
  MemRegion region = MemRegion::Arena;
  uint64_t offset = 0; ///< bytes from the start of the region
  llvm::SmallVector<int64_t, 4> shape;
  llvm::SmallVector<DimKind, 4> dims;
  mlir::Type elementType;
};

/// A TMA tensor map the kernel's entry takes (plan.fbs, table TensorMap):
/// the runtime encodes it over the tensor at `offset` of `region` once the
/// regions are allocated. Extents at the compiled maxima, innermost first.
struct CudaTensorMap {
  MemRegion region = MemRegion::Arena;
  uint64_t offset = 0; ///< bytes from the region's start to element 0
  bool bf16 = true;    ///< else f32
  llvm::SmallVector<uint64_t, 5> dims;    ///< elements
  llvm::SmallVector<uint64_t, 4> strides; ///< bytes, of dims[1..]
  llvm::SmallVector<uint32_t, 5> box;     ///< elements a copy moves
  uint8_t swizzle = 3;                    ///< CUtensorMapSwizzle (3: 128B)
};

/// One generated kernel. The body depends only on shapes, dtypes and
/// attributes, never on offsets, so kernels of identical layers share it
/// (same `bodyName`) and can be compiled together, once.
struct CudaKernel {
  std::string name;     ///< the kernel's name (kernel.group's name)
  std::string entry;    ///< the extern "C" __global__ symbol
  std::string kind;     ///< the template kind (kernel.group's kind)
  std::string bodyName; ///< unique per distinct body text (a hash)
  std::string body;     ///< file-scope helpers and the __device__ body
  std::string launcher; ///< the entry: region bases + constant offsets
  unsigned threads = 0; ///< block size the body is written for
  unsigned blocks = 0;  ///< grid at the compiled maxima (any grid is correct)
  unsigned sharedBytes = 0; ///< dynamic shared memory per block at launch
  /// Device scratch the kernel uses at the workspace offset of the arena
  /// (0: none); the plan's arena ends with max over kernels of this.
  uint64_t workspaceBytes = 0;
  /// Tile configurations l4-tune may choose between (empty: none), the
  /// kernel's default first, and the one this kernel was generated with.
  llvm::SmallVector<std::string, 3> configs;
  std::string config;
  /// The tensor maps the entry takes after B and T, in order.
  llvm::SmallVector<CudaTensorMap, 2> tensorMaps;

  /// Prelude, body and entry: a program that compiles alone.
  std::string source() const;
};

/// Declarations every generated program starts with: the L4Regions struct,
/// the load/store helpers (the only code that knows storage dtypes) and
/// block reductions.
llvm::StringRef cudaPrelude();

/// A C identifier for the kernel at `index` of a plan named `name`, unique
/// within the plan.
std::string cudaEntryName(unsigned index, llvm::StringRef name);

/// Emits the kernel for `group`, whose inputs and results are placed at
/// `inputs` and `results` (one per group operand and result). A kernel that
/// needs scratch (multi-block reductions) finds it at arena byte
/// `workspaceOffset`, past every planned value. Fails, naming the kernel
/// and op, on ops or dtypes the CUDA target does not support yet.
/// `config` picks one of the kernel's tile configurations (CudaKernel::
/// configs; empty: the default) and fails when the kernel has no such one;
/// `arch` is the GPU architecture it is for (some configurations are
/// Hopper-only).
llvm::Expected<CudaKernel> emitCudaKernel(kernel::GroupOp group,
                                          llvm::ArrayRef<CudaBuffer> inputs,
                                          llvm::ArrayRef<CudaBuffer> results,
                                          llvm::StringRef entry,
                                          uint64_t workspaceOffset,
                                          llvm::StringRef config = "",
                                          llvm::StringRef arch = "sm_90a");

/// A whole NVRTC program for kernels that share one body: the prelude, the
/// body once and every kernel's entry.
std::string cudaProgramSource(llvm::ArrayRef<const CudaKernel *> kernels);

} // namespace l4c

#endif // L4C_TARGET_CUDA_CUDAEMITTER_H
