//===- json.cpp - strict JSON parser for headers and indexes --------------===//
//
// Recursive descent over RFC 8259. Headers come from files we do not trust, so
// every path checks bounds, nesting is capped, and strings are UTF-8 checked.
//
//===----------------------------------------------------------------------===//
#include "io/json.h"

#include <charconv>
#include <cstring>

namespace l4c::io {

const JsonValue *JsonValue::get(std::string_view key) const {
  for (const auto &member : object)
    if (member.first == key)
      return &member.second;
  return nullptr;
}

std::string JsonError::message() const {
  return "byte " + std::to_string(offset) + ": " + reason;
}

namespace {

void appendUtf8(std::string &out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

class Parser {
public:
  Parser(std::string_view text, unsigned maxDepth, JsonError &err)
      : text_(text), maxDepth_(maxDepth), err_(err) {}

  bool parseDocument(JsonValue &out) {
    skipSpace();
    if (!parseValue(out, 0))
      return false;
    skipSpace();
    if (pos_ != text_.size())
      return fail(pos_, "unexpected data after the JSON value");
    return true;
  }

private:
  std::string_view text_;
  size_t pos_ = 0;
  unsigned maxDepth_;
  JsonError &err_;

  bool fail(size_t at, const char *reason) {
    err_.offset = at;
    err_.reason = reason;
    return false;
  }
  bool atEnd() const { return pos_ >= text_.size(); }
  unsigned char peek() const { return atEnd() ? 0 : text_[pos_]; }
  void skipSpace() {
    while (!atEnd() && (peek() == ' ' || peek() == '\t' || peek() == '\n' ||
                        peek() == '\r'))
      ++pos_;
  }
  bool consume(char c) {
    if (peek() != (unsigned char)c || atEnd())
      return false;
    ++pos_;
    return true;
  }

  bool parseValue(JsonValue &v, unsigned depth) {
    if (atEnd())
      return fail(pos_, "unexpected end of input, expected a value");
    switch (peek()) {
    case '{':
      return parseObject(v, depth + 1);
    case '[':
      return parseArray(v, depth + 1);
    case '"':
      v.kind = JsonValue::Kind::String;
      return parseString(v.string);
    case 't':
      v.kind = JsonValue::Kind::Bool;
      v.boolean = true;
      return parseWord("true");
    case 'f':
      v.kind = JsonValue::Kind::Bool;
      return parseWord("false");
    case 'n':
      return parseWord("null");
    default:
      if (peek() == '-' || (peek() >= '0' && peek() <= '9'))
        return parseNumber(v);
      return fail(pos_, "unexpected character, expected a value");
    }
  }

  bool parseWord(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word)
      return fail(pos_, "invalid literal");
    pos_ += word.size();
    return true;
  }

  bool parseObject(JsonValue &v, unsigned depth) {
    if (depth > maxDepth_)
      return fail(pos_, "nesting too deep");
    v.kind = JsonValue::Kind::Object;
    ++pos_;
    skipSpace();
    if (consume('}'))
      return true;
    for (;;) {
      if (peek() != '"' || atEnd())
        return fail(pos_, "expected a string key");
      v.object.emplace_back();
      auto &member = v.object.back();
      if (!parseString(member.first))
        return false;
      skipSpace();
      if (!consume(':'))
        return fail(pos_, "expected ':' after object key");
      skipSpace();
      if (!parseValue(member.second, depth))
        return false;
      skipSpace();
      if (consume('}'))
        return true;
      if (!consume(','))
        return fail(pos_, "expected ',' or '}' in object");
      skipSpace();
    }
  }

  bool parseArray(JsonValue &v, unsigned depth) {
    if (depth > maxDepth_)
      return fail(pos_, "nesting too deep");
    v.kind = JsonValue::Kind::Array;
    ++pos_;
    skipSpace();
    if (consume(']'))
      return true;
    for (;;) {
      v.array.emplace_back();
      if (!parseValue(v.array.back(), depth))
        return false;
      skipSpace();
      if (consume(']'))
        return true;
      if (!consume(','))
        return fail(pos_, "expected ',' or ']' in array");
      skipSpace();
    }
  }

  bool parseHex4(uint32_t &out) {
    if (text_.size() - pos_ < 4)
      return fail(pos_, "truncated \\u escape");
    out = 0;
    for (int i = 0; i < 4; ++i) {
      char c = text_[pos_ + i];
      uint32_t d;
      if (c >= '0' && c <= '9')
        d = c - '0';
      else if (c >= 'a' && c <= 'f')
        d = c - 'a' + 10;
      else if (c >= 'A' && c <= 'F')
        d = c - 'A' + 10;
      else
        return fail(pos_ + i, "invalid hex digit in \\u escape");
      out = out * 16 + d;
    }
    pos_ += 4;
    return true;
  }

  bool parseEscape(std::string &out) {
    size_t start = pos_ - 1;
    if (atEnd())
      return fail(start, "unterminated escape");
    char c = text_[pos_++];
    static const char kFrom[] = "\"\\/bfnrt", kTo[] = "\"\\/\b\f\n\r\t";
    if (const char *hit = c ? std::strchr(kFrom, c) : nullptr) {
      out += kTo[hit - kFrom];
      return true;
    }
    if (c != 'u')
      return fail(start, "invalid escape");
    uint32_t cp;
    if (!parseHex4(cp))
      return false;
    if (cp >= 0xDC00 && cp <= 0xDFFF)
      return fail(start, "unpaired low surrogate in \\u escape");
    if (cp >= 0xD800 && cp <= 0xDBFF) {
      uint32_t lo;
      if (text_.substr(pos_, 2) != "\\u")
        return fail(start, "high surrogate not followed by a low surrogate");
      pos_ += 2;
      if (!parseHex4(lo))
        return false;
      if (lo < 0xDC00 || lo > 0xDFFF)
        return fail(start, "high surrogate not followed by a low surrogate");
      cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
    }
    appendUtf8(out, cp);
    return true;
  }

  /// Copies one multi-byte UTF-8 sequence starting at pos_, rejecting
  /// overlong forms, surrogates and code points past U+10FFFF.
  bool copyUtf8(std::string &out) {
    unsigned char c = peek();
    unsigned char lo = 0x80, hi = 0xBF;
    int extra;
    if (c >= 0xC2 && c <= 0xDF) {
      extra = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
      extra = 2;
      if (c == 0xE0)
        lo = 0xA0;
      else if (c == 0xED)
        hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      extra = 3;
      if (c == 0xF0)
        lo = 0x90;
      else if (c == 0xF4)
        hi = 0x8F;
    } else {
      return fail(pos_, "invalid UTF-8 in string");
    }
    if (text_.size() - pos_ <= size_t(extra))
      return fail(pos_, "truncated UTF-8 sequence in string");
    for (int i = 1; i <= extra; ++i) {
      unsigned char b = text_[pos_ + i];
      if (b < lo || b > hi)
        return fail(pos_, "invalid UTF-8 in string");
      lo = 0x80, hi = 0xBF;
    }
    out.append(text_.substr(pos_, extra + 1));
    pos_ += extra + 1;
    return true;
  }

  bool parseString(std::string &out) {
    size_t start = pos_++;
    for (;;) {
      if (atEnd())
        return fail(start, "unterminated string");
      unsigned char c = peek();
      if (c == '"') {
        ++pos_;
        return true;
      }
      if (c == '\\') {
        ++pos_;
        if (!parseEscape(out))
          return false;
      } else if (c < 0x20) {
        return fail(pos_, "unescaped control character in string");
      } else if (c < 0x80) {
        out += char(c);
        ++pos_;
      } else if (!copyUtf8(out)) {
        return false;
      }
    }
  }

  bool digits() {
    size_t start = pos_;
    while (peek() >= '0' && peek() <= '9' && !atEnd())
      ++pos_;
    return pos_ != start;
  }

  bool parseNumber(JsonValue &v) {
    size_t start = pos_;
    bool integral = true;
    consume('-');
    if (consume('0')) {
      if (peek() >= '0' && peek() <= '9' && !atEnd())
        return fail(start, "leading zero in number");
    } else if (!digits()) {
      return fail(pos_, "expected a digit");
    }
    if (consume('.')) {
      integral = false;
      if (!digits())
        return fail(pos_, "expected a digit after '.'");
    }
    if (consume('e') || consume('E')) {
      integral = false;
      if (!consume('+'))
        consume('-');
      if (!digits())
        return fail(pos_, "expected a digit in exponent");
    }
    const char *first = text_.data() + start, *last = text_.data() + pos_;
    v.kind = JsonValue::Kind::Number;
    auto r = std::from_chars(first, last, v.number);
    if (r.ec != std::errc() || r.ptr != last)
      return fail(start, "number out of range");
    if (integral) {
      auto ri = std::from_chars(first, last, v.integer);
      v.isInteger = ri.ec == std::errc() && ri.ptr == last;
    }
    return true;
  }
};

} // namespace

bool parseJson(std::string_view text, JsonValue &out, JsonError &err,
               unsigned maxDepth) {
  out = JsonValue();
  return Parser(text, maxDepth, err).parseDocument(out);
}

void appendJsonString(std::string &out, std::string_view s) {
  static const char hex[] = "0123456789abcdef";
  out += '"';
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += char(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c < 0x20) {
      out += "\\u00";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += char(c);
    }
  }
  out += '"';
}

} // namespace l4c::io
