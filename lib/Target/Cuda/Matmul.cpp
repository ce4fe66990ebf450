//===- Matmul.cpp - CUDA for linear and the routed experts ----------------===//
//
// linear and the fused GEMMs of l4c-fuse (an RMSNorm prologue, a second
// weight matrix with SwiGLU, residual adds in the epilogue): decode-shaped
// plans (at most kGemvMaxRows rows) get one warp per output column streaming
// the weights; bf16 ones with 16-byte rows a pipelined tensor-core GEMM
// (emitPipelined: 128-row tiles, a cp.async pipeline); the rest
// the generic tiles of emitTiles (64x64, mma.sync for bf16, else SIMT f32
// with 16-deep K steps and 4x4 outputs a thread). moe_experts: one block per
// token running its selected experts, correct before fast (what l4c-split-
// experts leaves of it: moe_hidden and moe_down; in prefill and training
// grouped GEMMs over the route table, in decode the same grouping as
// weight-streaming GEMVs, or per token, as l4-tune chooses).
//
//===----------------------------------------------------------------------===//
#include "Emit.h"
#include "llvm/Support/FormatVariadic.h"
#include <algorithm>
#include <cassert>

namespace l4c::cuda {

/// Text of the pieces a fused GEMM adds to the plain one.
struct GemmText {
  const GemmSpec &spec;
  const OpContext &ctx;

  /// The x value the product reads at element k of the row whose base is
  /// `row`, with the norm applied: the standalone norm's arithmetic,
  /// (x * inv) * g, so the product sees the values it would have read.
  std::string xValue(llvm::StringRef row, llvm::StringRef k,
                     llvm::StringRef inv) const {
    std::string ld = ("l4_ld(x, " + row + " + " + k + ")").str();
    if (!spec.norm)
      return ld;
    return round(("(" + ld + " * " + inv + ") * l4_ld(nw, " + k + ")").str());
  }

  /// `v` rounded as storing it in an intermediate's dtype would round it.
  std::string round(llvm::StringRef v) const {
    return spec.bf16Temps ? ("l4_round_bf16(" + v + ")").str() : v.str();
  }

  /// Statements turning the accumulators `g` (and `u`) of output (m, n)
  /// into `v`, the value stored: SwiGLU, then the residual adds in order.
  std::string epilogue(llvm::StringRef g, llvm::StringRef u,
                       llvm::StringRef indent) const {
    std::string s;
    if (spec.swiglu) {
      // The projections' outputs, then SwiGLU's, as the unfused kernels
      // would have stored them.
      s += (indent + "const float ga = " + round(g) + ", ua = " + round(u) +
            ";\n")
               .str();
      s += (indent + "float v = ua * (ga / (1.0f + expf(-ga)));\n").str();
    } else {
      s += (indent + "float v = " + g + ";\n").str();
    }
    for (unsigned i = 0; i < spec.adds; ++i)
      s += llvm::formatv("{0}v = {1} + l4_ld(r{2}, (m / LT * R{2}_S + m % LT) "
                         "* N + n);\n",
                         indent, round("v"), i)
               .str();
    return s;
  }
};

/// `t` with every `var` replaced by `(val)`.
static std::string subst(std::string t, llvm::StringRef var,
                         llvm::StringRef val) {
  for (size_t i = t.find(var.str()); i != std::string::npos;
       i = t.find(var.str(), i + val.size() + 2))
    t.replace(i, var.size(), "(" + val.str() + ")");
  return t;
}

/// A grouped GEMM's zero task, for tiles past the GEMM's `tiles`: tokens
/// z0.. get zeros in the slots past their nonzero scores (one warp per
/// token: `warp` of `warps`; lane declared). Continues the tile loop.
static std::string groupedZeroTask(const TiledGemm::Grouped &gr,
                                   llvm::StringRef y, llvm::StringRef warp,
                                   llvm::StringRef warps) {
  std::string text;
  llvm::raw_string_ostream os(text);
  os << R"cuda(    if (tile >= tiles) {
      // Tokens z0.. : zeros in the slots past their nonzero scores.
      const long long z0 = (tile - tiles) * 64;
      for (int r = )cuda"
     << warp << "; r < 64 && z0 + r < GT; r += " << warps << R"cuda() {
        const long long tk = z0 + r;
        float nz = 0.0f;
        for (int e = lane; e < GE; e += 32)
          nz += l4_ld()cuda"
     << gr.scores << ", " << subst(gr.scoreRow, "@T", "tk")
     << R"cuda( + e) != 0.0f ? 1.0f : 0.0f;
        const int cnt = (int)l4_warp_sum(nz);
        for (int k = cnt < GK ? cnt : GK; k < GK; ++k)
          for (long long n = lane; n < )cuda"
     << (gr.zeroCols.empty() ? std::string("GN") : gr.zeroCols)
     << R"cuda(; n += 32)
            l4_st(y, )cuda"
     << subst(subst(subst(y.str(), "@T", "tk"), "@K", "k"), "@C", "n")
     << R"cuda(, 0.0f);
      }
      continue;
    }
)cuda";
  return text;
}

/// `t` (of @G, @T and @K) for route entry q of expert ge: token q / GK,
/// slot q % GK.
static std::string groupedEntry(llvm::StringRef t) {
  return subst(subst(subst(t.str(), "@G", "ge"), "@T", "q / GK"), "@K",
               "q % GK");
}

/// A grouped GEMM's tile count over the experts' offsets goff (loaded):
/// tilesN column tiles by each expert's row tiles, then the zero tasks.
static const char *const kGroupedTileCount = R"cuda(  const long long tilesN = (GN + BN - 1) / BN;
  long long tiles = 0;
  for (int e = 0; e < GE; ++e)
    tiles += (goff[e + 1] - goff[e] + BM - 1) / BM * tilesN;
  const long long zeroTasks = (GT + 63) / 64;
)cuda";

/// Tile `tile`'s expert ge, its entries GM, m0 and n0. Row tiles inner: an
/// expert's row tiles of one column tile run side by side, so its weights
/// come from memory once and from L2 after. Every grouped kernel (and both
/// sides of a warp-specialised one) walks the tiles in this order.
static const char *const kGroupedTile = R"cuda(    long long rest = tile;
    int ge = 0;
    for (;; ++ge) {
      const long long te = (goff[ge + 1] - goff[ge] + BM - 1) / BM * tilesN;
      if (rest < te)
        break;
      rest -= te;
    }
    const long long GM = goff[ge + 1] - goff[ge], rowTiles = (GM + BM - 1) / BM;
    const long long m0 = rest % rowTiles * BM, n0 = rest / rowTiles * BN;
)cuda";

/// The head of a grouped GEMM's tile loop over l4.moe_route's entries
/// (TiledGemm::Grouped, rows by entry), for the tiles of emitTiles and
/// emitPipelined alike (BM, BN, NT, tid, lane and warp declared): the
/// experts' offsets, the tile count, the zero tasks, then per tile its
/// expert ge, GM (its entries), m0 and n0, and the row tables rq (entry),
/// arow (A's row offset, `aRow` of @T, @K and @G) and rsc (the row scale).
/// Leaves the loop open after those tables.
static std::string groupedTileLoop(const TiledGemm::Grouped &gr,
                                   llvm::StringRef aRow, llvm::StringRef y) {
  std::string text;
  llvm::raw_string_ostream os(text);
  os << R"cuda(  for (int e = tid; e <= GE; e += NT)
    goff[e] = )cuda"
     << gr.table << R"cuda([e];
  __syncthreads();
)cuda" << kGroupedTileCount
     << R"cuda(  for (long long tile = blockIdx.x; tile < tiles + zeroTasks; tile += gridDim.x) {
)cuda" << groupedZeroTask(gr, y, "warp", "NT / 32")
     << kGroupedTile << R"cuda(    __syncthreads(); // the previous tile is done with the tables
    for (int i = tid; i < BM; i += NT) {
      const int q = m0 + i < GM ? )cuda"
     << gr.table << R"cuda([GE + 1 + goff[ge] + m0 + i] : -1;
      rq[i] = q;
      arow[i] = q >= 0 ? )cuda"
     << groupedEntry(aRow) << " : -1;\n";
  if (!gr.rowScale.empty())
    os << "      rsc[i] = q >= 0 ? " << groupedEntry(gr.rowScale)
       << " : 0.0f;\n";
  os << "    }\n";
  return text;
}

/// A by-entry grouped GEMM's declarations: extents, the route offsets and
/// the row tables' shared arrays.
static std::string groupedDecls(const TiledGemm::Grouped &gr,
                                llvm::StringRef n, llvm::StringRef r) {
  std::string t = ("  const long long GN = " + n + ", GR = " + r + ";\n").str();
  t += llvm::formatv("  constexpr int GE = {0}, GK = {1};\n", gr.experts,
                     gr.slots)
           .str();
  t += "  const long long GT = " + gr.tokens + "; // live tokens\n";
  t += R"cuda(  // The route table: expert e's entries (token * GK + slot) are
  // route[GE + 1 + goff[e] ..], goff[e + 1] - goff[e] of them. Tiles run
  // expert by expert, column tiles then row tiles; after them, tasks of 64
  // tokens write the zeros of the rows no expert covers.
  __shared__ int goff[GE + 1];
  __shared__ int rq[BM];
)cuda";
  if (!gr.rowScale.empty())
    t += "  __shared__ float rsc[BM];\n";
  return t;
}

/// Blocks for a by-entry grouped GEMM of `bm`-row tiles with `colTiles`
/// column tiles per expert: at most one partial row tile per expert beyond
/// the full ones, then the zero tasks.
static uint64_t groupedBlocks(const TiledGemm::Grouped &gr, uint64_t bm,
                              uint64_t colTiles) {
  // Each expert with entries has at most one partial row tile, and at
  // most min(E, entries) experts have any.
  uint64_t entries = gr.maxTokens * uint64_t(gr.slots);
  return gridFor((entries / bm + std::min<uint64_t>(gr.experts, entries)) *
                         colTiles +
                     (gr.maxTokens + 63) / 64,
                 1);
}

/// The fused norm's inverse RMS of a tile's rows (x rows at arow[i], -1
/// outside), one warp per row, into rinv.
static const char *const kTileRowNorm =
    R"cuda(    // The norm's inverse RMS of the tile's rows, one warp per row.
    for (int i = warp; i < BM; i += NT / 32) {
      float ss = 0.0f;
      if (arow[i] >= 0)
        for (long long k = lane; k < GR; k += 32) {
          const float a = l4_ld(x, arow[i] + k);
          ss += a * a;
        }
      ss = l4_warp_sum(ss);
      const float var = (float)((double)ss / (double)GR);
      if (lane == 0)
        rinv[i] = (float)(1.0 / sqrt((double)(var + EPS)));
    }
)cuda";

const char *const kWgmmaGlobals = R"cuda(
__device__ __forceinline__ unsigned @B@_saddr(const void *p) {
#ifdef L4C_CUEMU
  return l4emu::sharedAddress(p);
#else
  return (unsigned)__cvta_generic_to_shared(p);
#endif
}
// The first 1024-byte aligned shared address at or after p.
__device__ __forceinline__ unsigned short *@B@_align1024(unsigned char *p) {
  return reinterpret_cast<unsigned short *>(p + ((1024u - (@B@_saddr(p) & 1023u)) & 1023u));
}
// A K-major operand in 128-byte swizzle mode: start address / 16, leading
// byte offset 16 (unused by the swizzled modes), stride byte offset 1024
// (between groups of 8 rows of 128 bytes), mode 1 (128-byte swizzle).
__device__ __forceinline__ unsigned long long @B@_desc(const unsigned short *p) {
  return (unsigned long long)((@B@_saddr(p) & 0x3FFFFu) >> 4) | (1ull << 16) |
         (64ull << 32) | (1ull << 62);
}
// An MN-major operand (rows along the output, transposed by the MMA) in
// 128-byte swizzle mode: atoms of 64 rows (128 bytes) x 8 k, 1024 bytes;
// leading byte offset 8192 between the atoms along the rows (8 atoms along
// k lie between them), stride byte offset 1024 between those along k.
__device__ __forceinline__ unsigned long long @B@_desc_mn(const unsigned short *p) {
  return (unsigned long long)((@B@_saddr(p) & 0x3FFFFu) >> 4) | (512ull << 16) |
         (64ull << 32) | (1ull << 62);
}
// A synchronising instruction, or the emulator's stand-in for it.
#ifdef L4C_CUEMU
#define @B@_SYNC(ptx, emulated) emulated
#else
#define @B@_SYNC(ptx, emulated) asm volatile(ptx ::: "memory")
#endif
__device__ __forceinline__ void @B@_fence_proxy() {
  @B@_SYNC("fence.proxy.async.shared::cta;", (void)0);
}
__device__ __forceinline__ void @B@_fence() {
  @B@_SYNC("wgmma.fence.sync.aligned;", l4emu::wgmmaFence());
}
__device__ __forceinline__ void @B@_commit() {
  @B@_SYNC("wgmma.commit_group.sync.aligned;", l4emu::wgmmaCommit());
}
template <int N> __device__ __forceinline__ void @B@_wait() {
#ifdef L4C_CUEMU
  l4emu::wgmmaWait(N);
#else
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
#endif
}
template <int J> __device__ __forceinline__ void @B@_pin(float (&d)[J][4]) {
#ifndef L4C_CUEMU
#pragma unroll
  for (int j = 0; j < J; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c)
      asm volatile("" : "+f"(d[j][c])::"memory");
#endif
}
)cuda";

/// Body globals of the TMA GEMMs, beside kWgmmaGlobals: mbarriers
/// (init, arrive, arrive with expected transaction bytes, parity wait), the
/// tensor copy into shared memory that completes on an mbarrier, and the
/// warpgroups' register budgets.
static const char *const kTmaGlobals = R"cuda(
__device__ __forceinline__ void @B@_bar_init(unsigned long long *b, unsigned n) {
#ifdef L4C_CUEMU
  l4emu::mbarInit(b, n);
#else
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(@B@_saddr(b)), "r"(n) : "memory");
#endif
}
// The barriers' initialisation, visible to the tensor copies.
__device__ __forceinline__ void @B@_bar_fence_init() {
  @B@_SYNC("fence.mbarrier_init.release.cluster;", (void)0);
}
__device__ __forceinline__ void @B@_arrive(unsigned long long *b) {
#ifdef L4C_CUEMU
  l4emu::mbarArrive(b);
#else
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(@B@_saddr(b)) : "memory");
#endif
}
__device__ __forceinline__ void @B@_arrive_tx(unsigned long long *b, unsigned bytes) {
#ifdef L4C_CUEMU
  l4emu::mbarArriveExpectTx(b, bytes);
#else
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(@B@_saddr(b)), "r"(bytes) : "memory");
#endif
}
// Expects `bytes` more transaction bytes in the current phase (no arrival).
__device__ __forceinline__ void @B@_expect_tx(unsigned long long *b, unsigned bytes) {
#ifdef L4C_CUEMU
  l4emu::mbarExpectTx(b, bytes);
#else
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(@B@_saddr(b)), "r"(bytes) : "memory");
#endif
}
// Returns once the phase of parity `parity` has completed.
__device__ __forceinline__ void @B@_bar_wait(unsigned long long *b, unsigned parity) {
#ifdef L4C_CUEMU
  l4emu::mbarWait(b, parity);
#else
  const unsigned a = @B@_saddr(b);
  unsigned done;
  do {
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}"
                 : "=r"(done) : "r"(a), "r"(parity) : "memory");
  } while (!done);
#endif
}
// The box of map `m` at coordinates (c0, c1, c2), innermost first, into
// shared dst; its bytes complete on mbarrier b.
__device__ __forceinline__ void @B@_tma(unsigned short *dst, const L4TensorMap *m,
                                        unsigned long long *b, int c0, int c1, int c2) {
#ifdef L4C_CUEMU
  l4emu::tmaLoad(dst, m, b, c0, c1, c2, 0, 0);
#else
  asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];"
               ::"r"(@B@_saddr(dst)), "l"(reinterpret_cast<unsigned long long>(m)),
                 "r"(@B@_saddr(b)), "r"(c0), "r"(c1), "r"(c2) : "memory");
#endif
}
__device__ __forceinline__ void @B@_tma2(unsigned short *dst, const L4TensorMap *m,
                                         unsigned long long *b, int c0, int c1) {
#ifdef L4C_CUEMU
  l4emu::tmaLoad(dst, m, b, c0, c1, 0, 0, 0);
#else
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];"
               ::"r"(@B@_saddr(dst)), "l"(reinterpret_cast<unsigned long long>(m)),
                 "r"(@B@_saddr(b)), "r"(c0), "r"(c1) : "memory");
