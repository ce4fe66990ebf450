//===- train_runtime_test.cpp - train plans, AdamW and checkpoints -------===//
//
// A hand-built train_step plan of the tiny two-layer model (every training op,
// in-place gradients, tied embeddings) runs through a Session and matches a
// direct composition of the cpu:: forward and backward kernels; AdamW matches
// cpu::adamwStep; checkpoints round-trip, survive interrupted saves, and a
// resumed run equals an uninterrupted one bit for bit (library and l4-run).
//
//===----------------------------------------------------------------------===//
#include "cpu/grad_kernels.h"
#include "cpu/kernels.h"
#include "executor.h"
#include "io/safetensors.h"
#include "l4c/runtime/l4rt.h"
#include "l4c/runtime/l4rt.hpp"
#include "test_plans.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <sys/wait.h>
#include <unistd.h>

using namespace l4c;
using namespace l4c::test;
namespace fs = std::filesystem;

namespace {

using Vec = std::vector<float>;
using Weights = std::map<std::string, Vec>;

class TempDir {
public:
  TempDir() {
    std::string tmpl =
        (fs::temp_directory_path() / "l4c-train-XXXXXX").string();
    if (::mkdtemp(tmpl.data()))
      path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty())
      fs::remove_all(path_, ec);
  }
  std::string file(const std::string &name) const { return path_ + "/" + name; }

private:
  std::string path_;
};

//===----------------------------------------------------------------------===//
// The tiny model's train_step plan, built the way l4c-autodiff lays it out
//===----------------------------------------------------------------------===//

OpSpec opN(std::string name, std::vector<uint32_t> operands,
           std::vector<uint32_t> results, std::vector<AttrSpec> attrs = {}) {
  return {std::move(name), std::move(attrs), std::move(operands),
          std::move(results)};
}

std::vector<std::pair<std::string, std::vector<int64_t>>>
trainWeights(const TinyConfig &c, bool tied) {
  auto w = tinyWeights(c);
  if (tied)
    w.pop_back(); // lm_head.weight: the head reads the embedding table
  return w;
}

