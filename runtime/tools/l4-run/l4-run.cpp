//===- l4-run.cpp - run an l4c plan from the command line ----------------===//
//
// The reference I/O driver (input_ids in, logits or generated ids out, as
// safetensors), a human mode that generates from a text prompt over a byte
// vocabulary, and --info. Runs plans through the public C API.
//
//===----------------------------------------------------------------------===//
#include "io/safetensors.h"
#include "l4c/runtime/l4rt.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace {

const char *kUsage =
    "usage: l4-run --info PLAN\n"
    "       l4-run PLAN (--weights CKPT_DIR | --random-weights=SEED)\n"
    "              --inputs IN.safetensors --out OUT.safetensors "
    "[--max-new-tokens=G]\n"
    "              [--temperature=X] [--top-p=P] [--seed=N]\n"
    "       l4-run PLAN (--weights CKPT_DIR | --random-weights=SEED) --prompt "
    "TEXT\n"
    "              [--max-new-tokens=G] [--temperature=X] [--top-p=P] "
    "[--seed=N]\n"
    "IN holds input_ids (i64 [B, T]). OUT gets logits (f32 [B, T, V]) from a "
    "forward\n"
    "plan, and greedy_ids (i64 [B, T + G]) from a generate plan or when\n"
    "--max-new-tokens is given, sampled_ids instead when a sampling flag is "
    "given.\n"
    "For generate plans G defaults to 16, capped by the plan's max_seq.\n";

[[noreturn]] void die(const std::string &msg) {
  std::fprintf(stderr, "l4-run: error: %s\n", msg.c_str());
  std::exit(1);
}

[[noreturn]] void usage(const std::string &msg) {
  std::fprintf(stderr, "l4-run: error: %s\n%s", msg.c_str(), kUsage);
  std::exit(2);
}

void check(l4rt_status s) {
  if (s != L4RT_OK)
    die(l4rt_last_error());
}

struct Options {
  std::string plan, weights, inputs, out, prompt;
  bool info = false, hasPrompt = false;
  std::optional<uint64_t> randomSeed;
  std::optional<int64_t> maxNewTokens;
  std::optional<double> temperature, topP;
  std::optional<uint64_t> seed;
};

int64_t parseInt(const std::string &flag, const std::string &v) {
  char *end = nullptr;
  errno = 0;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end || errno)
    usage(flag + " expects an integer, got '" + v + "'");
  return x;
}

uint64_t parseSeed(const std::string &flag, const std::string &v) {
  char *end = nullptr;
  errno = 0;
  unsigned long long x = std::strtoull(v.c_str(), &end, 10);
  if (v.empty() || v[0] == '-' || *end || errno)
    usage(flag + " expects a non-negative integer, got '" + v + "'");
  return x;
}

double parseFloat(const std::string &flag, const std::string &v) {
  char *end = nullptr;
  double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end)
    usage(flag + " expects a number, got '" + v + "'");
  return x;
}

