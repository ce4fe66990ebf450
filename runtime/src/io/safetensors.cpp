//===- safetensors.cpp - safetensors reader and writer --------------------===//
//
// Checkpoints and golden files are untrusted input: the header is validated in
// full before any tensor is handed out, so later code may index tensor data
// without re-checking bounds. Writes go through a temporary file and rename.
//
//===----------------------------------------------------------------------===//
#include "io/safetensors.h"
#include "io/json.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <numeric>
#include <set>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

// Tensor bytes are handed out and converted as stored; safetensors is
// little-endian, so a big-endian host would need byte swapping everywhere.
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "l4c::io assumes a little-endian host"
#endif

namespace l4c::io {

namespace {

/// The reference implementation refuses larger headers too; a bigger one is
/// far more likely corruption than a real checkpoint with millions of tensors.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
constexpr uint64_t kMaxIndexBytes = 100ull << 20;

struct DTypeDesc {
  DType type;
  const char *name;
  size_t size;
};
constexpr DTypeDesc kDTypes[] = {
    {DType::F64, "F64", 8},        {DType::F32, "F32", 4},
    {DType::F16, "F16", 2},        {DType::BF16, "BF16", 2},
    {DType::I64, "I64", 8},        {DType::I32, "I32", 4},
    {DType::I16, "I16", 2},        {DType::I8, "I8", 1},
    {DType::U8, "U8", 1},          {DType::Bool, "BOOL", 1},
    {DType::F8E4M3, "F8_E4M3", 1}, {DType::F8E5M2, "F8_E5M2", 1},
};

const DTypeDesc &desc(DType t) {
  for (const auto &d : kDTypes)
    if (d.type == t)
      return d;
  return kDTypes[1]; // unreachable for valid enumerators
}

std::string errnoText() { return std::strerror(errno); }

std::string shapeText(const std::vector<int64_t> &shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i)
    s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string rangeText(uint64_t begin, uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

bool isRegularFile(const std::string &path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

class FileDescriptor {
public:
  explicit FileDescriptor(int fd) : fd_(fd) {}
  ~FileDescriptor() {
    if (fd_ >= 0)
      ::close(fd_);
  }
  FileDescriptor(const FileDescriptor &) = delete;
  FileDescriptor &operator=(const FileDescriptor &) = delete;
  int get() const { return fd_; }

private:
  int fd_;
};

/// Reads exactly n bytes at offset; false with errno set (0 on early EOF).
bool readAt(int fd, void *buf, size_t n, uint64_t offset) {
  auto *p = static_cast<char *>(buf);
  while (n) {
    ssize_t r = ::pread(fd, p, n, offset);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0) {
      if (r == 0)
        errno = 0;
      return false;
    }
    p += r, n -= r, offset += r;
  }
  return true;
}

bool writeAll(int fd, const void *buf, size_t n) {
  auto *p = static_cast<const char *>(buf);
  while (n) {
    ssize_t r = ::write(fd, p, n);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      return false;
    p += r, n -= r;
  }
  return true;
}

/// Opens `path` read-only and checks it is a regular file of at least 8
/// bytes whose header length fits; yields the fd, file size and header length.
Status openAndCheckLength(const std::string &path, int &fdOut, uint64_t &size,
                          uint64_t &headerLen) {
  fdOut = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fdOut < 0)
    return Status::fail(path + ": cannot open: " + errnoText());
  struct stat st;
  if (::fstat(fdOut, &st) != 0)
    return Status::fail(path + ": cannot stat: " + errnoText());
  if (!S_ISREG(st.st_mode))
    return Status::fail(path + ": not a regular file");
  size = uint64_t(st.st_size);
  if (size < 8)
    return Status::fail(path + ": truncated: the file holds " +
                        std::to_string(size) +
                        " bytes, fewer than the 8-byte header length");
  unsigned char len[8];
  if (!readAt(fdOut, len, 8, 0))
    return Status::fail(path + ": cannot read header length: " +
                        (errno ? errnoText() : "unexpected end of file"));
  headerLen = 0;
  for (int i = 7; i >= 0; --i)
    headerLen = headerLen << 8 | len[i];
  if (headerLen > size - 8)
    return Status::fail(path + ": truncated: header says " +
                        std::to_string(headerLen) +
                        " bytes but the file holds " +
                        std::to_string(size - 8) + " after the length");
  if (headerLen > kMaxHeaderBytes)
    return Status::fail(path + ": header length " + std::to_string(headerLen) +
                        " exceeds the limit of " +
                        std::to_string(kMaxHeaderBytes) + " bytes");
  return Status::success();
}

/// Shard names come from the index file; keep them inside its directory.
bool isSafeShardName(const std::string &name) {
  if (name.empty() || name[0] == '/')
    return false;
  size_t start = 0;
  for (;;) {
    size_t slash = name.find('/', start);
    if (name.compare(start, slash - start, "..") == 0)
      return false;
    if (slash == std::string::npos)
      return true;
    start = slash + 1;
  }
}

/// Parses model.safetensors.index.json into (tensor, shard) pairs.
Status readIndex(const std::string &path,
                 std::vector<std::pair<std::string, std::string>> &weightMap) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return Status::fail(path + ": cannot open: " + errnoText());
  FileDescriptor guard(fd);
  struct stat st;
  if (::fstat(fd, &st) != 0)
    return Status::fail(path + ": cannot stat: " + errnoText());
  uint64_t size = uint64_t(st.st_size);
  if (size > kMaxIndexBytes)
    return Status::fail(path + ": index of " + std::to_string(size) +
                        " bytes exceeds the limit");
  std::string text(size, '\0');
  if (!readAt(fd, text.data(), size, 0))
    return Status::fail(path + ": cannot read: " +
                        (errno ? errnoText() : "unexpected end of file"));
  JsonValue root;
  JsonError err;
  if (!parseJson(text, root, err))
    return Status::fail(path + ": invalid JSON: " + err.message());
  const JsonValue *map = root.get("weight_map");
  if (!map || !map->isObject())
    return Status::fail(path + ": missing object 'weight_map'");
  std::set<std::string_view> seen;
  for (const auto &[tensor, shard] : map->object) {
    if (!seen.insert(tensor).second)
      return Status::fail(path + ": tensor '" + tensor +
                          "' appears twice in weight_map");
    if (!shard.isString() || !isSafeShardName(shard.string))
      return Status::fail(path + ": weight_map entry for tensor '" + tensor +
                          "' is not a relative shard file name");
    weightMap.emplace_back(tensor, shard.string);
  }
  return Status::success();
}

template <typename Src, typename Dst, typename Fn>
void convertElems(const uint8_t *src, void *dst, uint64_t n, Fn fn) {
  // Tensor data in the file is only byte aligned; go through memcpy.
  auto *out = static_cast<uint8_t *>(dst);
  for (uint64_t i = 0; i < n; ++i) {
    Src s;
    std::memcpy(&s, src + i * sizeof(Src), sizeof(Src));
    Dst d = fn(s);
    std::memcpy(out + i * sizeof(Dst), &d, sizeof(Dst));
  }
}

struct Chunk {
  const void *data;
  size_t size;
};

Status writeChunksAtomic(const std::string &path,
                         const std::vector<Chunk> &chunks) {
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0)
    return Status::fail(path + ": cannot create temporary file '" + tmp +
                        "': " + errnoText());
  auto abandon = [&](const char *what) {
    std::string msg = path + ": " + what + ": " + errnoText();
    if (fd >= 0)
      ::close(fd);
    ::unlink(tmp.c_str());
    return Status::fail(msg);
  };
  for (const Chunk &c : chunks)
    if (c.size && !writeAll(fd, c.data, c.size))
      return abandon("write failed");
  if (::fsync(fd) != 0)
    return abandon("fsync failed");
  int rc = ::close(fd);
  fd = -1;
  if (rc != 0)
    return abandon("close failed");
  if (::rename(tmp.c_str(), path.c_str()) != 0)
    return abandon("cannot rename the temporary file into place");
  // Make the rename itself durable; the data is already safe, so a failure
  // here is not worth reporting.
  size_t slash = path.rfind('/');
  std::string dir =
      slash == std::string::npos ? "." : path.substr(0, slash + 1);
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return Status::success();
}

} // namespace

