//===- plan_test.cpp - plan loader and verifier tests ---------------------===//
//
// Valid hand-built plans load and decode; corrupted ones (byte flips,
// truncations, wrong identifier or version, bad indices, shapes, attributes
// and aliasing) are rejected with a message that names the fault, never a
// crash. Plans that survive a flip are also run, which must not crash either.
//
//===----------------------------------------------------------------------===//
#include "executor.h"
#include "l4c/runtime/l4rt.h"
#include "plan.h"
#include "test_plans.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <unistd.h>

using namespace l4c;
using namespace l4c::test;
namespace fs = std::filesystem;

namespace {

rt::Status parse(const PlanSpec &spec,
                 std::shared_ptr<const rt::Plan> *out = nullptr) {
  std::shared_ptr<const rt::Plan> plan;
  rt::Status s = rt::Plan::fromBytes(spec.serialize(), "test.l4plan", plan);
  if (out)
    *out = plan;
  return s;
}

/// Expects `spec` to be rejected as an invalid plan with `want` in the message.
void expectRejected(const PlanSpec &spec, const std::string &want) {
  rt::Status s = parse(spec);
  ASSERT_FALSE(s.ok()) << "plan was accepted; expected: " << want;
  EXPECT_EQ(s.code, rt::StatusCode::InvalidPlan) << s.message;
  EXPECT_EQ(s.message.rfind("test.l4plan: ", 0), 0u) << s.message;
  EXPECT_NE(s.message.find(want), std::string::npos)
      << "message: " << s.message << "\nexpected to contain: " << want;
}

uint32_t findBuffer(const PlanSpec &p, const std::string &name) {
  for (uint32_t i = 0; i < p.buffers.size(); ++i)
    if (p.buffers[i].name == name)
      return i;
  ADD_FAILURE() << "no buffer " << name;
  return 0;
}

//===----------------------------------------------------------------------===//
// Valid plans
//===----------------------------------------------------------------------===//

TEST(PlanVerifier, LinearPlanDecodes) {
  std::shared_ptr<const rt::Plan> plan;
  rt::Status s = parse(linearPlan(2, 4, 16, 8), &plan);
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_EQ(plan->version, rt::kPlanVersion);
  EXPECT_EQ(plan->programKind, "forward");
  EXPECT_EQ(plan->maxBatch, 2);
  EXPECT_EQ(plan->maxSeq, 4);
  EXPECT_EQ(plan->vocabSize, 16);
  EXPECT_EQ(plan->kernels.size(), 3u);
  EXPECT_EQ(plan->weights.size(), 3u);
  ASSERT_NE(plan->program("forward"), nullptr);
  const rt::ProgramDesc &fwd = *plan->program("forward");
  EXPECT_EQ(fwd.seqCapacity, 4);
  EXPECT_EQ(fwd.steps.size(), 3u);
  const rt::BufferDesc &logits = plan->buffers[fwd.logits];
  EXPECT_TRUE(logits.hasBatch);
  EXPECT_TRUE(logits.hasSeq);
  EXPECT_EQ(logits.batchStride, 4u * 16u);
  EXPECT_EQ(logits.rowStride, 16u);
  EXPECT_EQ(plan->kernels[1].ops[0].kind, rt::OpKind::RmsNorm);
  EXPECT_FLOAT_EQ(float(plan->kernels[1].ops[0].eps), 1e-5f);
}

TEST(PlanVerifier, TinyModelPlansDecode) {
  std::shared_ptr<const rt::Plan> plan;
  rt::Status s = parse(tinyModelPlan("forward", 2, 8), &plan);
  ASSERT_TRUE(s.ok()) << s.message;
  s = parse(tinyModelPlan("generate", 2, 16), &plan);
  ASSERT_TRUE(s.ok()) << s.message;
  ASSERT_NE(plan->program("prefill"), nullptr);
  ASSERT_NE(plan->program("decode"), nullptr);
  EXPECT_EQ(plan->program("prefill")->seqCapacity, 16);
  EXPECT_EQ(plan->program("decode")->seqCapacity, 1);
  // The rope kernels carry their inverse frequencies, head_dim / 2 of them.
  size_t ropes = 0;
  for (const rt::KernelDesc &k : plan->kernels)
    for (const rt::OpDesc &op : k.ops)
      if (op.kind == rt::OpKind::Rope) {
        ++ropes;
        ASSERT_EQ(op.invFreq.size(), 2u);
        EXPECT_GT(op.invFreq[0], op.invFreq[1]);
        EXPECT_GT(op.invFreq[1], 0.0f);
      }
  EXPECT_EQ(ropes, 4u);
}

TEST(PlanVerifier, LoadsFromFileAndNamesMissingFile) {
  std::string path = (fs::temp_directory_path() /
                      ("l4c-plan-" + std::to_string(::getpid()) + ".l4plan"))
                         .string();
  std::vector<uint8_t> bytes = linearPlan().serialize();
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char *>(bytes.data()),
             std::streamsize(bytes.size()));
  std::shared_ptr<const rt::Plan> plan;
  rt::Status s = rt::Plan::load(path, plan);
  EXPECT_TRUE(s.ok()) << s.message;
  EXPECT_EQ(plan->label(), path);
  fs::remove(path);
  s = rt::Plan::load(path, plan);
  EXPECT_EQ(s.code, rt::StatusCode::Io);
  EXPECT_NE(s.message.find(path + ": cannot open"), std::string::npos)
      << s.message;
}

