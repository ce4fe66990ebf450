//===- grad_kernels.cpp - backward, loss and optimizer kernels (CPU) -----===//
//
// Vector-Jacobian products of the CPU forward kernels, the cross-entropy
// loss and AdamW. Sums that run over many token rows are carried in double so
// that gradients stay close to HF's float64 reference at any sequence length.
//
//===----------------------------------------------------------------------===//
#include "cpu/grad_kernels.h"
#include "cpu/kernels.h"
#include "cpu/simd.h"
#include "cpu/threadpool.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace l4c::cpu {

namespace {

// Below this much work (rough flops) a loop is not worth waking the pool for.
constexpr size_t kParallelWork = size_t(1) << 16;
// Weight gradients: rows summed in f32 by one GEMM before the double sum.
constexpr size_t kRowChunk = 256;

size_t ceilDiv(size_t a, size_t b) { return (a + b - 1) / b; }

// Runs fn(i) for i < n, in parallel when n * cost is worth it.
template <typename F> void parallelRange(size_t n, size_t cost, F &&fn) {
  if (n < 2 || n * cost < kParallelWork) {
    for (size_t i = 0; i < n; ++i)
      fn(i);
    return;
  }
  ThreadPool &pool = ThreadPool::global();
  size_t tasks = std::min(n, size_t(4) * pool.size());
  size_t per = ceilDiv(n, tasks);
  pool.parallelFor(ceilDiv(n, per), [&](size_t t) {
    size_t i1 = std::min(n, (t + 1) * per);
    for (size_t i = t * per; i < i1; ++i)
      fn(i);
  });
}

float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

bool isLabel(int64_t id) { return id != kIgnoreIndex; }

// One row of the loss gradient over the n columns from `offset`: (softmax
// - onehot(label)) * seed, the softmax normalised by lse. Each element is
// read before it is written, so out may be row.
void gradRow(const float *row, size_t n, size_t offset, size_t label,
             double lse, double seed, float *out) {
  for (size_t i = 0; i < n; ++i) {
    double p = std::exp(double(row[i]) - lse);
    out[i] = float((i + offset == label ? p - 1.0 : p) * seed);
  }
}

// log(sum(exp(row))) in double.
double logSumExp(const float *row, size_t V) {
  float mx = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < V; ++i)
    mx = std::max(mx, row[i]);
  double sum = 0;
  for (size_t i = 0; i < V; ++i)
    sum += std::exp(double(row[i]) - double(mx));
  return double(mx) + std::log(sum);
}

// The key range [lo, hi] that query position p sees, as in attention();
// false when it is empty.
bool keyRange(int64_t p, size_t kvLen, int64_t chunk, size_t &lo, size_t &hi) {
  if (p < 0 || kvLen == 0)
    return false;
  hi = std::min(size_t(p), kvLen - 1);
  lo = chunk > 0 ? size_t(p / chunk * chunk) : 0;
  return lo <= hi;
}

// The forward arguments of attentionGrad, shared by its two passes.
struct AttnGradArgs {
  const float *q;
  size_t ldq;
  const int64_t *qpos;
  size_t Tq;
  const float *k;
  size_t ldk;
  const float *v;
  size_t ldv;
  size_t kvLen, H, Hkv, d;
  int64_t chunk;
  float scale;
  const float *dout;
  size_t lddo;
  size_t group;
};

