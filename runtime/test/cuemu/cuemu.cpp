//===- cuemu.cpp - a CUDA driver that runs l4c's kernels on the host ------===//
//
// libl4cuemu.so exports the driver API symbols the CUDA backend binds
// (runtime/src/cuda/driver.cpp), so that with
//
//   L4C_CUDA_DRIVER=.../libl4cuemu.so L4C_CUDA_IMAGE=source l4-run ... --device=cuda
//
// the whole GPU path -- the backend, the session's uploads and downloads,
// decode graphs, and above all the generated kernels -- runs on a machine
// without a GPU. "Device" memory is host memory, each allocation between
// guard pages (a kernel touching past a region's end aborts, named); each
// module image is a kernel's CUDA source (L4C_CUDA_IMAGE=source), built
// with the host C++ compiler against shim.h into a shared library (all the
// modules a process loads before it asks for a function, in one library); a
// launch runs its blocks one after another, each block's CUDA threads as
// fibers (shim.h). Streams are synchronous; graphs record their launches
// with copies of the parameters and replay them.
//
// Tensor maps (cuTensorMapEncodeTiled) hold the emulator's own encoding, which
// shim.h's tmaLoad reads.
//
// Test-only and slow: for the tiny shapes of the golden cases. Modules are
// cached by source hash under $L4C_CUEMU_DIR (default: a directory in
// /tmp), so the same program is built once.
//
//===----------------------------------------------------------------------===//
#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <mutex>
#include <regex>
#include <string>
#include <vector>

#ifndef L4CUEMU_SHIM
#error "L4CUEMU_SHIM must name shim.h"
#endif
#ifndef L4CUEMU_CXX
#define L4CUEMU_CXX "c++"
#endif

namespace {

using CUresult = int;
constexpr CUresult OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2,
                   INVALID_IMAGE = 200, NOT_FOUND = 500, LAUNCH_FAILED = 719;

using PackFn = void *(*)(void **);
using RunFn = void (*)(void *, unsigned, unsigned, unsigned);
using FreeFn = void (*)(void *);

struct Module {
  std::string key;    // hash of source, shim and compiler: its cache name
  std::string source; // kept until built
  void *dl = nullptr;
  bool failed = false; // did not build
};
struct Function {
  PackFn pack;
  RunFn run;
  FreeFn free;
  std::string name; ///< the entry, for fault messages
};
struct Launch {
  Function *fn;
  void *packed;
  unsigned grid, block, smem;
};
struct Graph {
  std::vector<Launch> launches;
};
struct Stream {
  Graph *capture = nullptr;
};

std::mutex mu;

uint64_t fnv(const std::string &s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s)
    h = (h ^ c) * 0x100000001b3ull;
  return h;
}

std::string workDir() {
  const char *e = std::getenv("L4C_CUEMU_DIR");
  std::string d = e && *e ? e : "/tmp/l4cuemu-" + std::to_string(getuid());
  ::mkdir(d.c_str(), 0700);
  return d;
}

/// The generated source of module `key`, in a namespace of its own so
/// that many modules build as one translation unit, plus for each kernel
/// entry three C functions the driver calls: pack the parameters, run packed
/// parameters, free them (named after the module and the entry).
std::string withThunks(const std::string &key, const std::string &src) {
  static const std::regex entry(
      R"(extern "C" (__global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\())");
  std::string ns = "cuemu_" + key;
  std::string out = "namespace " + ns + " {\n#line 1 \"" + key + ".cu\"\n" +
                    std::regex_replace(src, entry, "$1") + "\n} // namespace " +
                    ns + "\n";
  for (auto it = std::sregex_iterator(src.begin(), src.end(), entry);
       it != std::sregex_iterator(); ++it) {
    std::string n = (*it)[2], f = ns + "::" + n, sym = key + "_" + n;
    out += "extern \"C\" void *cuemu_pack_" + sym +
           "(void **p) { return l4emu::packParams(" + f + ", p); }\n";
    out += "extern \"C\" void cuemu_run_" + sym +
           "(void *t, unsigned g, unsigned b, unsigned s) { "
           "l4emu::runPacked(" + f + ", t, g, b, s); }\n";
    out += "extern \"C\" void cuemu_free_" + sym +
           "(void *t) { l4emu::freePacked(" + f + ", t); }\n";
  }
  return out;
}

