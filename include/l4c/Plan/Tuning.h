//===- Tuning.h - l4-tune's tuning files, as l4c reads them -----*- C++ -*-===//
//
// A tuning file records, per (kernel signature, GPU architecture), the tile
// configuration l4-tune measured fastest. l4-tune (runtime/tools/l4-tune)
// writes it; `l4c compile --tuning=FILE` generates those kernels with the
// recorded configuration. The format:
//
//   {"format": "l4c-tuning", "version": 1, "entries": [
//     {"arch": "sm_90a", "signature": "l4_gemm_...", "config": "p128x64",
//      "kernel": "...", "ms": 0.12, "default_ms": 0.15, "device": "..."}]}
//
// where the signature is the name of the kernel's default body (a hash of
// its text: shapes, dtypes, fusion), so a choice applies to every kernel
// with that body and goes stale, harmlessly, when the generator changes it.
// Fields beyond arch, signature and config are informative.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_PLAN_TUNING_H
#define L4C_PLAN_TUNING_H

#include "llvm/ADT/StringRef.h"
#include "llvm/Support/Error.h"
#include <map>
#include <string>

namespace l4c {

/// The tile configurations the CUDA emitter knows (CudaKernel::configs).
bool isTileConfig(llvm::StringRef config);

/// The choices of the tuning file at `path` for `arch` (signature ->
/// configuration). Fails, naming the file, on unreadable or malformed
/// files, unknown configurations and contradictory entries.
llvm::Expected<std::map<std::string, std::string>>
readTuningFile(llvm::StringRef path, llvm::StringRef arch);

} // namespace l4c

#endif // L4C_PLAN_TUNING_H
