//===- cpu_kernels_test.cpp - CPU backend kernels vs double references ---===//
//
// Each kernel against a naive double-precision reference on random inputs,
// with sizes that straddle the GEMM's register and cache blocks, strided
// operands, and the masking / tie-breaking corner cases HF defines.
//
//===----------------------------------------------------------------------===//
#include "cpu/kernels.h"
#include "cpu/threadpool.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

using namespace l4c::cpu;

namespace {

std::vector<float> randomVec(size_t n, unsigned seed, float lo = -1.f,
                             float hi = 1.f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float &x : v)
    x = dist(gen);
  return v;
}

struct GemmCase {
  size_t M, N, K;
};

// Sizes around MR=6, NR=16, KC=256, MC=96, the 4096-column block and the
// few-row path (M <= 4).
const GemmCase kGemmCases[] = {
    {1, 1, 1},    {1, 37, 19},    {2, 64, 300},  {4, 33, 8},    {5, 17, 5},
    {6, 16, 256}, {7, 33, 257},   {13, 50, 100}, {97, 70, 513}, {100, 300, 260},
    {193, 41, 3}, {31, 129, 600}, {7, 4100, 20}, {3, 1100, 300}};

// Checks y against a double reference with a bound that scales with the
// magnitude of the products summed (f32 accumulation over K terms).
void checkGemm(bool transposedW, const GemmCase &c, bool accumulate,
               size_t pad) {
  size_t ldx = c.K + pad, ldy = c.N + 2 * pad;
  size_t ldw = (transposedW ? c.K : c.N) + pad;
  size_t wRows = transposedW ? c.N : c.K;
  std::vector<float> x = randomVec(c.M * ldx, 1 + unsigned(c.M));
  std::vector<float> w = randomVec(wRows * ldw, 2 + unsigned(c.N));
  std::vector<float> y = randomVec(c.M * ldy, 3 + unsigned(c.K));
  std::vector<float> y0 = y;
  if (transposedW)
    linear(x.data(), ldx, w.data(), ldw, y.data(), ldy, c.M, c.N, c.K,
           accumulate);
  else
    matmul(x.data(), ldx, w.data(), ldw, y.data(), ldy, c.M, c.N, c.K,
           accumulate);
  for (size_t m = 0; m < c.M; ++m) {
    for (size_t n = 0; n < ldy; ++n) {
      if (n >= c.N) {
        ASSERT_EQ(y[m * ldy + n], y0[m * ldy + n])
            << "wrote past N at " << m << "," << n;
        continue;
      }
      double ref = accumulate ? y0[m * ldy + n] : 0.0, mag = std::fabs(ref);
      for (size_t k = 0; k < c.K; ++k) {
        double wv = transposedW ? w[n * ldw + k] : w[k * ldw + n];
        ref += double(x[m * ldx + k]) * wv;
        mag += std::fabs(double(x[m * ldx + k]) * wv);
      }
      double tol = (double(c.K) + 2) * 1.2e-7 * mag + 1e-30;
      ASSERT_NEAR(y[m * ldy + n], ref, tol)
          << (transposedW ? "linear" : "matmul") << " M=" << c.M << " N=" << c.N
          << " K=" << c.K << " at " << m << "," << n;
    }
  }
}

TEST(CpuKernels, LinearMatchesReference) {
  for (const GemmCase &c : kGemmCases)
    for (bool acc : {false, true})
      for (size_t pad : {size_t(0), size_t(3)})
        checkGemm(true, c, acc, pad);
}

TEST(CpuKernels, MatmulMatchesReference) {
  for (const GemmCase &c : kGemmCases)
    for (bool acc : {false, true})
      for (size_t pad : {size_t(0), size_t(5)})
        checkGemm(false, c, acc, pad);
}

TEST(CpuKernels, GemmEmptyDepth) {
  std::vector<float> y(6, 7.f), x(1), w(1);
  linear(x.data(), 0, w.data(), 0, y.data(), 3, 2, 3, 0, true);
  EXPECT_EQ(y[0], 7.f);
  linear(x.data(), 0, w.data(), 0, y.data(), 3, 2, 3, 0, false);
  for (float v : y)
    EXPECT_EQ(v, 0.f);
}

