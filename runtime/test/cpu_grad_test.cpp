//===- cpu_grad_test.cpp - backward kernels vs finite differences --------===//
//
// Each backward kernel against central differences of a double-precision
// reference forward (projected on a random direction), on small odd shapes
// with strides, GQA, chunked / full masks, short KV ranges and top-k 1 and 2.
//
//===----------------------------------------------------------------------===//
#include "cpu/grad_kernels.h"
#include "cpu/kernels.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <vector>

using namespace l4c::cpu;

namespace {

using FVec = std::vector<float>;
using DVec = std::vector<double>;

FVec randomVec(size_t n, unsigned seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  FVec v(n);
  for (float &x : v)
    x = dist(gen);
  return v;
}

DVec toDouble(const FVec &v) { return DVec(v.begin(), v.end()); }
FVec toFloat(const DVec &v) { return FVec(v.begin(), v.end()); }

// Dense [rows, width] <-> row stride ld (padding filled with `fill`).
FVec strided(const DVec &dense, size_t rows, size_t width, size_t ld,
             float fill = 0.f) {
  FVec out(rows * ld, fill);
  for (size_t r = 0; r < rows; ++r)
    for (size_t c = 0; c < width; ++c)
      out[r * ld + c] = float(dense[r * width + c]);
  return out;
}
DVec dense(const FVec &s, size_t rows, size_t width, size_t ld) {
  DVec out(rows * width);
  for (size_t r = 0; r < rows; ++r)
    for (size_t c = 0; c < width; ++c)
      out[r * width + c] = s[r * ld + c];
  return out;
}

double dotD(const DVec &a, const DVec &b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i)
    s += a[i] * b[i];
  return s;
}

// d f / d x[i] by central differences; f reads x, which is perturbed in place.
DVec numericGrad(DVec &x, const std::function<double()> &f, double h = 1e-4) {
  DVec g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    double xi = x[i];
    x[i] = xi + h;
    double fp = f();
    x[i] = xi - h;
    double fm = f();
    x[i] = xi;
    g[i] = (fp - fm) / (2 * h);
  }
  return g;
}

// The f32 kernels against double differences: the worst error relative to
// the largest reference entry.
void expectNear(const DVec &ref, const DVec &got, const char *what,
                double tol = 1e-4) {
  ASSERT_EQ(ref.size(), got.size()) << what;
  double maxRef = 0, maxErr = 0;
  size_t worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    maxRef = std::max(maxRef, std::fabs(ref[i]));
    double err = std::fabs(ref[i] - got[i]);
    if (!(err <= maxErr)) { // also catches NaN
      maxErr = err;
      worst = i;
    }
  }
  EXPECT_LE(maxErr, tol * std::max(maxRef, 1e-3))
      << what << ": element " << worst << " got " << got[worst] << " want "
      << ref[worst] << " (max |want| " << maxRef << ")";
}

//===----------------------------------------------------------------------===//
// Double-precision reference forwards
//===----------------------------------------------------------------------===//

double crossEntropyRef(const DVec &logits, const std::vector<int64_t> &ids,
                       size_t B, size_t T, size_t S, size_t V) {
  double sum = 0;
  size_t count = 0;
  for (size_t b = 0; b < B; ++b)
    for (size_t t = 0; t + 1 < T; ++t) {
      int64_t label = ids[b * S + t + 1];
      if (label == kIgnoreIndex)
        continue;
      const double *row = logits.data() + (b * S + t) * V;
      double mx = *std::max_element(row, row + V), se = 0;
      for (size_t i = 0; i < V; ++i)
        se += std::exp(row[i] - mx);
      sum += mx + std::log(se) - row[label];
      ++count;
    }
  return sum / double(count);
}

// y[M,N] = x[M,K] @ w[N,K]^T.
DVec linearRef(const DVec &x, const DVec &w, size_t M, size_t N, size_t K) {
  DVec y(M * N, 0.0);
  for (size_t m = 0; m < M; ++m)
    for (size_t n = 0; n < N; ++n)
      for (size_t k = 0; k < K; ++k)
        y[m * N + n] += x[m * K + k] * w[n * K + k];
  return y;
}

DVec rmsNormRef(const DVec &x, const DVec *w, size_t rows, size_t D,
                double eps) {
  DVec y(x.size());
  for (size_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (size_t i = 0; i < D; ++i)
      ss += x[r * D + i] * x[r * D + i];
    double inv = 1.0 / std::sqrt(ss / double(D) + eps);
    for (size_t i = 0; i < D; ++i)
      y[r * D + i] = x[r * D + i] * inv * (w ? (*w)[i] : 1.0);
  }
  return y;
}

