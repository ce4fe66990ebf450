//===- L4Ops.td - l4 dialect operations ------------------------*- tablegen -*-===//
//
// One op per step of Llama4ForCausalLM's math (../spec/llama4.md). Each op
// keeps the attributes that pin its exact semantics, so the CPU reference
// backend and the CUDA code generator read the same facts.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_DIALECT_L4_OPS
#define L4C_DIALECT_L4_OPS

include "l4c/Dialect/L4/L4Base.td"
include "mlir/Interfaces/InferTypeOpInterface.td"
include "mlir/Interfaces/SideEffectInterfaces.td"
include "mlir/IR/BuiltinAttributes.td"

def L4_FloatTensor : RankedTensorOf<[F32, BF16, F16]>;
def L4_IndexTensor : RankedTensorOf<[I64, I32]>;

class L4_PureOp<string mnemonic, list<Trait> traits = []>
    : L4_Op<mnemonic, !listconcat(traits, [Pure])> {
  let assemblyFormat = "operands attr-dict `:` functional-type(operands, results)";
  let hasVerifier = 1;
}

def L4_EmbeddingOp : L4_PureOp<"embedding"> {
  let summary = "row gather from the embedding table";
  let description = [{
    `result[b, s, :] = table[ids[b, s], :]`. The table is `[vocab, hidden]`;
    ids must lie in `[0, vocab)` (checked by the runtime on its inputs).
    `padding_idx` (HF's pad_token_id, in `[0, vocab)`) does not change the
    lookup; it is nn.Embedding's padding_idx, whose row gets no gradient
    (l4c-autodiff copies it onto the `embedding_grad`).
  }];
  let arguments = (ins L4_FloatTensor:$table, L4_IndexTensor:$ids,
                   OptionalAttr<I64Attr>:$padding_idx);
  let results = (outs L4_FloatTensor:$result);
}

def L4_RmsNormOp : L4_PureOp<"rms_norm"> {
  let summary = "RMSNorm over the last dimension, times a weight";
  let description = [{
    `y = (x * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight`, the
    normalisation computed in f32 (Llama4TextRMSNorm).
  }];
  let arguments = (ins L4_FloatTensor:$input, L4_FloatTensor:$weight, F64Attr:$eps);
  let results = (outs L4_FloatTensor:$result);
}

def L4_L2NormOp : L4_PureOp<"l2_norm", [SameOperandsAndResultType]> {
  let summary = "weightless RMS normalisation (Llama 4's QK norm)";
  let description = [{
    `y = (x * rsqrt(mean(x^2) + eps)).to(x.dtype)` over the last dimension
    (head_dim). HF names it L2Norm, yet it divides by the RMS.
  }];
  let arguments = (ins L4_FloatTensor:$input, F64Attr:$eps);
  let results = (outs L4_FloatTensor:$result);
}

def L4_LinearOp : L4_PureOp<"linear"> {
  let summary = "y = x @ w^T with w in nn.Linear layout [out, in]";
  let arguments = (ins L4_FloatTensor:$input, L4_FloatTensor:$weight);
  let results = (outs L4_FloatTensor:$result);
}

def L4_ReshapeOp : L4_PureOp<"reshape"> {
  let summary = "reinterpret a tensor with another shape of equal size";
  let description = [{
    Row-major reinterpretation, used to view `[B, S, H*d]` as `[B, S, H, d]`
    and back. Free after bufferization.
  }];
  let arguments = (ins AnyRankedTensor:$input);
  let results = (outs AnyRankedTensor:$result);
  let hasFolder = 1;
  let hasCanonicalizer = 1;
}

def L4_RopeOp : L4_PureOp<"rope"> {
  let summary = "rotary embedding on interleaved pairs (Meta/GPT-J layout)";
  let description = [{
    `x` is `[B, S, heads, d]`. Pair `(2j, 2j+1)` of every head is rotated by
    `positions[b, s] * inv_freq[j]`, with `inv_freq[j] = theta^(-2j/d)` and,
    for `scaling = llama3`, Llama 3's frequency scaling with `factor`,
    `low_freq_factor`, `high_freq_factor` and `original_max_position`.
    `inverse` rotates by the negated angle: the rotation's adjoint, used by
    autodiff.
  }];
  let arguments = (ins L4_FloatTensor:$input, L4_IndexTensor:$positions,
                   F64Attr:$theta, L4_RopeScalingAttr:$scaling,
                   DefaultValuedAttr<F64Attr, "1.0">:$factor,
                   DefaultValuedAttr<F64Attr, "1.0">:$low_freq_factor,
                   DefaultValuedAttr<F64Attr, "1.0">:$high_freq_factor,
                   DefaultValuedAttr<I64Attr, "0">:$original_max_position,
                   DefaultValuedAttr<BoolAttr, "false">:$inverse);
  let results = (outs L4_FloatTensor:$result);
}

def L4_TemperatureScaleOp : L4_PureOp<"temperature_scale"> {
  let summary = "attention temperature tuning of the queries (NoPE layers)";
  let description = [{
    `q[b, s] *= log1p(floor((positions[b, s] + 1) / floor_scale)) * attn_scale + 1`,
    computed in f32; `q` is `[B, S, H, d]`.
  }];
  let arguments = (ins L4_FloatTensor:$input, L4_IndexTensor:$positions,
                   F64Attr:$floor_scale, F64Attr:$attn_scale);
  let results = (outs L4_FloatTensor:$result);
}

def L4_KvCacheUpdateOp : L4_PureOp<"kv_cache_update"> {
  let summary = "write new keys or values into a cache at their positions";
  let description = [{
    `cache` is `[B, M, Hkv, d]`, `update` is `[B, S, Hkv, d]`; the result is
    `cache` with `result[b, positions[b, s]] = update[b, s]`. Bufferizes in
    place.
  }];
  let arguments = (ins L4_FloatTensor:$cache, L4_FloatTensor:$update,
                   L4_IndexTensor:$positions);
  let results = (outs L4_FloatTensor:$result);
}

def L4_AttentionOp : L4_PureOp<"attention"> {
  let summary = "scaled dot-product attention with GQA and a causal or chunked mask";
  let description = [{
    `q` is `[B, S, H, d]`, `k` and `v` are `[B, Skv, Hkv, d]` with key `j` at
    absolute position `j`. Query `(b, s)` sits at `positions[b, s]` and may
    attend key `j` when `j <= positions[b, s]` and, for `chunk_size > 0`,
    `j / chunk_size == positions[b, s] / chunk_size`. Query head `h` reads
    kv head `h / (H / Hkv)`. Scores are scaled by `scale`.
  }];
  let arguments = (ins L4_FloatTensor:$query, L4_FloatTensor:$key,
                   L4_FloatTensor:$value, L4_IndexTensor:$positions,
                   F64Attr:$scale, I64Attr:$chunk_size);
  let results = (outs L4_FloatTensor:$result);
}

def L4_RouterScoresOp : L4_PureOp<"router_scores", [SameOperandsAndResultType]> {
  let summary = "sigmoid of the top-k router logits, zero elsewhere";
  let description = [{
    `logits` is `[B, S, E]`. Each token keeps its `top_k` largest logits
    (ties to the lower index) and gets `sigmoid(logit)` there and 0 for the
    other experts. No softmax, no renormalisation.
  }];
  let arguments = (ins L4_FloatTensor:$logits, I64Attr:$top_k);
  let results = (outs L4_FloatTensor:$result);
}

def L4_MoeExpertsOp : L4_PureOp<"moe_experts"> {
  let summary = "routed experts: scaled input, SwiGLU FFN per expert, summed";
  let description = [{
    `x` is `[B, S, D]`, `scores` `[B, S, E]`, `gate_up` `[E, D, 2I]` (gate in
    the first I columns), `down` `[E, I, D]`. Result:
    `sum_e swiglu((x * scores[..., e]) @ gate_up[e]) @ down[e]`, where the
    score scales the expert input (HF's Llama4TextMoe).
  }];
  let arguments = (ins L4_FloatTensor:$input, L4_FloatTensor:$scores,
                   L4_FloatTensor:$gate_up, L4_FloatTensor:$down);
  let results = (outs L4_FloatTensor:$result);
}

def L4_MoeRouteOp : L4_PureOp<"moe_route"> {
  let summary = "each expert's (token, slot) pairs, for grouped expert GEMMs";
  let description = [{
    `scores` is `[B, S, E]`; the result is a 1-D i32 table of
    `E + 1 + B * S * slots` entries: `E + 1` offsets (`table[e]` is where
    expert e's entries start, counted from entry `E + 1`; `table[E]` is
    their total), then the entries `m * slots + k`, expert by expert and in
    token order within an expert, for each live token m (row `b * T + t` of
    the run's `B x T` tokens) and each of its first `slots` experts with a
    nonzero score (k counts those experts in increasing order); -1 after
    the last entry. l4.moe_hidden and l4.moe_down read it so that the GPU
    can run each expert's tokens as one GEMM (l4c-split-experts).
  }];
  let arguments = (ins L4_FloatTensor:$scores, I64Attr:$slots);
  let results = (outs L4_IndexTensor:$result);
}

def L4_MoeHiddenOp : L4_PureOp<"moe_hidden"> {
  let summary = "routed experts, first half: the selected experts' SwiGLU activations";
  let description = [{
    `x` `[B, S, D]`, `scores` `[B, S, E]`, `gate_up` `[E, D, 2I]`; the result
    `h` is `[B, S, K, I]`, f32 (l4c-split-experts' choice: the precision
    the activations have inside `l4.moe_experts`) or x's element type: slot k of a token holds
    `swiglu((x * scores[e]) @ gate_up[e])` for the token's k-th expert with a
    nonzero score (in increasing expert order), and zeros when it has fewer.
    With `l4.moe_down` it computes `l4.moe_experts`, in two kernels with
    `h` between them (l4c-split-experts). `route` is `l4.moe_route` of the
    scores with K slots.
  }];
  let arguments = (ins L4_FloatTensor:$input, L4_FloatTensor:$scores,
                   L4_FloatTensor:$gate_up, L4_IndexTensor:$route);
  let results = (outs L4_FloatTensor:$result);
}

def L4_MoeDownOp : L4_PureOp<"moe_down"> {
  let summary = "routed experts, second half: down projections summed over the slots";
  let description = [{
    `h` `[B, S, K, I]` (from `l4.moe_hidden`, f32 or the result's element
    type), `scores` `[B, S, E]`, `down`
    `[E, I, D]`; the result `[B, S, D]` is the sum over the token's experts
    with a nonzero score, in increasing expert order, of `h[k] @ down[e]`.
    `route` is `l4.moe_route` of the scores with K slots.
  }];
  let arguments = (ins L4_FloatTensor:$hidden, L4_FloatTensor:$scores,
                   L4_FloatTensor:$down, L4_IndexTensor:$route);
  let results = (outs L4_FloatTensor:$result);
}

def L4_SwigluOp : L4_PureOp<"swiglu", [SameOperandsAndResultType]> {
  let summary = "up * silu(gate)";
  let arguments = (ins L4_FloatTensor:$gate, L4_FloatTensor:$up);
  let results = (outs L4_FloatTensor:$result);
  let hasVerifier = 0;
}

def L4_AddOp : L4_PureOp<"add", [SameOperandsAndResultType, Commutative]> {
  let summary = "elementwise sum (residual connections, shared + routed experts)";
  let arguments = (ins L4_FloatTensor:$lhs, L4_FloatTensor:$rhs);
  let results = (outs L4_FloatTensor:$result);
  let hasVerifier = 0;
}

def L4_ConvertOp : L4_PureOp<"convert"> {
  let summary = "the input in the result's float dtype";
  let description = [{
    Element-wise dtype change, rounding to nearest even when narrowing. The
    chunked loss (l4c-chunk-loss) sums the input gradient's per-chunk parts
    in f32 and converts the sum once, so a bf16 plan rounds it once, as the
    unchunked GEMM does.
  }];
  let arguments = (ins L4_FloatTensor:$input);
  let results = (outs L4_FloatTensor:$result);
}

def L4_TakeLastOp : L4_PureOp<"take_last"> {
  let summary = "the hidden state at each sequence's last valid position";
  let description = [{
    `[B, S, D] -> [B, 1, D]`, reading position `len - 1` where `len` is the
    run-time sequence length; prefill uses it so only the last token's
    logits are computed.
  }];
  let arguments = (ins L4_FloatTensor:$input);
  let results = (outs L4_FloatTensor:$result);
}

//===----------------------------------------------------------------------===//
// Training: loss and vector-Jacobian products (emitted by l4c-autodiff)
//===----------------------------------------------------------------------===//

def L4_CrossEntropyOp : L4_PureOp<"cross_entropy"> {
  let summary = "mean next-token cross entropy (HF's shift convention)";
  let description = [{
    `logits` `[B, S, V]`, `ids` `[B, S]`. Position `t` predicts `ids[t + 1]`;
    the last valid position and labels equal to -100 are ignored; the mean
    is over the remaining positions of every sequence (run-time length).
    Computed in f32; the result is a scalar.
  }];
  let arguments = (ins L4_FloatTensor:$logits, L4_IndexTensor:$ids);
  let results = (outs 0DTensorOf<[F32]>:$loss);
}

def L4_CrossEntropyGradOp : L4_PureOp<"cross_entropy_grad"> {
  let summary = "gradient of the mean cross entropy with respect to the logits";
  let description = [{
    `(softmax(logits) - onehot(next id)) / count` on labelled positions, 0
    elsewhere; the loss is the differentiated root, so its seed is 1.
  }];
  let arguments = (ins L4_FloatTensor:$logits, L4_IndexTensor:$ids);
  let results = (outs L4_FloatTensor:$result);
}

def L4_CrossEntropyStatsOp : L4_PureOp<"cross_entropy_stats"> {
  let summary = "running softmax statistics of the loss over vocabulary chunks";
  let description = [{
    `logits` `[B, S, n]` are the vocabulary columns `[vocab_offset,
    vocab_offset + n)` of a `[B, S, vocab_size]` projection. The result `[B,
    S, 2]` (f32) holds per row the log-sum-exp over every column seen so far
    (this chunk and, when given, the chunks `prev` summarises) and the
    logit of the row's label (the next id) once its chunk has been seen.
    Unlabelled rows (the last valid position, label -100) hold zeros.
    l4c-chunk-loss emits a chain of these so the train step never stores
    the full logits.
  }];
  let arguments = (ins L4_FloatTensor:$logits, L4_IndexTensor:$ids,
                   Optional<L4_FloatTensor>:$prev, I64Attr:$vocab_offset,
                   I64Attr:$vocab_size);
  let results = (outs L4_FloatTensor:$result);
}

def L4_CrossEntropyFromStatsOp : L4_PureOp<"cross_entropy_from_stats"> {
  let summary = "the mean cross entropy from the final chunk statistics";
  let description = [{
    The mean over labelled rows of `lse - label logit` read from the last
    `cross_entropy_stats` of a chain: what `l4.cross_entropy` computes from
    the full logits.
  }];
  let arguments = (ins L4_FloatTensor:$stats, L4_IndexTensor:$ids);
  let results = (outs 0DTensorOf<[F32]>:$loss);
}

def L4_CrossEntropyGradChunkOp : L4_PureOp<"cross_entropy_grad_chunk"> {
  let summary = "the loss gradient for one vocabulary chunk of the logits";
  let description = [{
    `cross_entropy_grad` restricted to the columns `[vocab_offset,
    vocab_offset + n)`, the softmax normalised by the full-vocabulary
    log-sum-exp held in `stats` (the last of a `cross_entropy_stats` chain).
  }];
  let arguments = (ins L4_FloatTensor:$logits, L4_IndexTensor:$ids,
                   L4_FloatTensor:$stats, I64Attr:$vocab_offset,
                   I64Attr:$vocab_size);
  let results = (outs L4_FloatTensor:$result);
}

def L4_SliceRowsOp : L4_PureOp<"slice_rows"> {
  let summary = "rows [offset, offset + n) of a parameter-shaped tensor, as a view";
  let description = [{
    The leading-dimension slice of a tensor without batch or seq dims (a
    weight or a weight gradient): contiguous in row-major order, so it is a
    view of the input's bytes, never a copy.
  }];
  let arguments = (ins AnyRankedTensor:$input, I64Attr:$offset);
  let results = (outs AnyRankedTensor:$result);
}

def L4_ConcatRowsOp : L4_PureOp<"concat_rows"> {
  let summary = "parameter-shaped tensors stacked along their leading dimension";
  let description = [{
    The inverse of `slice_rows`: memory planning places each input inside
    the result's bytes, so the kernels computing the inputs write the result
    in place and nothing is copied.
  }];
  let arguments = (ins Variadic<AnyRankedTensor>:$inputs);
  let results = (outs AnyRankedTensor:$result);
}

def L4_LinearGradInputOp : L4_PureOp<"linear_grad_input"> {
  let summary = "dx = dy @ w for y = x @ w^T";
  let arguments = (ins L4_FloatTensor:$grad, L4_FloatTensor:$weight);
  let results = (outs L4_FloatTensor:$result);
}

def L4_LinearGradWeightOp : L4_PureOp<"linear_grad_weight"> {
  let summary = "dw = dy^T @ x summed over all valid token rows";
  let arguments = (ins L4_FloatTensor:$input, L4_FloatTensor:$grad);
  let results = (outs L4_FloatTensor:$result);
}

def L4_RmsNormGradOp : L4_PureOp<"rms_norm_grad"> {
  let summary = "gradients of rms_norm with respect to its input and weight";
  let arguments = (ins L4_FloatTensor:$input, L4_FloatTensor:$weight,
                   L4_FloatTensor:$grad, F64Attr:$eps);
  let results = (outs L4_FloatTensor:$input_grad, L4_FloatTensor:$weight_grad);
}

def L4_L2NormGradOp : L4_PureOp<"l2_norm_grad"> {
  let summary = "gradient of the weightless QK norm";
  let arguments = (ins L4_FloatTensor:$input, L4_FloatTensor:$grad, F64Attr:$eps);
  let results = (outs L4_FloatTensor:$result);
}

def L4_AttentionGradOp : L4_PureOp<"attention_grad"> {
  let summary = "gradients of attention with respect to q, k and v";
  let description = [{
    Recomputes the softmax from `q`, `k`, `positions` (same mask and scale
    as the forward op) and returns `dq` `[B, S, H, d]` and `dk`, `dv`
    `[B, Skv, Hkv, d]`, summed over each GQA group.
  }];
  let arguments = (ins L4_FloatTensor:$query, L4_FloatTensor:$key,
                   L4_FloatTensor:$value, L4_IndexTensor:$positions,
                   L4_FloatTensor:$grad, F64Attr:$scale, I64Attr:$chunk_size);
  let results = (outs L4_FloatTensor:$query_grad, L4_FloatTensor:$key_grad,
                      L4_FloatTensor:$value_grad);
}

def L4_RouterScoresGradOp : L4_PureOp<"router_scores_grad"> {
  let summary = "gradient through sigmoid top-k routing";
  let description = [{
    `dlogit = dscore * s * (1 - s)` for the selected experts, 0 for the
    others; the selection itself carries no gradient.
  }];
  let arguments = (ins L4_FloatTensor:$logits, L4_FloatTensor:$grad, I64Attr:$top_k);
  let results = (outs L4_FloatTensor:$result);
}

def L4_MoeExpertsGradOp : L4_PureOp<"moe_experts_grad"> {
  let summary = "gradients of the routed experts";
  let arguments = (ins L4_FloatTensor:$input, L4_FloatTensor:$scores,
                   L4_FloatTensor:$gate_up, L4_FloatTensor:$down,
                   L4_FloatTensor:$grad);
  let results = (outs L4_FloatTensor:$input_grad, L4_FloatTensor:$scores_grad,
                      L4_FloatTensor:$gate_up_grad, L4_FloatTensor:$down_grad);
}

// The parts l4c-split-experts makes of l4.moe_experts_grad, so that each
// is a grouped GEMM (one per expert over its tokens) or a row kernel. `route`
// is always l4.moe_route of the scores; K is its slots; the per-slot values
// are f32 or the input's element type, and rows of the slots no expert
// covers are zero.

def L4_MoeGateUpOp : L4_PureOp<"moe_gate_up"> {
  let summary = "the selected experts' gate and up projections (before SwiGLU)";
  let description = [{
    `x` `[B, S, D]`, `scores` `[B, S, E]`, `gate_up` `[E, D, 2I]`; the result
    `gu` `[B, S, K, 2I]` holds `(x * s) @ gate_up[e]` in slot k for the
    token's k-th expert e with score s (the backward's recomputation).
  }];
  let arguments = (ins L4_FloatTensor:$input, L4_FloatTensor:$scores,
                   L4_FloatTensor:$gate_up, L4_IndexTensor:$route);
  let results = (outs L4_FloatTensor:$result);
}

def L4_MoeDownGradOp : L4_PureOp<"moe_down_grad"> {
  let summary = "gradient of the expert activations' gate and up projections";
  let description = [{
    `gu` `[B, S, K, 2I]` (l4.moe_gate_up), `scores`, `down` `[E, I, D]`, the
    output gradient `dy` `[B, S, D]`: slot k of the result `[B, S, K, 2I]`
    is SwiGLU's backward at `gu[k]` of `dh = dy @ down[e]^T`.
  }];
  let arguments = (ins L4_FloatTensor:$gate_up_out, L4_FloatTensor:$scores,
                   L4_FloatTensor:$down, L4_FloatTensor:$grad,
                   L4_IndexTensor:$route);
  let results = (outs L4_FloatTensor:$result);
}

def L4_MoeDownGradWeightOp : L4_PureOp<"moe_down_grad_weight"> {
  let summary = "gradient of the experts' down projections";
  let description = [{
    `[E, I, D]`: for each expert e, the sum over its (token, slot) entries
    of `swiglu(gu[token, slot])^T dy[token]`.
  }];
  let arguments = (ins L4_FloatTensor:$gate_up_out, L4_FloatTensor:$scores,
                   L4_FloatTensor:$grad, L4_IndexTensor:$route);
  let results = (outs L4_FloatTensor:$result);
}

def L4_MoeGateUpGradInputOp : L4_PureOp<"moe_gate_up_grad_input"> {
  let summary = "gradient of the experts' scaled inputs, per slot";
  let description = [{
    `dgu` `[B, S, K, 2I]` (l4.moe_down_grad), `scores`, `gate_up`
    `[E, D, 2I]`: slot k of the result `[B, S, K, D]` is
    `dgu[k] @ gate_up[e]^T`, the gradient of the expert's input `x * s`.
  }];
  let arguments = (ins L4_FloatTensor:$grad, L4_FloatTensor:$scores,
                   L4_FloatTensor:$gate_up, L4_IndexTensor:$route);
  let results = (outs L4_FloatTensor:$result);
}

def L4_MoeCombineGradOp : L4_PureOp<"moe_combine_grad"> {
  let summary = "the routed experts' input and score gradients from the slots'";
  let description = [{
    `dz` `[B, S, K, D]` (l4.moe_gate_up_grad_input), `x` `[B, S, D]`,
    `scores` `[B, S, E]`: `input_grad = sum_k s_k dz[k]` over the token's
    experts in increasing order, `scores_grad[e_k] = <x, dz[k]>` (0 for the
    experts it does not use).
  }];
  let arguments = (ins L4_FloatTensor:$grad, L4_FloatTensor:$input,
                   L4_FloatTensor:$scores);
  let results = (outs L4_FloatTensor:$input_grad, L4_FloatTensor:$scores_grad);
}

def L4_MoeGateUpGradWeightOp : L4_PureOp<"moe_gate_up_grad_weight"> {
  let summary = "gradient of the experts' gate and up projections";
  let description = [{
    `[E, D, 2I]`: for each expert e, the sum over its (token, slot) entries
    of `(x[token] * s)^T dgu[token, slot]`.
  }];
  let arguments = (ins L4_FloatTensor:$input, L4_FloatTensor:$scores,
                   L4_FloatTensor:$grad, L4_IndexTensor:$route);
  let results = (outs L4_FloatTensor:$result);
}

def L4_SwigluGradOp : L4_PureOp<"swiglu_grad"> {
  let summary = "gradients of up * silu(gate)";
  let arguments = (ins L4_FloatTensor:$gate, L4_FloatTensor:$up, L4_FloatTensor:$grad);
  let results = (outs L4_FloatTensor:$gate_grad, L4_FloatTensor:$up_grad);
  let hasVerifier = 0;
}

def L4_EmbeddingGradOp : L4_PureOp<"embedding_grad"> {
  let summary = "scatter-add of the output gradient into the table's rows";
  let description = [{
    `result[ids[b, s], :] += grad[b, s, :]` over every token, starting from
    zeros. Tokens whose id equals `padding_idx` (optional, in `[0, vocab)`)
    add nothing, so that row's gradient is zero (nn.Embedding's padding_idx).
  }];
  let arguments = (ins L4_IndexTensor:$ids, L4_FloatTensor:$grad,
                   OptionalAttr<I64Attr>:$padding_idx);
  let results = (outs L4_FloatTensor:$result);
}

#endif // L4C_DIALECT_L4_OPS