#endif
}
// Consumer warpgroup w's 128 threads meet (named barrier 1 + w).
__device__ __forceinline__ void @B@_wg_sync(int w) {
#ifdef L4C_CUEMU
  l4emu::namedBarrier(1 + w, 128);
#else
  asm volatile("bar.sync %0, 128;" ::"r"(1 + w) : "memory");
#endif
}
// Tile `tile`'s row tile mt and column tile nt: groups of 16 row tiles,
// each walked column tile by column tile, so that the blocks in flight
// share A's rows and B's columns in L2 (a wave of 132 tiles reads about
// 16 row tiles and 8 column tiles, not 132 column tiles of one row).
__device__ __forceinline__ void @B@_tile_of(long long tile, long long tilesM,
                                            long long tilesN, long long &mt,
                                            long long &nt) {
  const long long per = 16 * tilesN, first = tile / per * 16;
  const long long rows = tilesM - first < 16 ? tilesM - first : 16;
  mt = first + tile % per % rows;
  nt = tile % per / rows;
}
// One producer warpgroup at 40 registers a thread, two consumer ones at
// 232: 65536 in all.
__device__ __forceinline__ void @B@_regs_producer() {
  @B@_SYNC("setmaxnreg.dec.sync.aligned.u32 40;", (void)0);
}
__device__ __forceinline__ void @B@_regs_consumer() {
  @B@_SYNC("setmaxnreg.inc.sync.aligned.u32 232;", (void)0);
}
)cuda";

std::string wgmmaMma(int j, bool transA, bool transB, llvm::StringRef name) {
  const std::string regs = std::to_string(4 * j), n = std::to_string(8 * j);
  std::string t = "\n__device__ __forceinline__ void @B@_" + name.str() +
                  "(float (&d)[" +
                  std::to_string(j) +
                  "][4], unsigned long long a, unsigned long long b) {\n"
                  "#ifdef L4C_CUEMU\n  l4emu::wgmma(&d[0][0], " + n +
                  ", a, b, " + (transA ? "true" : "false") + ", " +
                  (transB ? "true" : "false") +
                  ");\n#else\n  asm volatile(\n"
                  "      \"{\\n.reg .pred p;\\nsetp.ne.b32 p, %" +
                  std::to_string(4 * j + 2) +
                  ", 0;\\n\"\n      \"wgmma.mma_async.sync.aligned.m64n" + n +
                  "k16.f32.bf16.bf16 {";
  for (int r = 0; r < 4 * j; ++r)
    t += (r ? ", %" : "%") + std::to_string(r);
  t += "}, %" + regs + ", %" + std::to_string(4 * j + 1) +
       ", p, 1, 1, " + (transA ? "1" : "0") + ", " + (transB ? "1" : "0") +
       ";\\n}\\n\"\n      : ";
  for (int r = 0; r < 4 * j; ++r)
    t += std::string(r ? ", " : "") + "\"+f\"(d[" + std::to_string(r / 4) +
         "][" + std::to_string(r % 4) + "])";
  t += "\n      : \"l\"(a), \"l\"(b), \"r\"(1));\n#endif\n}\n";
  return t;
}

/// A warp's mma accumulators acc[rows][cols][4] (and acc2 for SwiGLU's
/// second product), declared and zeroed.
static std::string mmaAccumulators(llvm::StringRef rows, llvm::StringRef cols,
                                   bool two) {
  std::string t;
  for (const char *name : {"acc", "acc2"})
    if (two || name == llvm::StringRef("acc"))
      t += llvm::formatv("    float {0}[{1}][{2}][4];\n", name, rows, cols).str();
  t += llvm::formatv("#pragma unroll\n    for (int i = 0; i < {0}; ++i)\n"
                     "#pragma unroll\n      for (int j = 0; j < {1}; ++j)\n"
                     "#pragma unroll\n        for (int c = 0; c < 4; ++c) {{\n"
                     "          acc[i][j][c] = 0.0f;\n",
                     rows, cols)
           .str();
  if (two)
    t += "          acc2[i][j][c] = 0.0f;\n";
  return t + "        }\n";
}

/// One 32-deep reduction step's products on bf16 stages laid out [row][k]
/// (as, bs, us; asl, bsl their lo parts when split; `at` picks the step's
/// buffer, "" or "[s]"): warp (wm, wn) takes `rows` 16-row fragments of A
/// from row wm * rows * 16 and 4 8-column fragments of B from column
/// wn * 32. The small products first (lo x hi), then hi x hi; with
/// `swiglu`, acc2 += A U as well.
static std::string mmaStep(int rows, llvm::StringRef at, bool aSplit,
                           bool bSplit, bool swiglu) {
  const std::string n = std::to_string(rows),
                    first = std::to_string(rows * 16);
  auto tab = [&](const char *name) { return name + at.str(); };
  std::string t = "#pragma unroll\n      for (int kk = 0; kk < BK; kk += 16) {\n"
                  "        unsigned af[" + n + "][4];\n";
  if (aSplit)
    t += "        unsigned afl[" + n + "][4];\n";
  t += "#pragma unroll\n        for (int i = 0; i < " + n + "; ++i) {\n"
       "          const int r = wm * " + first + " + i * 16 + g;\n";
  for (auto [frag, stage] : {std::pair{"af", "as"}, std::pair{"afl", "asl"}}) {
    if (frag == llvm::StringRef("afl") && !aSplit)
      continue;
    const std::string f = frag, a = tab(stage);
    t += "          " + f + "[i][0] = l4_pair(&" + a + "[r][kk + 2 * t]);\n" +
         "          " + f + "[i][1] = l4_pair(&" + a + "[r + 8][kk + 2 * t]);\n" +
         "          " + f + "[i][2] = l4_pair(&" + a + "[r][kk + 2 * t + 8]);\n" +
         "          " + f + "[i][3] = l4_pair(&" + a + "[r + 8][kk + 2 * t + 8]);\n";
  }
  auto pairs = [&](const char *stage) {
    const std::string b = tab(stage);
    return "{l4_pair(&" + b + "[n][kk + 2 * t]), l4_pair(&" + b +
           "[n][kk + 2 * t + 8])};\n";
  };
  t += "        }\n#pragma unroll\n        for (int j = 0; j < 4; ++j) {\n"
       "          const int n = wn * 32 + j * 8 + g;\n"
       "          const unsigned bf[2] = " + pairs("bs");
  if (bSplit)
    t += "          const unsigned bfl[2] = " + pairs("bsl");
  t += "#pragma unroll\n          for (int i = 0; i < " + n + "; ++i) {\n";
  if (aSplit)
    t += "            l4_mma_bf16(acc[i][j], afl[i], bf);\n";
  if (bSplit)
    t += "            l4_mma_bf16(acc[i][j], af[i], bfl);\n";
  t += "            l4_mma_bf16(acc[i][j], af[i], bf);\n          }\n";
  if (swiglu)
    t += "          const unsigned uf[2] = " + pairs("us") +
         "#pragma unroll\n          for (int i = 0; i < " + n + "; ++i)\n"
         "            l4_mma_bf16(acc2[i][j], af[i], uf);\n";
  return t + "        }\n      }\n";
}

std::string emitTiles(Body &b, const TiledGemm &g, const GemmText *fused) {
  std::string text;
  llvm::raw_string_ostream os(text);
  const bool norm = fused && fused->spec.norm;
  const bool swiglu = fused && fused->spec.swiglu;
  const bool mma = g.tensorCores;
  using Grouped = TiledGemm::Grouped;
  const auto &fill = subst;
  const Grouped *gr = g.grouped ? &*g.grouped : nullptr;
  // An expression with the grouped GEMM's expert (@G) filled in.
  auto expert = [&](std::string t) { return gr ? fill(t, "@G", "ge") : t; };
  const bool byEntry = gr && !gr->overReduction; // rows are route entries
  // `t` (y or the store) at accumulator row `li` (tile-local), column n.
  auto place = [&](const std::string &t, llvm::StringRef li) {
    if (!byEntry)
      return fill(fill(expert(t), "@M", "m"), "@C", "n");
    std::string q = ("rq[" + li + "]").str();
    return fill(fill(fill(expert(t), "@T", q + " / GK"), "@K", q + " % GK"),
                "@C", "n");
  };
  // The statements storing v at row li, column n.
  auto storeAt = [&](llvm::StringRef li, llvm::StringRef indent) {
    if (!g.store.empty())
      return indent.str() + place(g.store, li) + "\n";
    return (indent + "l4_st(y, " + place(g.y, li) + ", v);\n").str();
  };
  // Accumulator (li, n)'s epilogue: bounds, the row scale, the fused
  // epilogue, the store.
  auto epilogueAt = [&](std::string a1, std::string a2,
                        llvm::StringRef indent) {
    std::string t =
        (indent + (byEntry ? "if (rq[li] < 0 || n >= GN)\n"
                           : "if (m >= GM || n >= GN)\n") +
         indent + "  continue;\n")
            .str();
    if (byEntry && !gr->rowScale.empty()) {
      a1 = "(" + a1 + " * rsc[li])";
      a2 = "(" + a2 + " * rsc[li])";
    }
    t += fused ? fused->epilogue(a1, a2, indent)
               : indent.str() + "const float v = " + a1 + ";\n";
    return t + storeAt("li", indent);
  };
  // The reduction step's column tables (r = k0 + j): plain offsets, or the
  // entries of the expert in route order.
  auto colTables = [&]() {
    std::string t;
    if (gr && gr->overReduction) {
      auto entry = [&](const std::string &e) {
        return fill(fill(expert(e), "@T", "q / GK"), "@K", "q % GK");
      };
      t = "        const int q = r < GR ? " + gr->table +
          "[GE + 1 + goff[ge] + r] : -1;\n";
      t += "        acol[j] = q >= 0 ? " + entry(g.aCol) + " : -1;\n";
      t += "        bcol[j] = q >= 0 ? " + entry(g.bCol) + " : -1;\n";
      if (!gr->reductionScale.empty())
        t += "        csc[j] = q >= 0 ? " + entry(gr->reductionScale) +
             " : 0.0f;\n";
      return t;
    }
    return "        acol[j] = r < GR ? " + fill(expert(g.aCol), "@R", "r") +
           " : -1;\n        bcol[j] = r < GR ? " +
           fill(expert(g.bCol), "@R", "r") + " : -1;\n";
  };
  os << "  // " << g.what << "\n";
  if (mma)
    os << R"cuda(  // Tensor cores: tiles of 64x64 outputs, the reduction in steps of 32
  // staged as bf16 in shared memory (rows padded to 40 elements: the
  // fragment reads hit 32 distinct banks). Warp (wm, wn) computes rows
  // wm*32.. and columns wn*32.. as 2x4 mma.sync m16n8k16 tiles; lane
  // (g, t) = (lane / 4, lane % 4) holds the PTX ISA's fragments: A rows g
  // and g + 8 at k = 2t, 2t + 1 (+8), B column g at the same k,
  // accumulators rows g, g + 8 and columns 2t, 2t + 1.
  constexpr int BM = 64, BN = 64, BK = 32, LD = BK + 8, NT = 128;
  __shared__ __align__(16) unsigned short as[BM][LD];
  __shared__ __align__(16) unsigned short bs[BN][LD];
)cuda";
  else
    os << R"cuda(  // Tiles of 64x64 outputs, the reduction in steps of 16 staged k-major
  // in shared memory; thread (ty, tx) owns rows ty + 16i and columns
  // tx + 16j (i, j < 4), so both shared reads are conflict-free.
  constexpr int BM = 64, BN = 64, BK = 16, NT = 256;
  __shared__ float as[BK][BM + 4];
  __shared__ float bs[BK][BN + 4];
)cuda";
  if (swiglu)
    os << (mma ? "  __shared__ __align__(16) unsigned short us[BN][LD];\n"
               : "  __shared__ float us[BK][BN + 4];\n");
  const bool aSplit = mma && g.aSplit, bSplit = mma && g.bSplit;
  if (aSplit)
    os << "  __shared__ __align__(16) unsigned short asl[BM][LD]; // A's lo\n";
  if (bSplit)
    os << "  __shared__ __align__(16) unsigned short bsl[BN][LD]; // B's lo\n";
  os << R"cuda(  // Element offsets: A(m, r) at arow[m - m0] + acol[r - k0], B(c, r) at
  // brow[c - n0] + bcol[r - k0]; -1 outside the matrices.
  __shared__ long long arow[BM], brow[BN], acol[BK], bcol[BK];
)cuda";
  if (norm)
    os << "  __shared__ float rinv[BM];\n";
  if (gr && gr->overReduction) {
    os << "  const long long GM = " << g.m << ", GN = " << g.n << ";\n"
       << "  constexpr int GE = " << gr->experts << ", GK = " << gr->slots
       << ";\n";
    os << R"cuda(  // Expert e's entries (token * GK + slot) are route[GE + 1 + goff[e] ..];
  // tile (e, m0, n0) sums over them in route order.
  __shared__ int goff[GE + 1];
)cuda";
    if (!gr->reductionScale.empty())
      os << "  __shared__ float csc[BK];\n";
    os << R"cuda(  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const long long tilesN = (GN + BN - 1) / BN, tilesM = (GM + BM - 1) / BM;
  for (int e = tid; e <= GE; e += NT)
    goff[e] = )cuda"
       << gr->table << R"cuda([e];
  const long long tiles = GE * tilesM * tilesN;
  for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int ge = (int)(tile / (tilesM * tilesN));
    const long long rest = tile % (tilesM * tilesN);
    const long long m0 = rest / tilesN * BM, n0 = rest % tilesN * BN;
    __syncthreads(); // goff is loaded; the previous tile is done with the tables
    const long long GR = goff[ge + 1] - goff[ge];
    for (int i = tid; i < BM; i += NT) {
      const long long m = m0 + i;
      arow[i] = m < GM ? )cuda"
       << fill(expert(g.aRow), "@M", "m") << R"cuda( : -1;
    }
    for (int i = tid; i < BN; i += NT) {
      const long long c = n0 + i;
      brow[i] = c < GN ? )cuda"
       << fill(expert(g.bRow), "@C", "c") << R"cuda( : -1;
    }
)cuda";
  } else if (gr) {
    os << groupedDecls(*gr, g.n, g.r)
       << "  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;\n"
       << groupedTileLoop(*gr, expert(g.aRow), g.y);
    os << R"cuda(    for (int i = tid; i < BN; i += NT) {
      const long long c = n0 + i;
      brow[i] = c < GN ? )cuda"
       << fill(expert(g.bRow), "@C", "c") << R"cuda( : -1;
    }
)cuda";
  } else {
    os << "  const long long GM = " << g.m << ", GN = " << g.n
       << ", GR = " << g.r << ";\n";
    os << R"cuda(  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const long long tilesN = (GN + BN - 1) / BN;
  const long long tiles = (GM + BM - 1) / BM * tilesN;
  for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const long long m0 = tile / tilesN * BM, n0 = tile % tilesN * BN;
    __syncthreads(); // the previous tile is done with the tables
    for (int i = tid; i < BM; i += NT) {
      const long long m = m0 + i;
      arow[i] = m < GM ? )cuda"
       << fill(g.aRow, "@M", "m") << R"cuda( : -1;
    }
    for (int i = tid; i < BN; i += NT) {
      const long long c = n0 + i;
      brow[i] = c < GN ? )cuda"
       << fill(g.bRow, "@C", "c") << R"cuda( : -1;
    }
)cuda";
  }
  if (norm)
    os << "    __syncthreads();\n" << kTileRowNorm;
  // The A and B values at tile row i, reduction column j (r = k0 + j).
  std::string aVal = "l4_ld(" + g.a + ", arow[i] + acol[j])";
  if (!g.aSwigluUp.empty())
    aVal = "l4_swiglu(" + aVal + ", l4_ld(" + g.a + ", arow[i] + acol[j] + " +
           g.aSwigluUp + "))";
  if (gr && !gr->reductionScale.empty())
    aVal = "(" + aVal + " * csc[j])";
  if (norm)
    aVal = fused->round("(" + aVal + " * rinv[i]) * l4_ld(nw, k0 + j)");
  std::string bVal = "l4_ld(" + g.b + ", brow[i] + bcol[j])";
  std::string uVal = "l4_ld(wu, brow[i] + bcol[j])";
  if (mma) {
    os << mmaAccumulators("2", "4", swiglu);
    os << R"cuda(    const int g = lane >> 2, t = lane & 3, wm = warp >> 1, wn = warp & 1;
    for (long long k0 = 0; k0 < GR; k0 += BK) {
      __syncthreads(); // the previous step is done with the tiles
      for (int j = tid; j < BK; j += NT) {
        const long long r = k0 + j;
)cuda" << colTables()
       << R"cuda(      }
      __syncthreads();
      // Element e: row e / 32, reduction column e % 32 (a warp reads 32
      // consecutive columns of one row), or row e % 64, column e / 64 for
      // an operand whose rows are contiguous.
)cuda";
    // Stages `val` into tab[i][j] (and its lo part into `lo` when given).
    auto mmaLoad =
        [&](bool byRow, llvm::StringRef rowTab,
            llvm::ArrayRef<std::pair<const char *, std::string>> dst,
            const char *lo = nullptr) {
          os << "      for (int e = tid; e < BM * BK; e += NT) {\n"
             << (byRow ? "        const int i = e & 63, j = e >> 6;\n"
                       : "        const int i = e >> 5, j = e & 31;\n")
             << "        const bool in = " << rowTab << "[i] >= 0 && "
             << (rowTab == "arow" ? "acol" : "bcol") << "[j] >= 0;\n";
          for (auto &[tab, val] : dst) {
            if (!lo) {
              os << "        " << tab << "[i][j] = in ? l4_bf16_bits(" << val
                 << ") : 0;\n";
              continue;
            }
            os << "        const float w = in ? " << val << " : 0.0f;\n"
               << "        const unsigned short hi = l4_bf16_bits(w);\n"
               << "        " << tab << "[i][j] = hi;\n"
               << "        " << lo << "[i][j] = l4_bf16_lo(w, hi);\n";
          }
          os << "      }\n";
        };
    mmaLoad(g.aByRow, "arow", {{"as", aVal}}, aSplit ? "asl" : nullptr);
    if (swiglu)
      mmaLoad(g.bByCol, "brow", {{"bs", bVal}, {"us", uVal}});
    else
      mmaLoad(g.bByCol, "brow", {{"bs", bVal}}, bSplit ? "bsl" : nullptr);
    os << "      __syncthreads();\n" << mmaStep(2, "", aSplit, bSplit, swiglu)
       << R"cuda(    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int li = wm * 32 + i * 16 + g + (c >= 2 ? 8 : 0);
          const long long m = m0 + li;
          const long long n = n0 + wn * 32 + j * 8 + 2 * t + (c & 1);
)cuda"
       << epilogueAt("acc[i][j][c]", "acc2[i][j][c]", "          ")
       << "        }\n  }\n";
  } else {
    os << R"cuda(    const int tx = tid & 15, ty = tid >> 4;
    float acc[4][4];
)cuda";
    if (swiglu)
      os << "    float acc2[4][4];\n";
    os << R"cuda(#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        acc[i][j] = 0.0f;
)cuda";
    if (swiglu)
      os << "        acc2[i][j] = 0.0f;\n";
    os << R"cuda(      }
    for (long long k0 = 0; k0 < GR; k0 += BK) {
      __syncthreads(); // the previous step is done with the tiles
      for (int j = tid; j < BK; j += NT) {
        const long long r = k0 + j;
)cuda" << colTables()
       << R"cuda(      }
      __syncthreads();
)cuda";
    // Thread tid loads row ty + 16q, column tx, or (for an operand whose
    // rows are contiguous) row tid % 64, column tid / 64 + 4q.
    auto simtLoad = [&](bool byRow, llvm::StringRef rowTab,
                        llvm::ArrayRef<std::pair<const char *, std::string>>
                            dst) {
      os << "#pragma unroll\n      for (int q = 0; q < 4; ++q) {\n"
         << (byRow ? "        const int i = tid & 63, j = (tid >> 6) + 4 * q;\n"
                   : "        const int i = ty + 16 * q, j = tx;\n")
         << "        const bool in = " << rowTab << "[i] >= 0 && "
         << (rowTab == "arow" ? "acol" : "bcol") << "[j] >= 0;\n";
      for (auto &[tab, val] : dst)
        os << "        " << tab << "[j][i] = in ? " << val << " : 0.0f;\n";
      os << "      }\n";
    };
    simtLoad(g.aByRow, "arow", {{"as", aVal}});
    if (swiglu)
      simtLoad(g.bByCol, "brow", {{"bs", bVal}, {"us", uVal}});
    else
      simtLoad(g.bByCol, "brow", {{"bs", bVal}});
    os << R"cuda(      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        float a[4], c[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          a[i] = as[kk][ty + 16 * i];
          c[i] = bs[kk][tx + 16 * i];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j)
            acc[i][j] = fmaf(a[i], c[j], acc[i][j]);
)cuda";
    if (swiglu)
      os << R"cuda(#pragma unroll
        for (int j = 0; j < 4; ++j)
          c[j] = us[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j)
            acc2[i][j] = fmaf(a[i], c[j], acc2[i][j]);
)cuda";
    os << R"cuda(      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int li = ty + 16 * i;
        const long long m = m0 + li, n = n0 + tx + 16 * j;
)cuda"
       << epilogueAt("acc[i][j]", "acc2[i][j]", "        ")
       << "      }\n  }\n";
  }
  b.threads = mma ? 128 : 256;
  b.blocks = byEntry ? groupedBlocks(*gr, 64, g.maxTiles)
                     : gridFor(g.maxTiles, 1);
  return text;
}

