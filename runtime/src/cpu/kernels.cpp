//===- kernels.cpp - element-wise, norm, RoPE and MoE kernels ------------===//
//
// The light kernels of the CPU backend. Where Hugging Face rounds through
// fp32 (RoPE frequencies and angles, norms, temperature scale) the same
// roundings are reproduced, so results track the reference closely.
//
//===----------------------------------------------------------------------===//
#include "cpu/kernels.h"
#include "cpu/threadpool.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace l4c::cpu {

namespace {

// Row-parallel loop that stays on the caller for small inputs.
template <typename F> void forRows(size_t rows, size_t rowCost, F &&fn) {
  constexpr size_t kParallelWork = size_t(1) << 16;
  if (rows < 2 || rows * rowCost < kParallelWork) {
    for (size_t r = 0; r < rows; ++r)
      fn(r);
    return;
  }
  ThreadPool &pool = ThreadPool::global();
  size_t tasks = std::min(rows, size_t(4) * pool.size());
  size_t per = (rows + tasks - 1) / tasks;
  pool.parallelFor(tasks, [&](size_t t) {
    size_t r1 = std::min(rows, (t + 1) * per);
    for (size_t r = t * per; r < r1; ++r)
      fn(r);
  });
}

float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

} // namespace

unsigned numThreads() { return ThreadPool::global().size(); }

void embedding(const float *table, size_t D, const int64_t *ids, size_t n,
               float *out) {
  for (size_t i = 0; i < n; ++i)
    std::memcpy(out + i * D, table + size_t(ids[i]) * D, D * sizeof(float));
}

void rmsNorm(const float *x, const float *weight, size_t rows, size_t D,
             float eps, float *out) {
  forRows(rows, D, [&](size_t r) {
    const float *xr = x + r * D;
    float *yr = out + r * D;
    // A double sum keeps the mean of squares exact to f32 for any D; the
    // scale itself is rounded to f32 as in HF's fp32 _norm.
    double ss = 0;
    for (size_t i = 0; i < D; ++i)
      ss += double(xr[i]) * xr[i];
    float var = float(ss / double(D));
    float inv = float(1.0 / std::sqrt(double(var + eps)));
    if (weight) {
      for (size_t i = 0; i < D; ++i)
        yr[i] = (xr[i] * inv) * weight[i];
    } else {
      for (size_t i = 0; i < D; ++i)
        yr[i] = xr[i] * inv;
    }
  });
}

bool ropeInvFreq(double theta, size_t headDim, std::string_view ropeType,
                 double factor, double lowFreqFactor, double highFreqFactor,
                 double originalMaxPos, float *invFreq) {
  bool llama3 = ropeType == "llama3";
  if (!llama3 && ropeType != "default")
    return false;
  size_t half = headDim / 2;
  // HF: 1.0 / (base ** (arange(0, d, 2).float() / d)), all fp32 tensor math;
  // pow is evaluated in double and rounded, i.e. correctly rounded powf.
  for (size_t j = 0; j < half; ++j) {
    float e = float(2 * j) / float(headDim);
    float p = float(std::pow(double(float(theta)), double(e)));
    invFreq[j] = 1.0f / p;
  }
  if (!llama3)
    return true;
  // _compute_llama3_parameters with Python scalars promoted to fp32, the way
  // torch evaluates tensor-scalar ops (2*pi / t is reciprocal(t) * 2*pi).
  const float f = float(factor), lf = float(lowFreqFactor),
              hf = float(highFreqFactor);
  const float n = float(originalMaxPos);
  const float lowWl = float(originalMaxPos / lowFreqFactor);
  const float highWl = float(originalMaxPos / highFreqFactor);
  const float twoPi = float(6.283185307179586); // fp32(2 * math.pi)
  for (size_t j = 0; j < half; ++j) {
    float inv = invFreq[j];
    float wl = (1.0f / inv) * twoPi;
    float base = wl > lowWl ? inv / f : inv;
    bool medium = !(wl < highWl) && !(wl > lowWl);
    // Only evaluated inside the band: with lf == hf the division is by zero,
    // and the band is empty unless wl hits the edge exactly.
    if (medium) {
      float s = ((1.0f / wl) * n - lf) / (hf - lf);
      base = (1.0f - s) * base / f + s * base;
    }
    invFreq[j] = base;
  }
  return true;
}

