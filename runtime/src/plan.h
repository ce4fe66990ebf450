//===- plan.h - plan loader and verifier ----------------------*- C++ -*-===//
//
// Loads an l4c execution plan (runtime/schema/plan.fbs), runs the FlatBuffers
// verifier and then the semantic checks, and decodes it into plain structs
// that the executor can trust: every index, extent and attribute is checked.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_RUNTIME_PLAN_H
#define L4C_RUNTIME_PLAN_H

#include "l4c/runtime/plan_generated.h"

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace l4c::rt {

/// The plan format version this runtime executes. Bump together with the
/// compiler's copy (include/l4c/Plan/PlanWriter.h) on any incompatible
/// change to plan.fbs.
constexpr uint32_t kPlanVersion = 2;

/// Failure classes; the C API maps them one to one onto l4rt_status.
enum class StatusCode {
  Ok,
  InvalidArgument,
  Io,
  InvalidPlan,
  Unsupported,
  OutOfMemory,
  Internal
};

struct Status {
  StatusCode code = StatusCode::Ok;
  std::string message;
  bool ok() const { return code == StatusCode::Ok; }
  static Status success() { return {}; }
  static Status fail(StatusCode c, std::string msg) {
    return Status{c, std::move(msg)};
  }
};

/// The semantic ops the runtime executes (the l4 dialect op names).
enum class OpKind {
  Embedding,
  RmsNorm,
  L2Norm,
  Linear,
  Rope,
  TemperatureScale,
  KvCacheUpdate,
  Attention,
  RouterScores,
  MoeExperts,
  MoeRoute,
  MoeHidden,
  MoeDown,
  Swiglu,
  Add,
  Convert,
  TakeLast,
  // Training: the loss and the vector-Jacobian products l4c-autodiff emits.
  CrossEntropy,
  CrossEntropyGrad,
  // l4c-chunk-loss: the loss over vocabulary chunks.
  CrossEntropyStats,
  CrossEntropyFromStats,
  CrossEntropyGradChunk,
  LinearGradInput,
  LinearGradWeight,
  RmsNormGrad,
  L2NormGrad,
  AttentionGrad,
  RouterScoresGrad,
  MoeExpertsGrad,
  // l4c-split-experts' parts of moe_experts_grad.
  MoeGateUp,
  MoeDownGrad,
  MoeDownGradWeight,
  MoeGateUpGradInput,
  MoeCombineGrad,
  MoeGateUpGradWeight,
  SwigluGrad,
  EmbeddingGrad,
};
const char *opKindName(OpKind k);

size_t dtypeSize(plan::DType t);
const char *dtypeName(plan::DType t); ///< "f32", "bf16", ...
const char *regionName(plan::Region r); ///< "arena", "weights", ...
/// "401.47 GiB", "1.22 GiB", "917.25 KiB", "512 bytes": for messages.
std::string byteSize(uint64_t bytes);

/// A kernel's compiled code as a GPU's driver reports it at load: registers
/// and local memory (spills, local arrays) a thread, static shared memory,
/// and the most threads a block its registers allow.
struct KernelCode {
  int registers = 0, localBytes = 0, staticShared = 0, maxThreads = 0;
};
bool isFloat(plan::DType t);
bool isIndex(plan::DType t);

struct BufferDesc {
  std::string name;
  plan::Region region = plan::Region::Arena;
  plan::DType dtype = plan::DType::F32;
  uint64_t offset = 0, size = 0; ///< bytes
  std::vector<int64_t> shape;
  std::vector<plan::DimKind> dims;
  bool hasBatch = false, hasSeq = false;
  uint64_t numel = 0;
  /// Elements between batch entries (numel when there is no batch dim) and
  /// between sequence rows (when hasSeq); strides follow the compiled shape.
  uint64_t batchStride = 0, rowStride = 0;

  /// Elements of one batch entry that are live for a run of length T.
  uint64_t activeElems(uint64_t T) const {
    return hasSeq ? T * rowStride : batchStride;
  }
  /// The innermost extent; 1 for a rank-0 (scalar) buffer.
  int64_t lastDim() const { return shape.empty() ? 1 : shape.back(); }
};

struct OpDesc {
  OpKind kind = OpKind::Add;
  std::vector<uint32_t> operands;
  std::vector<uint32_t> results; ///< gradient ops have up to four
  uint32_t result = 0;           ///< results[0]
  // Attributes, decoded once; those an op does not have stay zero.
  double eps = 0, scale = 0, floorScale = 0, attnScale = 0;
  int64_t chunkSize = 0, topK = 0;
  int64_t slots = 0;          ///< moe_route: entries per token
  bool inverse = false;       ///< rope: the adjoint (negated angle) rotation
  int64_t paddingIdx = -1;    ///< embedding_grad: a row that gets no gradient
  int64_t vocabOffset = 0, vocabSize = 0; ///< the chunked loss's columns
  std::vector<float> invFreq; ///< rope: cpu::ropeInvFreq, head_dim / 2 entries
};

/// A TMA tensor map a CUDA kernel takes after B and T (plan.fbs,
/// TensorMap): verified to be one cuTensorMapEncodeTiled accepts and to
/// address only bytes of its region.
struct TensorMapDesc {
  plan::Region region = plan::Region::Arena;
  uint64_t offset = 0; ///< bytes from the region's start to element 0
  plan::DType dtype = plan::DType::BF16; ///< F32 or BF16
  /// Innermost first: elements per dimension (rank 1 to 5), the bytes
  /// between indices of dims[1..] (rank - 1 of them), elements per copy.
  std::vector<uint64_t> dims, strides;
  std::vector<uint32_t> box;
  uint8_t swizzle = 0; ///< CUtensorMapSwizzle: 0 none, 1 32B, 2 64B, 3 128B
};

struct KernelDesc {
  std::string name, kind;
  std::vector<OpDesc> ops;
  /// Results of ops that a fused kernel consumes itself: only the CPU
  /// backend writes them (see plan.fbs, Kernel.temps).
  std::vector<uint32_t> temps;
  /// CUDA tile configuration and signature of a tunable kernel (l4-tune).
  std::string tileConfig, signature;
  /// >= 0: a candidate configuration of that kernel; no program runs it.
  int32_t alternativeOf = -1;
  /// CUDA: the TMA tensor maps the entry takes after B and T, in order (the
  /// CPU backend ignores them).
  std::vector<TensorMapDesc> tensorMaps;
  /// CUDA: the entry waits for the kernels before it before touching memory
  /// (plan.fbs, Kernel.grid_wait), so it may be launched with programmatic
  /// stream serialization.
  bool gridWait = false;
};

struct ProgramDesc {
  std::string name;
  int64_t inputIds = -1, positions = -1, logits = -1; ///< buffer indices or -1
  int64_t loss = -1; ///< train_step: the f32 scalar loss
  /// train_step: grads[i] is the buffer of "grad.<hf>" for Plan::weights[i].
  std::vector<uint32_t> grads;
  std::vector<uint32_t> steps;
  /// The longest run-time length the program can take: the smallest Seq
  /// extent among the buffers it touches.
  int64_t seqCapacity = 0;
};

struct WeightDesc {
  uint32_t buffer = 0;
  std::string hfName;
};

/// A verified, decoded plan. Immutable once loaded; sessions share it.
class Plan {
public:
  /// Reads the whole file and verifies it; messages start with `path`.
  static Status load(const std::string &path, std::shared_ptr<const Plan> &out);
  /// Verifies plan bytes held in memory; `label` names them in messages.
  static Status fromBytes(std::vector<uint8_t> bytes, const std::string &label,
                          std::shared_ptr<const Plan> &out);

  const std::string &label() const { return label_; }
  /// The verified FlatBuffers root (kernels' CUDA sources live only here).
  const plan::Plan &root() const { return *plan::GetPlan(bytes_.data()); }
  const ProgramDesc *program(std::string_view name) const;

  uint32_t version = 0;
  std::string programKind, target, precision, modelSource;
  std::string configJson; ///< model.config_json, for checkpoints we write
  int64_t maxBatch = 0, maxSeq = 0, vocabSize = 0;
  uint32_t meshRanks = 1;
  uint64_t regionSize[4] = {0, 0, 0, 0}; ///< indexed by plan::Region
  std::vector<BufferDesc> buffers;
  std::vector<WeightDesc> weights;
  std::vector<KernelDesc> kernels;
  std::vector<ProgramDesc> programs;

private:
  std::string label_;
  std::vector<uint8_t> bytes_;
  friend class PlanVerifier;
};

} // namespace l4c::rt

#endif // L4C_RUNTIME_PLAN_H
