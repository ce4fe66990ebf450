// RUN: l4-opt %s | l4-opt | FileCheck %s
// Round trip of every l4 op through the printer and parser.

// CHECK-LABEL: func.func @attention_block
func.func @attention_block(%ids: tensor<2x8xi64>, %pos: tensor<2x8xi64>,
    %table: tensor<64x32xf32>, %norm: tensor<32xf32>, %wq: tensor<32x32xf32>,
    %wk: tensor<16x32xf32>) -> tensor<2x8x4x8xf32> {
  // CHECK: %[[H:.+]] = l4.embedding %{{.+}}, %{{.+}} : (tensor<64x32xf32>, tensor<2x8xi64>) -> tensor<2x8x32xf32>
  %h = l4.embedding %table, %ids : (tensor<64x32xf32>, tensor<2x8xi64>) -> tensor<2x8x32xf32>
  // CHECK: %[[X:.+]] = l4.rms_norm %[[H]], %{{.+}} {eps = 1.000000e-05 : f64}
  %x = l4.rms_norm %h, %norm {eps = 1.0e-5 : f64} : (tensor<2x8x32xf32>, tensor<32xf32>) -> tensor<2x8x32xf32>
  // CHECK: l4.linear %[[X]], %{{.+}} : (tensor<2x8x32xf32>, tensor<32x32xf32>) -> tensor<2x8x32xf32>
  %q0 = l4.linear %x, %wq : (tensor<2x8x32xf32>, tensor<32x32xf32>) -> tensor<2x8x32xf32>
  %k0 = l4.linear %x, %wk : (tensor<2x8x32xf32>, tensor<16x32xf32>) -> tensor<2x8x16xf32>
  // CHECK: l4.reshape %{{.+}} : (tensor<2x8x32xf32>) -> tensor<2x8x4x8xf32>
  %q1 = l4.reshape %q0 : (tensor<2x8x32xf32>) -> tensor<2x8x4x8xf32>
  %k1 = l4.reshape %k0 : (tensor<2x8x16xf32>) -> tensor<2x8x2x8xf32>
  // Default-valued attributes (low/high factor 1.0) are elided when printed.
  // CHECK: l4.rope %{{.+}}, %{{.+}} {factor = 1.600000e+01 : f64, original_max_position = 64 : i64, scaling = #l4<rope_scaling llama3>, theta = 5.000000e+05 : f64}
  %q2 = l4.rope %q1, %pos {theta = 5.0e5 : f64, scaling = #l4<rope_scaling llama3>, factor = 16.0 : f64, low_freq_factor = 1.0 : f64, high_freq_factor = 1.0 : f64, original_max_position = 64 : i64} : (tensor<2x8x4x8xf32>, tensor<2x8xi64>) -> tensor<2x8x4x8xf32>
  // CHECK: l4.rope %{{.+}}, %{{.+}} {scaling = #l4<rope_scaling none>, theta = 5.000000e+05 : f64}
  %k2 = l4.rope %k1, %pos {theta = 5.0e5 : f64, scaling = #l4<rope_scaling none>} : (tensor<2x8x2x8xf32>, tensor<2x8xi64>) -> tensor<2x8x2x8xf32>
  // CHECK: l4.l2_norm %{{.+}} {eps = 1.000000e-05 : f64} : (tensor<2x8x4x8xf32>) -> tensor<2x8x4x8xf32>
  %q3 = l4.l2_norm %q2 {eps = 1.0e-5 : f64} : (tensor<2x8x4x8xf32>) -> tensor<2x8x4x8xf32>
  // CHECK: l4.temperature_scale %{{.+}}, %{{.+}} {attn_scale = 1.000000e-01 : f64, floor_scale = 8.000000e+00 : f64}
  %q4 = l4.temperature_scale %q3, %pos {floor_scale = 8.0 : f64, attn_scale = 0.1 : f64} : (tensor<2x8x4x8xf32>, tensor<2x8xi64>) -> tensor<2x8x4x8xf32>
  // CHECK: l4.attention %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}} {chunk_size = 4 : i64, scale = 0.35355339059327373 : f64}
  %o = l4.attention %q4, %k2, %k2, %pos {scale = 0.35355339059327373 : f64, chunk_size = 4 : i64} : (tensor<2x8x4x8xf32>, tensor<2x8x2x8xf32>, tensor<2x8x2x8xf32>, tensor<2x8xi64>) -> tensor<2x8x4x8xf32>
  return %o : tensor<2x8x4x8xf32>
}

// CHECK-LABEL: func.func @cache_and_moe
func.func @cache_and_moe(%cache: tensor<1x16x2x8xf32>, %new: tensor<1x1x2x8xf32>,
    %pos: tensor<1x1xi64>, %x: tensor<1x1x32xf32>, %router: tensor<4x32xf32>,
    %gu: tensor<4x32x48xf32>, %down: tensor<4x24x32xf32>)
    -> (tensor<1x16x2x8xf32>, tensor<1x1x32xf32>) {
  // CHECK: l4.kv_cache_update %{{.+}}, %{{.+}}, %{{.+}} : (tensor<1x16x2x8xf32>, tensor<1x1x2x8xf32>, tensor<1x1xi64>) -> tensor<1x16x2x8xf32>
  %c = l4.kv_cache_update %cache, %new, %pos : (tensor<1x16x2x8xf32>, tensor<1x1x2x8xf32>, tensor<1x1xi64>) -> tensor<1x16x2x8xf32>
  %logits = l4.linear %x, %router : (tensor<1x1x32xf32>, tensor<4x32xf32>) -> tensor<1x1x4xf32>
  // CHECK: %[[S:.+]] = l4.router_scores %{{.+}} {top_k = 2 : i64}
  %s = l4.router_scores %logits {top_k = 2 : i64} : (tensor<1x1x4xf32>) -> tensor<1x1x4xf32>
  // CHECK: %[[R:.+]] = l4.moe_experts %{{.+}}, %[[S]], %{{.+}}, %{{.+}} : (tensor<1x1x32xf32>, tensor<1x1x4xf32>, tensor<4x32x48xf32>, tensor<4x24x32xf32>) -> tensor<1x1x32xf32>
  %r = l4.moe_experts %x, %s, %gu, %down : (tensor<1x1x32xf32>, tensor<1x1x4xf32>, tensor<4x32x48xf32>, tensor<4x24x32xf32>) -> tensor<1x1x32xf32>
  // CHECK: l4.swiglu
  %g = l4.swiglu %x, %r : (tensor<1x1x32xf32>, tensor<1x1x32xf32>) -> tensor<1x1x32xf32>
  // CHECK: l4.add
  %sum = l4.add %g, %r : (tensor<1x1x32xf32>, tensor<1x1x32xf32>) -> tensor<1x1x32xf32>
  return %c, %sum : tensor<1x16x2x8xf32>, tensor<1x1x32xf32>
}

// CHECK-LABEL: func.func @prefill_tail
func.func @prefill_tail(%h: tensor<2x8x32xbf16>) -> tensor<2x1x32xbf16> {
  // CHECK: l4.take_last %{{.+}} : (tensor<2x8x32xbf16>) -> tensor<2x1x32xbf16>
  %t = l4.take_last %h : (tensor<2x8x32xbf16>) -> tensor<2x1x32xbf16>
  return %t : tensor<2x1x32xbf16>
}
