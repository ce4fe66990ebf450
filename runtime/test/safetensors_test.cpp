//===- safetensors_test.cpp - JSON and safetensors I/O tests --------------===//
//
// Unit tests for l4c::io: the strict JSON parser, safetensors validation of
// hostile headers, sharded checkpoints, dtype conversions and atomic writes.
//
//===----------------------------------------------------------------------===//
#include "io/json.h"
#include "io/safetensors.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <sys/stat.h>
#include <unistd.h>

using namespace l4c::io;
namespace fs = std::filesystem;

namespace {

//===----------------------------------------------------------------------===//
// Helpers
//===----------------------------------------------------------------------===//

class TempDir {
public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "l4c-io-XXXXXX").string();
    if (::mkdtemp(tmpl.data()))
      path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty())
      fs::remove_all(path_, ec);
  }
  const std::string &path() const { return path_; }
  std::string file(const std::string &name) const { return path_ + "/" + name; }
  std::vector<std::string> list() const {
    std::vector<std::string> names;
    for (const auto &e : fs::directory_iterator(path_))
      names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }

private:
  std::string path_;
};

void writeBytes(const std::string &path, const std::string &bytes) {
  std::ofstream(path, std::ios::binary).write(bytes.data(), bytes.size());
}

std::string readBytes(const std::string &path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string lengthPrefix(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i)
    s[i] = char(n >> (8 * i));
  return s;
}

/// A safetensors file with the given header text and `dataBytes` zero bytes.
std::string rawFile(const std::string &header, size_t dataBytes) {
  return lengthPrefix(header.size()) + header + std::string(dataBytes, '\0');
}

bool parses(const std::string &text) {
  JsonValue v;
  JsonError e;
  return parseJson(text, v, e);
}

::testing::AssertionResult contains(const std::string &haystack,
                                    const std::string &needle) {
  if (haystack.find(needle) != std::string::npos)
    return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "'" << haystack << "' does not contain '" << needle << "'";
}

//===----------------------------------------------------------------------===//
// JSON
//===----------------------------------------------------------------------===//

TEST(JsonTest, ParsesAllValueKinds) {
  JsonValue v;
  JsonError e;
  ASSERT_TRUE(parseJson(
      " {\"a\": [1, -2, 3.5, 1e3, -0, 9223372036854775807, "
      "9223372036854775808],"
      " \"t\": true, \"f\": false, \"n\": null, \"s\": \"x\", \"o\": {}}\n",
      v, e))
      << e.message();
  ASSERT_TRUE(v.isObject());
  ASSERT_EQ(v.object.size(), 6u);
  const JsonValue *a = v.get("a");
  ASSERT_TRUE(a && a->isArray());
  ASSERT_EQ(a->array.size(), 7u);
  EXPECT_TRUE(a->array[0].isInteger);
  EXPECT_EQ(a->array[0].integer, 1);
  EXPECT_EQ(a->array[1].integer, -2);
  EXPECT_FALSE(a->array[2].isInteger);
  EXPECT_DOUBLE_EQ(a->array[2].number, 3.5);
  EXPECT_FALSE(a->array[3].isInteger);
  EXPECT_DOUBLE_EQ(a->array[3].number, 1000.0);
  EXPECT_TRUE(a->array[4].isInteger);
  EXPECT_EQ(a->array[5].integer, INT64_MAX);
  EXPECT_FALSE(a->array[6].isInteger); // does not fit int64
  EXPECT_DOUBLE_EQ(a->array[6].number, 9223372036854775808.0);
  EXPECT_TRUE(v.get("t")->isBool() && v.get("t")->boolean);
  EXPECT_TRUE(v.get("f")->isBool() && !v.get("f")->boolean);
  EXPECT_TRUE(v.get("n")->isNull());
  EXPECT_EQ(v.get("s")->string, "x");
  EXPECT_TRUE(v.get("o")->isObject());
  EXPECT_EQ(v.get("missing"), nullptr);

  ASSERT_TRUE(parseJson("42", v, e));
  EXPECT_TRUE(v.isNumber() && v.integer == 42);
  ASSERT_TRUE(parseJson("[]", v, e));
  EXPECT_TRUE(v.isArray() && v.array.empty());
}

