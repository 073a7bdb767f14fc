/* The C API of the SpectrumKV codec: score, plan, pack and unpack a dense KV cache through the
 * real codec (the same payload bytes the daemon sends), for harnesses in other languages (the
 * quality harness in bench/quality/ loads it with Python's ctypes).
 *
 * A dense KV cache is one array [num_layers][2][num_tokens][num_kv_heads][head_dim] of 16-bit
 * values (fp16 or bf16 bit patterns); index 0 of the second axis is K (post-RoPE), 1 is V. The C
 * API describes it to the codec as a one-region, one-block layout, so the codec reads and writes
 * it in place with no copy.
 *
 * skv_round_trip runs, in order: Codec::Score (or takes precomputed scores), PlanTiers,
 * PackPayload, then UnpackPayload into the destination array. Dropped tokens are not written:
 * their rows of the destination keep whatever the caller put there.
 *
 * Errors: every function returns an skv_status (the canonical absl/gRPC code numbers, SKV_OK = 0)
 * and, where the caller passes an error buffer, writes a NUL-terminated message into it
 * (truncated to its size). No function aborts on bad input.
 *
 * Memory: the codec backend decides where KV arrays must live (skv_codec_memory_kind). This
 * version serves host memory only: "auto" picks the best CPU kernels, and a device backend
 * asked for by name fails with SKV_UNIMPLEMENTED until the C API stages device payloads.
 *
 * Thread-safety: an skv_codec may be used from several threads at once as long as the calls
 * write disjoint memory (different destination arrays and output buffers). */
#ifndef SPECTRUMKV_KERNELS_CAPI_SPECTRUMKV_CODEC_H_
#define SPECTRUMKV_KERNELS_CAPI_SPECTRUMKV_CODEC_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define SKV_API __attribute__((visibility("default")))
#else
#define SKV_API
#endif

/* Bumped whenever a struct below changes incompatibly. */
#define SKV_CAPI_VERSION 1

/* The canonical status codes (absl::StatusCode). */
typedef enum skv_status {
  SKV_OK = 0,
  SKV_CANCELLED = 1,
  SKV_UNKNOWN = 2,
  SKV_INVALID_ARGUMENT = 3,
  SKV_DEADLINE_EXCEEDED = 4,
  SKV_NOT_FOUND = 5,
  SKV_ALREADY_EXISTS = 6,
  SKV_PERMISSION_DENIED = 7,
  SKV_RESOURCE_EXHAUSTED = 8,
  SKV_FAILED_PRECONDITION = 9,
  SKV_ABORTED = 10,
  SKV_OUT_OF_RANGE = 11,
  SKV_UNIMPLEMENTED = 12,
  SKV_INTERNAL = 13,
  SKV_UNAVAILABLE = 14,
  SKV_DATA_LOSS = 15,
} skv_status;

typedef enum skv_memory_kind {
  SKV_MEMORY_HOST = 0,
  SKV_MEMORY_DEVICE = 1,
} skv_memory_kind;

/* A codec backend. Opaque; create with skv_codec_create, free with skv_codec_destroy. */
typedef struct skv_codec skv_codec;

/* One request's dense KV cache. `src` is read; `dst` (same shape) receives the reconstruction and
 * may equal `src` (in place) but must not otherwise overlap it. `dst` may be NULL for calls that
 * do not unpack (skv_score). */
typedef struct skv_dense_kv {
  uint32_t num_layers;
  uint32_t num_kv_heads;
  uint32_t head_dim; /* a multiple of 8 */
  uint32_t num_tokens;
  const char* dtype; /* "fp16" or "bf16" */
  skv_memory_kind memory_kind;
  const void* src;
  void* dst;
} skv_dense_kv;

/* What to do and how. skv_options_init fills the defaults; names are those of the `spectrumkv
 * codec` command and of PlanOptions / ScoreOptions (kernels/api/plan.h, scoring.h). */
