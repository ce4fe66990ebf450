//===- cpu_train_test.cpp - one Llama 4 training step vs HF goldens ------===//
//
// Composes the CPU forward and backward kernels into the loss, the gradient of
// every parameter and one AdamW step of Llama4ForCausalLM, and checks them
// against Hugging Face's float64 reference (ARCHITECTURE.md, CPU f32 row).
//
//===----------------------------------------------------------------------===//
#include "cpu/grad_kernels.h"
#include "cpu/kernels.h"
#include "io/json.h"
#include "io/safetensors.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
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
  int64_t chunk = 0, padIdx = -1;
  bool qkNorm = false, tempTuning = false, tied = false;
  std::vector<bool> moe, useRope, chunked;
  double ropeTheta = 0, ropeFactor = 0, ropeLow = 0, ropeHigh = 0,
         ropeOrigMax = 0;
  std::string ropeType = "default";
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

bool readJson(const std::string &path, io::JsonValue &root, std::string &err) {
  std::string text;
  io::JsonError jerr;
  if (!readText(path, text))
    err = path + ": cannot read";
  else if (!io::parseJson(text, root, jerr))
    err = path + ": " + jerr.message();
  return err.empty();
}

// Numbers and flags of one JSON object; the first missing field is recorded.
struct Fields {
  const io::JsonValue &obj;
  std::string &err;
  double num(const char *name) {
    const io::JsonValue *v = obj.get(name);
    if ((!v || !v->isNumber()) && err.empty())
      err = std::string("missing or non-numeric field ") + name;
    return v && v->isNumber() ? v->number : 0;
  }
  // attn_temperature_tuning is stored as 4 in released configs: truthiness.
  bool flag(const char *name) {
    const io::JsonValue *v = obj.get(name);
    return v && (v->isBool() ? v->boolean : v->isNumber() && v->number != 0);
  }
};

std::string parseConfig(const std::string &path, Config &c) {
  io::JsonValue root;
  std::string err;
  if (!readJson(path, root, err))
    return err;
  Fields f{root, err};
  c.V = size_t(f.num("vocab_size"));
  c.D = size_t(f.num("hidden_size"));
  c.L = size_t(f.num("num_hidden_layers"));
  c.H = size_t(f.num("num_attention_heads"));
  c.Hkv = size_t(f.num("num_key_value_heads"));
  c.d = size_t(f.num("head_dim"));
  c.I = size_t(f.num("intermediate_size"));
  c.Imlp = size_t(f.num("intermediate_size_mlp"));
  c.E = size_t(f.num("num_local_experts"));
  c.topK = size_t(f.num("num_experts_per_tok"));
  c.eps = float(f.num("rms_norm_eps"));
  c.chunk = int64_t(f.num("attention_chunk_size"));
  c.floorScale = float(f.num("floor_scale"));
  c.attnScale = float(f.num("attn_scale"));
  c.qkNorm = f.flag("use_qk_norm");
  c.tempTuning = f.flag("attn_temperature_tuning");
  c.tied = f.flag("tie_word_embeddings");
  // nn.Embedding's padding_idx row gets no gradient.
  if (const io::JsonValue *p = root.get("pad_token_id"); p && p->isNumber())
    c.padIdx = int64_t(p->number);
  const io::JsonValue *moe = root.get("moe_layers");
  const io::JsonValue *nope = root.get("no_rope_layers");
  const io::JsonValue *types = root.get("layer_types");
  if (!moe || !moe->isArray() || !nope || !nope->isArray() || !types ||
      !types->isArray() || nope->array.size() != c.L ||
      types->array.size() != c.L)
    return path + ": moe_layers, no_rope_layers or layer_types malformed";
  c.moe.assign(c.L, false);
  for (const io::JsonValue &v : moe->array)
    if (v.isNumber() && v.number >= 0 && size_t(v.number) < c.L)
      c.moe[size_t(v.number)] = true;
  for (size_t i = 0; i < c.L; ++i) {
    c.useRope.push_back(nope->array[i].number != 0); // 1: the layer uses RoPE
    c.chunked.push_back(types->array[i].string == "chunked_attention");
  }
  if (const io::JsonValue *rope = root.get("rope_parameters")) {
    Fields r{*rope, err};
    c.ropeTheta = r.num("rope_theta");
    if (const io::JsonValue *t = rope->get("rope_type"); t && t->isString())
      c.ropeType = t->string;
    if (c.ropeType == "llama3") {
      c.ropeFactor = r.num("factor");
      c.ropeLow = r.num("low_freq_factor");
      c.ropeHigh = r.num("high_freq_factor");
      c.ropeOrigMax = r.num("original_max_position_embeddings");
    }
  } else if (err.empty()) {
    err = "missing field rope_parameters";
  }
  if (!err.empty())
    return path + ": " + err;
  if (!c.H || !c.Hkv || c.H % c.Hkv || !c.d || !c.D)
    return path + ": inconsistent head counts";
  return "";
}

