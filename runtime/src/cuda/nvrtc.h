//===- nvrtc.h - NVRTC loaded at run time -----------------------*- C++ -*-===//
//
// Compiles generated CUDA C++ to cubins through NVRTC, found with dlopen so
// that neither the compiler nor the runtime needs the CUDA toolkit to build
// or to start. The compiler uses it at plan time, the runtime at load time.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_RUNTIME_CUDA_NVRTC_H
#define L4C_RUNTIME_CUDA_NVRTC_H

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace l4c::nvrtc {

/// Loads NVRTC once per process (later calls return the first answer).
/// Returns an empty string when it is usable, else why not, starting with
/// "NVRTC not found: " or "NVRTC unusable: ".
const std::string &loadError();

inline bool available() { return loadError().empty(); }

/// "13.0"; empty when NVRTC cannot be loaded.
std::string version();

/// How device code is compiled and linked.
enum class Linking {
  /// One whole program: ptxas compiles every entry with everything it calls
  /// (a body shared by many entries is compiled once per entry).
  WholeProgram,
  /// -rdc: device functions are compiled once and calls stay calls; the
  /// relocatable cubin is then linked into a loadable one with nvJitLink.
  /// Falls back to WholeProgram where nvJitLink cannot be loaded.
  Separate,
};

/// Loads nvJitLink once; empty when usable, else why not.
const std::string &linkerLoadError();

/// The options compile() passes for `arch` besides the caller's extra ones,
/// as one string (recorded in plans so a cache key can include them).
std::string defaultOptions(std::string_view arch,
                           Linking linking = Linking::WholeProgram);

struct Output {
  std::vector<uint8_t> cubin; ///< loadable machine code for the arch
  std::string ptx;            ///< whole-program PTX, when asked for
  std::string log;            ///< NVRTC's (and the linker's) log
  Linking linking = Linking::WholeProgram; ///< how the cubin was built
};

/// Compiles `source` (program name `name`, used in NVRTC's messages) for
/// `arch` ("sm_90a"). Returns an empty string on success, else a message
/// that names the program; `out.log` holds NVRTC's log either way.
/// Thread-safe: programs compile concurrently.
std::string compile(std::string_view source, const std::string &name,
                    std::string_view arch,
                    const std::vector<std::string> &extraOptions, Output &out,
                    Linking linking = Linking::WholeProgram,
                    bool wantPtx = false);

} // namespace l4c::nvrtc

#endif // L4C_RUNTIME_CUDA_NVRTC_H
