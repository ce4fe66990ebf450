// RUN: l4-opt %s --l4c-autodiff=recompute=layers | FileCheck %s
// RUN: l4-opt %s --l4c-autodiff | FileCheck %s --check-prefix=KEEP
// RUN: l4-opt %s --l4c-autodiff=recompute=layers --canonicalize --cse | FileCheck %s --check-prefix=CSE
// RUN: not l4-opt %s --l4c-autodiff=recompute=all 2>&1 | FileCheck %s --check-prefix=BAD

// Activation checkpointing: the backward sweep re-runs layer 0 (the norm and
// the projection, located model.layers.0.*) from the layer's input %x, and
// the layer's vector-Jacobian products read the recomputed values; ops
// outside the layers (the head) are not recomputed.
// CHECK-LABEL: func.func @layer
// CHECK: %[[N:.+]] = l4.rms_norm %[[X:[^ ,]+]], %[[G:[^ ]+]] {eps
// CHECK: %[[P:.+]] = l4.linear %[[N]], %[[W:[^ ]+]] :
// CHECK: %[[H:.+]] = l4.add %[[X]], %[[P]]
// CHECK: %[[Y:.+]] = l4.linear %[[H]], %[[HEAD:[^ ]+]] :
// CHECK: %[[DY:.+]] = l4.cross_entropy_grad %[[Y]]
// CHECK: %[[DH:.+]] = l4.linear_grad_input %[[DY]], %[[HEAD]]
// CHECK: l4.linear_grad_weight %[[H]], %[[DY]]
// CHECK: %[[RN:.+]] = l4.rms_norm %[[X]], %[[G]] {eps = {{.*}}, l4.recomputed}
// CHECK: %[[RP:.+]] = l4.linear %[[RN]], %[[W]] {l4.recomputed}
// CHECK: l4.add %[[X]], %[[RP]] {l4.recomputed}
// CHECK: l4.linear_grad_input %[[DH]], %[[W]]
// CHECK: l4.linear_grad_weight %[[RN]], %[[DH]]
// CHECK: l4.rms_norm_grad %[[X]], %[[G]]

// Without the option nothing is recomputed.
// KEEP-NOT: l4.recomputed

// CSE keeps the recomputation (the marker makes the ops distinct); the
// unused recomputed residual add is dead and goes.
// CSE-COUNT-2: l4.rms_norm %
// CSE-NOT: l4.add %{{.*}} {l4.recomputed}

// BAD: l4c-autodiff: recompute must be none or layers, got 'all'
func.func @layer(%ids: tensor<1x4xi64> {l4.input = "input_ids"}, %x: tensor<1x4x8xf32> {l4.input = "x"},
    %g: tensor<8xf32> {l4.weight = "model.layers.0.input_layernorm.weight"},
    %w: tensor<8x8xf32> {l4.weight = "model.layers.0.proj.weight"},
    %head: tensor<16x8xf32> {l4.weight = "lm_head.weight"}) -> (tensor<f32> {l4.output = "loss"})
    attributes {l4.autodiff} {
  %n = l4.rms_norm %x, %g {eps = 1.0e-5 : f64} : (tensor<1x4x8xf32>, tensor<8xf32>) -> tensor<1x4x8xf32> loc("model.layers.0.input_layernorm")
  %p = l4.linear %n, %w : (tensor<1x4x8xf32>, tensor<8x8xf32>) -> tensor<1x4x8xf32> loc("model.layers.0.proj")
  %h = l4.add %x, %p : (tensor<1x4x8xf32>, tensor<1x4x8xf32>) -> tensor<1x4x8xf32> loc("model.layers.0.residual")
  %y = l4.linear %h, %head : (tensor<1x4x8xf32>, tensor<16x8xf32>) -> tensor<1x4x16xf32> loc("lm_head")
  %loss = l4.cross_entropy %y, %ids : (tensor<1x4x16xf32>, tensor<1x4xi64>) -> tensor<f32> loc("loss")
  return %loss : tensor<f32>
}
