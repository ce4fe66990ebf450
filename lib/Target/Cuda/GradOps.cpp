//===- GradOps.cpp - CUDA for the training ops ----------------------------===//
//
// The loss, its gradient and the vector-Jacobian products of l4c-autodiff.
// linear's two products (dx = dy w, dw = dy^T x) are the tiled GEMMs of
// Matmul.cpp (tensor cores for bf16 operands, f32 accumulators). The rest is
// written for correctness first: straightforward grid-stride kernels that
// follow the CPU backend's formulas (runtime/src/cpu/grad_kernels.cpp), with
// double accumulators where the CPU has them. No reduction uses atomics on
// data, so every run gives the same sums: the loss and a norm's weight
// gradient sum per-block parts in the kernel workspace, combined in a fixed
// order by the last block to finish (l4_last_block); the embedding's gradient
// gives each block its own columns; the unsplit experts' backward (l4-opt
// only) runs in one block. Attention's backward is flash-style, O(T^2 d)
// in one launch of two phases: query tiles (dq and the softmax statistics)
// before key tiles (dk, dv), ordered by a ticket queue; on tensor cores in
// bf16 plans (head dims of whole k16 steps up to 128), else on CUDA cores
// in f32.
//
//===----------------------------------------------------------------------===//
#include "Emit.h"
#include "l4c/Dialect/L4/L4Ops.h"
#include "llvm/Support/FormatVariadic.h"

using namespace mlir;

namespace l4c::cuda {

const char *const kBlockSumD =
    R"cuda(__device__ __forceinline__ double @B@_bsum(double v, double *red) {
  for (int o = 16; o > 0; o >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  __syncthreads(); // the previous call is done with red
  if (lane == 0)
    red[w] = v;
  __syncthreads();
  double t = 0;
  for (int i = 0; i < (int)((blockDim.x + 31) >> 5); ++i)
    t += red[i];
  return t;
}
)cuda";

// log sum exp of a row of the logits (needs kBlockSumD).
const char *const kRowLse =
    R"cuda(// log sum exp of the n values at x + lo, in double after an f32 max (as
// the CPU backend computes it); every thread of the block gets it.
template <class L>
__device__ double @B@_lse(const L *x, long long lo, long long n, float *redf,
                          double *red) {
  float mx = l4_neg_inf();
  for (long long i = threadIdx.x; i < n; i += blockDim.x)
    mx = fmaxf(mx, l4_ld(x, lo + i));
  mx = l4_block_max(mx, redf);
  double s = 0.0;
  for (long long i = threadIdx.x; i < n; i += blockDim.x)
    s += exp((double)l4_ld(x, lo + i) - (double)mx);
  return (double)mx + log(@B@_bsum(s, red));
}
)cuda";

// The loss's label count (rows t < T - 1 whose next id is not -100), in
// every thread; needs ids, I_S, red[32] and kBlockSumD.
const char *const kCountLabels = R"cuda(  double count = 0.0; // every thread gets it
  for (long long r = threadIdx.x; r < B * (T - 1); r += blockDim.x) {
    const long long b = r / (T - 1), t = r - b * (T - 1);
    count += l4_ldi(ids, b * I_S + t + 1) != -100;
  }
  count = @B@_bsum(count, red);
)cuda";

llvm::Error emitCrossEntropy(OpContext &ctx, bool grad) {
  const View &logits = ctx.operands[0], &ids = ctx.operands[1],
             &y = ctx.results[0];
  if (!logits.hasSeq || !ids.hasSeq || logits.shape().size() != 3)
    return ctx.fail("expected logits [B, S, V] and ids [B, S]");
  if (grad && (y.inner != logits.inner || !y.hasSeq))
    return ctx.fail("expected the gradient to have the logits' shape");
  if (!grad && (y.hasBatch || y.inner != 1))
    return ctx.fail("expected a scalar loss");
  Body &b = ctx.body;
  b.globals += kBlockSumD;
  b.globals += kRowLse;
  llvm::raw_string_ostream os(b.code);
  os << constant("V", logits.inner) << stride(b, "L_S", logits.rowsPerBatch)
     << stride(b, "I_S", ids.rowsPerBatch);
  if (grad)
    os << stride(b, "Y_S", y.rowsPerBatch);
  os << R"cuda(  // HF's shift: row (b, t) predicts ids[b, t + 1] for t < T - 1; -100
  // is torch's ignore_index. The mean runs over the labelled rows.
  __shared__ double red[32];
  __shared__ float redf[32];
)cuda";
  if (!grad) {
    os << R"cuda(  // A block per row puts the row's loss (0 when unlabelled) in the
  // workspace; the last block to finish sums them, the same way every run.
  double *part = reinterpret_cast<double *>(ws + 256);
  for (long long r = blockIdx.x; r < B * T; r += gridDim.x) {
    const long long b = r / T, t = r - b * T;
    const long long label = t + 1 < T ? l4_ldi(ids, b * I_S + t + 1) : -100;
    double nll = 0.0;
    if (label != -100) {
      const long long lo = (b * L_S + t) * V;
      nll = @B@_lse(logits, lo, V, redf, red) - (double)l4_ld(logits, lo + label);
    }
    if (threadIdx.x == 0)
      part[r] = nll;
  }
  if (!l4_last_block(ws))
    return;
  double nll = 0.0;
  for (long long r = threadIdx.x; r < B * T; r += blockDim.x)
    nll += l4_ldcg(part + r);
  nll = @B@_bsum(nll, red);
)cuda" << kCountLabels
       << R"cuda(  if (threadIdx.x == 0)
    l4_st(y, 0, count > 0.0 ? (float)(nll / count) : __int_as_float(0x7fc00000));
)cuda";
    b.threads = 256;
    b.blocks = gridFor(uint64_t(logits.bmax) * logits.rowsPerBatch, 1);
    b.workspaceBytes = 256 + 8 * uint64_t(logits.bmax) * logits.rowsPerBatch;
    return llvm::Error::success();
  }
  os << kCountLabels;
  os << R"cuda(  const double seed = count > 0.0 ? 1.0 / count : 0.0;
  // A block per row; the row is read whole (the reductions' barriers)
  // before it is written, so the gradient may overwrite the logits.
  for (long long r = blockIdx.x; r < B * L_S; r += gridDim.x) {
    const long long b = r / L_S, t = r - b * L_S;
    const long long lo = (b * L_S + t) * V, yo = (b * Y_S + t) * V;
    const long long label = t + 1 < T ? l4_ldi(ids, b * I_S + t + 1) : -100;
    if (label == -100) {
      __syncthreads();
      for (long long i = threadIdx.x; i < V; i += blockDim.x)
        l4_st(y, yo + i, 0.0f);
      continue;
    }
    const double lse = @B@_lse(logits, lo, V, redf, red);
    for (long long i = threadIdx.x; i < V; i += blockDim.x) {
      const double p = exp((double)l4_ld(logits, lo + i) - lse);
      l4_st(y, yo + i, (float)((i == label ? p - 1.0 : p) * seed));
    }
  }
)cuda";
  b.threads = 256;
  b.blocks = gridFor(uint64_t(logits.bmax) * logits.rowsPerBatch, 1);
  return llvm::Error::success();
}