const char *dtypeName(DType t) { return desc(t).name; }
size_t dtypeSize(DType t) { return desc(t).size; }

bool parseDType(std::string_view s, DType &out) {
  for (const auto &d : kDTypes)
    if (s == d.name) {
      out = d.type;
      return true;
    }
  return false;
}

uint64_t TensorInfo::numel() const {
  uint64_t n = 1;
  for (int64_t d : shape)
    n *= uint64_t(d);
  return n;
}

//===----------------------------------------------------------------------===//
// SafetensorsFile
//===----------------------------------------------------------------------===//

SafetensorsFile::SafetensorsFile() = default;
SafetensorsFile::~SafetensorsFile() { reset(); }
SafetensorsFile::SafetensorsFile(SafetensorsFile &&o) noexcept {
  *this = std::move(o);
}

SafetensorsFile &SafetensorsFile::operator=(SafetensorsFile &&o) noexcept {
  if (this == &o)
    return *this;
  reset();
  path_ = std::move(o.path_);
  tensors_ = std::move(o.tensors_);
  byName_ = std::move(o.byName_);
  metadata_ = std::move(o.metadata_);
  map_ = std::exchange(o.map_, nullptr);
  mapSize_ = std::exchange(o.mapSize_, 0);
  dataOffset_ = std::exchange(o.dataOffset_, 0);
  return *this;
}