TEST(CpuKernels, GemmIsDeterministic) {
  size_t M = 150, N = 200, K = 700;
  std::vector<float> x = randomVec(M * K, 11), w = randomVec(N * K, 12);
  std::vector<float> a(M * N), b(M * N);
  linear(x.data(), K, w.data(), K, a.data(), N, M, N, K);
  linear(x.data(), K, w.data(), K, b.data(), N, M, N, K);
  EXPECT_EQ(a, b);
}

// Not a pass/fail check: reports the GEMM rate so regressions are visible.
TEST(CpuKernels, GemmThroughput) {
  for (size_t n : {size_t(256), size_t(512)}) {
    std::vector<float> x = randomVec(n * n, 21), w = randomVec(n * n, 22),
                       y(n * n);
    for (bool transposed : {true, false}) {
      auto run = [&] {
        if (transposed)
          linear(x.data(), n, w.data(), n, y.data(), n, n, n, n);
        else
          matmul(x.data(), n, w.data(), n, y.data(), n, n, n, n);
      };
      run();
      int reps = 0;
      auto t0 = std::chrono::steady_clock::now();
      double secs = 0;
      do {
        run();
        ++reps;
        secs =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
                .count();
      } while (secs < 0.3);
      double gflops = 2.0 * double(n) * n * n * reps / secs * 1e-9;
      std::printf("[ gemm     ] %s %zux%zux%zu: %.2f GFLOP/s on %u threads\n",
                  transposed ? "linear" : "matmul", n, n, n, gflops,
                  numThreads());
    }
  }
}

TEST(CpuKernels, ThreadPoolRunsEveryTaskOnce) {
  ThreadPool pool(3);
  EXPECT_EQ(pool.size(), 3u);
  for (size_t n : {size_t(0), size_t(1), size_t(2), size_t(1000)}) {
    std::vector<std::atomic<int>> hits(n);
    pool.parallelFor(n, [&](size_t i) {
      // Nested calls run inline on the calling task.
      pool.parallelFor(2, [&](size_t j) {
        if (j == 0)
          hits[i].fetch_add(1);
      });
    });
    for (size_t i = 0; i < n; ++i)
      EXPECT_EQ(hits[i].load(), 1) << i;
  }
}

TEST(CpuKernels, Embedding) {
  size_t V = 7, D = 5;
  std::vector<float> table = randomVec(V * D, 31);
  std::vector<int64_t> ids = {3, 0, 6, 3};
  std::vector<float> out(ids.size() * D);
  embedding(table.data(), D, ids.data(), ids.size(), out.data());
  for (size_t i = 0; i < ids.size(); ++i)
    for (size_t c = 0; c < D; ++c)
      EXPECT_EQ(out[i * D + c], table[size_t(ids[i]) * D + c]);
}

TEST(CpuKernels, RmsNorm) {
  size_t rows = 9, D = 37;
  float eps = 1e-5f;
  std::vector<float> x = randomVec(rows * D, 41, -3.f, 3.f),
                     w = randomVec(D, 42);
  for (bool weighted : {true, false}) {
    std::vector<float> out(rows * D), inPlace = x;
    const float *wp = weighted ? w.data() : nullptr;
    rmsNorm(x.data(), wp, rows, D, eps, out.data());
    rmsNorm(inPlace.data(), wp, rows, D, eps, inPlace.data());
    EXPECT_EQ(out, inPlace);
    for (size_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (size_t c = 0; c < D; ++c)
        ss += double(x[r * D + c]) * x[r * D + c];
      double inv = 1.0 / std::sqrt(ss / double(D) + eps);
      for (size_t c = 0; c < D; ++c) {
        double ref = x[r * D + c] * inv * (weighted ? w[c] : 1.0);
        EXPECT_NEAR(out[r * D + c], ref, 1e-6 * (1 + std::fabs(ref)));
      }
    }
  }
}

TEST(CpuKernels, RopeInvFreqDefault) {
  std::vector<float> f(64);
  ASSERT_TRUE(ropeInvFreq(500000.0, 128, "default", 0, 0, 0, 0, f.data()));
  for (size_t j = 0; j < 64; ++j) {
    double ref = 1.0 / std::pow(500000.0, double(2 * j) / 128.0);
    EXPECT_NEAR(f[j], ref, 2e-7 * ref) << j;
  }
  EXPECT_FALSE(ropeInvFreq(500000.0, 128, "yarn", 0, 0, 0, 0, f.data()));
}