llvm::Error emitCrossEntropyChunk(OpContext &ctx, ChunkLoss part,
                                  int64_t vocabOffset) {
  const View &ids = ctx.operands[1], &y = ctx.results[0];
  const View &rows = ctx.operands[0]; // logits, or stats for the loss
  if (!rows.hasSeq || !ids.hasSeq || rows.shape().size() != 3)
    return ctx.fail("expected [B, S, n] rows and ids [B, S]");
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << stride(b, "I_S", ids.rowsPerBatch);
  b.globals += kBlockSumD;
  b.threads = 256;
  if (part == ChunkLoss::Loss) {
    if (y.hasBatch || y.inner != 1)
      return ctx.fail("expected a scalar loss");
    // One block sums in double in a fixed order: B x T rows are few.
    os << stride(b, "S_S", rows.rowsPerBatch) << R"cuda(  __shared__ double red[32];
  double nll = 0.0;
  for (long long r = threadIdx.x; r < B * (T - 1); r += blockDim.x) {
    const long long b = r / (T - 1), t = r - b * (T - 1);
    if (l4_ldi(ids, b * I_S + t + 1) != -100)
      nll += (double)l4_ld(stats, (b * S_S + t) * 2) -
             (double)l4_ld(stats, (b * S_S + t) * 2 + 1);
  }
  nll = @B@_bsum(nll, red);
)cuda" << kCountLabels
       << R"cuda(  if (threadIdx.x == 0)
    l4_st(y, 0, count > 0.0 ? (float)(nll / count) : __int_as_float(0x7fc00000));
)cuda";
    b.blocks = 1;
    return llvm::Error::success();
  }
  os << constant("N", rows.inner) << constant("OFF", vocabOffset)
     << stride(b, "L_S", rows.rowsPerBatch);
  if (part == ChunkLoss::Stats) {
    bool prev = ctx.operands.size() > 2;
    if (y.inner != 2 || !y.hasSeq)
      return ctx.fail("expected statistics [B, S, 2]");
    b.globals += kRowLse;
    os << stride(b, "Y_S", y.rowsPerBatch);
    if (prev)
      os << stride(b, "P_S", ctx.operands[2].rowsPerBatch);
    os << R"cuda(  // A block per row: this chunk's log-sum-exp joins the running one, and
  // the label's logit is taken when the label lies in these columns.
  __shared__ double red[32];
  __shared__ float redf[32];
  for (long long r = blockIdx.x; r < B * T; r += gridDim.x) {
    const long long b = r / T, t = r - b * T;
    const long long label = t + 1 < T ? l4_ldi(ids, b * I_S + t + 1) : -100;
    const long long so = (b * Y_S + t) * 2;
    if (label == -100) {
      if (threadIdx.x == 0) {
        l4_st(y, so, 0.0f);
        l4_st(y, so + 1, 0.0f);
      }
      continue;
    }
    const long long lo = (b * L_S + t) * N;
    double lse = @B@_lse(logits, lo, N, redf, red);
    float lab = 0.0f;
)cuda";
    if (prev)
      os << R"cuda(    const long long po = (b * P_S + t) * 2;
    const double before = (double)l4_ld(prev, po);
    const double m = fmax(before, lse);
    lse = m + log(exp(before - m) + exp(lse - m));
    lab = l4_ld(prev, po + 1);
)cuda";
    os << R"cuda(    if (label >= OFF && label < OFF + N)
      lab = l4_ld(logits, lo + label - OFF);
    if (threadIdx.x == 0) {
      l4_st(y, so, (float)lse);
      l4_st(y, so + 1, lab);
    }
  }
)cuda";
    b.blocks = gridFor(uint64_t(rows.bmax) * rows.rowsPerBatch, 1);
    return llvm::Error::success();
  }
  const View &stats = ctx.operands[2];
  if (y.inner != rows.inner || !y.hasSeq)
    return ctx.fail("expected the gradient to have the logits' shape");
  os << stride(b, "Y_S", y.rowsPerBatch)
     << stride(b, "S_S", stats.rowsPerBatch) << R"cuda(  __shared__ double red[32];
)cuda" << kCountLabels
     << R"cuda(  const double seed = count > 0.0 ? 1.0 / count : 0.0;
  // A block per row; each element is read before it is written, so the
  // gradient may overwrite the logits.
  for (long long r = blockIdx.x; r < B * L_S; r += gridDim.x) {
    const long long b = r / L_S, t = r - b * L_S;
    const long long lo = (b * L_S + t) * N, yo = (b * Y_S + t) * N;
    const long long label = t + 1 < T ? l4_ldi(ids, b * I_S + t + 1) : -100;
    if (label == -100) {
      for (long long i = threadIdx.x; i < N; i += blockDim.x)
        l4_st(y, yo + i, 0.0f);
      continue;
    }
    const double lse = (double)l4_ld(stats, (b * S_S + t) * 2);
    for (long long i = threadIdx.x; i < N; i += blockDim.x) {
      const double p = exp((double)l4_ld(logits, lo + i) - lse);
      l4_st(y, yo + i, (float)((i + OFF == label ? p - 1.0 : p) * seed));
    }
  }
)cuda";
  b.blocks = gridFor(uint64_t(rows.bmax) * rows.rowsPerBatch, 1);
  return llvm::Error::success();
}

llvm::Error emitLinearGradInput(OpContext &ctx) {
  const View &dy = ctx.operands[0], &w = ctx.operands[1], &dx = ctx.results[0];
  auto lt = liveRows(ctx, {&dy, &dx});
  if (!lt)
    return lt.takeError();
  auto ws = w.shape();
  if (ws.size() != 2 || dy.inner != ws[0] || dx.inner != ws[1])
    return ctx.fail("expected dy [.., N], w [N, K] and dx [.., K]");
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << constant("N", ws[0]) << constant("K", ws[1])
     << stride(b, "DY_S", dy.rowsPerBatch) << stride(b, "DX_S", dx.rowsPerBatch)
     << "  const long long LT = " << *lt << ";\n"
     << "  const long long M = B * LT;\n";
  TiledGemm g;
  g.what = "dx = dy @ w: dx[m, k] = sum_n dy[m, n] * w[n, k].";
  g.m = "M";
  g.n = "K";
  g.r = "N";
  g.a = "dy";
  g.aRow = "(@M / LT * DY_S + @M % LT) * N";
  g.aCol = "@R";
  g.b = "w";
  g.bRow = "@C";
  g.bCol = "@R * K";
  g.y = "(@M / LT * DX_S + @M % LT) * K + @C";
  g.tensorCores = dy.ctype == "l4_bf16" && w.ctype == "l4_bf16";
  g.maxTiles = (maxRows(dx) + 63) / 64 * ((uint64_t(ws[1]) + 63) / 64);
  PipelinedGemm p;
  if (g.tensorCores && ws[0] % 8 == 0 && ws[1] % 8 == 0 &&
      pieceAligned({&dy, &w}) &&
      choosePipelined(ctx, p, /*swiglu=*/false,
                      tmaRows(dy, ws[0]) && tmaMatrix(w, ws[0], ws[1]))) {
    // dy's rows run along the reduction (n), w's along the output (k).
    p.what = g.what;
    p.m = "M";
    p.n = "K";
    p.r = "N";
    p.a = {"dy", true, "(@I / LT * DY_S + @I % LT) * N"};
    p.b = {"w", false, "@R * K"};
    p.y = g.y;
    p.maxM = maxRows(dx);
    p.maxN = uint64_t(ws[1]);
    p.aView = &dy;
    p.bView = &w;
    os << emitPipelined(b, p);
    if (p.tma) // read through the tensor maps alone
      ctx.operands[0].referenced = ctx.operands[1].referenced = false;
    return llvm::Error::success();
  }
  os << emitTiles(b, g);
  return llvm::Error::success();
}

llvm::Error emitLinearGradWeight(OpContext &ctx) {
  const View &x = ctx.operands[0], &dy = ctx.operands[1], &dw = ctx.results[0];
  auto lt = liveRows(ctx, {&x, &dy});
  if (!lt)
    return lt.takeError();
  auto ws = dw.shape();
  if (ws.size() != 2 || dy.inner != ws[0] || x.inner != ws[1] || dw.hasBatch)
    return ctx.fail("expected x [.., K], dy [.., N] and dw [N, K]");
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << constant("N", ws[0]) << constant("K", ws[1])
     << stride(b, "X_S", x.rowsPerBatch) << stride(b, "DY_S", dy.rowsPerBatch)
     << "  const long long LT = " << *lt << ";\n"
     << "  const long long M = B * LT;\n";
  TiledGemm g;
  g.what = "dw[n, k] = sum over the M live rows of dy[row, n] * x[row, k].";
  g.m = "N";
  g.n = "K";
  g.r = "M";
  g.a = "dy";
  g.aRow = "@M";
  g.aCol = "(@R / LT * DY_S + @R % LT) * N";
  g.b = "x";
  g.bRow = "@C";
  g.bCol = "(@R / LT * X_S + @R % LT) * K";
  g.y = "@M * K + @C";
  g.tensorCores = dy.ctype == "l4_bf16" && x.ctype == "l4_bf16";
  g.maxTiles = (uint64_t(ws[0]) + 63) / 64 * ((uint64_t(ws[1]) + 63) / 64);
  PipelinedGemm p;
  if (g.tensorCores && ws[0] % 8 == 0 && ws[1] % 8 == 0 &&
      pieceAligned({&dy, &x}) && choosePipelined(ctx, p)) {
    // Both operands' rows (tokens) are the reduction: staged [token][n]
    // and [token][k].
    p.what = g.what;
    p.m = "N";
    p.n = "K";
    p.r = "M";
    p.a = {"dy", false, "(@R / LT * DY_S + @R % LT) * N"};
    p.b = {"x", false, "(@R / LT * X_S + @R % LT) * K"};
    p.y = g.y;
    p.maxM = uint64_t(ws[0]);
    p.maxN = uint64_t(ws[1]);
    os << emitPipelined(b, p);
    return llvm::Error::success();
  }
  os << emitTiles(b, g);
  return llvm::Error::success();
}