std::string layerPrefix(size_t i) {
  return "model.layers." + std::to_string(i) + ".";
}

// Every trainable parameter of Llama4ForCausalLM with its element count.
std::vector<std::pair<std::string, size_t>> parameterList(const Config &c) {
  std::vector<std::pair<std::string, size_t>> out;
  out.push_back({"model.embed_tokens.weight", c.V * c.D});
  out.push_back({"model.norm.weight", c.D});
  if (!c.tied)
    out.push_back({"lm_head.weight", c.V * c.D});
  for (size_t i = 0; i < c.L; ++i) {
    std::string p = layerPrefix(i);
    out.push_back({p + "input_layernorm.weight", c.D});
    out.push_back({p + "post_attention_layernorm.weight", c.D});
    out.push_back({p + "self_attn.q_proj.weight", c.H * c.d * c.D});
    out.push_back({p + "self_attn.k_proj.weight", c.Hkv * c.d * c.D});
    out.push_back({p + "self_attn.v_proj.weight", c.Hkv * c.d * c.D});
    out.push_back({p + "self_attn.o_proj.weight", c.D * c.H * c.d});
    std::string ff = p + "feed_forward.";
    size_t width = c.Imlp;
    if (c.moe[i]) {
      out.push_back({ff + "router.weight", c.E * c.D});
      out.push_back({ff + "experts.gate_up_proj", c.E * c.D * 2 * c.I});
      out.push_back({ff + "experts.down_proj", c.E * c.I * c.D});
      ff += "shared_expert.";
      width = c.I;
    }
    out.push_back({ff + "gate_proj.weight", width * c.D});
    out.push_back({ff + "up_proj.weight", width * c.D});
    out.push_back({ff + "down_proj.weight", c.D * width});
  }
  return out;
}

// Parameters and their gradients by HF name.
struct Model {
  Config cfg;
  std::map<std::string, Vec> weights, grads;
  Vec invFreq;
  const float *w(const std::string &name) const {
    return weights.at(name).data();
  }
  float *g(const std::string &name) { return grads.at(name).data(); }
  std::string head() const {
    return cfg.tied ? "model.embed_tokens.weight" : "lm_head.weight";
  }
};

std::string loadModel(const std::string &dir, Model &m) {
  if (std::string err = parseConfig(dir + "/config.json", m.cfg); !err.empty())
    return err;
  io::Checkpoint ckpt;
  if (io::Status s = io::Checkpoint::open(dir, ckpt); !s.ok())
    return s.error;
  for (const auto &[name, numel] : parameterList(m.cfg)) {
    Vec &dst = m.weights[name];
    dst.resize(numel);
    if (io::Status s = ckpt.read(name, io::DType::F32, dst.data(), numel);
        !s.ok())
      return s.error;
    m.grads[name].assign(numel, 0.f);
  }
  const Config &c = m.cfg;
  m.invFreq.resize(c.d / 2);
  if (!cpu::ropeInvFreq(c.ropeTheta, c.d, c.ropeType, c.ropeFactor, c.ropeLow,
                        c.ropeHigh, c.ropeOrigMax, m.invFreq.data()))
    return dir + "/config.json: unsupported rope_type " + c.ropeType;
  return "";
}

// What the backward reads of one layer's forward.
struct LayerActs {
  Vec hIn, x1;       // residual in, input_layernorm out
  Vec q1, k1;        // after RoPE, before the QK norm
  Vec q2, k2, v;     // attention inputs
  Vec att, hMid, x2; // attention out, residual after it, post norm out
  Vec routerLogits, scores;
  Vec gate, up, act; // shared expert / dense MLP
};