// RoPE with the kernel's fp32 angles, rotated in double.
DVec ropeRef(const DVec &x, size_t tokens, size_t heads, size_t d,
             const std::vector<int64_t> &pos, const FVec &invFreq) {
  DVec y(x.size());
  for (size_t t = 0; t < tokens; ++t)
    for (size_t h = 0; h < heads; ++h)
      for (size_t j = 0; j < d / 2; ++j) {
        double angle = double(invFreq[j] * float(pos[t]));
        double c = std::cos(angle), s = std::sin(angle);
        size_t i = (t * heads + h) * d + 2 * j;
        y[i] = x[i] * c - x[i + 1] * s;
        y[i + 1] = x[i] * s + x[i + 1] * c;
      }
  return y;
}

struct AttnShape {
  size_t Tq, Skv, kvLen, H, Hkv, d;
  int64_t chunk;
  std::vector<int64_t> qpos;
};

// q [Tq,H,d], k/v [Skv,Hkv,d] dense -> out [Tq,H,d].
DVec attentionRef(const AttnShape &a, const DVec &q, const DVec &k,
                  const DVec &v, double scale) {
  DVec out(a.Tq * a.H * a.d, 0.0);
  size_t group = a.H / a.Hkv;
  for (size_t t = 0; t < a.Tq; ++t) {
    int64_t p = a.qpos[t];
    if (p < 0 || a.kvLen == 0)
      continue;
    size_t hi = std::min(size_t(p), a.kvLen - 1);
    size_t lo = a.chunk > 0 ? size_t(p / a.chunk * a.chunk) : 0;
    if (lo > hi)
      continue;
    for (size_t h = 0; h < a.H; ++h) {
      size_t kvh = h / group;
      const double *qr = q.data() + (t * a.H + h) * a.d;
      DVec s;
      for (size_t j = lo; j <= hi; ++j) {
        const double *kr = k.data() + (j * a.Hkv + kvh) * a.d;
        double acc = 0;
        for (size_t i = 0; i < a.d; ++i)
          acc += qr[i] * kr[i];
        s.push_back(acc * scale);
      }
      double mx = *std::max_element(s.begin(), s.end()), sum = 0;
      for (double &x : s)
        sum += (x = std::exp(x - mx));
      double *o = out.data() + (t * a.H + h) * a.d;
      for (size_t j = lo; j <= hi; ++j) {
        const double *vr = v.data() + (j * a.Hkv + kvh) * a.d;
        for (size_t i = 0; i < a.d; ++i)
          o[i] += s[j - lo] / sum * vr[i];
      }
    }
  }
  return out;
}

// Top-k by value, ties to the lower index (the forward's rule).
DVec routerScoresRef(const DVec &logits, size_t T, size_t E, size_t topK) {
  DVec s(T * E, 0.0);
  for (size_t t = 0; t < T; ++t) {
    std::vector<size_t> idx(E);
    for (size_t e = 0; e < E; ++e)
      idx[e] = e;
    std::stable_sort(idx.begin(), idx.end(), [&](size_t a, size_t b) {
      return logits[t * E + a] > logits[t * E + b];
    });
    for (size_t kk = 0; kk < topK; ++kk) {
      double l = logits[t * E + idx[kk]];
      s[t * E + idx[kk]] = 1.0 / (1.0 + std::exp(-l));
    }
  }
  return s;
}

double silu(double g) { return g / (1.0 + std::exp(-g)); }

// Dense over every (token, expert): a zero score contributes exactly 0.
DVec expertsRef(const DVec &x, const DVec &scores, const DVec &gateUp,
                const DVec &down, size_t T, size_t D, size_t I, size_t E) {
  DVec out(T * D, 0.0);
  DVec gu(2 * I);
  for (size_t e = 0; e < E; ++e)
    for (size_t t = 0; t < T; ++t) {
      double s = scores[t * E + e];
      std::fill(gu.begin(), gu.end(), 0.0);
      for (size_t c = 0; c < D; ++c) {
        double z = x[t * D + c] * s;
        for (size_t j = 0; j < 2 * I; ++j)
          gu[j] += z * gateUp[(e * D + c) * 2 * I + j];
      }
      for (size_t i = 0; i < I; ++i) {
        double h = gu[I + i] * silu(gu[i]);
        for (size_t c = 0; c < D; ++c)
          out[t * D + c] += h * down[(e * I + i) * D + c];
      }
    }
  return out;
}

