//===- Emit.h - shared pieces of the CUDA op emitters -----------*- C++ -*-===//
//
// What every per-op emitter of lib/Target/Cuda sees: views of the op's
// buffers (row layout, storage type, the name of their pointer in the body)
// and the body under construction. Private to the library.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_LIB_TARGET_CUDA_EMIT_H
#define L4C_LIB_TARGET_CUDA_EMIT_H

#include "l4c/Target/Cuda/CudaEmitter.h"
#include "mlir/IR/Operation.h"
#include "llvm/ADT/SmallVector.h"
#include "llvm/ADT/StringRef.h"
#include "llvm/Support/raw_ostream.h"
#include <optional>
#include <string>

namespace l4c::cuda {

/// One operand or result of the op, as the generated body sees it.
/// Token-major buffers are rows: [Bmax, Smax, inner...] with a seq dim, or
/// [Bmax, inner...] without one (one row per sequence, after take_last).
struct View {
  std::string name;       ///< the typed pointer in the body
  std::string ctype;      ///< storage type the load/store helpers take
  std::string param;      ///< the body parameter it is cast from ("in0")
  bool referenced = true; ///< false: the body never declares the pointer
  const CudaBuffer *buf = nullptr;
  bool hasBatch = false, hasSeq = false;
  int64_t bmax = 1;         ///< compiled batch extent (1 without batch)
  int64_t rowsPerBatch = 1; ///< Smax with a seq dim, else 1
  int64_t inner = 1;        ///< elements per row

  llvm::ArrayRef<int64_t> shape() const { return buf->shape; }
  /// Element offset of the first element of row (b, t): "(b * S + t) * W".
  std::string rowBase(llvm::StringRef b, llvm::StringRef t) const;
  /// The live rows per batch entry in the body: "T" or "1".
  llvm::StringRef liveRows() const { return hasSeq ? "T" : "1"; }
  /// Live rows per entry at the compiled maxima.
  int64_t maxLiveRows() const { return hasSeq ? rowsPerBatch : 1; }
};

/// The body being generated for one op.
struct Body {
  std::string globals; ///< file-scope definitions; "@B@" is replaced by the
                       ///< body's unique name
  std::string code;    ///< statements inside the body function
  unsigned threads = 256;
  uint64_t blocks = 1;
  /// Dynamic shared memory per block (l4_dsmem() in the body; the runtime
  /// opts in beyond 48 KiB).
  unsigned sharedBytes = 0;
  /// Constants the entry passes to the body instead of the body declaring
  /// them: row strides, which differ between prefill and decode only, so
  /// that both share one body (compiled once).
  llvm::SmallVector<std::pair<std::string, int64_t>, 4> params;
  /// Bytes of device workspace the body needs (0: none). When set, the body
  /// receives `char *ws`: 256-byte aligned, private to this launch (kernels
  /// run one at a time on the plan's stream), zero at the plan's start. Its
  /// first 4 bytes are the "blocks done" counter of lastBlock(); a body that
  /// uses it leaves it 0 again. Scratch data starts at ws + 256. The split
  /// decode attention keeps per-pair counters there, which must be zero
  /// when it starts: another body of an inference plan that writes scratch
  /// (the fused router's logits) zeroes those bytes again before it ends.
  uint64_t workspaceBytes = 0;

  /// Inline the body into each entry instead of calling it: ptxas
  /// serialises wgmma pipelines that cross a call.
  bool inlined = false;

  /// The tile configurations l4-tune may choose between for this body,
  /// the one it was generated with first (empty: nothing to tune).
  llvm::SmallVector<std::string, 3> configs;

  /// TMA tensor maps the body takes as `const L4TensorMap *name` (after
  /// the workspace): the entry receives each as a __grid_constant__
  /// parameter (CudaKernel::tensorMaps) over `buf`, whose region and
  /// offset complete `map`.
  struct TensorMapUse {
    std::string name;
    const CudaBuffer *buf = nullptr;
    CudaTensorMap map;
  };
  llvm::SmallVector<TensorMapUse, 2> tensorMaps;