struct Activations {
  size_t B = 0, T = 0;
  std::vector<int64_t> pos; // per row of the flattened [B * T]
  std::vector<LayerActs> layers;
  Vec hOut, xOut, logits; // final residual, final norm out, logits
};

// SwiGLU MLP: the dense FFN and the shared expert. Adds its output to h.
void mlpForward(const Model &m, const std::string &p, size_t width,
                LayerActs &a, size_t N, Vec &h) {
  size_t D = m.cfg.D;
  a.gate.resize(N * width);
  a.up.resize(N * width);
  a.act.resize(N * width);
  cpu::linear(a.x2.data(), D, m.w(p + "gate_proj.weight"), D, a.gate.data(),
              width, N, width, D);
  cpu::linear(a.x2.data(), D, m.w(p + "up_proj.weight"), D, a.up.data(), width,
              N, width, D);
  cpu::swiglu(a.gate.data(), width, a.up.data(), width, N, width, a.act.data(),
              width);
  cpu::linear(a.act.data(), width, m.w(p + "down_proj.weight"), width, h.data(),
              D, N, D, width, true);
}

void attentionForward(const Model &m, size_t i, Activations &acts, Vec &h) {
  const Config &c = m.cfg;
  LayerActs &a = acts.layers[i];
  std::string p = layerPrefix(i) + "self_attn.";
  size_t B = acts.B, T = acts.T, N = B * T, qw = c.H * c.d, kw = c.Hkv * c.d;
  a.q1.resize(N * qw);
  a.k1.resize(N * kw);
  a.v.resize(N * kw);
  cpu::linear(a.x1.data(), c.D, m.w(p + "q_proj.weight"), c.D, a.q1.data(), qw,
              N, qw, c.D);
  cpu::linear(a.x1.data(), c.D, m.w(p + "k_proj.weight"), c.D, a.k1.data(), kw,
              N, kw, c.D);
  cpu::linear(a.x1.data(), c.D, m.w(p + "v_proj.weight"), c.D, a.v.data(), kw,
              N, kw, c.D);
  if (c.useRope[i]) {
    cpu::rope(a.q1.data(), qw, N, c.H, c.d, acts.pos.data(), m.invFreq.data());
    cpu::rope(a.k1.data(), kw, N, c.Hkv, c.d, acts.pos.data(),
              m.invFreq.data());
  }
  a.q2 = a.q1;
  a.k2 = a.k1;
  if (c.useRope[i] && c.qkNorm) { // after RoPE, RoPE layers only (spec 2.6)
    cpu::rmsNorm(a.q1.data(), nullptr, N * c.H, c.d, c.eps, a.q2.data());
    cpu::rmsNorm(a.k1.data(), nullptr, N * c.Hkv, c.d, c.eps, a.k2.data());
  } else if (!c.useRope[i] && c.tempTuning) {
    cpu::temperatureScale(a.q2.data(), qw, N, qw, acts.pos.data(), c.floorScale,
                          c.attnScale);
  }
  int64_t chunk = c.chunked[i] ? c.chunk : 0;
  float scale = float(1.0 / std::sqrt(double(c.d)));
  a.att.resize(N * qw);
  for (size_t b = 0; b < B; ++b)
    cpu::attention(a.q2.data() + b * T * qw, qw, acts.pos.data() + b * T, T,
                   a.k2.data() + b * T * kw, kw, a.v.data() + b * T * kw, kw, T,
                   c.H, c.Hkv, c.d, chunk, scale, a.att.data() + b * T * qw,
                   qw);
  cpu::linear(a.att.data(), qw, m.w(p + "o_proj.weight"), qw, h.data(), c.D, N,
              c.D, qw, true);
}

