//===- random.cpp - random weights, the same on the CPU and the GPU -------===//
#include "random.h"
#include "cpu/threadpool.h"

#include <algorithm>

namespace l4c::rt {

namespace {

uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

} // namespace

uint64_t randomKey(uint64_t seed, const std::string &tensorName) {
  uint64_t h = 0xcbf29ce484222325ull; // FNV-1a of the name
  for (unsigned char c : tensorName)
    h = (h ^ c) * 0x100000001b3ull;
  return mix(seed ^ mix(h));
}

float randomUnit(uint64_t key, uint64_t i) {
  // Keep in step with kRandomFillCuda below.
  double s = 0;
  for (uint64_t j = 0; j < 4; ++j) {
    uint64_t z = mix(key + (4 * i + j + 1) * 0x9e3779b97f4a7c15ull);
    s += double(z >> 11) * 0x1.0p-53;
  }
  // Sum of 4 U(0,1): mean 2, variance 1/3.
  return float((s - 2.0) * 1.7320508075688772);
}

void fillRandom(float *dst, uint64_t n, uint64_t key, float stddev) {
  constexpr uint64_t kChunk = 1 << 16;
  uint64_t chunks = (n + kChunk - 1) / kChunk;
  cpu::ThreadPool::global().parallelFor(size_t(chunks), [&](size_t c) {
    uint64_t end = std::min(n, (uint64_t(c) + 1) * kChunk);
    for (uint64_t i = uint64_t(c) * kChunk; i < end; ++i)
      dst[i] = randomUnit(key, i) * stddev;
  });
}

const char *const kRandomFillCuda = R"cuda(
// l4c's random weights (runtime/src/random.cpp): integer hashing and double
// additions and multiplications only, so the CPU gets the same values.
__device__ __forceinline__ unsigned long long l4_mix(unsigned long long z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
extern "C" __global__ void l4_fill_random(void *dst, unsigned long long n,
                                          unsigned long long key, float stddev,
                                          int bf16) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
       i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
    double s = 0;
    for (unsigned long long j = 0; j < 4; ++j) {
      unsigned long long z = l4_mix(key + (4 * i + j + 1) * 0x9e3779b97f4a7c15ull);
      s = __dadd_rn(s, __dmul_rn((double)(z >> 11), 0x1.0p-53));
    }
    float v = __fmul_rn((float)__dmul_rn(__dadd_rn(s, -2.0), 1.7320508075688772), stddev);
    if (bf16) {
      unsigned u = __float_as_uint(v);
      ((unsigned short *)dst)[i] =
          (u & 0x7fffffffu) > 0x7f800000u
              ? (unsigned short)((u >> 16) | 0x40u)
              : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    } else {
      ((float *)dst)[i] = v;
    }
  }
}
)cuda";

} // namespace l4c::rt