llvm::Error emitNormGrad(OpContext &ctx, double eps, bool hasWeight) {
  const View &x = ctx.operands[0], &dy = ctx.operands[hasWeight ? 2 : 1],
             &dx = ctx.results[0];
  auto lt = liveRows(ctx, {&x, &dy, &dx});
  if (!lt)
    return lt.takeError();
  int64_t n = x.shape().back();
  if (n <= 0 || x.inner % n || dy.inner != x.inner || dx.inner != x.inner)
    return ctx.fail("expected dy and dx of the input's shape");
  if (hasWeight &&
      (ctx.operands[1].inner != n || ctx.results[1].inner != n ||
       x.inner != n))
    return ctx.fail("expected a weight (and its gradient) of the row width");
  Body &b = ctx.body;
  b.globals += kBlockSumD;
  llvm::raw_string_ostream os(b.code);
  os << constant("N", n, "normalised width")
     << constant("NV", x.inner / n, "vectors per token row")
     << stride(b, "X_S", x.rowsPerBatch) << stride(b, "G_S", dy.rowsPerBatch)
     << stride(b, "D_S", dx.rowsPerBatch)
     << "  constexpr float EPS = " << floatLit(float(eps)) << ";\n"
     << "  const long long LT = " << *lt << ";\n";
  // dw's sum in parts: enough to spread it over the GPU, a few vectors each.
  uint64_t parts = std::clamp<uint64_t>(maxRows(x) * uint64_t(x.inner / n) / 16,
                                        1, 256);
  if (hasWeight)
    os << constant("NP", int64_t(parts), "parts of the weight's sum");
  std::string wexpr = hasWeight ? "(double)l4_ld(w, i)" : "1.0";
  os << llvm::formatv(R"cuda(  // dx = inv * (g - x * inv^2 * <g, x> / N), g = dy * w, with the
  // forward's f32 inverse RMS; one warp per vector.
  const int lane = threadIdx.x & 31;
  const long long warps = blockDim.x >> 5;
  const long long nvec = B * LT * NV;
  for (long long v = blockIdx.x * warps + (threadIdx.x >> 5); v < nvec;
       v += (long long)gridDim.x * warps) {{
    const long long j = v % NV, r = v / NV, b = r / LT, t = r - b * LT;
    const long long xo = (b * X_S + t) * (N * NV) + j * N;
    const long long go = (b * G_S + t) * (N * NV) + j * N;
    const long long yo = (b * D_S + t) * (N * NV) + j * N;
    double ss = 0.0, gx = 0.0;
    for (long long i = lane; i < N; i += 32) {{
      const double a = l4_ld(x, xo + i);
      ss += a * a;
      gx += (double)l4_ld(dy, go + i) * {0} * a;
    }
    for (int o = 16; o > 0; o >>= 1) {{
      ss += __shfl_xor_sync(0xffffffffu, ss, o);
      gx += __shfl_xor_sync(0xffffffffu, gx, o);
    }
    const float var = (float)(ss / (double)N);
    const float inv = (float)(1.0 / sqrt((double)(var + EPS)));
    const double c = (double)inv * inv * gx / (double)N;
    for (long long i = lane; i < N; i += 32) {{
      const double g = (double)l4_ld(dy, go + i) * {0};
      l4_st({1}, yo + i, (float)((double)inv * (g - (double)l4_ld(x, xo + i) * c)));
    }
  }
)cuda",
                      wexpr, hasWeight ? "y0" : "y");
  if (hasWeight)
    os << R"cuda(  // dw: the vectors fall into NP consecutive parts; a block sums its
  // parts' products (rebuilding each vector's inverse RMS) into the
  // workspace, and the last block to finish adds the parts up in order.
  __shared__ double red[32];
  constexpr long long NT = 256, NC = (N + NT - 1) / NT;
  double *part = reinterpret_cast<double *>(ws + 256);
  for (long long p = blockIdx.x; p < NP; p += gridDim.x) {
    double acc[NC];
    for (int c = 0; c < NC; ++c)
      acc[c] = 0.0;
    for (long long v = nvec * p / NP; v < nvec * (p + 1) / NP; ++v) {
      const long long j = v % NV, r = v / NV, b = r / LT, t = r - b * LT;
      const long long xo = (b * X_S + t) * (N * NV) + j * N;
      const long long go = (b * G_S + t) * (N * NV) + j * N;
      double ss = 0.0;
      for (long long i = threadIdx.x; i < N; i += NT) {
        const double a = l4_ld(x, xo + i);
        ss += a * a;
      }
      ss = @B@_bsum(ss, red);
      const float var = (float)(ss / (double)N);
      const float inv = (float)(1.0 / sqrt((double)(var + EPS)));
      for (int c = 0; c < NC; ++c) {
        const long long i = threadIdx.x + c * NT;
        if (i < N) // the forward rounds x * inv to f32 before the weight
          acc[c] += (double)l4_ld(dy, go + i) * (double)(l4_ld(x, xo + i) * inv);
      }
    }
    for (int c = 0; c < NC; ++c) {
      const long long i = threadIdx.x + c * NT;
      if (i < N)
        part[p * N + i] = acc[c];
    }
  }
  if (!l4_last_block(ws))
    return;
  for (long long i = threadIdx.x; i < N; i += NT) {
    double a = 0.0;
    for (long long p = 0; p < NP; ++p)
      a += l4_ldcg(part + p * N + i);
    l4_st(y1, i, (float)a);
  }
)cuda";
  b.threads = 256;
  b.blocks = gridFor(maxRows(x) * (x.inner / n), b.threads / 32);
  if (hasWeight) {
    b.blocks = std::max<uint64_t>(b.blocks, parts);
    b.workspaceBytes = 256 + 8 * parts * uint64_t(n);
  }
  return llvm::Error::success();
}

/// bf16 operands, head dim a multiple of 16 up to 128: the same two phases
/// on tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulate). Scores and
/// dp = dout v^T come straight from the bf16 operands; P and dS, formed in
/// f32 in the accumulator fragments, enter their products (dq = dS k,
/// dv = P^T dout, dk = dS^T q) as A fragments in two bf16 parts (hi + lo,
/// about 16 bits), as the forward's P does, so the gradients keep f32-like
/// sums. Phase A: 4 warps x 16 query rows, their q and dout fragments in
/// registers, 32-key tiles staged in shared memory. Phase B: 4 warps x 16
/// keys of a 64-key tile staged for the task, with dk and dv in the
/// accumulators; 16-query tiles of q and dout staged per (tile, head).
static llvm::Error emitAttentionGradMma(OpContext &ctx, const std::string &consts,
                                        int64_t heads, int64_t kvHeads,
                                        int64_t rowsPerBatch, int64_t bmax) {
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << consts << R"cuda(  constexpr int BQ = 64, BK = 32, KT = 64, QT = 16, NT = 128;
  constexpr int KS = DH / 16, NO = DH / 8;
  constexpr long long KW = HKV * DH, QW = H * DH;
  unsigned *ticket = reinterpret_cast<unsigned *>(ws + 8);
  unsigned *doneA = ticket + 1;
  float *lseOf = reinterpret_cast<float *>(ws + 256); // [B, T, H]
  float *deltaOf = lseOf + B * T * H;
  // Rows padded by 8 elements: a fragment's 8 rows x 4 pairs hit 32 banks.
  // A uses the first BK rows of ks and vs; B all KT, and qs, os.
  __shared__ __align__(16) unsigned short ks[KT][DH + 8], vs[KT][DH + 8];
  __shared__ __align__(16) unsigned short qs[QT][DH + 8], os[QT][DH + 8];
  __shared__ float rlse[QT], rdel[QT];
  __shared__ long long rlo[BQ], rhi[BQ];
  const unsigned short *qb = reinterpret_cast<const unsigned short *>(q);
  const unsigned short *kb = reinterpret_cast<const unsigned short *>(k);
  const unsigned short *vb = reinterpret_cast<const unsigned short *>(v);
  const unsigned short *ob = reinterpret_cast<const unsigned short *>(dout);
  // Lane (g, t4) of warp w: fragment rows w*16 + g and w*16 + g + 8;
  // columns 8n + 2t4, 8n + 2t4 + 1 of each 8-wide tile n.
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const long long qTiles = (T + BQ - 1) / BQ, kTiles = (T + KT - 1) / KT;
  const long long nA = B * H * qTiles, nB = B * HKV * kTiles;
  // Each row's keys of the n query rows from t0 in rlo, rhi; their union.
  auto ranges = [&](long long b, long long t0, int n, long long &jmin, long long &jmax) {
    __syncthreads(); // the previous tile is done with rlo, rhi
    l4_attn_rows(pos, b * P_S, t0, T, T, CHUNK, n, rlo, rhi);
    __syncthreads();
    l4_attn_union(rlo, rhi, n, T, jmin, jmax);
  };
  // Rows r0 .. r0 + n - 1 of x (batch entry b, XS rows apart, XW wide, from
  // column xo) into tile; zeros for rows past `last`.
  auto stage = [&](unsigned short (*tile)[DH + 8], const unsigned short *x, long long b,
                   long long XS, long long XW, long long xo, long long r0, int n,
                   long long last) {
    for (int e = tid; e < n * (DH / 2); e += NT) {
      const int rr = e / (DH / 2), i = e % (DH / 2) * 2;
      const long long r = r0 + rr;
      *reinterpret_cast<unsigned *>(&tile[rr][i]) =
          r <= last ? l4_pair(x + (b * XS + r) * XW + xo + i) : 0u;
    }
  };
  // s (n tiles of scores, unscaled) and dp from operand fragments a, o
  // against rows row0.. of tiles kt, vt.
  auto scores = [&](float (*s)[4], float (*dp)[4], int n, unsigned (*a)[4],
                    unsigned (*o)[4], unsigned short (*kt)[DH + 8],
                    unsigned short (*vt)[DH + 8]) {
#pragma unroll
    for (int j = 0; j < n; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c)
        s[j][c] = dp[j][c] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
#pragma unroll
      for (int j = 0; j < n; ++j) {
        const unsigned bk[2] = {l4_pair(&kt[j * 8 + g][kk * 16 + 2 * t4]),
                                l4_pair(&kt[j * 8 + g][kk * 16 + 2 * t4 + 8])};
        const unsigned bv[2] = {l4_pair(&vt[j * 8 + g][kk * 16 + 2 * t4]),
                                l4_pair(&vt[j * 8 + g][kk * 16 + 2 * t4 + 8])};
        l4_mma_bf16(s[j], a[kk], bk);
        l4_mma_bf16(dp[j], o[kk], bv);
      }
  };
  // Accumulator tile j's pairs as A fragments of k-step j / 2 (hi and lo).
  auto pack = [&](unsigned (*hi)[4], unsigned (*lo)[4], int j, const float x[4]) {
    unsigned short h[4], l[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      h[c] = l4_bf16_bits(x[c]);
      l[c] = l4_bf16_lo(x[c], h[c]);
    }
    hi[j / 2][(j & 1) * 2] = (unsigned)h[0] | ((unsigned)h[1] << 16);
    hi[j / 2][(j & 1) * 2 + 1] = (unsigned)h[2] | ((unsigned)h[3] << 16);
    lo[j / 2][(j & 1) * 2] = (unsigned)l[0] | ((unsigned)l[1] << 16);
    lo[j / 2][(j & 1) * 2 + 1] = (unsigned)l[2] | ((unsigned)l[3] << 16);
  };
  // acc[n] += A x, x staged [k][n] as tile rows row0.. (reduction along the
  // rows: the pair is two 16-bit reads), for one k16 step, hi and lo.
  auto accumulate = [&](float (*acc)[4], const unsigned hi[4], const unsigned lo[4],
                        unsigned short (*x)[DH + 8], int row0) {
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      const int col = n * 8 + g, r = row0 + 2 * t4;
      const unsigned bf[2] = {l4_pair2(x[r][col], x[r + 1][col]),
                              l4_pair2(x[r + 8][col], x[r + 9][col])};
      l4_mma_bf16(acc[n], hi, bf);
      l4_mma_bf16(acc[n], lo, bf);
    }
  };
  for (;;) {
    const long long task = l4_claim(ticket);
    if (task >= nA + nB)
      break;
    if (task < nA) {
      // A: rows t0 + warp*16 + g (+ 8) of head h.
      const long long h = task % H, rest = task / H;
      const long long b = rest / qTiles, t0 = rest % qTiles * BQ;
      const long long kvo = h / G * DH;
      long long jmin, jmax;
      ranges(b, t0, BQ, jmin, jmax);
      const int w0 = warp * 16 + g, w1 = w0 + 8;
      const long long lo0 = rlo[w0], hi0 = rhi[w0], lo1 = rlo[w1], hi1 = rhi[w1];
      const long long r0 = t0 + w0, r1 = t0 + w1;
      unsigned qa[KS][4], oa[KS][4];
      {
        const long long q0 = (b * Q_S + r0) * QW + h * DH, q1 = (b * Q_S + r1) * QW + h * DH;
        const long long o0 = (b * O_S + r0) * QW + h * DH, o1 = (b * O_S + r1) * QW + h * DH;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
          const int c0 = kk * 16 + 2 * t4;
          qa[kk][0] = r0 < T ? l4_pair(qb + q0 + c0) : 0u;
          qa[kk][1] = r1 < T ? l4_pair(qb + q1 + c0) : 0u;
          qa[kk][2] = r0 < T ? l4_pair(qb + q0 + c0 + 8) : 0u;
          qa[kk][3] = r1 < T ? l4_pair(qb + q1 + c0 + 8) : 0u;
          oa[kk][0] = r0 < T ? l4_pair(ob + o0 + c0) : 0u;
          oa[kk][1] = r1 < T ? l4_pair(ob + o1 + c0) : 0u;
          oa[kk][2] = r0 < T ? l4_pair(ob + o0 + c0 + 8) : 0u;
          oa[kk][3] = r1 < T ? l4_pair(ob + o1 + c0 + 8) : 0u;
        }
      }
      // Whether element c of accumulator tile j (key j0 + 8j + 2t4 + (c & 1))
      // is one its row may see.
      auto sees = [&](long long j0, int j, int c) {
        const long long key = j0 + j * 8 + 2 * t4 + (c & 1);
        return c < 2 ? (key >= lo0 && key <= hi0) : (key >= lo1 && key <= hi1);
      };
      // Pass 1: per row m, l = sum e^(s - m) and u = sum e^(s - m) dp,
      // online (l and u this lane's part; the quad's max is shared).
      float m0 = l4_neg_inf(), m1 = l4_neg_inf(), l0 = 0.0f, l1 = 0.0f, u0 = 0.0f, u1 = 0.0f;
      for (long long j0 = jmin; j0 <= jmax; j0 += BK) {
        __syncthreads(); // the previous key tile is read
        stage(ks, kb, b, K_S, KW, kvo, j0, BK, jmax);
        stage(vs, vb, b, K_S, KW, kvo, j0, BK, jmax);
        __syncthreads();
        float s[BK / 8][4], dp[BK / 8][4];
        scores(s, dp, BK / 8, qa, oa, ks, vs);
        float x0 = l4_neg_inf(), x1 = l4_neg_inf();
#pragma unroll
        for (int j = 0; j < BK / 8; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            s[j][c] = sees(j0, j, c) ? s[j][c] * SCALE : l4_neg_inf();
            if (c < 2)
              x0 = fmaxf(x0, s[j][c]);
            else
              x1 = fmaxf(x1, s[j][c]);
          }
        float n0, n1, c0, c1;
        l4_online_max(m0, m1, x0, x1, n0, n1, c0, c1);
        l0 *= c0;
        u0 *= c0;
        l1 *= c1;
        u1 *= c1;
#pragma unroll
        for (int j = 0; j < BK / 8; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const float mx = c < 2 ? n0 : n1;
            const float e = s[j][c] == l4_neg_inf() ? 0.0f : expf(s[j][c] - mx);
            if (c < 2) {
              l0 += e;
              u0 = fmaf(e, dp[j][c], u0);
            } else {
              l1 += e;
              u1 = fmaf(e, dp[j][c], u1);
            }
          }
        m0 = n0;
        m1 = n1;
      }
      for (int d = 1; d < 4; d <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, d);
        l1 += __shfl_xor_sync(0xffffffffu, l1, d);
        u0 += __shfl_xor_sync(0xffffffffu, u0, d);
        u1 += __shfl_xor_sync(0xffffffffu, u1, d);
      }
      // A row that sees no key has P = 0: no gradient flows through it.
      const float lse0 = l0 > 0.0f ? m0 + logf(l0) : 0.0f;
      const float lse1 = l1 > 0.0f ? m1 + logf(l1) : 0.0f;
      const float del0 = l0 > 0.0f ? u0 / l0 : 0.0f, del1 = l1 > 0.0f ? u1 / l1 : 0.0f;
      // Pass 2: dS = P (dp - delta), dq = SCALE dS k.
      float dq[NO][4];
#pragma unroll
      for (int n = 0; n < NO; ++n)
        dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;
      for (long long j0 = jmin; j0 <= jmax; j0 += BK) {
        __syncthreads();
        stage(ks, kb, b, K_S, KW, kvo, j0, BK, jmax);
        stage(vs, vb, b, K_S, KW, kvo, j0, BK, jmax);
        __syncthreads();
        float s[BK / 8][4], dp[BK / 8][4];
        scores(s, dp, BK / 8, qa, oa, ks, vs);
        unsigned dh[BK / 16][4], dl[BK / 16][4];
#pragma unroll
        for (int j = 0; j < BK / 8; ++j) {
          float x[4];
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const float lse = c < 2 ? lse0 : lse1, del = c < 2 ? del0 : del1;
            x[c] = sees(j0, j, c) ? expf(s[j][c] * SCALE - lse) * (dp[j][c] - del) : 0.0f;
          }
          pack(dh, dl, j, x);
        }
        const int cnt = jmax - j0 + 1 < BK ? (int)(jmax - j0 + 1) : BK;
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk)
          if (kk * 16 < cnt) // keys past jmax: dS is 0 there
            accumulate(dq, dh[kk], dl[kk], ks, kk * 16);
      }
      const long long d0 = (b * DQ_S + r0) * QW + h * DH, d1 = (b * DQ_S + r1) * QW + h * DH;
      l4_st_rows(y0, d0, d1, r0 < T, r1 < T, dq, SCALE, SCALE, t4);
      if (t4 == 0) {
        if (r0 < T) {
          lseOf[(b * T + r0) * H + h] = lse0;
          deltaOf[(b * T + r0) * H + h] = del0;
        }
        if (r1 < T) {
          lseOf[(b * T + r1) * H + h] = lse1;
          deltaOf[(b * T + r1) * H + h] = del1;
        }
      }
      l4_publish(doneA);
      continue;
    }
    // B: keys j0 + warp*16 + g (+ 8) of kv head kvh.
    const long long u = task - nA, kvh = u % HKV, rest = u / HKV;
    const long long b = rest / kTiles, j0 = rest % kTiles * KT;
    const long long ja = j0 + warp * 16 + g, jb = ja + 8;
    l4_await(doneA, (unsigned)nA);
    stage(ks, kb, b, K_S, KW, kvh * DH, j0, KT, T - 1);
    stage(vs, vb, b, K_S, KW, kvh * DH, j0, KT, T - 1);
    float dk[NO][4], dv[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c)
        dk[n][c] = dv[n][c] = 0.0f;
    for (long long t0 = 0; t0 < T; t0 += QT) {
      long long jmin, jmax;
      ranges(b, t0, QT, jmin, jmax); // its barriers also publish ks, vs
      if (jmax < j0 || jmin > j0 + KT - 1)
        continue; // no row of this query tile sees these keys
      for (long long h = kvh * G; h < (kvh + 1) * G; ++h) {
        __syncthreads(); // the previous head's tiles are read
        stage(qs, qb, b, Q_S, QW, h * DH, t0, QT, T - 1);
        stage(os, ob, b, O_S, QW, h * DH, t0, QT, T - 1);
        if (tid < QT && t0 + tid < T) {
          rlse[tid] = l4_ldcg(lseOf + (b * T + t0 + tid) * H + h);
          rdel[tid] = l4_ldcg(deltaOf + (b * T + t0 + tid) * H + h);
        }
        __syncthreads();
        // S^T and dp^T: this warp's 16 keys (A, from ks and vs) x 16
        // queries (B, from qs and os).
        float s[2][4], dp[2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c)
            s[j][c] = dp[j][c] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
          const int kr = warp * 16 + g, kc = kk * 16 + 2 * t4;
          const unsigned ka[4] = {l4_pair(&ks[kr][kc]), l4_pair(&ks[kr + 8][kc]),
                                  l4_pair(&ks[kr][kc + 8]), l4_pair(&ks[kr + 8][kc + 8])};
          const unsigned va[4] = {l4_pair(&vs[kr][kc]), l4_pair(&vs[kr + 8][kc]),
                                  l4_pair(&vs[kr][kc + 8]), l4_pair(&vs[kr + 8][kc + 8])};
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const unsigned bq[2] = {l4_pair(&qs[j * 8 + g][kc]), l4_pair(&qs[j * 8 + g][kc + 8])};
            const unsigned bo[2] = {l4_pair(&os[j * 8 + g][kc]), l4_pair(&os[j * 8 + g][kc + 8])};
            l4_mma_bf16(s[j], ka, bq);
            l4_mma_bf16(dp[j], va, bo);
          }
        }
        // P^T and dS^T; query column tt sees key (row) ja or jb if inside
        // its range (rows past T have none).
        unsigned ph[1][4], pl[1][4], sh[1][4], sl[1][4];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          float p[4], d[4];
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int tt = j * 8 + 2 * t4 + (c & 1);
            const long long key = c < 2 ? ja : jb;
            const bool in = key >= rlo[tt] && key <= rhi[tt];
            p[c] = in ? expf(s[j][c] * SCALE - rlse[tt]) : 0.0f;
            d[c] = in ? p[c] * (dp[j][c] - rdel[tt]) : 0.0f;
          }
          pack(ph, pl, j, p);
          pack(sh, sl, j, d);
        }
        accumulate(dv, ph[0], pl[0], os, 0);
        accumulate(dk, sh[0], sl[0], qs, 0);
      }
    }
    const long long ka0 = (b * DK_S + ja) * KW + kvh * DH, ka1 = (b * DK_S + jb) * KW + kvh * DH;
    const long long va0 = (b * DV_S + ja) * KW + kvh * DH, va1 = (b * DV_S + jb) * KW + kvh * DH;
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      const int d = n * 8 + 2 * t4;
      if (ja < T) {
        l4_st(y1, ka0 + d, dk[n][0] * SCALE);
        l4_st(y1, ka0 + d + 1, dk[n][1] * SCALE);
        l4_st(y2, va0 + d, dv[n][0]);
        l4_st(y2, va0 + d + 1, dv[n][1]);
      }
      if (jb < T) {
        l4_st(y1, ka1 + d, dk[n][2] * SCALE);
        l4_st(y1, ka1 + d + 1, dk[n][3] * SCALE);
        l4_st(y2, va1 + d, dv[n][2]);
        l4_st(y2, va1 + d + 1, dv[n][3]);
      }
    }
  }
  // The last block out resets the queue for the next launch.
  if (l4_last_block(ws) && tid == 0)
    *ticket = *doneA = 0u;
)cuda";
  b.threads = 128;
  uint64_t qTiles = (uint64_t(rowsPerBatch) + 63) / 64;
  b.blocks = std::min<uint64_t>(uint64_t(bmax) * qTiles * uint64_t(heads + kvHeads), 4096);
  b.workspaceBytes = 256 + 8 * uint64_t(bmax) * rowsPerBatch * heads;
  return llvm::Error::success();
}

