/*===- l4rt.h - C API of libl4rt, the l4c runtime -------------------------===*
 *
 * Loads an l4c execution plan, binds weights (a Hugging Face checkpoint or a
 * seed) and runs forward passes, generation, or training steps with AdamW
 * and checkpoints. Plain C, opaque handles, status codes; no call throws,
 * and l4rt_last_error() explains a failure.
 *
 *===----------------------------------------------------------------------===*/
#ifndef L4C_RUNTIME_L4RT_H
#define L4C_RUNTIME_L4RT_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define L4RT_API
#else
#define L4RT_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define L4RT_VERSION_MAJOR 0
#define L4RT_VERSION_MINOR 3

typedef enum l4rt_status {
  L4RT_OK = 0,
  L4RT_ERROR_INVALID_ARGUMENT = 1, /* bad inputs: ids, lengths, null pointers */
  L4RT_ERROR_IO = 2,               /* a file could not be opened or read */
  L4RT_ERROR_INVALID_PLAN = 3,     /* the plan failed verification */
  L4RT_ERROR_UNSUPPORTED = 4, /* valid, but not something this build runs */
  L4RT_ERROR_OUT_OF_MEMORY = 5,
  L4RT_ERROR_INTERNAL = 6
} l4rt_status;

/* Opaque handles. A session keeps its plan alive, so the plan handle may be
 * freed first. A session runs one call at a time (calls are serialised). */
typedef struct l4rt_plan_s *l4rt_plan;
typedef struct l4rt_session_s *l4rt_session;

/* Facts about a loaded plan. The strings belong to the plan handle. */
typedef struct l4rt_plan_summary {
  uint32_t version;
  const char *program_kind; /* "forward" | "generate" | "train" */
  const char *target;       /* "cpu" | "cuda:sm_90a" */
  const char *precision;    /* "f32" | "bf16" */
  const char *model_source;
  int64_t max_batch;
  int64_t max_seq;
  int64_t vocab_size;
  uint64_t arena_size; /* bytes */
  uint64_t weights_size;
  uint64_t cache_size;
  uint64_t io_size;
  uint32_t num_kernels;
  uint32_t num_buffers;
  uint32_t num_weights; /* checkpoint tensors bound */
} l4rt_plan_summary;

/* Sampling instead of greedy decoding: softmax(logits / temperature) over the
 * smallest set of tokens whose probability reaches top_p. */
typedef struct l4rt_sampling {
  float temperature; /* > 0 */
  float top_p;       /* in (0, 1] */
  uint64_t seed;     /* same seed, same tokens */
} l4rt_sampling;

/* torch.optim.AdamW's hyperparameters (decoupled weight decay, bias-corrected
 * moments, no amsgrad). l4rt_adamw_defaults() fills torch's defaults: lr 1e-3,
 * betas 0.9 / 0.999, eps 1e-8, weight_decay 0.01. */
typedef struct l4rt_adamw {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
} l4rt_adamw;

/* Wall-clock split of the last l4rt_forward / l4rt_generate call; a train
 * step reports its time and B * T tokens as the prefill. */
typedef struct l4rt_timing {
  double prefill_seconds; /* forward pass, or prefill + first token */
  double decode_seconds;  /* the remaining tokens */
  int64_t prefill_tokens; /* B * T */
  int64_t decode_tokens;  /* B * (G - 1) */
} l4rt_timing;

/* The message of the last failed call on this thread ("" after a success).
 * Valid until the next l4rt call on this thread. */
L4RT_API const char *l4rt_last_error(void);
/* "ok", "invalid argument", ... */
L4RT_API const char *l4rt_status_string(l4rt_status status);

/* Reads and verifies a plan file. */
L4RT_API l4rt_status l4rt_plan_load(const char *path, l4rt_plan *out_plan);
/* Verifies plan bytes held in memory (copied). */
L4RT_API l4rt_status l4rt_plan_load_memory(const void *data, size_t size,
                                           l4rt_plan *out_plan);
L4RT_API void l4rt_plan_free(l4rt_plan plan);
L4RT_API l4rt_status l4rt_plan_info(l4rt_plan plan,
                                    l4rt_plan_summary *out_info);

/* The plan's programs ("forward"; "prefill" and "decode"; "train_step") and
 * the kernels each runs, in order. The strings and the steps array belong
 * to the plan handle. */
typedef struct l4rt_program_info {
  const char *name;
  uint32_t num_steps;
  const uint32_t *steps; /* kernel indices, as l4rt_plan_kernel takes them */
} l4rt_program_info;

/* One kernel of a plan. The launch fields are those compiled for the CUDA
 * target, at the plan's maximum extents; a cpu plan has 0 and "" there. */
