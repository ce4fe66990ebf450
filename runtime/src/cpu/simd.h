//===- simd.h - portable vector helpers for the CPU kernels --------------===//
//
// GCC/Clang vector extensions instead of intrinsics: the same source lowers to
// SSE2 for the baseline build and to AVX2+FMA in the dispatched variants, so
// binaries stay runnable on any x86-64 while using wide units where present.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_RUNTIME_CPU_SIMD_H
#define L4C_RUNTIME_CPU_SIMD_H

#include <cstddef>

namespace l4c::cpu {

typedef float V8 __attribute__((vector_size(32)));
typedef float V4 __attribute__((vector_size(16)));
// Views of float memory as vectors: unaligned and allowed to alias floats.
typedef float V8u __attribute__((vector_size(32), aligned(4), may_alias));
typedef float V4u __attribute__((vector_size(16), aligned(4), may_alias));

// Kernels come in two builds of one source: AVX2+FMA, chosen at run time
// where the CPU has both, and the SSE2 baseline, so no -march is needed.
// Dispatch is a cached cpuid test rather than target_clones: ifunc resolvers
// run before sanitizer runtimes start and crash them, and "arch=haswell"
// clones test the CPU model rather than its features.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(L4C_NO_MULTIVERSION)
#define L4C_TARGET_AVX2 __attribute__((target("avx2,fma")))
inline bool cpuHasAvx2Fma() {
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#else
#define L4C_TARGET_AVX2
inline bool cpuHasAvx2Fma() { return false; }
#endif

/// Defines `void name params`, which runs the always-inline template
/// `name##Impl<Wide>` compiled for AVX2+FMA (Wide) or for the baseline.
#define L4C_DISPATCH(name, params, args)                                       \
  L4C_TARGET_AVX2 void name##Avx2 params { name##Impl<true> args; }            \
  void name##Base params { name##Impl<false> args; }                           \
  void name params { (cpuHasAvx2Fma() ? name##Avx2 : name##Base) args; }

#define L4C_INLINE inline __attribute__((always_inline))

// Helpers pass vectors by reference only: a 32-byte vector returned by value
// from a baseline-target function has a different ABI with and without AVX,
// which compilers diagnose (Clang as an error) in the baseline clones.
// Scalars enter vector expressions directly (s * v) rather than through a
// splat helper, which GCC would lower for the baseline target before
// inlining it into the AVX2 clone, costing 4x in the GEMM.
L4C_INLINE const V8u &at8(const float *p) {
  return *reinterpret_cast<const V8u *>(p);
}
L4C_INLINE V8u &at8(float *p) { return *reinterpret_cast<V8u *>(p); }
L4C_INLINE const V4u &at4(const float *p) {
  return *reinterpret_cast<const V4u *>(p);
}
L4C_INLINE V4u &at4(float *p) { return *reinterpret_cast<V4u *>(p); }
L4C_INLINE float hsum8(const V8 &v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/// f32 dot product with 16 partial sums; the summation order depends only on
/// n, so results do not change with threading.
L4C_INLINE float dot(const float *a, const float *b, size_t n) {
  V8 s0 = {}, s1 = {};
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 += at8(a + i) * at8(b + i);
    s1 += at8(a + i + 8) * at8(b + i + 8);
  }
  if (i + 8 <= n) {
    s0 += at8(a + i) * at8(b + i);
    i += 8;
  }
  V8 s01 = s0 + s1;
  float s = hsum8(s01);
  for (; i < n; ++i)
    s += a[i] * b[i];
  return s;
}

/// y[0:n] += a * x[0:n].
L4C_INLINE void axpy(float a, const float *x, float *y, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    at8(y + i) += a * at8(x + i);
  for (; i < n; ++i)
    y[i] += a * x[i];
}

} // namespace l4c::cpu

#endif // L4C_RUNTIME_CPU_SIMD_H