llvm::Error emitAttentionGrad(OpContext &ctx) {
  auto op = cast<l4::AttentionGradOp>(ctx.op);
  const View &q = ctx.operands[0], &k = ctx.operands[1], &v = ctx.operands[2],
             &pos = ctx.operands[3], &dout = ctx.operands[4];
  auto qs = q.shape(), ks = k.shape();
  if (!q.hasSeq || !k.hasSeq || !v.hasSeq || !pos.hasSeq || !dout.hasSeq ||
      qs.size() != 4 || ks.size() != 4 || k.shape() != v.shape() ||
      dout.inner != q.inner)
    return ctx.fail("expected q, dout [B, S, H, d], fresh k and v [B, S, Hkv, "
                    "d] and positions [B, S]");
  int64_t heads = qs[2], dim = qs[3], kvHeads = ks[2];
  if (ks[3] != dim || kvHeads <= 0 || heads % kvHeads)
    return ctx.fail("head dims or GQA group sizes disagree");
  Body &b = ctx.body;
  std::string consts =
      constant("H", heads) + constant("HKV", kvHeads) +
      constant("DH", dim, "head dim") +
      constant("G", heads / kvHeads, "query heads per kv head") +
      stride(b, "Q_S", q.rowsPerBatch) + stride(b, "K_S", k.rowsPerBatch) +
      stride(b, "O_S", dout.rowsPerBatch) + stride(b, "P_S", pos.rowsPerBatch) +
      stride(b, "DQ_S", ctx.results[0].rowsPerBatch) +
      stride(b, "DK_S", ctx.results[1].rowsPerBatch) +
      stride(b, "DV_S", ctx.results[2].rowsPerBatch) +
      constant("CHUNK", op.getChunkSize(), "0: causal only") +
      "  constexpr float SCALE = " +
      floatLit(float(op.getScale().convertToDouble())) + ";\n";
  // bf16 operands with a head dim of whole 16-wide steps whose tiles (two
  // of 64 keys, two of 16 queries, rows padded by 8) fit 46 KiB: tensor
  // cores. dk and dv keep 2 x DH / 2 accumulators a thread: up to 128.
  bool bf16 = q.ctype == "l4_bf16" && k.ctype == "l4_bf16" &&
              v.ctype == "l4_bf16" && dout.ctype == "l4_bf16";
  if (bf16 && dim % 16 == 0 && dim <= 128)
    return emitAttentionGradMma(ctx, consts, heads, kvHeads, q.rowsPerBatch,
                                q.bmax);
  // Square tiles of R query rows and R keys, 8 threads a row. The four
  // row tiles (two of queries, two of keys) and the two score tiles must
  // fit the 48 KiB of static shared memory.
  auto sharedBytes = [&](int64_t r) {
    return 4 * (4 * r * (dim + 1) + 2 * r * (r + 1) + 2 * r) + 16 * r;
  };
  int64_t rows = sharedBytes(16) <= 46 * 1024 ? 16 : 8;
  if (sharedBytes(rows) > 46 * 1024)
    return ctx.fail("head dim " + std::to_string(dim) +
                    " is too large for the attention backward's tiles");
  b.globals += R"cuda(// Stages rows t0 .. t0 + R - 1 of x (a row every XS rows of batch entry
// b, XW wide, from column xo) in a tile; rows past T are zeros.
template <int R, int DH, class X>
__device__ __forceinline__ void @B@_stage(float (*tile)[DH + 1], const X *x, long long b,
                                        long long XS, long long XW, long long xo,
                                        long long t0, long long T) {
  for (int e = threadIdx.x; e < R * DH; e += blockDim.x) {
    const int rr = e / DH, i = e % DH;
    const long long t = t0 + rr;
    tile[rr][i] = t < T ? l4_ld(x, (b * XS + t) * XW + xo + i) : 0.0f;
  }
}
)cuda";
  llvm::raw_string_ostream os(b.code);
  os << consts << constant("R", rows, "query rows and keys per tile")
     << R"cuda(  // Flash-style, in one launch of two phases; scores are recomputed
  // (twice in A, once in B), never stored:
  //  A. a task per (batch, head, query tile): an online pass over the key
  //     tiles the rows may see gives each row's log-sum-exp and
  //     delta = sum_j P_j dp_j (dp_j = <dout, v_j>); a second pass forms
  //     dS = P (dp - delta) and dq = SCALE dS K. lse and delta go to the
  //     workspace.
  //  B. a task per (batch, kv head, key tile), once every A task has
  //     published: over the query tiles that may see the keys and the
  //     group's heads, dv += P^T dout and dk += SCALE dS^T q.
  // Tasks are claimed in order from a ticket, so a B task only waits for A
  // tasks that running blocks hold.
  constexpr int NJ = R / 8, ND = (DH + 7) / 8;
  constexpr long long KW = HKV * DH, QW = H * DH;
  unsigned *ticket = reinterpret_cast<unsigned *>(ws + 8);
  unsigned *doneA = ticket + 1;
  float *lseOf = reinterpret_cast<float *>(ws + 256); // [B, T, H]
  float *deltaOf = lseOf + B * T * H;
  // Rows padded by one float so that the dot-product loops' row reads land
  // in distinct banks.
  __shared__ float as[R][DH + 1], bs[R][DH + 1]; // q and dout rows
  __shared__ float kt[R][DH + 1], vt[R][DH + 1]; // k and v rows
  __shared__ float ps[R][R + 1], ds[R][R + 1];
  __shared__ float rlse[R], rdel[R];
  __shared__ long long rlo[R], rhi[R];
  // Thread (r, c): row r of the tile it owns (a query in A, a key in B);
  // columns c + 8jj of the other tile and output columns c + 8i.
  const int tid = threadIdx.x, r = tid >> 3, c = tid & 7;
  const long long tiles = (T + R - 1) / R;
  const long long nA = B * H * tiles, nB = B * HKV * tiles;
  // Each row's keys of query tile t0 in rlo, rhi; their union (all threads).
  auto ranges = [&](long long b, long long t0, long long &jmin, long long &jmax) {
    __syncthreads(); // the previous tile is done with rlo, rhi
    l4_attn_rows(pos, b * P_S, t0, T, T, CHUNK, R, rlo, rhi);
    __syncthreads();
    l4_attn_union(rlo, rhi, R, T, jmin, jmax);
  };
  auto dot = [&](const float *x, const float *y) {
    float a = 0.0f;
    for (int i = 0; i < DH; ++i)
      a = fmaf(x[i], y[i], a);
    return a;
  };
  for (;;) {
    const long long task = l4_claim(ticket);
    if (task >= nA + nB)
      break;
    if (task < nA) {
      const long long h = task % H, rest = task / H;
      const long long b = rest / tiles, t0 = rest % tiles * R;
      const long long kvo = h / G * DH;
      long long jmin, jmax;
      ranges(b, t0, jmin, jmax);
      @B@_stage<R, DH>(as, q, b, Q_S, QW, h * DH, t0, T);
      @B@_stage<R, DH>(bs, dout, b, O_S, QW, h * DH, t0, T);
      const long long lo = rlo[r], hi = rhi[r];
      // Pass 1: m, l and u = sum_j e^(s_j - m) dp_j, online.
      float m = l4_neg_inf(), l = 0.0f, u = 0.0f;
      for (long long j0 = jmin; j0 <= jmax; j0 += R) {
        __syncthreads(); // the previous key tile is read (and as, bs staged)
        @B@_stage<R, DH>(kt, k, b, K_S, KW, kvo, j0, T);
        @B@_stage<R, DH>(vt, v, b, K_S, KW, kvo, j0, T);
        __syncthreads();
        float s[NJ], dp[NJ], tmax = l4_neg_inf();
#pragma unroll
        for (int jj = 0; jj < NJ; ++jj) {
          const long long j = j0 + c + 8 * jj;
          s[jj] = l4_neg_inf();
          dp[jj] = 0.0f;
          if (j >= lo && j <= hi) {
            s[jj] = dot(as[r], kt[c + 8 * jj]) * SCALE;
            dp[jj] = dot(bs[r], vt[c + 8 * jj]);
          }
          tmax = fmaxf(tmax, s[jj]);
        }
        for (int o = 4; o > 0; o >>= 1)
          tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
        const float mNew = fmaxf(m, tmax);
        // A row that has seen no allowed key yet keeps m = -inf.
        const float corr = mNew == l4_neg_inf() ? 1.0f : expf(m - mNew);
        float pl = 0.0f, pu = 0.0f;
#pragma unroll
        for (int jj = 0; jj < NJ; ++jj) {
          const float e = s[jj] == l4_neg_inf() ? 0.0f : expf(s[jj] - mNew);
          pl += e;
          pu = fmaf(e, dp[jj], pu);
        }
        for (int o = 4; o > 0; o >>= 1) {
          pl += __shfl_xor_sync(0xffffffffu, pl, o);
          pu += __shfl_xor_sync(0xffffffffu, pu, o);
        }
        l = l * corr + pl;
        u = u * corr + pu;
        m = mNew;
      }
      // A row that sees no key has P = 0: no gradient flows through it.
      const float lse = l > 0.0f ? m + logf(l) : 0.0f;
      const float delta = l > 0.0f ? u / l : 0.0f;
      // Pass 2: dq = SCALE sum_j dS_j k_j.
      float acc[ND];
#pragma unroll
      for (int i = 0; i < ND; ++i)
        acc[i] = 0.0f;
      for (long long j0 = jmin; j0 <= jmax; j0 += R) {
        __syncthreads();
        @B@_stage<R, DH>(kt, k, b, K_S, KW, kvo, j0, T);
        @B@_stage<R, DH>(vt, v, b, K_S, KW, kvo, j0, T);
        __syncthreads();
#pragma unroll
        for (int jj = 0; jj < NJ; ++jj) {
          const long long j = j0 + c + 8 * jj;
          float g = 0.0f;
          if (j >= lo && j <= hi) {
            const float p = expf(dot(as[r], kt[c + 8 * jj]) * SCALE - lse);
            g = p * (dot(bs[r], vt[c + 8 * jj]) - delta);
          }
          ds[r][c + 8 * jj] = g;
        }
        __syncthreads();
        const int cnt = jmax - j0 + 1 < R ? (int)(jmax - j0 + 1) : R;
#pragma unroll
        for (int i = 0; i < ND; ++i) {
          const int d = c + 8 * i;
          if (d < DH) {
            float a = acc[i];
            for (int jj = 0; jj < cnt; ++jj)
              a = fmaf(ds[r][jj], kt[jj][d], a);
            acc[i] = a;
          }
        }
      }
      const long long t = t0 + r;
      if (t < T) {
        const long long o = (b * DQ_S + t) * QW + h * DH;
#pragma unroll
        for (int i = 0; i < ND; ++i) {
          const int d = c + 8 * i;
          if (d < DH)
            l4_st(y0, o + d, acc[i] * SCALE);
        }
        if (c == 0) {
          lseOf[(b * T + t) * H + h] = lse;
          deltaOf[(b * T + t) * H + h] = delta;
        }
      }
      l4_publish(doneA);
      continue;
    }
    const long long u = task - nA, kvh = u % HKV, rest = u / HKV;
    const long long b = rest / tiles, j0 = rest % tiles * R, j = j0 + r;
    l4_await(doneA, (unsigned)nA);
    @B@_stage<R, DH>(kt, k, b, K_S, KW, kvh * DH, j0, T);
    @B@_stage<R, DH>(vt, v, b, K_S, KW, kvh * DH, j0, T);
    float gk[ND], gv[ND];
#pragma unroll
    for (int i = 0; i < ND; ++i)
      gk[i] = gv[i] = 0.0f;
    for (long long t0 = 0; t0 < T; t0 += R) {
      long long jmin, jmax;
      ranges(b, t0, jmin, jmax); // its barriers also publish kt, vt
      if (jmax < j0 || jmin > j0 + R - 1)
        continue; // no row of this query tile sees these keys
      for (long long h = kvh * G; h < (kvh + 1) * G; ++h) {
        __syncthreads(); // the previous head's tiles are read
        @B@_stage<R, DH>(as, q, b, Q_S, QW, h * DH, t0, T);
        @B@_stage<R, DH>(bs, dout, b, O_S, QW, h * DH, t0, T);
        if (tid < R && t0 + tid < T) {
          rlse[tid] = l4_ldcg(lseOf + (b * T + t0 + tid) * H + h);
          rdel[tid] = l4_ldcg(deltaOf + (b * T + t0 + tid) * H + h);
        }
        __syncthreads();
#pragma unroll
        for (int qq = 0; qq < NJ; ++qq) {
          const int tt = c + 8 * qq;
          float p = 0.0f, g = 0.0f;
          if (j >= rlo[tt] && j <= rhi[tt]) {
            p = expf(dot(as[tt], kt[r]) * SCALE - rlse[tt]);
            g = p * (dot(bs[tt], vt[r]) - rdel[tt]);
          }
          ps[r][tt] = p;
          ds[r][tt] = g;
        }
        __syncthreads();
        const int cnt = T - t0 < R ? (int)(T - t0) : R;
#pragma unroll
        for (int i = 0; i < ND; ++i) {
          const int d = c + 8 * i;
          if (d < DH) {
            float av = gv[i], ak = gk[i];
            for (int tt = 0; tt < cnt; ++tt) {
              av = fmaf(ps[r][tt], bs[tt][d], av);
              ak = fmaf(ds[r][tt], as[tt][d], ak);
            }
            gv[i] = av;
            gk[i] = ak;
          }
        }
      }
    }
    if (j < T) {
      const long long ko = (b * DK_S + j) * KW + kvh * DH;
      const long long vo = (b * DV_S + j) * KW + kvh * DH;
#pragma unroll
      for (int i = 0; i < ND; ++i) {
        const int d = c + 8 * i;
        if (d < DH) {
          l4_st(y1, ko + d, gk[i] * SCALE);
          l4_st(y2, vo + d, gv[i]);
        }
      }
    }
  }
  // The last block out resets the queue for the next launch.
  if (l4_last_block(ws) && tid == 0)
    *ticket = *doneA = 0u;
)cuda";
  b.threads = uint32_t(8 * rows);
  uint64_t tiles = (uint64_t(q.rowsPerBatch) + rows - 1) / rows;
  b.blocks = std::min<uint64_t>(
      uint64_t(q.bmax) * tiles * uint64_t(heads + kvHeads), 4096);
  b.workspaceBytes = 256 + 8 * uint64_t(q.bmax) * q.rowsPerBatch * heads;
  return llvm::Error::success();
}

