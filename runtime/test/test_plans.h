//===- test_plans.h - hand-built plans for the runtime tests --*- C++ -*-===//
//
// A mutable description of a plan that serialises with FlatBufferBuilder, so
// tests can build valid plans and then break one field at a time, plus a tiny
// two-layer Llama 4 shaped model (RoPE + QK norm + chunked attention, then
// NoPE + temperature tuning + MoE) as forward or prefill/decode plans.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_RUNTIME_TEST_TEST_PLANS_H
#define L4C_RUNTIME_TEST_TEST_PLANS_H

#include "l4c/runtime/plan_generated.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace l4c::test {

namespace pl = l4c::plan;

struct AttrSpec {
  std::string name;
  pl::AttrKind kind = pl::AttrKind::Int;
  int64_t i = 0;
  double f = 0;
  std::string s;
};
inline AttrSpec attrI(std::string n, int64_t v) {
  return {std::move(n), pl::AttrKind::Int, v};
}
inline AttrSpec attrF(std::string n, double v) {
  return {std::move(n), pl::AttrKind::Float, 0, v};
}
inline AttrSpec attrS(std::string n, std::string v) {
  return {std::move(n), pl::AttrKind::String, 0, 0, std::move(v)};
}

struct BufferSpec {
  std::string name;
  pl::Region region = pl::Region::Arena;
  uint64_t offset = 0, size = 0;
  pl::DType dtype = pl::DType::F32;
  std::vector<int64_t> shape;
  std::vector<pl::DimKind> dims;
};

struct OpSpec {
  std::string op;
  std::vector<AttrSpec> attrs;
  std::vector<uint32_t> operands, results;
};

/// A TMA tensor map (plan.fbs, TensorMap); dims, strides and box innermost
/// first.
struct TensorMapSpec {
  pl::Region region = pl::Region::Arena;
  uint64_t offset = 0;
  pl::DType dtype = pl::DType::BF16;
  std::vector<uint64_t> dims, strides;
  std::vector<uint32_t> box;
  uint8_t swizzle = 0;
};

struct KernelSpec {
  std::string name, kind;
  std::vector<OpSpec> ops;
  std::vector<uint32_t> temps; ///< results the kernel consumes itself
  std::string tileConfig, signature; ///< l4-tune's (CUDA plans)
  int32_t alternativeOf = -1;        ///< a tuning candidate of that kernel
  std::vector<TensorMapSpec> tensorMaps; ///< CUDA: passed after B and T
};

/// The kernel's tensor maps for FlatBufferBuilder (0 when it has none).
inline flatbuffers::Offset<
    flatbuffers::Vector<flatbuffers::Offset<pl::TensorMap>>>
createTensorMaps(flatbuffers::FlatBufferBuilder &fbb, const KernelSpec &k) {
  if (k.tensorMaps.empty())
    return 0;
  std::vector<flatbuffers::Offset<pl::TensorMap>> maps;
  for (const TensorMapSpec &m : k.tensorMaps)
    maps.push_back(pl::CreateTensorMap(
        fbb, m.region, m.offset, m.dtype, fbb.CreateVector(m.dims),
        fbb.CreateVector(m.strides), fbb.CreateVector(m.box), m.swizzle));
  return fbb.CreateVector(maps);
}

struct IoSpec {
  std::string name;
  uint32_t buffer = 0;
};

struct ProgramSpec {
  std::string name;
  std::vector<IoSpec> inputs, outputs;
  std::vector<uint32_t> steps;
};

inline size_t elemSize(pl::DType t) {
  return t == pl::DType::I64                             ? 8
         : (t == pl::DType::BF16 || t == pl::DType::F16) ? 2
                                                         : 4;
}

/// "BS.." -> batch, seq, static, static.
inline std::vector<pl::DimKind> dimsOf(const std::string &code) {
  std::vector<pl::DimKind> d;
  for (char c : code)
    d.push_back(c == 'B'   ? pl::DimKind::Batch
                : c == 'S' ? pl::DimKind::Seq
                           : pl::DimKind::Static);
  return d;
}