/// The -include argument: a copy of shim.h in the work directory with a
/// precompiled header beside it (parsing the shim took about half of a
/// small kernel's build), built once per shim and flags by whichever
/// process gets there first. Falls back to shim.h itself when the header
/// does not precompile; the compiler falls back to the text when the
/// precompiled one does not match the flags.
std::string precompiledShim(const std::string &dir, const std::string &shim,
                            const std::string &flags) {
  char key[32];
  std::snprintf(key, sizeof key, "%016llx",
                (unsigned long long)fnv(shim + L4CUEMU_CXX + flags));
  std::string h = dir + "/shim-" + key + ".h", gch = h + ".gch";
  struct stat st;
  if (::stat(gch.c_str(), &st) == 0)
    return h;
  std::string pid = std::to_string(getpid());
  std::string hTmp = h + "." + pid, gchTmp = gch + "." + pid;
  std::ofstream(hTmp) << shim;
  std::rename(hTmp.c_str(), h.c_str());
  std::string cmd = std::string(L4CUEMU_CXX) + " " + flags +
                    " -x c++-header -o " + gchTmp + " " + h + " > /dev/null 2>&1";
  if (std::system(cmd.c_str()) != 0) {
    std::remove(gchTmp.c_str());
    return L4CUEMU_SHIM;
  }
  std::rename(gchTmp.c_str(), gch.c_str());
  return h;
}

const std::string &shimText() {
  static const std::string shim = [] {
    std::ifstream f(L4CUEMU_SHIM);
    return std::string(std::istreambuf_iterator<char>(f), {});
  }();
  return shim;
}

/// How modules are compiled. A misaligned access (a 16-byte load from an
/// address that is not 16-byte aligned) works on the host but faults on a
/// GPU, so -fsanitize=alignment checks every typed access against its
/// type's alignment (the shim's vector types carry CUDA's) and the report
/// aborts the run, naming the kernel (onFault). $L4C_CUEMU_CXXFLAGS adds
/// flags (-fno-sanitize=alignment drops the check).
const std::string &moduleFlags() {
  static const std::string flags = [] {
    const char *extra = std::getenv("L4C_CUEMU_CXXFLAGS");
    return std::string("-std=c++20 -O1 -fPIC -w -fsanitize=alignment "
                       "-fno-sanitize-recover=alignment ") +
           (extra ? extra : "");
  }();
  return flags;
}

std::string hexKey(const std::string &s) {
  char key[32];
  std::snprintf(key, sizeof key, "%016llx", (unsigned long long)fnv(s));
  return key;
}

/// Compiles `modules` into one shared library at `so` (through a temporary
/// name, so a concurrent reader never sees half a library). On failure,
/// returns false; unless `quiet`, prints the compiler's messages and leaves
/// the source it compiled.
bool compile(const std::vector<Module *> &modules, const std::string &so,
             bool quiet) {
  std::string dir = workDir(), pid = std::to_string(getpid());
  std::string cu = so + "." + pid + ".cc", tmp = so + "." + pid,
              log = so + ".log";
  {
    std::ofstream f(cu);
    for (Module *m : modules)
      f << withThunks(m->key, m->source);
  }
  const std::string &flags = moduleFlags();
  std::string cmd = std::string(L4CUEMU_CXX) + " " + flags + " -shared -include " +
                    precompiledShim(dir, shimText(), flags) + " -o " + tmp +
                    " " + cu + " -lpthread > " + log + " 2>&1";
  if (std::system(cmd.c_str()) != 0) {
    std::remove(tmp.c_str());
    if (quiet) {
      std::remove(cu.c_str());
      std::remove(log.c_str());
      return false;
    }
    std::ifstream in(log);
    std::string messages(std::istreambuf_iterator<char>(in), {});
    std::fprintf(stderr, "cuemu: building %s failed:\n%s\n", cu.c_str(),
                 messages.substr(0, 4000).c_str());
    return false;
  }
  std::rename(tmp.c_str(), so.c_str());
  std::remove(cu.c_str());
  std::remove(log.c_str());
  return true;
}

std::vector<Module *> pending; // loaded, neither cached nor built yet

/// Opens the library holding module `m` (marking it failed if it cannot).
CUresult openLibrary(Module *m, const std::string &so) {
  m->dl = ::dlopen(so.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!m->dl) {
    std::fprintf(stderr, "cuemu: %s\n", ::dlerror());
    m->failed = true;
    return INVALID_IMAGE;
  }
  m->source = std::string();
  return OK;
}

