//===- kernel_cache.cpp - on-disk cache of NVRTC cubins -------------------===//
//
// SHA-256, cache keys and the entry file format: magic, key, payload size,
// payload, SHA-256 of the payload. Every read checks all of them.
//
//===----------------------------------------------------------------------===//
#include "cuda/kernel_cache.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>

#include <unistd.h>

namespace l4c::cuda {

namespace {

constexpr uint32_t kRound[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1,
    0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3,
    0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
    0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
    0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
    0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
    0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
    0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

// Entry layout; the version digit changes with the layout.
constexpr char kMagic[8] = {'L', '4', 'C', 'C', 'U', 'B', 'N', '1'};
constexpr size_t kKeyLen = 64;
constexpr size_t kHeader = sizeof(kMagic) + kKeyLen + 8;

void putU64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; ++i)
    p[i] = uint8_t(v >> (8 * i));
}
uint64_t getU64(const uint8_t *p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i)
    v |= uint64_t(p[i]) << (8 * i);
  return v;
}

bool validKey(const std::string &key) {
  if (key.size() != kKeyLen)
    return false;
  for (char c : key)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
      return false;
  return true;
}

} // namespace

Sha256::Sha256()
    : h_{0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
         0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19} {}

void Sha256::block(const uint8_t *p) {
  uint32_t w[64];
  for (int i = 0; i < 16; ++i)
    w[i] = uint32_t(p[4 * i]) << 24 | uint32_t(p[4 * i + 1]) << 16 |
           uint32_t(p[4 * i + 2]) << 8 | uint32_t(p[4 * i + 3]);
  for (int i = 16; i < 64; ++i) {
    uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
    uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5],
           g = h_[6], h = h_[7];
  for (int i = 0; i < 64; ++i) {
    uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) +
                  ((e & f) ^ (~e & g)) + kRound[i] + w[i];
    uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) +
                  ((a & b) ^ (a & c) ^ (b & c));
    h = g;
    g = f;
    f = e;
    e = d + t1;
    d = c;
    c = b;
    b = a;
    a = t1 + t2;
  }
  h_[0] += a;
  h_[1] += b;
  h_[2] += c;
  h_[3] += d;
  h_[4] += e;
  h_[5] += f;
  h_[6] += g;
  h_[7] += h;
}

void Sha256::update(const void *data, size_t bytes) {
  const uint8_t *p = static_cast<const uint8_t *>(data);
  total_ += bytes;
  if (used_) {
    size_t take = std::min(bytes, sizeof(buf_) - used_);
    std::memcpy(buf_ + used_, p, take);
    used_ += take;
    p += take;
    bytes -= take;
    if (used_ < sizeof(buf_))
      return;
    block(buf_);
    used_ = 0;
  }
  for (; bytes >= 64; p += 64, bytes -= 64)
    block(p);
  std::memcpy(buf_, p, bytes);
  used_ = bytes;
}

void Sha256::field(std::string_view s) {
  uint8_t len[8];
  putU64(len, s.size());
  update(len, sizeof(len));
  update(s);
}

Digest Sha256::finish() {
  uint64_t bits = total_ * 8;
  uint8_t pad[72] = {0x80};
  size_t padLen = (used_ < 56 ? 56 : 120) - used_;
  for (int i = 0; i < 8; ++i)
    pad[padLen + i] = uint8_t(bits >> (56 - 8 * i));
  update(pad, padLen + 8);
  Digest d;
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 4; ++j)
      d[4 * i + j] = uint8_t(h_[i] >> (24 - 8 * j));
  return d;
}

std::string hex(const Digest &d) {
  static const char digits[] = "0123456789abcdef";
  std::string s;
  for (uint8_t b : d) {
    s += digits[b >> 4];
    s += digits[b & 15];
  }
  return s;
}

Digest sha256(std::string_view data) {
  Sha256 h;
  h.update(data);
  return h.finish();
}