// Pass 1, query row `row` = t * H + h: writes dq and returns the row's
// log-sum-exp and delta = <dout, out> = sum_j P_j dP_j, which let pass 2
// rebuild every P_j and dS_j without storing [Tq, H, kvLen] probabilities.
// False when the row sees no key.
bool queryRowGrad(const AttnGradArgs &a, size_t row, float *dq, double &lse,
                  double &delta) {
  size_t t = row / a.H, h = row % a.H, lo, hi;
  if (!keyRange(a.qpos[t], a.kvLen, a.chunk, lo, hi))
    return false;
  const float *qr = a.q + t * a.ldq + h * a.d;
  const float *dor = a.dout + t * a.lddo + h * a.d;
  const float *kb = a.k + (h / a.group) * a.d, *vb = a.v + (h / a.group) * a.d;
  size_t n = hi - lo + 1;
  static thread_local std::vector<double> p, dp, acc;
  p.resize(n);
  dp.resize(n);
  acc.assign(a.d, 0.0);
  double mx = -INFINITY;
  for (size_t j = 0; j < n; ++j) {
    // The same f32 score as pass 2 computes, so both see one softmax.
    p[j] = double(dot(qr, kb + (lo + j) * a.ldk, a.d) * a.scale);
    mx = std::max(mx, p[j]);
  }
  double sum = 0, dl = 0;
  for (size_t j = 0; j < n; ++j) {
    p[j] = std::exp(p[j] - mx);
    sum += p[j];
  }
  for (size_t j = 0; j < n; ++j) {
    p[j] /= sum;
    dp[j] = double(dot(dor, vb + (lo + j) * a.ldv, a.d));
    dl += p[j] * dp[j];
  }
  for (size_t j = 0; j < n; ++j) {
    double ds = p[j] * (dp[j] - dl);
    const float *kr = kb + (lo + j) * a.ldk;
    for (size_t i = 0; i < a.d; ++i)
      acc[i] += ds * kr[i];
  }
  for (size_t i = 0; i < a.d; ++i)
    dq[i] = float(acc[i] * a.scale);
  lse = mx + std::log(sum);
  delta = dl;
  return true;
}

// Pass 2, key j of kv head kvh: dk and dv summed over the queries that see
// the key and over the group's heads, so no two tasks write the same row.
void keyGrad(const AttnGradArgs &a, size_t j, size_t kvh, const double *lse,
             const double *delta, const char *live, float *dk, float *dv) {
  const float *kr = a.k + j * a.ldk + kvh * a.d;
  const float *vr = a.v + j * a.ldv + kvh * a.d;
  static thread_local std::vector<double> gk, gv;
  gk.assign(a.d, 0.0);
  gv.assign(a.d, 0.0);
  for (size_t t = 0; t < a.Tq; ++t) {
    size_t lo, hi;
    if (!keyRange(a.qpos[t], a.kvLen, a.chunk, lo, hi) || j < lo || j > hi)
      continue;
    for (size_t h = kvh * a.group; h < (kvh + 1) * a.group; ++h) {
      size_t row = t * a.H + h;
      if (!live[row])
        continue;
      const float *qr = a.q + t * a.ldq + h * a.d;
      const float *dor = a.dout + t * a.lddo + h * a.d;
      double s = double(dot(qr, kr, a.d) * a.scale);
      double pj = std::exp(s - lse[row]);
      double ds = pj * (double(dot(dor, vr, a.d)) - delta[row]);
      for (size_t i = 0; i < a.d; ++i) {
        gk[i] += ds * qr[i];
        gv[i] += pj * dor[i];
      }
    }
  }
  for (size_t i = 0; i < a.d; ++i) {
    dk[i] = float(gk[i] * a.scale);
    dv[i] = float(gv[i]);
  }
}

} // namespace

size_t crossEntropyCount(const int64_t *ids, size_t B, size_t T, size_t S) {
  size_t count = 0;
  for (size_t b = 0; b < B; ++b)
    for (size_t t = 0; t + 1 < T; ++t)
      count += isLabel(ids[b * S + t + 1]);
  return count;
}

float crossEntropy(const float *logits, size_t ldl, const int64_t *ids,
                   size_t B, size_t T, size_t S, size_t V) {
  size_t rows = B * S;
  std::vector<double> nll(rows, 0.0);
  parallelRange(rows, 2 * V, [&](size_t r) {
    size_t t = r % S;
    if (t + 1 >= T || !isLabel(ids[r + 1]))
      return;
    const float *row = logits + r * ldl;
    nll[r] = logSumExp(row, V) - double(row[ids[r + 1]]);
  });
  size_t count = crossEntropyCount(ids, B, T, S);
  if (count == 0)
    return std::numeric_limits<float>::quiet_NaN();
  // A fixed serial order keeps the loss independent of the thread count.
  double sum = std::accumulate(nll.begin(), nll.end(), 0.0);
  return float(sum / double(count));
}