// The training forward over ids [B, T] from position 0, keeping what the
// backward needs.
void forward(const Model &m, const std::vector<int64_t> &ids, size_t B,
             size_t T, Activations &acts) {
  const Config &c = m.cfg;
  size_t N = B * T;
  acts.B = B;
  acts.T = T;
  acts.pos.resize(N);
  for (size_t r = 0; r < N; ++r)
    acts.pos[r] = int64_t(r % T);
  acts.layers.assign(c.L, LayerActs());
  Vec h(N * c.D);
  cpu::embedding(m.w("model.embed_tokens.weight"), c.D, ids.data(), N,
                 h.data());
  for (size_t i = 0; i < c.L; ++i) {
    LayerActs &a = acts.layers[i];
    std::string p = layerPrefix(i);
    a.hIn = h;
    a.x1.resize(N * c.D);
    cpu::rmsNorm(h.data(), m.w(p + "input_layernorm.weight"), N, c.D, c.eps,
                 a.x1.data());
    attentionForward(m, i, acts, h);
    a.hMid = h;
    a.x2.resize(N * c.D);
    cpu::rmsNorm(h.data(), m.w(p + "post_attention_layernorm.weight"), N, c.D,
                 c.eps, a.x2.data());
    std::string ff = p + "feed_forward.";
    if (c.moe[i]) {
      a.routerLogits.resize(N * c.E);
      a.scores.resize(N * c.E);
      cpu::linear(a.x2.data(), c.D, m.w(ff + "router.weight"), c.D,
                  a.routerLogits.data(), c.E, N, c.E, c.D);
      cpu::routerScores(a.routerLogits.data(), N, c.E, c.topK, a.scores.data());
      mlpForward(m, ff + "shared_expert.", c.I, a, N, h);
      cpu::expertsForward(
          a.x2.data(), a.scores.data(), m.w(ff + "experts.gate_up_proj"),
          m.w(ff + "experts.down_proj"), N, c.D, c.I, c.E, h.data(), true);
    } else {
      mlpForward(m, ff, c.Imlp, a, N, h);
    }
  }
  acts.hOut = h;
  acts.xOut.resize(N * c.D);
  cpu::rmsNorm(h.data(), m.w("model.norm.weight"), N, c.D, c.eps,
               acts.xOut.data());
  acts.logits.resize(N * c.V);
  cpu::linear(acts.xOut.data(), c.D, m.w(m.head()), c.D, acts.logits.data(),
              c.V, N, c.V, c.D);
}

// dx2 (+)= the MLP's input gradient for output gradient dy; weight grads add.
void mlpBackward(Model &m, const std::string &p, size_t width,
                 const LayerActs &a, size_t N, const Vec &dy, Vec &dx2,
                 bool accumulate) {
  size_t D = m.cfg.D;
  Vec dact(N * width), dgate(N * width), dup(N * width);
  cpu::linearGradInput(dy.data(), D, m.w(p + "down_proj.weight"), width,
                       dact.data(), width, N, D, width);
  cpu::linearGradWeight(a.act.data(), width, dy.data(), D,
                        m.g(p + "down_proj.weight"), width, N, D, width, true);
  cpu::swigluGrad(a.gate.data(), width, a.up.data(), width, dact.data(), width,
                  N, width, dgate.data(), width, dup.data(), width);
  cpu::linearGradInput(dgate.data(), width, m.w(p + "gate_proj.weight"), D,
                       dx2.data(), D, N, width, D, accumulate);
  cpu::linearGradInput(dup.data(), width, m.w(p + "up_proj.weight"), D,
                       dx2.data(), D, N, width, D, true);
  cpu::linearGradWeight(a.x2.data(), D, dgate.data(), width,
                        m.g(p + "gate_proj.weight"), D, N, width, D, true);
  cpu::linearGradWeight(a.x2.data(), D, dup.data(), width,
                        m.g(p + "up_proj.weight"), D, N, width, D, true);
}