// Scout: low == high == 1 is a hard step at wavelength 8192 (spec 2.4).
TEST(CpuKernels, RopeInvFreqLlama3HardStep) {
  std::vector<float> base(64), f(64);
  ropeInvFreq(500000.0, 128, "default", 0, 0, 0, 0, base.data());
  ASSERT_TRUE(
      ropeInvFreq(500000.0, 128, "llama3", 16.0, 1.0, 1.0, 8192.0, f.data()));
  for (size_t j = 0; j < 64; ++j) {
    ASSERT_TRUE(std::isfinite(f[j])) << j;
    if (j < 35)
      EXPECT_EQ(f[j], base[j]) << j;
    else
      EXPECT_EQ(f[j], base[j] / 16.f) << j;
  }
}

TEST(CpuKernels, RopeInvFreqLlama3Smooth) {
  double N = 8192, fac = 8, lf = 1, hf = 4;
  std::vector<float> base(64), f(64);
  ropeInvFreq(500000.0, 128, "default", 0, 0, 0, 0, base.data());
  ASSERT_TRUE(ropeInvFreq(500000.0, 128, "llama3", fac, lf, hf, N, f.data()));
  size_t smoothed = 0;
  for (size_t j = 0; j < 64; ++j) {
    double inv = base[j], wl = 2 * 3.141592653589793 / inv, ref;
    if (wl < N / hf) {
      ref = inv;
    } else if (wl > N / lf) {
      ref = inv / fac;
    } else {
      double s = (N / wl - lf) / (hf - lf);
      ref = (1 - s) * inv / fac + s * inv;
      ++smoothed;
    }
    EXPECT_NEAR(f[j], ref, 1e-6 * ref) << j;
  }
  EXPECT_EQ(smoothed, 6u); // j = 29..34 (spec 2.4)
}

TEST(CpuKernels, Rope) {
  size_t T = 5, H = 3, d = 10, ld = H * d + 4;
  std::vector<float> inv(d / 2);
  ropeInvFreq(10000.0, d, "default", 0, 0, 0, 0, inv.data());
  std::vector<int64_t> pos = {0, 1, 7, 1000, 123456};
  std::vector<float> x = randomVec(T * ld, 51), y = x;
  rope(y.data(), ld, T, H, d, pos.data(), inv.data());
  for (size_t t = 0; t < T; ++t) {
    for (size_t h = 0; h < H; ++h) {
      for (size_t j = 0; j < d / 2; ++j) {
        double angle = float(inv[j] * float(pos[t]));
        double a = x[t * ld + h * d + 2 * j], b = x[t * ld + h * d + 2 * j + 1];
        EXPECT_NEAR(y[t * ld + h * d + 2 * j],
                    a * std::cos(angle) - b * std::sin(angle), 1e-6);
        EXPECT_NEAR(y[t * ld + h * d + 2 * j + 1],
                    a * std::sin(angle) + b * std::cos(angle), 1e-6);
      }
    }
    for (size_t c = H * d; c < ld; ++c)
      EXPECT_EQ(y[t * ld + c], x[t * ld + c]);
  }
}

TEST(CpuKernels, TemperatureScaleMatchesSpecTable) {
  std::vector<int64_t> pos = {0, 8190, 8191, 16383, 65535, 1048575};
  std::vector<double> want = {1.0, 1.0, 1.0693, 1.1099, 1.2197, 1.4860};
  std::vector<float> q(pos.size() * 3, 1.f);
  temperatureScale(q.data(), 3, pos.size(), 2, pos.data(), 8192.f, 0.1f);
  for (size_t t = 0; t < pos.size(); ++t) {
    EXPECT_NEAR(q[t * 3], want[t], 5e-5) << pos[t];
    EXPECT_EQ(q[t * 3], q[t * 3 + 1]);
    EXPECT_EQ(q[t * 3 + 2], 1.f); // outside width
  }
}

