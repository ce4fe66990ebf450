//===- c_api.cpp - the C API of libl4rt ----------------------------------===//
//
// Opaque handles over the C++ plan and session, status codes, and a
// thread-local error message. Every entry point catches everything: no
// exception crosses into C.
//
//===----------------------------------------------------------------------===//
#include "executor.h"
#include "l4c/runtime/l4rt.h"
#include "plan.h"

#include <algorithm>
#include <exception>
#include <new>
#include <string>
#include <vector>

struct l4rt_plan_s {
  std::shared_ptr<const l4c::rt::Plan> plan;
  l4c::rt::DeviceProbe probe; ///< l4rt_device_probe's strings and arrays
  std::vector<l4rt_kernel_code> probeCode;
};

struct l4rt_session_s {
  std::unique_ptr<l4c::rt::Session> session;
  std::string device; ///< l4rt_session_device()
  std::vector<l4c::rt::KernelCheck> checks; ///< l4rt_check_kernels
  std::vector<l4rt_kernel_check> checkViews;
  std::vector<l4c::rt::KernelTime> times; ///< l4rt_profile_kernels
  std::vector<l4rt_kernel_time> timeViews;
  std::vector<l4c::rt::KernelTuning> tunings; ///< l4rt_tune_kernels
  std::vector<l4rt_kernel_tuning> tuningViews;
};

namespace {

using l4c::rt::Status;
using l4c::rt::StatusCode;

thread_local std::string lastError;

l4rt_status toC(StatusCode c) {
  switch (c) {
  case StatusCode::Ok:
    return L4RT_OK;
  case StatusCode::InvalidArgument:
    return L4RT_ERROR_INVALID_ARGUMENT;
  case StatusCode::Io:
    return L4RT_ERROR_IO;
  case StatusCode::InvalidPlan:
    return L4RT_ERROR_INVALID_PLAN;
  case StatusCode::Unsupported:
    return L4RT_ERROR_UNSUPPORTED;
  case StatusCode::OutOfMemory:
    return L4RT_ERROR_OUT_OF_MEMORY;
  case StatusCode::Internal:
    return L4RT_ERROR_INTERNAL;
  }
  return L4RT_ERROR_INTERNAL;
}

l4rt_status report(const Status &s) {
  lastError = s.message;
  return toC(s.code);
}

l4rt_status invalid(const char *msg) {
  lastError = msg;
  return L4RT_ERROR_INVALID_ARGUMENT;
}

/// An index past the end of one of the plan's lists (`what`).
l4rt_status pastEnd(const char *fn, uint32_t index, size_t count,
                    const char *what) {
  return invalid((std::string(fn) + ": index " + std::to_string(index) +
                  " is past the plan's " + std::to_string(count) + " " + what)
                     .c_str());
}

/// Runs fn, turning any escaping exception into a status.
template <typename F> l4rt_status guarded(F &&fn) noexcept {
  try {
    lastError.clear();
    return fn();
  } catch (const std::bad_alloc &) {
    lastError = "out of memory";
    return L4RT_ERROR_OUT_OF_MEMORY;
  } catch (const std::exception &e) {
    try {
      lastError = std::string("internal error: ") + e.what();
    } catch (...) {
    }
    return L4RT_ERROR_INTERNAL;
  } catch (...) {
    lastError = "internal error: unknown exception";
    return L4RT_ERROR_INTERNAL;
  }
}

} // namespace