std::string compileKey(std::string_view source, std::string_view options,
                       std::string_view arch, std::string_view nvrtcVersion) {
  Sha256 h;
  h.field("l4c nvrtc cubin 1");
  h.field(arch);
  h.field(options);
  h.field(nvrtcVersion);
  h.field(source);
  return hex(h.finish());
}

std::string cacheDirectory(const std::string &explicitDir) {
  if (!explicitDir.empty())
    return explicitDir;
  if (const char *env = std::getenv("L4C_CACHE_DIR"); env && *env)
    return env;
  if (const char *home = std::getenv("HOME"); home && *home)
    return std::string(home) + "/.cache/l4c";
  return std::string();
}

std::string KernelCache::pathOf(const std::string &key) const {
  return dir_ + "/cubin/" + key + ".cubin";
}

bool KernelCache::lookup(const std::string &key,
                         std::vector<uint8_t> &cubin) const {
  if (!enabled() || !validKey(key))
    return false;
  std::FILE *f = std::fopen(pathOf(key).c_str(), "rb");
  if (!f)
    return false;
  std::vector<uint8_t> bytes;
  uint8_t chunk[1 << 16];
  size_t n;
  while ((n = std::fread(chunk, 1, sizeof(chunk), f)) > 0)
    bytes.insert(bytes.end(), chunk, chunk + n);
  bool readError = std::ferror(f);
  std::fclose(f);
  if (readError || bytes.size() < kHeader + 32 ||
      std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) != 0 ||
      std::memcmp(bytes.data() + sizeof(kMagic), key.data(), kKeyLen) != 0)
    return false;
  uint64_t size = getU64(bytes.data() + sizeof(kMagic) + kKeyLen);
  if (size == 0 || size != bytes.size() - kHeader - 32)
    return false;
  Sha256 h;
  h.update(bytes.data() + kHeader, size);
  Digest d = h.finish();
  if (std::memcmp(d.data(), bytes.data() + kHeader + size, d.size()) != 0)
    return false;
  cubin.assign(bytes.begin() + kHeader, bytes.begin() + kHeader + size);
  return true;
}

std::string KernelCache::store(const std::string &key,
                               const std::vector<uint8_t> &cubin) const {
  if (!enabled())
    return std::string();
  if (!validKey(key))
    return "bad cache key '" + key + "'";
  std::error_code ec;
  std::filesystem::create_directories(dir_ + "/cubin", ec);
  if (ec)
    return "cannot create " + dir_ + "/cubin: " + ec.message();
  // Unique per process, thread and call, in the entry's own directory so
  // the rename cannot cross file systems.
  static std::atomic<uint64_t> counter{0};
  static const uint64_t salt = std::random_device{}();
  std::string path = pathOf(key);
  std::string tmp = path + ".tmp." + std::to_string(::getpid()) + "." +
                    std::to_string(salt) + "." + std::to_string(counter++);
  std::vector<uint8_t> header(kHeader);
  std::memcpy(header.data(), kMagic, sizeof(kMagic));
  std::memcpy(header.data() + sizeof(kMagic), key.data(), kKeyLen);
  putU64(header.data() + sizeof(kMagic) + kKeyLen, cubin.size());
  Sha256 h;
  h.update(cubin.data(), cubin.size());
  Digest d = h.finish();
  std::FILE *f = std::fopen(tmp.c_str(), "wb");
  if (!f)
    return "cannot write " + tmp;
  bool ok = std::fwrite(header.data(), 1, header.size(), f) == header.size() &&
            std::fwrite(cubin.data(), 1, cubin.size(), f) == cubin.size() &&
            std::fwrite(d.data(), 1, d.size(), f) == d.size();
  ok = (std::fclose(f) == 0) && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return "cannot write " + path;
  }
  return std::string();
}

void KernelCache::remove(const std::string &key) const {
  if (enabled() && validKey(key))
    std::remove(pathOf(key).c_str());
}

} // namespace l4c::cuda
