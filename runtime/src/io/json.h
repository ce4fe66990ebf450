//===- json.h - strict JSON parser for headers and indexes ----*- C++ -*-===//
//
// A small RFC 8259 parser for safetensors headers, checkpoint indexes and
// configs. Strict (no comments, no trailing commas, UTF-8 validated), bounded
// nesting depth, and no exceptions: failures report a byte offset and reason.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_RUNTIME_IO_JSON_H
#define L4C_RUNTIME_IO_JSON_H

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace l4c::io {

class JsonValue {
public:
  enum class Kind { Null, Bool, Number, String, Array, Object };

  Kind kind = Kind::Null;
  bool boolean = false;
  /// Numbers: `number` always holds the (possibly rounded) value; `isInteger`
  /// says the literal had no fraction or exponent and fits `integer` exactly.
  double number = 0;
  int64_t integer = 0;
  bool isInteger = false;
  std::string string;
  std::vector<JsonValue> array;
  /// Members in document order. Duplicate keys are kept so that callers for
  /// whom a duplicate is an error (tensor names) can say which key it was.
  std::vector<std::pair<std::string, JsonValue>> object;

  bool isNull() const { return kind == Kind::Null; }
  bool isBool() const { return kind == Kind::Bool; }
  bool isNumber() const { return kind == Kind::Number; }
  bool isString() const { return kind == Kind::String; }
  bool isArray() const { return kind == Kind::Array; }
  bool isObject() const { return kind == Kind::Object; }
  /// First member named `key`, or nullptr (also when this is not an object).
  const JsonValue *get(std::string_view key) const;
};

struct JsonError {
  size_t offset = 0; ///< byte offset into the parsed text
  std::string reason;
  /// "byte 12: expected ':' after object key".
  std::string message() const;
};

/// Parses `text` as exactly one JSON value surrounded by optional whitespace.
/// Returns false and fills `err` on failure; `out` is then unspecified.
bool parseJson(std::string_view text, JsonValue &out, JsonError &err,
               unsigned maxDepth = 256);

/// Appends `s` as a quoted JSON string literal. Bytes >= 0x80 pass through,
/// so valid UTF-8 in gives valid UTF-8 out.
void appendJsonString(std::string &out, std::string_view s);

} // namespace l4c::io

#endif // L4C_RUNTIME_IO_JSON_H