TEST(JsonTest, DecodesEscapesAndUtf8) {
  JsonValue v;
  JsonError e;
  ASSERT_TRUE(parseJson(R"("\"\\\/\b\f\n\r\t")", v, e)) << e.message();
  EXPECT_EQ(v.string, "\"\\/\b\f\n\r\t");
  ASSERT_TRUE(parseJson(R"("\u0041\u00e9\u20AC\ud83d\ude00\u0000")", v, e));
  EXPECT_EQ(v.string,
            std::string("A\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80\0", 11));
  // Raw UTF-8 (2, 3 and 4 byte sequences) passes through.
  ASSERT_TRUE(parseJson("\"\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80\"", v, e));
  EXPECT_EQ(v.string, "\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80");
}

TEST(JsonTest, KeepsDuplicateKeysInOrder) {
  JsonValue v;
  JsonError e;
  ASSERT_TRUE(parseJson(R"({"b":1,"a":2,"b":3})", v, e));
  ASSERT_EQ(v.object.size(), 3u);
  EXPECT_EQ(v.object[0].first, "b");
  EXPECT_EQ(v.object[2].second.integer, 3);
  EXPECT_EQ(v.get("b")->integer, 1);
}

TEST(JsonTest, RejectsMalformedInput) {
  const char *bad[] = {"",
                       " ",
                       "{",
                       "}",
                       "[",
                       "[1,]",
                       "[,1]",
                       "[1 2]",
                       "{\"a\":1,}",
                       "{\"a\" 1}",
                       "{\"a\":}",
                       "{1:2}",
                       "{'a':1}",
                       "01",
                       "-01",
                       "1.",
                       ".5",
                       "+1",
                       "-",
                       "1e",
                       "1e+",
                       "0x10",
                       "NaN",
                       "Infinity",
                       "1e400",
                       "tru",
                       "nul",
                       "True",
                       "\"abc",
                       "\"\\x\"",
                       "\"\\u12\"",
                       "\"\\uZZZZ\"",
                       "\"\\ud800\"",
                       "\"\\udc00\"",
                       "\"\\ud800\\u0041\"",
                       "\"\\ud800x\"",
                       "\"a\x01\"",
                       "\"a\nb\"",
                       "{} x",
                       "[1] [2]",
                       "1 2",
                       "\xEF\xBB\xBF{}",
                       "// c\n1",
                       "/* c */1",
                       "\"\xC0\xAF\"",
                       "\"\xED\xA0\x80\"",
                       "\"\xF4\x90\x80\x80\"",
                       "\"\xE2\x82\"",
                       "\"\x80\"",
                       "\"\xFF\""};
  for (const char *text : bad)
    EXPECT_FALSE(parses(text)) << "accepted: " << text;
  EXPECT_FALSE(parses(std::string("[1,\0]", 5)));
}

TEST(JsonTest, ReportsOffsetAndReason) {
  JsonValue v;
  JsonError e;
  ASSERT_FALSE(parseJson("[1, 2, x]", v, e));
  EXPECT_EQ(e.offset, 7u);
  EXPECT_EQ(e.message(), "byte 7: unexpected character, expected a value");
  ASSERT_FALSE(parseJson("{\"a\":1} ,", v, e));
  EXPECT_EQ(e.offset, 8u);
  EXPECT_TRUE(contains(e.reason, "after the JSON value"));
  ASSERT_FALSE(parseJson("\"ab\\q\"", v, e));
  EXPECT_EQ(e.offset, 3u);
  EXPECT_TRUE(contains(e.reason, "invalid escape"));
}

TEST(JsonTest, LimitsNestingDepth) {
  auto nested = [](int depth) {
    return std::string(depth, '[') + std::string(depth, ']');
  };
  EXPECT_TRUE(parses(nested(256)));
  JsonValue v;
  JsonError e;
  ASSERT_FALSE(parseJson(nested(257), v, e));
  EXPECT_TRUE(contains(e.reason, "nesting too deep"));
  EXPECT_EQ(e.offset, 256u);
  // Far beyond the limit must fail cleanly rather than overflow the stack.
  EXPECT_FALSE(parses(std::string(1000000, '[')));
  std::string objects;
  for (int i = 0; i < 100000; ++i)
    objects += "{\"a\":";
  EXPECT_FALSE(parses(objects));
  EXPECT_TRUE(parseJson("[[[1]]]", v, e, 3));
  EXPECT_FALSE(parseJson("[[[1]]]", v, e, 2));
}

TEST(JsonTest, AppendStringRoundTrips) {
  std::string raw;
  for (int c = 1; c < 128; ++c)
    raw += char(c);
  raw += std::string("\0\xC3\xA9\xF0\x9F\x98\x80", 7);
  std::string quoted;
  appendJsonString(quoted, raw);
  JsonValue v;
  JsonError e;
  ASSERT_TRUE(parseJson(quoted, v, e)) << e.message();
  EXPECT_EQ(v.string, raw);
}

//===----------------------------------------------------------------------===//
// DTypes and conversions
//===----------------------------------------------------------------------===//

TEST(DTypeTest, NamesAndSizes) {
  struct {
    DType t;
    const char *name;
    size_t size;
  } all[] = {{DType::F64, "F64", 8},        {DType::F32, "F32", 4},
             {DType::F16, "F16", 2},        {DType::BF16, "BF16", 2},
             {DType::I64, "I64", 8},        {DType::I32, "I32", 4},
             {DType::I16, "I16", 2},        {DType::I8, "I8", 1},
             {DType::U8, "U8", 1},          {DType::Bool, "BOOL", 1},
             {DType::F8E4M3, "F8_E4M3", 1}, {DType::F8E5M2, "F8_E5M2", 1}};
  for (const auto &d : all) {
    EXPECT_STREQ(dtypeName(d.t), d.name);
    EXPECT_EQ(dtypeSize(d.t), d.size) << d.name;
    DType parsed;
    ASSERT_TRUE(parseDType(d.name, parsed)) << d.name;
    EXPECT_EQ(parsed, d.t);
  }
  DType t;
  EXPECT_FALSE(parseDType("f32", t));
  EXPECT_FALSE(parseDType("F128", t));
  EXPECT_FALSE(parseDType("", t));
}

float floatOf(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

TEST(ConversionTest, Bf16ToF32) {
  EXPECT_EQ(bf16ToF32(0x3F80), 1.0f);
  EXPECT_EQ(bf16ToF32(0xC000), -2.0f);
  EXPECT_EQ(bf16ToF32(0x3EAB), floatOf(0x3EAB0000));
  EXPECT_EQ(bf16ToF32(0x0001), floatOf(0x00010000)); // subnormal
  EXPECT_EQ(bf16ToF32(0x7F80), INFINITY);
  EXPECT_EQ(bf16ToF32(0xFF80), -INFINITY);
  EXPECT_TRUE(std::isnan(bf16ToF32(0x7FC0)));
  EXPECT_TRUE(std::signbit(bf16ToF32(0x8000)));
}

TEST(ConversionTest, F32ToBf16RoundsToNearestEven) {
  EXPECT_EQ(f32ToBf16(1.0f), 0x3F80);
  EXPECT_EQ(f32ToBf16(-2.0f), 0xC000);
  // Exactly halfway: ties go to the even neighbour.
  EXPECT_EQ(f32ToBf16(floatOf(0x3F808000)), 0x3F80);
  EXPECT_EQ(f32ToBf16(floatOf(0x3F818000)), 0x3F82);
  EXPECT_EQ(f32ToBf16(floatOf(0xBF818000)), 0xBF82);
  // Off the tie: nearest.
  EXPECT_EQ(f32ToBf16(floatOf(0x3F808001)), 0x3F81);
  EXPECT_EQ(f32ToBf16(floatOf(0x3F807FFF)), 0x3F80);
  // Rounding carries into the exponent, and past the largest finite to inf.
  EXPECT_EQ(f32ToBf16(floatOf(0x3FFFFFFF)), 0x4000);
  EXPECT_EQ(f32ToBf16(floatOf(0x7F7FFFFF)), 0x7F80);
  EXPECT_EQ(f32ToBf16(INFINITY), 0x7F80);
  EXPECT_EQ(f32ToBf16(-INFINITY), 0xFF80);
  // NaNs stay NaN even when only low mantissa bits are set.
  EXPECT_TRUE(std::isnan(bf16ToF32(f32ToBf16(floatOf(0x7F800001)))));
  EXPECT_TRUE(std::isnan(bf16ToF32(f32ToBf16(floatOf(0xFFFFFFFF)))));
  EXPECT_TRUE(std::isnan(bf16ToF32(f32ToBf16(NAN))));
  // Every non-NaN bf16 value converts back exactly.
  for (uint32_t b = 0; b < 0x10000; ++b) {
    if (!std::isnan(bf16ToF32(uint16_t(b)))) {
      ASSERT_EQ(f32ToBf16(bf16ToF32(uint16_t(b))), b);
    }
  }
}

TEST(ConversionTest, F16ToF32) {
  EXPECT_EQ(f16ToF32(0x3C00), 1.0f);
  EXPECT_EQ(f16ToF32(0xC000), -2.0f);
  EXPECT_EQ(f16ToF32(0x3555), 0.333251953125f);
  EXPECT_EQ(f16ToF32(0x7BFF), 65504.0f);
  EXPECT_EQ(f16ToF32(0x0400), std::ldexp(1.0f, -14)); // smallest normal
  EXPECT_EQ(f16ToF32(0x0001), std::ldexp(1.0f, -24)); // smallest subnormal
  EXPECT_EQ(f16ToF32(0x03FF), std::ldexp(1023.0f, -24));
  EXPECT_EQ(f16ToF32(0x8200), -std::ldexp(512.0f, -24));
  EXPECT_EQ(f16ToF32(0x0000), 0.0f);
  EXPECT_TRUE(std::signbit(f16ToF32(0x8000)));
  EXPECT_EQ(f16ToF32(0x7C00), INFINITY);
  EXPECT_EQ(f16ToF32(0xFC00), -INFINITY);
  EXPECT_TRUE(std::isnan(f16ToF32(0x7E00)));
  EXPECT_TRUE(std::isnan(f16ToF32(0x7C01)));
  // Every finite half is exactly representable: compare with the formula.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
    if (exp == 0x1F)
      continue;
    float mag = exp ? std::ldexp(float(1024 + mant), int(exp) - 25)
                    : std::ldexp(float(mant), -24);
    ASSERT_EQ(f16ToF32(uint16_t(h)), (h & 0x8000) ? -mag : mag) << h;
  }
}

//===----------------------------------------------------------------------===//
// Single files
//===----------------------------------------------------------------------===//

struct Sample {
  std::vector<float> f32 = {1.5f, -2.0f, 3.25f, 0.0f, 1e-3f, -7.0f};
  std::vector<uint16_t> bf16 = {0x3F80, 0xC000, 0x4040}; // 1, -2, 3
  std::vector<int64_t> i64 = {-1, INT64_MAX};
  std::vector<int32_t> i32 = {7, -8, INT32_MIN};
  std::vector<uint16_t> f16 = {0x3C00, 0x0001};
  std::vector<double> f64 = {0.1, -1e300};
  std::vector<uint8_t> u8 = {1, 2, 3, 4, 5};
  float scalar = 42.0f;

  std::vector<TensorRef> refs() const {
    return {
        {"w.bf16", DType::BF16, {3}, bf16.data()},
        {"w.f32", DType::F32, {2, 3}, f32.data()},
        {"ids.i64", DType::I64, {2}, i64.data()},
        {"u8", DType::U8, {5}, u8.data()},
        {"ids.i32", DType::I32, {3}, i32.data()},
        {"h.f16", DType::F16, {1, 2}, f16.data()},
        {"d.f64", DType::F64, {2}, f64.data()},
        {"empty", DType::F32, {0, 4}, nullptr},
        {"scalar", DType::F32, {}, &scalar},
    };
  }
};

TEST(SafetensorsTest, WriteReadRoundTrip) {
  TempDir dir;
  Sample s;
  std::string path = dir.file("round.safetensors");
  std::map<std::string, std::string> meta = {{"format", "pt"},
                                             {"note", "quote\" \xC3\xA9\n"}};
  Status st = writeSafetensors(path, s.refs(), meta);
  ASSERT_TRUE(st.ok()) << st.error;
  EXPECT_EQ(dir.list(), std::vector<std::string>{"round.safetensors"});

  std::string bytes = readBytes(path);
  uint64_t headerLen;
  std::memcpy(&headerLen, bytes.data(), 8);
  EXPECT_EQ((8 + headerLen) % 8, 0u) << "data section must be 8-byte aligned";

  for (bool headerOnly : {false, true}) {
    SafetensorsFile f;
    st = headerOnly ? SafetensorsFile::openHeaderOnly(path, f)
                    : SafetensorsFile::open(path, f);
    ASSERT_TRUE(st.ok()) << st.error;
    EXPECT_EQ(f.path(), path);
    EXPECT_EQ(f.metadata(), meta);
    auto refs = s.refs();
    ASSERT_EQ(f.tensors().size(), refs.size());
    for (size_t i = 0; i < refs.size(); ++i) {
      const TensorInfo &t = f.tensors()[i];
      EXPECT_EQ(t.name, refs[i].name) << "header keeps the given order";
      EXPECT_EQ(t.dtype, refs[i].dtype);
      EXPECT_EQ(t.shape, refs[i].shape);
      uint64_t bytes = t.numel() * dtypeSize(t.dtype);
      EXPECT_EQ(t.end - t.begin, bytes);
      EXPECT_EQ(f.find(t.name), &t);
      const void *p = f.data(t);
      if (headerOnly) {
        EXPECT_EQ(p, nullptr);
        continue;
      }
      ASSERT_NE(p, nullptr);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % dtypeSize(t.dtype), 0u)
          << t.name << " is not aligned for its element type";
      if (bytes) {
        EXPECT_EQ(std::memcmp(p, refs[i].data, bytes), 0) << t.name;
      }
    }
    EXPECT_EQ(f.find("nope"), nullptr);
    EXPECT_EQ(f.tensors()[8].numel(), 1u);
    EXPECT_EQ(f.tensors()[7].numel(), 0u);
  }
}