void crossEntropyGrad(const float *logits, size_t ldl, const int64_t *ids,
                      size_t B, size_t T, size_t S, size_t V, float dloss,
                      float *dlogits, size_t lddl) {
  size_t count = crossEntropyCount(ids, B, T, S);
  double seed = count ? double(dloss) / double(count) : 0.0;
  parallelRange(B * S, 3 * V, [&](size_t r) {
    size_t t = r % S;
    float *out = dlogits + r * lddl;
    if (t + 1 >= T || !isLabel(ids[r + 1])) {
      std::fill(out, out + V, 0.f);
      return;
    }
    const float *row = logits + r * ldl;
    gradRow(row, V, 0, size_t(ids[r + 1]), logSumExp(row, V), seed, out);
  });
}

void crossEntropyStats(const float *logits, size_t ldl, const int64_t *ids,
                       size_t B, size_t T, size_t S, size_t n, size_t offset,
                       const float *prev, float *stats) {
  parallelRange(B * S, 2 * n, [&](size_t r) {
    size_t t = r % S;
    if (t >= T)
      return;
    float *out = stats + r * 2;
    if (t + 1 >= T || !isLabel(ids[r + 1])) {
      out[0] = out[1] = 0.f;
      return;
    }
    const float *row = logits + r * ldl;
    double lse = logSumExp(row, n);
    float label = 0.f;
    if (prev) {
      double before = double(prev[r * 2]);
      double m = std::max(before, lse);
      lse = m + std::log(std::exp(before - m) + std::exp(lse - m));
      label = prev[r * 2 + 1];
    }
    size_t id = size_t(ids[r + 1]);
    if (id >= offset && id < offset + n)
      label = row[id - offset];
    out[0] = float(lse);
    out[1] = label;
  });
}

float crossEntropyFromStats(const float *stats, const int64_t *ids, size_t B,
                            size_t T, size_t S) {
  size_t count = crossEntropyCount(ids, B, T, S);
  if (count == 0)
    return std::numeric_limits<float>::quiet_NaN();
  double sum = 0;
  for (size_t b = 0; b < B; ++b)
    for (size_t t = 0; t + 1 < T; ++t) {
      size_t r = b * S + t;
      if (isLabel(ids[r + 1]))
        sum += double(stats[r * 2]) - double(stats[r * 2 + 1]);
    }
  return float(sum / double(count));
}

void crossEntropyGradChunk(const float *logits, size_t ldl, const int64_t *ids,
                           size_t B, size_t T, size_t S, size_t n,
                           size_t offset, const float *stats, float *dlogits,
                           size_t lddl) {
  size_t count = crossEntropyCount(ids, B, T, S);
  double seed = count ? 1.0 / double(count) : 0.0;
  parallelRange(B * S, 3 * n, [&](size_t r) {
    size_t t = r % S;
    float *out = dlogits + r * lddl;
    if (t + 1 >= T || !isLabel(ids[r + 1])) {
      std::fill(out, out + n, 0.f);
      return;
    }
    gradRow(logits + r * ldl, n, offset, size_t(ids[r + 1]),
            double(stats[r * 2]), seed, out);
  });
}

void linearGradInput(const float *dy, size_t lddy, const float *w, size_t ldw,
                     float *dx, size_t lddx, size_t M, size_t N, size_t K,
                     bool accumulate) {
  // w [N, K] read input-major is exactly matmul's right operand.
  matmul(dy, lddy, w, ldw, dx, lddx, M, K, N, accumulate);
}

void linearGradWeight(const float *x, size_t ldx, const float *dy, size_t lddy,
                      float *dw, size_t lddw, size_t M, size_t N, size_t K,
                      bool accumulate) {
  if (N == 0 || K == 0)
    return;
  ThreadPool &pool = ThreadPool::global();
  // Blocks of dw rows own their double accumulators, so tasks never share
  // an output. Inside a task the GEMM runs serially on its thread; a single
  // block (few rows, e.g. the router) lets the GEMM use the pool instead.
  size_t nb = std::clamp<size_t>(ceilDiv(N, 2 * pool.size()), 8, 128);
  if (N * K * M < kParallelWork)
    nb = N;
  size_t tasks = ceilDiv(N, nb);
  pool.parallelFor(tasks, [&](size_t task) {
    size_t n0 = task * nb, nc = std::min(nb, N - n0);
    static thread_local std::vector<float> dyT, part;
    static thread_local std::vector<double> acc;
    acc.assign(nc * K, 0.0);
    if (accumulate)
      for (size_t j = 0; j < nc; ++j)
        for (size_t c = 0; c < K; ++c)
          acc[j * K + c] = dw[(n0 + j) * lddw + c];
    part.resize(nc * K);
    for (size_t m0 = 0; m0 < M; m0 += kRowChunk) {
      size_t mc = std::min(kRowChunk, M - m0);
      dyT.resize(nc * mc);
      for (size_t i = 0; i < mc; ++i) {
        const float *src = dy + (m0 + i) * lddy + n0;
        for (size_t j = 0; j < nc; ++j)
          dyT[j * mc + i] = src[j];
      }
      matmul(dyT.data(), mc, x + m0 * ldx, ldx, part.data(), K, nc, K, mc);
      for (size_t i = 0; i < nc * K; ++i)
        acc[i] += part[i];
    }
    for (size_t j = 0; j < nc; ++j)
      for (size_t c = 0; c < K; ++c)
        dw[(n0 + j) * lddw + c] = float(acc[j * K + c]);
  });
}