llvm::Error emitRouterScoresGrad(OpContext &ctx) {
  auto op = cast<l4::RouterScoresGradOp>(ctx.op);
  const View &x = ctx.operands[0], &ds = ctx.operands[1], &y = ctx.results[0];
  auto lt = liveRows(ctx, {&x, &ds, &y});
  if (!lt)
    return lt.takeError();
  int64_t experts = x.shape().back();
  if (x.inner != experts || ds.inner != experts || y.inner != experts)
    return ctx.fail("expected logits, dscores and the result [B, S, E]");
  Body &b = ctx.body;
  b.globals += topkGlobals(); // the forward's selection
  llvm::raw_string_ostream os(b.code);
  os << constant("E", experts)
     << constant("TOPK", std::min<int64_t>(op.getTopK(), experts))
     << stride(b, "X_S", x.rowsPerBatch) << stride(b, "D_S", ds.rowsPerBatch)
     << stride(b, "Y_S", y.rowsPerBatch)
     << "  const long long LT = " << *lt << ";\n"
     << R"cuda(  // dlogit = dscore * s * (1 - s) on the experts the forward selected.
  for (long long r = blockIdx.x * (long long)blockDim.x + threadIdx.x; r < B * LT;
       r += (long long)gridDim.x * blockDim.x) {
    const long long b = r / LT, t = r - b * LT;
    const long long xo = (b * X_S + t) * E, go = (b * D_S + t) * E,
                    yo = (b * Y_S + t) * E;
    for (long long e = 0; e < E; ++e)
      l4_st(y, yo + e, 0.0f);
    long long prev = -1;
    float prevV = 0.0f;
    for (long long kk = 0; kk < TOPK; ++kk) {
      float bestV = 0.0f;
      const long long best = @B@_next(x, xo, E, prev, prevV, bestV);
      if (best < 0)
        break;
      const float s = 1.0f / (1.0f + expf(-bestV));
      l4_st(y, yo + best,
            (float)((double)l4_ld(ds, go + best) * s * (1.0 - (double)s)));
      prev = best;
      prevV = bestV;
    }
  }
)cuda";
  b.threads = 128;
  b.blocks = gridFor(maxRows(x), b.threads);
  return llvm::Error::success();
}

