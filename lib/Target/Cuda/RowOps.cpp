//===- RowOps.cpp - CUDA for row-wise and element-wise l4 ops -------------===//
//
// Embedding, norms, RoPE, temperature scaling, KV-cache writes, routing,
// element-wise ops and take_last: memory-bound kernels that walk the live
// token rows (b < B, t < T) with grid-stride loops.
//
//===----------------------------------------------------------------------===//
#include "Emit.h"
#include "cpu/kernels.h"
#include "l4c/Dialect/L4/L4Ops.h"
#include "llvm/Support/FormatVariadic.h"
#include <vector>

using namespace mlir;

namespace l4c::cuda {

namespace {

/// Declares PREFIX_S (rows per batch entry, a parameter) and PREFIX_W (row
/// width) for a token-major view, so row (b, t) starts at
/// (b * PREFIX_S + t) * PREFIX_W.
std::string rowConstants(Body &b, llvm::StringRef prefix, const View &v) {
  return stride(b, (prefix + "_S").str(), v.rowsPerBatch) +
         constant((prefix + "_W").str(), v.inner);
}

} // namespace

/// The live rows per batch entry shared by token-major views ("T" when they
/// have a seq dim, "1" after take_last); fails when they disagree or a view
/// is not token-major.
llvm::Expected<std::string>
liveRows(const OpContext &ctx, std::initializer_list<const View *> views) {
  std::optional<bool> seq;
  for (const View *v : views) {
    if (!v->hasBatch)
      return ctx.fail("'" + v->name + "' is not a token-major activation");
    if (seq && *seq != v->hasSeq)
      return ctx.fail("'" + v->name +
                      "' disagrees with the other operands on the seq dim");
    seq = v->hasSeq;
  }
  return std::string(seq.value_or(false) ? "T" : "1");
}

/// Rows at the compiled maxima.
uint64_t maxRows(const View &v) { return uint64_t(v.bmax) * v.maxLiveRows(); }


std::string topkGlobals() {
  return R"cuda(// torch.topk's order: NaN first, then larger values, then lower indices.
__device__ __forceinline__ bool @B@_before(float a, long long ia, float b, long long ib) {
  const bool na = a != a, nb = b != b;
  if (na != nb) return na;
  if (na) return ia < ib;
  return a > b || (a == b && ia < ib);
}
// The pick after (prev, prevV) in that order among x[xo, xo + E), or -1; its
// value in bestV. Picking k times this way needs no per-expert flags.
template <typename P>
__device__ __forceinline__ long long @B@_next(const P *x, long long xo, long long E,
                                            long long prev, float prevV, float &bestV) {
  long long best = -1;
  for (long long e = 0; e < E; ++e) {
    const float v = l4_ld(x, xo + e);
    if (prev >= 0 && !@B@_before(prevV, prev, v, e))
      continue;
    if (best < 0 || @B@_before(v, e, bestV, best)) {
      best = e;
      bestV = v;
    }
  }
  return best;
}
)cuda";
}

llvm::Error emitEmbedding(OpContext &ctx) {
  const View &table = ctx.operands[0], &ids = ctx.operands[1],
             &y = ctx.results[0];
  auto lt = liveRows(ctx, {&ids, &y});
  if (!lt)
    return lt.takeError();
  if (table.shape().size() != 2 || ids.inner != 1 ||
      y.inner != table.shape()[1])
    return ctx.fail("expected table [V, D], ids [B, S] and result [B, S, D]");
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << constant("V", table.shape()[0]) << constant("D", table.shape()[1])
     << stride(b, "I_S", ids.rowsPerBatch) << stride(b, "Y_S", y.rowsPerBatch)
     << "  const long long LT = " << *lt << ";\n"
     << R"cuda(  const long long n = B * LT * D;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const long long c = i % D, r = i / D, b = r / LT, t = r - b * LT;
    const long long id = l4_ldi(ids, b * I_S + t);
    // Ids are checked on the host; an outside one reads as a zero row.
    const float v = id >= 0 && id < V ? l4_ld(table, id * D + c) : 0.0f;
    l4_st(y, (b * Y_S + t) * D + c, v);
  }
)cuda";
  b.threads = 256;
  b.blocks = gridFor(maxRows(y) * y.inner, b.threads);
  return llvm::Error::success();
}