//===----------------------------------------------------------------------===//
// Tests
//===----------------------------------------------------------------------===//

TEST(CpuGrad, CrossEntropy) {
  const size_t B = 2, T = 5, S = 6, V = 11, ldl = 13, lddl = 12;
  FVec logits = randomVec(B * S * ldl, 11, -3.f, 3.f);
  std::vector<int64_t> ids(B * S);
  std::mt19937 gen(12);
  for (int64_t &id : ids)
    id = int64_t(gen() % V);
  ids[1 * S + 3] = kIgnoreIndex; // label of (b=1, t=2)
  ids[0 * S + 5] = kIgnoreIndex; // beyond T: never read
  EXPECT_EQ(crossEntropyCount(ids.data(), B, T, S), B * (T - 1) - 1);

  DVec x = dense(logits, B * S, V, ldl);
  auto f = [&] { return crossEntropyRef(x, ids, B, T, S, V); };
  float loss = crossEntropy(logits.data(), ldl, ids.data(), B, T, S, V);
  EXPECT_NEAR(loss, f(), 1e-6 * f());

  const float seed = 1.7f;
  FVec dl(B * S * lddl, std::numeric_limits<float>::quiet_NaN());
  crossEntropyGrad(logits.data(), ldl, ids.data(), B, T, S, V, seed, dl.data(),
                   lddl);
  DVec num = numericGrad(x, [&] { return seed * f(); });
  expectNear(num, dense(dl, B * S, V, lddl), "dlogits");
  // In place over the logits: the same result.
  FVec inPlace = logits;
  crossEntropyGrad(inPlace.data(), ldl, ids.data(), B, T, S, V, seed,
                   inPlace.data(), ldl);
  expectNear(dense(dl, B * S, V, lddl), dense(inPlace, B * S, V, ldl),
             "dlogits in place", 0);
  // The last position, the ignored label and the rows beyond T are 0.
  for (size_t r : {size_t(T - 1), size_t(S + 2), size_t(S - 1)})
    for (size_t i = 0; i < V; ++i)
      EXPECT_EQ(dl[r * lddl + i], 0.f) << "row " << r;

  std::vector<int64_t> none(B * S, kIgnoreIndex);
  EXPECT_TRUE(
      std::isnan(crossEntropy(logits.data(), ldl, none.data(), B, T, S, V)));
  crossEntropyGrad(logits.data(), ldl, none.data(), B, T, S, V, 1.f, dl.data(),
                   lddl);
  EXPECT_EQ(*std::max_element(dl.begin(), dl.begin() + V), 0.f);
}

TEST(CpuGrad, Linear) {
  const size_t M = 7, N = 5, K = 13, pad = 3;
  DVec x = toDouble(randomVec(M * K, 21)), w = toDouble(randomVec(N * K, 22));
  DVec r = toDouble(randomVec(M * N, 23));
  auto f = [&] { return dotD(r, linearRef(x, w, M, N, K)); };
  FVec xs = strided(x, M, K, K + pad), ws = strided(w, N, K, K + pad);
  FVec rs = strided(r, M, N, N + pad);

  FVec dx(M * (K + 1), 0.f), dw(N * (K + 2), 0.f);
  linearGradInput(rs.data(), N + pad, ws.data(), K + pad, dx.data(), K + 1, M,
                  N, K);
  linearGradWeight(xs.data(), K + pad, rs.data(), N + pad, dw.data(), K + 2, M,
                   N, K);
  DVec numX = numericGrad(x, f), numW = numericGrad(w, f);
  expectNear(numX, dense(dx, M, K, K + 1), "dx");
  expectNear(numW, dense(dw, N, K, K + 2), "dw");

  // accumulate adds to what is there.
  FVec dx2 = dx, dw2 = dw;
  linearGradInput(rs.data(), N + pad, ws.data(), K + pad, dx2.data(), K + 1, M,
                  N, K, true);
  linearGradWeight(xs.data(), K + pad, rs.data(), N + pad, dw2.data(), K + 2, M,
                   N, K, true);
  for (double &g : numX)
    g *= 2;
  for (double &g : numW)
    g *= 2;
  expectNear(numX, dense(dx2, M, K, K + 1), "dx accumulated");
  expectNear(numW, dense(dw2, N, K, K + 2), "dw accumulated");
}

