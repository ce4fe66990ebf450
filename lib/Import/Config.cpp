//===- Config.cpp - Llama 4 text config parsing and counting --------------===//
//
// Reads a Hugging Face config.json the way Llama4TextConfig.__post_init__ and
// standardize_rope_params do, rejects every value the compiler cannot honour,
// and counts parameters and FLOPs for `l4c explain`.
//
//===----------------------------------------------------------------------===//

#include "l4c/Import/Config.h"

#include "llvm/ADT/STLExtras.h"
#include "llvm/ADT/SmallString.h"
#include "llvm/ADT/StringExtras.h"
#include "llvm/Support/FileSystem.h"
#include "llvm/Support/FormatVariadic.h"
#include "llvm/Support/JSON.h"
#include "llvm/Support/MemoryBuffer.h"
#include "llvm/Support/Path.h"
#include <cstdio>
#include <optional>

using namespace l4c;
using llvm::Error;
using llvm::Expected;
using llvm::StringRef;
using llvm::Twine;
namespace json = llvm::json;

namespace {

StringRef kindName(const json::Value &v) {
  switch (v.kind()) {
  case json::Value::Null:
    return "null";
  case json::Value::Boolean:
    return "boolean";
  case json::Value::Number:
    return "number";
  case json::Value::String:
    return "string";
  case json::Value::Array:
    return "list";
  case json::Value::Object:
    return "object";
  }
  llvm_unreachable("unknown json kind");
}

std::string show(const json::Value &v) { return llvm::formatv("{0}", v).str(); }

/// Shortest readable form, as Python would print most config values.
std::string show(double v) {
  char buf[32];
  snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

/// Typed access to one JSON object. Every message starts with the config's
/// source and names the field as the file spells it (`prefix` qualifies the
/// keys of a nested dict such as rope_parameters).
class Fields {
public:
  Fields(const json::Object &obj, StringRef source, StringRef prefix = "")
      : obj(obj), source(source.str()), prefix(prefix.str()) {}

  const json::Value *get(StringRef key) const { return obj.get(key); }
  /// Absent and null both mean "not given" where HF reads None as the default.
  bool given(StringRef key) const {
    const json::Value *v = get(key);
    return v && !v->getAsNull();
  }
  std::string name(StringRef key) const { return prefix + key.str(); }
  Fields nested(const json::Object &inner, StringRef key) const {
    return Fields(inner, source, name(key) + ".");
  }

  Error error(const Twine &msg) const {
    return llvm::createStringError(source + ": " + msg);
  }
  Error typeError(StringRef key, StringRef expected,
                  const json::Value &got) const {
    return error("field '" + name(key) + "' must be " + expected + ", got " +
                 kindName(got));
  }
  Error missing(StringRef key) const {
    return error("missing required field '" + name(key) + "'");
  }

  /// Absent keeps `out` (HF's default) unless `required`.
  Error readInt(StringRef key, int64_t &out, bool required = false) const {
    const json::Value *v = get(key);
    if (!v)
      return required ? missing(key) : Error::success();
    std::optional<int64_t> i = v->getAsInteger();
    if (!i)
      return typeError(key, "an integer", *v);
    out = *i;
    return Error::success();
  }
  /// For the fields whose None HF derives from others: absent keeps `out`
  /// (HF's default), null clears it.
  Error readNullableInt(StringRef key, std::optional<int64_t> &out) const {
    const json::Value *v = get(key);
    if (v && v->getAsNull()) {
      out.reset();
      return Error::success();
    }
    int64_t i = out.value_or(0);
    if (Error e = readInt(key, i))
      return e;
    if (v)
      out = i;
    return Error::success();
  }
  Error readNumber(StringRef key, double &out, bool required = false) const {
    const json::Value *v = get(key);
    if (!v)
      return required ? missing(key) : Error::success();
    std::optional<double> d = v->getAsNumber();
    if (!d)
      return typeError(key, "a number", *v);
    out = *d;
    return Error::success();
  }
  Error readBool(StringRef key, bool &out) const {
    const json::Value *v = get(key);
    if (!v)
      return Error::success();
    std::optional<bool> b = v->getAsBoolean();
    if (!b)
      return typeError(key, "a boolean", *v);
    out = *b;
    return Error::success();
  }
  /// A bool, or an integer read for its truthiness.
  Error readTruthy(StringRef key, bool &out) const {
    const json::Value *v = get(key);
    if (!v)
      return Error::success();
    if (std::optional<bool> b = v->getAsBoolean())
      out = *b;
    else if (std::optional<int64_t> i = v->getAsInteger())
      out = *i != 0;
    else
      return typeError(key, "a boolean or an integer", *v);
    return Error::success();
  }
  Error readString(StringRef key, std::optional<std::string> &out) const {
    const json::Value *v = get(key);
    if (!v)
      return Error::success();
    std::optional<StringRef> s = v->getAsString();
    if (!s)
      return typeError(key, "a string", *v);
    out = s->str();
    return Error::success();
  }
  /// Null or absent gives nullptr; anything but a list is an error.
  Error readList(StringRef key, const json::Array *&out) const {
    out = nullptr;
    if (!given(key))
      return Error::success();
    const json::Value *v = get(key);
    out = v->getAsArray();
    if (!out)
      return typeError(key, "a list", *v);
    return Error::success();
  }

  Error positive(StringRef key, int64_t v) const {
    if (v >= 1)
      return Error::success();
    return error("field '" + name(key) + "' must be positive, got " + Twine(v));
  }
  Error positive(StringRef key, double v) const {
    if (v > 0)
      return Error::success();
    return error("field '" + name(key) + "' must be positive, got " + show(v));
  }

private:
  const json::Object &obj;
  std::string source, prefix;
};

/// HF fields that only feed derivations, or whose None means something.
struct Pending {
  std::optional<int64_t> numKvHeads = 8, headDim = 128, chunkSize = 8192;
  int64_t moeStep = 1, noRopeInterval = 4;
};

Error checkUnsupported(const Fields &f) {
  std::optional<std::string> modelType, act;
  if (Error e = f.readString("model_type", modelType))
    return e;
  if (modelType && *modelType != "llama4_text" && *modelType != "llama4")
    return f.error("model_type: \"" + *modelType +
                   "\" is not supported (expected llama4_text or llama4)");
  if (Error e = f.readString("hidden_act", act))
    return e;
  if (act && *act != "silu")
    return f.error("hidden_act: \"" + *act +
                   "\" is not supported (Llama 4 uses silu)");
  bool bias = false;
  if (Error e = f.readBool("attention_bias", bias))
    return e;
  if (bias)
    return f.error("attention_bias: true is not supported (Llama 4 has no "
                   "projection biases)");
  // A quantized checkpoint (Maverick's FP8 release: quant_method
  // "fbgemm_fp8") stores fp8 weights with per-row scales and quantizes the
  // activations inside its matmuls: different math and different tensors.
  if (f.given("quantization_config")) {
    std::string method = "?";
    if (const json::Object *q = f.get("quantization_config")->getAsObject())
      if (std::optional<StringRef> m = q->getString("quant_method"))
        method = m->str();
    return f.error("field '" + f.name("quantization_config") +
                   "' (quant_method \"" + method +
                   "\") is not supported: l4c reads unquantized checkpoints "
                   "(bf16, f16 or f32 weights)");
  }
  return Error::success();
}

/// The integer fields, with HF's defaults where they may be omitted.
Error readSizes(const Fields &f, Llama4Config &c, Pending &p) {
  struct Required {
    const char *key;
    int64_t *out;
  } required[] = {{"vocab_size", &c.vocabSize},
                  {"hidden_size", &c.hiddenSize},
                  {"num_hidden_layers", &c.numLayers},
                  {"num_attention_heads", &c.numHeads},
                  {"intermediate_size", &c.intermediateSize},
                  {"num_local_experts", &c.numExperts}};
  for (const Required &r : required) {
    if (Error e = f.readInt(r.key, *r.out, /*required=*/true))
      return e;
    if (Error e = f.positive(r.key, *r.out))
      return e;
  }

  c.intermediateSizeMlp = 16384;
  c.topK = 1;
  c.maxPositionEmbeddings = 131072;
  struct Optional {
    const char *key;
    int64_t *out;
  } optional[] = {{"intermediate_size_mlp", &c.intermediateSizeMlp},
                  {"num_experts_per_tok", &c.topK},
                  {"max_position_embeddings", &c.maxPositionEmbeddings},
                  {"interleave_moe_layer_step", &p.moeStep},
                  {"no_rope_layer_interval", &p.noRopeInterval}};
  for (const Optional &o : optional) {
    if (Error e = f.readInt(o.key, *o.out))
      return e;
    if (Error e = f.positive(o.key, *o.out))
      return e;
  }
  if (c.topK > c.numExperts)
    return f.error("field 'num_experts_per_tok' must be in [1, " +
                   Twine(c.numExperts) + "] (num_local_experts), got " +
                   Twine(c.topK));

  // pad_token_id: only the embedding's gradient depends on it (padding_idx).
  // Absent or null: no padding row, as Llama4TextConfig's default in
  // transformers 5 (the goldens' configs save null). configToJson writes it
  // out, so older HF versions (default 200018) read the same value.
  c.padTokenId.reset();
  if (Error e = f.readNullableInt("pad_token_id", c.padTokenId))
    return e;
  if (c.padTokenId && (*c.padTokenId < 0 || *c.padTokenId >= c.vocabSize))
    return f.error("field 'pad_token_id' must be null or in [0, " +
                   Twine(c.vocabSize) + ") (vocab_size), got " +
                   Twine(*c.padTokenId));

  struct Nullable {
    const char *key;
    std::optional<int64_t> *out;
  } nullable[] = {{"num_key_value_heads", &p.numKvHeads},
                  {"head_dim", &p.headDim},
                  {"attention_chunk_size", &p.chunkSize}};
  for (const Nullable &n : nullable) {
    if (Error e = f.readNullableInt(n.key, *n.out))
      return e;
    if (*n.out)
      if (Error e = f.positive(n.key, **n.out))
        return e;
  }
  return Error::success();
}

Error readScalars(const Fields &f, Llama4Config &c) {
  c.rmsNormEps = 1e-5;
  c.floorScale = 8192;
  c.attnScale = 0.1;
  c.attentionDropout = 0.0;
  if (Error e = f.readNumber("rms_norm_eps", c.rmsNormEps))
    return e;
  if (Error e = f.positive("rms_norm_eps", c.rmsNormEps))
    return e;
  if (Error e = f.readNumber("floor_scale", c.floorScale))
    return e;
  if (Error e = f.positive("floor_scale", c.floorScale))
    return e;
  if (Error e = f.readNumber("attn_scale", c.attnScale))
    return e;
  if (Error e = f.readNumber("attention_dropout", c.attentionDropout))
    return e;
  if (c.attentionDropout < 0 || c.attentionDropout >= 1)
    return f.error("field 'attention_dropout' must be in [0, 1), got " +
                   show(c.attentionDropout));

  c.useQkNorm = true;
  c.attnTemperatureTuning = true;
  c.tieWordEmbeddings = false;
  if (Error e = f.readBool("use_qk_norm", c.useQkNorm))
    return e;
  if (Error e =
          f.readTruthy("attn_temperature_tuning", c.attnTemperatureTuning))
    return e;
  return f.readBool("tie_word_embeddings", c.tieWordEmbeddings);
}

/// __post_init__: num_key_value_heads and head_dim from None.
Error deriveHeads(const Fields &f, Llama4Config &c, const Pending &p) {
  c.numKvHeads = p.numKvHeads.value_or(c.numHeads);
  if (c.numHeads % c.numKvHeads != 0)
    return f.error("field 'num_attention_heads' (" + Twine(c.numHeads) +
                   ") must be a multiple of num_key_value_heads (" +
                   Twine(c.numKvHeads) + ")");
  c.headDim = p.headDim.value_or(c.hiddenSize / c.numHeads);
  if (c.headDim < 1)
    return f.error("field 'head_dim' derived as hidden_size // "
                   "num_attention_heads is 0");
  // RoPE rotates (2j, 2j+1) pairs, so every head needs whole pairs.
  if (c.headDim % 2 != 0)
    return f.error("field 'head_dim' must be even (RoPE rotates pairs), got " +
                   Twine(c.headDim));
  return Error::success();
}

Error readNoRopeLayers(const Fields &f, Llama4Config &c, const Pending &p) {
  const json::Array *list;
  if (Error e = f.readList("no_rope_layers", list))
    return e;
  c.ropeLayer.assign(c.numLayers, true);
  // HF: `no_rope_layers if no_rope_layers else default`, so [] also derives.
  if (!list || list->empty()) {
    for (int64_t i = 0; i < c.numLayers; ++i)
      c.ropeLayer[i] = (i + 1) % p.noRopeInterval != 0;
    return Error::success();
  }
  if (static_cast<int64_t>(list->size()) != c.numLayers)
    return f.error(
        "field 'no_rope_layers' has " + Twine(list->size()) +
        " entries, expected num_hidden_layers = " + Twine(c.numLayers));
  for (auto [i, v] : llvm::enumerate(*list)) {
    std::optional<int64_t> flag = v.getAsInteger();
    if (std::optional<bool> b = v.getAsBoolean())
      flag = *b;
    if (!flag || (*flag != 0 && *flag != 1))
      return f.error("field 'no_rope_layers' entry " + Twine(i) +
                     " must be 0 (NoPE) or 1 (RoPE), got " + show(v));
    c.ropeLayer[i] = *flag == 1;
  }
  return Error::success();
}

Error readMoeLayers(const Fields &f, Llama4Config &c, const Pending &p) {
  const json::Array *list;
  if (Error e = f.readList("moe_layers", list))
    return e;
  c.moeLayer.assign(c.numLayers, false);
  if (!list) {
    for (int64_t i = p.moeStep - 1; i < c.numLayers; i += p.moeStep)
      c.moeLayer[i] = true;
    return Error::success();
  }
  for (const json::Value &v : *list) {
    std::optional<int64_t> layer = v.getAsInteger();
    if (!layer || *layer < 0 || *layer >= c.numLayers)
      return f.error("field 'moe_layers' entry " + show(v) +
                     " is not a layer index in [0, " + Twine(c.numLayers) +
                     ")");
    if (c.moeLayer[*layer])
      return f.error("field 'moe_layers' lists layer " + Twine(*layer) +
                     " twice");
    c.moeLayer[*layer] = true;
  }
  return Error::success();
}

Error readLayerTypes(const Fields &f, Llama4Config &c, const Pending &p) {
  const json::Array *list;
  if (Error e = f.readList("layer_types", list))
    return e;
  c.chunkedLayer = c.ropeLayer;
  if (list) {
    if (static_cast<int64_t>(list->size()) != c.numLayers)
      return f.error(
          "field 'layer_types' has " + Twine(list->size()) +
          " entries, expected num_hidden_layers = " + Twine(c.numLayers));
    for (auto [i, v] : llvm::enumerate(*list)) {
      std::optional<StringRef> type = v.getAsString();
      if (type != "chunked_attention" && type != "full_attention")
        return f.error("field 'layer_types' entry " + Twine(i) + " is " +
                       show(v) +
                       ", expected \"chunked_attention\" or "
                       "\"full_attention\"");
      c.chunkedLayer[i] = *type == "chunked_attention";
    }
  }
  // attention_chunk_size may be None in HF; that only works without chunks.
  c.attentionChunkSize = p.chunkSize.value_or(0);
  if (!p.chunkSize)
    for (int64_t i = 0; i < c.numLayers; ++i)
      if (c.chunkedLayer[i])
        return f.error("field 'attention_chunk_size' is null but layer " +
                       Twine(i) + " uses chunked_attention");
  return Error::success();
}

/// The rope dict HF ends up with after convert_rope_params_to_dict: a legacy
/// rope_scaling wins over rope_parameters when it is non-empty.
Error findRopeDict(const Fields &f, const json::Object *&dict,
                   StringRef &dictKey) {
  dict = nullptr;
  for (StringRef key : {"rope_scaling", "rope_parameters"}) {
    if (!f.given(key))
      continue;
    const json::Value *v = f.get(key);
    const json::Object *obj = v->getAsObject();
    if (!obj)
      return f.typeError(key, "an object", *v);
    if (obj->empty())
      continue;
    dict = obj;
    dictKey = key;
    return Error::success();
  }
  return Error::success();
}

/// HF rotates int(head_dim * partial_rotary_factor) dims; Llama 4 all of them.
/// The top-level value and the rope dict's are checked apart, since HF lets the
/// top-level one win.
Error checkFullRotary(const Fields &f) {
  if (!f.given("partial_rotary_factor"))
    return Error::success();
  double partial = 1.0;
  if (Error e = f.readNumber("partial_rotary_factor", partial))
    return e;
  if (partial == 1.0)
    return Error::success();
  return f.error(f.name("partial_rotary_factor") + ": " + show(partial) +
                 " is not supported (Llama 4 rotates the whole head)");
}

Error readRope(const Fields &f, Llama4Config &c) {
  RopeConfig &r = c.rope;
  r = RopeConfig();
  if (Error e = f.readNumber("rope_theta", r.theta))
    return e;
  if (Error e = checkFullRotary(f))
    return e;

  const json::Object *dict;
  StringRef dictKey;
  if (Error e = findRopeDict(f, dict, dictKey))
    return e;
  if (dict) {
    Fields d = f.nested(*dict, dictKey);
    for (StringRef layerType : {"chunked_attention", "full_attention"})
      if (dict->get(layerType))
        return d.error("field '" + d.name(layerType) +
                       "': per-layer-type RoPE parameters are not supported");
    if (Error e = d.readNumber("rope_theta", r.theta))
      return e;
    if (Error e = checkFullRotary(d))
      return e;
    StringRef typeKey = dict->get("rope_type") ? "rope_type" : "type";
    std::optional<std::string> type;
    if (Error e = d.readString(typeKey, type))
      return e;
    r.type = type.value_or("default");
    if (r.type != "default" && r.type != "llama3")
      return d.error(d.name(typeKey) + ": \"" + r.type +
                     "\" is not supported (expected default or llama3)");
    if (r.type == "llama3") {
      for (auto [key, out] :
           {std::pair<StringRef, double *>{"factor", &r.factor},
            {"low_freq_factor", &r.lowFreqFactor},
            {"high_freq_factor", &r.highFreqFactor}}) {
        if (Error e = d.readNumber(key, *out, /*required=*/true))
          return e;
        if (Error e = d.positive(key, *out))
          return e;
      }
      // standardize_rope_params would let a top-level value win (its Phi-3
      // exception) or ignore it, depending on when the attribute exists.
      if (f.given("original_max_position_embeddings"))
        return f.error("field 'original_max_position_embeddings' at the top "
                       "level is not supported (give it in " +
                       dictKey + ")");
      r.originalMaxPositionEmbeddings = c.maxPositionEmbeddings;
      if (Error e = d.readInt("original_max_position_embeddings",
                              r.originalMaxPositionEmbeddings))
        return e;
      if (Error e = d.positive("original_max_position_embeddings",
                               r.originalMaxPositionEmbeddings))
        return e;
    }
  }
  return f.positive("rope_theta", r.theta);
}

Expected<Llama4Config> parseTextConfig(const Fields &f, StringRef source) {
  Llama4Config c;
  c.source = source.str();
  Pending p;
  if (Error e = checkUnsupported(f))
    return std::move(e);
  if (Error e = readSizes(f, c, p))
    return std::move(e);
  if (Error e = readScalars(f, c))
    return std::move(e);
  if (Error e = deriveHeads(f, c, p))
    return std::move(e);
  if (Error e = readNoRopeLayers(f, c, p))
    return std::move(e);
  if (Error e = readMoeLayers(f, c, p))
    return std::move(e);
  if (Error e = readLayerTypes(f, c, p))
    return std::move(e);
  if (Error e = readRope(f, c))
    return std::move(e);
  return c;
}

} // namespace

Expected<Llama4Config> l4c::parseConfigJson(StringRef json, StringRef source) {
  Expected<json::Value> parsed = json::parse(json);
  if (!parsed)
    return llvm::createStringError(
        source + ": invalid JSON: " + llvm::toString(parsed.takeError()));
  const json::Object *top = parsed->getAsObject();
  if (!top)
    return llvm::createStringError(source + ": expected a JSON object, got " +
                                   kindName(*parsed));
  Fields topFields(*top, source);
  const json::Value *text = top->get("text_config");
  if (!text)
    return parseTextConfig(topFields, source);

  // A multimodal Llama4Config: only the text model matters here.
  if (Error e = checkUnsupported(topFields))
    return std::move(e);
  const json::Object *textObj = text->getAsObject();
  if (!textObj)
    return topFields.typeError("text_config", "an object", *text);
  std::string textSource = (source + " (text_config)").str();
  Fields textFields(*textObj, textSource);
  Expected<Llama4Config> c = parseTextConfig(textFields, source);
  if (!c)
    return c.takeError();
  // Which of the two flags HF ties by differs across versions; both are false
  // in every release, so only a disagreement is ambiguous.
  bool topTie = c->tieWordEmbeddings;
  if (Error e = topFields.readBool("tie_word_embeddings", topTie))
    return std::move(e);
  if (topTie != c->tieWordEmbeddings)
    return topFields.error("field 'tie_word_embeddings' differs between the "
                           "top level and text_config");
  return c;
}

Expected<Llama4Config> l4c::loadConfigFile(StringRef path) {
  llvm::SmallString<256> file(path);
  if (llvm::sys::fs::is_directory(file))
    llvm::sys::path::append(file, "config.json");
  llvm::ErrorOr<std::unique_ptr<llvm::MemoryBuffer>> buffer =
      llvm::MemoryBuffer::getFile(file, /*IsText=*/true);
  if (!buffer)
    return llvm::createStringError(
        buffer.getError(),
        Twine(file) + ": cannot read config: " + buffer.getError().message());
  return parseConfigJson((*buffer)->getBuffer(), file);
}

//===----------------------------------------------------------------------===//
// Presets
//===----------------------------------------------------------------------===//

namespace {

struct Preset {
  const char *name;
  const char *json;
};

// Scout and Maverick: the text_config of the released checkpoints (spec §1).
// Scout stores attn_temperature_tuning as the integer 4, as released.
const Preset kPresets[] = {
    {"llama4-scout", R"({
  "model_type": "llama4_text",
  "vocab_size": 202048, "hidden_size": 5120, "num_hidden_layers": 48,
  "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
  "intermediate_size": 8192, "intermediate_size_mlp": 16384,
  "num_local_experts": 16, "num_experts_per_tok": 1,
  "interleave_moe_layer_step": 1, "no_rope_layer_interval": 4,
  "attention_chunk_size": 8192, "use_qk_norm": true,
  "attn_temperature_tuning": 4, "floor_scale": 8192, "attn_scale": 0.1,
  "rms_norm_eps": 1e-05, "max_position_embeddings": 10485760,
  "rope_theta": 500000.0,
  "rope_scaling": {"rope_type": "llama3", "factor": 16.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                   "original_max_position_embeddings": 8192},
  "tie_word_embeddings": false
})"},
    {"llama4-maverick", R"({
  "model_type": "llama4_text",
  "vocab_size": 202048, "hidden_size": 5120, "num_hidden_layers": 48,
  "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
  "intermediate_size": 8192, "intermediate_size_mlp": 16384,
  "num_local_experts": 128, "num_experts_per_tok": 1,
  "interleave_moe_layer_step": 2, "no_rope_layer_interval": 4,
  "attention_chunk_size": 8192, "use_qk_norm": false,
  "attn_temperature_tuning": true, "floor_scale": 8192, "attn_scale": 0.1,
  "rms_norm_eps": 1e-05, "max_position_embeddings": 1048576,
  "rope_theta": 500000.0, "rope_scaling": null,
  "tie_word_embeddings": false
})"},
    // A byte-vocabulary demo with dense and MoE layers, NoPE at layer 3, and
    // llama3 rope whose 1/4 factors put pairs 2..4 on the smooth branch.
    {"llama4-tiny", R"({
  "model_type": "llama4_text",
  "vocab_size": 256, "hidden_size": 128, "num_hidden_layers": 4,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
  "intermediate_size": 128, "intermediate_size_mlp": 256,
  "num_local_experts": 4, "num_experts_per_tok": 1,
  "interleave_moe_layer_step": 2, "no_rope_layer_interval": 4,
  "attention_chunk_size": 64, "use_qk_norm": true,
  "attn_temperature_tuning": true, "floor_scale": 32, "attn_scale": 0.1,
  "rms_norm_eps": 1e-05, "max_position_embeddings": 1024,
  "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0,
                      "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
  "tie_word_embeddings": false
})"},
};

} // namespace

