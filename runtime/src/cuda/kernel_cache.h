//===- kernel_cache.h - on-disk cache of NVRTC cubins ----------*- C++ -*-===//
//
// Cubins compiled at load time, kept on disk under a key that hashes
// everything that decides the machine code (source, options, arch, NVRTC
// version), so a plan that ships only source compiles once per machine.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_RUNTIME_CUDA_KERNEL_CACHE_H
#define L4C_RUNTIME_CUDA_KERNEL_CACHE_H

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace l4c::cuda {

using Digest = std::array<uint8_t, 32>;

/// SHA-256 (FIPS 180-4): a cache key must not collide by accident, and
/// nothing cheaper is that safe.
class Sha256 {
public:
  Sha256();
  void update(const void *data, size_t bytes);
  void update(std::string_view s) { update(s.data(), s.size()); }
  /// Adds `s` with its length, so that ("ab", "c") and ("a", "bc") differ.
  void field(std::string_view s);
  Digest finish();

private:
  void block(const uint8_t *p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t used_ = 0;
  uint64_t total_ = 0;
};

std::string hex(const Digest &d);
Digest sha256(std::string_view data);

/// The cache key of one NVRTC compilation, as 64 hex digits.
std::string compileKey(std::string_view source, std::string_view options,
                       std::string_view arch, std::string_view nvrtcVersion);

/// `explicitDir` when set, else $L4C_CACHE_DIR, else $HOME/.cache/l4c;
/// empty when none of them is known (no cache).
std::string cacheDirectory(const std::string &explicitDir = std::string());

/// Cubins by key under `dir`/cubin. Entries are written to a unique
/// temporary file and renamed into place, so concurrent processes and
/// crashes leave either a whole entry or none; a damaged entry reads as a
/// miss. Failures never fail a load: the cache is only an accelerator.
class KernelCache {
public:
  explicit KernelCache(std::string dir) : dir_(std::move(dir)) {}
  bool enabled() const { return !dir_.empty(); }
  const std::string &directory() const { return dir_; }
  std::string pathOf(const std::string &key) const;

  bool lookup(const std::string &key, std::vector<uint8_t> &cubin) const;
  /// Returns an empty string, or why the entry could not be written.
  std::string store(const std::string &key,
                    const std::vector<uint8_t> &cubin) const;
  void remove(const std::string &key) const;

private:
  std::string dir_;
};

} // namespace l4c::cuda

#endif // L4C_RUNTIME_CUDA_KERNEL_CACHE_H
