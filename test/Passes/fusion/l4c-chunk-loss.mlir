// RUN: l4-opt %s --split-input-file --l4c-autodiff --l4c-chunk-loss=chunk=6 | FileCheck %s
// RUN: l4-opt %s --split-input-file --l4c-autodiff --l4c-chunk-loss=chunk=none | FileCheck %s --check-prefix=NONE
// RUN: l4-opt %s --split-input-file --l4c-autodiff --l4c-chunk-loss | FileCheck %s --check-prefix=NONE
// RUN: l4-opt %s --split-input-file --l4c-autodiff --l4c-chunk-loss=chunk=6 --convert-l4-to-kernel --l4c-plan-memory | FileCheck %s --check-prefix=MEM
// RUN: not l4-opt %s --split-input-file --l4c-autodiff --l4c-chunk-loss=chunk=0 2>&1 | FileCheck %s --check-prefix=BAD

// BAD: l4c-chunk-loss: chunk must be auto, none or a positive column count, not '0'

// A 16-word vocabulary in chunks of 6, 6 and 4 columns: the weight's rows
// are views, the forward is a chain of statistics, the backward recomputes
// each chunk's logits, and the weight gradient is the chunks' gradients
// stacked. No [1, 4, 16] value is left.
// CHECK-LABEL: func.func @head
// CHECK-DAG: %[[W0:.+]] = l4.slice_rows %[[W:[^ ]+]] {offset = 0 : i64} : (tensor<16x8xf32>) -> tensor<6x8xf32>
// CHECK-DAG: %[[W1:.+]] = l4.slice_rows %[[W]] {offset = 6 : i64} : (tensor<16x8xf32>) -> tensor<6x8xf32>
// CHECK-DAG: %[[W2:.+]] = l4.slice_rows %[[W]] {offset = 12 : i64} : (tensor<16x8xf32>) -> tensor<4x8xf32>
// CHECK: %[[L0:.+]] = l4.linear %[[X:[^ ]+]], %[[W0]]
// CHECK: %[[S0:.+]] = l4.cross_entropy_stats %[[L0]], %[[IDS:[^ ]+]] {vocab_offset = 0 : i64, vocab_size = 16 : i64} : (tensor<1x4x6xf32>, tensor<1x4xi64>) -> tensor<1x4x2xf32>
// CHECK: %[[L1:.+]] = l4.linear %[[X]], %[[W1]]
// CHECK: %[[S1:.+]] = l4.cross_entropy_stats %[[L1]], %[[IDS]], %[[S0]] {vocab_offset = 6 : i64, vocab_size = 16 : i64}
// CHECK: %[[L2:.+]] = l4.linear %[[X]], %[[W2]]
// CHECK: %[[S2:.+]] = l4.cross_entropy_stats %[[L2]], %[[IDS]], %[[S1]] {vocab_offset = 12 : i64, vocab_size = 16 : i64} : (tensor<1x4x4xf32>
// CHECK: %[[LOSS:.+]] = l4.cross_entropy_from_stats %[[S2]], %[[IDS]]
// CHECK: %[[R0:.+]] = l4.linear %[[X]], %[[W0]]
// CHECK: %[[D0:.+]] = l4.cross_entropy_grad_chunk %[[R0]], %[[IDS]], %[[S2]] {vocab_offset = 0 : i64, vocab_size = 16 : i64}
// CHECK: %[[G0:.+]] = l4.linear_grad_weight %[[X]], %[[D0]] : (tensor<1x4x8xf32>, tensor<1x4x6xf32>) -> tensor<6x8xf32>
// CHECK: l4.cross_entropy_grad_chunk %{{.+}}, %[[IDS]], %[[S2]] {vocab_offset = 6 : i64
// CHECK: %[[G1:.+]] = l4.linear_grad_weight
// CHECK: l4.cross_entropy_grad_chunk %{{.+}}, %[[IDS]], %[[S2]] {vocab_offset = 12 : i64
// CHECK: %[[G2:.+]] = l4.linear_grad_weight
// CHECK: %[[DW:.+]] = l4.concat_rows %[[G0]], %[[G1]], %[[G2]] : (tensor<6x8xf32>, tensor<6x8xf32>, tensor<4x8xf32>) -> tensor<16x8xf32>
// CHECK-NOT: tensor<1x4x16xf32>
// CHECK: return %[[LOSS]], %[[DW]]

// Without chunking (and under auto: these logits are far below 256 MiB) the
// loss stays whole.
// NONE-LABEL: func.func @head
// NONE-NOT: l4.slice_rows
// NONE: l4.cross_entropy %
// NONE: l4.cross_entropy_grad %

