// RUN: l4-opt %s --canonicalize --split-input-file | FileCheck %s

// A reshape to the same type folds away.
// CHECK-LABEL: func.func @reshape_identity
// CHECK-SAME: (%[[X:.+]]: tensor<2x8xf32>)
// CHECK-NOT: l4.reshape
// CHECK: return %[[X]]
func.func @reshape_identity(%x: tensor<2x8xf32>) -> tensor<2x8xf32> {
  %0 = l4.reshape %x : (tensor<2x8xf32>) -> tensor<2x8xf32>
  return %0 : tensor<2x8xf32>
}

// -----

// Two reshapes become one.
// CHECK-LABEL: func.func @reshape_chain
// CHECK-SAME: (%[[X:.+]]: tensor<2x8xf32>)
// CHECK: %[[R:.+]] = l4.reshape %[[X]] : (tensor<2x8xf32>) -> tensor<16xf32>
// CHECK-NOT: l4.reshape
// CHECK: return %[[R]]
func.func @reshape_chain(%x: tensor<2x8xf32>) -> tensor<16xf32> {
  %0 = l4.reshape %x : (tensor<2x8xf32>) -> tensor<2x2x4xf32>
  %1 = l4.reshape %0 : (tensor<2x2x4xf32>) -> tensor<16xf32>
  return %1 : tensor<16xf32>
}

// -----

// A reshape there and back disappears entirely.
// CHECK-LABEL: func.func @reshape_round_trip
// CHECK-SAME: (%[[X:.+]]: tensor<2x8xf32>)
// CHECK-NOT: l4.reshape
// CHECK: return %[[X]]
func.func @reshape_round_trip(%x: tensor<2x8xf32>) -> tensor<2x8xf32> {
  %0 = l4.reshape %x : (tensor<2x8xf32>) -> tensor<16xf32>
  %1 = l4.reshape %0 : (tensor<16xf32>) -> tensor<2x8xf32>
  return %1 : tensor<2x8xf32>
}

// -----

// Unused pure ops are removed.
// CHECK-LABEL: func.func @dead_linear
// CHECK-NOT: l4.linear
func.func @dead_linear(%x: tensor<2x8xf32>, %w: tensor<4x8xf32>) -> tensor<2x8xf32> {
  %0 = l4.linear %x, %w : (tensor<2x8xf32>, tensor<4x8xf32>) -> tensor<2x4xf32>
  return %x : tensor<2x8xf32>
}
