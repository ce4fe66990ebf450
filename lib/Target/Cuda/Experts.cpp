//===- Experts.cpp - CUDA for the routed experts' backward ----------------===//
//
// The parts l4c-split-experts makes of moe_experts_grad. Four are grouped
// GEMMs of Matmul.cpp's tiles, one GEMM per expert over the entries of the
// route table (l4.moe_route): the recomputed gate and up projections, the
// gradient through the down projection and SwiGLU, the gradient of the
// expert's input per slot, and the two weight gradients, whose reduction
// runs over the expert's entries in route order (so each sum has a fixed
// order, no atomics). The last combines the slots' input gradients into the
// token's and takes the score gradients, one block per token.
//
//===----------------------------------------------------------------------===//
#include "Emit.h"
#include "llvm/Support/FormatVariadic.h"

namespace l4c::cuda {

namespace {

/// The extents every part shares: experts, hidden size, expert width, slots.
struct Dims {
  int64_t e = 0, d = 0, i = 0, k = 0;
};

/// A per-slot view [B, S, K, W]: K from its shape.
int64_t slotsOf(const View &v) {
  auto s = v.shape();
  return s.size() >= 2 ? s[s.size() - 2] : 0;
}

/// The route table's check: an i32 table of E + 1 + tokens * K entries.
llvm::Error checkRoute(const OpContext &ctx, const View &route,
                       const View &scores, const Dims &d) {
  uint64_t tokens = uint64_t(scores.bmax) * scores.maxLiveRows();
  if (route.hasBatch || route.ctype != "int" ||
      route.inner != d.e + 1 + int64_t(tokens) * d.k)
    return ctx.fail("expected the route table of the scores and slots");
  return llvm::Error::success();
}

/// Token-major views that agree on their live rows.
llvm::Expected<std::string> tokenRows(const OpContext &ctx,
                                      std::initializer_list<const View *> vs) {
  for (const View *v : vs)
    if (!v->hasBatch)
      return ctx.fail("expected token-major activations");
  return liveRows(ctx, vs);
}

TiledGemm::Grouped grouped(const View &scores, const Dims &d) {
  return routeGroups(scores, d.e, d.k);
}

/// The constants and strides every part declares.
void declare(OpContext &ctx, const Dims &d, llvm::StringRef lt,
             llvm::ArrayRef<std::pair<const char *, const View *>> strides) {
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << constant("E", d.e) << constant("D", d.d) << constant("I", d.i)
     << constant("KS", d.k, "slots per token");
  for (auto [name, v] : strides)
    os << stride(b, name, v->rowsPerBatch);
  os << "  const long long LT = " << lt << ";\n"
     << "  const long long M = B * LT;\n";
}

/// Tensor cores for a bf16 plan's GEMM: `weights` bf16 (never in an f32
/// plan: no TF32), `acts` bf16 or f32. An operand whose values are not bf16
/// (the f32 per-slot values, products) is staged as a hi + lo bf16 pair
/// (TiledGemm::aSplit, bSplit), which keeps it about as exact as the CPU's
/// f32 arithmetic.
bool tensorCores(const View &weights, const View &acts) {
  return weights.ctype == "l4_bf16" &&
         (acts.ctype == "l4_bf16" || acts.ctype == "float");
}

/// Operands emitPipelined can copy: bf16, from 16-byte aligned buffers.
bool bf16Pieces(std::initializer_list<const View *> views) {
  for (const View *v : views)
    if (v->ctype != "l4_bf16")
      return false;
  return pieceAligned(views);
}

/// emitOverEntries for a weight gradient over m x n outputs per expert,
/// when it fits (tensor cores; `sizes`, the extents and the strides of the
/// operands' rows in elements, multiples of a piece of 8 or 4; the buffers
/// 16-byte aligned) and the tuning file does not ask for emitTiles.
bool overEntries(OpContext &ctx, const TiledGemm &g, const Dims &d,
                 int64_t m, int64_t n, std::initializer_list<int64_t> sizes,
                 std::initializer_list<const View *> views) {
  if (!g.tensorCores || !pieceAligned(views))
    return false;
  int piece = 8;
  for (int64_t s : sizes) {
    if (s % piece != 0)
      piece = s % 4 == 0 ? 4 : 0;
    if (!piece)
      return false; // emitTiles reads element by element
  }
  ctx.body.configs = {"e128x128", "t64x64"};
  if (ctx.config == "t64x64")
    return false;
  uint64_t tiles = uint64_t(d.e) * ((uint64_t(m) + 127) / 128) *
                   ((uint64_t(n) + 127) / 128);
  ctx.body.code += emitOverEntries(ctx.body, g, piece, tiles);
  return true;
}

// Offsets of the per-slot rows: gate/up [.., K, 2I], the input's [.., K, D].
constexpr const char *kGuRow = "(@T / LT * G_S + @T % LT) * (KS * 2 * I) + "
                               "@K * 2 * I";

} // namespace

TiledGemm::Grouped routeGroups(const View &scores, int64_t experts,
                               int64_t slots) {
  TiledGemm::Grouped gr;
  gr.table = "route";
  gr.experts = experts;
  gr.slots = slots;
  gr.tokens = "M";
  gr.scores = "scores";
  gr.scoreRow = "(@T / LT * S_S + @T % LT) * E";
  gr.maxTokens = uint64_t(scores.bmax) * scores.maxLiveRows();
  return gr;
}

llvm::Error emitMoeGateUp(OpContext &ctx) {
  const View &x = ctx.operands[0], &scores = ctx.operands[1],
             &gateUp = ctx.operands[2], &route = ctx.operands[3],
             &gu = ctx.results[0];
  auto lt = tokenRows(ctx, {&x, &scores, &gu});
  if (!lt)
    return lt.takeError();
  auto gs = gateUp.shape();
  if (gs.size() != 3 || gs[2] % 2 || x.inner != gs[1] || scores.inner != gs[0])
    return ctx.fail("expected x [.., D], scores [.., E], gate_up [E, D, 2I]");
  Dims d{gs[0], gs[1], gs[2] / 2, slotsOf(gu)};
  if (gu.inner != d.k * 2 * d.i)
    return ctx.fail("expected the result [.., K, 2I]");
  if (auto err = checkRoute(ctx, route, scores, d))
    return err;
  declare(ctx, d, *lt, {{"X_S", &x}, {"S_S", &scores}, {"G_S", &gu}});
  TiledGemm g;
  g.what = "gu[m, k, :] = s * (x[m] @ gate_up[e]) for the token's k-th "
           "expert e (score s): one GEMM per expert over its entries.";
  g.n = "2 * I";
  g.r = "D";
  g.a = "x";
  g.b = "gate_up";
  g.aRow = "(@T / LT * X_S + @T % LT) * D";
  g.aCol = "@R";
  g.bRow = "@G * D * 2 * I + @C";
  g.bCol = "@R * 2 * I";
  g.bByCol = true;
  g.y = std::string(kGuRow) + " + @C";
  g.tensorCores = tensorCores(gateUp, x);
  g.maxTiles = (uint64_t(2 * d.i) + 63) / 64;
  g.grouped = grouped(scores, d);
  g.grouped->rowScale = "l4_ld(scores, (@T / LT * S_S + @T % LT) * E + @G)";
  // x's rows run along the reduction (d), gate_up's along the output.
  PipelinedGemm p = pipelinedGrouped(
      g, {"gate_up", false, "@G * D * 2 * I + @R * 2 * I"}, uint64_t(2 * d.i));
  if (bf16Pieces({&x, &gateUp}) && d.d % 8 == 0 && d.i % 4 == 0 &&
      choosePipelined(ctx, p, /*swiglu=*/false, tmaExperts(gateUp))) {
    p.bView = &gateUp;
    ctx.body.code += emitPipelined(ctx.body, p);
    if (p.tma)
      readByTmaOnly(ctx, gateUp);
    return llvm::Error::success();
  }
  ctx.body.code += emitTiles(ctx.body, g);
  return llvm::Error::success();
}

llvm::Error emitMoeDownGrad(OpContext &ctx) {
  const View &gu = ctx.operands[0], &scores = ctx.operands[1],
             &down = ctx.operands[2], &dy = ctx.operands[3],
             &route = ctx.operands[4], &dgu = ctx.results[0];
  auto lt = tokenRows(ctx, {&gu, &scores, &dy, &dgu});
  if (!lt)
    return lt.takeError();
  auto ds = down.shape();
  if (ds.size() != 3 || scores.inner != ds[0] || dy.inner != ds[2])
    return ctx.fail("expected scores [.., E], down [E, I, D], dy [.., D]");
  Dims d{ds[0], ds[2], ds[1], slotsOf(gu)};
  if (gu.inner != d.k * 2 * d.i || dgu.inner != gu.inner)
    return ctx.fail("expected gu and the result [.., K, 2I]");
  if (auto err = checkRoute(ctx, route, scores, d))
    return err;
  declare(ctx, d, *lt,
          {{"G_S", &gu}, {"S_S", &scores}, {"DY_S", &dy}, {"Y_S", &dgu}});
  TiledGemm g;
  g.what = "dh[m, k, i] = sum_d dy[m, d] * down[e, i, d], one GEMM per "
           "expert over its entries; the epilogue applies SwiGLU's backward "
           "at gu (the CPU's double formula) and stores the gate's and the "
           "up's gradients.";
  g.n = "I";
  g.r = "D";
  g.a = "dy";
  g.b = "down";
  g.aRow = "(@T / LT * DY_S + @T % LT) * D";
  g.aCol = "@R";
  g.bRow = "@G * I * D + @C * D";
  g.bCol = "@R";
  std::string row = "(@T / LT * Y_S + @T % LT) * (KS * 2 * I) + @K * 2 * I";
  g.y = row + " + @C";
  std::string guRow = std::string(kGuRow) + " + @C";
  // clang-format off
  g.store = "{\n"
            "            const long long o = " + g.y + ", go = " + guRow + ";\n"
            "            const double gv = l4_ld(gu, go), uv = l4_ld(gu, go + I);\n"
            "            const double sg = 1.0 / (1.0 + exp(-gv));\n"
            "            l4_st(y, o, (float)((double)v * uv * sg * (1.0 + gv * (1.0 - sg))));\n"
            "            l4_st(y, o + I, (float)((double)v * gv * sg));\n"
            "          }";
  // clang-format on
  g.tensorCores = tensorCores(down, dy);
  g.maxTiles = (uint64_t(d.i) + 63) / 64;
  g.grouped = grouped(scores, d);
  g.grouped->zeroCols = "2 * I";
  // Both operands' rows run along the reduction (d).
  PipelinedGemm p =
      pipelinedGrouped(g, {"down", true, "@G * I * D + @I * D"}, uint64_t(d.i));
  if (bf16Pieces({&dy, &down}) && d.d % 8 == 0 &&
      choosePipelined(ctx, p, /*swiglu=*/false, tmaExperts(down))) {
    p.bView = &down;
    ctx.body.code += emitPipelined(ctx.body, p);
    if (p.tma)
      readByTmaOnly(ctx, down);
    return llvm::Error::success();
  }
  ctx.body.code += emitTiles(ctx.body, g);
  return llvm::Error::success();
}

llvm::Error emitMoeDownGradWeight(OpContext &ctx) {
  const View &gu = ctx.operands[0], &scores = ctx.operands[1],
             &dy = ctx.operands[2], &route = ctx.operands[3],
             &dDown = ctx.results[0];
  auto lt = tokenRows(ctx, {&gu, &scores, &dy});
  if (!lt)
    return lt.takeError();
  auto ws = dDown.shape();
  if (ws.size() != 3 || dDown.hasBatch || scores.inner != ws[0] ||
      dy.inner != ws[2])
    return ctx.fail("expected the result [E, I, D] and dy [.., D]");
  Dims d{ws[0], ws[2], ws[1], slotsOf(gu)};
  if (gu.inner != d.k * 2 * d.i)
    return ctx.fail("expected gu [.., K, 2I]");
  if (auto err = checkRoute(ctx, route, scores, d))
    return err;
  declare(ctx, d, *lt, {{"G_S", &gu}, {"S_S", &scores}, {"DY_S", &dy}});
  TiledGemm g;
  g.what = "d_down[e, i, c] = sum over expert e's entries (token m, slot k) "
           "of swiglu(gu[m, k])[i] * dy[m, c], in route order.";
  g.m = "I";
  g.n = "D";
  g.a = "gu";
  g.b = "dy";
  g.aRow = "@M";
  g.aCol = kGuRow;
  g.aByRow = true;
  g.aSwigluUp = "I";
  g.bRow = "@C";
  g.bCol = "(@T / LT * DY_S + @T % LT) * D";
  g.bByCol = true;
  g.y = "@G * I * D + @M * D + @C";
  g.tensorCores = tensorCores(dy, gu);
  g.aSplit = true; // swiglu(gu)
  g.maxTiles =
      uint64_t(d.e) * ((uint64_t(d.i) + 63) / 64) * ((uint64_t(d.d) + 63) / 64);
  g.grouped = grouped(scores, d);
  g.grouped->overReduction = true;
  // gu's rows are 2I apart, its up half I on; dy's D.
  if (!overEntries(ctx, g, d, d.i, d.d, {d.i, d.d}, {&gu, &dy}))
    ctx.body.code += emitTiles(ctx.body, g);
  return llvm::Error::success();
}

llvm::Error emitMoeGateUpGradInput(OpContext &ctx) {
  const View &dgu = ctx.operands[0], &scores = ctx.operands[1],
             &gateUp = ctx.operands[2], &route = ctx.operands[3],
             &dz = ctx.results[0];
  auto lt = tokenRows(ctx, {&dgu, &scores, &dz});
  if (!lt)
    return lt.takeError();
  auto gs = gateUp.shape();
  if (gs.size() != 3 || gs[2] % 2 || scores.inner != gs[0])
    return ctx.fail("expected scores [.., E] and gate_up [E, D, 2I]");
  Dims d{gs[0], gs[1], gs[2] / 2, slotsOf(dgu)};
  if (dgu.inner != d.k * 2 * d.i || dz.inner != d.k * d.d)
    return ctx.fail("expected dgu [.., K, 2I] and the result [.., K, D]");
  if (auto err = checkRoute(ctx, route, scores, d))
    return err;
  declare(ctx, d, *lt, {{"G_S", &dgu}, {"S_S", &scores}, {"Y_S", &dz}});
  TiledGemm g;
  g.what = "dz[m, k, c] = sum_j dgu[m, k, j] * gate_up[e, c, j], one GEMM "
           "per expert over its entries.";
  g.n = "D";
  g.r = "2 * I";
  g.a = "dgu";
  g.b = "gate_up";
  g.aRow = kGuRow;
  g.aCol = "@R";
  g.bRow = "@G * D * 2 * I + @C * 2 * I";
  g.bCol = "@R";
  g.y = "(@T / LT * Y_S + @T % LT) * (KS * D) + @K * D + @C";
  g.tensorCores = tensorCores(gateUp, dgu);
  g.aSplit = dgu.ctype == "float";
  g.maxTiles = (uint64_t(d.d) + 63) / 64;
  g.grouped = grouped(scores, d);
  // Both operands' rows run along the reduction (j); dgu is f32 in
  // training plans: split into bf16 hi + lo at the fragments.
  PipelinedGemm p = pipelinedGrouped(
      g, {"gate_up", true, "@G * D * 2 * I + @I * 2 * I"}, uint64_t(d.d));
  p.a.f32 = dgu.ctype == "float";
  if ((dgu.ctype == "l4_bf16" || p.a.f32) && gateUp.ctype == "l4_bf16" &&
      pieceAligned({&dgu, &gateUp}) && d.i % 4 == 0 && d.d % 8 == 0 &&
      choosePipelined(ctx, p, /*swiglu=*/false, tmaExperts(gateUp))) {
    p.bView = &gateUp;
    ctx.body.code += emitPipelined(ctx.body, p);
    if (p.tma)
      readByTmaOnly(ctx, gateUp);
    return llvm::Error::success();
  }
  ctx.body.code += emitTiles(ctx.body, g);
  return llvm::Error::success();
}

llvm::Error emitMoeCombineGrad(OpContext &ctx) {
  const View &dz = ctx.operands[0], &x = ctx.operands[1],
             &scores = ctx.operands[2], &dx = ctx.results[0],
             &dscores = ctx.results[1];
  auto lt = tokenRows(ctx, {&dz, &x, &scores, &dx, &dscores});
  if (!lt)
    return lt.takeError();
  Dims d{scores.inner, x.inner, 0, slotsOf(dz)};
  if (dz.inner != d.k * d.d || dx.inner != d.d || dscores.inner != d.e)
    return ctx.fail("expected dz [.., K, D], x and dx [.., D], scores and "
                    "their gradient [.., E]");
  Body &b = ctx.body;
  b.globals += kBlockSumD;
  declare(ctx, d, *lt,
          {{"Z_S", &dz},
           {"X_S", &x},
           {"S_S", &scores},
           {"DX_S", &dx},
           {"DS_S", &dscores}});
  b.code +=
      R"cuda(  // One block per token (y0: dx, y1: the scores' gradient): its experts in
  // increasing order (thread 0), then
  // dx = sum_k s_k dz[k] in that order without contraction (the CPU's
  // float sum) and ds[e_k] = <x, dz[k]> in double.
  __shared__ double red[32];
  __shared__ int ex[KS];
  __shared__ float sv[KS];
  __shared__ int nex;
  for (long long m = blockIdx.x; m < M; m += gridDim.x) {
    const long long so = (m / LT * S_S + m % LT) * E;
    const long long zo = (m / LT * Z_S + m % LT) * (KS * D);
    const long long xo = (m / LT * X_S + m % LT) * D;
    __syncthreads(); // the previous token is done with ex
    if (threadIdx.x == 0) {
      int n = 0;
      for (int e = 0; e < E && n < KS; ++e) {
        const float s = l4_ld(scores, so + e);
        if (s != 0.0f) {
          ex[n] = e;
          sv[n++] = s;
        }
      }
      nex = n;
    }
    for (long long e = threadIdx.x; e < E; e += blockDim.x)
      l4_st(y1, (m / LT * DS_S + m % LT) * E + e, 0.0f);
    __syncthreads();
    const int n = nex;
    for (long long c = threadIdx.x; c < D; c += blockDim.x) {
      float a = 0.0f;
      for (int k = 0; k < n; ++k)
        a = __fadd_rn(a, __fmul_rn(sv[k], l4_ld(dz, zo + k * D + c)));
      l4_st(y0, (m / LT * DX_S + m % LT) * D + c, a);
    }
    for (int k = 0; k < n; ++k) {
      double p = 0.0;
      for (long long c = threadIdx.x; c < D; c += blockDim.x)
        p += (double)l4_ld(x, xo + c) * (double)l4_ld(dz, zo + k * D + c);
      p = @B@_bsum(p, red);
      if (threadIdx.x == 0)
        l4_st(y1, (m / LT * DS_S + m % LT) * E + ex[k], (float)p);
    }
  }
)cuda";
  b.threads = 256;
  b.blocks = gridFor(uint64_t(x.bmax) * x.maxLiveRows(), 1);
  return llvm::Error::success();
}

