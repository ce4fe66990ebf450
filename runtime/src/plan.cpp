//===- plan.cpp - plan loader and verifier -------------------------------===//
//
// Nothing in a plan file is trusted: the FlatBuffers verifier runs before any
// field is read, then every index, extent, attribute and aliasing rule the
// executor relies on is checked, so a corrupted plan fails with a message.
//
//===----------------------------------------------------------------------===//
#include "plan.h"
#include "cpu/kernels.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

namespace l4c::rt {

const char *opKindName(OpKind k) {
  switch (k) {
  case OpKind::Embedding:
    return "embedding";
  case OpKind::RmsNorm:
    return "rms_norm";
  case OpKind::L2Norm:
    return "l2_norm";
  case OpKind::Linear:
    return "linear";
  case OpKind::Rope:
    return "rope";
  case OpKind::TemperatureScale:
    return "temperature_scale";
  case OpKind::KvCacheUpdate:
    return "kv_cache_update";
  case OpKind::Attention:
    return "attention";
  case OpKind::RouterScores:
    return "router_scores";
  case OpKind::MoeExperts:
    return "moe_experts";
  case OpKind::MoeRoute:
    return "moe_route";
  case OpKind::MoeHidden:
    return "moe_hidden";
  case OpKind::MoeDown:
    return "moe_down";
  case OpKind::Swiglu:
    return "swiglu";
  case OpKind::Add:
    return "add";
  case OpKind::Convert:
    return "convert";
  case OpKind::TakeLast:
    return "take_last";
  case OpKind::CrossEntropy:
    return "cross_entropy";
  case OpKind::CrossEntropyGrad:
    return "cross_entropy_grad";
  case OpKind::CrossEntropyStats:
    return "cross_entropy_stats";
  case OpKind::CrossEntropyFromStats:
    return "cross_entropy_from_stats";
  case OpKind::CrossEntropyGradChunk:
    return "cross_entropy_grad_chunk";
  case OpKind::LinearGradInput:
    return "linear_grad_input";
  case OpKind::LinearGradWeight:
    return "linear_grad_weight";
  case OpKind::RmsNormGrad:
    return "rms_norm_grad";
  case OpKind::L2NormGrad:
    return "l2_norm_grad";
  case OpKind::AttentionGrad:
    return "attention_grad";
  case OpKind::RouterScoresGrad:
    return "router_scores_grad";
  case OpKind::MoeExpertsGrad:
    return "moe_experts_grad";
  case OpKind::MoeGateUp:
    return "moe_gate_up";
  case OpKind::MoeDownGrad:
    return "moe_down_grad";
  case OpKind::MoeDownGradWeight:
    return "moe_down_grad_weight";
  case OpKind::MoeGateUpGradInput:
    return "moe_gate_up_grad_input";
  case OpKind::MoeCombineGrad:
    return "moe_combine_grad";
  case OpKind::MoeGateUpGradWeight:
    return "moe_gate_up_grad_weight";
  case OpKind::SwigluGrad:
    return "swiglu_grad";
  case OpKind::EmbeddingGrad:
    return "embedding_grad";
  }
  return "?";
}

size_t dtypeSize(plan::DType t) {
  switch (t) {
  case plan::DType::F32:
  case plan::DType::I32:
    return 4;
  case plan::DType::BF16:
  case plan::DType::F16:
    return 2;
  case plan::DType::I64:
    return 8;
  }
  return 0;
}

std::string byteSize(uint64_t bytes) {
  if (bytes < 1024)
    return std::to_string(bytes) + " bytes";
  static const char *units[] = {"KiB", "MiB", "GiB", "TiB"};
  double v = double(bytes) / 1024;
  int u = 0;
  while (v >= 1024 && u < 3) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f %s", v, units[u]);
  return buf;
}

const char *regionName(plan::Region r) {
  switch (r) {
  case plan::Region::Arena:
    return "arena";
  case plan::Region::Weights:
    return "weights";
  case plan::Region::Cache:
    return "cache";
  case plan::Region::Io:
    return "io";
  }
  return "?";
}

const char *dtypeName(plan::DType t) {
  switch (t) {
  case plan::DType::F32:
    return "f32";
  case plan::DType::BF16:
    return "bf16";
  case plan::DType::F16:
    return "f16";
  case plan::DType::I64:
    return "i64";
  case plan::DType::I32:
    return "i32";
  }
  return "?";
}

bool isFloat(plan::DType t) {
  return t == plan::DType::F32 || t == plan::DType::BF16 ||
         t == plan::DType::F16;
}
bool isIndex(plan::DType t) {
  return t == plan::DType::I64 || t == plan::DType::I32;
}

const ProgramDesc *Plan::program(std::string_view name) const {
  for (const ProgramDesc &p : programs)
    if (p.name == name)
      return &p;
  return nullptr;
}

namespace {

struct OpSpec {
  const char *name;
  OpKind kind;
  unsigned operands, results;
  unsigned optionalOperands = 0; ///< trailing operands that may be absent
};

constexpr OpSpec kOpSpecs[] = {
    {"embedding", OpKind::Embedding, 2, 1},
    {"rms_norm", OpKind::RmsNorm, 2, 1},
    {"l2_norm", OpKind::L2Norm, 1, 1},
    {"linear", OpKind::Linear, 2, 1},
    {"rope", OpKind::Rope, 2, 1},
    {"temperature_scale", OpKind::TemperatureScale, 2, 1},
    {"kv_cache_update", OpKind::KvCacheUpdate, 3, 1},
    {"attention", OpKind::Attention, 4, 1},
    {"router_scores", OpKind::RouterScores, 1, 1},
    {"moe_experts", OpKind::MoeExperts, 4, 1},
    {"moe_route", OpKind::MoeRoute, 1, 1},
    {"moe_hidden", OpKind::MoeHidden, 4, 1},
    {"moe_down", OpKind::MoeDown, 4, 1},
    {"swiglu", OpKind::Swiglu, 2, 1},
    {"add", OpKind::Add, 2, 1},
    {"convert", OpKind::Convert, 1, 1},
    {"take_last", OpKind::TakeLast, 1, 1},
    {"cross_entropy", OpKind::CrossEntropy, 2, 1},
    {"cross_entropy_grad", OpKind::CrossEntropyGrad, 2, 1},
    {"cross_entropy_stats", OpKind::CrossEntropyStats, 3, 1, 1},
    {"cross_entropy_from_stats", OpKind::CrossEntropyFromStats, 2, 1},
    {"cross_entropy_grad_chunk", OpKind::CrossEntropyGradChunk, 3, 1},
    {"linear_grad_input", OpKind::LinearGradInput, 2, 1},
    {"linear_grad_weight", OpKind::LinearGradWeight, 2, 1},
    {"rms_norm_grad", OpKind::RmsNormGrad, 3, 2},
    {"l2_norm_grad", OpKind::L2NormGrad, 2, 1},
    {"attention_grad", OpKind::AttentionGrad, 5, 3},
    {"router_scores_grad", OpKind::RouterScoresGrad, 2, 1},
    {"moe_experts_grad", OpKind::MoeExpertsGrad, 5, 4},
    {"moe_gate_up", OpKind::MoeGateUp, 4, 1},
    {"moe_down_grad", OpKind::MoeDownGrad, 5, 1},
    {"moe_down_grad_weight", OpKind::MoeDownGradWeight, 4, 1},
    {"moe_gate_up_grad_input", OpKind::MoeGateUpGradInput, 4, 1},
    {"moe_combine_grad", OpKind::MoeCombineGrad, 3, 2},
    {"moe_gate_up_grad_weight", OpKind::MoeGateUpGradWeight, 4, 1},
    {"swiglu_grad", OpKind::SwigluGrad, 3, 2},
    {"embedding_grad", OpKind::EmbeddingGrad, 2, 1},
};

/// Operands that hold token ids or positions rather than floats.
bool isIndexOperand(OpKind k, size_t i) {
  switch (k) {
  case OpKind::Embedding:
  case OpKind::Rope:
  case OpKind::TemperatureScale:
  case OpKind::CrossEntropy:
  case OpKind::CrossEntropyGrad:
  case OpKind::CrossEntropyStats:
  case OpKind::CrossEntropyFromStats:
  case OpKind::CrossEntropyGradChunk:
    return i == 1;
  case OpKind::KvCacheUpdate:
    return i == 2;
  case OpKind::Attention:
  case OpKind::AttentionGrad:
    return i == 3;
  case OpKind::EmbeddingGrad:
    return i == 0;
  case OpKind::MoeHidden:
  case OpKind::MoeDown:
  case OpKind::MoeGateUp:
  case OpKind::MoeDownGradWeight:
  case OpKind::MoeGateUpGradInput:
  case OpKind::MoeGateUpGradWeight:
    return i == 3; // the route table
  case OpKind::MoeDownGrad:
    return i == 4;
  default:
    return false;
  }
}

std::string str(const flatbuffers::String *s) {
  return s ? s->str() : std::string();
}

std::string shapeStr(const std::vector<int64_t> &shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i)
    s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

template <typename T> std::string listStr(const std::vector<T> &v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i)
    s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

bool overlaps(const BufferDesc &a, const BufferDesc &b) {
  return a.region == b.region && a.offset < b.offset + b.size &&
         b.offset < a.offset + a.size;
}
bool sameBytes(const BufferDesc &a, const BufferDesc &b) {
  return a.region == b.region && a.offset == b.offset && a.size == b.size;
}
bool sameLayout(const BufferDesc &a, const BufferDesc &b) {
  return a.shape == b.shape && a.dims == b.dims;
}

/// True when a (rows of fa elements) and b (rows of fb elements) walk the
/// same tokens: same batch extent, same sequence structure, and as many rows
/// per sequence position (or per batch entry) in each.
bool tokenAligned(const BufferDesc &a, uint64_t fa, const BufferDesc &b,
                  uint64_t fb) {
  if (!a.hasBatch || !b.hasBatch || a.shape[0] != b.shape[0] ||
      a.hasSeq != b.hasSeq)
    return false;
  if (a.hasSeq && a.shape[1] != b.shape[1])
    return false;
  uint64_t ua = a.hasSeq ? a.rowStride : a.batchStride;
  uint64_t ub = b.hasSeq ? b.rowStride : b.batchStride;
  if (fa == 0 || fb == 0 || ua % fa || ub % fb)
    return false;
  return ua / fa == ub / fb;
}

} // namespace

/// Runs every check and fills the Plan's decoded fields. Friend of Plan.
class PlanVerifier {
public:
  explicit PlanVerifier(Plan &p) : p(p) {}
  Status run();

private:
  Status fail(const std::string &msg) const {
    return Status::fail(StatusCode::InvalidPlan, p.label_ + ": " + msg);
  }
  std::string bufName(uint32_t i) const {
    const std::string &n = p.buffers[i].name;
    return "buffer " + std::to_string(i) + (n.empty() ? "" : " '" + n + "'");
  }
  Status checkHeader(const plan::Plan &fb);
  Status checkBuffers(const plan::Plan &fb);
  Status checkRegionAliasing(plan::Region region);
  Status checkWeights(const plan::Plan &fb);
  Status checkKernels(const plan::Plan &fb);
  Status checkTensorMap(const std::string &where, const plan::TensorMap &m,
                        TensorMapDesc &d);
  Status checkOp(const std::string &where, const plan::SemanticOp &op,
                 OpDesc &out);
  Status checkOpShapes(const std::string &where, OpDesc &d,
                       const std::map<std::string, const plan::Attr *> &attrs);
  Status checkPrograms(const plan::Plan &fb);
  Status checkTrainOutputs(const std::string &where, ProgramDesc &pd,
                           const std::map<std::string, uint32_t> &grads);
  Status checkWritten(const std::string &where, const ProgramDesc &pd);

