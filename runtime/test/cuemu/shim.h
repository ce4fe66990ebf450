//===- shim.h - CUDA C++ as host C++, for the driver emulator -*- C++ -*-===//
//
// Prepended (-include) to l4c's generated CUDA source when the emulator
// (cuemu.cpp) builds a module: the CUDA keywords and intrinsics the emitter
// uses, mapped onto host C++20. A launch runs its blocks one after another,
// each block's CUDA threads as fibers on one host thread; __syncthreads is a
// barrier of the block's fibers and warp shuffles exchange through a
// per-warp slot array between two barriers of the warp. __shared__
// variables become function statics: one block runs at a time, so one copy
// is the block's. sm_90's asynchronous machinery (mbarriers, TMA bulk tensor
// copies, named barriers) is emulated for warp-specialized kernels: a thread
// waiting on an mbarrier yields and stays runnable, and a scheduler round in
// which no thread got further than re-checking one is a deadlock.
//
// Test-only, x86-64 only (its context switch): meant for the tiny shapes of
// the golden cases.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_CUEMU_SHIM_H
#define L4C_CUEMU_SHIM_H

#include <algorithm>
#include <chrono>
#include <cmath>
#include <math.h>
#include <functional>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace l4emu {

struct Dim {
  unsigned x = 0, y = 0, z = 0;
};
inline Dim tIdx, bIdx;
inline Dim bDim{1, 1, 1}, gDim{1, 1, 1};

/// The CUDA threads of a block are fibers on the calling host thread: a
/// fiber runs until it reaches a barrier (__syncthreads, a warp shuffle) or
/// finishes, then the next one runs; a barrier releases its waiters when
/// all of its threads have arrived. No locks, no OS threads, deterministic.
struct Fiber {
  void *sp = nullptr; // saved stack pointer while switched out
  bool done = false;
  void *waitingOn = nullptr; // the barrier it waits at
  // mbarWait: the mbarrier and parity it waits for, and whether its last
  // run did nothing but find that phase still incomplete.
  unsigned long long *spinOn = nullptr;
  unsigned spinParity = 0;
  bool spinning = false;
};
inline std::vector<Fiber> fibers;
inline std::vector<std::vector<char>> stacks;
inline void *schedulerSp = nullptr;
inline unsigned current = 0;
inline std::function<void()> *blockBody = nullptr;

// A context switch of our own (x86-64 System V): saves the callee-saved
// registers on the current stack, stores the stack pointer in *from and
// continues on `to`. Unlike swapcontext it makes no system call, which is
// most of the emulator's time at a barrier per few lines of kernel code.
extern "C" void l4emu_swap(void **from, void *to);
asm(".text\n"
    ".p2align 4\n"
    ".type l4emu_swap,@function\n"
    "l4emu_swap:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n"
    "  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n"
    "  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size l4emu_swap, .-l4emu_swap\n");

inline void yieldToScheduler() {
  l4emu_swap(&fibers[current].sp, schedulerSp);
}

class Barrier {
public:
  explicit Barrier(unsigned n = 0) : n_(n) {}
  void reset(unsigned n) { n_ = n; arrived_ = 0; }
  /// True for the thread whose arrival releases the others: it runs on
  /// before any of them, so it can finish the group's work for them.
  unsigned arrived() const { return arrived_; }
  bool wait(const char *what) {
    what_ = what;
    if (++arrived_ == n_) {
      arrived_ = 0;
      for (Fiber &f : fibers)
        if (f.waitingOn == this)
          f.waitingOn = nullptr;
      return true;
    }
    fibers[current].waitingOn = this;
    yieldToScheduler();
    return false;
  }
  unsigned size() const { return n_; }
  const char *what_ = "";

private:
  unsigned n_, arrived_ = 0;
};

inline Barrier blockBarrier;
inline std::vector<Barrier> warpBarriers;
inline Barrier namedBarriers[16]; // bar.sync 1..15 (and 0 with a count)
inline unsigned long long shuffleSlots[1024];
inline unsigned char *dynamicShared = nullptr;
inline unsigned dynamicBytes = 0;

/// Where a fiber starts (entered by l4emu_swap's ret); never returns.
[[noreturn]] inline void fiberMain() {
  (*blockBody)();
  fibers[current].done = true;
  for (;;)
    yieldToScheduler();
}

/// A fresh fiber's stack: the six registers l4emu_swap pops, then
/// fiberMain as the address it returns to, placed so that fiberMain starts
/// with the stack aligned as after a call.
inline void *fiberStack(std::vector<char> &stack) {
  uintptr_t top = reinterpret_cast<uintptr_t>(stack.data() + stack.size());
  uintptr_t ret = (top - 64) & ~uintptr_t(15); // 16-aligned return slot
  *reinterpret_cast<void **>(ret) = reinterpret_cast<void *>(&fiberMain);
  void **regs = reinterpret_cast<void **>(ret) - 6;
  for (int i = 0; i < 6; ++i)
    regs[i] = nullptr;
  return regs;
}