void SafetensorsFile::reset() {
  if (map_)
    ::munmap(const_cast<uint8_t *>(map_), mapSize_);
  map_ = nullptr;
  mapSize_ = 0;
  dataOffset_ = 0;
  path_.clear();
  tensors_.clear();
  byName_.clear();
  metadata_.clear();
}

Status SafetensorsFile::parseHeader(std::string_view header,
                                    uint64_t dataSize) {
  auto fail = [&](const std::string &msg) {
    return Status::fail(path_ + ": " + msg);
  };
  JsonValue root;
  JsonError err;
  if (!parseJson(header, root, err))
    return fail("header is not valid JSON: " + err.message());
  if (!root.isObject())
    return fail("header is not a JSON object");
  bool seenMetadata = false;
  for (const auto &[name, v] : root.object) {
    if (name == "__metadata__") {
      if (seenMetadata || !v.isObject())
        return fail("__metadata__ must appear once, as an object");
      seenMetadata = true;
      for (const auto &[key, value] : v.object) {
        if (!value.isString())
          return fail("__metadata__ value for '" + key + "' is not a string");
        if (!metadata_.emplace(key, value.string).second)
          return fail("__metadata__ key '" + key + "' appears twice");
      }
      continue;
    }
    std::string tensor = "tensor '" + name + "'";
    if (byName_.count(name))
      return fail(tensor + " is defined twice");
    if (!v.isObject())
      return fail(tensor + " is not a JSON object");
    const JsonValue *dtype = nullptr, *shape = nullptr, *offsets = nullptr;
    for (const auto &[key, field] : v.object) {
      const JsonValue **slot = key == "dtype"          ? &dtype
                               : key == "shape"        ? &shape
                               : key == "data_offsets" ? &offsets
                                                       : nullptr;
      if (!slot)
        return fail(tensor + " has unknown field '" + key + "'");
      if (*slot)
        return fail(tensor + " has field '" + key + "' twice");
      *slot = &field;
    }
    TensorInfo t;
    t.name = name;
    if (!dtype || !dtype->isString())
      return fail(tensor + " has no string 'dtype'");
    if (!parseDType(dtype->string, t.dtype))
      return fail(tensor + " has unknown dtype '" + dtype->string + "'");
    if (!shape || !shape->isArray())
      return fail(tensor + " has no array 'shape'");
    uint64_t numel = 1;
    bool overflow = false;
    for (const JsonValue &d : shape->array) {
      if (!d.isNumber() || !d.isInteger || d.integer < 0)
        return fail(tensor + " has a shape entry that is not a non-negative "
                             "integer");
      t.shape.push_back(d.integer);
      overflow |= __builtin_mul_overflow(numel, uint64_t(d.integer), &numel);
    }
    if (!offsets || !offsets->isArray() || offsets->array.size() != 2)
      return fail(tensor + " has no 'data_offsets' pair");
    for (const JsonValue &o : offsets->array)
      if (!o.isNumber() || !o.isInteger || o.integer < 0)
        return fail(tensor + " has data_offsets that are not non-negative "
                             "integers");
    t.begin = offsets->array[0].integer;
    t.end = offsets->array[1].integer;
    std::string range = rangeText(t.begin, t.end);
    if (t.begin > t.end)
      return fail(tensor + " data_offsets " + range + " end before they begin");
    if (t.end > dataSize)
      return fail(tensor + " data_offsets " + range +
                  " reach past the end of the data section (" +
                  std::to_string(dataSize) + " bytes)");
    uint64_t bytes = 0;
    overflow |= __builtin_mul_overflow(numel, dtypeSize(t.dtype), &bytes);
    if (overflow || bytes != t.end - t.begin)
      return fail(tensor + " data_offsets " + range + " do not match shape " +
                  shapeText(t.shape) + " of " + dtypeName(t.dtype) + " (" +
                  (overflow ? std::string("size overflows 64 bits")
                            : std::to_string(bytes) + " bytes") +
                  ")");
    byName_.emplace(name, tensors_.size());
    tensors_.push_back(std::move(t));
  }

  // Empty tensors occupy no bytes, so they cannot overlap anything.
  std::vector<const TensorInfo *> sorted;
  for (const TensorInfo &t : tensors_)
    if (t.end > t.begin)
      sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(),
            [](const TensorInfo *a, const TensorInfo *b) {
              return a->begin < b->begin;
            });
  const TensorInfo *reach = nullptr; // the tensor ending last so far
  for (const TensorInfo *t : sorted) {
    if (reach && t->begin < reach->end)
      return fail("tensors '" + reach->name + "' " +
                  rangeText(reach->begin, reach->end) + " and '" + t->name +
                  "' " + rangeText(t->begin, t->end) + " overlap");
    if (!reach || t->end > reach->end)
      reach = t;
  }
  return Status::success();
}

