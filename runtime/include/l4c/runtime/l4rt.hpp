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
  ~Session() { l4rt_session_free(handle_); }
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
  l4rt_session get() const { return handle_; }

private:
  l4rt_session handle_ = nullptr;
};

} // namespace l4rt

#endif // L4C_RUNTIME_L4RT_HPP
