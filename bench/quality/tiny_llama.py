"""A minimal Llama-architecture causal LM in plain PyTorch, weight-compatible with Hugging Face's
LlamaForCausalLM (same parameter names, same arithmetic), plus a reader/writer for checkpoint
directories (config.json + safetensors, sharded or not, or pytorch_model.bin).

It serves three purposes:
  * train_reference.py trains the reference model with it (adding dropout, which HF lacks);
  * the quality harness uses it when `transformers` is not installed (Debian's python3-torch,
    the CI smoke test), so the harness runs anywhere PyTorch does;
  * it exposes post-RoPE window queries and a cache with masked (dropped) positions directly.

Supported: RMSNorm, rotate-half RoPE with the default (unscaled) frequencies, GQA, SwiGLU MLP,
optional q/k/v/o biases (`attention_bias`), tied or untied embeddings. Works with PyTorch 1.13
(manual attention) and 2.x (scaled_dot_product_attention).
"""

import json
import math
import os
import struct
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# Config keys this implementation reads, with Llama defaults.
CONFIG_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": None,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}


class Config:
    """The subset of a Hugging Face LlamaConfig this model uses."""

    def __init__(self, **kwargs):
        for key, default in CONFIG_DEFAULTS.items():
            setattr(self, key, kwargs.get(key, default))
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        rope = kwargs.get("rope_scaling") or kwargs.get("rope_parameters")
        if isinstance(rope, dict):
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind not in (None, "default"):
                raise ValueError(f"rope scaling '{kind}' is not supported by tiny_llama")
            self.rope_theta = float(rope.get("rope_theta", self.rope_theta))
        self.extra = {k: v for k, v in kwargs.items() if k not in CONFIG_DEFAULTS}

    def to_hf_dict(self, torch_dtype: str = "float16") -> dict:
        """config.json contents that transformers loads as a LlamaConfig."""
        d = {k: getattr(self, k) for k in CONFIG_DEFAULTS}
        d.update({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "pretraining_tp": 1,
            "rope_scaling": None,
            "use_cache": True,
            "torch_dtype": torch_dtype,
        })
        return d


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(config: Config, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape [B, n, head_dim] as HF's LlamaRotaryEmbedding computes them (fp32,
    then cast)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (
        torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim))
    freqs = positions.float()[:, :, None] * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def attend(q, k, v, mask: Optional[torch.Tensor], causal: bool, dropout_p: float = 0.0):
    """softmax(q k^T / sqrt(d)) v with GQA. q [B,Hq,m,D], k/v [B,Hkv,n,D]; mask: bool
    [B,1,m,n] (True = attend) or None with `causal` for plain causal self-attention."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=causal and mask is None)
    # PyTorch 1.x: explicit softmax in fp32.
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is None and causal:
        m, n = q.shape[2], k.shape[2]
        mask = torch.ones(m, n, dtype=torch.bool, device=q.device).tril(n - m)[None, None]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v.float()).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, hq * d, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, hkv * d, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, hkv * d, bias=c.attention_bias)
        self.o_proj = nn.Linear(hq * d, c.hidden_size, bias=c.attention_bias)

    def forward(self, x, cos, sin, past, mask, causal, capture: int, dropout_p: float):
        b, m, _ = x.shape
        d = self.c.head_dim
        q = self.q_proj(x).view(b, m, -1, d).transpose(1, 2)
        k = self.k_proj(x).view(b, m, -1, d).transpose(1, 2)
        v = self.v_proj(x).view(b, m, -1, d).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        captured = q[:, :, m - capture:].transpose(1, 2) if capture else None  # [B,w,Hq,D]
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        out = attend(q, k, v, mask, causal, dropout_p)
        out = self.o_proj(out.transpose(1, 2).reshape(b, m, -1))
        return out, (k, v), captured


class Mlp(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = Mlp(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Body(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class TinyLlama(nn.Module):
    """LlamaForCausalLM-compatible model. `dropout` applies to embeddings and residual branches,
    `attn_dropout` to attention probabilities, in training mode only."""

    def __init__(self, config: Config, dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        self.config = config
        self.dropout = dropout
        self.attn_dropout = attn_dropout
        self.model = Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, std: float = 0.02):
        """GPT-2-style init: N(0, std), residual output projections scaled by 1/sqrt(2L)."""
        scaled = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if "norm" in name else nn.init.zeros_(p)
            elif name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                nn.init.normal_(p, std=scaled)
            else:
                nn.init.normal_(p, std=std)

    def forward(self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None,
                past: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None,
                past_keep: Optional[torch.Tensor] = None, capture_queries: int = 0,
                return_hidden: bool = False):
        """Runs the model over `input_ids` [B, m].

        positions: [B, m] RoPE positions (default: past length + arange(m)).
        past: per layer (K, V), each [B, Hkv, n, D], K post-RoPE (the prompt's cache).
        past_keep: bool [B, n]; False masks that cached position out of attention (a dropped
            token); kept tokens keep their positions.
        capture_queries: also return the post-RoPE queries of the last w positions,
            [layers, B, w, Hq, D] float32.
        Returns (logits [B, m, V] or hidden states, new cache per layer (past + new),
            captured queries or None).
        """
        b, m = input_ids.shape
        n_past = past[0][0].shape[2] if past is not None else 0
        device = input_ids.device
        if positions is None:
            positions = torch.arange(n_past, n_past + m, device=device)[None].expand(b, m)
        x = self.model.embed_tokens(input_ids)
        drop = self.dropout if self.training else 0.0
        if drop:
            x = F.dropout(x, drop)
        cos, sin = rope_cos_sin(self.config, positions, x.dtype)
        mask, causal = None, True
        if past is not None or past_keep is not None:
            causal_new = torch.ones(m, m, dtype=torch.bool, device=device).tril()
            keep = past_keep if past_keep is not None else torch.ones(
                b, n_past, dtype=torch.bool, device=device)
            mask = torch.cat((keep[:, None, :].expand(b, m, n_past),
                              causal_new[None].expand(b, m, m)), dim=2)[:, None]
        cache, captured = [], []
        for i, layer in enumerate(self.model.layers):
            h, kv, q = layer.self_attn(layer.input_layernorm(x), cos, sin,
                                       past[i] if past is not None else None, mask, causal,
                                       capture_queries,
                                       self.attn_dropout if self.training else 0.0)
            if drop:
                h = F.dropout(h, drop)
            x = x + h
            h = layer.mlp(layer.post_attention_layernorm(x))
            if drop:
                h = F.dropout(h, drop)
            x = x + h
            cache.append(kv)
            if capture_queries:
                captured.append(q.float())
        x = self.model.norm(x)
        out = x if return_hidden else self.lm_head(x)
        return out, cache, (torch.stack(captured) if capture_queries else None)


# -- checkpoint I/O -------------------------------------------------------------------------------

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: str) -> dict:
    """Tensors of a .safetensors file (F32/F16/BF16), without the safetensors package."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        data = bytearray(f.read())
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        t = torch.frombuffer(data, dtype=dtype, count=(end - start) // torch.tensor(
            [], dtype=dtype).element_size(), offset=start) if end > start else torch.empty(
                0, dtype=dtype)
        out[name] = t.reshape(info["shape"]).clone()
    return out