void rope(float *x, size_t ldx, size_t tokens, size_t heads, size_t d,
          const int64_t *pos, const float *invFreq) {
  size_t half = d / 2;
  forRows(tokens, heads * d * 4, [&](size_t t) {
    std::vector<float> cs(2 * half);
    float p = float(pos[t]);
    for (size_t j = 0; j < half; ++j) {
      // fp32 angle as HF; cos/sin correctly rounded from it.
      float angle = invFreq[j] * p;
      cs[2 * j] = float(std::cos(double(angle)));
      cs[2 * j + 1] = float(std::sin(double(angle)));
    }
    float *row = x + t * ldx;
    for (size_t h = 0; h < heads; ++h) {
      float *v = row + h * d;
      for (size_t j = 0; j < half; ++j) {
        float a = v[2 * j], b = v[2 * j + 1], c = cs[2 * j], s = cs[2 * j + 1];
        v[2 * j] = a * c - b * s;
        v[2 * j + 1] = a * s + b * c;
      }
    }
  });
}

void temperatureScale(float *q, size_t ldq, size_t tokens, size_t width,
                      const int64_t *pos, float floorScale, float attnScale) {
  for (size_t t = 0; t < tokens; ++t) {
    float fl = std::floor((float(pos[t]) + 1.0f) / floorScale);
    float scale = float(std::log1p(double(fl))) * attnScale + 1.0f;
    float *row = q + t * ldq;
    for (size_t i = 0; i < width; ++i)
      row[i] *= scale;
  }
}

void routerScores(const float *logits, size_t T, size_t E, size_t topK,
                  float *scores) {
  topK = std::min(topK, E);
  std::vector<char> taken(E);
  for (size_t t = 0; t < T; ++t) {
    const float *l = logits + t * E;
    float *s = scores + t * E;
    std::fill(s, s + E, 0.f);
    std::fill(taken.begin(), taken.end(), 0);
    for (size_t k = 0; k < topK; ++k) {
      size_t best = E;
      for (size_t e = 0; e < E; ++e) {
        if (taken[e])
          continue;
        // Strict comparison keeps the lowest index among equal logits; a NaN
        // ranks highest, as in torch.topk.
        if (best == E || l[e] > l[best] ||
            (std::isnan(l[e]) && !std::isnan(l[best])))
          best = e;
      }
      taken[best] = 1;
      s[best] = sigmoid(l[best]);
    }
  }
}

void swiglu(const float *gate, size_t ldg, const float *up, size_t ldu,
            size_t rows, size_t cols, float *out, size_t ldo) {
  forRows(rows, cols * 8, [&](size_t r) {
    const float *g = gate + r * ldg;
    const float *u = up + r * ldu;
    float *o = out + r * ldo;
    for (size_t i = 0; i < cols; ++i) {
      float gv = g[i];
      o[i] = u[i] * (gv / (1.f + std::exp(-gv)));
    }
  });
}

namespace {

/// The tokens whose score for expert e is nonzero, in order.
void expertTokens(const float *scores, size_t T, size_t E, size_t e,
                  std::vector<size_t> &tokens) {
  tokens.clear();
  for (size_t t = 0; t < T; ++t)
    if (scores[t * E + e] != 0.f)
      tokens.push_back(t);
}

/// Expert e's SwiGLU activations of `tokens`, in gu's rows (the first I of
/// each 2I): swiglu((x * score) @ gateUp[e]).
void expertActivations(const float *x, const float *scores,
                       const float *gateUp, const std::vector<size_t> &tokens,
                       size_t e, size_t D, size_t I, size_t E,
                       std::vector<float> &z, std::vector<float> &gu) {
  size_t n = tokens.size();
  // The score scales the expert's input (not its output), as in HF.
  z.resize(n * D);
  for (size_t i = 0; i < n; ++i) {
    const float *xr = x + tokens[i] * D;
    float s = scores[tokens[i] * E + e];
    for (size_t c = 0; c < D; ++c)
      z[i * D + c] = xr[c] * s;
  }
  gu.resize(n * 2 * I);
  matmul(z.data(), D, gateUp + e * D * 2 * I, 2 * I, gu.data(), 2 * I, n,
         2 * I, D);
  // h overwrites the gate half in place; row stride stays 2I.
  swiglu(gu.data(), 2 * I, gu.data() + I, 2 * I, n, I, gu.data(), 2 * I);
}

/// The slot of expert e in token t's row of scores: how many experts before
/// it have a nonzero score.
size_t slotOf(const float *row, size_t e) {
  size_t k = 0;
  for (size_t j = 0; j < e; ++j)
    k += row[j] != 0.f;
  return k;
}

/// expertTokens, failing when a token's slot for e would be K or more.
bool slottedTokens(const float *scores, size_t T, size_t E, size_t e,
                   size_t K, std::vector<size_t> &tokens) {
  expertTokens(scores, T, E, e, tokens);
  for (size_t t : tokens)
    if (slotOf(scores + t * E, e) >= K)
      return false;
  return true;
}

} // namespace

