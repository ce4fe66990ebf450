//===- nvrtc.cpp - NVRTC loaded at run time -------------------------------===//
//
// The NVRTC and nvJitLink entry points l4c uses, declared here with their C
// ABI (no CUDA headers) and resolved once from the first library that loads.
//
//===----------------------------------------------------------------------===//
#include "cuda/nvrtc.h"

#include <dlfcn.h>
#include <glob.h>

#include <algorithm>
#include <mutex>

namespace l4c::nvrtc {

namespace {

// Both libraries return C enums (int sized) with 0 for success.
using Result = int;
constexpr Result kSuccess = 0;
using Program = struct _nvrtcProgram *;
using LinkHandle = struct nvJitLink *;
constexpr int kLinkInputCubin = 1; // NVJITLINK_INPUT_CUBIN

struct NvrtcApi {
  Result (*createProgram)(Program *, const char *, const char *, int,
                          const char *const *, const char *const *);
  Result (*compileProgram)(Program, int, const char *const *);
  Result (*getCUBINSize)(Program, size_t *);
  Result (*getCUBIN)(Program, char *);
  Result (*getPTXSize)(Program, size_t *);
  Result (*getPTX)(Program, char *);
  Result (*getProgramLogSize)(Program, size_t *);
  Result (*getProgramLog)(Program, char *);
  Result (*destroyProgram)(Program *);
  Result (*version)(int *, int *);
  const char *(*getErrorString)(Result);
};

struct LinkApi {
  Result (*create)(LinkHandle *, uint32_t, const char **);
  Result (*destroy)(LinkHandle *);
  Result (*addData)(LinkHandle, int, const void *, size_t, const char *);
  Result (*complete)(LinkHandle);
  Result (*getLinkedCubinSize)(LinkHandle, size_t *);
  Result (*getLinkedCubin)(LinkHandle, void *);
  Result (*getErrorLogSize)(LinkHandle, size_t *);
  Result (*getErrorLog)(LinkHandle, char *);
};

template <typename Api> struct Library {
  Api api{};
  std::string error;
  std::string version;
};

// Sonames first (the loader's search path, LD_LIBRARY_PATH), then the
// toolkit's usual home, since CUDA's lib64 is often not on the search path.
std::vector<std::string> candidates(const std::string &stem,
                                    const std::string &soname) {
  std::vector<std::string> names = {soname, stem + ".so"};
  for (std::string dir : {"/usr/local/cuda/lib64/",
                          "/usr/local/cuda/targets/x86_64-linux/lib/"}) {
    glob_t g;
    if (glob((dir + stem + ".so*").c_str(), 0, nullptr, &g) == 0) {
      std::vector<std::string> found(g.gl_pathv, g.gl_pathv + g.gl_pathc);
      // libX.so.13 before libX.so.13.0.88: the soname is what the toolkit
      // promises.
      std::sort(found.begin(), found.end(),
                [](const std::string &a, const std::string &b) {
                  return a.size() < b.size() || (a.size() == b.size() && a < b);
                });
      names.insert(names.end(), found.begin(), found.end());
    }
    globfree(&g);
  }
  return names;
}

void *openFirst(const std::vector<std::string> &names, std::string &tried) {
  for (const std::string &name : names) {
    if (void *handle = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL))
      return handle;
    const char *why = dlerror();
    tried += "\n  " + name + ": " + (why ? why : "not loadable");
  }
  return nullptr;
}

/// Binds `fn` to the first of `syms` the library has; records the first
/// missing symbol in `missing`.
template <typename F>
void bind(void *handle, std::initializer_list<const char *> syms, F &fn,
          std::string &missing) {
  fn = nullptr;
  for (const char *sym : syms)
    if ((fn = reinterpret_cast<F>(dlsym(handle, sym))))
      return;
  if (missing.empty())
    missing = *syms.begin();
}

Library<NvrtcApi> loadNvrtc() {
  Library<NvrtcApi> lib;
  std::string tried;
  void *h = openFirst(candidates("libnvrtc", "libnvrtc.so.13"), tried);
  if (!h) {
    lib.error = "NVRTC not found: tried" + tried;
    return lib;
  }
  NvrtcApi &a = lib.api;
  std::string missing;
  bind(h, {"nvrtcCreateProgram"}, a.createProgram, missing);
  bind(h, {"nvrtcCompileProgram"}, a.compileProgram, missing);
  bind(h, {"nvrtcGetCUBINSize"}, a.getCUBINSize, missing);
  bind(h, {"nvrtcGetCUBIN"}, a.getCUBIN, missing);
  bind(h, {"nvrtcGetPTXSize"}, a.getPTXSize, missing);
  bind(h, {"nvrtcGetPTX"}, a.getPTX, missing);
  bind(h, {"nvrtcGetProgramLogSize"}, a.getProgramLogSize, missing);
  bind(h, {"nvrtcGetProgramLog"}, a.getProgramLog, missing);
  bind(h, {"nvrtcDestroyProgram"}, a.destroyProgram, missing);
  bind(h, {"nvrtcVersion"}, a.version, missing);
  bind(h, {"nvrtcGetErrorString"}, a.getErrorString, missing);
  if (!missing.empty()) {
    lib.error = "NVRTC unusable: the library has no symbol " + missing;
    return lib;
  }
  int major = 0, minor = 0;
  if (a.version(&major, &minor) != kSuccess) {
    lib.error = "NVRTC unusable: nvrtcVersion failed";
    return lib;
  }
  lib.version = std::to_string(major) + "." + std::to_string(minor);
  return lib; // the handle stays open for the life of the process
}

Library<LinkApi> loadLinker() {
  Library<LinkApi> lib;
  std::string tried;
  void *h = openFirst(candidates("libnvJitLink", "libnvJitLink.so.13"), tried);
  if (!h) {
    lib.error = "nvJitLink not found: tried" + tried;
    return lib;
  }
  // The header maps each call onto a versioned symbol; older libraries
  // export only the plain names.
  LinkApi &a = lib.api;
  std::string missing;
  bind(h, {"__nvJitLinkCreate_13_0", "nvJitLinkCreate"}, a.create, missing);
  bind(h, {"__nvJitLinkDestroy_13_0", "nvJitLinkDestroy"}, a.destroy, missing);
  bind(h, {"__nvJitLinkAddData_13_0", "nvJitLinkAddData"}, a.addData, missing);
  bind(h, {"__nvJitLinkComplete_13_0", "nvJitLinkComplete"}, a.complete,
       missing);
  bind(h, {"__nvJitLinkGetLinkedCubinSize_13_0", "nvJitLinkGetLinkedCubinSize"},
       a.getLinkedCubinSize, missing);
  bind(h, {"__nvJitLinkGetLinkedCubin_13_0", "nvJitLinkGetLinkedCubin"},
       a.getLinkedCubin, missing);
  bind(h, {"__nvJitLinkGetErrorLogSize_13_0", "nvJitLinkGetErrorLogSize"},
       a.getErrorLogSize, missing);
  bind(h, {"__nvJitLinkGetErrorLog_13_0", "nvJitLinkGetErrorLog"},
       a.getErrorLog, missing);
  if (!missing.empty())
    lib.error = "nvJitLink unusable: the library has no symbol " + missing;
  return lib;
}

const Library<NvrtcApi> &nvrtcLibrary() {
  static std::once_flag once;
  static Library<NvrtcApi> lib;
  std::call_once(once, [] { lib = loadNvrtc(); });
  return lib;
}

const Library<LinkApi> &linkLibrary() {
  static std::once_flag once;
  static Library<LinkApi> lib;
  std::call_once(once, [] { lib = loadLinker(); });
  return lib;
}

std::vector<std::string> baseOptions(std::string_view arch, Linking linking) {
  std::vector<std::string> opts = {"--gpu-architecture=" + std::string(arch),
                                   "--std=c++17"};
  if (linking == Linking::Separate)
    opts.push_back("--relocatable-device-code=true");
  return opts;
}

void trimNuls(std::string &s) {
  while (!s.empty() && (s.back() == '\0' || s.back() == '\n'))
    s.pop_back();
}

/// Links one relocatable cubin into a loadable one.
std::string link(const std::vector<uint8_t> &relocatable,
                 const std::string &name, std::string_view arch,
                 std::vector<uint8_t> &cubin, std::string &log) {
  const LinkApi &a = linkLibrary().api;
  std::string archOpt = "-arch=" + std::string(arch);
  const char *opts[] = {archOpt.c_str()};
  LinkHandle h = nullptr;
  if (a.create(&h, 1, opts) != kSuccess)
    return "nvJitLink could not start a link for '" + name + "'";
  std::string error;
  if (a.addData(h, kLinkInputCubin, relocatable.data(), relocatable.size(),
                name.c_str()) != kSuccess ||
      a.complete(h) != kSuccess) {
    error = "nvJitLink failed to link '" + name + "'";
    size_t size = 0;
    if (a.getErrorLogSize(h, &size) == kSuccess && size > 1) {
      std::string linkLog(size, '\0');
      if (a.getErrorLog(h, linkLog.data()) == kSuccess) {
        trimNuls(linkLog);
        log += (log.empty() ? "" : "\n") + linkLog;
      }
    }
  } else {
    size_t size = 0;
    if (a.getLinkedCubinSize(h, &size) != kSuccess || size == 0) {
      error = "nvJitLink produced no cubin for '" + name + "'";
    } else {
      cubin.resize(size);
      if (a.getLinkedCubin(h, cubin.data()) != kSuccess)
        error = "nvJitLink could not return the cubin of '" + name + "'";
    }
  }
  a.destroy(&h);
  return error;
}

} // namespace