std::vector<std::string> l4c::presetNames() {
  std::vector<std::string> names;
  for (const Preset &p : kPresets)
    names.push_back(p.name);
  return names;
}

Expected<Llama4Config> l4c::presetConfig(StringRef name) {
  for (const Preset &p : kPresets)
    if (name == p.name)
      return parseConfigJson(p.json, ("preset:" + name).str());
  return llvm::createStringError("unknown preset '" + name + "' (valid: " +
                                 llvm::join(presetNames(), ", ") + ")");
}

//===----------------------------------------------------------------------===//
// Parameters and counts
//===----------------------------------------------------------------------===//

int64_t ParamSpec::numel() const {
  int64_t n = 1;
  for (int64_t d : shape)
    n *= d;
  return n;
}

std::vector<ParamSpec> l4c::parameterList(const Llama4Config &c) {
  const int64_t D = c.hiddenSize, H = c.numHeads, Hkv = c.numKvHeads,
                d = c.headDim, E = c.numExperts, I = c.intermediateSize,
                Imlp = c.intermediateSizeMlp;
  std::vector<ParamSpec> params;
  params.push_back({"model.embed_tokens.weight", {c.vocabSize, D}});
  for (int64_t i = 0; i < c.numLayers; ++i) {
    std::string l = "model.layers." + std::to_string(i) + ".";
    auto add = [&](StringRef name, std::vector<int64_t> shape) {
      params.push_back({l + name.str(), std::move(shape)});
    };
    add("self_attn.q_proj.weight", {H * d, D});
    add("self_attn.k_proj.weight", {Hkv * d, D});
    add("self_attn.v_proj.weight", {Hkv * d, D});
    add("self_attn.o_proj.weight", {D, H * d});
    if (c.isMoe(i)) {
      add("feed_forward.experts.gate_up_proj", {E, D, 2 * I});
      add("feed_forward.experts.down_proj", {E, I, D});
      add("feed_forward.router.weight", {E, D});
      add("feed_forward.shared_expert.gate_proj.weight", {I, D});
      add("feed_forward.shared_expert.up_proj.weight", {I, D});
      add("feed_forward.shared_expert.down_proj.weight", {D, I});
    } else {
      add("feed_forward.gate_proj.weight", {Imlp, D});
      add("feed_forward.up_proj.weight", {Imlp, D});
      add("feed_forward.down_proj.weight", {D, Imlp});
    }
    add("input_layernorm.weight", {D});
    add("post_attention_layernorm.weight", {D});
  }
  params.push_back({"model.norm.weight", {D}});
  if (!c.tieWordEmbeddings)
    params.push_back({"lm_head.weight", {c.vocabSize, D}});
  return params;
}