/// Builds every pending module. The runtime loads all of a plan's modules
/// before it asks for a function, so they are built together: one compiler
/// run costs about half a second besides its code, and a plan has dozens.
/// Each module's cache entry is then a link to the shared library, so a
/// later process finds it module by module. If the batch does not compile,
/// each module is built alone, so that the error names the module at fault.
void buildPending() {
  std::vector<Module *> batch;
  batch.swap(pending);
  std::string dir = workDir();
  if (batch.size() > 1) {
    std::string keys;
    for (Module *m : batch)
      keys += m->key;
    std::string name = "batch-" + hexKey(keys) + ".so";
    if (compile(batch, dir + "/" + name, /*quiet=*/true)) {
      for (Module *m : batch) {
        std::string link = dir + "/" + m->key + ".so",
                    tmp = link + "." + std::to_string(getpid());
        std::remove(tmp.c_str());
        if (::symlink(name.c_str(), tmp.c_str()) == 0)
          std::rename(tmp.c_str(), link.c_str());
        openLibrary(m, dir + "/" + name);
      }
      return;
    }
  }
  for (Module *m : batch) {
    std::string so = dir + "/" + m->key + ".so";
    if (compile({m}, so, /*quiet=*/false))
      openLibrary(m, so);
    else
      m->failed = true;
  }
}

CUresult load(const char *image, Module *&out) {
  std::string src(image);
  if (src.find("__global__") == std::string::npos)
    return INVALID_IMAGE; // a cubin, or not ours
  // The key names the thunks' scheme too, so that libraries built with
  // other thunk names are not found.
  auto *m = new Module{hexKey("thunks v2" + src + shimText() + L4CUEMU_CXX +
                              moduleFlags()),
                       std::move(src)};
  std::string so = workDir() + "/" + m->key + ".so";
  struct stat st;
  if (::stat(so.c_str(), &st) == 0) { // follows a batch's link
    if (CUresult r = openLibrary(m, so); r != OK)
      return r;
  } else {
    pending.push_back(m);
  }
  out = m;
  return OK;
}

//===- Device memory: guard pages and faults --------------------------------===//
//
// Each allocation is its own mapping, ending at an inaccessible page (and
// starting after one), so a kernel that reads or writes past the end of a
// region faults at once instead of touching whatever the host heap holds
// there; the fault handler names the kernel and the allocation and aborts.
// Within a region nothing faults: l4-run --check-kernels covers that.

struct Allocation {
  uintptr_t map = 0, user = 0; ///< the mapping, and what cuMemAlloc returned
  size_t mapped = 0, bytes = 0;
};
std::vector<Allocation> allocations; // under mu
thread_local const Function *running = nullptr;

size_t pageSize() {
  static const size_t page = size_t(::sysconf(_SC_PAGESIZE));
  return page;
}

/// The emulated device's memory: $L4C_CUEMU_MEMORY bytes (a number with an
/// optional K, M or G suffix, powers of 1024), else the host's RAM. Past it
/// cuMemAlloc fails with CUDA_ERROR_OUT_OF_MEMORY, and cuMemGetInfo reports
/// what the live allocations leave free.
size_t deviceMemory() {
  static const size_t bytes = [] {
    if (const char *e = std::getenv("L4C_CUEMU_MEMORY"); e && *e) {
      char *end = nullptr;
      unsigned long long v = std::strtoull(e, &end, 10);
      int shift = *end == 'K' ? 10 : *end == 'M' ? 20 : *end == 'G' ? 30 : 0;
      return size_t(v) << shift;
    }
    return size_t(::sysconf(_SC_PHYS_PAGES)) * pageSize();
  }();
  return bytes;
}
size_t allocatedBytes() { // under mu
  size_t n = 0;
  for (const Allocation &a : allocations)
    n += a.bytes;
  return n;
}