TEST(SafetensorsTest, MoveKeepsMapping) {
  TempDir dir;
  Sample s;
  std::string path = dir.file("m.safetensors");
  ASSERT_TRUE(writeSafetensors(path, s.refs()).ok());
  SafetensorsFile a;
  ASSERT_TRUE(SafetensorsFile::open(path, a).ok());
  const void *p = a.data(*a.find("w.f32"));
  SafetensorsFile b(std::move(a));
  EXPECT_EQ(b.data(*b.find("w.f32")), p);
  SafetensorsFile c;
  c = std::move(b);
  EXPECT_EQ(std::memcmp(c.data(*c.find("w.f32")), s.f32.data(), 24), 0);
  EXPECT_TRUE(c.metadata().empty());
}

TEST(SafetensorsTest, ReadsGoldenCheckpoint) {
  std::string dir = std::string(L4C_TEST_DATA_DIR) + "/golden/scout-tiny";
  std::string file = dir + "/model.safetensors";
  SafetensorsFile f;
  Status st = SafetensorsFile::open(file, f);
  ASSERT_TRUE(st.ok()) << st.error;
  const TensorInfo *lm = f.find("lm_head.weight");
  ASSERT_NE(lm, nullptr);
  EXPECT_EQ(lm->dtype, DType::F32);
  EXPECT_EQ(lm->shape, (std::vector<int64_t>{384, 128}));
  EXPECT_EQ(f.metadata().at("format"), "pt");

  SafetensorsFile h;
  ASSERT_TRUE(SafetensorsFile::openHeaderOnly(file, h).ok());
  EXPECT_EQ(h.tensors().size(), f.tensors().size());

  Checkpoint ck;
  st = Checkpoint::open(dir, ck);
  ASSERT_TRUE(st.ok()) << st.error;
  auto entries = ck.entries();
  ASSERT_EQ(entries.size(), f.tensors().size());
  for (size_t i = 1; i < entries.size(); ++i)
    EXPECT_LT(entries[i - 1].info->name, entries[i].info->name);
  std::vector<float> w(384 * 128);
  st = ck.read("lm_head.weight", DType::F32, w.data(), w.size());
  ASSERT_TRUE(st.ok()) << st.error;
  Checkpoint::Entry e;
  ASSERT_TRUE(ck.find("lm_head.weight", e));
  EXPECT_EQ(std::memcmp(w.data(), e.file->data(*e.info), w.size() * 4), 0);
  double sumSq = 0;
  for (float x : w) {
    ASSERT_TRUE(std::isfinite(x));
    sumSq += double(x) * x;
  }
  EXPECT_GT(sumSq, 0.0);
  std::vector<uint16_t> wb(w.size());
  ASSERT_TRUE(
      ck.read("lm_head.weight", DType::BF16, wb.data(), wb.size()).ok());
  EXPECT_EQ(wb[5], f32ToBf16(w[5]));
}

