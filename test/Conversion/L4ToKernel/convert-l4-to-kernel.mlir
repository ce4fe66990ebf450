// RUN: l4-opt %s --split-input-file --convert-l4-to-kernel | FileCheck %s

// Each compute op gets its own kernel named after its location; reshapes stay
// outside as views.
// CHECK-LABEL: func.func @block
// CHECK-SAME: (%[[X:.+]]: tensor<1x4x8xf32>, %[[W:.+]]: tensor<8xf32>, %[[Q:.+]]: tensor<8x8xf32>)
func.func @block(%x: tensor<1x4x8xf32>, %w: tensor<8xf32>, %q: tensor<8x8xf32>) -> tensor<1x4x2x4xf32> {
  // CHECK: %[[N:.+]] = kernel.group "model.norm" kind "norm"(%[[X]], %[[W]]) : (tensor<1x4x8xf32>, tensor<8xf32>) -> tensor<1x4x8xf32> {
  // CHECK-NEXT: ^bb0(%[[A:.+]]: tensor<1x4x8xf32>, %[[B:.+]]: tensor<8xf32>):
  // CHECK-NEXT: %[[R:.+]] = l4.rms_norm %[[A]], %[[B]] {eps = 1.000000e-05 : f64}
  // CHECK-NEXT: kernel.yield %[[R]]
  %n = l4.rms_norm %x, %w {eps = 1.0e-5 : f64} : (tensor<1x4x8xf32>, tensor<8xf32>) -> tensor<1x4x8xf32> loc("model.norm")
  // CHECK: %[[L:.+]] = kernel.group "q_proj" kind "gemm"(%[[N]], %[[Q]])
  // CHECK: l4.linear
  %l = l4.linear %n, %q : (tensor<1x4x8xf32>, tensor<8x8xf32>) -> tensor<1x4x8xf32> loc("q_proj")
  // CHECK-NOT: kernel.group {{.*}}reshape
  // CHECK: %[[V:.+]] = l4.reshape %[[L]]
  %v = l4.reshape %l : (tensor<1x4x8xf32>) -> tensor<1x4x2x4xf32>
  // An op without a name location is named after the op.
  // CHECK: kernel.group "l2_norm" kind "norm"(%[[V]])
  %o = l4.l2_norm %v {eps = 1.0e-5 : f64} : (tensor<1x4x2x4xf32>) -> tensor<1x4x2x4xf32>
  return %o : tensor<1x4x2x4xf32>
}

// -----

// CHECK-LABEL: func.func @kinds
func.func @kinds(%ids: tensor<1x4xi64>, %t: tensor<16x8xf32>, %r: tensor<2x8xf32>,
    %gu: tensor<2x8x12xf32>, %d: tensor<2x6x8xf32>) -> tensor<1x1x8xf32> {
  // CHECK: kind "gather"
  %h = l4.embedding %t, %ids : (tensor<16x8xf32>, tensor<1x4xi64>) -> tensor<1x4x8xf32>
  // CHECK: kind "gemm"
  %lg = l4.linear %h, %r : (tensor<1x4x8xf32>, tensor<2x8xf32>) -> tensor<1x4x2xf32>
  // CHECK: kind "router"
  %s = l4.router_scores %lg {top_k = 1 : i64} : (tensor<1x4x2xf32>) -> tensor<1x4x2xf32>
  // CHECK: kind "moe"
  %m = l4.moe_experts %h, %s, %gu, %d : (tensor<1x4x8xf32>, tensor<1x4x2xf32>, tensor<2x8x12xf32>, tensor<2x6x8xf32>) -> tensor<1x4x8xf32>
  // CHECK: kind "elementwise"
  %a = l4.add %h, %m : (tensor<1x4x8xf32>, tensor<1x4x8xf32>) -> tensor<1x4x8xf32>
  // CHECK: kind "copy"
  %last = l4.take_last %a : (tensor<1x4x8xf32>) -> tensor<1x1x8xf32>
  return %last : tensor<1x1x8xf32>
}