std::string emitOverEntries(Body &b, const TiledGemm &g, int piece,
                            uint64_t tiles) {
  assert(g.grouped && g.grouped->overReduction && g.tensorCores &&
         g.aRow == "@M" && g.bRow == "@C" && g.store.empty() &&
         (piece == 4 || piece == 8) && "emitOverEntries: see Emit.h");
  const TiledGemm::Grouped &gr = *g.grouped;
  const auto &fill = subst;
  // An expression of the entry q (@T, @K) and the tile's expert (@G).
  auto entry = [&](const std::string &e) {
    return fill(fill(fill(e, "@G", "ge"), "@T", "q / GK"), "@K", "q % GK");
  };
  const bool aSplit = g.aSplit, bSplit = g.bSplit;
  const bool swiglu = !g.aSwigluUp.empty(), scaled = !gr.reductionScale.empty();
  std::string text;
  llvm::raw_string_ostream os(text);
  os << "  // " << g.what << "\n";
  os << R"cuda(  // Tensor cores over an expert's entries: tiles of 128x128 outputs of
  // expert ge, the reduction over its entries in route order, in steps of
  // 32. Thread (warp, lane) loads entry k0 + lane's 16 consecutive rows of
  // A (columns of B) at warp * 16 into registers a step ahead, so the
  // loads are in flight while the step before runs its products; then it
  // stores them to shared memory as bf16 [row][k] (rows padded to 40: a
  // warp's stores, 32 entries of one row, and the fragment reads hit
  // distinct banks), two buffers. Warp (wm, wn) computes rows wm*64.. and
  // columns wn*32.. as 4 x 4 mma.sync m16n8k16 tiles.
  constexpr int BM = 128, BN = 128, BK = 32, LD = BK + 8, NT = 256;
)cuda";
  os << "  const long long GM = " << g.m << ", GN = " << g.n << ";\n"
     << "  constexpr int GE = " << gr.experts << ", GK = " << gr.slots
     << ";\n";
  unsigned dynamicBytes = 0;
  auto decl = [&](const char *name, const char *what) {
    os << "  auto *" << name
       << " = reinterpret_cast<unsigned short (*)[BM][LD]>(l4_dsmem() + "
       << dynamicBytes << "); // " << what << "\n";
    dynamicBytes += 2 * 128 * 40 * 2; // two buffers of BM x LD bf16
  };
  decl("as", "A");
  if (aSplit)
    decl("asl", "A's lo");
  decl("bs", "B");
  if (bSplit)
    decl("bsl", "B's lo");
  b.sharedBytes = dynamicBytes;
  os << R"cuda(  // Expert e's entries (token * GK + slot) are route[GE + 1 + goff[e] ..];
  // tile (e, m0, n0) sums over them in route order.
  __shared__ int goff[GE + 1];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3, wm = warp >> 2, wn = warp & 3;
  for (int e = tid; e <= GE; e += NT)
    goff[e] = )cuda"
     << gr.table << R"cuda([e];
  __syncthreads();
  const long long tilesN = (GN + BN - 1) / BN, tilesM = (GM + BM - 1) / BM;
  const long long tiles = GE * tilesM * tilesN;
  for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int ge = (int)(tile / (tilesM * tilesN));
    const long long rest = tile % (tilesM * tilesN);
    const long long m0 = rest / tilesN * BM, n0 = rest % tilesN * BN;
    const long long GR = goff[ge + 1] - goff[ge], steps = (GR + BK - 1) / BK;
    const int *const ents = )cuda"
     << gr.table << R"cuda( + GE + 1 + goff[ge];
    // This thread's rows of A and columns of B; its entry's values, and
    // the entry of the step after (its table read in flight as well).
    const long long mi = m0 + warp * 16, ni = n0 + warp * 16;
    float av[16], bv[16];
)cuda";
  if (swiglu)
    os << "    float au[16];\n";
  if (scaled)
    os << "    float sc = 0.0f;\n";
  os << "    int qn = lane < GR ? ents[lane] : -1;\n"
     << "    auto load = [&](long long k0) {\n"
     << "      const int q = qn;\n"
     << "      qn = k0 + BK + lane < GR ? ents[k0 + BK + lane] : -1;\n"
     << "      const long long ac = q >= 0 ? " << entry(g.aCol)
     << " : -1, bc = q >= 0 ? " << entry(g.bCol) << " : -1;\n";
  if (scaled)
    os << "      sc = q >= 0 ? " << entry(gr.reductionScale) << " : 0.0f;\n";
  // A piece of `vals` from offset `at`, or zeros outside the matrix (for
  // au too: swiglu(0, garbage) could be NaN).
  std::string ld = piece == 8 ? "l4_ld8" : "l4_ld4";
  auto pieceOf = [&](const std::string &in,
                     std::initializer_list<std::pair<std::string, const char *>>
                         loads) {
    os << "        if (" << in << ") {\n";
    for (auto &[at, vals] : loads)
      os << "          " << ld << "(" << at << ", " << vals << " + p);\n";
    os << "        } else {\n#pragma unroll\n          for (int u = 0; u < "
       << piece << "; ++u) {\n";
    for (auto &[at, vals] : loads)
      os << "            " << vals << "[p + u] = 0.0f;\n";
    os << "          }\n        }\n";
  };
  os << "#pragma unroll\n      for (int p = 0; p < 16; p += " << piece
     << ") {\n";
  if (swiglu)
    pieceOf("ac >= 0 && mi + p < GM",
            {{g.a + ", ac + mi + p", "av"},
             {g.a + ", ac + " + g.aSwigluUp + " + mi + p", "au"}});
  else
    pieceOf("ac >= 0 && mi + p < GM", {{g.a + ", ac + mi + p", "av"}});
  pieceOf("bc >= 0 && ni + p < GN", {{g.b + ", bc + ni + p", "bv"}});
  os << "      }\n    };\n";
  // A's value: the SwiGLU of gate and up, then the scale (emitTiles's order).
  std::string aVal = "av[u]";
  if (swiglu)
    aVal = "l4_swiglu(av[u], au[u])";
  if (scaled)
    aVal = "(" + aVal + " * sc)";
  os << R"cuda(    // The loaded values, transformed and split, into buffer s (every
    // thread is past the products that read it last).
    auto store = [&](int s) {
#pragma unroll
      for (int u = 0; u < 16; ++u) {
)cuda";
  os << "        const float a = " << aVal << ";\n"
     << "        const unsigned short ah = l4_bf16_bits(a), bh = "
        "l4_bf16_bits(bv[u]);\n"
     << "        as[s][warp * 16 + u][lane] = ah;\n";
  if (aSplit)
    os << "        asl[s][warp * 16 + u][lane] = l4_bf16_lo(a, ah);\n";
  os << "        bs[s][warp * 16 + u][lane] = bh;\n";
  if (bSplit)
    os << "        bsl[s][warp * 16 + u][lane] = l4_bf16_lo(bv[u], bh);\n";
  os << "      }\n    };\n";
  os << mmaAccumulators("4", "4", false);
  os << R"cuda(    if (steps > 0) {
      load(0);
      store(0);
    }
    __syncthreads();
    for (long long step = 0; step < steps; ++step) {
      const int s = (int)(step & 1);
      if (step + 1 < steps)
        load((step + 1) * BK);
)cuda" << mmaStep(4, "[s]", aSplit, bSplit, false)
     << R"cuda(      if (step + 1 < steps)
        store(s ^ 1);
      __syncthreads(); // buffer s ^ 1 is whole; everyone is done with s
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const long long m = m0 + wm * 64 + i * 16 + g + (c >= 2 ? 8 : 0);
          const long long n = n0 + wn * 32 + j * 8 + 2 * t + (c & 1);
          if (m >= GM || n >= GN)
            continue;
          l4_st(y, )cuda"
     << fill(fill(fill(g.y, "@G", "ge"), "@M", "m"), "@C", "n")
     << R"cuda(, acc[i][j][c]);
        }
  }
)cuda";
  b.threads = 256;
  b.blocks = gridFor(tiles, 1);
  return text;
}

bool tmaMatrix(const View &v, int64_t rows, int64_t cols) {
  auto s = v.shape();
  int64_t bytes = v.ctype == "l4_bf16" ? 2 : 4;
  return !v.hasBatch && s.size() == 2 && s[0] == rows && s[1] == cols &&
         v.buf->offset % 16 == 0 && (cols * bytes) % 16 == 0;
}

bool tmaRows(const View &v, int64_t cols) {
  int64_t bytes = v.ctype == "l4_bf16" ? 2 : 4;
  return v.hasBatch && v.inner == cols && v.buf->offset % 16 == 0 &&
         (cols * bytes) % 16 == 0;
}

/// The decode kernels' norm prologue: rinv[m] = 1 / sqrt(mean(x[m]^2) + EPS)
/// for every live row m (x's rows of K at X_S, a warp per row), then a
/// barrier. The body declares rinv, M, LT, K, X_S and EPS.
static std::string rowInvRms() {
  return R"cuda(  for (long long m = threadIdx.x >> 5; m < M; m += blockDim.x >> 5) {
    const long long xo = (m / LT * X_S + m % LT) * K;
    float ss = 0.0f;
    for (long long k = threadIdx.x & 31; k < K; k += 32) {
      const float a = l4_ld(x, xo + k);
      ss += a * a;
    }
    ss = l4_warp_sum(ss);
    const float var = (float)((double)ss / (double)K);
    if ((threadIdx.x & 31) == 0)
      rinv[m] = (float)(1.0 / sqrt((double)(var + EPS)));
  }
  __syncthreads();
)cuda";
}

bool tmaExperts(const View &v) {
  auto s = v.shape();
  int64_t bytes = v.ctype == "l4_bf16" ? 2 : 4;
  return !v.hasBatch && s.size() == 3 && v.buf->offset % 16 == 0 &&
         (s[2] * bytes) % 16 == 0;
}

bool choosePipelined(OpContext &ctx, PipelinedGemm &p, bool swiglu, bool tma) {
  Body &b = ctx.body;
  if (swiglu)
    b.configs = {"p128x64", "p128x64s3", "p128x64s4", "t64x64"};
  else
    b.configs = {"p128x128", "p128x128s3", "p128x128s4",
                 "p128x64",  "p128x64s3",  "t64x64"};
  // wgmma is sm_90a's alone (not sm_90, not later architectures).
  // Their widest tiles keep 128 accumulators a thread (a warpgroup's
  // m64n256, or SwiGLU's two m64n128).
  if (ctx.arch == "sm_90a" && !p.a.f32) {
    if (swiglu)
      b.configs.append({"w128x64s3", "w128x64s4", "w128x128s3"});
    else
      b.configs.append({"w128x128s3", "w128x128s4", "w128x256s3"});
    // The stages of the TMA kernels: (128 + BN rows of B and U) x 64
    // columns, up to 192 KiB in all.
    if (tma && swiglu)
      b.configs.append({"tma128x64s4", "tma128x128s3", "tma128x128s4"});
    else if (tma)
      b.configs.append({"tma128x128s4", "tma128x256s3", "tma128x256s4"});
  }
  llvm::StringRef c = ctx.config;
  if (c == "t64x64")
    return false;
  p.tma = c.consume_front("tma");
  if (p.tma)
    p.wgmma = true;
  // {p|w|tma}128x<BN>[s<stages>]
  p.wgmma = p.wgmma || c.consume_front("w");
  c.consume_front("p");
  if (c.consume_front("128x64"))
    p.bn = 64;
  else if (c.consume_front("128x128"))
    p.bn = 128;
  else if (c.consume_front("128x256"))
    p.bn = 256;
  p.stages = c == "s3" ? 3 : c == "s4" ? 4 : 2;
  if (swiglu && !p.wgmma)
    p.bn = 0; // its default, 64
  return true;
}

PipelinedGemm pipelinedGrouped(const TiledGemm &g, PipelinedGemm::Operand b,
                               uint64_t maxN) {
  PipelinedGemm p;
  p.what = g.what;
  p.n = g.n;
  p.r = g.r;
  p.a = {g.a, true, g.aRow};
  p.b = std::move(b);
  p.y = g.y;
  p.store = g.store;
  p.maxN = maxN;
  p.grouped = g.grouped;
  return p;
}

static std::string emitTmaGemm(Body &b, const PipelinedGemm &p,
                               const GemmText *fused);