/// Expects both open() and openHeaderOnly() to reject `path` with a message
/// containing every needle.
void expectRejected(const std::string &path,
                    std::initializer_list<std::string> needles) {
  for (bool headerOnly : {false, true}) {
    SafetensorsFile f;
    Status st = headerOnly ? SafetensorsFile::openHeaderOnly(path, f)
                           : SafetensorsFile::open(path, f);
    ASSERT_FALSE(st.ok()) << path << (headerOnly ? " (header only)" : "");
    EXPECT_EQ(st.error.rfind(path + ": ", 0), 0u) << st.error;
    for (const std::string &n : needles)
      EXPECT_TRUE(contains(st.error, n));
  }
}

TEST(SafetensorsTest, RejectsTruncatedFiles) {
  TempDir dir;
  Sample s;
  std::string good = dir.file("good.safetensors");
  ASSERT_TRUE(writeSafetensors(good, s.refs()).ok());
  std::string bytes = readBytes(good);
  uint64_t headerLen;
  std::memcpy(&headerLen, bytes.data(), 8);
  std::string cut = dir.file("cut.safetensors");
  for (size_t at : {size_t(0), size_t(3), size_t(7)}) {
    writeBytes(cut, bytes.substr(0, at));
    expectRejected(cut, {"truncated", "8-byte header length"});
  }
  for (size_t at : {size_t(8), size_t(9), size_t(8 + headerLen / 2),
                    size_t(8 + headerLen - 1)}) {
    writeBytes(cut, bytes.substr(0, at));
    expectRejected(cut, {"truncated: header says " + std::to_string(headerLen) +
                         " bytes but the file holds " + std::to_string(at - 8) +
                         " after the length"});
  }
  for (size_t at : {size_t(8 + headerLen + 1), bytes.size() - 1}) {
    writeBytes(cut, bytes.substr(0, at));
    expectRejected(cut, {"reach past the end of the data section"});
  }
  // The header alone is a valid file only if no tensor has bytes.
  writeBytes(cut, bytes.substr(0, 8 + headerLen));
  expectRejected(cut, {"reach past the end of the data section (0 bytes)"});
}