//===----------------------------------------------------------------------===//
// Envelope: identifier, version, bytes
//===----------------------------------------------------------------------===//

TEST(PlanVerifier, RejectsWrongIdentifier) {
  std::vector<uint8_t> bytes = linearPlan().serialize();
  bytes[4] = 'X';
  std::shared_ptr<const rt::Plan> plan;
  rt::Status s = rt::Plan::fromBytes(bytes, "p", plan);
  EXPECT_EQ(s.code, rt::StatusCode::InvalidPlan);
  EXPECT_EQ(s.message, "p: not an l4c plan (file identifier is not \"L4CP\")");
  for (size_t n : {0, 3, 7}) {
    s = rt::Plan::fromBytes(std::vector<uint8_t>(n, 0), "p", plan);
    EXPECT_EQ(s.code, rt::StatusCode::InvalidPlan) << n;
  }
}

TEST(PlanVerifier, RejectsOtherVersion) {
  PlanSpec p = linearPlan();
  p.version = 3;
  rt::Status s = parse(p);
  EXPECT_EQ(s.message, "test.l4plan: plan version 3 is not supported by this "
                       "runtime (expects 2)");
  p.version = 1; // before tensor maps
  expectRejected(p, "plan version 1 is not supported");
  p.version = 0;
  expectRejected(p, "plan version 0 is not supported");
}

TEST(PlanVerifier, RejectsEveryTruncation) {
  std::vector<uint8_t> bytes = tinyModelPlan("generate", 1, 4).serialize();
  // The builder may leave a few bytes of alignment padding at the end that
  // nothing references; cutting those is harmless, cutting more is not.
  for (size_t n = 0; n < bytes.size(); ++n) {
    std::shared_ptr<const rt::Plan> plan;
    rt::Status s = rt::Plan::fromBytes(
        std::vector<uint8_t>(bytes.begin(), bytes.begin() + n), "p", plan);
    if (n + 8 > bytes.size())
      continue;
    ASSERT_FALSE(s.ok()) << "truncated to " << n << " of " << bytes.size()
                         << " bytes was accepted";
    ASSERT_FALSE(s.message.empty());
  }
}

// Flips bytes at random; a plan that still verifies is run as well, so the
// executor's trust in verified plans is tested too.
TEST(PlanVerifier, RandomByteFlipsNeverCrash) {
  const std::vector<uint8_t> clean =
      tinyModelPlan("generate", 2, 6).serialize();
  const std::vector<uint8_t> cleanFwd = linearPlan(2, 4, 16, 8).serialize();
  size_t rejected = 0, accepted = 0;
  // L4C_FLIP_SEEDS raises the count for longer local fuzzing runs.
  const char *env = std::getenv("L4C_FLIP_SEEDS");
  uint32_t seeds = env ? uint32_t(std::strtoul(env, nullptr, 10)) : 1500;
  for (uint32_t seed = 0; seed < seeds; ++seed) {
    std::mt19937 rng(seed);
    std::vector<uint8_t> bytes = seed % 3 == 0 ? cleanFwd : clean;
    int flips = 1 + int(rng() % 4);
    for (int f = 0; f < flips; ++f) {
      size_t at = rng() % bytes.size();
      bytes[at] =
          seed % 2 ? uint8_t(rng()) : uint8_t(bytes[at] ^ (1u << (rng() % 8)));
    }
    std::shared_ptr<const rt::Plan> plan;
    rt::Status s = rt::Plan::fromBytes(bytes, "flip", plan);
    if (!s.ok()) {
      ++rejected;
      ASSERT_EQ(s.code, rt::StatusCode::InvalidPlan);
      ASSERT_EQ(s.message.rfind("flip: ", 0), 0u) << s.message;
      continue;
    }
    ++accepted;
    std::unique_ptr<rt::Session> session;
    if (!rt::Session::create(plan, {"", seed}, session).ok())
      continue;
    std::vector<int64_t> ids = {1, 2, 3, 4, 5, 6};
    std::vector<int64_t> out(16);
    int64_t len = 0;
    if (plan->program("forward")) {
      std::vector<float> logits(
          size_t(2 * 3 * std::max<int64_t>(plan->vocabSize, 1)));
      if (plan->vocabSize <= 64)
        (void)session->forward(ids.data(), 2, 3, logits.data());
    }
    (void)session->generate(ids.data(), 2, 3, 2, nullptr, out.data(), &len);
  }
  EXPECT_GT(rejected, 0u);
  std::printf("[ flips    ] %zu rejected, %zu accepted (benign flips)\n",
              rejected, accepted);
}