llvm::Error emitNorm(OpContext &ctx, double eps, bool hasWeight) {
  const View &x = ctx.operands[0], &y = ctx.results[0];
  auto lt = liveRows(ctx, {&x, &y});
  if (!lt)
    return lt.takeError();
  int64_t n = x.shape().back();
  if (n <= 0 || x.inner % n || y.inner != x.inner)
    return ctx.fail("expected the result to have the input's shape");
  if (hasWeight && ctx.operands[1].inner != n)
    return ctx.fail("expected a weight of the normalised width");
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << constant("N", n, "normalised width")
     << constant("NV", x.inner / n, "vectors per token row")
     << rowConstants(b, "X", x) << rowConstants(b, "Y", y)
     << "  constexpr float EPS = " << floatLit(float(eps)) << ";\n"
     << "  const long long LT = " << *lt << ";\n"
     << R"cuda(  // One warp per vector; the scale is rounded to f32 as in HF's fp32 norm.
  const int lane = threadIdx.x & 31;
  const long long warps = blockDim.x >> 5;
  const long long nvec = B * LT * NV;
  for (long long v = blockIdx.x * warps + (threadIdx.x >> 5); v < nvec;
       v += (long long)gridDim.x * warps) {
    const long long j = v % NV, r = v / NV, b = r / LT, t = r - b * LT;
    const long long xo = (b * X_S + t) * X_W + j * N;
    const long long yo = (b * Y_S + t) * Y_W + j * N;
    float ss = 0.0f;
    for (long long i = lane; i < N; i += 32) {
      const float a = l4_ld(x, xo + i);
      ss += a * a;
    }
    ss = l4_warp_sum(ss);
    const float var = (float)((double)ss / (double)N);
    const float inv = (float)(1.0 / sqrt((double)(var + EPS)));
    for (long long i = lane; i < N; i += 32)
)cuda";
  if (hasWeight)
    os << "      l4_st(y, yo + i, (l4_ld(x, xo + i) * inv) * l4_ld(w, i));\n";
  else
    os << "      l4_st(y, yo + i, l4_ld(x, xo + i) * inv);\n";
  os << "  }\n";
  b.threads = 256;
  b.blocks = gridFor(maxRows(x) * (x.inner / n), b.threads / 32);
  return llvm::Error::success();
}

