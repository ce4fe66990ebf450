//===- train_loop.cpp - l4-run on train plans ----------------------------===//
//
// The reference training step (input_ids in; loss, gradients and one AdamW
// step out, as the golden tests compare them) and a training loop over a
// token file with gradient accumulation, logging and resumable checkpoints.
//
//===----------------------------------------------------------------------===//
#include "io/safetensors.h"
#include "l4-run.h"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include <unistd.h>

namespace l4run {

namespace {

std::vector<std::string> parameterNames(l4rt_session session) {
  size_t n = 0;
  check(l4rt_num_parameters(session, &n));
  std::vector<std::string> names;
  for (size_t i = 0; i < n; ++i) {
    const char *name = nullptr;
    check(l4rt_parameter_name(session, i, &name));
    names.push_back(name);
  }
  return names;
}

/// A tensor of the session with its shape.
struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

Tensor fetch(l4rt_session session, const std::string &name) {
  Tensor t;
  t.shape.resize(8);
  size_t rank = 0;
  check(l4rt_tensor_shape(session, name.c_str(), t.shape.data(), t.shape.size(),
                          &rank));
  t.shape.resize(rank);
  size_t n = 1;
  for (int64_t e : t.shape)
    n *= size_t(e);
  t.data.resize(n);
  check(l4rt_get_tensor(session, name.c_str(), t.data.data(), n));
  return t;
}

/// The magic of the `tokens` data format: then little-endian uint32 ids.
constexpr char kTokenMagic[8] = {'L', '4', 'C', 'T', 'O', 'K', '0', '1'};

std::vector<uint32_t> loadTokens(const std::string &path,
                                 const std::string &format, int64_t vocab) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    die(path + ": cannot open the training data: " + std::strerror(errno));
  std::string bytes((std::istreambuf_iterator<char>(in)),
                    std::istreambuf_iterator<char>());
  if (in.bad())
    die(path + ": read failed");
  std::vector<uint32_t> tokens;
  if (format == "bytes") {
    if (vocab < 256)
      die(path +
          ": --data-format=bytes needs a byte vocabulary (vocab_size "
          ">= 256); the plan has " +
          std::to_string(vocab));
    tokens.reserve(bytes.size());
    for (char c : bytes)
      tokens.push_back(uint8_t(c));
    return tokens;
  }
  if (bytes.size() < 8 || std::memcmp(bytes.data(), kTokenMagic, 8) != 0)
    die(path + ": not a token file (it does not start with \"L4CTOK01\"; "
               "see docs/training.md)");
  if ((bytes.size() - 8) % 4 != 0)
    die(path + ": " + std::to_string(bytes.size() - 8) +
        " bytes after the magic are not a whole number of uint32 ids");
  size_t n = (bytes.size() - 8) / 4;
  tokens.resize(n);
  const unsigned char *p =
      reinterpret_cast<const unsigned char *>(bytes.data()) + 8;
  for (size_t i = 0; i < n; ++i, p += 4) {
    tokens[i] = uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 |
                uint32_t(p[3]) << 24;
    if (int64_t(tokens[i]) >= vocab)
      die(path + ": token " + std::to_string(i) + " is " +
          std::to_string(tokens[i]) + ", outside the vocabulary [0, " +
          std::to_string(vocab) + ")");
  }
  return tokens;
}

/// Fails early, before any step, when the checkpoint could not be written.
void checkSaveTarget(const std::string &dir) {
  std::string d = dir;
  while (d.size() > 1 && d.back() == '/')
    d.pop_back();
  size_t slash = d.rfind('/');
  std::string parent = slash == std::string::npos ? "."
                       : slash == 0               ? "/"
                                                  : d.substr(0, slash);
  if (::access(parent.c_str(), W_OK | X_OK) != 0)
    die("--save " + dir + ": cannot write into its parent directory '" +
        parent + "': " + std::strerror(errno));
}

std::string bar(double fraction, int width) {
  int fill = int(fraction * width + 0.5);
  return "[" + std::string(size_t(fill), '#') +
         std::string(size_t(width - fill), '.') + "]";
}

void save(l4rt_session session, const std::string &dir, int64_t step,
          bool tty) {
  auto t0 = std::chrono::steady_clock::now();
  check(l4rt_save_checkpoint(session, dir.c_str()));
  double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
          .count();
  std::printf("%ssaved %s at step %lld (%.2f s)\n", tty ? "\r\033[K" : "",
              dir.c_str(), (long long)step, secs);
  std::fflush(stdout);
}

} // namespace

