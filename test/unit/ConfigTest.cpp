//===- ConfigTest.cpp - tests for the Llama 4 config reader --------------===//
//
// Checks HF's defaults and derivations, the golden configs (against their
// checkpoints), the presets' counts against the spec, and one case for every
// value the reader must reject.
//
//===----------------------------------------------------------------------===//

#include "l4c/Import/Config.h"

#include "llvm/Support/FormatVariadic.h"
#include "llvm/Support/JSON.h"
#include "llvm/Support/MemoryBuffer.h"
#include "gtest/gtest.h"
#include <map>

using namespace l4c;
namespace json = llvm::json;

namespace {

const std::string kGolden = std::string(L4C_TEST_DATA_DIR) + "/golden/";

/// Unwraps `c`, failing the test on an error. Tests compare whole vectors
/// rather than index them, so the empty config returned on failure is safe.
Llama4Config ok(llvm::Expected<Llama4Config> c) {
  if (!c) {
    ADD_FAILURE() << llvm::toString(c.takeError());
    return Llama4Config();
  }
  return std::move(*c);
}

/// The message of the error `c` holds, or "" (and a failure) if it parsed.
std::string errorOf(llvm::Expected<Llama4Config> c) {
  if (c) {
    ADD_FAILURE() << "expected an error, but the config parsed";
    return "";
  }
  return llvm::toString(c.takeError());
}

llvm::Expected<Llama4Config> parse(const json::Object &o) {
  return parseConfigJson(
      llvm::formatv("{0}", json::Value(json::Object(o))).str(), "test.json");
}

/// A valid config giving every field whose HF default would not fit it.
json::Object base() {
  return json::Object{{"vocab_size", 64},         {"hidden_size", 64},
                      {"num_hidden_layers", 4},   {"num_attention_heads", 4},
                      {"num_key_value_heads", 2}, {"head_dim", 16},
                      {"intermediate_size", 32},  {"num_local_experts", 4}};
}

std::vector<bool> bits(std::initializer_list<int> v) {
  return std::vector<bool>(v.begin(), v.end());
}

std::vector<std::string> names(const std::vector<ParamSpec> &params) {
  std::vector<std::string> out;
  for (const ParamSpec &p : params)
    out.push_back(p.name);
  return out;
}

/// name -> shape from a safetensors header (8-byte length, then JSON).
std::map<std::string, std::vector<int64_t>>
safetensorsShapes(const std::string &path) {
  std::map<std::string, std::vector<int64_t>> shapes;
  auto buf = llvm::MemoryBuffer::getFile(path);
  if (!buf) {
    ADD_FAILURE() << path << ": " << buf.getError().message();
    return shapes;
  }
  llvm::StringRef data = (*buf)->getBuffer();
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i)
    n = n << 8 | static_cast<uint8_t>(data[i]);
  auto header = json::parse(data.substr(8, n));
  if (!header) {
    ADD_FAILURE() << llvm::toString(header.takeError());
    return shapes;
  }
  for (const auto &[key, value] : *header->getAsObject()) {
    if (key == "__metadata__")
      continue;
    for (const json::Value &d : *value.getAsObject()->getArray("shape"))
      shapes[key.str()].push_back(*d.getAsInteger());
  }
  return shapes;
}

int64_t routedExpertParams(const std::vector<ParamSpec> &params) {
  int64_t n = 0;
  for (const ParamSpec &p : params)
    if (llvm::StringRef(p.name).contains(".experts."))
      n += p.numel();
  return n;
}

//===----------------------------------------------------------------------===//
// Golden configs
//===----------------------------------------------------------------------===//

TEST(ConfigGolden, ScoutTiny) {
  Llama4Config c = ok(loadConfigFile(kGolden + "scout-tiny/config.json"));
  EXPECT_EQ(c.vocabSize, 384);
  EXPECT_EQ(c.hiddenSize, 128);
  EXPECT_EQ(c.numLayers, 4);
  EXPECT_EQ(c.numHeads, 4);
  EXPECT_EQ(c.numKvHeads, 2);
  EXPECT_EQ(c.headDim, 32);
  EXPECT_EQ(c.intermediateSize, 96);
  EXPECT_EQ(c.intermediateSizeMlp, 192);
  EXPECT_EQ(c.numExperts, 4);
  EXPECT_EQ(c.topK, 1);
  EXPECT_EQ(c.moeLayer, bits({1, 1, 1, 1}));
  EXPECT_EQ(c.ropeLayer, bits({1, 1, 1, 0}));
  EXPECT_EQ(c.chunkedLayer, bits({1, 1, 1, 0}));
  EXPECT_TRUE(c.useQkNorm);
  EXPECT_TRUE(c.attnTemperatureTuning);
  EXPECT_EQ(c.attentionChunkSize, 16);
  EXPECT_EQ(c.floorScale, 8);
  EXPECT_EQ(c.attnScale, 0.1);
  EXPECT_EQ(c.rmsNormEps, 1e-5);
  EXPECT_FALSE(c.tieWordEmbeddings);
  EXPECT_EQ(c.rope.type, "llama3");
  EXPECT_EQ(c.rope.theta, 500000.0);
  EXPECT_EQ(c.rope.factor, 16.0);
  EXPECT_EQ(c.rope.lowFreqFactor, 1.0);
  EXPECT_EQ(c.rope.highFreqFactor, 1.0);
  EXPECT_EQ(c.rope.originalMaxPositionEmbeddings, 64);
  ASSERT_EQ(c.moeLayer.size(), 4u);
  EXPECT_TRUE(c.hasQkNorm(0));
  EXPECT_FALSE(c.hasQkNorm(3));
  EXPECT_FALSE(c.hasTemperature(0));
  EXPECT_TRUE(c.hasTemperature(3));
}

