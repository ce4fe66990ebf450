//===- executor_test.cpp - CPU executor, C API and l4-run tests ----------===//
//
// Hand-built plans run through a Session and match a direct composition of
// the cpu:: kernels: the smallest forward plan, and a tiny two-layer model
// as forward and prefill/decode plans (logits and greedy ids). Also weights
// from checkpoints and seeds, input validation, sampling, the C API and the
// l4-run tool.
//
//===----------------------------------------------------------------------===//
#include "cpu/kernels.h"
#include "executor.h"
#include "io/safetensors.h"
#include "l4c/runtime/l4rt.h"
#include "l4c/runtime/l4rt.hpp"
#include "test_plans.h"

#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
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
    std::string tmpl = (fs::temp_directory_path() / "l4c-exec-XXXXXX").string();
    if (::mkdtemp(tmpl.data()))
      path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty())
      fs::remove_all(path_, ec);
  }
  std::string file(const std::string &name) const { return path_ + "/" + name; }
  const std::string &path() const { return path_; }

private:
  std::string path_;
};

std::shared_ptr<const rt::Plan> mustParse(const PlanSpec &spec) {
  std::shared_ptr<const rt::Plan> plan;
  rt::Status s = rt::Plan::fromBytes(spec.serialize(), "test.l4plan", plan);
  EXPECT_TRUE(s.ok()) << s.message;
  return plan;
}

std::unique_ptr<rt::Session> mustSession(std::shared_ptr<const rt::Plan> plan,
                                         const rt::SessionOptions &opts) {
  std::unique_ptr<rt::Session> session;
  rt::Status s = rt::Session::create(std::move(plan), opts, session);
  EXPECT_TRUE(s.ok()) << s.message;
  return session;
}

/// Random weights: norms near one, matrices small, so activations stay tame.
Weights makeWeights(
    const std::vector<std::pair<std::string, std::vector<int64_t>>> &shapes,
    uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  Weights w;
  for (auto &[name, shape] : shapes) {
    size_t n = 1;
    for (int64_t e : shape)
      n *= size_t(e);
    Vec &v = w[name];
    v.resize(n);
    float scale =
        shape.size() == 1
            ? 0.f
            : 1.f / std::sqrt(float(shape[shape.size() == 2 ? 1 : 1]));
    for (float &x : v)
      x = shape.size() == 1 ? 1.f + 0.2f * u(rng) : scale * u(rng);
  }
  return w;
}

void writeCheckpoint(
    const std::string &dir,
    const std::vector<std::pair<std::string, std::vector<int64_t>>> &shapes,
    const Weights &w, io::DType dtype = io::DType::F32) {
  std::vector<io::TensorRef> refs;
  std::vector<std::vector<uint16_t>> halves;
  halves.reserve(shapes.size());
  for (auto &[name, shape] : shapes) {
    const Vec &v = w.at(name);
    if (dtype == io::DType::BF16) {
      halves.emplace_back(v.size());
      for (size_t i = 0; i < v.size(); ++i)
        halves.back()[i] = io::f32ToBf16(v[i]);
      refs.push_back({name, dtype, shape, halves.back().data()});
    } else {
      refs.push_back({name, dtype, shape, v.data()});
    }
  }
  io::Status s = io::writeSafetensors(dir + "/model.safetensors", refs);
  ASSERT_TRUE(s.ok()) << s.error;
}