/// Builds one program "train_step" over [B, S]: the tiny model's forward
/// (tinyProgram's layers), the loss, and the backward, with every gradient
/// of a weight in the io region as "grad.<hf>". Gradients of the loss ops and
/// of swiglu are written over their inputs (the in-place cases the verifier
/// allows); with `tied` the head reuses the embedding table and the two
/// table gradients are summed by a parameter-shaped add.
/// `chunk` > 0: the lm_head and loss in vocabulary chunks of that many
/// columns, as l4c-chunk-loss writes them (weight row views, a statistics
/// chain, the gradient's rows written chunk by chunk).
PlanSpec tinyTrainPlan(int64_t B, int64_t S, const TinyConfig &c = {},
                       bool tied = false, int64_t chunk = 0) {
  PlanSpec p;
  p.programKind = "train";
  p.maxBatch = B;
  p.maxSeq = S;
  p.vocab = c.V;
  p.source = "tiny-train";
  const int64_t D = c.D, H = c.H, Hkv = c.Hkv, d = c.d;
  std::map<std::string, uint32_t> W;
  for (auto &[name, shape] : trainWeights(c, tied))
    W[name] = p.weight(name, shape);
  const std::string head =
      tied ? "model.embed_tokens.weight" : "lm_head.weight";
  uint32_t ids =
      p.add("input_ids", pl::Region::Io, {B, S}, "BS", pl::DType::I64);
  uint32_t pos =
      p.add("positions", pl::Region::Io, {B, S}, "BS", pl::DType::I64);
  uint32_t loss = p.add("loss", pl::Region::Io, {}, "");
  std::map<std::string, uint32_t> G; // gradient outputs by weight name
  for (auto &[name, shape] : trainWeights(c, tied))
    G[name] = p.add("grad." + name, pl::Region::Io, shape,
                    std::string(shape.size(), '.'));
  std::vector<uint32_t> steps;
  auto k1 = [&](const std::string &name, OpSpec o) {
    steps.push_back(p.kernel(name, "train", {std::move(o)}));
  };
  auto act = [&](const std::string &name, int64_t width) {
    return p.act(name, {B, S, width}, "BS.");
  };
  auto heads = [&](uint32_t flat, const std::string &name, int64_t h) {
    return p.view(flat, name, {B, S, h, d}, "BS..");
  };
  auto flat = [&](uint32_t x, const std::string &name, int64_t w) {
    return p.view(x, name, {B, S, w}, "BS.");
  };
  auto linear = [&](const std::string &name, uint32_t x, uint32_t w,
                    int64_t N) {
    uint32_t y = act(name, N);
    k1(name, op("linear", {x, w}, y));
    return y;
  };
  auto add = [&](const std::string &name, uint32_t a, uint32_t b) {
    uint32_t y = act(name, p.buffers[a].shape.back());
    k1(name, op("add", {a, b}, y));
    return y;
  };
  std::vector<AttrSpec> ropeAttrs = {attrF("theta", c.theta),
                                     attrS("scaling", c.scaling),
                                     attrF("factor", c.factor),
                                     attrF("low_freq_factor", c.lowFreq),
                                     attrF("high_freq_factor", c.highFreq),
                                     attrI("original_max_position", c.origMax)};
  auto attnAttrs = [&](int layer) {
    return std::vector<AttrSpec>{attrF("scale", 1.0 / std::sqrt(double(d))),
                                 attrI("chunk_size", layer == 0 ? c.chunk : 0)};
  };

  // What the backward reads of each layer.
  struct Saved {
    uint32_t hIn, x, q2, k2, q3, k3, v, a2, h1, x2;
    uint32_t g, u, m; // dense MLP or shared expert
    uint32_t rl, sc;  // router
  };
  Saved L[2];
  uint32_t h = act("h0", D);
  k1("embed", op("embedding", {W["model.embed_tokens.weight"], ids}, h));
  for (int layer = 0; layer < 2; ++layer) {
    std::string l = "model.layers." + std::to_string(layer) + ".";
    std::string n = "l" + std::to_string(layer) + ".";
    Saved &s = L[layer];
    s.hIn = h;
    s.x = act(n + "x", D);
    k1(n + "in_norm", op("rms_norm", {h, W[l + "input_layernorm.weight"]}, s.x,
                         {attrF("eps", c.eps)}));
    uint32_t q = linear(n + "q", s.x, W[l + "self_attn.q_proj.weight"], H * d);
    uint32_t k =
        linear(n + "k", s.x, W[l + "self_attn.k_proj.weight"], Hkv * d);
    uint32_t v =
        linear(n + "v", s.x, W[l + "self_attn.v_proj.weight"], Hkv * d);
    s.v = heads(v, n + "v4", Hkv);
    if (layer == 0) {
      s.q2 = p.act(n + "q_rope", {B, S, H, d}, "BS..");
      s.k2 = p.act(n + "k_rope", {B, S, Hkv, d}, "BS..");
      s.q3 = p.act(n + "q_norm", {B, S, H, d}, "BS..");
      s.k3 = p.act(n + "k_norm", {B, S, Hkv, d}, "BS..");
      k1(n + "q_rope",
         op("rope", {heads(q, n + "q4", H), pos}, s.q2, ropeAttrs));
      k1(n + "k_rope",
         op("rope", {heads(k, n + "k4", Hkv), pos}, s.k2, ropeAttrs));
      k1(n + "q_norm", op("l2_norm", {s.q2}, s.q3, {attrF("eps", c.eps)}));
      k1(n + "k_norm", op("l2_norm", {s.k2}, s.k3, {attrF("eps", c.eps)}));
    } else {
      s.q3 = p.act(n + "q_temp", {B, S, H, d}, "BS..");
      k1(n + "q_temp",
         op("temperature_scale", {heads(q, n + "q4", H), pos}, s.q3,
            {attrF("floor_scale", c.floorScale),
             attrF("attn_scale", c.attnScale)}));
      s.k3 = heads(k, n + "k4", Hkv);
    }
    uint32_t a = p.act(n + "attn", {B, S, H, d}, "BS..");
    k1(n + "attn",
       op("attention", {s.q3, s.k3, s.v, pos}, a, attnAttrs(layer)));
    s.a2 = flat(a, n + "attn2", H * d);
    uint32_t o = linear(n + "o", s.a2, W[l + "self_attn.o_proj.weight"], D);
    s.h1 = add(n + "h1", h, o);
    s.x2 = act(n + "x2", D);
    k1(n + "post_norm",
       op("rms_norm", {s.h1, W[l + "post_attention_layernorm.weight"]}, s.x2,
          {attrF("eps", c.eps)}));
    std::string ff = l + "feed_forward.";
    uint32_t out;
    if (layer == 0) {
      s.g = linear(n + "gate", s.x2, W[ff + "gate_proj.weight"], c.Imlp);
      s.u = linear(n + "up", s.x2, W[ff + "up_proj.weight"], c.Imlp);
      s.m = act(n + "mlp", c.Imlp);
      k1(n + "swiglu", op("swiglu", {s.g, s.u}, s.m));
      out = linear(n + "down", s.m, W[ff + "down_proj.weight"], D);
    } else {
      s.rl = linear(n + "router", s.x2, W[ff + "router.weight"], c.E);
      s.sc = act(n + "scores", c.E);
      k1(n + "scores",
         op("router_scores", {s.rl}, s.sc, {attrI("top_k", c.topK)}));
      uint32_t r = act(n + "routed", D);
      k1(n + "experts", op("moe_experts",
                           {s.x2, s.sc, W[ff + "experts.gate_up_proj"],
                            W[ff + "experts.down_proj"]},
                           r));
      std::string se = ff + "shared_expert.";
      s.g = linear(n + "sgate", s.x2, W[se + "gate_proj.weight"], c.I);
      s.u = linear(n + "sup", s.x2, W[se + "up_proj.weight"], c.I);
      s.m = act(n + "smlp", c.I);
      k1(n + "sswiglu", op("swiglu", {s.g, s.u}, s.m));
      uint32_t sd = linear(n + "sdown", s.m, W[se + "down_proj.weight"], D);
      out = add(n + "ff", r, sd);
    }
    h = add(n + "h2", s.h1, out);
  }
  uint32_t hFinal = h;
  uint32_t nrm = act("norm", D);
  k1("norm",
     op("rms_norm", {h, W["model.norm.weight"]}, nrm, {attrF("eps", c.eps)}));
  // Rows [o, o + n) of a [V, D] parameter-shaped buffer.
  auto rowsOf = [&](uint32_t of, const std::string &name, int64_t o,
                    int64_t n) {
    uint32_t v = p.view(of, name, {n, D}, "..");
    p.buffers[v].offset += uint64_t(o * D) * sizeof(float);
    p.buffers[v].size = uint64_t(n * D) * sizeof(float);
    return v;
  };
  uint32_t logits = 0, dlogits = 0, stats = 0;
  if (chunk > 0) {
    for (int64_t o = 0, i = 0; o < c.V; o += chunk, ++i) {
      int64_t n = std::min(chunk, c.V - o);
      std::string ci = std::to_string(i);
      uint32_t lg = linear("logits" + ci, nrm,
                           rowsOf(W[head], "w" + ci, o, n), n);
      uint32_t st = p.act("stats" + ci, {B, S, 2}, "BS.");
      std::vector<uint32_t> in = {lg, ids};
      if (o > 0)
        in.push_back(stats);
      k1("stats" + ci, op("cross_entropy_stats", in, st,
                          {attrI("vocab_offset", o), attrI("vocab_size", c.V)}));
      stats = st;
    }
    k1("loss", op("cross_entropy_from_stats", {stats, ids}, loss));
  } else {
    logits = act("logits", c.V);
    k1("lm_head", op("linear", {nrm, W[head]}, logits));
    k1("loss", op("cross_entropy", {logits, ids}, loss));
    dlogits = p.view(logits, "dlogits", {B, S, c.V}, "BS.");
    k1("loss_grad", op("cross_entropy_grad", {logits, ids}, dlogits));
  }

  // Backward. lgw writes a weight gradient output; lgi a new activation.
  auto lgi = [&](const std::string &name, uint32_t dy, uint32_t w, int64_t K) {
    uint32_t dx = act(name, K);
    k1(name, op("linear_grad_input", {dy, w}, dx));
    return dx;
  };
  auto lgw = [&](const std::string &name, uint32_t x, uint32_t dy,
                 uint32_t dw) {
    k1(name, op("linear_grad_weight", {x, dy}, dw));
  };
  uint32_t headGrad = G[head];
  uint32_t embedGrad = G["model.embed_tokens.weight"];
  if (tied) {
    headGrad = p.add("head_grad", pl::Region::Arena, {c.V, D}, "..");
    embedGrad = p.add("embed_grad", pl::Region::Arena, {c.V, D}, "..");
  }
  uint32_t dn = 0;
  if (chunk > 0) {
    // Per chunk: recomputed logits, their gradient in place, dx summed.
    for (int64_t o = 0, i = 0; o < c.V; o += chunk, ++i) {
      int64_t n = std::min(chunk, c.V - o);
      std::string ci = std::to_string(i);
      uint32_t w = rowsOf(W[head], "wb" + ci, o, n);
      uint32_t lg = linear("relogits" + ci, nrm, w, n);
      uint32_t dl = p.view(lg, "dlogits" + ci, {B, S, n}, "BS.");
      k1("loss_grad" + ci,
         op("cross_entropy_grad_chunk", {lg, ids, stats}, dl,
            {attrI("vocab_offset", o), attrI("vocab_size", c.V)}));
      uint32_t dx = lgi("d_norm" + ci, dl, w, D);
      dn = o == 0 ? dx : add("d_norm_sum" + ci, dn, dx);
      lgw("g_head" + ci, nrm, dl, rowsOf(headGrad, "g_rows" + ci, o, n));
    }
  } else {
    dn = lgi("d_norm", dlogits, W[head], D);
    lgw("g_head", nrm, dlogits, headGrad);
  }
  uint32_t dh = act("d_h_final", D);
  k1("norm_grad", opN("rms_norm_grad", {hFinal, W["model.norm.weight"], dn},
                      {dh, G["model.norm.weight"]}, {attrF("eps", c.eps)}));
  for (int layer = 1; layer >= 0; --layer) {
    std::string l = "model.layers." + std::to_string(layer) + ".";
    std::string n = "b" + std::to_string(layer) + ".";
    std::string ff = l + "feed_forward.";
    const Saved &s = L[layer];
    // The FFN: dh flows to its output and, through the residual, to h1.
    std::string mp = layer == 0 ? ff : ff + "shared_expert.";
    int64_t width = layer == 0 ? c.Imlp : c.I;
    uint32_t dm = lgi(n + "d_m", dh, W[mp + "down_proj.weight"], width);
    lgw(n + "g_down", s.m, dh, G[mp + "down_proj.weight"]);
    // In place: the gate and up buffers are not read again.
    uint32_t dg = p.view(s.g, n + "d_g", {B, S, width}, "BS.");
    uint32_t du = p.view(s.u, n + "d_u", {B, S, width}, "BS.");
    k1(n + "swiglu_grad", opN("swiglu_grad", {s.g, s.u, dm}, {dg, du}));
    uint32_t dx2 =
        add(n + "dx2_gu", lgi(n + "dx2_g", dg, W[mp + "gate_proj.weight"], D),
            lgi(n + "dx2_u", du, W[mp + "up_proj.weight"], D));
    lgw(n + "g_gate", s.x2, dg, G[mp + "gate_proj.weight"]);
    lgw(n + "g_up", s.x2, du, G[mp + "up_proj.weight"]);
    if (layer == 1) {
      uint32_t dxe = act(n + "dx2_e", D), dsc = act(n + "d_sc", c.E);
      k1(n + "experts_grad", opN("moe_experts_grad",
                                 {s.x2, s.sc, W[ff + "experts.gate_up_proj"],
                                  W[ff + "experts.down_proj"], dh},
                                 {dxe, dsc, G[ff + "experts.gate_up_proj"],
                                  G[ff + "experts.down_proj"]}));
      uint32_t drl = act(n + "d_rl", c.E);
      k1(n + "router_grad",
         op("router_scores_grad", {s.rl, dsc}, drl, {attrI("top_k", c.topK)}));
      dx2 = add(n + "dx2_ge", dx2, dxe);
      dx2 = add(n + "dx2_ger", dx2,
                lgi(n + "dx2_r", drl, W[ff + "router.weight"], D));
      lgw(n + "g_router", s.x2, drl, G[ff + "router.weight"]);
    }
    uint32_t dh1n = act(n + "dh1_n", D);
    k1(n + "post_norm_grad",
       opN("rms_norm_grad",
           {s.h1, W[l + "post_attention_layernorm.weight"], dx2},
           {dh1n, G[l + "post_attention_layernorm.weight"]},
           {attrF("eps", c.eps)}));
    uint32_t dh1 = add(n + "dh1", dh, dh1n);
    // Attention.
    std::string sa = l + "self_attn.";
    uint32_t da2 = lgi(n + "d_a2", dh1, W[sa + "o_proj.weight"], H * d);
    lgw(n + "g_o", s.a2, dh1, G[sa + "o_proj.weight"]);
    uint32_t dq3 = p.act(n + "d_q3", {B, S, H, d}, "BS..");
    uint32_t dk3 = p.act(n + "d_k3", {B, S, Hkv, d}, "BS..");
    uint32_t dv = p.act(n + "d_v", {B, S, Hkv, d}, "BS..");
    k1(n + "attn_grad",
       opN("attention_grad", {s.q3, s.k3, s.v, pos, heads(da2, n + "d_a4", H)},
           {dq3, dk3, dv}, attnAttrs(layer)));
    uint32_t dq = p.act(n + "d_q", {B, S, H, d}, "BS..");
    uint32_t dk = dk3;
    if (layer == 0) {
      uint32_t dq2 = p.act(n + "d_q2", {B, S, H, d}, "BS..");
      uint32_t dk2 = p.act(n + "d_k2", {B, S, Hkv, d}, "BS..");
      k1(n + "q_norm_grad",
         op("l2_norm_grad", {s.q2, dq3}, dq2, {attrF("eps", c.eps)}));
      k1(n + "k_norm_grad",
         op("l2_norm_grad", {s.k2, dk3}, dk2, {attrF("eps", c.eps)}));
      std::vector<AttrSpec> inv = ropeAttrs;
      inv.push_back(attrI("inverse", 1));
      dk = p.act(n + "d_k", {B, S, Hkv, d}, "BS..");
      k1(n + "q_rope_grad", op("rope", {dq2, pos}, dq, inv));
      k1(n + "k_rope_grad", op("rope", {dk2, pos}, dk, inv));
    } else {
      // A per-position scalar multiply is its own adjoint.
      k1(n + "q_temp_grad", op("temperature_scale", {dq3, pos}, dq,
                               {attrF("floor_scale", c.floorScale),
                                attrF("attn_scale", c.attnScale)}));
    }
    uint32_t dqf = flat(dq, n + "d_qf", H * d),
             dkf = flat(dk, n + "d_kf", Hkv * d),
             dvf = flat(dv, n + "d_vf", Hkv * d);
    uint32_t dx =
        add(n + "dx_qk", lgi(n + "dx_q", dqf, W[sa + "q_proj.weight"], D),
            lgi(n + "dx_k", dkf, W[sa + "k_proj.weight"], D));
    dx =
        add(n + "dx_qkv", dx, lgi(n + "dx_v", dvf, W[sa + "v_proj.weight"], D));
    lgw(n + "g_q", s.x, dqf, G[sa + "q_proj.weight"]);
    lgw(n + "g_k", s.x, dkf, G[sa + "k_proj.weight"]);
    lgw(n + "g_v", s.x, dvf, G[sa + "v_proj.weight"]);
    uint32_t dhn = act(n + "dh_n", D);
    k1(n + "in_norm_grad",
       opN("rms_norm_grad", {s.hIn, W[l + "input_layernorm.weight"], dx},
           {dhn, G[l + "input_layernorm.weight"]}, {attrF("eps", c.eps)}));
    dh = add(n + "dh", dh1, dhn);
  }
  k1("embed_grad", op("embedding_grad", {ids, dh}, embedGrad));
  if (tied)
    k1("tied_grad",
       op("add", {embedGrad, headGrad}, G["model.embed_tokens.weight"]));
  ProgramSpec prog{"train_step",
                   {{"input_ids", ids}, {"positions", pos}},
                   {{"loss", loss}},
                   steps};
  for (auto &[name, buf] : G)
    prog.outputs.push_back({"grad." + name, buf});
  p.programs.push_back(prog);
  return p;
}

//===----------------------------------------------------------------------===//
// The same step by direct kernel calls over B * T contiguous rows
//===----------------------------------------------------------------------===//

struct Reference {
  float loss = 0;
  Weights grads;
};

