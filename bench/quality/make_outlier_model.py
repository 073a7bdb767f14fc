#!/usr/bin/env python3
"""Builds an "outlier" variant of a Llama checkpoint whose keys carry large constant channels,
as Qwen2/Qwen2.5's do (a large k_proj bias, anchors-quant.md §3), while computing almost the same
function.

Construction: for every layer and KV head, a bias of +scale x (the layer's mean key row absmax)
is put on the k_proj outputs of the `pairs` lowest-frequency RoPE channel pairs (channels
D/2-1-j and D-1-j). RoPE rotates such a pair by theta_j x position, which with rope_theta = 1e6
and D = 64 is at most ~0.003 rad at position 2048, so post-RoPE the bias is a near-constant
per-channel offset b. A constant offset adds q.b to every logit of a query, which softmax ignores:
the model is nearly unchanged (this script measures how nearly). q/v/o biases are zero.

What it does to the codec: per-(token, head) absmax scales follow the outlier, so INT4's step
(absmax/7) exceeds every ordinary channel and they round to zero, while INT8 (absmax/127) keeps
them; the kcn quantizer subtracts each channel's midpoint over the layer's INT4 tokens first.

Example:
  python3 bench/quality/make_outlier_model.py --src bench/quality/checkpoints/reference \
      --dst bench/quality/checkpoints/outlier
"""

import argparse
import json
import math
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data  # noqa: E402
import tiny_llama  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--scale", type=float, default=12.0,
                   help="outlier value in units of the layer's mean key row absmax")
    p.add_argument("--pairs", type=int, default=1, help="lowest-frequency RoPE pairs per head")
    p.add_argument("--calib-tokens", type=int, default=1024)
    p.add_argument("--data-dir", default=os.environ.get(
        "SPECTRUMKV_DATA", os.path.join(REPO, "..", "shared", "data", "wikitext-2")))
    args = p.parse_args(argv)

    model = tiny_llama.load_checkpoint(args.src, dtype=torch.float32)
    c = model.config
    d = c.head_dim
    tok = data.load_tokenizer(args.src)
    ids = data.encode_file(tok, os.path.join(args.data_dir, "valid.txt"))
    calib = torch.tensor([ids[:args.calib_tokens]])
    logits_ref, cache, _ = model(calib)

    channels = sorted([d // 2 - 1 - j for j in range(args.pairs)] +
                      [d - 1 - j for j in range(args.pairs)])
    c.attention_bias = True
    biased = tiny_llama.TinyLlama(c)
    state = model.state_dict()
    layers = []
    for l, (k, _) in enumerate(cache):
        row_absmax = k.abs().amax(-1).mean().item()  # k: [1, H, n, D], post-RoPE
        value = args.scale * row_absmax
        bias = torch.zeros(c.num_key_value_heads * d)
        for h in range(c.num_key_value_heads):
            bias[h * d + torch.tensor(channels)] = value
        prefix = f"model.layers.{l}.self_attn."
        state[prefix + "k_proj.bias"] = bias
        for proj, width in (("q_proj", c.num_attention_heads * d),
                            ("v_proj", c.num_key_value_heads * d), ("o_proj", c.hidden_size)):
            state[prefix + proj + ".bias"] = torch.zeros(width)
        layers.append({"layer": l, "key_row_absmax_mean": row_absmax, "bias": value})
    biased.load_state_dict(state)
    biased.eval()
    logits_new, cache_new, _ = biased(calib)

    # How constant is the offset post-RoPE, and how much did the function change?
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2).float() / d))
    max_angle = float(inv_freq[d // 2 - args.pairs] * (c.max_position_embeddings - 1))
    lp_ref = torch.log_softmax(logits_ref.float(), -1)
    lp_new = torch.log_softmax(logits_new.float(), -1)
    kl = (lp_ref.exp() * (lp_ref - lp_new)).sum(-1).mean().item()
    ratio = [(kn.abs().amax(-1) / k.abs().amax(-1)).mean().item()
             for (k, _), (kn, _) in zip(cache, cache_new)]
    report = {
        "source": os.path.abspath(args.src), "scale": args.scale, "pairs": args.pairs,
        "channels_per_head": channels, "rope_theta": c.rope_theta,
        "max_rotation_rad_at_max_position": max_angle,
        "max_offset_drift_fraction": 2 * math.sin(max_angle / 2),
        "layers": layers, "key_row_absmax_ratio_after_vs_before": ratio,
        "calibration_tokens": args.calib_tokens,
        "fp32_logit_max_abs_diff": (logits_new - logits_ref).abs().max().item(),
        "fp32_token_kl": kl,
        "fp32_top1_agreement": (lp_ref.argmax(-1) == lp_new.argmax(-1)).float().mean().item(),
    }
    tiny_llama.save_checkpoint(biased, args.dst, dtype=torch.float16)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "niah_pool.json"):
        if os.path.exists(os.path.join(args.src, name)):
            shutil.copy(os.path.join(args.src, name), os.path.join(args.dst, name))
    with open(os.path.join(args.dst, "outlier.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "layers"}, indent=1))


if __name__ == "__main__":
    main()
