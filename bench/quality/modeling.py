"""Model access for the quality harness: one interface over Hugging Face transformers models and
the built-in TinyLlama (used where transformers is not installed).

What the harness needs from a model, and what this module provides:
  * prefill(ids, window): a full-precision forward pass over the prompt, returning the last
    position's logits, the prompt's KV cache as one tensor [layers, 2, tokens, kv_heads, head_dim]
    (K post-RoPE, exactly what a serving engine caches and a PD system transfers) and the last
    `window` queries of every layer, post-RoPE, float32 [layers, window, q_heads, head_dim];
  * forward_with_cache(kv, keep, ids, start): teacher-forced or decode steps over a batch of
    (reconstructed) caches, with dropped positions masked out of attention and every token keeping
    its original RoPE position.

For transformers models the window queries are captured with a forward hook on each attention
layer's q_proj (or q_norm where the model has one) and rotated with the model's own rotary
embedding, which assumes the rotate-half RoPE of the Llama family (Llama, Mistral, Qwen2/2.5/3,
Gemma); models with another RoPE should use key_norm scoring.
"""

import os
from typing import List, Optional, Tuple

import numpy as np
import torch

import tiny_llama
from data import load_tokenizer, tokenizer_kind

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
        return True
    except Exception:  # ImportError, or a broken install
        return False


def kv_to_numpy(kv: torch.Tensor) -> np.ndarray:
    """A 16-bit tensor as a C-contiguous numpy uint16 array of its bit patterns (host)."""
    return kv.contiguous().view(torch.int16).cpu().numpy().view(np.uint16)