void rmsNormGrad(const float *x, const float *w, const float *dy, size_t rows,
                 size_t D, float eps, float *dx, float *dw, bool accumulate) {
  // The forward's f32 inverse RMS, so that the linearisation point matches.
  std::vector<float> inv(rows);
  parallelRange(rows, 6 * D, [&](size_t r) {
    const float *xr = x + r * D, *gr = dy + r * D;
    float *out = dx + r * D;
    double ss = 0;
    for (size_t i = 0; i < D; ++i)
      ss += double(xr[i]) * xr[i];
    float var = float(ss / double(D));
    float ir = float(1.0 / std::sqrt(double(var + eps)));
    inv[r] = ir;
    // dx = r * (g - x * r^2 * <g, x> / D) with g = dy * w.
    double gx = 0;
    for (size_t i = 0; i < D; ++i)
      gx += double(gr[i]) * (w ? w[i] : 1.f) * xr[i];
    double c = double(ir) * ir * gx / double(D);
    for (size_t i = 0; i < D; ++i) {
      double g = double(gr[i]) * (w ? w[i] : 1.f);
      float val = float(double(ir) * (g - double(xr[i]) * c));
      out[i] = accumulate ? out[i] + val : val;
    }
  });
  if (!w || !dw)
    return;
  // Columns in blocks: each block's double sums run down all rows.
  constexpr size_t kCols = 64;
  parallelRange(ceilDiv(D, kCols), rows * kCols * 2, [&](size_t blk) {
    size_t c0 = blk * kCols, c1 = std::min(D, c0 + kCols);
    double acc[kCols] = {};
    for (size_t r = 0; r < rows; ++r) {
      const float *xr = x + r * D, *gr = dy + r * D;
      // The forward rounds x * inv to f32 before the weight multiply.
      for (size_t c = c0; c < c1; ++c)
        acc[c - c0] += double(gr[c]) * double(xr[c] * inv[r]);
    }
    for (size_t c = c0; c < c1; ++c)
      dw[c] = float(accumulate ? dw[c] + acc[c - c0] : acc[c - c0]);
  });
}

void ropeInverse(float *x, size_t ldx, size_t tokens, size_t heads, size_t d,
                 const int64_t *pos, const float *invFreq) {
  size_t half = d / 2;
  parallelRange(tokens, heads * d * 4, [&](size_t t) {
    static thread_local std::vector<float> cs;
    cs.resize(2 * half);
    float p = float(pos[t]);
    for (size_t j = 0; j < half; ++j) {
      float angle = invFreq[j] * p; // the forward's fp32 angle, then negated
      cs[2 * j] = float(std::cos(double(angle)));
      cs[2 * j + 1] = float(std::sin(double(angle)));
    }
    float *row = x + t * ldx;
    for (size_t h = 0; h < heads; ++h) {
      float *v = row + h * d;
      for (size_t j = 0; j < half; ++j) {
        float a = v[2 * j], b = v[2 * j + 1], c = cs[2 * j], s = cs[2 * j + 1];
        v[2 * j] = a * c + b * s;
        v[2 * j + 1] = b * c - a * s;
      }
    }
  });
}