/// The tiny model of test_plans.h composed directly from the cpu kernels
/// over one sequence (no cache): logits [T, V].
Vec referenceForward(const TinyConfig &c, const Weights &w,
                     const std::vector<int64_t> &ids) {
  auto W = [&](const std::string &n) { return w.at(n).data(); };
  const size_t T = ids.size(), D = size_t(c.D), H = size_t(c.H),
               Hkv = size_t(c.Hkv), d = size_t(c.d), qw = H * d, kw = Hkv * d;
  const float eps = float(c.eps);
  std::vector<int64_t> pos(T);
  for (size_t t = 0; t < T; ++t)
    pos[t] = int64_t(t);
  Vec invFreq(d / 2);
  cpu::ropeInvFreq(c.theta, d, c.scaling == "llama3" ? "llama3" : "default",
                   c.factor, c.lowFreq, c.highFreq, double(c.origMax),
                   invFreq.data());
  Vec h(T * D), x(T * D);
  cpu::embedding(W("model.embed_tokens.weight"), D, ids.data(), T, h.data());
  auto lin = [&](const Vec &in, size_t K, const std::string &n, size_t N) {
    Vec y(T * N);
    cpu::linear(in.data(), K, W(n), K, y.data(), N, T, N, K);
    return y;
  };
  auto mlp = [&](const Vec &in, const std::string &p, size_t I) {
    Vec g = lin(in, D, p + "gate_proj.weight", I),
        u = lin(in, D, p + "up_proj.weight", I);
    cpu::swiglu(g.data(), I, u.data(), I, T, I, g.data(), I);
    return lin(g, I, p + "down_proj.weight", D);
  };
  for (int layer = 0; layer < 2; ++layer) {
    std::string l = "model.layers." + std::to_string(layer) + ".";
    cpu::rmsNorm(h.data(), W(l + "input_layernorm.weight"), T, D, eps,
                 x.data());
    Vec q = lin(x, D, l + "self_attn.q_proj.weight", qw);
    Vec k = lin(x, D, l + "self_attn.k_proj.weight", kw);
    Vec v = lin(x, D, l + "self_attn.v_proj.weight", kw);
    if (layer == 0) {
      cpu::rope(q.data(), qw, T, H, d, pos.data(), invFreq.data());
      cpu::rope(k.data(), kw, T, Hkv, d, pos.data(), invFreq.data());
      cpu::rmsNorm(q.data(), nullptr, T * H, d, eps, q.data());
      cpu::rmsNorm(k.data(), nullptr, T * Hkv, d, eps, k.data());
    } else {
      cpu::temperatureScale(q.data(), qw, T, qw, pos.data(),
                            float(c.floorScale), float(c.attnScale));
    }
    Vec att(T * qw);
    cpu::attention(q.data(), qw, pos.data(), T, k.data(), kw, v.data(), kw, T,
                   H, Hkv, d, layer == 0 ? c.chunk : 0,
                   float(1.0 / std::sqrt(double(d))), att.data(), qw);
    Vec o = lin(att, qw, l + "self_attn.o_proj.weight", D);
    cpu::add(h.data(), o.data(), T * D, h.data());
    cpu::rmsNorm(h.data(), W(l + "post_attention_layernorm.weight"), T, D, eps,
                 x.data());
    std::string ff = l + "feed_forward.";
    Vec f;
    if (layer == 0) {
      f = mlp(x, ff, size_t(c.Imlp));
    } else {
      Vec rl = lin(x, D, ff + "router.weight", size_t(c.E)),
          sc(T * size_t(c.E)), r(T * D);
      cpu::routerScores(rl.data(), T, size_t(c.E), size_t(c.topK), sc.data());
      cpu::expertsForward(x.data(), sc.data(), W(ff + "experts.gate_up_proj"),
                          W(ff + "experts.down_proj"), T, D, size_t(c.I),
                          size_t(c.E), r.data());
      f = mlp(x, ff + "shared_expert.", size_t(c.I));
      cpu::add(r.data(), f.data(), T * D, f.data());
    }
    cpu::add(h.data(), f.data(), T * D, h.data());
  }
  cpu::rmsNorm(h.data(), W("model.norm.weight"), T, D, eps, x.data());
  return lin(x, D, "lm_head.weight", size_t(c.V));
}

/// Greedy continuation by re-running the reference over the whole prefix.
std::vector<int64_t> referenceGreedy(const TinyConfig &c, const Weights &w,
                                     std::vector<int64_t> ids, int64_t G) {
  for (int64_t g = 0; g < G; ++g) {
    Vec logits = referenceForward(c, w, ids);
    int64_t next = 0;
    cpu::argmaxRows(logits.data() + (ids.size() - 1) * size_t(c.V), 1,
                    size_t(c.V), &next);
    ids.push_back(next);
  }
  return ids;
}

double maxRelErr(const Vec &got, const Vec &want) {
  double err = 0, ref = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::fabs(double(got[i]) - double(want[i])));
    ref = std::max(ref, std::fabs(double(want[i])));
  }
  return err / std::max(ref, 1e-30);
}

//===----------------------------------------------------------------------===//
// Execution against direct kernel calls
//===----------------------------------------------------------------------===//