extern "C" {

const char *l4rt_last_error(void) { return lastError.c_str(); }

const char *l4rt_status_string(l4rt_status status) {
  switch (status) {
  case L4RT_OK:
    return "ok";
  case L4RT_ERROR_INVALID_ARGUMENT:
    return "invalid argument";
  case L4RT_ERROR_IO:
    return "i/o error";
  case L4RT_ERROR_INVALID_PLAN:
    return "invalid plan";
  case L4RT_ERROR_UNSUPPORTED:
    return "unsupported";
  case L4RT_ERROR_OUT_OF_MEMORY:
    return "out of memory";
  case L4RT_ERROR_INTERNAL:
    return "internal error";
  }
  return "unknown status";
}

l4rt_status l4rt_plan_load(const char *path, l4rt_plan *out_plan) {
  return guarded([&] {
    if (!path || !out_plan)
      return invalid("l4rt_plan_load: path and out_plan must not be null");
    *out_plan = nullptr;
    std::shared_ptr<const l4c::rt::Plan> plan;
    if (Status s = l4c::rt::Plan::load(path, plan); !s.ok())
      return report(s);
    *out_plan = new l4rt_plan_s{std::move(plan), {}, {}};
    return L4RT_OK;
  });
}

l4rt_status l4rt_plan_load_memory(const void *data, size_t size,
                                  l4rt_plan *out_plan) {
  return guarded([&] {
    if ((!data && size) || !out_plan)
      return invalid(
          "l4rt_plan_load_memory: data and out_plan must not be null");
    *out_plan = nullptr;
    const uint8_t *bytes = static_cast<const uint8_t *>(data);
    std::shared_ptr<const l4c::rt::Plan> plan;
    if (Status s = l4c::rt::Plan::fromBytes(
            std::vector<uint8_t>(bytes, bytes + size), "<memory>", plan);
        !s.ok())
      return report(s);
    *out_plan = new l4rt_plan_s{std::move(plan), {}, {}};
    return L4RT_OK;
  });
}

void l4rt_plan_free(l4rt_plan plan) { delete plan; }

l4rt_status l4rt_plan_info(l4rt_plan plan, l4rt_plan_summary *out) {
  return guarded([&] {
    if (!plan || !out)
      return invalid("l4rt_plan_info: plan and out_info must not be null");
    const l4c::rt::Plan &p = *plan->plan;
    using l4c::plan::Region;
    out->version = p.version;
    out->program_kind = p.programKind.c_str();
    out->target = p.target.c_str();
    out->precision = p.precision.c_str();
    out->model_source = p.modelSource.c_str();
    out->max_batch = p.maxBatch;
    out->max_seq = p.maxSeq;
    out->vocab_size = p.vocabSize;
    out->arena_size = p.regionSize[int(Region::Arena)];
    out->weights_size = p.regionSize[int(Region::Weights)];
    out->cache_size = p.regionSize[int(Region::Cache)];
    out->io_size = p.regionSize[int(Region::Io)];
    out->num_kernels = uint32_t(p.kernels.size());
    out->num_buffers = uint32_t(p.buffers.size());
    out->num_weights = uint32_t(p.weights.size());
    return L4RT_OK;
  });
}

l4rt_status l4rt_plan_num_programs(l4rt_plan plan, uint32_t *out) {
  return guarded([&] {
    if (!plan || !out)
      return invalid("l4rt_plan_num_programs: plan and out_count must not "
                     "be null");
    *out = uint32_t(plan->plan->programs.size());
    return L4RT_OK;
  });
}

l4rt_status l4rt_plan_program(l4rt_plan plan, uint32_t index,
                              l4rt_program_info *out) {
  return guarded([&] {
    if (!plan || !out)
      return invalid("l4rt_plan_program: plan and out_info must not be null");
    const auto &programs = plan->plan->programs;
    if (index >= programs.size())
      return pastEnd("l4rt_plan_program", index, programs.size(), "programs");
    const l4c::rt::ProgramDesc &p = programs[index];
    out->name = p.name.c_str();
    out->num_steps = uint32_t(p.steps.size());
    out->steps = p.steps.data();
    return L4RT_OK;
  });
}

l4rt_status l4rt_plan_kernel(l4rt_plan plan, uint32_t index,
                             l4rt_kernel_info *out) {
  return guarded([&] {
    if (!plan || !out)
      return invalid("l4rt_plan_kernel: plan and out_info must not be null");
    const l4c::rt::Plan &p = *plan->plan;
    if (index >= p.kernels.size())
      return pastEnd("l4rt_plan_kernel", index, p.kernels.size(), "kernels");
    const l4c::rt::KernelDesc &k = p.kernels[index];
    // The launch fields live only in the verified FlatBuffers root, whose
    // kernels are in the same order as Plan::kernels.
    const l4c::plan::Kernel *fb = p.root().kernels()->Get(index);
    out->name = k.name.c_str();
    out->kind = k.kind.c_str();
    out->num_ops = uint32_t(k.ops.size());
    out->tile_config = k.tileConfig.c_str();
    out->signature = k.signature.c_str();
    out->alternative_of = k.alternativeOf;
    out->blocks = fb->blocks();
    out->threads = fb->threads();
    out->shared_bytes = fb->shared_bytes();
    out->cubin_bytes = fb->cubin() ? fb->cubin()->size() : 0;
    out->num_tensor_maps = uint32_t(k.tensorMaps.size());
    out->grid_wait = k.gridWait ? 1 : 0;
    return L4RT_OK;
  });
}

l4rt_session_options l4rt_session_options_default(void) {
  l4rt_session_options o;
  o.weights_dir = nullptr;
  o.random_seed = 0;
  o.device = nullptr;
  return o;
}

l4rt_status l4rt_session_create_with(l4rt_plan plan,
                                     const l4rt_session_options *options,
                                     l4rt_session *out_session) {
  return guarded([&] {
    if (!plan || !options || !out_session)
      return invalid("l4rt_session_create: plan, options and out_session "
                     "must not be null");
    *out_session = nullptr;
    l4c::rt::SessionOptions opts;
    if (options->weights_dir) {
      opts.weightsPath = options->weights_dir;
      if (opts.weightsPath.empty())
        return invalid("l4rt_session_create: weights_dir is empty (pass NULL "
                       "for random weights)");
    }
    opts.randomSeed = options->random_seed;
    if (options->device && *options->device)
      opts.device = options->device;
    std::unique_ptr<l4c::rt::Session> session;
    if (Status s = l4c::rt::Session::create(plan->plan, opts, session); !s.ok())
      return report(s);
    std::string device = session->deviceName();
    auto *handle = new l4rt_session_s;
    handle->session = std::move(session);
    handle->device = std::move(device);
    *out_session = handle;
    return L4RT_OK;
  });
}

l4rt_status l4rt_device_probe(l4rt_plan plan, const char *device,
                              l4rt_device_report *out) {
  return guarded([&] {
    if (!plan || !device || !out)
      return invalid("l4rt_device_probe: plan, device and out_report must "
                     "not be null");
    l4c::rt::DeviceProbe r;
    if (Status s = l4c::rt::probeDevice(plan->plan, device, r); !s.ok())
      return report(s);
    plan->probe = std::move(r);
    const l4c::rt::DeviceProbe &p = plan->probe;
    *out = l4rt_device_report{};
    out->device_name = p.deviceName.c_str();
    out->arch = p.arch.c_str();
    out->multiprocessors = p.multiprocessors;
    out->free_bytes = p.freeBytes;
    out->total_bytes = p.totalBytes;
    out->need_bytes = p.needBytes;
    out->need_detail = p.needDetail.c_str();
    out->fits = p.fits;
    out->kernels = uint32_t(p.kernels);
    out->modules = uint32_t(p.modules);
    out->modules_from_plan = uint32_t(p.modulesFromPlan);
    out->modules_compiled = uint32_t(p.modulesCompiled);
    out->max_registers = p.maxRegisters;
    out->max_registers_kernel = p.maxRegistersKernel.c_str();
    out->local_memory_kernels = uint32_t(p.localMemoryKernels);
    out->max_local_bytes = p.maxLocalBytes;
    plan->probeCode.clear();
    for (const auto &c : p.code)
      plan->probeCode.push_back(
          {c.registers, c.localBytes, c.staticShared, c.maxThreads});
    out->code = plan->probeCode.data();
    return L4RT_OK;
  });
}

l4rt_status l4rt_session_create(l4rt_plan plan, const char *weights_dir,
                                uint64_t random_seed,
                                l4rt_session *out_session) {
  l4rt_session_options o = l4rt_session_options_default();
  o.weights_dir = weights_dir;
  o.random_seed = random_seed;
  return l4rt_session_create_with(plan, &o, out_session);
}

l4rt_status l4rt_check_kernels(l4rt_session session, const char *program,
                               const int64_t *ids, int64_t batch, int64_t seq,
                               int64_t pos0,
                               const l4rt_kernel_check **out_checks,
                               size_t *out_count) {
  return guarded([&] {
    if (!session || !program || !out_checks || !out_count)
      return invalid("l4rt_check_kernels: session, program and outputs must "
                     "not be null");
    session->checks.clear();
    session->checkViews.clear();
    Status s = session->session->checkKernels(program, ids, batch, seq, pos0,
                                              session->checks);
    for (const l4c::rt::KernelCheck &c : session->checks) {
      l4rt_kernel_check v;
      v.kernel = c.kernel;
      v.name = c.name.c_str();
      v.program = c.program.c_str();
      v.buffer = c.buffer.c_str();
      v.integer = c.integer;
      v.max_abs_err = c.maxAbsErr;
      v.max_abs_ref = c.maxAbsRef;
      v.mismatches = c.mismatches;
      v.elements = c.elements;
      v.stray_bytes = c.strayBytes;
      v.stray_at = c.strayAt.c_str();
      session->checkViews.push_back(v);
    }
    *out_checks = session->checkViews.data();
    *out_count = session->checkViews.size();
    return report(s);
  });
}

l4rt_status l4rt_profile_kernels(l4rt_session session, const char *program,
                                 const int64_t *ids, int64_t batch, int64_t seq,
                                 int64_t pos0, int64_t repeats,
                                 const l4rt_kernel_time **out_times,
                                 size_t *out_count) {
  return guarded([&] {
    if (!session || !program || !out_times || !out_count)
      return invalid("l4rt_profile_kernels: session, program and outputs "
                     "must not be null");
    session->times.clear();
    session->timeViews.clear();
    Status s = session->session->profileKernels(program, ids, batch, seq, pos0,
                                                repeats, session->times);
    for (const l4c::rt::KernelTime &t : session->times)
      session->timeViews.push_back(
          {t.kernel, t.name.c_str(), t.kind.c_str(), t.ms});
    *out_times = session->timeViews.data();
    *out_count = session->timeViews.size();
    return report(s);
  });
}

l4rt_status l4rt_tune_kernels(l4rt_session session, const char *program,
                              const int64_t *ids, int64_t batch, int64_t seq,
                              int64_t pos0, int64_t repeats,
                              const l4rt_kernel_tuning **out_rows,
                              size_t *out_count) {
  return guarded([&] {
    if (!session || !program || !out_rows || !out_count)
      return invalid("l4rt_tune_kernels: session, program and outputs must "
                     "not be null");
    session->tunings.clear();
    session->tuningViews.clear();
    Status s = session->session->tuneKernels(program, ids, batch, seq, pos0,
                                             repeats, session->tunings);
    for (const l4c::rt::KernelTuning &t : session->tunings)
      session->tuningViews.push_back({t.kernel, t.of, t.name.c_str(),
                                      t.signature.c_str(), t.config.c_str(),
                                      t.ms, t.maxAbsErr, t.maxAbsRef});
    *out_rows = session->tuningViews.data();
    *out_count = session->tuningViews.size();
    return report(s);
  });
}

const char *l4rt_session_device(l4rt_session session) {
  return session ? session->device.c_str() : "";
}

void l4rt_session_free(l4rt_session session) { delete session; }

l4rt_status l4rt_forward(l4rt_session session, const int64_t *ids,
                         int64_t batch, int64_t seq, float *logits_out) {
  return guarded([&] {
    if (!session)
      return invalid("l4rt_forward: session must not be null");
    return report(session->session->forward(ids, batch, seq, logits_out));
  });
}

l4rt_status l4rt_generate(l4rt_session session, const int64_t *ids,
                          int64_t batch, int64_t seq, int64_t max_new_tokens,
                          const l4rt_sampling *sampling, int64_t *out_ids,
                          int64_t *out_len) {
  return guarded([&] {
    if (!session)
      return invalid("l4rt_generate: session must not be null");
    l4c::rt::Sampling s;
    if (sampling) {
      s.temperature = sampling->temperature;
      s.topP = sampling->top_p;
      s.seed = sampling->seed;
    }
    return report(session->session->generate(ids, batch, seq, max_new_tokens,
                                             sampling ? &s : nullptr, out_ids,
                                             out_len));
  });
}

l4rt_status l4rt_session_timing(l4rt_session session, l4rt_timing *out) {
  return guarded([&] {
    if (!session || !out)
      return invalid(
          "l4rt_session_timing: session and out_timing must not be null");
    l4c::rt::Timing t = session->session->lastTiming();
    out->prefill_seconds = t.prefillSeconds;
    out->decode_seconds = t.decodeSeconds;
    out->prefill_tokens = t.prefillTokens;
    out->decode_tokens = t.decodeTokens;
    return L4RT_OK;
  });
}

l4rt_status l4rt_train_step(l4rt_session session, const int64_t *ids,
                            int64_t batch, int64_t seq, float *loss) {
  return guarded([&] {
    if (!session)
      return invalid("l4rt_train_step: session must not be null");
    return report(session->session->trainStep(ids, batch, seq, loss));
  });
}

void l4rt_adamw_defaults(l4rt_adamw *out) {
  if (!out)
    return;
  l4c::rt::AdamWParams d;
  *out = {d.lr, d.beta1, d.beta2, d.eps, d.weightDecay};
}

l4rt_status l4rt_adamw_step(l4rt_session session, const l4rt_adamw *hyper) {
  return guarded([&] {
    if (!session || !hyper)
      return invalid("l4rt_adamw_step: session and hyper must not be null");
    l4c::rt::AdamWParams h;
    h.lr = hyper->lr;
    h.beta1 = hyper->beta1;
    h.beta2 = hyper->beta2;
    h.eps = hyper->eps;
    h.weightDecay = hyper->weight_decay;
    return report(session->session->adamwStep(h));
  });
}

l4rt_status l4rt_zero_grad(l4rt_session session) {
  return guarded([&] {
    if (!session)
      return invalid("l4rt_zero_grad: session must not be null");
    session->session->zeroGrad();
    return L4RT_OK;
  });
}

l4rt_status l4rt_num_parameters(l4rt_session session, size_t *out_count) {
  return guarded([&] {
    if (!session || !out_count)
      return invalid(
          "l4rt_num_parameters: session and out_count must not be null");
    *out_count = session->session->plan().weights.size();
    return L4RT_OK;
  });
}

l4rt_status l4rt_parameter_name(l4rt_session session, size_t index,
                                const char **out_name) {
  return guarded([&] {
    if (!session || !out_name)
      return invalid(
          "l4rt_parameter_name: session and out_name must not be null");
    const auto &w = session->session->plan().weights;
    if (index >= w.size()) {
      lastError = "l4rt_parameter_name: index " + std::to_string(index) +
                  " is outside the plan's " + std::to_string(w.size()) +
                  " parameters";
      return L4RT_ERROR_INVALID_ARGUMENT;
    }
    *out_name = w[index].hfName.c_str();
    return L4RT_OK;
  });
}

l4rt_status l4rt_tensor_shape(l4rt_session session, const char *name,
                              int64_t *out_shape, size_t max_rank,
                              size_t *out_rank) {
  return guarded([&] {
    if (!session || !name || !out_rank || (max_rank && !out_shape))
      return invalid("l4rt_tensor_shape: session, name, out_shape and "
                     "out_rank must not be null");
    std::vector<int64_t> shape;
    if (Status s = session->session->tensorShape(name, shape); !s.ok())
      return report(s);
    *out_rank = shape.size();
    if (shape.size() > max_rank) {
      lastError = std::string("l4rt_tensor_shape: tensor '") + name +
                  "' has rank " + std::to_string(shape.size()) +
                  ", more than max_rank " + std::to_string(max_rank);
      return L4RT_ERROR_INVALID_ARGUMENT;
    }
    std::copy(shape.begin(), shape.end(), out_shape);
    return L4RT_OK;
  });
}

l4rt_status l4rt_get_tensor(l4rt_session session, const char *name, float *dst,
                            size_t numel) {
  return guarded([&] {
    if (!session || !name)
      return invalid("l4rt_get_tensor: session and name must not be null");
    return report(session->session->readTensor(name, dst, numel));
  });
}

l4rt_status l4rt_set_counter(l4rt_session session, const char *name,
                             int64_t value) {
  return guarded([&] {
    if (!session || !name)
      return invalid("l4rt_set_counter: session and name must not be null");
    return report(session->session->setCounter(name, value));
  });
}

l4rt_status l4rt_get_counter(l4rt_session session, const char *name,
                             int64_t *out_value) {
  return guarded([&] {
    if (!session || !name || !out_value)
      return invalid(
          "l4rt_get_counter: session, name and out_value must not be null");
    return report(session->session->getCounter(name, *out_value));
  });
}

l4rt_status l4rt_save_checkpoint(l4rt_session session, const char *dir) {
  return guarded([&] {
    if (!session || !dir)
      return invalid("l4rt_save_checkpoint: session and dir must not be null");
    return report(session->session->saveCheckpoint(dir));
  });
}

l4rt_status l4rt_load_optimizer(l4rt_session session, const char *dir) {
  return guarded([&] {
    if (!session || !dir)
      return invalid("l4rt_load_optimizer: session and dir must not be null");
    return report(session->session->loadOptimizer(dir));
  });
}

} // extern "C"
