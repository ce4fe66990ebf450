//===- random.h - random weights, the same on the CPU and the GPU --*- C++ -*-===//
//
// --random-weights=SEED: element i of the tensor named N is a function of
// (SEED, N, i) alone, so tensors fill in parallel, in any order, on either
// backend, with the same values. Each element is the sum of four uniforms
// (Irwin-Hall), centred and scaled to unit variance, times the tensor's
// standard deviation: bell-shaped, bounded by 3.46 sigma, and made of
// integer hashing and double additions and multiplications only, which the
// CPU and the GPU round identically (no libm, nothing an FMA could fuse).
//
//===----------------------------------------------------------------------===//
#ifndef L4C_RUNTIME_RANDOM_H
#define L4C_RUNTIME_RANDOM_H

#include <cstdint>
#include <string>

namespace l4c::rt {

/// The key of one tensor's stream.
uint64_t randomKey(uint64_t seed, const std::string &tensorName);

/// Element `i` of the stream `key`, unit variance.
float randomUnit(uint64_t key, uint64_t i);

/// dst[i] = randomUnit(key, i) * stddev for i < n, on the CPU's threads.
void fillRandom(float *dst, uint64_t n, uint64_t key, float stddev);

/// The same generator as CUDA C++: `extern "C" __global__ void
/// l4_fill_random(void *dst, unsigned long long n, unsigned long long key,
/// float stddev, int bf16)` (bf16 != 0: dst holds bf16, rounded to nearest
/// even as l4_st does).
extern const char *const kRandomFillCuda;

} // namespace l4c::rt

#endif // L4C_RUNTIME_RANDOM_H
