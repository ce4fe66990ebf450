//===- cpu_forward_test.cpp - Llama 4 forward from CPU kernels vs HF -----===//
//
// Composes the CPU kernels into a full Llama4ForCausalLM forward with a KV
// cache and checks it against Hugging Face's float64 golden outputs: prefill
// logits to 1e-4 of their range, and greedy continuations token for token.
//
//===----------------------------------------------------------------------===//
#include "cpu/kernels.h"
#include "io/json.h"
#include "io/safetensors.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

using namespace l4c;

namespace {

using Vec = std::vector<float>;

// The config.json fields that change the math (spec section 1).
struct Config {
  size_t V = 0, D = 0, L = 0, H = 0, Hkv = 0, d = 0, I = 0, Imlp = 0, E = 0,
         topK = 0;
  float eps = 0, floorScale = 0, attnScale = 0;
  int64_t chunk = 0;
  bool qkNorm = false, tempTuning = false, tied = false;
  std::vector<bool> moe, useRope, chunked;
  double ropeTheta = 0, ropeFactor = 0, ropeLow = 0, ropeHigh = 0,
         ropeOrigMax = 0;
  std::string ropeType;
};

// Field readers that record the first missing or mistyped field in `err`.
struct Reader {
  const io::JsonValue &obj;
  std::string &err;
  const io::JsonValue *field(const io::JsonValue &o, const char *name) {
    const io::JsonValue *v = o.get(name);
    if (!v && err.empty())
      err = std::string("config.json: missing field ") + name;
    return v;
  }
  double num(const char *name, const io::JsonValue *o = nullptr) {
    const io::JsonValue *v = field(o ? *o : obj, name);
    if (v && !v->isNumber() && err.empty())
      err = std::string("config.json: field ") + name + " is not a number";
    return v && v->isNumber() ? v->number : 0;
  }
  size_t count(const char *name) { return size_t(num(name)); }
  // attn_temperature_tuning is stored as 4 in released configs: truthiness.
  bool flag(const char *name) {
    const io::JsonValue *v = field(obj, name);
    if (!v)
      return false;
    return v->isBool() ? v->boolean : v->isNumber() && v->number != 0;
  }
  const io::JsonValue *array(const char *name) {
    const io::JsonValue *v = field(obj, name);
    if (v && !v->isArray() && err.empty())
      err = std::string("config.json: field ") + name + " is not an array";
    return v && v->isArray() ? v : nullptr;
  }
};

bool readText(const std::string &path, std::string &out) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    return false;
  std::ostringstream ss;
  ss << in.rdbuf();
  out = ss.str();
  return true;
}

std::string parseConfig(const std::string &path, Config &c) {
  std::string text;
  if (!readText(path, text))
    return path + ": cannot read";
  io::JsonValue root;
  io::JsonError jerr;
  if (!io::parseJson(text, root, jerr))
    return path + ": " + jerr.message();
  std::string err;
  Reader r{root, err};
  c.V = r.count("vocab_size");
  c.D = r.count("hidden_size");
  c.L = r.count("num_hidden_layers");
  c.H = r.count("num_attention_heads");
  c.Hkv = r.count("num_key_value_heads");
  c.d = r.count("head_dim");
  c.I = r.count("intermediate_size");
  c.Imlp = r.count("intermediate_size_mlp");
  c.E = r.count("num_local_experts");
  c.topK = r.count("num_experts_per_tok");
  c.eps = float(r.num("rms_norm_eps"));
  c.chunk = int64_t(r.num("attention_chunk_size"));
  c.qkNorm = r.flag("use_qk_norm");
  c.tempTuning = r.flag("attn_temperature_tuning");
  c.floorScale = float(r.num("floor_scale"));
  c.attnScale = float(r.num("attn_scale"));
  c.tied = r.flag("tie_word_embeddings");
  c.moe.assign(c.L, false);
  c.useRope.assign(c.L, false);
  c.chunked.assign(c.L, false);
  if (const io::JsonValue *a = r.array("moe_layers"))
    for (const io::JsonValue &v : a->array)
      if (v.isNumber() && v.number >= 0 && size_t(v.number) < c.L)
        c.moe[size_t(v.number)] = true;
  const io::JsonValue *nope = r.array("no_rope_layers");
  const io::JsonValue *types = r.array("layer_types");
  if (nope && nope->array.size() != c.L)
    return path + ": no_rope_layers does not have num_hidden_layers entries";
  if (types && types->array.size() != c.L)
    return path + ": layer_types does not have num_hidden_layers entries";
  for (size_t i = 0; nope && types && i < c.L; ++i) {
    c.useRope[i] = nope->array[i].number != 0; // 1 means the layer uses RoPE
    c.chunked[i] = types->array[i].string == "chunked_attention";
  }
  if (const io::JsonValue *rope = r.field(root, "rope_parameters")) {
    c.ropeTheta = r.num("rope_theta", rope);
    const io::JsonValue *type = rope->get("rope_type");
    c.ropeType = type && type->isString() ? type->string : "default";
    if (c.ropeType == "llama3") {
      c.ropeFactor = r.num("factor", rope);
      c.ropeLow = r.num("low_freq_factor", rope);
      c.ropeHigh = r.num("high_freq_factor", rope);
      c.ropeOrigMax = r.num("original_max_position_embeddings", rope);
    }
  }
  if (!err.empty())
    return path + ": " + err;
  if (!c.H || !c.Hkv || c.H % c.Hkv || !c.d || !c.D)
    return path + ": inconsistent head counts";
  return "";
}