// Many rows: the weight gradient crosses several f32 row chunks and thread
// blocks; checked against the exact double sum.
TEST(CpuGrad, LinearWeightManyRows) {
  const size_t M = 1100, N = 131, K = 45;
  FVec x = randomVec(M * K, 31), dy = randomVec(M * N, 32);
  FVec dw(N * K);
  linearGradWeight(x.data(), K, dy.data(), N, dw.data(), K, M, N, K);
  DVec ref(N * K, 0.0);
  for (size_t m = 0; m < M; ++m)
    for (size_t n = 0; n < N; ++n)
      for (size_t k = 0; k < K; ++k)
        ref[n * K + k] += double(dy[m * N + n]) * x[m * K + k];
  expectNear(ref, toDouble(dw), "dw", 1e-6);
}

TEST(CpuGrad, RmsNorm) {
  const size_t rows = 5, D = 19;
  const float eps = 1e-5f;
  DVec x = toDouble(randomVec(rows * D, 41));
  DVec w = toDouble(randomVec(D, 42, 0.5f, 1.5f));
  DVec r = toDouble(randomVec(rows * D, 43));
  for (bool weighted : {true, false}) {
    SCOPED_TRACE(weighted ? "weighted" : "weightless");
    const DVec *wp = weighted ? &w : nullptr;
    auto f = [&] { return dotD(r, rmsNormRef(x, wp, rows, D, eps)); };
    FVec xf = toFloat(x), wf = toFloat(w), rf = toFloat(r);
    FVec y(rows * D);
    rmsNorm(xf.data(), weighted ? wf.data() : nullptr, rows, D, eps, y.data());
    expectNear(rmsNormRef(x, wp, rows, D, eps), toDouble(y), "forward", 1e-6);

    FVec dx(rows * D, 0.5f), dw(D, 0.25f);
    rmsNormGrad(xf.data(), weighted ? wf.data() : nullptr, rf.data(), rows, D,
                eps, dx.data(), weighted ? dw.data() : nullptr, true);
    DVec numX = numericGrad(x, f);
    for (double &g : numX)
      g += 0.5;
    expectNear(numX, toDouble(dx), "dx accumulated");
    if (weighted) {
      DVec numW = numericGrad(w, f);
      for (double &g : numW)
        g += 0.25;
      expectNear(numW, toDouble(dw), "dw accumulated");
      rmsNormGrad(xf.data(), wf.data(), rf.data(), rows, D, eps, dx.data(),
                  dw.data());
      for (double &g : numW)
        g -= 0.25;
      expectNear(numW, toDouble(dw), "dw");
    }
  }
}

TEST(CpuGrad, RopeInverse) {
  const size_t tokens = 3, heads = 2, d = 6, ldx = heads * d + 1;
  std::vector<int64_t> pos = {0, 5, 17};
  FVec invFreq(d / 2);
  ASSERT_TRUE(ropeInvFreq(10000.0, d, "default", 0, 0, 0, 0, invFreq.data()));
  DVec x = toDouble(randomVec(tokens * heads * d, 51));
  DVec r = toDouble(randomVec(tokens * heads * d, 52));
  FVec xs = strided(x, tokens, heads * d, ldx);
  rope(xs.data(), ldx, tokens, heads, d, pos.data(), invFreq.data());
  expectNear(ropeRef(x, tokens, heads, d, pos, invFreq),
             dense(xs, tokens, heads * d, ldx), "forward", 1e-6);
  // The inverse undoes the forward.
  ropeInverse(xs.data(), ldx, tokens, heads, d, pos.data(), invFreq.data());
  expectNear(x, dense(xs, tokens, heads * d, ldx), "round trip", 1e-6);

  FVec g = strided(r, tokens, heads * d, ldx);
  ropeInverse(g.data(), ldx, tokens, heads, d, pos.data(), invFreq.data());
  DVec num = numericGrad(
      x, [&] { return dotD(r, ropeRef(x, tokens, heads, d, pos, invFreq)); });
  expectNear(num, dense(g, tokens, heads * d, ldx), "dx");
}

class CpuGradAttention : public ::testing::TestWithParam<AttnShape> {};

