// RUN: l4-opt %s --split-input-file --convert-l4-to-kernel --l4c-plan-memory --verify-diagnostics | FileCheck %s

// Three 2 KiB activations in a chain: %a dies when %c is made, so %c reuses
// %a's bytes and the arena holds two buffers. The output goes to the I/O
// region after the input x (io:0); weights to their own.
// CHECK-LABEL: func.func @chain
// CHECK-SAME: l4c.arena_size = 4096
// CHECK: kernel.group "a" {{.*}}l4c.memory = ["arena:[[A:[0-9]+]]+2048"]
// CHECK: kernel.group "b" {{.*}}l4c.memory = ["arena:[[B:[0-9]+]]+2048"]
// CHECK: kernel.group "c" {{.*}}l4c.memory = ["arena:[[A]]+2048"]
// CHECK: kernel.group "out" {{.*}}l4c.memory = ["io:2048+2048"]
func.func @chain(%x: tensor<1x16x32xf32> {l4.input = "x"}, %w: tensor<32xf32> {l4.weight = "w"})
    -> (tensor<1x16x32xf32> {l4.output = "logits"}) {
  %a = l4.rms_norm %x, %w {eps = 1.0e-5 : f64} : (tensor<1x16x32xf32>, tensor<32xf32>) -> tensor<1x16x32xf32> loc("a")
  %b = l4.rms_norm %a, %w {eps = 1.0e-5 : f64} : (tensor<1x16x32xf32>, tensor<32xf32>) -> tensor<1x16x32xf32> loc("b")
  %c = l4.rms_norm %b, %w {eps = 1.0e-5 : f64} : (tensor<1x16x32xf32>, tensor<32xf32>) -> tensor<1x16x32xf32> loc("c")
  %o = l4.add %c, %b : (tensor<1x16x32xf32>, tensor<1x16x32xf32>) -> tensor<1x16x32xf32> loc("out")
  return %o : tensor<1x16x32xf32>
}

// -----

// The KV cache update writes the cache in place; caches and weights are
// placed once per module.
// CHECK-LABEL: module attributes
// CHECK-SAME: l4c.cache_size = 512
// CHECK-LABEL: func.func @decode
// CHECK: kernel.group "k_cache" {{.*}}l4c.memory = ["cache:0+512"]
func.func @decode(%new: tensor<1x1x2x4xf32> {l4.input = "k"}, %pos: tensor<1x1xi64> {l4.input = "positions"},
    %cache: tensor<1x16x2x4xf32> {l4.kv_cache = "layers.0.k"})
    -> (tensor<1x16x2x4xf32> {l4.kv_cache = "layers.0.k"}) {
  %c = l4.kv_cache_update %cache, %new, %pos : (tensor<1x16x2x4xf32>, tensor<1x1x2x4xf32>, tensor<1x1xi64>) -> tensor<1x16x2x4xf32> loc("k_cache")
  return %c : tensor<1x16x2x4xf32>
}

// -----

// Updating the cache in place while the old cache is still read later would
// corrupt that read.
func.func @clobber(%new: tensor<1x1x2x4xf32> {l4.input = "k"}, %pos: tensor<1x1xi64> {l4.input = "positions"},
    %cache: tensor<1x16x2x4xf32> {l4.kv_cache = "layers.0.k"})
    -> (tensor<1x16x2x4xf32> {l4.output = "a"}, tensor<1x16x2x4xf32> {l4.output = "b"}) {
  // expected-error @+1 {{in-place cache update would clobber a value still read by a later kernel}}
  %c = l4.kv_cache_update %cache, %new, %pos : (tensor<1x16x2x4xf32>, tensor<1x1x2x4xf32>, tensor<1x1xi64>) -> tensor<1x16x2x4xf32>
  %d = l4.add %cache, %cache : (tensor<1x16x2x4xf32>, tensor<1x16x2x4xf32>) -> tensor<1x16x2x4xf32>
  return %c, %d : tensor<1x16x2x4xf32>, tensor<1x16x2x4xf32>
}

// -----

// The loss gradient overwrites the logits it reads when nothing reads them
// later: both at the same arena offset, one 2 KiB buffer.
// CHECK-LABEL: func.func @loss_grad_in_place
// CHECK: kernel.group "logits" {{.*}}l4c.memory = ["arena:[[L:[0-9]+]]+2048"]
// CHECK: kernel.group "dlogits" {{.*}}l4c.memory = ["arena:[[L]]+2048"]
func.func @loss_grad_in_place(%x: tensor<1x16x32xf32> {l4.input = "x"}, %ids: tensor<1x16xi64> {l4.input = "input_ids"},
    %w: tensor<32xf32> {l4.weight = "w"}) -> (tensor<f32> {l4.output = "loss"}, tensor<32xf32> {l4.output = "grad.w"}) {
  %l = l4.rms_norm %x, %w {eps = 1.0e-5 : f64} : (tensor<1x16x32xf32>, tensor<32xf32>) -> tensor<1x16x32xf32> loc("logits")
  %loss = l4.cross_entropy %l, %ids : (tensor<1x16x32xf32>, tensor<1x16xi64>) -> tensor<f32> loc("loss")
  %d = l4.cross_entropy_grad %l, %ids : (tensor<1x16x32xf32>, tensor<1x16xi64>) -> tensor<1x16x32xf32> loc("dlogits")
  %dx, %dw = l4.rms_norm_grad %x, %w, %d {eps = 1.0e-5 : f64} : (tensor<1x16x32xf32>, tensor<32xf32>, tensor<1x16x32xf32>) -> (tensor<1x16x32xf32>, tensor<32xf32>) loc("norm_grad")
  return %loss, %dw : tensor<f32>, tensor<32xf32>
}

// -----

// Where the logits are read after the gradient, the gradient gets its own
// bytes.
// CHECK-LABEL: func.func @loss_grad_logits_still_read
// CHECK: kernel.group "logits" {{.*}}l4c.memory = ["arena:[[L:[0-9]+]]+2048"]
// CHECK-NOT: kernel.group "dlogits" {{.*}}l4c.memory = ["arena:[[L]]+2048"]
func.func @loss_grad_logits_still_read(%x: tensor<1x16x32xf32> {l4.input = "x"}, %ids: tensor<1x16xi64> {l4.input = "input_ids"},
    %w: tensor<32xf32> {l4.weight = "w"}) -> (tensor<f32> {l4.output = "loss"}, tensor<1x16x32xf32> {l4.output = "y"}) {
  %l = l4.rms_norm %x, %w {eps = 1.0e-5 : f64} : (tensor<1x16x32xf32>, tensor<32xf32>) -> tensor<1x16x32xf32> loc("logits")
  %loss = l4.cross_entropy %l, %ids : (tensor<1x16x32xf32>, tensor<1x16xi64>) -> tensor<f32> loc("loss")
  %d = l4.cross_entropy_grad %l, %ids : (tensor<1x16x32xf32>, tensor<1x16xi64>) -> tensor<1x16x32xf32> loc("dlogits")
  %y = l4.add %d, %l : (tensor<1x16x32xf32>, tensor<1x16x32xf32>) -> tensor<1x16x32xf32> loc("later_read")
  return %loss, %y : tensor<f32>, tensor<1x16x32xf32>
}