TEST(SafetensorsTest, RejectsBadHeaderLength) {
  TempDir dir;
  std::string path = dir.file("x.safetensors");
  writeBytes(path, lengthPrefix(1234) + std::string(100, ' '));
  expectRejected(path, {": truncated: header says 1234 bytes but the file "
                        "holds 100 after the length"});
  writeBytes(path, lengthPrefix(UINT64_MAX) + "{}");
  expectRejected(path, {"truncated: header says 18446744073709551615 bytes"});
  // A header past the limit, in a sparse file so the test stays cheap.
  uint64_t big = (100ull << 20) + 8;
  writeBytes(path, lengthPrefix(big));
  ASSERT_EQ(::truncate(path.c_str(), off_t(8 + big)), 0);
  expectRejected(
      path, {"header length " + std::to_string(big) + " exceeds the limit"});
}

TEST(SafetensorsTest, RejectsMalformedHeaders) {
  TempDir dir;
  std::string path = dir.file("bad.safetensors");
  struct Case {
    std::string header;
    size_t data;
    std::vector<std::string> needles;
  } cases[] = {
      {"{\"a\":", 0, {"header is not valid JSON: byte 5"}},
      {"{} x", 0, {"header is not valid JSON", "after the JSON value"}},
      {"[]", 0, {"header is not a JSON object"}},
      {R"({"a":{"dtype":"F128","shape":[1],"data_offsets":[0,4]}})",
       4,
       {"tensor 'a' has unknown dtype 'F128'"}},
      {R"({"a":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})",
       4,
       {"unknown dtype 'f32'"}},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
       4,
       {"tensor 'a' data_offsets [0, 8] reach past the end of the data "
        "section (4 bytes)"}},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})",
       8,
       {"tensor 'a' data_offsets [8, 4] end before they begin"}},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
       R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
       12,
       {"tensors 'a' [0, 8] and 'b' [4, 12] overlap"}},
      {R"({"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},)"
       R"("a":{"dtype":"U8","shape":[12],"data_offsets":[0,12]}})",
       12,
       {"tensors 'a' [0, 12] and 'b' [4, 8] overlap"}},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
       R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
       8,
       {"tensor 'a' is defined twice"}},
      {R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})",
       8,
       {"tensor 'a' data_offsets [0, 8] do not match shape [3] of F32 "
        "(12 bytes)"}},
      {R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,16],)"
       R"("data_offsets":[0,8]}})",
       8,
       {"do not match shape [4294967296, 4294967296, 16] of F32 (size "
        "overflows 64 bits)"}},
      {R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})",
       4,
       {"tensor 'a' has a shape entry that is not a non-negative integer"}},
      {R"({"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})",
       4,
       {"not a non-negative integer"}},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})",
       8,
       {"tensor 'a' has no 'data_offsets' pair"}},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})",
       4,
       {"data_offsets that are not non-negative integers"}},
      {R"({"a":{"dtype":"F32","shape":[1]}})",
       4,
       {"tensor 'a' has no 'data_offsets' pair"}},
      {R"({"a":{"shape":[1],"data_offsets":[0,4]}})",
       4,
       {"tensor 'a' has no string 'dtype'"}},
      {R"({"a":{"dtype":"F32","data_offsets":[0,4]}})",
       4,
       {"tensor 'a' has no array 'shape'"}},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}})",
       4,
       {"tensor 'a' has unknown field 'x'"}},
      {R"({"a":{"dtype":"F32","dtype":"F32",)"
       R"("shape":[1],"data_offsets":[0,4]}})",
       4,
       {"tensor 'a' has field 'dtype' twice"}},
      {R"({"a":[1]})", 0, {"tensor 'a' is not a JSON object"}},
      {R"({"__metadata__":{"k":1}})",
       0,
       {"__metadata__ value for 'k' is not a string"}},
      {R"({"__metadata__":{"k":"a","k":"b"}})",
       0,
       {"__metadata__ key 'k' appears twice"}},
      {R"({"__metadata__":[]})", 0, {"__metadata__ must appear once"}},
  };
  for (const Case &c : cases) {
    SCOPED_TRACE(c.header);
    writeBytes(path, rawFile(c.header, c.data));
    for (const std::string &n : c.needles)
      expectRejected(path, {n});
  }
}