Reference referenceStep(const TinyConfig &c, bool tied, const Weights &w,
                        const std::vector<int64_t> &ids, size_t B, size_t T) {
  const size_t N = B * T, D = size_t(c.D), H = size_t(c.H), Hkv = size_t(c.Hkv),
               d = size_t(c.d), qw = H * d, kw = Hkv * d, V = size_t(c.V),
               E = size_t(c.E), topK = size_t(c.topK);
  const float eps = float(c.eps), scale = float(1.0 / std::sqrt(double(d)));
  auto W = [&](const std::string &n) { return w.at(n).data(); };
  Reference ref;
  for (auto &[name, shape] : trainWeights(c, tied))
    ref.grads[name].assign(w.at(name).size(), 0.f);
  auto G = [&](const std::string &n) { return ref.grads.at(n).data(); };
  const std::string head =
      tied ? "model.embed_tokens.weight" : "lm_head.weight";
  std::vector<int64_t> pos(N);
  for (size_t r = 0; r < N; ++r)
    pos[r] = int64_t(r % T);
  Vec invFreq(d / 2);
  cpu::ropeInvFreq(c.theta, d, c.scaling, c.factor, c.lowFreq, c.highFreq,
                   double(c.origMax), invFreq.data());

  struct Acts {
    Vec hIn, x, q1, k1, q2, k2, v, att, h1, x2, g, u, m, rl, sc;
  } A[2];
  auto lin = [&](const Vec &x, size_t K, const std::string &wn, size_t M) {
    Vec y(N * M);
    cpu::linear(x.data(), K, W(wn), K, y.data(), M, N, M, K);
    return y;
  };
  Vec h(N * D);
  cpu::embedding(W("model.embed_tokens.weight"), D, ids.data(), N, h.data());
  for (int layer = 0; layer < 2; ++layer) {
    std::string l = "model.layers." + std::to_string(layer) + ".";
    std::string ff = l + "feed_forward.", sa = l + "self_attn.";
    Acts &a = A[layer];
    a.hIn = h;
    a.x.resize(N * D);
    cpu::rmsNorm(h.data(), W(l + "input_layernorm.weight"), N, D, eps,
                 a.x.data());
    a.q1 = lin(a.x, D, sa + "q_proj.weight", qw);
    a.k1 = lin(a.x, D, sa + "k_proj.weight", kw);
    a.v = lin(a.x, D, sa + "v_proj.weight", kw);
    if (layer == 0) {
      cpu::rope(a.q1.data(), qw, N, H, d, pos.data(), invFreq.data());
      cpu::rope(a.k1.data(), kw, N, Hkv, d, pos.data(), invFreq.data());
      a.q2.resize(N * qw);
      a.k2.resize(N * kw);
      cpu::rmsNorm(a.q1.data(), nullptr, N * H, d, eps, a.q2.data());
      cpu::rmsNorm(a.k1.data(), nullptr, N * Hkv, d, eps, a.k2.data());
    } else {
      a.q2 = a.q1;
      a.k2 = a.k1;
      cpu::temperatureScale(a.q2.data(), qw, N, qw, pos.data(),
                            float(c.floorScale), float(c.attnScale));
    }
    a.att.resize(N * qw);
    for (size_t b = 0; b < B; ++b)
      cpu::attention(a.q2.data() + b * T * qw, qw, pos.data() + b * T, T,
                     a.k2.data() + b * T * kw, kw, a.v.data() + b * T * kw, kw,
                     T, H, Hkv, d, layer == 0 ? c.chunk : 0, scale,
                     a.att.data() + b * T * qw, qw);
    Vec o = lin(a.att, qw, sa + "o_proj.weight", D);
    a.h1 = h;
    cpu::add(a.h1.data(), o.data(), N * D, a.h1.data());
    a.x2.resize(N * D);
    cpu::rmsNorm(a.h1.data(), W(l + "post_attention_layernorm.weight"), N, D,
                 eps, a.x2.data());
    std::string mp = layer == 0 ? ff : ff + "shared_expert.";
    size_t width = size_t(layer == 0 ? c.Imlp : c.I);
    a.g = lin(a.x2, D, mp + "gate_proj.weight", width);
    a.u = lin(a.x2, D, mp + "up_proj.weight", width);
    a.m.resize(N * width);
    cpu::swiglu(a.g.data(), width, a.u.data(), width, N, width, a.m.data(),
                width);
    Vec out = lin(a.m, width, mp + "down_proj.weight", D);
    if (layer == 1) {
      a.rl = lin(a.x2, D, ff + "router.weight", E);
      a.sc.resize(N * E);
      cpu::routerScores(a.rl.data(), N, E, topK, a.sc.data());
      Vec r(N * D);
      cpu::expertsForward(
          a.x2.data(), a.sc.data(), W(ff + "experts.gate_up_proj"),
          W(ff + "experts.down_proj"), N, D, size_t(c.I), E, r.data());
      cpu::add(r.data(), out.data(), N * D, out.data());
    }
    h = a.h1;
    cpu::add(h.data(), out.data(), N * D, h.data());
  }
  Vec nrm(N * D);
  cpu::rmsNorm(h.data(), W("model.norm.weight"), N, D, eps, nrm.data());
  Vec logits = lin(nrm, D, head, V);
  ref.loss = cpu::crossEntropy(logits.data(), V, ids.data(), B, T, T, V);

  Vec dl(N * V);
  cpu::crossEntropyGrad(logits.data(), V, ids.data(), B, T, T, V, 1.f,
                        dl.data(), V);
  Vec dn(N * D), dh(N * D);
  cpu::linearGradInput(dl.data(), V, W(head), D, dn.data(), D, N, V, D);
  Vec headGrad(V * D);
  cpu::linearGradWeight(nrm.data(), D, dl.data(), V, headGrad.data(), D, N, V,
                        D);
  cpu::rmsNormGrad(h.data(), W("model.norm.weight"), dn.data(), N, D, eps,
                   dh.data(), G("model.norm.weight"));
  auto lgi = [&](const Vec &dy, size_t Nout, const std::string &wn, size_t K,
                 Vec &dx, bool acc) {
    cpu::linearGradInput(dy.data(), Nout, W(wn), K, dx.data(), K, N, Nout, K,
                         acc);
  };
  auto lgw = [&](const Vec &x, size_t K, const Vec &dy, size_t Nout,
                 const std::string &wn) {
    cpu::linearGradWeight(x.data(), K, dy.data(), Nout, G(wn), K, N, Nout, K);
  };
  for (int layer = 1; layer >= 0; --layer) {
    std::string l = "model.layers." + std::to_string(layer) + ".";
    std::string ff = l + "feed_forward.", sa = l + "self_attn.";
    const Acts &a = A[layer];
    std::string mp = layer == 0 ? ff : ff + "shared_expert.";
    size_t width = size_t(layer == 0 ? c.Imlp : c.I);
    Vec dm(N * width), dg(N * width), du(N * width), dx2(N * D);
    lgi(dh, D, mp + "down_proj.weight", width, dm, false);
    lgw(a.m, width, dh, D, mp + "down_proj.weight");
    cpu::swigluGrad(a.g.data(), a.u.data(), dm.data(), N * width, dg.data(),
                    du.data());
    lgi(dg, width, mp + "gate_proj.weight", D, dx2, false);
    lgi(du, width, mp + "up_proj.weight", D, dx2, true);
    lgw(a.x2, D, dg, width, mp + "gate_proj.weight");
    lgw(a.x2, D, du, width, mp + "up_proj.weight");
    if (layer == 1) {
      Vec dxe(N * D), dsc(N * E), drl(N * E);
      cpu::expertsBackward(
          a.x2.data(), a.sc.data(), W(ff + "experts.gate_up_proj"),
          W(ff + "experts.down_proj"), N, D, size_t(c.I), E, dh.data(),
          dxe.data(), dsc.data(), G(ff + "experts.gate_up_proj"),
          G(ff + "experts.down_proj"));
      cpu::routerScoresGrad(a.rl.data(), N, E, topK, dsc.data(), drl.data());
      cpu::add(dx2.data(), dxe.data(), N * D, dx2.data());
      lgi(drl, E, ff + "router.weight", D, dx2, true);
      lgw(a.x2, D, drl, E, ff + "router.weight");
    }
    Vec dh1(N * D);
    cpu::rmsNormGrad(a.h1.data(), W(l + "post_attention_layernorm.weight"),
                     dx2.data(), N, D, eps, dh1.data(),
                     G(l + "post_attention_layernorm.weight"));
    cpu::add(dh1.data(), dh.data(), N * D, dh1.data());
    Vec da(N * qw), dq(N * qw), dk(N * kw), dv(N * kw);
    lgi(dh1, D, sa + "o_proj.weight", qw, da, false);
    lgw(a.att, qw, dh1, D, sa + "o_proj.weight");
    for (size_t b = 0; b < B; ++b)
      cpu::attentionGrad(a.q2.data() + b * T * qw, qw, pos.data() + b * T, T,
                         a.k2.data() + b * T * kw, kw, a.v.data() + b * T * kw,
                         kw, T, H, Hkv, d, layer == 0 ? c.chunk : 0, scale,
                         da.data() + b * T * qw, qw, dq.data() + b * T * qw, qw,
                         dk.data() + b * T * kw, kw, dv.data() + b * T * kw,
                         kw);
    if (layer == 0) {
      Vec t(N * qw);
      cpu::rmsNormGrad(a.q1.data(), nullptr, dq.data(), N * H, d, eps, t.data(),
                       nullptr);
      dq.swap(t);
      t.assign(N * kw, 0.f);
      cpu::rmsNormGrad(a.k1.data(), nullptr, dk.data(), N * Hkv, d, eps,
                       t.data(), nullptr);
      dk.swap(t);
      cpu::ropeInverse(dq.data(), qw, N, H, d, pos.data(), invFreq.data());
      cpu::ropeInverse(dk.data(), kw, N, Hkv, d, pos.data(), invFreq.data());
    } else {
      cpu::temperatureScale(dq.data(), qw, N, qw, pos.data(),
                            float(c.floorScale), float(c.attnScale));
    }
    Vec dx(N * D);
    lgi(dq, qw, sa + "q_proj.weight", D, dx, false);
    lgi(dk, kw, sa + "k_proj.weight", D, dx, true);
    lgi(dv, kw, sa + "v_proj.weight", D, dx, true);
    lgw(a.x, D, dq, qw, sa + "q_proj.weight");
    lgw(a.x, D, dk, kw, sa + "k_proj.weight");
    lgw(a.x, D, dv, kw, sa + "v_proj.weight");
    Vec dhn(N * D);
    cpu::rmsNormGrad(a.hIn.data(), W(l + "input_layernorm.weight"), dx.data(),
                     N, D, eps, dhn.data(), G(l + "input_layernorm.weight"));
    dh = dh1;
    cpu::add(dh.data(), dhn.data(), N * D, dh.data());
  }
  Vec &embed = ref.grads.at("model.embed_tokens.weight");
  std::fill(embed.begin(), embed.end(), 0.f);
  cpu::embeddingGrad(ids.data(), N, dh.data(), D, embed.data());
  if (tied)
    cpu::add(embed.data(), headGrad.data(), embed.size(), embed.data());
  else
    ref.grads.at("lm_head.weight") = headGrad;
  return ref;
}