void attentionGrad(const float *q, size_t ldq, const int64_t *qpos, size_t Tq,
                   const float *k, size_t ldk, const float *v, size_t ldv,
                   size_t kvLen, size_t H, size_t Hkv, size_t d, int64_t chunk,
                   float scale, const float *dout, size_t lddo, float *dq,
                   size_t lddq, float *dk, size_t lddk, float *dv,
                   size_t lddv) {
  size_t group = Hkv ? H / Hkv : 1;
  AttnGradArgs a{q, ldq, qpos, Tq,    k,     ldk,  v,    ldv,  kvLen,
                 H, Hkv, d,    chunk, scale, dout, lddo, group};
  std::vector<double> lse(Tq * H), delta(Tq * H);
  std::vector<char> live(Tq * H, 0);
  // Causal rows and keys differ in cost, so both passes hand out one row or
  // key per task from the pool's shared counter.
  ThreadPool &pool = ThreadPool::global();
  bool parallel =
      Tq * H * std::min<size_t>(kvLen, 4096) * d * 4 >= kParallelWork;
  auto run = [&](size_t n, auto &&fn) {
    if (parallel)
      pool.parallelFor(n, fn);
    else
      for (size_t i = 0; i < n; ++i)
        fn(i);
  };
  run(Tq * H, [&](size_t row) {
    float *g = dq + (row / H) * lddq + (row % H) * d;
    live[row] = queryRowGrad(a, row, g, lse[row], delta[row]);
    if (!live[row])
      std::fill(g, g + d, 0.f);
  });
  run(kvLen * Hkv, [&](size_t task) {
    size_t j = task / Hkv, kvh = task % Hkv;
    keyGrad(a, j, kvh, lse.data(), delta.data(), live.data(),
            dk + j * lddk + kvh * d, dv + j * lddv + kvh * d);
  });
}

void routerScoresGrad(const float *logits, size_t T, size_t E, size_t topK,
                      const float *dscores, float *dlogits) {
  topK = std::min(topK, E);
  std::vector<char> taken(E);
  for (size_t t = 0; t < T; ++t) {
    const float *l = logits + t * E;
    const float *ds = dscores + t * E;
    float *out = dlogits + t * E;
    std::fill(out, out + E, 0.f);
    std::fill(taken.begin(), taken.end(), 0);
    // The forward's selection: strictly larger wins, so ties keep the lower
    // index, and a NaN ranks highest.
    for (size_t kk = 0; kk < topK; ++kk) {
      size_t best = E;
      for (size_t e = 0; e < E; ++e) {
        if (taken[e])
          continue;
        if (best == E || l[e] > l[best] ||
            (std::isnan(l[e]) && !std::isnan(l[best])))
          best = e;
      }
      taken[best] = 1;
      float s = sigmoid(l[best]);
      out[best] = float(double(ds[best]) * s * (1.0 - double(s)));
    }
  }
}

void swigluGrad(const float *gate, size_t ldg, const float *up, size_t ldu,
                const float *dy, size_t lddy, size_t rows, size_t cols,
                float *dgate, size_t lddg, float *dup, size_t lddu) {
  parallelRange(rows, cols * 16, [&](size_t r) {
    const float *g = gate + r * ldg, *u = up + r * ldu, *gy = dy + r * lddy;
    float *dg = dgate + r * lddg, *du = dup + r * lddu;
    for (size_t i = 0; i < cols; ++i) {
      // silu'(g) = sig * (1 + g * (1 - sig)).
      double gv = g[i], sig = 1.0 / (1.0 + std::exp(-gv));
      double y = gy[i];
      // Both outputs are computed before either store, so dgate may alias
      // gate and dup may alias up.
      float a = float(y * u[i] * sig * (1.0 + gv * (1.0 - sig)));
      float b = float(y * gv * sig);
      dg[i] = a;
      du[i] = b;
    }
  });
}

