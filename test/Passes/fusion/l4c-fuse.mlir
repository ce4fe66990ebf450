// RUN: l4-opt %s --split-input-file --convert-l4-to-kernel --l4c-fuse | FileCheck %s
// RUN: l4-opt %s --split-input-file --convert-l4-to-kernel --l4c-fuse=fusions=none | FileCheck %s --check-prefix=NONE
// RUN: l4-opt %s --split-input-file --convert-l4-to-kernel --l4c-fuse=fusions=epilogue | FileCheck %s --check-prefix=EPI
// RUN: not l4-opt %s --split-input-file --convert-l4-to-kernel --l4c-fuse=fusions=qkvo 2>&1 | FileCheck %s --check-prefix=BAD
// RUN: l4-opt %s --split-input-file --convert-l4-to-kernel --l4c-fuse --l4c-plan-memory | FileCheck %s --check-prefix=MEM

// BAD: l4c-fuse: unknown fusion 'qkvo' (expected all, none, epilogue, swiglu, norm, rope, qkv, cache or router)

// A dense feed-forward block: the norm, both projections and SwiGLU become
// one kernel, the down projection and the residual another.
// CHECK-LABEL: func.func @mlp
// CHECK: kernel.group "mlp.gate_proj+up_proj+act+norm" kind "gemm"(%arg0, %arg1, %arg2, %arg3)
// CHECK-NEXT: ^bb0
// CHECK-NEXT: %[[N:.*]] = l4.rms_norm
// CHECK-NEXT: %[[G:.*]] = l4.linear %[[N]], %{{.*}}
// CHECK-NEXT: %[[U:.*]] = l4.linear %[[N]], %{{.*}}
// CHECK-NEXT: %[[A:.*]] = l4.swiglu %[[G]], %[[U]]
// CHECK-NEXT: kernel.yield %[[A]]
// CHECK: kernel.group "mlp.down_proj+residual" kind "gemm"
// CHECK-NEXT: ^bb0
// CHECK-NEXT: %[[D:.*]] = l4.linear
// CHECK-NEXT: %[[R:.*]] = l4.add %{{.*}}, %[[D]]
// CHECK-NEXT: kernel.yield %[[R]]
// CHECK-NOT: kernel.group
// CHECK: return

// NONE-LABEL: func.func @mlp
// NONE-COUNT-6: kernel.group
// NONE-NOT: kernel.group
// NONE: return

// Only the epilogue: the norm and the projections stay apart.
// EPI-LABEL: func.func @mlp
// EPI: kernel.group "norm" kind "norm"
// EPI: kernel.group "mlp.gate_proj" kind "gemm"
// EPI: kernel.group "mlp.up_proj" kind "gemm"
// EPI: kernel.group "mlp.act" kind "elementwise"
// EPI: kernel.group "mlp.down_proj+residual" kind "gemm"

// The normalised value lives inside a kernel only; the memory planner still
// gives it bytes (the CPU backend runs the ops one by one) for the kernel's
// duration.
// MEM-LABEL: func.func @mlp
// MEM: kernel.group "mlp.gate_proj+up_proj+act+norm" {{.*}}l4c.memory = ["arena:
func.func @mlp(%h: tensor<1x8x32xf32> {l4.input = "x"}, %g: tensor<32xf32> {l4.weight = "n"},
    %wg: tensor<64x32xf32> {l4.weight = "g"}, %wu: tensor<64x32xf32> {l4.weight = "u"},
    %wd: tensor<32x64xf32> {l4.weight = "d"}) -> (tensor<1x8x32xf32> {l4.output = "logits"}) {
  %n = l4.rms_norm %h, %g {eps = 1.0e-5 : f64} : (tensor<1x8x32xf32>, tensor<32xf32>) -> tensor<1x8x32xf32> loc("norm")
  %a = l4.linear %n, %wg : (tensor<1x8x32xf32>, tensor<64x32xf32>) -> tensor<1x8x64xf32> loc("mlp.gate_proj")
  %b = l4.linear %n, %wu : (tensor<1x8x32xf32>, tensor<64x32xf32>) -> tensor<1x8x64xf32> loc("mlp.up_proj")
  %s = l4.swiglu %a, %b : (tensor<1x8x64xf32>, tensor<1x8x64xf32>) -> tensor<1x8x64xf32> loc("mlp.act")
  %d = l4.linear %s, %wd : (tensor<1x8x64xf32>, tensor<32x64xf32>) -> tensor<1x8x32xf32> loc("mlp.down_proj")
  %r = l4.add %h, %d : (tensor<1x8x32xf32>, tensor<1x8x32xf32>) -> tensor<1x8x32xf32> loc("residual")
  return %r : tensor<1x8x32xf32>
}

// -----