typedef struct l4rt_kernel_info {
  const char *name; /* "decode.l0.qkv", ... */
  const char *kind; /* "gemm", "gemv", "attention", "router", ... */
  uint32_t num_ops; /* semantic ops fused into it */
  /* l4-tune: the tile configuration its code was generated with ("" when
   * it has none) and the signature a tuning file keys its choice by. */
  const char *tile_config;
  const char *signature;
  /* >= 0: a tuning candidate of that kernel (l4c --tune-candidates), which
   * no program runs; -1 otherwise. */
  int32_t alternative_of;
  uint32_t blocks, threads, shared_bytes;
  uint64_t cubin_bytes;   /* 0: compiled by NVRTC when the plan loads */
  uint32_t num_tensor_maps; /* TMA descriptors the runtime encodes */
  /* 1: the kernel waits for the one before it on entry, so the CUDA backend
   * may launch it with programmatic stream serialization. */
  int32_t grid_wait;
} l4rt_kernel_info;

L4RT_API l4rt_status l4rt_plan_num_programs(l4rt_plan plan,
                                            uint32_t *out_count);
/* index < l4rt_plan_num_programs; else L4RT_ERROR_INVALID_ARGUMENT. */
L4RT_API l4rt_status l4rt_plan_program(l4rt_plan plan, uint32_t index,
                                       l4rt_program_info *out_info);
/* index < l4rt_plan_summary.num_kernels; else L4RT_ERROR_INVALID_ARGUMENT. */
L4RT_API l4rt_status l4rt_plan_kernel(l4rt_plan plan, uint32_t index,
                                      l4rt_kernel_info *out_info);

/* Allocates the plan's memory and fills its weights from the checkpoint
 * `weights_dir` (a directory with model.safetensors or an index, or a single
 * .safetensors file), or, when weights_dir is NULL, from random_seed:
 * bell-shaped values of standard deviation 1/sqrt(fan_in) for matrices (the
 * same values on every backend and thread count) and ones for norm weights. */
L4RT_API l4rt_status l4rt_session_create(l4rt_plan plan,
                                         const char *weights_dir,
                                         uint64_t random_seed,
                                         l4rt_session *out_session);
/* Everything l4rt_session_create takes, plus where to run. Zero-initialise
 * it (or use l4rt_session_options_default) and set what you need. */
typedef struct l4rt_session_options {
  const char *weights_dir; /* NULL: random weights from random_seed */
  uint64_t random_seed;
  /* "cpu" (also for NULL or ""), "cuda" (device 0) or "cuda:N". CUDA needs a
   * plan compiled with --target=cuda and the driver, libcuda.so.1, which is
   * loaded at run time: a machine without it still runs the cpu backend. */
  const char *device;
} l4rt_session_options;

L4RT_API l4rt_session_options l4rt_session_options_default(void);
L4RT_API l4rt_status l4rt_session_create_with(
    l4rt_plan plan, const l4rt_session_options *options,
    l4rt_session *out_session);
/* One kernel's code as the device's driver reports it. Since 0.3. */
typedef struct l4rt_kernel_code {
  int32_t registers;     /* a thread */
  int32_t local_bytes;   /* a thread: register spills, local arrays */
  int32_t static_shared; /* bytes, besides the plan's dynamic shared memory */
  int32_t max_threads;   /* a block, as its registers allow */
} l4rt_kernel_code;

/* What a CUDA device makes of a plan, found without running it or taking
 * its memory (l4rt_device_probe). The strings and the code array belong to
 * the plan handle and stay valid until the next probe of that plan. Since
 * 0.3. */
typedef struct l4rt_device_report {
  const char *device_name; /* "NVIDIA H100 80GB HBM3" */
  const char *arch;        /* what its kernels are built for: "sm_90a" */
  int32_t multiprocessors;
  uint64_t free_bytes;  /* the device's memory now, cuMemGetInfo */
  uint64_t total_bytes;
  /* What a session of the plan allocates: its regions and, for a train plan,
   * the optimizer state on the device (the driver's context and the code
   * come on top); need_detail names the parts ("weights 401.47 GiB, ..."). */
  uint64_t need_bytes;
  const char *need_detail;
  int32_t fits; /* need_bytes <= free_bytes */
  /* Every kernel was loaded on the device and checked against its limits
   * (threads a block for its registers, shared memory). */
  uint32_t kernels;
  uint32_t modules;           /* distinct code objects */
  uint32_t modules_from_plan; /* the plan's own code, its cubins */
  uint32_t modules_compiled;  /* NVRTC now, or its on-disk cache */
  int32_t max_registers;      /* a thread, the most of any kernel; 0: unknown */
  const char *max_registers_kernel;
  uint32_t local_memory_kernels; /* kernels with local memory (spills) */
  uint64_t max_local_bytes;      /* a thread, the most of any kernel */
  const l4rt_kernel_code *code;  /* `kernels` entries, by plan kernel index */
} l4rt_device_report;