TEST(Executor, LinearPlanMatchesKernels) {
  const int64_t B = 2, S = 4, V = 16, D = 8;
  PlanSpec spec = linearPlan(B, S, V, D);
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes = {
      {"model.embed_tokens.weight", {V, D}},
      {"model.norm.weight", {D}},
      {"lm_head.weight", {V, D}}};
  Weights w = makeWeights(shapes, 3);
  TempDir dir;
  writeCheckpoint(dir.path(), shapes, w);
  auto session = mustSession(mustParse(spec), {dir.path(), 0});
  ASSERT_TRUE(session);
  // Fewer sequences and tokens than compiled: strides follow the maxima.
  for (auto [b, t] : {std::pair<int64_t, int64_t>{1, 3}, {2, 4}, {2, 1}}) {
    std::vector<int64_t> ids;
    for (int64_t i = 0; i < b * t; ++i)
      ids.push_back((i * 7 + 3) % V);
    Vec logits(size_t(b * t * V));
    rt::Status s = session->forward(ids.data(), b, t, logits.data());
    ASSERT_TRUE(s.ok()) << s.message;
    size_t n = size_t(b * t);
    Vec h(n * D), x(n * D), want(n * V);
    cpu::embedding(w["model.embed_tokens.weight"].data(), D, ids.data(), n,
                   h.data());
    cpu::rmsNorm(h.data(), w["model.norm.weight"].data(), n, D, 1e-5f,
                 x.data());
    cpu::linear(x.data(), D, w["lm_head.weight"].data(), D, want.data(), V, n,
                V, D);
    EXPECT_LE(maxRelErr(logits, want), 1e-6) << "b=" << b << " t=" << t;
  }
}

class TinyModel : public ::testing::Test {
protected:
  void SetUp() override {
    w = makeWeights(tinyWeights(c), 11);
    writeCheckpoint(dir.path(), tinyWeights(c), w);
  }
  TinyConfig c;
  Weights w;
  TempDir dir;
};

TEST_F(TinyModel, ForwardMatchesReference) {
  auto session = mustSession(mustParse(tinyModelPlan("forward", 2, 8, c)),
                             {dir.path(), 0});
  ASSERT_TRUE(session);
  const int64_t B = 2, T = 7;
  std::vector<int64_t> ids = {1, 5, 9, 13, 17, 21, 25, 60, 2, 4, 6, 8, 10, 12};
  Vec logits(size_t(B * T * c.V));
  rt::Status s = session->forward(ids.data(), B, T, logits.data());
  ASSERT_TRUE(s.ok()) << s.message;
  for (int64_t b = 0; b < B; ++b) {
    Vec want = referenceForward(
        c, w, {ids.begin() + b * T, ids.begin() + (b + 1) * T});
    Vec got(logits.begin() + b * T * c.V, logits.begin() + (b + 1) * T * c.V);
    EXPECT_LE(maxRelErr(got, want), 1e-5) << "batch " << b;
  }
}

TEST_F(TinyModel, GreedyThroughCacheMatchesReference) {
  auto gen = mustSession(mustParse(tinyModelPlan("generate", 2, 16, c)),
                         {dir.path(), 0});
  auto fwd = mustSession(mustParse(tinyModelPlan("forward", 2, 16, c)),
                         {dir.path(), 0});
  ASSERT_TRUE(gen && fwd);
  const int64_t B = 2, T = 5, G = 9;
  std::vector<int64_t> ids = {1, 5, 9, 13, 17, 2, 4, 6, 8, 10};
  std::vector<int64_t> viaCache(size_t(B * (T + G))),
      viaForward(viaCache.size());
  int64_t len = 0;
  rt::Status s =
      gen->generate(ids.data(), B, T, G, nullptr, viaCache.data(), &len);
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_EQ(len, T + G);
  s = fwd->generate(ids.data(), B, T, G, nullptr, viaForward.data(), &len);
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_EQ(viaCache, viaForward);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> want = referenceGreedy(
        c, w, {ids.begin() + b * T, ids.begin() + (b + 1) * T}, G);
    std::vector<int64_t> got(viaCache.begin() + b * (T + G),
                             viaCache.begin() + (b + 1) * (T + G));
    EXPECT_EQ(got, want) << "batch " << b;
  }
  rt::Timing t = gen->lastTiming();
  EXPECT_EQ(t.prefillTokens, B * T);
  EXPECT_EQ(t.decodeTokens, B * (G - 1));
  // A second request on the same session starts over (the cache is reused).
  std::vector<int64_t> again(viaCache.size());
  s = gen->generate(ids.data(), B, T, G, nullptr, again.data(), &len);
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_EQ(again, viaCache);
  // One sequence of the two: the same continuation.
  std::vector<int64_t> one(size_t(T + G));
  s = gen->generate(ids.data() + T, 1, T, G, nullptr, one.data(), &len);
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_TRUE(std::equal(one.begin(), one.end(), viaCache.begin() + (T + G)));
}