  Plan &p;
};

Status PlanVerifier::run() {
  const std::vector<uint8_t> &bytes = p.bytes_;
  if (bytes.size() < 8 || !plan::PlanBufferHasIdentifier(bytes.data()))
    return fail("not an l4c plan (file identifier is not \"L4CP\")");
  if (bytes.size() >= FLATBUFFERS_MAX_BUFFER_SIZE)
    return fail("plan of " + std::to_string(bytes.size()) +
                " bytes is larger than 2 GiB");
  flatbuffers::Verifier verifier(bytes.data(), bytes.size());
  if (!plan::VerifyPlanBuffer(verifier))
    return fail("corrupted plan: flatbuffers verification failed");
  const plan::Plan &fb = *plan::GetPlan(bytes.data());
  for (Status s : {checkHeader(fb), checkBuffers(fb)})
    if (!s.ok())
      return s;
  for (plan::Region r : {plan::Region::Weights, plan::Region::Cache})
    if (Status s = checkRegionAliasing(r); !s.ok())
      return s;
  if (Status s = checkWeights(fb); !s.ok())
    return s;
  if (Status s = checkKernels(fb); !s.ok())
    return s;
  return checkPrograms(fb);
}

Status PlanVerifier::checkHeader(const plan::Plan &fb) {
  // The version decides how everything else is read, so it comes first.
  p.version = fb.version();
  if (p.version != kPlanVersion)
    return fail("plan version " + std::to_string(p.version) +
                " is not supported by this runtime (expects " +
                std::to_string(kPlanVersion) + ")");
  p.programKind = str(fb.program_kind());
  p.target = str(fb.target());
  p.precision = str(fb.precision());
  if (p.programKind != "forward" && p.programKind != "generate" &&
      p.programKind != "train")
    return fail("program_kind '" + p.programKind +
                "' is not supported by this runtime (expects forward, "
                "generate or train)");
  p.maxBatch = fb.max_batch();
  p.maxSeq = fb.max_seq();
  if (p.maxBatch < 1 || p.maxSeq < 1)
    return fail("max_batch " + std::to_string(p.maxBatch) + " and max_seq " +
                std::to_string(p.maxSeq) + " must both be at least 1");
  if (!fb.model())
    return fail("model info is missing");
  p.vocabSize = fb.model()->vocab_size();
  p.modelSource = str(fb.model()->source());
  p.configJson = str(fb.model()->config_json());
  if (p.vocabSize < 1)
    return fail("model vocab_size " + std::to_string(p.vocabSize) +
                " must be at least 1");
  p.meshRanks = fb.mesh() ? fb.mesh()->ranks() : 1;
  if (p.meshRanks < 1)
    return fail("mesh ranks must be at least 1");
  p.regionSize[int(plan::Region::Arena)] = fb.arena_size();
  p.regionSize[int(plan::Region::Weights)] = fb.weights_size();
  p.regionSize[int(plan::Region::Cache)] = fb.cache_size();
  p.regionSize[int(plan::Region::Io)] = fb.io_size();
  return Status::success();
}

Status PlanVerifier::checkBuffers(const plan::Plan &fb) {
  if (!fb.buffers())
    return fail("buffers are missing");
  p.buffers.resize(fb.buffers()->size());
  for (uint32_t i = 0; i < fb.buffers()->size(); ++i) {
    const plan::Buffer *b = fb.buffers()->Get(i);
    BufferDesc &d = p.buffers[i];
    d.name = str(b->name());
    std::string what = bufName(i);
    if (int(b->region()) < 0 || int(b->region()) > int(plan::Region::Io))
      return fail(what + ": unknown region " +
                  std::to_string(int(b->region())));
    if (dtypeSize(b->dtype()) == 0)
      return fail(what + ": unknown dtype " + std::to_string(int(b->dtype())));
    d.region = b->region();
    d.dtype = b->dtype();
    d.offset = b->offset();
    d.size = b->size();
    // An empty shape is a scalar (the loss); an absent one is a broken plan.
    if (!b->shape())
      return fail(what + ": shape is missing");
    size_t nDims = b->dims() ? b->dims()->size() : 0;
    if (nDims != b->shape()->size())
      return fail(what + ": dims has " + std::to_string(nDims) +
                  " entries for a shape of rank " +
                  std::to_string(b->shape()->size()));
    d.shape.assign(b->shape()->begin(), b->shape()->end());
    uint64_t numel = 1;
    for (int64_t e : d.shape) {
      if (e < 1)
        return fail(what + ": shape " + shapeStr(d.shape) +
                    " has an extent below 1");
      if (__builtin_mul_overflow(numel, uint64_t(e), &numel))
        return fail(what + ": shape " + shapeStr(d.shape) + " overflows");
    }
    d.numel = numel;
    uint64_t bytes;
    if (__builtin_mul_overflow(numel, uint64_t(dtypeSize(d.dtype)), &bytes) ||
        bytes != d.size)
      return fail(what + ": size " + std::to_string(d.size) +
                  " does not match shape " + shapeStr(d.shape) + " of " +
                  dtypeName(d.dtype));
    if (d.offset % dtypeSize(d.dtype) != 0)
      return fail(what + ": offset " + std::to_string(d.offset) +
                  " is not a multiple of its " + dtypeName(d.dtype) +
                  " element size");
    uint64_t end;
    uint64_t limit = p.regionSize[int(d.region)];
    if (__builtin_add_overflow(d.offset, d.size, &end) || end > limit)
      return fail(what + ": bytes [" + std::to_string(d.offset) + ", " +
                  std::to_string(d.offset) + " + " + std::to_string(d.size) +
                  ") lie outside the " + regionName(d.region) + " region of " +
                  std::to_string(limit) + " bytes");
    for (size_t k = 0; k < d.shape.size(); ++k) {
      plan::DimKind dk = b->dims()->Get(k);
      if (int(dk) < 0 || int(dk) > int(plan::DimKind::Seq))
        return fail(what + ": dim " + std::to_string(k) + " has unknown kind " +
                    std::to_string(int(dk)));
      d.dims.push_back(dk);
    }
    // Token-major layout: batch first, then seq; nothing else is run-time.
    for (size_t k = 0; k < d.dims.size(); ++k) {
      if (d.dims[k] == plan::DimKind::Batch && k != 0)
        return fail(what + ": batch dim at position " + std::to_string(k) +
                    " (must be the first)");
      if (d.dims[k] == plan::DimKind::Seq &&
          (k != 1 || d.dims[0] != plan::DimKind::Batch))
        return fail(what + ": seq dim at position " + std::to_string(k) +
                    " (must follow the batch dim)");
    }
    d.hasBatch = !d.dims.empty() && d.dims[0] == plan::DimKind::Batch;
    d.hasSeq = d.dims.size() > 1 && d.dims[1] == plan::DimKind::Seq;
    if (d.hasBatch && d.shape[0] != p.maxBatch)
      return fail(what + ": batch extent " + std::to_string(d.shape[0]) +
                  " differs from max_batch " + std::to_string(p.maxBatch));
    if (d.hasSeq && d.shape[1] > p.maxSeq)
      return fail(what + ": seq extent " + std::to_string(d.shape[1]) +
                  " exceeds max_seq " + std::to_string(p.maxSeq));
    if (d.region == plan::Region::Weights && d.hasBatch)
      return fail(what + ": a weights buffer cannot have a batch or seq dim");
    d.batchStride = d.hasBatch ? numel / uint64_t(d.shape[0]) : numel;
    d.rowStride = d.hasSeq ? d.batchStride / uint64_t(d.shape[1]) : 0;
  }
  return Status::success();
}

Status PlanVerifier::checkRegionAliasing(plan::Region region) {
  // Weights and caches persist, so two buffers there are the same bytes (a
  // view, an in-place update), one lies inside the other (a row slice of a
  // weight), or they do not touch.
  std::vector<uint32_t> idx;
  for (uint32_t i = 0; i < p.buffers.size(); ++i)
    if (p.buffers[i].region == region)
      idx.push_back(i);
  std::sort(idx.begin(), idx.end(), [&](uint32_t a, uint32_t b) {
    const BufferDesc &x = p.buffers[a], &y = p.buffers[b];
    return x.offset != y.offset ? x.offset < y.offset : x.size > y.size;
  });
  uint64_t maxEnd = 0;
  for (size_t k = 0; k < idx.size(); ++k) {
    const BufferDesc &d = p.buffers[idx[k]];
    if (k > 0 && sameBytes(d, p.buffers[idx[k - 1]]))
      continue;
    // Sorted by offset, then the larger first: the buffer reaching maxEnd
    // starts at or before d.
    if (d.offset < maxEnd && d.offset + d.size <= maxEnd)
      continue;
    if (d.offset < maxEnd) {
      uint32_t other = idx[k - 1];
      for (size_t j = 0; j < k; ++j)
        if (overlaps(p.buffers[idx[j]], d))
          other = idx[j];
      return fail(bufName(idx[k]) + " partially overlaps " + bufName(other) +
                  " in the " + regionName(region) + " region");
    }
    maxEnd = std::max(maxEnd, d.offset + d.size);
  }
  return Status::success();
}

Status PlanVerifier::checkWeights(const plan::Plan &fb) {
  if (!fb.weights())
    return Status::success();
  std::set<uint32_t> bound;
  for (uint32_t i = 0; i < fb.weights()->size(); ++i) {
    const plan::WeightBinding *w = fb.weights()->Get(i);
    std::string what = "weight binding " + std::to_string(i);
    if (w->buffer() >= p.buffers.size())
      return fail(what + ": buffer index " + std::to_string(w->buffer()) +
                  " out of range (" + std::to_string(p.buffers.size()) +
                  " buffers)");
    std::string hf = str(w->hf_name());
    if (hf.empty())
      return fail(what + ": hf_name is missing");
    what += " '" + hf + "'";
    const BufferDesc &b = p.buffers[w->buffer()];
    if (b.region != plan::Region::Weights)
      return fail(what + ": " + bufName(w->buffer()) + " is in the " +
                  regionName(b.region) + " region, not weights");
    for (uint32_t o : bound)
      if (overlaps(p.buffers[o], b))
        return fail(what + ": " + bufName(w->buffer()) + " shares bytes with " +
                    bufName(o) + ", which is bound to another tensor");
    bound.insert(w->buffer());
    p.weights.push_back({w->buffer(), hf});
  }
  return Status::success();
}

Status PlanVerifier::checkKernels(const plan::Plan &fb) {
  if (!fb.kernels())
    return fail("kernels are missing");
  p.kernels.resize(fb.kernels()->size());
  for (uint32_t k = 0; k < fb.kernels()->size(); ++k) {
    const plan::Kernel *kernel = fb.kernels()->Get(k);
    KernelDesc &kd = p.kernels[k];
    kd.name = str(kernel->name());
    kd.kind = str(kernel->kind());
    kd.tileConfig = str(kernel->tile_config());
    kd.signature = str(kernel->signature());
    kd.alternativeOf = kernel->alternative_of();
    kd.gridWait = kernel->grid_wait();
    std::string kwhere = "kernel " + std::to_string(k) +
                         (kd.name.empty() ? "" : " '" + kd.name + "'");
    if (kd.alternativeOf < -1 || kd.alternativeOf >= int32_t(k) ||
        (kd.alternativeOf >= 0 && p.kernels[kd.alternativeOf].alternativeOf >= 0))
      return fail(kwhere + ": alternative_of " +
                  std::to_string(kd.alternativeOf) +
                  " does not name an earlier kernel that is not a candidate");
    // Verified on every target: a CPU plan ignores them, but a plan that
    // carries them must carry ones a driver could encode.
    if (kernel->tensor_maps())
      for (uint32_t m = 0; m < kernel->tensor_maps()->size(); ++m) {
        TensorMapDesc d;
        if (Status s =
                checkTensorMap(kwhere + " tensor map " + std::to_string(m),
                               *kernel->tensor_maps()->Get(m), d);
            !s.ok())
          return s;
        kd.tensorMaps.push_back(std::move(d));
      }
    if (!kernel->ops()) {
      if (kd.alternativeOf >= 0 && !p.kernels[kd.alternativeOf].ops.empty())
        return fail(kwhere + ": a tuning candidate must have the ops, "
                             "buffers and signature of kernel " +
                    std::to_string(kd.alternativeOf));
      continue;
    }
    for (uint32_t o = 0; o < kernel->ops()->size(); ++o) {
      const plan::SemanticOp *op = kernel->ops()->Get(o);
      std::string opName = str(op->op());
      std::string where =
          kwhere + " op " + std::to_string(o) + " (" + opName + ")";
      OpDesc d;
      if (Status s = checkOp(where, *op, d); !s.ok())
        return s;
      kd.ops.push_back(std::move(d));
    }
    if (kernel->temps())
      for (uint32_t t : *kernel->temps()) {
        if (t >= p.buffers.size())
          return fail(kwhere + ": temporary buffer index " + std::to_string(t) +
                      " out of range (" + std::to_string(p.buffers.size()) +
                      " buffers)");
        bool written = false, read = false;
        for (const OpDesc &d : kd.ops) {
          written |= std::find(d.results.begin(), d.results.end(), t) !=
                     d.results.end();
          read |= written && std::find(d.operands.begin(), d.operands.end(),
                                       t) != d.operands.end();
        }
        if (!written || !read)
          return fail(kwhere + ": temporary buffer " + std::to_string(t) +
                      " is not both written and then read by the kernel's ops");
        kd.temps.push_back(t);
      }
    if (kd.alternativeOf >= 0) {
      // A tuning candidate computes what the kernel it could replace does.
      const KernelDesc &of = p.kernels[kd.alternativeOf];
      bool same = kd.ops.size() == of.ops.size() && kd.temps == of.temps &&
                  !kd.signature.empty() && kd.signature == of.signature;
      for (size_t o = 0; same && o < kd.ops.size(); ++o)
        same = kd.ops[o].kind == of.ops[o].kind &&
               kd.ops[o].operands == of.ops[o].operands &&
               kd.ops[o].results == of.ops[o].results;
      if (!same)
        return fail(kwhere + ": a tuning candidate must have the ops, "
                             "buffers and signature of kernel " +
                    std::to_string(kd.alternativeOf));
    }
  }
  return Status::success();
}

Status PlanVerifier::checkTensorMap(const std::string &where,
                                    const plan::TensorMap &m,
                                    TensorMapDesc &d) {
  // cuTensorMapEncodeTiled's rules (cuda.h), for the tiled, non-interleaved
  // maps with element strides of 1 that the runtime encodes.
  auto bad = [&](const std::string &msg) { return fail(where + ": " + msg); };
  if (int(m.region()) < 0 || int(m.region()) > int(plan::Region::Io))
    return bad("unknown region " + std::to_string(int(m.region())));
  d.region = m.region();
  if (m.dtype() != plan::DType::F32 && m.dtype() != plan::DType::BF16)
    return bad("dtype " +
               (dtypeSize(m.dtype()) ? std::string(dtypeName(m.dtype()))
                                     : std::to_string(int(m.dtype()))) +
               " is not f32 or bf16");
  d.dtype = m.dtype();
  const uint64_t elem = dtypeSize(d.dtype);
  if (m.dims())
    d.dims.assign(m.dims()->begin(), m.dims()->end());
  if (m.strides())
    d.strides.assign(m.strides()->begin(), m.strides()->end());
  if (m.box())
    d.box.assign(m.box()->begin(), m.box()->end());
  d.offset = m.offset();
  d.swizzle = m.swizzle();
  const size_t rank = d.dims.size();
  if (rank < 1 || rank > 5)
    return bad("rank " + std::to_string(rank) + " (dims " + listStr(d.dims) +
               ") is outside [1, 5]");
  if (d.strides.size() != rank - 1)
    return bad("strides has " + std::to_string(d.strides.size()) +
               " entries for rank " + std::to_string(rank) + " (expects " +
               std::to_string(rank - 1) + ")");
  if (d.box.size() != rank)
    return bad("box has " + std::to_string(d.box.size()) +
               " entries for rank " + std::to_string(rank));
  for (size_t i = 0; i < rank; ++i) {
    if (d.dims[i] < 1 || d.dims[i] > (uint64_t(1) << 32))
      return bad("dims " + listStr(d.dims) + ": extent " + std::to_string(i) +
                 " is outside [1, 2^32]");
    // A box may outgrow the tensor: what lies outside arrives as zeros.
    if (d.box[i] < 1 || d.box[i] > 256)
      return bad("box " + listStr(d.box) + ": entry " + std::to_string(i) +
                 " is outside [1, 256]");
  }
  if (d.offset % 16 != 0)
    return bad("offset " + std::to_string(d.offset) +
               " is not a multiple of 16");
  for (size_t i = 0; i < d.strides.size(); ++i)
    if (d.strides[i] % 16 != 0 || d.strides[i] >= (uint64_t(1) << 40))
      return bad("strides " + listStr(d.strides) + ": entry " +
                 std::to_string(i) +
                 " is not a multiple of 16 below 2^40 bytes");
  uint64_t inner = uint64_t(d.box[0]) * elem;
  if (inner % 16 != 0)
    return bad("box[0] of " + std::to_string(d.box[0]) + " " +
               dtypeName(d.dtype) + " elements spans " + std::to_string(inner) +
               " bytes, not a multiple of 16");
  if (d.swizzle > 3)
    return bad("swizzle " + std::to_string(d.swizzle) +
               " is not 0 (none), 1 (32B), 2 (64B) or 3 (128B)");
  if (d.swizzle != 0 && inner > (16u << d.swizzle))
    return bad("box[0] spans " + std::to_string(inner) +
               " bytes, more than the " + std::to_string(16u << d.swizzle) +
               "-byte span of its swizzle");
  // The last byte any copy may read: element dims - 1 in every dimension.
  uint64_t end = 0;
  bool overflow = __builtin_mul_overflow(d.dims[0], elem, &end) ||
                  __builtin_add_overflow(end, d.offset, &end);
  for (size_t i = 1; i < rank && !overflow; ++i) {
    uint64_t span;
    overflow = __builtin_mul_overflow(d.dims[i] - 1, d.strides[i - 1], &span) ||
               __builtin_add_overflow(end, span, &end);
  }
  uint64_t limit = p.regionSize[int(d.region)];
  if (overflow || end > limit)
    return bad("dims " + listStr(d.dims) + " with strides " +
               listStr(d.strides) + " from offset " + std::to_string(d.offset) +
               " reach " +
               (overflow ? std::string("past 2^64") : std::to_string(end)) +
               ", outside the " + regionName(d.region) + " region of " +
               std::to_string(limit) + " bytes");
  return Status::success();
}

Status PlanVerifier::checkOp(const std::string &where,
                             const plan::SemanticOp &op, OpDesc &d) {
  std::string name = str(op.op());
  const OpSpec *spec = nullptr;
  for (const OpSpec &s : kOpSpecs)
    if (name == s.name)
      spec = &s;
  if (!spec)
    return fail(where + ": unknown op '" + name + "'");
  d.kind = spec->kind;
  size_t nOperands = op.operands() ? op.operands()->size() : 0;
  size_t nResults = op.results() ? op.results()->size() : 0;
  if (nOperands > spec->operands ||
      nOperands + spec->optionalOperands < spec->operands)
    return fail(where + ": has " + std::to_string(nOperands) +
                " operands, expected " +
                (spec->optionalOperands
                     ? std::to_string(spec->operands - spec->optionalOperands) +
                           " to "
                     : std::string()) +
                std::to_string(spec->operands));
  if (nResults != spec->results)
    return fail(where + ": has " + std::to_string(nResults) +
                " results, expected " + std::to_string(spec->results));
  for (uint32_t i = 0; i < nOperands; ++i) {
    uint32_t b = op.operands()->Get(i);
    if (b >= p.buffers.size())
      return fail(where + ": operand " + std::to_string(i) + " buffer index " +
                  std::to_string(b) + " out of range (" +
                  std::to_string(p.buffers.size()) + " buffers)");
    d.operands.push_back(b);
  }
  for (uint32_t i = 0; i < nResults; ++i) {
    uint32_t b = op.results()->Get(i);
    if (b >= p.buffers.size())
      return fail(where + ": result " +
                  (nResults > 1 ? std::to_string(i) + " " : std::string()) +
                  "buffer index " + std::to_string(b) + " out of range (" +
                  std::to_string(p.buffers.size()) + " buffers)");
    d.results.push_back(b);
  }
  d.result = d.results[0];

  std::map<std::string, const plan::Attr *> attrs;
  if (op.attrs()) {
    for (uint32_t i = 0; i < op.attrs()->size(); ++i) {
      const plan::Attr *a = op.attrs()->Get(i);
      std::string an = str(a->name());
      if (an.empty())
        return fail(where + ": attribute " + std::to_string(i) +
                    " has no name");
      if (int(a->kind()) < 0 || int(a->kind()) > int(plan::AttrKind::String))
        return fail(where + ": attribute " + an + " has unknown kind " +
                    std::to_string(int(a->kind())));
      if (a->kind() == plan::AttrKind::String && !a->s())
        return fail(where + ": string attribute " + an + " has no value");
      if (!attrs.emplace(an, a).second)
        return fail(where + ": attribute " + an + " appears twice");
    }
  }
  return checkOpShapes(where, d, attrs);
}

namespace {

/// Reads typed attributes of one op, recording the first problem.
struct AttrReader {
  const std::map<std::string, const plan::Attr *> &attrs;
  std::string err;

