//===- Passes.td - l4c passes ----------------------------------*- tablegen -*-===//
//
// Every l4c transformation pass, grouped by area.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_PASSES
#define L4C_PASSES

include "mlir/Pass/PassBase.td"

//===----------------------------------------------------------------------===//
// Autodiff
//===----------------------------------------------------------------------===//

def AutodiffPass : Pass<"l4c-autodiff", "mlir::ModuleOp"> {
  let summary = "reverse-mode differentiation of the loss with respect to every weight";
  let description = [{
    Each function marked `l4.autodiff` returns a scalar loss (an
    `l4.cross_entropy`). The pass appends the backward computation, one
    vector-Jacobian rule per l4 op, accumulating the adjoints of values used
    more than once with `l4.add`, and returns the gradient of every
    `l4.weight` argument as a new result named `grad.<HF name>`.

    Before:
    ```mlir
    func.func @train_step(%ids: ..., %w: tensor<8x4xf32> {l4.weight = "w"}, ...)
        -> (tensor<f32> {l4.output = "loss"}) attributes {l4.autodiff} {
      %y = l4.linear %x, %w ...
      %loss = l4.cross_entropy %y, %ids ...
      return %loss
    }
    ```
    After: the same forward, then
    ```mlir
      %dy = l4.cross_entropy_grad %y, %ids ...
      %dw = l4.linear_grad_weight %x, %dy ...
      return %loss, %dw   // {l4.output = "grad.w"}
    ```

    With `recompute=layers` (activation checkpointing) the backward sweep
    re-runs each decoder layer's forward ops from the layer's input just
    before that layer's vector-Jacobian products, and those products read
    the recomputed values. Only layer inputs (the residual stream) then stay
    alive from the forward pass to the backward one; every other activation
    dies inside its forward layer, and the memory planner reuses its bytes.
    Recomputed ops carry `l4.recomputed` so that CSE does not fold them back
    into the originals. Layers are told apart by their ops' locations
    (`model.layers.<i>.…`, as the importer writes them).
  }];
  let options = [
    Option<"recompute", "recompute", "std::string", /*default=*/"\"none\"",
           "none: keep every forward activation for the backward pass; "
           "layers: keep only each decoder layer's input and recompute the "
           "rest of the layer during the backward pass">
  ];
}

//===----------------------------------------------------------------------===//
// Memory
//===----------------------------------------------------------------------===//

def PlanMemoryPass : Pass<"l4c-plan-memory", "mlir::ModuleOp"> {
  let summary = "assign every value of a kernel-level module a region and offset";
  let description = [{
    Runs the plan writer's memory planner and records its result as
    attributes, so the arena layout can be read and tested. Weights, KV
    caches and program inputs/outputs get their own regions; intermediates
    share one arena, where two values get overlapping bytes only when their
    lifetimes (kernel index of definition to last use, through reshape
    views) do not overlap. `l4.kv_cache_update` writes its cache in place.

    After (on a kernel.group):
    ```mlir
    %y = kernel.group "model.norm" kind "norm" (...) {l4c.memory = ["arena:0+1024"]} ...
    ```
    and `l4c.arena_size` on each function, `l4c.weights_size` and
    `l4c.cache_size` on the module.
  }];
}

//===----------------------------------------------------------------------===//
// Experts
//===----------------------------------------------------------------------===//

