//===- ops.cpp - semantic op dispatch of the CPU backend -----------------===//
//
// Maps each verified semantic op onto the cpu:: kernels over the live part
// of its buffers: batch entries [0, B) and, for buffers with a seq dim, rows
// [0, T). Shapes were checked at load; only data-dependent indices are
// checked here. Parameter-shaped gradients have no run-time extent and the
// arena is reused, so every op that produces one overwrites all of it.
//
//===----------------------------------------------------------------------===//
#include "cpu/grad_kernels.h"
#include "cpu/kernels.h"
#include "executor.h"
#include "io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <unordered_map>
#include <vector>

namespace l4c::rt {

namespace {

class OpRunner {
public:
  OpRunner(const Plan &plan, uint8_t *const regions[4],
           const KernelDesc &kernel, const OpDesc &op, size_t B, size_t T)
      : plan(plan), regions(regions), kernel(kernel), op(op), B(B), T(T) {}

  Status run();

private:
  const BufferDesc &buf(uint32_t i) const { return plan.buffers[i]; }
  const BufferDesc &in(size_t i) const { return buf(op.operands[i]); }
  const BufferDesc &out(size_t i = 0) const { return buf(op.results[i]); }
  float *f32(const BufferDesc &b) const {
    if (shadow)
      if (auto it = shadow->find(&b); it != shadow->end())
        return it->second;
    return reinterpret_cast<float *>(regions[int(b.region)] + b.offset);
  }
  float *f32(const BufferDesc &b, size_t batch) const {
    return f32(b) + batch * b.batchStride;
  }
  /// The live elements of batch entry `batch` of an index buffer, as int64.
  const int64_t *indices(const BufferDesc &b, size_t batch,
                         std::vector<int64_t> &scratch) const {
    uint8_t *base = regions[int(b.region)] + b.offset;
    size_t n = b.activeElems(T);
    if (b.dtype == plan::DType::I64)
      return reinterpret_cast<const int64_t *>(base) + batch * b.batchStride;
    const int32_t *src =
        reinterpret_cast<const int32_t *>(base) + batch * b.batchStride;
    scratch.assign(src, src + n);
    return scratch.data();
  }
  /// Every element of the first B batch entries of an index buffer, as
  /// int64 (the loss kernels index them with the compiled row stride).
  const int64_t *allIndices(const BufferDesc &b,
                            std::vector<int64_t> &scratch) const {
    uint8_t *base = regions[int(b.region)] + b.offset;
    if (b.dtype == plan::DType::I64)
      return reinterpret_cast<const int64_t *>(base);
    const int32_t *src = reinterpret_cast<const int32_t *>(base);
    scratch.assign(src, src + B * b.batchStride);
    return scratch.data();
  }
  Status checkIds(const int64_t *id, size_t n, size_t V, size_t batch) const {
    for (size_t i = 0; i < n; ++i)
      if (id[i] < 0 || uint64_t(id[i]) >= V)
        return fail("id " + std::to_string(id[i]) + " at batch " +
                    std::to_string(batch) + " row " + std::to_string(i) +
                    " is outside the table's " + std::to_string(V) + " rows");
    return Status::success();
  }
  /// Zeroes the live rows of batch entry b of an activation.
  void zeroLive(const BufferDesc &b, size_t batch) const {
    std::memset(f32(b, batch), 0, b.activeElems(T) * sizeof(float));
  }
  /// Live rows of `feat` elements per batch entry.
  size_t rows(const BufferDesc &b, size_t feat) const {
    return b.activeElems(T) / feat;
  }
  /// True when the live rows of all batch entries are one contiguous block.
  bool dense(const BufferDesc &b) const {
    return !b.hasSeq || T == size_t(b.shape[1]);
  }
  Status fail(const std::string &msg) const {
    return Status::fail(StatusCode::InvalidArgument,
                        "kernel '" + kernel.name + "' op " +
                            opKindName(op.kind) + ": " + msg);
  }
  /// Calls fn(firstBatch, count) once over all entries when every buffer's
  /// live rows are contiguous across the batch, else once per entry.
  template <typename F>
  void batches(std::initializer_list<const BufferDesc *> bufs, F &&fn) {
    bool merged = true;
    for (const BufferDesc *b : bufs)
      merged = merged && dense(*b);
    if (merged) {
      fn(size_t(0), B);
      return;
    }
    for (size_t b = 0; b < B; ++b)
      fn(b, size_t(1));
  }

