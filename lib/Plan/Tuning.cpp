//===- Tuning.cpp - reading l4-tune's tuning files ------------------------===//
#include "l4c/Plan/Tuning.h"
#include "llvm/ADT/STLExtras.h"
#include "llvm/Support/FormatVariadic.h"
#include "llvm/Support/JSON.h"
#include "llvm/Support/MemoryBuffer.h"

namespace l4c {

bool isTileConfig(llvm::StringRef config) {
  return llvm::is_contained({"p128x128", "p128x128s3", "p128x128s4", "p128x64",
                             "p128x64s3", "p128x64s4", "t64x64", "w128x128s3",
                             "w128x128s4", "w128x256s3", "w128x64s3",
                             "w128x64s4", "e128x128", "g32", "g64", "g128",
                             "c64", "v1", "v2", "v4", "a64", "a64p1", "w64",
                             "w64p1", "w128", "w128p1", "tma128x64s4",
                             "tma128x128s3", "tma128x128s4", "tma128x256s3",
                             "tma128x256s4"},
                            config);
}

llvm::Expected<std::map<std::string, std::string>>
readTuningFile(llvm::StringRef path, llvm::StringRef arch) {
  auto fail = [&](const llvm::Twine &why) {
    return llvm::createStringError("tuning file " + path.str() + ": " +
                                   why.str());
  };
  auto buf = llvm::MemoryBuffer::getFile(path, /*IsText=*/true);
  if (!buf)
    return fail(buf.getError().message());
  auto json = llvm::json::parse((*buf)->getBuffer());
  if (!json)
    return fail("not valid JSON: " + llvm::toString(json.takeError()));
  const llvm::json::Object *top = json->getAsObject();
  if (!top || top->getString("format") != "l4c-tuning")
    return fail("expected an object with \"format\": \"l4c-tuning\"");
  if (top->getInteger("version") != 1)
    return fail("expected \"version\": 1");
  const llvm::json::Array *entries = top->getArray("entries");
  if (!entries)
    return fail("expected an \"entries\" array");
  std::map<std::string, std::string> out;
  for (auto [i, v] : llvm::enumerate(*entries)) {
    const llvm::json::Object *e = v.getAsObject();
    auto field = [&](llvm::StringRef name) -> std::optional<llvm::StringRef> {
      return e ? e->getString(name) : std::nullopt;
    };
    auto a = field("arch"), sig = field("signature"), config = field("config");
    if (!a || !sig || !config || sig->empty())
      return fail(llvm::formatv("entry {0}: expected string fields arch, "
                                "signature and config",
                                i));
    if (!isTileConfig(*config))
      return fail(llvm::formatv("entry {0}: unknown tile configuration "
                                "'{1}' (expected p128x<128|64>[s<3|4>], "
                                "w128x<256|128|64>s<3|4>, tma128x<256|128|64>s<3|4>, "
                                "e128x128, t64x64, "
                                "g<32|64|128>, c64, v<1|2|4>, a64[p1] or "
                                "w<64|128>[p1])",
                                i, *config));
    if (*a != arch)
      continue;
    auto [it, fresh] = out.try_emplace(sig->str(), config->str());
    if (!fresh && it->second != *config)
      return fail(llvm::formatv("entry {0}: {1} on {2} is both {3} and {4}",
                                i, *sig, arch, it->second, *config));
  }
  return out;
}

} // namespace l4c