llvm::Error emitSwigluGrad(OpContext &ctx) {
  const View &g = ctx.operands[0], &u = ctx.operands[1], &dy = ctx.operands[2];
  const View &dg = ctx.results[0], &du = ctx.results[1];
  auto lt = liveRows(ctx, {&g, &u, &dy, &dg, &du});
  if (!lt)
    return lt.takeError();
  if (u.inner != g.inner || dy.inner != g.inner || dg.inner != g.inner ||
      du.inner != g.inner)
    return ctx.fail("expected operands and results of one shape");
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << constant("W", g.inner) << stride(b, "G_S", g.rowsPerBatch)
     << stride(b, "U_S", u.rowsPerBatch) << stride(b, "Y_S", dy.rowsPerBatch)
     << stride(b, "A_S", dg.rowsPerBatch) << stride(b, "B_S", du.rowsPerBatch)
     << "  const long long LT = " << *lt << ";\n"
     << R"cuda(  // out = up * silu(gate); both reads before either store (in place is fine).
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
       i < B * LT * W; i += (long long)gridDim.x * blockDim.x) {
    const long long e = i % W, r = i / W, b = r / LT, t = r - b * LT;
    const double gv = l4_ld(gate, (b * G_S + t) * W + e);
    const double uv = l4_ld(up, (b * U_S + t) * W + e);
    const double yv = l4_ld(dy, (b * Y_S + t) * W + e);
    const double sig = 1.0 / (1.0 + exp(-gv));
    const float a = (float)(yv * uv * sig * (1.0 + gv * (1.0 - sig)));
    const float c = (float)(yv * gv * sig);
    l4_st(y0, (b * A_S + t) * W + e, a);
    l4_st(y1, (b * B_S + t) * W + e, c);
  }
)cuda";
  b.threads = 256;
  b.blocks = gridFor(maxRows(g) * g.inner, b.threads);
  return llvm::Error::success();
}

