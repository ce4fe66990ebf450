//===- Matmul.cpp - CUDA for linear and the routed experts ----------------===//
//
// linear: a shared-memory tiled f32 GEMM over the live token rows (64x64
// tiles, 16-deep K steps, 256 threads with 4x4 outputs each). moe_experts:
// one block per token running its selected experts, correct before fast.
//
//===----------------------------------------------------------------------===//
#include "Emit.h"
#include "llvm/Support/FormatVariadic.h"

namespace l4c::cuda {

llvm::Error emitLinear(OpContext &ctx) {
  const View &x = ctx.operands[0], &w = ctx.operands[1], &y = ctx.results[0];
  if (!x.hasBatch || !y.hasBatch || x.hasSeq != y.hasSeq)
    return ctx.fail("expected token-major input and result");
  auto ws = w.shape();
  if (ws.size() != 2 || x.inner != ws[1] || y.inner != ws[0])
    return ctx.fail("expected x [.., K], w [N, K] and y [.., N]");
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << constant("N", ws[0]) << constant("K", ws[1])
     << stride(b, "X_S", x.rowsPerBatch) << stride(b, "Y_S", y.rowsPerBatch)
     << "  const long long LT = " << (x.hasSeq ? "T" : "1") << ";\n"
     << R"cuda(  // y[m, n] = sum_k x[m, k] * w[n, k] over the M = B * LT live rows; row m
  // is token (m / LT, m % LT). Tiles of 64x64 outputs, K in steps of 16,
  // staged k-major in shared memory; thread (ty, tx) owns rows ty + 16i and
  // columns tx + 16j (i, j < 4), so both shared reads are conflict-free.
  constexpr int BM = 64, BN = 64, BK = 16;
  __shared__ float xs[BK][BM + 4];
  __shared__ float ws[BK][BN + 4];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const long long M = B * LT;
  const long long tilesN = (N + BN - 1) / BN;
  const long long tiles = (M + BM - 1) / BM * tilesN;
  for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const long long m0 = tile / tilesN * BM, n0 = tile % tilesN * BN;
    // The rows this thread stages: x rows m0 + ty + 16i, w rows n0 + ty + 16i.
    long long xrow[4], wrow[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const long long m = m0 + ty + 16 * i, n = n0 + ty + 16 * i;
      xrow[i] = m < M ? (m / LT * X_S + m % LT) * K : -1;
      wrow[i] = n < N ? n * K : -1;
    }
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        acc[i][j] = 0.0f;
    for (long long k0 = 0; k0 < K; k0 += BK) {
      const long long k = k0 + tx;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        xs[tx][ty + 16 * i] = xrow[i] >= 0 && k < K ? l4_ld(x, xrow[i] + k) : 0.0f;
        ws[tx][ty + 16 * i] = wrow[i] >= 0 && k < K ? l4_ld(w, wrow[i] + k) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        float a[4], c[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          a[i] = xs[kk][ty + 16 * i];
          c[i] = ws[kk][tx + 16 * i];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j)
            acc[i][j] = fmaf(a[i], c[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const long long m = m0 + ty + 16 * i;
      if (m >= M)
        continue;
      const long long yo = (m / LT * Y_S + m % LT) * N;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const long long n = n0 + tx + 16 * j;
        if (n < N)
          l4_st(y, yo + n, acc[i][j]);
      }
    }
  }
)cuda";
  b.threads = 256;
  uint64_t maxM = uint64_t(x.bmax) * x.maxLiveRows();
  b.blocks = gridFor((maxM + 63) / 64 * ((uint64_t(ws[0]) + 63) / 64), 1);
  return llvm::Error::success();
}

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

} // namespace l4c::cuda
