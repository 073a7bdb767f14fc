"""ctypes binding of the SpectrumKV codec's C API (kernels/capi/spectrumkv_codec.h).

Every call runs the real codec: score -> PlanTiers -> PackPayload -> UnpackPayload, the same
payload bytes the daemon sends. KV arrays are numpy uint16 arrays of fp16 or bf16 bit patterns,
shaped [layers, 2, tokens, kv_heads, head_dim] (index 0 of axis 1 is K, post-RoPE; 1 is V).

The library is found through $SPECTRUMKV_CODEC_LIB, else build/lib/libspectrumkv_codec.so of this
repository. ctypes releases the GIL during foreign calls, so round trips on different arrays can
run in parallel threads (the codec is thread-safe for disjoint outputs).
"""

import ctypes
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

SKV_CAPI_VERSION = 1
TIER_NAMES = ("fp16", "int8", "int4", "drop")
TIER_DROP = 3


class _Options(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("policy", ctypes.c_char_p),
        ("budget", ctypes.c_double),
        ("budget_kind", ctypes.c_char_p),
        ("on_unreachable", ctypes.c_char_p),
        ("sinks", ctypes.c_uint32),
        ("first_ratio", ctypes.c_double),
        ("seed", ctypes.c_uint64),
        ("per_layer", ctypes.c_int32),
        ("layer_slope", ctypes.c_double),
        ("quantizer", ctypes.c_char_p),
        ("scoring", ctypes.c_char_p),
        ("window_queries", ctypes.POINTER(ctypes.c_float)),
        ("window", ctypes.c_uint32),
        ("num_q_heads", ctypes.c_uint32),
        ("pool_kernel", ctypes.c_uint32),
        ("recency_decay", ctypes.c_double),
        ("external_scores", ctypes.POINTER(ctypes.c_float)),
        ("precomputed_scores", ctypes.POINTER(ctypes.c_float)),
    ]


class _DenseKv(ctypes.Structure):
    _fields_ = [
        ("num_layers", ctypes.c_uint32),
        ("num_kv_heads", ctypes.c_uint32),
        ("head_dim", ctypes.c_uint32),
        ("num_tokens", ctypes.c_uint32),
        ("dtype", ctypes.c_char_p),
        ("memory_kind", ctypes.c_int),
        ("src", ctypes.c_void_p),
        ("dst", ctypes.c_void_p),
    ]


class _Outputs(ctypes.Structure):
    _fields_ = [
        ("tiers", ctypes.POINTER(ctypes.c_uint8)),
        ("scores", ctypes.POINTER(ctypes.c_float)),
        ("dropped", ctypes.POINTER(ctypes.c_uint32)),
        ("payload", ctypes.POINTER(ctypes.c_uint8)),
        ("payload_capacity", ctypes.c_uint64),
        ("num_maps", ctypes.c_uint32),
        ("counts", ctypes.c_uint32 * 4),
        ("num_dropped", ctypes.c_uint64),
        ("element_budget", ctypes.c_double),
        ("wire_budget", ctypes.c_double),
        ("payload_bytes", ctypes.c_uint64),
        ("fp16_bytes", ctypes.c_uint64),
        ("score_s", ctypes.c_double),
        ("plan_s", ctypes.c_double),
        ("pack_s", ctypes.c_double),
        ("unpack_s", ctypes.c_double),
    ]


class CodecError(RuntimeError):
    """A non-OK status from the C API; `code` is the canonical status code."""

    def __init__(self, code: int, message: str):
        super().__init__(f"spectrumkv codec error {code}: {message}")
        self.code = code


@dataclass
class RoundTrip:
    """What one round trip produced."""

    kv: np.ndarray  # reconstructed KV (dropped tokens as they were in the destination)
    tiers: np.ndarray  # uint8 [maps, tokens]: 0 FP16, 1 INT8, 2 INT4, 3 DROP
    dropped: np.ndarray  # uint32 positions to mask out (map 0 first)
    counts: dict = field(default_factory=dict)  # tokens per tier name
    element_budget: float = 0.0
    wire_budget: float = 0.0
    payload_bytes: int = 0
    fp16_bytes: int = 0
    timings_s: dict = field(default_factory=dict)


