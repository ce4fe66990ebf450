//===- threadpool.cpp - persistent worker pool for the CPU kernels -------===//
//
// Workers sleep on a condition variable between jobs; a job is a task count
// plus a function, and tasks are claimed with an atomic counter.
//
//===----------------------------------------------------------------------===//
#include "cpu/threadpool.h"

#include <cstdlib>

namespace l4c::cpu {

namespace {
// Set on pool workers and on a caller while it runs tasks, so that nested
// parallelFor calls degrade to loops instead of waiting on themselves.
thread_local bool inPoolTask = false;

unsigned defaultThreads() {
  if (const char *env = std::getenv("L4C_NUM_THREADS")) {
    char *end = nullptr;
    long v = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && v > 0)
      return unsigned(v < 1024 ? v : 1024);
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw ? hw : 1;
}
} // namespace

ThreadPool::ThreadPool(unsigned threads) {
  for (unsigned i = 1; i < threads; ++i)
    workers_.emplace_back([this] { workerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (std::thread &t : workers_)
    t.join();
}

ThreadPool &ThreadPool::global() {
  static ThreadPool pool(defaultThreads());
  return pool;
}

void ThreadPool::drain() {
  for (;;) {
    size_t i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i >= count_)
      return;
    fn_(ctx_, i);
  }
}

void ThreadPool::workerLoop() {
  inPoolTask = true;
  unsigned long seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || gen_ != seen; });
      if (stop_)
        return;
      seen = gen_;
    }
    drain();
    std::lock_guard<std::mutex> lock(mutex_);
    if (--pending_ == 0)
      done_.notify_one();
  }
}

void ThreadPool::run(size_t n, TaskFn fn, void *ctx) {
  auto serial = [&] {
    for (size_t i = 0; i < n; ++i)
      fn(ctx, i);
  };
  if (n <= 1 || workers_.empty() || inPoolTask)
    return serial();
  std::unique_lock<std::mutex> owner(ownerMutex_, std::try_to_lock);
  if (!owner.owns_lock())
    return serial();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    fn_ = fn;
    ctx_ = ctx;
    count_ = n;
    next_.store(0, std::memory_order_relaxed);
    pending_ = workers_.size();
    ++gen_;
  }
  wake_.notify_all();
  inPoolTask = true;
  drain();
  inPoolTask = false;
  // Workers must be out of drain() before fn/ctx (on the caller's stack) die.
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [&] { return pending_ == 0; });
}

} // namespace l4c::cpu