int runTrainFiles(const Options &o, l4rt_session session) {
  int64_t B = 0, T = 0;
  std::vector<int64_t> ids = readInputIds(o.inputs, B, T);
  float loss = 0;
  check(l4rt_train_step(session, ids.data(), B, T, &loss));
  std::vector<std::string> names = parameterNames(session);
  std::vector<Tensor> grads, after;
  for (const std::string &n : names)
    grads.push_back(fetch(session, "grad." + n));
  l4rt_adamw h = adamwOf(o);
  check(l4rt_adamw_step(session, &h));
  for (const std::string &n : names)
    after.push_back(fetch(session, n));
  std::vector<l4c::io::TensorRef> out;
  out.push_back({"loss", l4c::io::DType::F32, {}, &loss});
  for (size_t i = 0; i < names.size(); ++i) {
    out.push_back({"grad." + names[i], l4c::io::DType::F32, grads[i].shape,
                   grads[i].data.data()});
    out.push_back({"adamw." + names[i], l4c::io::DType::F32, after[i].shape,
                   after[i].data.data()});
  }
  std::map<std::string, std::string> meta = {
      {"plan", o.plan},
      {"adamw", "lr=" + std::to_string(h.lr) +
                    ",beta1=" + std::to_string(h.beta1) + ",beta2=" +
                    std::to_string(h.beta2) + ",eps=" + std::to_string(h.eps) +
                    ",weight_decay=" + std::to_string(h.weight_decay)}};
  if (l4c::io::Status st = l4c::io::writeSafetensors(o.out, out, meta);
      !st.ok())
    die(st.error);
  std::printf("loss %.6f over %lld x %lld tokens; wrote %zu gradients and "
              "AdamW updates to %s\n",
              loss, (long long)B, (long long)T, names.size(), o.out.c_str());
  return 0;
}