llvm::Error emitEmbeddingGrad(OpContext &ctx) {
  auto op = cast<l4::EmbeddingGradOp>(ctx.op);
  const View &ids = ctx.operands[0], &dy = ctx.operands[1], &y = ctx.results[0];
  auto lt = liveRows(ctx, {&ids, &dy});
  if (!lt)
    return lt.takeError();
  auto ts = y.shape();
  if (ts.size() != 2 || ids.inner != 1 || dy.inner != ts[1] || y.hasBatch)
    return ctx.fail("expected ids [B, S], dy [B, S, D] and a table [V, D]");
  int64_t pad = -1;
  if (auto p = op.getPaddingIdxAttr())
    pad = p.getInt();
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << constant("V", ts[0]) << constant("D", ts[1])
     << constant("PAD", pad, "nn.Embedding's padding_idx; -1: none")
     << stride(b, "I_S", ids.rowsPerBatch) << stride(b, "Y_S", dy.rowsPerBatch)
     << "  const long long LT = " << *lt << ";\n"
     << R"cuda(  // A block owns 32 columns of the table: it zeroes them, then its first
  // warp adds each token's slice in token order (no atomics, the same sums
  // on every run).
  for (long long c0 = blockIdx.x * 32LL; c0 < D; c0 += gridDim.x * 32LL) {
    const long long c = c0 + (threadIdx.x & 31);
    __syncthreads(); // the previous slice is done
    for (long long i = threadIdx.x >> 5; i < V; i += blockDim.x >> 5)
      if (c < D)
        l4_st(y, i * D + c, 0.0f);
    __syncthreads();
    if (threadIdx.x >= 32 || c >= D)
      continue;
    for (long long r = 0; r < B * LT; ++r) {
      const long long b = r / LT, t = r - b * LT;
      const long long id = l4_ldi(ids, b * I_S + t);
      if (id < 0 || id >= V || id == PAD)
        continue;
      l4_st(y, id * D + c, l4_ld(y, id * D + c) + l4_ld(dy, (b * Y_S + t) * D + c));
    }
  }
)cuda";
  b.threads = 128;
  b.blocks = uint64_t(ts[1] + 31) / 32;
  return llvm::Error::success();
}