ModelCounts l4c::countModel(const Llama4Config &c, int64_t ctx) {
  ModelCounts counts;
  for (const ParamSpec &p : parameterList(c))
    counts.totalParams += p.numel();

  const int64_t D = c.hiddenSize, embed = c.vocabSize * D;
  // Routed experts a token skips: E - k of them, each 3*D*I (gate, up, down).
  int64_t idleExperts = 0;
  for (int64_t i = 0; i < c.numLayers; ++i)
    if (c.isMoe(i))
      idleExperts += 3 * D * c.intermediateSize * (c.numExperts - c.topK);
  // Untied: drop the embedding table. Tied: the shared matrix stays, as head.
  counts.activeParams =
      counts.totalParams - idleExperts - (c.tieWordEmbeddings ? 0 : embed);

  const int64_t normParams = (2 * c.numLayers + 1) * D;
  double flops = 2.0 * static_cast<double>(counts.activeParams - normParams);
  for (int64_t i = 0; i < c.numLayers; ++i) {
    int64_t keys = c.isChunked(i) ? std::min(ctx, c.attentionChunkSize) : ctx;
    flops += 2.0 * 2.0 * static_cast<double>(c.numHeads * c.headDim) *
             static_cast<double>(keys);
  }
  counts.forwardFlopsPerToken = flops;
  counts.trainFlopsPerToken = 3.0 * flops;
  return counts;
}