  Status embedding();
  Status norm();
  Status linear();
  Status rotate();
  Status cacheUpdate();
  Status attention();
  Status routerScores();
  Status moeExperts();
  Status moeRoute();
  Status moeHidden();
  Status moeDown();
  Status tooManyExperts(size_t K) const {
    return fail("a token has more than " + std::to_string(K) +
                " experts with a nonzero score (the router's top_k)");
  }
  Status elementwise();
  Status takeLast();
  Status crossEntropy();
  Status crossEntropyChunk();
  Status linearGradInput();
  Status linearGradWeight();
  Status normGrad();
  Status attentionGrad();
  Status routerScoresGrad();
  Status moeExpertsGrad();
  Status moeSplitGrad();
  Status swigluGrad();
  Status embeddingGrad();

public:
  /// f32 copies standing in for bf16 buffers (see runCpuOp).
  const std::unordered_map<const BufferDesc *, float *> *shadow = nullptr;

private:
  const Plan &plan;
  uint8_t *const *regions;
  const KernelDesc &kernel;
  const OpDesc &op;
  size_t B, T;
};

Status OpRunner::run() {
  switch (op.kind) {
  case OpKind::Embedding:
    return embedding();
  case OpKind::RmsNorm:
  case OpKind::L2Norm:
    return norm();
  case OpKind::Linear:
    return linear();
  case OpKind::Rope:
  case OpKind::TemperatureScale:
    return rotate();
  case OpKind::KvCacheUpdate:
    return cacheUpdate();
  case OpKind::Attention:
    return attention();
  case OpKind::RouterScores:
    return routerScores();
  case OpKind::MoeExperts:
    return moeExperts();
  case OpKind::MoeRoute:
    return moeRoute();
  case OpKind::MoeHidden:
    return moeHidden();
  case OpKind::MoeDown:
    return moeDown();
  case OpKind::Swiglu:
  case OpKind::Add:
  case OpKind::Convert:
    return elementwise();
  case OpKind::TakeLast:
    return takeLast();
  case OpKind::CrossEntropy:
  case OpKind::CrossEntropyGrad:
    return crossEntropy();
  case OpKind::CrossEntropyStats:
  case OpKind::CrossEntropyFromStats:
  case OpKind::CrossEntropyGradChunk:
    return crossEntropyChunk();
  case OpKind::LinearGradInput:
    return linearGradInput();
  case OpKind::LinearGradWeight:
    return linearGradWeight();
  case OpKind::RmsNormGrad:
  case OpKind::L2NormGrad:
    return normGrad();
  case OpKind::AttentionGrad:
    return attentionGrad();
  case OpKind::RouterScoresGrad:
    return routerScoresGrad();
  case OpKind::MoeExpertsGrad:
    return moeExpertsGrad();
  case OpKind::MoeGateUp:
  case OpKind::MoeDownGrad:
  case OpKind::MoeDownGradWeight:
  case OpKind::MoeGateUpGradInput:
  case OpKind::MoeCombineGrad:
  case OpKind::MoeGateUpGradWeight:
    return moeSplitGrad();
  case OpKind::SwigluGrad:
    return swigluGrad();
  case OpKind::EmbeddingGrad:
    return embeddingGrad();
  }
  return fail("unknown op");
}

Status OpRunner::embedding() {
  const BufferDesc &table = in(0), &ids = in(1), &y = out();
  size_t V = size_t(table.shape[0]), D = size_t(table.shape[1]);
  std::vector<int64_t> scratch;
  for (size_t b = 0; b < B; ++b) {
    const int64_t *id = indices(ids, b, scratch);
    size_t n = ids.activeElems(T);
    if (Status s = checkIds(id, n, V, b); !s.ok())
      return s;
    cpu::embedding(f32(table), D, id, n, f32(y, b));
  }
  return Status::success();
}

Status OpRunner::norm() {
  const BufferDesc &x = in(0), &y = out();
  const float *w = op.kind == OpKind::RmsNorm ? f32(in(1)) : nullptr;
  size_t D = size_t(x.lastDim());
  batches({&x, &y}, [&](size_t b, size_t nb) {
    cpu::rmsNorm(f32(x, b), w, nb * rows(x, D), D, float(op.eps), f32(y, b));
  });
  return Status::success();
}

Status OpRunner::linear() {
  const BufferDesc &x = in(0), &w = in(1), &y = out();
  size_t K = size_t(x.lastDim()), N = size_t(w.shape[0]);
  batches({&x, &y}, [&](size_t b, size_t nb) {
    cpu::linear(f32(x, b), K, f32(w), K, f32(y, b), N, nb * rows(x, K), N, K);
  });
  return Status::success();
}

Status OpRunner::rotate() {
  const BufferDesc &x = in(0), &pos = in(1), &y = out();
  size_t H = size_t(x.shape[2]), d = size_t(x.shape[3]), width = H * d;
  std::vector<int64_t> scratch;
  for (size_t b = 0; b < B; ++b) {
    float *yb = f32(y, b);
    size_t tokens = rows(x, width);
    if (yb != f32(x, b))
      std::memcpy(yb, f32(x, b), tokens * width * sizeof(float));
    const int64_t *p = indices(pos, b, scratch);
    if (op.kind == OpKind::Rope && op.inverse)
      cpu::ropeInverse(yb, width, tokens, H, d, p, op.invFreq.data());
    else if (op.kind == OpKind::Rope)
      cpu::rope(yb, width, tokens, H, d, p, op.invFreq.data());
    else
      cpu::temperatureScale(yb, width, tokens, width, p, float(op.floorScale),
                            float(op.attnScale));
  }
  return Status::success();
}

Status OpRunner::cacheUpdate() {
  const BufferDesc &cache = in(0), &upd = in(1), &pos = in(2);
  size_t M = size_t(cache.shape[1]),
         row = size_t(cache.shape[2] * cache.shape[3]);
  std::vector<int64_t> scratch;
  for (size_t b = 0; b < B; ++b) {
    const int64_t *p = indices(pos, b, scratch);
    size_t tokens = rows(upd, row);
    for (size_t s = 0; s < tokens; ++s) {
      if (p[s] < 0 || uint64_t(p[s]) >= M)
        return fail("position " + std::to_string(p[s]) + " at batch " +
                    std::to_string(b) + " is outside the cache's " +
                    std::to_string(M) + " rows");
      std::memcpy(f32(cache, b) + size_t(p[s]) * row, f32(upd, b) + s * row,
                  row * sizeof(float));
    }
  }
  return Status::success();
}

Status OpRunner::attention() {
  const BufferDesc &q = in(0), &k = in(1), &v = in(2), &pos = in(3), &y = out();
  size_t H = size_t(q.shape[2]), d = size_t(q.shape[3]),
         Hkv = size_t(k.shape[2]);
  size_t qw = H * d, kw = Hkv * d;
  std::vector<int64_t> scratch;
  for (size_t b = 0; b < B; ++b) {
    const int64_t *p = indices(pos, b, scratch);
    size_t Tq = rows(q, qw);
    size_t kvLen = Tq;
    // From a cache, keys up to the furthest query position are live; an
    // activation holds exactly the T keys of this run.
    if (!k.hasSeq) {
      int64_t maxPos = -1;
      for (size_t s = 0; s < Tq; ++s) {
        if (p[s] < 0)
          return fail("negative position " + std::to_string(p[s]) +
                      " at batch " + std::to_string(b));
        maxPos = std::max(maxPos, p[s]);
      }
      kvLen = size_t(maxPos + 1);
      if (kvLen > size_t(k.shape[1]))
        return fail("position " + std::to_string(maxPos) + " at batch " +
                    std::to_string(b) + " is outside the cache's " +
                    std::to_string(k.shape[1]) + " rows");
    }
    cpu::attention(f32(q, b), qw, p, Tq, f32(k, b), kw, f32(v, b), kw, kvLen, H,
                   Hkv, d, op.chunkSize, float(op.scale), f32(y, b), qw);
  }
  return Status::success();
}

Status OpRunner::routerScores() {
  const BufferDesc &x = in(0), &y = out();
  size_t E = size_t(x.lastDim());
  batches({&x, &y}, [&](size_t b, size_t nb) {
    cpu::routerScores(f32(x, b), nb * rows(x, E), E, size_t(op.topK),
                      f32(y, b));
  });
  return Status::success();
}

Status OpRunner::moeExperts() {
  const BufferDesc &x = in(0), &scores = in(1), &gateUp = in(2), &down = in(3),
                   &y = out();
  size_t E = size_t(gateUp.shape[0]), D = size_t(gateUp.shape[1]),
         I = size_t(gateUp.shape[2] / 2);
  batches({&x, &scores, &y}, [&](size_t b, size_t nb) {
    cpu::expertsForward(f32(x, b), f32(scores, b), f32(gateUp), f32(down),
                        nb * rows(x, D), D, I, E, f32(y, b));
  });
  return Status::success();
}

Status OpRunner::moeRoute() {
  const BufferDesc &scores = in(0), &table = out();
  size_t E = size_t(scores.lastDim()), K = size_t(op.slots);
  // The live tokens' rows, m = b * T + t, gathered contiguously.
  size_t perEntry = rows(scores, E);
  std::vector<float> live(B * perEntry * E);
  for (size_t b = 0; b < B; ++b)
    std::copy(f32(scores, b), f32(scores, b) + perEntry * E,
              live.begin() + b * perEntry * E);
  auto *t =
      reinterpret_cast<int32_t *>(regions[int(table.region)] + table.offset);
  return cpu::expertsRoute(live.data(), B * perEntry, E, K, t,
                           size_t(table.numel))
             ? Status::success()
             : tooManyExperts(K);
}

Status OpRunner::moeHidden() {
  const BufferDesc &x = in(0), &scores = in(1), &gateUp = in(2), &h = out();
  size_t E = size_t(gateUp.shape[0]), D = size_t(gateUp.shape[1]),
         I = size_t(gateUp.shape[2] / 2), K = size_t(h.shape[h.shape.size() - 2]);
  bool ok = true;
  batches({&x, &scores, &h}, [&](size_t b, size_t nb) {
    ok &= cpu::expertsHidden(f32(x, b), f32(scores, b), f32(gateUp),
                             nb * rows(x, D), D, I, E, K, f32(h, b));
  });
  return ok ? Status::success() : tooManyExperts(K);
}

Status OpRunner::moeDown() {
  const BufferDesc &h = in(0), &scores = in(1), &down = in(2), &y = out();
  size_t E = size_t(down.shape[0]), I = size_t(down.shape[1]),
         D = size_t(down.shape[2]), K = size_t(h.shape[h.shape.size() - 2]);
  bool ok = true;
  batches({&h, &scores, &y}, [&](size_t b, size_t nb) {
    ok &= cpu::expertsDown(f32(h, b), f32(scores, b), f32(down),
                           nb * rows(y, D), D, I, E, K, f32(y, b));
  });
  return ok ? Status::success() : tooManyExperts(K);
}

Status OpRunner::elementwise() {
  const BufferDesc &a = in(0), &y = out();
  if (op.kind == OpKind::Convert) {
    // Values as they are: a bf16 result rounds them when it is stored.
    if (!a.hasBatch) {
      std::memmove(f32(y), f32(a), size_t(a.numel) * sizeof(float));
      return Status::success();
    }
    batches({&a, &y}, [&](size_t b, size_t nb) {
      std::memmove(f32(y, b), f32(a, b), nb * a.activeElems(T) * sizeof(float));
    });
    return Status::success();
  }
  const BufferDesc &c = in(1);
  if (!a.hasBatch) { // parameter-shaped gradients (tied embeddings)
    cpu::add(f32(a), f32(c), size_t(a.numel), f32(y));
    return Status::success();
  }
  batches({&a, &c, &y}, [&](size_t b, size_t nb) {
    size_t n = nb * a.activeElems(T);
    if (op.kind == OpKind::Add)
      cpu::add(f32(a, b), f32(c, b), n, f32(y, b));
    else
      cpu::swiglu(f32(a, b), n, f32(c, b), n, 1, n, f32(y, b), n);
  });
  return Status::success();
}

Status OpRunner::takeLast() {
  const BufferDesc &x = in(0), &y = out();
  if (T == 0)
    return fail("no token to take");
  for (size_t b = 0; b < B; ++b)
    std::memcpy(f32(y, b), f32(x, b) + (T - 1) * x.rowStride,
                x.rowStride * sizeof(float));
  return Status::success();
}

Status OpRunner::crossEntropy() {
  const BufferDesc &logits = in(0), &ids = in(1), &y = out();
  size_t S = size_t(logits.shape[1]), V = size_t(logits.lastDim());
  if (T < 2)
    return fail("a sequence of " + std::to_string(T) +
                " token has no next-token label (training needs T >= 2)");
  std::vector<int64_t> scratch;
  const int64_t *id = allIndices(ids, scratch);
  // Labels are the ids themselves: the loss kernels trust them in range.
  for (size_t b = 0; b < B; ++b)
    if (Status s = checkIds(id + b * S, T, V, b); !s.ok())
      return s;
  if (op.kind == OpKind::CrossEntropy)
    *f32(y) = cpu::crossEntropy(f32(logits), V, id, B, T, S, V);
  else
    cpu::crossEntropyGrad(f32(logits), V, id, B, T, S, V, 1.f, f32(y), V);
  return Status::success();
}

Status OpRunner::crossEntropyChunk() {
  const BufferDesc &rowsBuf = in(0), &ids = in(1), &y = out();
  size_t S = size_t(rowsBuf.shape[1]), n = size_t(rowsBuf.lastDim());
  if (T < 2)
    return fail("a sequence of " + std::to_string(T) +
                " token has no next-token label (training needs T >= 2)");
  std::vector<int64_t> scratch;
  const int64_t *id = allIndices(ids, scratch);
  if (op.kind == OpKind::CrossEntropyFromStats) {
    *f32(y) = cpu::crossEntropyFromStats(f32(rowsBuf), id, B, T, S);
    return Status::success();
  }
  size_t V = size_t(op.vocabSize), off = size_t(op.vocabOffset);
  for (size_t b = 0; b < B; ++b)
    if (Status s = checkIds(id + b * S, T, V, b); !s.ok())
      return s;
  if (op.kind == OpKind::CrossEntropyStats)
    cpu::crossEntropyStats(f32(rowsBuf), n, id, B, T, S, n, off,
                           op.operands.size() > 2 ? f32(in(2)) : nullptr,
                           f32(y));
  else
    cpu::crossEntropyGradChunk(f32(rowsBuf), n, id, B, T, S, n, off,
                               f32(in(2)), f32(y), n);
  return Status::success();
}

Status OpRunner::linearGradInput() {
  const BufferDesc &dy = in(0), &w = in(1), &dx = out();
  size_t N = size_t(w.shape[0]), K = size_t(w.shape[1]);
  batches({&dy, &dx}, [&](size_t b, size_t nb) {
    cpu::linearGradInput(f32(dy, b), N, f32(w), K, f32(dx, b), K,
                         nb * rows(dy, N), N, K);
  });
  return Status::success();
}

Status OpRunner::linearGradWeight() {
  const BufferDesc &x = in(0), &dy = in(1), &dw = out();
  size_t K = size_t(x.lastDim()), N = size_t(dy.lastDim());
  // The first call overwrites dw, later batch entries add to it.
  batches({&x, &dy}, [&](size_t b, size_t nb) {
    cpu::linearGradWeight(f32(x, b), K, f32(dy, b), N, f32(dw), K,
                          nb * rows(x, K), N, K, b > 0);
  });
  return Status::success();
}

Status OpRunner::normGrad() {
  bool weighted = op.kind == OpKind::RmsNormGrad;
  const BufferDesc &x = in(0), &dy = in(weighted ? 2 : 1), &dx = out();
  const float *w = weighted ? f32(in(1)) : nullptr;
  float *dw = weighted ? f32(out(1)) : nullptr;
  size_t D = size_t(x.lastDim());
  // rmsNormGrad accumulates dx and dw together: entries after the first
  // start from zeroed dx rows so that only dw sums across them.
  batches({&x, &dy, &dx}, [&](size_t b, size_t nb) {
    bool sumDw = weighted && b > 0;
    if (sumDw)
      zeroLive(dx, b);
    cpu::rmsNormGrad(f32(x, b), w, f32(dy, b), nb * rows(x, D), D,
                     float(op.eps), f32(dx, b), dw, sumDw);
  });
  return Status::success();
}

Status OpRunner::attentionGrad() {
  const BufferDesc &q = in(0), &k = in(1), &v = in(2), &pos = in(3),
                   &dout = in(4), &dq = out(0), &dk = out(1), &dv = out(2);
  size_t H = size_t(q.shape[2]), d = size_t(q.shape[3]),
         Hkv = size_t(k.shape[2]);
  size_t qw = H * d, kw = Hkv * d;
  std::vector<int64_t> scratch;
  for (size_t b = 0; b < B; ++b) {
    const int64_t *p = indices(pos, b, scratch);
    size_t Tq = rows(q, qw);
    for (size_t s = 0; s < Tq; ++s)
      if (p[s] < 0)
        return fail("negative position " + std::to_string(p[s]) + " at batch " +
                    std::to_string(b));
    cpu::attentionGrad(f32(q, b), qw, p, Tq, f32(k, b), kw, f32(v, b), kw, Tq,
                       H, Hkv, d, op.chunkSize, float(op.scale), f32(dout, b),
                       qw, f32(dq, b), qw, f32(dk, b), kw, f32(dv, b), kw);
  }
  return Status::success();
}

Status OpRunner::routerScoresGrad() {
  const BufferDesc &logits = in(0), &ds = in(1), &dl = out();
  size_t E = size_t(logits.lastDim());
  batches({&logits, &ds, &dl}, [&](size_t b, size_t nb) {
    cpu::routerScoresGrad(f32(logits, b), nb * rows(logits, E), E,
                          size_t(op.topK), f32(ds, b), f32(dl, b));
  });
  return Status::success();
}

Status OpRunner::moeExpertsGrad() {
  const BufferDesc &x = in(0), &scores = in(1), &gateUp = in(2), &down = in(3),
                   &dy = in(4), &dx = out(0), &dscores = out(1),
                   &dGateUp = out(2), &dDown = out(3);
  size_t E = size_t(gateUp.shape[0]), D = size_t(gateUp.shape[1]),
         I = size_t(gateUp.shape[2] / 2);
  // expertsBackward accumulates dx with the weight gradients: later batch
  // entries start from zeroed dx rows.
  batches({&x, &scores, &dy, &dx, &dscores}, [&](size_t b, size_t nb) {
    if (b > 0)
      zeroLive(dx, b);
    cpu::expertsBackward(f32(x, b), f32(scores, b), f32(gateUp), f32(down),
                         nb * rows(x, D), D, I, E, f32(dy, b), f32(dx, b),
                         f32(dscores, b), f32(dGateUp), f32(dDown), b > 0);
  });
  return Status::success();
}

Status OpRunner::moeSplitGrad() {
  // The scores' operand, the tokens of a batch chunk, and K from the
  // per-slot operand or result ([.., K, W]).
  bool combine = op.kind == OpKind::MoeCombineGrad;
  const BufferDesc &scores = in(combine ? 2 : 1);
  size_t E = size_t(scores.lastDim());
  auto slotsOf = [](const BufferDesc &b) {
    return size_t(b.shape[b.shape.size() - 2]);
  };
  auto tokens = [&](size_t nb) { return nb * rows(scores, E); };
  bool ok = true;
  switch (op.kind) {
  case OpKind::MoeGateUp: { // x, scores, gate_up, route -> gu
    const BufferDesc &x = in(0), &gateUp = in(2), &gu = out();
    size_t D = size_t(gateUp.shape[1]), I = size_t(gateUp.shape[2] / 2);
    batches({&x, &scores, &gu}, [&](size_t b, size_t nb) {
      ok &= cpu::expertsGateUp(f32(x, b), f32(scores, b), f32(gateUp),
                               tokens(nb), D, I, E, slotsOf(gu), f32(gu, b));
    });
    return ok ? Status::success() : tooManyExperts(slotsOf(gu));
  }
  case OpKind::MoeDownGrad: { // gu, scores, down, dy, route -> dgu
    const BufferDesc &gu = in(0), &down = in(2), &dy = in(3), &dgu = out();
    size_t I = size_t(down.shape[1]), D = size_t(down.shape[2]);
    batches({&gu, &scores, &dy, &dgu}, [&](size_t b, size_t nb) {
      ok &= cpu::expertsDownGrad(f32(gu, b), f32(scores, b), f32(down),
                                 f32(dy, b), tokens(nb), D, I, E, slotsOf(gu),
                                 f32(dgu, b));
    });
    return ok ? Status::success() : tooManyExperts(slotsOf(gu));
  }
  case OpKind::MoeDownGradWeight: { // gu, scores, dy, route -> [E, I, D]
    const BufferDesc &gu = in(0), &dy = in(2), &dDown = out();
    size_t I = size_t(dDown.shape[1]), D = size_t(dDown.shape[2]);
    // Later batch chunks add to the earlier ones' sums.
    batches({&gu, &scores, &dy}, [&](size_t b, size_t nb) {
      ok &= cpu::expertsDownGradWeight(f32(gu, b), f32(scores, b), f32(dy, b),
                                       tokens(nb), D, I, E, slotsOf(gu),
                                       f32(dDown), b > 0);
    });
    return ok ? Status::success() : tooManyExperts(slotsOf(gu));
  }
  case OpKind::MoeGateUpGradInput: { // dgu, scores, gate_up, route -> dz
    const BufferDesc &dgu = in(0), &gateUp = in(2), &dz = out();
    size_t D = size_t(gateUp.shape[1]), I = size_t(gateUp.shape[2] / 2);
    batches({&dgu, &scores, &dz}, [&](size_t b, size_t nb) {
      ok &= cpu::expertsGateUpGradInput(f32(dgu, b), f32(scores, b),
                                        f32(gateUp), tokens(nb), D, I, E,
                                        slotsOf(dgu), f32(dz, b));
    });
    return ok ? Status::success() : tooManyExperts(slotsOf(dgu));
  }
  case OpKind::MoeCombineGrad: { // dz, x, scores -> dx, dscores
    const BufferDesc &dz = in(0), &x = in(1), &dx = out(0), &ds = out(1);
    size_t D = size_t(x.lastDim());
    batches({&dz, &x, &scores, &dx, &ds}, [&](size_t b, size_t nb) {
      ok &= cpu::expertsCombineGrad(f32(dz, b), f32(x, b), f32(scores, b),
                                    tokens(nb), D, E, slotsOf(dz), f32(dx, b),
                                    f32(ds, b));
    });
    return ok ? Status::success() : tooManyExperts(slotsOf(dz));
  }
  default: { // MoeGateUpGradWeight: x, scores, dgu, route -> [E, D, 2I]
    const BufferDesc &x = in(0), &dgu = in(2), &dGateUp = out();
    size_t D = size_t(dGateUp.shape[1]), I = size_t(dGateUp.shape[2] / 2);
    batches({&x, &scores, &dgu}, [&](size_t b, size_t nb) {
      ok &= cpu::expertsGateUpGradWeight(f32(x, b), f32(scores, b), f32(dgu, b),
                                         tokens(nb), D, I, E, slotsOf(dgu),
                                         f32(dGateUp), b > 0);
    });
    return ok ? Status::success() : tooManyExperts(slotsOf(dgu));
  }
  }
}

Status OpRunner::swigluGrad() {
  const BufferDesc &gate = in(0), &up = in(1), &dy = in(2), &dg = out(0),
                   &du = out(1);
  batches({&gate, &up, &dy, &dg, &du}, [&](size_t b, size_t nb) {
    cpu::swigluGrad(f32(gate, b), f32(up, b), f32(dy, b),
                    nb * gate.activeElems(T), f32(dg, b), f32(du, b));
  });
  return Status::success();
}

Status OpRunner::embeddingGrad() {
  const BufferDesc &ids = in(0), &dy = in(1), &table = out();
  size_t V = size_t(table.shape[0]), D = size_t(table.shape[1]);
  std::vector<int64_t> scratch;
  for (size_t b = 0; b < B; ++b)
    if (Status s = checkIds(indices(ids, b, scratch), ids.activeElems(T), V, b);
        !s.ok())
      return s;
  std::memset(f32(table), 0, table.numel * sizeof(float));
  // One call over all entries when they are contiguous, so that each row's
  // sum over the batch is carried in double.
  batches({&ids, &dy}, [&](size_t b, size_t nb) {
    const int64_t *id =
        nb > 1 ? allIndices(ids, scratch) : indices(ids, b, scratch);
    cpu::embeddingGrad(id, nb * ids.activeElems(T), f32(dy, b), D, f32(table),
                       op.paddingIdx);
  });
  return Status::success();
}

} // namespace

static Status runCpuOp(const Plan &plan, uint8_t *const regions[4],
                const KernelDesc &kernel, const OpDesc &op, size_t B,
                size_t T) {
  // bf16 plans: every op reads its bf16 buffers widened to f32, computes in
  // f32 as for an f32 plan, and stores its results rounded to nearest even
  // -- the rounding the CUDA kernels' l4_st applies, so the two backends
  // round the same values at the same places.
  std::vector<uint32_t> wide;
  auto add = [&](uint32_t i) {
    if (plan.buffers[i].dtype == plan::DType::BF16 &&
        std::find(wide.begin(), wide.end(), i) == wide.end())
      wide.push_back(i);
  };
  for (uint32_t i : op.operands)
    add(i);
  for (uint32_t i : op.results)
    add(i);
  OpRunner runner(plan, regions, kernel, op, B, T);
  if (wide.empty())
    return runner.run();
  // Buffers that share bytes (a cache update's operand and result, views)
  // share one f32 copy, so a write through one is seen through the others.
  struct Copy {
    uint8_t *at;
    uint64_t numel;
    std::vector<float> data;
    bool written = false;
  };
  std::vector<Copy> copies;
  std::unordered_map<const BufferDesc *, float *> shadow;
  std::vector<std::pair<const BufferDesc *, size_t>> owner;
  for (uint32_t i : wide) {
    const BufferDesc &d = plan.buffers[i];
    uint8_t *at = regions[int(d.region)] + d.offset;
    size_t k = 0;
    while (k < copies.size() && copies[k].at != at)
      ++k;
    if (k == copies.size())
      copies.push_back({at, 0, {}, false});
    copies[k].numel = std::max(copies[k].numel, d.numel);
    owner.push_back({&d, k});
  }
  for (Copy &c : copies) {
    const uint16_t *src = reinterpret_cast<const uint16_t *>(c.at);
    c.data.resize(c.numel);
    for (uint64_t e = 0; e < c.numel; ++e)
      c.data[e] = io::bf16ToF32(src[e]);
  }
  for (auto [d, k] : owner)
    shadow[d] = copies[k].data.data();
  for (uint32_t r : op.results)
    for (auto [d, k] : owner)
      if (d == &plan.buffers[r])
        copies[k].written = true;
  runner.shadow = &shadow;
  Status st = runner.run();
  for (Copy &c : copies) {
    if (!c.written)
      continue;
    uint16_t *dst = reinterpret_cast<uint16_t *>(c.at);
    for (uint64_t e = 0; e < c.numel; ++e)
      dst[e] = io::f32ToBf16(c.data[e]);
  }
  return st;
}

Status runCpuKernel(const Plan &plan, uint8_t *const regions[4],
                    const KernelDesc &kernel, size_t B, size_t T) {
  // A fused kernel's ops run one by one, each storing its result in its
  // buffer's dtype: the CUDA kernel rounds the values it keeps in registers
  // the same way, so fusing never changes what a program computes.
  for (const OpDesc &op : kernel.ops)
    if (Status s = runCpuOp(plan, regions, kernel, op, B, T); !s.ok())
      return s;
  return Status::success();
}

} // namespace l4c::rt
