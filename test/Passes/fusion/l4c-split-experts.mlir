// RUN: l4-opt %s --split-input-file --l4c-split-experts --verify-diagnostics --mlir-print-debuginfo | FileCheck %s

// The router's top_k sets the slots; the route table has E + 1 offsets and
// one entry per token and slot; in a program nothing differentiates, the
// activations between the halves have the input's type (bf16 here, as HF's
// bf16 experts round them); the parts are named after the experts.
// CHECK-LABEL: func.func @moe
// CHECK: %[[S:.*]] = l4.router_scores
// CHECK: %[[R:.*]] = l4.moe_route %[[S]] {slots = 2 : i64} : (tensor<1x8x4xbf16>) -> tensor<21xi32> loc(#[[RT:.*]])
// CHECK: %[[H:.*]] = l4.moe_hidden %{{.*}}, %[[S]], %{{.*}}, %[[R]] : (tensor<1x8x16xbf16>, tensor<1x8x4xbf16>, tensor<4x16x64xbf16>, tensor<21xi32>) -> tensor<1x8x2x32xbf16> loc(#[[GU:.*]])
// CHECK: %[[Y:.*]] = l4.moe_down %[[H]], %[[S]], %{{.*}}, %[[R]] : (tensor<1x8x2x32xbf16>, tensor<1x8x4xbf16>, tensor<4x32x16xbf16>, tensor<21xi32>) -> tensor<1x8x16xbf16> loc(#[[DN:.*]])
// CHECK-NOT: l4.moe_experts
// CHECK: return %[[Y]]
// CHECK-DAG: #[[RT]] = loc("layers.1.experts.route")
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
// CHECK: l4.moe_route {{.*}} {slots = 4 : i64} : (tensor<1x8x4xf32>) -> tensor<37xi32>
// CHECK: l4.moe_hidden {{.*}} -> tensor<1x8x4x32xf32>
func.func @any(%x: tensor<1x8x16xf32>, %s: tensor<1x8x4xf32>, %gu: tensor<4x16x64xf32>, %dn: tensor<4x32x16xf32>) -> tensor<1x8x16xf32> {
  %y = l4.moe_experts %x, %s, %gu, %dn : (tensor<1x8x16xf32>, tensor<1x8x4xf32>, tensor<4x16x64xf32>, tensor<4x32x16xf32>) -> tensor<1x8x16xf32>
  return %y : tensor<1x8x16xf32>
}

// -----

// In a training program (the experts' backward in the module) the
// forward's activations stay f32 in bf16 too, like the values between the
// backward's parts.
// CHECK-LABEL: func.func @train_bf16
// CHECK: l4.moe_hidden {{.*}} -> tensor<1x8x1x32xf32>
// CHECK: l4.moe_down {{.*}} : (tensor<1x8x1x32xf32>,
// CHECK: l4.moe_gate_up {{.*}} -> tensor<1x8x1x64xf32>
func.func @train_bf16(%x: tensor<1x8x16xbf16>, %r: tensor<1x8x4xbf16>, %gu: tensor<4x16x64xbf16>, %dn: tensor<4x32x16xbf16>, %dy: tensor<1x8x16xbf16>) -> (tensor<1x8x16xbf16>, tensor<1x8x16xbf16>, tensor<1x8x4xbf16>, tensor<4x16x64xf32>, tensor<4x32x16xf32>) {
  %s = l4.router_scores %r {top_k = 1 : i64} : (tensor<1x8x4xbf16>) -> tensor<1x8x4xbf16>
  %y = l4.moe_experts %x, %s, %gu, %dn : (tensor<1x8x16xbf16>, tensor<1x8x4xbf16>, tensor<4x16x64xbf16>, tensor<4x32x16xbf16>) -> tensor<1x8x16xbf16>
  %dx, %ds, %dgu, %ddn = l4.moe_experts_grad %x, %s, %gu, %dn, %dy : (tensor<1x8x16xbf16>, tensor<1x8x4xbf16>, tensor<4x16x64xbf16>, tensor<4x32x16xbf16>, tensor<1x8x16xbf16>) -> (tensor<1x8x16xbf16>, tensor<1x8x4xbf16>, tensor<4x16x64xf32>, tensor<4x32x16xf32>)
  return %y, %dx, %ds, %dgu, %ddn : tensor<1x8x16xbf16>, tensor<1x8x16xbf16>, tensor<1x8x4xbf16>, tensor<4x16x64xf32>, tensor<4x32x16xf32>
}