std::string l4c::configToJson(const Llama4Config &c) {
  json::Array moe, noRope, types;
  for (int64_t i = 0; i < c.numLayers; ++i) {
    if (c.isMoe(i))
      moe.push_back(i);
    noRope.push_back(c.usesRope(i) ? 1 : 0);
    types.push_back(c.isChunked(i) ? "chunked_attention" : "full_attention");
  }
  json::Object rope{{"rope_theta", c.rope.theta}, {"rope_type", c.rope.type}};
  if (c.rope.type == "llama3") {
    rope["factor"] = c.rope.factor;
    rope["low_freq_factor"] = c.rope.lowFreqFactor;
    rope["high_freq_factor"] = c.rope.highFreqFactor;
    rope["original_max_position_embeddings"] =
        c.rope.originalMaxPositionEmbeddings;
  }
  json::Object o{
      {"architectures", json::Array{"Llama4ForCausalLM"}},
      {"model_type", "llama4_text"},
      {"vocab_size", c.vocabSize},
      {"hidden_size", c.hiddenSize},
      {"num_hidden_layers", c.numLayers},
      {"num_attention_heads", c.numHeads},
      {"num_key_value_heads", c.numKvHeads},
      {"head_dim", c.headDim},
      {"intermediate_size", c.intermediateSize},
      {"intermediate_size_mlp", c.intermediateSizeMlp},
      {"num_local_experts", c.numExperts},
      {"num_experts_per_tok", c.topK},
      {"hidden_act", "silu"},
      {"rms_norm_eps", c.rmsNormEps},
      {"attention_chunk_size", c.attentionChunkSize},
      {"use_qk_norm", c.useQkNorm},
      {"attn_temperature_tuning", c.attnTemperatureTuning},
      {"floor_scale", c.floorScale},
      {"attn_scale", c.attnScale},
      {"attention_bias", false},
      {"attention_dropout", c.attentionDropout},
      {"tie_word_embeddings", c.tieWordEmbeddings},
      {"pad_token_id", c.padTokenId ? json::Value(*c.padTokenId)
                                     : json::Value(nullptr)},
      {"max_position_embeddings", c.maxPositionEmbeddings},
      {"moe_layers", std::move(moe)},
      {"no_rope_layers", std::move(noRope)},
      {"layer_types", std::move(types)},
      {"rope_parameters", std::move(rope)},
      {"dtype", "float32"},
  };
  return llvm::formatv("{0:2}", json::Value(std::move(o))).str();
}