def numpy_to_kv(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(dtype)


class Prefill:
    def __init__(self, last_logits, kv, queries):
        self.last_logits = last_logits  # float32 [vocab]
        self.kv = kv  # [L, 2, n, H, D] model dtype, on the model's device
        self.queries = queries  # float32 [L, w, Hq, D] or None


class LanguageModel:
    """A causal LM loaded from a checkpoint directory."""

    def __init__(self, path: str, device: str = "cpu", dtype: str = "fp16",
                 backend: str = "auto"):
        self.path = path
        self.device = torch.device(device)
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        if backend == "auto":
            backend = "transformers" if have_transformers() else "builtin"
        self.backend = backend
        if backend == "transformers":
            self._load_transformers()
        elif backend == "builtin":
            self.model = tiny_llama.load_checkpoint(path, self.dtype, self.device)
            c = self.model.config
            self.num_layers, self.num_kv_heads = c.num_hidden_layers, c.num_key_value_heads
            self.num_q_heads, self.head_dim = c.num_attention_heads, c.head_dim
            self.vocab_size = c.vocab_size
        else:
            raise ValueError(f"unknown backend {backend}")
        self._load_tokenizer()

    # -- loading ---------------------------------------------------------------------------------

    def _load_transformers(self):
        from transformers import AutoModelForCausalLM
        try:
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=self.dtype,
                                                         attn_implementation="sdpa")
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = AutoModelForCausalLM.from_pretrained(self.path, torch_dtype=self.dtype,
                                                         attn_implementation="sdpa")
        self.model = model.to(self.device).eval()
        c = self.model.config
        self.num_layers = c.num_hidden_layers
        self.num_q_heads = c.num_attention_heads
        self.num_kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.vocab_size = c.vocab_size
        self._attn = [layer.self_attn for layer in self._decoder_layers()]

    def _decoder_layers(self):
        inner = getattr(self.model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None:
            raise ValueError(f"{self.path}: cannot find the decoder layers (model.model.layers)")
        return layers

    def _load_tokenizer(self):
        tok_json = os.path.join(self.path, "tokenizer.json")
        self.token_level = "word"
        if tokenizer_kind(tok_json) is not None:
            # The reference models' tokenizers (char or word level); read directly so results do
            # not depend on the tokenizers package (check_transformers.py compares them with
            # PreTrainedTokenizerFast).
            self.tokenizer = load_tokenizer(tok_json)
            self.token_level = self.tokenizer.level
            self.encode = self.tokenizer.encode
            self.decode = self.tokenizer.decode
            return
        if self.backend != "transformers":
            raise ValueError(f"{self.path}: only the reference models' WordLevel tokenizers "
                             "work without transformers")
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(self.path)
        self.encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]
        self.decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
        self.bos_id = tok.bos_token_id

    # -- the two operations the harness needs ----------------------------------------------------

    @torch.no_grad()
    def prefill(self, ids: List[int], window: int = 0) -> Prefill:
        x = torch.tensor([ids], device=self.device)
        if self.backend == "builtin":
            logits, cache, queries = self.model(x, capture_queries=window)
            kv = torch.stack([torch.stack((k[0], v[0])) for k, v in cache])  # [L,2,H,n,D]
            kv = kv.permute(0, 1, 3, 2, 4).contiguous()
            q = queries[:, 0] if window else None
            return Prefill(logits[0, -1].float(), kv, q)
        captured, hooks = [], []
        if window:
            for attn in self._attn:
                src = getattr(attn, "q_norm", None)
                src = attn.q_proj if src is None else src
                hooks.append(src.register_forward_hook(
                    lambda _m, _i, out: captured.append(out[:, -window:].detach())))
        try:
            out = self.model(input_ids=x, use_cache=True)
        finally:
            for h in hooks:
                h.remove()
        layers = _cache_layers(out.past_key_values)
        kv = torch.stack([torch.stack((k[0], v[0])) for k, v in layers])
        kv = kv.permute(0, 1, 3, 2, 4).contiguous()
        queries = self._rotate_queries(captured, len(ids), window) if window else None
        return Prefill(out.logits[0, -1].float(), kv, queries)

    def _rotate_queries(self, captured, n, window):
        """Post-RoPE queries from the hooked pre-RoPE ones, via the model's rotary embedding."""
        pos = torch.arange(n - window, n, device=self.device)[None]
        rotary = getattr(self.model.model, "rotary_emb", None)
        probe = captured[0]
        if rotary is None:
            raise ValueError("model has no model.rotary_emb; use key_norm scoring")
        cos, sin = rotary(probe.float(), pos)  # [1, w, D]
        cos, sin = cos.float()[0][:, None], sin.float()[0][:, None]  # [w, 1, D]
        out = []
        for q in captured:
            q = q[0].float().reshape(window, self.num_q_heads, self.head_dim)
            out.append(q * cos + tiny_llama.rotate_half(q) * sin)
        return torch.stack(out)  # [L, w, Hq, D]

    @torch.no_grad()
    def forward_with_cache(self, kv: torch.Tensor, keep: torch.Tensor, ids: torch.Tensor,
                           start: int, state=None):
        """Runs `ids` [B, m] at positions start.. over a batch of caches.

        kv: [B, L, 2, n, H, D] (ignored when `state` continues a previous call); keep: bool
        [B, n] (False = dropped, masked out). Returns (float32 logits [B, m, V], state) where
        `state` continues decoding with the next call.
        """
        b, m = ids.shape
        if state is None:
            past = [(kv[:, l, 0].transpose(1, 2), kv[:, l, 1].transpose(1, 2))
                    for l in range(kv.shape[1])]
            mask = keep
        else:
            past, mask = state
        positions = torch.arange(start, start + m, device=self.device)[None].expand(b, m)
        if self.backend == "builtin":
            logits, cache, _ = self.model(ids, positions=positions, past=past, past_keep=mask)
            new_mask = torch.cat((mask, torch.ones(b, m, dtype=torch.bool, device=self.device)),
                                 dim=1)
            return logits.float(), (cache, new_mask)
        cache = past if state is not None else _make_hf_cache(self.model, past)
        full_mask = torch.cat((mask, torch.ones(b, m, dtype=torch.bool, device=self.device)),
                              dim=1)
        out = self.model(input_ids=ids, past_key_values=cache, attention_mask=full_mask.long(),
                         position_ids=positions, use_cache=True)
        return out.logits.float(), (out.past_key_values, full_mask)


def _cache_layers(cache) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (K, V) [B, H, n, D] of a transformers cache, across its API versions."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]


def _make_hf_cache(model, past):
    from transformers import DynamicCache
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        cache = DynamicCache()
    for layer, (k, v) in enumerate(past):
        cache.update(k.contiguous(), v.contiguous(), layer)
    return cache