TEST(SafetensorsTest, ShapeMismatchMessageNamesFileAndTensor) {
  TempDir dir;
  std::string path = dir.file("model.safetensors");
  writeBytes(path, rawFile(R"({"lm_head.weight":{"dtype":"F32",)"
                           R"("shape":[384,128],"data_offsets":[0,100]}})",
                           100));
  SafetensorsFile f;
  Status st = SafetensorsFile::open(path, f);
  EXPECT_EQ(st.error, path + ": tensor 'lm_head.weight' data_offsets [0, 100] "
                             "do not match shape [384, 128] of F32 (196608 "
                             "bytes)");
}

TEST(SafetensorsTest, AcceptsEdgeCases) {
  TempDir dir;
  std::string path = dir.file("edge.safetensors");
  // Empty tensors anywhere, gaps between tensors, trailing bytes, padding.
  writeBytes(
      path,
      rawFile(R"({"e":{"dtype":"F32","shape":[0],"data_offsets":[2,2]},)"
              R"("a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
              R"("b":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}}   )",
              10));
  SafetensorsFile f;
  Status st = SafetensorsFile::open(path, f);
  EXPECT_TRUE(st.ok()) << st.error;
  writeBytes(path, rawFile("{}", 0));
  EXPECT_TRUE(SafetensorsFile::open(path, f).ok());
  EXPECT_TRUE(f.tensors().empty());
}

TEST(SafetensorsTest, RejectsMissingAndNonRegularFiles) {
  TempDir dir;
  SafetensorsFile f;
  Status st = SafetensorsFile::open(dir.file("nope.safetensors"), f);
  EXPECT_TRUE(
      contains(st.error, "nope.safetensors: cannot open: No such file"));
  st = SafetensorsFile::open(dir.path(), f);
  EXPECT_EQ(st.error, dir.path() + ": not a regular file");
}

//===----------------------------------------------------------------------===//
// Checkpoints
//===----------------------------------------------------------------------===//

TEST(CheckpointTest, ReadConvertsDTypes) {
  TempDir dir;
  Sample s;
  std::string path = dir.file("c.safetensors");
  ASSERT_TRUE(writeSafetensors(path, s.refs()).ok());
  Checkpoint ck;
  Status st = Checkpoint::open(path, ck);
  ASSERT_TRUE(st.ok()) << st.error;

  std::vector<float> f(6);
  ASSERT_TRUE(ck.read("w.f32", DType::F32, f.data(), 6).ok());
  EXPECT_EQ(f, s.f32);
  ASSERT_TRUE(ck.read("w.bf16", DType::F32, f.data(), 3).ok());
  EXPECT_EQ(f[0], 1.0f);
  EXPECT_EQ(f[1], -2.0f);
  EXPECT_EQ(f[2], 3.0f);
  ASSERT_TRUE(ck.read("h.f16", DType::F32, f.data(), 2).ok());
  EXPECT_EQ(f[0], 1.0f);
  EXPECT_EQ(f[1], std::ldexp(1.0f, -24));
  ASSERT_TRUE(ck.read("d.f64", DType::F32, f.data(), 2).ok());
  EXPECT_EQ(f[0], 0.1f);
  EXPECT_EQ(f[1], -INFINITY);

  std::vector<uint16_t> b(6);
  ASSERT_TRUE(ck.read("w.f32", DType::BF16, b.data(), 6).ok());
  for (int i = 0; i < 6; ++i)
    EXPECT_EQ(b[i], f32ToBf16(s.f32[i]));
  ASSERT_TRUE(ck.read("w.bf16", DType::BF16, b.data(), 3).ok());
  EXPECT_EQ(std::vector<uint16_t>(b.begin(), b.begin() + 3), s.bf16);

  std::vector<int64_t> i(3);
  ASSERT_TRUE(ck.read("ids.i64", DType::I64, i.data(), 2).ok());
  EXPECT_EQ(i[1], INT64_MAX);
  ASSERT_TRUE(ck.read("ids.i32", DType::I64, i.data(), 3).ok());
  EXPECT_EQ(i, (std::vector<int64_t>{7, -8, INT32_MIN}));
  ASSERT_TRUE(ck.read("empty", DType::F32, nullptr, 0).ok());
  ASSERT_TRUE(ck.read("scalar", DType::F32, f.data(), 1).ok());
  EXPECT_EQ(f[0], 42.0f);

  st = ck.read("w.f32", DType::I64, i.data(), 6);
  EXPECT_EQ(st.error, path + ": tensor 'w.f32': cannot convert F32 to I64");
  st = ck.read("u8", DType::F32, f.data(), 5);
  EXPECT_TRUE(contains(st.error, "tensor 'u8': cannot convert U8 to F32"));
  st = ck.read("w.f32", DType::F32, f.data(), 5);
  EXPECT_EQ(st.error, path + ": tensor 'w.f32' has 6 elements but the caller "
                             "expects 5");
  st = ck.read("missing", DType::F32, f.data(), 1);
  EXPECT_EQ(st.error, path + ": no tensor 'missing'");

  Checkpoint header;
  ASSERT_TRUE(Checkpoint::open(path, header, /*headerOnly=*/true).ok());
  EXPECT_EQ(header.entries().size(), 9u);
  st = header.read("w.f32", DType::F32, f.data(), 6);
  EXPECT_TRUE(
      contains(st.error, "tensor 'w.f32': file was opened header-only"));
}