Status SafetensorsFile::open(const std::string &path, SafetensorsFile &out) {
  SafetensorsFile f;
  f.path_ = path;
  int fd = -1;
  uint64_t size = 0, headerLen = 0;
  Status s = openAndCheckLength(path, fd, size, headerLen);
  FileDescriptor guard(fd);
  if (!s.ok())
    return s;
  void *m = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (m == MAP_FAILED)
    return Status::fail(path + ": cannot map: " + errnoText());
  f.map_ = static_cast<const uint8_t *>(m);
  f.mapSize_ = size;
  f.dataOffset_ = 8 + headerLen;
  std::string_view header(reinterpret_cast<const char *>(f.map_) + 8,
                          headerLen);
  s = f.parseHeader(header, size - 8 - headerLen);
  if (!s.ok())
    return s;
  out = std::move(f);
  return Status::success();
}

Status SafetensorsFile::openHeaderOnly(const std::string &path,
                                       SafetensorsFile &out) {
  SafetensorsFile f;
  f.path_ = path;
  int fd = -1;
  uint64_t size = 0, headerLen = 0;
  Status s = openAndCheckLength(path, fd, size, headerLen);
  FileDescriptor guard(fd);
  if (!s.ok())
    return s;
  std::string header(headerLen, '\0');
  if (!readAt(fd, header.data(), headerLen, 8))
    return Status::fail(path + ": cannot read header: " +
                        (errno ? errnoText() : "unexpected end of file"));
  f.dataOffset_ = 8 + headerLen;
  s = f.parseHeader(header, size - 8 - headerLen);
  if (!s.ok())
    return s;
  out = std::move(f);
  return Status::success();
}

const TensorInfo *SafetensorsFile::find(std::string_view name) const {
  auto it = byName_.find(name);
  return it == byName_.end() ? nullptr : &tensors_[it->second];
}

const void *SafetensorsFile::data(const TensorInfo &t) const {
  return map_ ? map_ + dataOffset_ + t.begin : nullptr;
}

//===----------------------------------------------------------------------===//
// Checkpoint
//===----------------------------------------------------------------------===//