namespace {

/// The RoPE inverse frequencies of `rope` as a body global
/// (@B@_inv_freq[d / 2], fp32, by the CPU backend's function).
llvm::Error ropeGlobals(OpContext &ctx, l4::RopeOp rope, int64_t d) {
  int64_t half = d / 2;
  std::vector<float> invFreq(half);
  bool llama3 = rope.getScaling() == l4::RopeScaling::llama3;
  if (!cpu::ropeInvFreq(rope.getTheta().convertToDouble(), size_t(d),
                        llama3 ? "llama3" : "default",
                        rope.getFactor().convertToDouble(),
                        rope.getLowFreqFactor().convertToDouble(),
                        rope.getHighFreqFactor().convertToDouble(),
                        double(rope.getOriginalMaxPosition()), invFreq.data()))
    return ctx.fail("unknown rope scaling");
  llvm::raw_string_ostream gs(ctx.body.globals);
  gs << "// RoPE inverse frequencies (fp32, as HF computes them)\n"
     << "__constant__ float @B@_inv_freq[" << half << "] = {";
  for (int64_t j = 0; j < half; ++j)
    gs << (j % 4 ? " " : "\n    ") << floatLit(invFreq[j]) << ",";
  gs << "\n};\n";
  return llvm::Error::success();
}

/// A row's cos and sin at position p into cs[2 * HALF] (between two
/// barriers).
std::string ropeCosSin(bool inverse) {
  return std::string(R"cuda(    __syncthreads(); // the previous row is done with cs
    for (int j = threadIdx.x; j < HALF; j += blockDim.x) {
      // fp32 angle as HF; cos and sin rounded from double.
      const float angle = @B@_inv_freq[j] * p;
      double s, c;
      sincos((double)angle, &s, &c);
      cs[2 * j] = (float)c;
)cuda") +
         (inverse ? "      cs[2 * j + 1] = -(float)s; // inverse: the "
                    "rotation's adjoint\n"
                  : "      cs[2 * j + 1] = (float)s;\n") +
         "    }\n    __syncthreads();\n";
}

/// One row's heads [first, end) (of D each) rotated from x at xo into y at
/// yo, and with `norm` then normalised: a warp per head rotates it twice,
/// once for its sum of squares and once to store it normalised; the rotated
/// values are rounded as the unfused rope would store them. `first` and
/// `end` are C++ expressions ("0" and "H": all of them).
std::string ropeHeads(const RopeNorm *norm, llvm::StringRef first,
                      llvm::StringRef end, llvm::StringRef x,
                      llvm::StringRef xo, llvm::StringRef y,
                      llvm::StringRef yo) {
  std::string t;
  llvm::raw_string_ostream os(t);
  // The first head's index plus `index` (parenthesised when it is a sum).
  auto from = [&](llvm::StringRef index) {
    return first == "0" ? index.str() : (first + " + (" + index + ")").str();
  };
  if (!norm) {
    os << "    for (long long e = "
       << (first == "0" ? std::string("threadIdx.x")
                        : (first + " * HALF + threadIdx.x").str())
       << "; e < " << end << " * HALF; e += blockDim.x) {\n"
       << R"cuda(      const long long h = e / HALF, j = e - h * HALF, k = h * D + 2 * j;
      const float a = l4_ld(@X, @XO + k), bv = l4_ld(@X, @XO + k + 1);
      const float c = cs[2 * j], s = cs[2 * j + 1];
      l4_st(@Y, @YO + k, a * c - bv * s);
      l4_st(@Y, @YO + k + 1, a * s + bv * c);
    }
)cuda";
  } else {
    auto rot = [&](llvm::StringRef v) {
      return norm->bf16Temps ? ("l4_round_bf16(" + v + ")").str() : v.str();
    };
    os << "    for (long long h = " << from("threadIdx.x >> 5") << "; h < "
       << end << "; h += blockDim.x >> 5) {\n"
       << R"cuda(      float ss = 0.0f;
      for (long long j = lane; j < HALF; j += 32) {
        const long long k = h * D + 2 * j;
        const float a = l4_ld(@X, @XO + k), bv = l4_ld(@X, @XO + k + 1);
        const float c = cs[2 * j], s = cs[2 * j + 1];
        const float ra = )cuda"
       << rot("a * c - bv * s") << ", rb = " << rot("a * s + bv * c") << R"cuda(;
        ss += ra * ra;
        ss += rb * rb;
      }
      ss = l4_warp_sum(ss);
      const float var = (float)((double)ss / (double)D);
      const float inv = (float)(1.0 / sqrt((double)(var + @EPS)));
      for (long long j = lane; j < HALF; j += 32) {
        const long long k = h * D + 2 * j;
        const float a = l4_ld(@X, @XO + k), bv = l4_ld(@X, @XO + k + 1);
        const float c = cs[2 * j], s = cs[2 * j + 1];
        l4_st(@Y, @YO + k, ()cuda"
       << rot("a * c - bv * s") << R"cuda() * inv);
        l4_st(@Y, @YO + k + 1, ()cuda"
       << rot("a * s + bv * c") << R"cuda() * inv);
      }
    }
)cuda";
  }
  std::string out = t;
  for (auto [from, to] :
       {std::pair<llvm::StringRef, std::string>{"@XO", xo.str()},
        {"@X", x.str()},
        {"@YO", yo.str()},
        {"@Y", y.str()},
        {"@EPS", norm ? floatLit(float(norm->eps)) : std::string()}})
    out = replaceAll(out, from, to);
  return out;
}

/// The temperature scale of a row at position p (HF's fp32 math, log1p
/// rounded from double) into `scale`.
std::string temperatureScale(l4::TemperatureScaleOp op) {
  return "    // In fp32 as HF, with log1p rounded from double.\n"
         "    const float scale = (float)log1p((double)floorf((p + 1.0f) / " +
         floatLit(float(op.getFloorScale().convertToDouble())) + ")) * " +
         floatLit(float(op.getAttnScale().convertToDouble())) + " + 1.0f;\n";
}

} // namespace

