//===- l4-tune.cpp - time a plan's tile configurations on the GPU ---------===//
//
// l4-tune runs a plan compiled with `l4c compile --target=cuda
// --tune-candidates` on the GPU: at every tunable kernel it times the
// kernel's own tile configuration and each candidate from the same inputs
// (the plan's program on seeded random ids), checks each candidate's
// results against the kernel's, and writes a tuning file with the fastest
// configuration per kernel signature and arch (times summed over the
// kernels sharing a signature: identical layers). `l4c compile
// --tuning=FILE` then generates those kernels that way; the format is in
// include/l4c/Plan/Tuning.h. Runs through the public C API.
//
//===----------------------------------------------------------------------===//
#include "io/safetensors.h"
#include "l4c/runtime/l4rt.h"
#include "../json_text.h"
#include "../seeded_ids.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace {

const char *kUsage =
    "usage: l4-tune PLAN (--weights CKPT_DIR | --random-weights=SEED) -o "
    "TUNING.json\n"
    "               [--device=cuda|cuda:N] [--program=NAME] [--batch B] "
    "[--seq T]\n"
    "               [--repeats R] [--tolerance X] [--skip-mismatches]\n"
    "PLAN: compiled with `l4c compile --target=cuda --tune-candidates`.\n"
    "Runs PROGRAM (default: forward, prefill or train_step by the plan's "
    "kind) on\n"
    "seeded random ids [B, T] (default: the plan's max batch and max seq) "
    "and at\n"
    "each tunable kernel times every tile configuration (median of R runs, "
    "default\n"
    "20); a configuration whose results differ from the kernel's by more "
    "than X\n"
    "(default 2e-2) of their largest value is a failure (exit 1, nothing "
    "written);\n"
    "with --skip-mismatches it is reported and left out of the choice "
    "instead.\n"
    "Writes, per kernel signature, the configuration with the least time "
    "summed\n"
    "over the kernels that share it; give the file to `l4c compile "
    "--tuning=FILE`.\n";

[[noreturn]] void die(const std::string &msg) {
  std::fprintf(stderr, "l4-tune: error: %s\n", msg.c_str());
  std::exit(1);
}

[[noreturn]] void usage(const std::string &msg) {
  std::fprintf(stderr, "l4-tune: error: %s\n%s", msg.c_str(), kUsage);
  std::exit(2);
}

void check(l4rt_status s) {
  if (s != L4RT_OK)
    die(l4rt_last_error());
}

struct Options {
  std::string plan, weights, out, device = "cuda", program;
  std::optional<uint64_t> randomSeed;
  std::optional<int64_t> batch, seq;
  int64_t repeats = 20;
  double tolerance = 2e-2;
  bool skipMismatches = false;
};

int64_t parseInt(const std::string &flag, const std::string &v, int64_t min) {
  char *end = nullptr;
  errno = 0;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end || errno || x < min)
    usage(flag + " takes an integer >= " + std::to_string(min) + ", got '" +
          v + "'");
  return x;
}