def write_safetensors(path: str, tensors: dict):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)


def save_checkpoint(model: TinyLlama, directory: str, dtype=torch.float16,
                    max_shard_bytes: int = 12 * 1024 * 1024, extra_config: Optional[dict] = None):
    """Writes config.json and safetensors weights (sharded above max_shard_bytes, with the HF
    index file) that transformers' AutoModelForCausalLM loads."""
    os.makedirs(directory, exist_ok=True)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = model.config.to_hf_dict(str(dtype).replace("torch.", ""))
    config.update(extra_config or {})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    for stale in os.listdir(directory):
        if stale.endswith(".safetensors") or stale == "model.safetensors.index.json":
            os.remove(os.path.join(directory, stale))
    if len(shards) == 1:
        write_safetensors(os.path.join(directory, "model.safetensors"), shards[0])
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(directory, fname), shard)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def load_state(directory: str) -> dict:
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for fname in files:
            state.update(read_safetensors(os.path.join(directory, fname)))
        return state
    if os.path.exists(single):
        return read_safetensors(single)
    return torch.load(os.path.join(directory, "pytorch_model.bin"), map_location="cpu")


def load_checkpoint(directory: str, dtype=torch.float16, device="cpu") -> TinyLlama:
    """Loads a Llama-architecture checkpoint directory into TinyLlama."""
    with open(os.path.join(directory, "config.json")) as f:
        raw = json.load(f)
    if raw.get("model_type") not in ("llama", "mistral", "qwen2", None):
        raise ValueError(f"{directory}: model_type {raw.get('model_type')} needs transformers")
    if raw.get("model_type") == "qwen2":
        raw.setdefault("attention_bias", True)  # Qwen2: q/k/v biases, no o bias
    config = Config(**raw)
    model = TinyLlama(config)
    state = load_state(directory)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Qwen2 has no o_proj bias: leave it at zero.
    missing = [k for k in missing if not (k.endswith("o_proj.bias") or k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{directory}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, p in model.named_parameters():
        if name.endswith("o_proj.bias") and name not in state:
            nn.init.zeros_(p)
    return model.to(device=device, dtype=dtype).eval()
