//===- MemoryPlanTest.cpp - tests of the arena offset assignment ----------===//
//
// assignOffsets must never give two values with overlapping lifetimes
// overlapping bytes, must respect alignment, and should reuse memory.
//
//===----------------------------------------------------------------------===//
#include "l4c/Passes/MemoryPlan.h"
#include <gtest/gtest.h>
#include <random>

using l4c::Lifetime;

namespace {

uint64_t alignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

/// Checks the invariants and returns the peak of simultaneously live bytes
/// (a lower bound on any valid arena).
uint64_t checkPlacement(const std::vector<Lifetime> &v,
                        const std::vector<uint64_t> &off, uint64_t total,
                        uint64_t align) {
  EXPECT_EQ(off.size(), v.size());
  int64_t last = 0;
  for (const Lifetime &l : v)
    last = std::max(last, l.end);
  uint64_t peak = 0;
  for (int64_t t = 0; t <= last; ++t) {
    uint64_t live = 0;
    for (const Lifetime &l : v)
      if (l.start <= t && t <= l.end)
        live += alignUp(std::max<uint64_t>(l.size, 1), align);
    peak = std::max(peak, live);
  }
  for (size_t i = 0; i < v.size(); ++i) {
    EXPECT_EQ(off[i] % align, 0u) << "value " << i;
    EXPECT_LE(off[i] + v[i].size, total) << "value " << i;
    for (size_t j = i + 1; j < v.size(); ++j) {
      bool timeOverlap = v[i].start <= v[j].end && v[j].start <= v[i].end;
      bool spaceOverlap =
          off[i] < off[j] + v[j].size && off[j] < off[i] + v[i].size;
      EXPECT_FALSE(timeOverlap && spaceOverlap)
          << "values " << i << " and " << j << " share bytes while both live";
    }
  }
  return peak;
}

TEST(MemoryPlan, ChainReusesMemory) {
  // a -> b -> c -> d: each value dies one step after its successor is made.
  std::vector<Lifetime> v = {{0, 1, 1000}, {1, 2, 1000}, {2, 3, 1000}, {3, 4, 1000}};
  std::vector<uint64_t> off;
  uint64_t total = l4c::assignOffsets(v, 256, off);
  checkPlacement(v, off, total, 256);
  EXPECT_EQ(total, 2048u); // two 1024-byte slots suffice
  EXPECT_EQ(off[0], off[2]);
  EXPECT_EQ(off[1], off[3]);
}

TEST(MemoryPlan, DisjointLifetimesShareOffsetZero) {
  std::vector<Lifetime> v = {{0, 0, 4096}, {1, 1, 512}, {2, 2, 4096}};
  std::vector<uint64_t> off;
  uint64_t total = l4c::assignOffsets(v, 256, off);
  checkPlacement(v, off, total, 256);
  EXPECT_EQ(total, 4096u);
  EXPECT_EQ(off[0], 0u);
  EXPECT_EQ(off[1], 0u);
  EXPECT_EQ(off[2], 0u);
}

TEST(MemoryPlan, EmptyAndZeroSized) {
  std::vector<uint64_t> off;
  EXPECT_EQ(l4c::assignOffsets({}, 256, off), 0u);
  EXPECT_TRUE(off.empty());
  std::vector<Lifetime> v = {{0, 3, 0}, {1, 2, 0}};
  uint64_t total = l4c::assignOffsets(v, 64, off);
  checkPlacement(v, off, total, 64);
}

TEST(MemoryPlan, RandomLifetimesNeverOverlap) {
  std::mt19937_64 rng(1234);
  for (int trial = 0; trial < 300; ++trial) {
    int n = 1 + rng() % 60;
    int steps = 1 + rng() % 80;
    uint64_t align = uint64_t(1) << (rng() % 9);
    std::vector<Lifetime> v;
    for (int i = 0; i < n; ++i) {
      int64_t a = rng() % steps, b = rng() % steps;
      v.push_back({std::min(a, b), std::max(a, b), rng() % 100000});
    }
    std::vector<uint64_t> off;
    uint64_t total = l4c::assignOffsets(v, align, off);
    uint64_t peak = checkPlacement(v, off, total, align);
    ASSERT_GE(total, peak) << "trial " << trial;
    // First fit with size ordering stays within a small factor of the
    // lower bound on these workloads; a regression to no reuse would not.
    uint64_t sum = 0;
    for (const Lifetime &l : v)
      sum += alignUp(std::max<uint64_t>(l.size, 1), align);
    EXPECT_LE(total, sum) << "trial " << trial;
    EXPECT_LE(total, 2 * peak) << "trial " << trial;
  }
}

} // namespace