void expertsBackward(const float *x, const float *scores, const float *gateUp,
                     const float *down, size_t T, size_t D, size_t I, size_t E,
                     const float *dy, float *dx, float *dscores, float *dGateUp,
                     float *dDown, bool accumulate) {
  if (!accumulate) {
    std::fill(dx, dx + T * D, 0.f);
    std::fill(dGateUp, dGateUp + E * D * 2 * I, 0.f);
    std::fill(dDown, dDown + E * I * D, 0.f);
  }
  std::fill(dscores, dscores + T * E, 0.f);
  std::vector<size_t> tokens;
  std::vector<float> z, gu, h, g, dh, dgu, dz;
  for (size_t e = 0; e < E; ++e) {
    tokens.clear();
    for (size_t t = 0; t < T; ++t)
      if (scores[t * E + e] != 0.f)
        tokens.push_back(t);
    size_t n = tokens.size();
    if (n == 0)
      continue;
    const float *gateUpE = gateUp + e * D * 2 * I, *downE = down + e * I * D;
    // Recompute the forward of expert e exactly as expertsForward does.
    z.resize(n * D);
    g.resize(n * D);
    for (size_t i = 0; i < n; ++i) {
      const float *xr = x + tokens[i] * D;
      float s = scores[tokens[i] * E + e];
      for (size_t c = 0; c < D; ++c)
        z[i * D + c] = xr[c] * s;
      std::memcpy(g.data() + i * D, dy + tokens[i] * D, D * sizeof(float));
    }
    gu.resize(n * 2 * I);
    matmul(z.data(), D, gateUpE, 2 * I, gu.data(), 2 * I, n, 2 * I, D);
    h.resize(n * I);
    swiglu(gu.data(), 2 * I, gu.data() + I, 2 * I, n, I, h.data(), I);
    // y = h @ down[e]: dh = g @ down[e]^T, dDown[e] += h^T @ g.
    dh.resize(n * I);
    linear(g.data(), D, downE, D, dh.data(), I, n, I, D);
    linearGradWeight(g.data(), D, h.data(), I, dDown + e * I * D, D, n, I, D,
                     true);
    dgu.resize(n * 2 * I);
    swigluGrad(gu.data(), 2 * I, gu.data() + I, 2 * I, dh.data(), I, n, I,
               dgu.data(), 2 * I, dgu.data() + I, 2 * I);
    // gu = z @ gateUp[e]: dz = dgu @ gateUp[e]^T, dGateUp[e] += z^T @ dgu.
    dz.resize(n * D);
    linear(dgu.data(), 2 * I, gateUpE, 2 * I, dz.data(), D, n, D, 2 * I);
    linearGradWeight(dgu.data(), 2 * I, z.data(), D, dGateUp + e * D * 2 * I,
                     2 * I, n, D, 2 * I, true);
    // z = x * s: dx += s * dz, ds = <x, dz>.
    for (size_t i = 0; i < n; ++i) {
      size_t t = tokens[i];
      const float *xr = x + t * D, *dzr = dz.data() + i * D;
      float s = scores[t * E + e];
      float *dxr = dx + t * D;
      double ds = 0;
      for (size_t c = 0; c < D; ++c) {
        ds += double(xr[c]) * dzr[c];
        dxr[c] += s * dzr[c];
      }
      dscores[t * E + e] = float(ds);
    }
  }
}

namespace {
/// Rows `tokens[i] * K + slots[i]` of the [T, K, W] `src`, gathered.
void gatherSlots(const float *src, size_t W, size_t K,
                 const std::vector<size_t> &tokens,
                 const std::vector<size_t> &slots, std::vector<float> &out) {
  out.resize(tokens.size() * W);
  for (size_t i = 0; i < tokens.size(); ++i)
    std::memcpy(out.data() + i * W, src + (tokens[i] * K + slots[i]) * W,
                W * sizeof(float));
}
/// The inverse: row i of `rows` to row tokens[i] * K + slots[i] of dst.
void scatterSlots(const std::vector<float> &rows, size_t W, size_t K,
                  const std::vector<size_t> &tokens,
                  const std::vector<size_t> &slots, float *dst) {
  for (size_t i = 0; i < tokens.size(); ++i)
    std::memcpy(dst + (tokens[i] * K + slots[i]) * W, rows.data() + i * W,
                W * sizeof(float));
}
/// Rows of `src` [T, W] at `tokens`, each times `scale[t * E + e]` when
/// scale is given.
void gatherTokens(const float *src, size_t W, const std::vector<size_t> &tokens,
                  const float *scale, size_t E, size_t e,
                  std::vector<float> &out) {
  out.resize(tokens.size() * W);
  for (size_t i = 0; i < tokens.size(); ++i) {
    const float *r = src + tokens[i] * W;
    float *o = out.data() + i * W;
    if (!scale) {
      std::memcpy(o, r, W * sizeof(float));
      continue;
    }
    float s = scale[tokens[i] * E + e];
    for (size_t c = 0; c < W; ++c)
      o[c] = r[c] * s;
  }
}
using Ids = std::vector<size_t>;
} // namespace