void expertsForward(const float *x, const float *scores, const float *gateUp,
                    const float *down, size_t T, size_t D, size_t I, size_t E,
                    float *out, bool accumulate) {
  if (!accumulate)
    std::fill(out, out + T * D, 0.f);
  std::vector<size_t> tokens;
  std::vector<float> z, gu, y;
  for (size_t e = 0; e < E; ++e) {
    expertTokens(scores, T, E, e, tokens);
    size_t n = tokens.size();
    if (n == 0)
      continue;
    expertActivations(x, scores, gateUp, tokens, e, D, I, E, z, gu);
    y.resize(n * D);
    matmul(gu.data(), 2 * I, down + e * I * D, D, y.data(), D, n, D, I);
    for (size_t i = 0; i < n; ++i)
      add(out + tokens[i] * D, y.data() + i * D, D, out + tokens[i] * D);
  }
}

bool expertSlots(const float *scores, size_t T, size_t E, size_t e, size_t K,
                 std::vector<size_t> &tokens, std::vector<size_t> &slots) {
  if (!slottedTokens(scores, T, E, e, K, tokens))
    return false;
  slots.resize(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i)
    slots[i] = slotOf(scores + tokens[i] * E, e);
  return true;
}

bool expertsRoute(const float *scores, size_t M, size_t E, size_t K,
                  int32_t *table, size_t n) {
  std::fill(table, table + n, -1);
  std::vector<std::vector<int32_t>> lists(E);
  for (size_t m = 0; m < M; ++m) {
    size_t k = 0;
    for (size_t e = 0; e < E; ++e) {
      if (scores[m * E + e] == 0.f)
        continue;
      if (k == K)
        return false;
      lists[e].push_back(int32_t(m * K + k++));
    }
  }
  size_t at = E + 1;
  for (size_t e = 0; e < E; ++e) {
    table[e] = int32_t(at - (E + 1));
    std::copy(lists[e].begin(), lists[e].end(), table + at);
    at += lists[e].size();
  }
  table[E] = int32_t(at - (E + 1));
  return true;
}

bool expertsHidden(const float *x, const float *scores, const float *gateUp,
                   size_t T, size_t D, size_t I, size_t E, size_t K,
                   float *h) {
  std::fill(h, h + T * K * I, 0.f);
  std::vector<float> z, gu;
  return forEachExpert(
      scores, T, E, K,
      [&](size_t e, const std::vector<size_t> &tokens,
          const std::vector<size_t> &slots) {
        expertActivations(x, scores, gateUp, tokens, e, D, I, E, z, gu);
        for (size_t i = 0; i < tokens.size(); ++i)
          std::copy(gu.data() + i * 2 * I, gu.data() + i * 2 * I + I,
                    h + (tokens[i] * K + slots[i]) * I);
      });
}

bool expertsDown(const float *h, const float *scores, const float *down,
                 size_t T, size_t D, size_t I, size_t E, size_t K,
                 float *out) {
  std::fill(out, out + T * D, 0.f);
  std::vector<float> hs, y;
  return forEachExpert(
      scores, T, E, K,
      [&](size_t e, const std::vector<size_t> &tokens,
          const std::vector<size_t> &slots) {
        size_t n = tokens.size();
        hs.resize(n * I);
        for (size_t i = 0; i < n; ++i)
          std::copy(h + (tokens[i] * K + slots[i]) * I,
                    h + (tokens[i] * K + slots[i] + 1) * I, hs.data() + i * I);
        y.resize(n * D);
        matmul(hs.data(), I, down + e * I * D, D, y.data(), D, n, D, I);
        // Experts in increasing order, as expertsForward sums them.
        for (size_t i = 0; i < n; ++i)
          add(out + tokens[i] * D, y.data() + i * D, D, out + tokens[i] * D);
      });
}

void add(const float *a, const float *b, size_t n, float *out) {
  for (size_t i = 0; i < n; ++i)
    out[i] = a[i] + b[i];
}

void argmaxRows(const float *logits, size_t rows, size_t V, int64_t *out) {
  for (size_t r = 0; r < rows; ++r) {
    const float *l = logits + r * V;
    size_t best = 0;
    for (size_t i = 1; i < V; ++i) {
      if (std::isnan(l[best]))
        break;
      if (l[i] > l[best] || std::isnan(l[i]))
        best = i;
    }
    out[r] = int64_t(best);
  }
}

} // namespace l4c::cpu
