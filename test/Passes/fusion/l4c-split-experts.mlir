// RUN: l4-opt %s --split-input-file --l4c-split-experts --verify-diagnostics --mlir-print-debuginfo | FileCheck %s

// The router's top_k sets the slots; the activations between the halves are
// f32 in a bf16 program too; the halves are named after the experts.
// CHECK-LABEL: func.func @moe
// CHECK: %[[S:.*]] = l4.router_scores
// CHECK: %[[H:.*]] = l4.moe_hidden %{{.*}}, %[[S]], %{{.*}} : (tensor<1x8x16xbf16>, tensor<1x8x4xbf16>, tensor<4x16x64xbf16>) -> tensor<1x8x2x32xf32> loc(#[[GU:.*]])
// CHECK: %[[Y:.*]] = l4.moe_down %[[H]], %[[S]], %{{.*}} : (tensor<1x8x2x32xf32>, tensor<1x8x4xbf16>, tensor<4x32x16xbf16>) -> tensor<1x8x16xbf16> loc(#[[DN:.*]])
// CHECK-NOT: l4.moe_experts
// CHECK: return %[[Y]]
// CHECK-DAG: #[[GU]] = loc("layers.1.experts.gate_up")
// CHECK-DAG: #[[DN]] = loc("layers.1.experts.down")
func.func @moe(%x: tensor<1x8x16xbf16>, %r: tensor<1x8x4xbf16>, %gu: tensor<4x16x64xbf16>, %dn: tensor<4x32x16xbf16>) -> tensor<1x8x16xbf16> {
  %s = l4.router_scores %r {top_k = 2 : i64} : (tensor<1x8x4xbf16>) -> tensor<1x8x4xbf16>
  %y = l4.moe_experts %x, %s, %gu, %dn : (tensor<1x8x16xbf16>, tensor<1x8x4xbf16>, tensor<4x16x64xbf16>, tensor<4x32x16xbf16>) -> tensor<1x8x16xbf16> loc("layers.1.experts")
  return %y : tensor<1x8x16xbf16>
}

// -----

// Scores that do not come from a router may select any expert: one slot
// per expert.
// CHECK-LABEL: func.func @any
// CHECK: l4.moe_hidden {{.*}} -> tensor<1x8x4x32xf32>
func.func @any(%x: tensor<1x8x16xf32>, %s: tensor<1x8x4xf32>, %gu: tensor<4x16x64xf32>, %dn: tensor<4x32x16xf32>) -> tensor<1x8x16xf32> {
  %y = l4.moe_experts %x, %s, %gu, %dn : (tensor<1x8x16xf32>, tensor<1x8x4xf32>, tensor<4x16x64xf32>, tensor<4x32x16xf32>) -> tensor<1x8x16xf32>
  return %y : tensor<1x8x16xf32>
}

// -----

func.func @bad_slots(%x: tensor<1x8x16xf32>, %s: tensor<1x8x4xf32>, %gu: tensor<4x16x64xf32>) -> tensor<1x8x5x32xf32> {
  // expected-error @+1 {{result slots 5 must be in [1, 4] (the experts a token may use)}}
  %h = l4.moe_hidden %x, %s, %gu : (tensor<1x8x16xf32>, tensor<1x8x4xf32>, tensor<4x16x64xf32>) -> tensor<1x8x5x32xf32>
  return %h : tensor<1x8x5x32xf32>
}

// -----

func.func @bad_type(%x: tensor<1x8x16xbf16>, %s: tensor<1x8x4xbf16>, %gu: tensor<4x16x64xbf16>) -> tensor<1x8x1x32xbf16> {
  // expected-error @+1 {{result must be f32}}
  %h = l4.moe_hidden %x, %s, %gu : (tensor<1x8x16xbf16>, tensor<1x8x4xbf16>, tensor<4x16x64xbf16>) -> tensor<1x8x1x32xbf16>
  return %h : tensor<1x8x1x32xbf16>
}
