//===- seeded_ids.h - the token ids the tools benchmark on ----*- C++ -*-===//
//
// l4-run --bench and l4-tune run plans on the same pseudo-random ids (a
// fixed-seed 64-bit LCG), so their runs see the same inputs.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_RUNTIME_TOOLS_SEEDED_IDS_H
#define L4C_RUNTIME_TOOLS_SEEDED_IDS_H

#include <cstdint>
#include <vector>

namespace l4c::tools {

/// `n` ids in [0, vocab), the same sequence on every call.
inline std::vector<int64_t> seededIds(size_t n, int64_t vocab) {
  std::vector<int64_t> ids(n);
  uint64_t state = 0x9e3779b97f4a7c15ull;
  for (int64_t &id : ids) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    id = int64_t((state >> 33) % uint64_t(vocab));
  }
  return ids;
}

} // namespace l4c::tools

#endif // L4C_RUNTIME_TOOLS_SEEDED_IDS_H
