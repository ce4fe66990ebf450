//===- l4-run.cpp - run an l4c plan from the command line ----------------===//
//
// The reference I/O driver (input_ids in, logits or generated ids out, as
// safetensors), a human mode that generates from a text prompt over a byte
// vocabulary, --info, and for train plans the reference step and a training
// loop (train.cpp). Runs plans through the public C API.
//
//===----------------------------------------------------------------------===//
#include "l4-run.h"
#include "io/safetensors.h"
#include "l4c/runtime/l4rt.h"
#include "../json_text.h"
#include "../seeded_ids.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace {

const char *kUsage =
    "usage: l4-run --info [--kernels] [--device=cuda|cuda:N] PLAN\n"
    "       l4-run PLAN (--weights CKPT_DIR | --random-weights=SEED)\n"
    "              --inputs IN.safetensors --out OUT.safetensors "
    "[--max-new-tokens=G]\n"
    "              [--temperature=X] [--top-p=P] [--seed=N]\n"
    "       l4-run PLAN (--weights CKPT_DIR | --random-weights=SEED) --prompt "
    "TEXT\n"
    "              [--max-new-tokens=G] [--temperature=X] [--top-p=P] "
    "[--seed=N]\n"
    "       l4-run TRAIN_PLAN --weights CKPT_DIR --inputs IN.safetensors --out "
    "OUT.safetensors\n"
    "              [--adamw=lr=..,beta1=..,beta2=..,eps=..,weight_decay=..]\n"
    "       l4-run TRAIN_PLAN (--weights CKPT_DIR | --random-weights=SEED | "
    "--resume DIR)\n"
    "              --train-data FILE [--data-format=bytes|tokens] --steps N\n"
    "              [--batch B] [--seq T] [--grad-accum K] [--adamw=...]\n"
    "              [--save DIR] [--save-every K] [--log FILE]\n"
    "       l4-run PLAN --device=cuda (--weights CKPT_DIR | "
    "--random-weights=SEED)\n"
    "              --inputs IN.safetensors --check-kernels[=TOL]\n"
    "              [--kernel-tol=NAME=TOL ...]   (kernels named *NAME*)\n"
    "       l4-run PLAN (--weights CKPT_DIR | --random-weights=SEED) --bench\n"
    "              [--batch B] [--seq P] [--max-new-tokens G] [--repeats R]\n"
    "              [--profile] [--profile-json=FILE]   (a train plan:\n"
    "              --batch B --seq T, one training step with AdamW per "
    "repeat)\n"
    "Every mode takes --device=cpu|cuda|cuda:N (default cpu; cuda needs a "
    "plan\n"
    "compiled with --target=cuda).\n"
    "--profile (cuda): after the bench, every kernel's GPU time (CUDA events\n"
    "between launches, medians of R runs) for the forward pass, or the "
    "prefill\n"
    "and one decode step, slowest first, and the time per kernel kind.\n"
    "--profile-json=FILE also writes every kernel's time to FILE as JSON.\n"
    "--info --kernels also lists each program's kernels in launch order: kind,\n"
    "fused ops, tile configuration and, for CUDA plans, the compiled grid.\n"
    "--info --device=cuda loads every kernel on the device and checks it\n"
    "against the device's limits, and compares the memory the plan needs\n"
    "with the device's free memory (\"fits: yes|no\"), allocating none of it;\n"
    "it fails only where a kernel does not load. With --kernels each kernel's\n"
    "registers, local memory (spills) and static shared memory are listed.\n"
    "IN holds input_ids (i64 [B, T]). OUT gets logits (f32 [B, T, V]) from a "
    "forward\n"
    "plan, and greedy_ids (i64 [B, T + G]) from a generate plan or when\n"
    "--max-new-tokens is given, sampled_ids instead when a sampling flag is "
    "given.\n"
    "For generate plans G defaults to 16, capped by the plan's max_seq.\n"
    "From a train plan OUT gets loss (f32 scalar), grad.<name> for every "
    "parameter\n"
    "and adamw.<name>, the parameter after one AdamW step (defaults lr=1e-3,\n"
    "beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, as torch).\n"
    "--steps N trains until AdamW has taken N steps in all (a resumed run "
    "counts\n"
    "the steps of its checkpoint); see docs/training.md.\n";

} // namespace