//===----------------------------------------------------------------------===//
// Semantic checks, one fault at a time
//===----------------------------------------------------------------------===//

TEST(PlanVerifier, RejectsOutOfRangeIndices) {
  PlanSpec p = linearPlan();
  p.kernels[2].ops[0].operands[0] = 999;
  expectRejected(p, "kernel 2 'lm_head' op 0 (linear): operand 0 buffer index "
                    "999 out of range");
  p = linearPlan();
  p.kernels[0].ops[0].results[0] = 77;
  expectRejected(p, "result buffer index 77 out of range");
  p = linearPlan();
  p.programs[0].steps.push_back(9);
  expectRejected(
      p, "program 0 'forward': step 3 kernel index 9 out of range (3 kernels)");
  p = linearPlan();
  p.programs[0].inputs[0].buffer = 1000;
  expectRejected(
      p,
      "program 0 'forward' input 'input_ids': buffer index 1000 out of range");
  p = linearPlan();
  p.weights[1].first = 500;
  expectRejected(p, "weight binding 1: buffer index 500 out of range");
}

TEST(PlanVerifier, RejectsBadBuffers) {
  PlanSpec p = linearPlan();
  uint32_t h = findBuffer(p, "h");
  p.buffers[h].offset = p.regionSize[0];
  expectRejected(p, "buffer " + std::to_string(h) + " 'h': bytes [");
  expectRejected(p, "lie outside the arena region");
  p = linearPlan();
  p.buffers[h].size = 12;
  expectRejected(p, "buffer " + std::to_string(h) +
                        " 'h': size 12 does not match shape [2, 4, 8] of f32");
  p = linearPlan();
  p.buffers[h].dims.pop_back();
  expectRejected(p, "dims has 2 entries for a shape of rank 3");
  p = linearPlan();
  p.buffers[h].shape[2] = 0;
  expectRejected(p, "has an extent below 1");
  p = linearPlan();
  p.buffers[h].dtype = pl::DType(9);
  expectRejected(p, "unknown dtype 9");
  p = linearPlan();
  p.buffers[h].region = pl::Region(7);
  expectRejected(p, "unknown region 7");
  p = linearPlan();
  p.buffers[h].offset = UINT64_MAX - 15; // offset + size wraps around
  expectRejected(p, "lie outside the arena region");
  p = linearPlan();
  p.buffers[h].offset += 2;
  expectRejected(p, "is not a multiple of its f32 element size");
  p = linearPlan();
  p.buffers[h].shape[0] = 1;
  p.buffers[h].size /= 2;
  expectRejected(p, "batch extent 1 differs from max_batch 2");
  p = linearPlan();
  p.buffers[h].dims = dimsOf(".SB");
  expectRejected(p, "seq dim at position 1 (must follow the batch dim)");
}

TEST(PlanVerifier, RejectsOverlaps) {
  // Two weights sharing some bytes: straddling one's end, or inside it (a
  // row view, as l4c-chunk-loss makes, may lie inside a weight; a second
  // bound tensor may not).
  PlanSpec p = linearPlan();
  uint32_t norm = findBuffer(p, "model.norm.weight");
  uint32_t embed = findBuffer(p, "model.embed_tokens.weight");
  p.buffers[norm].offset =
      p.buffers[embed].offset + p.buffers[embed].size - 16;
  expectRejected(p, "partially overlaps");
  p = linearPlan();
  p.buffers[norm].offset = 16;
  expectRejected(p, "shares bytes with buffer 0 'model.embed_tokens.weight', "
                    "which is bound to another tensor");
  // The same bytes bound to two checkpoint tensors.
  p = linearPlan();
  uint32_t head = findBuffer(p, "lm_head.weight");
  p.buffers[head].offset =
      p.buffers[findBuffer(p, "model.embed_tokens.weight")].offset;
  expectRejected(p, "which is bound to another tensor");
  // A linear writing over its own input.
  p = linearPlan();
  uint32_t x = findBuffer(p, "x");
  p.kernels[2].ops[0].results[0] = p.view(x, "y", {2, 4, 16}, "BS.");
  p.buffers.back().size = 2 * 4 * 16 * 4;
  p.regionSize[0] += 1024;
  expectRejected(p, "overlaps operand 0");
  // In place is fine for an element-wise op.
  p = linearPlan();
  p.kernels[1].ops[0].results[0] = findBuffer(p, "h");
  EXPECT_TRUE(parse(p).ok()) << parse(p).message;
  // A cache update must write the cache's own bytes.
  PlanSpec g = tinyModelPlan("generate", 1, 4);
  for (KernelSpec &k : g.kernels)
    for (OpSpec &o : k.ops)
      if (o.op == "kv_cache_update")
        o.results[0] = o.operands[1];
  expectRejected(g, "must be the cache's own bytes");
}