// dh: in, the gradient of the layer's output residual; out, of its input.
void attentionBackward(Model &m, size_t i, const Activations &acts, Vec &dh) {
  const Config &c = m.cfg;
  const LayerActs &a = acts.layers[i];
  std::string p = layerPrefix(i);
  std::string sa = p + "self_attn.";
  size_t B = acts.B, T = acts.T, N = B * T, qw = c.H * c.d, kw = c.Hkv * c.d;
  Vec datt(N * qw), dq(N * qw), dk(N * kw), dv(N * kw);
  cpu::linearGradInput(dh.data(), c.D, m.w(sa + "o_proj.weight"), qw,
                       datt.data(), qw, N, c.D, qw);
  cpu::linearGradWeight(a.att.data(), qw, dh.data(), c.D,
                        m.g(sa + "o_proj.weight"), qw, N, c.D, qw, true);
  int64_t chunk = c.chunked[i] ? c.chunk : 0;
  float scale = float(1.0 / std::sqrt(double(c.d)));
  for (size_t b = 0; b < B; ++b)
    cpu::attentionGrad(a.q2.data() + b * T * qw, qw, acts.pos.data() + b * T, T,
                       a.k2.data() + b * T * kw, kw, a.v.data() + b * T * kw,
                       kw, T, c.H, c.Hkv, c.d, chunk, scale,
                       datt.data() + b * T * qw, qw, dq.data() + b * T * qw, qw,
                       dk.data() + b * T * kw, kw, dv.data() + b * T * kw, kw);
  if (c.useRope[i]) {
    if (c.qkNorm) {
      Vec t(N * qw);
      cpu::rmsNormGrad(a.q1.data(), nullptr, dq.data(), N * c.H, c.d, c.eps,
                       t.data(), nullptr);
      dq.swap(t);
      t.resize(N * kw);
      cpu::rmsNormGrad(a.k1.data(), nullptr, dk.data(), N * c.Hkv, c.d, c.eps,
                       t.data(), nullptr);
      dk.swap(t);
    }
    cpu::ropeInverse(dq.data(), qw, N, c.H, c.d, acts.pos.data(),
                     m.invFreq.data());
    cpu::ropeInverse(dk.data(), kw, N, c.Hkv, c.d, acts.pos.data(),
                     m.invFreq.data());
  } else if (c.tempTuning) {
    // A per-position scalar multiply is its own adjoint.
    cpu::temperatureScale(dq.data(), qw, N, qw, acts.pos.data(), c.floorScale,
                          c.attnScale);
  }
  Vec dx1(N * c.D);
  cpu::linearGradInput(dq.data(), qw, m.w(sa + "q_proj.weight"), c.D,
                       dx1.data(), c.D, N, qw, c.D);
  cpu::linearGradInput(dk.data(), kw, m.w(sa + "k_proj.weight"), c.D,
                       dx1.data(), c.D, N, kw, c.D, true);
  cpu::linearGradInput(dv.data(), kw, m.w(sa + "v_proj.weight"), c.D,
                       dx1.data(), c.D, N, kw, c.D, true);
  cpu::linearGradWeight(a.x1.data(), c.D, dq.data(), qw,
                        m.g(sa + "q_proj.weight"), c.D, N, qw, c.D, true);
  cpu::linearGradWeight(a.x1.data(), c.D, dk.data(), kw,
                        m.g(sa + "k_proj.weight"), c.D, N, kw, c.D, true);
  cpu::linearGradWeight(a.x1.data(), c.D, dv.data(), kw,
                        m.g(sa + "v_proj.weight"), c.D, N, kw, c.D, true);
  cpu::rmsNormGrad(a.hIn.data(), m.w(p + "input_layernorm.weight"), dx1.data(),
                   N, c.D, c.eps, dh.data(), m.g(p + "input_layernorm.weight"),
                   true);
}

