//===- Attention.cpp - CUDA for causal / chunked GQA attention ------------===//
//
// Forward and prefill: flash-style tiles with an online softmax, visiting
// only the key tiles some row of the tile may see: on tensor cores for bf16
// (64 query rows x 64 keys, mma.sync, or Hopper wgmma as a tuning
// candidate), else 16 query rows x 32 keys in f32 on CUDA cores. Decode:
// one block per (batch entry, query row, head) with an online softmax over
// the keys the mask allows. Keys come from fresh k/v activations (forward)
// or the KV cache (generation).
//
//===----------------------------------------------------------------------===//
#include "Emit.h"
#include "l4c/Dialect/L4/L4Ops.h"
#include "llvm/Support/FormatVariadic.h"

using namespace mlir;

namespace l4c::cuda {

namespace {

/// The constants both attention kernels declare: head counts and dims,
/// row strides, the chunk, the scale and the key limit.
std::string attentionConstants(OpContext &ctx, bool fromCache) {
  auto op = cast<l4::AttentionOp>(ctx.op);
  const View &q = ctx.operands[0], &k = ctx.operands[1], &pos = ctx.operands[3],
             &y = ctx.results[0];
  auto qs = q.shape(), ks = k.shape();
  int64_t heads = qs[2], dim = qs[3], kvHeads = ks[2];
  Body &b = ctx.body;
  std::string text;
  llvm::raw_string_ostream os(text);
  os << constant("H", heads) << constant("HKV", kvHeads)
     << constant("DH", dim, "head dim")
     << constant("G", heads / kvHeads, "query heads per kv head")
     << stride(b, "Q_S", q.rowsPerBatch) << stride(b, "Y_S", y.rowsPerBatch)
     << stride(b, "P_S", pos.rowsPerBatch) << stride(b, "KR", ks[1])
     << constant("CHUNK", op.getChunkSize(), "0: causal only")
     << "  constexpr float SCALE = "
     << floatLit(float(op.getScale().convertToDouble())) << ";\n"
     << "  const long long KV_LIMIT = "
     << (fromCache ? "KR; // cache rows" : "T; // fresh keys: this run's")
     << "\n";
  return text;
}

/// Flash-style attention over query tiles: a block takes 16 query rows of
/// one head, stages 32 keys and values at a time in shared memory, and
/// keeps an online softmax per row. The key range of a tile is the union of
/// its rows' allowed ranges, so key tiles wholly outside the causal window
/// or the chunk are never visited; keys inside the range but outside a
/// row's window are masked.
llvm::Error emitAttentionTiles(OpContext &ctx, bool fromCache) {
  const View &q = ctx.operands[0];
  int64_t heads = q.shape()[2];
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << attentionConstants(ctx, fromCache)
     << R"cuda(  constexpr int BQ = 16, BK = 32, NT = 128, ND = (DH + 7) / 8;
  constexpr long long KW = HKV * DH;
  // Rows padded by one float: the score loop's reads of q and k rows and
  // the P reads land in distinct banks.
  __shared__ float qs[BQ][DH + 1];
  __shared__ float ks[BK][DH + 1];
  __shared__ float vs[BK][DH];
  __shared__ float ps[BQ][BK + 1];
  __shared__ long long rlo[BQ], rhi[BQ];
  // Thread (r, c): query row r of the tile; keys c + 8j of a key tile and
  // output columns c + 8i. The 8 threads of a row are adjacent lanes.
  const int tid = threadIdx.x, r = tid >> 3, c = tid & 7;
  const long long qTiles = (T + BQ - 1) / BQ;
  for (long long task = blockIdx.x; task < B * H * qTiles; task += gridDim.x) {
    const long long h = task % H, rest = task / H;
    const long long b = rest / qTiles, t0 = rest % qTiles * BQ;
    const long long kvo = b * KR * KW + h / G * DH;
    __syncthreads(); // the previous task is done with the tiles
    for (int e = tid; e < BQ * DH; e += NT) {
      const int rr = e / DH, i = e % DH;
      const long long t = t0 + rr;
      qs[rr][i] = t < T ? l4_ld(q, (b * Q_S + t) * (H * DH) + h * DH + i) : 0.0f;
    }
    l4_attn_rows(pos, b * P_S, t0, T, KV_LIMIT, CHUNK, BQ, rlo, rhi);
    __syncthreads();
    long long jmin, jmax;
    l4_attn_union(rlo, rhi, BQ, KV_LIMIT, jmin, jmax);
    const long long lo = rlo[r], hi = rhi[r];
    float m = l4_neg_inf(), l = 0.0f, acc[ND];
#pragma unroll
    for (int i = 0; i < ND; ++i)
      acc[i] = 0.0f;
    for (long long j0 = jmin; j0 <= jmax; j0 += BK) {
      __syncthreads(); // the previous key tile is read
      for (int e = tid; e < BK * DH; e += NT) {
        const int jj = e / DH, i = e % DH;
        const long long j = j0 + jj;
        const bool in = j <= jmax;
        ks[jj][i] = in ? l4_ld(k, kvo + j * KW + i) : 0.0f;
        vs[jj][i] = in ? l4_ld(v, kvo + j * KW + i) : 0.0f;
      }
      __syncthreads();
      float s[BK / 8];
      float tmax = l4_neg_inf();
#pragma unroll
      for (int jj = 0; jj < BK / 8; ++jj) {
        const long long j = j0 + c + 8 * jj;
        s[jj] = l4_neg_inf();
        if (j >= lo && j <= hi) {
          float dot = 0.0f;
          for (int i = 0; i < DH; ++i)
            dot = fmaf(qs[r][i], ks[c + 8 * jj][i], dot);
          s[jj] = dot * SCALE;
        }
        tmax = fmaxf(tmax, s[jj]);
      }
      for (int o = 4; o > 0; o >>= 1)
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
      const float mNew = fmaxf(m, tmax);
      // A row that has seen no allowed key yet keeps m = -inf: no rescale.
      const float corr = mNew == l4_neg_inf() ? 1.0f : expf(m - mNew);
      float psum = 0.0f;
#pragma unroll
      for (int jj = 0; jj < BK / 8; ++jj) {
        const float e = s[jj] == l4_neg_inf() ? 0.0f : expf(s[jj] - mNew);
        ps[r][c + 8 * jj] = e;
        psum += e;
      }
      for (int o = 4; o > 0; o >>= 1)
        psum += __shfl_xor_sync(0xffffffffu, psum, o);
      l = l * corr + psum;
      m = mNew;
      __syncthreads(); // ps is written
      const int cnt = jmax - j0 + 1 < BK ? (int)(jmax - j0 + 1) : BK;
#pragma unroll
      for (int i = 0; i < ND; ++i) {
        const int d = c + 8 * i;
        if (d < DH) {
          float a = acc[i] * corr;
          for (int jj = 0; jj < cnt; ++jj)
            a = fmaf(ps[r][jj], vs[jj][d], a);
          acc[i] = a;
        }
      }
    }
    // A query that sees no key (masked out entirely) gets zeros.
    const long long t = t0 + r;
    if (t < T) {
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      const long long yo = (b * Y_S + t) * (H * DH) + h * DH;
#pragma unroll
      for (int i = 0; i < ND; ++i) {
        const int d = c + 8 * i;
        if (d < DH)
          l4_st(y, yo + d, acc[i] * inv);
      }
    }
  }
)cuda";
  b.threads = 128;
  b.blocks = gridFor(uint64_t(q.bmax) * heads *
                         ((uint64_t(q.rowsPerBatch) + 15) / 16),
                     1);
  return llvm::Error::success();
}

/// bf16 plans: flash-style attention on tensor cores (bf16 in, f32
/// accumulate). A block of 4 warps takes 64 query rows of one head, 16 a
/// warp; key tiles of 64 keys and their values are copied to shared memory
/// by cp.async into two buffers, one tile ahead. S = Q K^T and the online
/// softmax stay in the accumulator fragments (the same layout for both MMA
/// kinds), and O += P V takes P in two bf16 parts (two products) so that it
/// keeps f32-like precision, or rounded once (configurations *p1). Same
/// masks, tile skipping and empty-row zeros as the f32 tiles.
///
/// a64, a64p1: mma.sync m16n8k16 with the warp's Q fragments in registers
/// and P re-packed in registers as the A fragments of P V.
/// w64, w64p1, w128, w128p1 (sm_90a, head dims up to 128, tuning
/// candidates): Hopper warpgroup MMAs, the block one warpgroup of 64
/// queries (w128: two, sharing the K/V tiles): Q, the K/V tiles and P in
/// 128-byte-swizzled shared memory, S as m64n64k16 products, O += P V as
/// m64n<DH>k16 with V transposed by the MMA.
llvm::Error emitAttentionMma(OpContext &ctx, bool fromCache) {
  const View &q = ctx.operands[0];
  int64_t heads = q.shape()[2], dim = q.shape()[3];
  Body &b = ctx.body;
  b.configs = {"a64", "a64p1"};
  if (ctx.arch == "sm_90a" && dim <= 128 && pieceAligned({&q}))
    b.configs.append({"w64", "w64p1", "w128", "w128p1"});
  const bool wg = ctx.config.starts_with("w");
  const bool onePart = ctx.config.ends_with("p1");
  // w128: two warpgroups of 64 queries share each K/V tile.
  const int groups = ctx.config.starts_with("w128") ? 2 : 1;
  llvm::raw_string_ostream os(b.code);
  os << attentionConstants(ctx, fromCache) << "  constexpr int BQ = "
     << 64 * groups << ", BK = 64, NT = " << 128 * groups
     << R"cuda(, KS = DH / 16, NO = DH / 8;
  constexpr long long KW = HKV * DH;
)cuda";
  if (wg) {
    b.globals += kWgmmaGlobals;
    b.globals += wgmmaMma(8, false, false, "mma_s");
    b.globals += wgmmaMma(int(dim / 8), false, true, "mma_o");
    b.inlined = true;
    os << R"cuda(  // The head dim padded to whole 128-byte swizzle rows of 64 elements.
  constexpr int DP = (DH + 63) / 64 * 64;
  // Hopper warpgroup MMAs; warpgroup wgi of the block (NT / 128 of them)
  // takes query rows wgi * 64... Shared memory from a
  // 1024-byte aligned base: Q [DP / 64][BQ][64], two buffers of K
  // [DP / 64][BK][64] (K-major, each 128-byte row's 16-byte piece p stored
  // at p ^ (row % 8), as wgmma's 128-byte swizzle reads it), two of V in
  // atoms (d / 64, key / 8) of 64 d x 8 keys (MN-major: transposed by the
  // MMA), then P [BQ][BK] (K-major: the A of O += P V))cuda"
       << (onePart ? "" : ", its hi and lo parts") << R"cuda(.
  unsigned short *const qs = @B@_align1024(l4_dsmem());
  unsigned short *const ks = qs + BQ * DP;
  unsigned short *const vs = ks + 2 * BK * DP;
  unsigned short *const ps = vs + 2 * BK * DP;
)cuda";
    if (!onePart)
      os << "  unsigned short *const pls = ps + BQ * BK;\n";
    os << R"cuda(  // Element (row i, column c) of a K-major tile of n rows; element
  // (d, key j) of a V tile.
  auto kOff = [](int i, int c, int n) {
    return (c >> 6) * (n * 64) + i * 64 + ((((c & 63) >> 3) ^ (i & 7)) << 3) + (c & 7);
  };
  auto vOff = [](int d, int j) {
    return (d >> 6) * (BK * 64) + (j >> 3) * 512 + (j & 7) * 64 +
           ((((d & 63) >> 3) ^ (j & 7)) << 3) + (d & 7);
  };
)cuda";
  } else {
    os << R"cuda(  // Key tiles of k and v [key][DH + 8] in two buffers (dynamic shared
  // memory), filled by 16-byte cp.async copies: the next tile's copies are
  // in flight while this tile's products run. Rows padded by 8 elements: a
  // K fragment's 8 rows x 4 pairs, and a V fragment's 4 row pairs x 8
  // columns read as 16-bit halves, hit distinct banks.
  auto *ks = reinterpret_cast<unsigned short (*)[BK][DH + 8]>(l4_dsmem());
  auto *vs = reinterpret_cast<unsigned short (*)[BK][DH + 8]>(l4_dsmem() + 2 * BK * (DH + 8) * 2);
)cuda";
  }
  os << R"cuda(  __shared__ long long rlo[BQ], rhi[BQ];
  const unsigned short *qb = reinterpret_cast<const unsigned short *>(q);
  const unsigned short *kb = reinterpret_cast<const unsigned short *>(k);
  const unsigned short *vb = reinterpret_cast<const unsigned short *>(v);
  // Lane (g, t) of warp w: tile rows w*16 + g and w*16 + g + 8; key (or
  // output) columns 8n + 2t, 8n + 2t + 1 of each 8-wide tile n.
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
)cuda";
  if (wg)
    os << (groups > 1
               ? "  const int wgi = warp >> 2; // this warpgroup's 64 rows of the tile\n"
               : "  constexpr int wgi = 0; // the block's one warpgroup\n");
  os << R"cuda(  const long long qTiles = (T + BQ - 1) / BQ;
  for (long long task = blockIdx.x; task < B * H * qTiles; task += gridDim.x) {
    const long long h = task % H, rest = task / H;
    const long long b = rest / qTiles, t0 = rest % qTiles * BQ;
    const long long kvo = b * KR * KW + h / G * DH;
    __syncthreads(); // the previous task is done with rlo, rhi)cuda"
     << (wg ? " and qs" : "") << R"cuda(
    l4_attn_rows(pos, b * P_S, t0, T, KV_LIMIT, CHUNK, BQ, rlo, rhi);
    const long long r0 = t0 + warp * 16 + g, r1 = r0 + 8;
)cuda";
  if (wg)
    os << R"cuda(    // Q's 64 rows (zeros past T) into qs, a copy group of their own.
    for (int c = tid; c < BQ * (DH / 8); c += NT) {
      const int i = c / (DH / 8), d = c % (DH / 8) * 8;
      if (t0 + i < T)
        l4_cp_async16(qs + kOff(i, d, BQ), qb + (b * Q_S + t0 + i) * (H * DH) + h * DH + d);
      else
        l4_zero16(qs + kOff(i, d, BQ));
    }
    l4_cp_async_commit();
)cuda";
  else
    os << R"cuda(    // This warp's Q fragments: A(row, k) = q(t0 + w*16 + row, h, k).
    unsigned qa[KS][4];
    const long long q0 = (b * Q_S + r0) * (H * DH) + h * DH;
    const long long q1 = (b * Q_S + r1) * (H * DH) + h * DH;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      const int c0 = kk * 16 + 2 * t4;
      qa[kk][0] = r0 < T ? l4_pair(qb + q0 + c0) : 0u;
      qa[kk][1] = r1 < T ? l4_pair(qb + q1 + c0) : 0u;
      qa[kk][2] = r0 < T ? l4_pair(qb + q0 + c0 + 8) : 0u;
      qa[kk][3] = r1 < T ? l4_pair(qb + q1 + c0 + 8) : 0u;
    }
)cuda";
  os << R"cuda(    __syncthreads();
    long long jmin, jmax;
    l4_attn_union(rlo, rhi, BQ, KV_LIMIT, jmin, jmax);
    const int w0 = warp * 16 + g, w1 = w0 + 8;
    const long long lo0 = rlo[w0], hi0 = rhi[w0], lo1 = rlo[w1], hi1 = rhi[w1];
    // Per row (g, g + 8): running max and this lane's part of the sum.
    float m0 = l4_neg_inf(), m1 = l4_neg_inf(), l0 = 0.0f, l1 = 0.0f;
    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n)
      o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    // Keys j0.. into buffer sb; zeros past jmax (P is 0 there, and 0 times
    // whatever v held could be NaN).
    auto stage = [&](int sb, long long j0) {
      for (int c = tid; c < BK * (DH / 8); c += NT) {
        const int jj = c / (DH / 8), i = c % (DH / 8) * 8;
        const long long j = j0 + jj;
)cuda";
  if (wg)
    os << R"cuda(        unsigned short *const kd = ks + sb * BK * DP + kOff(jj, i, BK);
        unsigned short *const vd = vs + sb * BK * DP + vOff(i, jj);
)cuda";
  else
    os << R"cuda(        unsigned short *const kd = &ks[sb][jj][i], *const vd = &vs[sb][jj][i];
)cuda";
  os << R"cuda(        if (j <= jmax) {
          l4_cp_async16(kd, kb + kvo + j * KW + i);
          l4_cp_async16(vd, vb + kvo + j * KW + i);
        } else {
          l4_zero16(kd);
          l4_zero16(vd);
        }
      }
      l4_cp_async_commit();
    };
    const long long tiles = jmax >= jmin ? (jmax - jmin) / BK + 1 : 0;
    if (tiles > 0)
      stage(0, jmin);
    for (long long it = 0; it < tiles; ++it) {
      const long long j0 = jmin + it * BK;
      const int sb = (int)(it & 1);
      // The next tile into the other buffer (read by the tile before this,
      // which every thread has finished: the barrier closing the loop).
      if (it + 1 < tiles)
        stage(sb ^ 1, j0 + BK);
      else
        l4_cp_async_commit(); // an empty group: the wait below counts tiles
      l4_cp_async_wait<1>(); // this tile's copies have landed ...
)cuda";
  if (wg)
    os << R"cuda(      @B@_fence_proxy(); // ... visible to wgmma's reads ...
      __syncthreads(); // ... everyone's
      // S = Q K^T: the descriptors advance 16 columns (32 bytes) along the
      // swizzled rows per k16 step, a panel per 64.
      float s[BK / 8][4] = {};
      @B@_pin(s);
      @B@_fence();