TEST(PlanVerifier, RejectsBadOps) {
  PlanSpec p = linearPlan();
  p.kernels[1].ops[0].op = "softmax";
  expectRejected(p,
                 "kernel 1 'model.norm' op 0 (softmax): unknown op 'softmax'");
  p = linearPlan();
  p.kernels[1].ops[0].attrs.clear();
  expectRejected(
      p, "kernel 1 'model.norm' op 0 (rms_norm): missing attribute eps");
  p = linearPlan();
  p.kernels[1].ops[0].attrs[0] = attrI("eps", 1);
  expectRejected(p, "attribute eps must be a float");
  p = linearPlan();
  p.kernels[1].ops[0].attrs.push_back(attrF("eps", 1e-6));
  expectRejected(p, "attribute eps appears twice");
  p = linearPlan();
  p.kernels[1].ops[0].attrs[0] = attrF("eps", std::nan(""));
  expectRejected(p, "attribute eps is not finite");
  p = linearPlan();
  p.kernels[1].ops[0].operands.pop_back();
  expectRejected(p, "(rms_norm): has 1 operands, expected 2");
  p = linearPlan();
  p.kernels[1].ops[0].results.push_back(0);
  expectRejected(p, "has 2 results, expected 1");
  // Shapes: lm_head weight with the wrong inner dim.
  p = linearPlan(2, 4, 16, 8);
  uint32_t head = findBuffer(p, "lm_head.weight");
  p.buffers[head].shape = {32, 4};
  expectRejected(
      p, "(linear): weight buffer " + std::to_string(head) +
             " 'lm_head.weight' has shape [32, 4] for an input last dim of 8");
  // An index operand that holds floats.
  p = linearPlan();
  p.kernels[0].ops[0].operands[1] = findBuffer(p, "h");
  expectRejected(p, "(embedding): operand 1 buffer");
  expectRejected(p, "has dtype f32, expected i64 or i32");
}

TEST(PlanVerifier, ChecksFusedKernelTemporaries) {
  // A temporary must be an op's result that a later op of the kernel reads.
  PlanSpec p = linearPlan();
  uint32_t h = findBuffer(p, "h");
  p.kernels[1].temps = {h};
  expectRejected(p, "kernel 1 'model.norm': temporary buffer " +
                        std::to_string(h) +
                        " is not both written and then read by the kernel's "
                        "ops");
  // The norm and the head as one kernel, x living inside it, is accepted.
  p = linearPlan();
  uint32_t x = findBuffer(p, "x");
  p.kernels[1].ops.push_back(p.kernels[2].ops[0]);
  p.kernels[1].temps = {x};
  p.programs[0].steps = {0, 1};
  std::shared_ptr<const rt::Plan> plan;
  rt::Status s = parse(p, &plan);
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_EQ(plan->kernels[1].temps, std::vector<uint32_t>{x});
  p = linearPlan();
  p.kernels[1].temps = {4000};
  expectRejected(p, "kernel 1 'model.norm': temporary buffer index 4000 out "
                    "of range");
}

TEST(PlanVerifier, RejectsBadAttributes) {
  auto withAttr = [](const std::string &opName,
                     const std::function<void(OpSpec &)> &edit) {
    PlanSpec g = tinyModelPlan("generate", 1, 4);
    for (KernelSpec &k : g.kernels)
      for (OpSpec &o : k.ops)
        if (o.op == opName)
          edit(o);
    return g;
  };
  auto set = [](OpSpec &o, AttrSpec a) {
    for (AttrSpec &x : o.attrs)
      if (x.name == a.name)
        x = a;
  };
  expectRejected(
      withAttr("rope", [&](OpSpec &o) { set(o, attrS("scaling", "yarn")); }),
      "(rope): attribute scaling 'yarn' is not none or llama3");
  expectRejected(
      withAttr("rope", [&](OpSpec &o) { set(o, attrF("scaling", 1)); }),
      "(rope): attribute scaling must be a string");
  expectRejected(
      withAttr("rope", [&](OpSpec &o) { o.attrs.erase(o.attrs.begin()); }),
      "(rope): missing attribute theta");
  expectRejected(
      withAttr("router_scores", [&](OpSpec &o) { set(o, attrI("top_k", 9)); }),
      "(router_scores): attribute top_k 9 is outside [1, 4]");
  expectRejected(withAttr("attention",
                          [&](OpSpec &o) { set(o, attrI("chunk_size", -1)); }),
                 "(attention): attribute chunk_size is negative");
  expectRejected(
      withAttr("attention", [&](OpSpec &o) { set(o, attrF("chunk_size", 2)); }),
      "(attention): attribute chunk_size must be an int");
  expectRejected(
      withAttr("temperature_scale", [&](OpSpec &o) { o.attrs.pop_back(); }),
      "(temperature_scale): missing attribute attn_scale");
  // The llama3 extras are optional (the dialect gives them defaults).
  PlanSpec g = withAttr("rope", [&](OpSpec &o) { o.attrs.resize(2); });
  EXPECT_TRUE(parse(g).ok()) << parse(g).message;
}