def default_library_path() -> str:
    env = os.environ.get("SPECTRUMKV_CODEC_LIB")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, "..", "..", "build", "lib", "libspectrumkv_codec.so")


def _f32_ptr(array: Optional[np.ndarray]):
    if array is None:
        return None
    return array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


class Codec:
    """One codec backend, loaded from the shared library."""

    def __init__(self, library: Optional[str] = None, backend: str = "cpu"):
        path = library or default_library_path()
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path}: libspectrumkv_codec.so not found; build the repository (scripts/build.sh) "
                "or set SPECTRUMKV_CODEC_LIB")
        self._lib = ctypes.CDLL(path)
        lib = self._lib
        lib.skv_capi_version.restype = ctypes.c_int
        lib.skv_options_init.argtypes = [ctypes.POINTER(_Options)]
        lib.skv_codec_create.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p),
                                         ctypes.c_char_p, ctypes.c_size_t]
        lib.skv_codec_create.restype = ctypes.c_int
        lib.skv_codec_destroy.argtypes = [ctypes.c_void_p]
        lib.skv_codec_name.argtypes = [ctypes.c_void_p]
        lib.skv_codec_name.restype = ctypes.c_char_p
        lib.skv_codec_reason.argtypes = [ctypes.c_void_p]
        lib.skv_codec_reason.restype = ctypes.c_char_p
        lib.skv_score.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DenseKv),
                                  ctypes.POINTER(_Options), ctypes.POINTER(ctypes.c_float),
                                  ctypes.c_char_p, ctypes.c_size_t]
        lib.skv_score.restype = ctypes.c_int
        lib.skv_round_trip.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DenseKv),
                                       ctypes.POINTER(_Options), ctypes.POINTER(_Outputs),
                                       ctypes.c_char_p, ctypes.c_size_t]
        lib.skv_round_trip.restype = ctypes.c_int
        if lib.skv_capi_version() != SKV_CAPI_VERSION:
            raise RuntimeError(f"{path}: C API version {lib.skv_capi_version()}, "
                               f"this binding speaks {SKV_CAPI_VERSION}")
        handle = ctypes.c_void_p()
        err = ctypes.create_string_buffer(512)
        code = lib.skv_codec_create(backend.encode(), ctypes.byref(handle), err, len(err))
        if code != 0:
            raise CodecError(code, err.value.decode())
        self._handle = handle
        self.name = lib.skv_codec_name(handle).decode()
        self.reason = lib.skv_codec_reason(handle).decode()
        self.library = os.path.abspath(path)

    def close(self):
        if getattr(self, "_handle", None):
            self._lib.skv_codec_destroy(self._handle)
            self._handle = None

    def __del__(self):
        self.close()

    # -- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _check_kv(kv: np.ndarray):
        if kv.dtype != np.uint16 or kv.ndim != 5 or kv.shape[1] != 2:
            raise ValueError("kv must be uint16 [layers, 2, tokens, kv_heads, head_dim], got "
                             f"{kv.dtype} {kv.shape}")
        if not kv.flags["C_CONTIGUOUS"]:
            raise ValueError("kv must be C-contiguous")

    @staticmethod
    def _dense(kv: np.ndarray, dtype: str, dst: Optional[np.ndarray]) -> _DenseKv:
        layers, _, tokens, heads, dim = kv.shape
        d = _DenseKv()
        d.num_layers, d.num_kv_heads, d.head_dim, d.num_tokens = layers, heads, dim, tokens
        d.dtype = dtype.encode()
        d.memory_kind = 0
        d.src = kv.ctypes.data
        d.dst = dst.ctypes.data if dst is not None else None
        return d

    def _options(self, kv, *, policy="3tier", budget=0.5, budget_kind="element",
                 on_unreachable="drop", sinks=4, first_ratio=0.0, seed=0, quantizer="absmax",
                 scoring="key_norm", window_queries=None, pool_kernel=5, recency_decay=0.0,
                 external_scores=None, precomputed_scores=None, keep=None):
        o = _Options()
        self._lib.skv_options_init(ctypes.byref(o))
        o.policy = policy.encode()
        o.budget = float(budget)
        o.budget_kind = budget_kind.encode()
        o.on_unreachable = on_unreachable.encode()
        o.sinks = int(sinks)
        o.first_ratio = float(first_ratio)
        o.seed = int(seed)
        o.quantizer = quantizer.encode()
        o.scoring = scoring.encode()
        o.pool_kernel = int(pool_kernel)
        o.recency_decay = float(recency_decay)
        if window_queries is not None:
            # [layers, window, q_heads, head_dim] float32, post-RoPE.
            q = np.ascontiguousarray(window_queries, dtype=np.float32)
            if q.ndim != 4 or q.shape[0] != kv.shape[0] or q.shape[3] != kv.shape[4]:
                raise ValueError(f"window_queries shape {q.shape} does not fit kv {kv.shape}")
            keep.append(q)
            o.window_queries = _f32_ptr(q)
            o.window = q.shape[1]
            o.num_q_heads = q.shape[2]
        for name, value in (("external_scores", external_scores),
                            ("precomputed_scores", precomputed_scores)):
            if value is not None:
                s = np.ascontiguousarray(value, dtype=np.float32)
                if s.shape != (kv.shape[2],):
                    raise ValueError(f"{name} must hold one score per token")
                keep.append(s)
                setattr(o, name, _f32_ptr(s))
        return o

    # -- API -------------------------------------------------------------------------------------

    def score(self, kv: np.ndarray, dtype: str, **options) -> np.ndarray:
        """Importance scores (float32, one per token) under the scoring options."""
        self._check_kv(kv)
        keep = []
        o = self._options(kv, keep=keep, **options)
        d = self._dense(kv, dtype, None)
        scores = np.empty(kv.shape[2], dtype=np.float32)
        err = ctypes.create_string_buffer(512)
        code = self._lib.skv_score(self._handle, ctypes.byref(d), ctypes.byref(o),
                                   _f32_ptr(scores), err, len(err))
        if code != 0:
            raise CodecError(code, err.value.decode())
        return scores

    def round_trip(self, kv: np.ndarray, dtype: str, dst: Optional[np.ndarray] = None,
                   **options) -> RoundTrip:
        """Scores (or uses precomputed_scores), plans, packs and unpacks `kv`.

        `dst` receives the reconstruction; by default a copy of `kv`, so dropped tokens keep
        their original values (they must be masked out of attention by the caller).
        """
        self._check_kv(kv)
        if dst is None:
            dst = kv.copy()
        elif dst.shape != kv.shape or dst.dtype != np.uint16 or not dst.flags["C_CONTIGUOUS"]:
            raise ValueError("dst must be a C-contiguous uint16 array shaped like kv")
        keep = []
        o = self._options(kv, keep=keep, **options)
        d = self._dense(kv, dtype, dst)
        layers, tokens = kv.shape[0], kv.shape[2]
        maps = layers if options.get("per_layer") else 1
        tiers = np.empty((maps, tokens), dtype=np.uint8)
        dropped = np.empty(maps * tokens, dtype=np.uint32)
        out = _Outputs()
        out.tiers = tiers.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        out.dropped = dropped.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32))
        err = ctypes.create_string_buffer(512)
        code = self._lib.skv_round_trip(self._handle, ctypes.byref(d), ctypes.byref(o),
                                        ctypes.byref(out), err, len(err))
        if code != 0:
            raise CodecError(code, err.value.decode())
        return RoundTrip(
            kv=dst,
            tiers=tiers,
            dropped=dropped[:out.num_dropped].copy(),
            counts={name: int(out.counts[i]) for i, name in enumerate(TIER_NAMES)},
            element_budget=out.element_budget,
            wire_budget=out.wire_budget,
            payload_bytes=int(out.payload_bytes),
            fp16_bytes=int(out.fp16_bytes),
            timings_s={"score": out.score_s, "plan": out.plan_s, "pack": out.pack_s,
                       "unpack": out.unpack_s},
        )