llvm::Error emitMoeExpertsGrad(OpContext &ctx) {
  const View &x = ctx.operands[0], &scores = ctx.operands[1],
             &gateUp = ctx.operands[2], &down = ctx.operands[3],
             &dy = ctx.operands[4];
  const View &dx = ctx.results[0], &dscores = ctx.results[1];
  auto lt = liveRows(ctx, {&x, &scores, &dy, &dx, &dscores});
  if (!lt)
    return lt.takeError();
  auto gs = gateUp.shape(), ds = down.shape();
  if (gs.size() != 3 || ds.size() != 3 || gs[2] % 2 || x.inner != gs[1] ||
      ds[0] != gs[0] || ds[1] != gs[2] / 2 || ds[2] != gs[1] ||
      scores.inner != gs[0] || dy.inner != gs[1])
    return ctx.fail("expected x [.., D], scores [.., E], gate_up [E, D, 2I], "
                    "down [E, I, D] and dy [.., D]");
  int64_t experts = gs[0], dim = gs[1], inter = gs[2] / 2;
  // z, dy, gu, h, dh, dgu, dz live in shared memory, per token and expert.
  uint64_t sharedBytes = 4 * uint64_t(2 * dim + 2 * inter + 2 * inter + 2 * dim);
  if (sharedBytes > 48 * 1024)
    return ctx.fail(llvm::formatv(
        "the CUDA experts backward keeps a token's vectors in {0} bytes of "
        "static shared memory, above 48 KiB (hidden {1}, expert width {2}); "
        "experts this large train on the cpu backend for now",
        sharedBytes, dim, inter));
  Body &b = ctx.body;
  b.globals += kBlockSumD;
  llvm::raw_string_ostream os(b.code);
  os << constant("E", experts) << constant("D", dim) << constant("I", inter)
     << stride(b, "X_S", x.rowsPerBatch) << stride(b, "S_S", scores.rowsPerBatch)
     << stride(b, "G_S", dy.rowsPerBatch) << stride(b, "DX_S", dx.rowsPerBatch)
     << stride(b, "DS_S", dscores.rowsPerBatch)
     << "  const long long LT = " << *lt << ";\n"
     << R"cuda(  // One block owns every output: for each token and each expert it was
  // routed to, recompute the expert's forward (z = x * s, gu = z @ gate_up,
  // h = up * silu(gate)) and back-propagate dy through it.
  if (blockIdx.x != 0)
    return;
  __shared__ float z[D], g[D], gu[2 * I], h[I], dh[I], dgu[2 * I], dz[D];
  __shared__ double red[32];
  for (long long i = threadIdx.x; i < E * D * 2 * I; i += blockDim.x)
    l4_st(y2, i, 0.0f);
  for (long long i = threadIdx.x; i < E * I * D; i += blockDim.x)
    l4_st(y3, i, 0.0f);
  for (long long r = 0; r < B * LT; ++r) {
    const long long b = r / LT, t = r - b * LT;
    for (long long c = threadIdx.x; c < D; c += blockDim.x)
      l4_st(y0, (b * DX_S + t) * D + c, 0.0f);
    for (long long e = threadIdx.x; e < E; e += blockDim.x)
      l4_st(y1, (b * DS_S + t) * E + e, 0.0f);
  }
  __syncthreads();
  for (long long r = 0; r < B * LT; ++r) {
    const long long b = r / LT, t = r - b * LT;
    const long long xo = (b * X_S + t) * D, go = (b * G_S + t) * D;
    for (long long e = 0; e < E; ++e) {
      const float s = l4_ld(scores, (b * S_S + t) * E + e);
      if (s == 0.0f)
        continue;
      const long long gbase = e * D * 2 * I, dbase = e * I * D;
      for (long long c = threadIdx.x; c < D; c += blockDim.x) {
        z[c] = l4_ld(x, xo + c) * s;
        g[c] = l4_ld(dy, go + c);
      }
      __syncthreads();
      for (long long j = threadIdx.x; j < 2 * I; j += blockDim.x) {
        float a = 0.0f;
        for (long long c = 0; c < D; ++c)
          a = fmaf(z[c], l4_ld(gate_up, gbase + c * 2 * I + j), a);
        gu[j] = a;
      }
      __syncthreads();
      for (long long i = threadIdx.x; i < I; i += blockDim.x) {
        const float gate = gu[i];
        h[i] = gu[I + i] * (gate / (1.0f + expf(-gate)));
        float a = 0.0f; // dh = dy @ down[e]^T
        for (long long c = 0; c < D; ++c)
          a = fmaf(g[c], l4_ld(down, dbase + i * D + c), a);
        dh[i] = a;
      }
      __syncthreads();
      for (long long i = threadIdx.x; i < I; i += blockDim.x) {
        const double gv = gu[i], uv = gu[I + i], yv = dh[i];
        const double sig = 1.0 / (1.0 + exp(-gv));
        dgu[i] = (float)(yv * uv * sig * (1.0 + gv * (1.0 - sig)));
        dgu[I + i] = (float)(yv * gv * sig);
      }
      __syncthreads();
      double dsum = 0.0;
      for (long long c = threadIdx.x; c < D; c += blockDim.x) {
        float a = 0.0f; // dz = dgu @ gate_up[e]^T
        for (long long j = 0; j < 2 * I; ++j)
          a = fmaf(dgu[j], l4_ld(gate_up, gbase + c * 2 * I + j), a);
        dz[c] = a;
        const long long at = (b * DX_S + t) * D + c;
        l4_st(y0, at, l4_ld(y0, at) + s * a);
        dsum += (double)l4_ld(x, xo + c) * a;
      }
      dsum = @B@_bsum(dsum, red);
      if (threadIdx.x == 0)
        l4_st(y1, (b * DS_S + t) * E + e, (float)dsum);
      for (long long k = threadIdx.x; k < I * D; k += blockDim.x) {
        const long long i = k / D, c = k - i * D;
        l4_st(y3, dbase + k, l4_ld(y3, dbase + k) + h[i] * g[c]);
      }
      for (long long k = threadIdx.x; k < D * 2 * I; k += blockDim.x) {
        const long long c = k / (2 * I), j = k - c * 2 * I;
        l4_st(y2, gbase + k, l4_ld(y2, gbase + k) + z[c] * dgu[j]);
      }
      __syncthreads(); // the vectors are reused by the next expert
    }
  }
)cuda";
  b.threads = 256;
  b.blocks = 1;
  return llvm::Error::success();
}

} // namespace l4c::cuda