/// Formats into a fixed buffer and writes to stderr (no allocation: this
/// runs in a signal handler).
void faultMessage(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void faultMessage(const char *fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  int n = std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (n > 0)
    (void)!::write(2, buf, std::min<size_t>(size_t(n), sizeof buf - 1));
}

volatile sig_atomic_t reported = 0; // onFault has named the kernel

void onFault(int sig, siginfo_t *info, void *) {
  uintptr_t at = reinterpret_cast<uintptr_t>(info->si_addr);
  const char *kernel = running ? running->name.c_str() : "(no kernel)";
  if (sig == SIGABRT) {
    // A sanitizer's report (printed above: a misaligned access is one the
    // GPU would fault on) or __trap; abort()s of our own have said more.
    if (running && !reported)
      faultMessage("cuemu: kernel %s aborted (the message above says why)\n",
                   kernel);
    std::signal(sig, SIG_DFL);
    ::raise(sig);
    return;
  }
  reported = 1;
  // Read without the lock: the faulting thread may hold it, and the
  // process ends here anyway.
  for (const Allocation &a : allocations) {
    if (at < a.map || at >= a.map + a.mapped)
      continue;
    if (at >= a.user + a.bytes)
      faultMessage("cuemu: kernel %s touched address 0x%llx, %llu bytes past "
                   "the end of the %llu-byte allocation at 0x%llx\n",
                   kernel, (unsigned long long)at,
                   (unsigned long long)(at - (a.user + a.bytes)),
                   (unsigned long long)a.bytes, (unsigned long long)a.user);
    else if (at < a.user)
      faultMessage("cuemu: kernel %s touched address 0x%llx, %llu bytes "
                   "before the %llu-byte allocation at 0x%llx\n",
                   kernel, (unsigned long long)at,
                   (unsigned long long)(a.user - at),
                   (unsigned long long)a.bytes, (unsigned long long)a.user);
    else
      continue;
    std::abort();
  }
  faultMessage("cuemu: %s at address 0x%llx in kernel %s\n",
               sig == SIGBUS ? "bus error" : "segmentation fault",
               (unsigned long long)at, kernel);
  std::signal(sig, SIG_DFL);
  ::raise(sig);
}

/// Installs onFault for SIGSEGV, SIGBUS and SIGABRT once, and gives the
/// calling thread an alternate signal stack (fibers' stacks are small).
void watchFaults() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_sigaction = onFault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGSEGV, &sa, nullptr);
    ::sigaction(SIGBUS, &sa, nullptr);
    ::sigaction(SIGABRT, &sa, nullptr);
  });
  thread_local bool stack = [] {
    static thread_local std::vector<char> alt(1 << 16);
    stack_t st{};
    st.ss_sp = alt.data();
    st.ss_size = alt.size();
    return ::sigaltstack(&st, nullptr) == 0;
  }();
  (void)stack;
}

void runLaunch(Function *f, void *packed, unsigned grid, unsigned block,
               unsigned smem) {
  watchFaults();
  running = f;
  f->run(packed, grid, block, smem);
  running = nullptr;
}

CUresult launch(Function *f, unsigned grid, unsigned block, unsigned smem,
                void **params, Stream *s) {
  void *packed = f->pack(params);
  if (s && s->capture) {
    s->capture->launches.push_back({f, packed, grid, block, smem});
    return OK;
  }
  runLaunch(f, packed, grid, block, smem);
  f->free(packed);
  return OK;
}

/// shim.h's l4emu::kTensorMapMagic and layout: word 0 the magic, 1 the
/// global address, 2 rank | element size << 8 | swizzle << 16 | data type
/// << 24, 3-7 dims, 8-11 the byte strides of dims 1-4, 12 box[0..3] (16 bits
/// each), 13 box[4].
constexpr unsigned long long kTensorMapMagic = 0x414d5475656d344cull;

/// Element bytes of CUtensorMapDataType UINT8 ... TFLOAT32_FTZ; the packed
/// 4- and 6-bit types (13-15) are not emulated.
unsigned tensorMapElemSize(int dtype) {
  static const unsigned sizes[] = {1, 2, 4, 4, 8, 8, 2, 4, 8, 2, 4, 4, 4};
  return dtype >= 0 && dtype < 13 ? sizes[dtype] : 0;
}

/// Says why a map the real driver might take is refused here.
CUresult notEmulated(const char *what) {
  std::fprintf(stderr, "cuemu: cuTensorMapEncodeTiled: %s is not emulated\n",
               what);
  return INVALID_VALUE;
}

double now() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

} // namespace