TEST(ConfigGolden, MaverickTiny) {
  Llama4Config c = ok(loadConfigFile(kGolden + "maverick-tiny/config.json"));
  EXPECT_EQ(c.vocabSize, 320);
  EXPECT_EQ(c.hiddenSize, 96);
  EXPECT_EQ(c.numHeads, 6);
  EXPECT_EQ(c.numKvHeads, 2);
  EXPECT_EQ(c.headDim, 16);
  EXPECT_EQ(c.intermediateSize, 64);
  EXPECT_EQ(c.intermediateSizeMlp, 160);
  EXPECT_EQ(c.numExperts, 8);
  EXPECT_EQ(c.moeLayer, bits({0, 1, 0, 1}));
  EXPECT_EQ(c.ropeLayer, bits({1, 1, 1, 0}));
  EXPECT_EQ(c.chunkedLayer, bits({1, 1, 1, 0}));
  EXPECT_FALSE(c.useQkNorm);
  EXPECT_EQ(c.attentionChunkSize, 12);
  EXPECT_EQ(c.floorScale, 6);
  EXPECT_EQ(c.rope.type, "default");
  EXPECT_EQ(c.rope.theta, 500000.0);
  ASSERT_EQ(c.ropeLayer.size(), 4u);
  EXPECT_FALSE(c.hasQkNorm(0));
}

TEST(ConfigGolden, ParameterListMatchesCheckpoints) {
  for (const char *model : {"scout-tiny", "maverick-tiny"}) {
    SCOPED_TRACE(model);
    Llama4Config c = ok(loadConfigFile(kGolden + model));
    std::map<std::string, std::vector<int64_t>> expected =
        safetensorsShapes(kGolden + model + "/model.safetensors");
    std::map<std::string, std::vector<int64_t>> got;
    for (const ParamSpec &p : parameterList(c))
      got[p.name] = p.shape;
    EXPECT_EQ(got, expected);
  }
}

TEST(ConfigFile, DirectoryAndFileAgree) {
  Llama4Config dir = ok(loadConfigFile(kGolden + "scout-tiny"));
  EXPECT_EQ(dir.source, kGolden + "scout-tiny/config.json");
  EXPECT_EQ(dir.numExperts, 4);
}

TEST(ConfigFile, MissingFileNamesPath) {
  std::string path = kGolden + "no-such-model";
  std::string msg = errorOf(loadConfigFile(path));
  EXPECT_NE(msg.find(path + ": cannot read config"), std::string::npos) << msg;
  msg = errorOf(loadConfigFile(kGolden + "nope.json"));
  EXPECT_NE(msg.find(kGolden + "nope.json"), std::string::npos) << msg;
}

//===----------------------------------------------------------------------===//
// Presets and counts
//===----------------------------------------------------------------------===//