/// An mbarrier's state, packed into its 8 bytes of shared memory as on the
/// GPU: bits 0-20 the arrivals the current phase still waits for, 21-41
/// the arrivals per phase (mbarInit's count), 42-62 the pending transaction
/// bytes (21-bit two's complement: a copy may complete before its bytes
/// are expected), bit 63 the current phase's parity.
struct MbarState {
  unsigned pending, count;
  int tx;
  unsigned phase;
};
constexpr int kMbarTxLimit = (1 << 20) - 1; // PTX's tx-count range

inline void mbarCheck(const unsigned long long *bar, const char *op) {
  if (reinterpret_cast<std::uintptr_t>(bar) % 8) {
    std::fprintf(stderr, "cuemu: %s on a misaligned mbarrier at %p\n", op,
                 static_cast<const void *>(bar));
    std::abort();
  }
}
inline MbarState mbarLoad(const unsigned long long *bar, const char *op) {
  mbarCheck(bar, op);
  unsigned long long v = *bar;
  MbarState s;
  s.pending = unsigned(v & 0x1fffff);
  s.count = unsigned((v >> 21) & 0x1fffff);
  unsigned tx = unsigned((v >> 42) & 0x1fffff);
  s.tx = tx & 0x100000 ? int(tx) - (1 << 21) : int(tx);
  s.phase = unsigned(v >> 63);
  // Zero, or the poison a block's shared memory starts with: no count
  // mbarInit accepts (1 to 2^20 - 1).
  if (s.count == 0 || s.count > 0xfffff) {
    std::fprintf(stderr,
                 "cuemu: %s on an mbarrier at %p that mbarInit has "
                 "not initialized\n",
                 op, static_cast<const void *>(bar));
    std::abort();
  }
  return s;
}
/// Stores `s`, first completing the phase if nothing is pending: the
/// arrivals start again from the count and the parity flips.
inline void mbarStore(unsigned long long *bar, MbarState s) {
  if (s.pending == 0 && s.tx == 0) {
    s.pending = s.count;
    s.phase ^= 1;
  }
  *bar = (unsigned long long)(s.pending & 0x1fffff) |
         (unsigned long long)(s.count & 0x1fffff) << 21 |
         (unsigned long long)(unsigned(s.tx) & 0x1fffff) << 42 |
         (unsigned long long)(s.phase & 1) << 63;
}
inline void mbarAddTx(unsigned long long *bar, MbarState &s, long long bytes,
                      const char *op) {
  long long tx = s.tx + bytes;
  if (tx > kMbarTxLimit || tx < -kMbarTxLimit) {
    std::fprintf(stderr,
                 "cuemu: %s: the mbarrier at %p would have %lld "
                 "pending transaction bytes (the limit is 2^20 - 1)\n",
                 op, static_cast<void *>(bar), tx);
    std::abort();
  }
  s.tx = int(tx);
}

/// mbarrier.init.shared.b64: `count` arrivals per phase; phase 0, nothing
/// pending.
inline void mbarInit(unsigned long long *bar, unsigned count) {
  mbarCheck(bar, "mbarInit");
  if (count < 1 || count > (1u << 20) - 1) {
    std::fprintf(stderr,
                 "cuemu: mbarInit with a count of %u (must be 1 to "
                 "2^20 - 1)\n",
                 count);
    std::abort();
  }
  *bar = (unsigned long long)count | (unsigned long long)count << 21;
}

inline void mbarArriveOn(unsigned long long *bar, MbarState s, const char *op) {
  if (s.pending == 0) { // only while transaction bytes are still pending
    std::fprintf(stderr,
                 "cuemu: %s: the mbarrier at %p has all %u arrivals "
                 "of its phase already (more arrivals than its count)\n",
                 op, static_cast<void *>(bar), s.count);
    std::abort();
  }
  --s.pending;
  mbarStore(bar, s);
}

/// mbarrier.arrive.shared.b64: one arrival.
inline void mbarArrive(unsigned long long *bar) {
  mbarArriveOn(bar, mbarLoad(bar, "mbarArrive"), "mbarArrive");
}

/// mbarrier.arrive.expect_tx.shared.b64: expect `bytes` more transaction
/// bytes in the current phase, then one arrival.
inline void mbarArriveExpectTx(unsigned long long *bar, unsigned bytes) {
  MbarState s = mbarLoad(bar, "mbarArriveExpectTx");
  mbarAddTx(bar, s, (long long)bytes, "mbarArriveExpectTx");
  mbarArriveOn(bar, s, "mbarArriveExpectTx");
}

/// mbarrier.expect_tx.shared.b64: expect `bytes` more transaction bytes
/// in the current phase, without an arrival.
inline void mbarExpectTx(unsigned long long *bar, unsigned bytes) {
  MbarState s = mbarLoad(bar, "mbarExpectTx");
  mbarAddTx(bar, s, (long long)bytes, "mbarExpectTx");
  mbarStore(bar, s);
}

