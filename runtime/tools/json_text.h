//===- json_text.h - JSON string contents for the tools' files -*- C++ -*-===//
//
// l4-tune's tuning files and l4-run's --profile-json write JSON by hand;
// kernel and plan names go in through this escape.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_RUNTIME_TOOLS_JSON_TEXT_H
#define L4C_RUNTIME_TOOLS_JSON_TEXT_H

#include <cstdio>
#include <string>

namespace l4c::tools {

/// `s` as the contents of a JSON string (quotes not included).
inline std::string jsonEscape(const std::string &s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned char>(c));
      out += buf;
    } else {
      out += c;
    }
  }
  return out;
}

} // namespace l4c::tools

#endif // L4C_RUNTIME_TOOLS_JSON_TEXT_H
