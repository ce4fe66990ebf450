//===- train.cpp - training steps, AdamW and checkpoints of a Session ----===//
//
// Runs a plan's train_step program, sums the gradients of micro-batches,
// applies torch.optim.AdamW to the weights in place, and saves or restores
// weights plus optimizer state as a checkpoint directory replaced atomically.
//
//===----------------------------------------------------------------------===//
#include "cpu/grad_kernels.h"
#include "cuda/cuda_backend.h"
#include "executor.h"
#include "io/safetensors.h"

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <set>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace l4c::rt {

namespace fs = std::filesystem;

namespace {

std::string shapeText(const std::vector<int64_t> &shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i)
    s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

Status invalid(std::string msg) {
  return Status::fail(StatusCode::InvalidArgument, std::move(msg));
}

Status ioError(std::string msg) {
  return Status::fail(StatusCode::Io, std::move(msg));
}

std::string errnoText() { return std::strerror(errno); }

/// fsync of a directory, so that the names created in it are durable.
Status syncDir(const std::string &dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return ioError(dir + ": cannot open to sync: " + errnoText());
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0)
    return ioError(dir + ": fsync failed: " + std::strerror(err));
  return Status::success();
}

/// The files a checkpoint directory may hold; saving replaces a directory
/// only when it holds nothing else, so a mistyped path (a home directory, an
/// HF checkpoint with tokenizer files) is never deleted.
bool isCheckpointFile(const std::string &name) {
  for (const char *f :
       {"config.json", "model.safetensors", "optimizer.safetensors"}) {
    std::string base = f;
    // writeSafetensors' temporaries, left only by a crash.
    if (name == base || name.rfind(base + ".tmp.", 0) == 0)
      return true;
  }
  return false;
}

Status checkReplaceable(const std::string &dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    return invalid(dir + ": exists and is not a directory; refusing to "
                         "replace it with a checkpoint");
  for (const fs::directory_entry &e : fs::directory_iterator(dir, ec)) {
    std::string name = e.path().filename().string();
    if (!isCheckpointFile(name) || !e.is_regular_file(ec))
      return invalid(dir + ": holds '" + name +
                     "', so it is not an l4c checkpoint; refusing to "
                     "replace it (save to a new directory)");
  }
  if (ec)
    return ioError(dir + ": cannot list: " + ec.message());
  return Status::success();
}

bool exists(const std::string &path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

Status removeTree(const std::string &path) {
  std::error_code ec;
  fs::remove_all(path, ec);
  if (ec)
    return ioError(path + ": cannot remove: " + ec.message());
  return Status::success();
}

/// A crash may have left DIR.l4c-tmp (a checkpoint being written, or the
/// previous one after the exchange) or, in the fallback swap, DIR.l4c-old
/// with DIR missing (the previous checkpoint, moved aside). Puts things back
/// before a new save; a directory of that name holding anything but
/// checkpoint files is not ours and stops the save.
Status recoverInterruptedSave(const std::string &dir, const std::string &tmp,
                              const std::string &old) {
  for (const std::string &leftover : {old, tmp})
    if (exists(leftover))
      if (Status s = checkReplaceable(leftover); !s.ok())
        return s;
  if (!exists(dir) && exists(old)) {
    if (::rename(old.c_str(), dir.c_str()) != 0)
      return ioError(old +
                     ": cannot restore the checkpoint an interrupted "
                     "save moved aside: " +
                     errnoText());
  }
  if (exists(old))
    if (Status s = removeTree(old); !s.ok())
      return s;
  if (exists(tmp))
    if (Status s = removeTree(tmp); !s.ok())
      return s;
  return Status::success();
}

/// Puts the finished temporary directory at `dir`, replacing what is there
/// in one step where the kernel can exchange two names, else by moving the
/// old one aside first (recoverInterruptedSave undoes a crash in between).
/// Once the new checkpoint is in place nothing is reported: syncing the
/// parent and removing the old one are best effort (the data is already
/// durable, and the next save removes a leftover).
Status swapIntoPlace(const std::string &tmp, const std::string &dir,
                     const std::string &old, const std::string &parent) {
  if (!exists(dir)) {
    if (::rename(tmp.c_str(), dir.c_str()) != 0)
      return ioError(dir + ": cannot rename '" + tmp +
                     "' into place: " + errnoText());
    (void)syncDir(parent);
    return Status::success();
  }
#ifdef RENAME_EXCHANGE
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, dir.c_str(),
                  RENAME_EXCHANGE) == 0) {
    (void)syncDir(parent);
    (void)removeTree(tmp); // now the previous checkpoint
    return Status::success();
  }
  if (errno != EINVAL && errno != ENOSYS && errno != ENOTSUP)
    return ioError(dir + ": cannot exchange it with '" + tmp +
                   "': " + errnoText());
#endif
  if (::rename(dir.c_str(), old.c_str()) != 0)
    return ioError(dir + ": cannot move the previous checkpoint aside to '" +
                   old + "': " + errnoText());
  if (::rename(tmp.c_str(), dir.c_str()) != 0) {
    std::string msg =
        dir + ": cannot rename '" + tmp + "' into place: " + errnoText();
    ::rename(old.c_str(), dir.c_str());
    return ioError(msg);
  }
  (void)syncDir(parent);
  (void)removeTree(old);
  return Status::success();
}