TEST_F(TinyModel, Bf16CheckpointIsConverted) {
  TempDir bf;
  writeCheckpoint(bf.path(), tinyWeights(c), w, io::DType::BF16);
  Weights rounded = w;
  for (auto &[n, v] : rounded)
    for (float &x : v)
      x = io::bf16ToF32(io::f32ToBf16(x));
  auto session =
      mustSession(mustParse(tinyModelPlan("forward", 1, 4, c)), {bf.path(), 0});
  ASSERT_TRUE(session);
  std::vector<int64_t> ids = {3, 1, 4, 1};
  Vec logits(size_t(4 * c.V));
  ASSERT_TRUE(session->forward(ids.data(), 1, 4, logits.data()).ok());
  EXPECT_LE(maxRelErr(logits, referenceForward(c, rounded, ids)), 1e-5);
}

//===----------------------------------------------------------------------===//
// Weights
//===----------------------------------------------------------------------===//

TEST_F(TinyModel, CheckpointErrorsNameTheTensor) {
  auto plan = mustParse(tinyModelPlan("forward", 1, 4, c));
  std::unique_ptr<rt::Session> session;
  // Missing tensor.
  auto shapes = tinyWeights(c);
  auto missing = shapes;
  missing.erase(missing.begin() + 3);
  TempDir a;
  writeCheckpoint(a.path(), missing, w);
  rt::Status s = rt::Session::create(plan, {a.path(), 0}, session);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message.find("tensor '" + shapes[3].first + "' is missing"),
            std::string::npos)
      << s.message;
  // Wrong shape.
  auto wrong = shapes;
  std::swap(wrong[3].second[0], wrong[3].second[1]);
  TempDir b;
  writeCheckpoint(b.path(), wrong, w);
  s = rt::Session::create(plan, {b.path(), 0}, session);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message.find("tensor '" + shapes[3].first +
                           "' has shape [16, 8] but the plan "
                           "expects [8, 16]"),
            std::string::npos)
      << s.message;
  // No checkpoint at all.
  s = rt::Session::create(plan, {dir.file("nothing-here"), 0}, session);
  EXPECT_EQ(s.code, rt::StatusCode::Io) << s.message;
  EXPECT_NE(s.message.find("nothing-here"), std::string::npos) << s.message;
}

TEST(Executor, RandomWeightsAreDeterministic) {
  auto plan = mustParse(tinyModelPlan("forward", 1, 6));
  std::vector<int64_t> ids = {1, 2, 3, 4, 5, 6};
  auto run = [&](uint64_t seed) {
    auto s = mustSession(plan, {"", seed});
    Vec logits(size_t(6 * 64));
    EXPECT_TRUE(s->forward(ids.data(), 1, 6, logits.data()).ok());
    return logits;
  };
  Vec a = run(1), b = run(1), c = run(2);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  for (float x : a)
    ASSERT_TRUE(std::isfinite(x));
  // Norm weights are ones, matrices normal(0, 1/sqrt(fan_in)).
  auto s = mustSession(plan, {"", 5});
  const rt::BufferDesc *norm = nullptr, *q = nullptr;
  for (const rt::WeightDesc &wd : plan->weights) {
    if (wd.hfName == "model.norm.weight")
      norm = &plan->buffers[wd.buffer];
    if (wd.hfName == "model.layers.0.self_attn.q_proj.weight")
      q = &plan->buffers[wd.buffer];
  }
  ASSERT_TRUE(norm && q);
  const float *base =
      reinterpret_cast<const float *>(s->regionData(pl::Region::Weights));
  for (uint64_t i = 0; i < norm->numel; ++i)
    EXPECT_EQ(base[norm->offset / 4 + i], 1.0f);
  double sum2 = 0;
  for (uint64_t i = 0; i < q->numel; ++i)
    sum2 += double(base[q->offset / 4 + i]) * base[q->offset / 4 + i];
  double var = sum2 / double(q->numel); // expect 1 / fan_in = 1/16
  EXPECT_NEAR(var, 1.0 / 16, 0.025);
}

//===----------------------------------------------------------------------===//
// Input validation and sampling
//===----------------------------------------------------------------------===//