struct Layer {
  Vec inNorm, postNorm, q, k, v, o;
  Vec router, gateUp, down; // routed experts (MoE layers)
  Vec ffGate, ffUp, ffDown; // shared expert (MoE) or dense MLP
};

struct Model {
  Config cfg;
  Vec embed, lmHead, norm, invFreq;
  std::vector<Layer> layers;
};

// Loads every tensor the forward needs, by HF name.
std::string loadModel(const std::string &dir, Model &m) {
  if (std::string err = parseConfig(dir + "/config.json", m.cfg); !err.empty())
    return err;
  const Config &c = m.cfg;
  io::Checkpoint ckpt;
  if (io::Status s = io::Checkpoint::open(dir, ckpt); !s.ok())
    return s.error;
  std::string err;
  auto load = [&](const std::string &name, Vec &dst, size_t numel) {
    dst.resize(numel);
    if (io::Status s = ckpt.read(name, io::DType::F32, dst.data(), numel);
        !s.ok() && err.empty())
      err = s.error;
  };
  load("model.embed_tokens.weight", m.embed, c.V * c.D);
  load("model.norm.weight", m.norm, c.D);
  if (!c.tied)
    load("lm_head.weight", m.lmHead, c.V * c.D);
  m.layers.resize(c.L);
  for (size_t i = 0; i < c.L; ++i) {
    Layer &l = m.layers[i];
    std::string p = "model.layers." + std::to_string(i) + ".";
    load(p + "input_layernorm.weight", l.inNorm, c.D);
    load(p + "post_attention_layernorm.weight", l.postNorm, c.D);
    load(p + "self_attn.q_proj.weight", l.q, c.H * c.d * c.D);
    load(p + "self_attn.k_proj.weight", l.k, c.Hkv * c.d * c.D);
    load(p + "self_attn.v_proj.weight", l.v, c.Hkv * c.d * c.D);
    load(p + "self_attn.o_proj.weight", l.o, c.D * c.H * c.d);
    std::string ff = p + "feed_forward.";
    if (c.moe[i]) {
      load(ff + "router.weight", l.router, c.E * c.D);
      load(ff + "experts.gate_up_proj", l.gateUp, c.E * c.D * 2 * c.I);
      load(ff + "experts.down_proj", l.down, c.E * c.I * c.D);
      ff += "shared_expert.";
    }
    size_t width = c.moe[i] ? c.I : c.Imlp;
    load(ff + "gate_proj.weight", l.ffGate, width * c.D);
    load(ff + "up_proj.weight", l.ffUp, width * c.D);
    load(ff + "down_proj.weight", l.ffDown, c.D * width);
  }
  m.invFreq.resize(c.d / 2);
  if (!cpu::ropeInvFreq(c.ropeTheta, c.d, c.ropeType, c.ropeFactor, c.ropeLow,
                        c.ropeHigh, c.ropeOrigMax, m.invFreq.data()))
    return dir + "/config.json: unsupported rope_type " + c.ropeType;
  return err;
}

// Per layer and batch row: post-RoPE post-norm k and raw v, [maxSeq, Hkv, d].
struct KvCache {
  size_t maxSeq = 0, B = 0;
  std::vector<Vec> k, v; // index layer * B + b
  KvCache(const Config &c, size_t B, size_t maxSeq) : maxSeq(maxSeq), B(B) {
    k.assign(c.L * B, Vec(maxSeq * c.Hkv * c.d));
    v = k;
  }
};