TEST(ConfigPreset, ScoutMatchesSpec) {
  Llama4Config c = ok(presetConfig("llama4-scout"));
  EXPECT_EQ(c.source, "preset:llama4-scout");
  EXPECT_EQ(c.moeLayer, std::vector<bool>(48, true));
  EXPECT_EQ(c.rope.type, "llama3");
  EXPECT_EQ(c.rope.factor, 16.0);
  EXPECT_EQ(c.rope.lowFreqFactor, 1.0);
  EXPECT_EQ(c.rope.highFreqFactor, 1.0);
  EXPECT_EQ(c.rope.originalMaxPositionEmbeddings, 8192);
  EXPECT_EQ(c.maxPositionEmbeddings, 10485760);
  EXPECT_TRUE(c.useQkNorm);
  EXPECT_TRUE(c.attnTemperatureTuning);
  std::vector<ParamSpec> params = parameterList(c);
  EXPECT_EQ(routedExpertParams(params), 96'636'764'160);
  ModelCounts n = countModel(c, 8192);
  EXPECT_EQ(n.totalParams, 107'769'861'120);
  EXPECT_EQ(n.activeParams, 16'138'408'960);
}

TEST(ConfigPreset, MaverickMatchesSpec) {
  Llama4Config c = ok(presetConfig("llama4-maverick"));
  EXPECT_EQ(c.numExperts, 128);
  EXPECT_FALSE(c.useQkNorm);
  EXPECT_EQ(c.rope.type, "default");
  EXPECT_EQ(c.maxPositionEmbeddings, 1048576);
  ASSERT_EQ(c.moeLayer.size(), 48u);
  int moe = 0;
  for (int64_t i = 0; i < 48; ++i) {
    EXPECT_EQ(c.isMoe(i), i % 2 == 1) << i;
    moe += c.isMoe(i);
  }
  EXPECT_EQ(moe, 24);
  std::vector<ParamSpec> params = parameterList(c);
  EXPECT_EQ(routedExpertParams(params), 386'547'056'640);
  ModelCounts n = countModel(c, 8192);
  EXPECT_EQ(n.totalParams, 400'711'848'960);
  EXPECT_EQ(n.activeParams, 16'150'205'440);
}

TEST(ConfigPreset, Tiny) {
  Llama4Config c = ok(presetConfig(kDefaultPreset));
  EXPECT_EQ(c.source, "preset:llama4-tiny");
  EXPECT_EQ(c.vocabSize, 256);
  EXPECT_EQ(c.hiddenSize, 128);
  EXPECT_EQ(c.numKvHeads, 2);
  EXPECT_EQ(c.headDim, 32);
  EXPECT_EQ(c.intermediateSizeMlp, 256);
  EXPECT_EQ(c.moeLayer, bits({0, 1, 0, 1}));
  EXPECT_EQ(c.ropeLayer, bits({1, 1, 1, 0}));
  EXPECT_EQ(c.attentionChunkSize, 64);
  EXPECT_EQ(c.floorScale, 32);
  EXPECT_EQ(c.rope.theta, 10000.0);
  EXPECT_EQ(c.rope.factor, 8.0);
  EXPECT_EQ(c.rope.highFreqFactor, 4.0);
  EXPECT_EQ(c.rope.originalMaxPositionEmbeddings, 64);
  EXPECT_FALSE(c.tieWordEmbeddings);
}

TEST(ConfigPreset, UnknownNameListsValidOnes) {
  EXPECT_EQ(presetNames(),
            (std::vector<std::string>{"llama4-scout", "llama4-maverick",
                                      "llama4-tiny"}));
  std::string msg = errorOf(presetConfig("llama4-behemoth"));
  EXPECT_NE(msg.find("llama4-behemoth"), std::string::npos) << msg;
  EXPECT_NE(msg.find("llama4-scout, llama4-maverick, llama4-tiny"),
            std::string::npos)
      << msg;
}

TEST(ConfigCount, ParameterOrderFollowsHF) {
  Llama4Config c = ok(presetConfig("llama4-tiny"));
  std::vector<ParamSpec> params = parameterList(c);
  std::vector<std::string> got = names(params);
  ASSERT_EQ(got.size(), 1 + 9 + 12 + 9 + 12 + 2u);
  std::vector<std::string> head(got.begin(), got.begin() + 23);
  EXPECT_EQ(head,
            (std::vector<std::string>{
                "model.embed_tokens.weight",
                "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.self_attn.k_proj.weight",
                "model.layers.0.self_attn.v_proj.weight",
                "model.layers.0.self_attn.o_proj.weight",
                "model.layers.0.feed_forward.gate_proj.weight",
                "model.layers.0.feed_forward.up_proj.weight",
                "model.layers.0.feed_forward.down_proj.weight",
                "model.layers.0.input_layernorm.weight",
                "model.layers.0.post_attention_layernorm.weight",
                "model.layers.1.self_attn.q_proj.weight",
                "model.layers.1.self_attn.k_proj.weight",
                "model.layers.1.self_attn.v_proj.weight",
                "model.layers.1.self_attn.o_proj.weight",
                "model.layers.1.feed_forward.experts.gate_up_proj",
                "model.layers.1.feed_forward.experts.down_proj",
                "model.layers.1.feed_forward.router.weight",
                "model.layers.1.feed_forward.shared_expert.gate_proj.weight",
                "model.layers.1.feed_forward.shared_expert.up_proj.weight",
                "model.layers.1.feed_forward.shared_expert.down_proj.weight",
                "model.layers.1.input_layernorm.weight",
                "model.layers.1.post_attention_layernorm.weight",
                "model.layers.2.self_attn.q_proj.weight"}));
  EXPECT_EQ(got[got.size() - 2], "model.norm.weight");
  EXPECT_EQ(got.back(), "lm_head.weight");
  EXPECT_EQ(params[2].shape, (std::vector<int64_t>{64, 128}));      // k_proj
  EXPECT_EQ(params[5].shape, (std::vector<int64_t>{256, 128}));     // gate
  EXPECT_EQ(params[14].shape, (std::vector<int64_t>{4, 128, 256})); // gate_up
  EXPECT_EQ(params[15].shape, (std::vector<int64_t>{4, 128, 128})); // down
}

// Tiny, by hand: embed and head 256*128 = 32768 each; attention 49152 and
// norms 256 per layer; MoE layers (1, 3) 246272 each, dense (0, 2) 98304 each;
// final norm 128. Each MoE layer leaves 3 experts of 3*128*128 idle.
TEST(ConfigCount, TinyCountsAndFlops) {
  Llama4Config c = ok(presetConfig("llama4-tiny"));
  ModelCounts n = countModel(c, 100);
  EXPECT_EQ(n.totalParams, 952448);
  EXPECT_EQ(n.activeParams, 952448 - 2 * 3 * 49152 - 32768);
  // 2 * (active - 9 norms of 128) + 4*H*d*(64 + 64 + 64 + 100): three
  // chunked layers see min(100, 64) keys, the NoPE layer all 100.
  double forward = 2.0 * (624768 - 1152) + 4.0 * 128 * (3 * 64 + 100);
  EXPECT_EQ(n.forwardFlopsPerToken, forward);
  EXPECT_EQ(n.trainFlopsPerToken, 3 * forward);
  // Below the chunk, every layer sees the whole context.
  ModelCounts shortCtx = countModel(c, 10);
  EXPECT_EQ(shortCtx.forwardFlopsPerToken,
            2.0 * (624768 - 1152) + 4.0 * 128 * 40);
}

TEST(ConfigCount, TiedEmbeddingsDropLmHead) {
  json::Object o = base();
  o["tie_word_embeddings"] = true;
  Llama4Config tied = ok(parse(o));
  o["tie_word_embeddings"] = false;
  Llama4Config untied = ok(parse(o));
  EXPECT_TRUE(tied.tieWordEmbeddings);
  std::vector<std::string> t = names(parameterList(tied));
  std::vector<std::string> u = names(parameterList(untied));
  EXPECT_EQ(t.back(), "model.norm.weight");
  EXPECT_EQ(u.back(), "lm_head.weight");
  EXPECT_EQ(t.size() + 1, u.size());
  ModelCounts nt = countModel(tied, 16), nu = countModel(untied, 16);
  EXPECT_EQ(nu.totalParams - nt.totalParams, 64 * 64);
  // The shared matrix counts once, as the head: active is unchanged.
  EXPECT_EQ(nt.activeParams, nu.activeParams);
}

//===----------------------------------------------------------------------===//
// Defaults and derivations
//===----------------------------------------------------------------------===//

TEST(ConfigDerive, HFDefaults) {
  json::Object o{{"vocab_size", 10},        {"hidden_size", 64},
                 {"num_hidden_layers", 8},  {"num_attention_heads", 16},
                 {"intermediate_size", 32}, {"num_local_experts", 4}};
  Llama4Config c = ok(parse(o));
  EXPECT_EQ(c.source, "test.json");
  EXPECT_EQ(c.numKvHeads, 8); // absent keeps HF's 8, not H
  EXPECT_EQ(c.headDim, 128);  // absent keeps HF's 128, not D / H
  EXPECT_EQ(c.intermediateSizeMlp, 16384);
  EXPECT_EQ(c.topK, 1);
  EXPECT_EQ(c.moeLayer, std::vector<bool>(8, true));
  EXPECT_EQ(c.ropeLayer, bits({1, 1, 1, 0, 1, 1, 1, 0}));
  EXPECT_EQ(c.chunkedLayer, c.ropeLayer);
  EXPECT_EQ(c.attentionChunkSize, 8192);
  EXPECT_EQ(c.rmsNormEps, 1e-5);
  EXPECT_TRUE(c.useQkNorm);
  EXPECT_TRUE(c.attnTemperatureTuning);
  EXPECT_EQ(c.floorScale, 8192);
  EXPECT_EQ(c.attnScale, 0.1);
  EXPECT_FALSE(c.tieWordEmbeddings);
  EXPECT_EQ(c.maxPositionEmbeddings, 131072);
  EXPECT_EQ(c.attentionDropout, 0.0);
  EXPECT_EQ(c.rope.type, "default");
  EXPECT_EQ(c.rope.theta, 500000.0);
}

TEST(ConfigDerive, NullKvHeadsBecomesHeads) {
  json::Object o = base();
  o["num_key_value_heads"] = nullptr;
  EXPECT_EQ(ok(parse(o)).numKvHeads, 4);
}

TEST(ConfigDerive, NullHeadDimIsHiddenOverHeads) {
  json::Object o = base();
  o["head_dim"] = nullptr;
  o["hidden_size"] = 96;
  EXPECT_EQ(ok(parse(o)).headDim, 24);
}

TEST(ConfigDerive, IntervalAndStep) {
  json::Object o = base();
  o["num_hidden_layers"] = 6;
  o["no_rope_layer_interval"] = 3;
  o["interleave_moe_layer_step"] = 3;
  Llama4Config c = ok(parse(o));
  EXPECT_EQ(c.ropeLayer, bits({1, 1, 0, 1, 1, 0}));
  EXPECT_EQ(c.chunkedLayer, bits({1, 1, 0, 1, 1, 0}));
  EXPECT_EQ(c.moeLayer, bits({0, 0, 1, 0, 0, 1}));
}

TEST(ConfigDerive, EmptyNoRopeLayersDerives) {
  json::Object o = base();
  o["no_rope_layers"] = json::Array{};
  o["no_rope_layer_interval"] = 2;
  EXPECT_EQ(ok(parse(o)).ropeLayer, bits({1, 0, 1, 0}));
}

TEST(ConfigDerive, LayerTypesFollowExplicitNoRopeLayers) {
  json::Object o = base();
  o["no_rope_layers"] = json::Array{0, 1, true, false};
  Llama4Config c = ok(parse(o));
  EXPECT_EQ(c.ropeLayer, bits({0, 1, 1, 0}));
  EXPECT_EQ(c.chunkedLayer, bits({0, 1, 1, 0}));
}

TEST(ConfigDerive, ExplicitLayerTypesHonoured) {
  json::Object o = base();
  o["layer_types"] = json::Array{"full_attention", "chunked_attention",
                                 "full_attention", "chunked_attention"};
  Llama4Config c = ok(parse(o));
  EXPECT_EQ(c.ropeLayer, bits({1, 1, 1, 0}));
  EXPECT_EQ(c.chunkedLayer, bits({0, 1, 0, 1}));
}

TEST(ConfigDerive, ExplicitMoeLayersHonoured) {
  json::Object o = base();
  o["interleave_moe_layer_step"] = 2;
  o["moe_layers"] = json::Array{2, 0};
  EXPECT_EQ(ok(parse(o)).moeLayer, bits({1, 0, 1, 0}));
  o["moe_layers"] = json::Array{};
  EXPECT_EQ(ok(parse(o)).moeLayer, bits({0, 0, 0, 0}));
}

TEST(ConfigDerive, NullChunkSizeWithoutChunkedLayers) {
  json::Object o = base();
  o["attention_chunk_size"] = nullptr;
  o["layer_types"] = json::Array{"full_attention", "full_attention",
                                 "full_attention", "full_attention"};
  Llama4Config c = ok(parse(o));
  EXPECT_EQ(c.chunkedLayer, bits({0, 0, 0, 0}));
  EXPECT_EQ(c.attentionChunkSize, 0);
}

TEST(ConfigDerive, TextConfigNesting) {
  json::Object o{
      {"model_type", "llama4"},
      {"architectures", json::Array{"Llama4ForConditionalGeneration"}},
      {"vision_config", json::Object{{"hidden_size", 1408}}},
      {"image_token_index", 200092},
      {"text_config", base()}};
  o.getObject("text_config")->try_emplace("model_type", "llama4_text");
  Llama4Config c = ok(parse(o));
  EXPECT_EQ(c.hiddenSize, 64);
  EXPECT_EQ(c.headDim, 16);
  EXPECT_EQ(c.source, "test.json");
  o.getObject("text_config")->erase("hidden_size");
  std::string msg = errorOf(parse(o));
  EXPECT_NE(msg.find("test.json (text_config): missing required field "
                     "'hidden_size'"),
            std::string::npos)
      << msg;
}

TEST(ConfigDerive, LegacyRopeScalingAndTheta) {
  json::Object o = base();
  o["rope_theta"] = 250000.0;
  o["max_position_embeddings"] = 4096;
  o["rope_scaling"] = json::Object{{"type", "llama3"},
                                   {"factor", 8},
                                   {"low_freq_factor", 1.0},
                                   {"high_freq_factor", 4.0}};
  Llama4Config c = ok(parse(o));
  EXPECT_EQ(c.rope.type, "llama3");
  EXPECT_EQ(c.rope.theta, 250000.0);
  EXPECT_EQ(c.rope.factor, 8.0);
  EXPECT_EQ(c.rope.lowFreqFactor, 1.0);
  EXPECT_EQ(c.rope.highFreqFactor, 4.0);
  EXPECT_EQ(c.rope.originalMaxPositionEmbeddings, 4096);
  // A theta inside the dict wins over the top-level one.
  o.getObject("rope_scaling")->try_emplace("rope_theta", 1e6);
  EXPECT_EQ(ok(parse(o)).rope.theta, 1e6);
}

TEST(ConfigDerive, NullRopeScalingIsDefault) {
  json::Object o = base();
  o["rope_scaling"] = nullptr;
  o["rope_theta"] = 10000;
  Llama4Config c = ok(parse(o));
  EXPECT_EQ(c.rope.type, "default");
  EXPECT_EQ(c.rope.theta, 10000.0);
  o["rope_scaling"] = json::Object{};
  o["rope_parameters"] = json::Object{{"rope_type", "default"}};
  EXPECT_EQ(ok(parse(o)).rope.type, "default");
}

TEST(ConfigDerive, IntegerTemperatureTuning) {
  json::Object o = base();
  o["attn_temperature_tuning"] = 4;
  EXPECT_TRUE(ok(parse(o)).attnTemperatureTuning);
  o["attn_temperature_tuning"] = 0;
  EXPECT_FALSE(ok(parse(o)).attnTemperatureTuning);
  o["attn_temperature_tuning"] = false;
  EXPECT_FALSE(ok(parse(o)).attnTemperatureTuning);
}

TEST(ConfigDerive, FloorScaleIntOrFloat) {
  json::Object o = base();
  o["floor_scale"] = 8192;
  EXPECT_EQ(ok(parse(o)).floorScale, 8192.0);
  o["floor_scale"] = 100.5;
  EXPECT_EQ(ok(parse(o)).floorScale, 100.5);
}

TEST(ConfigDerive, InertFieldsAccepted) {
  json::Object o = base();
  o["router_aux_loss_coef"] = 0.5;
  o["router_jitter_noise"] = 0.1;
  o["output_router_logits"] = true;
  o["attention_dropout"] = 0.25;
  o["bos_token_id"] = 200000;
  o["eos_token_id"] = json::Array{200001, 200007};
  o["pad_token_id"] = nullptr;
  o["initializer_range"] = 0.02;
  o["use_cache"] = true;
  o["torch_dtype"] = "bfloat16";
  o["attention_bias"] = false;
  o["hidden_act"] = "silu";
  o["model_type"] = "llama4_text";
  o["partial_rotary_factor"] = 1.0;
  Llama4Config c = ok(parse(o));
  EXPECT_EQ(c.attentionDropout, 0.25);
}

// pad_token_id is nn.Embedding's padding_idx; absent and null mean none (as
// Llama4TextConfig's default in transformers 5).
TEST(ConfigDerive, PadTokenId) {
  json::Object o = base();
  EXPECT_FALSE(ok(parse(o)).padTokenId.has_value());
  o["pad_token_id"] = nullptr;
  EXPECT_FALSE(ok(parse(o)).padTokenId.has_value());
  o["pad_token_id"] = 0;
  EXPECT_EQ(ok(parse(o)).padTokenId, std::optional<int64_t>(0));
  o["pad_token_id"] = 63;
  EXPECT_EQ(ok(parse(o)).padTokenId, std::optional<int64_t>(63));

  // A multimodal config: the text model's value, read from text_config.
  json::Object mm{{"model_type", "llama4"}, {"text_config", base()}};
  mm.getObject("text_config")->try_emplace("pad_token_id", 7);
  EXPECT_EQ(ok(parse(mm)).padTokenId, std::optional<int64_t>(7));
  (*mm.getObject("text_config"))["pad_token_id"] = 64;
  std::string msg = errorOf(parse(mm));
  EXPECT_NE(msg.find("test.json (text_config): field 'pad_token_id' must be "
                     "null or in [0, 64)"),
            std::string::npos)
      << msg;

  // configToJson writes it (null when none), so HF's default never applies.
  Llama4Config c = ok(parse(o));
  auto back = parseConfigJson(configToJson(c), "round-trip");
  ASSERT_TRUE(bool(back)) << llvm::toString(back.takeError());
  EXPECT_EQ(back->padTokenId, std::optional<int64_t>(63));
  c.padTokenId.reset();
  std::string text = configToJson(c);
  EXPECT_NE(text.find("\"pad_token_id\": null"), std::string::npos) << text;
  EXPECT_FALSE(cantFail(parseConfigJson(text, "round-trip")).padTokenId);
}

//===----------------------------------------------------------------------===//
// Rejections
//===----------------------------------------------------------------------===//

TEST(ConfigReject, MalformedJson) {
  std::string msg =
      errorOf(parseConfigJson("{\n  \"vocab_size\": 1,,\n}", "bad.json"));
  EXPECT_EQ(msg.rfind("bad.json: invalid JSON: ", 0), 0u) << msg;
  EXPECT_NE(msg.find("[2:"), std::string::npos) << msg; // line 2
}

TEST(ConfigReject, NotAnObject) {
  std::string msg = errorOf(parseConfigJson("[1, 2]", "list.json"));
  EXPECT_NE(msg.find("list.json: expected a JSON object"), std::string::npos)
      << msg;
}

TEST(ConfigReject, TextConfigNotAnObject) {
  std::string msg = errorOf(parseConfigJson(
      R"({"model_type": "llama4", "text_config": 3})", "mm.json"));
  EXPECT_NE(msg.find("field 'text_config' must be an object, got number"),
            std::string::npos)
      << msg;
}

TEST(ConfigReject, TopLevelOriginalMaxWithLlama3) {
  json::Object o = base();
  o["original_max_position_embeddings"] = 8192;
  EXPECT_EQ(ok(parse(o)).rope.type, "default"); // unused without llama3
  o["rope_parameters"] = json::Object{{"rope_type", "llama3"},
                                      {"factor", 8},
                                      {"low_freq_factor", 1},
                                      {"high_freq_factor", 4}};
  std::string msg = errorOf(parse(o));
  EXPECT_NE(msg.find("field 'original_max_position_embeddings' at the top "
                     "level is not supported"),
            std::string::npos)
      << msg;
}

TEST(ConfigReject, TieWordEmbeddingsDisagree) {
  json::Object o{{"tie_word_embeddings", true}, {"text_config", base()}};
  std::string msg = errorOf(parse(o));
  EXPECT_NE(msg.find("tie_word_embeddings"), std::string::npos) << msg;
}

/// One rejected value: `key` set to `value` (JSON text; null pointer erases
/// the key), and the text the message must contain.
struct RejectCase {
  const char *name, *key, *value, *expect;
};

void PrintTo(const RejectCase &c, std::ostream *os) { *os << c.name; }

class ConfigRejectField : public testing::TestWithParam<RejectCase> {};

TEST_P(ConfigRejectField, NamesTheField) {
  const RejectCase &rc = GetParam();
  json::Object o = base();
  if (rc.value) {
    llvm::Expected<json::Value> v = json::parse(rc.value);
    ASSERT_TRUE(static_cast<bool>(v)) << llvm::toString(v.takeError());
    o[rc.key] = std::move(*v);
  } else {
    o.erase(rc.key);
  }
  std::string msg = errorOf(parse(o));
  EXPECT_EQ(msg.rfind("test.json: ", 0), 0u) << msg;
  EXPECT_NE(msg.find(rc.expect), std::string::npos)
      << "message: " << msg << "\nexpected to contain: " << rc.expect;
}

const RejectCase kRejectCases[] = {
    // Required fields.
    {"MissingVocabSize", "vocab_size", nullptr,
     "missing required field 'vocab_size'"},
    {"MissingHiddenSize", "hidden_size", nullptr,
     "missing required field 'hidden_size'"},
    {"MissingNumHiddenLayers", "num_hidden_layers", nullptr,
     "missing required field 'num_hidden_layers'"},
    {"MissingNumAttentionHeads", "num_attention_heads", nullptr,
     "missing required field 'num_attention_heads'"},
    {"MissingIntermediateSize", "intermediate_size", nullptr,
     "missing required field 'intermediate_size'"},
    {"MissingNumLocalExperts", "num_local_experts", nullptr,
     "missing required field 'num_local_experts'"},
    // JSON types.
    {"HiddenSizeString", "hidden_size", R"("5120")",
     "field 'hidden_size' must be an integer, got string"},
    {"HiddenSizeFraction", "hidden_size", "64.5",
     "field 'hidden_size' must be an integer, got number"},
    {"RequiredNull", "vocab_size", "null",
     "field 'vocab_size' must be an integer, got null"},
    {"UseQkNormInteger", "use_qk_norm", "1",
     "field 'use_qk_norm' must be a boolean, got number"},
    {"TemperatureTuningString", "attn_temperature_tuning", R"("yes")",
     "field 'attn_temperature_tuning' must be a boolean or an integer"},
    {"RmsNormEpsString", "rms_norm_eps", R"("1e-5")",
     "field 'rms_norm_eps' must be a number, got string"},
    {"HiddenActNotString", "hidden_act", "1",
     "field 'hidden_act' must be a string"},
    {"RopeParametersList", "rope_parameters", "[]",
     "field 'rope_parameters' must be an object, got list"},
    {"MoeLayersNotList", "moe_layers", "1",
     "field 'moe_layers' must be a list, got number"},
    // Unsupported math.
    {"HiddenActGelu", "hidden_act", R"("gelu")",
     "hidden_act: \"gelu\" is not supported"},
    {"AttentionBias", "attention_bias", "true",
     "attention_bias: true is not supported (Llama 4 has no projection "
     "biases)"},
    {"ModelTypeOther", "model_type", R"("llama")",
     "model_type: \"llama\" is not supported"},
    {"RopeTypeYarn", "rope_parameters",
     R"({"rope_type": "yarn", "factor": 4.0})",
     "rope_parameters.rope_type: \"yarn\" is not supported"},
    {"RopeScalingTypeDynamic", "rope_scaling",
     R"({"rope_type": "dynamic", "factor": 4.0})",
     "rope_scaling.rope_type: \"dynamic\" is not supported"},
    {"RopeScalingLegacyTypeLinear", "rope_scaling",
     R"({"type": "linear", "factor": 4.0})",
     "rope_scaling.type: \"linear\" is not supported"},
    {"Llama3MissingFactor", "rope_parameters",
     R"({"rope_type": "llama3", "low_freq_factor": 1, "high_freq_factor": 4})",
     "missing required field 'rope_parameters.factor'"},
    {"Llama3MissingLowFreqFactor", "rope_parameters",
     R"({"rope_type": "llama3", "factor": 8, "high_freq_factor": 4})",
     "missing required field 'rope_parameters.low_freq_factor'"},
    {"Llama3MissingHighFreqFactor", "rope_scaling",
     R"({"rope_type": "llama3", "factor": 8, "low_freq_factor": 1})",
     "missing required field 'rope_scaling.high_freq_factor'"},
    {"Llama3ZeroFactor", "rope_parameters",
     R"({"rope_type": "llama3", "factor": 0, "low_freq_factor": 1,
         "high_freq_factor": 4})",
     "field 'rope_parameters.factor' must be positive"},
    {"Llama3ZeroOriginalMax", "rope_parameters",
     R"({"rope_type": "llama3", "factor": 8, "low_freq_factor": 1,
         "high_freq_factor": 4, "original_max_position_embeddings": 0})",
     "field 'rope_parameters.original_max_position_embeddings' must be "
     "positive"},
    {"PerLayerTypeRope", "rope_parameters",
     R"({"full_attention": {"rope_type": "default"}})",
     "per-layer-type RoPE parameters are not supported"},
    {"PartialRotaryFactor", "partial_rotary_factor", "0.5",
     "partial_rotary_factor: 0.5 is not supported"},
    {"RopeParametersPartialRotary", "rope_parameters",
     R"({"rope_type": "default", "partial_rotary_factor": 0.25})",
     "rope_parameters.partial_rotary_factor: 0.25 is not supported"},
    {"RopeThetaZero", "rope_theta", "0", "field 'rope_theta' must be positive"},
    // Sizes.
    {"ZeroVocabSize", "vocab_size", "0",
     "field 'vocab_size' must be positive, got 0"},
    {"NegativeHiddenSize", "hidden_size", "-64",
     "field 'hidden_size' must be positive, got -64"},
    {"ZeroLayers", "num_hidden_layers", "0",
     "field 'num_hidden_layers' must be positive"},
    {"ZeroHeads", "num_attention_heads", "0",
     "field 'num_attention_heads' must be positive"},
    {"ZeroIntermediateSize", "intermediate_size", "0",
     "field 'intermediate_size' must be positive"},
    {"ZeroExperts", "num_local_experts", "0",
     "field 'num_local_experts' must be positive"},
    {"ZeroIntermediateSizeMlp", "intermediate_size_mlp", "0",
     "field 'intermediate_size_mlp' must be positive"},
    {"ZeroKvHeads", "num_key_value_heads", "0",
     "field 'num_key_value_heads' must be positive"},
    {"ZeroHeadDim", "head_dim", "0", "field 'head_dim' must be positive"},
    {"ZeroMaxPosition", "max_position_embeddings", "0",
     "field 'max_position_embeddings' must be positive"},
    {"HeadsNotMultipleOfKvHeads", "num_key_value_heads", "3",
     "field 'num_attention_heads' (4) must be a multiple of "
     "num_key_value_heads (3)"},
    {"OddHeadDim", "head_dim", "15", "field 'head_dim' must be even"},
    // Routing.
    {"TopKZero", "num_experts_per_tok", "0",
     "field 'num_experts_per_tok' must be positive"},
    {"TopKAboveExperts", "num_experts_per_tok", "5",
     "field 'num_experts_per_tok' must be in [1, 4]"},
    {"MoeLayerOutOfRange", "moe_layers", "[1, 4]",
     "field 'moe_layers' entry 4 is not a layer index in [0, 4)"},
    {"MoeLayerNegative", "moe_layers", "[-1]", "field 'moe_layers' entry -1"},
    {"MoeLayerNotInteger", "moe_layers", R"(["1"])",
     "field 'moe_layers' entry \"1\""},
    {"MoeLayerDuplicate", "moe_layers", "[1, 3, 1]",
     "field 'moe_layers' lists layer 1 twice"},
    {"InterleaveStepZero", "interleave_moe_layer_step", "0",
     "field 'interleave_moe_layer_step' must be positive"},
    // Layer patterns.
    {"NoRopeIntervalZero", "no_rope_layer_interval", "0",
     "field 'no_rope_layer_interval' must be positive"},
    {"NoRopeLayersShort", "no_rope_layers", "[1, 1, 0]",
     "field 'no_rope_layers' has 3 entries, expected num_hidden_layers = 4"},
    {"NoRopeLayersLong", "no_rope_layers", "[1, 1, 1, 0, 1]",
     "field 'no_rope_layers' has 5 entries"},
    {"NoRopeLayersBadValue", "no_rope_layers", "[1, 1, 2, 0]",
     "field 'no_rope_layers' entry 2 must be 0 (NoPE) or 1 (RoPE), got 2"},
    {"NoRopeLayersString", "no_rope_layers", R"([1, 1, "0", 0])",
     "field 'no_rope_layers' entry 2"},
    {"LayerTypesShort", "layer_types", R"(["full_attention"])",
     "field 'layer_types' has 1 entries, expected num_hidden_layers = 4"},
    {"LayerTypesUnknown", "layer_types",
     R"(["chunked_attention", "sliding_attention", "chunked_attention",
         "full_attention"])",
     "field 'layer_types' entry 1 is \"sliding_attention\""},
    {"ChunkSizeZero", "attention_chunk_size", "0",
     "field 'attention_chunk_size' must be positive, got 0"},
    {"ChunkSizeNullWithChunkedLayers", "attention_chunk_size", "null",
     "field 'attention_chunk_size' is null but layer 0 uses "
     "chunked_attention"},
    // Scalars.
    {"RmsNormEpsZero", "rms_norm_eps", "0",
     "field 'rms_norm_eps' must be positive"},
    {"RmsNormEpsNegative", "rms_norm_eps", "-1e-5",
     "field 'rms_norm_eps' must be positive"},
    {"FloorScaleZero", "floor_scale", "0",
     "field 'floor_scale' must be positive"},
    {"FloorScaleNegative", "floor_scale", "-8.5",
     "field 'floor_scale' must be positive"},
    {"AttentionDropoutOne", "attention_dropout", "1.0",
     "field 'attention_dropout' must be in [0, 1)"},
    {"PadTokenIdVocab", "pad_token_id", "64",
     "field 'pad_token_id' must be null or in [0, 64) (vocab_size), got 64"},
    {"PadTokenIdNegative", "pad_token_id", "-1",
     "field 'pad_token_id' must be null or in [0, 64) (vocab_size), got -1"},
    {"PadTokenIdReleasedDefault", "pad_token_id", "200018",
     "field 'pad_token_id' must be null or in [0, 64)"},
    {"PadTokenIdString", "pad_token_id", "\"0\"",
     "field 'pad_token_id' must be an integer, got string"},
};