namespace l4run {

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

l4rt_adamw adamwOf(const Options &o) {
  if (o.adamw)
    return *o.adamw;
  l4rt_adamw h;
  l4rt_adamw_defaults(&h);
  return h;
}

} // namespace l4run

namespace {

using namespace l4run;

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

/// "lr=..,beta1=..,beta2=..,eps=..,weight_decay=.."; keys left out keep
/// torch's defaults.
l4rt_adamw parseAdamW(const std::string &spec) {
  l4rt_adamw h;
  l4rt_adamw_defaults(&h);
  size_t at = 0;
  while (at <= spec.size()) {
    size_t comma = spec.find(',', at);
    std::string item = spec.substr(
        at, comma == std::string::npos ? std::string::npos : comma - at);
    size_t eq = item.find('=');
    if (eq == std::string::npos)
      usage("--adamw expects key=value items, got '" + item + "'");
    std::string key = item.substr(0, eq), val = item.substr(eq + 1);
    double x = parseFloat("--adamw " + key, val);
    if (key == "lr")
      h.lr = x;
    else if (key == "beta1")
      h.beta1 = x;
    else if (key == "beta2")
      h.beta2 = x;
    else if (key == "eps")
      h.eps = x;
    else if (key == "weight_decay")
      h.weight_decay = x;
    else
      usage("--adamw: unknown key '" + key +
            "' (expected lr, beta1, beta2, eps, weight_decay)");
    if (comma == std::string::npos)
      break;
    at = comma + 1;
  }
  return h;
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
    else if (flag == "--kernels" && !inlineValue)
      o.kernels = true;
    else if (flag == "--weights")
      o.weights = take();
    else if (flag == "--random-weights")
      o.randomSeed = parseSeed(flag, take());
    else if (flag == "--bench" && !inlineValue)
      o.bench = true;
    else if (flag == "--profile" && !inlineValue)
      o.profile = true;
    else if (flag == "--profile-json") {
      o.profileJson = take();
      if (o.profileJson.empty())
        usage("--profile-json needs a file name");
      o.profile = true;
    }
    else if (flag == "--repeats")
      o.repeats = parseInt(flag, take());
    else if (flag == "--check-kernels")
      o.checkKernels = inlineValue ? parseFloat(flag, value) : 1e-3;
    else if (flag == "--kernel-tol") {
      std::string v = take();
      size_t eq = v.rfind('=');
      if (eq == std::string::npos || eq == 0)
        usage("--kernel-tol takes NAME=TOL");
      o.kernelTols.emplace_back(v.substr(0, eq),
                                parseFloat(flag, v.substr(eq + 1)));
    }
    else if (flag == "--device")
      o.device = take();
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
    else if (flag == "--adamw")
      o.adamw = parseAdamW(take());
    else if (flag == "--train-data")
      o.trainData = take();
    else if (flag == "--data-format")
      o.dataFormat = take();
    else if (flag == "--steps")
      o.steps = parseInt(flag, take());
    else if (flag == "--batch")
      o.batch = parseInt(flag, take());
    else if (flag == "--seq")
      o.seq = parseInt(flag, take());
    else if (flag == "--grad-accum")
      o.gradAccum = parseInt(flag, take());
    else if (flag == "--save")
      o.save = take();
    else if (flag == "--save-every")
      o.saveEvery = parseInt(flag, take());
    else if (flag == "--resume")
      o.resume = take();
    else if (flag == "--log")
      o.log = take();
    else
      usage("unknown option " + flag);
  }
  if (positional.size() != 1)
    usage(positional.empty() ? "no plan given" : "more than one plan given");
  o.plan = positional[0];
  if (o.kernels && !o.info)
    usage("--kernels goes with --info");
  if (o.info)
    return o;
  if (!o.kernelTols.empty() && !o.checkKernels)
    usage("--kernel-tol goes with --check-kernels");
  bool training = !o.trainData.empty();
  int sources = !o.weights.empty() + bool(o.randomSeed) + !o.resume.empty();
  if (!o.resume.empty() && !training)
    usage("--resume goes with --train-data");
  if (sources != 1)
    usage(training ? "give exactly one of --weights CKPT_DIR, "
                     "--random-weights=SEED and --resume DIR"
                   : "give exactly one of --weights CKPT_DIR and "
                     "--random-weights=SEED");
  if (training) {
    if (!o.inputs.empty() || !o.out.empty() || o.hasPrompt)
      usage("--train-data does not go with --inputs, --out or --prompt");
    if (!o.steps)
      usage("--train-data needs --steps N");
    if (*o.steps < 1)
      usage("--steps must be at least 1");
    if (o.dataFormat != "bytes" && o.dataFormat != "tokens")
      usage("--data-format must be bytes or tokens, not '" + o.dataFormat +
            "'");
    if ((o.batch && *o.batch < 1) || (o.seq && *o.seq < 2) || o.gradAccum < 1)
      usage("--batch and --grad-accum must be at least 1, --seq at least 2");
    if (o.saveEvery && (*o.saveEvery < 1 || o.save.empty()))
      usage("--save-every K needs K >= 1 and --save DIR");
    return o;
  }
  if (o.bench) {
    if (!o.inputs.empty() || !o.out.empty() || o.hasPrompt || o.checkKernels)
      usage("--bench does not go with --inputs, --out, --prompt or "
            "--check-kernels");
    if ((o.batch && *o.batch < 1) || (o.seq && *o.seq < 1) || o.repeats < 1)
      usage("--batch, --seq and --repeats must be at least 1");
    if (o.maxNewTokens && *o.maxNewTokens < 1)
      usage("--max-new-tokens must be at least 1 with --bench");
    if (o.profile && o.device.rfind("cuda", 0) != 0)
      usage("--profile times GPU kernels: give --device=cuda");
    return o;
  }
  if (o.profile)
    usage("--profile and --profile-json go with --bench");
  for (const auto &[given, flag] : {std::pair{o.steps.has_value(), "--steps"},
                                    {o.batch.has_value(), "--batch"},
                                    {o.seq.has_value(), "--seq"},
                                    {o.gradAccum != 1, "--grad-accum"},
                                    {!o.save.empty(), "--save"},
                                    {o.saveEvery.has_value(), "--save-every"},
                                    {!o.log.empty(), "--log"}})
    if (given)
      usage(std::string(flag) + " goes with --train-data");
  if (o.checkKernels) {
    if (o.inputs.empty() || o.hasPrompt || !o.out.empty())
      usage("--check-kernels takes --inputs IN (and no --out or --prompt)");
    if (o.device == "cpu")
      usage("--check-kernels compares a GPU with the cpu: give --device=cuda");
    return o;
  }
  if (o.hasPrompt == !o.inputs.empty() || (!o.inputs.empty() && o.out.empty()))
    usage("give either --inputs IN --out OUT or --prompt TEXT");
  if (o.hasPrompt && !o.out.empty())
    usage("--out goes with --inputs, not --prompt");
  if (o.maxNewTokens && *o.maxNewTokens < 0)
    usage("--max-new-tokens must not be negative");
  return o;
}

