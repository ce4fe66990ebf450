//===- Config.h - Llama 4 text config ------------------------------------===//
//
// The math-affecting fields of a Hugging Face Llama4TextConfig, after HF's
// derivations (__post_init__, standardize_rope_params), plus the built-in
// presets and the counting used by `l4c explain`.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_IMPORT_CONFIG_H
#define L4C_IMPORT_CONFIG_H

#include "llvm/ADT/StringRef.h"
#include "llvm/Support/Error.h"
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace l4c {

struct RopeConfig {
  double theta = 500000.0;
  /// "default" or "llama3".
  std::string type = "default";
  double factor = 1.0, lowFreqFactor = 1.0, highFreqFactor = 1.0;
  int64_t originalMaxPositionEmbeddings = 0;
};

struct Llama4Config {
  int64_t vocabSize = 0, hiddenSize = 0, numLayers = 0;
  int64_t numHeads = 0, numKvHeads = 0, headDim = 0;
  int64_t intermediateSize = 0, intermediateSizeMlp = 0;
  int64_t numExperts = 0, topK = 1;
  double rmsNormEps = 1e-5;
  int64_t attentionChunkSize = 8192;
  bool useQkNorm = true;
  bool attnTemperatureTuning = true;
  double floorScale = 8192, attnScale = 0.1;
  bool tieWordEmbeddings = false;
  int64_t maxPositionEmbeddings = 131072;
  /// HF's attention_dropout: no effect at inference; recorded so that a
  /// training compile can reject a non-zero value.
  double attentionDropout = 0.0;
  /// HF's pad_token_id: embed_tokens is nn.Embedding(V, D, padding_idx=it),
  /// so the forward lookup is unchanged but that row gets no gradient from
  /// the lookup. Absent or null: none. When set, in [0, vocabSize).
  std::optional<int64_t> padTokenId;
  RopeConfig rope;
  /// Per layer, after derivation: true = MoE feed-forward, false = dense MLP.
  std::vector<bool> moeLayer;
  /// Per layer, from no_rope_layers: true = the layer applies RoPE.
  std::vector<bool> ropeLayer;
  /// Per layer, from layer_types: true = "chunked_attention" (local mask of
  /// attentionChunkSize), false = "full_attention". HF derives it from
  /// no_rope_layers but honours an explicit list as given.
  std::vector<bool> chunkedLayer;
  /// Where the config came from (a path or "preset:<name>"), for messages.
  std::string source;

  bool isMoe(int64_t layer) const { return moeLayer[layer]; }
  bool usesRope(int64_t layer) const { return ropeLayer[layer]; }
  bool isChunked(int64_t layer) const { return chunkedLayer[layer]; }
  /// QK norm exists only on RoPE layers.
  bool hasQkNorm(int64_t layer) const { return useQkNorm && ropeLayer[layer]; }
  bool hasTemperature(int64_t layer) const {
    return attnTemperatureTuning && !ropeLayer[layer];
  }
};

/// Parses a config.json text (a Llama4TextConfig, or a Llama4Config whose
/// `text_config` holds one). Applies HF's defaults and derivations, and rejects
/// any value the compiler cannot honour with an error naming the field.
llvm::Expected<Llama4Config> parseConfigJson(llvm::StringRef json,
                                             llvm::StringRef source);
/// Reads `path` (a config.json file, or a directory holding one).
llvm::Expected<Llama4Config> loadConfigFile(llvm::StringRef path);

/// Built-in presets: llama4-scout, llama4-maverick, llama4-tiny.
llvm::Expected<Llama4Config> presetConfig(llvm::StringRef name);
std::vector<std::string> presetNames();
/// The preset `make run` uses.
constexpr const char *kDefaultPreset = "llama4-tiny";

/// The config as a Hugging Face config.json (model_type llama4_text) with
/// every derived field written out, so parseConfigJson(configToJson(c))
/// gives back c and transformers' Llama4ForCausalLM loads it.
std::string configToJson(const Llama4Config &c);

/// One parameter tensor of Llama4ForCausalLM, by HF name.
struct ParamSpec {
  std::string name;
  std::vector<int64_t> shape;
  int64_t numel() const;
};
/// Every parameter in HF's order (embed, layers, norm, lm_head unless tied).
std::vector<ParamSpec> parameterList(const Llama4Config &c);

struct ModelCounts {
  int64_t totalParams = 0;
  /// Parameters a token touches, excluding the embedding table (as in the
  /// spec): attention, norms, shared expert, top-k routed experts, router,
  /// dense MLPs and the lm_head. With tied embeddings the shared matrix is
  /// counted once, as the head.
  int64_t activeParams = 0;
  /// Forward FLOPs per token at context length `ctx`, 2 per multiply-add:
  ///   2 * (activeParams minus the RMSNorm weights)   every active matmul,
  ///                                                   router and lm_head too
  ///   + sum over layers of 2 * 2 * H * d * keys      q.k^T scores and P.V
  /// where keys = min(ctx, attentionChunkSize) on chunked layers and ctx on
  /// full layers, i.e. the keys seen by the last token of a ctx-long window
  /// (an upper bound, not an average over positions). Norms, RoPE, softmax,
  /// SwiGLU and residual adds are not counted. Training = 3x forward.
  double forwardFlopsPerToken = 0, trainFlopsPerToken = 0;
};
ModelCounts countModel(const Llama4Config &c, int64_t ctx);

} // namespace l4c

#endif // L4C_IMPORT_CONFIG_H