INSTANTIATE_TEST_SUITE_P(Cases, ConfigRejectField,
                         testing::ValuesIn(kRejectCases),
                         [](const testing::TestParamInfo<RejectCase> &info) {
                           return std::string(info.param.name);
                         });

} // namespace

// configToJson writes every derived field, so reading it back gives the same
// config: plans carry it to write HF-loadable checkpoints after training.
TEST(ConfigJson, RoundTripsPresetsAndGoldens) {
  std::vector<l4c::Llama4Config> configs;
  for (const std::string &name : l4c::presetNames())
    configs.push_back(cantFail(l4c::presetConfig(name)));
  for (const char *c : {"scout-tiny", "maverick-tiny"})
    configs.push_back(cantFail(l4c::loadConfigFile(
        std::string(L4C_TEST_DATA_DIR) + "/golden/" + c + "/config.json")));
  for (const l4c::Llama4Config &c : configs) {
    std::string text = l4c::configToJson(c);
    auto back = l4c::parseConfigJson(text, "round-trip");
    ASSERT_TRUE(bool(back)) << llvm::toString(back.takeError()) << "\n" << text;
    EXPECT_EQ(back->vocabSize, c.vocabSize);
    EXPECT_EQ(back->hiddenSize, c.hiddenSize);
    EXPECT_EQ(back->numKvHeads, c.numKvHeads);
    EXPECT_EQ(back->headDim, c.headDim);
    EXPECT_EQ(back->intermediateSizeMlp, c.intermediateSizeMlp);
    EXPECT_EQ(back->topK, c.topK);
    EXPECT_EQ(back->moeLayer, c.moeLayer);
    EXPECT_EQ(back->ropeLayer, c.ropeLayer);
    EXPECT_EQ(back->chunkedLayer, c.chunkedLayer);
    EXPECT_EQ(back->rope.type, c.rope.type);
    EXPECT_DOUBLE_EQ(back->rope.theta, c.rope.theta);
    EXPECT_DOUBLE_EQ(back->rope.factor, c.rope.factor);
    EXPECT_EQ(back->rope.originalMaxPositionEmbeddings,
              c.rope.originalMaxPositionEmbeddings);
    EXPECT_EQ(back->useQkNorm, c.useQkNorm);
    EXPECT_EQ(back->attnTemperatureTuning, c.attnTemperatureTuning);
    EXPECT_DOUBLE_EQ(back->floorScale, c.floorScale);
    EXPECT_EQ(back->tieWordEmbeddings, c.tieWordEmbeddings);
    EXPECT_EQ(back->attentionChunkSize, c.attentionChunkSize);
    EXPECT_EQ(back->padTokenId, c.padTokenId);
  }
}