TEST_P(CpuGradAttention, MatchesFiniteDifferences) {
  const AttnShape a = GetParam();
  const size_t qw = a.H * a.d, kw = a.Hkv * a.d;
  const size_t ldq = qw + 3, ldk = kw + 1, ldv = kw + 2, ldo = qw + 1;
  const float scale = float(1.0 / std::sqrt(double(a.d)));
  DVec q = toDouble(randomVec(a.Tq * qw, 61, -1.5f, 1.5f));
  DVec k = toDouble(randomVec(a.Skv * kw, 62, -1.5f, 1.5f));
  DVec v = toDouble(randomVec(a.Skv * kw, 63));
  DVec r = toDouble(randomVec(a.Tq * qw, 64));
  FVec qs = strided(q, a.Tq, qw, ldq), ks = strided(k, a.Skv, kw, ldk);
  FVec vs = strided(v, a.Skv, kw, ldv), rs = strided(r, a.Tq, qw, ldo);

  FVec out(a.Tq * ldo);
  attention(qs.data(), ldq, a.qpos.data(), a.Tq, ks.data(), ldk, vs.data(), ldv,
            a.kvLen, a.H, a.Hkv, a.d, a.chunk, scale, out.data(), ldo);
  expectNear(attentionRef(a, q, k, v, scale), dense(out, a.Tq, qw, ldo),
             "forward", 1e-5);

  const float kSentinel = 7.f; // rows at or above kvLen stay untouched
  FVec dq(a.Tq * ldq, kSentinel), dk(a.Skv * ldk, kSentinel),
      dv(a.Skv * ldv, kSentinel);
  attentionGrad(qs.data(), ldq, a.qpos.data(), a.Tq, ks.data(), ldk, vs.data(),
                ldv, a.kvLen, a.H, a.Hkv, a.d, a.chunk, scale, rs.data(), ldo,
                dq.data(), ldq, dk.data(), ldk, dv.data(), ldv);
  auto f = [&] { return dotD(r, attentionRef(a, q, k, v, scale)); };
  DVec numQ = numericGrad(q, f), numK = numericGrad(k, f),
       numV = numericGrad(v, f);
  expectNear(numQ, dense(dq, a.Tq, qw, ldq), "dq");
  expectNear(DVec(numK.begin(), numK.begin() + a.kvLen * kw),
             dense(dk, a.kvLen, kw, ldk), "dk");
  expectNear(DVec(numV.begin(), numV.begin() + a.kvLen * kw),
             dense(dv, a.kvLen, kw, ldv), "dv");
  for (size_t j = a.kvLen; j < a.Skv; ++j)
    for (size_t i = 0; i < kw; ++i) {
      EXPECT_EQ(dk[j * ldk + i], kSentinel) << "dk row " << j;
      EXPECT_EQ(dv[j * ldv + i], kSentinel) << "dv row " << j;
    }
}

// GQA 4/2 throughout. Prefill over the whole range, and queries at later
// positions against a prefix with kvLen < Skv (one query beyond kvLen whose
// chunk starts past the last key, so it sees nothing under the chunked mask).
INSTANTIATE_TEST_SUITE_P(
    CpuGrad, CpuGradAttention,
    ::testing::Values(AttnShape{7, 7, 7, 4, 2, 5, 0, {0, 1, 2, 3, 4, 5, 6}},
                      AttnShape{7, 7, 7, 4, 2, 5, 3, {0, 1, 2, 3, 4, 5, 6}},
                      AttnShape{5, 9, 6, 4, 2, 5, 0, {2, 3, 4, 5, 7}},
                      AttnShape{5, 9, 6, 4, 2, 5, 3, {2, 3, 4, 5, 7}},
                      AttnShape{3, 4, 4, 4, 4, 3, 0, {1, 3, 2}}));

TEST(CpuGrad, RouterScores) {
  const size_t T = 6, E = 5;
  // Logits at least 0.3 apart within a row, so differences never reorder.
  std::mt19937 gen(71);
  FVec logits(T * E);
  std::uniform_real_distribution<float> jitter(0.f, 0.2f);
  for (size_t t = 0; t < T; ++t) {
    std::vector<int> perm(E);
    for (size_t e = 0; e < E; ++e)
      perm[e] = int(e);
    std::shuffle(perm.begin(), perm.end(), gen);
    for (size_t e = 0; e < E; ++e)
      logits[t * E + e] = float(perm[e]) * 0.5f - 1.f + jitter(gen);
  }
  DVec r = toDouble(randomVec(T * E, 72));
  FVec rf = toFloat(r);
  for (size_t topK : {1, 2}) {
    SCOPED_TRACE("topK " + std::to_string(topK));
    DVec x = toDouble(logits);
    FVec dl(T * E);
    routerScoresGrad(logits.data(), T, E, topK, rf.data(), dl.data());
    DVec num =
        numericGrad(x, [&] { return dotD(r, routerScoresRef(x, T, E, topK)); });
    expectNear(num, toDouble(dl), "dlogits");
  }
  // Ties select as the forward does (the lower index).
  FVec tied = {0.5f, 2.f, 2.f, 1.f, 2.f};
  FVec ones(5, 1.f), scores(5), dl(5);
  for (size_t topK : {1, 2}) {
    routerScores(tied.data(), 1, 5, topK, scores.data());
    routerScoresGrad(tied.data(), 1, 5, topK, ones.data(), dl.data());
    for (size_t e = 0; e < 5; ++e)
      EXPECT_EQ(scores[e] != 0.f, dl[e] != 0.f)
          << "topK " << topK << " e " << e;
  }
}