bool expertsGateUp(const float *x, const float *scores, const float *gateUp,
                   size_t T, size_t D, size_t I, size_t E, size_t K,
                   float *gu) {
  std::fill(gu, gu + T * K * 2 * I, 0.f);
  std::vector<float> z, rows;
  return forEachExpert(scores, T, E, K, [&](size_t e, const Ids &tokens,
                                            const Ids &slots) {
    gatherTokens(x, D, tokens, scores, E, e, z);
    rows.resize(tokens.size() * 2 * I);
    matmul(z.data(), D, gateUp + e * D * 2 * I, 2 * I, rows.data(), 2 * I,
           tokens.size(), 2 * I, D);
    scatterSlots(rows, 2 * I, K, tokens, slots, gu);
  });
}

bool expertsDownGrad(const float *gu, const float *scores, const float *down,
                     const float *dy, size_t T, size_t D, size_t I, size_t E,
                     size_t K, float *dgu) {
  std::fill(dgu, dgu + T * K * 2 * I, 0.f);
  std::vector<float> g, gus, dh, rows;
  return forEachExpert(scores, T, E, K, [&](size_t e, const Ids &tokens,
                                            const Ids &slots) {
    size_t n = tokens.size();
    gatherTokens(dy, D, tokens, nullptr, E, e, g);
    gatherSlots(gu, 2 * I, K, tokens, slots, gus);
    dh.resize(n * I);
    linear(g.data(), D, down + e * I * D, D, dh.data(), I, n, I, D);
    rows.resize(n * 2 * I);
    swigluGrad(gus.data(), 2 * I, gus.data() + I, 2 * I, dh.data(), I, n, I,
               rows.data(), 2 * I, rows.data() + I, 2 * I);
    scatterSlots(rows, 2 * I, K, tokens, slots, dgu);
  });
}

bool expertsDownGradWeight(const float *gu, const float *scores,
                           const float *dy, size_t T, size_t D, size_t I,
                           size_t E, size_t K, float *dDown, bool accumulate) {
  if (!accumulate)
    std::fill(dDown, dDown + E * I * D, 0.f);
  std::vector<float> g, gus, h;
  return forEachExpert(scores, T, E, K, [&](size_t e, const Ids &tokens,
                                            const Ids &slots) {
    size_t n = tokens.size();
    gatherTokens(dy, D, tokens, nullptr, E, e, g);
    gatherSlots(gu, 2 * I, K, tokens, slots, gus);
    h.resize(n * I);
    swiglu(gus.data(), 2 * I, gus.data() + I, 2 * I, n, I, h.data(), I);
    linearGradWeight(g.data(), D, h.data(), I, dDown + e * I * D, D, n, I, D,
                     true);
  });
}

bool expertsGateUpGradInput(const float *dgu, const float *scores,
                            const float *gateUp, size_t T, size_t D, size_t I,
                            size_t E, size_t K, float *dz) {
  std::fill(dz, dz + T * K * D, 0.f);
  std::vector<float> dgus, rows;
  return forEachExpert(scores, T, E, K, [&](size_t e, const Ids &tokens,
                                            const Ids &slots) {
    gatherSlots(dgu, 2 * I, K, tokens, slots, dgus);
    rows.resize(tokens.size() * D);
    linear(dgus.data(), 2 * I, gateUp + e * D * 2 * I, 2 * I, rows.data(), D,
           tokens.size(), D, 2 * I);
    scatterSlots(rows, D, K, tokens, slots, dz);
  });
}