//===----------------------------------------------------------------------===//
// Helpers
//===----------------------------------------------------------------------===//

/// Weights with norms near one and small matrices, as a checkpoint file.
Weights makeWeights(const TinyConfig &c, bool tied, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  Weights w;
  for (auto &[name, shape] : trainWeights(c, tied)) {
    size_t n = 1;
    for (int64_t e : shape)
      n *= size_t(e);
    Vec &v = w[name];
    v.resize(n);
    // Matrices scale with their input dim: [out, in] and [E, in, out].
    float amp = shape.size() == 1 ? 0.2f : 1.5f / std::sqrt(float(shape[1]));
    for (float &x : v)
      x = (shape.size() == 1 ? 1.f : 0.f) + amp * u(rng);
  }
  return w;
}

void writeWeights(const std::string &path, const TinyConfig &c, bool tied,
                  const Weights &w) {
  std::vector<io::TensorRef> refs;
  for (auto &[name, shape] : trainWeights(c, tied))
    refs.push_back({name, io::DType::F32, shape, w.at(name).data()});
  io::Status s = io::writeSafetensors(path, refs);
  ASSERT_TRUE(s.ok()) << s.error;
}

std::vector<int64_t> makeIds(size_t n, int64_t V, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int64_t> ids(n);
  for (int64_t &id : ids)
    id = int64_t(rng() % uint32_t(V));
  return ids;
}

std::shared_ptr<const rt::Plan> mustParse(const PlanSpec &spec) {
  std::shared_ptr<const rt::Plan> plan;
  rt::Status s = rt::Plan::fromBytes(spec.serialize(), "train.l4plan", plan);
  EXPECT_TRUE(s.ok()) << s.message;
  return plan;
}

std::unique_ptr<rt::Session> mustSession(std::shared_ptr<const rt::Plan> plan,
                                         const std::string &weights,
                                         uint64_t seed = 0) {
  std::unique_ptr<rt::Session> session;
  rt::SessionOptions opts;
  opts.weightsPath = weights;
  opts.randomSeed = seed;
  rt::Status s = rt::Session::create(std::move(plan), opts, session);
  EXPECT_TRUE(s.ok()) << s.message;
  return session;
}

Vec tensorOf(const rt::Session &s, const std::string &name) {
  std::vector<int64_t> shape;
  rt::Status st = s.tensorShape(name, shape);
  EXPECT_TRUE(st.ok()) << st.message;
  size_t n = 1;
  for (int64_t e : shape)
    n *= size_t(e);
  Vec out(n);
  st = s.readTensor(name, out.data(), n);
  EXPECT_TRUE(st.ok()) << st.message;
  return out;
}

/// max |got - want| / max |want|.
double relErr(const Vec &got, const Vec &want) {
  double err = 0, ref = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::fabs(double(got[i]) - want[i]));
    ref = std::max(ref, std::fabs(double(want[i])));
  }
  return ref > 0 ? err / ref : err;
}

std::string readFile(const std::string &path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void writePlan(const std::string &path, const PlanSpec &p) {
  std::vector<uint8_t> b = p.serialize();
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char *>(b.data()),
             std::streamsize(b.size()));
}

//===----------------------------------------------------------------------===//
// The verifier on train plans
//===----------------------------------------------------------------------===//

void expectRejected(const PlanSpec &spec, const std::string &want) {
  std::shared_ptr<const rt::Plan> plan;
  rt::Status s = rt::Plan::fromBytes(spec.serialize(), "train.l4plan", plan);
  ASSERT_FALSE(s.ok()) << "plan was accepted; expected: " << want;
  EXPECT_EQ(s.code, rt::StatusCode::InvalidPlan) << s.message;
  EXPECT_NE(s.message.find(want), std::string::npos)
      << "message: " << s.message << "\nexpected to contain: " << want;
}

/// The first op named `name` in the plan.
OpSpec &findOp(PlanSpec &p, const std::string &name) {
  for (KernelSpec &k : p.kernels)
    for (OpSpec &o : k.ops)
      if (o.op == name)
        return o;
  ADD_FAILURE() << "no op " << name;
  return p.kernels[0].ops[0];
}

/// The first op of the kernel named `name`.
OpSpec &kernelOp(PlanSpec &p, const std::string &name) {
  for (KernelSpec &k : p.kernels)
    if (k.name == name)
      return k.ops[0];
  ADD_FAILURE() << "no kernel " << name;
  return p.kernels[0].ops[0];
}

uint32_t findBuffer(const PlanSpec &p, const std::string &name) {
  for (uint32_t i = 0; i < p.buffers.size(); ++i)
    if (p.buffers[i].name == name)
      return i;
  ADD_FAILURE() << "no buffer " << name;
  return 0;
}

TEST(TrainPlan, Decodes) {
  for (bool tied : {false, true}) {
    std::shared_ptr<const rt::Plan> plan =
        mustParse(tinyTrainPlan(2, 6, {}, tied));
    ASSERT_TRUE(plan);
    EXPECT_EQ(plan->programKind, "train");
    const rt::ProgramDesc *prog = plan->program("train_step");
    ASSERT_TRUE(prog);
    EXPECT_GE(prog->loss, 0);
    EXPECT_EQ(prog->logits, -1);
    EXPECT_EQ(prog->grads.size(), plan->weights.size());
    EXPECT_EQ(prog->seqCapacity, 6);
    EXPECT_TRUE(plan->buffers[size_t(prog->loss)].shape.empty());
    EXPECT_EQ(plan->buffers[size_t(prog->loss)].numel, 1u);
  }
}

TEST(TrainPlan, RejectsBrokenTrainPlans) {
  PlanSpec p = tinyTrainPlan(2, 6);
  p.programs[0].outputs.pop_back();
  expectRejected(p, "has no output 'grad.");
  p = tinyTrainPlan(2, 6);
  p.programs[0].outputs.push_back({"grad.model.extra.weight", 0});
  expectRejected(p, "output 'grad.model.extra.weight': no weight binding");
  p = tinyTrainPlan(2, 6);
  p.programs[0].outputs.erase(p.programs[0].outputs.begin());
  expectRejected(p, "program 0 'train_step': has no loss output");
  // A gradient output with the wrong shape.
  p = tinyTrainPlan(2, 6);
  uint32_t gn = findBuffer(p, "grad.model.norm.weight");
  p.buffers[gn].shape = {4, 4};
  p.buffers[gn].dims = dimsOf("..");
  expectRejected(p, "(rms_norm_grad): result 1 buffer");
  // Two gradients in the same bytes.
  p = tinyTrainPlan(2, 6);
  uint32_t a = findBuffer(p, "grad.model.layers.0.self_attn.q_proj.weight");
  uint32_t b = findBuffer(p, "grad.model.layers.0.self_attn.o_proj.weight");
  p.buffers[b].offset = p.buffers[a].offset;
  expectRejected(p, "shares bytes with");
  // A gradient output that no step writes.
  p = tinyTrainPlan(2, 6);
  uint32_t stray = p.add("stray", pl::Region::Io, p.buffers[a].shape, "..");
  for (KernelSpec &k : p.kernels)
    for (OpSpec &o : k.ops)
      if (o.op == "linear_grad_weight" && o.results[0] == a)
        o.results[0] = stray;
  expectRejected(p, "is written by no step");
  // The chunked loss: a weight gradient with a row chunk nobody writes, a
  // statistics chain of the wrong shape or columns.
  p = tinyTrainPlan(2, 6, {}, false, 24);
  {
    OpSpec &o = kernelOp(p, "g_head1");
    o.results[0] = p.add("stray_rows", pl::Region::Io,
                         p.buffers[o.results[0]].shape, "..");
  }
  expectRejected(p, "is written by no step");
  p = tinyTrainPlan(2, 6, {}, false, 24);
  kernelOp(p, "stats1").operands[2] = findBuffer(p, "logits0");
  expectRejected(p, "(cross_entropy_stats): prev buffer");
  p = tinyTrainPlan(2, 6, {}, false, 24);
  kernelOp(p, "stats0").attrs[0].i = 8;
  expectRejected(p, "the first chunk (no prev) starts at column 8, not 0");
  p = tinyTrainPlan(2, 6, {}, false, 24);
  kernelOp(p, "loss_grad2").attrs[0].i = 50;
  expectRejected(p, "vocabulary columns [50, 66) do not lie in [0, vocab_size 64)");
  p = tinyTrainPlan(2, 6, {}, false, 24);
  kernelOp(p, "stats1").operands.pop_back();
  kernelOp(p, "stats1").operands.pop_back();
  expectRejected(p, "(cross_entropy_stats): has 1 operands, expected 2 to 3");
  // Multi-result ops: counts, overlap, attributes.
  p = tinyTrainPlan(2, 6);
  findOp(p, "attention_grad").results.pop_back();
  expectRejected(p, "(attention_grad): has 2 results, expected 3");
  p = tinyTrainPlan(2, 6);
  {
    OpSpec &o = findOp(p, "swiglu_grad");
    o.results[1] = o.results[0];
  }
  expectRejected(p, "(swiglu_grad): result 1");
  expectRejected(p, "overlaps result 0");
  p = tinyTrainPlan(2, 6);
  {
    OpSpec &o = findOp(p, "attention_grad");
    o.results[0] = o.operands[0]; // dq over q: the kernel still reads q
  }
  expectRejected(p, "(attention_grad): result 0");
  p = tinyTrainPlan(2, 6);
  for (KernelSpec &k : p.kernels)
    for (OpSpec &o : k.ops)
      if (o.op == "rope")
        for (AttrSpec &at : o.attrs)
          if (at.name == "inverse")
            at.i = 2;
  expectRejected(p, "(rope): attribute inverse 2 is not 0 or 1");
  p = tinyTrainPlan(2, 6);
  {
    OpSpec &o = findOp(p, "embedding_grad");
    o.results[0] = findBuffer(p, "h0");
  }
  expectRejected(p, "(embedding_grad): result buffer");
  p = tinyTrainPlan(2, 6);
  findOp(p, "cross_entropy").results[0] = findBuffer(p, "norm");
  expectRejected(p, "(cross_entropy): result buffer");
  expectRejected(p, "must be an f32 scalar");
  p = tinyTrainPlan(2, 6);
  findOp(p, "moe_experts_grad").operands[4] = findBuffer(p, "l1.scores");
  expectRejected(p, "(moe_experts_grad): gradient buffer");
  p = tinyTrainPlan(2, 6);
  findOp(p, "router_scores_grad").attrs.clear();
  expectRejected(p, "(router_scores_grad): missing attribute top_k");
  p = tinyTrainPlan(2, 6);
  findOp(p, "cross_entropy").operands[1] = findBuffer(p, "h0");
  expectRejected(p, "(cross_entropy): operand 1 buffer");
  // A train plan must have its program.
  p = tinyTrainPlan(2, 6);
  p.programs[0].name = "forward";
  expectRejected(p, "program 0 'forward': has no logits output");
  // Scalars are fine, an absent shape is not.
  p = tinyTrainPlan(2, 6);
  p.buffers[findBuffer(p, "loss")].dims = dimsOf(".");
  expectRejected(p, "dims has 1 entries for a shape of rank 0");
}