TEST(PlanVerifier, RejectsBadPrograms) {
  PlanSpec p = tinyModelPlan("generate", 1, 4);
  p.programs.pop_back();
  expectRejected(p, "a generate plan needs a program named 'decode'");
  p = linearPlan();
  p.programKind = "train";
  expectRejected(p, "a train plan needs a program named 'train_step'");
  p = linearPlan();
  p.programKind = "finetune";
  expectRejected(p, "program_kind 'finetune' is not supported by this runtime");
  p = linearPlan();
  p.programs[0].inputs.push_back({"attention_mask", 0});
  expectRejected(p,
                 "program 0 'forward' input 'attention_mask': unknown input");
  p = linearPlan();
  p.programs[0].outputs.clear();
  expectRejected(p, "program 0 'forward': has no logits output");
  p = linearPlan();
  p.programs[0].inputs[0].buffer = findBuffer(p, "h");
  expectRejected(p, "expected an io-region i64 [B, S] buffer");
  p = linearPlan();
  p.programs.push_back(p.programs[0]);
  expectRejected(p, "a second program of that name");
  p = linearPlan();
  p.vocab = 17;
  expectRejected(p, "expected [B, S or 1, 17] of floats");
  p = linearPlan();
  p.weights[0].first = findBuffer(p, "h");
  expectRejected(p, "is in the arena region, not weights");
}

TEST(PlanVerifier, ChecksTuningCandidates) {
  // A candidate (another tile configuration of a kernel, for l4-tune) is
  // accepted when it computes what its kernel does and no program runs it.
  auto withCandidate = [](PlanSpec p) {
    KernelSpec &k = p.kernels.back();
    k.signature = "l4_gemm_0";
    k.tileConfig = "p128x128";
    KernelSpec c = k;
    c.tileConfig = "t64x64";
    c.alternativeOf = int32_t(p.kernels.size() - 1);
    p.kernels.push_back(c);
    return p;
  };
  PlanSpec p = withCandidate(linearPlan());
  std::shared_ptr<const rt::Plan> plan;
  rt::Status st = parse(p, &plan);
  ASSERT_TRUE(st.ok()) << st.message;
  EXPECT_EQ(plan->kernels.back().alternativeOf,
            int32_t(plan->kernels.size() - 2));
  EXPECT_EQ(plan->kernels.back().tileConfig, "t64x64");
  p = withCandidate(linearPlan());
  p.programs[0].steps.push_back(uint32_t(p.kernels.size() - 1));
  expectRejected(p, "a tuning candidate (only l4-tune runs those)");
  p = withCandidate(linearPlan());
  p.kernels.back().ops[0].operands[0] = findBuffer(p, "h");
  expectRejected(p, "a tuning candidate must have the ops, buffers and "
                    "signature of kernel");
  p = withCandidate(linearPlan());
  p.kernels.back().ops.clear();
  expectRejected(p, "a tuning candidate must have the ops, buffers and "
                    "signature of kernel");
  p = withCandidate(linearPlan());
  p.kernels.back().signature = "l4_gemm_1";
  expectRejected(p, "a tuning candidate must have the ops, buffers and "
                    "signature of kernel");
  p = withCandidate(linearPlan());
  p.kernels.back().alternativeOf = int32_t(p.kernels.size());
  expectRejected(p, "does not name an earlier kernel that is not a candidate");
}

/// linearPlan with one tensor map on lm_head: its weight (f32 [16, 8] at
/// offset 576 of the 1088-byte weights region) as rows of 8, read in boxes
/// of 4 x 8 with 32-byte swizzle. The map reaches the region's last byte.
PlanSpec withTensorMap(const std::function<void(TensorMapSpec &)> &edit =
                           [](TensorMapSpec &) {}) {
  PlanSpec p = linearPlan(2, 4, 16, 8);
  const BufferSpec &head = p.buffers[findBuffer(p, "lm_head.weight")];
  TensorMapSpec m;
  m.region = pl::Region::Weights;
  m.offset = head.offset;
  m.dtype = pl::DType::F32;
  m.dims = {8, 16};
  m.strides = {32};
  m.box = {4, 8};
  m.swizzle = 1;
  edit(m);
  p.kernels[2].tensorMaps.push_back(m);
  return p;
}

