//===- attention.cpp - causal / chunked GQA attention on the CPU ---------===//
//
// Exact (non-flash) softmax attention over a KV range with row strides, so
// the same kernel serves prefill from fresh k/v and decode from a KV cache.
// The mask is not materialised: each query reads only its allowed key range.
//
//===----------------------------------------------------------------------===//
#include "cpu/kernels.h"
#include "cpu/simd.h"
#include "cpu/threadpool.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace l4c::cpu {

namespace {

// One (query row, head): softmax(q k^T * scale) v over keys lo..hi.
template <bool>
L4C_INLINE void attendOneImpl(const float *q, const float *k, size_t ldk,
                              const float *v, size_t ldv, size_t lo, size_t hi,
                              size_t d, float scale, float *scores,
                              float *out) {
  float mx = -INFINITY;
  for (size_t j = lo; j <= hi; ++j) {
    float s = dot(q, k + j * ldk, d) * scale;
    scores[j - lo] = s;
    mx = std::max(mx, s);
  }
  std::fill(out, out + d, 0.f);
  float sum = 0.f;
  for (size_t j = lo; j <= hi; ++j) {
    // exp(-inf - -inf) would be NaN; a row of -inf scores contributes nothing.
    float p = mx == -INFINITY ? 0.f : std::exp(scores[j - lo] - mx);
    sum += p;
    axpy(p, v + j * ldv, out, d);
  }
  float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (size_t i = 0; i < d; ++i)
    out[i] *= inv;
}

L4C_DISPATCH(attendOne,
             (const float *q, const float *k, size_t ldk, const float *v,
              size_t ldv, size_t lo, size_t hi, size_t d, float scale,
              float *scores, float *out),
             (q, k, ldk, v, ldv, lo, hi, d, scale, scores, out))

} // namespace

void attention(const float *q, size_t ldq, const int64_t *qpos, size_t Tq,
               const float *k, size_t ldk, const float *v, size_t ldv,
               size_t kvLen, size_t H, size_t Hkv, size_t d, int64_t chunk,
               float scale, float *out, size_t ldo) {
  size_t group = Hkv ? H / Hkv : 1;
  auto body = [&](size_t task) {
    size_t t = task / H, h = task % H;
    float *o = out + t * ldo + h * d;
    int64_t p = qpos[t];
    if (p < 0 || kvLen == 0) {
      std::fill(o, o + d, 0.f);
      return;
    }
    size_t hi = std::min(size_t(p), kvLen - 1);
    size_t lo = chunk > 0 ? size_t(p / chunk * chunk) : 0;
    if (lo > hi) {
      std::fill(o, o + d, 0.f);
      return;
    }
    static thread_local std::vector<float> scores;
    if (scores.size() < hi - lo + 1)
      scores.resize(hi - lo + 1);
    size_t kvh = h / group;
    attendOne(q + t * ldq + h * d, k + kvh * d, ldk, v + kvh * d, ldv, lo, hi,
              d, scale, scores.data(), o);
  };
  size_t tasks = Tq * H;
  // Rough work estimate: every query row sees at most kvLen keys.
  if (tasks < 2 ||
      tasks * std::min<size_t>(kvLen, 4096) * d < (size_t(1) << 16)) {
    for (size_t i = 0; i < tasks; ++i)
      body(i);
    return;
  }
  ThreadPool::global().parallelFor(tasks, body);
}

} // namespace l4c::cpu