bool reservedCounter(const std::string &name) {
  return name == "step" || name == "micro_batches" ||
         name.rfind("m.", 0) == 0 || name.rfind("v.", 0) == 0;
}

} // namespace

const ProgramDesc *Session::trainProgram(Status &st) const {
  const ProgramDesc *prog = plan_->program("train_step");
  if (!prog)
    st = invalid(plan_->label() +
                 ": the plan has no train_step program (program_kind " +
                 plan_->programKind + "); compile it with --program=train");
  return prog;
}

float *Session::weightData(size_t w) const {
  // bf16 weights: the f32 master copy (the plan's bf16 weights are its
  // rounding, refreshed after every optimizer step).
  if (w < master_.size() && !master_[w].empty())
    return const_cast<float *>(master_[w].data());
  const BufferDesc &b = plan_->buffers[plan_->weights[w].buffer];
  return reinterpret_cast<float *>(regions_[int(b.region)].base + b.offset);
}

int64_t Session::weightIndex(std::string_view hfName) const {
  for (size_t i = 0; i < plan_->weights.size(); ++i)
    if (plan_->weights[i].hfName == hfName)
      return int64_t(i);
  return -1;
}

void Session::ensureMoments() {
  if (!m_.empty())
    return;
  m_.resize(plan_->weights.size());
  v_.resize(plan_->weights.size());
  for (size_t i = 0; i < plan_->weights.size(); ++i) {
    size_t n = plan_->buffers[plan_->weights[i].buffer].numel;
    m_[i].assign(n, 0.f);
    v_[i].assign(n, 0.f);
  }
}

Status Session::initDeviceOptimizer() {
  const Plan &p = *plan_;
  Status st;
  const ProgramDesc *prog = trainProgram(st);
  if (!prog)
    return st;
  std::vector<cuda::CudaBackend::OptTensor> tensors;
  for (size_t i = 0; i < p.weights.size(); ++i) {
    const BufferDesc &w = p.buffers[p.weights[i].buffer];
    const BufferDesc &g = p.buffers[prog->grads[i]];
    if (g.dtype != plan::DType::F32 || g.numel != w.numel)
      return invalid(p.label() + ": gradient of '" + p.weights[i].hfName +
                     "' is not an f32 tensor shaped like its weight");
    cuda::CudaBackend::OptTensor t;
    t.weight = w.offset;
    t.bf16 = w.dtype == plan::DType::BF16;
    t.gradRegion = g.region;
    t.grad = g.offset;
    t.numel = w.numel;
    tensors.push_back(t);
  }
  if (Status s = gpu_->initOptimizer(tensors); !s.ok())
    return s;
  for (size_t i = 0; i < tensors.size(); ++i)
    if (tensors[i].bf16)
      if (Status s = gpu_->optUpload(
              i, cuda::CudaBackend::OptState::Master, master_[i].data());
          !s.ok())
        return s;
  deviceOptimizer_ = true;
  return Status::success();
}