//===----------------------------------------------------------------------===//
// Train steps against the kernels
//===----------------------------------------------------------------------===//

struct StepCase {
  int64_t maxB, S, B, T;
  bool tied;
  int64_t chunk = 0; ///< the loss in vocabulary chunks of this many columns
};

class TrainStep : public ::testing::TestWithParam<StepCase> {};

TEST_P(TrainStep, MatchesKernelComposition) {
  const StepCase sc = GetParam();
  TinyConfig c;
  TempDir dir;
  Weights w = makeWeights(c, sc.tied, 7);
  writeWeights(dir.file("w.safetensors"), c, sc.tied, w);
  auto session =
      mustSession(mustParse(tinyTrainPlan(sc.maxB, sc.S, c, sc.tied, sc.chunk)),
                  dir.file("w.safetensors"));
  ASSERT_TRUE(session);
  std::vector<int64_t> ids = makeIds(size_t(sc.B * sc.T), c.V, 11);
  float loss = 0;
  rt::Status s = session->trainStep(ids.data(), sc.B, sc.T, &loss);
  ASSERT_TRUE(s.ok()) << s.message;
  Reference ref = referenceStep(c, sc.tied, w, ids, size_t(sc.B), size_t(sc.T));
  EXPECT_NEAR(loss, ref.loss, 1e-6 * std::fabs(ref.loss));
  EXPECT_GT(loss, 2.0f); // ~ln(64) for a random model
  double worst = 0;
  std::string worstName;
  for (auto &[name, g] : ref.grads) {
    Vec got = tensorOf(*session, "grad." + name);
    double e = relErr(got, g);
    EXPECT_LE(e, 2e-5) << name;
    double norm = 0;
    for (float x : g)
      norm += double(x) * x;
    EXPECT_GT(norm, 0) << name << " has an all-zero reference gradient";
    if (e > worst)
      worst = e, worstName = name;
  }
  std::printf("[ train    ] B %lld/%lld T %lld/%lld%s: loss %.6f, worst grad "
              "err %.2e (%s)\n",
              (long long)sc.B, (long long)sc.maxB, (long long)sc.T,
              (long long)sc.S, sc.tied ? " tied" : "", loss, worst,
              worstName.c_str());
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, TrainStep,
    ::testing::Values(StepCase{2, 6, 2, 6, false}, // dense: one call per op
                      StepCase{3, 8, 2, 5, false}, // run-time B and T smaller
                      StepCase{2, 6, 2, 6, true},  // tied embeddings
                      StepCase{2, 7, 1, 4, true},
                      // The loss in vocabulary chunks, the last one short.
                      StepCase{2, 6, 2, 6, false, 24},
                      StepCase{3, 8, 2, 5, true, 20}),
    [](const ::testing::TestParamInfo<StepCase> &info) {
      const StepCase &c = info.param;
      return "B" + std::to_string(c.B) + "of" + std::to_string(c.maxB) + "_T" +
             std::to_string(c.T) + "of" + std::to_string(c.S) +
             (c.tied ? "_tied" : "") +
             (c.chunk ? "_chunk" + std::to_string(c.chunk) : "");
    });

TEST(TrainSession, ReusedArenaGivesTheSameGradients) {
  // Parameter-shaped outputs are rewritten on every run: a step after
  // another (with other ids and another length) equals a first step.
  TinyConfig c;
  auto plan = mustParse(tinyTrainPlan(2, 8, c));
  auto a = mustSession(plan, "", 5), b = mustSession(plan, "", 5);
  std::vector<int64_t> first = makeIds(16, c.V, 1),
                       second = makeIds(10, c.V, 2);
  ASSERT_TRUE(a->trainStep(first.data(), 2, 8, nullptr).ok());
  a->zeroGrad();
  float la = 0, lb = 0;
  ASSERT_TRUE(a->trainStep(second.data(), 2, 5, &la).ok());
  ASSERT_TRUE(b->trainStep(second.data(), 2, 5, &lb).ok());
  EXPECT_EQ(la, lb);
  for (const rt::WeightDesc &wd : plan->weights)
    EXPECT_EQ(tensorOf(*a, "grad." + wd.hfName),
              tensorOf(*b, "grad." + wd.hfName))
        << wd.hfName;
}

TEST(TrainSession, EmbeddingGradHonoursPaddingIdx) {
  // nn.Embedding's padding_idx row gets no gradient (HF passes
  // config.pad_token_id); the plan says so with an optional attribute.
  TinyConfig c;
  PlanSpec spec = tinyTrainPlan(2, 6, c);
  auto plain = mustSession(mustParse(spec), "", 8);
  findOp(spec, "embedding_grad").attrs.push_back(attrI("padding_idx", 5));
  auto padded = mustSession(mustParse(spec), "", 8);
  std::vector<int64_t> ids = makeIds(12, c.V, 4);
  ids[3] = ids[8] = 5;
  ASSERT_TRUE(plain->trainStep(ids.data(), 2, 6, nullptr).ok());
  ASSERT_TRUE(padded->trainStep(ids.data(), 2, 6, nullptr).ok());
  Vec a = tensorOf(*plain, "grad.model.embed_tokens.weight");
  Vec b = tensorOf(*padded, "grad.model.embed_tokens.weight");
  const size_t D = size_t(c.D);
  for (size_t row = 0; row < size_t(c.V); ++row)
    for (size_t j = 0; j < D; ++j)
      EXPECT_EQ(b[row * D + j], row == 5 ? 0.f : a[row * D + j]) << row;
  EXPECT_NE(a[5 * D], 0.f);
}

TEST(TrainSession, AdamWMatchesTheKernelOverSteps) {
  TinyConfig c;
  auto plan = mustParse(tinyTrainPlan(2, 6, c));
  auto s = mustSession(plan, "", 9);
  rt::AdamWParams h{0.01, 0.9, 0.95, 1e-8, 0.1};
  std::map<std::string, Vec> p, m, v;
  for (const rt::WeightDesc &wd : plan->weights) {
    p[wd.hfName] = tensorOf(*s, wd.hfName);
    m[wd.hfName].assign(p[wd.hfName].size(), 0.f);
    v[wd.hfName].assign(p[wd.hfName].size(), 0.f);
  }
  for (int step = 1; step <= 3; ++step) {
    std::vector<int64_t> ids = makeIds(12, c.V, uint32_t(step));
    ASSERT_TRUE(s->trainStep(ids.data(), 2, 6, nullptr).ok());
    for (const rt::WeightDesc &wd : plan->weights) {
      Vec g = tensorOf(*s, "grad." + wd.hfName);
      Vec &pp = p[wd.hfName];
      cpu::adamwStep(pp.data(), g.data(), m[wd.hfName].data(),
                     v[wd.hfName].data(), pp.size(), step, h.lr, h.beta1,
                     h.beta2, h.eps, h.weightDecay);
    }
    rt::Status st = s->adamwStep(h);
    ASSERT_TRUE(st.ok()) << st.message;
    int64_t counted = 0;
    ASSERT_TRUE(s->getCounter("step", counted).ok());
    EXPECT_EQ(counted, step);
    for (const rt::WeightDesc &wd : plan->weights) {
      EXPECT_EQ(tensorOf(*s, wd.hfName), p[wd.hfName]) << wd.hfName;
      EXPECT_EQ(tensorOf(*s, "m." + wd.hfName), m[wd.hfName]) << wd.hfName;
      EXPECT_EQ(tensorOf(*s, "v." + wd.hfName), v[wd.hfName]) << wd.hfName;
    }
  }
  // The gradients were applied and cleared.
  Vec g(16);
  rt::Status st = s->readTensor("grad.model.norm.weight", g.data(), 16);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message.find("no train step ran"), std::string::npos);
  st = s->adamwStep(h);
  EXPECT_NE(st.message.find("no gradients to apply"), std::string::npos);
  for (auto [field, bad] :
       {std::pair{"lr", rt::AdamWParams{-1, 0.9, 0.9, 0, 0}},
        {"beta1", rt::AdamWParams{0.1, 1.0, 0.9, 0, 0}},
        {"beta2", rt::AdamWParams{0.1, 0.9, -0.5, 0, 0}},
        {"eps", rt::AdamWParams{0.1, 0.9, 0.9, NAN, 0}},
        {"weight_decay", rt::AdamWParams{0.1, 0.9, 0.9, 0, -1}}}) {
    st = s->adamwStep(bad);
    EXPECT_NE(st.message.find(std::string("adamw ") + field), std::string::npos)
        << st.message;
  }
}

