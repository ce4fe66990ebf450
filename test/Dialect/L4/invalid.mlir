// RUN: l4-opt %s --split-input-file --verify-diagnostics
// One case per verifier branch of the l4 ops.

// embedding table rank
func.func @case0(%a: tensor<64xf32>, %b: tensor<2x8xi64>) {
  // expected-error @+1 {{table must have rank 2, got [64]}}
  %r = l4.embedding %a, %b : (tensor<64xf32>, tensor<2x8xi64>) -> tensor<2x8x32xf32>
  return
}

// -----

// embedding ids rank
func.func @case1(%a: tensor<64x32xf32>, %b: tensor<16xi64>) {
  // expected-error @+1 {{ids must have rank 2, got [16]}}
  %r = l4.embedding %a, %b : (tensor<64x32xf32>, tensor<16xi64>) -> tensor<2x8x32xf32>
  return
}

// -----

// embedding result shape
func.func @case2(%a: tensor<64x32xf32>, %b: tensor<2x8xi64>) {
  // expected-error @+1 {{result must have shape [2, 8, 32], got [2, 8, 16]}}
  %r = l4.embedding %a, %b : (tensor<64x32xf32>, tensor<2x8xi64>) -> tensor<2x8x16xf32>
  return
}

// -----

// embedding result dtype
func.func @case3(%a: tensor<64x32xf32>, %b: tensor<2x8xi64>) {
  // expected-error @+1 {{result element type 'bf16' must match table element type 'f32'}}
  %r = l4.embedding %a, %b : (tensor<64x32xf32>, tensor<2x8xi64>) -> tensor<2x8x32xbf16>
  return
}

// -----

// embedding ids dtype
func.func @case4(%a: tensor<64x32xf32>, %b: tensor<2x8xf32>) {
  // expected-error @+1 {{operand #1 must be ranked tensor of 64-bit signless integer or 32-bit signless integer values}}
  %r = l4.embedding %a, %b : (tensor<64x32xf32>, tensor<2x8xf32>) -> tensor<2x8x32xf32>
  return
}

// -----

// rms_norm eps
func.func @case5(%a: tensor<2x8x32xf32>, %b: tensor<32xf32>) {
  // expected-error @+1 {{eps must be positive, got 0}}
  %r = l4.rms_norm %a, %b {eps = 0.0 : f64} : (tensor<2x8x32xf32>, tensor<32xf32>) -> tensor<2x8x32xf32>
  return
}

// -----

// rms_norm weight rank
func.func @case6(%a: tensor<2x8x32xf32>, %b: tensor<1x32xf32>) {
  // expected-error @+1 {{weight must have rank 1, got [1, 32]}}
  %r = l4.rms_norm %a, %b {eps = 1.0e-5 : f64} : (tensor<2x8x32xf32>, tensor<1x32xf32>) -> tensor<2x8x32xf32>
  return
}

// -----

// rms_norm weight size
func.func @case7(%a: tensor<2x8x32xf32>, %b: tensor<16xf32>) {
  // expected-error @+1 {{weight dimension 0 must be 32 (the input's last dimension), got 16}}
  %r = l4.rms_norm %a, %b {eps = 1.0e-5 : f64} : (tensor<2x8x32xf32>, tensor<16xf32>) -> tensor<2x8x32xf32>
  return
}

// -----

// rms_norm result
func.func @case8(%a: tensor<2x8x32xf32>, %b: tensor<32xf32>) {
  // expected-error @+1 {{result type 'tensor<2x8x32xbf16>' must equal the input type 'tensor<2x8x32xf32>'}}
  %r = l4.rms_norm %a, %b {eps = 1.0e-5 : f64} : (tensor<2x8x32xf32>, tensor<32xf32>) -> tensor<2x8x32xbf16>
  return
}

// -----

// l2_norm eps
func.func @case9(%a: tensor<2x8x4x8xf32>) {
  // expected-error @+1 {{eps must be positive, got -1}}
  %r = l4.l2_norm %a {eps = -1.0 : f64} : (tensor<2x8x4x8xf32>) -> tensor<2x8x4x8xf32>
  return
}

// -----

// linear weight rank
func.func @case10(%a: tensor<2x8x32xf32>, %b: tensor<32xf32>) {
  // expected-error @+1 {{weight must have rank 2, got [32]}}
  %r = l4.linear %a, %b : (tensor<2x8x32xf32>, tensor<32xf32>) -> tensor<2x8x32xf32>
  return
}