std::string emitPipelined(Body &b, const PipelinedGemm &p,
                          const GemmText *fused) {
  if (p.tma)
    return emitTmaGemm(b, p, fused);
  std::string text;
  llvm::raw_string_ostream os(text);
  // The norm prologue rescales A's staged rows: only linear has one, and
  // its x is staged row-major.
  const bool norm = fused && fused->spec.norm;
  assert((!norm || p.a.kMajor) && "the norm prologue needs x row-major");
  const bool swiglu = !p.u.ptr.empty();
  const auto &fill = subst;
  // SwiGLU keeps two accumulator sets: half as many columns per tile.
  const int bn = p.bn ? p.bn : swiglu ? 64 : 128, wn = bn / 4, nj = wn / 8;
  assert((p.wgmma ? (bn == 64 || bn == 128 || (bn == 256 && !swiglu))
                  : ((bn == 64 || bn == 128) && (!swiglu || bn == 64))) &&
         "mma.sync: 64 or 128 columns, 64 with SwiGLU; wgmma: up to 256, "
         "128 with SwiGLU");
  const int ns = p.stages;
  assert(ns >= 2 && ns <= 4 && "2 to 4 stages");
  const TiledGemm::Grouped *gr = p.grouped ? &*p.grouped : nullptr;
  assert((!gr || (!gr->overReduction && p.a.kMajor && !norm)) &&
         "grouped: rows by route entry, A row-major, no norm");
  const bool wg = p.wgmma;
  assert((!wg || !swiglu || p.u.kMajor == p.b.kMajor) &&
         "wgmma: B and U alike");
  const bool aF32 = p.a.f32;
  assert((!aF32 || (p.a.kMajor && !wg && !norm && !swiglu)) &&
         "an f32 A: row-major, mma.sync, no norm or SwiGLU");
  // `t` with the tile's expert for @G.
  auto expert = [&](const std::string &t) {
    return gr ? fill(t, "@G", "ge") : t;
  };
  os << "  // " << p.what << "\n"
     << "  constexpr int BM = 128, BN = " << bn
     << ", BK = " << (wg ? 64 : 32) << ", NT = 256, WN = " << wn
     << ", NJ = " << nj << ", NS = " << ns << ";\n";
  if (gr)
    os << groupedDecls(*gr, p.n, p.r);
  else
    os << "  const long long GM = " << p.m << ", GN = " << p.n
       << ", GR = " << p.r << ";\n";
  if (wg)
    os << R"cuda(  // Hopper warpgroup MMAs (wgmma), software-pipelined: 2 warpgroups,
  // warpgroup wm computing rows wm*64.. and all BN columns as m64nBNk16
  // products. The reduction runs in steps of 64 staged in shared memory by
  // 16-byte cp.async copies into NS buffers (NS - 2 steps of copies and
  // one of products in flight). A
  // stage holds an operand along the reduction [row][64 k], its 128-byte
  // rows swizzled as wgmma's 128-byte mode reads them (16-byte piece q of
  // row i at piece q ^ (i % 8)), and one along the output in swizzled atoms
  // of 64 columns x 8 k, from a 1024-byte aligned base.
)cuda";
  else
    os << R"cuda(  // Tensor cores, software-pipelined: 8 warps as 2 x 4, warp (wm, wn)
  // computing rows wm*64.. and columns wn*WN.. as 4 x NJ mma.sync m16n8k16
  // tiles. The reduction runs in steps of 32 staged in shared memory by
  // 16-byte cp.async copies into NS buffers, NS - 1 steps in flight: the
  // next steps' copies overlap this step's products. An operand whose rows
  // run along the
  // reduction is staged [row][k] (rows padded to 40 bf16: 80 bytes, 16-byte
  // aligned, and a warp's fragment reads hit 32 distinct banks); one whose
  // rows run along the output is staged [k][row] (padded to 136) and its
  // fragments are packed from two 16-bit reads.
)cuda";
  // Two stages fit the 48 KiB a block may declare statically; more live in
  // dynamic shared memory (b.sharedBytes), carved in declaration order.
  // An f32 A's stages (rows of 40 floats: a half-warp's 8-byte fragment
  // reads hit 32 banks) take two stages past 48 KiB: all go dynamic.
  unsigned dynamicBytes = 0;
  auto decl = [&](const char *name, bool kMajor, const char *rows, int n,
                  bool f32 = false) {
    std::string dims = kMajor ? ("[" + std::string(rows) + "][BK + 8]")
                              : ("[BK][" + std::string(rows) + " + 8]");
    const char *type = f32 ? "float" : "unsigned short";
    if (ns == 2 && !aF32) {
      os << "  __shared__ __align__(16) " << type << " " << name << "[NS]"
         << dims << ";\n";
      return;
    }
    os << "  auto *" << name << " = reinterpret_cast<" << type << " (*)"
       << dims << ">(l4_dsmem() + " << dynamicBytes << ");\n";
    unsigned perStage = kMajor ? unsigned(n) * 40 * 2 : 32u * (n + 8) * 2;
    dynamicBytes += unsigned(ns) * perStage * (f32 ? 2 : 1);
  };
  if (wg) {
    os << "  unsigned short *const as = @B@_align1024(l4_dsmem());\n"
       << "  unsigned short *const bs = as + NS * BM * BK;\n";
    if (swiglu)
      os << "  unsigned short *const us = bs + NS * BN * BK;\n";
    dynamicBytes = 1024 + unsigned(ns) * (128 + unsigned(bn) * (swiglu ? 2 : 1)) *
                              64 * 2;
    b.globals += kWgmmaGlobals;
    b.inlined = true;
    b.globals += wgmmaMma(nj * 4, !p.a.kMajor, !p.b.kMajor);
  } else {
    decl("as", p.a.kMajor, "BM", 128, aF32);
    decl("bs", p.b.kMajor, "BN", bn);
    if (swiglu)
      decl("us", p.u.kMajor, "BN", bn);
  }
  b.sharedBytes = dynamicBytes;
  if (norm)
    os << "  __shared__ float rinv[BM];\n";
  os << "  __shared__ long long arow[BM], brow[BN];\n";
  os << R"cuda(  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3, wm = warp >> 2, wn = warp & 3;
  const long long steps = (GR + BK - 1) / BK;
)cuda";
  if (gr) {
    os << groupedTileLoop(*gr, p.a.base, p.y);
  } else {
    os << R"cuda(  const long long tilesN = (GN + BN - 1) / BN, tiles = (GM + BM - 1) / BM * tilesN;
  for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const long long m0 = tile / tilesN * BM, n0 = tile % tilesN * BN;
    __syncthreads(); // the previous tile is done with the tables
    for (int i = tid; i < BM; i += NT) {
      const long long m = m0 + i;
      arow[i] = m < GM ? )cuda"
       << (p.a.kMajor ? fill(p.a.base, "@I", "m") : std::string("m"))
       << R"cuda( : -1;
    }
)cuda";
  }
  os << R"cuda(    for (int i = tid; i < BN; i += NT) {
      const long long c = n0 + i;
      brow[i] = c < GN ? )cuda"
     << (p.b.kMajor ? expert(fill(p.b.base, "@I", "c")) : std::string("c"))
     << R"cuda( : -1;
    }
    __syncthreads();
)cuda";
  if (norm)
    os << kTileRowNorm;
  // The copies of one operand into stage s: rows of `rows` output indices
  // (tab holds each row's offset, or -1), reduction columns k0..k0+31;
  // zeros outside the matrices (whole 16-byte pieces are in or out).
  auto stageOf = [&](const PipelinedGemm::Operand &o, const char *tab,
                     const char *rows, const char *tabName) {
    std::string t = tab, rs = rows, ix = tabName, decl, cond, src, dst;
    if (o.f32) {
      // Row i's 4 floats at reduction columns k0 + j...
      os << "      for (int c = tid; c < " << rs << " * BK / 4; c += NT) {\n"
         << "        const int i = c >> 3, j = (c & 7) * 4;\n"
         << "        if (" << ix << "[i] >= 0 && k0 + j < GR)\n"
         << "          l4_cp_async16(&" << t << "[s][i][j], " << o.ptr << " + "
         << ix << "[i] + k0 + j);\n"
         << "        else\n          l4_zero16(&" << t << "[s][i][j]);\n"
         << "      }\n";
      return;
    }
    if (o.kMajor) {
      // Row i's piece at reduction columns k0 + j..; wgmma's stage swizzles
      // the 16-byte pieces of each 128-byte row.
      decl = wg ? "const int i = c >> 3, j = (c & 7) * 8;"
                : "const int i = c >> 2, j = (c & 3) * 8;";
      cond = ix + "[i] >= 0 && k0 + j < GR";
      src = o.ptr + " + " + ix + "[i] + k0 + j";
      dst = wg ? t + " + s * " + rs +
                     " * BK + i * BK + (((j >> 3) ^ (i & 7)) << 3)"
               : "&" + t + "[s][i][j]";
    } else {
      // Reduction row k0 + j's piece at columns i..i + 7; wgmma's stage
      // holds atoms (i / 64, j / 8) of 64 columns x 8 k (the atoms along k
      // adjacent), their pieces swizzled.
      decl = "const int j = c / (" + rs + " / 8), i = c % (" + rs +
             " / 8) * 8;\n        const long long r = k0 + j;";
      cond = "r < GR && " + ix + "[i] >= 0";
      src = o.ptr + " + " + expert(fill(o.base, "@R", "r")) + " + " + ix +
            "[i]";
      dst = wg ? t + " + s * " + rs +
                     " * BK + (i >> 6) * (BK * 64) + (j >> 3) * 512 + "
                     "(j & 7) * 64 + ((((i & 63) >> 3) ^ (j & 7)) << 3)"
               : "&" + t + "[s][j][i]";
    }
    os << "      for (int c = tid; c < " << rs << " * BK / 8; c += NT) {\n"
       << "        " << decl << "\n        if (" << cond << ")\n"
       << "          l4_cp_async16(" << dst << ", " << src << ");\n"
       << "        else\n          l4_zero16(" << dst << ");\n      }\n";
  };
  os << "    auto stage = [&](int s, long long k0) {\n";
  stageOf(p.a, "as", "BM", "arow");
  stageOf(p.b, "bs", "BN", "brow");
  if (swiglu)
    stageOf(p.u, "us", "BN", "brow");
  os << "      l4_cp_async_commit();\n    };\n";
  if (wg) {
    os << "    float acc[NJ * 4][4] = {}" << (swiglu ? ", acc2[NJ * 4][4] = {}" : "")
       << ";\n";
  } else {
    os << mmaAccumulators("4", "NJ", swiglu);
  }
  // The pipeline's head: @A steps of copies ahead; wgmma also keeps one
  // step of products in flight, so its buffers are refilled a step later.
  std::string head = R"cuda(@INTRO
    for (int i = 0; i < @A; ++i) {
      if (i < steps)
        stage(i, i * BK);
      else
        l4_cp_async_commit();
    }
    for (long long step = 0; step < steps; ++step) {
      const int s = (int)(step % NS);
      l4_cp_async_wait<@W>(); // this step's copies have landed ...
@FENCE      __syncthreads(); // ... everyone's, and @DONE
      // Step + @A into the buffer step - @BACK used.
      if (step + @A < steps)
        stage((int)((step + @A) % NS), (step + @A) * BK);
      else
        l4_cp_async_commit();
)cuda";
  auto put = [&](std::initializer_list<std::pair<const char *, const char *>> v) {
    for (auto [var, val] : v)
      head = replaceAll(head, var, val);
  };
  if (wg)
    put({{"@INTRO", R"cuda(    // NS - 2 steps of copies in flight (a group per step, empty past the
    // end, so that the waits count steps) and one step of products: a
    // buffer is refilled two steps after its products were issued, once
    // every warpgroup's wait has retired them.)cuda"},
         {"@FENCE", "      @B@_fence_proxy(); // ... visible to wgmma's reads ...\n"},
         {"@DONE", "every step - 2 product is done"},
         {"@A", "NS - 2"}, {"@W", "NS - 3"}, {"@BACK", "2"}});
  else
    put({{"@INTRO", R"cuda(    // The first NS - 1 steps in flight (a group per step, empty past the
    // end, so that the waits count steps).)cuda"},
         {"@FENCE", ""}, {"@DONE", "everyone is done with step - 1"},
         {"@A", "NS - 1"}, {"@W", "NS - 2"}, {"@BACK", "1"}});
  os << head;
  if (norm && wg)
    os << R"cuda(      // The norm: x * inv * g, rounded as the norm's bf16 output is.
      for (int e = tid; e < BM * BK; e += NT) {
        const int i = e >> 6, j = e & 63;
        const long long k = step * BK + j;
        unsigned short &a = as[s * BM * BK + i * BK + ((((j >> 3) ^ (i & 7)) << 3) | (j & 7))];
        if (arow[i] >= 0 && k < GR)
          a = l4_bf16_bits((__uint_as_float((unsigned)a << 16) * rinv[i]) * l4_ld(nw, k));
      }
      @B@_fence_proxy();
      __syncthreads();
)cuda";
  else if (norm)
    os << R"cuda(      // The norm: x * inv * g, rounded as the norm's bf16 output is.
      for (int e = tid; e < BM * BK; e += NT) {
        const int i = e >> 5, j = e & 31;
        const long long k = step * BK + j;
        if (arow[i] >= 0 && k < GR) {
          const float a = __uint_as_float((unsigned)as[s][i][j] << 16);
          as[s][i][j] = l4_bf16_bits((a * rinv[i]) * l4_ld(nw, k));
        }
      }
      __syncthreads();
)cuda";
  // Fragment registers: the pair at (row, k) and (row, k + 1).
  auto pairAt = [&](const char *tab, bool kMajor, const std::string &row,
                    const std::string &k) {
    if (kMajor)
      return "l4_pair(&" + std::string(tab) + "[s][" + row + "][" + k + "])";
    return "l4_pair2(" + std::string(tab) + "[s][" + k + "][" + row + "], " +
           tab + "[s][" + k + " + 1][" + row + "])";
  };
  if (wg) {
    // Ties the accumulators to this point of the instruction stream.
    auto pin = [&](const char *indent) {
      os << indent << "@B@_pin(acc);\n";
      if (swiglu)
        os << indent << "@B@_pin(acc2);\n";
    };
    os << R"cuda(      // Four k16 products per operand pair: the descriptors advance 32
      // bytes along the swizzled rows.
)cuda";
    pin("      ");
    os << R"cuda(      @B@_fence();
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
)cuda";
    // A K-major operand advances 16 columns of its rows, an MN-major one
    // two atoms; warpgroup wm's 64 rows of A are an atom of its own.
    auto desc = [](bool kMajor) {
      return std::string(kMajor ? "@B@_desc(" : "@B@_desc_mn(");
    };
    auto step = [](bool kMajor) {
      return std::string(kMajor ? " + kk)" : " + kk * 64)");
    };
    os << "        const unsigned long long da = " << desc(p.a.kMajor)
       << "as + s * BM * BK + wm * 64 * BK" << step(p.a.kMajor) << ";\n";
    std::string bDesc = desc(p.b.kMajor), bStep = step(p.b.kMajor);
    os << "        @B@_mma(acc, da, " << bDesc << "bs + s * BN * BK" << bStep
       << ");\n";
    if (swiglu)
      os << "        @B@_mma(acc2, da, " << bDesc << "us + s * BN * BK" << bStep
         << ");\n";
    os << R"cuda(      }
      @B@_commit();
      @B@_wait<1>(); // step - 1's products are done with their stage
)cuda";
    pin("      ");
    os << "    }\n    @B@_wait<0>(); // acc is final\n";
    pin("    ");
    os << R"cuda(    l4_cp_async_wait<0>(); // no copy outlives the tile (the last are empty)
#pragma unroll
    for (int j = 0; j < NJ * 4; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int li = wm * 64 + (warp & 3) * 16 + g + (c >= 2 ? 8 : 0);
          const long long m = m0 + li;
          const long long n = n0 + j * 8 + 2 * t + (c & 1);
)cuda";
  } else {
  if (aF32) {
    // A's pairs of floats, split: hi as bf16, lo the rest as bf16.
    b.globals += R"cuda(__device__ __forceinline__ unsigned @B@_split(const float *p, unsigned &lo) {
  const float2 v = *reinterpret_cast<const float2 *>(p);
  const unsigned short h0 = l4_bf16_bits(v.x), h1 = l4_bf16_bits(v.y);
  lo = (unsigned)l4_bf16_lo(v.x, h0) | ((unsigned)l4_bf16_lo(v.y, h1) << 16);
  return (unsigned)h0 | ((unsigned)h1 << 16);
}
)cuda";
    os << R"cuda(#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        unsigned af[4][4], afl[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = wm * 64 + i * 16 + g;
          af[i][0] = @B@_split(&as[s][r][kk + 2 * t], afl[i][0]);
          af[i][1] = @B@_split(&as[s][r + 8][kk + 2 * t], afl[i][1]);
          af[i][2] = @B@_split(&as[s][r][kk + 2 * t + 8], afl[i][2]);
          af[i][3] = @B@_split(&as[s][r + 8][kk + 2 * t + 8], afl[i][3]);
)cuda";
  } else {
  os << R"cuda(#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        unsigned af[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = wm * 64 + i * 16 + g;
)cuda";
  os << "          af[i][0] = " << pairAt("as", p.a.kMajor, "r", "kk + 2 * t")
     << ";\n"
     << "          af[i][1] = "
     << pairAt("as", p.a.kMajor, "r + 8", "kk + 2 * t") << ";\n"
     << "          af[i][2] = "
     << pairAt("as", p.a.kMajor, "r", "kk + 2 * t + 8") << ";\n"
     << "          af[i][3] = "
     << pairAt("as", p.a.kMajor, "r + 8", "kk + 2 * t + 8") << ";\n";
  }
  os << R"cuda(        }
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
          const int c = wn * WN + j * 8 + g;
)cuda";
  os << "          const unsigned bf[2] = {"
     << pairAt("bs", p.b.kMajor, "c", "kk + 2 * t") << ", "
     << pairAt("bs", p.b.kMajor, "c", "kk + 2 * t + 8") << "};\n";
  if (swiglu)
    os << "          const unsigned uf[2] = {"
       << pairAt("us", p.u.kMajor, "c", "kk + 2 * t") << ", "
       << pairAt("us", p.u.kMajor, "c", "kk + 2 * t + 8") << "};\n";
  os << R"cuda(#pragma unroll
          for (int i = 0; i < 4; ++i) {
)cuda";
  // The small product first (lo x b), then hi x b.
  if (aF32)
    os << "            l4_mma_bf16(acc[i][j], afl[i], bf);\n";
  os << "            l4_mma_bf16(acc[i][j], af[i], bf);\n";
  if (swiglu)
    os << "            l4_mma_bf16(acc2[i][j], af[i], uf);\n";
  os << R"cuda(          }
        }
      }
    }
    l4_cp_async_wait<0>(); // no copy outlives the tile (the last are empty)
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int li = wm * 64 + i * 16 + g + (c >= 2 ? 8 : 0);
          const long long m = m0 + li;
          const long long n = n0 + wn * WN + j * 8 + 2 * t + (c & 1);
)cuda";
  }
  std::string a1 = wg ? "acc[j][c]" : "acc[i][j][c]",
              a2 = wg ? "acc2[j][c]" : "acc2[i][j][c]";
  // Output (m, n)'s place in y or the store: rows by route entry when
  // grouped.
  auto place = [&](const std::string &t) {
    if (!gr)
      return fill(fill(t, "@M", "m"), "@C", "n");
    return fill(fill(fill(expert(t), "@T", "rq[li] / GK"), "@K", "rq[li] % GK"),
                "@C", "n");
  };
  if (gr) {
    os << "          if (rq[li] < 0 || n >= GN)\n            continue;\n";
    if (!gr->rowScale.empty()) {
      a1 = "(" + a1 + " * rsc[li])";
      a2 = "(" + a2 + " * rsc[li])";
    }
  } else {
    os << "          if (m >= GM || n >= GN)\n            continue;\n";
  }
  if (fused)
    os << fused->epilogue(a1, a2, "          ");
  else
    os << "          const float v = " << a1 << ";\n";
  if (!p.store.empty())
    os << "          " << place(p.store) << "\n";
  else
    os << "          l4_st(y, " << place(p.y) << ", v);\n";
  os << "        }\n  }\n";
  b.threads = 256;
  uint64_t colTiles = (p.maxN + bn - 1) / bn;
  b.blocks = gr ? groupedBlocks(*gr, 128, colTiles)
                : gridFor((p.maxM + 127) / 128 * colTiles, 1);
  return text;
}