llvm::Error emitRope(OpContext &ctx, const RopeNorm *norm) {
  auto rope = cast<l4::RopeOp>(ctx.op);
  const View &x = ctx.operands[0], &pos = ctx.operands[1], &y = ctx.results[0];
  auto lt = liveRows(ctx, {&x, &pos, &y});
  if (!lt)
    return lt.takeError();
  auto shape = x.shape();
  if (shape.size() != 4 || shape[3] % 2 || y.inner != x.inner)
    return ctx.fail("expected x [B, S, H, d] with an even d");
  int64_t heads = shape[2], d = shape[3];
  if (llvm::Error e = ropeGlobals(ctx, rope, d))
    return e;
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << constant("H", heads) << constant("D", d) << constant("HALF", d / 2)
     << rowConstants(b, "X", x) << rowConstants(b, "Y", y)
     << stride(b, "P_S", pos.rowsPerBatch) << "  const long long LT = " << *lt
     << ";\n"
     << "  __shared__ float cs[2 * HALF];\n"
     << (norm ? "  const int lane = threadIdx.x & 31;\n" : "")
     << R"cuda(  for (long long r = blockIdx.x; r < B * LT; r += gridDim.x) {
    const long long b = r / LT, t = r - b * LT;
    const float p = (float)l4_ldi(pos, b * P_S + t);
)cuda" << ropeCosSin(rope.getInverse())
     << "    const long long xo = (b * X_S + t) * X_W, yo = (b * Y_S + t) * Y_W;\n"
     << ropeHeads(norm, "0", "H", "x", "xo", "y", "yo") << "  }\n";
  b.threads = 128;
  b.blocks = gridFor(maxRows(x), 1);
  return llvm::Error::success();
}

