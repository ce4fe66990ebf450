//===- tma_test.cpp - the emulator's mbarriers, TMA and named barriers ----===//
//
// Runs small warp-specialized "kernels" through shim.h as host C++ (as the
// emulator builds generated CUDA), with tensor maps encoded by
// libl4cuemu.so's cuTensorMapEncodeTiled: a producer thread fills a ring of
// two stages with swizzled TMA boxes on full/empty mbarriers while consumer
// threads check every element, plus the mbarrier's phase and transaction
// rules, the other swizzles, named barriers, the encoder's refusals and the
// deadlocks the scheduler must report.
//
//===----------------------------------------------------------------------===//
#include <gtest/gtest.h>

#include <dlfcn.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "shim.h" // after the other headers: it defines CUDA's keywords

#ifndef L4CUEMU_LIB
#error "L4CUEMU_LIB must name libl4cuemu.so"
#endif

namespace {

/// The kernels' tensor map parameter (plan.fbs: 128 bytes, 64-aligned).
struct alignas(64) L4TensorMap {
  unsigned long long v[16];
};

using EncodeFn = int (*)(void *, int, unsigned, void *,
                         const unsigned long long *, const unsigned long long *,
                         const unsigned *, const unsigned *, int, int, int,
                         int);

EncodeFn encoder() {
  static EncodeFn fn = [] {
    void *h = ::dlopen(L4CUEMU_LIB, RTLD_NOW | RTLD_LOCAL);
    return h ? reinterpret_cast<EncodeFn>(::dlsym(h, "cuTensorMapEncodeTiled"))
             : nullptr;
  }();
  return fn;
}

constexpr int kBf16 = 9, kF32 = 7, kU16 = 1;

/// Encodes with the runtime's fixed choices: element strides 1, no
/// interleave, 256-byte L2 promotion, zeros outside.
int encode(L4TensorMap &m, int dtype, std::vector<unsigned long long> dims,
           std::vector<unsigned long long> strides, std::vector<unsigned> box,
           int swizzle, const void *address) {
  std::vector<unsigned> es(dims.size(), 1);
  return encoder()(&m, dtype, unsigned(dims.size()),
                   const_cast<void *>(address), dims.data(), strides.data(),
                   box.data(), es.data(), 0, swizzle, 3, 0);
}

/// Byte offset of the element at `dense` bytes into a box, once swizzled
/// (the box 1024-aligned): the 16-byte chunk index XORed with the row of
/// 128 bytes, as many bits as the swizzle's span has chunks.
unsigned swizzled(unsigned dense, int swizzle) {
  unsigned chunks = swizzle == 3 ? 8 : swizzle == 2 ? 4 : swizzle == 1 ? 2 : 1;
  unsigned chunk = (dense / 16) % 8, row = (dense / 128) % 8;
  return dense - chunk * 16 + ((chunk ^ (row % chunks)) % 8) * 16;
}

class CuemuTma : public ::testing::Test {
protected:
  void SetUp() override {
    ASSERT_NE(encoder(), nullptr)
        << "cannot load " << L4CUEMU_LIB << ": " << ::dlerror();
  }
};

//===----------------------------------------------------------------------===//
// The warp-specialized ring
//===----------------------------------------------------------------------===//

TEST_F(CuemuTma, ProducerFillsARingOfTwoStagesForConsumers) {
  // A 40 x 100 u16 tensor (bf16-like) whose rows are padded to 208 bytes;
  // element (r, c) holds r * 1000 + c + 1, so zeros are the fill.
  const unsigned rows = 40, cols = 100, pitch = 208;
  std::vector<uint16_t> tensor(rows * pitch / 2, 0xdead);
  for (unsigned r = 0; r < rows; ++r)
    for (unsigned c = 0; c < cols; ++c)
      tensor[r * pitch / 2 + c] = uint16_t(r * 1000 + c + 1);
  L4TensorMap map;
  ASSERT_EQ(
      encode(map, kBf16, {cols, rows}, {pitch}, {64, 16}, 3, tensor.data()), 0);

  // Seven boxes of 16 rows x 64 columns: the two right ones run past column
  // 100, the bottom ones past row 40, the last starts before the tensor.
  struct Tile {
    int c0, c1;
  };
  const std::vector<Tile> tiles = {{0, 0},  {64, 0},  {0, 16},  {64, 16},
                                   {0, 32}, {64, 32}, {-16, -4}};
  constexpr unsigned kBoxBytes = 64 * 16 * 2, kStages = 2;
  constexpr unsigned kConsumers = 64, kThreads = 32 + kConsumers;
  const unsigned barOffset = kStages * kBoxBytes;
  std::atomic<unsigned> checked{0}, wrong{0}, zeros{0};
  std::string firstWrong;

  l4emu::launch(1, kThreads, barOffset + 32, [&] {
    unsigned char *smem = l4emu::dynamicShared;
    auto *full = reinterpret_cast<unsigned long long *>(smem + barOffset);
    unsigned long long *empty = full + kStages;
    unsigned t = threadIdx.x;
    if (t == 0)
      for (unsigned s = 0; s < kStages; ++s) {
        l4emu::mbarInit(&full[s], 1);
        l4emu::mbarInit(&empty[s], kConsumers);
      }
    __syncthreads();
    if (t < 32) {
      // The producer warp: one thread issues, the rest exit at once.
      if (t != 0)
        return;
      for (unsigned i = 0; i < tiles.size(); ++i) {
        unsigned s = i % kStages, round = i / kStages;
        // The first round finds every stage empty (parity 1 has "completed").
        l4emu::mbarWait(&empty[s], (round & 1) ^ 1);
        l4emu::mbarArriveExpectTx(&full[s], kBoxBytes);
        l4emu::tmaLoad(smem + s * kBoxBytes, &map, &full[s], tiles[i].c0,
                       tiles[i].c1, 0, 0, 0);
      }
      return;
    }
    // Consumers: thread k checks column k of every box, then frees it.
    unsigned k = t - 32;
    for (unsigned i = 0; i < tiles.size(); ++i) {
      unsigned s = i % kStages, round = i / kStages;
      l4emu::mbarWait(&full[s], round & 1);
      const unsigned char *stage = smem + s * kBoxBytes;
      for (unsigned r = 0; r < 16; ++r) {
        long long gr = tiles[i].c1 + int(r), gc = tiles[i].c0 + int(k);
        bool inside =
            gr >= 0 && gr < (long long)rows && gc >= 0 && gc < (long long)cols;
        uint16_t want = inside ? uint16_t(gr * 1000 + gc + 1) : 0;
        uint16_t got;
        std::memcpy(&got, stage + swizzled(r * 128 + k * 2, 3), 2);
        ++checked;
        zeros += !inside;
        if (got != want && wrong++ == 0)
          firstWrong = "box " + std::to_string(i) + " row " +
                       std::to_string(r) + " column " + std::to_string(k) +
                       ": got " + std::to_string(got) + ", want " +
                       std::to_string(want);
      }
      l4emu::mbarArrive(&empty[s]);
    }
  });
  EXPECT_EQ(wrong.load(), 0u) << firstWrong;
  EXPECT_EQ(checked.load(), tiles.size() * 16 * kConsumers);
  // Out of the tensor: 28 columns of the right boxes, 8 rows of the bottom
  // ones, and 16 columns and 4 rows of the last one.
  EXPECT_EQ(zeros.load(),
            2u * 28 * 16 + 8 * 64 + (1024 - 36 * 8) + (1024 - 48 * 12));
}

//===----------------------------------------------------------------------===//
// mbarrier phases and transaction bytes
//===----------------------------------------------------------------------===//

TEST_F(CuemuTma, MbarrierPhasesCompleteOnArrivalsAndBytes) {
  std::vector<std::string> log;
  l4emu::launch(1, 1, 64, [&] {
    auto *bar = reinterpret_cast<unsigned long long *>(l4emu::dynamicShared);
    auto state = [&] {
      l4emu::MbarState s = l4emu::mbarLoad(bar, "test");
      return std::to_string(s.phase) + ":" + std::to_string(s.pending) + "/" +
             std::to_string(s.count) + ":" + std::to_string(s.tx);
    };
    l4emu::mbarInit(bar, 2);
    log.push_back(state());
    l4emu::mbarWait(bar, 1); // the phase before phase 0: done
    l4emu::mbarArrive(bar);
    log.push_back(state());
    l4emu::mbarArriveExpectTx(bar, 96); // arrivals done, bytes pending
    log.push_back(state());
    l4emu::mbarCompleteTx(bar, 32);
    log.push_back(state());
    l4emu::mbarCompleteTx(bar, 64); // completes phase 0
    log.push_back(state());
    l4emu::mbarWait(bar, 0);
    // Bytes may complete before they are expected.
    l4emu::mbarCompleteTx(bar, 16);
    log.push_back(state());
    l4emu::mbarArriveExpectTx(bar, 16);
    l4emu::mbarArrive(bar); // completes phase 1
    log.push_back(state());
    l4emu::mbarWait(bar, 1);
  });
  EXPECT_EQ(log, (std::vector<std::string>{"0:2/2:0", "0:1/2:0", "0:0/2:96",
                                           "0:0/2:64", "1:2/2:0", "1:2/2:-16",
                                           "0:2/2:0"}));
}

TEST_F(CuemuTma, WaitersYieldUntilTheLastArrival) {
  // Thread t waits for thread t + 1's barrier, then completes its own: a
  // chain against the scheduler's order, so each round only the waiter
  // whose barrier just completed gets further while the rest re-check.
  constexpr unsigned kThreads = 8;
  std::vector<unsigned> order;
  l4emu::launch(1, kThreads, 64, [&] {
    auto *bars = reinterpret_cast<unsigned long long *>(l4emu::dynamicShared);
    unsigned t = threadIdx.x;
    l4emu::mbarInit(&bars[t], 1);
    __syncthreads();
    if (t + 1 < kThreads)
      l4emu::mbarWait(&bars[t + 1], 0);
    order.push_back(t);
    l4emu::mbarArrive(&bars[t]);
  });
  EXPECT_EQ(order, (std::vector<unsigned>{7, 6, 5, 4, 3, 2, 1, 0}));
}

//===----------------------------------------------------------------------===//
// Other swizzles and ranks
//===----------------------------------------------------------------------===//

TEST_F(CuemuTma, EverySwizzleAndRankThree) {
  // f32 [3][12][40] (innermost 40, padded rows of 176 bytes); boxes of
  // 8 x 8 x 2 (four 128-byte rows of the swizzle pattern per plane) at
  // (36, 6, 1): four columns and two rows outside.
  const unsigned d0 = 40, d1 = 12, d2 = 3, pitch = 176, plane = pitch * d1;
  std::vector<float> tensor(d2 * plane / 4, -1.0f);
  for (unsigned z = 0; z < d2; ++z)
    for (unsigned y = 0; y < d1; ++y)
      for (unsigned x = 0; x < d0; ++x)
        tensor[(z * plane + y * pitch) / 4 + x] =
            float(z * 10000 + y * 100 + x + 1);
  for (int swizzle : {0, 1, 2}) {
    SCOPED_TRACE("swizzle " + std::to_string(swizzle));
    L4TensorMap map;
    ASSERT_EQ(encode(map, kF32, {d0, d1, d2}, {pitch, plane}, {8, 8, 2},
                     swizzle, tensor.data()),
              0);
    std::vector<float> got(8 * 8 * 2);
    l4emu::launch(1, 1, 1024, [&] {
      unsigned char *smem = l4emu::dynamicShared;
      auto *bar = reinterpret_cast<unsigned long long *>(smem + 512);
      std::memset(smem, 0x7f, 512);
      l4emu::mbarInit(bar, 1);
      l4emu::mbarArriveExpectTx(bar, 512);
      l4emu::tmaLoad(smem, &map, bar, 36, 6, 1, 7, 7); // 7: past the rank
      l4emu::mbarWait(bar, 0);
      std::memcpy(got.data(), smem, 512);
    });
    for (unsigned z = 0; z < 2; ++z)
      for (unsigned y = 0; y < 8; ++y)
        for (unsigned x = 0; x < 8; ++x) {
          unsigned gx = 36 + x, gy = 6 + y, gz = 1 + z;
          bool inside = gx < d0 && gy < d1 && gz < d2;
          float want = inside ? float(gz * 10000 + gy * 100 + gx + 1) : 0.0f;
          unsigned dense = ((z * 8 + y) * 8 + x) * 4;
          EXPECT_EQ(got[swizzled(dense, swizzle) / 4], want)
              << "x " << x << " y " << y << " z " << z;
        }
  }
}

//===----------------------------------------------------------------------===//
// Named barriers
//===----------------------------------------------------------------------===//

TEST_F(CuemuTma, NamedBarriersSyncTheirOwnGroups) {
  // Two groups of 64 threads, each on its own barrier, twice; then all.
  std::vector<int> seen(128, -1);
  unsigned arrived[2] = {0, 0};
  l4emu::launch(2, 128, 0, [&] {
    unsigned t = threadIdx.x, g = t / 64;
    if (blockIdx.x == 0) {
      ++arrived[g];
      l4emu::namedBarrier(1 + g, 64);
      seen[t] = int(arrived[g]); // every thread of the group has arrived
      l4emu::namedBarrier(1 + g, 64);
      l4emu::namedBarrier(0, 128); // __syncthreads's barrier
    } else {
      l4emu::namedBarrier(1, 128); // another count in the next block
    }
  });
  for (unsigned t = 0; t < 128; ++t)
    EXPECT_EQ(seen[t], 64) << "thread " << t;
}

//===----------------------------------------------------------------------===//
// The encoder's refusals
//===----------------------------------------------------------------------===//

alignas(128) uint16_t data[64 * 64]; // a 64 x 64 u16 tensor

TEST_F(CuemuTma, EncoderRejectsWhatTheDriverWould) {
  L4TensorMap m;
  auto enc = [&](std::vector<unsigned long long> dims,
                 std::vector<unsigned long long> strides,
                 std::vector<unsigned> box, int swizzle, int dtype = kU16,
                 const void *addr = data, void *map = nullptr,
                 std::vector<unsigned> es = {}) {
    if (es.empty())
      es.assign(dims.size(), 1);
    return encoder()(map ? map : &m, dtype, unsigned(dims.size()),
                     const_cast<void *>(addr), dims.data(), strides.data(),
                     box.data(), es.data(), 0, swizzle, 3, 0);
  };
  const int invalid = 1;
  EXPECT_EQ(enc({64, 64}, {128}, {64, 8}, 3), 0);
  EXPECT_EQ(m.v[0], l4emu::kTensorMapMagic);
  EXPECT_EQ(enc({64, 64}, {128}, {64, 8}, 3, kU16, data,
                reinterpret_cast<char *>(&m) + 32),
            invalid) // the map must be 64-byte aligned
  ;
  EXPECT_EQ(enc({64, 64}, {128}, {64, 8}, 3, kU16, data + 4), invalid);
  EXPECT_EQ(enc({}, {}, {}, 0), invalid);
  EXPECT_EQ(
      enc({2, 2, 2, 2, 2, 2}, {16, 32, 64, 128, 256}, {8, 1, 1, 1, 1, 1}, 0),
      invalid);
  EXPECT_EQ(enc({64, 64}, {120}, {64, 8}, 3), invalid); // stride % 16
  EXPECT_EQ(enc({64, 64}, {1ull << 40}, {64, 8}, 3), invalid);
  EXPECT_EQ(enc({0, 64}, {128}, {64, 8}, 3), invalid);
  EXPECT_EQ(enc({64, 300}, {128}, {64, 257}, 0), invalid); // box > 256
  EXPECT_EQ(enc({64, 64}, {128}, {0, 8}, 0), invalid);
  EXPECT_EQ(enc({64, 64}, {128}, {4, 8}, 0), invalid);  // 8 bytes inner
  EXPECT_EQ(enc({64, 64}, {128}, {64, 8}, 2), invalid); // 128 > 64B span
  EXPECT_EQ(enc({64, 64}, {128}, {32, 8}, 1), invalid); // 64 > 32B span
  EXPECT_EQ(enc({64, 64}, {128}, {32, 8}, 2), 0);
  EXPECT_EQ(enc({64, 64}, {128}, {64, 8}, 7), invalid);     // no such swizzle
  EXPECT_EQ(enc({64, 64}, {128}, {64, 8}, 3, 16), invalid); // no such type
  EXPECT_EQ(enc({64, 64}, {128}, {64, 8}, 0, kU16, data, nullptr, {1, 9}),
            invalid);
  // Valid for the driver, but not emulated: said on stderr.
  EXPECT_EQ(enc({64, 64}, {128}, {64, 8}, 0, kU16, data, nullptr, {1, 2}),
            invalid);
}

//===----------------------------------------------------------------------===//
// What aborts
//===----------------------------------------------------------------------===//

using CuemuTmaDeathTest = CuemuTma;

TEST_F(CuemuTmaDeathTest, ConsumersWaitingOnAnUnfilledStageDeadlock) {
  // The producer expects a box's bytes, but never issues the copy, and
  // exits; the consumers would spin forever.
  EXPECT_DEATH(l4emu::launch(1, 64, 64,
                             [&] {
                               auto *bar =
                                   reinterpret_cast<unsigned long long *>(
                                       l4emu::dynamicShared);
                               if (threadIdx.x == 0)
                                 l4emu::mbarInit(bar, 1);
                               __syncthreads();
                               if (threadIdx.x == 0)
                                 l4emu::mbarArriveExpectTx(bar, 2048);
                               else
                                 l4emu::mbarWait(bar, 0);
                             }),
               "cuemu: deadlock in block 0: 63 threads wait on an mbarrier "
               "\\(at shared byte 0, the first of them\\) for its phase of "
               "parity 0, which never completes: 0 of 1 arrivals and 2048 "
               "transaction bytes pending; 0 threads wait at a barrier, 1 "
               "have exited");
}

TEST_F(CuemuTmaDeathTest, SpinnersBesideABarrierDeadlock) {
  // Half the block waits at a named barrier the other half never reaches,
  // the other half on an mbarrier the first half would have completed.
  EXPECT_DEATH(l4emu::launch(1, 64, 64,
                             [&] {
                               auto *bar =
                                   reinterpret_cast<unsigned long long *>(
                                       l4emu::dynamicShared);
                               if (threadIdx.x == 0)
                                 l4emu::mbarInit(bar, 32);
                               __syncthreads();
                               if (threadIdx.x < 32) {
                                 l4emu::namedBarrier(1, 64);
                                 l4emu::mbarArrive(bar);
                               } else {
                                 l4emu::mbarWait(bar, 0);
                               }
                             }),
               "deadlock in block 0: 32 threads wait on an mbarrier .*32 "
               "of 32 arrivals.* 32 threads wait at a bar.sync 1");
}

TEST_F(CuemuTmaDeathTest, SharedMemoryPastTheLaunchIsNaNAndWritesThereAbort) {
  // A GPU faults on shared memory outside the block's; here reads there see
  // NaN bytes, and a write there is reported when the block ends.
  unsigned before = 0, after = 0;
  l4emu::launch(1, 1, 100, [&] {
    std::memcpy(&before, l4emu::dynamicShared - 4, 4);
    std::memcpy(&after, l4emu::dynamicShared + 100, 4);
    l4emu::dynamicShared[99] = 1; // the last byte is the kernel's
  });
  EXPECT_EQ(before, 0xffffffffu);
  EXPECT_EQ(after, 0xffffffffu);
  EXPECT_DEATH(l4emu::launch(2, 32, 100,
                             [&] {
                               if (blockIdx.x == 1 && threadIdx.x == 5)
                                 l4emu::dynamicShared[103] = 0;
                             }),
               "cuemu: block 1 wrote shared memory byte 103, outside the 100 "
               "bytes of dynamic shared memory it was launched with");
  EXPECT_DEATH(l4emu::launch(1, 32, 64,
                             [&] { l4emu::dynamicShared[-1] = 0; }),
               "cuemu: block 0 wrote shared memory byte -1, outside the 64 "
               "bytes");
}

TEST_F(CuemuTmaDeathTest, BadMapsAndDestinationsAbort) {
  L4TensorMap map;
  ASSERT_EQ(encode(map, kBf16, {64, 64}, {128}, {64, 8}, 3, data), 0);
  auto load = [&](unsigned offset, const void *m) {
    l4emu::launch(1, 1, 4000, [&] {
      auto *bar =
          reinterpret_cast<unsigned long long *>(l4emu::dynamicShared + 3968);
      l4emu::mbarInit(bar, 1);
      l4emu::tmaLoad(l4emu::dynamicShared + offset, m, bar, 0, 0, 0, 0, 0);
    });
  };
  L4TensorMap garbage{};
  EXPECT_DEATH(load(0, &garbage), "cuemu: tmaLoad with .*, which is not a "
                                  "tensor map made by cuTensorMapEncodeTiled");
  EXPECT_DEATH(load(128, &map), "cuemu: tmaLoad to .*: the shared "
                                "destination must be 1024-byte aligned with "
                                "128-byte swizzle");
  EXPECT_DEATH(load(3072, &map), "cuemu: tmaLoad of 1024 bytes at shared byte "
                                 "3072 overruns the 4000 dynamic shared bytes");
  EXPECT_DEATH(l4emu::launch(1, 1, 64,
                             [&] {
                               l4emu::mbarArrive(
                                   reinterpret_cast<unsigned long long *>(
                                       l4emu::dynamicShared));
                             }),
               "mbarArrive on an mbarrier at .* that mbarInit has not "
               "initialized");
  EXPECT_DEATH(l4emu::launch(1, 64, 0, [&] { l4emu::namedBarrier(1, 48); }),
               "cuemu: bar.sync 1, 48 in a block of 64 threads");
}

} // namespace