struct PlanSpec {
  uint32_t version = 2;
  std::string programKind = "forward", target = "cpu", precision = "f32",
              source = "test";
  int64_t maxBatch = 1, maxSeq = 1, vocab = 0;
  uint64_t regionSize[4] = {0, 0, 0, 0};
  uint32_t meshRanks = 1;
  std::vector<BufferSpec> buffers;
  std::vector<std::pair<uint32_t, std::string>> weights;
  std::vector<KernelSpec> kernels;
  std::vector<ProgramSpec> programs;

  /// A new buffer at the end of its region, 64-byte aligned.
  uint32_t add(const std::string &name, pl::Region region,
               std::vector<int64_t> shape, const std::string &dims,
               pl::DType dtype = pl::DType::F32) {
    uint64_t numel = 1;
    for (int64_t e : shape)
      numel *= uint64_t(e);
    BufferSpec b{name,
                 region,
                 regionSize[int(region)],
                 numel * elemSize(dtype),
                 dtype,
                 std::move(shape),
                 dimsOf(dims)};
    regionSize[int(region)] = (b.offset + b.size + 63) / 64 * 64;
    buffers.push_back(std::move(b));
    return uint32_t(buffers.size() - 1);
  }
  uint32_t act(const std::string &name, std::vector<int64_t> shape,
               const std::string &dims) {
    return add(name, pl::Region::Arena, std::move(shape), dims);
  }
  /// Another buffer over the same bytes (a reshape or in-place result).
  uint32_t view(uint32_t of, const std::string &name,
                std::vector<int64_t> shape, const std::string &dims) {
    BufferSpec b = buffers[of];
    b.name = name;
    b.shape = std::move(shape);
    b.dims = dimsOf(dims);
    buffers.push_back(std::move(b));
    return uint32_t(buffers.size() - 1);
  }
  uint32_t weight(const std::string &hf, std::vector<int64_t> shape) {
    std::string dims(shape.size(), '.');
    uint32_t b = add(hf, pl::Region::Weights, std::move(shape), dims);
    weights.push_back({b, hf});
    return b;
  }
  uint32_t kernel(const std::string &name, const std::string &kind,
                  std::vector<OpSpec> ops) {
    kernels.push_back({name, kind, std::move(ops)});
    return uint32_t(kernels.size() - 1);
  }