const std::string &loadError() { return nvrtcLibrary().error; }

const std::string &linkerLoadError() { return linkLibrary().error; }

std::string version() { return nvrtcLibrary().version; }

std::string defaultOptions(std::string_view arch, Linking linking) {
  std::string s;
  for (const std::string &o : baseOptions(arch, linking))
    s += (s.empty() ? "" : " ") + o;
  return s;
}

std::string compile(std::string_view source, const std::string &name,
                    std::string_view arch,
                    const std::vector<std::string> &extraOptions, Output &out,
                    Linking linking, bool wantPtx) {
  const Library<NvrtcApi> &lib = nvrtcLibrary();
  if (!lib.error.empty())
    return lib.error;
  if (linking == Linking::Separate && !linkLibrary().error.empty())
    linking = Linking::WholeProgram;
  const NvrtcApi &a = lib.api;
  out = Output();
  out.linking = linking;
  std::string src(source); // NVRTC wants a NUL-terminated copy
  Program prog = nullptr;
  Result r =
      a.createProgram(&prog, src.c_str(), name.c_str(), 0, nullptr, nullptr);
  if (r != kSuccess)
    return "NVRTC could not create program '" + name +
           "': " + a.getErrorString(r);

  std::vector<std::string> opts = baseOptions(arch, linking);
  opts.insert(opts.end(), extraOptions.begin(), extraOptions.end());
  std::vector<const char *> argv;
  for (const std::string &o : opts)
    argv.push_back(o.c_str());
  Result compiled = a.compileProgram(prog, int(argv.size()), argv.data());

  size_t logSize = 0;
  if (a.getProgramLogSize(prog, &logSize) == kSuccess && logSize > 1) {
    out.log.resize(logSize);
    if (a.getProgramLog(prog, out.log.data()) != kSuccess)
      out.log.clear();
    trimNuls(out.log);
  }

  std::string error;
  std::vector<uint8_t> cubin;
  if (compiled != kSuccess) {
    error = "NVRTC failed to compile '" + name + "' for " + std::string(arch) +
            ": " + a.getErrorString(compiled);
  } else {
    size_t size = 0;
    if ((r = a.getCUBINSize(prog, &size)) != kSuccess || size == 0) {
      error = "NVRTC produced no cubin for '" + name + "' (is '" +
              std::string(arch) + "' a real architecture such as sm_90a?)";
    } else {
      cubin.resize(size);
      if ((r = a.getCUBIN(prog, reinterpret_cast<char *>(cubin.data()))) !=
          kSuccess)
        error = "NVRTC could not return the cubin of '" + name +
                "': " + a.getErrorString(r);
    }
    if (error.empty() && wantPtx && linking == Linking::WholeProgram) {
      size = 0;
      if (a.getPTXSize(prog, &size) == kSuccess && size > 1) {
        out.ptx.resize(size);
        if (a.getPTX(prog, out.ptx.data()) != kSuccess)
          out.ptx.clear();
        trimNuls(out.ptx);
      }
    }
  }
  a.destroyProgram(&prog);
  if (!error.empty())
    return error;
  if (linking == Linking::WholeProgram) {
    out.cubin = std::move(cubin);
    return error;
  }
  return link(cubin, name, arch, out.cubin, out.log);
}

} // namespace l4c::nvrtc