  /// Declares `name` as a body parameter the entry sets to `value`.
  void param(llvm::StringRef name, int64_t value) {
    params.emplace_back(name.str(), value);
  }
};

struct OpContext {
  mlir::Operation *op = nullptr;
  llvm::StringRef kernelName;
  llvm::SmallVector<View, 4> operands; ///< by op operand index
  llvm::SmallVector<View, 4> results;  ///< by op result number
  Body body;
  /// The tile configuration to generate (a tuning file's choice; empty:
  /// the default). The emitter fails when the body does not offer it.
  llvm::StringRef config;
  /// The GPU architecture the kernel is for ("sm_90a"): Hopper-only
  /// configurations (wgmma) are offered for sm_90a alone.
  llvm::StringRef arch = "sm_90a";

  /// An error naming the kernel and the op.
  llvm::Error fail(const llvm::Twine &msg) const;
};

// Op families; each fills ctx.body or fails with ctx.fail.
llvm::Error emitEmbedding(OpContext &ctx);
llvm::Error emitNorm(OpContext &ctx, double eps, bool hasWeight);
/// rope fused with the l2_norm that follows it (l4c-fuse's `rope`).
struct RopeNorm {
  double eps = 0;
  bool bf16Temps = false; ///< the rotated values are bf16 between the parts
};
llvm::Error emitRope(OpContext &ctx, const RopeNorm *norm = nullptr);
llvm::Error emitTemperatureScale(OpContext &ctx);
/// l4c-fuse's `cache` kernel: q's RoPE (and QK norm) or temperature scale,
/// k's RoPE (and QK norm), and the k and v cache updates, a few blocks per
/// token row (about a warp per head). ctx.operands: [q,] positions, k, v, the k cache, the v cache;
/// ctx.results: [q's result,] the k cache, the v cache.
struct CacheGroup {
  mlir::Operation *qRope = nullptr, *kRope = nullptr; ///< l4.rope or null
  std::optional<RopeNorm> qNorm, kNorm; ///< the QK norm after each rope
  mlir::Operation *qTemp = nullptr; ///< l4.temperature_scale or null
};
llvm::Error emitCacheGroup(OpContext &ctx, const CacheGroup &g);
/// l4c-fuse's `router` kernel (decode-shaped plans, at most kGemvMaxRows
/// rows): rms_norm, the router's linear, router_scores and moe_route in one
/// launch. ctx.operands: x, w (the router's weight), nw (the norm's
/// weight); ctx.results: xn (the normalised rows), scores, y (the route
/// table). The logits live in the workspace only.
struct RouterGroup {
  double eps = 0;
  bool bf16Norm = false;   ///< the normalised rows are bf16 (rounded so)
  bool bf16Logits = false; ///< the logits are bf16 (rounded so)
  int64_t topK = 1, slots = 1;
};
llvm::Error emitRouterGroup(OpContext &ctx, const RouterGroup &g);
llvm::Error emitKvCacheUpdate(OpContext &ctx);
llvm::Error emitRouterScores(OpContext &ctx);
llvm::Error emitElementwise(OpContext &ctx, llvm::StringRef expr);
llvm::Error emitTakeLast(OpContext &ctx);
llvm::Error emitLinear(OpContext &ctx);

/// A GEMM fused by l4c-fuse: y = epilogue(A(x) @ W^T). ctx.operands hold
/// x, w (the gate's with SwiGLU), then the up projection's weight with
/// `swiglu`, the norm weight with `norm`, and one residual per add.
struct GemmSpec {
  bool norm = false;   ///< x is rms_norm(x, nw; eps) first
  double eps = 0;
  bool swiglu = false; ///< y = up * silu(gate), w the gate's and wu the up's
  unsigned adds = 0;   ///< y += r0, then r1, ... (residuals)
  /// Linears of the one input (l4c-fuse's `qkv`), weight-streaming form
  /// only: ctx.operands hold x, w, then w1.. (one per further output)
  /// before the norm weight; ctx.results y, y1..; no SwiGLU or adds.
  unsigned outs = 1;
  /// The values passed between the parts are bf16 (else f32): the kernel
  /// rounds each as storing it would, so fusion never changes the numbers.
  bool bf16Temps = false;
};
llvm::Error emitGemm(OpContext &ctx, const GemmSpec &spec);

/// A GEMM y[m, c] = sum_r A(m, r) * B(c, r) in the tiled kernels (linear and
/// the training GEMMs). Offsets of A(m, r) are aRow(m) + aCol(r), of B(c, r)
/// bRow(c) + bCol(r), of y(m, c) the `y` expression; in those C expressions
/// @M, @R and @C stand for m, r and c. Row and column offsets are computed
/// once per tile and per reduction step, so they may divide.
struct TiledGemm {
  std::string what;        ///< a comment for the generated code
  std::string m, n, r;     ///< extents: rows, columns, reduction
  std::string a, b;        ///< the operands' pointers in the body
  std::string aRow, aCol, bRow, bCol, y;
  bool tensorCores = false; ///< bf16 operands: mma.sync tiles
  /// With tensor cores: A's (B's) values are not bf16 (f32 activations,
  /// products): each is staged as a bf16 pair hi + lo and multiplied twice,
  /// so the product keeps about 16 significant bits of it, not 8.
  bool aSplit = false, bSplit = false;
  uint64_t maxTiles = 1;    ///< 64x64 tiles at the compiled maxima (grouped:
                            ///< the column tiles of one expert's GEMM)
  /// One GEMM per expert over the rows l4.moe_route's table gives it: the
  /// rows of expert e's GEMM are its (token, slot) entries, and @T, @K and
  /// @G in aRow, bRow, bCol and y stand for the row's token, slot and
  /// expert (m, n and r are not used; `m` is ignored). Output rows (token,
  /// slot) that no expert covers (a token with fewer nonzero scores than
  /// slots) get zeros, so the kernel still writes all of y.
  struct Grouped {
    std::string table; ///< the route table's pointer
    int64_t experts = 0, slots = 1;
    std::string tokens;           ///< live tokens (the table's M)
    std::string scores, scoreRow; ///< pointer; offset of token @T's row
    /// When set, each accumulator is multiplied by this expression of @T
    /// and @G before the epilogue (the router score).
    std::string rowScale;
    uint64_t maxTokens = 0; ///< live tokens at the compiled maxima
    /// Columns of a row the zero tasks clear (default: the GEMM's n).
    std::string zeroCols;
    /// The other grouping: the reduction runs over expert e's entries (a
    /// weight gradient summed over its tokens) and @T, @K stand for the
    /// entry's token and slot in aCol and bCol; the outputs are
    /// [experts, m, n] (@G, @M and @C in y), every one written.
    bool overReduction = false;
    /// overReduction: when set, A's values are multiplied by this
    /// expression of @T and @G (the router score of the entry).
    std::string reductionScale;
  };
  std::optional<Grouped> grouped;
  /// When set, A(m, r) is swiglu(gate, up) of the values at A's offset
  /// (gate) and that offset plus this expression (up).
  std::string aSwigluUp;
  /// When set, the statements that store `v` at output (m, n) instead of
  /// `l4_st(y, <y>, v)`; the same placeholders as y.
  std::string store;
  /// A's rows (B's columns) are contiguous in memory, not its reduction
  /// index: the tile loads walk them with consecutive threads.
  bool aByRow = false, bByCol = false;
};
/// The grouping of l4.moe_route's table for the routed experts' GEMMs: the
/// body names the table "route" and the scores "scores" (rows of E at
/// (@T / LT * S_S + @T % LT) * E) and declares M, the live tokens.
TiledGemm::Grouped routeGroups(const View &scores, int64_t experts,
                               int64_t slots);
struct GemmText;
/// The statements of a tiled GEMM (sets the body's threads and blocks);
/// `fused` adds linear's norm prologue, SwiGLU and residual epilogue.
std::string emitTiles(Body &b, const TiledGemm &g,
                      const GemmText *fused = nullptr);

/// A grouped GEMM over its experts' entries (Grouped::overReduction, a
/// weight gradient) on tensor cores whose A rows and B columns are
/// contiguous (aRow "@M", bRow "@C"): 128x128 tiles of 8 warps; each step's
/// operands are loaded a step ahead into registers in pieces of `piece` (4
/// or 8) elements, then transformed (A's SwiGLU, the reduction scale),
/// split into bf16 hi + lo (aSplit, bSplit) and stored to shared memory.
/// The caller checks that pieces are whole and aligned: m, n and every
/// offset of aCol, bCol and aSwigluUp multiples of `piece`, from 16-byte
/// aligned buffers. `tiles`: the 128x128 tiles of all experts at the
/// compiled maxima.
std::string emitOverEntries(Body &b, const TiledGemm &g, int piece,
                            uint64_t tiles);

/// A bf16 GEMM y(m, c) = sum_r A(m, r) B(c, r) whose operands are read in
/// 16-byte pieces (emitPipelined: 128-row tiles on tensor cores, cp.async
/// pipelines). An operand is `kMajor` when its rows run along the
/// reduction: element (i, r) at base(@I = i) + r; else along the output
/// index: element (i, r) at base(@R = r) + i. The caller checks that every
/// piece is whole and aligned: a kMajor operand's reduction extent, and the
/// other's output extent, are multiples of 8 and every base a multiple of 8
/// elements from a 16-byte aligned buffer.
struct PipelinedGemm {
  struct Operand {
    std::string ptr;   ///< the body's pointer ("x")
    bool kMajor = true;
    std::string base;  ///< element offset expression of @I or @R
    /// A only, kMajor, mma.sync tiles: the operand is f32 (4-float pieces,
    /// reduction extent a multiple of 4), staged as f32 in dynamic shared
    /// memory and split at the fragment loads into bf16 hi + lo pairs, two
    /// products each (as TiledGemm::aSplit keeps it, about 16 bits).
    bool f32 = false;
  };
  std::string what;    ///< a comment for the generated code
  std::string m, n, r; ///< extents: rows, columns, reduction
  Operand a, b;
  Operand u;           ///< with a pointer: a second B (SwiGLU's up weight)
  std::string y;       ///< output offset of (@M, @C)
  uint64_t maxM = 0, maxN = 0; ///< output extents at the compiled maxima
  int bn = 0; ///< columns per tile: 128, or 64 (0: 128, 64 with SwiGLU);
              ///< wgmma also 256 (128 with SwiGLU)
  int stages = 2; ///< reduction steps buffered (NS - 1 in flight), 2 to 4
  /// Hopper warpgroup MMAs (wgmma, sm_90a) on 128-byte-swizzled stages of
  /// 64 reduction columns instead of mma.sync; A, B and U may each be
  /// K- or MN-major (MN-major ones are transposed by the MMA), B and U
  /// alike.
  bool wgmma = false;
  /// One GEMM per expert over the rows l4.moe_route's table gives it
  /// (TiledGemm::Grouped by entry; m and maxM unused): A is kMajor with a
  /// base of @T and @K (the entry's token and slot), B's and U's bases may
  /// use @G (the expert), and y (or store) is an offset of @T, @K, @G, @C.
  std::optional<TiledGemm::Grouped> grouped;
  /// When set, the statements that store `v` instead of `l4_st(y, <y>, v)`
  /// (the same placeholders as y).
  std::string store;
  /// The operands as whole buffers, for the TMA kernels (sm_90a's tensor
  /// copies): A a token-major view whose rows are the reduction, B (and U)
  /// a [rows][cols] matrix, [n][r] when kMajor, else [r][n]. Set by a
  /// caller that offers the "tma" configurations (choosePipelined).
  /// Grouped GEMMs: B (and U) a [experts][rows][cols] tensor, A's rows
  /// gathered by the producer warpgroup with cp.async (aView unused).
  const View *aView = nullptr, *bView = nullptr, *uView = nullptr;
  /// U's columns start at this column of B's tensor (gate_up's up half),
  /// MN-major only: U's copies use B's tensor map ("": its own map).
  std::string uCol;
  /// The chosen configuration is a TMA one: a producer warpgroup copies
  /// the stages with tensor maps over the views, two consumer warpgroups
  /// run wgmma (emitTmaGemm), the norm prologue rescaling A's stages in
  /// place. bf16 A; grouped by entry (not over the reduction) without a
  /// norm, A's rows then copied by cp.async.
  bool tma = false;
};
std::string emitPipelined(Body &b, const PipelinedGemm &p,
                          const GemmText *fused = nullptr);
/// The tile configurations of a GEMM emitPipelined can run, for l4-tune:
/// "p128x<BN>[s<NS>]" (128 x BN tiles, NS stages; "p128x128", two stages,
/// is the default, "p128x64" with SwiGLU), "t64x64" (emitTiles) and, for
/// sm_90a, "w128x<BN>s<NS>" (wgmma; BN up to 256, 128 with SwiGLU).
/// Records them on the body; false when ctx.config asks for emitTiles,
/// else sets p.bn, p.stages and p.wgmma.
/// With `tma` (the caller sets p's views), sm_90a also offers
/// "tma128x<BN>s<NS>": warp-specialised wgmma GEMMs whose stages arrive
/// by TMA.
bool choosePipelined(OpContext &ctx, PipelinedGemm &p, bool swiglu = false,
                     bool tma = false);
/// Whether TMA can address `v` as tmaMatrix, a [rows][cols] matrix (its
/// whole shape, no batch), or tmaRows, token-major rows of `cols`
/// elements: a 16-byte aligned start and rows of a multiple of 16 bytes.
bool tmaMatrix(const View &v, int64_t rows, int64_t cols);
bool tmaRows(const View &v, int64_t cols);
/// Whether TMA can address `v` as the routed experts' weights: a whole
/// [experts][rows][cols] tensor, 16-byte aligned start and rows.
bool tmaExperts(const View &v);
/// The pipelined form of a by-entry grouped TiledGemm: its extents, A (its
/// rows, which must run along the reduction), y, store and grouping, with
/// `b` as B's operand and `maxN` columns at the compiled maxima.
PipelinedGemm pipelinedGrouped(const TiledGemm &g, PipelinedGemm::Operand b,
                               uint64_t maxN);
/// After emitPipelined chose TMA: operand `v` (one of ctx.operands) is read
/// through its tensor map alone, so the body does not declare its pointer.
inline void readByTmaOnly(OpContext &ctx, const View &v) {
  for (View &o : ctx.operands)
    if (&o == &v)
      o.referenced = false;
}
/// Whether the views' buffers start 16-byte aligned, as emitPipelined's
/// copies need (the caller checks the extents).
inline bool pieceAligned(std::initializer_list<const View *> views) {
  for (const View *v : views)
    if (v->buf->offset % 16 != 0)
      return false;
  return true;
}
llvm::Error emitMoeExperts(OpContext &ctx);
llvm::Error emitMoeRoute(OpContext &ctx, int64_t slots);
llvm::Error emitMoeHidden(OpContext &ctx);
llvm::Error emitMoeDown(OpContext &ctx);
llvm::Error emitAttention(OpContext &ctx);
// Training (GradOps.cpp).
llvm::Error emitCrossEntropy(OpContext &ctx, bool grad);
/// The chunked loss of l4c-chunk-loss: cross_entropy_stats,
/// cross_entropy_from_stats and cross_entropy_grad_chunk.
enum class ChunkLoss { Stats, Loss, Grad };
llvm::Error emitCrossEntropyChunk(OpContext &ctx, ChunkLoss part,
                                  int64_t vocabOffset);
llvm::Error emitLinearGradInput(OpContext &ctx);
llvm::Error emitLinearGradWeight(OpContext &ctx);
llvm::Error emitNormGrad(OpContext &ctx, double eps, bool hasWeight);
llvm::Error emitAttentionGrad(OpContext &ctx);
llvm::Error emitRouterScoresGrad(OpContext &ctx);
llvm::Error emitSwigluGrad(OpContext &ctx);
llvm::Error emitEmbeddingGrad(OpContext &ctx);
llvm::Error emitMoeExpertsGrad(OpContext &ctx);
// The split experts' backward (Experts.cpp).
llvm::Error emitMoeGateUp(OpContext &ctx);
llvm::Error emitMoeDownGrad(OpContext &ctx);
llvm::Error emitMoeDownGradWeight(OpContext &ctx);
llvm::Error emitMoeGateUpGradInput(OpContext &ctx);
llvm::Error emitMoeCombineGrad(OpContext &ctx);
llvm::Error emitMoeGateUpGradWeight(OpContext &ctx);

/// Body globals of the wgmma kernels (sm_90a; the emulator has its own):
/// shared addresses (@B@_saddr, @B@_align1024), the 128-byte-swizzle
/// operand descriptors (@B@_desc K-major, @B@_desc_mn MN-major), the fences
/// and group waits, and @B@_pin, which ties accumulators to their place in
/// the instruction stream (the compiler must not move their reads across a
/// wait, nor their zeroing across a fence).
extern const char *const kWgmmaGlobals;
/// @B@_<name>(d, descA, descB): d += A * B^T for one wgmma.m64n<8J>k16 with
/// bf16 operands from shared memory, each K-major or (`transA`, `transB`)
/// MN-major, and f32 accumulators d[J][4] (the fragment of the PTX ISA's
/// "wgmma .m64nNk16 register fragment" layout: d[j][c] at row
/// 16 * (warp % 4) + lane / 4 + 8 * (c / 2), column 8 * j + 2 * (lane % 4)
/// + c % 2, as mma.sync's m16n8 fragments of the warp's 16 rows).
std::string wgmmaMma(int j, bool transA, bool transB,
                     llvm::StringRef name = "mma");

// Text helpers.

/// `s` with every `from` replaced by `to`.
std::string replaceAll(llvm::StringRef s, llvm::StringRef from,
                       llvm::StringRef to);

/// The live rows per batch entry that token-major views share: "T" with a
/// seq dim, "1" after take_last; fails when they disagree or a view is not
/// token-major.
llvm::Expected<std::string>
liveRows(const OpContext &ctx, std::initializer_list<const View *> views);
/// A token-major view's rows at the compiled maxima.
uint64_t maxRows(const View &v);

/// Device helpers (for Body::globals) that pick a router's top k in
/// torch.topk's order: @B@_before and @B@_next.
std::string topkGlobals();
/// One token's router scores, as statements indented for a loop body: y's
/// E entries from yo zeroed, then the sigmoid of each of the TOPK best of
/// the E logits from x[xo] (topkGlobals' order) at its expert. E, TOPK and
/// topkGlobals' helpers must be in scope.
std::string topkScoresRow(llvm::StringRef x, llvm::StringRef xo,
                          llvm::StringRef y, llvm::StringRef yo);
/// A block-wide double sum for Body::globals: @B@_bsum(v, red), every
/// thread calls and gets the total; `red` is 32 doubles of shared memory.
extern const char *const kBlockSumD;

/// An exact C float literal for `v` (hex float; infinities and NaN spelled
/// through __int_as_float).
std::string floatLit(float v);
/// A 64-bit integer literal.
std::string intLit(int64_t v);
/// "constexpr long long NAME = VALUE;" with a trailing comment when given.
std::string constant(llvm::StringRef name, int64_t value,
                     llvm::StringRef comment = "");
/// Registers a row stride as a body parameter (see Body::params); returns
/// nothing to print, so it chains into the constant declarations.
inline std::string stride(Body &b, llvm::StringRef name, int64_t value) {
  b.param(name, value);
  return std::string();
}
/// Blocks for `work` items of `perBlock` each, at least 1, capped where a
/// grid-stride loop makes more blocks pointless.
uint64_t gridFor(uint64_t work, uint64_t perBlock);

} // namespace l4c::cuda

#endif // L4C_LIB_TARGET_CUDA_EMIT_H