/// complete_tx: `bytes` of the current phase's transactions arrived.
inline void mbarCompleteTx(unsigned long long *bar, unsigned bytes) {
  MbarState s = mbarLoad(bar, "tmaLoad (complete_tx)");
  mbarAddTx(bar, s, -(long long)bytes, "tmaLoad (complete_tx)");
  mbarStore(bar, s);
}

/// mbarrier.try_wait.parity in a loop: returns once the phase of parity
/// `parity` has completed, that is at once while the current phase's
/// parity differs. Until then the thread yields and stays runnable; the
/// scheduler (launch) treats a run that only re-checked as no progress.
inline void mbarWait(unsigned long long *bar, unsigned parity) {
  if (mbarLoad(bar, "mbarWait").phase != (parity & 1))
    return;
  Fiber &me = fibers[current];
  me.spinOn = bar;
  me.spinParity = parity & 1;
  // The first yield ends a run that got here from elsewhere: progress.
  me.spinning = false;
  do {
    yieldToScheduler();
    me.spinning = true;
  } while (mbarLoad(bar, "mbarWait").phase == (parity & 1));
  me.spinning = false;
  me.spinOn = nullptr;
}

/// bar.sync id, count: the first `count` threads to arrive (a multiple of
/// 32) release each other. Barrier 0 with every thread of the block is
/// __syncthreads's.
inline const char *const kNamedBarrierWhat[16] = {
    "bar.sync 0",  "bar.sync 1",  "bar.sync 2",  "bar.sync 3",
    "bar.sync 4",  "bar.sync 5",  "bar.sync 6",  "bar.sync 7",
    "bar.sync 8",  "bar.sync 9",  "bar.sync 10", "bar.sync 11",
    "bar.sync 12", "bar.sync 13", "bar.sync 14", "bar.sync 15"};
inline void namedBarrier(unsigned id, unsigned count) {
  if (id > 15 || count == 0 || count % 32 || count > bDim.x) {
    std::fprintf(stderr,
                 "cuemu: bar.sync %u, %u in a block of %u threads "
                 "(ids are 0 to 15, counts multiples of 32 up to the "
                 "block's threads)\n",
                 id, count, bDim.x);
    std::abort();
  }
  Barrier &b = id == 0 && count == bDim.x ? blockBarrier : namedBarriers[id];
  if (b.arrived() == 0)
    b.reset(count);
  else if (b.size() != count) {
    std::fprintf(stderr,
                 "cuemu: bar.sync %u, %u while %u of %u threads "
                 "wait at it\n",
                 id, count, b.arrived(), b.size());
    std::abort();
  }
  b.wait(kNamedBarrierWhat[id]);
}

/// The emulator's CUtensorMap (written by cuemu.cpp's cuTensorMapEncodeTiled,
/// which keeps a copy of this layout): 16 words.
constexpr unsigned long long kTensorMapMagic =
    0x414d5475656d344cull; // "L4emuTMA"
struct TensorMapFields {
  const unsigned char *address;
  unsigned rank, elemSize, swizzle;
  unsigned long long dims[5], strides[5]; // strides[0]: the element size
  unsigned box[5];
};
inline TensorMapFields decodeTensorMap(const void *map) {
  const unsigned long long *w = static_cast<const unsigned long long *>(map);
  if (reinterpret_cast<std::uintptr_t>(map) % 8 || w[0] != kTensorMapMagic) {
    std::fprintf(stderr,
                 "cuemu: tmaLoad with %p, which is not a tensor map "
                 "made by cuTensorMapEncodeTiled\n",
                 map);
    std::abort();
  }
  TensorMapFields t;
  t.address = reinterpret_cast<const unsigned char *>(std::uintptr_t(w[1]));
  t.rank = unsigned(w[2] & 0xff);
  t.elemSize = unsigned((w[2] >> 8) & 0xff);
  t.swizzle = unsigned((w[2] >> 16) & 0xff);
  for (unsigned i = 0; i < 5; ++i) {
    t.dims[i] = i < t.rank ? w[3 + i] : 1;
    t.strides[i] = i == 0 ? t.elemSize : i < t.rank ? w[7 + i] : 0;
    t.box[i] = i < t.rank ? unsigned(i < 4 ? (w[12] >> (16 * i)) & 0xffff
                                           : w[13] & 0xffff)
                          : 1;
  }
  return t;
}