TEST(CpuGrad, Swiglu) {
  // Gate and up as the two halves of one [rows, 2 * cols] buffer.
  const size_t rows = 3, cols = 7, ld = 2 * cols;
  DVec g = toDouble(randomVec(rows * cols, 81, -4.f, 4.f));
  DVec u = toDouble(randomVec(rows * cols, 82, -2.f, 2.f));
  DVec r = toDouble(randomVec(rows * cols, 83));
  auto f = [&] {
    double s = 0;
    for (size_t i = 0; i < g.size(); ++i)
      s += r[i] * u[i] * silu(g[i]);
    return s;
  };
  FVec gu(rows * ld);
  for (size_t i = 0; i < rows; ++i)
    for (size_t c = 0; c < cols; ++c) {
      gu[i * ld + c] = float(g[i * cols + c]);
      gu[i * ld + cols + c] = float(u[i * cols + c]);
    }
  FVec rf = toFloat(r), dgu(rows * ld);
  swigluGrad(gu.data(), ld, gu.data() + cols, ld, rf.data(), cols, rows, cols,
             dgu.data(), ld, dgu.data() + cols, ld);
  DVec numG = numericGrad(g, f), numU = numericGrad(u, f);
  DVec gotG(rows * cols), gotU(rows * cols);
  for (size_t i = 0; i < rows; ++i)
    for (size_t c = 0; c < cols; ++c) {
      gotG[i * cols + c] = dgu[i * ld + c];
      gotU[i * cols + c] = dgu[i * ld + cols + c];
    }
  expectNear(numG, gotG, "dgate");
  expectNear(numU, gotU, "dup");

  FVec gf = toFloat(g), uf = toFloat(u), dg(rows * cols), du(rows * cols);
  swigluGrad(gf.data(), uf.data(), rf.data(), rows * cols, dg.data(),
             du.data());
  expectNear(gotG, toDouble(dg), "dgate, contiguous", 0);
  expectNear(gotU, toDouble(du), "dup, contiguous", 0);
}

class CpuGradExperts : public ::testing::TestWithParam<size_t> {};

TEST_P(CpuGradExperts, MatchesFiniteDifferences) {
  const size_t T = 7, D = 6, I = 5, E = 3, topK = GetParam();
  FVec logits = randomVec(T * E, 91, -2.f, 2.f), scoresF(T * E);
  routerScores(logits.data(), T, E, topK, scoresF.data());
  DVec x = toDouble(randomVec(T * D, 92));
  DVec s = toDouble(scoresF);
  DVec gateUp = toDouble(randomVec(E * D * 2 * I, 93, -0.8f, 0.8f));
  DVec down = toDouble(randomVec(E * I * D, 94, -0.8f, 0.8f));
  DVec r = toDouble(randomVec(T * D, 95));
  FVec xf = toFloat(x), gf = toFloat(gateUp), df = toFloat(down),
       rf = toFloat(r);

  FVec out(T * D);
  expertsForward(xf.data(), scoresF.data(), gf.data(), df.data(), T, D, I, E,
                 out.data());
  expectNear(expertsRef(x, s, gateUp, down, T, D, I, E), toDouble(out),
             "forward", 1e-5);

  FVec dx(T * D), ds(T * E, 9.f), dg(E * D * 2 * I), dd(E * I * D);
  expertsBackward(xf.data(), scoresF.data(), gf.data(), df.data(), T, D, I, E,
                  rf.data(), dx.data(), ds.data(), dg.data(), dd.data());
  auto f = [&] { return dotD(r, expertsRef(x, s, gateUp, down, T, D, I, E)); };
  DVec numX = numericGrad(x, f), numS = numericGrad(s, f),
       numG = numericGrad(gateUp, f), numD = numericGrad(down, f);
  expectNear(numX, toDouble(dx), "dx");
  expectNear(numS, toDouble(ds), "dscores");
  expectNear(numG, toDouble(dg), "dGateUp");
  expectNear(numD, toDouble(dd), "dDown");
  for (size_t i = 0; i < T * E; ++i)
    if (scoresF[i] == 0.f)
      EXPECT_EQ(ds[i], 0.f) << "unselected (t, e) " << i;

  // accumulate: dx, dGateUp and dDown add, dscores is rewritten.
  FVec dx2 = dx, dg2 = dg, dd2 = dd, ds2(T * E, 9.f);
  expertsBackward(xf.data(), scoresF.data(), gf.data(), df.data(), T, D, I, E,
                  rf.data(), dx2.data(), ds2.data(), dg2.data(), dd2.data(),
                  true);
  for (double &g : numX)
    g *= 2;
  for (double &g : numG)
    g *= 2;
  for (double &g : numD)
    g *= 2;
  expectNear(numX, toDouble(dx2), "dx accumulated");
  expectNear(numG, toDouble(dg2), "dGateUp accumulated");
  expectNear(numD, toDouble(dd2), "dDown accumulated");
  expectNear(toDouble(ds), toDouble(ds2), "dscores again", 0);
}