#pragma unroll
      for (int kk = 0; kk < KS; ++kk)
        @B@_mma_s(s, @B@_desc(qs + kOff(wgi * 64, kk * 16, BQ)),
                  @B@_desc(ks + sb * BK * DP + kOff(0, kk * 16, BK)));
      @B@_commit();
      @B@_wait<0>();
      @B@_pin(s);
)cuda";
  else
    os << R"cuda(      __syncthreads(); // ... everyone's
      float s[BK / 8][4];
#pragma unroll
      for (int n = 0; n < BK / 8; ++n) {
        s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
          const unsigned bf[2] = {l4_pair(&ks[sb][n * 8 + g][kk * 16 + 2 * t4]),
                                  l4_pair(&ks[sb][n * 8 + g][kk * 16 + 2 * t4 + 8])};
          l4_mma_bf16(s[n], qa[kk], bf);
        }
      }
)cuda";
  os << R"cuda(      // Scale and mask; the rows' maxima over the quad's lanes.
      float x0 = l4_neg_inf(), x1 = l4_neg_inf();
#pragma unroll
      for (int n = 0; n < BK / 8; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const long long j = j0 + n * 8 + 2 * t4 + (c & 1);
          const bool in = c < 2 ? (j >= lo0 && j <= hi0) : (j >= lo1 && j <= hi1);
          s[n][c] = in ? s[n][c] * SCALE : l4_neg_inf();
          if (c < 2)
            x0 = fmaxf(x0, s[n][c]);
          else
            x1 = fmaxf(x1, s[n][c]);
        }
      float n0, n1, c0, c1;
      l4_online_max(m0, m1, x0, x1, n0, n1, c0, c1);
      m0 = n0;
      m1 = n1;
      l0 *= c0;
      l1 *= c1;
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        o[n][0] *= c0;
        o[n][1] *= c0;
        o[n][2] *= c1;
        o[n][3] *= c1;
      }
      // P = exp(S - m))cuda"
     << (wg ? " into shared memory (the A of P V)"
            : " as the A fragments of P V");
  if (onePart)
    os << R"cuda(, rounded to bf16 once
      // (*p1, tuning candidates: as FlashAttention and HF's eager bf16
      // attention round P; one product per step instead of two).
)cuda";
  else
    os << R"cuda(, in two bf16 parts (hi +
      // lo carry P to about 16 bits): the CPU backend keeps P in f32, and
      // rounding it to bf16 alone is enough to flip a MoE routing decision
      // downstream (measured on maverick-tiny).
)cuda";
  if (!wg)
    os << (onePart ? "      unsigned pa[BK / 16][4];\n"
                   : "      unsigned pa[BK / 16][4], pl[BK / 16][4];\n");
  os << R"cuda(#pragma unroll
      for (int n = 0; n < BK / 8; ++n) {
)cuda" << (onePart ? "        unsigned short ph[4];\n"
                   : "        unsigned short ph[4], plo[4];\n")
     << R"cuda(#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const float mx = c < 2 ? m0 : m1;
          const float p = s[n][c] == l4_neg_inf() ? 0.0f : expf(s[n][c] - mx);
          ph[c] = l4_bf16_bits(p);
)cuda";
  if (!onePart)
    os << "          plo[c] = l4_bf16_lo(p, ph[c]);\n";
  os << R"cuda(          if (c < 2)
            l0 += p;
          else
            l1 += p;
        }
)cuda";
  // Where the pairs of rows g and g + 8 go: fragment registers, or P's
  // shared tiles.
  auto pairs = [&](const char *tab, const char *part) {
    if (wg)
      os << "        *reinterpret_cast<unsigned *>(" << tab
         << " + kOff(w0, n * 8 + 2 * t4, BQ)) = (unsigned)" << part
         << "[0] | ((unsigned)" << part << "[1] << 16);\n"
         << "        *reinterpret_cast<unsigned *>(" << tab
         << " + kOff(w1, n * 8 + 2 * t4, BQ)) = (unsigned)" << part
         << "[2] | ((unsigned)" << part << "[3] << 16);\n";
    else
      os << "        " << tab << "[n / 2][(n & 1) * 2] = (unsigned)" << part
         << "[0] | ((unsigned)" << part << "[1] << 16);\n"
         << "        " << tab << "[n / 2][(n & 1) * 2 + 1] = (unsigned)"
         << part << "[2] | ((unsigned)" << part << "[3] << 16);\n";
  };
  pairs(wg ? "ps" : "pa", "ph");
  if (!onePart)
    pairs(wg ? "pls" : "pl", "plo");
  os << "      }\n";
  if (wg) {
    os << R"cuda(      @B@_fence_proxy(); // P is visible to wgmma's reads ...
      __syncthreads(); // ... everyone's
      // O += P V over the tile's 64 keys (V is 0 past jmax): P's descriptor
      // advances 16 keys along its swizzled rows, V's two 8-key atoms.
      @B@_pin(o);
      @B@_fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        const unsigned long long dv = @B@_desc_mn(vs + sb * BK * DP + kk * 1024);
        @B@_mma_o(o, @B@_desc(ps + wgi * 64 * BK + kk * 16), dv);
)cuda";
    if (!onePart)
      os << "        @B@_mma_o(o, @B@_desc(pls + wgi * 64 * BK + kk * 16), dv);\n";
    os << R"cuda(      }
      @B@_commit();
      @B@_wait<0>();
      @B@_pin(o);
)cuda";
  } else {
    os << R"cuda(      const int cnt = jmax - j0 + 1 < BK ? (int)(jmax - j0 + 1) : BK;
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        if (kk * 16 >= cnt)
          break; // keys past jmax: P is 0 there
        const int k0 = kk * 16 + 2 * t4;
#pragma unroll
        for (int n = 0; n < NO; ++n) {
          const int d = n * 8 + g;
          const unsigned bf[2] = {l4_pair2(vs[sb][k0][d], vs[sb][k0 + 1][d]),
                                  l4_pair2(vs[sb][k0 + 8][d], vs[sb][k0 + 9][d])};
          l4_mma_bf16(o[n], pa[kk], bf);
)cuda";
    if (!onePart)
      os << "          l4_mma_bf16(o[n], pl[kk], bf);\n";
    os << R"cuda(        }
      }
)cuda";
  }
  os << R"cuda(      __syncthreads(); // everyone is done with buffer sb)cuda"
     << (wg ? " and P" : "") << R"cuda(
    }
    for (int d = 1; d < 4; d <<= 1) {
      l0 += __shfl_xor_sync(0xffffffffu, l0, d);
      l1 += __shfl_xor_sync(0xffffffffu, l1, d);
    }
    // A query that sees no key (masked out entirely) gets zeros.
    const float i0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, i1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    const long long y0 = (b * Y_S + r0) * (H * DH) + h * DH;
    const long long y1 = (b * Y_S + r1) * (H * DH) + h * DH;
    l4_st_rows(y, y0, y1, r0 < T, r1 < T, o, i0, i1, t4);
  }
)cuda";
  if (wg)
    os << "  l4_cp_async_wait<0>(); // no copy outlives the kernel (the last "
          "groups are empty)\n";
  const int bq = 64 * groups;
  b.threads = unsigned(128 * groups);
  b.blocks = gridFor(uint64_t(q.bmax) * heads *
                         ((uint64_t(q.rowsPerBatch) + bq - 1) / bq),
                     1);
  int64_t padded = (dim + 63) / 64 * 64;
  // wgmma: the alignment slack, Q, two K and two V buffers, P (two parts
  // but for *p1); mma.sync: two buffers each of K and V, [BK][DH + 8].
  b.sharedBytes =
      wg ? unsigned(1024 + 2 * (bq * padded + 4 * 64 * padded +
                                bq * 64 * (onePart ? 1 : 2)))
         : unsigned(2 * 2 * 64 * (dim + 8) * 2);
  return llvm::Error::success();
}

} // namespace