TEST(PlanVerifier, DecodesTensorMaps) {
  PlanSpec p = withTensorMap();
  ASSERT_EQ(p.buffers[findBuffer(p, "lm_head.weight")].offset, 576u);
  ASSERT_EQ(p.regionSize[int(pl::Region::Weights)], 1088u);
  // A second map: bf16 rows of 16 in the arena, 128-byte swizzle, rank 3.
  TensorMapSpec m2;
  m2.region = pl::Region::Arena;
  m2.offset = 0;
  m2.dtype = pl::DType::BF16;
  m2.dims = {16, 2, 2};
  m2.strides = {32, 64};
  m2.box = {16, 2, 1};
  m2.swizzle = 3;
  p.kernels[2].tensorMaps.push_back(m2);
  std::shared_ptr<const rt::Plan> plan;
  rt::Status s = parse(p, &plan); // a cpu plan: verified, then ignored
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_TRUE(plan->kernels[0].tensorMaps.empty());
  ASSERT_EQ(plan->kernels[2].tensorMaps.size(), 2u);
  const rt::TensorMapDesc &d = plan->kernels[2].tensorMaps[0];
  EXPECT_EQ(d.region, pl::Region::Weights);
  EXPECT_EQ(d.offset, 576u);
  EXPECT_EQ(d.dtype, pl::DType::F32);
  EXPECT_EQ(d.dims, (std::vector<uint64_t>{8, 16}));
  EXPECT_EQ(d.strides, (std::vector<uint64_t>{32}));
  EXPECT_EQ(d.box, (std::vector<uint32_t>{4, 8}));
  EXPECT_EQ(d.swizzle, 1);
  const rt::TensorMapDesc &e = plan->kernels[2].tensorMaps[1];
  EXPECT_EQ(e.dtype, pl::DType::BF16);
  EXPECT_EQ(e.dims, (std::vector<uint64_t>{16, 2, 2}));
  EXPECT_EQ(e.strides, (std::vector<uint64_t>{32, 64}));
  EXPECT_EQ(e.box, (std::vector<uint32_t>{16, 2, 1}));
  EXPECT_EQ(e.swizzle, 3);
  // A box may outgrow the tensor (a 128-row tile of 16 rows: the rest
  // arrives as zeros).
  s = parse(withTensorMap([](TensorMapSpec &m) { m.box = {4, 128}; }));
  EXPECT_TRUE(s.ok()) << s.message;
  // A rank-1 map has no strides.
  s = parse(withTensorMap([](TensorMapSpec &m) {
    m.dims = {128};
    m.strides = {};
    m.box = {64};
    m.swizzle = 0;
  }));
  EXPECT_TRUE(s.ok()) << s.message;
  // Each swizzle's span: 64 bytes of box[0] fit 64B and 128B, not 32B.
  for (uint8_t sw : {0, 2, 3}) {
    s = parse(withTensorMap([&](TensorMapSpec &m) {
      m.dims = {16, 8};
      m.strides = {64};
      m.box = {16, 8};
      m.swizzle = sw;
    }));
    EXPECT_TRUE(s.ok()) << "swizzle " << int(sw) << ": " << s.message;
  }
}