/// cp.async.bulk.tensor.Nd.shared::cluster.global.mbarrier::complete_tx::bytes:
/// the box whose first element sits at coordinates c (innermost first;
/// those past the map's rank are ignored), copied at once into shared memory at
/// `dst`: densely, box[0] innermost, elements outside the tensor as zeros, and
/// with the map's swizzle applied to the shared address as the hardware does
/// (the 16-byte chunk, address bits 4-6, XORed with bits 7-9 for 128B, bits 4-5
/// with 7-8 for 64B, bit 4 with 7 for 32B). Then the whole box's bytes,
/// zeros included, complete on `bar`.
inline void tmaLoad(void *dst, const void *map, unsigned long long *bar, int c0,
                    int c1, int c2, int c3, int c4) {
  TensorMapFields t = decodeTensorMap(map);
  std::uintptr_t d = reinterpret_cast<std::uintptr_t>(dst);
  std::uintptr_t align = t.swizzle == 3 ? 1024 : 128;
  if (d % align) {
    std::fprintf(stderr,
                 "cuemu: tmaLoad to %p: the shared destination must "
                 "be %u-byte aligned%s\n",
                 dst, unsigned(align),
                 t.swizzle == 3 ? " with 128-byte swizzle" : "");
    std::abort();
  }
  unsigned long long elems = 1;
  for (unsigned i = 0; i < 5; ++i)
    elems *= t.box[i];
  unsigned long long bytes = elems * t.elemSize;
  std::uintptr_t shared = reinterpret_cast<std::uintptr_t>(dynamicShared);
  if (d >= shared && d < shared + dynamicBytes &&
      d + bytes > shared + dynamicBytes) {
    std::fprintf(stderr,
                 "cuemu: tmaLoad of %llu bytes at shared byte %u "
                 "overruns the %u dynamic shared bytes\n",
                 bytes, unsigned(d - shared), dynamicBytes);
    std::abort();
  }
  const long long c[5] = {c0, c1, c2, c3, c4};
  unsigned swizzleMask = t.swizzle ? (1u << t.swizzle) - 1 : 0;
  unsigned long long o = 0; // bytes into the dense box
  for (unsigned i4 = 0; i4 < t.box[4]; ++i4)
    for (unsigned i3 = 0; i3 < t.box[3]; ++i3)
      for (unsigned i2 = 0; i2 < t.box[2]; ++i2)
        for (unsigned i1 = 0; i1 < t.box[1]; ++i1)
          for (unsigned i0 = 0; i0 < t.box[0]; ++i0, o += t.elemSize) {
            const unsigned idx[5] = {i0, i1, i2, i3, i4};
            bool inside = true;
            unsigned long long src = 0;
            for (unsigned k = 0; k < t.rank; ++k) {
              long long at = c[k] + idx[k];
              if (at < 0 || (unsigned long long)at >= t.dims[k])
                inside = false;
              else
                src += (unsigned long long)at * t.strides[k];
            }
            std::uintptr_t a = d + o;
            a ^= ((a >> 7) & swizzleMask) << 4;
            if (inside)
              std::memcpy(reinterpret_cast<void *>(a), t.address + src,
                          t.elemSize);
            else
              std::memset(reinterpret_cast<void *>(a), 0, t.elemSize);
          }
  mbarCompleteTx(bar, unsigned(bytes));
}

/// Every runnable thread only re-checked an mbarrier whose phase is still
/// incomplete, and the others wait at barriers or have exited: nothing
/// can complete it.
[[noreturn]] inline void reportMbarrierDeadlock(unsigned block) {
  unsigned spinning = 0, waiting = 0, exited = 0;
  const Fiber *first = nullptr;
  const char *what = "";
  for (const Fiber &f : fibers) {
    if (f.done)
      ++exited;
    else if (f.waitingOn) {
      ++waiting;
      what = static_cast<Barrier *>(f.waitingOn)->what_;
    } else if (f.spinOn) {
      ++spinning;
      if (!first)
        first = &f;
    }
  }
  MbarState s = mbarLoad(first->spinOn, "mbarWait");
  std::uintptr_t at = reinterpret_cast<std::uintptr_t>(first->spinOn);
  std::uintptr_t shared = reinterpret_cast<std::uintptr_t>(dynamicShared);
  char where[64];
  if (at >= shared && at < shared + dynamicBytes)
    std::snprintf(where, sizeof where, "at shared byte %u",
                  unsigned(at - shared));
  else
    std::snprintf(where, sizeof where, "at %p",
                  static_cast<void *>(first->spinOn));
  std::fprintf(stderr,
               "cuemu: deadlock in block %u: %u threads wait on an mbarrier "
               "(%s, the first of them) for its phase of parity %u, which "
               "never completes: %u of %u arrivals and %d transaction bytes "
               "pending; %u threads wait at a %s, %u have exited\n",
               block, spinning, where, first->spinParity, s.pending, s.count,
               s.tx, waiting, waiting ? what : "barrier", exited);
  std::abort();
}