llvm::Error emitAttention(OpContext &ctx) {
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
  // Many query rows (forward, prefill): tiles of queries share each key
  // tile. One row (decode): one block per (row, head) over the keys.
  constexpr int64_t kTileRows = 16, kTileKeys = 32;
  uint64_t tileBytes = 4 * uint64_t(kTileRows * (dim + 1) +
                                    kTileKeys * (dim + 1) + kTileKeys * dim +
                                    kTileRows * (kTileKeys + 1));
  // bf16 operands with a head dim of whole 16-wide steps up to 160 (a
  // thread holds DH / 2 output and DH / 4 Q values in registers), k and v
  // copied in 16-byte pieces: tensor cores.
  bool bf16 = q.ctype == "l4_bf16" && k.ctype == "l4_bf16" &&
              v.ctype == "l4_bf16";
  if (q.rowsPerBatch > 1 && bf16 && dim % 16 == 0 && dim <= 160 &&
      pieceAligned({&k, &v}))
    return emitAttentionMma(ctx, fromCache);
  if (q.rowsPerBatch > 1 && tileBytes <= 46 * 1024)
    return emitAttentionTiles(ctx, fromCache);
  int64_t threads = 128;
  Body &b = ctx.body;
  // Decode reads the whole cache for few (row, head) pairs: split each
  // pair's keys over NS blocks so a long cache streams through many SMs;
  // the last block of a pair merges the parts' softmax statistics. Split
  // until about 264 blocks (two per H100 SM) are busy, each part at least
  // 32 keys of the cache, at most 16 parts.
  uint64_t pairs = uint64_t(q.bmax) * q.rowsPerBatch * uint64_t(heads);
  int64_t splits = 1;
  if (fromCache && q.rowsPerBatch == 1)
    splits = std::clamp<int64_t>(
        std::min<int64_t>((264 + int64_t(pairs) - 1) / int64_t(pairs),
                          ks[1] / 32),
        1, 16);
  uint64_t counterBytes = llvm::alignTo(4 * pairs, 256);
  if (splits > 1)
    b.workspaceBytes =
        256 + counterBytes + 4 * pairs * uint64_t(splits) * uint64_t(dim + 2);
  llvm::raw_string_ostream os(b.code);
  os << attentionConstants(ctx, fromCache) << constant("NT", threads)
     << constant("NS", splits, "blocks per (row, head): parts of the keys");
  if (splits > 1)
    os << "  unsigned *done = reinterpret_cast<unsigned *>(ws + 256);\n"
       << "  float *part = reinterpret_cast<float *>(ws + 256 + "
       << counterBytes << ");\n";
  os << R"cuda(  constexpr long long KW = HKV * DH, NACC = (DH + NT - 1) / NT;
  __shared__ float qv[DH];
  __shared__ float pr[NT];
  __shared__ float red[32];
  __shared__ int last;
  const int tid = threadIdx.x;
  for (long long task = blockIdx.x; task < B * T * H * NS; task += gridDim.x) {
    const long long sp = task % NS, pair = task / NS;
    const long long h = pair % H, r = pair / H, b = r / T, t = r - b * T;
    const long long p = l4_ldi(pos, b * P_S + t);
    long long lo, hi; // the allowed keys: lo <= j <= hi
    l4_attn_range(p, KV_LIMIT, CHUNK, lo, hi);
    if (NS > 1 && hi >= lo) { // this block's part of them
      const long long n = hi - lo + 1, first = lo + n * sp / NS;
      hi = lo + n * (sp + 1) / NS - 1;
      lo = first;
    }
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
    if (NS == 1) {
      // A query that sees no key (masked out entirely) gets zeros.
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
      for (int c = 0; c < NACC; ++c) {
        const long long i = tid + c * NT;
        if (i < DH)
          l4_st(y, yo + i, acc[c] * inv);
      }
      continue;
    }
)cuda";
  if (splits > 1)
    os << R"cuda(    // The part's max, sum and unnormalised output; the pair's last part
    // to finish merges all NS in order (the same sums every run) and
    // leaves the pair's counter 0 for the next launch.
    float *rec = part + (pair * NS + sp) * (DH + 2);
    if (tid == 0) {
      rec[0] = m;
      rec[1] = l;
    }
#pragma unroll
    for (int c = 0; c < NACC; ++c) {
      const long long i = tid + c * NT;
      if (i < DH)
        rec[2 + i] = acc[c];
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) {
      last = atomicAdd(done + pair, 1u) == NS - 1;
      if (last)
        done[pair] = 0u;
    }
    __syncthreads();
    if (!last)
      continue;
    __threadfence();
    const float *recs = part + pair * NS * (DH + 2);
    float mAll = l4_neg_inf();
    for (long long s = 0; s < NS; ++s)
      if (l4_ldcg(recs + s * (DH + 2) + 1) > 0.0f)
        mAll = fmaxf(mAll, l4_ldcg(recs + s * (DH + 2)));
    float lAll = 0.0f;
    for (long long s = 0; s < NS; ++s) {
      const float ls = l4_ldcg(recs + s * (DH + 2) + 1);
      if (ls > 0.0f)
        lAll += ls * expf(l4_ldcg(recs + s * (DH + 2)) - mAll);
    }
    // A query that sees no key (masked out entirely) gets zeros.
    const float inv = lAll > 0.0f ? 1.0f / lAll : 0.0f;
    for (long long i = tid; i < DH; i += NT) {
      float a = 0.0f;
      for (long long s = 0; s < NS; ++s) {
        const float ls = l4_ldcg(recs + s * (DH + 2) + 1);
        if (ls > 0.0f)
          a += l4_ldcg(recs + s * (DH + 2) + 2 + i) *
               expf(l4_ldcg(recs + s * (DH + 2)) - mAll);
      }
      l4_st(y, yo + i, a * inv);
    }
)cuda";
  os << "  }\n";
  b.threads = unsigned(threads);
  b.blocks = gridFor(pairs * uint64_t(splits), 1);
  return llvm::Error::success();
}

} // namespace l4c::cuda