  std::vector<uint8_t> serialize() const {
    flatbuffers::FlatBufferBuilder fbb(1024);
    std::vector<flatbuffers::Offset<pl::Buffer>> bufs;
    for (const BufferSpec &b : buffers)
      bufs.push_back(pl::CreateBuffer(
          fbb, fbb.CreateString(b.name), b.region, b.offset, b.size, b.dtype,
          fbb.CreateVector(b.shape), fbb.CreateVector(b.dims)));
    std::vector<flatbuffers::Offset<pl::WeightBinding>> ws;
    for (auto &[b, n] : weights)
      ws.push_back(pl::CreateWeightBinding(fbb, b, fbb.CreateString(n)));
    std::vector<flatbuffers::Offset<pl::Kernel>> ks;
    for (const KernelSpec &k : kernels) {
      std::vector<flatbuffers::Offset<pl::SemanticOp>> ops;
      for (const OpSpec &o : k.ops) {
        std::vector<flatbuffers::Offset<pl::Attr>> attrs;
        for (const AttrSpec &a : o.attrs)
          attrs.push_back(pl::CreateAttr(
              fbb, fbb.CreateString(a.name), a.kind, a.i, a.f,
              a.kind == pl::AttrKind::String ? fbb.CreateString(a.s) : 0));
        ops.push_back(pl::CreateSemanticOp(
            fbb, fbb.CreateString(o.op), fbb.CreateVector(attrs),
            fbb.CreateVector(o.operands), fbb.CreateVector(o.results)));
      }
      ks.push_back(pl::CreateKernel(
          fbb, fbb.CreateString(k.name), fbb.CreateString(k.kind),
          fbb.CreateVector(ops), 0, 0, 0, 0, 0, 0,
          k.temps.empty() ? 0 : fbb.CreateVector(k.temps),
          fbb.CreateString(k.tileConfig), fbb.CreateString(k.signature),
          k.alternativeOf, createTensorMaps(fbb, k)));
    }
    std::vector<flatbuffers::Offset<pl::Program>> ps;
    for (const ProgramSpec &p : programs) {
      auto io = [&](const std::vector<IoSpec> &v) {
        std::vector<flatbuffers::Offset<pl::IoBinding>> out;
        for (const IoSpec &b : v)
          out.push_back(
              pl::CreateIoBinding(fbb, fbb.CreateString(b.name), b.buffer));
        return fbb.CreateVector(out);
      };
      auto in = io(p.inputs), out = io(p.outputs);
      ps.push_back(pl::CreateProgram(fbb, fbb.CreateString(p.name), in, out,
                                     fbb.CreateVector(p.steps)));
    }
    auto model = pl::CreateModelInfo(fbb, fbb.CreateString(source), vocab, 2, 0,
                                     fbb.CreateString("{}"));
    auto root = pl::CreatePlan(
        fbb, version, model, fbb.CreateString(programKind),
        fbb.CreateString(target), fbb.CreateString(precision), maxBatch, maxSeq,
        regionSize[0], regionSize[1], regionSize[2], regionSize[3],
        fbb.CreateVector(bufs), fbb.CreateVector(ws), fbb.CreateVector(ks),
        fbb.CreateVector(ps), pl::CreateMesh(fbb, meshRanks));
    pl::FinishPlanBuffer(fbb, root);
    return std::vector<uint8_t>(fbb.GetBufferPointer(),
                                fbb.GetBufferPointer() + fbb.GetSize());
  }
};

inline OpSpec op(std::string name, std::vector<uint32_t> operands,
                 uint32_t result, std::vector<AttrSpec> attrs = {}) {
  return {std::move(name), std::move(attrs), std::move(operands), {result}};
}

/// embedding -> rms_norm -> linear: the smallest forward plan.
inline PlanSpec linearPlan(int64_t B = 2, int64_t S = 4, int64_t V = 16,
                           int64_t D = 8) {
  PlanSpec p;
  p.maxBatch = B;
  p.maxSeq = S;
  p.vocab = V;
  uint32_t embed = p.weight("model.embed_tokens.weight", {V, D});
  uint32_t norm = p.weight("model.norm.weight", {D});
  uint32_t head = p.weight("lm_head.weight", {V, D});
  uint32_t ids =
      p.add("input_ids", pl::Region::Io, {B, S}, "BS", pl::DType::I64);
  uint32_t pos =
      p.add("positions", pl::Region::Io, {B, S}, "BS", pl::DType::I64);
  uint32_t h = p.act("h", {B, S, D}, "BS.");
  uint32_t x = p.act("x", {B, S, D}, "BS.");
  uint32_t logits = p.add("logits", pl::Region::Io, {B, S, V}, "BS.");
  std::vector<uint32_t> steps = {
      p.kernel("model.embed_tokens", "gather",
               {op("embedding", {embed, ids}, h)}),
      p.kernel("model.norm", "norm",
               {op("rms_norm", {h, norm}, x, {attrF("eps", 1e-5)})}),
      p.kernel("lm_head", "gemm", {op("linear", {x, head}, logits)}),
  };
  p.programs.push_back({"forward",
                        {{"input_ids", ids}, {"positions", pos}},
                        {{"logits", logits}},
                        steps});
  return p;
}

/// The tiny model's hyper-parameters; layer 0 uses RoPE, QK norm and chunked
/// attention with a dense MLP, layer 1 NoPE with temperature tuning and MoE.
struct TinyConfig {
  int64_t V = 64, D = 16, H = 4, Hkv = 2, d = 4, Imlp = 12, I = 8, E = 4,
          topK = 1;
  double eps = 1e-5, theta = 10000, floorScale = 4, attnScale = 0.1;
  int64_t chunk = 3;
  std::string scaling = "llama3";
  double factor = 8, lowFreq = 1, highFreq = 4;
  int64_t origMax = 16;
};