llvm::Error emitCacheGroup(OpContext &ctx, const CacheGroup &g) {
  auto qRope = llvm::cast_or_null<l4::RopeOp>(g.qRope);
  auto kRope = llvm::cast_or_null<l4::RopeOp>(g.kRope);
  auto qTemp = llvm::cast_or_null<l4::TemperatureScaleOp>(g.qTemp);
  // Operands [xq,] pos, xk, xv, the k and v caches; results [yq,] kc, vc.
  const bool hasQ = qRope || qTemp;
  if (ctx.operands.size() != (hasQ ? 6u : 5u) ||
      ctx.results.size() != (hasQ ? 3u : 2u))
    return ctx.fail("expected the cache kernel's operands and results");
  size_t i = 0;
  const View *xq = hasQ ? &ctx.operands[i++] : nullptr;
  const View &pos = ctx.operands[i++], &xk = ctx.operands[i++],
             &xv = ctx.operands[i++];
  View &kin = ctx.operands[i++], &vin = ctx.operands[i++];
  const View *yq = hasQ ? &ctx.results[0] : nullptr;
  const View &kc = ctx.results[hasQ ? 1 : 0], &vc = ctx.results[hasQ ? 2 : 1];
  auto lt = liveRows(ctx, {&pos, &xk, &xv});
  if (!lt)
    return lt.takeError();
  if (hasQ)
    if (auto lq = liveRows(ctx, {xq, yq, &pos}); !lq)
      return lq.takeError();
  auto ks = kc.shape(), vs = vc.shape();
  auto inPlace = [](const View &in, const View &out) {
    return in.buf->region == out.buf->region && in.buf->offset == out.buf->offset;
  };
  if (ks.size() != 4 || vs != ks || !kc.hasBatch || kc.hasSeq ||
      xk.inner != ks[2] * ks[3] || xv.inner != xk.inner ||
      !inPlace(kin, kc) || !inPlace(vin, vc))
    return ctx.fail("expected k and v caches [B, M, Hkv, d] updated in place "
                    "from rows of Hkv x d");
  if (qRope && kRope &&
      qRope->getAttrDictionary() != kRope->getAttrDictionary())
    return ctx.fail("q's and k's RoPE differ");
  // The caches are written through their results (the same bytes).
  kin.referenced = vin.referenced = false;
  int64_t d = ks[3];
  if (d % 2)
    return ctx.fail("expected an even head dim");
  Body &b = ctx.body;
  l4::RopeOp rope = qRope ? qRope : kRope;
  if (rope)
    if (llvm::Error e = ropeGlobals(ctx, rope, d))
      return e;
  llvm::raw_string_ostream os(b.code);
  os << constant("HK", ks[2], "kv heads") << constant("D", d)
     << constant("HALF", d / 2) << constant("M", ks[1], "cache rows")
     << constant("RW", ks[2] * d) << rowConstants(b, "K", xk)
     << rowConstants(b, "V", xv) << stride(b, "P_S", pos.rowsPerBatch);
  if (hasQ)
    os << constant("HQ", xq->inner / d, "query heads") << rowConstants(b, "Q", *xq)
       << rowConstants(b, "Y", *yq);
  // A row's work is split into PARTS blocks of 4 warps, about a warp per
  // head (q's and k's), each taking its share of q's heads, k's heads and
  // v's elements: a decode step's few rows would otherwise leave one block
  // to walk all of a row's heads one after another.
  const int64_t heads = (hasQ ? xq->inner / d : 0) + ks[2];
  const int64_t parts = std::max<int64_t>(1, (heads + 3) / 4);
  // This part's share [N0, N1) of `extent` (heads or elements).
  auto slice = [](llvm::StringRef n, llvm::StringRef extent) {
    return llvm::formatv("    const long long {0}0 = part * {1} / PARTS, "
                         "{0}1 = (part + 1) * {1} / PARTS;\n",
                         n, extent)
        .str();
  };
  os << "  const long long LT = " << *lt << ";\n"
     << constant("PARTS", parts, "blocks a row");
  if (rope)
    os << "  __shared__ float cs[2 * HALF];\n";
  if (g.qNorm || g.kNorm)
    os << "  const int lane = threadIdx.x & 31;\n";
  os << "  // PARTS blocks a token row: "
     << (qRope ? "q rotated" : qTemp ? "q scaled" : "") << (hasQ ? ", " : "")
     << (kRope ? "k rotated" : "k")
     << R"cuda( and v into the caches at
  // the row's position (a position outside the cache is dropped, as the
  // host checks them), each part a slice of the heads and elements.
  for (long long task = blockIdx.x; task < B * LT * PARTS; task += gridDim.x) {
    const long long r = task / PARTS, part = task - r * PARTS;
    const long long b = r / LT, t = r - b * LT;
    const long long pi = l4_ldi(pos, b * P_S + t);
    const float p = (float)pi;
)cuda";
  if (rope)
    os << ropeCosSin(false);
  if (qRope)
    os << "    const long long qo = (b * Q_S + t) * Q_W, yo = (b * Y_S + t) * Y_W;\n"
       << slice("q", "HQ")
       << ropeHeads(g.qNorm ? &*g.qNorm : nullptr, "q0", "q1", "xq", "qo", "yq",
                    "yo");
  if (qTemp)
    os << temperatureScale(qTemp)
       << "    const long long qo = (b * Q_S + t) * Q_W, yo = (b * Y_S + t) * Y_W;\n"
       << slice("q", "Q_W")
       << R"cuda(    for (long long i = q0 + threadIdx.x; i < q1; i += blockDim.x)
      l4_st(yq, yo + i, l4_ld(xq, qo + i) * scale);
)cuda";
  os << R"cuda(    if (pi < 0 || pi >= M)
      continue;
    const long long ko = (b * K_S + t) * K_W, vo = (b * V_S + t) * V_W;
    const long long co = (b * M + pi) * RW;
)cuda" << slice("e", "RW");
  if (kRope)
    os << slice("k", "HK")
       << ropeHeads(g.kNorm ? &*g.kNorm : nullptr, "k0", "k1", "xk", "ko", "kc",
                    "co");
  else
    os << "    for (long long i = e0 + threadIdx.x; i < e1; i += blockDim.x)\n"
          "      l4_st(kc, co + i, l4_ld(xk, ko + i));\n";
  os << R"cuda(    for (long long i = e0 + threadIdx.x; i < e1; i += blockDim.x)
      l4_st(vc, co + i, l4_ld(xv, vo + i));
  }
)cuda";
  b.threads = 128;
  b.blocks = gridFor(maxRows(xk) * parts, 1);
  return llvm::Error::success();
}

