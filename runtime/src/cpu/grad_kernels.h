//===- grad_kernels.h - backward, loss and optimizer kernels (CPU) -------===//
//
// The f32 kernels behind the training semantic ops that l4c-autodiff emits:
// the next-token loss, the vector-Jacobian product of every forward kernel in
// kernels.h, and torch.optim.AdamW's update (see spec/llama4.md, sections 2-5).
//
//===----------------------------------------------------------------------===//
#ifndef L4C_RUNTIME_CPU_GRAD_KERNELS_H
#define L4C_RUNTIME_CPU_GRAD_KERNELS_H

#include <cstddef>
#include <cstdint>

namespace l4c::cpu {

// Conventions shared by the kernels below:
// - Arguments are laid out as in the matching forward kernel; a `d` prefix
//   names a gradient (dy is the gradient of the forward's output).
// - `accumulate` adds every gradient output the comment names to the
//   buffer's contents instead of overwriting it. Weight gradients are summed
//   over token rows in double (f32 partial sums over at most 256 rows).
// - temperatureScale multiplies each position by a scalar, so it is its own
//   adjoint: apply it to dq with the same positions. No kernel here.

/// torch's ignore_index: a label with this value takes no part in the loss.
constexpr int64_t kIgnoreIndex = -100;

/// Number of labelled positions: (b < B, t < T - 1) with ids[b * S + t + 1]
/// != kIgnoreIndex.
size_t crossEntropyCount(const int64_t *ids, size_t B, size_t T, size_t S);

/// Mean next-token cross entropy (HF's shift): the logits of row (b, t) at
/// logits + (b * S + t) * ldl predict ids[b * S + t + 1], for t < T - 1; the
/// mean is over labelled positions (NaN when there are none, as torch). The
/// caller has checked that labels are kIgnoreIndex or in [0, V).
float crossEntropy(const float *logits, size_t ldl, const int64_t *ids,
                   size_t B, size_t T, size_t S, size_t V);

/// dlogits (row stride lddl, all B * S rows written) = (softmax - onehot) *
/// dloss / count on labelled positions, 0 on the others. dlogits may be
/// logits itself (with lddl == ldl), which saves a [B, S, V] buffer.
void crossEntropyGrad(const float *logits, size_t ldl, const int64_t *ids,
                      size_t B, size_t T, size_t S, size_t V, float dloss,
                      float *dlogits, size_t lddl);

/// One chunk of l4c-chunk-loss's statistics chain. The logits rows (stride
/// ldl) hold the n vocabulary columns [offset, offset + n). For each row
/// (b, t < T) writes stats[(b * S + t) * 2 + {0, 1}]: the log-sum-exp over
/// these columns and, when `prev` is given (same layout), those it
/// summarises; and the label's logit when the label lies in these columns
/// (else prev's, or 0). Unlabelled rows get zeros.
void crossEntropyStats(const float *logits, size_t ldl, const int64_t *ids,
                       size_t B, size_t T, size_t S, size_t n, size_t offset,
                       const float *prev, float *stats);

/// The mean cross entropy from a chain's last statistics: the mean over
/// labelled rows of lse - label logit (NaN when there are none).
float crossEntropyFromStats(const float *stats, const int64_t *ids, size_t B,
                            size_t T, size_t S);

/// crossEntropyGrad for the n columns [offset, offset + n) of the logits,
/// normalised by the full log-sum-exp in stats; dlogits may be logits.
void crossEntropyGradChunk(const float *logits, size_t ldl, const int64_t *ids,
                           size_t B, size_t T, size_t S, size_t n,
                           size_t offset, const float *stats, float *dlogits,
                           size_t lddl);

/// For y[M,N] = x[M,K] @ w^T, w[N,K]: dx[M,K] (+)= dy @ w.
void linearGradInput(const float *dy, size_t lddy, const float *w, size_t ldw,
                     float *dx, size_t lddx, size_t M, size_t N, size_t K,
                     bool accumulate = false);

/// For y[M,N] = x[M,K] @ w^T: dw[N,K] (+)= dy^T @ x, summed over the M rows.
void linearGradWeight(const float *x, size_t ldx, const float *dy, size_t lddy,
                      float *dw, size_t lddw, size_t M, size_t N, size_t K,
                      bool accumulate = false);

/// For y = rmsNorm(x, w): dx [rows, D] and dw [D] (summed over rows; nullptr
/// when w is nullptr, the weightless QK norm). accumulate: dx and dw. dx must
/// not alias x or dy.
void rmsNormGrad(const float *x, const float *w, const float *dy, size_t rows,
                 size_t D, float eps, float *dx, float *dw,
                 bool accumulate = false);

/// The adjoint of rope (and its inverse): rotates the same interleaved pairs
/// by the negated fp32 angle, in place.
void ropeInverse(float *x, size_t ldx, size_t tokens, size_t heads, size_t d,
                 const int64_t *pos, const float *invFreq);

/// Gradients of attention() with the same arguments. The softmax is
/// recomputed. dq [Tq, H, d] (row stride lddq; rows with no visible key get
/// zeros); dk, dv [kvLen, Hkv, d] (row strides lddk, lddv), summed over the
/// query heads of each GQA group: rows below kvLen are overwritten, rows at
/// or above it are not touched (those keys are never read).
void attentionGrad(const float *q, size_t ldq, const int64_t *qpos, size_t Tq,
                   const float *k, size_t ldk, const float *v, size_t ldv,
                   size_t kvLen, size_t H, size_t Hkv, size_t d, int64_t chunk,
                   float scale, const float *dout, size_t lddo, float *dq,
                   size_t lddq, float *dk, size_t lddk, float *dv, size_t lddv);

/// For scores = routerScores(logits, topK): dlogits[t, e] = dscores[t, e] *
/// s * (1 - s), s = sigmoid(logit), for the selected experts (the same
/// selection and tie-breaking as the forward), 0 for the others.
void routerScoresGrad(const float *logits, size_t T, size_t E, size_t topK,
                      const float *dscores, float *dlogits);

/// For out = up * silu(gate) per element, with row strides as swiglu().
void swigluGrad(const float *gate, size_t ldg, const float *up, size_t ldu,
                const float *dy, size_t lddy, size_t rows, size_t cols,
                float *dgate, size_t lddg, float *dup, size_t lddu);

/// Contiguous form of the above over n elements.
inline void swigluGrad(const float *gate, const float *up, const float *dy,
                       size_t n, float *dgate, float *dup) {
  swigluGrad(gate, n, up, n, dy, n, 1, n, dgate, n, dup, n);
}

/// Gradients of expertsForward(x, scores, gateUp, down, T, D, I, E) for the
/// output gradient dy [T, D]: dx [T, D], dscores [T, E] (always overwritten;
/// dscores[t, e] = <x[t], d(x[t] * score)>, 0 where the score is 0),
/// dGateUp [E, D, 2I], dDown [E, I, D]. accumulate: dx, dGateUp, dDown.
void expertsBackward(const float *x, const float *scores, const float *gateUp,
                     const float *down, size_t T, size_t D, size_t I, size_t E,
                     const float *dy, float *dx, float *dscores, float *dGateUp,
                     float *dDown, bool accumulate = false);

/// The parts l4c-split-experts makes of expertsBackward, over T tokens
/// (scores [T, E]) with K slots each: per-slot rows are [T, K, W], slot k
/// of a token holding its k-th expert with a nonzero score (rows of slots
/// no expert covers are zero). Each computes what expertsBackward computes
/// for its part, in the same order, so the split changes no number. Each
/// fails (returns false) when a token has more than K such experts.
/// gu [T, K, 2I] = (x * s) @ gateUp[e] (l4.moe_gate_up).
bool expertsGateUp(const float *x, const float *scores, const float *gateUp,
                   size_t T, size_t D, size_t I, size_t E, size_t K, float *gu);
/// dgu [T, K, 2I]: SwiGLU's backward at gu of dy @ down[e]^T.
bool expertsDownGrad(const float *gu, const float *scores, const float *down,
                     const float *dy, size_t T, size_t D, size_t I, size_t E,
                     size_t K, float *dgu);
/// dDown [E, I, D] (+)= swiglu(gu)^T dy over each expert's entries.
bool expertsDownGradWeight(const float *gu, const float *scores,
                           const float *dy, size_t T, size_t D, size_t I,
                           size_t E, size_t K, float *dDown, bool accumulate);
/// dz [T, K, D] = dgu @ gateUp[e]^T.
bool expertsGateUpGradInput(const float *dgu, const float *scores,
                            const float *gateUp, size_t T, size_t D, size_t I,
                            size_t E, size_t K, float *dz);
/// dx [T, D] = sum_k s_k dz[k] (experts in increasing order); dscores
/// [T, E] = <x, dz[k]> at the token's experts, 0 elsewhere.
bool expertsCombineGrad(const float *dz, const float *x, const float *scores,
                        size_t T, size_t D, size_t E, size_t K, float *dx,
                        float *dscores);
/// dGateUp [E, D, 2I] (+)= (x * s)^T dgu over each expert's entries.
bool expertsGateUpGradWeight(const float *x, const float *scores,
                             const float *dgu, size_t T, size_t D, size_t I,
                             size_t E, size_t K, float *dGateUp,
                             bool accumulate);

/// dtable[ids[i], :] += dy[i, :] for every i < n with ids[i] != paddingIdx
/// (nn.Embedding's padding_idx; pass -1 for none). The caller zeroes dtable
/// and has checked the ids.
void embeddingGrad(const int64_t *ids, size_t n, const float *dy, size_t D,
                   float *dtable, int64_t paddingIdx = -1);

/// One step of torch.optim.AdamW (single-tensor, non-amsgrad, maximize off)
/// over n elements; step counts from 1. Evaluated per element in double from
/// the f32 state, in torch's operation order.
void adamwStep(float *param, const float *grad, float *m, float *v, size_t n,
               int64_t step, double lr, double beta1, double beta2, double eps,
               double weightDecay);

} // namespace l4c::cpu

#endif // L4C_RUNTIME_CPU_GRAD_KERNELS_H