/// The TMA form of emitPipelined (sm_90a): 384 threads, warpgroup 0 the
/// producer, whose one thread copies each reduction step's stage (A's 128
/// rows, B's and U's BN) by tensor maps over the views into one of NS
/// buffers, the copies completing on that buffer's `full` mbarrier; and
/// consumer warpgroups 1 and 2, which wait for a stage, run wgmma on their
/// 64 rows of A and all BN columns, and, once a later wait has retired
/// those products, release the stage on its `empty` mbarrier (256
/// arrivals). Both sides walk the same tiles (a persistent grid, in groups
/// of 16 row tiles for L2's sake) and steps,
/// so the buffers' phases follow one step counter, and the producer runs
/// up to NS steps ahead, across tiles. The stages are the 128-byte-swizzled
/// ones of emitPipelined's wgmma kernels (TMA's 128B swizzle writes that
/// layout); a tile's rows lie in one batch entry (A's map is [entries]
/// [rows][r]), and what lies outside the tensors arrives as zeros.
static std::string emitTmaGemm(Body &b, const PipelinedGemm &p,
                               const GemmText *fused) {
  const bool swiglu = !p.u.ptr.empty();
  const int bn = p.bn, ns = p.stages;
  const bool norm = fused && fused->spec.norm;
  const TiledGemm::Grouped *gr = p.grouped ? &*p.grouped : nullptr;
  assert((gr || p.aView) && p.bView && (!swiglu || p.uView) && p.a.kMajor &&
         !p.a.f32 && (!swiglu || p.u.kMajor == p.b.kMajor) &&
         (!gr || (!gr->overReduction && !norm)) &&
         (p.uCol.empty() || (!p.b.kMajor && p.uView == p.bView)) &&
         "TMA: whole views, A row-major bf16; grouped by entry, no norm");
  assert((bn == 64 || bn == 128 || (bn == 256 && !swiglu)) && ns >= 2 &&
         ns <= 4 && "TMA: 64 to 256 columns (128 with SwiGLU), 2 to 4 stages");
  const auto &fill = subst;
  // A: [entries][rows][r]; a tile is 128 rows of one entry. Without a seq
  // dim each batch entry is one row: one entry of B rows. Grouped GEMMs
  // gather A's rows instead (cp.async).
  int64_t rows = 0, entries = 0;
  if (!gr) {
    const View &av = *p.aView;
    const int64_t r = av.inner;
    Body::TensorMapUse am{"tmA", av.buf, {}};
    rows = av.hasSeq ? av.rowsPerBatch : av.bmax;
    entries = av.hasSeq ? av.bmax : 1;
    am.map.dims = {uint64_t(r), uint64_t(rows), uint64_t(entries)};
    am.map.strides = {uint64_t(r) * 2, uint64_t(r * rows) * 2};
    am.map.box = {64, 128, 1};
    b.tensorMaps.push_back(am);
  }
  // B, U: [rows][cols] ([experts][rows][cols] when grouped), boxes of 64
  // columns (128 bytes, the swizzle's span) by BN rows when K-major, by 64
  // reduction rows per 64-column atom else.
  auto matrix = [&](const View &v, const char *name, bool kMajor) {
    Body::TensorMapUse m{name, v.buf, {}};
    auto sh = v.shape();
    size_t n = sh.size();
    m.map.dims = {uint64_t(sh[n - 1]), uint64_t(sh[n - 2])};
    m.map.strides = {uint64_t(sh[n - 1]) * 2};
    m.map.box = {64, kMajor ? uint32_t(bn) : 64u};
    if (gr) {
      m.map.dims.push_back(uint64_t(sh[0]));
      m.map.strides.push_back(uint64_t(sh[1] * sh[2]) * 2);
      m.map.box.push_back(1);
    }
    b.tensorMaps.push_back(m);
  };
  matrix(*p.bView, "tmB", p.b.kMajor);
  if (swiglu && p.uCol.empty())
    matrix(*p.uView, "tmU", p.u.kMajor);
  b.globals += kWgmmaGlobals;
  b.globals += kTmaGlobals;
  b.globals += wgmmaMma(bn / 8, false, !p.b.kMajor);
  b.inlined = true;

  std::string text;
  llvm::raw_string_ostream os(text);
  const unsigned stageBytes = unsigned(128 + bn * (swiglu ? 2 : 1)) * 64 * 2;
  os << "  // " << p.what << "\n"
     << "  constexpr int BM = 128, BN = " << bn
     << ", BK = 64, NS = " << ns << ", J = BN / 8;\n";
  if (gr) {
    // The producer warpgroup's 128 threads copy A (a row each), its
    // first thread B and U by TMA: the bytes B_BYTES.
    os << "  constexpr unsigned B_BYTES = " << stageBytes - 128 * 64 * 2
       << "u;\n"
       << "  const long long GN = " << p.n << ", GR = " << p.r << ";\n"
       << llvm::formatv("  constexpr int GE = {0}, GK = {1};\n", gr->experts,
                        gr->slots)
              .str()
       << "  const long long GT = " << gr->tokens << "; // live tokens\n"
       << R"cuda(  // The route table: expert e's entries (token * GK + slot) are
  // route[GE + 1 + goff[e] ..], goff[e + 1] - goff[e] of them. Tiles run
  // expert by expert, column tiles then row tiles; after them, tasks of 64
  // tokens write the zeros of the rows no expert covers.
  __shared__ int goff[GE + 1];
)cuda";
  } else {
    os << "  constexpr unsigned STAGE_BYTES = " << stageBytes << "u;\n"
       << "  const long long GN = " << p.n << ", GR = " << p.r << ";\n"
       << "  // Live rows per entry of A's map, live entries.\n"
       << "  const long long TR = " << (p.aView->hasSeq ? "T" : "B")
       << ", NE = " << (p.aView->hasSeq ? "B" : "1") << ";\n";
  }
  os << R"cuda(  // Warp-specialised Hopper GEMM: TMA copies, wgmma products, NS stages
  // of [128 rows of A | BN of B)cuda"
     << (swiglu ? " | BN of U" : "") << R"cuda(] x 64 reduction columns, 128-byte
  // swizzled, from a 1024-byte aligned base; then the stages' mbarriers.
  unsigned short *const as = @B@_align1024(l4_dsmem());
  unsigned short *const bs = as + NS * BM * BK;
)cuda";
  if (swiglu)
    os << "  unsigned short *const us = bs + NS * BN * BK;\n"
       << "  unsigned long long *const full = reinterpret_cast<unsigned long "
          "long *>(us + NS * BN * BK);\n";
  else
    os << "  unsigned long long *const full = reinterpret_cast<unsigned long "
          "long *>(bs + NS * BN * BK);\n";
  os << R"cuda(  unsigned long long *const empty = full + NS;
@RINV  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
)cuda";
  if (gr)
    os << "  for (int e = tid; e <= GE; e += blockDim.x)\n    goff[e] = "
       << gr->table << "[e];\n";
  os << R"cuda(  if (tid == 0) {
    for (int s = 0; s < NS; ++s) {
      @B@_bar_init(&full[s], @FULL);
      @B@_bar_init(&empty[s], 256);  // every consumer thread
    }
    @B@_bar_fence_init();
  }
  __syncthreads();
  const long long steps = (GR + BK - 1) / BK;
)cuda";
  if (gr)
    os << kGroupedTileCount;
  else
    os << R"cuda(  const long long tilesT = (TR + BM - 1) / BM, tilesN = (GN + BN - 1) / BN;
  const long long tiles = NE * tilesT * tilesN;
)cuda";
  // One stage's TMA copies of B (and U): at (k0, n0) when K-major, per
  // 64-column atom at (n0 + 64a, k0) else; the expert's index last.
  auto copies = [&](const char *buf, const char *map, bool kMajor,
                    const std::string &col) {
    std::string ex = gr ? ", ge" : "", fn = gr ? "@B@_tma(" : "@B@_tma2(";
    if (kMajor)
      os << "        " << fn << buf << " + s * BN * BK, " << map
         << ", &full[s], k0, n0" << ex << ");\n";
    else
      os << "#pragma unroll\n"
         << "        for (int a = 0; a < BN / 64; ++a)\n"
         << "          " << fn << buf << " + s * BN * BK + a * BK * 64, " << map
         << ", &full[s], " << col << "n0 + a * 64, k0" << ex << ");\n";
  };
  auto bCopies = [&]() {
    copies("bs", "tmB", p.b.kMajor, "");
    if (swiglu && p.uCol.empty())
      copies("us", "tmU", p.u.kMajor, "");
    else if (swiglu)
      copies("us", "tmB", p.u.kMajor, p.uCol + " + ");
  };
  if (gr) {
    std::string aRow = groupedEntry(p.a.base);
    os << R"cuda(  if (wg == 0) {
    @B@_regs_producer();
    // Thread pi copies row pi of A's stages (an entry's row of A) by
    // cp.async; a step's copies are waited for NS - 2 steps later (the
    // consumers release a stage one step late, so a longer lag would wait
    // on a release that needs this arrival), made visible to wgmma and
    // arrived on the stage's full barrier (128 arrivals with B's bytes,
    // which thread 0 expects and copies by TMA).
    const int pi = tid;
    long long it = 0; // steps issued, over all tiles
    for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
)cuda" << kGroupedTile
       << "    const int q = m0 + pi < GM ? " << gr->table
       << "[GE + 1 + goff[ge] + m0 + pi] : -1;\n"
       << "    const long long ar = q >= 0 ? " << aRow << " : -1;\n"
       << R"cuda(      for (long long step = 0; step < steps; ++step, ++it) {
        const int s = (int)(it % NS), k0 = (int)(step * BK);
        // Buffer s is free once the consumers released its last use.
        @B@_bar_wait(&empty[s], (unsigned)(it / NS & 1) ^ 1u);
        if (pi == 0) {
          @B@_expect_tx(&full[s], B_BYTES);
)cuda";
    bCopies();
    os << R"cuda(        }
        unsigned short *const arow = as + s * BM * BK + pi * BK;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          unsigned short *const d = arow + ((j ^ (pi & 7)) << 3);
          if (ar >= 0 && k0 + j * 8 < GR)
            l4_cp_async16(d, )cuda"
       << p.a.ptr << R"cuda( + ar + k0 + j * 8);
          else
            l4_zero16(d);
        }
        l4_cp_async_commit();
        l4_cp_async_wait<NS - 2>(); // step it - (NS - 2) has landed
        if (it >= NS - 2) {
          @B@_fence_proxy();
          @B@_arrive(&full[(int)((it - (NS - 2)) % NS)]);
        }
      }
    }
    l4_cp_async_wait<0>();
    @B@_fence_proxy();
    for (long long i = it > NS - 2 ? it - (NS - 2) : 0; i < it; ++i)
      @B@_arrive(&full[(int)(i % NS)]);
    return;
  }
  @B@_regs_consumer();
  const int wm = wg - 1, g = lane >> 2, t = lane & 3;
  long long it = 0; // steps consumed, over all tiles
  for (long long tile = blockIdx.x; tile < tiles + zeroTasks; tile += gridDim.x) {
)cuda" << groupedZeroTask(*gr, p.y, "warp - 4", "8") << kGroupedTile;
  } else {
    os << R"cuda(  if (wg == 0) {
    @B@_regs_producer();
    if (tid != 0)
      return;
    long long it = 0; // steps issued, over all tiles
    for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      long long mt, nt;
      @B@_tile_of(tile, NE * tilesT, tilesN, mt, nt);
      const int t0 = (int)(mt % tilesT * BM), e = (int)(mt / tilesT);
      const int n0 = (int)(nt * BN);
      for (long long step = 0; step < steps; ++step, ++it) {
        const int s = (int)(it % NS), k0 = (int)(step * BK);
        // Buffer s is free once the consumers released its last use.
        @B@_bar_wait(&empty[s], (unsigned)(it / NS & 1) ^ 1u);
        @B@_arrive_tx(&full[s], STAGE_BYTES);
        @B@_tma(as + s * BM * BK, tmA, &full[s], k0, t0, e);
)cuda";
    bCopies();
    os << R"cuda(      }
    }
    return;
  }
  @B@_regs_consumer();
  const int wm = wg - 1, g = lane >> 2, t = lane & 3;
  long long it = 0; // steps consumed, over all tiles
  for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    long long mt, nt;
    @B@_tile_of(tile, NE * tilesT, tilesN, mt, nt);
    const long long t0 = mt % tilesT * BM, e = mt / tilesT;
    const long long n0 = nt * BN;
)cuda";
  }
  if (norm)
    os << R"cuda(    // The norm's inverse RMS of this warpgroup's 64 rows, a warp per row.
    for (int i = warp & 3; i < 64; i += 4) {
      const long long tr = t0 + wm * 64 + i, m = e * TR + tr;
      float ss = 0.0f;
      if (tr < TR)
        for (long long k = lane; k < GR; k += 32) {
          const float a = l4_ld(x, )cuda"
       << fill(p.a.base, "@I", "m") << R"cuda( + k);
          ss += a * a;
        }
      ss = l4_warp_sum(ss);
      const float var = (float)((double)ss / (double)GR);
      if (lane == 0)
        rinv[wm * 64 + i] = (float)(1.0 / sqrt((double)(var + EPS)));
    }
    @B@_wg_sync(wm);
)cuda";
  os << "    float acc[J][4] = {}" << (swiglu ? ", acc2[J][4] = {}" : "")
     << ";\n";
  auto pin = [&](const char *indent) {
    os << indent << "@B@_pin(acc);\n";
    if (swiglu)
      os << indent << "@B@_pin(acc2);\n";
  };
  os << R"cuda(    for (long long step = 0; step < steps; ++step, ++it) {
      const int s = (int)(it % NS);
      @B@_bar_wait(&full[s], (unsigned)(it / NS & 1)); // the stage has landed
)cuda";
  if (norm)
    os << R"cuda(      // The norm on this warpgroup's rows of the stage, in place: x * inv
      // * g, rounded as the norm's bf16 output is; then visible to wgmma.
      for (int q = tid & 127; q < 64 * BK; q += 128) {
        const int i = wm * 64 + (q >> 6), j = q & 63;
        const long long k = step * BK + j;
        unsigned short &a = as[s * BM * BK + i * BK + ((((j >> 3) ^ (i & 7)) << 3) | (j & 7))];
        if (t0 + i < TR && k < GR)
          a = l4_bf16_bits((__uint_as_float((unsigned)a << 16) * rinv[i]) * l4_ld(nw, k));
      }
      @B@_fence_proxy();
      @B@_wg_sync(wm);
)cuda";
  pin("      ");
  os << R"cuda(      @B@_fence();
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        const unsigned long long da = @B@_desc(as + s * BM * BK + wm * 64 * BK + kk);
)cuda";
  std::string bDesc = p.b.kMajor ? "@B@_desc(" : "@B@_desc_mn(",
              bStep = p.b.kMajor ? " + kk)" : " + kk * 64)";
  os << "        @B@_mma(acc, da, " << bDesc << "bs + s * BN * BK" << bStep
     << ");\n";
  if (swiglu)
    os << "        @B@_mma(acc2, da, " << bDesc << "us + s * BN * BK" << bStep
       << ");\n";
  os << R"cuda(      }
      @B@_commit();
      @B@_wait<1>(); // step - 1's products are done with their stage:
)cuda";
  pin("      ");
  os << R"cuda(      if (step > 0)
        @B@_arrive(&empty[(int)((it - 1) % NS)]); // release it
    }
    @B@_wait<0>(); // acc is final
)cuda";
  pin("    ");
  os << R"cuda(    if (steps > 0)
      @B@_arrive(&empty[(int)((it - 1) % NS)]);
)cuda";
  std::string a1 = "acc[j][c]", a2 = "acc2[j][c]";
  if (gr) {
    // This thread's two rows' entries (and scales).
    os << "    int qr[2];\n";
    if (!gr->rowScale.empty())
      os << "    float rs[2];\n";
    os << "    for (int h = 0; h < 2; ++h) {\n"
       << "      const int li = wm * 64 + (warp & 3) * 16 + g + 8 * h;\n"
       << "      const int q = m0 + li < GM ? " << gr->table
       << "[GE + 1 + goff[ge] + m0 + li] : -1;\n"
       << "      qr[h] = q;\n";
    if (!gr->rowScale.empty())
      os << "      rs[h] = q >= 0 ? " << groupedEntry(gr->rowScale)
         << " : 0.0f;\n";
    os << "    }\n";
    if (!gr->rowScale.empty()) {
      a1 = "(acc[j][c] * rs[c >> 1])";
      a2 = "(acc2[j][c] * rs[c >> 1])";
    }
  }
  os << R"cuda(#pragma unroll
    for (int j = 0; j < J; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const long long n = n0 + j * 8 + 2 * t + (c & 1);
)cuda";
  if (gr)
    os << R"cuda(        const int q = qr[c >> 1];
        if (q < 0 || n >= GN)
          continue;
)cuda";
  else
    os << R"cuda(        const long long tr = t0 + wm * 64 + (warp & 3) * 16 + g + (c >= 2 ? 8 : 0);
        if (tr >= TR || n >= GN)
          continue;
        const long long m = e * TR + tr;
)cuda";
  if (fused)
    os << fused->epilogue(a1, a2, "        ");
  else
    os << "        const float v = " << a1 << ";\n";
  auto place = [&](const std::string &t) {
    if (!gr)
      return fill(fill(t, "@M", "m"), "@C", "n");
    return fill(groupedEntry(t), "@C", "n");
  };
  if (!p.store.empty())
    os << "        " << place(p.store) << "\n";
  else
    os << "        l4_st(y, " << place(p.y) << ", v);\n";
  os << "      }\n  }\n";
  text = replaceAll(text, "@RINV",
                    norm ? "  __shared__ float rinv[BM]; // the rows' inverse RMS\n"
                         : "");
  text = replaceAll(text, "@FULL",
                    gr ? "128); // the producers' rows of A, B's bytes"
                       : "1);   // the producer's arrival + the bytes");
  b.threads = 384;
  b.sharedBytes = 1024 + unsigned(ns) * stageBytes + 2 * unsigned(ns) * 8;
  // A persistent grid: one block an SM (an H100 SXM has 132).
  uint64_t colTiles = (p.maxN + bn - 1) / bn;
  uint64_t tilesMax =
      gr ? groupedBlocks(*gr, 128, colTiles)
         : uint64_t(entries) * ((uint64_t(rows) + 127) / 128) * colTiles;
  b.blocks = std::clamp<uint64_t>(tilesMax, 1, 132);
  return text;
}