llvm::Error emitTemperatureScale(OpContext &ctx) {
  auto op = cast<l4::TemperatureScaleOp>(ctx.op);
  const View &x = ctx.operands[0], &pos = ctx.operands[1], &y = ctx.results[0];
  auto lt = liveRows(ctx, {&x, &pos, &y});
  if (!lt)
    return lt.takeError();
  if (y.inner != x.inner)
    return ctx.fail("expected the result to have the input's shape");
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << rowConstants(b, "X", x) << rowConstants(b, "Y", y)
     << stride(b, "P_S", pos.rowsPerBatch) << "  const long long LT = " << *lt
     << ";\n"
     << R"cuda(  for (long long r = blockIdx.x; r < B * LT; r += gridDim.x) {
    const long long b = r / LT, t = r - b * LT;
    const float p = (float)l4_ldi(pos, b * P_S + t);
)cuda" << temperatureScale(op)
     << R"cuda(    const long long xo = (b * X_S + t) * X_W, yo = (b * Y_S + t) * Y_W;
    for (long long i = threadIdx.x; i < X_W; i += blockDim.x)
      l4_st(y, yo + i, l4_ld(x, xo + i) * scale);
  }
)cuda";
  b.threads = 256;
  b.blocks = gridFor(maxRows(x), 1);
  return llvm::Error::success();
}

llvm::Error emitKvCacheUpdate(OpContext &ctx) {
  const View &cache = ctx.operands[0], &upd = ctx.operands[1],
             &pos = ctx.operands[2], &y = ctx.results[0];
  auto lt = liveRows(ctx, {&upd, &pos});
  if (!lt)
    return lt.takeError();
  auto shape = cache.shape();
  if (shape.size() != 4 || !cache.hasBatch || cache.hasSeq)
    return ctx.fail("expected a cache [B, M, Hkv, d]");
  if (y.buf->region != cache.buf->region || y.buf->offset != cache.buf->offset)
    return ctx.fail("the updated cache must be placed on the cache it "
                    "updates (in place)");
  // The body writes the cache through its result, which is the same bytes.
  ctx.operands[0].referenced = false;
  int64_t rowWidth = shape[2] * shape[3];
  if (upd.inner != rowWidth)
    return ctx.fail("expected the update's rows to match the cache's");
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << constant("M", shape[1], "cache rows") << constant("RW", rowWidth)
     << rowConstants(b, "U", upd) << stride(b, "P_S", pos.rowsPerBatch)
     << "  const long long LT = " << *lt << ";\n"
     << R"cuda(  // In place: y is the cache. Positions are checked on the host; a row
  // outside the cache is dropped.
  for (long long r = blockIdx.x; r < B * LT; r += gridDim.x) {
    const long long b = r / LT, t = r - b * LT;
    const long long p = l4_ldi(pos, b * P_S + t);
    if (p < 0 || p >= M)
      continue;
    const long long co = (b * M + p) * RW, uo = (b * U_S + t) * U_W;
    for (long long i = threadIdx.x; i < RW; i += blockDim.x)
      l4_st(y, co + i, l4_ld(upd, uo + i));
  }
)cuda";
  b.threads = 128;
  b.blocks = gridFor(maxRows(upd), 1);
  return llvm::Error::success();
}

std::string topkScoresRow(llvm::StringRef x, llvm::StringRef xo,
                          llvm::StringRef y, llvm::StringRef yo) {
  return llvm::formatv(R"cuda(    for (long long e = 0; e < E; ++e)
      l4_st({2}, {3} + e, 0.0f);
    long long prev = -1;
    float prevV = 0.0f;
    for (long long k = 0; k < TOPK; ++k) {{
      float bestV = 0.0f;
      const long long best = @B@_next({0}, {1}, E, prev, prevV, bestV);
      if (best < 0)
        break;
      l4_st({2}, {3} + best, 1.0f / (1.0f + expf(-bestV)));
      prev = best;
      prevV = bestV;
    }
)cuda",
                       x, xo, y, yo)
      .str();
}