// -----

func.func @bad_slots(%x: tensor<1x8x16xf32>, %s: tensor<1x8x4xf32>, %gu: tensor<4x16x64xf32>, %r: tensor<45xi32>) -> tensor<1x8x5x32xf32> {
  // expected-error @+1 {{result slots 5 must be in [1, 4] (the experts a token may use)}}
  %h = l4.moe_hidden %x, %s, %gu, %r : (tensor<1x8x16xf32>, tensor<1x8x4xf32>, tensor<4x16x64xf32>, tensor<45xi32>) -> tensor<1x8x5x32xf32>
  return %h : tensor<1x8x5x32xf32>
}

// -----

func.func @bad_type(%x: tensor<1x8x16xbf16>, %s: tensor<1x8x4xbf16>, %gu: tensor<4x16x64xbf16>, %r: tensor<13xi32>) -> tensor<1x8x1x32xf16> {
  // expected-error @+1 {{result element type 'f16' must match input element type 'bf16'}}
  %h = l4.moe_hidden %x, %s, %gu, %r : (tensor<1x8x16xbf16>, tensor<1x8x4xbf16>, tensor<4x16x64xbf16>, tensor<13xi32>) -> tensor<1x8x1x32xf16>
  return %h : tensor<1x8x1x32xf16>
}

// -----

// The table must be sized for the scores and the slots.
func.func @bad_route(%x: tensor<1x8x16xf32>, %s: tensor<1x8x4xf32>, %gu: tensor<4x16x64xf32>, %r: tensor<12xi32>) -> tensor<1x8x1x32xf32> {
  // expected-error @+1 {{route}}
  %h = l4.moe_hidden %x, %s, %gu, %r : (tensor<1x8x16xf32>, tensor<1x8x4xf32>, tensor<4x16x64xf32>, tensor<12xi32>) -> tensor<1x8x1x32xf32>
  return %h : tensor<1x8x1x32xf32>
}

// -----

func.func @bad_route_slots(%s: tensor<1x8x4xf32>) -> tensor<45xi32> {
  // expected-error @+1 {{slots 5 must be in [1, 4]}}
  %r = l4.moe_route %s {slots = 5 : i64} : (tensor<1x8x4xf32>) -> tensor<45xi32>
  return %r : tensor<45xi32>
}

// -----

func.func @bad_route_type(%s: tensor<1x8x4xf32>) -> tensor<13xi64> {
  // expected-error @+1 {{route must be i32}}
  %r = l4.moe_route %s {slots = 1 : i64} : (tensor<1x8x4xf32>) -> tensor<13xi64>
  return %r : tensor<13xi64>
}

// -----