Options parseArgs(int argc, char **argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i], flag = a, value;
    bool inlineValue = false;
    if (a.rfind("--", 0) == 0 && a.find('=') != std::string::npos) {
      flag = a.substr(0, a.find('='));
      value = a.substr(a.find('=') + 1);
      inlineValue = true;
    }
    auto next = [&]() -> std::string {
      if (inlineValue)
        return value;
      if (i + 1 >= argc)
        usage(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--help" || flag == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (flag == "--weights") {
      o.weights = next();
    } else if (flag == "--random-weights") {
      o.randomSeed = uint64_t(parseInt(flag, next(), 0));
    } else if (flag == "-o") {
      o.out = next();
    } else if (flag == "--device") {
      o.device = next();
    } else if (flag == "--program") {
      o.program = next();
    } else if (flag == "--batch") {
      o.batch = parseInt(flag, next(), 1);
    } else if (flag == "--seq") {
      o.seq = parseInt(flag, next(), 1);
    } else if (flag == "--repeats") {
      o.repeats = parseInt(flag, next(), 1);
    } else if (flag == "--tolerance") {
      std::string v = next();
      char *end = nullptr;
      o.tolerance = std::strtod(v.c_str(), &end);
      if (v.empty() || *end || !(o.tolerance >= 0))
        usage("--tolerance takes a number >= 0, got '" + v + "'");
    } else if (a == "--skip-mismatches") {
      o.skipMismatches = true;
    } else if (a.rfind("-", 0) == 0) {
      usage("unknown flag '" + a + "'");
    } else if (o.plan.empty()) {
      o.plan = a;
    } else {
      usage("more than one plan: '" + o.plan + "' and '" + a + "'");
    }
  }
  if (o.plan.empty())
    usage("no plan given");
  if (o.out.empty())
    usage("give -o TUNING.json, the tuning file to write");
  if (o.weights.empty() == !o.randomSeed)
    usage("give exactly one of --weights and --random-weights");
  if (o.device.rfind("cuda", 0) != 0)
    usage("l4-tune times GPU kernels: --device must be cuda or cuda:N");
  return o;
}

using l4c::tools::jsonEscape;

} // namespace

