//===- threadpool.h - persistent worker pool for the CPU kernels ---------===//
//
// A small fixed pool that the CPU backend's heavy kernels (GEMM, attention)
// share, so that each call costs a wake-up rather than a thread creation.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_RUNTIME_CPU_THREADPOOL_H
#define L4C_RUNTIME_CPU_THREADPOOL_H

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace l4c::cpu {

class ThreadPool {
public:
  /// `threads` counts the calling thread, so a pool of 1 starts no workers.
  explicit ThreadPool(unsigned threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool &) = delete;
  ThreadPool &operator=(const ThreadPool &) = delete;

  /// The process-wide pool: std::thread::hardware_concurrency() threads, or
  /// L4C_NUM_THREADS when that is set to a positive integer.
  static ThreadPool &global();

  unsigned size() const { return unsigned(workers_.size()) + 1; }

  /// Runs fn(i) for every i in [0, n) and returns when all have finished.
  /// The caller takes tasks too. A call made from inside a task, or while
  /// another thread owns the pool, runs serially on the caller instead of
  /// deadlocking or interleaving two jobs.
  template <typename F> void parallelFor(size_t n, F &&fn) {
    using Fn = std::remove_reference_t<F>;
    run(
        n, [](void *ctx, size_t i) { (*static_cast<Fn *>(ctx))(i); },
        const_cast<void *>(static_cast<const void *>(&fn)));
  }

private:
  using TaskFn = void (*)(void *, size_t);
  void run(size_t n, TaskFn fn, void *ctx);
  void drain();
  void workerLoop();

  std::vector<std::thread> workers_;
  std::mutex ownerMutex_; // held by the thread whose job is in flight
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  TaskFn fn_ = nullptr;
  void *ctx_ = nullptr;
  size_t count_ = 0;
  std::atomic<size_t> next_{0};
  size_t pending_ = 0;    // workers that have not finished the current job
  unsigned long gen_ = 0; // bumped once per job
  bool stop_ = false;
};

} // namespace l4c::cpu

#endif // L4C_RUNTIME_CPU_THREADPOOL_H
