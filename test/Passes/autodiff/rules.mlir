// RUN: l4-opt %s --split-input-file --l4c-autodiff | FileCheck %s

// The attention block's rules: attention's adjoint gives q, k and v their
// gradients (one op, with the forward's scale and chunk size); temperature
// scaling is its own adjoint; l2_norm's reads the forward input. The key is
// also the value here, so its two gradients are summed.
// CHECK-LABEL: func.func @attention_block
// CHECK: %[[Q2:.+]] = l4.l2_norm %[[Q:[^ ]+]] {eps
// CHECK: %[[Q3:.+]] = l4.temperature_scale %[[Q2]], %[[POS:[^ ]+]] {
// CHECK: %[[O:.+]] = l4.attention %[[Q3]], %[[K:[^ ,]+]], %[[K]], %[[POS]] {chunk_size = 4 : i64, scale = 5.000000e-01 : f64}
// CHECK: %[[DQ:[^ ,]+]], %[[DK:[^ ,]+]], %[[DV:[^ ,]+]] = l4.attention_grad %[[Q3]], %[[K]], %[[K]], %[[POS]], %{{[^ ]+}} {chunk_size = 4 : i64, scale = 5.000000e-01 : f64}
// CHECK: %[[DKV:.+]] = l4.add %[[DK]], %[[DV]]
// CHECK: %[[DQ2:.+]] = l4.temperature_scale %[[DQ]], %[[POS]] {attn_scale = 1.000000e-01 : f64, floor_scale = 8.000000e+00 : f64}
// CHECK: %[[DQ1:.+]] = l4.l2_norm_grad %[[Q]], %[[DQ2]] {eps = 9.9999999999999995E-7 : f64}
// CHECK: return %{{[^ ,]+}}, %[[DQ1]], %[[DKV]],
func.func @attention_block(%ids: tensor<1x4xi64> {l4.input = "input_ids"}, %pos: tensor<1x4xi64> {l4.input = "positions"},
    %q: tensor<1x4x2x4xf32> {l4.weight = "q"}, %k: tensor<1x4x1x4xf32> {l4.weight = "k"},
    %head: tensor<16x8xf32> {l4.weight = "head"}) -> (tensor<f32> {l4.output = "loss"}) attributes {l4.autodiff} {
  %q2 = l4.l2_norm %q {eps = 1.0e-6 : f64} : (tensor<1x4x2x4xf32>) -> tensor<1x4x2x4xf32>
  %q3 = l4.temperature_scale %q2, %pos {floor_scale = 8.0 : f64, attn_scale = 0.1 : f64} : (tensor<1x4x2x4xf32>, tensor<1x4xi64>) -> tensor<1x4x2x4xf32>
  %o = l4.attention %q3, %k, %k, %pos {scale = 0.5 : f64, chunk_size = 4 : i64} : (tensor<1x4x2x4xf32>, tensor<1x4x1x4xf32>, tensor<1x4x1x4xf32>, tensor<1x4xi64>) -> tensor<1x4x2x4xf32>
  %h = l4.reshape %o : (tensor<1x4x2x4xf32>) -> tensor<1x4x8xf32>
  %y = l4.linear %h, %head : (tensor<1x4x8xf32>, tensor<16x8xf32>) -> tensor<1x4x16xf32>
  %loss = l4.cross_entropy %y, %ids : (tensor<1x4x16xf32>, tensor<1x4xi64>) -> tensor<f32>
  return %loss : tensor<f32>
}

// -----

// The MoE block's rules: moe_experts' adjoint gives the input, the routing
// scores and both expert weights their gradients; the scores' flows through
// router_scores_grad (with top_k: unselected experts get none) to the router
// logits; swiglu's gives gate and up theirs.
// CHECK-LABEL: func.func @moe_block
// CHECK: %[[S:.+]] = l4.router_scores %[[L:[^ ]+]] {top_k = 2 : i64}
// CHECK: %[[R:.+]] = l4.moe_experts %[[X:[^ ,]+]], %[[S]], %[[GU:[^ ,]+]], %[[DN:[^ ]+]] :
// CHECK: %[[G:.+]] = l4.swiglu %[[X]], %[[R]]
// CHECK: %[[DG:[^ ,]+]], %[[DU:[^ ,]+]] = l4.swiglu_grad %[[X]], %[[R]], %{{[^ ]+}} :
// CHECK: %[[DX:[^ ,]+]], %[[DS:[^ ,]+]], %[[DGU:[^ ,]+]], %[[DDN:[^ ,]+]] = l4.moe_experts_grad %[[X]], %[[S]], %[[GU]], %[[DN]], %[[DU]] :
// CHECK: %[[DL:.+]] = l4.router_scores_grad %[[L]], %[[DS]] {top_k = 2 : i64}
// CHECK: return %{{[^ ,]+}}, %[[DL]], %[[DGU]], %[[DDN]]
func.func @moe_block(%ids: tensor<1x1xi64> {l4.input = "input_ids"}, %x: tensor<1x1x32xf32> {l4.input = "x"},
    %logits: tensor<1x1x4xf32> {l4.weight = "router_logits"}, %gu: tensor<4x32x48xf32> {l4.weight = "gate_up"},
    %down: tensor<4x24x32xf32> {l4.weight = "down"}) -> (tensor<f32> {l4.output = "loss"}) attributes {l4.autodiff} {
  %s = l4.router_scores %logits {top_k = 2 : i64} : (tensor<1x1x4xf32>) -> tensor<1x1x4xf32>
  %r = l4.moe_experts %x, %s, %gu, %down : (tensor<1x1x32xf32>, tensor<1x1x4xf32>, tensor<4x32x48xf32>, tensor<4x24x32xf32>) -> tensor<1x1x32xf32>
  %g = l4.swiglu %x, %r : (tensor<1x1x32xf32>, tensor<1x1x32xf32>) -> tensor<1x1x32xf32>
  %loss = l4.cross_entropy %g, %ids : (tensor<1x1x32xf32>, tensor<1x1xi64>) -> tensor<f32>
  return %loss : tensor<f32>
}