/// The order in which a launch runs its blocks, and each scheduler round
/// its runnable threads: L4C_CUEMU_ORDER=forward (the default), reverse, or
/// random[:SEED] (a fresh permutation for every launch and round, from SEED,
/// default 1). The threads of a block run one after another between two
/// barriers, so a thread that reads another's write with no barrier between
/// them sees the write in one order and misses it in the other: the tests
/// pass in every order only if no kernel relies on such a race (a missing
/// __syncthreads), which a GPU would not keep in any order. Blocks that wait
/// on blocks with a higher index would trap in reverse.
struct Order {
  enum Kind { Forward, Reverse, Random } kind = Forward;
  unsigned long long state = 1;
};
inline Order &order() {
  static Order o = [] {
    Order r;
    const char *e = std::getenv("L4C_CUEMU_ORDER");
    std::string v = e ? e : "";
    if (v.empty() || v == "forward")
      r.kind = Order::Forward;
    else if (v == "reverse")
      r.kind = Order::Reverse;
    else if (v == "random")
      r.kind = Order::Random;
    else if (v.rfind("random:", 0) == 0 && v.size() > 7 &&
             v.find_first_not_of("0123456789", 7) == std::string::npos) {
      r.kind = Order::Random;
      r.state = std::strtoull(v.c_str() + 7, nullptr, 10);
    } else {
      std::fprintf(stderr, "cuemu: L4C_CUEMU_ORDER must be forward, reverse "
                           "or random[:SEED], got '%s'\n", v.c_str());
      std::abort();
    }
    return r;
  }();
  return o;
}
/// 0 .. n-1 in the order L4C_CUEMU_ORDER asks for.
inline void arrange(std::vector<unsigned> &idx, unsigned n) {
  idx.resize(n);
  for (unsigned i = 0; i < n; ++i)
    idx[i] = i;
  Order &o = order();
  if (o.kind == Order::Reverse) {
    std::reverse(idx.begin(), idx.end());
  } else if (o.kind == Order::Random) {
    for (unsigned i = n; i > 1; --i) { // Fisher-Yates on splitmix64
      unsigned long long z = (o.state += 0x9e3779b97f4a7c15ULL);
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
      z ^= z >> 31;
      std::swap(idx[i - 1], idx[unsigned(z % i)]);
    }
  }
}

/// Runs body() as `grid` blocks of `block` threads (blocks capped by
/// L4C_CUEMU_MAX_BLOCKS, default 3: the kernels stride over their work, so
/// any grid is correct, and a small odd one exercises the striding), in
/// L4C_CUEMU_ORDER's order.
template <class F>
void launch(unsigned grid, unsigned block, unsigned smem, F body) {
  unsigned cap = 3;
  if (const char *e = std::getenv("L4C_CUEMU_MAX_BLOCKS"))
    cap = unsigned(std::max(1, std::atoi(e)));
  grid = std::max(1u, std::min(grid, cap));
  bDim = {block, 1, 1};
  gDim = {grid, 1, 1};
  // 1024-byte aligned, as a GPU's shared window is at least: the swizzle
  // of wgmma's descriptors works on the address bits. The bytes around it
  // (what is left of the first 1024, and kSharedMargin after) are NaN: a
  // read past the kernel's shared memory, which faults on a GPU, gives NaN
  // here, and a write there is reported when the block ends.
  constexpr size_t kSharedMargin = 4096;
  std::vector<unsigned char> dyn(1024 + smem + kSharedMargin);
  dynamicShared = dyn.data() + (1024 - reinterpret_cast<uintptr_t>(dyn.data()) % 1024) % 1024;
  dynamicBytes = smem;
  auto checkMargins = [&](unsigned b) {
    // The bytes before the kernel's, then the bytes after them.
    const unsigned char *ranges[2][2] = {
        {dyn.data(), dynamicShared},
        {dynamicShared + smem, dyn.data() + dyn.size()}};
    for (auto &r : ranges)
      for (const unsigned char *p = r[0]; p < r[1]; ++p) {
        if (*p == 0xff)
          continue;
        std::fprintf(stderr,
                     "cuemu: block %u wrote shared memory byte %lld, outside "
                     "the %u bytes of dynamic shared memory it was launched "
                     "with\n",
                     b, (long long)(p - dynamicShared), smem);
        std::abort();
      }
  };
  std::function<void()> fn = body;
  blockBody = &fn;
  constexpr size_t kStack = 256 * 1024;
  if (stacks.size() < block)
    stacks.resize(block);
  for (auto &st : stacks)
    if (st.empty())
      st.resize(kStack);
  std::vector<unsigned> blockOrder, threadOrder;
  arrange(blockOrder, grid);
  for (unsigned b : blockOrder) {
    bIdx = {b, 0, 0};
    // A block's shared memory holds whatever the SM's last block left: NaN
    // here, so a kernel that reads dynamic shared memory it did not write
    // in this block shows it (static __shared__ variables keep the
    // previous block's values, which no emulator run can tell apart).
    std::memset(dyn.data(), 0xff, dyn.size());
    blockBarrier.reset(block);
    for (Barrier &nb : namedBarriers)
      nb.reset(0);
    warpBarriers.assign((block + 31) / 32, Barrier());
    for (unsigned w = 0; w * 32 < block; ++w)
      warpBarriers[w].reset(std::min(32u, block - w * 32));
    fibers.assign(block, Fiber());
    for (unsigned t = 0; t < block; ++t)
      fibers[t].sp = fiberStack(stacks[t]);
    unsigned live = block;
    while (live) {
      // Progress: some thread that ran did more than find the mbarrier it
      // waits on still incomplete.
      bool ran = false, progress = false;
      arrange(threadOrder, block);
      for (unsigned t : threadOrder) {
        Fiber &f = fibers[t];
        if (f.done || f.waitingOn)
          continue;
        current = t;
        tIdx = {t, 0, 0};
        l4emu_swap(&schedulerSp, f.sp);
        ran = true;
        progress |= !f.spinning;
        if (f.done)
          --live;
      }
      if (!live)
        break;
      if (!ran) {
        const char *what = "";
        unsigned waiting = 0;
        for (Fiber &f : fibers)
          if (!f.done && f.waitingOn) {
            ++waiting;
            what = static_cast<Barrier *>(f.waitingOn)->what_;
          }
        std::fprintf(stderr,
                     "cuemu: deadlock in block %u: %u threads wait at a %s "
                     "that the other %u never reach (divergent barrier?)\n",
                     b, waiting, what, block - waiting);
        std::abort();
      }
      if (!progress)
        reportMbarrierDeadlock(b);
    }
    checkMargins(b);
  }
  blockBody = nullptr;
}