/* Opens `device` ("cuda" or "cuda:N"), loads every kernel of the plan there
 * and compares the plan's memory with the device's free memory, allocating
 * none of it: a plan too large for the device still has its code checked
 * (fits is then 0). Fails where a kernel does not load or exceeds a limit. */
L4RT_API l4rt_status l4rt_device_probe(l4rt_plan plan, const char *device,
                                       l4rt_device_report *out_report);

/* "cpu", or "cuda (<device name>, <arch>)"; owned by the session. */
L4RT_API const char *l4rt_session_device(l4rt_session session);
L4RT_API void l4rt_session_free(l4rt_session session);

/* Runs a forward plan on ids [batch, seq]; logits_out receives
 * [batch, seq, vocab_size] floats. */
L4RT_API l4rt_status l4rt_forward(l4rt_session session, const int64_t *ids,
                                  int64_t batch, int64_t seq,
                                  float *logits_out);

/* Continues ids [batch, seq] by max_new_tokens tokens, greedy when sampling
 * is NULL. out_ids receives [batch, seq + max_new_tokens] (the prompt, then
 * the new tokens) and *out_len the row length seq + max_new_tokens. Fails when
 * seq + max_new_tokens exceeds the plan's max_seq. */
L4RT_API l4rt_status l4rt_generate(l4rt_session session, const int64_t *ids,
                                   int64_t batch, int64_t seq,
                                   int64_t max_new_tokens,
                                   const l4rt_sampling *sampling,
                                   int64_t *out_ids, int64_t *out_len);

L4RT_API l4rt_status l4rt_session_timing(l4rt_session session,
                                         l4rt_timing *out_timing);

/* One kernel of l4rt_check_kernels: its worst result against the CPU. */
typedef struct l4rt_kernel_check {
  uint32_t kernel;     /* index in the plan */
  const char *name;    /* the kernel's name (its HF module path) */
  const char *program; /* "forward", "prefill", "decode" */
  const char *buffer;  /* the result buffer with the largest error */
  int integer;         /* that result holds integers (router indices) */
  double max_abs_err;  /* float results: max |gpu - cpu| over live elements */
  double max_abs_ref;  /* max |cpu| there */
  uint64_t mismatches; /* integer results: elements that differ */
  uint64_t elements;   /* live result elements compared, all results */
  /* Bytes outside the kernel's results that the GPU left different from
   * before it ran (a write out of bounds or into another buffer), and
   * where the first lies ("arena byte N (in buffer 'x')"; "" when none).
   * Since 0.2. */
  uint64_t stray_bytes;
  const char *stray_at;
} l4rt_kernel_check;

/* The differential test of every kernel of a CUDA session: runs `program`
 * on ids [batch, seq] (positions pos0 + s) kernel by kernel on the CPU
 * backend and on the GPU, compares each kernel's results, and gives the GPU
 * the CPU's results before the next kernel. Before each kernel the GPU's
 * copy of the bytes it must not read (all of the arena, caches and io
 * region but its inputs' live rows, batch entries and cache positions) is
 * set to 0xff (NaN), so a kernel that reads stale bytes shows wrong live
 * results; after it, every byte of every region outside its results must
 * be unchanged.
 * *out_checks (valid until the next call on the session) receives one
 * entry per kernel run, in order. */
L4RT_API l4rt_status l4rt_check_kernels(l4rt_session session,
                                        const char *program, const int64_t *ids,
                                        int64_t batch, int64_t seq,
                                        int64_t pos0,
                                        const l4rt_kernel_check **out_checks,
                                        size_t *out_count);

/* One kernel of l4rt_profile_kernels. */
typedef struct l4rt_kernel_time {
  uint32_t kernel;  /* index in the plan */
  const char *name; /* the kernel's name */
  const char *kind; /* gemm, attention, norm, ... */
  double ms;        /* GPU time, the median over the repeats */
} l4rt_kernel_time;

/* CUDA sessions: runs `program` on ids [batch, seq] (positions pos0 + s)
 * `repeats` times with a CUDA event between every two kernels; *out_times
 * (valid until the next call on the session) receives each kernel's median
 * GPU time, in program order. The runs write what the program writes (a
 * decode profile appends to the KV cache at pos0). */
L4RT_API l4rt_status l4rt_profile_kernels(l4rt_session session,
                                          const char *program,
                                          const int64_t *ids, int64_t batch,
                                          int64_t seq, int64_t pos0,
                                          int64_t repeats,
                                          const l4rt_kernel_time **out_times,
                                          size_t *out_count);