TEST(PlanVerifier, RejectsBadTensorMaps) {
  const std::string at = "kernel 2 'lm_head' tensor map 0: ";
  auto reject = [&](const std::function<void(TensorMapSpec &)> &edit,
                    const std::string &want) {
    SCOPED_TRACE(want);
    expectRejected(withTensorMap(edit), at + want);
  };
  reject([](TensorMapSpec &m) { m.region = pl::Region(7); },
         "unknown region 7");
  reject([](TensorMapSpec &m) { m.dtype = pl::DType::I64; },
         "dtype i64 is not f32 or bf16");
  reject([](TensorMapSpec &m) { m.dtype = pl::DType::F16; },
         "dtype f16 is not f32 or bf16");
  reject([](TensorMapSpec &m) { m.dtype = pl::DType(9); },
         "dtype 9 is not f32 or bf16");
  reject(
      [](TensorMapSpec &m) {
        m.dims = {};
        m.strides = {};
        m.box = {};
      },
      "rank 0 (dims []) is outside [1, 5]");
  reject(
      [](TensorMapSpec &m) {
        m.dims = {8, 1, 1, 1, 1, 16};
        m.strides = {32, 32, 32, 32, 32};
        m.box = {4, 1, 1, 1, 1, 8};
      },
      "rank 6 (dims [8, 1, 1, 1, 1, 16]) is outside [1, 5]");
  reject([](TensorMapSpec &m) { m.strides = {}; },
         "strides has 0 entries for rank 2 (expects 1)");
  reject(
      [](TensorMapSpec &m) {
        m.strides = {32, 32};
      },
      "strides has 2 entries for rank 2 (expects 1)");
  reject([](TensorMapSpec &m) { m.box = {4}; }, "box has 1 entries for rank 2");
  reject(
      [](TensorMapSpec &m) {
        m.dims = {0, 16};
      },
      "dims [0, 16]: extent 0 is outside [1, 2^32]");
  reject(
      [](TensorMapSpec &m) {
        m.dims = {8, (uint64_t(1) << 32) + 1};
      },
      "dims [8, 4294967297]: extent 1 is outside [1, 2^32]");
  reject(
      [](TensorMapSpec &m) {
        m.box = {0, 8};
      },
      "box [0, 8]: entry 0 is outside [1, 256]");
  reject(
      [](TensorMapSpec &m) {
        m.box = {8, 257};
      },
      "box [8, 257]: entry 1 is outside [1, 256]");
  reject(
      [](TensorMapSpec &m) {
        m.dims = {4, 512};
        m.strides = {16};
        m.box = {4, 257};
        m.offset = 0;
      },
      "box [4, 257]: entry 1 is outside [1, 256]");
  reject([](TensorMapSpec &m) { m.offset += 8; },
         "offset 584 is not a multiple of 16");
  reject([](TensorMapSpec &m) { m.strides = {24}; },
         "strides [24]: entry 0 is not a multiple of 16 below 2^40 bytes");
  reject([](TensorMapSpec &m) { m.strides = {uint64_t(1) << 40}; },
         "strides [1099511627776]: entry 0 is not a multiple of 16 below "
         "2^40 bytes");
  reject(
      [](TensorMapSpec &m) {
        m.box = {2, 8};
      },
      "box[0] of 2 f32 elements spans 8 bytes, not a multiple of 16");
  reject([](TensorMapSpec &m) { m.swizzle = 4; },
         "swizzle 4 is not 0 (none), 1 (32B), 2 (64B) or 3 (128B)");
  reject(
      [](TensorMapSpec &m) {
        m.dims = {16, 8};
        m.strides = {64};
        m.box = {16, 8};
      },
      "box[0] spans 64 bytes, more than the 32-byte span of its swizzle");
  reject(
      [](TensorMapSpec &m) {
        m.dims = {64, 2};
        m.strides = {256};
        m.box = {64, 2};
        m.swizzle = 3;
        m.offset = 0;
      },
      "box[0] spans 256 bytes, more than the 128-byte span of its swizzle");
  // One row more, or one element further, leaves the region.
  reject([](TensorMapSpec &m) { m.offset += 16; },
         "dims [8, 16] with strides [32] from offset 592 reach 1104, outside "
         "the weights region of 1088 bytes");
  reject(
      [](TensorMapSpec &m) {
        m.dims = {8, 17};
      },
      "dims [8, 17] with strides [32] from offset 576 reach 1120, outside "
      "the weights region of 1088 bytes");
  reject([](TensorMapSpec &m) { m.region = pl::Region::Cache; },
         "dims [8, 16] with strides [32] from offset 576 reach 1088, outside "
         "the cache region of 0 bytes");
  reject(
      [](TensorMapSpec &m) {
        m.dims = {8, uint64_t(1) << 32};
        m.strides = {(uint64_t(1) << 40) - 16};
      },
      "dims [8, 4294967296] with strides [1099511627760] from offset 576 "
      "reach past 2^64, outside the weights region of 1088 bytes");
}

/// The tiny model with its routed experts split as l4c-split-experts splits
/// them: a route table (i32, E + 1 offsets then B*S*K entries), each
/// token's expert activations [B, S, K, I], then their down projections.
struct SplitExperts {
  PlanSpec p;
  uint32_t kernel = 0, route = 0, hidden = 0, scores = 0;
};
SplitExperts splitExpertsPlan() {
  SplitExperts s;
  TinyConfig c;
  const int64_t B = 2, S = 3;
  s.p = tinyModelPlan("forward", B, S, c);
  for (uint32_t k = 0; k < s.p.kernels.size(); ++k) {
    KernelSpec &ks = s.p.kernels[k];
    if (ks.ops.size() != 1 || ks.ops[0].op != "moe_experts")
      continue;
    OpSpec fused = ks.ops[0];
    uint32_t x = fused.operands[0], sc = fused.operands[1],
             gu = fused.operands[2], dn = fused.operands[3];
    s.kernel = k;
    s.scores = sc;
    s.route = s.p.add("route", pl::Region::Arena, {c.E + 1 + B * S * c.topK},
                      ".", pl::DType::I32);
    s.hidden = s.p.add("hidden", pl::Region::Arena, {B, S, c.topK, c.I},
                       "BS..");
    ks.ops = {{"moe_route", {attrI("slots", c.topK)}, {sc}, {s.route}},
              {"moe_hidden", {}, {x, sc, gu, s.route}, {s.hidden}},
              {"moe_down", {}, {s.hidden, sc, dn, s.route}, fused.results}};
  }
  return s;
}