inline void syncBlock() { blockBarrier.wait("__syncthreads"); }

/// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 for the calling
/// warp: every lane publishes its fragments and accumulators; the lane
/// whose arrival completes the warp computes every lane's four outputs
/// (with the fragment layout of the PTX ISA, "Matrix Fragments for
/// mma.m16n8k16 with floating point type") before any other runs on, and
/// each lane then takes its own. One warp barrier per mma.
inline unsigned mmaA[1024][4], mmaB[1024][2];
inline float mmaD[1024][4];
inline void mmaBf16(float d[4], const unsigned a[4], const unsigned b[2]) {
  unsigned me = tIdx.x, base = me & ~31u;
  Barrier &w = warpBarriers[me / 32];
  std::memcpy(mmaA[me], a, sizeof(mmaA[me]));
  std::memcpy(mmaB[me], b, sizeof(mmaB[me]));
  std::memcpy(mmaD[me], d, sizeof(mmaD[me]));
  if (w.wait("mma.sync")) {
    auto half = [](unsigned v, int k) {
      unsigned bits = (k & 1) ? v >> 16 : v & 0xffffu;
      bits <<= 16;
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    };
    // A[r][k]: lane (r % 8) * 4 + (k % 8) / 2, register r / 8 + 2 * (k / 8);
    // B[k][n]: lane n * 4 + (k % 8) / 2, register k / 8.
    float A[16][16], B[16][8];
    for (int r = 0; r < 16; ++r)
      for (int k = 0; k < 16; ++k)
        A[r][k] = half(mmaA[base + (r % 8) * 4 + (k % 8) / 2][r / 8 + 2 * (k / 8)], k);
    for (int k = 0; k < 16; ++k)
      for (int n = 0; n < 8; ++n)
        B[k][n] = half(mmaB[base + n * 4 + (k % 8) / 2][k / 8], k);
    for (unsigned l = 0; l < w.size(); ++l) {
      int g = int(l) >> 2, t = int(l & 3);
      for (int c = 0; c < 4; ++c) {
        int row = g + (c >= 2 ? 8 : 0), col = 2 * t + (c & 1);
        float s = mmaD[base + l][c];
        for (int k = 0; k < 16; ++k)
          s += A[row][k] * B[k][col];
        mmaD[base + l][c] = s;
      }
    }
  }
  std::memcpy(d, mmaD[me], sizeof(mmaD[me]));
}

/// Shared addresses (__cvta_generic_to_shared): offsets into the block's
/// dynamic shared memory, the only shared memory with addresses here.
inline unsigned sharedAddress(const void *p) {
  auto *b = static_cast<const unsigned char *>(p);
  if (b < dynamicShared || b >= dynamicShared + dynamicBytes) {
    std::fprintf(stderr, "cuemu: a shared address of %p, outside the %u "
                 "dynamic shared bytes (static shared memory has none here)\n",
                 p, dynamicBytes);
    std::abort();
  }
  return unsigned(b - dynamicShared);
}

/// wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16 with both operands
/// in shared memory (descriptors), scale-d 1, each operand K-major or
/// transposed (MN-major). A thread's
/// products wait in its open group until committed and happen when
/// wgmma.wait_group retires the group, so reading the accumulators, or
/// refilling the stages, before the wait shows up as wrong results. Each
/// thread computes its own fragment: d[4j + c] at row 16 * (warp % 4) +
/// lane / 4 + 8 * (c / 2), column 8j + 2 * (lane % 4) + c % 2 of the
/// 64 x N tile.
struct Wgmma {
  float *d;
  unsigned n;
  unsigned long long a, b;
  bool transA, transB;
};
inline std::vector<Wgmma> wgOpen[1024];
inline std::vector<std::vector<Wgmma>> wgGroups[1024];