double mib(uint64_t bytes) { return double(bytes) / (1024.0 * 1024.0); }
std::string human(uint64_t bytes) {
  char buf[32];
  if (bytes >= (uint64_t(1) << 30))
    std::snprintf(buf, sizeof buf, "%.2f GiB", double(bytes) / double(1 << 30));
  else
    std::snprintf(buf, sizeof buf, "%.2f MiB", mib(bytes));
  return buf;
}

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

/// --info --device=cuda: the device's verdict on the plan (l4rt_device_probe).
void printDevice(const l4rt_device_report &r, const std::string &device) {
  std::printf("device:        %s, %s (%s, %d SMs)\n", device.c_str(),
              r.device_name, r.arch, r.multiprocessors);
  std::printf("device memory: %s free of %s\n", human(r.free_bytes).c_str(),
              human(r.total_bytes).c_str());
  std::printf("plan needs:    %llu bytes = %s (%s)\n",
              (unsigned long long)r.need_bytes, human(r.need_bytes).c_str(),
              r.need_detail);
  std::printf("fits:          %s\n", r.fits ? "yes" : "no");
  std::printf("loaded:        %u kernels, %u modules (%u as the plan has "
              "them, %u compiled here)\n",
              r.kernels, r.modules, r.modules_from_plan, r.modules_compiled);
  if (r.max_registers > 0)
    std::printf("registers:     at most %d a thread (%s)\n", r.max_registers,
                r.max_registers_kernel);
  if (r.local_memory_kernels)
    std::printf("local memory:  %u kernels, at most %llu bytes a thread\n",
                r.local_memory_kernels, (unsigned long long)r.max_local_bytes);
  else
    std::printf("local memory:  none\n");
}