// A norm read by three projections is recomputed in each; an add chain (the
// MoE combine, then the residual) joins one epilogue.
// CHECK-LABEL: func.func @qkv
// CHECK: kernel.group "q_proj+input_layernorm" kind "gemm"
// CHECK: kernel.group "k_proj+input_layernorm" kind "gemm"
// CHECK: kernel.group "v_proj+input_layernorm" kind "gemm"
// CHECK: kernel.group "shared.down_proj+combine+residual" kind "gemm"
// CHECK-NEXT: ^bb0
// CHECK-NEXT: l4.linear
// CHECK-NEXT: l4.add
// CHECK-NEXT: l4.add
// CHECK-NEXT: kernel.yield
func.func @qkv(%h: tensor<1x8x32xf32> {l4.input = "x"}, %e: tensor<1x8x32xf32> {l4.input = "e"}, %g: tensor<32xf32> {l4.weight = "n"},
    %wq: tensor<32x32xf32> {l4.weight = "q"}, %wk: tensor<16x32xf32> {l4.weight = "k"}, %wv: tensor<16x32xf32> {l4.weight = "v"},
    %wd: tensor<32x32xf32> {l4.weight = "d"})
    -> (tensor<1x8x32xf32> {l4.output = "q"}, tensor<1x8x16xf32> {l4.output = "k"}, tensor<1x8x16xf32> {l4.output = "v"}, tensor<1x8x32xf32> {l4.output = "logits"}) {
  %n = l4.rms_norm %h, %g {eps = 1.0e-5 : f64} : (tensor<1x8x32xf32>, tensor<32xf32>) -> tensor<1x8x32xf32> loc("input_layernorm")
  %q = l4.linear %n, %wq : (tensor<1x8x32xf32>, tensor<32x32xf32>) -> tensor<1x8x32xf32> loc("q_proj")
  %k = l4.linear %n, %wk : (tensor<1x8x32xf32>, tensor<16x32xf32>) -> tensor<1x8x16xf32> loc("k_proj")
  %v = l4.linear %n, %wv : (tensor<1x8x32xf32>, tensor<16x32xf32>) -> tensor<1x8x16xf32> loc("v_proj")
  %d = l4.linear %q, %wd : (tensor<1x8x32xf32>, tensor<32x32xf32>) -> tensor<1x8x32xf32> loc("shared.down_proj")
  %c = l4.add %e, %d : (tensor<1x8x32xf32>, tensor<1x8x32xf32>) -> tensor<1x8x32xf32> loc("combine")
  %r = l4.add %c, %h : (tensor<1x8x32xf32>, tensor<1x8x32xf32>) -> tensor<1x8x32xf32> loc("residual")
  return %q, %k, %v, %r : tensor<1x8x32xf32>, tensor<1x8x16xf32>, tensor<1x8x16xf32>, tensor<1x8x32xf32>
}

// -----

// Nothing is fused away that another kernel still reads: the norm also
// feeds an add, and the gate projection is returned.
// CHECK-LABEL: func.func @kept
// CHECK: kernel.group "norm" kind "norm"
// CHECK: kernel.group "gate" kind "gemm"
// CHECK: kernel.group "up" kind "gemm"
// CHECK: kernel.group "act" kind "elementwise"
// CHECK: kernel.group "sum" kind "elementwise"
func.func @kept(%h: tensor<1x8x32xf32> {l4.input = "x"}, %g: tensor<32xf32> {l4.weight = "n"},
    %wg: tensor<32x32xf32> {l4.weight = "g"}, %wu: tensor<32x32xf32> {l4.weight = "u"})
    -> (tensor<1x8x32xf32> {l4.output = "a"}, tensor<1x8x32xf32> {l4.output = "b"}, tensor<1x8x32xf32> {l4.output = "c"}) {
  %n = l4.rms_norm %h, %g {eps = 1.0e-5 : f64} : (tensor<1x8x32xf32>, tensor<32xf32>) -> tensor<1x8x32xf32> loc("norm")
  %a = l4.linear %n, %wg : (tensor<1x8x32xf32>, tensor<32x32xf32>) -> tensor<1x8x32xf32> loc("gate")
  %b = l4.linear %n, %wu : (tensor<1x8x32xf32>, tensor<32x32xf32>) -> tensor<1x8x32xf32> loc("up")
  %s = l4.swiglu %a, %b : (tensor<1x8x32xf32>, tensor<1x8x32xf32>) -> tensor<1x8x32xf32> loc("act")
  %t = l4.add %n, %h : (tensor<1x8x32xf32>, tensor<1x8x32xf32>) -> tensor<1x8x32xf32> loc("sum")
  return %s, %a, %t : tensor<1x8x32xf32>, tensor<1x8x32xf32>, tensor<1x8x32xf32>
}

// -----

// RoPE read only by the QK norm: one kernel (kind rope). An inverse
// rotation (the backward's) is left alone.
// CHECK-LABEL: func.func @qk
// CHECK: kernel.group "q_rope+q_norm" kind "rope"
// CHECK-NEXT: ^bb0
// CHECK-NEXT: l4.rope
// CHECK-NEXT: l4.l2_norm
// CHECK-NEXT: kernel.yield
func.func @qk(%q: tensor<1x8x2x16xf32> {l4.input = "q"}, %p: tensor<1x8xi64> {l4.input = "positions"})
    -> (tensor<1x8x2x16xf32> {l4.output = "logits"}) {
  %r = l4.rope %q, %p {theta = 1.0e4 : f64, scaling = #l4<rope_scaling none>, factor = 1.0 : f64, low_freq_factor = 1.0 : f64, high_freq_factor = 1.0 : f64, original_max_position = 8 : i64} : (tensor<1x8x2x16xf32>, tensor<1x8xi64>) -> tensor<1x8x2x16xf32> loc("q_rope")
  %n = l4.l2_norm %r {eps = 1.0e-5 : f64} : (tensor<1x8x2x16xf32>) -> tensor<1x8x2x16xf32> loc("q_norm")
  return %n : tensor<1x8x2x16xf32>
}