/* One tile configuration of a tunable kernel (l4rt_tune_kernels). */
typedef struct l4rt_kernel_tuning {
  uint32_t kernel;       /* the configuration's kernel index in the plan */
  uint32_t of;           /* the kernel the program runs (== kernel: itself) */
  const char *name;      /* the kernel's name */
  const char *signature; /* its tuning signature (see l4c --tuning) */
  const char *config;    /* the tile configuration, e.g. "p128x64" */
  double ms;             /* GPU time, the median over the repeats */
  double max_abs_err;    /* against kernel `of`'s results, same inputs */
  double max_abs_ref;    /* the largest |value| of those results */
} l4rt_kernel_tuning;

/* CUDA sessions on plans compiled with `l4c --tune-candidates`: runs
 * `program` on ids [batch, seq] at pos0 kernel by kernel and, at each
 * kernel with candidate tile configurations, times the kernel and each
 * candidate (median of `repeats` runs) from the same inputs and compares
 * the candidates' results with the kernel's. *out_rows (valid until the
 * next call on the session) gets one row per configuration, each kernel's
 * own first, in program order. */
L4RT_API l4rt_status l4rt_tune_kernels(l4rt_session session,
                                       const char *program, const int64_t *ids,
                                       int64_t batch, int64_t seq, int64_t pos0,
                                       int64_t repeats,
                                       const l4rt_kernel_tuning **out_rows,
                                       size_t *out_count);

/*---- Training (plans compiled with --program=train) ----------------------*/

/* Runs the train_step program on ids [batch, seq] (seq >= 2): *loss (may be
 * NULL) receives the mean next-token cross entropy, and the gradients of
 * that loss are added to the session's gradient sum. Call it k times before
 * l4rt_adamw_step to accumulate k micro-batches. */
L4RT_API l4rt_status l4rt_train_step(l4rt_session session, const int64_t *ids,
                                     int64_t batch, int64_t seq, float *loss);

/* One AdamW step on every weight from the MEAN of the summed gradients (sum
 * over the micro-batches since the last step, divided by their count), with
 * moments m, v (f32) and a step counter kept by the session; then clears
 * the gradient sum. Fails when no train step ran since the last call. */
L4RT_API l4rt_status l4rt_adamw_step(l4rt_session session,
                                     const l4rt_adamw *hyper);
L4RT_API void l4rt_adamw_defaults(l4rt_adamw *out_hyper);

/* Drops the gradient sum without applying it. */
L4RT_API l4rt_status l4rt_zero_grad(l4rt_session session);

/* The weights the plan binds (and AdamW updates), by HF name. The string
 * belongs to the session. */
L4RT_API l4rt_status l4rt_num_parameters(l4rt_session session,
                                         size_t *out_count);
L4RT_API l4rt_status l4rt_parameter_name(l4rt_session session, size_t index,
                                         const char **out_name);

/* Shape and f32 contents of a tensor of the session:
 *   "<hf name>"       the weight as it is now,
 *   "grad.<hf name>"  the gradient AdamW would apply now (the mean of the
 *                     summed micro-batch gradients),
 *   "m.<hf name>", "v.<hf name>"  AdamW's moments (zeros before the first
 *                     step).
 * l4rt_tensor_shape writes up to max_rank extents and *out_rank. numel must
 * equal the tensor's element count. */
L4RT_API l4rt_status l4rt_tensor_shape(l4rt_session session, const char *name,
                                       int64_t *out_shape, size_t max_rank,
                                       size_t *out_rank);
L4RT_API l4rt_status l4rt_get_tensor(l4rt_session session, const char *name,
                                     float *dst, size_t numel);

/* Integers saved with the optimizer state. "step" is the number of AdamW
 * steps taken (settable); "micro_batches" (read only) the gradients summed
 * since the last one; any other name is the caller's (l4-run keeps its data
 * cursor here). */
L4RT_API l4rt_status l4rt_set_counter(l4rt_session session, const char *name,
                                      int64_t value);
L4RT_API l4rt_status l4rt_get_counter(l4rt_session session, const char *name,
                                      int64_t *out_value);

/* Writes a checkpoint directory: config.json (the plan's model config),
 * model.safetensors (every weight, F32, HF names: loadable by l4c and by
 * transformers) and optimizer.safetensors (m.<name>, v.<name>, step and the
 * counters as I64 scalars). The directory is built beside `dir` as
 * "<dir>.l4c-tmp", synced, and swapped into place in one rename, so an
 * interrupted save leaves the previous checkpoint intact. An existing `dir`
 * holding anything but checkpoint files is never replaced. */
L4RT_API l4rt_status l4rt_save_checkpoint(l4rt_session session,
                                          const char *dir);

/* Restores AdamW's moments, step and counters from dir/optimizer.safetensors
 * (or from that file when `dir` names it). Weights come from creating the
 * session on the same directory: l4rt_session_create(plan, dir, ...). */
L4RT_API l4rt_status l4rt_load_optimizer(l4rt_session session, const char *dir);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* L4C_RUNTIME_L4RT_H */