TEST(TrainSession, AccumulationAppliesTheMean) {
  TinyConfig c;
  auto plan = mustParse(tinyTrainPlan(2, 6, c));
  auto acc = mustSession(plan, "", 3), one = mustSession(plan, "", 3);
  std::vector<std::vector<int64_t>> batches = {
      makeIds(12, c.V, 21), makeIds(12, c.V, 22), makeIds(12, c.V, 23)};
  std::map<std::string, Vec> sum;
  for (const auto &ids : batches) {
    ASSERT_TRUE(one->trainStep(ids.data(), 2, 6, nullptr).ok());
    for (const rt::WeightDesc &wd : plan->weights) {
      Vec g = tensorOf(*one, "grad." + wd.hfName);
      Vec &s = sum[wd.hfName];
      if (s.empty())
        s = g;
      else
        for (size_t i = 0; i < g.size(); ++i)
          s[i] += g[i];
    }
    one->zeroGrad();
    ASSERT_TRUE(acc->trainStep(ids.data(), 2, 6, nullptr).ok());
  }
  int64_t micro = 0;
  ASSERT_TRUE(acc->getCounter("micro_batches", micro).ok());
  EXPECT_EQ(micro, 3);
  for (const rt::WeightDesc &wd : plan->weights) {
    Vec mean = sum[wd.hfName];
    for (float &x : mean)
      x /= 3.f;
    EXPECT_EQ(tensorOf(*acc, "grad." + wd.hfName), mean) << wd.hfName;
  }
  // AdamW on the accumulated mean equals the kernel on that mean.
  std::map<std::string, Vec> want;
  for (const rt::WeightDesc &wd : plan->weights) {
    Vec p = tensorOf(*acc, wd.hfName), g = tensorOf(*acc, "grad." + wd.hfName);
    Vec m(p.size()), v(p.size());
    cpu::adamwStep(p.data(), g.data(), m.data(), v.data(), p.size(), 1, 1e-3,
                   0.9, 0.999, 1e-8, 0.01);
    want[wd.hfName] = p;
  }
  ASSERT_TRUE(acc->adamwStep({}).ok());
  for (const rt::WeightDesc &wd : plan->weights)
    EXPECT_EQ(tensorOf(*acc, wd.hfName), want[wd.hfName]) << wd.hfName;
}

TEST(TrainSession, ValidatesInputsAndPlans) {
  TinyConfig c;
  auto s = mustSession(mustParse(tinyTrainPlan(2, 6, c)), "", 1);
  std::vector<int64_t> ids = makeIds(12, c.V, 1);
  rt::Status st = s->trainStep(ids.data(), 2, 1, nullptr);
  EXPECT_NE(st.message.find("outside the train plan's range [2, 6]"),
            std::string::npos)
      << st.message;
  st = s->trainStep(ids.data(), 3, 6, nullptr);
  EXPECT_NE(st.message.find("batch 3 is outside"), std::string::npos);
  ids[7] = 64;
  st = s->trainStep(ids.data(), 2, 6, nullptr);
  EXPECT_NE(st.message.find("input_ids[1, 1] = 64 is outside the vocabulary"),
            std::string::npos)
      << st.message;
  Vec out(3);
  st = s->readTensor("model.norm.weight", out.data(), 3);
  EXPECT_NE(st.message.find("has 16 elements [16], not 3"), std::string::npos)
      << st.message;
  st = s->readTensor("grad.model.nothing", out.data(), 3);
  EXPECT_NE(st.message.find("no tensor named 'grad.model.nothing'"),
            std::string::npos);
  EXPECT_FALSE(s->setCounter("m.x", 1).ok());
  EXPECT_FALSE(s->setCounter("micro_batches", 1).ok());
  int64_t value = 0;
  EXPECT_NE(
      s->getCounter("nope", value).message.find("no counter named 'nope'"),
      std::string::npos);
  // A forward plan has no train step.
  auto fwd = mustSession(mustParse(tinyModelPlan("forward", 2, 6)), "", 1);
  st = fwd->trainStep(ids.data(), 2, 6, nullptr);
  EXPECT_NE(st.message.find("has no train_step program (program_kind forward)"),
            std::string::npos)
      << st.message;
}

//===----------------------------------------------------------------------===//
// Checkpoints
//===----------------------------------------------------------------------===//

/// Trains `steps` steps with fixed data and hyperparameters.
void train(rt::Session &s, int from, int to, const TinyConfig &c) {
  rt::AdamWParams h{0.02, 0.9, 0.95, 1e-8, 0.1};
  for (int step = from; step < to; ++step) {
    for (int k = 0; k < 2; ++k) { // two micro-batches per step
      std::vector<int64_t> ids = makeIds(12, c.V, uint32_t(100 + 2 * step + k));
      ASSERT_TRUE(s.trainStep(ids.data(), 2, 6, nullptr).ok());
    }
    ASSERT_TRUE(s.adamwStep(h).ok());
    ASSERT_TRUE(s.setCounter("data_cursor", 1000 + step).ok());
  }
}

TEST(Checkpoint, RoundTripAndResumeEqualsUninterrupted) {
  TinyConfig c;
  TempDir dir;
  auto plan = mustParse(tinyTrainPlan(2, 6, c));
  auto straight = mustSession(plan, "", 4);
  train(*straight, 0, 6, c);
  ASSERT_TRUE(straight->saveCheckpoint(dir.file("six")).ok());

  auto first = mustSession(plan, "", 4);
  train(*first, 0, 3, c);
  rt::Status st = first->saveCheckpoint(dir.file("three/"));
  ASSERT_TRUE(st.ok()) << st.message;
  // The layout: config, weights under HF names, optimizer state.
  EXPECT_EQ(readFile(dir.file("three/config.json")), "{}");
  io::Checkpoint model, opt;
  ASSERT_TRUE(io::Checkpoint::open(dir.file("three"), model).ok());
  ASSERT_TRUE(
      io::Checkpoint::open(dir.file("three/optimizer.safetensors"), opt).ok());
  EXPECT_EQ(model.entries().size(), plan->weights.size());
  io::Checkpoint::Entry e;
  ASSERT_TRUE(
      model.find("model.layers.1.feed_forward.experts.gate_up_proj", e));
  EXPECT_EQ(e.info->dtype, io::DType::F32);
  EXPECT_EQ(e.info->shape, (std::vector<int64_t>{4, 16, 16}));
  ASSERT_TRUE(opt.find("m.lm_head.weight", e));
  ASSERT_TRUE(opt.find("step", e));
  EXPECT_EQ(e.info->dtype, io::DType::I64);
  EXPECT_TRUE(e.info->shape.empty());
  int64_t step = 0, cursor = 0;
  ASSERT_TRUE(opt.read("step", io::DType::I64, &step, 1).ok());
  ASSERT_TRUE(opt.read("data_cursor", io::DType::I64, &cursor, 1).ok());
  EXPECT_EQ(step, 3);
  EXPECT_EQ(cursor, 1002);
  EXPECT_FALSE(fs::exists(dir.file("three.l4c-tmp")));
  EXPECT_FALSE(fs::exists(dir.file("three.l4c-old")));

  // Resume: weights from the directory, then the optimizer state.
  auto resumed = mustSession(plan, dir.file("three"));
  st = resumed->loadOptimizer(dir.file("three"));
  ASSERT_TRUE(st.ok()) << st.message;
  for (const rt::WeightDesc &wd : plan->weights) {
    EXPECT_EQ(tensorOf(*resumed, wd.hfName), tensorOf(*first, wd.hfName));
    EXPECT_EQ(tensorOf(*resumed, "v." + wd.hfName),
              tensorOf(*first, "v." + wd.hfName));
  }
  ASSERT_TRUE(resumed->getCounter("data_cursor", cursor).ok());
  EXPECT_EQ(cursor, 1002);
  train(*resumed, 3, 6, c);
  // Saving over the existing checkpoint replaces it.
  ASSERT_TRUE(resumed->saveCheckpoint(dir.file("three")).ok());
  EXPECT_EQ(readFile(dir.file("three/model.safetensors")),
            readFile(dir.file("six/model.safetensors")));
  EXPECT_EQ(readFile(dir.file("three/optimizer.safetensors")),
            readFile(dir.file("six/optimizer.safetensors")));
}

TEST(Checkpoint, FailedSaveLeavesThePreviousOne) {
  TinyConfig c;
  TempDir dir;
  auto plan = mustParse(tinyTrainPlan(2, 6, c));
  auto s = mustSession(plan, "", 4);
  train(*s, 0, 1, c);
  std::string ck = dir.file("ck");
  ASSERT_TRUE(s->saveCheckpoint(ck).ok());
  std::string before = readFile(ck + "/model.safetensors");
  train(*s, 1, 2, c);
  rt::Status st = s->saveCheckpoint(ck, [](const std::string &stage) {
    EXPECT_EQ(stage, "written");
    return rt::Status::fail(rt::StatusCode::Io, "simulated disk full");
  });
  EXPECT_EQ(st.message, "simulated disk full");
  EXPECT_EQ(readFile(ck + "/model.safetensors"), before);
  EXPECT_FALSE(fs::exists(ck + ".l4c-tmp"));
  ASSERT_TRUE(s->saveCheckpoint(ck).ok());
  EXPECT_NE(readFile(ck + "/model.safetensors"), before);
}

TEST(Checkpoint, InterruptedSaveLeavesThePreviousOne) {
  TinyConfig c;
  TempDir dir;
  auto plan = mustParse(tinyTrainPlan(2, 6, c));
  auto s = mustSession(plan, "", 4);
  train(*s, 0, 1, c);
  std::string ck = dir.file("ck");
  ASSERT_TRUE(s->saveCheckpoint(ck).ok());
  std::string model = readFile(ck + "/model.safetensors");
  std::string opt = readFile(ck + "/optimizer.safetensors");
  train(*s, 1, 2, c);
  // The process dies with the new checkpoint fully written but not yet in
  // place: the old one must still be whole. (A forked child: the save runs
  // on this thread alone, and the paths stay those of this test.)
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    (void)s->saveCheckpoint(
        ck, [](const std::string &) -> rt::Status { ::_exit(7); });
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 7);
  EXPECT_EQ(readFile(ck + "/model.safetensors"), model);
  EXPECT_EQ(readFile(ck + "/optimizer.safetensors"), opt);
  auto reloaded = mustSession(plan, ck);
  ASSERT_TRUE(reloaded->loadOptimizer(ck).ok());
  // The next save clears the leftovers and goes through.
  ASSERT_TRUE(fs::exists(ck + ".l4c-tmp"));
  ASSERT_TRUE(s->saveCheckpoint(ck).ok());
  EXPECT_FALSE(fs::exists(ck + ".l4c-tmp"));
  EXPECT_NE(readFile(ck + "/model.safetensors"), model);
  // A crash between the two renames of the fallback swap leaves the old
  // checkpoint at ck.l4c-old and none at ck; the next save puts it back
  // first.
  fs::rename(ck, ck + ".l4c-old");
  ASSERT_TRUE(s->saveCheckpoint(ck).ok());
  EXPECT_FALSE(fs::exists(ck + ".l4c-old"));
  EXPECT_TRUE(fs::exists(ck + "/optimizer.safetensors"));
}