int main(int argc, char **argv) {
  Options o = parseArgs(argc, argv);
  l4rt_plan plan = nullptr;
  check(l4rt_plan_load(o.plan.c_str(), &plan));
  l4rt_plan_summary s;
  check(l4rt_plan_info(plan, &s));
  std::string target = s.target;
  if (target.rfind("cuda:", 0) != 0)
    die(o.plan + ": a " + target + " plan; compile with --target=cuda "
                 "--tune-candidates");
  std::string arch = target.substr(5);
  std::string kind = s.program_kind;
  std::string program = !o.program.empty() ? o.program
                        : kind == "train"  ? "train_step"
                        : kind == "generate" ? "prefill"
                                             : "forward";
  int64_t B = o.batch.value_or(s.max_batch), T = o.seq.value_or(s.max_seq);
  if (B > s.max_batch || T > s.max_seq)
    die(o.plan + ": batch " + std::to_string(B) + " x " + std::to_string(T) +
        " tokens does not fit the plan (max batch " +
        std::to_string(s.max_batch) + ", max seq " + std::to_string(s.max_seq) +
        ")");
  l4rt_session_options so = l4rt_session_options_default();
  so.weights_dir = o.randomSeed ? nullptr : o.weights.c_str();
  so.random_seed = o.randomSeed.value_or(0);
  so.device = o.device.c_str();
  l4rt_session session = nullptr;
  check(l4rt_session_create_with(plan, &so, &session));
  std::string device = l4rt_session_device(session);
  std::fprintf(stderr, "l4-tune: device %s\n", device.c_str());

  std::vector<int64_t> ids =
      l4c::tools::seededIds(size_t(B * T), s.vocab_size);
  const l4rt_kernel_tuning *rows = nullptr;
  size_t n = 0;
  check(l4rt_tune_kernels(session, program.c_str(), ids.data(), B, T, 0,
                          o.repeats, &rows, &n));
  if (n == 0)
    die(o.plan + ": no kernel of " + program +
        " has tuning candidates (compile with --tune-candidates; bf16 GEMMs "
        "on tensor cores and the routed experts' decode kernels have tile "
        "configurations)");

  // Per signature: each configuration's time summed over its kernels, the
  // default's configuration, and a kernel name to show.
  struct Sig {
    std::string kernel, defaultConfig;
    int kernels = 0;
    std::map<std::string, double> ms;
    std::set<std::string> mismatched; ///< never chosen
  };
  std::map<std::string, Sig> sigs;
  std::vector<std::string> order;
  int failures = 0;
  std::printf("l4-tune: %s on %s, %s batch=%lld length=%lld, medians of "
              "%lld runs\n",
              o.plan.c_str(), device.c_str(), program.c_str(), (long long)B,
              (long long)T, (long long)o.repeats);
  std::printf("  %-9s %10s %8s %9s  %s\n", "config", "ms", "vs own",
              "rel err", "kernel");
  double own = 0;
  for (size_t i = 0; i < n; ++i) {
    const l4rt_kernel_tuning &r = rows[i];
    bool isOwn = r.kernel == r.of;
    if (isOwn)
      own = r.ms;
    double rel = r.max_abs_ref > 0 ? r.max_abs_err / r.max_abs_ref
                                   : (r.max_abs_err > 0 ? INFINITY : 0.0);
    bool bad = !(rel <= o.tolerance);
    failures += bad;
    std::printf("  %-9s %10.4f %7.2fx %9.2e  %s%s\n", r.config, r.ms,
                r.ms > 0 ? own / r.ms : 0.0, rel, isOwn ? "#" : "  candidate of #",
                (std::to_string(r.of) + " " + r.name + (bad ? "  MISMATCH" : ""))
                    .c_str());
    auto [it, fresh] = sigs.try_emplace(r.signature);
    if (fresh)
      order.push_back(r.signature);
    Sig &sg = it->second;
    if (isOwn) {
      sg.kernels += 1;
      sg.defaultConfig = r.config;
      if (sg.kernel.empty())
        sg.kernel = r.name;
    }
    sg.ms[r.config] += r.ms;
    if (bad)
      sg.mismatched.insert(r.config);
  }
  if (failures && o.skipMismatches) {
    std::fprintf(stderr,
                 "l4-tune: warning: %d configuration(s) disagree with their "
                 "kernel beyond %.1e; left out of the choice\n",
                 failures, o.tolerance);
  } else if (failures) {
    std::fprintf(stderr,
                 "l4-tune: error: %d configuration(s) disagree with their "
                 "kernel beyond %.1e; %s not written\n",
                 failures, o.tolerance, o.out.c_str());
    return 1;
  }
  std::string json = "{\n  \"format\": \"l4c-tuning\",\n  \"version\": 1,\n"
                     "  \"entries\": [";
  double before = 0, after = 0;
  int changed = 0;
  for (size_t i = 0; i < order.size(); ++i) {
    const Sig &sg = sigs[order[i]];
    std::string best = sg.defaultConfig;
    for (const auto &[config, ms] : sg.ms)
      if (ms < sg.ms.at(best) && !sg.mismatched.count(config))
        best = config;
    before += sg.ms.at(sg.defaultConfig);
    after += sg.ms.at(best);
    changed += best != sg.defaultConfig;
    char line[512];
    std::snprintf(line, sizeof line,
                  "%s\n    {\"arch\": \"%s\", \"signature\": \"%s\", "
                  "\"config\": \"%s\", \"ms\": %.6g, \"default_ms\": %.6g, "
                  "\"kernels\": %d, ",
                  i ? "," : "", jsonEscape(arch).c_str(),
                  jsonEscape(order[i]).c_str(), best.c_str(), sg.ms.at(best),
                  sg.ms.at(sg.defaultConfig), sg.kernels);
    json += line;
    json += "\"kernel\": \"" + jsonEscape(sg.kernel) + "\", \"device\": \"" +
            jsonEscape(device) + "\"}";
  }
  json += "\n  ]\n}\n";
  if (l4c::io::Status st = l4c::io::writeFileAtomic(o.out, json); !st.ok())
    die(st.error);
  std::printf("l4-tune: %zu signatures, %d changed; tunable kernels %.4f ms "
              "-> %.4f ms (%.2fx); wrote %s\n",
              order.size(), changed, before, after,
              after > 0 ? before / after : 0.0, o.out.c_str());
  l4rt_session_free(session);
  l4rt_plan_free(plan);
  return 0;
}