// The backward: the gate and up projections recomputed, back through the
// down projection and SwiGLU, its weight gradient, back through the gate
// and up projections, the input and score gradients from the slots', and
// the gate/up weight gradient; one route table for forward and backward.
// CHECK-LABEL: func.func @grad
// CHECK: %[[S:.*]] = l4.router_scores
// CHECK: %[[R:.*]] = l4.moe_route %[[S]] {slots = 1 : i64} : (tensor<1x8x4xf32>) -> tensor<13xi32>
// CHECK-NOT: l4.moe_route
// CHECK: %[[GU:.*]] = l4.moe_gate_up %[[X:[^,]*]], %[[S]], %[[W1:[^,]*]], %[[R]] : {{.*}} -> tensor<1x8x1x64xf32> loc(#[[L1:.*]])
// CHECK: %[[DGU:.*]] = l4.moe_down_grad %[[GU]], %[[S]], %[[W2:[^,]*]], %[[DY:[^,]*]], %[[R]] : {{.*}} -> tensor<1x8x1x64xf32>
// CHECK: %[[DDN:.*]] = l4.moe_down_grad_weight %[[GU]], %[[S]], %[[DY]], %[[R]] : {{.*}} -> tensor<4x32x16xf32>
// CHECK: %[[DZ:.*]] = l4.moe_gate_up_grad_input %[[DGU]], %[[S]], %[[W1]], %[[R]] : {{.*}} -> tensor<1x8x1x16xf32>
// CHECK: %[[DX:[^,]*]], %[[DS:[^ ]*]] = l4.moe_combine_grad %[[DZ]], %[[X]], %[[S]] : {{.*}} -> (tensor<1x8x16xf32>, tensor<1x8x4xf32>)
// CHECK: %[[DGW:.*]] = l4.moe_gate_up_grad_weight %[[X]], %[[S]], %[[DGU]], %[[R]] : {{.*}} -> tensor<4x16x64xf32>
// CHECK-NOT: l4.moe_experts_grad
// CHECK: return %{{.*}}, %[[DX]], %[[DS]], %[[DGW]], %[[DDN]]
// CHECK-DAG: #[[L1]] = loc("layers.1.experts.gate_up_recompute")
func.func @grad(%x: tensor<1x8x16xf32>, %r: tensor<1x8x4xf32>, %gu: tensor<4x16x64xf32>, %dn: tensor<4x32x16xf32>, %dy: tensor<1x8x16xf32>) -> (tensor<1x8x16xf32>, tensor<1x8x16xf32>, tensor<1x8x4xf32>, tensor<4x16x64xf32>, tensor<4x32x16xf32>) {
  %s = l4.router_scores %r {top_k = 1 : i64} : (tensor<1x8x4xf32>) -> tensor<1x8x4xf32>
  %y = l4.moe_experts %x, %s, %gu, %dn : (tensor<1x8x16xf32>, tensor<1x8x4xf32>, tensor<4x16x64xf32>, tensor<4x32x16xf32>) -> tensor<1x8x16xf32> loc("layers.1.experts")
  %dx, %ds, %dgu, %ddn = l4.moe_experts_grad %x, %s, %gu, %dn, %dy : (tensor<1x8x16xf32>, tensor<1x8x4xf32>, tensor<4x16x64xf32>, tensor<4x32x16xf32>, tensor<1x8x16xf32>) -> (tensor<1x8x16xf32>, tensor<1x8x4xf32>, tensor<4x16x64xf32>, tensor<4x32x16xf32>) loc("layers.1.experts")
  return %y, %dx, %ds, %dgu, %ddn : tensor<1x8x16xf32>, tensor<1x8x16xf32>, tensor<1x8x4xf32>, tensor<4x16x64xf32>, tensor<4x32x16xf32>
}

// -----

func.func @bad_combine(%dz: tensor<1x8x2x16xf32>, %x: tensor<1x8x16xf32>, %s: tensor<1x8x4xf32>) -> (tensor<1x8x16xf32>, tensor<1x8x16xf32>) {
  // expected-error @+1 {{scores_grad type}}
  %dx, %ds = l4.moe_combine_grad %dz, %x, %s : (tensor<1x8x2x16xf32>, tensor<1x8x16xf32>, tensor<1x8x4xf32>) -> (tensor<1x8x16xf32>, tensor<1x8x16xf32>)
  return %dx, %ds : tensor<1x8x16xf32>, tensor<1x8x16xf32>
}

// -----

func.func @bad_down_grad(%g: tensor<1x8x1x64xf32>, %s: tensor<1x8x4xf32>, %dn: tensor<4x16x16xf32>, %dy: tensor<1x8x16xf32>, %r: tensor<13xi32>) -> tensor<1x8x1x64xf32> {
  // expected-error @+1 {{gate_up_out must have shape [1, 8, 1, 32]}}
  %d = l4.moe_down_grad %g, %s, %dn, %dy, %r : (tensor<1x8x1x64xf32>, tensor<1x8x4xf32>, tensor<4x16x16xf32>, tensor<1x8x16xf32>, tensor<13xi32>) -> tensor<1x8x1x64xf32>
  return %d : tensor<1x8x1x64xf32>
}
