//===- kernel_check.cpp - every GPU kernel against the CPU backend --------===//
//
// Session::checkKernels: a program run kernel by kernel on both backends.
// Before each kernel the two sides hold identical regions, except that the
// GPU's copy of the bytes the kernel must not read is NaN (KernelFootprint);
// after it, its results are compared over their live elements, every other
// byte is checked unchanged, and the device gets the host's bytes again, so
// an error is charged to the kernel that made it and never carried into the
// next one. Session::profileKernels: every kernel's GPU
// time, from CUDA events between the launches. Session::tuneKernels: the
// time of each tile configuration of the tunable kernels (l4-tune), each
// checked against the kernel's own results (with the same poison).
//
//===----------------------------------------------------------------------===//
#include "cuda/cuda_backend.h"
#include "executor.h"
#include "io/safetensors.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <set>

namespace l4c::rt {

namespace {

/// A KV cache ([B, M, Hkv, d], no seq dim): live up to its run's last
/// position, not whole.
bool isKvCache(const BufferDesc &d) {
  return d.region == plan::Region::Cache && d.hasBatch && !d.hasSeq &&
         d.shape.size() == 4;
}

/// Byte ranges of a buffer holding live data for a run of (B, T) at
/// positions pos0 + s: per batch entry its first activeElems(T) elements
/// (a KV cache's first pos0 + T positions); buffers without a batch dim
/// whole.
std::vector<std::pair<uint64_t, uint64_t>>
liveRanges(const BufferDesc &d, int64_t B, int64_t T, int64_t pos0) {
  uint64_t elem = dtypeSize(d.dtype);
  std::vector<std::pair<uint64_t, uint64_t>> r;
  if (!d.hasBatch || (d.region == plan::Region::Cache && !isKvCache(d))) {
    r.push_back({d.offset, d.size});
    return r;
  }
  uint64_t live =
      isKvCache(d)
          ? uint64_t(pos0 + T) * uint64_t(d.shape[2] * d.shape[3])
          : d.activeElems(uint64_t(T));
  live = std::min<uint64_t>(live, d.batchStride);
  for (int64_t b = 0; b < B; ++b)
    r.push_back({d.offset + uint64_t(b) * d.batchStride * elem, live * elem});
  return r;
}

/// Sorted, disjoint byte spans [begin, end) of one region.
using Spans = std::vector<std::pair<uint64_t, uint64_t>>;

void normalize(Spans &s) {
  std::sort(s.begin(), s.end());
  Spans out;
  for (auto [b, e] : s) {
    if (b >= e)
      continue;
    if (!out.empty() && b <= out.back().second)
      out.back().second = std::max(out.back().second, e);
    else
      out.push_back({b, e});
  }
  s = std::move(out);
}

/// a without b (both normalized).
Spans minus(const Spans &a, const Spans &b) {
  Spans out;
  size_t j = 0;
  for (auto [lo, hi] : a) {
    while (j < b.size() && b[j].second <= lo)
      ++j;
    uint64_t at = lo;
    for (size_t k = j; k < b.size() && b[k].first < hi; ++k) {
      if (b[k].first > at)
        out.push_back({at, b[k].first});
      at = std::max(at, b[k].second);
    }
    if (at < hi)
      out.push_back({at, hi});
  }
  return out;
}

/// What one kernel of a differential run may change and must not read, per
/// region. `writes`: the whole extents of its ops' results (temps too,
/// which only the CPU writes; the caller adds the kernels' workspace).
/// `poison`: the bytes the GPU gets as 0xff (NaN in f32 and bf16, -1 in
/// integers) before it runs: its results' extents and the dead parts of
/// its inputs (rows past T, batch entries past B, cache positions from
/// pos0 + T on), less every input's live bytes (a result may be an input's
/// exact bytes). With whole[r] > 0, every byte of region r below whole[r]
/// is poisoned, not only the kernel's buffers' (less its inputs' live
/// bytes): a kernel that reads a buffer it does not declare, which the
/// memory planner may have given to another, fails too. A kernel that
/// reads stale bytes then shows NaN or wrong integers in its live results,
/// where on a GPU it would have read whatever an earlier kernel left there.
struct KernelFootprint {
  Spans writes[4], poison[4];
};

KernelFootprint footprint(const Plan &p, const KernelDesc &kd, int64_t B,
                          int64_t T, int64_t pos0,
                          const uint64_t (&whole)[4] = {0, 0, 0, 0}) {
  KernelFootprint f;
  for (int r = 0; r < 4; ++r)
    if (whole[r])
      f.poison[r].push_back({0, whole[r]});
  Spans live[4];
  std::set<uint32_t> written;
  auto extent = [&](uint32_t bi) {
    const BufferDesc &d = p.buffers[bi];
    return std::make_pair(d.offset, d.offset + d.size);
  };
  for (const OpDesc &op : kd.ops) {
    for (uint32_t bi : op.operands) {
      if (written.count(bi)) // this kernel's own value
        continue;
      const BufferDesc &d = p.buffers[bi];
      Spans l;
      for (auto [at, bytes] : liveRanges(d, B, T, pos0))
        l.push_back({at, at + bytes});
      normalize(l);
      Spans dead = minus({extent(bi)}, l);
      Spans &pz = f.poison[int(d.region)];
      pz.insert(pz.end(), dead.begin(), dead.end());
      live[int(d.region)].insert(live[int(d.region)].end(), l.begin(),
                                 l.end());
    }
    for (uint32_t bi : op.results) {
      written.insert(bi);
      const BufferDesc &d = p.buffers[bi];
      f.writes[int(d.region)].push_back(extent(bi));
      f.poison[int(d.region)].push_back(extent(bi));
    }
  }
  for (int r = 0; r < 4; ++r) {
    normalize(f.writes[r]);
    normalize(live[r]);
    normalize(f.poison[r]);
    f.poison[r] = minus(f.poison[r], live[r]);
  }
  return f;
}

/// Sets the device's copy of a footprint's poison to 0xff.
Status poisonDevice(cuda::CudaBackend &gpu, const KernelFootprint &fp) {
  for (int r = 0; r < 4; ++r)
    for (auto [lo, hi] : fp.poison[r])
      if (Status s = gpu.fill(plan::Region(r), lo, hi - lo, 0xff); !s.ok())
        return s;
  return Status::success();
}

/// Adds to `count` the bytes of `spans` within the chunk [lo, lo + n) whose
/// device copy `dev` (the chunk) differs from what they must hold: the
/// host's bytes, or 0xff where `host` is null (the poison); `first` takes
/// the lowest such byte's offset.
void countStrays(const Spans &spans, uint64_t lo, uint64_t n,
                 const uint8_t *dev, const uint8_t *host, uint64_t &count,
                 uint64_t &first) {
  for (auto [b, e] : spans) {
    b = std::max(b, lo);
    e = std::min(e, lo + n);
    if (b >= e)
      continue;
    const uint8_t *d = dev + (b - lo);
    if (host && std::memcmp(d, host + b, e - b) == 0)
      continue;
    for (uint64_t i = 0; i < e - b; ++i)
      if (d[i] != (host ? host[b + i] : 0xff)) {
        first = std::min(first, b + i);
        ++count;
      }
  }
}

/// "arena byte N (in buffer 'x')": where a stray byte lies. The memory
/// planner gives bytes to several buffers over a program, so up to three
/// are named ("in buffer 'x', also 'y'").
std::string strayLabel(const Plan &p, int r, uint64_t at) {
  std::string s =
      std::string(regionName(plan::Region(r))) + " byte " + std::to_string(at);
  int named = 0;
  for (const BufferDesc &d : p.buffers)
    if (int(d.region) == r && at >= d.offset && at < d.offset + d.size &&
        named < 3)
      s += (named++ ? ", also '" : " (in buffer '") + d.name + "'";
  return s + (named ? ")" : " (in no buffer)");
}

/// Folds the comparison of `n` elements of a float or integer buffer of
/// dtype `dt` (got against ref) into c.
Status compareValues(plan::DType dt, const uint8_t *got, const uint8_t *ref,
                     uint64_t n, const std::string &what, KernelCheck &c) {
  uint64_t elem = dtypeSize(dt);
  c.integer = !isFloat(dt);
  c.elements += n;
  if (dt == plan::DType::F32 || dt == plan::DType::BF16) {
    bool bf16 = dt == plan::DType::BF16;
    auto at = [&](const uint8_t *p, uint64_t i) -> double {
      if (bf16)
        return io::bf16ToF32(reinterpret_cast<const uint16_t *>(p)[i]);
      return reinterpret_cast<const float *>(p)[i];
    };
    for (uint64_t i = 0; i < n; ++i) {
      double g = at(got, i), h = at(ref, i);
      double err = std::isnan(g) != std::isnan(h) ? INFINITY : std::fabs(g - h);
      if (std::isnan(err))
        err = 0; // both NaN: the reference has it too
      c.maxAbsErr = std::max(c.maxAbsErr, err);
      if (std::isfinite(h))
        c.maxAbsRef = std::max(c.maxAbsRef, std::fabs(h));
    }
    return Status::success();
  }
  if (c.integer) {
    for (uint64_t i = 0; i < n; ++i)
      c.mismatches += std::memcmp(got + i * elem, ref + i * elem, elem) != 0;
    return Status::success();
  }
  return Status::fail(StatusCode::Unsupported,
                      what + " has dtype " + dtypeName(dt) +
                          ", which the kernel check does not compare");
}

/// The buffers a kernel's ops write and the GPU computes (not its temps).
std::set<uint32_t> gpuResults(const KernelDesc &kd) {
  std::set<uint32_t> results;
  for (const OpDesc &op : kd.ops)
    results.insert(op.results.begin(), op.results.end());
  for (uint32_t t : kd.temps) // the GPU never writes these
    results.erase(t);
  return results;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n == 0 ? 0 : n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

} // namespace

Status Session::checkKernels(const std::string &program, const int64_t *ids,
                             int64_t B, int64_t T, int64_t pos0,
                             std::vector<KernelCheck> &out) {
  std::lock_guard<std::mutex> lock(mu_);
  const Plan &p = *plan_;
  if (!gpu_)
    return Status::fail(StatusCode::InvalidArgument,
                        "checking kernels needs a cuda session");
  const ProgramDesc *prog = p.program(program);
  if (!prog)
    return Status::fail(StatusCode::InvalidArgument,
                        p.label() + ": no program '" + program + "'");
  if (B < 1 || B > p.maxBatch || T < 1 || T > prog->seqCapacity)
    return Status::fail(StatusCode::InvalidArgument,
                        "batch " + std::to_string(B) + " x length " +
                            std::to_string(T) + " is outside the " + program +
                            " program's range");
  if (Status s = checkIds(ids, B, T, T); !s.ok())
    return s;
  if (Status s = hostWeights(); !s.ok())
    return s;
  if (Status s = syncHostTrainState(); !s.ok()) // after device AdamW steps
    return s;
  stageInputs(*prog, ids, T, B, T, pos0);
  // Start from identical regions: the host's (weights were uploaded at
  // creation and never change).
  for (plan::Region r :
       {plan::Region::Arena, plan::Region::Cache, plan::Region::Io})
    if (regions_[int(r)].base)
      if (Status s = gpu_->upload(r, 0, regions_[int(r)].base,
                                  regions_[int(r)].size);
          !s.ok())
        return s;
  uint8_t *bases[4];
  for (int r = 0; r < 4; ++r)
    bases[r] = regions_[r].base;
  std::vector<uint8_t> dev;
  // The kernels' workspace follows the arena's last buffer: partial
  // results any kernel may leave there (it writes them before it reads
  // them), and counters each leaves zero.
  uint64_t workspace = 0;
  for (const BufferDesc &d : p.buffers)
    if (d.region == plan::Region::Arena)
      workspace = std::max(workspace, d.offset + d.size);
  workspace = (workspace + 255) / 256 * 256;
  // Everything but the weights (which no kernel of a program writes, and
  // which would cost a re-upload per kernel) is poisoned outside the
  // kernel's live inputs; the device gets the host's bytes back after it.
  uint64_t whole[4] = {};
  whole[int(plan::Region::Arena)] =
      std::min<uint64_t>(workspace, regions_[int(plan::Region::Arena)].size);
  whole[int(plan::Region::Cache)] = regions_[int(plan::Region::Cache)].size;
  whole[int(plan::Region::Io)] = regions_[int(plan::Region::Io)].size;
  for (uint32_t k : prog->steps) {
    const KernelDesc &kd = p.kernels[k];
    KernelFootprint fp = footprint(p, kd, B, T, pos0, whole);
    if (uint64_t end = regions_[int(plan::Region::Arena)].size;
        workspace < end) {
      fp.writes[int(plan::Region::Arena)].push_back({workspace, end});
      normalize(fp.writes[int(plan::Region::Arena)]);
    }
    // The device's copy of what the kernel must not read: poison.
    if (Status s = poisonDevice(*gpu_, fp); !s.ok())
      return s;
    if (Status s = runCpuKernel(p, bases, kd, size_t(B), size_t(T)); !s.ok())
      return s;
    ProgramDesc one = *prog;
    one.steps = {k};
    if (Status s = gpu_->runProgram(one, B, T); !s.ok())
      return s;
    std::set<uint32_t> results = gpuResults(kd);
    KernelCheck kc;
    kc.kernel = k;
    kc.name = kd.name;
    kc.program = program;
    double worst = -1;
    for (uint32_t bi : results) {
      const BufferDesc &d = p.buffers[bi];
      uint64_t elem = dtypeSize(d.dtype);
      KernelCheck c;
      for (auto [at, bytes] : liveRanges(d, B, T, pos0)) {
        dev.resize(bytes);
        if (Status s = gpu_->download(d.region, at, dev.data(), bytes); !s.ok())
          return s;
        const uint8_t *host = bases[int(d.region)] + at;
        if (Status s = compareValues(d.dtype, dev.data(), host, bytes / elem,
                                     "kernel '" + kd.name + "': result '" +
                                         d.name + "'",
                                     c);
            !s.ok())
          return s;
      }
      double score = c.integer ? double(c.mismatches) * 1e9 : c.relErr();
      if (score > worst) {
        worst = score;
        kc.buffer = d.name;
        kc.integer = c.integer;
        kc.maxAbsErr = c.maxAbsErr;
        kc.maxAbsRef = c.maxAbsRef;
        kc.mismatches = c.mismatches;
      }
      kc.elements += c.elements;
    }
    // Every other byte of every region must be as it was before the
    // kernel (the host's bytes, or the poison); then the device gets the
    // host's bytes wherever they differ, so the next kernel starts from the
    // CPU's values and no error is carried into it.
    constexpr uint64_t kChunk = uint64_t(16) << 20;
    for (int r = 0; r < 4; ++r) {
      const uint8_t *host = bases[r];
      uint64_t size = regions_[r].size;
      Spans others = minus({{0, size}}, fp.writes[r]);
      Spans poisoned = minus(fp.poison[r], fp.writes[r]);
      Spans kept = minus(others, poisoned);
      uint64_t first = UINT64_MAX;
      for (uint64_t lo = 0; host && lo < size; lo += kChunk) {
        uint64_t n = std::min(kChunk, size - lo);
        dev.resize(n);
        if (Status s = gpu_->download(plan::Region(r), lo, dev.data(), n);
            !s.ok())
          return s;
        countStrays(kept, lo, n, dev.data(), host, kc.strayBytes, first);
        countStrays(poisoned, lo, n, dev.data(), nullptr, kc.strayBytes,
                    first);
        if (std::memcmp(dev.data(), host + lo, n) != 0)
          if (Status s = gpu_->upload(plan::Region(r), lo, host + lo, n);
              !s.ok())
            return s;
      }
      if (first != UINT64_MAX && kc.strayAt.empty())
        kc.strayAt = strayLabel(p, r, first);
    }
    out.push_back(std::move(kc));
  }
  return gpu_->synchronize();
}

Status Session::stageTimedRun(const char *what, const std::string &program,
                              const int64_t *ids, int64_t B, int64_t T,
                              int64_t pos0, int64_t repeats,
                              const ProgramDesc *&prog) {
  const Plan &p = *plan_;
  if (!gpu_)
    return Status::fail(StatusCode::InvalidArgument,
                        std::string(what) + " kernels needs a cuda session");
  prog = p.program(program);
  if (!prog)
    return Status::fail(StatusCode::InvalidArgument,
                        p.label() + ": no program '" + program + "'");
  if (B < 1 || B > p.maxBatch || T < 1 || T > prog->seqCapacity ||
      repeats < 1)
    return Status::fail(StatusCode::InvalidArgument,
                        "batch " + std::to_string(B) + " x length " +
                            std::to_string(T) + " (" +
                            std::to_string(repeats) +
                            " repeats) is outside the " + program +
                            " program's range");
  if (Status s = checkIds(ids, B, T, T); !s.ok())
    return s;
  stageInputs(*prog, ids, T, B, T, pos0);
  return uploadInputs(*prog, B, T);
}

Status Session::profileKernels(const std::string &program, const int64_t *ids,
                               int64_t B, int64_t T, int64_t pos0,
                               int64_t repeats, std::vector<KernelTime> &out) {
  std::lock_guard<std::mutex> lock(mu_);
  const Plan &p = *plan_;
  const ProgramDesc *prog = nullptr;
  if (Status s = stageTimedRun("profiling", program, ids, B, T, pos0, repeats, prog);
      !s.ok())
    return s;
  std::vector<std::vector<double>> runs(prog->steps.size());
  std::vector<double> ms;
  for (int64_t r = 0; r < repeats; ++r) {
    if (Status s = gpu_->profileProgram(*prog, B, T, ms); !s.ok())
      return s;
    for (size_t i = 0; i < ms.size(); ++i)
      runs[i].push_back(ms[i]);
  }
  out.clear();
  for (size_t i = 0; i < prog->steps.size(); ++i) {
    KernelTime t;
    t.kernel = prog->steps[i];
    t.name = p.kernels[t.kernel].name;
    t.kind = p.kernels[t.kernel].kind;
    t.ms = median(runs[i]);
    out.push_back(std::move(t));
  }
  return Status::success();
}

Status Session::tuneKernels(const std::string &program, const int64_t *ids,
                            int64_t B, int64_t T, int64_t pos0, int64_t repeats,
                            std::vector<KernelTuning> &out) {
  std::lock_guard<std::mutex> lock(mu_);
  const Plan &p = *plan_;
  const ProgramDesc *prog = nullptr;
  if (Status s = stageTimedRun("tuning", program, ids, B, T, pos0, repeats, prog);
      !s.ok())
    return s;
  std::map<uint32_t, std::vector<uint32_t>> candidates;
  for (uint32_t k = 0; k < p.kernels.size(); ++k)
    if (p.kernels[k].alternativeOf >= 0)
      candidates[uint32_t(p.kernels[k].alternativeOf)].push_back(k);
  out.clear();
  ProgramDesc one = *prog;
  std::vector<double> ms;
  for (uint32_t k : prog->steps) {
    one.steps = {k};
    auto cands = candidates.find(k);
    if (cands == candidates.end()) {
      // Not tunable: run it, so the kernels after it see its results.
      if (Status s = gpu_->runProgram(one, B, T); !s.ok())
        return s;
      continue;
    }
    const KernelDesc &kd = p.kernels[k];
    // Every configuration starts from the same values of the buffers the
    // kernel touches (weights excepted: no kernel of a program writes them).
    std::set<uint32_t> touched;
    for (const OpDesc &op : kd.ops) {
      touched.insert(op.operands.begin(), op.operands.end());
      touched.insert(op.results.begin(), op.results.end());
    }
    std::vector<std::pair<uint32_t, std::vector<uint8_t>>> saved;
    for (uint32_t b : touched) {
      const BufferDesc &d = p.buffers[b];
      if (d.region == plan::Region::Weights)
        continue;
      std::vector<uint8_t> bytes(d.size);
      if (Status s = gpu_->download(d.region, d.offset, bytes.data(), d.size);
          !s.ok())
        return s;
      saved.emplace_back(b, std::move(bytes));
    }
    auto restore = [&]() -> Status {
      for (const auto &[b, bytes] : saved) {
        const BufferDesc &d = p.buffers[b];
        if (Status s = gpu_->upload(d.region, d.offset, bytes.data(), d.size);
            !s.ok())
          return s;
      }
      return Status::success();
    };
    std::set<uint32_t> results = gpuResults(kd);
    KernelFootprint fp = footprint(p, kd, B, T, pos0); // within `saved`
    // One configuration: its results (live elements) after one run from the
    // saved values, then the median time of `repeats` runs.
    auto measure = [&](uint32_t kernel, std::vector<std::vector<uint8_t>> &res,
                       double &median_ms) -> Status {
      if (Status s = restore(); !s.ok())
        return s;
      // As in checkKernels: what the kernel must not read is NaN, so a
      // configuration that reads stale bytes disagrees with its kernel.
      if (Status s = poisonDevice(*gpu_, fp); !s.ok())
        return s;
      ProgramDesc run = one;
      run.steps = {kernel};
      if (Status s = gpu_->runProgram(run, B, T); !s.ok())
        return s;
      res.clear();
      for (uint32_t b : results) {
        const BufferDesc &d = p.buffers[b];
        for (auto [at, bytes] : liveRanges(d, B, T, pos0)) {
          res.emplace_back(bytes);
          if (Status s = gpu_->download(d.region, at, res.back().data(), bytes);
              !s.ok())
            return s;
        }
      }
      std::vector<double> times;
      for (int64_t r = 0; r < repeats; ++r) {
        if (Status s = gpu_->profileProgram(run, B, T, ms); !s.ok())
          return s;
        times.push_back(ms.empty() ? 0 : ms[0]);
      }
      median_ms = median(times);
      return Status::success();
    };
    std::vector<std::vector<uint8_t>> ref, got;
    KernelTuning base;
    base.kernel = base.of = k;
    base.name = kd.name;
    base.signature = kd.signature;
    base.config = kd.tileConfig;
    if (Status s = measure(k, ref, base.ms); !s.ok())
      return s;
    out.push_back(base);
    for (uint32_t a : cands->second) {
      KernelTuning t = base;
      t.kernel = a;
      t.config = p.kernels[a].tileConfig;
      if (Status s = measure(a, got, t.ms); !s.ok())
        return s;
      KernelCheck c;
      size_t piece = 0;
      for (uint32_t b : results) {
        const BufferDesc &d = p.buffers[b];
        for (size_t i = 0; i < liveRanges(d, B, T, pos0).size();
             ++i, ++piece)
          if (Status s = compareValues(
                  d.dtype, got[piece].data(), ref[piece].data(),
                  got[piece].size() / dtypeSize(d.dtype),
                  "kernel '" + kd.name + "': result '" + d.name + "'", c);
              !s.ok())
            return s;
      }
      t.maxAbsErr = c.maxAbsErr;
      t.maxAbsRef = c.maxAbsRef;
      out.push_back(std::move(t));
    }
    // The program continues from the kernel's own results.
    if (Status s = restore(); !s.ok())
      return s;
    if (Status s = gpu_->runProgram(one, B, T); !s.ok())
      return s;
  }
  return gpu_->synchronize();
}

} // namespace l4c::rt