/// Buffers and kernels of one program of the tiny model over S tokens.
/// kind: "forward" (attention over the step's own keys), "prefill" or
/// "decode" (through the caches; prefill keeps the last row only).
inline ProgramSpec tinyProgram(PlanSpec &p, const TinyConfig &c,
                               const std::string &kind, int64_t S,
                               const std::vector<uint32_t> &w,
                               const std::vector<uint32_t> &caches) {
  const int64_t B = p.maxBatch, D = c.D, H = c.H, Hkv = c.Hkv, d = c.d;
  std::string pre = kind + ".";
  uint32_t ids =
      p.add(pre + "input_ids", pl::Region::Io, {B, S}, "BS", pl::DType::I64);
  uint32_t pos =
      p.add(pre + "positions", pl::Region::Io, {B, S}, "BS", pl::DType::I64);
  std::vector<uint32_t> steps;
  auto k1 = [&](const std::string &name, const std::string &kk, OpSpec o) {
    steps.push_back(p.kernel(pre + name, kk, {std::move(o)}));
  };
  size_t wi = 0;
  auto W = [&]() { return w[wi++]; };
  uint32_t h = p.act(pre + "h0", {B, S, D}, "BS.");
  k1("embed", "gather", op("embedding", {W(), ids}, h));
  auto linear = [&](const std::string &name, uint32_t x, uint32_t weight,
                    int64_t N) {
    uint32_t y = p.act(pre + name, {B, S, N}, "BS.");
    k1(name, "gemm", op("linear", {x, weight}, y));
    return y;
  };
  for (int layer = 0; layer < 2; ++layer) {
    std::string l = "l" + std::to_string(layer) + ".";
    uint32_t x = p.act(pre + l + "x", {B, S, D}, "BS.");
    k1(l + "in_norm", "norm",
       op("rms_norm", {h, W()}, x, {attrF("eps", c.eps)}));
    uint32_t q = linear(l + "q", x, W(), H * d);
    uint32_t k = linear(l + "k", x, W(), Hkv * d);
    uint32_t v = linear(l + "v", x, W(), Hkv * d);
    uint32_t qv = p.view(q, "view", {B, S, H, d}, "BS..");
    uint32_t kv = p.view(k, "view", {B, S, Hkv, d}, "BS..");
    uint32_t vv = p.view(v, "view", {B, S, Hkv, d}, "BS..");
    uint32_t q3, k3;
    if (layer == 0) {
      // RoPE then QK norm, fused into one kernel per tensor.
      std::vector<AttrSpec> ra = {attrF("theta", c.theta),
                                  attrS("scaling", c.scaling),
                                  attrF("factor", c.factor),
                                  attrF("low_freq_factor", c.lowFreq),
                                  attrF("high_freq_factor", c.highFreq),
                                  attrI("original_max_position", c.origMax)};
      uint32_t q2 = p.act(pre + l + "q_rope", {B, S, H, d}, "BS..");
      uint32_t k2 = p.act(pre + l + "k_rope", {B, S, Hkv, d}, "BS..");
      q3 = p.act(pre + l + "q_norm", {B, S, H, d}, "BS..");
      k3 = p.act(pre + l + "k_norm", {B, S, Hkv, d}, "BS..");
      steps.push_back(
          p.kernel(pre + l + "q_rope", "rope",
                   {op("rope", {qv, pos}, q2, ra),
                    op("l2_norm", {q2}, q3, {attrF("eps", c.eps)})}));
      steps.push_back(
          p.kernel(pre + l + "k_rope", "rope",
                   {op("rope", {kv, pos}, k2, ra),
                    op("l2_norm", {k2}, k3, {attrF("eps", c.eps)})}));
    } else {
      q3 = p.act(pre + l + "q_temp", {B, S, H, d}, "BS..");
      k1(l + "q_temp", "scale",
         op("temperature_scale", {qv, pos}, q3,
            {attrF("floor_scale", c.floorScale),
             attrF("attn_scale", c.attnScale)}));
      k3 = kv;
    }
    uint32_t keys = k3, values = vv;
    if (kind != "forward") {
      uint32_t kc = caches[2 * layer], vc = caches[2 * layer + 1];
      keys = p.view(kc, pre + l + "k_cache'", p.buffers[kc].shape, "B...");
      values = p.view(vc, pre + l + "v_cache'", p.buffers[vc].shape, "B...");
      k1(l + "k_cache", "copy", op("kv_cache_update", {kc, k3, pos}, keys));
      k1(l + "v_cache", "copy", op("kv_cache_update", {vc, vv, pos}, values));
    }
    uint32_t a = p.act(pre + l + "attn", {B, S, H, d}, "BS..");
    k1(l + "attn", "attention",
       op("attention", {q3, keys, values, pos}, a,
          {attrF("scale", 1.0 / std::sqrt(double(d))),
           attrI("chunk_size", layer == 0 ? c.chunk : 0)}));
    uint32_t a2 = p.view(a, "view", {B, S, H * d}, "BS.");
    uint32_t o = linear(l + "o", a2, W(), D);
    uint32_t h1 = p.act(pre + l + "h1", {B, S, D}, "BS.");
    k1(l + "residual1", "eltwise", op("add", {h, o}, h1));
    uint32_t x2 = p.act(pre + l + "x2", {B, S, D}, "BS.");
    k1(l + "post_norm", "norm",
       op("rms_norm", {h1, W()}, x2, {attrF("eps", c.eps)}));
    uint32_t ff;
    if (layer == 0) {
      uint32_t g = linear(l + "gate", x2, W(), c.Imlp);
      uint32_t u = linear(l + "up", x2, W(), c.Imlp);
      uint32_t m = p.act(pre + l + "mlp", {B, S, c.Imlp}, "BS.");
      k1(l + "swiglu", "eltwise", op("swiglu", {g, u}, m));
      ff = linear(l + "down", m, W(), D);
    } else {
      uint32_t rl = linear(l + "router", x2, W(), c.E);
      uint32_t sc = p.act(pre + l + "scores", {B, S, c.E}, "BS.");
      k1(l + "scores", "router",
         op("router_scores", {rl}, sc, {attrI("top_k", c.topK)}));
      uint32_t gu = W(), dn = W();
      uint32_t r = p.act(pre + l + "routed", {B, S, D}, "BS.");
      k1(l + "experts", "moe", op("moe_experts", {x2, sc, gu, dn}, r));
      uint32_t g = linear(l + "shared_gate", x2, W(), c.I);
      uint32_t u = linear(l + "shared_up", x2, W(), c.I);
      uint32_t m = p.act(pre + l + "shared", {B, S, c.I}, "BS.");
      k1(l + "shared_swiglu", "eltwise", op("swiglu", {g, u}, m));
      uint32_t sd = linear(l + "shared_down", m, W(), D);
      ff = p.act(pre + l + "ff", {B, S, D}, "BS.");
      k1(l + "moe_sum", "eltwise", op("add", {r, sd}, ff));
    }
    uint32_t h2 = p.act(pre + l + "h2", {B, S, D}, "BS.");
    k1(l + "residual2", "eltwise", op("add", {h1, ff}, h2));
    h = h2;
  }
  uint32_t n = p.act(pre + "norm", {B, S, D}, "BS.");
  k1("norm", "norm", op("rms_norm", {h, W()}, n, {attrF("eps", c.eps)}));
  uint32_t head = W();
  uint32_t logits;
  if (kind == "prefill") {
    uint32_t last = p.act(pre + "last", {B, 1, D}, "B..");
    k1("take_last", "copy", op("take_last", {n}, last));
    logits = p.add(pre + "logits", pl::Region::Io, {B, 1, c.V}, "B..");
    k1("lm_head", "gemm", op("linear", {last, head}, logits));
  } else {
    logits = p.add(pre + "logits", pl::Region::Io, {B, S, c.V}, "BS.");
    k1("lm_head", "gemm", op("linear", {n, head}, logits));
  }
  return {kind,
          {{"input_ids", ids}, {"positions", pos}},
          {{"logits", logits}},
          steps};
}