// Memory: the chunks' gradients are the output's rows, in order; the
// weight views start at the weight's row offsets (6 rows of 8 floats =
// 192 bytes).
// MEM-LABEL: func.func @head
// MEM: kernel.group "lm_head" kind "gemm"(%{{.+}}, %{{.+}}) {l4c.memory = ["arena:
// MEM: kernel.group "lm_head" kind "gemm"(%{{.+}}, %{{.+}}) {l4c.memory = ["io:[[#IO:]]+192"]} : (tensor<1x4x8xf32>, tensor<1x4x6xf32>) -> tensor<6x8xf32>
// MEM: kernel.group "lm_head" kind "gemm"(%{{.+}}, %{{.+}}) {l4c.memory = ["io:[[#IO+192]]+192"]} : (tensor<1x4x8xf32>, tensor<1x4x6xf32>) -> tensor<6x8xf32>
// MEM: kernel.group "lm_head" kind "gemm"(%{{.+}}, %{{.+}}) {l4c.memory = ["io:[[#IO+384]]+128"]} : (tensor<1x4x8xf32>, tensor<1x4x4xf32>) -> tensor<4x8xf32>
// MEM: l4.concat_rows
func.func @head(%ids: tensor<1x4xi64> {l4.input = "input_ids"}, %x: tensor<1x4x8xf32> {l4.input = "x"},
    %w: tensor<16x8xf32> {l4.weight = "lm_head.weight"}) -> (tensor<f32> {l4.output = "loss"})
    attributes {l4.autodiff} {
  %y = l4.linear %x, %w : (tensor<1x4x8xf32>, tensor<16x8xf32>) -> tensor<1x4x16xf32> loc("lm_head")
  %loss = l4.cross_entropy %y, %ids : (tensor<1x4x16xf32>, tensor<1x4xi64>) -> tensor<f32> loc("loss")
  return %loss : tensor<f32>
}

// -----

// Tied embeddings: the stacked gradient is an arena value added to the
// embedding's; it lives from its first chunk's kernel on.
// CHECK-LABEL: func.func @tied
// CHECK: %[[DW:.+]] = l4.concat_rows
// CHECK: %[[DE:.+]] = l4.embedding_grad
// CHECK: l4.add %[[DW]], %[[DE]]
// MEM-LABEL: func.func @tied
// MEM: l4.linear_grad_weight
// MEM: l4.concat_rows
// MEM: kernel.group "embed" kind "gather"
// MEM: kernel.group "embed" kind "elementwise"
func.func @tied(%ids: tensor<1x4xi64> {l4.input = "input_ids"},
    %table: tensor<16x8xf32> {l4.weight = "table"}) -> (tensor<f32> {l4.output = "loss"})
    attributes {l4.autodiff} {
  %e = l4.embedding %table, %ids : (tensor<16x8xf32>, tensor<1x4xi64>) -> tensor<1x4x8xf32> loc("embed")
  %y = l4.linear %e, %table : (tensor<1x4x8xf32>, tensor<16x8xf32>) -> tensor<1x4x16xf32> loc("lm_head")
  %loss = l4.cross_entropy %y, %ids : (tensor<1x4x16xf32>, tensor<1x4xi64>) -> tensor<f32> loc("loss")
  return %loss : tensor<f32>
}

// -----

// bf16: the input gradient's chunk parts are f32, summed in f32 and
// converted once (one bf16 rounding, as the whole-vocabulary GEMM's).
// CHECK-LABEL: func.func @head_bf16
// CHECK: %[[P0:.+]] = l4.linear_grad_input %{{.+}}, %{{.+}} : (tensor<1x4x6xbf16>, tensor<6x8xbf16>) -> tensor<1x4x8xf32>
// CHECK: %[[P1:.+]] = l4.linear_grad_input %{{.+}}, %{{.+}} : (tensor<1x4x6xbf16>, tensor<6x8xbf16>) -> tensor<1x4x8xf32>
// CHECK: %[[S1:.+]] = l4.add %[[P0]], %[[P1]] : (tensor<1x4x8xf32>, tensor<1x4x8xf32>) -> tensor<1x4x8xf32>
// CHECK: %[[P2:.+]] = l4.linear_grad_input
// CHECK: %[[S2:.+]] = l4.add %[[S1]], %[[P2]]
// CHECK: l4.convert %[[S2]] : (tensor<1x4x8xf32>) -> tensor<1x4x8xbf16>
// MEM-LABEL: func.func @head_bf16
// MEM: kernel.group "lm_head" kind "elementwise"
// MEM: l4.convert
func.func @head_bf16(%ids: tensor<1x4xi64> {l4.input = "input_ids"},
    %table: tensor<16x8xbf16> {l4.weight = "table"}, %w: tensor<16x8xbf16> {l4.weight = "lm_head.weight"})
    -> (tensor<f32> {l4.output = "loss"}) attributes {l4.autodiff} {
  %e = l4.embedding %table, %ids : (tensor<16x8xbf16>, tensor<1x4xi64>) -> tensor<1x4x8xbf16> loc("embed")
  %y = l4.linear %e, %w : (tensor<1x4x8xbf16>, tensor<16x8xbf16>) -> tensor<1x4x16xbf16> loc("lm_head")
  %loss = l4.cross_entropy %y, %ids : (tensor<1x4x16xbf16>, tensor<1x4xi64>) -> tensor<f32> loc("loss")
  return %loss : tensor<f32>
}