TEST(Executor, ValidatesInputs) {
  auto fwd = mustSession(mustParse(tinyModelPlan("forward", 2, 8)), {"", 1});
  auto gen = mustSession(mustParse(tinyModelPlan("generate", 2, 16)), {"", 1});
  std::vector<int64_t> ids(64, 1);
  Vec logits(3 * 16 * 64);
  std::vector<int64_t> out(64);
  int64_t len = 0;
  ids[1 * 3 + 2] = 64;
  rt::Status s = fwd->forward(ids.data(), 2, 3, logits.data());
  EXPECT_EQ(s.code, rt::StatusCode::InvalidArgument);
  EXPECT_EQ(s.message,
            "input_ids[1, 2] = 64 is outside the vocabulary [0, 64)");
  ids[5] = -3;
  s = gen->generate(ids.data(), 2, 3, 1, nullptr, out.data(), &len);
  EXPECT_EQ(s.message,
            "input_ids[1, 2] = -3 is outside the vocabulary [0, 64)");
  ids[5] = 1;
  s = fwd->forward(ids.data(), 3, 2, logits.data());
  EXPECT_EQ(s.message,
            "batch 3 is outside the plan's range [1, 2] (max_batch)");
  s = fwd->forward(ids.data(), 1, 9, logits.data());
  EXPECT_EQ(s.message,
            "sequence length 9 is outside the plan's range [1, 8] (max_seq)");
  s = gen->generate(ids.data(), 1, 14, 4, nullptr, out.data(), &len);
  EXPECT_EQ(s.message,
            "prompt of 14 tokens + 4 new tokens exceeds the plan's max_seq 16");
  s = gen->generate(ids.data(), 1, 0, 4, nullptr, out.data(), &len);
  EXPECT_EQ(s.code, rt::StatusCode::InvalidArgument);
  s = gen->forward(ids.data(), 1, 2, logits.data());
  EXPECT_NE(s.message.find("has no forward program (program_kind generate)"),
            std::string::npos)
      << s.message;
  s = fwd->forward(nullptr, 1, 2, logits.data());
  EXPECT_EQ(s.code, rt::StatusCode::InvalidArgument);
  rt::Sampling bad{0.0, 1.0, 0};
  s = gen->generate(ids.data(), 1, 2, 2, &bad, out.data(), &len);
  EXPECT_NE(s.message.find("temperature"), std::string::npos) << s.message;
  bad = {1.0, 1.5, 0};
  s = gen->generate(ids.data(), 1, 2, 2, &bad, out.data(), &len);
  EXPECT_NE(s.message.find("top_p"), std::string::npos) << s.message;
  // Exactly filling max_seq is fine; no new tokens returns the prompt.
  s = gen->generate(ids.data(), 1, 12, 4, nullptr, out.data(), &len);
  EXPECT_TRUE(s.ok()) << s.message;
  EXPECT_EQ(len, 16);
  s = gen->generate(ids.data(), 1, 3, 0, nullptr, out.data(), &len);
  EXPECT_TRUE(s.ok()) << s.message;
  EXPECT_EQ(len, 3);
}

TEST(Executor, SamplingIsSeededAndTopPOfZeroIsGreedy) {
  auto gen = mustSession(mustParse(tinyModelPlan("generate", 1, 16)), {"", 3});
  std::vector<int64_t> ids = {7, 8, 9};
  auto run = [&](const rt::Sampling *s) {
    std::vector<int64_t> out(13);
    int64_t len = 0;
    EXPECT_TRUE(gen->generate(ids.data(), 1, 3, 10, s, out.data(), &len).ok());
    return out;
  };
  rt::Sampling hot{5.0, 1.0, 42};
  std::vector<int64_t> a = run(&hot), b = run(&hot);
  EXPECT_EQ(a, b);
  bool differs = false;
  for (uint64_t seed = 43; seed < 48 && !differs; ++seed) {
    rt::Sampling other{5.0, 1.0, seed};
    differs = run(&other) != a;
  }
  EXPECT_TRUE(differs);
  rt::Sampling nucleus{1.0, 1e-9, 1};
  EXPECT_EQ(run(&nucleus), run(nullptr));
}