/// A directory with two shards and an index; tests then break one piece.
struct ShardedCheckpoint {
  TempDir dir;
  std::vector<float> a = {1, 2}, b = {3}, c = {4, 5, 6};
  std::string index;

  ShardedCheckpoint() {
    EXPECT_TRUE(writeSafetensors(dir.file("model-00001-of-00002.safetensors"),
                                 {{"b", DType::F32, {1}, b.data()},
                                  {"a", DType::F32, {2}, a.data()}})
                    .ok());
    EXPECT_TRUE(writeSafetensors(dir.file("model-00002-of-00002.safetensors"),
                                 {{"c", DType::F32, {3}, c.data()}})
                    .ok());
    index = dir.file("model.safetensors.index.json");
    writeIndex(R"({"a":"model-00001-of-00002.safetensors",)"
               R"("b":"model-00001-of-00002.safetensors",)"
               R"("c":"model-00002-of-00002.safetensors"})");
  }
  void writeIndex(const std::string &weightMap) {
    writeBytes(index, "{\"metadata\":{\"total_size\":24},\"weight_map\":" +
                          weightMap + "}");
  }
  Status open(Checkpoint &ck, bool headerOnly = false) {
    return Checkpoint::open(dir.path(), ck, headerOnly);
  }
};

TEST(CheckpointTest, OpensShardedCheckpoint) {
  ShardedCheckpoint s;
  for (const std::string &path : {s.dir.path(), s.dir.path() + "/", s.index}) {
    Checkpoint ck;
    Status st = Checkpoint::open(path, ck);
    ASSERT_TRUE(st.ok()) << st.error;
    auto entries = ck.entries();
    ASSERT_EQ(entries.size(), 3u);
    EXPECT_EQ(entries[0].info->name, "a");
    EXPECT_EQ(entries[1].info->name, "b");
    EXPECT_EQ(entries[2].info->name, "c");
    EXPECT_EQ(entries[0].file, entries[1].file);
    EXPECT_NE(entries[0].file, entries[2].file);
    EXPECT_TRUE(contains(entries[2].file->path(), "model-00002-of-00002"));
    std::vector<float> out(3);
    ASSERT_TRUE(ck.read("c", DType::F32, out.data(), 3).ok());
    EXPECT_EQ(out, s.c);
    ASSERT_TRUE(ck.read("a", DType::F32, out.data(), 2).ok());
    EXPECT_EQ(out[1], 2.0f);
  }
  Checkpoint ck;
  ASSERT_TRUE(s.open(ck, /*headerOnly=*/true).ok());
  Checkpoint::Entry e;
  ASSERT_TRUE(ck.find("c", e));
  EXPECT_EQ(e.file->data(*e.info), nullptr);
  EXPECT_FALSE(ck.find("d", e));
}

TEST(CheckpointTest, RejectsBrokenShardedCheckpoints) {
  struct Case {
    std::string weightMap;
    std::vector<std::string> needles;
  } cases[] = {
      {R"({"a":"model-00001-of-00002.safetensors","c":"gone.safetensors"})",
       {"shard 'gone.safetensors' (of tensor 'c')", "gone.safetensors: cannot "
                                                    "open: No such file"}},
      {R"({"a":"model-00001-of-00002.safetensors",)"
       R"("d":"model-00001-of-00002.safetensors"})",
       {"weight_map puts tensor 'd' in 'model-00001-of-00002.safetensors' but "
        "that shard does not define it"}},
      {R"({"a":"model-00001-of-00002.safetensors",)"
       R"("c":"model-00001-of-00002.safetensors",)"
       R"("x":"model-00002-of-00002.safetensors"})",
       {"weight_map puts tensor 'c' in 'model-00001-of-00002.safetensors'"}},
      {R"({"a":"model-00001-of-00002.safetensors","a":"x.safetensors"})",
       {"tensor 'a' appears twice in weight_map"}},
      {R"({"a":1})",
       {"weight_map entry for tensor 'a' is not a relative shard "
        "file name"}},
      {R"({"a":"../model-00001-of-00002.safetensors"})",
       {"not a relative shard file name"}},
      {R"({"a":"/etc/passwd"})", {"not a relative shard file name"}},
      {R"([])", {"missing object 'weight_map'"}},
  };
  for (const Case &c : cases) {
    SCOPED_TRACE(c.weightMap);
    ShardedCheckpoint s;
    s.writeIndex(c.weightMap);
    Checkpoint ck;
    Status st = s.open(ck);
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error.rfind(s.index + ": ", 0), 0u) << st.error;
    for (const std::string &n : c.needles)
      EXPECT_TRUE(contains(st.error, n));
  }
}

TEST(CheckpointTest, RejectsTensorDefinedInTwoShards) {
  ShardedCheckpoint s;
  std::vector<float> dup = {9};
  ASSERT_TRUE(writeSafetensors(s.dir.file("model-00002-of-00002.safetensors"),
                               {{"c", DType::F32, {3}, s.c.data()},
                                {"b", DType::F32, {1}, dup.data()}})
                  .ok());
  Checkpoint ck;
  Status st = s.open(ck);
  EXPECT_TRUE(contains(
      st.error, "tensor 'b' is defined in both '" +
                    s.dir.file("model-00001-of-00002.safetensors") + "' and '" +
                    s.dir.file("model-00002-of-00002.safetensors") + "'"));
}