Status Session::syncHostTrainState() const {
  if (!deviceOptimizer_ || !hostTrainStale_)
    return Status::success();
  // The mirrors are refreshed, not the session's logical state: a const
  // reader (a checkpoint, readTensor) may ask for it.
  Session &self = const_cast<Session &>(*this);
  using OS = cuda::CudaBackend::OptState;
  Region &w = self.regions_[int(plan::Region::Weights)];
  if (w.base)
    if (Status s = self.gpu_->download(plan::Region::Weights, 0, w.base,
                                       w.size);
        !s.ok())
      return s;
  self.ensureMoments();
  for (size_t i = 0; i < plan_->weights.size(); ++i) {
    if (Status s = self.gpu_->optDownload(i, OS::M, self.m_[i].data());
        !s.ok())
      return s;
    if (Status s = self.gpu_->optDownload(i, OS::V, self.v_[i].data());
        !s.ok())
      return s;
    if (i < master_.size() && !master_[i].empty())
      if (Status s =
              self.gpu_->optDownload(i, OS::Master, self.master_[i].data());
          !s.ok())
        return s;
  }
  hostTrainStale_ = false;
  return Status::success();
}

Status Session::trainStep(const int64_t *ids, int64_t B, int64_t T,
                          float *loss) {
  std::lock_guard<std::mutex> lock(mu_);
  timing_ = Timing();
  const Plan &p = *plan_;
  Status st;
  const ProgramDesc *prog = trainProgram(st);
  if (!prog)
    return st;
  if (B < 1 || B > p.maxBatch)
    return invalid("batch " + std::to_string(B) +
                   " is outside the plan's range [1, " +
                   std::to_string(p.maxBatch) + "] (max_batch)");
  if (T < 2 || T > prog->seqCapacity)
    return invalid("sequence length " + std::to_string(T) +
                   " is outside the train plan's range [2, " +
                   std::to_string(prog->seqCapacity) +
                   "] (a token needs a successor to be a label)");
  if (Status s = checkIds(ids, B, T, T); !s.ok())
    return s;
  auto t0 = std::chrono::steady_clock::now();
  if (Status s = runProgram(*prog, ids, T, B, T, 0); !s.ok())
    return s;
  if (Status s = fetchBuffer(p.buffers[prog->loss]); !s.ok())
    return s;
  const BufferDesc &lb = p.buffers[prog->loss];
  float value = *reinterpret_cast<const float *>(regions_[int(lb.region)].base +
                                                 lb.offset);
  if (loss)
    *loss = value;
  if (deviceOptimizer_) {
    // The gradients stay on the device, summed there.
    if (Status s = gpu_->accumulateGrads(microBatches_ == 0); !s.ok())
      return s;
  } else {
    for (uint32_t g : prog->grads)
      if (Status s = fetchBuffer(p.buffers[g]); !s.ok())
        return s;
    gradSum_.resize(p.weights.size());
    for (size_t i = 0; i < prog->grads.size(); ++i) {
      const BufferDesc &g = p.buffers[prog->grads[i]];
      const float *src = reinterpret_cast<const float *>(
          regions_[int(g.region)].base + g.offset);
      std::vector<float> &sum = gradSum_[i];
      if (microBatches_ == 0) {
        sum.assign(src, src + g.numel);
      } else {
        for (size_t k = 0; k < g.numel; ++k)
          sum[k] += src[k];
      }
    }
  }
  ++microBatches_;
  timing_.prefillSeconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
          .count();
  timing_.prefillTokens = B * T;
  return Status::success();
}

void Session::zeroGrad() {
  std::lock_guard<std::mutex> lock(mu_);
  microBatches_ = 0;
}