extern "C" {

CUresult cuInit(unsigned) { return OK; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return OK; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return OK; }
CUresult cuDeviceGet(int *d, int ordinal) {
  if (ordinal != 0)
    return INVALID_VALUE;
  *d = 0;
  return OK;
}
CUresult cuDeviceGetAttribute(int *v, int attrib, int) {
  switch (attrib) {
  case 1: *v = 1024; break;             // max threads per block
  case 16: *v = 2; break;               // multiprocessors
  case 75: *v = 9; break;               // compute capability 9.0
  case 76: *v = 0; break;
  case 97: *v = 227 * 1024; break;      // shared memory opt-in
  default: *v = 0;
  }
  return OK;
}
CUresult cuDeviceGetName(char *name, int len, int) {
  std::snprintf(name, size_t(len), "l4c cuemu (CUDA on host fibers)");
  return OK;
}
CUresult cuDevicePrimaryCtxRetain(void **ctx, int) {
  static int context;
  *ctx = &context;
  return OK;
}
CUresult cuDevicePrimaryCtxRelease_v2(int) { return OK; }
CUresult cuCtxSetCurrent(void *) { return OK; }
CUresult cuCtxSynchronize() { return OK; }
CUresult cuMemAlloc_v2(unsigned long long *p, size_t bytes) {
  if (bytes == 0)
    return INVALID_VALUE;
  // 256-byte aligned as the driver's, flush against a guard page.
  size_t page = pageSize(), rounded = (bytes + 255) / 256 * 256;
  size_t body = (rounded + page - 1) / page * page;
  if (body > SIZE_MAX - 2 * page)
    return OUT_OF_MEMORY;
  size_t mapped = body + 2 * page;
  void *m = ::mmap(nullptr, mapped, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED)
    return OUT_OF_MEMORY;
  char *base = static_cast<char *>(m);
  if (::mprotect(base + page, body, PROT_READ | PROT_WRITE) != 0) {
    ::munmap(m, mapped);
    return OUT_OF_MEMORY;
  }
  char *user = base + page + body - rounded;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (rounded > deviceMemory() - std::min(deviceMemory(), allocatedBytes())) {
      ::munmap(m, mapped);
      return OUT_OF_MEMORY;
    }
    allocations.push_back({uintptr_t(base), uintptr_t(user), mapped, rounded});
  }
  // Poisoned, as fresh device memory is not zero: a kernel reading what
  // nothing wrote gets NaNs, not a lucky 0.
  std::memset(user, 0xff, rounded);
  *p = reinterpret_cast<uintptr_t>(user);
  return OK;
}
CUresult cuMemGetInfo_v2(size_t *free, size_t *total) {
  std::lock_guard<std::mutex> lock(mu);
  *total = deviceMemory();
  *free = *total - std::min(*total, allocatedBytes());
  return OK;
}
CUresult cuMemFree_v2(unsigned long long p) {
  if (p == 0)
    return OK;
  std::lock_guard<std::mutex> lock(mu);
  for (size_t i = 0; i < allocations.size(); ++i)
    if (allocations[i].user == p) {
      ::munmap(reinterpret_cast<void *>(allocations[i].map),
               allocations[i].mapped);
      allocations.erase(allocations.begin() + long(i));
      return OK;
    }
  return INVALID_VALUE;
}
CUresult cuMemcpyHtoD_v2(unsigned long long d, const void *s, size_t n) {
  std::memcpy(reinterpret_cast<void *>(uintptr_t(d)), s, n);
  return OK;
}
CUresult cuMemcpyDtoH_v2(void *d, unsigned long long s, size_t n) {
  std::memcpy(d, reinterpret_cast<void *>(uintptr_t(s)), n);
  return OK;
}
CUresult cuMemcpyHtoDAsync_v2(unsigned long long d, const void *s, size_t n,
                              void *) {
  return cuMemcpyHtoD_v2(d, s, n);
}
CUresult cuMemcpyDtoHAsync_v2(void *d, unsigned long long s, size_t n, void *) {
  return cuMemcpyDtoH_v2(d, s, n);
}
CUresult cuMemsetD8_v2(unsigned long long d, unsigned char v, size_t n) {
  std::memset(reinterpret_cast<void *>(uintptr_t(d)), v, n);
  return OK;
}
CUresult cuMemsetD8Async(unsigned long long d, unsigned char v, size_t n,
                         void *) {
  return cuMemsetD8_v2(d, v, n);
}
CUresult cuModuleLoadData(Module **m, const void *image) {
  std::lock_guard<std::mutex> lock(mu);
  return load(static_cast<const char *>(image), *m);
}
CUresult cuModuleLoadDataEx(Module **m, const void *image, unsigned, int *,
                            void **) {
  return cuModuleLoadData(m, image);
}
CUresult cuModuleGetFunction(Function **f, Module *m, const char *name) {
  std::lock_guard<std::mutex> lock(mu);
  if (!m->dl && !m->failed)
    buildPending();
  if (!m->dl)
    return INVALID_IMAGE;
  std::string n = m->key + "_" + name;
  auto pack = reinterpret_cast<PackFn>(::dlsym(m->dl, ("cuemu_pack_" + n).c_str()));
  auto run = reinterpret_cast<RunFn>(::dlsym(m->dl, ("cuemu_run_" + n).c_str()));
  auto fr = reinterpret_cast<FreeFn>(::dlsym(m->dl, ("cuemu_free_" + n).c_str()));
  if (!pack || !run || !fr)
    return NOT_FOUND;
  *f = new Function{pack, run, fr, name};
  return OK;
}
CUresult cuModuleUnload(Module *) { return OK; } // libraries stay loaded
CUresult cuFuncSetAttribute(Function *, int, int) { return OK; }
// The code's registers and local and static shared memory are the host
// compiler's business here: reported as none, and any block size allowed.
CUresult cuFuncGetAttribute(int *v, int attrib, Function *f) {
  if (!f || !v)
    return INVALID_VALUE;
  *v = attrib == 0 ? 1024 : 0; // CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK
  return OK;
}
CUresult cuLaunchKernel(Function *f, unsigned gx, unsigned gy, unsigned gz,
                        unsigned bx, unsigned by, unsigned bz, unsigned smem,
                        Stream *s, void **params, void **extra) {
  if (!f || gy != 1 || gz != 1 || by != 1 || bz != 1 || extra || bx == 0 ||
      bx > 1024)
    return INVALID_VALUE;
  return launch(f, gx, bx, smem, params, s);
}
// cuLaunchKernelEx with cuda.h's CUlaunchConfig layout. Grids run one
// after another here, so programmatic stream serialization (attribute 6,
// the only one accepted) changes nothing but is checked for shape.
struct LaunchAttribute {
  int id;
  char pad[4];
  union {
    char bytes[64];
    int value;
  } v;
};
struct LaunchConfig {
  unsigned gx, gy, gz, bx, by, bz, smem;
  Stream *stream;
  LaunchAttribute *attrs;
  unsigned numAttrs;
};
CUresult cuLaunchKernelEx(const LaunchConfig *c, Function *f, void **params,
                          void **extra) {
  if (!c || (c->numAttrs && !c->attrs))
    return INVALID_VALUE;
  for (unsigned i = 0; i < c->numAttrs; ++i)
    if (c->attrs[i].id != 6 || (c->attrs[i].v.value != 0 && c->attrs[i].v.value != 1))
      return INVALID_VALUE;
  return cuLaunchKernel(f, c->gx, c->gy, c->gz, c->bx, c->by, c->bz, c->smem,
                        c->stream, params, extra);
}
CUresult cuStreamCreate(Stream **s, unsigned) {
  *s = new Stream;
  return OK;
}
CUresult cuStreamSynchronize(Stream *) { return OK; }
CUresult cuStreamDestroy_v2(Stream *s) {
  delete s;
  return OK;
}
CUresult cuStreamBeginCapture_v2(Stream *s, int) {
  if (!s || s->capture)
    return INVALID_VALUE;
  s->capture = new Graph;
  return OK;
}
CUresult cuStreamEndCapture(Stream *s, Graph **g) {
  if (!s || !s->capture)
    return INVALID_VALUE;
  *g = s->capture;
  s->capture = nullptr;
  return OK;
}
CUresult cuGraphInstantiateWithFlags(Graph **exec, Graph *g,
                                     unsigned long long) {
  // The executable graph keeps its own parameters: take the recorded ones
  // and leave the template empty.
  *exec = new Graph{std::move(g->launches)};
  g->launches.clear();
  return OK;
}
CUresult cuGraphLaunch(Graph *exec, Stream *) {
  for (Launch &l : exec->launches)
    runLaunch(l.fn, l.packed, l.grid, l.block, l.smem);
  return OK;
}
CUresult cuGraphExecDestroy(Graph *g) {
  for (Launch &l : g->launches)
    l.fn->free(l.packed);
  delete g;
  return OK;
}
CUresult cuGraphDestroy(Graph *g) { return cuGraphExecDestroy(g); }
CUresult cuGetErrorName(CUresult r, const char **name) {
  switch (r) {
  case OK: *name = "CUDA_SUCCESS"; break;
  case INVALID_VALUE: *name = "CUDA_ERROR_INVALID_VALUE"; break;
  case OUT_OF_MEMORY: *name = "CUDA_ERROR_OUT_OF_MEMORY"; break;
  case INVALID_IMAGE: *name = "CUDA_ERROR_INVALID_IMAGE"; break;
  case NOT_FOUND: *name = "CUDA_ERROR_NOT_FOUND"; break;
  case LAUNCH_FAILED: *name = "CUDA_ERROR_LAUNCH_FAILED"; break;
  default: return INVALID_VALUE;
  }
  return OK;
}
CUresult cuGetErrorString(CUresult r, const char **text) {
  *text = r == INVALID_IMAGE ? "cuemu: not a CUDA source it could build"
                             : "cuemu";
  return OK;
}
struct Event {
  double ms = 0;
};
CUresult cuEventCreate(Event **e, unsigned) {
  *e = new Event;
  return OK;
}
CUresult cuEventRecord(Event *e, Stream *) {
  e->ms = now();
  return OK;
}
CUresult cuEventSynchronize(Event *) { return OK; }
CUresult cuEventElapsedTime_v2(float *ms, Event *a, Event *b) {
  *ms = float(b->ms - a->ms);
  return OK;
}
CUresult cuEventDestroy_v2(Event *e) {
  delete e;
  return OK;
}

