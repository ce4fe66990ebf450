// A kernel with a race: each thread stores to shared memory and then, with no
// __syncthreads between, reads its left neighbour's slot. Compiled against
// the emulator's shim (test/cuemu/order.test), it prints how many threads
// read a stale slot: none when the threads run in increasing order (the
// neighbour has already stored), which is how the emulator hid such bugs
// before L4C_CUEMU_ORDER; all but thread 0 in reverse order.
#include <cstdio>

int main() {
  constexpr unsigned kThreads = 64;
  static int out[kThreads];
  l4emu::launch(1, kThreads, 0, [] {
    __shared__ int slot[kThreads];
    unsigned t = threadIdx.x;
    slot[t] = int(t) + 1;
    out[t] = t ? slot[t - 1] : 1; // the neighbour's t, once it has stored
  });
  unsigned stale = 0;
  for (unsigned t = 0; t < kThreads; ++t)
    stale += out[t] != int(t ? t : 1);
  std::printf("%u of %u threads read a stale slot\n", stale, kThreads);
}
