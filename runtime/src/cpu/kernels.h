//===- kernels.h - math kernels of the CPU reference backend -------------===//
//
// The f32 building blocks that the CPU backend composes to execute a plan's
// semantic op list: GEMMs, norms, RoPE, attention, MoE routing and experts.
// Each follows Hugging Face Llama4ForCausalLM (see spec/llama4.md).
//
//===----------------------------------------------------------------------===//
#ifndef L4C_RUNTIME_CPU_KERNELS_H
#define L4C_RUNTIME_CPU_KERNELS_H

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

namespace l4c::cpu {

/// Threads used by the parallel kernels (hardware_concurrency, or
/// L4C_NUM_THREADS when set).
unsigned numThreads();

/// out[i, :] = table[ids[i], :]. The caller has checked 0 <= ids[i] < V.
void embedding(const float *table, size_t D, const int64_t *ids, size_t n,
               float *out);

/// y = x * rsqrt(mean(x^2) + eps) * weight per row of D. weight == nullptr is
/// the weightless QK norm (Llama4TextL2Norm, which divides by the RMS).
/// out == x is allowed.
void rmsNorm(const float *x, const float *weight, size_t rows, size_t D,
             float eps, float *out);

/// y[M,N] (+)= x[M,K] @ w^T with w[N,K] in nn.Linear layout (row strides ldx,
/// ldw, ldy, in elements). accumulate adds to y instead of overwriting it.
void linear(const float *x, size_t ldx, const float *w, size_t ldw, float *y,
            size_t ldy, size_t M, size_t N, size_t K, bool accumulate = false);

/// y[M,N] (+)= x[M,K] @ w with w[K,N] input-major (HF expert weights).
void matmul(const float *x, size_t ldx, const float *w, size_t ldw, float *y,
            size_t ldy, size_t M, size_t N, size_t K, bool accumulate = false);

/// HF's fp32 inverse frequencies (spec 2.4): invFreq[headDim / 2].
/// ropeType is "default" or "llama3"; the llama3 fields are ignored otherwise.
/// Returns false for an unknown ropeType.
bool ropeInvFreq(double theta, size_t headDim, std::string_view ropeType,
                 double factor, double lowFreqFactor, double highFreqFactor,
                 double originalMaxPos, float *invFreq);

/// Rotates interleaved pairs (2j, 2j+1) of every head in place by
/// angle = fp32(invFreq[j] * fp32(pos[t])). x is [tokens, heads, d] with row
/// stride ldx between tokens.
void rope(float *x, size_t ldx, size_t tokens, size_t heads, size_t d,
          const int64_t *pos, const float *invFreq);

/// q[t, :width] *= log1p(floor((pos[t] + 1) / floorScale)) * attnScale + 1,
/// in fp32 (NoPE-layer temperature tuning; pos are absolute cache positions).
void temperatureScale(float *q, size_t ldq, size_t tokens, size_t width,
                      const int64_t *pos, float floorScale, float attnScale);

/// Causal GQA attention for the queries of one sequence.
/// q[Tq, H, d] (row stride ldq) at absolute positions qpos; k, v [>= kvLen,
/// Hkv, d] (row strides ldk, ldv, e.g. into a [maxSeq, Hkv, d] cache).
/// Query (t, h) reads kv head h / (H / Hkv) and keys kv < kvLen with
/// kv <= qpos[t], and, when chunk > 0, kv / chunk == qpos[t] / chunk.
/// out[Tq, H, d] (row stride ldo); a row with no visible key gets zeros.
void attention(const float *q, size_t ldq, const int64_t *qpos, size_t Tq,
               const float *k, size_t ldk, const float *v, size_t ldv,
               size_t kvLen, size_t H, size_t Hkv, size_t d, int64_t chunk,
               float scale, float *out, size_t ldo);

/// scores[t, e] = sigmoid(logits[t, e]) for the topK largest logits of row t
/// (ties go to the lower index, as torch.topk on CPU), 0 elsewhere.
void routerScores(const float *logits, size_t T, size_t E, size_t topK,
                  float *scores);

/// out[rows, cols] = up * silu(gate), with row strides so that gate and up may
/// be the two halves of one [rows, 2I] buffer. out may alias gate or up.
void swiglu(const float *gate, size_t ldg, const float *up, size_t ldu,
            size_t rows, size_t cols, float *out, size_t ldo);

/// Routed experts: out[T, D] (+)= sum_e swiglu((x * scores[:, e]) @ gateUp[e])
/// @ down[e], with gateUp [E, D, 2I] (gate = first I columns) and
/// down [E, I, D]. Only tokens with a nonzero score run through expert e.
void expertsForward(const float *x, const float *scores, const float *gateUp,
                    const float *down, size_t T, size_t D, size_t I, size_t E,
                    float *out, bool accumulate = false);

/// Expert e's (token, slot) pairs over T tokens (scores [T, E]): the tokens
/// with a nonzero score for e, in order, and how many experts before e each
/// of them uses. False when a slot would be K or more.
bool expertSlots(const float *scores, size_t T, size_t E, size_t e, size_t K,
                 std::vector<size_t> &tokens, std::vector<size_t> &slots);

/// fn(e, tokens, slots) for each expert with tokens, in increasing order
/// (expertSlots' lists); false when a token has more than K experts.
template <typename F>
bool forEachExpert(const float *scores, size_t T, size_t E, size_t K, F &&fn) {
  std::vector<size_t> tokens, slots;
  for (size_t e = 0; e < E; ++e) {
    if (!expertSlots(scores, T, E, e, K, tokens, slots))
      return false;
    if (!tokens.empty())
      fn(e, tokens, slots);
  }
  return true;
}

/// l4.moe_route: `table` (n entries) gets E + 1 offsets, then for each
/// expert in order the entries m * K + k of the tokens m < M (in order)
/// whose k-th nonzero score, k < K, is expert e's; -1 after the last.
/// Fails (returns false) when a token has more than K nonzero scores.
bool expertsRoute(const float *scores, size_t M, size_t E, size_t K,
                  int32_t *table, size_t n);

/// The halves of expertsForward (l4.moe_hidden, l4.moe_down). h is
/// [T, K, I]: slot k of token t holds the SwiGLU activations of its k-th
/// expert with a nonzero score, zeros after its last. expertsHidden fails
/// (returns false) when a token has more than K such experts.
bool expertsHidden(const float *x, const float *scores, const float *gateUp,
                   size_t T, size_t D, size_t I, size_t E, size_t K, float *h);
bool expertsDown(const float *h, const float *scores, const float *down,
                 size_t T, size_t D, size_t I, size_t E, size_t K, float *out);

/// out[i] = a[i] + b[i]; out may alias a or b.
void add(const float *a, const float *b, size_t n, float *out);

/// out[r] = index of the largest logit of row r (lowest index on ties; a NaN
/// counts as the largest, like torch.argmax).
void argmaxRows(const float *logits, size_t rows, size_t V, int64_t *out);

} // namespace l4c::cpu

#endif // L4C_RUNTIME_CPU_KERNELS_H
