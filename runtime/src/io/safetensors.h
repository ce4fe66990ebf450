//===- safetensors.h - safetensors reader and writer ---------------------===//
//
// Reads Hugging Face safetensors files (single files and sharded checkpoints
// with model.safetensors.index.json) and writes them atomically. Shared by the
// runtime (weights, inputs, outputs) and the compiler (checkpoint headers).
//
//===----------------------------------------------------------------------===//
#ifndef L4C_RUNTIME_IO_SAFETENSORS_H
#define L4C_RUNTIME_IO_SAFETENSORS_H

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace l4c::io {

/// Element types that may appear in a safetensors file.
enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, Bool, F8E4M3, F8E5M2 };

/// The safetensors spelling ("F32", "BF16", "I64", "F8_E4M3", ...).
const char *dtypeName(DType t);
/// Bytes per element.
size_t dtypeSize(DType t);
/// Parses a safetensors dtype string; false if unknown.
bool parseDType(std::string_view s, DType &out);

/// Result of an I/O call: empty message means success. Messages name the file
/// and, where there is one, the tensor at fault.
struct Status {
  std::string error;
  bool ok() const { return error.empty(); }
  static Status success() { return {}; }
  static Status fail(std::string msg) { return Status{std::move(msg)}; }
};

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0; ///< byte offsets into the file's data section
  uint64_t numel() const;
};

/// One safetensors file. open() validates the whole header: the header length
/// against the file size, JSON syntax, dtypes, shape/offset consistency, that
/// every tensor lies inside the file and that tensors do not overlap.
class SafetensorsFile {
public:
  SafetensorsFile();
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile &&) noexcept;
  SafetensorsFile &operator=(SafetensorsFile &&) noexcept;

  /// Maps the file (read-only) and parses its header.
  static Status open(const std::string &path, SafetensorsFile &out);
  /// Reads and validates only the header (no mapping of the data); used by
  /// the compiler to check a checkpoint against a config cheaply.
  static Status openHeaderOnly(const std::string &path, SafetensorsFile &out);

  const std::string &path() const { return path_; }
  const std::vector<TensorInfo> &tensors() const { return tensors_; }
  const std::map<std::string, std::string> &metadata() const { return metadata_; }
  const TensorInfo *find(std::string_view name) const;
  /// Raw bytes of a tensor (nullptr when opened header-only).
  const void *data(const TensorInfo &t) const;

private:
  /// Validates the JSON header against a data section of `dataSize` bytes
  /// and fills tensors_/metadata_; shared by open() and openHeaderOnly().
  Status parseHeader(std::string_view header, uint64_t dataSize);
  void reset();

  std::string path_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> byName_; ///< index into tensors_
  std::map<std::string, std::string> metadata_;
  const uint8_t *map_ = nullptr;
  size_t mapSize_ = 0;
  uint64_t dataOffset_ = 0;
};

/// A checkpoint: a directory holding model.safetensors, or
/// model.safetensors.index.json plus its shards, or a single .safetensors
/// file path. Tensor names are unique across shards.
class Checkpoint {
public:
  static Status open(const std::string &path, Checkpoint &out, bool headerOnly = false);

  struct Entry {
    const TensorInfo *info;
    const SafetensorsFile *file;
  };
  /// All tensors, sorted by name.
  std::vector<Entry> entries() const;
  bool find(std::string_view name, Entry &out) const;

  /// Copies tensor `name` into dst converting to `to` (F32 <- F32/BF16/F16/F64,
  /// BF16 <- F32/BF16, I64 <- I64/I32). Fails with a message naming the
  /// tensor if it is missing or the conversion is not supported; numel must
  /// equal the tensor's element count.
  Status read(std::string_view name, DType to, void *dst, uint64_t numel) const;

private:
  std::string path_; ///< as given to open(), for messages
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, Entry, std::less<>> index_;
};

/// A tensor to write: data points at numel(shape) * dtypeSize(dtype) bytes.
struct TensorRef {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void *data;
};

/// Writes a safetensors file atomically: to "<path>.tmp.<pid>", fsync, then
/// rename over `path`. On failure nothing is left at `path` or the temporary.
Status writeSafetensors(const std::string &path, const std::vector<TensorRef> &tensors,
                        const std::map<std::string, std::string> &metadata = {});

/// Writes a small text file atomically (same protocol as writeSafetensors).
Status writeFileAtomic(const std::string &path, std::string_view contents);

/// bf16 <-> f32 helpers (round to nearest even, NaN preserved).
float bf16ToF32(uint16_t v);
uint16_t f32ToBf16(float v);
float f16ToF32(uint16_t v);

} // namespace l4c::io

#endif // L4C_RUNTIME_IO_SAFETENSORS_H