Status Session::adamwStep(const AdamWParams &h) {
  std::lock_guard<std::mutex> lock(mu_);
  Status st;
  if (!trainProgram(st))
    return st;
  // torch.optim.AdamW's own argument checks.
  auto bad = [](const char *field, double v, const char *range) {
    return invalid("adamw " + std::string(field) + " " + std::to_string(v) +
                   " must be " + range);
  };
  if (!(h.lr >= 0) || !std::isfinite(h.lr))
    return bad("lr", h.lr, "a finite number >= 0");
  if (!(h.beta1 >= 0 && h.beta1 < 1))
    return bad("beta1", h.beta1, "in [0, 1)");
  if (!(h.beta2 >= 0 && h.beta2 < 1))
    return bad("beta2", h.beta2, "in [0, 1)");
  if (!(h.eps >= 0) || !std::isfinite(h.eps))
    return bad("eps", h.eps, "a finite number >= 0");
  if (!(h.weightDecay >= 0) || !std::isfinite(h.weightDecay))
    return bad("weight_decay", h.weightDecay, "a finite number >= 0");
  if (microBatches_ == 0)
    return invalid("no gradients to apply: run a train step first");
  if (deviceOptimizer_) {
    // cpu::adamwStep's scalars, computed as it computes them.
    cuda::CudaBackend::AdamWScalars c;
    int64_t step = step_ + 1;
    c.decay = 1.0 - h.lr * h.weightDecay;
    double bc1 = 1.0 - std::pow(h.beta1, double(step));
    double bc2 = 1.0 - std::pow(h.beta2, double(step));
    c.stepSize = h.lr / bc1;
    c.bc2Sqrt = std::sqrt(bc2);
    c.w1 = 1.0 - h.beta1;
    c.oneMinusW1 = 1.0 - c.w1;
    c.beta2 = h.beta2;
    c.w2 = 1.0 - h.beta2;
    c.eps = h.eps;
    c.microBatches = int(microBatches_);
    if (Status s = gpu_->adamwStep(c); !s.ok())
      return s;
    step_ = step;
    microBatches_ = 0;
    hostTrainStale_ = true;
    return Status::success();
  }
  ensureMoments();
  ++step_;
  float k = float(microBatches_);
  for (size_t i = 0; i < plan_->weights.size(); ++i) {
    std::vector<float> &g = gradSum_[i];
    if (microBatches_ > 1)
      for (float &x : g)
        x /= k;
    cpu::adamwStep(weightData(i), g.data(), m_[i].data(), v_[i].data(),
                   g.size(), step_, h.lr, h.beta1, h.beta2, h.eps,
                   h.weightDecay);
    const BufferDesc &wb = plan_->buffers[plan_->weights[i].buffer];
    if (wb.dtype == plan::DType::BF16) {
      uint16_t *dst = reinterpret_cast<uint16_t *>(
          regions_[int(wb.region)].base + wb.offset);
      const float *src = weightData(i);
      for (uint64_t k = 0; k < wb.numel; ++k)
        dst[k] = io::f32ToBf16(src[k]);
    }
    if (Status s = pushBuffer(wb); !s.ok())
      return s;
  }
  microBatches_ = 0;
  return Status::success();
}

Status Session::tensorShape(std::string_view name,
                            std::vector<int64_t> &shape) const {
  std::string_view hf = name;
  for (std::string_view prefix : {"grad.", "m.", "v."})
    if (weightIndex(name) < 0 && name.substr(0, prefix.size()) == prefix)
      hf = name.substr(prefix.size());
  int64_t w = weightIndex(hf);
  if (w < 0)
    return invalid("no tensor named '" + std::string(name) +
                   "' (expected a weight name, or grad., m. or v. and one)");
  shape = plan_->buffers[plan_->weights[size_t(w)].buffer].shape;
  return Status::success();
}

Status Session::readTensor(std::string_view name, float *dst,
                           uint64_t numel) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!dst)
    return invalid("destination for tensor '" + std::string(name) +
                   "' is null");
  // A weight's own name wins over a prefix reading of it.
  char kind = 'w';
  std::string_view hf = name;
  if (weightIndex(name) < 0) {
    if (name.rfind("grad.", 0) == 0)
      kind = 'g', hf = name.substr(5);
    else if (name.rfind("m.", 0) == 0)
      kind = 'm', hf = name.substr(2);
    else if (name.rfind("v.", 0) == 0)
      kind = 'v', hf = name.substr(2);
  }
  int64_t w = weightIndex(hf);
  if (w < 0)
    return invalid("no tensor named '" + std::string(name) +
                   "' (expected a weight name, or grad., m. or v. and one)");
  const BufferDesc &b = plan_->buffers[plan_->weights[size_t(w)].buffer];
  if (numel != b.numel)
    return invalid("tensor '" + std::string(name) + "' has " +
                   std::to_string(b.numel) + " elements " + shapeText(b.shape) +
                   ", not " + std::to_string(numel));
  if (kind != 'g')
    if (Status s = syncHostTrainState(); !s.ok())
      return s;
  switch (kind) {
  case 'w':
    if (b.dtype != plan::DType::F32 &&
        !(size_t(w) < master_.size() && !master_[size_t(w)].empty()))
      return Status::fail(StatusCode::Unsupported,
                          "weight '" + std::string(hf) + "' is " +
                              dtypeName(b.dtype) + ", not f32");
    std::memcpy(dst, weightData(size_t(w)), numel * sizeof(float));
    return Status::success();
  case 'g': {
    if (microBatches_ == 0)
      return invalid("no gradient for '" + std::string(hf) +
                     "': no train step ran since the last optimizer step");
    float k = float(microBatches_);
    if (deviceOptimizer_) {
      if (Status s = gpu_->optDownload(
              size_t(w), cuda::CudaBackend::OptState::GradSum, dst);
          !s.ok())
        return s;
      if (microBatches_ > 1)
        for (uint64_t i = 0; i < numel; ++i)
          dst[i] = dst[i] / k;
      return Status::success();
    }
    const std::vector<float> &g = gradSum_[size_t(w)];
    for (uint64_t i = 0; i < numel; ++i)
      dst[i] = microBatches_ > 1 ? g[i] / k : g[i];
    return Status::success();
  }
  default: {
    const std::vector<std::vector<float>> &moments = kind == 'm' ? m_ : v_;
    if (moments.empty())
      std::fill(dst, dst + numel, 0.f);
    else
      std::memcpy(dst, moments[size_t(w)].data(), numel * sizeof(float));
    return Status::success();
  }
  }
}