// -----

// linear rank 0 input
func.func @case11(%a: tensor<f32>, %b: tensor<4x1xf32>) {
  // expected-error @+1 {{input must have rank >= 1}}
  %r = l4.linear %a, %b : (tensor<f32>, tensor<4x1xf32>) -> tensor<4xf32>
  return
}

// -----

// linear contraction
func.func @case12(%a: tensor<2x8x32xf32>, %b: tensor<16x24xf32>) {
  // expected-error @+1 {{weight dimension 1 must be 32 (the input's last dimension), got 24}}
  %r = l4.linear %a, %b : (tensor<2x8x32xf32>, tensor<16x24xf32>) -> tensor<2x8x16xf32>
  return
}

// -----

// linear result
func.func @case13(%a: tensor<2x8x32xf32>, %b: tensor<16x32xf32>) {
  // expected-error @+1 {{result must have shape [2, 8, 16], got [2, 8, 32]}}
  %r = l4.linear %a, %b : (tensor<2x8x32xf32>, tensor<16x32xf32>) -> tensor<2x8x32xf32>
  return
}

// -----

// linear dtype
func.func @case14(%a: tensor<2x8x32xf32>, %b: tensor<16x32xf32>) {
  // expected-error @+1 {{result element type 'bf16' must match input element type 'f32'}}
  %r = l4.linear %a, %b : (tensor<2x8x32xf32>, tensor<16x32xf32>) -> tensor<2x8x16xbf16>
  return
}

// -----

// reshape dtype
func.func @case15(%a: tensor<2x8xf32>) {
  // expected-error @+1 {{result element type 'bf16' must match the input's 'f32'}}
  %r = l4.reshape %a : (tensor<2x8xf32>) -> tensor<16xbf16>
  return
}

// -----

// reshape size
func.func @case16(%a: tensor<2x8xf32>) {
  // expected-error @+1 {{result shape [15] must hold as many elements as the input shape [2, 8]}}
  %r = l4.reshape %a : (tensor<2x8xf32>) -> tensor<15xf32>
  return
}

// -----