typedef struct skv_options {
  uint32_t struct_size; /* sizeof(skv_options) as the caller compiled it */

  /* Planning. */
  const char* policy;         /* 3tier 2tier sinkprotect uniform_int8 uniform_int4 pdtrim
                                 random_tier; default 3tier */
  double budget;              /* fraction of the FP16 KV bytes, in (0, 1]; default 0.5 */
  const char* budget_kind;    /* "element" (the paper's b) or "wire" (all bytes); default element */
  const char* on_unreachable; /* "drop" or "reject"; default drop */
  uint32_t sinks;             /* default 4 */
  double first_ratio;         /* pdtrim front share of kept tokens; default 0 (sinks + suffix) */
  uint64_t seed;              /* random_tier */
  int32_t per_layer;          /* nonzero: one tier map per layer */
  double layer_slope;         /* per-layer budgets b_l = b + (l - (L-1)/2) * slope */
  const char* quantizer;      /* "absmax" (the paper's), "kcn" or "progressive"; default absmax */

  /* Scoring. */
  const char* scoring; /* attention key_norm external positional; default key_norm */
  /* attention: float32 [num_layers][window][num_q_heads][head_dim], post-RoPE. */
  const float* window_queries;
  uint32_t window;
  uint32_t num_q_heads;
  uint32_t pool_kernel; /* odd; default 5 */
  double recency_decay; /* default 0 */
  /* external: num_tokens scores, higher = more important. */
  const float* external_scores;
  /* If non-NULL, num_tokens scores that skv_score returned for this KV and these scoring
   * options: the round trip plans with them and does not score again (the header still records
   * `scoring`). */
  const float* precomputed_scores;
} skv_options;

/* Per-call outputs. Every pointer may be NULL; non-NULL arrays must have the sizes stated. */
typedef struct skv_outputs {
  uint8_t* tiers;    /* num_maps * num_tokens tier codes, map-major (num_maps = num_layers with
                        per_layer, else 1): 0 FP16, 1 INT8, 2 INT4, 3 DROP */
  float* scores;     /* num_tokens importance scores the plan ranked by */
  uint32_t* dropped; /* num_maps * num_tokens capacity: dropped positions, map by map, ascending
                        within a map; `num_dropped` of them are written */
  uint8_t* payload;  /* payload_capacity bytes: a copy of the wire payload if it fits */
  uint64_t payload_capacity;

  /* Filled on success. */
  uint32_t num_maps;
  uint32_t counts[4]; /* tokens per tier, summed over maps */
  uint64_t num_dropped;
  double element_budget; /* realized element budget */
  double wire_budget;    /* realized wire budget: payload_bytes / fp16_bytes */
  uint64_t payload_bytes;
  uint64_t fp16_bytes;
  double score_s, plan_s, pack_s, unpack_s; /* wall-clock seconds per stage */
} skv_outputs;

/* SKV_CAPI_VERSION of the library. */
SKV_API int skv_capi_version(void);

/* Fills `options` with the defaults (and its struct_size). */
SKV_API void skv_options_init(skv_options* options);

/* Creates a codec: backend "auto", "cpu", "cpu-scalar" or "cuda". */
SKV_API skv_status skv_codec_create(const char* backend, skv_codec** codec, char* error,
                                    size_t error_len);
SKV_API void skv_codec_destroy(skv_codec* codec);

/* Backend name ("cpu-avx2", ...) and the reason it was chosen; valid while the codec lives. */
SKV_API const char* skv_codec_name(const skv_codec* codec);
SKV_API const char* skv_codec_reason(const skv_codec* codec);
SKV_API skv_memory_kind skv_codec_memory_kind(const skv_codec* codec);

/* Writes num_tokens importance scores of `kv.src` under the scoring options into `scores`. */
SKV_API skv_status skv_score(skv_codec* codec, const skv_dense_kv* kv, const skv_options* options,
                             float* scores, char* error, size_t error_len);

/* Score (unless precomputed), plan, pack and unpack `kv.src` into `kv.dst` (see the top of this
 * file). On error nothing has been written to `kv.dst`. */
SKV_API skv_status skv_round_trip(skv_codec* codec, const skv_dense_kv* kv,
                                  const skv_options* options, skv_outputs* outputs, char* error,
                                  size_t error_len);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* SPECTRUMKV_KERNELS_CAPI_SPECTRUMKV_CODEC_H_ */