Status Checkpoint::open(const std::string &path, Checkpoint &out,
                        bool headerOnly) {
  Checkpoint ck;
  ck.path_ = path;
  auto openFile = [&](const std::string &file) -> Status {
    auto f = std::make_unique<SafetensorsFile>();
    Status s = headerOnly ? SafetensorsFile::openHeaderOnly(file, *f)
                          : SafetensorsFile::open(file, *f);
    if (s.ok())
      ck.files_.push_back(std::move(f));
    return s;
  };

  struct stat st;
  if (::stat(path.c_str(), &st) != 0)
    return Status::fail(path + ": cannot open: " + errnoText());
  std::string single, index;
  if (S_ISDIR(st.st_mode)) {
    std::string dir = path.back() == '/' ? path : path + "/";
    // Same preference as transformers: a single file wins over an index.
    if (isRegularFile(dir + "model.safetensors"))
      single = dir + "model.safetensors";
    else if (isRegularFile(dir + "model.safetensors.index.json"))
      index = dir + "model.safetensors.index.json";
    else
      return Status::fail(path + ": no model.safetensors or "
                                 "model.safetensors.index.json");
  } else if (path.size() >= 5 &&
             path.compare(path.size() - 5, 5, ".json") == 0) {
    index = path;
  } else {
    single = path;
  }

  if (!single.empty()) {
    Status s = openFile(single);
    if (!s.ok())
      return s;
    for (const TensorInfo &t : ck.files_[0]->tensors())
      ck.index_.emplace(t.name, Entry{&t, ck.files_[0].get()});
    out = std::move(ck);
    return Status::success();
  }

  std::vector<std::pair<std::string, std::string>> weightMap;
  if (Status s = readIndex(index, weightMap); !s.ok())
    return s;
  std::string dir = index.substr(0, index.rfind('/') + 1);
  // Shard name -> first tensor naming it (for messages), then -> its file.
  std::map<std::string, std::string> firstTensor;
  for (const auto &[tensor, shard] : weightMap)
    firstTensor.emplace(shard, tensor);
  std::map<std::string, const SafetensorsFile *> shardFile;
  for (const auto &[shard, tensor] : firstTensor) {
    if (Status s = openFile(dir + shard); !s.ok())
      return Status::fail(index + ": shard '" + shard + "' (of tensor '" +
                          tensor + "'): " + s.error);
    const SafetensorsFile *f = ck.files_.back().get();
    shardFile[shard] = f;
    for (const TensorInfo &t : f->tensors()) {
      auto [it, inserted] = ck.index_.emplace(t.name, Entry{&t, f});
      if (!inserted)
        return Status::fail(index + ": tensor '" + t.name +
                            "' is defined in both '" + it->second.file->path() +
                            "' and '" + f->path() + "'");
    }
  }
  for (const auto &[tensor, shard] : weightMap) {
    auto it = ck.index_.find(tensor);
    if (it == ck.index_.end() || it->second.file != shardFile[shard])
      return Status::fail(index + ": weight_map puts tensor '" + tensor +
                          "' in '" + shard +
                          "' but that shard does not "
                          "define it");
  }
  out = std::move(ck);
  return Status::success();
}

std::vector<Checkpoint::Entry> Checkpoint::entries() const {
  std::vector<Entry> all;
  all.reserve(index_.size());
  for (const auto &kv : index_)
    all.push_back(kv.second);
  return all;
}

bool Checkpoint::find(std::string_view name, Entry &out) const {
  auto it = index_.find(name);
  if (it == index_.end())
    return false;
  out = it->second;
  return true;
}

Status Checkpoint::read(std::string_view name, DType to, void *dst,
                        uint64_t numel) const {
  Entry e;
  if (!find(name, e))
    return Status::fail(path_ + ": no tensor '" + std::string(name) + "'");
  std::string tensor = e.file->path() + ": tensor '" + std::string(name) + "'";
  const TensorInfo &t = *e.info;
  if (t.numel() != numel)
    return Status::fail(tensor + " has " + std::to_string(t.numel()) +
                        " elements but the caller expects " +
                        std::to_string(numel));
  auto *src = static_cast<const uint8_t *>(e.file->data(t));
  if (!src && numel)
    return Status::fail(tensor + ": file was opened header-only");
  DType from = t.dtype;
  if (from == to) {
    if (numel)
      std::memcpy(dst, src, t.end - t.begin);
    return Status::success();
  }
  if (to == DType::F32 && from == DType::BF16)
    convertElems<uint16_t, float>(src, dst, numel, bf16ToF32);
  else if (to == DType::F32 && from == DType::F16)
    convertElems<uint16_t, float>(src, dst, numel, f16ToF32);
  else if (to == DType::F32 && from == DType::F64)
    convertElems<double, float>(src, dst, numel,
                                [](double v) { return float(v); });
  else if (to == DType::BF16 && from == DType::F32)
    convertElems<float, uint16_t>(src, dst, numel, f32ToBf16);
  else if (to == DType::I64 && from == DType::I32)
    convertElems<int32_t, int64_t>(src, dst, numel,
                                   [](int32_t v) { return int64_t(v); });
  else
    return Status::fail(tensor + ": cannot convert " + dtypeName(from) +
                        " to " + dtypeName(to));
  return Status::success();
}