/// The weights of the tiny model in the order tinyProgram consumes them.
inline std::vector<std::pair<std::string, std::vector<int64_t>>>
tinyWeights(const TinyConfig &c) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> w;
  w.push_back({"model.embed_tokens.weight", {c.V, c.D}});
  for (int layer = 0; layer < 2; ++layer) {
    std::string l = "model.layers." + std::to_string(layer) + ".";
    w.push_back({l + "input_layernorm.weight", {c.D}});
    w.push_back({l + "self_attn.q_proj.weight", {c.H * c.d, c.D}});
    w.push_back({l + "self_attn.k_proj.weight", {c.Hkv * c.d, c.D}});
    w.push_back({l + "self_attn.v_proj.weight", {c.Hkv * c.d, c.D}});
    w.push_back({l + "self_attn.o_proj.weight", {c.D, c.H * c.d}});
    w.push_back({l + "post_attention_layernorm.weight", {c.D}});
    std::string ff = l + "feed_forward.";
    if (layer == 0) {
      w.push_back({ff + "gate_proj.weight", {c.Imlp, c.D}});
      w.push_back({ff + "up_proj.weight", {c.Imlp, c.D}});
      w.push_back({ff + "down_proj.weight", {c.D, c.Imlp}});
    } else {
      w.push_back({ff + "router.weight", {c.E, c.D}});
      w.push_back({ff + "experts.gate_up_proj", {c.E, c.D, 2 * c.I}});
      w.push_back({ff + "experts.down_proj", {c.E, c.I, c.D}});
      w.push_back({ff + "shared_expert.gate_proj.weight", {c.I, c.D}});
      w.push_back({ff + "shared_expert.up_proj.weight", {c.I, c.D}});
      w.push_back({ff + "shared_expert.down_proj.weight", {c.D, c.I}});
    }
  }
  w.push_back({"model.norm.weight", {c.D}});
  w.push_back({"lm_head.weight", {c.V, c.D}});
  return w;
}