Status Session::setCounter(const std::string &name, int64_t value) {
  std::lock_guard<std::mutex> lock(mu_);
  if (name == "step") {
    if (value < 0)
      return invalid("counter step " + std::to_string(value) +
                     " must not be negative");
    step_ = value;
    return Status::success();
  }
  if (name.empty() || reservedCounter(name))
    return invalid("counter name '" + name +
                   "' is empty or reserved (micro_batches, m.*, v.*)");
  counters_[name] = value;
  return Status::success();
}

Status Session::getCounter(const std::string &name, int64_t &value) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (name == "step")
    value = step_;
  else if (name == "micro_batches")
    value = microBatches_;
  else if (auto it = counters_.find(name); it != counters_.end())
    value = it->second;
  else
    return invalid("no counter named '" + name + "'");
  return Status::success();
}

Status Session::writeCheckpointFiles(const std::string &dir) const {
  if (Status s = syncHostTrainState(); !s.ok())
    return s;
  const Plan &p = *plan_;
  std::string config = p.configJson.empty() ? "{}\n" : p.configJson;
  if (io::Status s = io::writeFileAtomic(dir + "/config.json", config); !s.ok())
    return ioError(s.error);
  // HF's loader wants format "pt" in the metadata of model files.
  std::map<std::string, std::string> meta = {{"format", "pt"}};
  std::vector<io::TensorRef> model, opt;
  for (size_t i = 0; i < p.weights.size(); ++i) {
    const BufferDesc &b = p.buffers[p.weights[i].buffer];
    model.push_back(
        {p.weights[i].hfName, io::DType::F32, b.shape, weightData(i)});
  }
  if (io::Status s =
          io::writeSafetensors(dir + "/model.safetensors", model, meta);
      !s.ok())
    return ioError(s.error);
  std::vector<float> zeros;
  for (size_t i = 0; i < p.weights.size(); ++i) {
    const BufferDesc &b = p.buffers[p.weights[i].buffer];
    if (m_.empty() && zeros.size() < b.numel)
      zeros.assign(b.numel, 0.f);
    const float *m = m_.empty() ? zeros.data() : m_[i].data();
    const float *v = v_.empty() ? zeros.data() : v_[i].data();
    opt.push_back({"m." + p.weights[i].hfName, io::DType::F32, b.shape, m});
    opt.push_back({"v." + p.weights[i].hfName, io::DType::F32, b.shape, v});
  }
  opt.push_back({"step", io::DType::I64, {}, &step_});
  for (const auto &[name, value] : counters_)
    opt.push_back({name, io::DType::I64, {}, &value});
  if (io::Status s =
          io::writeSafetensors(dir + "/optimizer.safetensors", opt, meta);
      !s.ok())
    return ioError(s.error);
  return Status::success();
}

