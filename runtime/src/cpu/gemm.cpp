//===- gemm.cpp - blocked, threaded f32 GEMM for the CPU backend ---------===//
//
// One GEMM core behind linear (w [N,K]) and matmul (w [K,N]): the right
// operand is packed into K-slabs of 16-column panels, so both layouts feed the
// same 6x16 register-blocked micro-kernel. Few-row products (decode) skip the
// packing and stream the weights directly.
//
//===----------------------------------------------------------------------===//
#include "cpu/kernels.h"
#include "cpu/simd.h"
#include "cpu/threadpool.h"

#include <algorithm>
#include <vector>

namespace l4c::cpu {

namespace {

constexpr size_t MR = 6;   // micro-tile rows
constexpr size_t NR = 16;  // micro-tile columns (two 8-wide vectors)
constexpr size_t KC = 256; // depth of one packed slab: an NR panel is 16 KiB
constexpr size_t MC = 96;  // rows of packed x per tile (96 KiB, fits L2)
constexpr size_t NC = 256; // columns per tile
constexpr size_t kColumnBlock = 4096; // packed slab <= 4 MiB
constexpr size_t kSmallM = 4;
// Below this many multiply-adds a job is not worth waking the pool for.
constexpr size_t kParallelMacs = size_t(1) << 15;

size_t ceilDiv(size_t a, size_t b) { return (a + b - 1) / b; }

// Packed panels are read with 32-byte vector loads; keep them line aligned.
struct alignas(64) Line {
  float f[16];
};
float *scratch(std::vector<Line> &buf, size_t floats) {
  if (buf.size() * 16 < floats)
    buf.resize(ceilDiv(floats, 16));
  return buf.data()->f;
}

// The logical right operand B[K, N]: B(k, n) = w[n * ldw + k] when nk (the
// nn.Linear layout), else w[k * ldw + n].
struct Right {
  const float *w;
  size_t ldw;
  bool nk;
};

// One NR-wide panel of B rows k0..k0+kc, columns n0..n0+nc, k-major, zero
// padded to NR columns so the micro-kernel never branches on width.
void packPanel(const Right &b, size_t k0, size_t kc, size_t n0, size_t nc,
               float *dst) {
  if (b.nk) {
    for (size_t j = 0; j < nc; ++j) {
      const float *src = b.w + (n0 + j) * b.ldw + k0;
      for (size_t k = 0; k < kc; ++k)
        dst[k * NR + j] = src[k];
    }
  } else {
    for (size_t k = 0; k < kc; ++k) {
      const float *src = b.w + (k0 + k) * b.ldw + n0;
      for (size_t j = 0; j < nc; ++j)
        dst[k * NR + j] = src[j];
    }
  }
  for (size_t k = 0; k < kc && nc < NR; ++k)
    for (size_t j = nc; j < NR; ++j)
      dst[k * NR + j] = 0.f;
}

// Rows m0..m0+mc of x, columns k0..k0+kc, as MR-row panels (k-major inside a
// panel), zero padded to a multiple of MR rows.
void packRows(const float *x, size_t ldx, size_t m0, size_t mc, size_t k0,
              size_t kc, float *dst) {
  for (size_t p = 0; p < ceilDiv(mc, MR); ++p) {
    float *panel = dst + p * kc * MR;
    for (size_t i = 0; i < MR; ++i) {
      size_t row = p * MR + i;
      if (row < mc) {
        const float *src = x + (m0 + row) * ldx + k0;
        for (size_t k = 0; k < kc; ++k)
          panel[k * MR + i] = src[k];
      } else {
        for (size_t k = 0; k < kc; ++k)
          panel[k * MR + i] = 0.f;
      }
    }
  }
}

// c[mr, nr] (+)= a_panel @ b_panel over kc. Wide keeps the whole 6x16 tile
// in 12 AVX registers; the SSE2 baseline has only 16 xmm registers, so it
// sweeps the panel in two 8-column halves instead of spilling.
template <bool Wide>
L4C_INLINE void microKernel(size_t kc, const float *a, const float *b, float *c,
                            size_t ldc, size_t mr, size_t nr, bool load) {
  alignas(32) float tmp[MR][NR];
  if constexpr (Wide) {
    V8 acc[MR][2];
#pragma GCC unroll 6
    for (size_t i = 0; i < MR; ++i)
      acc[i][0] = acc[i][1] = V8{};
    for (size_t k = 0; k < kc; ++k) {
      V8 b0 = at8(b), b1 = at8(b + 8);
#pragma GCC unroll 6
      for (size_t i = 0; i < MR; ++i) {
        acc[i][0] += a[i] * b0;
        acc[i][1] += a[i] * b1;
      }
      a += MR;
      b += NR;
    }
    if (mr == MR && nr == NR) {
#pragma GCC unroll 6
      for (size_t i = 0; i < MR; ++i) {
        float *row = c + i * ldc;
        if (load) {
          at8(row) += acc[i][0];
          at8(row + 8) += acc[i][1];
        } else {
          at8(row) = acc[i][0];
          at8(row + 8) = acc[i][1];
        }
      }
      return;
    }
    for (size_t i = 0; i < MR; ++i) {
      at8(tmp[i]) = acc[i][0];
      at8(tmp[i] + 8) = acc[i][1];
    }
  } else {
    for (size_t half = 0; half < NR; half += 8) {
      V4 acc[MR][2];
#pragma GCC unroll 6
      for (size_t i = 0; i < MR; ++i)
        acc[i][0] = acc[i][1] = V4{};
      const float *ap = a, *bp = b + half;
      for (size_t k = 0; k < kc; ++k) {
        V4 b0 = at4(bp), b1 = at4(bp + 4);
#pragma GCC unroll 6
        for (size_t i = 0; i < MR; ++i) {
          acc[i][0] += ap[i] * b0;
          acc[i][1] += ap[i] * b1;
        }
        ap += MR;
        bp += NR;
      }
      for (size_t i = 0; i < MR; ++i) {
        at4(tmp[i] + half) = acc[i][0];
        at4(tmp[i] + half + 4) = acc[i][1];
      }
    }
  }
  for (size_t i = 0; i < mr; ++i)
    for (size_t j = 0; j < nr; ++j)
      c[i * ldc + j] = load ? c[i * ldc + j] + tmp[i][j] : tmp[i][j];
}

// One (rows x columns) tile of y for one K slab: the B panel stays in L1
// while the packed rows stream from L2.
template <bool Wide>
L4C_INLINE void tileKernelImpl(size_t kc, const float *aPack, size_t mc,
                               const float *bPanels, size_t bPanelStride,
                               size_t nc, float *y, size_t ldy, bool load) {
  for (size_t p = 0; p * NR < nc; ++p) {
    size_t nr = std::min(NR, nc - p * NR);
    const float *bp = bPanels + p * bPanelStride;
    for (size_t ir = 0; ir < mc; ir += MR)
      microKernel<Wide>(kc, aPack + ir * kc, bp, y + ir * ldy + p * NR, ldy,
                        std::min(MR, mc - ir), nr, load);
  }
}

L4C_DISPATCH(tileKernel,
             (size_t kc, const float *aPack, size_t mc, const float *bPanels,
              size_t bPanelStride, size_t nc, float *y, size_t ldy, bool load),
             (kc, aPack, mc, bPanels, bPanelStride, nc, y, ldy, load))

// Few rows, w [N, K]: each output is a contiguous dot product.
template <bool>
L4C_INLINE void smallRowsNKImpl(const float *x, size_t ldx, const float *w,
                                size_t ldw, float *y, size_t ldy, size_t M,
                                size_t n0, size_t n1, size_t K,
                                bool accumulate) {
  for (size_t n = n0; n < n1; ++n) {
    const float *wr = w + n * ldw;
    for (size_t m = 0; m < M; ++m) {
      float s = dot(x + m * ldx, wr, K);
      float &out = y[m * ldy + n];
      out = accumulate ? out + s : s;
    }
  }
}

// Few rows, w [K, N]: 32 columns at a time accumulate in registers over a
// block of kDepth weight rows; the block (kDepth x kStrip floats) stays in
// L2 while the column groups walk it, so memory is read once and in rows.
template <bool>
L4C_INLINE void smallRowsKNImpl(const float *x, size_t ldx, const float *w,
                                size_t ldw, float *y, size_t ldy, size_t M,
                                size_t n0, size_t n1, size_t K,
                                bool accumulate) {
  constexpr size_t kStrip = 512, kDepth = 128;
  alignas(32) float acc[kStrip];
  for (size_t m = 0; m < M; ++m) {
    const float *xr = x + m * ldx;
    float *yr = y + m * ldy;
    for (size_t s0 = n0; s0 < n1; s0 += kStrip) {
      size_t width = std::min(kStrip, n1 - s0);
      std::fill(acc, acc + width, 0.f);
      for (size_t k0 = 0; k0 < K; k0 += kDepth) {
        size_t k1 = std::min(K, k0 + kDepth);
        size_t j = 0;
        for (; j + 32 <= width; j += 32) {
          V8 a0 = at8(acc + j), a1 = at8(acc + j + 8);
          V8 a2 = at8(acc + j + 16), a3 = at8(acc + j + 24);
          for (size_t k = k0; k < k1; ++k) {
            float xv = xr[k];
            const float *wr = w + k * ldw + s0 + j;
            a0 += xv * at8(wr);
            a1 += xv * at8(wr + 8);
            a2 += xv * at8(wr + 16);
            a3 += xv * at8(wr + 24);
          }
          at8(acc + j) = a0;
          at8(acc + j + 8) = a1;
          at8(acc + j + 16) = a2;
          at8(acc + j + 24) = a3;
        }
        for (; j < width; ++j) {
          float sum = acc[j];
          for (size_t k = k0; k < k1; ++k)
            sum += xr[k] * w[k * ldw + s0 + j];
          acc[j] = sum;
        }
      }
      for (size_t j = 0; j < width; ++j)
        yr[s0 + j] = accumulate ? yr[s0 + j] + acc[j] : acc[j];
    }
  }
}

#define SMALL_ROWS_PARAMS                                                      \
  (const float *x, size_t ldx, const float *w, size_t ldw, float *y,           \
   size_t ldy, size_t M, size_t n0, size_t n1, size_t K, bool accumulate)
#define SMALL_ROWS_ARGS (x, ldx, w, ldw, y, ldy, M, n0, n1, K, accumulate)
L4C_DISPATCH(smallRowsNK, SMALL_ROWS_PARAMS, SMALL_ROWS_ARGS)
L4C_DISPATCH(smallRowsKN, SMALL_ROWS_PARAMS, SMALL_ROWS_ARGS)
#undef SMALL_ROWS_PARAMS
#undef SMALL_ROWS_ARGS

void smallRows(const float *x, size_t ldx, const Right &b, float *y, size_t ldy,
               size_t M, size_t N, size_t K, bool accumulate) {
  ThreadPool &pool = ThreadPool::global();
  // Column ranges rounded to 32 so vectors cover all but the last tail.
  size_t chunk = 32;
  if (M * N * K >= kParallelMacs)
    chunk = std::max<size_t>(32, ceilDiv(ceilDiv(N, 4 * pool.size()), 32) * 32);
  size_t tasks = ceilDiv(N, chunk);
  auto body = [&](size_t t) {
    size_t n0 = t * chunk, n1 = std::min(N, n0 + chunk);
    if (b.nk)
      smallRowsNK(x, ldx, b.w, b.ldw, y, ldy, M, n0, n1, K, accumulate);
    else
      smallRowsKN(x, ldx, b.w, b.ldw, y, ldy, M, n0, n1, K, accumulate);
  };
  pool.parallelFor(tasks, body);
}

// y[:, 0:N] for N <= kColumnBlock through the packed path.
void gemmColumns(const float *x, size_t ldx, const Right &b, float *y,
                 size_t ldy, size_t M, size_t N, size_t K, bool accumulate) {
  ThreadPool &pool = ThreadPool::global();
  bool parallel = M * N * K >= kParallelMacs;
  auto forEach = [&](size_t n, auto &&fn) {
    if (parallel)
      pool.parallelFor(n, fn);
    else
      for (size_t i = 0; i < n; ++i)
        fn(i);
  };

  size_t nPanels = ceilDiv(N, NR);
  size_t mBlocks = ceilDiv(M, MC);
  // Give every thread a couple of tiles even when M is a single block.
  size_t panelsPerTile = NC / NR;
  size_t wantTiles = parallel ? 2 * pool.size() : 1;
  if (mBlocks * ceilDiv(nPanels, panelsPerTile) < wantTiles)
    panelsPerTile =
        std::max<size_t>(1, ceilDiv(nPanels, ceilDiv(wantTiles, mBlocks)));
  size_t nTiles = ceilDiv(nPanels, panelsPerTile);

  static thread_local std::vector<Line> bBuf;
  float *bPack = scratch(bBuf, nPanels * KC * NR);
  constexpr size_t kPackGroup = 8; // panels per packing task

  for (size_t k0 = 0; k0 < K; k0 += KC) {
    size_t kc = std::min(KC, K - k0);
    forEach(ceilDiv(nPanels, kPackGroup), [&](size_t g) {
      size_t p1 = std::min(nPanels, (g + 1) * kPackGroup);
      for (size_t p = g * kPackGroup; p < p1; ++p)
        packPanel(b, k0, kc, p * NR, std::min(NR, N - p * NR),
                  bPack + p * KC * NR);
    });
    bool load = accumulate || k0 > 0;
    forEach(mBlocks * nTiles, [&](size_t t) {
      static thread_local std::vector<Line> aBuf;
      size_t ib = t % mBlocks, jb = t / mBlocks;
      size_t m0 = ib * MC, mc = std::min(MC, M - m0);
      size_t n0 = jb * panelsPerTile * NR,
             nc = std::min(panelsPerTile * NR, N - n0);
      float *aPack = scratch(aBuf, ceilDiv(mc, MR) * MR * kc);
      packRows(x, ldx, m0, mc, k0, kc, aPack);
      tileKernel(kc, aPack, mc, bPack + (n0 / NR) * KC * NR, KC * NR, nc,
                 y + m0 * ldy + n0, ldy, load);
    });
  }
}

void gemm(const float *x, size_t ldx, const Right &b, float *y, size_t ldy,
          size_t M, size_t N, size_t K, bool accumulate) {
  if (M == 0 || N == 0)
    return;
  if (K == 0) {
    if (!accumulate)
      for (size_t m = 0; m < M; ++m)
        std::fill(y + m * ldy, y + m * ldy + N, 0.f);
    return;
  }
  if (M <= kSmallM)
    return smallRows(x, ldx, b, y, ldy, M, N, K, accumulate);
  // Column blocks bound the packed slab (and keep it in L3) however wide
  // the output is, e.g. a 200K-entry vocabulary.
  for (size_t n0 = 0; n0 < N; n0 += kColumnBlock) {
    Right block = b;
    block.w += b.nk ? n0 * b.ldw : n0;
    gemmColumns(x, ldx, block, y + n0, ldy, M, std::min(kColumnBlock, N - n0),
                K, accumulate);
  }
}

} // namespace

void linear(const float *x, size_t ldx, const float *w, size_t ldw, float *y,
            size_t ldy, size_t M, size_t N, size_t K, bool accumulate) {
  gemm(x, ldx, Right{w, ldw, true}, y, ldy, M, N, K, accumulate);
}

void matmul(const float *x, size_t ldx, const float *w, size_t ldw, float *y,
            size_t ldy, size_t M, size_t N, size_t K, bool accumulate) {
  gemm(x, ldx, Right{w, ldw, false}, y, ldy, M, N, K, accumulate);
}

} // namespace l4c::cpu