/// The tiny model as a "forward" or "generate" plan for batch B, length S.
inline PlanSpec tinyModelPlan(const std::string &programKind, int64_t B,
                              int64_t S, const TinyConfig &c = TinyConfig()) {
  PlanSpec p;
  p.programKind = programKind;
  p.maxBatch = B;
  p.maxSeq = S;
  p.vocab = c.V;
  p.source = "tiny";
  std::vector<uint32_t> w;
  for (auto &[name, shape] : tinyWeights(c))
    w.push_back(p.weight(name, shape));
  if (programKind == "forward") {
    p.programs.push_back(tinyProgram(p, c, "forward", S, w, {}));
    return p;
  }
  std::vector<uint32_t> caches;
  for (int layer = 0; layer < 2; ++layer)
    for (const char *kv : {"k", "v"})
      caches.push_back(p.add("cache.l" + std::to_string(layer) + "." + kv,
                             pl::Region::Cache, {B, S, c.Hkv, c.d}, "B..."));
  p.programs.push_back(tinyProgram(p, c, "prefill", S, w, caches));
  // Decode reuses the I/O bytes of prefill: programs run one at a time.
  uint64_t ioEnd = p.regionSize[int(pl::Region::Io)];
  p.regionSize[int(pl::Region::Io)] = 0;
  p.programs.push_back(tinyProgram(p, c, "decode", 1, w, caches));
  p.regionSize[int(pl::Region::Io)] =
      std::max(ioEnd, p.regionSize[int(pl::Region::Io)]);
  return p;
}

} // namespace l4c::test

#endif // L4C_RUNTIME_TEST_TEST_PLANS_H