Status Session::saveCheckpoint(const std::string &dirIn, const SaveHook &hook) {
  std::lock_guard<std::mutex> lock(mu_);
  std::string dir = dirIn;
  while (dir.size() > 1 && dir.back() == '/')
    dir.pop_back();
  if (dir.empty() || dir == "/" || dir == "." || dir == "..")
    return invalid("checkpoint directory '" + dirIn +
                   "' must name a directory to create or replace");
  if (plan_->weights.empty())
    return invalid(plan_->label() + ": the plan binds no weights to save");
  fs::path parentPath = fs::path(dir).parent_path();
  std::string parent = parentPath.empty() ? "." : parentPath.string();
  std::error_code ec;
  if (!fs::is_directory(parent, ec))
    return ioError(dir + ": parent directory '" + parent + "' does not exist");
  std::string tmp = dir + ".l4c-tmp", old = dir + ".l4c-old";
  if (Status s = recoverInterruptedSave(dir, tmp, old); !s.ok())
    return s;
  if (exists(dir))
    if (Status s = checkReplaceable(dir); !s.ok())
      return s;
  if (::mkdir(tmp.c_str(), 0777) != 0)
    return ioError(dir + ": cannot create the temporary directory '" + tmp +
                   "': " + errnoText());
  // Anything that fails from here on leaves the previous checkpoint as it
  // was and removes the temporary directory.
  auto abandon = [&](Status s) {
    removeTree(tmp);
    return s;
  };
  if (Status s = writeCheckpointFiles(tmp); !s.ok())
    return abandon(s);
  if (Status s = syncDir(tmp); !s.ok())
    return abandon(s);
  if (hook)
    if (Status s = hook("written"); !s.ok())
      return abandon(s);
  if (Status s = swapIntoPlace(tmp, dir, old, parent); !s.ok()) {
    // The previous checkpoint is at `dir` (or back there); drop ours.
    (void)removeTree(tmp);
    return s;
  }
  return Status::success();
}

Status Session::loadOptimizer(const std::string &pathIn) {
  std::lock_guard<std::mutex> lock(mu_);
  Status st;
  if (!trainProgram(st))
    return st;
  std::error_code ec;
  std::string path =
      fs::is_directory(pathIn, ec) ? pathIn + "/optimizer.safetensors" : pathIn;
  io::SafetensorsFile file;
  if (io::Status s = io::SafetensorsFile::open(path, file); !s.ok())
    return ioError(s.error);
  const Plan &p = *plan_;
  // Read everything first: a mismatch leaves the session's state untouched.
  std::vector<std::vector<float>> m(p.weights.size()), v(p.weights.size());
  std::set<std::string> expected = {"step"};
  for (size_t i = 0; i < p.weights.size(); ++i) {
    const BufferDesc &b = p.buffers[p.weights[i].buffer];
    for (char which : {'m', 'v'}) {
      std::string name = std::string(1, which) + "." + p.weights[i].hfName;
      expected.insert(name);
      const io::TensorInfo *t = file.find(name);
      if (!t)
        return invalid(path + ": tensor '" + name +
                       "' is missing (the plan has weight '" +
                       p.weights[i].hfName + "')");
      if (t->dtype != io::DType::F32 || t->shape != b.shape)
        return invalid(path + ": tensor '" + name + "' is " +
                       io::dtypeName(t->dtype) + " " + shapeText(t->shape) +
                       " but the plan's weight is F32 " + shapeText(b.shape));
      std::vector<float> &dst = which == 'm' ? m[i] : v[i];
      dst.resize(b.numel);
      std::memcpy(dst.data(), file.data(*t), b.numel * sizeof(float));
    }
  }
  int64_t step = -1;
  std::map<std::string, int64_t> counters;
  for (const io::TensorInfo &t : file.tensors()) {
    bool scalar = t.dtype == io::DType::I64 && t.numel() == 1;
    if (t.name == "step" || !expected.count(t.name)) {
      if (!scalar || (t.name != "step" && reservedCounter(t.name)))
        return invalid(path + ": tensor '" + t.name + "' (" +
                       io::dtypeName(t.dtype) + " " + shapeText(t.shape) +
                       ") matches no weight of the plan and is not an I64 "
                       "counter");
      int64_t value;
      std::memcpy(&value, file.data(t), sizeof(value));
      if (t.name == "step")
        step = value;
      else
        counters[t.name] = value;
    }
  }
  if (step < 0)
    return invalid(path + ": tensor 'step' is missing or negative");
  if (deviceOptimizer_) {
    // The device's weights and masters stay; its moments become these.
    if (Status s = syncHostTrainState(); !s.ok())
      return s;
    for (size_t i = 0; i < p.weights.size(); ++i) {
      if (Status s = gpu_->optUpload(i, cuda::CudaBackend::OptState::M,
                                     m[i].data());
          !s.ok())
        return s;
      if (Status s = gpu_->optUpload(i, cuda::CudaBackend::OptState::V,
                                     v[i].data());
          !s.ok())
        return s;
    }
  }
  m_ = std::move(m);
  v_ = std::move(v);
  step_ = step;
  counters_ = std::move(counters);
  microBatches_ = 0;
  return Status::success();
}

} // namespace l4c::rt