Options parseArgs(int argc, char **argv) {
  Options o;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (a.rfind("--", 0) != 0) {
      positional.push_back(a);
      continue;
    }
    // Both --flag=value and --flag value.
    std::string flag = a, value;
    bool inlineValue = false;
    if (size_t eq = a.find('='); eq != std::string::npos) {
      flag = a.substr(0, eq);
      value = a.substr(eq + 1);
      inlineValue = true;
    }
    auto take = [&]() -> std::string {
      if (inlineValue)
        return value;
      if (i + 1 >= argc)
        usage(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--info" && !inlineValue)
      o.info = true;
    else if (flag == "--weights")
      o.weights = take();
    else if (flag == "--random-weights")
      o.randomSeed = parseSeed(flag, take());
    else if (flag == "--inputs")
      o.inputs = take();
    else if (flag == "--out")
      o.out = take();
    else if (flag == "--prompt") {
      o.prompt = take();
      o.hasPrompt = true;
    } else if (flag == "--max-new-tokens")
      o.maxNewTokens = parseInt(flag, take());
    else if (flag == "--temperature")
      o.temperature = parseFloat(flag, take());
    else if (flag == "--top-p")
      o.topP = parseFloat(flag, take());
    else if (flag == "--seed")
      o.seed = parseSeed(flag, take());
    else
      usage("unknown option " + flag);
  }
  if (positional.size() != 1)
    usage(positional.empty() ? "no plan given" : "more than one plan given");
  o.plan = positional[0];
  if (o.info)
    return o;
  if (o.weights.empty() == !o.randomSeed)
    usage("give exactly one of --weights CKPT_DIR and --random-weights=SEED");
  if (o.hasPrompt == !o.inputs.empty() || (!o.inputs.empty() && o.out.empty()))
    usage("give either --inputs IN --out OUT or --prompt TEXT");
  if (o.hasPrompt && !o.out.empty())
    usage("--out goes with --inputs, not --prompt");
  if (o.maxNewTokens && *o.maxNewTokens < 0)
    usage("--max-new-tokens must not be negative");
  return o;
}

double mib(uint64_t bytes) { return double(bytes) / (1024.0 * 1024.0); }

void printInfo(const std::string &path, const l4rt_plan_summary &s) {
  std::printf("plan:          %s\n", path.c_str());
  std::printf("version:       %u\n", s.version);
  std::printf("program kind:  %s\n", s.program_kind);
  std::printf("target:        %s\n", s.target);
  std::printf("precision:     %s\n", s.precision);
  if (*s.model_source)
    std::printf("model:         %s\n", s.model_source);
  std::printf("max batch:     %lld\n", (long long)s.max_batch);
  std::printf("max seq:       %lld\n", (long long)s.max_seq);
  std::printf("vocab size:    %lld\n", (long long)s.vocab_size);
  auto region = [](const char *name, uint64_t bytes) {
    std::printf("%-14s %llu bytes (%.2f MiB)\n", name,
                (unsigned long long)bytes, mib(bytes));
  };
  region("arena:", s.arena_size);
  region("weights:", s.weights_size);
  region("cache:", s.cache_size);
  region("io:", s.io_size);
  std::printf("kernels:       %u\n", s.num_kernels);
  std::printf("buffers:       %u\n", s.num_buffers);
  std::printf("weights bound: %u\n", s.num_weights);
}

/// G: as asked, else 16 capped so the request fits the plan.
int64_t newTokens(const Options &o, const l4rt_plan_summary &s, int64_t T) {
  if (o.maxNewTokens)
    return *o.maxNewTokens;
  int64_t room = s.max_seq - T;
  return room < 16 ? (room > 0 ? room : 0) : 16;
}

std::optional<l4rt_sampling> sampling(const Options &o) {
  if (!o.temperature && !o.topP && !o.seed)
    return std::nullopt;
  l4rt_sampling s;
  s.temperature = float(o.temperature.value_or(1.0));
  s.top_p = float(o.topP.value_or(1.0));
  s.seed = o.seed.value_or(0);
  return s;
}

std::vector<int64_t> readInputIds(const std::string &path, int64_t &B,
                                  int64_t &T) {
  l4c::io::Checkpoint in;
  if (l4c::io::Status s = l4c::io::Checkpoint::open(path, in); !s.ok())
    die(s.error);
  l4c::io::Checkpoint::Entry e;
  if (!in.find("input_ids", e))
    die(path + ": no tensor 'input_ids'");
  const std::vector<int64_t> &shape = e.info->shape;
  if (shape.size() != 2 || shape[0] < 1 || shape[1] < 1)
    die(path + ": input_ids must be [B, T] with B, T >= 1");
  B = shape[0];
  T = shape[1];
  std::vector<int64_t> ids(size_t(B * T));
  if (l4c::io::Status s =
          in.read("input_ids", l4c::io::DType::I64, ids.data(), ids.size());
      !s.ok())
    die(s.error);
  return ids;
}

void printRate(const char *what, int64_t tokens, double secs) {
  if (tokens > 0 && secs > 0)
    std::printf("%s: %lld tokens in %.3f s (%.1f tokens/s)\n", what,
                (long long)tokens, secs, double(tokens) / secs);
}

int runPrompt(const Options &o, l4rt_session session,
              const l4rt_plan_summary &s) {
  if (s.vocab_size < 256)
    die("--prompt needs a byte vocabulary (vocab_size >= 256); this plan has " +
        std::to_string(s.vocab_size));
  if (o.prompt.empty())
    die("--prompt is empty");
  std::vector<int64_t> ids(o.prompt.begin(), o.prompt.end());
  for (int64_t &id : ids)
    id = int64_t(uint8_t(id));
  int64_t T = int64_t(ids.size());
  int64_t G = newTokens(o, s, T);
  std::vector<int64_t> out(size_t(T + G));
  int64_t len = 0;
  std::optional<l4rt_sampling> smp = sampling(o);
  check(l4rt_generate(session, ids.data(), 1, T, G, smp ? &*smp : nullptr,
                      out.data(), &len));
  std::printf("ids:");
  for (int64_t i = T; i < len; ++i)
    std::printf(" %lld", (long long)out[size_t(i)]);
  std::printf("\ntext: ");
  // Generated ids above 255 are not bytes; show every non-printable as \xNN.
  for (int64_t i = 0; i < len; ++i) {
    int64_t id = out[size_t(i)];
    if (id >= 32 && id < 127)
      std::putchar(int(id));
    else if (id == '\n')
      std::fputs("\\n", stdout);
    else if (id < 256)
      std::printf("\\x%02llx", (long long)id);
    else
      std::printf("<%lld>", (long long)id);
  }
  std::putchar('\n');
  l4rt_timing t;
  check(l4rt_session_timing(session, &t));
  printRate("prefill", t.prefill_tokens, t.prefill_seconds);
  printRate("decode", t.decode_tokens, t.decode_seconds);
  return 0;
}

int runFiles(const Options &o, l4rt_session session,
             const l4rt_plan_summary &s) {
  int64_t B = 0, T = 0;
  std::vector<int64_t> ids = readInputIds(o.inputs, B, T);
  std::optional<l4rt_sampling> smp = sampling(o);
  std::vector<l4c::io::TensorRef> tensors;
  std::vector<float> logits;
  std::vector<int64_t> out;
  bool forward = std::string(s.program_kind) == "forward";
  if (forward) {
    logits.resize(size_t(B * T * s.vocab_size));
    check(l4rt_forward(session, ids.data(), B, T, logits.data()));
    tensors.push_back(
        {"logits", l4c::io::DType::F32, {B, T, s.vocab_size}, logits.data()});
  }
  // A forward plan generates too when asked (re-running the whole prefix
  // per token); a generate plan always does.
  if (!forward || (o.maxNewTokens && *o.maxNewTokens > 0)) {
    int64_t G = newTokens(o, s, T);
    out.resize(size_t(B * (T + G)));
    int64_t len = 0;
    check(l4rt_generate(session, ids.data(), B, T, G, smp ? &*smp : nullptr,
                        out.data(), &len));
    tensors.push_back({smp ? "sampled_ids" : "greedy_ids",
                       l4c::io::DType::I64,
                       {B, len},
                       out.data()});
  }
  std::map<std::string, std::string> meta = {{"plan", o.plan}};
  if (l4c::io::Status st = l4c::io::writeSafetensors(o.out, tensors, meta);
      !st.ok())
    die(st.error);
  return 0;
}

} // namespace

int main(int argc, char **argv) {
  Options o = parseArgs(argc, argv);
  l4rt_plan plan = nullptr;
  check(l4rt_plan_load(o.plan.c_str(), &plan));
  l4rt_plan_summary s;
  check(l4rt_plan_info(plan, &s));
  if (o.info) {
    printInfo(o.plan, s);
    l4rt_plan_free(plan);
    return 0;
  }
  l4rt_session session = nullptr;
  check(l4rt_session_create(plan, o.randomSeed ? nullptr : o.weights.c_str(),
                            o.randomSeed.value_or(0), &session));
  int rc = o.hasPrompt ? runPrompt(o, session, s) : runFiles(o, session, s);
  l4rt_session_free(session);
  l4rt_plan_free(plan);
  return rc;
}