//===----------------------------------------------------------------------===//
// Writing
//===----------------------------------------------------------------------===//

Status writeSafetensors(const std::string &path,
                        const std::vector<TensorRef> &tensors,
                        const std::map<std::string, std::string> &metadata) {
  size_t n = tensors.size();
  std::vector<uint64_t> bytes(n), begin(n);
  std::set<std::string_view> names;
  for (size_t i = 0; i < n; ++i) {
    const TensorRef &t = tensors[i];
    std::string tensor = path + ": tensor '" + t.name + "'";
    if (t.name.empty() || t.name == "__metadata__")
      return Status::fail(tensor + ": reserved or empty name");
    if (!names.insert(t.name).second)
      return Status::fail(tensor + " is listed twice");
    uint64_t size = dtypeSize(t.dtype);
    for (int64_t d : t.shape)
      if (d < 0 || __builtin_mul_overflow(size, uint64_t(d), &size))
        return Status::fail(tensor + ": invalid shape " + shapeText(t.shape));
    if (size && !t.data)
      return Status::fail(tensor + ": no data");
    bytes[i] = size;
  }
  // Lay data out by decreasing element size so that, with the data section
  // 8-byte aligned, every tensor is aligned for its element type when mapped.
  // Readers locate tensors by offset, so this need not follow header order.
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return dtypeSize(tensors[a].dtype) > dtypeSize(tensors[b].dtype);
  });
  uint64_t offset = 0;
  for (size_t i : order) {
    begin[i] = offset;
    if (__builtin_add_overflow(offset, bytes[i], &offset))
      return Status::fail(path + ": total tensor size overflows 64 bits");
  }

  std::string header = "{";
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    for (auto it = metadata.begin(); it != metadata.end(); ++it) {
      if (it != metadata.begin())
        header += ',';
      appendJsonString(header, it->first);
      header += ':';
      appendJsonString(header, it->second);
    }
    header += '}';
  }
  for (size_t i = 0; i < n; ++i) {
    const TensorRef &t = tensors[i];
    if (header.size() > 1)
      header += ',';
    appendJsonString(header, t.name);
    header += ":{\"dtype\":\"";
    header += dtypeName(t.dtype);
    header += "\",\"shape\":[";
    for (size_t d = 0; d < t.shape.size(); ++d)
      header += (d ? "," : "") + std::to_string(t.shape[d]);
    header += "],\"data_offsets\":[" + std::to_string(begin[i]) + "," +
              std::to_string(begin[i] + bytes[i]) + "]}";
  }
  header += '}';
  header.append((8 - header.size() % 8) % 8, ' ');

  unsigned char len[8];
  for (int i = 0; i < 8; ++i)
    len[i] = uint8_t(uint64_t(header.size()) >> (8 * i));
  std::vector<Chunk> chunks = {{len, 8}, {header.data(), header.size()}};
  for (size_t i : order)
    chunks.push_back({tensors[i].data, size_t(bytes[i])});
  return writeChunksAtomic(path, chunks);
}

Status writeFileAtomic(const std::string &path, std::string_view contents) {
  return writeChunksAtomic(path, {{contents.data(), contents.size()}});
}

//===----------------------------------------------------------------------===//
// Conversions
//===----------------------------------------------------------------------===//

float bf16ToF32(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32ToBf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  // Truncating a NaN could clear every mantissa bit left and make it an
  // infinity; force the quiet bit instead.
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u)
    return uint16_t((bits >> 16) | 0x0040);
  bits += 0x7FFFu + ((bits >> 16) & 1);
  return uint16_t(bits >> 16);
}

float f16ToF32(uint16_t v) {
  uint32_t sign = uint32_t(v & 0x8000) << 16;
  uint32_t exp = (v >> 10) & 0x1F;
  uint32_t mant = v & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {
    // Subnormal: renormalize so the leading one becomes the implicit bit.
    int shift = 0;
    while (!(mant & 0x400)) {
      mant <<= 1;
      ++shift;
    }
    bits = sign | (uint32_t(113 - shift) << 23) | ((mant & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

} // namespace l4c::io