llvm::Error emitRouterScores(OpContext &ctx) {
  auto op = cast<l4::RouterScoresOp>(ctx.op);
  const View &x = ctx.operands[0], &y = ctx.results[0];
  auto lt = liveRows(ctx, {&x, &y});
  if (!lt)
    return lt.takeError();
  int64_t experts = x.shape().back();
  if (x.inner != experts || y.inner != experts)
    return ctx.fail("expected logits [B, S, E]");
  Body &b = ctx.body;
  b.globals += topkGlobals();
  llvm::raw_string_ostream os(b.code);
  os << constant("E", experts)
     << constant("TOPK", std::min<int64_t>(op.getTopK(), experts))
     << rowConstants(b, "X", x) << rowConstants(b, "Y", y)
     << "  const long long LT = " << *lt << ";\n"
     << R"cuda(  // One thread per token: the k-th pick is the best logit after the
  // (k-1)-th in topk order, so no per-expert flags are needed.
  for (long long r = blockIdx.x * (long long)blockDim.x + threadIdx.x; r < B * LT;
       r += (long long)gridDim.x * blockDim.x) {
    const long long b = r / LT, t = r - b * LT;
    const long long xo = (b * X_S + t) * X_W, yo = (b * Y_S + t) * Y_W;
)cuda" << topkScoresRow("x", "xo", "y", "yo")
     << "  }\n";
  b.threads = 128;
  b.blocks = gridFor(maxRows(x), b.threads);
  return llvm::Error::success();
}

llvm::Error emitElementwise(OpContext &ctx, llvm::StringRef expr) {
  // One operand (va) or two (va, vb); the result takes its own dtype.
  const View &a = ctx.operands[0], &y = ctx.results[0];
  const View &c = ctx.operands.size() > 1 ? ctx.operands[1] : a;
  const bool two = ctx.operands.size() > 1;
  if (!a.hasBatch && !c.hasBatch && !y.hasBatch) {
    // Parameter-shaped (a tied embedding's two gradients): every element.
    if (a.inner != y.inner || c.inner != y.inner)
      return ctx.fail("expected operands of the result's shape");
    Body &b = ctx.body;
    llvm::raw_string_ostream os(b.code);
    os << constant("N", y.inner)
       << llvm::formatv(R"cuda(  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < N;
       i += (long long)gridDim.x * blockDim.x) {{
    const float va = l4_ld({0}, i);
)cuda",
                        a.name);
    if (two)
      os << "    const float vb = l4_ld(" << c.name << ", i);\n";
    os << "    l4_st(y, i, " << expr << ");\n  }\n";
    b.threads = 256;
    b.blocks = gridFor(uint64_t(y.inner), b.threads);
    return llvm::Error::success();
  }
  auto lt = two ? liveRows(ctx, {&a, &c, &y}) : liveRows(ctx, {&a, &y});
  if (!lt)
    return lt.takeError();
  if (a.inner != y.inner || c.inner != y.inner)
    return ctx.fail("expected operands of the result's shape");
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << constant("W", y.inner) << stride(b, "A_S", a.rowsPerBatch);
  if (two)
    os << stride(b, "C_S", c.rowsPerBatch);
  os << stride(b, "Y_S", y.rowsPerBatch)
     << "  const long long LT = " << *lt << ";\n"
     << llvm::formatv(R"cuda(  const long long n = B * LT * W;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {{
    const long long e = i % W, r = i / W, b = r / LT, t = r - b * LT;
    const float va = l4_ld({0}, (b * A_S + t) * W + e);
)cuda",
                      a.name);
  if (two)
    os << "    const float vb = l4_ld(" << c.name
       << ", (b * C_S + t) * W + e);\n";
  os << "    l4_st(y, (b * Y_S + t) * W + e, " << expr << ");\n  }\n";
  b.threads = 256;
  b.blocks = gridFor(maxRows(y) * y.inner, b.threads);
  return llvm::Error::success();
}

llvm::Error emitTakeLast(OpContext &ctx) {
  const View &x = ctx.operands[0], &y = ctx.results[0];
  if (!x.hasSeq || !y.hasBatch || y.hasSeq || y.inner != x.inner)
    return ctx.fail("expected x [B, S, D] and a result [B, 1, D]");
  Body &b = ctx.body;
  llvm::raw_string_ostream os(b.code);
  os << constant("W", x.inner) << stride(b, "X_S", x.rowsPerBatch)
     << R"cuda(  if (T <= 0)
    return;
  const long long n = B * W;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const long long e = i % W, b = i / W;
    l4_st(y, b * W + e, l4_ld(x, (b * X_S + T - 1) * W + e));
  }
)cuda";
  b.threads = 256;
  b.blocks = gridFor(uint64_t(y.bmax) * y.inner, b.threads);
  return llvm::Error::success();
}

} // namespace l4c::cuda