int runTraining(const Options &o, l4rt_plan plan, const l4rt_plan_summary &s) {
  const int64_t B = o.batch.value_or(s.max_batch);
  const int64_t T = o.seq.value_or(s.max_seq);
  const int64_t K = o.gradAccum, steps = *o.steps;
  if (B > s.max_batch || T > s.max_seq)
    die("--batch " + std::to_string(B) + " --seq " + std::to_string(T) +
        " exceed the plan's max batch " + std::to_string(s.max_batch) +
        " and max seq " + std::to_string(s.max_seq));
  std::vector<uint32_t> tokens =
      loadTokens(o.trainData, o.dataFormat, s.vocab_size);
  const int64_t N = int64_t(tokens.size()), perBatch = B * T;
  if (N < perBatch)
    die(o.trainData + ": holds " + std::to_string(N) +
        " tokens; one batch needs " + std::to_string(perBatch) + " (--batch " +
        std::to_string(B) + " x --seq " + std::to_string(T) + ")");
  if (!o.save.empty())
    checkSaveTarget(o.save);

  l4rt_session session = nullptr;
  const std::string &from = !o.resume.empty() ? o.resume : o.weights;
  l4rt_session_options so = l4rt_session_options_default();
  so.weights_dir = o.randomSeed ? nullptr : from.c_str();
  so.random_seed = o.randomSeed.value_or(0);
  so.device = o.device.c_str();
  check(l4rt_session_create_with(plan, &so, &session));
  if (o.device != "cpu")
    std::fprintf(stderr, "l4-run: device %s\n", l4rt_session_device(session));
  int64_t cursor = 0;
  if (!o.resume.empty()) {
    check(l4rt_load_optimizer(session, o.resume.c_str()));
    if (l4rt_get_counter(session, "data_cursor", &cursor) != L4RT_OK)
      die(o.resume + ": the optimizer state has no data_cursor (not written "
                     "by l4-run's training loop)");
    int64_t seen = 0;
    if (l4rt_get_counter(session, "data_tokens", &seen) == L4RT_OK && seen != N)
      std::fprintf(stderr,
                   "l4-run: warning: %s was trained on data of %lld tokens; "
                   "%s has %lld\n",
                   o.resume.c_str(), (long long)seen, o.trainData.c_str(),
                   (long long)N);
    if (cursor < 0 || cursor > N)
      die(o.resume + ": data_cursor " + std::to_string(cursor) +
          " is outside the data's " + std::to_string(N) + " tokens");
    // A resumed run continues the same batches only with the same shapes.
    for (auto [name, now] :
         {std::pair{"data_batch", B}, {"data_seq", T}, {"grad_accum", K}}) {
      int64_t then = 0;
      if (l4rt_get_counter(session, name, &then) == L4RT_OK && then != now)
        std::fprintf(stderr,
                     "l4-run: warning: %s was trained with %s %lld, this run "
                     "uses %lld: the result will differ from an "
                     "uninterrupted run\n",
                     o.resume.c_str(), name, (long long)then, (long long)now);
    }
  }
  int64_t step = 0;
  check(l4rt_get_counter(session, "step", &step));
  if (step >= steps) {
    std::printf("nothing to do: the weights are at step %lld and --steps is "
                "%lld\n",
                (long long)step, (long long)steps);
    l4rt_session_free(session);
    return 0;
  }

  FILE *log = nullptr;
  if (!o.log.empty()) {
    // A resumed run continues the log of the run it resumes.
    log = std::fopen(o.log.c_str(), o.resume.empty() ? "w" : "a");
    if (!log)
      die("--log " + o.log + ": cannot open: " + std::strerror(errno));
  }
  const bool tty = ::isatty(::fileno(stdout));
  const l4rt_adamw h = adamwOf(o);
  std::printf("training %lld steps from step %lld: batch %lld x seq %lld x "
              "%lld micro-batches, %lld tokens of %s\n",
              (long long)(steps - step), (long long)step, (long long)B,
              (long long)T, (long long)K, (long long)N, o.trainData.c_str());
  std::fflush(stdout);
  std::vector<int64_t> ids(static_cast<size_t>(perBatch));
  int64_t lastSaved = -1, first = step;
  auto start = std::chrono::steady_clock::now();
  while (step < steps) {
    auto t0 = std::chrono::steady_clock::now();
    double lossSum = 0;
    for (int64_t k = 0; k < K; ++k) {
      // B consecutive windows of T tokens from the cursor; the tail too short
      // for a whole batch is skipped and the data starts over.
      if (cursor + perBatch > N)
        cursor = 0;
      for (int64_t i = 0; i < perBatch; ++i)
        ids[size_t(i)] = tokens[size_t(cursor + i)];
      cursor += perBatch;
      float loss = 0;
      check(l4rt_train_step(session, ids.data(), B, T, &loss));
      lossSum += loss;
    }
    check(l4rt_adamw_step(session, &h));
    ++step;
    check(l4rt_set_counter(session, "data_cursor", cursor));
    check(l4rt_set_counter(session, "data_tokens", N));
    check(l4rt_set_counter(session, "data_batch", B));
    check(l4rt_set_counter(session, "data_seq", T));
    check(l4rt_set_counter(session, "grad_accum", K));
    double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
            .count();
    double loss = lossSum / double(K);
    double rate = double(perBatch * K) / secs;
    std::printf("%sstep %lld/%lld  loss %.4f  %.0f tokens/s\n",
                tty ? "\r\033[K" : "", (long long)step, (long long)steps, loss,
                rate);
    if (log) {
      std::fprintf(log, "%lld %.6f %.1f\n", (long long)step, loss, rate);
      std::fflush(log);
    }
    if (o.saveEvery && step % *o.saveEvery == 0) {
      save(session, o.save, step, tty);
      lastSaved = step;
    }
    if (tty) {
      double elapsed = std::chrono::duration<double>(
                           std::chrono::steady_clock::now() - start)
                           .count();
      double done = double(step - first) / double(steps - first);
      std::printf("%s %3.0f%%  eta %.0f s", bar(done, 30).c_str(), 100 * done,
                  done > 0 ? elapsed / done - elapsed : 0.0);
    }
    std::fflush(stdout);
  }
  if (!o.save.empty() && lastSaved != step)
    save(session, o.save, step, tty);
  double total =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  std::printf("%strained steps %lld..%lld in %.1f s (%.0f tokens/s)\n",
              tty ? "\r\033[K" : "", (long long)first + 1, (long long)step,
              total, double((step - first) * perBatch * K) / total);
  if (log)
    std::fclose(log);
  l4rt_session_free(session);
  return 0;
}

} // namespace l4run