TEST(Executor, RejectsUnsupportedPlans) {
  PlanSpec p = linearPlan();
  for (BufferSpec &b : p.buffers)
    if (b.dtype == pl::DType::F32 && b.region == pl::Region::Weights) {
      b.dtype = pl::DType::F16;
      b.size /= 2;
    }
  p.precision = "f16";
  std::unique_ptr<rt::Session> session;
  rt::Status s = rt::Session::create(mustParse(p), {"", 0}, session);
  EXPECT_EQ(s.code, rt::StatusCode::Unsupported);
  EXPECT_NE(
      s.message.find("has dtype f16; the runtime runs f32 and bf16 plans"),
      std::string::npos)
      << s.message;
  p = linearPlan();
  p.meshRanks = 8;
  s = rt::Session::create(mustParse(p), {"", 0}, session);
  EXPECT_EQ(s.code, rt::StatusCode::Unsupported);
}

//===----------------------------------------------------------------------===//
// C API and C++ wrapper
//===----------------------------------------------------------------------===//

TEST(CApi, ForwardGenerateAndErrors) {
  std::vector<uint8_t> bytes = tinyModelPlan("generate", 2, 16).serialize();
  l4rt_plan plan = nullptr;
  ASSERT_EQ(l4rt_plan_load_memory(bytes.data(), bytes.size(), &plan), L4RT_OK);
  l4rt_session session = nullptr;
  ASSERT_EQ(l4rt_session_create(plan, nullptr, 9, &session), L4RT_OK)
      << l4rt_last_error();
  l4rt_plan_free(plan); // the session keeps the plan alive
  int64_t ids[4] = {1, 2, 3, 4};
  int64_t out[2 * 6];
  int64_t len = 0;
  ASSERT_EQ(l4rt_generate(session, ids, 2, 2, 4, nullptr, out, &len), L4RT_OK)
      << l4rt_last_error();
  EXPECT_EQ(len, 6);
  EXPECT_EQ(out[6], 3);
  l4rt_timing t;
  ASSERT_EQ(l4rt_session_timing(session, &t), L4RT_OK);
  EXPECT_EQ(t.prefill_tokens, 4);
  EXPECT_EQ(t.decode_tokens, 6);
  float logits[64];
  EXPECT_EQ(l4rt_forward(session, ids, 1, 1, logits),
            L4RT_ERROR_INVALID_ARGUMENT);
  ids[0] = 99;
  EXPECT_EQ(l4rt_generate(session, ids, 2, 2, 4, nullptr, out, &len),
            L4RT_ERROR_INVALID_ARGUMENT);
  EXPECT_STREQ(l4rt_last_error(),
               "input_ids[0, 0] = 99 is outside the vocabulary [0, 64)");
  EXPECT_EQ(l4rt_generate(nullptr, ids, 2, 2, 4, nullptr, out, &len),
            L4RT_ERROR_INVALID_ARGUMENT);
  l4rt_session_free(session);
  l4rt_session_free(nullptr);

  ASSERT_EQ(l4rt_plan_load_memory(bytes.data(), bytes.size(), &plan), L4RT_OK);
  EXPECT_EQ(l4rt_session_create(plan, "/nonexistent/ckpt", 0, &session),
            L4RT_ERROR_IO);
  EXPECT_EQ(session, nullptr);
  EXPECT_NE(std::string(l4rt_last_error()).find("/nonexistent/ckpt"),
            std::string::npos);
  l4rt_plan_free(plan);
}