/// --info --kernels: each program's kernels in launch order, then how many
/// tuning candidates the plan carries (l4c --tune-candidates).
void printKernels(l4rt_plan plan, const l4rt_plan_summary &s,
                  const l4rt_kernel_code *code) {
  bool cuda = std::string(s.target).rfind("cuda", 0) == 0;
  uint32_t numPrograms = 0;
  check(l4rt_plan_num_programs(plan, &numPrograms));
  std::vector<l4rt_kernel_info> kernels(s.num_kernels);
  size_t nameWidth = 6, kindWidth = 4, configWidth = 6;
  uint32_t candidates = 0;
  for (uint32_t i = 0; i < s.num_kernels; ++i) {
    check(l4rt_plan_kernel(plan, i, &kernels[i]));
    const l4rt_kernel_info &k = kernels[i];
    nameWidth = std::max(nameWidth, std::strlen(k.name));
    kindWidth = std::max(kindWidth, std::strlen(k.kind));
    configWidth = std::max(configWidth, std::strlen(k.tile_config));
    candidates += k.alternative_of >= 0;
  }
  for (uint32_t p = 0; p < numPrograms; ++p) {
    l4rt_program_info prog;
    check(l4rt_plan_program(plan, p, &prog));
    std::printf("\nprogram %s: %u kernel launches\n", prog.name,
                prog.num_steps);
    // The config column is the last one of a cpu plan: no padding there.
    int configPad = cuda ? int(configWidth) : 0;
    std::printf("  %4s %5s  %-*s  %-*s %4s  %-*s", "step", "index",
                int(nameWidth), "kernel", int(kindWidth), "kind", "ops",
                configPad, "config");
    if (cuda)
      std::printf("  %8s %7s %8s %4s %5s", "blocks", "threads", "dyn.smem",
                  "tma", "wait");
    if (code) // as the device's driver reports each kernel's code
      std::printf("  %4s %5s %6s", "regs", "local", "s.smem");
    std::printf("\n");
    for (uint32_t step = 0; step < prog.num_steps; ++step) {
      const l4rt_kernel_info &k = kernels[prog.steps[step]];
      std::printf("  %4u %5u  %-*s  %-*s %4u  %-*s", step, prog.steps[step],
                  int(nameWidth), k.name, int(kindWidth), k.kind, k.num_ops,
                  configPad, *k.tile_config ? k.tile_config : "-");
      if (cuda)
        std::printf("  %8u %7u %8u %4u %5s", k.blocks, k.threads,
                    k.shared_bytes, k.num_tensor_maps,
                    k.grid_wait ? "yes" : "no");
      if (code) {
        const l4rt_kernel_code &c = code[prog.steps[step]];
        std::printf("  %4d %5d %6d", c.registers, c.local_bytes,
                    c.static_shared);
      }
      std::printf("\n");
    }
  }
  if (candidates)
    std::printf("\ntuning candidates: %u kernels that no program runs "
                "(l4-tune times them)\n",
                candidates);
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

/// `s` as a JSON string literal.
std::string jsonString(const std::string &s) {
  return "\"" + l4c::tools::jsonEscape(s) + "\"";
}

/// The JSON object of one profiled program, every kernel in launch order.
std::string profileJson(const char *program, int64_t B, int64_t T,
                        int64_t repeats,
                        const std::vector<l4rt_kernel_time> &v) {
  std::string j = "{\"program\": " + jsonString(program) +
                  ", \"batch\": " + std::to_string(B) +
                  ", \"length\": " + std::to_string(T) +
                  ", \"repeats\": " + std::to_string(repeats) +
                  ", \"kernels\": [";
  for (size_t i = 0; i < v.size(); ++i) {
    char ms[32];
    std::snprintf(ms, sizeof ms, "%.6f", v[i].ms);
    j += std::string(i ? ",\n    " : "\n    ") + "{\"kernel\": " +
         std::to_string(v[i].kernel) + ", \"name\": " +
         jsonString(v[i].name) + ", \"kind\": " + jsonString(v[i].kind) +
         ", \"ms\": " + ms + "}";
  }
  return j + "]}";
}

/// --profile-json: the programs' objects into FILE, whole or not at all
/// (a temporary file renamed over it).
void writeProfileJson(const Options &o, const std::vector<std::string> &progs) {
  if (o.profileJson.empty())
    return;
  std::string text = "{\"plan\": " + jsonString(o.plan) + ", \"programs\": [";
  for (size_t i = 0; i < progs.size(); ++i)
    text += (i ? ",\n  " : "\n  ") + progs[i];
  text += "]}\n";
  if (l4c::io::Status st = l4c::io::writeFileAtomic(o.profileJson, text);
      !st.ok())
    die(st.error);
}

/// --profile: each kernel's GPU time in one program, slowest first, then
/// the sum per kernel kind; returns the program's JSON (writeProfileJson).
std::string printProfile(l4rt_session session, const char *program,
                         const std::vector<int64_t> &ids, int64_t B, int64_t T,
                         int64_t pos0, int64_t repeats) {
  const l4rt_kernel_time *times = nullptr;
  size_t n = 0;
  check(l4rt_profile_kernels(session, program, ids.data(), B, T, pos0, repeats,
                             &times, &n));
  std::vector<l4rt_kernel_time> v(times, times + n);
  std::string json = profileJson(program, B, T, repeats, v);
  double total = 0;
  std::map<std::string, std::pair<double, int>> kinds;
  for (const l4rt_kernel_time &t : v) {
    total += t.ms;
    kinds[t.kind].first += t.ms;
    kinds[t.kind].second += 1;
  }
  std::stable_sort(v.begin(), v.end(),
                   [](const l4rt_kernel_time &a, const l4rt_kernel_time &b) {
                     return a.ms > b.ms;
                   });
  std::printf("profile: %s batch=%lld length=%lld: %zu kernels, %.3f ms of "
              "GPU time (medians of %lld runs)\n",
              program, (long long)B, (long long)T, n, total,
              (long long)repeats);
  size_t shown = std::min<size_t>(v.size(), 25);
  for (size_t i = 0; i < shown; ++i)
    std::printf("  %9.4f ms %5.1f%%  %-10s #%-4u %s\n", v[i].ms,
                total > 0 ? 100 * v[i].ms / total : 0.0, v[i].kind,
                v[i].kernel, v[i].name);
  if (shown < v.size())
    std::printf("  ... %zu more\n", v.size() - shown);
  for (const auto &[kind, sum] : kinds)
    std::printf("  kind %-10s %4d kernels %9.4f ms %5.1f%%\n", kind.c_str(),
                sum.second, sum.first, total > 0 ? 100 * sum.first / total : 0.0);
  return json;
}

/// --bench: times the plan on seeded random ids [B, P] (a forward pass, or
/// a prefill of P tokens and G - 1 decode steps), once to warm up and then
/// R times; prints every repeat and the medians. Wall-clock times of whole
/// calls, so a GPU's are end to end: uploads, launches, the logits' download
/// and the host's token choice.
int runBench(const Options &o, l4rt_session session,
             const l4rt_plan_summary &s);

/// --bench of a train plan: one training step (forward, backward, the
/// gradient sum and AdamW, all on the session's device) on seeded random
/// ids [B, T], once to warm up and then R times; wall-clock medians. The
/// loss comes back to the host every step, which waits for the step.
int runTrainBench(const Options &o, l4rt_session session,
                  const l4rt_plan_summary &s) {
  int64_t B = o.batch.value_or(1);
  int64_t T = o.seq.value_or(s.max_seq);
  if (B > s.max_batch || T > s.max_seq || T < 2)
    die(o.plan + ": --bench of batch " + std::to_string(B) + " x " +
        std::to_string(T) + " tokens does not fit the plan (max batch " +
        std::to_string(s.max_batch) + ", max seq " + std::to_string(s.max_seq) +
        "; a step needs 2 tokens)");
  if (o.maxNewTokens)
    die("--max-new-tokens does not go with a train plan's --bench");
  std::vector<int64_t> ids =
      l4c::tools::seededIds(size_t(B * T), s.vocab_size);
  l4rt_adamw hyper;
  l4rt_adamw_defaults(&hyper);
  std::vector<double> ms;
  for (int64_t r = 0; r <= o.repeats; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    float loss = 0;
    check(l4rt_train_step(session, ids.data(), B, T, &loss));
    check(l4rt_adamw_step(session, &hyper));
    // A device AdamW may still run when this returns; the next step's loss
    // waits for it, so in the steady state each repeat is one whole step.
    double t = std::chrono::duration<double, std::milli>(
                   std::chrono::steady_clock::now() - t0)
                   .count();
    if (r == 0)
      continue; // warm-up: module loads
    ms.push_back(t);
    std::printf("repeat %lld: train step %.3f ms, loss %.4f\n", (long long)r, t,
                double(loss));
  }
  std::sort(ms.begin(), ms.end());
  size_t n = ms.size();
  double med = n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
  std::printf("bench: train batch=%lld seq=%lld repeats=%lld "
              "train_step_ms=%.3f train_tokens_per_s=%.1f (medians)\n",
              (long long)B, (long long)T, (long long)o.repeats, med,
              med > 0 ? 1e3 * double(B * T) / med : 0.0);
  if (o.profile)
    writeProfileJson(
        o, {printProfile(session, "train_step", ids, B, T, 0, o.repeats)});
  return 0;
}

int runBench(const Options &o, l4rt_session session,
             const l4rt_plan_summary &s) {
  bool forward = std::string(s.program_kind) == "forward";
  int64_t B = o.batch.value_or(1);
  int64_t P = o.seq.value_or(std::max<int64_t>(1, std::min<int64_t>(
                                                      128, s.max_seq / 2)));
  int64_t G = forward ? 0 : o.maxNewTokens.value_or(std::min<int64_t>(
                                32, std::max<int64_t>(1, s.max_seq - P)));
  if (B > s.max_batch || P + G > s.max_seq)
    die(o.plan + ": --bench of batch " + std::to_string(B) + " x " +
        std::to_string(P) + " + " + std::to_string(G) +
        " tokens does not fit the plan (max batch " +
        std::to_string(s.max_batch) + ", max seq " + std::to_string(s.max_seq) +
        ")");
  std::vector<int64_t> ids =
      l4c::tools::seededIds(size_t(B * P), s.vocab_size);
  std::vector<float> logits(forward ? size_t(B * P * s.vocab_size) : 0);
  std::vector<int64_t> out(size_t(B * (P + G)));
  std::vector<double> prefill, decode;
  for (int64_t r = 0; r <= o.repeats; ++r) {
    int64_t len = 0;
    if (forward)
      check(l4rt_forward(session, ids.data(), B, P, logits.data()));
    else
      check(l4rt_generate(session, ids.data(), B, P, G, nullptr, out.data(),
                          &len));
    l4rt_timing t;
    check(l4rt_session_timing(session, &t));
    double pre = t.prefill_seconds * 1e3;
    double dec = G > 1 ? t.decode_seconds * 1e3 / double(G - 1) : 0;
    if (r == 0)
      continue; // warm-up: module loads, graph captures
    prefill.push_back(pre);
    decode.push_back(dec);
    std::printf("repeat %lld: %s %.3f ms", (long long)r,
                forward ? "forward" : "prefill", pre);
    if (G > 1)
      std::printf(", decode %.3f ms/step (%.1f tokens/s)", dec,
                  dec > 0 ? 1e3 * double(B) / dec : 0.0);
    std::printf("\n");
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  };
  double pre = median(prefill), dec = median(decode);
  std::printf("bench: %s batch=%lld prompt=%lld new=%lld repeats=%lld "
              "%s_ms=%.3f prefill_tokens_per_s=%.1f",
              forward ? "forward" : "generate", (long long)B, (long long)P,
              (long long)G, (long long)o.repeats,
              forward ? "forward" : "prefill", pre,
              pre > 0 ? 1e3 * double(B * P) / pre : 0.0);
  if (G > 1)
    std::printf(" decode_ms_per_step=%.3f decode_tokens_per_s=%.1f", dec,
                dec > 0 ? 1e3 * double(B) / dec : 0.0);
  std::printf(" (medians)\n");
  if (o.profile) {
    std::vector<std::string> progs;
    if (forward) {
      progs.push_back(printProfile(session, "forward", ids, B, P, 0, o.repeats));
    } else {
      progs.push_back(printProfile(session, "prefill", ids, B, P, 0, o.repeats));
      // One decode step after the prompt: the last prompt token again.
      std::vector<int64_t> last;
      for (int64_t b = 0; b < B; ++b)
        last.push_back(ids[size_t(b * P + P - 1)]);
      progs.push_back(printProfile(session, "decode", last, B, 1, P, o.repeats));
    }
    writeProfileJson(o, progs);
  }
  return 0;
}

/// --check-kernels: every kernel on the GPU against the CPU backend, on
/// the inputs' ids (forward), or prefill then one decode step (generate).
int runCheckKernels(const Options &o, l4rt_session session,
                    const l4rt_plan_summary &s) {
  int64_t B = 0, T = 0;
  std::vector<int64_t> ids = readInputIds(o.inputs, B, T);
  struct Row {
    l4rt_kernel_check c;
    std::string name, program, buffer, strayAt;
  };
  std::vector<Row> rows;
  auto runOne = [&](const char *program, const int64_t *x, int64_t t,
                    int64_t pos0) {
    const l4rt_kernel_check *checks = nullptr;
    size_t n = 0;
    check(l4rt_check_kernels(session, program, x, B, t, pos0, &checks, &n));
    for (size_t i = 0; i < n; ++i)
      rows.push_back({checks[i], checks[i].name, checks[i].program,
                      checks[i].buffer, checks[i].stray_at});
  };
  if (std::string(s.program_kind) == "forward") {
    runOne("forward", ids.data(), T, 0);
  } else if (std::string(s.program_kind) == "train") {
    runOne("train_step", ids.data(), T, 0);
  } else {
    runOne("prefill", ids.data(), T, 0);
    std::vector<int64_t> next(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b)
      next[size_t(b)] = ids[size_t(b * T)];
    if (T < s.max_seq)
      runOne("decode", next.data(), 1, T);
  }
  auto rel = [](const l4rt_kernel_check &c) {
    return c.max_abs_ref > 0 ? c.max_abs_err / c.max_abs_ref
                             : (c.max_abs_err > 0 ? 1e30 : 0.0);
  };
  // A kernel's limit: the first --kernel-tol whose NAME it contains, else
  // --check-kernels'.
  auto limitOf = [&](const Row &r) -> std::pair<double, int> {
    for (size_t i = 0; i < o.kernelTols.size(); ++i)
      if (r.name.find(o.kernelTols[i].first) != std::string::npos)
        return {o.kernelTols[i].second, int(i)};
    return {*o.checkKernels, -1};
  };
  auto bad = [&](const Row &r) {
    return r.c.integer ? r.c.mismatches > 0 : !(rel(r.c) <= limitOf(r).first);
  };
  std::vector<size_t> order(rows.size());
  for (size_t i = 0; i < order.size(); ++i)
    order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return rel(rows[a].c) > rel(rows[b].c);
  });
  size_t over = 0, elements = 0, stray = 0;
  std::vector<double> worstOf(o.kernelTols.size(), 0.0);
  std::vector<size_t> countOf(o.kernelTols.size(), 0), overOf(countOf);
  for (const Row &r : rows) {
    over += bad(r);
    elements += r.c.elements;
    stray += r.c.stray_bytes > 0;
    if (int i = limitOf(r).second; i >= 0) {
      worstOf[size_t(i)] = std::max(worstOf[size_t(i)], rel(r.c));
      ++countOf[size_t(i)];
      overOf[size_t(i)] += bad(r);
    }
  }
  std::printf("%-8s %-5s %-48s %-10s %-10s %s\n", "program", "#", "kernel",
              "rel err", "max |ref|", "result");
  size_t shown = 0;
  for (size_t i : order) {
    const Row &r = rows[i];
    if (shown >= 12 && !bad(r))
      break;
    ++shown;
    std::printf("%-8s %-5u %-48s %-10.2e %-10.2e %s%s\n", r.program.c_str(),
                r.c.kernel, r.name.c_str(), rel(r.c), r.c.max_abs_ref,
                r.buffer.c_str(),
                r.c.integer ? (" (" + std::to_string(r.c.mismatches) +
                               " ints differ)")
                                  .c_str()
                            : "");
  }
  for (const Row &r : rows)
    if (r.c.stray_bytes)
      std::printf("check-kernels: %s kernel %u %s changed %llu bytes outside "
                  "its results, the first at %s\n",
                  r.program.c_str(), r.c.kernel, r.name.c_str(),
                  static_cast<unsigned long long>(r.c.stray_bytes),
                  r.strayAt.c_str());
  // A NAME no kernel has checks nothing: that fails too.
  size_t unmatched = 0;
  for (size_t i = 0; i < o.kernelTols.size(); ++i)
    unmatched += countOf[i] == 0;
  for (size_t i = 0; i < o.kernelTols.size(); ++i)
    std::printf("check-kernels: %zu kernels named *%s*, worst rel err %.2e, "
                "%zu above %.1e: %s\n",
                countOf[i], o.kernelTols[i].first.c_str(), worstOf[i],
                overOf[i], o.kernelTols[i].second,
                countOf[i] == 0 ? "none matched" : overOf[i] ? "FAIL" : "ok");
  double worst = order.empty() ? 0 : rel(rows[order[0]].c);
  std::printf("check-kernels: %zu kernels, %zu result elements, %zu wrote "
              "outside their results, worst rel err %.2e, %zu above %.1e: "
              "%s\n",
              rows.size(), elements, stray, worst, over, *o.checkKernels,
              over || unmatched || stray ? "FAIL" : "ok");
  return over || unmatched || stray ? 1 : 0;
}

} // namespace

