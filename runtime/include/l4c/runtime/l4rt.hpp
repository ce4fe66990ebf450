//===- l4rt.hpp - thin C++ wrapper over the libl4rt C API -----*- C++ -*-===//
//
// RAII handles and std::vector in and out, over l4rt.h. Header only: the
// ABI stays the C one. Failures throw l4rt::Error carrying the status and
// l4rt_last_error()'s message.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_RUNTIME_L4RT_HPP
#define L4C_RUNTIME_L4RT_HPP

#include "l4c/runtime/l4rt.h"

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace l4rt {

class Error : public std::runtime_error {
public:
  Error(l4rt_status status, const std::string &message)
      : std::runtime_error(message), status_(status) {}
  l4rt_status status() const { return status_; }

private:
  l4rt_status status_;
};

inline void check(l4rt_status status) {
  if (status != L4RT_OK)
    throw Error(status, l4rt_last_error());
}

class Plan {
public:
  explicit Plan(const std::string &path) {
    check(l4rt_plan_load(path.c_str(), &handle_));
  }
  Plan(const void *data, size_t size) {
    check(l4rt_plan_load_memory(data, size, &handle_));
  }
  ~Plan() { l4rt_plan_free(handle_); }
  Plan(Plan &&o) noexcept : handle_(std::exchange(o.handle_, nullptr)) {}
  Plan &operator=(Plan &&o) noexcept {
    std::swap(handle_, o.handle_);
    return *this;
  }
  Plan(const Plan &) = delete;
  Plan &operator=(const Plan &) = delete;

  l4rt_plan_summary info() const {
    l4rt_plan_summary s;
    check(l4rt_plan_info(handle_, &s));
    return s;
  }
  /// The programs ("forward"; "prefill", "decode"; "train_step") in order.
  std::vector<l4rt_program_info> programs() const {
    uint32_t n = 0;
    check(l4rt_plan_num_programs(handle_, &n));
    std::vector<l4rt_program_info> out(n);
    for (uint32_t i = 0; i < n; ++i)
      check(l4rt_plan_program(handle_, i, &out[i]));
    return out;
  }
  l4rt_kernel_info kernel(uint32_t index) const {
    l4rt_kernel_info k;
    check(l4rt_plan_kernel(handle_, index, &k));
    return k;
  }
  l4rt_plan get() const { return handle_; }

private:
  l4rt_plan handle_ = nullptr;
};

class Session {
public:
  /// Weights from a checkpoint directory or .safetensors file.
  Session(const Plan &plan, const std::string &weightsDir) {
    check(l4rt_session_create(plan.get(), weightsDir.c_str(), 0, &handle_));
  }
  /// Random weights from a seed (benchmarks, smoke tests).
  Session(const Plan &plan, uint64_t randomSeed) {
    check(l4rt_session_create(plan.get(), nullptr, randomSeed, &handle_));
  }
  /// Any options, the device included ("cpu", "cuda", "cuda:N").
  Session(const Plan &plan, const l4rt_session_options &options) {
    check(l4rt_session_create_with(plan.get(), &options, &handle_));
  }
  ~Session() { l4rt_session_free(handle_); }
  /// "cpu", or "cuda (<device name>, <arch>)".
  std::string device() const { return l4rt_session_device(handle_); }
  Session(Session &&o) noexcept : handle_(std::exchange(o.handle_, nullptr)) {}
  Session &operator=(Session &&o) noexcept {
    std::swap(handle_, o.handle_);
    return *this;
  }
  Session(const Session &) = delete;
  Session &operator=(const Session &) = delete;

  /// ids [batch, seq] -> logits [batch, seq, vocab].
  std::vector<float> forward(const std::vector<int64_t> &ids, int64_t batch,
                             int64_t seq, int64_t vocab) {
    if (int64_t(ids.size()) != batch * seq)
      throw Error(L4RT_ERROR_INVALID_ARGUMENT, "ids holds " +
                                                   std::to_string(ids.size()) +
                                                   " entries, not batch * seq");
    std::vector<float> logits(size_t(batch * seq * vocab));
    check(l4rt_forward(handle_, ids.data(), batch, seq, logits.data()));
    return logits;
  }

  /// ids [batch, seq] -> [batch, seq + maxNewTokens]; greedy without sampling.
  std::vector<int64_t> generate(const std::vector<int64_t> &ids, int64_t batch,
                                int64_t seq, int64_t maxNewTokens,
                                const l4rt_sampling *sampling = nullptr) {
    if (int64_t(ids.size()) != batch * seq)
      throw Error(L4RT_ERROR_INVALID_ARGUMENT, "ids holds " +
                                                   std::to_string(ids.size()) +
                                                   " entries, not batch * seq");
    std::vector<int64_t> out(
        size_t(batch * (seq + (maxNewTokens > 0 ? maxNewTokens : 0))));
    int64_t len = 0;
    check(l4rt_generate(handle_, ids.data(), batch, seq, maxNewTokens, sampling,
                        out.data(), &len));
    return out;
  }

  l4rt_timing timing() const {
    l4rt_timing t;
    check(l4rt_session_timing(handle_, &t));
    return t;
  }

  /// One train step on ids [batch, seq]; returns the loss. Gradients add up
  /// until adamwStep() applies their mean.
  float trainStep(const std::vector<int64_t> &ids, int64_t batch, int64_t seq) {
    if (int64_t(ids.size()) != batch * seq)
      throw Error(L4RT_ERROR_INVALID_ARGUMENT, "ids holds " +
                                                   std::to_string(ids.size()) +
                                                   " entries, not batch * seq");
    float loss = 0;
    check(l4rt_train_step(handle_, ids.data(), batch, seq, &loss));
    return loss;
  }
  void adamwStep(const l4rt_adamw &hyper) {
    check(l4rt_adamw_step(handle_, &hyper));
  }
  static l4rt_adamw adamwDefaults() {
    l4rt_adamw h;
    l4rt_adamw_defaults(&h);
    return h;
  }
  void zeroGrad() { check(l4rt_zero_grad(handle_)); }

  /// The HF names of the weights the plan binds.
  std::vector<std::string> parameterNames() const {
    size_t n = 0;
    check(l4rt_num_parameters(handle_, &n));
    std::vector<std::string> names;
    for (size_t i = 0; i < n; ++i) {
      const char *name = nullptr;
      check(l4rt_parameter_name(handle_, i, &name));
      names.push_back(name);
    }
    return names;
  }
  std::vector<int64_t> tensorShape(const std::string &name) const {
    std::vector<int64_t> shape(8);
    size_t rank = 0;
    check(l4rt_tensor_shape(handle_, name.c_str(), shape.data(), shape.size(),
                            &rank));
    shape.resize(rank);
    return shape;
  }
  /// "<hf>", "grad.<hf>", "m.<hf>" or "v.<hf>" (see l4rt_get_tensor).
  std::vector<float> tensor(const std::string &name) const {
    size_t n = 1;
    for (int64_t e : tensorShape(name))
      n *= size_t(e);
    std::vector<float> out(n);
    check(l4rt_get_tensor(handle_, name.c_str(), out.data(), n));
    return out;
  }
  int64_t counter(const std::string &name) const {
    int64_t v = 0;
    check(l4rt_get_counter(handle_, name.c_str(), &v));
    return v;
  }
  void setCounter(const std::string &name, int64_t value) {
    check(l4rt_set_counter(handle_, name.c_str(), value));
  }
  void saveCheckpoint(const std::string &dir) {
    check(l4rt_save_checkpoint(handle_, dir.c_str()));
  }
  void loadOptimizer(const std::string &dir) {
    check(l4rt_load_optimizer(handle_, dir.c_str()));
  }
  l4rt_session get() const { return handle_; }

private:
  l4rt_session handle_ = nullptr;
};

} // namespace l4rt

#endif // L4C_RUNTIME_L4RT_HPP
