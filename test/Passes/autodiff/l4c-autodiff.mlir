// RUN: l4-opt %s --split-input-file --l4c-autodiff --verify-diagnostics | FileCheck %s

// linear -> loss: the weight gradient is dy^T x with dy from the loss.
// CHECK-LABEL: func.func @head
// CHECK-SAME: -> (tensor<f32> {l4.output = "loss"}, tensor<16x8xf32> {l4.output = "grad.lm_head.weight"})
// CHECK-NOT: l4.autodiff
// CHECK: %[[LOGITS:.+]] = l4.linear %[[X:.+]], %[[W:.+]] :
// CHECK: %[[LOSS:.+]] = l4.cross_entropy %[[LOGITS]], %[[IDS:.+]] :
// CHECK: %[[DY:.+]] = l4.cross_entropy_grad %[[LOGITS]], %[[IDS]]
// CHECK: %[[DW:.+]] = l4.linear_grad_weight %[[X]], %[[DY]] : (tensor<1x4x8xf32>, tensor<1x4x16xf32>) -> tensor<16x8xf32>
// CHECK: return %[[LOSS]], %[[DW]]
func.func @head(%ids: tensor<1x4xi64> {l4.input = "input_ids"}, %x: tensor<1x4x8xf32> {l4.input = "x"},
    %w: tensor<16x8xf32> {l4.weight = "lm_head.weight"}) -> (tensor<f32> {l4.output = "loss"})
    attributes {l4.autodiff} {
  %y = l4.linear %x, %w : (tensor<1x4x8xf32>, tensor<16x8xf32>) -> tensor<1x4x16xf32>
  %loss = l4.cross_entropy %y, %ids : (tensor<1x4x16xf32>, tensor<1x4xi64>) -> tensor<f32>
  return %loss : tensor<f32>
}

// -----

// A weight used twice (tied embeddings) gets its two contributions summed;
// a residual's adjoint reaches both branches; RoPE's adjoint is the inverse
// rotation and rms_norm's gives both gradients.
// CHECK-LABEL: func.func @tied
// CHECK-SAME: {l4.output = "grad.table"}, tensor<8xf32> {l4.output = "grad.norm"})
// CHECK: l4.cross_entropy_grad
// CHECK: %[[DXH:.+]] = l4.linear_grad_input
// CHECK: %[[DT1:.+]] = l4.linear_grad_weight
// CHECK: %[[NDX:[^ ,]+]], %[[NDW:[^ ,]+]] = l4.rms_norm_grad
// CHECK: %[[ACC:.+]] = l4.add %[[DXH]], %[[NDX]]
// CHECK: %[[DR:.+]] = l4.reshape %[[ACC]]
// CHECK: l4.rope %[[DR]], %{{.+}} {inverse = true, scaling = #l4<rope_scaling none>, theta = 1.000000e+04 : f64}
// CHECK: %[[DT2:.+]] = l4.embedding_grad
// CHECK: %[[DT:.+]] = l4.add %[[DT1]], %[[DT2]]
// CHECK: return %{{.+}}, %[[DT]], %[[NDW]]
func.func @tied(%ids: tensor<1x4xi64> {l4.input = "input_ids"}, %pos: tensor<1x4xi64> {l4.input = "positions"},
    %table: tensor<16x8xf32> {l4.weight = "table"}, %norm: tensor<8xf32> {l4.weight = "norm"})
    -> (tensor<f32> {l4.output = "loss"}) attributes {l4.autodiff} {
  %e = l4.embedding %table, %ids : (tensor<16x8xf32>, tensor<1x4xi64>) -> tensor<1x4x8xf32>
  %e4 = l4.reshape %e : (tensor<1x4x8xf32>) -> tensor<1x4x2x4xf32>
  %r4 = l4.rope %e4, %pos {theta = 1.0e4 : f64, scaling = #l4<rope_scaling none>} : (tensor<1x4x2x4xf32>, tensor<1x4xi64>) -> tensor<1x4x2x4xf32>
  %r = l4.reshape %r4 : (tensor<1x4x2x4xf32>) -> tensor<1x4x8xf32>
  %n = l4.rms_norm %r, %norm {eps = 1.0e-5 : f64} : (tensor<1x4x8xf32>, tensor<8xf32>) -> tensor<1x4x8xf32>
  %h = l4.add %r, %n : (tensor<1x4x8xf32>, tensor<1x4x8xf32>) -> tensor<1x4x8xf32>
  %y = l4.linear %h, %table : (tensor<1x4x8xf32>, tensor<16x8xf32>) -> tensor<1x4x16xf32>
  %loss = l4.cross_entropy %y, %ids : (tensor<1x4x16xf32>, tensor<1x4xi64>) -> tensor<f32>
  return %loss : tensor<f32>
}

// -----

// nn.Embedding's padding_idx: the lookup's gradient skips the row, the tied
// head's gradient (linear_grad_weight) does not.
// CHECK-LABEL: func.func @padded
// CHECK: %[[DT1:.+]] = l4.linear_grad_weight
// CHECK: %[[DT2:.+]] = l4.embedding_grad %{{.+}}, %{{.+}} {padding_idx = 3 : i64}
// CHECK: %[[DT:.+]] = l4.add %[[DT1]], %[[DT2]]
// CHECK: return %{{.+}}, %[[DT]]
func.func @padded(%ids: tensor<1x4xi64> {l4.input = "input_ids"},
    %table: tensor<16x8xf32> {l4.weight = "table"}) -> (tensor<f32> {l4.output = "loss"}) attributes {l4.autodiff} {
  %e = l4.embedding %table, %ids {padding_idx = 3 : i64} : (tensor<16x8xf32>, tensor<1x4xi64>) -> tensor<1x4x8xf32>
  %y = l4.linear %e, %table : (tensor<1x4x8xf32>, tensor<16x8xf32>) -> tensor<1x4x16xf32>
  %loss = l4.cross_entropy %y, %ids : (tensor<1x4x16xf32>, tensor<1x4xi64>) -> tensor<f32>
  return %loss : tensor<f32>
}

// -----

// Ops only inference uses (take_last, the KV cache) have no rule.
func.func @last(%ids: tensor<1x1xi64> {l4.input = "input_ids"}, %x: tensor<1x4x8xf32> {l4.input = "x"},
    %w: tensor<16x8xf32> {l4.weight = "w"}) -> (tensor<f32> {l4.output = "loss"}) attributes {l4.autodiff} {
  // expected-error @+1 {{has no vector-Jacobian rule}}
  %l = l4.take_last %x : (tensor<1x4x8xf32>) -> tensor<1x1x8xf32>
  %y = l4.linear %l, %w : (tensor<1x1x8xf32>, tensor<16x8xf32>) -> tensor<1x1x16xf32>
  %loss = l4.cross_entropy %y, %ids : (tensor<1x1x16xf32>, tensor<1x1xi64>) -> tensor<f32>
  return %loss : tensor<f32>
}

// -----

// expected-error @+1 {{must return exactly one value, an l4.cross_entropy loss}}
func.func @no_loss(%x: tensor<1x4x8xf32> {l4.input = "x"}) -> (tensor<1x4x8xf32>) attributes {l4.autodiff} {
  return %x : tensor<1x4x8xf32>
}