/// Element (row, k) of a bf16 operand described by `desc` (the PTX ISA's
/// "Matrix Descriptor Format"). K-major: no swizzle (8 x 16-byte core
/// matrices, leading byte offset between them along k, stride byte offset
/// along rows) or 128-byte swizzle (rows of 128 bytes along k, 8-row
/// groups the stride byte offset apart). MN-major (`mn`), 128-byte swizzle
/// only: atoms of 8 k x 128 bytes along the rows, the leading byte offset
/// between atoms along the rows, the stride byte offset between those
/// along k. The swizzle XORs address bits 4-6 with bits 7-9.
inline float wgmmaOperand(unsigned long long desc, unsigned row, unsigned k,
                          bool mn = false) {
  unsigned start = unsigned(desc & 0x3fff) << 4;
  unsigned lbo = unsigned((desc >> 16) & 0x3fff) << 4;
  unsigned sbo = unsigned((desc >> 32) & 0x3fff) << 4;
  unsigned baseOffset = unsigned(desc >> 49) & 7, mode = unsigned(desc >> 62);
  unsigned addr;
  if (baseOffset != 0 || (mode != 0 && mode != 1) || (mn && mode != 1)) {
    std::fprintf(stderr, "cuemu: wgmma descriptor %#llx: base offset %u, "
                 "swizzle mode %u are not emulated\n", desc, baseOffset, mode);
    std::abort();
  }
  if (mn) {
    addr = start + (row / 64) * lbo + (k / 8) * sbo + (k % 8) * 128 + (row % 64) * 2;
    addr ^= ((addr >> 7) & 7) << 4;
  } else if (mode == 1) {
    if (start % 128 + 32 > 128) {
      std::fprintf(stderr, "cuemu: wgmma descriptor %#llx: a k16 step "
                   "crosses its 128-byte swizzle row\n", desc);
      std::abort();
    }
    addr = start + (row / 8) * sbo + (row % 8) * 128 + k * 2;
    addr ^= ((addr >> 7) & 7) << 4;
  } else {
    addr = start + (row / 8) * sbo + (k / 8) * lbo + (row % 8) * 16 + (k % 8) * 2;
  }
  if (addr + 2 > dynamicBytes) {
    std::fprintf(stderr, "cuemu: wgmma reads shared byte %u of %u\n", addr,
                 dynamicBytes);
    std::abort();
  }
  unsigned short h;
  std::memcpy(&h, dynamicShared + addr, 2);
  unsigned bits = unsigned(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline void wgmma(float *d, unsigned n, unsigned long long a,
                  unsigned long long b, bool transA, bool transB) {
  wgOpen[tIdx.x].push_back({d, n, a, b, transA, transB});
}
inline void wgmmaFence() {}
inline void wgmmaCommit() {
  wgGroups[tIdx.x].push_back(std::move(wgOpen[tIdx.x]));
  wgOpen[tIdx.x].clear();
}
inline void wgmmaWait(int pending) {
  unsigned me = tIdx.x, w = (me / 32) % 4, lane = me % 32;
  auto &groups = wgGroups[me];
  while (int(groups.size()) > pending) {
    for (const Wgmma &op : groups.front())
      for (unsigned j = 0; j < op.n / 8; ++j)
        for (unsigned c = 0; c < 4; ++c) {
          unsigned row = 16 * w + lane / 4 + 8 * (c / 2);
          unsigned col = 8 * j + 2 * (lane % 4) + c % 2;
          float s = op.d[4 * j + c];
          for (unsigned k = 0; k < 16; ++k)
            s += wgmmaOperand(op.a, row, k, op.transA) *
                 wgmmaOperand(op.b, col, k, op.transB);
          op.d[4 * j + c] = s;
        }
    groups.erase(groups.begin());
  }
}

/// cp.async: a thread's copies wait in its open group until committed,
/// and a committed group's copies happen only when cp.async.wait_group
/// retires it (oldest first), so a kernel that reads a stage before
/// waiting for it reads stale shared memory here as it might on a GPU.
struct CpCopy {
  void *dst;
  const void *src;
};
inline std::vector<CpCopy> cpOpen[1024];
inline std::vector<std::vector<CpCopy>> cpGroups[1024];
inline void cpAsync16(void *dst, const void *src) {
  if (reinterpret_cast<std::uintptr_t>(dst) % 16 ||
      reinterpret_cast<std::uintptr_t>(src) % 16) {
    std::fprintf(stderr, "cuemu: misaligned cp.async %p <- %p\n", dst, src);
    std::abort();
  }
  cpOpen[tIdx.x].push_back({dst, src});
}
inline void cpAsyncCommit() {
  cpGroups[tIdx.x].push_back(std::move(cpOpen[tIdx.x]));
  cpOpen[tIdx.x].clear();
}
inline void cpAsyncWait(int n) {
  auto &groups = cpGroups[tIdx.x];
  while (int(groups.size()) > n) {
    for (const CpCopy &c : groups.front())
      std::memcpy(c.dst, c.src, 16);
    groups.erase(groups.begin());
  }
}

template <class T> T shuffle(T v, unsigned lane) {
  static_assert(sizeof(T) <= 8);
  unsigned me = tIdx.x, base = me & ~31u;
  Barrier &w = warpBarriers[me / 32];
  std::memcpy(&shuffleSlots[me], &v, sizeof(T));
  w.wait("warp shuffle");
  unsigned src = base + (lane & 31u);
  T r = v;
  if (src < bDim.x)
    std::memcpy(&r, &shuffleSlots[src], sizeof(T));
  w.wait("warp shuffle");
  return r;
}

/// Kernel parameters as the driver passes them (an array of pointers to
/// the values), unpacked by the kernel's own parameter types.
template <class... A> struct Thunk {
  using Tuple = std::tuple<std::decay_t<A>...>;
  template <size_t... I>
  static Tuple *pack(void **p, std::index_sequence<I...>) {
    return new Tuple(*static_cast<std::decay_t<A> *>(p[I])...);
  }
  static Tuple *pack(void **p) {
    return pack(p, std::index_sequence_for<A...>{});
  }
};
template <class... A> void *packParams(void (*)(A...), void **p) {
  return Thunk<A...>::pack(p);
}
template <class... A>
void runPacked(void (*f)(A...), void *packed, unsigned g, unsigned b,
               unsigned s) {
  auto *t = static_cast<typename Thunk<A...>::Tuple *>(packed);
  launch(g, b, s, [&] { std::apply(f, *t); });
}
template <class... A> void freePacked(void (*)(A...), void *packed) {
  delete static_cast<typename Thunk<A...>::Tuple *>(packed);
}

} // namespace l4emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define L4C_CUEMU 1
#define __constant__ static
#define __grid_constant__
#define threadIdx (l4emu::tIdx)
#define blockIdx (l4emu::bIdx)
#define blockDim (l4emu::bDim)
#define gridDim (l4emu::gDim)
#define warpSize 32

struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  return {x, y, z, w};
}
// Vector loads fault on a real GPU when misaligned; here they would not.
#define L4_CHECK_ALIGNED(p, bytes)                                             \
  do {                                                                         \
    if (reinterpret_cast<std::uintptr_t>(p) % (bytes)) {                       \
      std::fprintf(stderr, "cuemu: misaligned %d-byte vector load at %p\n",   \
                   int(bytes), static_cast<const void *>(p));                  \
      std::abort();                                                            \
    }                                                                          \
  } while (0)