TEST(CApi, SessionOptionsAndDevices) {
  std::vector<uint8_t> bytes = tinyModelPlan("forward", 1, 4).serialize();
  l4rt_plan plan = nullptr;
  ASSERT_EQ(l4rt_plan_load_memory(bytes.data(), bytes.size(), &plan), L4RT_OK);
  l4rt_session_options o = l4rt_session_options_default();
  o.random_seed = 3;
  l4rt_session session = nullptr;
  ASSERT_EQ(l4rt_session_create_with(plan, &o, &session), L4RT_OK)
      << l4rt_last_error();
  EXPECT_STREQ(l4rt_session_device(session), "cpu");
  // Kernel checks compare a GPU with the CPU: a cpu session has nothing to
  // compare.
  int64_t ids[1] = {1};
  const l4rt_kernel_check *checks = nullptr;
  size_t n = 7;
  EXPECT_EQ(l4rt_check_kernels(session, "forward", ids, 1, 1, 0, &checks, &n),
            L4RT_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(n, 0u);
  EXPECT_STREQ(l4rt_last_error(), "checking kernels needs a cuda session");
  l4rt_session_free(session);

  for (const char *bad : {"gpu", "cuda:", "cuda:x", "cuda:-1", "CPU"}) {
    o.device = bad;
    session = nullptr;
    EXPECT_EQ(l4rt_session_create_with(plan, &o, &session),
              L4RT_ERROR_INVALID_ARGUMENT)
        << bad;
    EXPECT_EQ(session, nullptr);
    EXPECT_EQ(std::string(l4rt_last_error()),
              "device '" + std::string(bad) +
                  "' is not one of cpu, cuda, cuda:N");
  }
  // A plan without CUDA code is refused for a GPU before any driver or
  // memory is touched, naming the first kernel.
  o.device = "cuda:0";
  EXPECT_EQ(l4rt_session_create_with(plan, &o, &session),
            L4RT_ERROR_INVALID_PLAN);
  EXPECT_NE(std::string(l4rt_last_error()).find("has no CUDA code"),
            std::string::npos)
      << l4rt_last_error();
  o.device = "";
  ASSERT_EQ(l4rt_session_create_with(plan, &o, &session), L4RT_OK);
  EXPECT_STREQ(l4rt_session_device(session), "cpu");
  l4rt_session_free(session);
  l4rt_plan_free(plan);
}

TEST(CApi, CxxWrapper) {
  std::vector<uint8_t> bytes = tinyModelPlan("forward", 1, 4).serialize();
  l4rt::Plan plan(bytes.data(), bytes.size());
  EXPECT_EQ(plan.info().vocab_size, 64);
  l4rt::Session session(plan, uint64_t(1));
  std::vector<float> logits = session.forward({1, 2, 3}, 1, 3, 64);
  EXPECT_EQ(logits.size(), 3u * 64u);
  try {
    session.forward({1, 2, 3, 4, 5}, 1, 5, 64);
    ADD_FAILURE() << "expected an l4rt::Error";
  } catch (const l4rt::Error &e) {
    EXPECT_EQ(e.status(), L4RT_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(e.what()).find("sequence length 5"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(l4rt::Plan("/nonexistent.l4plan"), l4rt::Error);
}

//===----------------------------------------------------------------------===//
// l4-run
//===----------------------------------------------------------------------===//

struct RunResult {
  int rc = -1;
  std::string output; ///< stdout and stderr
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

class L4Run : public ::testing::Test {
protected:
  void SetUp() override {
    auto write = [&](const std::string &name, const PlanSpec &p) {
      std::vector<uint8_t> b = p.serialize();
      std::ofstream(dir.file(name), std::ios::binary)
          .write(reinterpret_cast<const char *>(b.data()),
                 std::streamsize(b.size()));
    };
    write("fwd.l4plan", tinyModelPlan("forward", 2, 8));
    write("gen.l4plan", tinyModelPlan("generate", 2, 16));
    TinyConfig bytes;
    bytes.V = 256;
    write("bytes.l4plan", tinyModelPlan("generate", 1, 64, bytes));
    writeIds("in.safetensors", {1, 5, 9, 2, 4, 6}, {2, 3});
  }
  void writeIds(const std::string &name, std::vector<int64_t> ids,
                std::vector<int64_t> shape) {
    ASSERT_TRUE(
        io::writeSafetensors(dir.file(name),
                             {{"input_ids", io::DType::I64, shape, ids.data()}})
            .ok());
  }
  TempDir dir;
};

TEST_F(L4Run, Info) {
  RunResult r = runTool("--info " + dir.file("gen.l4plan"));
  ASSERT_EQ(r.rc, 0) << r.output;
  for (const char *want :
       {"program kind:  generate", "target:        cpu", "precision:     f32",
        "max batch:     2", "max seq:       16", "vocab size:    64",
        "weights:", "MiB)", "kernels:", "buffers:"})
    EXPECT_NE(r.output.find(want), std::string::npos) << want << "\n"
                                                      << r.output;
}

TEST_F(L4Run, ForwardWritesLogits) {
  RunResult r = runTool(
      dir.file("fwd.l4plan") + " --random-weights=3 --inputs " +
      dir.file("in.safetensors") + " --out " + dir.file("out.safetensors"));
  ASSERT_EQ(r.rc, 0) << r.output;
  io::Checkpoint out;
  ASSERT_TRUE(io::Checkpoint::open(dir.file("out.safetensors"), out).ok());
  io::Checkpoint::Entry e;
  ASSERT_TRUE(out.find("logits", e));
  EXPECT_EQ(e.info->dtype, io::DType::F32);
  EXPECT_EQ(e.info->shape, (std::vector<int64_t>{2, 3, 64}));
  // The same numbers as the library gives.
  auto session =
      mustSession(mustParse(tinyModelPlan("forward", 2, 8)), {"", 3});
  std::vector<int64_t> ids = {1, 5, 9, 2, 4, 6};
  Vec want(2 * 3 * 64), got(want.size());
  ASSERT_TRUE(session->forward(ids.data(), 2, 3, want.data()).ok());
  ASSERT_TRUE(out.read("logits", io::DType::F32, got.data(), got.size()).ok());
  EXPECT_EQ(got, want);
}

TEST_F(L4Run, ForwardPlanGeneratesWhenAsked) {
  RunResult r =
      runTool(dir.file("fwd.l4plan") + " --random-weights=3 --inputs " +
              dir.file("in.safetensors") + " --out " +
              dir.file("fg.safetensors") + " --max-new-tokens=4");
  ASSERT_EQ(r.rc, 0) << r.output;
  io::Checkpoint out;
  ASSERT_TRUE(io::Checkpoint::open(dir.file("fg.safetensors"), out).ok());
  io::Checkpoint::Entry e;
  EXPECT_TRUE(out.find("logits", e));
  ASSERT_TRUE(out.find("greedy_ids", e));
  EXPECT_EQ(e.info->shape, (std::vector<int64_t>{2, 7}));
}

TEST_F(L4Run, GenerateWritesGreedyAndSampledIds) {
  RunResult r =
      runTool(dir.file("gen.l4plan") + " --random-weights 3 --inputs " +
              dir.file("in.safetensors") + " --out " +
              dir.file("g.safetensors") + " --max-new-tokens=5");
  ASSERT_EQ(r.rc, 0) << r.output;
  io::Checkpoint out;
  ASSERT_TRUE(io::Checkpoint::open(dir.file("g.safetensors"), out).ok());
  io::Checkpoint::Entry e;
  ASSERT_TRUE(out.find("greedy_ids", e));
  EXPECT_EQ(e.info->shape, (std::vector<int64_t>{2, 8}));
  r = runTool(dir.file("gen.l4plan") + " --random-weights=3 --inputs " +
              dir.file("in.safetensors") + " --out " +
              dir.file("s.safetensors") +
              " --max-new-tokens=5 --temperature=0.8 --top-p=0.9 --seed=4");
  ASSERT_EQ(r.rc, 0) << r.output;
  io::Checkpoint sampled;
  ASSERT_TRUE(io::Checkpoint::open(dir.file("s.safetensors"), sampled).ok());
  EXPECT_TRUE(sampled.find("sampled_ids", e));
}

TEST_F(L4Run, ErrorsLeaveNoOutput) {
  writeIds("bad.safetensors", {1, 2, 300}, {1, 3});
  RunResult r = runTool(
      dir.file("fwd.l4plan") + " --random-weights=1 --inputs " +
      dir.file("bad.safetensors") + " --out " + dir.file("o.safetensors"));
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(
      r.output.find(
          "l4-run: error: input_ids[0, 2] = 300 is outside the vocabulary"),
      std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(dir.file("o.safetensors")));
  r = runTool(dir.file("gen.l4plan") + " --random-weights=1 --inputs " +
              dir.file("in.safetensors") + " --out " +
              dir.file("o.safetensors") + " --max-new-tokens=20");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.output.find(
                "l4-run: error: prompt of 3 tokens + 20 new tokens exceeds the "
                "plan's max_seq 16"),
            std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(dir.file("o.safetensors")));
  r = runTool(dir.file("missing.l4plan") + " --random-weights=1 --prompt hi");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.output.find("l4-run: error: " + dir.file("missing.l4plan") +
                          ": cannot open"),
            std::string::npos)
      << r.output;
  r = runTool("--info " + dir.path());
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.output.find("l4-run: error: " + dir.path() + ": is a directory"),
            std::string::npos)
      << r.output;
  r = runTool(dir.file("fwd.l4plan") + " --inputs x");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.output.find("l4-run: error: give exactly one of --weights"),
            std::string::npos)
      << r.output;
  r = runTool(dir.file("gen.l4plan") + " --random-weights=1 --prompt hi");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.output.find("needs a byte vocabulary"), std::string::npos)
      << r.output;
}

TEST_F(L4Run, PromptMode) {
  RunResult r =
      runTool(dir.file("bytes.l4plan") +
              " --random-weights=1 --prompt \"hello\" --max-new-tokens=8");
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(r.output.find("ids:"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("text: hello"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("prefill: 5 tokens in"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("decode: 7 tokens in"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("tokens/s"), std::string::npos) << r.output;
}

} // namespace