llvm::Error emitMoeGateUpGradWeight(OpContext &ctx) {
  const View &x = ctx.operands[0], &scores = ctx.operands[1],
             &dgu = ctx.operands[2], &route = ctx.operands[3],
             &dGateUp = ctx.results[0];
  auto lt = tokenRows(ctx, {&x, &scores, &dgu});
  if (!lt)
    return lt.takeError();
  auto ws = dGateUp.shape();
  if (ws.size() != 3 || dGateUp.hasBatch || ws[2] % 2 ||
      scores.inner != ws[0] || x.inner != ws[1])
    return ctx.fail("expected the result [E, D, 2I] and x [.., D]");
  Dims d{ws[0], ws[1], ws[2] / 2, slotsOf(dgu)};
  if (dgu.inner != d.k * 2 * d.i)
    return ctx.fail("expected dgu [.., K, 2I]");
  if (auto err = checkRoute(ctx, route, scores, d))
    return err;
  declare(ctx, d, *lt, {{"X_S", &x}, {"S_S", &scores}, {"G_S", &dgu}});
  TiledGemm g;
  g.what = "d_gate_up[e, c, j] = sum over expert e's entries (token m, slot "
           "k, score s) of (x[m, c] * s) * dgu[m, k, j], in route order.";
  g.m = "D";
  g.n = "2 * I";
  g.a = "x";
  g.b = "dgu";
  g.aRow = "@M";
  g.aCol = "(@T / LT * X_S + @T % LT) * D";
  g.aByRow = true;
  g.bRow = "@C";
  g.bCol = kGuRow;
  g.bByCol = true;
  g.y = "@G * D * 2 * I + @M * 2 * I + @C";
  g.tensorCores = tensorCores(x, dgu);
  g.aSplit = true; // x * s
  g.bSplit = dgu.ctype == "float";
  g.maxTiles = uint64_t(d.e) * ((uint64_t(d.d) + 63) / 64) *
               ((uint64_t(2 * d.i) + 63) / 64);
  g.grouped = grouped(scores, d);
  g.grouped->overReduction = true;
  g.grouped->reductionScale =
      "l4_ld(scores, (@T / LT * S_S + @T % LT) * E + @G)";
  // x's rows are D apart, dgu's 2I.
  if (!overEntries(ctx, g, d, d.d, 2 * d.i, {d.d, 2 * d.i}, {&x, &dgu}))
    ctx.body.code += emitTiles(ctx.body, g);
  return llvm::Error::success();
}

} // namespace l4c::cuda
