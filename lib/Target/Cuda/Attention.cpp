//===- Attention.cpp - CUDA for causal / chunked GQA attention ------------===//
//
// One block per (batch entry, query row, head) with an online softmax over
// the keys the mask allows, read from fresh k/v activations (prefill,
// forward) or from the KV cache (generation).
//
//===----------------------------------------------------------------------===//
#include "Emit.h"
#include "l4c/Dialect/L4/L4Ops.h"
#include "llvm/Support/FormatVariadic.h"

using namespace mlir;

namespace l4c::cuda {

llvm::Error emitAttention(OpContext &ctx) {
  auto op = cast<l4::AttentionOp>(ctx.op);
  const View &q = ctx.operands[0], &k = ctx.operands[1], &v = ctx.operands[2],
             &pos = ctx.operands[3], &y = ctx.results[0];
  auto qs = q.shape(), ks = k.shape();
  if (!q.hasSeq || !pos.hasSeq || !y.hasSeq || qs.size() != 4 ||
      ks.size() != 4 || !k.hasBatch || k.shape() != v.shape() ||
      k.hasSeq != v.hasSeq || y.inner != q.inner)
    return ctx.fail("expected q [B, S, H, d], k and v [B, S or M, Hkv, d] "
                    "and positions [B, S]");
  int64_t heads = qs[2], dim = qs[3], kvHeads = ks[2];
  if (ks[3] != dim || kvHeads <= 0 || heads % kvHeads)
    return ctx.fail("head dims or GQA group sizes disagree");
  // Key j sits at absolute position j. Fresh keys hold exactly the T rows of
  // this run; a cache holds every position below M.
  bool fromCache = !k.hasSeq;
  int64_t threads = 128;
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << constant("H", heads) << constant("HKV", kvHeads)
     << constant("DH", dim, "head dim")
     << constant("G", heads / kvHeads, "query heads per kv head")
     << stride(b, "Q_S", q.rowsPerBatch) << stride(b, "Y_S", y.rowsPerBatch)
     << stride(b, "P_S", pos.rowsPerBatch) << stride(b, "KR", ks[1])
     << constant("CHUNK", op.getChunkSize(), "0: causal only")
     << constant("NT", threads) << "  constexpr float SCALE = "
     << floatLit(float(op.getScale().convertToDouble())) << ";\n"
     << "  const long long KV_LIMIT = "
     << (fromCache ? "KR; // cache rows" : "T; // fresh keys: this run's")
     << "\n"
     << R"cuda(  constexpr long long KW = HKV * DH, NACC = (DH + NT - 1) / NT;
  __shared__ float qv[DH];
  __shared__ float pr[NT];
  __shared__ float red[32];
  const int tid = threadIdx.x;
  for (long long task = blockIdx.x; task < B * T * H; task += gridDim.x) {
    const long long h = task % H, r = task / H, b = r / T, t = r - b * T;
    const long long p = l4_ldi(pos, b * P_S + t);
    // Allowed keys: lo <= j <= hi (causal; same chunk when CHUNK > 0).
    long long hi = p < KV_LIMIT - 1 ? p : KV_LIMIT - 1;
    const long long lo = CHUNK > 0 && p >= 0 ? p / CHUNK * CHUNK : 0;
    if (p < 0)
      hi = -1;
    const long long qo = (b * Q_S + t) * (H * DH) + h * DH;
    const long long yo = (b * Y_S + t) * (H * DH) + h * DH;
    const long long kvo = b * KR * KW + h / G * DH;
    __syncthreads(); // the previous task is done with qv and pr
    for (long long i = tid; i < DH; i += NT)
      qv[i] = l4_ld(q, qo + i);
    __syncthreads();
    float m = l4_neg_inf(), l = 0.0f, acc[NACC];
#pragma unroll
    for (int c = 0; c < NACC; ++c)
      acc[c] = 0.0f;
    for (long long j0 = lo; j0 <= hi; j0 += NT) {
      const long long j = j0 + tid;
      float s = l4_neg_inf();
      if (j <= hi) {
        float dot = 0.0f;
        for (long long i = 0; i < DH; ++i)
          dot = fmaf(qv[i], l4_ld(k, kvo + j * KW + i), dot);
        s = dot * SCALE;
      }
      const float mNew = fmaxf(m, l4_block_max(s, red));
      const float corr = expf(m - mNew); // 0 on the first tile
      const float e = j <= hi ? expf(s - mNew) : 0.0f;
      pr[tid] = e;
      l = l * corr + l4_block_sum(e, red); // its barriers publish pr
      m = mNew;
      const long long cnt = hi - j0 + 1 < NT ? hi - j0 + 1 : NT;
#pragma unroll
      for (int c = 0; c < NACC; ++c) {
        const long long i = tid + c * NT;
        if (i < DH) {
          float a = acc[c] * corr;
          for (long long jj = 0; jj < cnt; ++jj)
            a = fmaf(pr[jj], l4_ld(v, kvo + (j0 + jj) * KW + i), a);
          acc[c] = a;
        }
      }
      __syncthreads(); // pr is read before the next tile rewrites it
    }
    // A query that sees no key (masked out entirely) gets zeros.
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int c = 0; c < NACC; ++c) {
      const long long i = tid + c * NT;
      if (i < DH)
        l4_st(y, yo + i, acc[c] * inv);
    }
  }
)cuda";
  b.threads = unsigned(threads);
  b.blocks = gridFor(uint64_t(q.bmax) * q.rowsPerBatch * heads, 1);
  return llvm::Error::success();
}

} // namespace l4c::cuda