// l4c-split-experts' parts of the backward compute what expertsBackward
// computes, bit for bit (the same per-expert calls in the same order), with
// slot rows zero where a token has fewer experts than slots.
TEST_P(CpuGradExperts, SplitPartsEqualTheFusedBackward) {
  const size_t T = 9, D = 6, I = 5, E = 4, topK = GetParam(), K = topK + 1;
  FVec logits = randomVec(T * E, 191, -2.f, 2.f), s(T * E);
  routerScores(logits.data(), T, E, topK, s.data());
  for (size_t e = 0; e < E; ++e) // a token with no expert at all
    s[4 * E + e] = 0.f;
  FVec x = randomVec(T * D, 192), gateUp = randomVec(E * D * 2 * I, 193),
       down = randomVec(E * I * D, 194), dy = randomVec(T * D, 195);
  FVec dx(T * D), ds(T * E), dg(E * D * 2 * I), dd(E * I * D);
  expertsBackward(x.data(), s.data(), gateUp.data(), down.data(), T, D, I, E,
                  dy.data(), dx.data(), ds.data(), dg.data(), dd.data());

  FVec gu(T * K * 2 * I, 7.f), dgu(T * K * 2 * I, 7.f), dz(T * K * D, 7.f);
  FVec dx2(T * D, 7.f), ds2(T * E, 7.f), dg2(E * D * 2 * I, 7.f),
      dd2(E * I * D, 7.f);
  ASSERT_TRUE(expertsGateUp(x.data(), s.data(), gateUp.data(), T, D, I, E, K,
                            gu.data()));
  ASSERT_TRUE(expertsDownGrad(gu.data(), s.data(), down.data(), dy.data(), T,
                              D, I, E, K, dgu.data()));
  ASSERT_TRUE(expertsDownGradWeight(gu.data(), s.data(), dy.data(), T, D, I,
                                    E, K, dd2.data(), false));
  ASSERT_TRUE(expertsGateUpGradInput(dgu.data(), s.data(), gateUp.data(), T,
                                     D, I, E, K, dz.data()));
  ASSERT_TRUE(expertsCombineGrad(dz.data(), x.data(), s.data(), T, D, E, K,
                                 dx2.data(), ds2.data()));
  ASSERT_TRUE(expertsGateUpGradWeight(x.data(), s.data(), dgu.data(), T, D, I,
                                      E, K, dg2.data(), false));
  EXPECT_EQ(dx, dx2);
  EXPECT_EQ(ds, ds2);
  EXPECT_EQ(dg, dg2);
  EXPECT_EQ(dd, dd2);
  // The token without experts and every token's unused last slot: zeros.
  for (size_t k = 0; k < K; ++k)
    for (size_t c = 0; c < 2 * I; ++c) {
      EXPECT_EQ(gu[(4 * K + k) * 2 * I + c], 0.f);
      EXPECT_EQ(dgu[(4 * K + k) * 2 * I + c], 0.f);
    }
  for (size_t t = 0; t < T; ++t)
    for (size_t c = 0; c < D; ++c)
      EXPECT_EQ(dz[(t * K + K - 1) * D + c], 0.f) << "token " << t;

  // More nonzero scores than slots: refused, as expertsHidden refuses.
  if (topK > 1)
    EXPECT_FALSE(expertsGateUp(x.data(), s.data(), gateUp.data(), T, D, I, E,
                               1, gu.data()));
}