TEST(Checkpoint, ErrorsNameTheFault) {
  TinyConfig c;
  TempDir dir;
  auto plan = mustParse(tinyTrainPlan(2, 6, c));
  auto s = mustSession(plan, "", 4);
  rt::Status st = s->saveCheckpoint(dir.file("missing/ck"));
  EXPECT_EQ(st.code, rt::StatusCode::Io);
  EXPECT_NE(st.message.find("parent directory"), std::string::npos)
      << st.message;
  std::ofstream(dir.file("file")) << "x";
  st = s->saveCheckpoint(dir.file("file/ck"));
  EXPECT_NE(st.message.find("parent directory"), std::string::npos);
  st = s->saveCheckpoint(dir.file("file"));
  EXPECT_NE(st.message.find("is not a directory; refusing"), std::string::npos)
      << st.message;
  // A directory that holds something else is never replaced.
  fs::create_directory(dir.file("home"));
  std::ofstream(dir.file("home/notes.txt")) << "keep me";
  st = s->saveCheckpoint(dir.file("home"));
  EXPECT_NE(
      st.message.find("holds 'notes.txt', so it is not an l4c checkpoint"),
      std::string::npos)
      << st.message;
  EXPECT_EQ(readFile(dir.file("home/notes.txt")), "keep me");
  // Nor is a stray directory that happens to have the temporary's name.
  fs::create_directory(dir.file("ck2.l4c-tmp"));
  std::ofstream(dir.file("ck2.l4c-tmp/mine.txt")) << "mine";
  st = s->saveCheckpoint(dir.file("ck2"));
  EXPECT_NE(st.message.find("holds 'mine.txt'"), std::string::npos)
      << st.message;
  EXPECT_EQ(readFile(dir.file("ck2.l4c-tmp/mine.txt")), "mine");
  EXPECT_EQ(s->saveCheckpoint("").code, rt::StatusCode::InvalidArgument);

  // Optimizer state that does not fit the plan.
  ASSERT_TRUE(s->saveCheckpoint(dir.file("ck")).ok());
  TinyConfig wide = c;
  wide.D = 20;
  auto other = mustSession(mustParse(tinyTrainPlan(2, 6, wide)), "", 1);
  st = other->loadOptimizer(dir.file("ck"));
  EXPECT_NE(st.message.find("tensor 'm.model.embed_tokens.weight' is F32 [64, "
                            "16] but the plan's weight is F32 [64, 20]"),
            std::string::npos)
      << st.message;
  // Weights that do not fit: the session names the tensor.
  std::unique_ptr<rt::Session> bad;
  rt::SessionOptions opts;
  opts.weightsPath = dir.file("ck");
  st = rt::Session::create(mustParse(tinyTrainPlan(2, 6, wide)), opts, bad);
  EXPECT_NE(st.message.find("'model.embed_tokens.weight' has shape [64, 16] "
                            "but the plan expects [64, 20]"),
            std::string::npos)
      << st.message;
  // A tied plan lacks lm_head: its state has a tensor the plan does not.
  auto tied = mustSession(mustParse(tinyTrainPlan(2, 6, c, true)), "", 1);
  st = tied->loadOptimizer(dir.file("ck"));
  EXPECT_NE(st.message.find("tensor 'm.lm_head.weight' (F32 [64, 16]) matches "
                            "no weight of the plan"),
            std::string::npos)
      << st.message;
  // A missing moment.
  std::vector<io::TensorRef> partial;
  int64_t zero = 0;
  partial.push_back({"step", io::DType::I64, {}, &zero});
  ASSERT_TRUE(
      io::writeSafetensors(dir.file("partial.safetensors"), partial).ok());
  st = s->loadOptimizer(dir.file("partial.safetensors"));
  EXPECT_NE(st.message.find("tensor 'm.model.embed_tokens.weight' is missing"),
            std::string::npos)
      << st.message;
  st = s->loadOptimizer(dir.file("nowhere"));
  EXPECT_EQ(st.code, rt::StatusCode::Io);
}

//===----------------------------------------------------------------------===//
// The C API and its C++ wrapper
//===----------------------------------------------------------------------===//

TEST(TrainCApi, StepsCountersAndCheckpoints) {
  TinyConfig c;
  TempDir dir;
  writePlan(dir.file("train.l4plan"), tinyTrainPlan(2, 6, c));
  l4rt_plan plan = nullptr;
  ASSERT_EQ(l4rt_plan_load(dir.file("train.l4plan").c_str(), &plan), L4RT_OK);
  l4rt_plan_summary info;
  ASSERT_EQ(l4rt_plan_info(plan, &info), L4RT_OK);
  EXPECT_STREQ(info.program_kind, "train");
  l4rt_session s = nullptr;
  ASSERT_EQ(l4rt_session_create(plan, nullptr, 2, &s), L4RT_OK);
  size_t n = 0;
  ASSERT_EQ(l4rt_num_parameters(s, &n), L4RT_OK);
  EXPECT_EQ(n, trainWeights(c, false).size());
  const char *name = nullptr;
  ASSERT_EQ(l4rt_parameter_name(s, 0, &name), L4RT_OK);
  EXPECT_STREQ(name, "model.embed_tokens.weight");
  EXPECT_EQ(l4rt_parameter_name(s, n, &name), L4RT_ERROR_INVALID_ARGUMENT);

  std::vector<int64_t> ids = makeIds(12, c.V, 5);
  float loss = 0;
  ASSERT_EQ(l4rt_train_step(s, ids.data(), 2, 6, &loss), L4RT_OK)
      << l4rt_last_error();
  EXPECT_GT(loss, 0.f);
  int64_t shape[4];
  size_t rank = 0;
  ASSERT_EQ(l4rt_tensor_shape(s, "grad.lm_head.weight", shape, 4, &rank),
            L4RT_OK);
  EXPECT_EQ(rank, 2u);
  EXPECT_EQ(shape[0], 64);
  EXPECT_EQ(l4rt_tensor_shape(s, "lm_head.weight", shape, 1, &rank),
            L4RT_ERROR_INVALID_ARGUMENT);
  Vec grad(64 * 16), weight(64 * 16);
  ASSERT_EQ(l4rt_get_tensor(s, "grad.lm_head.weight", grad.data(), grad.size()),
            L4RT_OK);
  ASSERT_EQ(l4rt_get_tensor(s, "lm_head.weight", weight.data(), weight.size()),
            L4RT_OK);
  EXPECT_EQ(l4rt_get_tensor(s, "lm_head.weight", weight.data(), 5),
            L4RT_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(l4rt_last_error()).find("not 5"), std::string::npos);
  l4rt_adamw h;
  l4rt_adamw_defaults(&h);
  EXPECT_EQ(h.lr, 1e-3);
  EXPECT_EQ(h.beta2, 0.999);
  EXPECT_EQ(h.weight_decay, 0.01);
  ASSERT_EQ(l4rt_adamw_step(s, &h), L4RT_OK);
  EXPECT_EQ(l4rt_adamw_step(s, &h), L4RT_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(l4rt_adamw_step(s, nullptr), L4RT_ERROR_INVALID_ARGUMENT);
  Vec m(64 * 16);
  cpu::adamwStep(weight.data(), grad.data(), m.data(), Vec(m.size()).data(),
                 m.size(), 1, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay);
  Vec after(weight.size());
  ASSERT_EQ(l4rt_get_tensor(s, "lm_head.weight", after.data(), after.size()),
            L4RT_OK);
  EXPECT_EQ(after, weight);
  ASSERT_EQ(l4rt_set_counter(s, "data_cursor", 77), L4RT_OK);
  int64_t v = 0;
  ASSERT_EQ(l4rt_get_counter(s, "step", &v), L4RT_OK);
  EXPECT_EQ(v, 1);
  ASSERT_EQ(l4rt_save_checkpoint(s, dir.file("ck").c_str()), L4RT_OK);
  EXPECT_EQ(l4rt_save_checkpoint(s, dir.file("no/such/dir").c_str()),
            L4RT_ERROR_IO);
  EXPECT_EQ(l4rt_train_step(s, ids.data(), 2, 6, nullptr), L4RT_OK);
  EXPECT_EQ(l4rt_zero_grad(s), L4RT_OK);
  EXPECT_EQ(l4rt_get_counter(s, "micro_batches", &v), L4RT_OK);
  EXPECT_EQ(v, 0);

  l4rt_session r = nullptr;
  ASSERT_EQ(l4rt_session_create(plan, dir.file("ck").c_str(), 0, &r), L4RT_OK);
  ASSERT_EQ(l4rt_load_optimizer(r, dir.file("ck").c_str()), L4RT_OK)
      << l4rt_last_error();
  ASSERT_EQ(l4rt_get_counter(r, "data_cursor", &v), L4RT_OK);
  EXPECT_EQ(v, 77);
  ASSERT_EQ(l4rt_get_tensor(r, "m.lm_head.weight", after.data(), after.size()),
            L4RT_OK);
  EXPECT_EQ(after, m);
  EXPECT_EQ(l4rt_load_optimizer(r, nullptr), L4RT_ERROR_INVALID_ARGUMENT);
  l4rt_session_free(r);
  l4rt_session_free(s);
  l4rt_plan_free(plan);

  // The C++ wrapper over the same calls.
  l4rt::Plan cp(dir.file("train.l4plan"));
  l4rt::Session cs(cp, dir.file("ck"));
  cs.loadOptimizer(dir.file("ck"));
  EXPECT_EQ(cs.counter("step"), 1);
  float l = cs.trainStep(ids, 2, 6);
  EXPECT_GT(l, 0.f);
  EXPECT_EQ(cs.tensor("grad.model.norm.weight").size(), 16u);
  EXPECT_EQ(cs.parameterNames().size(), n);
  cs.adamwStep(l4rt::Session::adamwDefaults());
  EXPECT_EQ(cs.counter("step"), 2);
  EXPECT_THROW(cs.adamwStep(l4rt::Session::adamwDefaults()), l4rt::Error);
  EXPECT_THROW(cs.trainStep(ids, 3, 6), l4rt::Error);
}

//===----------------------------------------------------------------------===//
// l4-run on train plans
//===----------------------------------------------------------------------===//

struct RunResult {
  int rc = -1;
  std::string output;
};

RunResult runTool(const std::string &args) {
  RunResult r;
  std::string cmd = std::string(L4RUN_PATH) + " " + args + " 2>&1";
  FILE *f = ::popen(cmd.c_str(), "r");
  if (!f)
    return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), f)) > 0)
    r.output.append(buf.data(), n);
  int status = ::pclose(f);
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