llvm::Error emitGemm(OpContext &ctx, const GemmSpec &spec) {
  const View &x = ctx.operands[0], &w = ctx.operands[1], &y = ctx.results[0];
  if (!x.hasBatch || !y.hasBatch || x.hasSeq != y.hasSeq)
    return ctx.fail("expected token-major input and result");
  auto ws = w.shape();
  if (ws.size() != 2 || x.inner != ws[1] || y.inner != ws[0])
    return ctx.fail("expected x [.., K], w [N, K] and y [.., N]");
  size_t next = 2;
  // More linears of x (l4c-fuse's qkv): their columns follow w's.
  llvm::SmallVector<int64_t, 4> cols = {ws[0]};
  for (unsigned o = 1; o < spec.outs; ++o) {
    const View &wo = ctx.operands[next++];
    if (o >= ctx.results.size())
      return ctx.fail("expected a result per linear");
    const View &yo = ctx.results[o];
    if (wo.shape().size() != 2 || wo.shape()[1] != ws[1] ||
        yo.inner != wo.shape()[0] || !yo.hasBatch || yo.hasSeq != y.hasSeq ||
        yo.rowsPerBatch != y.rowsPerBatch || wo.ctype != w.ctype ||
        yo.ctype != y.ctype)
      return ctx.fail("expected the linears' weights [N_i, K] and results "
                      "alike but for their widths");
    cols.push_back(wo.shape()[0]);
  }
  if (spec.outs > 1 && (spec.swiglu || spec.adds))
    return ctx.fail("several linears take no SwiGLU or adds");
  if (spec.swiglu && ctx.operands[next++].shape() != ws)
    return ctx.fail("expected the up projection shaped like the gate's");
  if (spec.norm && ctx.operands[next++].inner != ws[1])
    return ctx.fail("expected a norm weight of the input's width");
  size_t firstAdd = next;
  if (ctx.operands.size() != firstAdd + spec.adds)
    return ctx.fail("fused GEMM operands do not match its parts");
  for (unsigned i = 0; i < spec.adds; ++i) {
    const View &r = ctx.operands[firstAdd + i];
    if (!r.hasBatch || r.hasSeq != y.hasSeq || r.inner != y.inner)
      return ctx.fail("expected residuals shaped like the result");
  }

  Body &b = ctx.body;
  GemmText text{spec, ctx};
  llvm::raw_string_ostream os(b.code);
  int64_t allCols = 0;
  for (int64_t c : cols)
    allCols += c;
  os << constant("N", allCols) << constant("K", ws[1])
     << stride(b, "X_S", x.rowsPerBatch) << stride(b, "Y_S", y.rowsPerBatch);
  for (unsigned i = 0; i < spec.adds; ++i)
    os << stride(b, ("R" + llvm::Twine(i) + "_S").str(),
                 ctx.operands[firstAdd + i].rowsPerBatch);
  if (spec.norm)
    os << "  constexpr float EPS = " << floatLit(float(spec.eps)) << ";\n";
  os << "  const long long LT = " << (x.hasSeq ? "T" : "1") << ";\n"
     << "  const long long M = B * LT;\n";
  uint64_t maxM = uint64_t(x.bmax) * x.maxLiveRows();
  if (spec.outs > 1 && maxM > kGemvMaxRows)
    return ctx.fail("several linears in one kernel are generated for at most " +
                    llvm::Twine(kGemvMaxRows) + " rows (weight streaming)");

  if (maxM <= kGemvMaxRows) {
    // Decode-shaped: few rows, so the weights' bytes are the cost. One warp
    // per output column n streams w's row n once (16 bytes per lane per
    // step where the rows allow, U steps' loads in flight at once) and
    // applies it to every live x row, MR rows per pass; x rows come from
    // L1/L2. Rows past M in a pass repeat its first (nothing stores them),
    // so the steps have no branches.
    // Tile configurations vU: U steps in flight. By default 4 with one or
    // two rows; with more, 1 (U x MR rows of x in registers would cost
    // more registers than the loads in flight gain).
    bool vec = ws[1] % 4 == 0;
    int vw = ws[1] % 8 == 0 ? 8 : 4, u = maxM <= 2 ? 4 : 1;
    if (vec) {
      b.configs = {"v" + std::to_string(u)};
      for (const char *c : {"v4", "v2", "v1"})
        if (b.configs.front() != c)
          b.configs.push_back(c);
      llvm::StringRef c = ctx.config;
      if (c.consume_front("v"))
        c.getAsInteger(10, u);
    }
    os << "  constexpr int MR = " << std::clamp<uint64_t>(maxM, 1, 8);
    if (vec)
      os << ", VW = " << vw << ", U = " << u;
    os << ";\n";
    if (spec.norm)
      os << "  // The inverse RMS of every live row, once per block.\n"
         << "  __shared__ float rinv[" << kGemvMaxRows << "];\n"
         << rowInvRms();
    os << R"cuda(  const int lane = threadIdx.x & 31;
  const long long warps = blockDim.x >> 5;
  for (long long n = blockIdx.x * warps + (threadIdx.x >> 5); n < N;
       n += (long long)gridDim.x * warps) {
)cuda";
    // The column's weight row, and where it is stored: column nc of the
    // NC-wide output yc.
    if (spec.outs == 1) {
      os << "    const " << w.ctype << " *const wr = w + n * K;\n"
         << "    " << y.ctype << " *const yc = y;\n"
         << "    const long long nc = n, NC = N;\n";
    } else {
      os << "    // Linear i's columns follow linear i - 1's.\n"
         << "    const " << w.ctype << " *wr;\n    " << y.ctype
         << " *yc;\n    long long nc, NC;\n";
      int64_t at = 0;
      for (unsigned o = 0; o < spec.outs; ++o) {
        std::string suffix = o ? std::to_string(o) : "";
        os << "    " << (o ? "} else " : "")
           << (o + 1 < spec.outs ? "if (n < " + std::to_string(at + cols[o]) +
                                       ") "
                                 : std::string())
           << "{\n      wr = w" << suffix << " + (n - " << at
           << ") * K;\n      yc = y" << suffix << ";\n      nc = n - " << at
           << ";\n      NC = " << cols[o] << ";\n";
        at += cols[o];
      }
      os << "    }\n";
    }
    os << R"cuda(    for (long long m0 = 0; m0 < M; m0 += MR) {
      long long xr[MR];
      float acc[MR], inv[MR];
)cuda";
    if (spec.swiglu)
      os << "      float acc2[MR];\n";
    os << R"cuda(#pragma unroll
      for (int r = 0; r < MR; ++r) {
        const long long m = m0 + r < M ? m0 + r : m0;
        xr[r] = (m / LT * X_S + m % LT) * K;
)cuda";
    os << (spec.norm ? "        inv[r] = rinv[m];\n"
                     : "        inv[r] = 1.0f;\n");
    os << "        acc[r] = 0.0f;\n";
    if (spec.swiglu)
      os << "        acc2[r] = 0.0f;\n";
    os << "      }\n";
    if (vec) {
      // VW elements per lane and step: 8 where the rows allow (16 bytes of
      // bf16), else 4.
      std::string ld = vw == 8 ? "l4_ld8" : "l4_ld4";
      auto steps = [&](llvm::StringRef count) {
        std::string t;
        llvm::raw_string_ostream ts(t);
        ts << "        float wv[" << count << "][VW];\n";
        if (spec.swiglu)
          ts << "        float uv[" << count << "][VW];\n";
        if (spec.norm)
          ts << "        float gv[" << count << "][VW];\n";
        ts << "#pragma unroll\n        for (int s = 0; s < " << count
           << "; ++s) {\n          " << ld
           << "(wr, k + s * 32 * VW, wv[s]);\n";
        if (spec.swiglu)
          ts << "          " << ld << "(wu, n * K + k + s * 32 * VW, uv[s]);\n";
        if (spec.norm)
          ts << "          " << ld << "(nw, k + s * 32 * VW, gv[s]);\n";
        ts << "        }\n#pragma unroll\n        for (int s = 0; s < "
           << count << R"cuda(; ++s)
#pragma unroll
          for (int r = 0; r < MR; ++r) {
            float xv[VW];
            )cuda"
           << ld << R"cuda((x, xr[r] + k + s * 32 * VW, xv);
#pragma unroll
            for (int q = 0; q < VW; ++q) {
)cuda";
        if (spec.norm)
          ts << "              const float a = "
             << text.round("(xv[q] * inv[r]) * gv[s][q]") << ";\n";
        else
          ts << "              const float a = xv[q];\n";
        ts << "              acc[r] = fmaf(a, wv[s][q], acc[r]);\n";
        if (spec.swiglu)
          ts << "              acc2[r] = fmaf(a, uv[s][q], acc2[r]);\n";
        ts << "            }\n          }\n";
        return t;
      };
      os << "      long long k = VW * lane;\n"
         << "      for (; k + (U - 1) * 32 * VW < K; k += U * 32 * VW) {\n"
         << steps("U") << "      }\n"
         << "      for (; k < K; k += 32 * VW) {\n"
         << steps("1") << "      }\n";
    } else {
      os << R"cuda(      for (long long k = lane; k < K; k += 32) {
        const float wv = l4_ld(wr, k);
)cuda";
      if (spec.swiglu)
        os << "        const float uv = l4_ld(wu, n * K + k);\n";
      os << R"cuda(#pragma unroll
        for (int r = 0; r < MR; ++r) {
          const float a = )cuda"
         << text.xValue("xr[r]", "k", "inv[r]") << ";\n"
         << "          acc[r] = fmaf(a, wv, acc[r]);\n";
      if (spec.swiglu)
        os << "          acc2[r] = fmaf(a, uv, acc2[r]);\n";
      os << "        }\n      }\n";
    }
    os << R"cuda(#pragma unroll
      for (int r = 0; r < MR; ++r) {
        acc[r] = l4_warp_sum(acc[r]);
)cuda";
    if (spec.swiglu)
      os << "        acc2[r] = l4_warp_sum(acc2[r]);\n";
    os << R"cuda(      }
      // Lane r stores row m0 + r.
#pragma unroll
      for (int r = 0; r < MR; ++r) {
        const long long m = m0 + r;
        if (lane != r || m >= M)
          continue;
)cuda"
       << text.epilogue("acc[r]", "acc2[r]", "        ")
       << R"cuda(        l4_st(yc, (m / LT * Y_S + m % LT) * NC + nc, v);
      }
    }
  }
)cuda";
    b.threads = 256;
    b.blocks = gridFor(uint64_t(allCols), b.threads / 32);
    return llvm::Error::success();
  }

  bool bf16Operands = x.ctype == "l4_bf16" && w.ctype == "l4_bf16" &&
                      (!spec.swiglu || ctx.operands[2].ctype == "l4_bf16");
  TiledGemm g;
  g.what = "y[m, n] = sum_k x[m, k] * w[n, k] over the M = B * LT live rows; "
           "row m is token (m / LT, m % LT).";
  g.m = "M";
  g.n = "N";
  g.r = "K";
  g.a = "x";
  g.b = "w";
  g.aRow = "(@M / LT * X_S + @M % LT) * K";
  g.aCol = "@R";
  g.bRow = "@C * K";
  g.bCol = "@R";
  g.y = "(@M / LT * Y_S + @M % LT) * N + @C";
  // The normalised x is exact in bf16 only when the norm's output is bf16.
  g.tensorCores = bf16Operands && (!spec.norm || spec.bf16Temps);
  // cp.async copies 16 bytes: rows of a multiple of 8 bf16 from 16-byte
  // aligned bases.
  bool aligned = ws[1] % 8 == 0 &&
                 pieceAligned({&ctx.operands[0], &ctx.operands[1]}) &&
                 (!spec.swiglu || pieceAligned({&ctx.operands[2]}));
  // TMA addresses the operands as whole tensors.
  const bool tma = tmaRows(x, ws[1]) &&
                   tmaMatrix(w, ws[0], ws[1]) &&
                   (!spec.swiglu || tmaMatrix(ctx.operands[2], ws[0], ws[1]));
  PipelinedGemm p;
  if (g.tensorCores && aligned &&
      choosePipelined(ctx, p, spec.swiglu, tma)) {
    p.what = "y[m, n] = sum_k x[m, k] * w[n, k] over the M = B * LT live "
             "rows; row m is token (m / LT, m % LT).";
    p.m = "M";
    p.n = "N";
    p.r = "K";
    p.a = {"x", true, "(@I / LT * X_S + @I % LT) * K"};
    p.b = {"w", true, "@I * K"};
    if (spec.swiglu)
      p.u = {"wu", true, "@I * K"};
    p.y = "(@M / LT * Y_S + @M % LT) * N + @C";
    p.maxM = maxM;
    p.maxN = uint64_t(ws[0]);
    p.aView = &x;
    p.bView = &w;
    if (spec.swiglu)
      p.uView = &ctx.operands[2];
    os << emitPipelined(b, p, &text);
    if (p.tma) // read through the tensor maps alone (x by the norm too)
      for (unsigned i = spec.norm ? 1 : 0; i < (spec.swiglu ? 3u : 2u); ++i)
        ctx.operands[i].referenced = false;
    return llvm::Error::success();
  }
  g.maxTiles = (maxM + 63) / 64 * ((uint64_t(ws[0]) + 63) / 64);
  os << emitTiles(b, g, &text);
  return llvm::Error::success();
}

llvm::Error emitLinear(OpContext &ctx) { return emitGemm(ctx, GemmSpec()); }