// rope rank
func.func @case17(%a: tensor<2x8x32xf32>, %b: tensor<2x8xi64>) {
  // expected-error @+1 {{input must have rank 4, got [2, 8, 32]}}
  %r = l4.rope %a, %b {theta = 1.0e4 : f64, scaling = #l4<rope_scaling none>} : (tensor<2x8x32xf32>, tensor<2x8xi64>) -> tensor<2x8x32xf32>
  return
}

// -----

// rope positions rank
func.func @case18(%a: tensor<2x8x4x8xf32>, %b: tensor<16xi64>) {
  // expected-error @+1 {{positions must have rank 2, got [16]}}
  %r = l4.rope %a, %b {theta = 1.0e4 : f64, scaling = #l4<rope_scaling none>} : (tensor<2x8x4x8xf32>, tensor<16xi64>) -> tensor<2x8x4x8xf32>
  return
}

// -----

// rope positions shape
func.func @case19(%a: tensor<2x8x4x8xf32>, %b: tensor<2x4xi64>) {
  // expected-error @+1 {{positions must have shape [2, 8], got [2, 4]}}
  %r = l4.rope %a, %b {theta = 1.0e4 : f64, scaling = #l4<rope_scaling none>} : (tensor<2x8x4x8xf32>, tensor<2x4xi64>) -> tensor<2x8x4x8xf32>
  return
}

// -----

// rope odd head dim
func.func @case20(%a: tensor<2x8x4x7xf32>, %b: tensor<2x8xi64>) {
  // expected-error @+1 {{head dimension must be even, got 7}}
  %r = l4.rope %a, %b {theta = 1.0e4 : f64, scaling = #l4<rope_scaling none>} : (tensor<2x8x4x7xf32>, tensor<2x8xi64>) -> tensor<2x8x4x7xf32>
  return
}

// -----

// rope result
func.func @case21(%a: tensor<2x8x4x8xf32>, %b: tensor<2x8xi64>) {
  // expected-error @+1 {{result type must equal the input type}}
  %r = l4.rope %a, %b {theta = 1.0e4 : f64, scaling = #l4<rope_scaling none>} : (tensor<2x8x4x8xf32>, tensor<2x8xi64>) -> tensor<2x8x4x8xbf16>
  return
}

// -----

// rope theta
func.func @case22(%a: tensor<2x8x4x8xf32>, %b: tensor<2x8xi64>) {
  // expected-error @+1 {{theta must be positive}}
  %r = l4.rope %a, %b {theta = 0.0 : f64, scaling = #l4<rope_scaling none>} : (tensor<2x8x4x8xf32>, tensor<2x8xi64>) -> tensor<2x8x4x8xf32>
  return
}

// -----

// rope llama3 factors
func.func @case23(%a: tensor<2x8x4x8xf32>, %b: tensor<2x8xi64>) {
  // expected-error @+1 {{llama3 scaling needs positive factor, low_freq_factor and high_freq_factor}}
  %r = l4.rope %a, %b {theta = 1.0e4 : f64, scaling = #l4<rope_scaling llama3>, factor = 0.0 : f64, original_max_position = 64 : i64} : (tensor<2x8x4x8xf32>, tensor<2x8xi64>) -> tensor<2x8x4x8xf32>
  return
}

// -----

// rope llama3 original
func.func @case24(%a: tensor<2x8x4x8xf32>, %b: tensor<2x8xi64>) {
  // expected-error @+1 {{llama3 scaling needs original_max_position > 0}}
  %r = l4.rope %a, %b {theta = 1.0e4 : f64, scaling = #l4<rope_scaling llama3>, factor = 8.0 : f64} : (tensor<2x8x4x8xf32>, tensor<2x8xi64>) -> tensor<2x8x4x8xf32>
  return
}

// -----

// temperature rank
func.func @case25(%a: tensor<2x8x32xf32>, %b: tensor<2x8xi64>) {
  // expected-error @+1 {{input must have rank 4, got [2, 8, 32]}}
  %r = l4.temperature_scale %a, %b {floor_scale = 8.0 : f64, attn_scale = 0.1 : f64} : (tensor<2x8x32xf32>, tensor<2x8xi64>) -> tensor<2x8x32xf32>
  return
}

// -----

// temperature positions
func.func @case26(%a: tensor<2x8x4x8xf32>, %b: tensor<1x8xi64>) {
  // expected-error @+1 {{positions must have shape [2, 8], got [1, 8]}}
  %r = l4.temperature_scale %a, %b {floor_scale = 8.0 : f64, attn_scale = 0.1 : f64} : (tensor<2x8x4x8xf32>, tensor<1x8xi64>) -> tensor<2x8x4x8xf32>
  return
}

// -----

// temperature result
func.func @case27(%a: tensor<2x8x4x8xf32>, %b: tensor<2x8xi64>) {
  // expected-error @+1 {{result type must equal the input type}}
  %r = l4.temperature_scale %a, %b {floor_scale = 8.0 : f64, attn_scale = 0.1 : f64} : (tensor<2x8x4x8xf32>, tensor<2x8xi64>) -> tensor<2x8x4x8xbf16>
  return
}

// -----

// temperature floor
func.func @case28(%a: tensor<2x8x4x8xf32>, %b: tensor<2x8xi64>) {
  // expected-error @+1 {{floor_scale must be positive, got 0}}
  %r = l4.temperature_scale %a, %b {floor_scale = 0.0 : f64, attn_scale = 0.1 : f64} : (tensor<2x8x4x8xf32>, tensor<2x8xi64>) -> tensor<2x8x4x8xf32>
  return
}

// -----

// cache rank
func.func @case29(%a: tensor<16x2x8xf32>, %b: tensor<1x1x2x8xf32>, %c: tensor<1x1xi64>) {
  // expected-error @+1 {{cache must have rank 4, got [16, 2, 8]}}
  %r = l4.kv_cache_update %a, %b, %c : (tensor<16x2x8xf32>, tensor<1x1x2x8xf32>, tensor<1x1xi64>) -> tensor<16x2x8xf32>
  return
}

// -----

// cache update rank
func.func @case30(%a: tensor<1x16x2x8xf32>, %b: tensor<1x2x8xf32>, %c: tensor<1x1xi64>) {
  // expected-error @+1 {{update must have rank 4, got [1, 2, 8]}}
  %r = l4.kv_cache_update %a, %b, %c : (tensor<1x16x2x8xf32>, tensor<1x2x8xf32>, tensor<1x1xi64>) -> tensor<1x16x2x8xf32>
  return
}

// -----

// cache heads
func.func @case31(%a: tensor<1x16x2x8xf32>, %b: tensor<1x1x4x8xf32>, %c: tensor<1x1xi64>) {
  // expected-error @+1 {{update shape [1, 1, 4, 8] must match cache shape [1, 16, 2, 8] in batch, kv heads and head_dim}}
  %r = l4.kv_cache_update %a, %b, %c : (tensor<1x16x2x8xf32>, tensor<1x1x4x8xf32>, tensor<1x1xi64>) -> tensor<1x16x2x8xf32>
  return
}

// -----

// cache length
func.func @case32(%a: tensor<1x4x2x8xf32>, %b: tensor<1x8x2x8xf32>, %c: tensor<1x8xi64>) {
  // expected-error @+1 {{update length 8 exceeds the cache length 4}}
  %r = l4.kv_cache_update %a, %b, %c : (tensor<1x4x2x8xf32>, tensor<1x8x2x8xf32>, tensor<1x8xi64>) -> tensor<1x4x2x8xf32>
  return
}

// -----

// cache result
func.func @case33(%a: tensor<1x16x2x8xf32>, %b: tensor<1x1x2x8xf32>, %c: tensor<1x1xi64>) {
  // expected-error @+1 {{result type must equal the cache type}}
  %r = l4.kv_cache_update %a, %b, %c : (tensor<1x16x2x8xf32>, tensor<1x1x2x8xf32>, tensor<1x1xi64>) -> tensor<1x8x2x8xf32>
  return
}

// -----

// cache dtype
func.func @case34(%a: tensor<1x16x2x8xf32>, %b: tensor<1x1x2x8xbf16>, %c: tensor<1x1xi64>) {
  // expected-error @+1 {{update element type 'bf16' must match cache element type 'f32'}}
  %r = l4.kv_cache_update %a, %b, %c : (tensor<1x16x2x8xf32>, tensor<1x1x2x8xbf16>, tensor<1x1xi64>) -> tensor<1x16x2x8xf32>
  return
}

// -----

// attention query rank
func.func @case35(%a: tensor<2x8x32xf32>, %b: tensor<2x8x2x8xf32>, %c: tensor<2x8xi64>) {
  // expected-error @+1 {{query must have rank 4, got [2, 8, 32]}}
  %r = l4.attention %a, %b, %b, %c {scale = 0.5 : f64, chunk_size = 0 : i64} : (tensor<2x8x32xf32>, tensor<2x8x2x8xf32>, tensor<2x8x2x8xf32>, tensor<2x8xi64>) -> tensor<2x8x32xf32>
  return
}

// -----

// attention key rank
func.func @case36(%a: tensor<2x8x4x8xf32>, %b: tensor<2x8x16xf32>, %c: tensor<2x8xi64>) {
  // expected-error @+1 {{key must have rank 4, got [2, 8, 16]}}
  %r = l4.attention %a, %b, %b, %c {scale = 0.5 : f64, chunk_size = 0 : i64} : (tensor<2x8x4x8xf32>, tensor<2x8x16xf32>, tensor<2x8x16xf32>, tensor<2x8xi64>) -> tensor<2x8x4x8xf32>
  return
}

// -----

// attention value type
func.func @case37(%a: tensor<2x8x4x8xf32>, %b: tensor<2x8x2x8xf32>, %d: tensor<2x4x2x8xf32>, %c: tensor<2x8xi64>) {
  // expected-error @+1 {{value type 'tensor<2x4x2x8xf32>' must equal the key type 'tensor<2x8x2x8xf32>'}}
  %r = l4.attention %a, %b, %d, %c {scale = 0.5 : f64, chunk_size = 0 : i64} : (tensor<2x8x4x8xf32>, tensor<2x8x2x8xf32>, tensor<2x4x2x8xf32>, tensor<2x8xi64>) -> tensor<2x8x4x8xf32>
  return
}

// -----

// attention batch
func.func @case38(%a: tensor<2x8x4x8xf32>, %b: tensor<1x8x2x8xf32>, %c: tensor<2x8xi64>) {
  // expected-error @+1 {{key batch 1 must equal query batch 2}}
  %r = l4.attention %a, %b, %b, %c {scale = 0.5 : f64, chunk_size = 0 : i64} : (tensor<2x8x4x8xf32>, tensor<1x8x2x8xf32>, tensor<1x8x2x8xf32>, tensor<2x8xi64>) -> tensor<2x8x4x8xf32>
  return
}

// -----

// attention head dim
func.func @case39(%a: tensor<2x8x4x8xf32>, %b: tensor<2x8x2x4xf32>, %c: tensor<2x8xi64>) {
  // expected-error @+1 {{key head_dim 4 must equal query head_dim 8}}
  %r = l4.attention %a, %b, %b, %c {scale = 0.5 : f64, chunk_size = 0 : i64} : (tensor<2x8x4x8xf32>, tensor<2x8x2x4xf32>, tensor<2x8x2x4xf32>, tensor<2x8xi64>) -> tensor<2x8x4x8xf32>
  return
}

// -----

// attention gqa
func.func @case40(%a: tensor<2x8x4x8xf32>, %b: tensor<2x8x3x8xf32>, %c: tensor<2x8xi64>) {
  // expected-error @+1 {{query heads 4 must be a multiple of kv heads 3}}
  %r = l4.attention %a, %b, %b, %c {scale = 0.5 : f64, chunk_size = 0 : i64} : (tensor<2x8x4x8xf32>, tensor<2x8x3x8xf32>, tensor<2x8x3x8xf32>, tensor<2x8xi64>) -> tensor<2x8x4x8xf32>
  return
}

// -----

// attention chunk
func.func @case41(%a: tensor<2x8x4x8xf32>, %b: tensor<2x8x2x8xf32>, %c: tensor<2x8xi64>) {
  // expected-error @+1 {{chunk_size must be >= 0 (0 = full causal), got -1}}
  %r = l4.attention %a, %b, %b, %c {scale = 0.5 : f64, chunk_size = -1 : i64} : (tensor<2x8x4x8xf32>, tensor<2x8x2x8xf32>, tensor<2x8x2x8xf32>, tensor<2x8xi64>) -> tensor<2x8x4x8xf32>
  return
}

// -----

// attention scale
func.func @case42(%a: tensor<2x8x4x8xf32>, %b: tensor<2x8x2x8xf32>, %c: tensor<2x8xi64>) {
  // expected-error @+1 {{scale must be positive}}
  %r = l4.attention %a, %b, %b, %c {scale = 0.0 : f64, chunk_size = 0 : i64} : (tensor<2x8x4x8xf32>, tensor<2x8x2x8xf32>, tensor<2x8x2x8xf32>, tensor<2x8xi64>) -> tensor<2x8x4x8xf32>
  return
}

// -----

// attention result
func.func @case43(%a: tensor<2x8x4x8xf32>, %b: tensor<2x8x2x8xf32>, %c: tensor<2x8xi64>) {
  // expected-error @+1 {{result type must equal the query type}}
  %r = l4.attention %a, %b, %b, %c {scale = 0.5 : f64, chunk_size = 0 : i64} : (tensor<2x8x4x8xf32>, tensor<2x8x2x8xf32>, tensor<2x8x2x8xf32>, tensor<2x8xi64>) -> tensor<2x8x4x4xf32>
  return
}

// -----

// attention dtype
func.func @case44(%a: tensor<2x8x4x8xf32>, %b: tensor<2x8x2x8xbf16>, %c: tensor<2x8xi64>) {
  // expected-error @+1 {{key element type 'bf16' must match query element type 'f32'}}
  %r = l4.attention %a, %b, %b, %c {scale = 0.5 : f64, chunk_size = 0 : i64} : (tensor<2x8x4x8xf32>, tensor<2x8x2x8xbf16>, tensor<2x8x2x8xbf16>, tensor<2x8xi64>) -> tensor<2x8x4x8xf32>
  return
}

// -----

// router rank
func.func @case45(%a: tensor<8x4xf32>) {
  // expected-error @+1 {{logits must have rank 3, got [8, 4]}}
  %r = l4.router_scores %a {top_k = 1 : i64} : (tensor<8x4xf32>) -> tensor<8x4xf32>
  return
}

// -----

// router top_k
func.func @case46(%a: tensor<2x8x4xf32>) {
  // expected-error @+1 {{top_k must be in [1, 4] (the number of experts), got 5}}
  %r = l4.router_scores %a {top_k = 5 : i64} : (tensor<2x8x4xf32>) -> tensor<2x8x4xf32>
  return
}

// -----

// moe input rank
func.func @case47(%a: tensor<8x32xf32>, %b: tensor<1x8x4xf32>, %c: tensor<4x32x48xf32>, %d: tensor<4x24x32xf32>) {
  // expected-error @+1 {{input must have rank 3, got [8, 32]}}
  %r = l4.moe_experts %a, %b, %c, %d : (tensor<8x32xf32>, tensor<1x8x4xf32>, tensor<4x32x48xf32>, tensor<4x24x32xf32>) -> tensor<8x32xf32>
  return
}

// -----

// moe odd gate_up
func.func @case48(%a: tensor<1x8x32xf32>, %b: tensor<1x8x4xf32>, %c: tensor<4x32x47xf32>, %d: tensor<4x24x32xf32>) {
  // expected-error @+1 {{gate_up dimension 2 must be even (gate | up), got 47}}
  %r = l4.moe_experts %a, %b, %c, %d : (tensor<1x8x32xf32>, tensor<1x8x4xf32>, tensor<4x32x47xf32>, tensor<4x24x32xf32>) -> tensor<1x8x32xf32>
  return
}

// -----

// moe scores
func.func @case49(%a: tensor<1x8x32xf32>, %b: tensor<1x8x3xf32>, %c: tensor<4x32x48xf32>, %d: tensor<4x24x32xf32>) {
  // expected-error @+1 {{scores must have shape [1, 8, 4], got [1, 8, 3]}}
  %r = l4.moe_experts %a, %b, %c, %d : (tensor<1x8x32xf32>, tensor<1x8x3xf32>, tensor<4x32x48xf32>, tensor<4x24x32xf32>) -> tensor<1x8x32xf32>
  return
}

// -----

// moe gate_up
func.func @case50(%a: tensor<1x8x32xf32>, %b: tensor<1x8x4xf32>, %c: tensor<4x16x48xf32>, %d: tensor<4x24x32xf32>) {
  // expected-error @+1 {{gate_up must have shape [4, 32, 48], got [4, 16, 48]}}
  %r = l4.moe_experts %a, %b, %c, %d : (tensor<1x8x32xf32>, tensor<1x8x4xf32>, tensor<4x16x48xf32>, tensor<4x24x32xf32>) -> tensor<1x8x32xf32>
  return
}

// -----

// moe down
func.func @case51(%a: tensor<1x8x32xf32>, %b: tensor<1x8x4xf32>, %c: tensor<4x32x48xf32>, %d: tensor<4x32x32xf32>) {
  // expected-error @+1 {{down must have shape [4, 24, 32], got [4, 32, 32]}}
  %r = l4.moe_experts %a, %b, %c, %d : (tensor<1x8x32xf32>, tensor<1x8x4xf32>, tensor<4x32x48xf32>, tensor<4x32x32xf32>) -> tensor<1x8x32xf32>
  return
}

// -----

// moe result
func.func @case52(%a: tensor<1x8x32xf32>, %b: tensor<1x8x4xf32>, %c: tensor<4x32x48xf32>, %d: tensor<4x24x32xf32>) {
  // expected-error @+1 {{result type must equal the input type}}
  %r = l4.moe_experts %a, %b, %c, %d : (tensor<1x8x32xf32>, tensor<1x8x4xf32>, tensor<4x32x48xf32>, tensor<4x24x32xf32>) -> tensor<1x8x32xbf16>
  return
}

// -----

// take_last rank
func.func @case53(%a: tensor<2x8xf32>) {
  // expected-error @+1 {{input must have rank 3, got [2, 8]}}
  %r = l4.take_last %a : (tensor<2x8xf32>) -> tensor<2x1xf32>
  return
}

// -----

// take_last shape
func.func @case54(%a: tensor<2x8x32xf32>) {
  // expected-error @+1 {{result must have shape [2, 1, 32], got [2, 8, 32]}}
  %r = l4.take_last %a : (tensor<2x8x32xf32>) -> tensor<2x8x32xf32>
  return
}

// -----

// take_last dtype
func.func @case55(%a: tensor<2x8x32xf32>) {
  // expected-error @+1 {{result element type 'bf16' must match input element type 'f32'}}
  %r = l4.take_last %a : (tensor<2x8x32xf32>) -> tensor<2x1x32xbf16>
  return
}

// -----

// add types
func.func @case56(%a: tensor<2x8xf32>, %b: tensor<2x4xf32>) {
  // expected-error @+1 {{requires the same type for all operands and results}}
  %r = l4.add %a, %b : (tensor<2x8xf32>, tensor<2x4xf32>) -> tensor<2x8xf32>
  return
}

// -----

// router top_k below 1
func.func @case_topk0(%a: tensor<2x8x4xf32>) {
  // expected-error @+1 {{top_k must be in [1, 4] (the number of experts), got 0}}
  %r = l4.router_scores %a {top_k = 0 : i64} : (tensor<2x8x4xf32>) -> tensor<2x8x4xf32>
  return
}

// -----

// embedding padding_idx outside the table
func.func @pad_embedding(%a: tensor<64x32xf32>, %b: tensor<2x8xi64>) {
  // expected-error @+1 {{padding_idx must be in [0, 64) (the table's rows), got 64}}
  %r = l4.embedding %a, %b {padding_idx = 64 : i64} : (tensor<64x32xf32>, tensor<2x8xi64>) -> tensor<2x8x32xf32>
  return
}

// -----

// embedding_grad padding_idx negative
func.func @pad_embedding_grad(%ids: tensor<2x8xi64>, %g: tensor<2x8x32xf32>) {
  // expected-error @+1 {{padding_idx must be in [0, 64) (the table's rows), got -1}}
  %r = l4.embedding_grad %ids, %g {padding_idx = -1 : i64} : (tensor<2x8xi64>, tensor<2x8x32xf32>) -> tensor<64x32xf32>
  return
}

// -----

// slice_rows past the input's rows
func.func @slice_rows_range(%w: tensor<16x8xf32>) {
  // expected-error @+1 {{rows [12, 18) do not lie in the input's 16}}
  %r = l4.slice_rows %w {offset = 12 : i64} : (tensor<16x8xf32>) -> tensor<6x8xf32>
  return
}

// -----

// slice_rows with other columns
func.func @slice_rows_cols(%w: tensor<16x8xf32>) {
  // expected-error @+1 {{must be rows of the input}}
  %r = l4.slice_rows %w {offset = 0 : i64} : (tensor<16x8xf32>) -> tensor<6x4xf32>
  return
}

// -----

// concat_rows whose inputs do not add up
func.func @concat_rows_count(%a: tensor<6x8xf32>, %b: tensor<6x8xf32>) {
  // expected-error @+1 {{inputs hold 12 rows, the result 16}}
  %r = l4.concat_rows %a, %b : (tensor<6x8xf32>, tensor<6x8xf32>) -> tensor<16x8xf32>
  return
}

// -----

// cross_entropy_stats columns beyond the vocabulary
func.func @stats_range(%l: tensor<1x4x6xf32>, %ids: tensor<1x4xi64>, %p: tensor<1x4x2xf32>) {
  // expected-error @+1 {{vocabulary columns [12, 18) do not lie in [0, 16)}}
  %r = l4.cross_entropy_stats %l, %ids, %p {vocab_offset = 12 : i64, vocab_size = 16 : i64} : (tensor<1x4x6xf32>, tensor<1x4xi64>, tensor<1x4x2xf32>) -> tensor<1x4x2xf32>
  return
}

// -----

// a stats chain that does not start at column 0
func.func @stats_first(%l: tensor<1x4x6xf32>, %ids: tensor<1x4xi64>) {
  // expected-error @+1 {{a chain's first chunk (no prev) must start at column 0, not 6}}
  %r = l4.cross_entropy_stats %l, %ids {vocab_offset = 6 : i64, vocab_size = 16 : i64} : (tensor<1x4x6xf32>, tensor<1x4xi64>) -> tensor<1x4x2xf32>
  return
}

// -----

// cross_entropy_grad_chunk with statistics of other rows
func.func @grad_chunk_stats(%l: tensor<1x4x6xf32>, %ids: tensor<1x4xi64>, %s: tensor<1x3x2xf32>) {
  // expected-error @+1 {{stats must have shape [1, 4, 2], got [1, 3, 2]}}
  %r = l4.cross_entropy_grad_chunk %l, %ids, %s {vocab_offset = 0 : i64, vocab_size = 16 : i64} : (tensor<1x4x6xf32>, tensor<1x4xi64>, tensor<1x3x2xf32>) -> tensor<1x4x6xf32>
  return
}

// -----

// convert to another shape
func.func @convert_shape(%x: tensor<2x8xf32>) {
  // expected-error @+1 {{result must have shape [2, 8], got [8, 2]}}
  %r = l4.convert %x : (tensor<2x8xf32>) -> tensor<8x2xbf16>
  return
}