TEST(CheckpointTest, RejectsBadShardAndIndexFiles) {
  ShardedCheckpoint s;
  writeBytes(s.dir.file("model-00002-of-00002.safetensors"), "short");
  Checkpoint ck;
  Status st = s.open(ck);
  EXPECT_TRUE(
      contains(st.error, "model-00002-of-00002.safetensors: truncated"));
  writeBytes(s.index, "{\"weight_map\":");
  st = s.open(ck);
  EXPECT_TRUE(contains(st.error, s.index + ": invalid JSON: byte 14"));
}

TEST(CheckpointTest, FindsFilesInDirectory) {
  TempDir dir;
  Checkpoint ck;
  Status st = Checkpoint::open(dir.path(), ck);
  EXPECT_EQ(st.error,
            dir.path() +
                ": no model.safetensors or model.safetensors.index.json");
  st = Checkpoint::open(dir.file("missing"), ck);
  EXPECT_TRUE(contains(st.error, "missing: cannot open"));
  float x = 1;
  ASSERT_TRUE(writeSafetensors(dir.file("model.safetensors"),
                               {{"x", DType::F32, {1}, &x}})
                  .ok());
  st = Checkpoint::open(dir.path(), ck);
  ASSERT_TRUE(st.ok()) << st.error;
  ASSERT_EQ(ck.entries().size(), 1u);
  EXPECT_EQ(ck.entries()[0].file->path(), dir.file("model.safetensors"));
}

//===----------------------------------------------------------------------===//
// Atomic writes
//===----------------------------------------------------------------------===//

TEST(AtomicWriteTest, FailsIntoMissingDirectoryAndLeavesNothing) {
  TempDir dir;
  std::string path = dir.file("no/such/dir/out.safetensors");
  float x = 1;
  Status st = writeSafetensors(path, {{"x", DType::F32, {1}, &x}});
  ASSERT_FALSE(st.ok());
  EXPECT_TRUE(contains(st.error, path + ": cannot create temporary file"));
  EXPECT_TRUE(contains(st.error, "No such file or directory"));
  st = writeFileAtomic(path, "text");
  EXPECT_FALSE(st.ok());
  EXPECT_TRUE(dir.list().empty());
}

TEST(AtomicWriteTest, FailedRenameRemovesTemporary) {
  TempDir dir;
  // A non-empty directory at the target cannot be replaced by rename().
  std::string path = dir.file("target");
  ASSERT_EQ(::mkdir(path.c_str(), 0755), 0);
  writeBytes(path + "/keep", "x");
  Status st = writeFileAtomic(path, "contents");
  ASSERT_FALSE(st.ok());
  EXPECT_TRUE(
      contains(st.error, "cannot rename the temporary file into place"));
  EXPECT_EQ(dir.list(), std::vector<std::string>{"target"});
}

TEST(AtomicWriteTest, ReplacesExistingFile) {
  TempDir dir;
  std::string path = dir.file("out.safetensors");
  writeBytes(path, std::string(10000, 'z'));
  std::vector<float> v = {1, 2, 3};
  Status st = writeSafetensors(path, {{"v", DType::F32, {3}, v.data()}});
  ASSERT_TRUE(st.ok()) << st.error;
  SafetensorsFile f;
  ASSERT_TRUE(SafetensorsFile::open(path, f).ok());
  EXPECT_EQ(std::memcmp(f.data(*f.find("v")), v.data(), 12), 0);

  std::string text = dir.file("note.txt");
  ASSERT_TRUE(writeFileAtomic(text, "first version, longer").ok());
  ASSERT_TRUE(writeFileAtomic(text, "second").ok());
  EXPECT_EQ(readBytes(text), "second");
  ASSERT_TRUE(writeFileAtomic(text, "").ok());
  EXPECT_EQ(readBytes(text), "");
  EXPECT_EQ(dir.list(),
            (std::vector<std::string>{"note.txt", "out.safetensors"}));
}

TEST(AtomicWriteTest, RejectsInvalidTensorsWithoutWriting) {
  TempDir dir;
  std::string path = dir.file("bad.safetensors");
  float x[4] = {};
  struct Case {
    std::vector<TensorRef> tensors;
    std::string needle;
  } cases[] = {
      {{{"a", DType::F32, {1}, x}, {"a", DType::F32, {1}, x}},
       "tensor 'a' is listed twice"},
      {{{"a", DType::F32, {-1}, x}}, "tensor 'a': invalid shape [-1]"},
      {{{"a", DType::F32, {INT64_MAX, 4}, x}},
       "tensor 'a': invalid shape [9223372036854775807, 4]"},
      {{{"a", DType::F32, {2}, nullptr}}, "tensor 'a': no data"},
      {{{"__metadata__", DType::F32, {1}, x}},
       "tensor '__metadata__': reserved or empty name"},
      {{{"", DType::F32, {1}, x}}, "tensor '': reserved or empty name"},
  };
  for (const Case &c : cases) {
    Status st = writeSafetensors(path, c.tensors);
    EXPECT_TRUE(contains(st.error, path + ": " + c.needle));
  }
  EXPECT_TRUE(dir.list().empty());
}

} // namespace