// down(silu(gate(x)) * up(x)) added to h: the dense MLP and the shared expert.
void addMlp(const Vec &x, const Layer &l, size_t N, size_t D, size_t width,
            Vec &h) {
  Vec g(N * width), u(N * width);
  cpu::linear(x.data(), D, l.ffGate.data(), D, g.data(), width, N, width, D);
  cpu::linear(x.data(), D, l.ffUp.data(), D, u.data(), width, N, width, D);
  cpu::swiglu(g.data(), width, u.data(), width, N, width, g.data(), width);
  cpu::linear(g.data(), width, l.ffDown.data(), width, h.data(), D, N, D, width,
              true);
}

// h += attention block of layer i for B rows of S new tokens at pos0...
void addAttention(const Model &m, size_t i, const Vec &x, size_t B, size_t S,
                  size_t pos0, KvCache &cache, Vec &h) {
  const Config &c = m.cfg;
  const Layer &l = m.layers[i];
  size_t N = B * S, qw = c.H * c.d, kw = c.Hkv * c.d;
  Vec q(N * qw), k(N * kw), v(N * kw), att(N * qw);
  cpu::linear(x.data(), c.D, l.q.data(), c.D, q.data(), qw, N, qw, c.D);
  cpu::linear(x.data(), c.D, l.k.data(), c.D, k.data(), kw, N, kw, c.D);
  cpu::linear(x.data(), c.D, l.v.data(), c.D, v.data(), kw, N, kw, c.D);
  std::vector<int64_t> pos(N);
  for (size_t r = 0; r < N; ++r)
    pos[r] = int64_t(pos0 + r % S);
  if (c.useRope[i]) {
    cpu::rope(q.data(), qw, N, c.H, c.d, pos.data(), m.invFreq.data());
    cpu::rope(k.data(), kw, N, c.Hkv, c.d, pos.data(), m.invFreq.data());
    if (c.qkNorm) { // after RoPE, RoPE layers only (spec 2.6)
      cpu::rmsNorm(q.data(), nullptr, N * c.H, c.d, c.eps, q.data());
      cpu::rmsNorm(k.data(), nullptr, N * c.Hkv, c.d, c.eps, k.data());
    }
  } else if (c.tempTuning) {
    cpu::temperatureScale(q.data(), qw, N, qw, pos.data(), c.floorScale,
                          c.attnScale);
  }
  int64_t chunk = c.chunked[i] ? c.chunk : 0;
  float scale = float(1.0 / std::sqrt(double(c.d)));
  for (size_t b = 0; b < B; ++b) {
    Vec &ck = cache.k[i * B + b], &cv = cache.v[i * B + b];
    std::copy_n(k.data() + b * S * kw, S * kw, ck.data() + pos0 * kw);
    std::copy_n(v.data() + b * S * kw, S * kw, cv.data() + pos0 * kw);
    cpu::attention(q.data() + b * S * qw, qw, pos.data() + b * S, S, ck.data(),
                   kw, cv.data(), kw, pos0 + S, c.H, c.Hkv, c.d, chunk, scale,
                   att.data() + b * S * qw, qw);
  }
  cpu::linear(att.data(), qw, l.o.data(), qw, h.data(), c.D, N, c.D, qw, true);
}

// One forward over ids [B, S] at positions pos0..pos0+S-1, reading and
// extending the cache; logits [B, S, V].
void forwardStep(const Model &m, const int64_t *ids, size_t B, size_t S,
                 size_t pos0, KvCache &cache, Vec &logits) {
  const Config &c = m.cfg;
  size_t N = B * S;
  Vec h(N * c.D), x(N * c.D);
  cpu::embedding(m.embed.data(), c.D, ids, N, h.data());
  for (size_t i = 0; i < c.L; ++i) {
    const Layer &l = m.layers[i];
    cpu::rmsNorm(h.data(), l.inNorm.data(), N, c.D, c.eps, x.data());
    addAttention(m, i, x, B, S, pos0, cache, h);
    cpu::rmsNorm(h.data(), l.postNorm.data(), N, c.D, c.eps, x.data());
    if (c.moe[i]) {
      Vec routerLogits(N * c.E), scores(N * c.E);
      cpu::linear(x.data(), c.D, l.router.data(), c.D, routerLogits.data(), c.E,
                  N, c.E, c.D);
      cpu::routerScores(routerLogits.data(), N, c.E, c.topK, scores.data());
      addMlp(x, l, N, c.D, c.I, h); // shared expert sees the unscaled input
      cpu::expertsForward(x.data(), scores.data(), l.gateUp.data(),
                          l.down.data(), N, c.D, c.I, c.E, h.data(), true);
    } else {
      addMlp(x, l, N, c.D, c.Imlp, h);
    }
  }
  cpu::rmsNorm(h.data(), m.norm.data(), N, c.D, c.eps, x.data());
  logits.resize(N * c.V);
  const Vec &head = c.tied ? m.embed : m.lmHead;
  cpu::linear(x.data(), c.D, head.data(), c.D, logits.data(), c.V, N, c.V, c.D);
}