// Double reference with an explicit mask.
void referenceAttention(const std::vector<float> &q, size_t ldq,
                        const std::vector<int64_t> &qpos,
                        const std::vector<float> &k,
                        const std::vector<float> &v, size_t ldkv, size_t kvLen,
                        size_t H, size_t Hkv, size_t d, int64_t chunk,
                        double scale, std::vector<double> &out) {
  size_t Tq = qpos.size();
  out.assign(Tq * H * d, 0.0);
  for (size_t t = 0; t < Tq; ++t) {
    for (size_t h = 0; h < H; ++h) {
      size_t kvh = h / (H / Hkv);
      std::vector<double> s(kvLen, -INFINITY);
      double mx = -INFINITY;
      for (size_t j = 0; j < kvLen; ++j) {
        int64_t kj = int64_t(j);
        if (kj > qpos[t] || (chunk > 0 && kj / chunk != qpos[t] / chunk))
          continue;
        double acc = 0;
        for (size_t c = 0; c < d; ++c)
          acc += double(q[t * ldq + h * d + c]) * k[j * ldkv + kvh * d + c];
        s[j] = acc * scale;
        mx = std::max(mx, s[j]);
      }
      double sum = 0;
      for (size_t j = 0; j < kvLen; ++j)
        sum += s[j] == -INFINITY ? 0 : std::exp(s[j] - mx);
      for (size_t j = 0; j < kvLen; ++j) {
        if (s[j] == -INFINITY)
          continue;
        double p = std::exp(s[j] - mx) / sum;
        for (size_t c = 0; c < d; ++c)
          out[(t * H + h) * d + c] += p * v[j * ldkv + kvh * d + c];
      }
    }
  }
}

TEST(CpuKernels, AttentionPrefillAndDecode) {
  size_t H = 6, Hkv = 2, d = 20, maxSeq = 40;
  size_t ldkv = Hkv * d + 3; // padded cache rows
  for (int64_t chunk : {int64_t(0), int64_t(5), int64_t(8)}) {
    // Cache slots past kvLen hold NaN: reading one would poison the output.
    std::vector<float> k = randomVec(maxSeq * ldkv, 61, -2.f, 2.f);
    std::vector<float> v = randomVec(maxSeq * ldkv, 62);
    size_t kvLen = 23;
    for (size_t j = kvLen; j < maxSeq; ++j)
      for (size_t c = 0; c < ldkv; ++c)
        k[j * ldkv + c] = v[j * ldkv + c] =
            std::numeric_limits<float>::quiet_NaN();
    struct Case {
      std::vector<int64_t> qpos;
    };
    std::vector<int64_t> prefill(kvLen);
    for (size_t i = 0; i < kvLen; ++i)
      prefill[i] = int64_t(i);
    for (const std::vector<int64_t> &qpos :
         {prefill, std::vector<int64_t>{22},
          std::vector<int64_t>{20, 21, 22}}) {
      size_t Tq = qpos.size(), ldq = H * d + 1, ldo = H * d + 2;
      std::vector<float> q = randomVec(Tq * ldq, 63, -2.f, 2.f);
      std::vector<float> out(Tq * ldo, -7.f);
      float scale = 1.f / std::sqrt(float(d));
      attention(q.data(), ldq, qpos.data(), Tq, k.data(), ldkv, v.data(), ldkv,
                kvLen, H, Hkv, d, chunk, scale, out.data(), ldo);
      std::vector<double> ref;
      referenceAttention(q, ldq, qpos, k, v, ldkv, kvLen, H, Hkv, d, chunk,
                         scale, ref);
      for (size_t t = 0; t < Tq; ++t) {
        for (size_t i = 0; i < H * d; ++i)
          ASSERT_NEAR(out[t * ldo + i], ref[t * H * d + i], 2e-6)
              << "chunk " << chunk << " row " << t << " elem " << i;
        EXPECT_EQ(out[t * ldo + H * d], -7.f);
      }
    }
  }
}

TEST(CpuKernels, RouterScoresTopKAndTies) {
  size_t E = 5;
  std::vector<float> logits = {
      0.5f, 2.f,  2.f,  -1.f,  0.f, // tie: lower index wins
      -3.f, -2.f, -4.f, -2.5f, -9.f, 1.f, 1.f, 1.f, 1.f, 1.f};
  std::vector<float> s(logits.size());
  routerScores(logits.data(), 3, E, 1, s.data());
  auto sig = [](double x) { return 1.0 / (1.0 + std::exp(-x)); };
  std::vector<double> want1 = {0, sig(2), 0,      0, 0, 0, sig(-2), 0,
                               0, 0,      sig(1), 0, 0, 0, 0};
  for (size_t i = 0; i < s.size(); ++i)
    EXPECT_NEAR(s[i], want1[i], 1e-7) << i;
  routerScores(logits.data(), 3, E, 2, s.data());
  std::vector<double> want2 = {0,      sig(2),  sig(2), 0,         0,
                               0,      sig(-2), 0,      sig(-2.5), 0,
                               sig(1), sig(1),  0,      0,         0};
  for (size_t i = 0; i < s.size(); ++i)
    EXPECT_NEAR(s[i], want2[i], 1e-7) << i;
}