TEST(PlanVerifier, ChecksRouteTablesOfSplitExperts) {
  SplitExperts s = splitExpertsPlan();
  ASSERT_NE(s.kernel, 0u);
  std::shared_ptr<const rt::Plan> plan;
  rt::Status ok = parse(s.p, &plan);
  ASSERT_TRUE(ok.ok()) << ok.message;
  std::string k = "kernel " + std::to_string(s.kernel) + " '" +
                  s.p.kernels[s.kernel].name + "' ";

  // The table is i32: E + 1 + 6 tokens x 1 slot = 11 entries.
  SplitExperts t = splitExpertsPlan();
  BufferSpec &r = t.p.buffers[t.route];
  r.dtype = pl::DType::I64;
  r.size *= 2;
  t.p.regionSize[0] += r.size;
  expectRejected(t.p, k + "op 0 (moe_route): result buffer " +
                          std::to_string(t.route) +
                          " 'route' has dtype i64, expected i32");
  t = splitExpertsPlan();
  t.p.buffers[t.route].shape = {10};
  t.p.buffers[t.route].size = 40;
  expectRejected(t.p, "has shape [10], expected [11] without run-time dims "
                      "(E + 1 + 6 tokens x 1 slots)");
  // A table sized for 2 slots does not fit top_k 1 tables...
  t = splitExpertsPlan();
  t.p.kernels[t.kernel].ops[0].attrs[0] = attrI("slots", 2);
  expectRejected(t.p, "(moe_route): result buffer " + std::to_string(t.route) +
                          " 'route' has shape [11], expected [17]");
  // ...nor may slots exceed the experts.
  t = splitExpertsPlan();
  t.p.kernels[t.kernel].ops[0].attrs[0] = attrI("slots", 5);
  expectRejected(t.p, "(moe_route): attribute slots 5 is outside [1, 4]");
  // The consumers check the table they are given: floats in its place.
  t = splitExpertsPlan();
  t.p.kernels[t.kernel].ops[1].operands[3] = t.hidden;
  expectRejected(t.p, k + "op 1 (moe_hidden): operand 3 buffer " +
                          std::to_string(t.hidden) +
                          " 'hidden' has dtype f32, expected i64 or i32");
  // Activations whose K disagrees with the table's slots.
  t = splitExpertsPlan();
  t.p.buffers[t.hidden].shape = {2, 3, 2, 4};
  expectRejected(t.p, k + "op 1 (moe_hidden): result buffer " +
                          std::to_string(t.hidden) +
                          " 'hidden' has shape [2, 3, 2, 4], expected [.., K, "
                          "8] per input token with 1 <= K <= 4");
  t = splitExpertsPlan();
  t.p.buffers[t.hidden].shape = {2, 3, 2, 8};
  t.p.buffers[t.hidden].size *= 2;
  t.p.regionSize[0] += t.p.buffers[t.hidden].size;
  expectRejected(t.p, k + "op 1 (moe_hidden): route buffer " +
                          std::to_string(t.route) +
                          " 'route' has shape [11], expected [17]");
  // The route table is an index operand: the loader knows it as such.
  t = splitExpertsPlan();
  t.p.kernels[t.kernel].ops[2].operands[3] = t.scores;
  expectRejected(t.p, "(moe_down): operand 3 buffer " +
                          std::to_string(t.scores) + " 'forward.l1.scores'");
  expectRejected(t.p, "has dtype f32, expected i64 or i32");
}

//===----------------------------------------------------------------------===//
// The C API over the loader
//===----------------------------------------------------------------------===//

TEST(PlanCApi, LoadInfoAndErrors) {
  std::vector<uint8_t> bytes = tinyModelPlan("generate", 2, 16).serialize();
  l4rt_plan plan = nullptr;
  ASSERT_EQ(l4rt_plan_load_memory(bytes.data(), bytes.size(), &plan), L4RT_OK)
      << l4rt_last_error();
  EXPECT_STREQ(l4rt_last_error(), "");
  l4rt_plan_summary info;
  ASSERT_EQ(l4rt_plan_info(plan, &info), L4RT_OK);
  EXPECT_STREQ(info.program_kind, "generate");
  EXPECT_STREQ(info.target, "cpu");
  EXPECT_EQ(info.max_batch, 2);
  EXPECT_EQ(info.max_seq, 16);
  EXPECT_EQ(info.vocab_size, 64);
  EXPECT_GT(info.weights_size, 0u);
  EXPECT_GT(info.cache_size, 0u);
  EXPECT_EQ(info.num_weights, 24u);
  l4rt_plan_free(plan);

  EXPECT_EQ(l4rt_plan_load("/nonexistent/x.l4plan", &plan), L4RT_ERROR_IO);
  EXPECT_EQ(plan, nullptr);
  EXPECT_NE(std::string(l4rt_last_error()).find("/nonexistent/x.l4plan"),
            std::string::npos);
  bytes[bytes.size() / 2] ^= 0xff;
  bytes[5] = 'Z';
  EXPECT_EQ(l4rt_plan_load_memory(bytes.data(), bytes.size(), &plan),
            L4RT_ERROR_INVALID_PLAN);
  EXPECT_NE(std::string(l4rt_last_error()).find("file identifier"),
            std::string::npos);
  EXPECT_EQ(l4rt_plan_load(nullptr, &plan), L4RT_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(l4rt_plan_info(nullptr, &info), L4RT_ERROR_INVALID_ARGUMENT);
  EXPECT_STREQ(l4rt_status_string(L4RT_ERROR_INVALID_PLAN), "invalid plan");
  l4rt_plan_free(nullptr);
}

} // namespace