// Gradients of the mean loss (seed 1) for every parameter, into m.grads.
void backward(Model &m, const std::vector<int64_t> &ids,
              const Activations &acts) {
  const Config &c = m.cfg;
  size_t B = acts.B, T = acts.T, N = B * T;
  Vec dlogits(N * c.V), dx(N * c.D), dh(N * c.D);
  cpu::crossEntropyGrad(acts.logits.data(), c.V, ids.data(), B, T, T, c.V, 1.f,
                        dlogits.data(), c.V);
  cpu::linearGradWeight(acts.xOut.data(), c.D, dlogits.data(), c.V,
                        m.g(m.head()), c.D, N, c.V, c.D, true);
  cpu::linearGradInput(dlogits.data(), c.V, m.w(m.head()), c.D, dx.data(), c.D,
                       N, c.V, c.D);
  cpu::rmsNormGrad(acts.hOut.data(), m.w("model.norm.weight"), dx.data(), N,
                   c.D, c.eps, dh.data(), m.g("model.norm.weight"), true);
  for (size_t i = c.L; i-- > 0;) {
    const LayerActs &a = acts.layers[i];
    std::string p = layerPrefix(i), ff = p + "feed_forward.";
    // dh is the gradient of the layer output, which is also that of the
    // residual after attention; the FFN adds its part through the norm.
    if (c.moe[i]) {
      Vec dscores(N * c.E), drl(N * c.E);
      std::fill(dx.begin(), dx.end(), 0.f);
      cpu::expertsBackward(
          a.x2.data(), a.scores.data(), m.w(ff + "experts.gate_up_proj"),
          m.w(ff + "experts.down_proj"), N, c.D, c.I, c.E, dh.data(), dx.data(),
          dscores.data(), m.g(ff + "experts.gate_up_proj"),
          m.g(ff + "experts.down_proj"), true);
      mlpBackward(m, ff + "shared_expert.", c.I, a, N, dh, dx, true);
      cpu::routerScoresGrad(a.routerLogits.data(), N, c.E, c.topK,
                            dscores.data(), drl.data());
      cpu::linearGradWeight(a.x2.data(), c.D, drl.data(), c.E,
                            m.g(ff + "router.weight"), c.D, N, c.E, c.D, true);
      cpu::linearGradInput(drl.data(), c.E, m.w(ff + "router.weight"), c.D,
                           dx.data(), c.D, N, c.E, c.D, true);
    } else {
      mlpBackward(m, ff, c.Imlp, a, N, dh, dx, false);
    }
    cpu::rmsNormGrad(a.hMid.data(), m.w(p + "post_attention_layernorm.weight"),
                     dx.data(), N, c.D, c.eps, dh.data(),
                     m.g(p + "post_attention_layernorm.weight"), true);
    attentionBackward(m, i, acts, dh);
  }
  cpu::embeddingGrad(ids.data(), N, dh.data(), c.D,
                     m.g("model.embed_tokens.weight"), c.padIdx);
}

struct Golden {
  size_t B = 0, T = 0;
  std::vector<int64_t> ids;
  float loss = 0;
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0, weightDecay = 0;
  io::Checkpoint ckpt;
};

std::string loadGolden(const std::string &dir, const Config &c, Golden &g) {
  io::JsonValue meta;
  std::string err;
  if (!readJson(dir + "/golden.json", meta, err))
    return err;
  Fields f{meta, err};
  g.B = size_t(f.num("batch"));
  g.T = size_t(f.num("seq"));
  const io::JsonValue *adamw = meta.get("adamw");
  if (!adamw || !adamw->isObject())
    return dir + "/golden.json: missing object adamw";
  Fields a{*adamw, err};
  g.lr = a.num("lr");
  g.beta1 = a.num("beta1");
  g.beta2 = a.num("beta2");
  g.eps = a.num("eps");
  g.weightDecay = a.num("weight_decay");
  if (!err.empty())
    return dir + "/golden.json: " + err;
  if (io::Status s = io::Checkpoint::open(dir + "/golden.safetensors", g.ckpt);
      !s.ok())
    return s.error;
  g.ids.resize(g.B * g.T);
  for (io::Status s :
       {g.ckpt.read("input_ids", io::DType::I64, g.ids.data(), g.ids.size()),
        g.ckpt.read("loss", io::DType::F32, &g.loss, 1)})
    if (!s.ok())
      return s.error;
  for (int64_t id : g.ids)
    if (id < 0 || size_t(id) >= c.V)
      return dir + ": input_ids out of range";
  return "";
}

// Error of `got` against `ref` in the two measures of the numerics targets.
struct Error {
  double relL2 = 0, maxAbsRatio = 0;
};
Error measure(const Vec &got, const Vec &ref) {
  double num = 0, den = 0, maxErr = 0, maxRef = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    double e = double(got[i]) - ref[i];
    num += e * e;
    den += double(ref[i]) * ref[i];
    maxErr = std::max(maxErr, std::fabs(e));
    maxRef = std::max(maxRef, std::fabs(double(ref[i])));
  }
  Error out;
  // An all-zero reference must be matched exactly.
  out.relL2 = den > 0 ? std::sqrt(num / den) : (num > 0 ? INFINITY : 0);
  out.maxAbsRatio = maxRef > 0 ? maxErr / maxRef : (maxErr > 0 ? INFINITY : 0);
  return out;
}