  const plan::Attr *get(const char *name, plan::AttrKind kind, bool required) {
    auto it = attrs.find(name);
    if (it == attrs.end()) {
      if (required && err.empty())
        err = std::string("missing attribute ") + name;
      return nullptr;
    }
    if (it->second->kind() != kind) {
      if (err.empty())
        err = std::string("attribute ") + name + " must be " +
              (kind == plan::AttrKind::Int     ? "an int"
               : kind == plan::AttrKind::Float ? "a float"
                                               : "a string");
      return nullptr;
    }
    return it->second;
  }
  double f(const char *name, double dflt = 0, bool required = true) {
    const plan::Attr *a = get(name, plan::AttrKind::Float, required);
    if (a && !std::isfinite(a->f()) && err.empty())
      err = std::string("attribute ") + name + " is not finite";
    return a ? a->f() : dflt;
  }
  int64_t i(const char *name, int64_t dflt = 0, bool required = true) {
    const plan::Attr *a = get(name, plan::AttrKind::Int, required);
    return a ? a->i() : dflt;
  }
  std::string s(const char *name) {
    const plan::Attr *a = get(name, plan::AttrKind::String, true);
    return a ? a->s()->str() : std::string();
  }
};

enum class Alias {
  None,
  AnyOperand,  ///< element-wise: a result may be any operand's exact bytes
  FirstOperand ///< result 0 may be operand 0's exact bytes
};

std::string label(const Plan &p, uint32_t i) {
  const std::string &n = p.buffers[i].name;
  return "buffer " + std::to_string(i) + (n.empty() ? "" : " '" + n + "'");
}

/// Shapes and attributes of the training ops; returns the first problem.
/// Why `route` is not l4.moe_route's table for `scores` [.., E] with `slots`
/// entries per token; empty when it is.
std::string routeMismatch(const BufferDesc &route, const BufferDesc &scores,
                          int64_t slots, const std::string &who) {
  int64_t E = scores.lastDim();
  uint64_t tokens = E > 0 ? scores.numel / uint64_t(E) : 0;
  int64_t want = E + 1 + int64_t(tokens) * slots;
  if (route.dtype != plan::DType::I32)
    return who + " has dtype " + dtypeName(route.dtype) + ", expected i32";
  if (route.hasBatch || route.shape != std::vector<int64_t>{want})
    return who + " has shape " + shapeStr(route.shape) + ", expected [" +
           std::to_string(want) + "] without run-time dims (E + 1 + " +
           std::to_string(tokens) + " tokens x " + std::to_string(slots) +
           " slots)";
  return "";
}

/// Activations are token-major with a batch dim; parameter-shaped gradients
/// have none and the exact shape of their parameter.
std::string checkTrainOp(const Plan &p, OpDesc &d, AttrReader &ar,
                         Alias &alias) {
  auto B = [&](size_t i) -> const BufferDesc & {
    return p.buffers[d.operands[i]];
  };
  auto R = [&](size_t i) -> const BufferDesc & {
    return p.buffers[d.results[i]];
  };
  auto role = [&](size_t i) { return label(p, d.operands[i]); };
  auto resRole = [&](size_t i) {
    return "result " +
           (d.results.size() > 1 ? std::to_string(i) + " " : std::string()) +
           label(p, d.results[i]);
  };
  auto activation = [&](size_t i, const char *what) -> std::string {
    return B(i).hasBatch
               ? ""
               : std::string(what) + " " + role(i) + " must have a batch dim";
  };
  // Operand j, or result j when `result`, must be laid out like operand i.
  auto like = [&](size_t i, size_t j, bool result,
                  const char *what) -> std::string {
    const BufferDesc &b = result ? R(j) : B(j);
    if (sameLayout(b, B(i)))
      return "";
    return (result ? resRole(j) : std::string(what) + " " + role(j)) +
           " has shape " + shapeStr(b.shape) + " (or dims) unlike " + role(i) +
           "'s " + shapeStr(B(i).shape);
  };
  // Result j must be a parameter-shaped buffer of exactly `shape`.
  auto param = [&](size_t j, const std::vector<int64_t> &shape) -> std::string {
    if (R(j).hasBatch || R(j).shape != shape)
      return resRole(j) + " has shape " + shapeStr(R(j).shape) + ", expected " +
             shapeStr(shape) + " with no batch dim";
    return "";
  };
  auto matrix = [&](size_t i, const char *what, size_t rank) -> std::string {
    if (B(i).hasBatch)
      return std::string(what) + " " + role(i) + " must not have a batch dim";
    if (B(i).shape.size() != rank)
      return std::string(what) + " " + role(i) + " has shape " +
             shapeStr(B(i).shape) + ", expected rank " + std::to_string(rank);
    return "";
  };
  // The loss ops index logits [B, S, V] rows with the ids' [B, S] layout.
  auto lossOperands = [&]() -> std::string {
    const BufferDesc &lg = B(0), &ids = B(1);
    if (!lg.hasSeq || lg.shape.size() != 3)
      return "logits " + role(0) + " has shape " + shapeStr(lg.shape) +
             ", expected [B, S, V] with a seq dim";
    if (!ids.hasSeq || ids.shape.size() != 2 || ids.shape[0] != lg.shape[0] ||
        ids.shape[1] != lg.shape[1])
      return "ids " + role(1) + " has shape " + shapeStr(ids.shape) +
             ", expected [" + std::to_string(lg.shape[0]) + ", " +
             std::to_string(lg.shape[1]) + "] with batch and seq dims";
    return "";
  };

  std::string e;
  switch (d.kind) {
  case OpKind::CrossEntropy:
    e = lossOperands();
    if (e.empty() &&
        (R(0).hasBatch || R(0).numel != 1 || R(0).dtype != plan::DType::F32))
      e = resRole(0) + " must be an f32 scalar (shape [] or all ones) with "
                       "no batch dim";
    break;
  case OpKind::CrossEntropyGrad:
    e = lossOperands();
    if (e.empty())
      e = like(0, 0, true, "");
    // The kernel reads a row's logits before it writes that row.
    alias = Alias::FirstOperand;
    break;
  case OpKind::CrossEntropyStats:
  case OpKind::CrossEntropyFromStats:
  case OpKind::CrossEntropyGradChunk: {
    // Chunk statistics: f32 [B, S, 2] over the same rows as operand 0.
    auto stats = [&](const BufferDesc &st, const std::string &who) {
      const BufferDesc &lg = B(0);
      if (st.dtype != plan::DType::F32 || !st.hasSeq || st.shape.size() != 3 ||
          st.shape[0] != lg.shape[0] || st.shape[1] != lg.shape[1] ||
          st.shape[2] != 2)
        return who + " has shape " + shapeStr(st.shape) + " of " +
               dtypeName(st.dtype) + ", expected f32 [" +
               std::to_string(lg.shape[0]) + ", " + std::to_string(lg.shape[1]) +
               ", 2] with batch and seq dims";
      return std::string();
    };
    e = lossOperands();
    if (e.empty() && d.kind == OpKind::CrossEntropyFromStats) {
      e = stats(B(0), "stats " + role(0));
      if (e.empty() &&
          (R(0).hasBatch || R(0).numel != 1 || R(0).dtype != plan::DType::F32))
        e = resRole(0) + " must be an f32 scalar (shape [] or all ones) with "
                         "no batch dim";
      break;
    }
    d.vocabOffset = ar.i("vocab_offset");
    d.vocabSize = ar.i("vocab_size");
    if (e.empty() && ar.err.empty() &&
        (d.vocabOffset < 0 || d.vocabSize <= 0 ||
         d.vocabOffset + B(0).lastDim() > d.vocabSize))
      e = "vocabulary columns [" + std::to_string(d.vocabOffset) + ", " +
          std::to_string(d.vocabOffset + B(0).lastDim()) +
          ") do not lie in [0, vocab_size " + std::to_string(d.vocabSize) + ")";
    if (d.kind == OpKind::CrossEntropyStats) {
      if (e.empty())
        e = stats(R(0), resRole(0));
      if (e.empty() && d.operands.size() > 2)
        e = stats(B(2), "prev " + role(2));
      if (e.empty() && d.operands.size() == 2 && d.vocabOffset != 0)
        e = "the first chunk (no prev) starts at column " +
            std::to_string(d.vocabOffset) + ", not 0";
      break;
    }
    if (e.empty())
      e = stats(B(2), "stats " + role(2));
    if (e.empty())
      e = like(0, 0, true, "");
    alias = Alias::FirstOperand; // each element is read before it is written
    break;
  }
  case OpKind::LinearGradInput: {
    const BufferDesc &dy = B(0), &w = B(1), &dx = R(0);
    e = activation(0, "gradient");
    if (e.empty())
      e = matrix(1, "weight", 2);
    if (e.empty() && w.shape[0] != dy.lastDim())
      e = "weight " + role(1) + " has shape " + shapeStr(w.shape) +
          " for a gradient last dim of " + std::to_string(dy.lastDim());
    if (e.empty() &&
        (!dx.hasBatch || dx.lastDim() != w.shape[1] ||
         !tokenAligned(dy, uint64_t(dy.lastDim()), dx, uint64_t(w.shape[1]))))
      e = resRole(0) + " has shape " + shapeStr(dx.shape) +
          ", expected the gradient's rows times " + std::to_string(w.shape[1]);
    break;
  }
  case OpKind::LinearGradWeight: {
    const BufferDesc &x = B(0), &dy = B(1);
    e = activation(0, "input");
    if (e.empty())
      e = activation(1, "gradient");
    if (e.empty() &&
        !tokenAligned(x, uint64_t(x.lastDim()), dy, uint64_t(dy.lastDim())))
      e = "input " + role(0) + " and gradient " + role(1) + " have shapes " +
          shapeStr(x.shape) + " and " + shapeStr(dy.shape) +
          ", which do not cover the same tokens";
    if (e.empty())
      e = param(0, {dy.lastDim(), x.lastDim()});
    break;
  }
  case OpKind::RmsNormGrad:
  case OpKind::L2NormGrad: {
    d.eps = ar.f("eps");
    if (ar.err.empty() && d.eps < 0)
      ar.err = "attribute eps is negative";
    bool weighted = d.kind == OpKind::RmsNormGrad;
    size_t dyIdx = weighted ? 2 : 1;
    e = activation(0, "input");
    if (e.empty() && weighted) {
      e = matrix(1, "weight", 1);
      if (e.empty() && B(1).shape[0] != B(0).lastDim())
        e = "weight " + role(1) + " has " + std::to_string(B(1).shape[0]) +
            " entries for a last dim of " + std::to_string(B(0).lastDim());
    }
    if (e.empty())
      e = like(0, dyIdx, false, "gradient");
    if (e.empty())
      e = like(0, 0, true, "");
    if (e.empty() && weighted)
      e = param(1, B(1).shape);
    break;
  }
  case OpKind::AttentionGrad: {
    d.scale = ar.f("scale");
    d.chunkSize = ar.i("chunk_size");
    if (ar.err.empty() && d.chunkSize < 0)
      ar.err = "attribute chunk_size is negative";
    const BufferDesc &q = B(0), &k = B(1), &v = B(2), &pos = B(3);
    e = activation(0, "query");
    if (e.empty() && q.shape.size() != 4)
      e = "query " + role(0) + " has shape " + shapeStr(q.shape) +
          ", expected [B, S, H, d]";
    // The backward runs on the step's own keys, never on a cache.
    if (e.empty() && (!k.hasSeq || k.shape.size() != 4 || !sameLayout(k, v) ||
                      k.shape[1] != q.shape[1] || k.shape[3] != q.shape[3] ||
                      q.shape[2] % k.shape[2] != 0))
      e = "keys " + role(1) + " and values " + role(2) + " have shapes " +
          shapeStr(k.shape) + " and " + shapeStr(v.shape) +
          ", expected equal [B, " + std::to_string(q.shape[1]) + ", Hkv, " +
          std::to_string(q.shape[3]) + "] with Hkv dividing " +
          std::to_string(q.shape[2]);
    if (e.empty() &&
        (pos.shape.size() != 2 ||
         !tokenAligned(pos, 1, q, uint64_t(q.shape[2] * q.shape[3]))))
      e = "positions " + role(3) + " has shape " + shapeStr(pos.shape) +
          ", expected one per query token";
    if (e.empty())
      e = like(0, 4, false, "gradient");
    if (e.empty())
      e = like(0, 0, true, "");
    if (e.empty())
      e = like(1, 1, true, "");
    if (e.empty())
      e = like(2, 2, true, "");
    break;
  }
  case OpKind::RouterScoresGrad:
    d.topK = ar.i("top_k");
    e = activation(0, "logits");
    if (e.empty() && ar.err.empty() && (d.topK < 1 || d.topK > B(0).lastDim()))
      ar.err = "attribute top_k " + std::to_string(d.topK) +
               " is outside [1, " + std::to_string(B(0).lastDim()) + "]";
    if (e.empty())
      e = like(0, 1, false, "gradient");
    if (e.empty())
      e = like(0, 0, true, "");
    break;
  case OpKind::MoeExpertsGrad: {
    const BufferDesc &x = B(0), &scores = B(1), &gateUp = B(2), &down = B(3);
    e = activation(0, "input");
    if (e.empty())
      e = matrix(2, "gate_up", 3);
    if (e.empty())
      e = matrix(3, "down", 3);
    if (e.empty()) {
      int64_t E = gateUp.shape[0], D = gateUp.shape[1], I2 = gateUp.shape[2];
      if (I2 % 2 != 0 || D != x.lastDim())
        e = "gate_up " + role(2) + " has shape " + shapeStr(gateUp.shape) +
            ", expected [E, " + std::to_string(x.lastDim()) + ", 2I]";
      else if (down.shape != std::vector<int64_t>{E, I2 / 2, D})
        e = "down " + role(3) + " has shape " + shapeStr(down.shape) +
            ", expected [" + std::to_string(E) + ", " + std::to_string(I2 / 2) +
            ", " + std::to_string(D) + "]";
      else if (!scores.hasBatch || scores.lastDim() != E ||
               !tokenAligned(x, uint64_t(D), scores, uint64_t(E)))
        e = "scores " + role(1) + " has shape " + shapeStr(scores.shape) +
            ", expected one row of " + std::to_string(E) + " per input token";
    }
    if (e.empty())
      e = like(0, 4, false, "gradient");
    if (e.empty())
      e = like(0, 0, true, "");
    if (e.empty())
      e = like(1, 1, true, "");
    if (e.empty())
      e = param(2, gateUp.shape);
    if (e.empty())
      e = param(3, down.shape);
    break;
  }
  case OpKind::MoeGateUp:
  case OpKind::MoeDownGrad:
  case OpKind::MoeDownGradWeight:
  case OpKind::MoeGateUpGradInput:
  case OpKind::MoeCombineGrad:
  case OpKind::MoeGateUpGradWeight: {
    // The split experts' backward (l4c-split-experts). Token rows x-like
    // [.., D], per-slot rows [.., K, W], scores [.., E], the route table.
    bool combine = d.kind == OpKind::MoeCombineGrad;
    const BufferDesc &scores = B(combine ? 2 : 1);
    int64_t E = scores.lastDim(), K = 0;
    e = activation(combine ? 2 : 1, "scores");
    // Operand i holds K slots of `width` per token of the scores.
    auto slottedRows = [&](size_t i, int64_t width,
                           const char *what) -> std::string {
      const BufferDesc &b = B(i);
      std::string err = activation(i, what);
      if (!err.empty())
        return err;
      K = b.shape.size() >= 2 ? b.shape[b.shape.size() - 2] : 0;
      if (b.lastDim() != width || K < 1 || K > E ||
          !tokenAligned(b, uint64_t(K * width), scores, uint64_t(E)))
        return std::string(what) + " " + role(i) + " has shape " +
               shapeStr(b.shape) + ", expected [.., K, " +
               std::to_string(width) +
               "] per token of the scores with 1 <= K <= " +
               std::to_string(E);
      return "";
    };
    // Operand i holds one row of `width` per token of the scores.
    auto tokenRows = [&](size_t i, int64_t width,
                         const char *what) -> std::string {
      const BufferDesc &b = B(i);
      if (!b.hasBatch || b.lastDim() != width ||
          !tokenAligned(b, uint64_t(width), scores, uint64_t(E)))
        return std::string(what) + " " + role(i) + " has shape " +
               shapeStr(b.shape) + ", expected one row of " +
               std::to_string(width) + " per token of the scores";
      return "";
    };
    // A weight-shaped [E, a, b] operand.
    auto expertMatrix = [&](size_t i, const char *what) -> std::string {
      std::string err = matrix(i, what, 3);
      if (err.empty() && B(i).shape[0] != E)
        err = std::string(what) + " " + role(i) + " has shape " +
              shapeStr(B(i).shape) + ", expected " + std::to_string(E) +
              " experts";
      return err;
    };
    auto route = [&](size_t i) {
      return routeMismatch(B(i), scores, K, "route " + role(i));
    };
    // The result's slots per token, `width` each.
    auto slottedResult = [&](int64_t width) -> std::string {
      const BufferDesc &r = R(0);
      if (!r.hasBatch || r.lastDim() != width || r.shape.size() < 2 ||
          r.shape[r.shape.size() - 2] != K ||
          !tokenAligned(scores, uint64_t(E), r, uint64_t(K * width)))
        return resRole(0) + " has shape " + shapeStr(r.shape) +
               ", expected [.., " + std::to_string(K) + ", " +
               std::to_string(width) + "] per token";
      return "";
    };
    switch (d.kind) {
    case OpKind::MoeGateUp: { // x, scores, gate_up, route -> gu
      if (e.empty())
        e = expertMatrix(2, "gate_up");
      int64_t D = e.empty() ? B(2).shape[1] : 0,
              W = e.empty() ? B(2).shape[2] : 0;
      if (e.empty())
        e = tokenRows(0, D, "input");
      if (e.empty()) {
        const BufferDesc &r = R(0);
        K = r.shape.size() >= 2 ? r.shape[r.shape.size() - 2] : 0;
        if (K < 1 || K > E)
          e = resRole(0) + " has shape " + shapeStr(r.shape) +
              ", expected [.., K, " + std::to_string(W) +
              "] with 1 <= K <= " + std::to_string(E);
      }
      if (e.empty())
        e = slottedResult(W);
      if (e.empty())
        e = route(3);
      break;
    }
    case OpKind::MoeDownGrad: // gu, scores, down, dy, route -> dgu
      if (e.empty())
        e = expertMatrix(2, "down");
      if (e.empty())
        e = slottedRows(0, 2 * B(2).shape[1], "gate_up_out");
      if (e.empty())
        e = tokenRows(3, B(2).shape[2], "gradient");
      if (e.empty())
        e = like(0, 0, true, "");
      if (e.empty())
        e = route(4);
      break;
    case OpKind::MoeDownGradWeight: { // gu, scores, dy, route -> [E, I, D]
      const BufferDesc &dy = B(2);
      if (e.empty() && (!dy.hasBatch || dy.shape.empty()))
        e = "gradient " + role(2) + " must have a batch dim";
      if (e.empty() && B(0).lastDim() % 2 != 0)
        e = "gate_up_out " + role(0) + " has an odd last dim";
      if (e.empty())
        e = slottedRows(0, B(0).lastDim(), "gate_up_out");
      if (e.empty())
        e = tokenRows(2, dy.lastDim(), "gradient");
      if (e.empty())
        e = param(0, {E, B(0).lastDim() / 2, dy.lastDim()});
      if (e.empty())
        e = route(3);
      break;
    }
    case OpKind::MoeGateUpGradInput: // dgu, scores, gate_up, route -> dz
      if (e.empty())
        e = expertMatrix(2, "gate_up");
      if (e.empty())
        e = slottedRows(0, B(2).shape[2], "gradient");
      if (e.empty())
        e = slottedResult(B(2).shape[1]);
      if (e.empty())
        e = route(3);
      break;
    case OpKind::MoeCombineGrad: // dz, x, scores -> dx, dscores
      if (e.empty())
        e = tokenRows(1, B(1).lastDim(), "input");
      if (e.empty())
        e = slottedRows(0, B(1).lastDim(), "gradient");
      if (e.empty())
        e = like(1, 0, true, "");
      if (e.empty())
        e = like(2, 1, true, "");
      break;
    default: { // MoeGateUpGradWeight: x, scores, dgu, route -> [E, D, 2I]
      if (e.empty())
        e = tokenRows(0, B(0).lastDim(), "input");
      if (e.empty())
        e = slottedRows(2, B(2).lastDim(), "gradient");
      if (e.empty())
        e = param(0, {E, B(0).lastDim(), B(2).lastDim()});
      if (e.empty())
        e = route(3);
      break;
    }
    }
    break;
  }
  case OpKind::SwigluGrad:
    e = activation(0, "gate");
    if (e.empty())
      e = like(0, 1, false, "up");
    if (e.empty())
      e = like(0, 2, false, "gradient");
    if (e.empty())
      e = like(0, 0, true, "");
    if (e.empty())
      e = like(0, 1, true, "");
    // Element-wise, and both results are computed before either is stored.
    alias = Alias::AnyOperand;
    break;
  case OpKind::EmbeddingGrad: {
    d.paddingIdx = ar.i("padding_idx", -1, false);
    const BufferDesc &ids = B(0), &dy = B(1), &table = R(0);
    e = activation(0, "ids");
    if (e.empty())
      e = activation(1, "gradient");
    if (e.empty() && (table.hasBatch || table.shape.size() != 2))
      e = resRole(0) + " has shape " + shapeStr(table.shape) +
          ", expected a [V, D] table with no batch dim";
    if (e.empty() && (dy.lastDim() != table.shape[1] ||
                      !tokenAligned(ids, 1, dy, uint64_t(table.shape[1]))))
      e = "gradient " + role(1) + " has shape " + shapeStr(dy.shape) +
          ", expected the ids' tokens times " + std::to_string(table.shape[1]);
    break;
  }
  default:
    e = std::string("op ") + opKindName(d.kind) + " has no shape rules";
    break;
  }
  return e;
}

} // namespace

Status PlanVerifier::checkOpShapes(
    const std::string &where, OpDesc &d,
    const std::map<std::string, const plan::Attr *> &attrs) {
  auto bad = [&](const std::string &msg) { return fail(where + ": " + msg); };
  auto B = [&](size_t i) -> const BufferDesc & {
    return p.buffers[d.operands[i]];
  };
  auto role = [&](size_t i) { return bufName(d.operands[i]); };
  const BufferDesc &res = p.buffers[d.result];
  auto resLabel = [&](size_t i) {
    return "result " +
           (d.results.size() > 1 ? std::to_string(i) + " " : std::string()) +
           bufName(d.results[i]);
  };
  const std::string resName = resLabel(0);

  // Dtypes: the index operands, and floats everywhere else.
  for (size_t i = 0; i < d.operands.size(); ++i) {
    bool index = isIndexOperand(d.kind, i);
    if (index ? !isIndex(B(i).dtype) : !isFloat(B(i).dtype))
      return bad("operand " + std::to_string(i) + " " + role(i) +
                 " has dtype " + dtypeName(B(i).dtype) + ", expected " +
                 (index ? "i64 or i32" : "a float type"));
  }
  for (size_t i = 0; i < d.results.size(); ++i) {
    const BufferDesc &r = p.buffers[d.results[i]];
    bool table = d.kind == OpKind::MoeRoute;
    if (table ? r.dtype != plan::DType::I32 : !isFloat(r.dtype))
      return bad(resLabel(i) + " has dtype " + dtypeName(r.dtype) +
                 ", expected " + (table ? "i32" : "a float type"));
    if (r.region == plan::Region::Weights)
      return bad(resLabel(i) + " lies in the weights region");
  }

  AttrReader ar{attrs, {}};
  const BufferDesc &x = B(0);
  auto needActivation = [&](const BufferDesc &b,
                            const std::string &who) -> std::string {
    return b.hasBatch ? "" : who + " must have a batch dim";
  };
  auto needStatic = [&](const BufferDesc &b, const std::string &who,
                        size_t rank) -> std::string {
    if (b.hasBatch)
      return who + " must not have a batch dim";
    if (b.shape.size() != rank)
      return who + " has shape " + shapeStr(b.shape) + ", expected rank " +
             std::to_string(rank);
    return "";
  };
  auto sameAsX = [&]() -> std::string {
    return sameLayout(res, x)
               ? ""
               : resName + " has shape " + shapeStr(res.shape) +
                     " (or dims) unlike the input's " + shapeStr(x.shape);
  };
  auto needRoute = [&](const BufferDesc &route, const BufferDesc &scores,
                       int64_t slots, const std::string &who) {
    return routeMismatch(route, scores, slots, who);
  };
  std::string e;
  // May a result be the very bytes of an operand? Only where the CPU kernel
  // reads each element before it writes it.
  Alias alias = Alias::None;

  switch (d.kind) {
  case OpKind::Embedding: {
    const BufferDesc &table = B(0), &ids = B(1);
    e = needStatic(table, "table " + role(0), 2);
    if (e.empty())
      e = needActivation(ids, "ids " + role(1));
    if (e.empty() && (!res.hasBatch || res.lastDim() != table.shape[1] ||
                      !tokenAligned(ids, 1, res, uint64_t(table.shape[1]))))
      e = resName + " has shape " + shapeStr(res.shape) +
          ", expected the ids' tokens times " + std::to_string(table.shape[1]);
    break;
  }
  case OpKind::RmsNorm:
  case OpKind::L2Norm: {
    d.eps = ar.f("eps");
    if (ar.err.empty() && d.eps < 0)
      ar.err = "attribute eps is negative";
    e = needActivation(x, "input " + role(0));
    if (e.empty() && d.kind == OpKind::RmsNorm) {
      e = needStatic(B(1), "weight " + role(1), 1);
      if (e.empty() && B(1).shape[0] != x.lastDim())
        e = "weight " + role(1) + " has " + std::to_string(B(1).shape[0]) +
            " entries for a last dim of " + std::to_string(x.lastDim());
    }
    if (e.empty())
      e = sameAsX();
    alias = Alias::AnyOperand;
    break;
  }
  case OpKind::Linear: {
    const BufferDesc &w = B(1);
    e = needActivation(x, "input " + role(0));
    if (e.empty())
      e = needStatic(w, "weight " + role(1), 2);
    if (e.empty() && w.shape[1] != x.lastDim())
      e = "weight " + role(1) + " has shape " + shapeStr(w.shape) +
          " for an input last dim of " + std::to_string(x.lastDim());
    if (e.empty() &&
        (!res.hasBatch || res.lastDim() != w.shape[0] ||
         !tokenAligned(x, uint64_t(x.lastDim()), res, uint64_t(w.shape[0]))))
      e = resName + " has shape " + shapeStr(res.shape) +
          ", expected the input's rows times " + std::to_string(w.shape[0]);
    break;
  }
  case OpKind::Rope:
  case OpKind::TemperatureScale: {
    const BufferDesc &pos = B(1);
    if (d.kind == OpKind::Rope) {
      int64_t inverse = ar.i("inverse", 0, false);
      if (ar.err.empty() && inverse != 0 && inverse != 1)
        ar.err =
            "attribute inverse " + std::to_string(inverse) + " is not 0 or 1";
      d.inverse = inverse == 1;
      double theta = ar.f("theta");
      std::string scaling = ar.s("scaling");
      double factor = ar.f("factor", 1.0, false);
      double lowF = ar.f("low_freq_factor", 1.0, false);
      double highF = ar.f("high_freq_factor", 1.0, false);
      int64_t origMax = ar.i("original_max_position", 0, false);
      if (ar.err.empty() && scaling != "none" && scaling != "llama3")
        ar.err = "attribute scaling '" + scaling + "' is not none or llama3";
      if (ar.err.empty() && !(theta > 0))
        ar.err = "attribute theta must be positive";
      if (ar.err.empty() && x.shape.size() == 4 && x.lastDim() % 2 == 0) {
        d.invFreq.resize(size_t(x.lastDim()) / 2);
        cpu::ropeInvFreq(theta, size_t(x.lastDim()),
                         scaling == "llama3" ? "llama3" : "default", factor,
                         lowF, highF, double(origMax), d.invFreq.data());
      }
    } else {
      d.floorScale = ar.f("floor_scale");
      d.attnScale = ar.f("attn_scale");
      if (ar.err.empty() && !(d.floorScale > 0))
        ar.err = "attribute floor_scale must be positive";
    }
    e = needActivation(x, "input " + role(0));
    if (e.empty() && x.shape.size() != 4)
      e = "input " + role(0) + " has shape " + shapeStr(x.shape) +
          ", expected [B, S, H, d]";
    if (e.empty() && d.kind == OpKind::Rope && x.lastDim() % 2 != 0)
      e = "input " + role(0) + " has an odd head_dim " +
          std::to_string(x.lastDim());
    if (e.empty() &&
        (pos.shape.size() != 2 ||
         !tokenAligned(pos, 1, x, uint64_t(x.shape[2] * x.shape[3]))))
      e = "positions " + role(1) + " has shape " + shapeStr(pos.shape) +
          ", expected one per token of the input";
    if (e.empty())
      e = sameAsX();
    alias = Alias::AnyOperand;
    break;
  }
  case OpKind::KvCacheUpdate: {
    const BufferDesc &cache = B(0), &upd = B(1), &pos = B(2);
    if (!cache.hasBatch || cache.hasSeq || cache.shape.size() != 4)
      e = "cache " + role(0) + " has shape " + shapeStr(cache.shape) +
          ", expected [B, M, Hkv, d] with no seq dim";
    else if (!upd.hasBatch || upd.shape.size() != 4 ||
             upd.shape[2] != cache.shape[2] || upd.shape[3] != cache.shape[3])
      e = "update " + role(1) + " has shape " + shapeStr(upd.shape) +
          ", expected [B, S, " + std::to_string(cache.shape[2]) + ", " +
          std::to_string(cache.shape[3]) + "]";
    else if (upd.dtype != cache.dtype)
      e = "update " + role(1) + " has dtype " + dtypeName(upd.dtype) +
          " unlike the cache's " + dtypeName(cache.dtype);
    else if (pos.shape.size() != 2 ||
             !tokenAligned(pos, 1, upd, uint64_t(upd.shape[2] * upd.shape[3])))
      e = "positions " + role(2) + " has shape " + shapeStr(pos.shape) +
          ", expected one per token of the update";
    else if (!sameBytes(res, cache) || !sameLayout(res, cache) ||
             res.dtype != cache.dtype)
      e = resName + " must be the cache's own bytes (an in-place update)";
    else if (overlaps(cache, upd) || overlaps(cache, pos))
      e = "cache " + role(0) + " overlaps the update or the positions";
    if (e.empty())
      return ar.err.empty() ? Status::success() : bad(ar.err);
    break;
  }
  case OpKind::Attention: {
    d.scale = ar.f("scale");
    d.chunkSize = ar.i("chunk_size");
    if (ar.err.empty() && d.chunkSize < 0)
      ar.err = "attribute chunk_size is negative";
    const BufferDesc &k = B(1), &v = B(2), &pos = B(3);
    e = needActivation(x, "query " + role(0));
    if (e.empty() && x.shape.size() != 4)
      e = "query " + role(0) + " has shape " + shapeStr(x.shape) +
          ", expected [B, S, H, d]";
    if (e.empty() && (!k.hasBatch || k.shape.size() != 4 || !sameLayout(k, v) ||
                      k.shape[3] != x.shape[3] || x.shape[2] % k.shape[2] != 0))
      e = "keys " + role(1) + " and values " + role(2) + " have shapes " +
          shapeStr(k.shape) + " and " + shapeStr(v.shape) +
          ", expected equal [B, S, Hkv, " + std::to_string(x.shape[3]) +
          "] with Hkv dividing " + std::to_string(x.shape[2]);
    if (e.empty() && k.hasSeq && k.shape[1] != x.shape[1])
      e = "keys " + role(1) + " have seq extent " + std::to_string(k.shape[1]) +
          " unlike the query's " + std::to_string(x.shape[1]);
    if (e.empty() &&
        (pos.shape.size() != 2 ||
         !tokenAligned(pos, 1, x, uint64_t(x.shape[2] * x.shape[3]))))
      e = "positions " + role(3) + " has shape " + shapeStr(pos.shape) +
          ", expected one per query token";
    if (e.empty())
      e = sameAsX();
    break;
  }
  case OpKind::RouterScores: {
    d.topK = ar.i("top_k");
    e = needActivation(x, "logits " + role(0));
    if (e.empty() && ar.err.empty() && (d.topK < 1 || d.topK > x.lastDim()))
      ar.err = "attribute top_k " + std::to_string(d.topK) +
               " is outside [1, " + std::to_string(x.lastDim()) + "]";
    if (e.empty())
      e = sameAsX();
    break;
  }
  case OpKind::MoeExperts: {
    const BufferDesc &scores = B(1), &gateUp = B(2), &down = B(3);
    e = needActivation(x, "input " + role(0));
    if (e.empty())
      e = needStatic(gateUp, "gate_up " + role(2), 3);
    if (e.empty())
      e = needStatic(down, "down " + role(3), 3);
    if (e.empty()) {
      int64_t E = gateUp.shape[0], D = gateUp.shape[1], I2 = gateUp.shape[2];
      if (I2 % 2 != 0 || D != x.lastDim())
        e = "gate_up " + role(2) + " has shape " + shapeStr(gateUp.shape) +
            ", expected [E, " + std::to_string(x.lastDim()) + ", 2I]";
      else if (down.shape != std::vector<int64_t>{E, I2 / 2, D})
        e = "down " + role(3) + " has shape " + shapeStr(down.shape) +
            ", expected [" + std::to_string(E) + ", " + std::to_string(I2 / 2) +
            ", " + std::to_string(D) + "]";
      else if (scores.lastDim() != E ||
               !tokenAligned(x, uint64_t(D), scores, uint64_t(E)))
        e = "scores " + role(1) + " has shape " + shapeStr(scores.shape) +
            ", expected one row of " + std::to_string(E) + " per input token";
    }
    if (e.empty())
      e = sameAsX();
    break;
  }
  case OpKind::MoeRoute: {
    d.slots = ar.i("slots");
    e = needActivation(x, "scores " + role(0));
    if (e.empty() && ar.err.empty() && (d.slots < 1 || d.slots > x.lastDim()))
      ar.err = "attribute slots " + std::to_string(d.slots) +
               " is outside [1, " + std::to_string(x.lastDim()) + "]";
    if (e.empty() && ar.err.empty())
      e = needRoute(res, x, d.slots, resName);
    break;
  }
  case OpKind::MoeHidden: {
    // x [B, S, D], scores [B, S, E], gate_up [E, D, 2I] -> h [B, S, K, I].
    const BufferDesc &scores = B(1), &gateUp = B(2);
    e = needActivation(x, "input " + role(0));
    if (e.empty())
      e = needStatic(gateUp, "gate_up " + role(2), 3);
    if (e.empty()) {
      int64_t E = gateUp.shape[0], D = gateUp.shape[1], I2 = gateUp.shape[2];
      int64_t K = res.shape.size() == x.shape.size() + 1
                      ? res.shape[res.shape.size() - 2]
                      : 0;
      if (I2 % 2 != 0 || D != x.lastDim())
        e = "gate_up " + role(2) + " has shape " + shapeStr(gateUp.shape) +
            ", expected [E, " + std::to_string(x.lastDim()) + ", 2I]";
      else if (scores.lastDim() != E ||
               !tokenAligned(x, uint64_t(D), scores, uint64_t(E)))
        e = "scores " + role(1) + " has shape " + shapeStr(scores.shape) +
            ", expected one row of " + std::to_string(E) + " per input token";
      else if (K < 1 || K > E || res.lastDim() != I2 / 2 ||
               !tokenAligned(x, uint64_t(D), res, uint64_t(K * I2 / 2)))
        e = resName + " has shape " + shapeStr(res.shape) +
            ", expected [.., K, " + std::to_string(I2 / 2) +
            "] per input token with 1 <= K <= " + std::to_string(E);
      else
        e = needRoute(B(3), scores, K, "route " + role(3));
    }
    break;
  }
  case OpKind::MoeDown: {
    // h [B, S, K, I], scores [B, S, E], down [E, I, D] -> y [B, S, D].
    const BufferDesc &h = x, &scores = B(1), &down = B(2);
    e = needActivation(h, "hidden " + role(0));
    if (e.empty())
      e = needStatic(down, "down " + role(2), 3);
    if (e.empty()) {
      int64_t E = down.shape[0], I = down.shape[1], D = down.shape[2];
      int64_t K = h.shape.size() >= 2 ? h.shape[h.shape.size() - 2] : 0;
      if (h.lastDim() != I || K < 1 || K > E)
        e = "hidden " + role(0) + " has shape " + shapeStr(h.shape) +
            ", expected [.., K, " + std::to_string(I) + "] with 1 <= K <= " +
            std::to_string(E);
      else if (scores.lastDim() != E ||
               !tokenAligned(h, uint64_t(K * I), scores, uint64_t(E)))
        e = "scores " + role(1) + " has shape " + shapeStr(scores.shape) +
            ", expected one row of " + std::to_string(E) + " per token";
      else if (!res.hasBatch || res.lastDim() != D ||
               !tokenAligned(h, uint64_t(K * I), res, uint64_t(D)))
        e = resName + " has shape " + shapeStr(res.shape) + ", expected [.., " +
            std::to_string(D) + "] per token";
      else
        e = needRoute(B(3), scores, K, "route " + role(3));
    }
    break;
  }
  case OpKind::Convert:
    e = sameAsX(); // the dtype may differ, the layout may not
    break;
  case OpKind::Swiglu:
  case OpKind::Add:
    // add also sums parameter-shaped gradients (tied embeddings), which
    // have no batch dim.
    if (d.kind == OpKind::Swiglu)
      e = needActivation(x, "operand " + role(0));
    if (e.empty() && !sameLayout(x, B(1)))
      e = "operands " + role(0) + " and " + role(1) + " have shapes " +
          shapeStr(x.shape) + " and " + shapeStr(B(1).shape) +
          " (or dims) that differ";
    if (e.empty())
      e = sameAsX();
    alias = Alias::AnyOperand;
    break;
  case OpKind::TakeLast: {
    e = needActivation(x, "input " + role(0));
    if (e.empty() && (!x.hasSeq || x.shape.size() < 3))
      e = "input " + role(0) + " must be [B, S, ...] with a seq dim";
    std::vector<int64_t> want = x.shape;
    if (e.empty())
      want[1] = 1;
    if (e.empty() && (res.shape != want || !res.hasBatch || res.hasSeq))
      e = resName + " has shape " + shapeStr(res.shape) + ", expected " +
          shapeStr(want) + " with no seq dim";
    break;
  }
  default:
    e = checkTrainOp(p, d, ar, alias);
    break;
  }
  if (!e.empty())
    return bad(e);
  if (!ar.err.empty())
    return bad(ar.err);

  // Any other sharing between results and operands, or between two results,
  // would corrupt an input before the kernel has read it.
  for (size_t r = 0; r < d.results.size(); ++r) {
    const BufferDesc &rb = p.buffers[d.results[r]];
    for (size_t i = 0; i < d.operands.size(); ++i) {
      const BufferDesc &o = B(i);
      if (!overlaps(o, rb))
        continue;
      bool exact = sameBytes(o, rb);
      if (exact && (alias == Alias::AnyOperand ||
                    (alias == Alias::FirstOperand && r == 0 && i == 0)))
        continue;
      return bad(resLabel(r) + " overlaps operand " + std::to_string(i) + " " +
                 role(i));
    }
    for (size_t q = 0; q < r; ++q)
      if (overlaps(p.buffers[d.results[q]], rb))
        return bad(resLabel(r) + " overlaps " + resLabel(q));
  }
  return Status::success();
}

Status PlanVerifier::checkPrograms(const plan::Plan &fb) {
  if (!fb.programs())
    return fail("programs are missing");
  std::set<std::string> names;
  for (uint32_t i = 0; i < fb.programs()->size(); ++i) {
    const plan::Program *pr = fb.programs()->Get(i);
    ProgramDesc pd;
    pd.name = str(pr->name());
    std::string where = "program " + std::to_string(i) + " '" + pd.name + "'";
    std::map<std::string, uint32_t> gradOutputs; ///< by parameter name
    if (pd.name.empty())
      return fail("program " + std::to_string(i) + ": name is missing");
    if (!names.insert(pd.name).second)
      return fail(where + ": a second program of that name");
    auto bind =
        [&](const flatbuffers::Vector<flatbuffers::Offset<plan::IoBinding>> *v,
            bool input) -> Status {
      if (!v)
        return Status::success();
      for (uint32_t k = 0; k < v->size(); ++k) {
        const plan::IoBinding *b = v->Get(k);
        std::string n = str(b->name());
        std::string what = where + (input ? " input '" : " output '") + n + "'";
        if (b->buffer() >= p.buffers.size())
          return fail(what + ": buffer index " + std::to_string(b->buffer()) +
                      " out of range (" + std::to_string(p.buffers.size()) +
                      " buffers)");
        int64_t *slot = nullptr;
        if (input && n == "input_ids")
          slot = &pd.inputIds;
        else if (input && n == "positions")
          slot = &pd.positions;
        else if (!input && n == "logits")
          slot = &pd.logits;
        else if (!input && n == "loss")
          slot = &pd.loss;
        else if (!input && n.rfind("grad.", 0) == 0) {
          if (!gradOutputs.emplace(n.substr(5), b->buffer()).second)
            return fail(what + ": bound twice");
          continue;
        } else if (input)
          return fail(
              what +
              ": unknown input (the runtime fills input_ids and positions)");
        else
          continue; // outputs the runtime does not read are harmless
        if (*slot >= 0)
          return fail(what + ": bound twice");
        *slot = b->buffer();
      }
      return Status::success();
    };
    if (Status s = bind(pr->inputs(), true); !s.ok())
      return s;
    if (Status s = bind(pr->outputs(), false); !s.ok())
      return s;
    if (pd.inputIds < 0)
      return fail(where + ": has no input_ids input");
    bool train = pd.name == "train_step";
    if (!train && pd.logits < 0)
      return fail(where + ": has no logits output");
    if (train && pd.loss < 0)
      return fail(where + ": has no loss output");
    const BufferDesc &ids = p.buffers[pd.inputIds];
    std::string idsWhat =
        where + " input_ids " + bufName(uint32_t(pd.inputIds));
    if (ids.region != plan::Region::Io || !isIndex(ids.dtype) ||
        ids.shape.size() != 2 || !ids.hasSeq)
      return fail(
          idsWhat +
          ": expected an io-region i64 [B, S] buffer with batch and seq dims");
    if (pd.positions >= 0) {
      const BufferDesc &pos = p.buffers[pd.positions];
      if (pos.region != plan::Region::Io || !isIndex(pos.dtype) ||
          !sameLayout(pos, ids))
        return fail(
            where + " positions " + bufName(uint32_t(pd.positions)) +
            ": expected an io-region index buffer shaped like input_ids " +
            shapeStr(ids.shape));
      if (overlaps(pos, ids))
        return fail(where + ": positions and input_ids share bytes");
    }
    if (pd.logits >= 0) {
      const BufferDesc &lg = p.buffers[pd.logits];
      if (!isFloat(lg.dtype) || lg.shape.size() != 3 || !lg.hasBatch ||
          lg.shape[2] != p.vocabSize || (!lg.hasSeq && lg.shape[1] != 1))
        return fail(where + " logits " + bufName(uint32_t(pd.logits)) +
                    ": shape " + shapeStr(lg.shape) +
                    ", expected [B, S or 1, " + std::to_string(p.vocabSize) +
                    "] of floats");
    }
    if (Status s = checkTrainOutputs(where, pd, gradOutputs); !s.ok())
      return s;
    pd.seqCapacity = ids.shape[1];
    auto touch = [&](uint32_t b) {
      if (p.buffers[b].hasSeq)
        pd.seqCapacity = std::min(pd.seqCapacity, p.buffers[b].shape[1]);
    };
    if (pd.logits >= 0)
      touch(uint32_t(pd.logits));
    if (pd.positions >= 0)
      touch(uint32_t(pd.positions));
    if (pr->steps()) {
      for (uint32_t k = 0; k < pr->steps()->size(); ++k) {
        uint32_t s = pr->steps()->Get(k);
        if (s >= p.kernels.size())
          return fail(where + ": step " + std::to_string(k) + " kernel index " +
                      std::to_string(s) + " out of range (" +
                      std::to_string(p.kernels.size()) + " kernels)");
        if (p.kernels[s].alternativeOf >= 0)
          return fail(where + ": step " + std::to_string(k) + " runs kernel " +
                      std::to_string(s) +
                      ", a tuning candidate (only l4-tune runs those)");
        pd.steps.push_back(s);
        for (const OpDesc &op : p.kernels[s].ops) {
          for (uint32_t b : op.operands)
            touch(b);
          for (uint32_t b : op.results)
            touch(b);
        }
      }
    }
    if (Status s = checkWritten(where, pd); !s.ok())
      return s;
    p.programs.push_back(std::move(pd));
  }
  std::vector<const char *> need;
  if (p.programKind == "forward")
    need = {"forward"};
  else if (p.programKind == "train")
    need = {"train_step"};
  else
    need = {"prefill", "decode"};
  for (const char *n : need)
    if (!p.program(n))
      return fail("a " + p.programKind + " plan needs a program named '" + n +
                  "'");
  return Status::success();
}

Status
PlanVerifier::checkTrainOutputs(const std::string &where, ProgramDesc &pd,
                                const std::map<std::string, uint32_t> &grads) {
  if (pd.loss >= 0) {
    const BufferDesc &l = p.buffers[pd.loss];
    if (l.dtype != plan::DType::F32 || l.numel != 1 || l.hasBatch)
      return fail(where + " loss " + bufName(uint32_t(pd.loss)) + ": shape " +
                  shapeStr(l.shape) + " of " + dtypeName(l.dtype) +
                  ", expected an f32 scalar");
  }
  if (pd.loss < 0 && grads.empty())
    return Status::success();
  // AdamW updates every bound weight, so each needs its gradient, exactly
  // the weight's shape, in bytes of its own.
  std::map<std::string, size_t> weightIndex;
  for (size_t w = 0; w < p.weights.size(); ++w)
    weightIndex.emplace(p.weights[w].hfName, w);
  for (const auto &[name, buf] : grads)
    if (!weightIndex.count(name))
      return fail(where + " output 'grad." + name +
                  "': no weight binding is named '" + name + "'");
  std::vector<uint32_t> owned;
  if (pd.loss >= 0)
    owned.push_back(uint32_t(pd.loss));
  for (const WeightDesc &w : p.weights) {
    auto it = grads.find(w.hfName);
    if (it == grads.end())
      return fail(where + ": has no output 'grad." + w.hfName +
                  "' for the weight of that name");
    const BufferDesc &g = p.buffers[it->second];
    const BufferDesc &wb = p.buffers[w.buffer];
    std::string what =
        where + " output 'grad." + w.hfName + "' " + bufName(it->second);
    if (g.dtype != plan::DType::F32 || g.hasBatch || g.shape != wb.shape)
      return fail(what + ": shape " + shapeStr(g.shape) + " of " +
                  dtypeName(g.dtype) + ", expected f32 " + shapeStr(wb.shape) +
                  " with no batch dim (the weight's shape)");
    if (g.region == plan::Region::Weights)
      return fail(what + ": lies in the weights region");
    for (uint32_t o : owned)
      if (overlaps(p.buffers[o], g))
        return fail(what + ": shares bytes with " + bufName(o) +
                    ", another output");
    owned.push_back(it->second);
    pd.grads.push_back(it->second);
  }
  return Status::success();
}

Status PlanVerifier::checkWritten(const std::string &where,
                                  const ProgramDesc &pd) {
  // Parameter-shaped outputs have no run-time extent: an output no step
  // writes would hand back whatever the region held before.
  std::vector<uint32_t> outs = pd.grads;
  if (pd.loss >= 0)
    outs.push_back(uint32_t(pd.loss));
  for (uint32_t o : outs) {
    // Written whole by one result, or piecewise by results inside it (the
    // row chunks of l4c-chunk-loss's weight gradient).
    const BufferDesc &ob = p.buffers[o];
    std::vector<std::pair<uint64_t, uint64_t>> parts;
    for (uint32_t k : pd.steps)
      for (const OpDesc &op : p.kernels[k].ops)
        for (uint32_t r : op.results) {
          const BufferDesc &rb = p.buffers[r];
          if (rb.region == ob.region && rb.offset >= ob.offset &&
              rb.offset + rb.size <= ob.offset + ob.size)
            parts.push_back({rb.offset, rb.offset + rb.size});
        }
    std::sort(parts.begin(), parts.end());
    uint64_t covered = ob.offset;
    for (auto [lo, hi] : parts)
      if (lo <= covered)
        covered = std::max(covered, hi);
    bool written = covered >= ob.offset + ob.size;
    if (!written)
      return fail(where + ": output " + bufName(o) + " is written by no step");
  }
  return Status::success();
}

Status Plan::fromBytes(std::vector<uint8_t> bytes, const std::string &label,
                       std::shared_ptr<const Plan> &out) {
  auto plan = std::make_shared<Plan>();
  plan->label_ = label;
  plan->bytes_ = std::move(bytes);
  PlanVerifier v(*plan);
  if (Status s = v.run(); !s.ok())
    return s;
  out = std::move(plan);
  return Status::success();
}

Status Plan::load(const std::string &path, std::shared_ptr<const Plan> &out) {
  // A directory opens as a stream on Linux and reports a bogus size.
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    return Status::fail(StatusCode::Io,
                        path + ": is a directory, not a plan file");
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in)
    return Status::fail(StatusCode::Io,
                        path + ": cannot open: " + std::strerror(errno));
  std::streamoff size = in.tellg();
  if (size < 0)
    return Status::fail(StatusCode::Io, path + ": cannot read its size");
  if (uint64_t(size) >= FLATBUFFERS_MAX_BUFFER_SIZE)
    return Status::fail(StatusCode::InvalidPlan,
                        path + ": plan of " + std::to_string(size) +
                            " bytes is larger than 2 GiB");
  std::vector<uint8_t> bytes(static_cast<size_t>(size));
  in.seekg(0);
  if (size > 0 && !in.read(reinterpret_cast<char *>(bytes.data()), size))
    return Status::fail(StatusCode::Io, path + ": read failed");
  return fromBytes(std::move(bytes), path, out);
}

} // namespace l4c::rt