int main(int argc, char **argv) {
  Options o = parseArgs(argc, argv);
  l4rt_plan plan = nullptr;
  check(l4rt_plan_load(o.plan.c_str(), &plan));
  l4rt_plan_summary s;
  check(l4rt_plan_info(plan, &s));
  if (o.info) {
    // The device first: a probe that fails prints nothing but its error.
    l4rt_device_report r{};
    bool device = o.device != "cpu";
    if (device)
      check(l4rt_device_probe(plan, o.device.c_str(), &r));
    printInfo(o.plan, s);
    if (o.kernels)
      printKernels(plan, s, device ? r.code : nullptr);
    if (device)
      printDevice(r, o.device);
    l4rt_plan_free(plan);
    return 0;
  }
  bool train = std::string(s.program_kind) == "train";
  if (!o.trainData.empty() && !train)
    die(o.plan + ": --train-data needs a train plan (this one is " +
        s.program_kind + "; compile with --program=train)");
  if (train && o.hasPrompt)
    die(o.plan + ": a train plan cannot generate; compile a generate plan "
                 "for --prompt");
  if (!train && o.adamw)
    die(o.plan + ": --adamw needs a train plan (this one is " + s.program_kind +
        ")");
  if (!o.trainData.empty()) {
    int rc = runTraining(o, plan, s);
    l4rt_plan_free(plan);
    return rc;
  }
  l4rt_session session = nullptr;
  l4rt_session_options so = l4rt_session_options_default();
  so.weights_dir = o.randomSeed ? nullptr : o.weights.c_str();
  so.random_seed = o.randomSeed.value_or(0);
  so.device = o.device.c_str();
  check(l4rt_session_create_with(plan, &so, &session));
  if (o.device != "cpu")
    std::fprintf(stderr, "l4-run: device %s\n", l4rt_session_device(session));
  int rc = o.bench && train ? runTrainBench(o, session, s)
           : o.bench        ? runBench(o, session, s)
           : o.checkKernels ? runCheckKernels(o, session, s)
           : o.hasPrompt    ? runPrompt(o, session, s)
           : train          ? runTrainFiles(o, session)
                            : runFiles(o, session, s);
  l4rt_session_free(session);
  l4rt_plan_free(plan);
  return rc;
}