def SplitExpertsPass : Pass<"l4c-split-experts", "mlir::ModuleOp"> {
  let summary = "routed experts (and their backward) as grouped GEMMs over a route";
  let description = [{
    Replaces each `l4.moe_experts` by `l4.moe_route` (each expert's (token,
    slot) pairs, so that the GPU can run an expert's tokens as one GEMM),
    `l4.moe_hidden` (the selected experts' SwiGLU activations of every
    token, `[B, S, K, I]` with K the router's top_k) and `l4.moe_down`
    (their down projections summed in increasing expert order). The
    activations become a value between two kernels, so each half can
    spread one token's expert weights across the whole GPU; the fused op
    needs all of a token's activations before its first down product.
    Locations get `.route`, `.gate_up` and `.down` appended. The
    activations have the input's element type in a module without an
    `l4.moe_experts_grad` (bf16 in a bf16 inference plan, as HF rounds
    them), f32 in a training module, like every per-slot value there.
    Each `l4.moe_experts_grad` becomes its backward on the same route (the
    forward's when the scores are the same value): `l4.moe_gate_up`
    (recomputed projections), `l4.moe_down_grad`, `l4.moe_down_grad_weight`,
    `l4.moe_gate_up_grad_input`, `l4.moe_combine_grad` and
    `l4.moe_gate_up_grad_weight`, each a grouped GEMM or a row kernel.

    ```mlir
    %y = l4.moe_experts %x, %s, %gu, %dn : ... loc("model.layers.1.feed_forward.experts")
    ```
    becomes
    ```mlir
    %r = l4.moe_route %s {slots = 1} : ... -> tensor<25xi32> loc("...experts.route")
    %h = l4.moe_hidden %x, %s, %gu, %r : ... -> tensor<1x8x1x64xf32> loc("...experts.gate_up")
    %y = l4.moe_down %h, %s, %dn, %r : ... loc("...experts.down")
    ```
  }];
}

def ChunkLossPass : Pass<"l4c-chunk-loss", "mlir::ModuleOp"> {
  let summary = "the train step's vocabulary projection and loss in column chunks";
  let description = [{
    Rewrites the end of a differentiated train step, the `lm_head`
    `l4.linear` whose logits only `l4.cross_entropy` and
    `l4.cross_entropy_grad` read (the latter feeding only the two linear
    gradients), so that no `[B, S, vocab]` value remains:

    - forward: per chunk of weight rows (`l4.slice_rows`, a view),
      `l4.linear` then `l4.cross_entropy_stats`, a chain carrying each row's
      running log-sum-exp and label logit; `l4.cross_entropy_from_stats`
      gives the loss;
    - backward: per chunk, the chunk's logits again (recomputed: one more
      lm_head GEMM in total), `l4.cross_entropy_grad_chunk`, its
      `l4.linear_grad_input` added into the input gradient, and its
      `l4.linear_grad_weight`, the chunk's rows of the weight gradient
      (`l4.concat_rows`, placed in place by memory planning).

    The live logits are one chunk, `[B, S, chunk]`. `chunk`: `none`; a
    column count; or `auto` (the default), which splits only when the full
    logits at the compiled maxima exceed 256 MiB, into chunks of at most
    that, each a multiple of 128 columns. Runs after CSE (the recomputed
    projection must stay a second op).
  }];
  let options = [
    Option<"chunk", "chunk", "std::string", /*default=*/"\"auto\"",
           "vocabulary columns per chunk: auto | none | N">
  ];
}

//===----------------------------------------------------------------------===//
// Fusion
//===----------------------------------------------------------------------===//

def FusionPass : Pass<"l4c-fuse", "mlir::ModuleOp"> {
  let summary = "merge kernel.groups into the fused kernels the CUDA target generates";
  let description = [{
    Regroups the one-op groups of `convert-l4-to-kernel` (the l4 ops stay as
    they are, so a fused group computes what its parts did):

    - `swiglu`: `linear(x, Wg)`, `linear(x, Wu)` and `swiglu` of the two,
      whose products nothing else reads, become one GEMM over both weights
      with SwiGLU in its epilogue;
    - `epilogue`: an `add` of a GEMM group's only use joins the GEMM as an
      epilogue, repeatedly (the MoE combine and then the residual add);
    - `norm`: an `rms_norm` read only as the input of GEMM groups becomes a
      prologue of each of them (the norm is recomputed per consumer);
    - `rope`: `rope` read only by an `l2_norm` (the QK norm) becomes one
      kernel that rotates and normalises each head vector;
    - `qkv`: attention's q, k and v projections of one input (each with the
      same norm prologue, or none) become one kernel over all their
      columns, for at most `kGemvMaxRows` rows (decode, where the CUDA
      target streams the weights one warp per column; the norm is computed
      once);
    - `cache`: q's RoPE (and QK norm) or temperature scale, k's RoPE (and
      QK norm) and the k and v cache updates that feed an attention become
      one kernel (one block per token row; k goes into the cache rotated).

    A fused group with several results yields them in the order of the
    groups it replaced.

    A value that a later kernel still reads is never fused away, so training
    programs fuse only where the backward pass does not need the
    intermediate. Fused kernels are named after their GEMM with the parts
    they absorbed: `model.layers.0.self_attn.o_proj+attn_residual`.

    Before:
    ```mlir
    %o = kernel.group "...o_proj" kind "gemm" (%a, %w) ... { l4.linear ... }
    %h = kernel.group "...attn_residual" kind "elementwise" (%x, %o) ... { l4.add ... }
    ```
    After:
    ```mlir
    %h = kernel.group "...o_proj+attn_residual" kind "gemm" (%a, %w, %x) ... {
      %0 = l4.linear ...
      %1 = l4.add ..., %0 ...
      kernel.yield %1 ...
    }
    ```
  }];
  let options = [
    Option<"fusions", "fusions", "std::string", /*default=*/"\"all\"",
           "comma-separated fusions to apply: all, none, swiglu, epilogue, "
           "norm, rope, qkv, cache, router">
  ];
  let dependentDialects = ["l4c::kernel::KernelDialect"];
}

#endif // L4C_PASSES