class CpuTrain : public ::testing::TestWithParam<const char *> {};

TEST_P(CpuTrain, MatchesHuggingFaceGolden) {
  std::string dir = std::string(L4C_TEST_DATA_DIR) + "/golden/" + GetParam();
  Model m;
  std::string err = loadModel(dir, m);
  ASSERT_TRUE(err.empty()) << err;
  Golden g;
  err = loadGolden(dir, m.cfg, g);
  ASSERT_TRUE(err.empty()) << err;
  const size_t B = g.B, T = g.T;

  Activations acts;
  forward(m, g.ids, B, T, acts);
  float loss = cpu::crossEntropy(acts.logits.data(), m.cfg.V, g.ids.data(), B,
                                 T, T, m.cfg.V);
  double lossRel = std::fabs(double(loss) - g.loss) / std::fabs(g.loss);
  std::printf("[ golden   ] %s: loss %.8f vs %.8f, rel err %.3g\n", GetParam(),
              loss, g.loss, lossRel);
  EXPECT_LE(lossRel, 1e-5);

  backward(m, g.ids, acts);

  // Every golden gradient has a parameter here, and the other way round.
  size_t goldenGrads = 0;
  for (const io::Checkpoint::Entry &e : g.ckpt.entries()) {
    const std::string &name = e.info->name;
    if (name.rfind("grad.", 0) == 0) {
      ++goldenGrads;
      EXPECT_TRUE(m.grads.count(name.substr(5))) << "no parameter " << name;
    }
  }
  EXPECT_EQ(goldenGrads, m.grads.size());

  std::string worstL2Name, worstMaxName, worstAdamName;
  double worstL2 = 0, worstMax = 0, worstAdam = 0;
  size_t checked = 0;
  for (const auto &[name, grad] : m.grads) {
    Vec ref(grad.size()), after(grad.size());
    io::Status s =
        g.ckpt.read("grad." + name, io::DType::F32, ref.data(), ref.size());
    ASSERT_TRUE(s.ok()) << s.error;
    Error e = measure(grad, ref);
    EXPECT_LE(e.relL2, 1e-4) << name;
    EXPECT_LE(e.maxAbsRatio, 1e-3) << name;
    if (!(e.relL2 <= worstL2))
      worstL2 = e.relL2, worstL2Name = name;
    if (!(e.maxAbsRatio <= worstMax))
      worstMax = e.maxAbsRatio, worstMaxName = name;

    // One AdamW step from the saved weights with zero moments.
    Vec p = m.weights.at(name), mom(p.size(), 0.f), sq(p.size(), 0.f);
    cpu::adamwStep(p.data(), grad.data(), mom.data(), sq.data(), p.size(), 1,
                   g.lr, g.beta1, g.beta2, g.eps, g.weightDecay);
    s = g.ckpt.read("adamw." + name, io::DType::F32, after.data(),
                    after.size());
    ASSERT_TRUE(s.ok()) << s.error;
    double maxErr = 0;
    for (size_t i = 0; i < p.size(); ++i)
      if (std::fabs(ref[i]) > 1e-6) {
        maxErr = std::max(maxErr, std::fabs(double(p[i]) - after[i]));
        ++checked;
      }
    EXPECT_LE(maxErr, 1e-5) << "adamw." << name;
    if (!(maxErr <= worstAdam))
      worstAdam = maxErr, worstAdamName = name;
  }
  std::printf("[ golden   ] %s: worst grad rel L2 %.3g (%s), worst max abs "
              "err / max abs %.3g (%s)\n",
              GetParam(), worstL2, worstL2Name.c_str(), worstMax,
              worstMaxName.c_str());
  std::printf("[ golden   ] %s: worst AdamW abs err %.3g (%s) over %zu "
              "entries with |grad| > 1e-6\n",
              GetParam(), worstAdam, worstAdamName.c_str(), checked);
}

INSTANTIATE_TEST_SUITE_P(
    CpuTrain, CpuTrain, ::testing::Values("scout-tiny", "maverick-tiny"),
    [](const ::testing::TestParamInfo<const char *> &info) {
      std::string name = info.param;
      std::replace(name.begin(), name.end(), '-', '_');
      return name;
    });

} // namespace