/// cuda.h's rules for a tiled map; CUDA_ERROR_INVALID_VALUE for what the
/// driver rejects and (with a message) for what tmaLoad does not emulate.
CUresult cuTensorMapEncodeTiled(void *map, int dtype, unsigned rank, void *addr,
                                const unsigned long long *dims,
                                const unsigned long long *strides,
                                const unsigned *box,
                                const unsigned *elemStrides, int interleave,
                                int swizzle, int l2, int oob) {
  auto *w = static_cast<unsigned long long *>(map);
  if (!w || reinterpret_cast<uintptr_t>(map) % 64 || rank < 1 || rank > 5 ||
      !addr || reinterpret_cast<uintptr_t>(addr) % 16 || !dims || !box ||
      !elemStrides || (rank > 1 && !strides) || interleave < 0 ||
      interleave > 2 || swizzle < 0 || swizzle > 6 || l2 < 0 || l2 > 3 ||
      oob < 0 || oob > 1 || dtype < 0 || dtype > 15)
    return INVALID_VALUE;
  unsigned elem = tensorMapElemSize(dtype);
  if (!elem)
    return notEmulated("a packed data type");
  if (interleave != 0)
    return notEmulated("an interleaved layout");
  if (swizzle > 3)
    return notEmulated("a 128B swizzle with 32B or 64B atoms");
  if (oob != 0)
    return notEmulated("the NaN out-of-bounds fill");
  for (unsigned i = 0; i < rank; ++i) {
    if (dims[i] == 0 || dims[i] > (1ull << 32) || box[i] == 0 || box[i] > 256 ||
        elemStrides[i] == 0 || elemStrides[i] > 8)
      return INVALID_VALUE;
    if (i + 1 < rank && (strides[i] % 16 || strides[i] >= (1ull << 40)))
      return INVALID_VALUE;
  }
  unsigned inner = box[0] * elem;
  if (inner % 16 || (swizzle != 0 && inner > (16u << swizzle)))
    return INVALID_VALUE;
  for (unsigned i = 0; i < rank; ++i)
    if (elemStrides[i] != 1)
      return notEmulated("an element stride other than 1");
  std::memset(w, 0, 128);
  w[0] = kTensorMapMagic;
  w[1] = reinterpret_cast<uintptr_t>(addr);
  w[2] = rank | elem << 8 | unsigned(swizzle) << 16 | unsigned(dtype) << 24;
  for (unsigned i = 0; i < rank; ++i) {
    w[3 + i] = dims[i];
    if (i + 1 < rank)
      w[8 + i] = strides[i];
    if (i < 4)
      w[12] |= (unsigned long long)box[i] << (16 * i);
    else
      w[13] = box[i];
  }
  return OK;
}

} // extern "C"