llvm::Error emitMoeExperts(OpContext &ctx) {
  const View &x = ctx.operands[0], &scores = ctx.operands[1],
             &gateUp = ctx.operands[2], &down = ctx.operands[3],
             &y = ctx.results[0];
  if (!x.hasBatch || !scores.hasBatch || !y.hasBatch || x.hasSeq != y.hasSeq ||
      x.hasSeq != scores.hasSeq)
    return ctx.fail("expected token-major x, scores and result");
  auto gs = gateUp.shape(), ds = down.shape();
  if (gs.size() != 3 || ds.size() != 3 || gs[2] % 2)
    return ctx.fail("expected gate_up [E, D, 2I] and down [E, I, D]");
  int64_t experts = gs[0], dim = gs[1], inter = gs[2] / 2;
  if (ds[0] != experts || ds[1] != inter || ds[2] != dim || x.inner != dim ||
      y.inner != dim || scores.inner != experts)
    return ctx.fail("operand shapes disagree on E, D or I");
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << constant("E", experts) << constant("D", dim) << constant("I", inter)
     << stride(b, "X_S", x.rowsPerBatch)
     << stride(b, "S_S", scores.rowsPerBatch)
     << stride(b, "Y_S", y.rowsPerBatch)
     << "  const long long LT = " << (x.hasSeq ? "T" : "1") << ";\n"
     << R"cuda(  // One block per token. For each selected expert e (score != 0):
  // h = swiglu((x * s) @ gate_up[e]) a chunk of IC columns at a time in
  // shared memory, then y += h_chunk @ down[e][chunk]. Thread tid owns the
  // output columns c = tid (mod blockDim), so y needs no synchronisation.
  constexpr int IC = 1024;
  __shared__ float hs[IC];
  for (long long r = blockIdx.x; r < B * LT; r += gridDim.x) {
    const long long b = r / LT, t = r - b * LT;
    const long long xo = (b * X_S + t) * D, so = (b * S_S + t) * E;
    const long long yo = (b * Y_S + t) * D;
    for (long long c = threadIdx.x; c < D; c += blockDim.x)
      l4_st(y, yo + c, 0.0f);
    for (long long e = 0; e < E; ++e) {
      const float s = l4_ld(scores, so + e);
      if (s == 0.0f)
        continue;
      const long long gu = e * D * 2 * I, dn = e * I * D;
      for (long long i0 = 0; i0 < I; i0 += IC) {
        const long long cnt = I - i0 < IC ? I - i0 : IC;
        __syncthreads(); // hs is free again
        for (long long ii = threadIdx.x; ii < cnt; ii += blockDim.x) {
          float g = 0.0f, u = 0.0f;
          for (long long c = 0; c < D; ++c) {
            // The score scales the expert's input, as in HF.
            const float z = l4_ld(x, xo + c) * s;
            g = fmaf(z, l4_ld(gate_up, gu + c * 2 * I + i0 + ii), g);
            u = fmaf(z, l4_ld(gate_up, gu + c * 2 * I + I + i0 + ii), u);
          }
          hs[ii] = u * (g / (1.0f + expf(-g)));
        }
        __syncthreads();
        for (long long c = threadIdx.x; c < D; c += blockDim.x) {
          float a = 0.0f;
          for (long long ii = 0; ii < cnt; ++ii)
            a = fmaf(hs[ii], l4_ld(down, dn + (i0 + ii) * D + c), a);
          l4_st(y, yo + c, l4_ld(y, yo + c) + a);
        }
      }
    }
  }
)cuda";
  b.threads = 256;
  b.blocks = gridFor(uint64_t(x.bmax) * x.maxLiveRows(), 1);
  return llvm::Error::success();
}

/// The tile configurations of the decode-shaped routed experts: gN, tasks
/// of N columns (4 entries each) streaming the weights, or c64, the
/// per-token kernel (64 columns a task, each token's experts in turn).
static const char *const kGemvConfigs[] = {"g32", "g64", "g128", "c64"};

/// Offers kGemvConfigs when `vectorisable` and returns the columns a task
/// of the chosen one (0: the per-token kernel).
static int chooseGroupedGemv(OpContext &ctx, bool vectorisable) {
  if (!vectorisable)
    return 0;
  ctx.body.configs.assign(std::begin(kGemvConfigs), std::end(kGemvConfigs));
  llvm::StringRef c = ctx.config;
  int bn = 32;
  if (c == "c64" || (c.consume_front("g") && c.getAsInteger(10, bn)))
    return 0;
  return bn;
}

/// A by-entry grouped GEMM of few rows per expert (decode) as a GEMV that
/// streams the weights: p as pipelinedGrouped describes it, B (and U) with
/// rows along the output and columns a multiple of 8; `bn` columns a task.
static std::string emitGroupedGemv(Body &b, const PipelinedGemm &p, int bn,
                                   const GemmText *swiglu) {
  std::string text;
  llvm::raw_string_ostream os(text);
  assert(p.grouped && !p.grouped->overReduction && !p.b.kMajor &&
         "grouped by entry, B along the output");
  const TiledGemm::Grouped &gr = *p.grouped;
  const bool up = !p.u.ptr.empty();
  auto expert = [&](const std::string &t) { return subst(t, "@G", "ge"); };
  // A tile's rows: at most 4, fewer when the plan has fewer entries.
  const int bm = int(std::clamp<uint64_t>(gr.maxTokens * uint64_t(gr.slots),
                                          1, 4));
  os << "  // " << p.what << "\n"
     << R"cuda(  // Decode-shaped: an expert has few rows, so its weights' bytes are the
  // cost, read once per BM of its rows. A task is BM rows x BN columns;
  // a thread streams 8 consecutive columns of a weight row per step
  // (16-byte loads of bf16), TC threads span the BN columns and the
  // block's NP groups of them split the reduction (group p takes rows
  // p, p + NP, ...). The groups' sums meet by shuffles, then in shared
  // memory, in a fixed order.
)cuda"
     << "  constexpr int BM = " << bm << ", BN = " << bn
     << ", NT = 256, VW = 8, TC = BN / VW, NP = NT / TC, NU = "
     << (up ? 2 : 1) << ", U = " << (bm <= 2 ? 4 : 2) << ";\n"
     << groupedDecls(gr, p.n, p.r)
     << R"cuda(  __shared__ long long arow[BM];
  __shared__ float part[NT / 32][BM][NU][BN];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int cg = tid % TC, p = tid / TC;
)cuda"
     << groupedTileLoop(gr, p.a.base, p.y)
     << R"cuda(    __syncthreads();
    // Rows past the tile's repeat its first (their sums are not stored), so
    // the steps have no branches and U steps' loads are in flight at once.
    const long long rows = GM - m0 < BM ? GM - m0 : BM, n = n0 + cg * VW;
    long long ar[BM];
    float acc[BM][NU][VW];
#pragma unroll
    for (int i = 0; i < BM; ++i) {
      ar[i] = arow[i < rows ? i : 0];
#pragma unroll
      for (int u = 0; u < NU; ++u)
#pragma unroll
        for (int j = 0; j < VW; ++j)
          acc[i][u][j] = 0.0f;
    }
    if (n < GN) {
      long long k = p;
)cuda";
  // S steps from reduction row k: their weights first, then the products.
  auto steps = [&](llvm::StringRef count, llvm::StringRef indent) {
    std::string t;
    auto line = [&](const llvm::Twine &l) {
      std::string text = l.str();
      t += (llvm::StringRef(text).starts_with("#") ? "" : indent.str()) +
           text + "\n";
    };
    line("float wv[" + count + "][NU][VW];");
    line("#pragma unroll");
    line("for (int s = 0; s < " + count + "; ++s) {");
    line("  const long long wo = " +
         subst(expert(p.b.base), "@R", "k + s * NP") + " + n;");
    line("  l4_ld8(" + p.b.ptr + ", wo, wv[s][0]);");
    if (up)
      line("  l4_ld8(" + p.u.ptr + ", " +
           subst(expert(p.u.base), "@R", "k + s * NP") + " + n, wv[s][1]);");
    line("}");
    line("#pragma unroll");
    line("for (int s = 0; s < " + count + "; ++s)");
    line("#pragma unroll");
    line("  for (int i = 0; i < BM; ++i) {");
    line("    const float av = l4_ld(" + p.a.ptr + ", ar[i] + k + s * NP);");
    line("#pragma unroll");
    line("    for (int u = 0; u < NU; ++u)");
    line("#pragma unroll");
    line("      for (int j = 0; j < VW; ++j)");
    line("        acc[i][u][j] = fmaf(av, wv[s][u][j], acc[i][u][j]);");
    line("  }");
    return t;
  };
  os << "      for (; k + (U - 1) * NP < GR; k += U * NP) {\n"
     << steps("U", "        ") << "      }\n"
     << "      for (; k < GR; k += NP) {\n"
     << steps("1", "        ") << "      }\n    }\n";
  os << R"cuda(    // Lanes cg, cg + TC, ... of a warp hold the same columns.
#pragma unroll
    for (int i = 0; i < BM; ++i)
#pragma unroll
      for (int u = 0; u < NU; ++u)
#pragma unroll
        for (int j = 0; j < VW; ++j) {
          float s = acc[i][u][j];
#pragma unroll
          for (int o = TC; o < 32; o <<= 1)
            s += __shfl_xor_sync(0xffffffffu, s, o);
          if (lane < TC)
            part[warp][i][u][cg * VW + j] = s;
        }
    __syncthreads();
    for (int o = tid; o < BM * BN; o += NT) {
      const int li = o / BN;
      const long long c = n0 + o % BN;
      if (li >= rows || c >= GN)
        continue;
      float s[NU];
#pragma unroll
      for (int u = 0; u < NU; ++u) {
        s[u] = 0.0f;
        for (int wi = 0; wi < NT / 32; ++wi)
          s[u] += part[wi][li][u][o % BN];
      }
)cuda";
  std::string a1 = "s[0]", a2 = up ? "s[1]" : "";
  if (!gr.rowScale.empty()) {
    a1 = "(" + a1 + " * rsc[li])";
    if (up)
      a2 = "(" + a2 + " * rsc[li])";
  }
  if (swiglu)
    os << swiglu->epilogue(a1, a2, "      ");
  else
    os << "      const float v = " << a1 << ";\n";
  os << "      l4_st(y, "
     << subst(subst(subst(expert(p.y), "@T", "rq[li] / GK"), "@K",
                    "rq[li] % GK"),
              "@C", "c")
     << ", v);\n    }\n  }\n";
  b.threads = 256;
  b.blocks = groupedBlocks(gr, uint64_t(bm), (p.maxN + bn - 1) / bn);
  return text;
}

llvm::Error emitMoeHidden(OpContext &ctx) {
  const View &x = ctx.operands[0], &scores = ctx.operands[1],
             &gateUp = ctx.operands[2], &h = ctx.results[0];
  if (!x.hasBatch || !scores.hasBatch || !h.hasBatch || x.hasSeq != h.hasSeq ||
      x.hasSeq != scores.hasSeq)
    return ctx.fail("expected token-major x, scores and result");
  auto gs = gateUp.shape(), hs = h.shape();
  if (gs.size() != 3 || gs[2] % 2 || hs.size() < 2)
    return ctx.fail("expected gate_up [E, D, 2I] and h [.., K, I]");
  int64_t experts = gs[0], dim = gs[1], inter = gs[2] / 2,
          slots = hs[hs.size() - 2];
  if (x.inner != dim || scores.inner != experts || hs.back() != inter ||
      h.inner != slots * inter)
    return ctx.fail("operand shapes disagree on E, D, K or I");
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << constant("E", experts) << constant("D", dim) << constant("I", inter)
     << constant("KS", slots, "slots per token")
     << stride(b, "X_S", x.rowsPerBatch)
     << stride(b, "S_S", scores.rowsPerBatch)
     << stride(b, "H_S", h.rowsPerBatch)
     << "  const long long LT = " << (x.hasSeq ? "T" : "1") << ";\n";
  uint64_t maxTokens = uint64_t(x.bmax) * x.maxLiveRows();
  TiledGemm g;
  g.what = "h[m, k, i] = up * silu(gate) with gate = s * sum_d x[m, d] * "
           "gate_up[e, d, i] (up: column I + i), one GEMM per expert e over "
           "its (token, slot) rows; s, the score, scales the accumulators "
           "(HF scales the input: the same product).";
  g.n = "I";
  g.r = "D";
  g.a = "x";
  g.b = "gate_up";
  g.aRow = "(@T / LT * X_S + @T % LT) * D";
  g.aCol = "@R";
  g.bRow = "@G * D * 2 * I + @C";
  g.bCol = "@R * 2 * I";
  g.bByCol = true;
  g.y = "(@T / LT * H_S + @T % LT) * (KS * I) + @K * I + @C";
  g.tensorCores = x.ctype == "l4_bf16" && gateUp.ctype == "l4_bf16";
  g.maxTiles = (uint64_t(inter) + 63) / 64;
  g.grouped = routeGroups(scores, experts, slots);
  g.grouped->rowScale = "l4_ld(scores, (@T / LT * S_S + @T % LT) * E + @G)";
  GemmSpec spec;
  spec.swiglu = true;
  GemmText text{spec, ctx};
  // x's rows run along the reduction (d), gate_up's along the output.
  PipelinedGemm p = pipelinedGrouped(
      g, {"gate_up", false, "@G * D * 2 * I + @R * 2 * I"}, uint64_t(inter));
  p.u = {"wu", false, p.b.base};
  const char *decls = "  const long long M = B * LT;\n"
                      "  const auto *wu = gate_up + I; // the up half of each "
                      "row\n";
  if (maxTokens > kGemvMaxRows) {
    // Prefill and training: each expert's tokens as one GEMM, so an
    // expert's weights are read once per 64 tokens instead of per token.
    os << decls;
    if (g.tensorCores && dim % 8 == 0 && inter % 8 == 0 &&
        pieceAligned({&x, &gateUp}) &&
        choosePipelined(ctx, p, /*swiglu=*/true, tmaExperts(gateUp))) {
      // TMA: the up half is B's tensor from column I on.
      p.bView = p.uView = &gateUp;
      p.uCol = "I";
      os << emitPipelined(b, p, &text);
      return llvm::Error::success();
    }
    os << emitTiles(b, g, &text);
    return llvm::Error::success();
  }
  // Decode: the same grouping, each expert's weights streamed once per 4 of
  // its entries (c64, the per-token kernel below, reads them per token).
  if (int bn = chooseGroupedGemv(ctx, inter % 8 == 0 &&
                                          pieceAligned({&gateUp}))) {
    os << decls << emitGroupedGemv(b, p, bn, &text);
    return llvm::Error::success();
  }
  os << R"cuda(  // Task (row m, slot k, 64 columns of I): the block's 256 threads are 64
  // columns x 4 quarters of D. A thread sums its quarter of
  // gate[i] = sum_d (x[d] * s) * gate_up[e, d, i] and of up (column I + i),
  // reading a row of gate_up's columns per step (consecutive threads,
  // consecutive columns); the quarters meet in shared memory in a fixed
  // order. h = up * silu(gate), f32. Slots past the token's experts are 0.
  constexpr int CW = 64, NQ = 4;
  constexpr long long CHUNKS = (I + CW - 1) / CW;
  __shared__ float part[2][NQ][CW];
  __shared__ long long sexp;
  __shared__ float sscore;
  const int c = threadIdx.x % CW, q = threadIdx.x / CW;
  const long long M = B * LT;
  for (long long task = blockIdx.x; task < M * KS * CHUNKS; task += gridDim.x) {
    const long long chunk = task % CHUNKS, rk = task / CHUNKS;
    const long long k = rk % KS, m = rk / KS;
    const long long b = m / LT, t = m % LT;
    __syncthreads(); // the previous task is done with sexp and part
    if (threadIdx.x == 0) {
      // The k-th expert with a nonzero score, in increasing order.
      long long e = -1, seen = 0;
      float s = 0.0f;
      for (long long j = 0; j < E; ++j) {
        const float v = l4_ld(scores, (b * S_S + t) * E + j);
        if (v != 0.0f && seen++ == k) {
          e = j;
          s = v;
          break;
        }
      }
      sexp = e;
      sscore = s;
    }
    __syncthreads();
    const long long e = sexp, i = chunk * CW + c;
    const float s = sscore;
    float g = 0.0f, u = 0.0f;
    if (e >= 0 && i < I) {
      const long long xo = (b * X_S + t) * D, go = e * D * 2 * I;
      const long long d0 = q * ((D + NQ - 1) / NQ);
      const long long d1 = d0 + (D + NQ - 1) / NQ < D ? d0 + (D + NQ - 1) / NQ : D;
      for (long long d = d0; d < d1; ++d) {
        // The score scales the expert's input, as in HF.
        const float z = l4_ld(x, xo + d) * s;
        g = fmaf(z, l4_ld(gate_up, go + d * 2 * I + i), g);
        u = fmaf(z, l4_ld(gate_up, go + d * 2 * I + I + i), u);
      }
    }
    part[0][q][c] = g;
    part[1][q][c] = u;
    __syncthreads();
    if (q == 0 && i < I) {
      float gs = 0.0f, us = 0.0f;
#pragma unroll
      for (int p = 0; p < NQ; ++p) {
        gs += part[0][p][c];
        us += part[1][p][c];
      }
      const float v = e >= 0 ? us * (gs / (1.0f + expf(-gs))) : 0.0f;
      l4_st(y, (b * H_S + t) * (KS * I) + k * I + i, v);
    }
  }
)cuda";
  b.threads = 256;
  b.blocks = gridFor(uint64_t(x.bmax) * x.maxLiveRows() * uint64_t(slots) *
                         ((uint64_t(inter) + 63) / 64),
                     1);
  return llvm::Error::success();
}