TEST(CpuKernels, SwigluStrided) {
  size_t rows = 4, I = 13;
  std::vector<float> gu = randomVec(rows * 2 * I, 71, -12.f, 12.f);
  std::vector<float> out(rows * I);
  swiglu(gu.data(), 2 * I, gu.data() + I, 2 * I, rows, I, out.data(), I);
  for (size_t r = 0; r < rows; ++r)
    for (size_t i = 0; i < I; ++i) {
      double g = gu[r * 2 * I + i], u = gu[r * 2 * I + I + i];
      double ref = u * g / (1 + std::exp(-g));
      EXPECT_NEAR(out[r * I + i], ref, 1e-6 * (1 + std::fabs(ref)));
    }
  // In place over the gate half, as expertsForward uses it.
  std::vector<float> inPlace = gu;
  swiglu(inPlace.data(), 2 * I, inPlace.data() + I, 2 * I, rows, I,
         inPlace.data(), 2 * I);
  for (size_t r = 0; r < rows; ++r)
    for (size_t i = 0; i < I; ++i)
      EXPECT_EQ(inPlace[r * 2 * I + i], out[r * I + i]);
}

// HF's dense formulation: every expert sees every token, scaled by its score.
TEST(CpuKernels, ExpertsMatchDenseReference) {
  size_t T = 11, D = 24, I = 20, E = 5;
  std::vector<float> x = randomVec(T * D, 81);
  std::vector<float> gateUp = randomVec(E * D * 2 * I, 82, -0.5f, 0.5f);
  std::vector<float> down = randomVec(E * I * D, 83, -0.5f, 0.5f);
  std::vector<float> logits = randomVec(T * E, 84, -3.f, 3.f);
  for (size_t topK : {size_t(1), size_t(2)}) {
    std::vector<float> scores(T * E);
    routerScores(logits.data(), T, E, topK, scores.data());
    std::vector<double> ref(T * D, 0.0);
    for (size_t e = 0; e < E; ++e)
      for (size_t t = 0; t < T; ++t) {
        std::vector<double> z(D), h(I);
        for (size_t c = 0; c < D; ++c)
          z[c] = double(x[t * D + c]) * scores[t * E + e];
        for (size_t i = 0; i < I; ++i) {
          double g = 0, u = 0;
          for (size_t c = 0; c < D; ++c) {
            g += z[c] * gateUp[(e * D + c) * 2 * I + i];
            u += z[c] * gateUp[(e * D + c) * 2 * I + I + i];
          }
          h[i] = u * g / (1 + std::exp(-g));
        }
        for (size_t c = 0; c < D; ++c)
          for (size_t i = 0; i < I; ++i)
            ref[t * D + c] += h[i] * down[(e * I + i) * D + c];
      }
    std::vector<float> out(T * D);
    expertsForward(x.data(), scores.data(), gateUp.data(), down.data(), T, D, I,
                   E, out.data());
    for (size_t i = 0; i < T * D; ++i)
      ASSERT_NEAR(out[i], ref[i], 1e-5) << "topK " << topK << " at " << i;
    std::vector<float> acc(T * D, 1.f);
    expertsForward(x.data(), scores.data(), gateUp.data(), down.data(), T, D, I,
                   E, acc.data(), true);
    for (size_t i = 0; i < T * D; ++i)
      ASSERT_NEAR(acc[i], ref[i] + 1.0, 1e-5) << i;
  }
}

TEST(CpuKernels, AddAndArgmax) {
  std::vector<float> a = {1, 2, 3}, b = {0.5f, -2, 4}, c(3);
  add(a.data(), b.data(), 3, c.data());
  EXPECT_EQ(c, (std::vector<float>{1.5f, 0, 7}));
  float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> logits = {1, 5, 5, 2, -1, -1, -1, -1, 3, nan, 9, nan};
  std::vector<int64_t> ids(3);
  argmaxRows(logits.data(), 3, 4, ids.data());
  EXPECT_EQ(ids, (std::vector<int64_t>{1, 0, 1}));
}

} // namespace