TEST(CpuKernels, RouteTable) {
  // Tokens: 0 -> {1}, 1 -> {0, 2}, 2 -> {}, 3 -> {2}; 2 slots, 3 experts.
  const size_t M = 4, E = 3, K = 2, n = E + 1 + M * K;
  FVec s = {0, .5f, 0, .2f, 0, .7f, 0, 0, 0, 0, 0, .9f};
  std::vector<int32_t> table(n, 99);
  ASSERT_TRUE(expertsRoute(s.data(), M, E, K, table.data(), n));
  // Offsets 0, 1, 2, 4; entries m * K + k: expert 0: (1, 0); expert 1:
  // (0, 0); expert 2: (1, 1), (3, 0); then -1.
  std::vector<int32_t> want = {0, 1, 2, 4, 2, 0, 3, 6, -1, -1, -1, -1};
  EXPECT_EQ(table, want);
  EXPECT_FALSE(expertsRoute(s.data(), M, E, 1, table.data(), E + 1 + M));
}

INSTANTIATE_TEST_SUITE_P(CpuGrad, CpuGradExperts, ::testing::Values(1, 2));

TEST(CpuGrad, Embedding) {
  const size_t V = 9, D = 5, n = 13;
  const int64_t pad = 4;
  std::vector<int64_t> ids = {3, 1, 3, 4, 8, 3, 0, 1, 4, 7, 3, 2, 8};
  FVec dy = randomVec(n * D, 101);
  FVec table(V * D, 0.f);
  embeddingGrad(ids.data(), n, dy.data(), D, table.data(), pad);
  DVec ref(V * D, 0.0);
  for (size_t i = 0; i < n; ++i)
    if (ids[i] != pad)
      for (size_t c = 0; c < D; ++c)
        ref[size_t(ids[i]) * D + c] += dy[i * D + c];
  expectNear(ref, toDouble(table), "dtable", 1e-7);
  for (size_t c = 0; c < D; ++c)
    EXPECT_EQ(table[size_t(pad) * D + c], 0.f);
  // It accumulates: without a padding index every row counts, twice.
  embeddingGrad(ids.data(), n, dy.data(), D, table.data());
  for (size_t i = 0; i < n; ++i)
    for (size_t c = 0; c < D; ++c)
      ref[size_t(ids[i]) * D + c] += dy[i * D + c];
  expectNear(ref, toDouble(table), "dtable accumulated", 1e-7);
}

TEST(CpuGrad, AdamW) {
  const size_t n = 5000; // more than one parallel block
  const double lr = 0.01, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1;
  FVec p = randomVec(n, 111), m(n, 0.f), v(n, 0.f);
  DVec pr = toDouble(p), mr(n, 0.0), vr(n, 0.0);
  for (int64_t step = 1; step <= 3; ++step) {
    FVec g = randomVec(n, 112 + unsigned(step), -1e-3f, 1e-3f);
    g[0] = 0.f;
    if (step == 1) {
      // From zero moments the first update is lr * g / (|g| + eps).
      FVec p1 = p, m1 = m, v1 = v;
      adamwStep(p1.data(), g.data(), m1.data(), v1.data(), n, 1, lr, b1, b2,
                eps, wd);
      for (size_t i = 0; i < n; ++i) {
        double want = double(p[i]) * (1 - lr * wd) -
                      lr * g[i] / (std::fabs(double(g[i])) + eps);
        ASSERT_NEAR(p1[i], want, 1e-7) << i;
      }
    }
    adamwStep(p.data(), g.data(), m.data(), v.data(), n, step, lr, b1, b2, eps,
              wd);
    double bc1 = 1 - std::pow(b1, double(step)),
           bc2 = 1 - std::pow(b2, double(step));
    for (size_t i = 0; i < n; ++i) {
      pr[i] *= 1 - lr * wd;
      mr[i] = b1 * mr[i] + (1 - b1) * g[i];
      vr[i] = b2 * vr[i] + (1 - b2) * double(g[i]) * g[i];
      pr[i] -= (lr / bc1) * mr[i] / (std::sqrt(vr[i]) / std::sqrt(bc2) + eps);
    }
    expectNear(pr, toDouble(p), "param", 1e-6);
    expectNear(mr, toDouble(m), "exp_avg", 1e-6);
    expectNear(vr, toDouble(v), "exp_avg_sq", 1e-6);
  }
}

} // namespace