bool expertsCombineGrad(const float *dz, const float *x, const float *scores,
                        size_t T, size_t D, size_t E, size_t K, float *dx,
                        float *dscores) {
  for (size_t t = 0; t < T; ++t) {
    const float *xr = x + t * D;
    float *dxr = dx + t * D;
    std::fill(dxr, dxr + D, 0.f);
    std::fill(dscores + t * E, dscores + (t + 1) * E, 0.f);
    size_t k = 0;
    for (size_t e = 0; e < E; ++e) {
      float s = scores[t * E + e];
      if (s == 0.f)
        continue;
      if (k == K)
        return false;
      const float *dzr = dz + (t * K + k++) * D;
      // z = x * s: dx += s * dz, ds = <x, dz>.
      double ds = 0;
      for (size_t c = 0; c < D; ++c) {
        ds += double(xr[c]) * dzr[c];
        dxr[c] += s * dzr[c];
      }
      dscores[t * E + e] = float(ds);
    }
  }
  return true;
}

bool expertsGateUpGradWeight(const float *x, const float *scores,
                             const float *dgu, size_t T, size_t D, size_t I,
                             size_t E, size_t K, float *dGateUp,
                             bool accumulate) {
  if (!accumulate)
    std::fill(dGateUp, dGateUp + E * D * 2 * I, 0.f);
  std::vector<float> z, dgus;
  return forEachExpert(scores, T, E, K, [&](size_t e, const Ids &tokens,
                                            const Ids &slots) {
    gatherTokens(x, D, tokens, scores, E, e, z);
    gatherSlots(dgu, 2 * I, K, tokens, slots, dgus);
    linearGradWeight(dgus.data(), 2 * I, z.data(), D, dGateUp + e * D * 2 * I,
                     2 * I, tokens.size(), D, 2 * I, true);
  });
}

void embeddingGrad(const int64_t *ids, size_t n, const float *dy, size_t D,
                   float *dtable, int64_t paddingIdx) {
  // Rows grouped by id: each group is summed in double by one task, so a
  // frequent token neither races nor loses precision.
  std::vector<size_t> order;
  order.reserve(n);
  for (size_t i = 0; i < n; ++i)
    if (ids[i] != paddingIdx)
      order.push_back(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return ids[a] < ids[b]; });
  std::vector<size_t> starts;
  for (size_t i = 0; i < order.size(); ++i)
    if (i == 0 || ids[order[i]] != ids[order[i - 1]])
      starts.push_back(i);
  starts.push_back(order.size());
  size_t groups = starts.size() - 1;
  size_t perGroup = groups ? order.size() / groups + 1 : 0;
  parallelRange(groups, D * perGroup, [&](size_t gi) {
    static thread_local std::vector<double> acc;
    float *row = dtable + size_t(ids[order[starts[gi]]]) * D;
    acc.assign(row, row + D);
    for (size_t i = starts[gi]; i < starts[gi + 1]; ++i) {
      const float *src = dy + order[i] * D;
      for (size_t c = 0; c < D; ++c)
        acc[c] += src[c];
    }
    for (size_t c = 0; c < D; ++c)
      row[c] = float(acc[c]);
  });
}

void adamwStep(float *param, const float *grad, float *m, float *v, size_t n,
               int64_t step, double lr, double beta1, double beta2, double eps,
               double weightDecay) {
  // Python-float scalars, as torch's _single_tensor_adam computes them.
  const double decay = 1.0 - lr * weightDecay;
  const double bc1 = 1.0 - std::pow(beta1, double(step));
  const double bc2 = 1.0 - std::pow(beta2, double(step));
  const double stepSize = lr / bc1;
  const double bc2Sqrt = std::sqrt(bc2);
  const double w1 = 1.0 - beta1, w2 = 1.0 - beta2;
  constexpr size_t kBlock = 4096;
  parallelRange(ceilDiv(n, kBlock), kBlock * 8, [&](size_t blk) {
    size_t i1 = std::min(n, (blk + 1) * kBlock);
    for (size_t i = blk * kBlock; i < i1; ++i) {
      double p = double(param[i]) * decay;
      double g = grad[i];
      // exp_avg.lerp_(grad, 1 - beta1): weight < 0.5 takes this branch.
      double mi =
          w1 < 0.5 ? m[i] + w1 * (g - m[i]) : g - (g - m[i]) * (1.0 - w1);
      double vi = double(v[i]) * beta2 + w2 * g * g;
      double denom = std::sqrt(vi) / bc2Sqrt + eps;
      p -= stepSize * mi / denom;
      param[i] = float(p);
      m[i] = float(mi);
      v[i] = float(vi);
    }
  });
}

} // namespace l4c::cpu