llvm::Error emitMoeDown(OpContext &ctx) {
  const View &h = ctx.operands[0], &scores = ctx.operands[1],
             &down = ctx.operands[2], &y = ctx.results[0];
  if (!h.hasBatch || !scores.hasBatch || !y.hasBatch || h.hasSeq != y.hasSeq ||
      h.hasSeq != scores.hasSeq)
    return ctx.fail("expected token-major h, scores and result");
  auto ds = down.shape(), hs = h.shape();
  if (ds.size() != 3 || hs.size() < 2)
    return ctx.fail("expected down [E, I, D] and h [.., K, I]");
  int64_t experts = ds[0], inter = ds[1], dim = ds[2],
          slots = hs[hs.size() - 2];
  if (y.inner != dim || scores.inner != experts || hs.back() != inter ||
      h.inner != slots * inter)
    return ctx.fail("operand shapes disagree on E, D, K or I");
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << constant("E", experts) << constant("D", dim) << constant("I", inter)
     << constant("KS", slots, "slots per token")
     << stride(b, "H_S", h.rowsPerBatch)
     << stride(b, "S_S", scores.rowsPerBatch)
     << stride(b, "Y_S", y.rowsPerBatch)
     << "  const long long LT = " << (h.hasSeq ? "T" : "1") << ";\n";
  uint64_t maxTokens = uint64_t(y.bmax) * y.maxLiveRows();
  TiledGemm g;
  g.what = "y[m, c] = sum_i h[m, 0, i] * down[e, i, c], one GEMM per expert "
           "e over its tokens.";
  g.n = "D";
  g.r = "I";
  g.a = "h";
  g.b = "down";
  g.aRow = "(@T / LT * H_S + @T % LT) * (KS * I) + @K * I";
  g.aCol = "@R";
  g.bRow = "@G * I * D + @C";
  g.bCol = "@R * D";
  g.bByCol = true;
  g.y = "(@T / LT * Y_S + @T % LT) * D + @C";
  // bf16 plans: tensor cores, f32 activations staged as hi + lo bf16.
  g.tensorCores =
      down.ctype == "l4_bf16" && (h.ctype == "l4_bf16" || h.ctype == "float");
  g.aSplit = h.ctype == "float";
  g.maxTiles = (uint64_t(dim) + 63) / 64;
  g.grouped = routeGroups(scores, experts, slots);
  // h's rows run along the reduction (i), down's along the output.
  PipelinedGemm p =
      pipelinedGrouped(g, {"down", false, "@G * I * D + @R * D"}, uint64_t(dim));
  // One expert per token (Llama 4's top_k): each output row belongs to one
  // expert's GEMM. (With more, the rows of several experts' GEMMs would
  // have to be summed in order: the per-token kernel below.)
  if (maxTokens > kGemvMaxRows && slots == 1) {
    os << "  const long long M = B * LT;\n";
    // Training keeps h in f32: split into bf16 hi + lo at the fragments.
    p.a.f32 = h.ctype == "float";
    if ((h.ctype == "l4_bf16" || p.a.f32) && down.ctype == "l4_bf16" &&
        inter % 8 == 0 && dim % 8 == 0 && pieceAligned({&h, &down}) &&
        choosePipelined(ctx, p, /*swiglu=*/false, tmaExperts(down))) {
      p.bView = &down;
      os << emitPipelined(b, p);
      if (p.tma)
        readByTmaOnly(ctx, down);
      return llvm::Error::success();
    }
    os << emitTiles(b, g);
    return llvm::Error::success();
  }
  // Decode: the same grouping, each expert's weights streamed once per 4 of
  // its tokens (c64, the per-token kernel below, reads them per token).
  if (int bn = chooseGroupedGemv(ctx, slots == 1 && dim % 8 == 0 &&
                                          pieceAligned({&down}))) {
    os << "  const long long M = B * LT;\n"
       << emitGroupedGemv(b, p, bn, nullptr);
    return llvm::Error::success();
  }
  os << R"cuda(  // Task (row m, 64 output columns): 256 threads = 64 columns x 4
  // quarters of I. For each of the token's experts in increasing order,
  // y_e[col] = sum_i h[k, i] * down[e, i, col] (quarters combined in shared
  // memory in a fixed order), added to the sum as the CPU adds them.
  constexpr int CW = 64, NQ = 4;
  constexpr long long CHUNKS = (D + CW - 1) / CW;
  __shared__ float part[NQ][CW];
  const int c = threadIdx.x % CW, q = threadIdx.x / CW;
  const long long M = B * LT;
  for (long long task = blockIdx.x; task < M * CHUNKS; task += gridDim.x) {
    const long long chunk = task % CHUNKS, m = task / CHUNKS;
    const long long b = m / LT, t = m % LT, col = chunk * CW + c;
    const long long i0 = q * ((I + NQ - 1) / NQ);
    const long long i1 = i0 + (I + NQ - 1) / NQ < I ? i0 + (I + NQ - 1) / NQ : I;
    float acc = 0.0f;
    long long k = 0;
    for (long long e = 0; e < E && k < KS; ++e) {
      if (l4_ld(scores, (b * S_S + t) * E + e) == 0.0f)
        continue;
      const long long ho = (b * H_S + t) * (KS * I) + k * I, dn = e * I * D;
      float p = 0.0f;
      if (col < D)
        for (long long i = i0; i < i1; ++i)
          p = fmaf(l4_ld(h, ho + i), l4_ld(down, dn + i * D + col), p);
      __syncthreads(); // the previous expert's parts are read
      part[q][c] = p;
      __syncthreads();
      if (q == 0) {
        float ye = 0.0f;
#pragma unroll
        for (int r = 0; r < NQ; ++r)
          ye += part[r][c];
        acc += ye;
      }
      ++k;
    }
    if (q == 0 && col < D)
      l4_st(y, (b * Y_S + t) * D + col, acc);
  }
)cuda";
  b.threads = 256;
  b.blocks = gridFor(uint64_t(y.bmax) * y.maxLiveRows() *
                         ((uint64_t(dim) + 63) / 64),
                     1);
  return llvm::Error::success();
}

/// emitMoeRoute's code for `scores` and `table` (a body's `scores` and `y`):
/// one block of 256 threads.
static llvm::Expected<std::string> moeRouteCode(OpContext &ctx,
                                                const View &scores,
                                                const View &table,
                                                int64_t slots) {
  if (!scores.hasBatch || table.hasBatch || table.ctype != "int")
    return ctx.fail("expected token-major scores and an i32 table");
  int64_t experts = scores.inner;
  uint64_t tokens = uint64_t(scores.bmax) * scores.maxLiveRows();
  if (table.inner != experts + 1 + int64_t(tokens) * slots)
    return ctx.fail("table size disagrees with E, the tokens and the slots");
  Body &b = ctx.body;
  std::string code;
  llvm::raw_string_ostream os(code);
  os << constant("E", experts) << constant("KS", slots, "slots per token")
     << constant("N", table.inner, "table entries")
     << stride(b, "S_S", scores.rowsPerBatch)
     << "  const long long LT = " << (scores.hasSeq ? "T" : "1") << ";\n"
     << R"cuda(  // One block of NW warps; warp w owns a contiguous range of the live
  // tokens. Pass 0 counts each warp's entries per expert; thread 0 turns
  // the counts into each (warp, expert)'s first position (expert-major,
  // then warp order = token order); pass 1 writes the entries. Within 32
  // tokens a lane's position among the lanes with the same expert comes
  // from the warp's other lanes through shuffles.
  constexpr int NW = 8;
  __shared__ int cur[NW][E];
  __shared__ int off[E + 1];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const long long M = B * LT;
  const long long per = (M + NW - 1) / NW;
  const long long t0 = w * per < M ? w * per : M;
  const long long t1 = t0 + per < M ? t0 + per : M;
  for (int e = lane; e < E; e += 32)
    cur[w][e] = 0;
  __syncwarp();
  for (int pass = 0; pass < 2; ++pass) {
    for (long long c0 = t0; c0 < t1; c0 += 32) {
      const long long m = c0 + lane;
      // The token's first KS experts with a nonzero score, in order.
      int ex[KS];
      int n = 0;
#pragma unroll
      for (int k = 0; k < KS; ++k)
        ex[k] = -1;
      if (m < t1) {
        const long long so = (m / LT * S_S + m % LT) * E;
        for (int e0 = 0; e0 < E; e0 += 8) {
          float v[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) // eight loads in flight
            v[j] = e0 + j < E ? l4_ld(scores, so + e0 + j) : 0.0f;
#pragma unroll
          for (int j = 0; j < 8; ++j)
            if (v[j] != 0.0f && n < KS)
              ex[n++] = e0 + j;
        }
      }
      int before[KS], total[KS];
#pragma unroll
      for (int k = 0; k < KS; ++k)
        before[k] = total[k] = 0;
      for (int l = 0; l < 32; ++l)
#pragma unroll
        for (int k2 = 0; k2 < KS; ++k2) {
          const int el = __shfl_sync(0xffffffffu, ex[k2], l);
#pragma unroll
          for (int k = 0; k < KS; ++k)
            if (el >= 0 && el == ex[k]) {
              ++total[k];
              before[k] += l < lane;
            }
        }
      int pos[KS];
#pragma unroll
      for (int k = 0; k < KS; ++k)
        pos[k] = ex[k] >= 0 ? cur[w][ex[k]] + before[k] : 0;
      __syncwarp(); // every lane has read cur
#pragma unroll
      for (int k = 0; k < KS; ++k)
        if (ex[k] >= 0 && before[k] == 0)
          cur[w][ex[k]] += total[k];
      __syncwarp();
      if (pass == 1)
#pragma unroll
        for (int k = 0; k < KS; ++k)
          if (ex[k] >= 0)
            y[E + 1 + pos[k]] = (int)(m * KS + k);
    }
    __syncthreads();
    if (pass == 0 && threadIdx.x == 0) {
      int at = 0;
      for (int e = 0; e < E; ++e) {
        off[e] = at;
        for (int v = 0; v < NW; ++v) {
          const int c = cur[v][e];
          cur[v][e] = at;
          at += c;
        }
      }
      off[E] = at;
    }
    __syncthreads();
  }
  for (int e = threadIdx.x; e <= E; e += blockDim.x)
    y[e] = off[e];
  for (long long i = E + 1 + off[E] + threadIdx.x; i < N; i += blockDim.x)
    y[i] = -1;
)cuda";
  return code;
}

llvm::Error emitMoeRoute(OpContext &ctx, int64_t slots) {
  auto code = moeRouteCode(ctx, ctx.operands[0], ctx.results[0], slots);
  if (!code)
    return code.takeError();
  ctx.body.code += *code;
  ctx.body.threads = 256;
  ctx.body.blocks = 1;
  return llvm::Error::success();
}


llvm::Error emitRouterGroup(OpContext &ctx, const RouterGroup &g) {
  const View &x = ctx.operands[0], &w = ctx.operands[1], &nw = ctx.operands[2];
  const View &xn = ctx.results[0], &sc = ctx.results[1],
             &table = ctx.results[2];
  const int64_t K = x.inner, E = sc.inner;
  if (w.shape().size() != 2 || w.shape()[0] != E || w.shape()[1] != K ||
      nw.inner != K || xn.inner != K)
    return ctx.fail("expected x [B, S, K], a router weight [E, K] and "
                    "scores [B, S, E]");
  auto lt = liveRows(ctx, {&x, &sc, &xn});
  if (!lt)
    return lt.takeError();
  const uint64_t maxM = maxRows(x);
  if (maxM > kGemvMaxRows || maxM * uint64_t(E) > kRouterFuseMaxLogits)
    return ctx.fail("the fused router is generated for at most " +
                    llvm::Twine(kGemvMaxRows) + " rows and " +
                    llvm::Twine(kRouterFuseMaxLogits) + " logits");
  auto route = moeRouteCode(ctx, sc, table, g.slots);
  if (!route)
    return route.takeError();
  Body &b = ctx.body;
  b.globals += topkGlobals();
  // The logits (f32, rounded as their dtype says) after the counter.
  b.workspaceBytes = 256 + maxM * uint64_t(E) * 4;
  const bool vec = K % 8 == 0;
  const int mr = int(std::clamp<uint64_t>(maxM, 1, 8));
  auto roundNorm = [&](const std::string &v) {
    return g.bf16Norm ? "l4_round_bf16(" + v + ")" : v;
  };
  std::string code;
  llvm::raw_string_ostream os(code);
  os << constant("K", K) << constant("E", E)
     << constant("MAXM", int64_t(maxM), "rows at the compiled maxima")
     << constant("TOPK", std::min(g.topK, E))
     << "  constexpr int MR = " << mr << ", NT = 256, NWARP = NT / 32;\n"
     << stride(b, "X_S", x.rowsPerBatch) << stride(b, "SC_S", sc.rowsPerBatch)
     << stride(b, "XN_S", xn.rowsPerBatch)
     << "  constexpr float EPS = " << floatLit(float(g.eps)) << ";\n"
     << "  const long long LT = " << *lt << ";\n"
     << "  const long long M = B * LT;\n"
     << "  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;\n"
     << "  __shared__ float rinv[MAXM];\n"
     << "  // The inverse RMS of every live row, in every block.\n"
     << rowInvRms()
     << R"cuda(  // This block's share of the normalised rows, a result of the kernel.
  for (long long i = blockIdx.x * (long long)NT + threadIdx.x; i < M * K;
       i += (long long)gridDim.x * NT) {
    const long long m = i / K, k = i - m * K;
    l4_st(xn, (m / LT * XN_S + m % LT) * K + k,
          (l4_ld(x, (m / LT * X_S + m % LT) * K + k) * rinv[m]) * l4_ld(nw, k));
  }
  // The logits: a block per expert, its threads splitting the reduction;
  // each warp's sums, then the warps' in order (the same on every run).
  float *const lg = reinterpret_cast<float *>(ws + 256);
  __shared__ float part[NWARP][MR];
  for (long long n = blockIdx.x; n < E; n += gridDim.x) {
    for (long long m0 = 0; m0 < M; m0 += MR) {
      long long xr[MR];
      float acc[MR], inv[MR];
#pragma unroll
      for (int r = 0; r < MR; ++r) {
        const long long m = m0 + r < M ? m0 + r : m0;
        xr[r] = (m / LT * X_S + m % LT) * K;
        inv[r] = rinv[m];
        acc[r] = 0.0f;
      }
)cuda";
  if (vec) {
    os << R"cuda(#pragma unroll 4
      for (long long k = 8 * threadIdx.x; k < K; k += 8 * NT) {
        float wv[8];
        l4_ld8(w, n * K + k, wv);
        float gv[8];
        l4_ld8(nw, k, gv);
#pragma unroll
        for (int r = 0; r < MR; ++r) {
          float xv[8];
          l4_ld8(x, xr[r] + k, xv);
#pragma unroll
          for (int q = 0; q < 8; ++q)
            acc[r] = fmaf()cuda"
       << roundNorm("(xv[q] * inv[r]) * gv[q]")
       << R"cuda(, wv[q], acc[r]);
        }
      }
)cuda";
  } else {
    os << R"cuda(      for (long long k = threadIdx.x; k < K; k += NT) {
        const float wv = l4_ld(w, n * K + k);
        const float gv = l4_ld(nw, k);
#pragma unroll
        for (int r = 0; r < MR; ++r)
          acc[r] = fmaf()cuda"
       << roundNorm("(l4_ld(x, xr[r] + k) * inv[r]) * gv")
       << R"cuda(, wv, acc[r]);
      }
)cuda";
  }
  os << R"cuda(#pragma unroll
      for (int r = 0; r < MR; ++r) {
        const float v = l4_warp_sum(acc[r]);
        if (lane == 0)
          part[warp][r] = v;
      }
      __syncthreads();
      if (threadIdx.x < MR && m0 + threadIdx.x < M) {
        float v = 0.0f;
        for (int q = 0; q < NWARP; ++q)
          v += part[q][threadIdx.x];
        lg[(m0 + threadIdx.x) * E + n] = )cuda"
     << (g.bf16Logits ? "l4_round_bf16(v)" : "v") << R"cuda(;
      }
      __syncthreads(); // part is free again
    }
  }
  // The last block to finish its logits scores every row and routes.
  if (!l4_last_block(ws))
    return;
  // The logits to shared memory, their workspace bytes back to zero (the
  // split decode attention keeps its counters there; see Body).
  __shared__ float lgs[MAXM * E];
  for (long long i = threadIdx.x; i < M * E; i += NT) {
    lgs[i] = l4_ldcg(lg + i);
    lg[i] = 0.0f;
  }
  __syncthreads();
  // One thread per row, as router_scores does.
  for (long long m = threadIdx.x; m < M; m += NT) {
    const long long so = (m / LT * SC_S + m % LT) * E;
)cuda"
     << topkScoresRow("lgs", "m * E", "scores", "so") << R"cuda(  }
  __syncthreads(); // the scores, for the route below
  {
)cuda"
     << *route << "  }\n";
  b.code += code;
  b.threads = 256;
  b.blocks = uint64_t(std::min<int64_t>(E, 1024));
  return llvm::Error::success();
}

} // namespace l4c::cuda