inline void __syncthreads() { l4emu::syncBlock(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  l4emu::warpBarriers[l4emu::tIdx.x / 32].wait("__syncwarp");
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
// Blocks run one at a time, in order: plain read-modify-write is atomic
// and every earlier block's stores are visible.
inline unsigned atomicAdd(unsigned *p, unsigned v) {
  unsigned old = *p;
  *p = old + v;
  return old;
}
inline void __threadfence() {}
// Spin-waits: blocks run in order, so a wait the earlier blocks did not
// satisfy never will be. The clock jumps a minute of 2 GHz cycles a read,
// so such a wait's timeout traps at once; the trap ends the process.
inline long long clock64() {
  static thread_local long long now = 0;
  return now += 120000000000LL;
}
inline void __nanosleep(unsigned) {}
[[noreturn]] inline void __trap() {
  std::fprintf(stderr, "cuemu: __trap (a kernel gave up: a spin-wait timed out)\n");
  std::abort();
}
template <class T> inline T __ldcg(const T *p) { return *p; }
template <class T> T __shfl_xor_sync(unsigned, T v, int mask, int = 32) {
  return l4emu::shuffle(v, (l4emu::tIdx.x & 31u) ^ unsigned(mask));
}
template <class T> T __shfl_sync(unsigned, T v, int lane, int = 32) {
  return l4emu::shuffle(v, unsigned(lane));
}
template <class T> T __shfl_down_sync(unsigned, T v, unsigned d, int = 32) {
  unsigned lane = (l4emu::tIdx.x & 31u) + d;
  return l4emu::shuffle(v, lane < 32 ? lane : (l4emu::tIdx.x & 31u));
}

inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float v) { int i; std::memcpy(&i, &v, 4); return i; }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float v) { unsigned i; std::memcpy(&i, &v, 4); return i; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float v) { return std::exp(v); }
inline float __logf(float v) { return std::log(v); }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
template <class T> inline T __ldg(const T *p) { return *p; }
using std::max;
using std::min;

// Modules are compiled with -fsanitize=alignment (cuemu.cpp, moduleFlags).
// Its runtime, loaded with the first module, takes its options from here
// (it reads the environment the process started with, not setenv's): a
// report aborts, and the emulator's SIGABRT handler names the kernel.
extern "C" __attribute__((weak)) const char *__ubsan_default_options() {
  return "abort_on_error=1:print_summary=0";
}

#endif // L4C_CUEMU_SHIM_H