class L4RunTrain : public ::testing::Test {
protected:
  void SetUp() override {
    bytes.V = 256;
    writePlan(dir.file("train.l4plan"), tinyTrainPlan(2, 8, bytes));
    writePlan(dir.file("tok.l4plan"), tinyTrainPlan(2, 8, TinyConfig()));
    writePlan(dir.file("fwd.l4plan"), tinyModelPlan("forward", 2, 8, bytes));
    std::string text;
    for (int i = 0; i < 40; ++i)
      text += "the quick brown fox jumps over the lazy dog " +
              std::to_string(i) + "\n";
    std::ofstream(dir.file("data.txt"), std::ios::binary) << text;
  }
  std::string plan() const { return dir.file("train.l4plan"); }
  std::string trainArgs(const std::string &extra) const {
    return plan() + " --train-data " + dir.file("data.txt") +
           " --batch 2 --seq 8 --grad-accum 2 --adamw=lr=0.01 " + extra;
  }
  TinyConfig bytes;
  TempDir dir;
};

TEST_F(L4RunTrain, ReferenceStepWritesLossGradsAndAdamW) {
  std::vector<int64_t> ids = makeIds(16, 256, 3);
  ASSERT_TRUE(
      io::writeSafetensors(dir.file("in.safetensors"),
                           {{"input_ids", io::DType::I64, {2, 8}, ids.data()}})
          .ok());
  RunResult r = runTool(plan() + " --random-weights=5 --inputs " +
                        dir.file("in.safetensors") + " --out " +
                        dir.file("out.safetensors") +
                        " --adamw=lr=0.01,beta1=0.9,beta2=0.95,eps=1e-8,"
                        "weight_decay=0.1");
  ASSERT_EQ(r.rc, 0) << r.output;
  io::Checkpoint out;
  ASSERT_TRUE(io::Checkpoint::open(dir.file("out.safetensors"), out).ok());
  io::Checkpoint::Entry e;
  ASSERT_TRUE(out.find("loss", e));
  EXPECT_EQ(e.info->dtype, io::DType::F32);
  EXPECT_TRUE(e.info->shape.empty());
  // The library's numbers.
  auto s = mustSession(mustParse(tinyTrainPlan(2, 8, bytes)), "", 5);
  float loss = 0, got = 0;
  ASSERT_TRUE(s->trainStep(ids.data(), 2, 8, &loss).ok());
  ASSERT_TRUE(out.read("loss", io::DType::F32, &got, 1).ok());
  EXPECT_EQ(got, loss);
  std::map<std::string, Vec> grads;
  for (auto &[name, shape] : trainWeights(bytes, false))
    grads[name] = tensorOf(*s, "grad." + name);
  ASSERT_TRUE(s->adamwStep({0.01, 0.9, 0.95, 1e-8, 0.1}).ok());
  size_t checked = 0;
  for (auto &[name, shape] : trainWeights(bytes, false)) {
    Vec g(grads[name].size()), a(g.size());
    ASSERT_TRUE(
        out.read("grad." + name, io::DType::F32, g.data(), g.size()).ok());
    ASSERT_TRUE(
        out.read("adamw." + name, io::DType::F32, a.data(), a.size()).ok());
    ASSERT_TRUE(out.find("adamw." + name, e));
    EXPECT_EQ(e.info->shape, shape);
    EXPECT_EQ(g, grads[name]) << name;
    EXPECT_EQ(a, tensorOf(*s, name)) << name;
    ++checked;
  }
  EXPECT_EQ(checked, trainWeights(bytes, false).size());
  // --adamw is for train plans, and its keys are checked.
  r = runTool(dir.file("fwd.l4plan") + " --random-weights=1 --inputs " +
              dir.file("in.safetensors") + " --out " + dir.file("o") +
              " --adamw=lr=1");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--adamw needs a train plan"), std::string::npos);
  r = runTool(plan() + " --random-weights=1 --inputs " +
              dir.file("in.safetensors") + " --out " + dir.file("o") +
              " --adamw=lr=1,momentum=2");
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.output.find("--adamw: unknown key 'momentum'"), std::string::npos)
      << r.output;
}

TEST_F(L4RunTrain, ResumeEqualsUninterrupted) {
  RunResult r =
      runTool(trainArgs("--random-weights=3 --steps 6 --save " +
                        dir.file("six") + " --log " + dir.file("six.log")));
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(r.output.find("step 6/6  loss "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("tokens/s"), std::string::npos);
  EXPECT_EQ(r.output.find("\033["), std::string::npos); // not a terminal
  r = runTool(trainArgs("--random-weights=3 --steps 3 --save " +
                        dir.file("part") + " --log " + dir.file("part.log")));
  ASSERT_EQ(r.rc, 0) << r.output;
  r = runTool(trainArgs("--resume " + dir.file("part") + " --steps 6 --save " +
                        dir.file("part") + " --save-every 2 --log " +
                        dir.file("part.log")));
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(r.output.find("training 3 steps from step 3"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("saved " + dir.file("part") + " at step 4"),
            std::string::npos)
      << r.output;
  EXPECT_EQ(readFile(dir.file("part/model.safetensors")),
            readFile(dir.file("six/model.safetensors")));
  EXPECT_EQ(readFile(dir.file("part/optimizer.safetensors")),
            readFile(dir.file("six/optimizer.safetensors")));
  // The logs agree line for line except for the speed column.
  auto lossColumns = [](const std::string &text) {
    std::istringstream in(text);
    std::string line, out;
    while (std::getline(in, line)) {
      std::istringstream f(line);
      std::string step, loss, rate;
      f >> step >> loss >> rate;
      EXPECT_FALSE(rate.empty()) << line;
      out += step + " " + loss + "\n";
    }
    return out;
  };
  std::string six = lossColumns(readFile(dir.file("six.log")));
  EXPECT_EQ(std::count(six.begin(), six.end(), '\n'), 6);
  EXPECT_EQ(lossColumns(readFile(dir.file("part.log"))), six);
  // Nothing left to do.
  r = runTool(trainArgs("--resume " + dir.file("six") + " --steps 6"));
  EXPECT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(r.output.find("nothing to do"), std::string::npos);
  // Other batch shapes continue, with a warning.
  r = runTool(plan() + " --train-data " + dir.file("data.txt") +
              " --batch 1 --seq 8 --resume " + dir.file("six") + " --steps 7");
  EXPECT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(r.output.find("was trained with data_batch 2, this run uses 1"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("was trained with grad_accum 2, this run uses 1"),
            std::string::npos)
      << r.output;
  // The checkpoint compiles back into a generate session.
  auto gen = mustSession(mustParse(tinyModelPlan("generate", 1, 8, bytes)),
                         dir.file("six"));
  EXPECT_TRUE(gen);
}

TEST_F(L4RunTrain, TokenFilesAndErrors) {
  // tokens: the magic, then little-endian uint32 ids.
  std::string tok = "L4CTOK01";
  for (uint32_t i = 0; i < 64; ++i) {
    uint32_t id = (i * 7) % 64;
    for (int b = 0; b < 4; ++b)
      tok += char((id >> (8 * b)) & 0xff);
  }
  std::ofstream(dir.file("ids.tok"), std::ios::binary) << tok;
  RunResult r =
      runTool(dir.file("tok.l4plan") +
              " --random-weights=1 "
              "--train-data " +
              dir.file("ids.tok") + " --data-format=tokens --steps 2");
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(r.output.find("step 2/2"), std::string::npos);
  // bytes need a byte vocabulary.
  r = runTool(dir.file("tok.l4plan") + " --random-weights=1 --train-data " +
              dir.file("data.txt") + " --steps 2");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("needs a byte vocabulary (vocab_size >= 256); the "
                          "plan has 64"),
            std::string::npos)
      << r.output;
  // A token outside the vocabulary, a bad magic, a ragged tail.
  std::string big = tok;
  big[8 + 4 * 5] = char(200);
  std::ofstream(dir.file("big.tok"), std::ios::binary) << big;
  r = runTool(dir.file("tok.l4plan") + " --random-weights=1 --train-data " +
              dir.file("big.tok") + " --data-format=tokens --steps 1");
  EXPECT_NE(r.output.find("token 5 is 200, outside the vocabulary [0, 64)"),
            std::string::npos)
      << r.output;
  std::ofstream(dir.file("bad.tok"), std::ios::binary) << "L4CTOK02abcd";
  r = runTool(dir.file("tok.l4plan") + " --random-weights=1 --train-data " +
              dir.file("bad.tok") + " --data-format=tokens --steps 1");
  EXPECT_NE(r.output.find("does not start with \"L4CTOK01\""),
            std::string::npos);
  std::ofstream(dir.file("odd.tok"), std::ios::binary) << "L4CTOK01abcde";
  r = runTool(dir.file("tok.l4plan") + " --random-weights=1 --train-data " +
              dir.file("odd.tok") + " --data-format=tokens --steps 1");
  EXPECT_NE(r.output.find("5 bytes after the magic"), std::string::npos);
  // Too short for one batch.
  std::ofstream(dir.file("short.txt")) << "tiny";
  r = runTool(plan() + " --train-data " + dir.file("short.txt") +
              " --batch 2 --seq 8 --random-weights=1 --steps 1");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("holds 4 tokens; one batch needs 16 (--batch 2 x "
                          "--seq 8)"),
            std::string::npos)
      << r.output;
  // An unwritable checkpoint target fails before any step.
  r = runTool(trainArgs("--random-weights=1 --steps 1 --save " +
                        dir.file("no/such/ck")));
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("cannot write into its parent directory"),
            std::string::npos)
      << r.output;
  EXPECT_EQ(r.output.find("step 1/1"), std::string::npos);
  // A checkpoint of another model.
  r = runTool(dir.file("tok.l4plan") + " --random-weights=1 --train-data " +
              dir.file("ids.tok") + " --data-format=tokens --steps 1 --save " +
              dir.file("small"));
  ASSERT_EQ(r.rc, 0) << r.output;
  r = runTool(trainArgs("--resume " + dir.file("small") + " --steps 2"));
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("has shape [64, 16] but the plan expects [256, 16]"),
            std::string::npos)
      << r.output;
  // Usage errors.
  r = runTool(trainArgs("--random-weights=1"));
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.output.find("--train-data needs --steps N"), std::string::npos);
  r = runTool(trainArgs("--random-weights=1 --weights x --steps 1"));
  EXPECT_EQ(r.rc, 2);
  r = runTool(trainArgs("--random-weights=1 --steps 1 --save-every 2"));
  EXPECT_NE(r.output.find("--save-every K needs K >= 1 and --save DIR"),
            std::string::npos);
  r = runTool(dir.file("fwd.l4plan") + " --random-weights=1 --train-data " +
              dir.file("data.txt") + " --steps 1");
  EXPECT_NE(r.output.find("--train-data needs a train plan"), std::string::npos)
      << r.output;
  r = runTool(trainArgs("--random-weights=1 --steps 1 --batch 3"));
  EXPECT_NE(r.output.find("exceed the plan's max batch 2"), std::string::npos)
      << r.output;
}

} // namespace