struct Golden {
  size_t B = 0, T = 0, G = 0;
  std::vector<int64_t> inputIds, greedyIds;
  Vec logits;
};

std::string loadGolden(const std::string &dir, const Config &c, Golden &g) {
  std::string text;
  io::JsonValue meta;
  io::JsonError jerr;
  if (!readText(dir + "/golden.json", text) || !io::parseJson(text, meta, jerr))
    return dir + "/golden.json: cannot read or parse";
  const io::JsonValue *b = meta.get("batch"), *t = meta.get("seq"),
                      *gen = meta.get("gen");
  if (!b || !t || !gen || !b->isNumber() || !t->isNumber() || !gen->isNumber())
    return dir + "/golden.json: needs numbers batch, seq, gen";
  g.B = size_t(b->number);
  g.T = size_t(t->number);
  g.G = size_t(gen->number);
  io::Checkpoint ckpt;
  if (io::Status s = io::Checkpoint::open(dir + "/golden.safetensors", ckpt);
      !s.ok())
    return s.error;
  g.inputIds.resize(g.B * g.T);
  g.greedyIds.resize(g.B * (g.T + g.G));
  g.logits.resize(g.B * g.T * c.V);
  for (io::Status s :
       {ckpt.read("input_ids", io::DType::I64, g.inputIds.data(),
                  g.inputIds.size()),
        ckpt.read("greedy_ids", io::DType::I64, g.greedyIds.data(),
                  g.greedyIds.size()),
        ckpt.read("logits", io::DType::F32, g.logits.data(), g.logits.size())})
    if (!s.ok())
      return s.error;
  for (int64_t id : g.inputIds)
    if (id < 0 || size_t(id) >= c.V)
      return dir + ": input_ids out of range";
  return "";
}

class CpuForward : public ::testing::TestWithParam<const char *> {};

TEST_P(CpuForward, MatchesHuggingFaceGolden) {
  std::string dir = std::string(L4C_TEST_DATA_DIR) + "/golden/" + GetParam();
  Model m;
  std::string err = loadModel(dir, m);
  ASSERT_TRUE(err.empty()) << err;
  Golden g;
  err = loadGolden(dir, m.cfg, g);
  ASSERT_TRUE(err.empty()) << err;
  const size_t B = g.B, T = g.T, G = g.G, V = m.cfg.V;

  // Prefill through the cache path: the same code the decode steps use.
  KvCache cache(m.cfg, B, T + G);
  Vec logits;
  forwardStep(m, g.inputIds.data(), B, T, 0, cache, logits);
  double maxErr = 0, maxRef = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    maxErr = std::max(maxErr, std::fabs(double(logits[i]) - g.logits[i]));
    maxRef = std::max(maxRef, std::fabs(double(g.logits[i])));
  }
  std::printf("[ golden   ] %s: logits max abs err %.3g, max |golden| %.3g, "
              "ratio %.3g\n",
              GetParam(), maxErr, maxRef, maxErr / maxRef);
  EXPECT_LE(maxErr, 1e-4 * maxRef);

  // Greedy: the prefill's last position gives the first new token, then
  // G - 1 single-token decode steps.
  std::vector<int64_t> ids(B * (T + G));
  for (size_t b = 0; b < B; ++b)
    std::copy_n(g.inputIds.data() + b * T, T, ids.data() + b * (T + G));
  std::vector<int64_t> next(B), step(B);
  Vec last(B * V);
  for (size_t b = 0; b < B; ++b)
    std::copy_n(logits.data() + (b * T + T - 1) * V, V, last.data() + b * V);
  cpu::argmaxRows(last.data(), B, V, next.data());
  for (size_t s = 0; s < G; ++s) {
    for (size_t b = 0; b < B; ++b)
      ids[b * (T + G) + T + s] = next[b];
    if (s + 1 == G)
      break;
    step = next;
    forwardStep(m, step.data(), B, 1, T + s, cache, logits);
    cpu::argmaxRows(logits.data(), B, V, next.data());
  }
  EXPECT_EQ(ids, g.greedyIds);
}

INSTANTIATE_TEST_SUITE_P(
    CpuGolden, CpuForward, ::testing::Values("scout-tiny", "maverick-tiny"),
    [](const ::testing::TestParamInfo<const char *> &info) {
      std::string name = info.param;
      std::replace(name.begin(), name.end(), '-', '_');
      return name;
    });

} // namespace
