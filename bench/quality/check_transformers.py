#!/usr/bin/env python3
"""Checks that the harness's two model paths agree on a checkpoint: transformers'
AutoModelForCausalLM (with the tokenizer through AutoTokenizer) against the built-in TinyLlama.

Compared: tokenization of test.txt, the prefill's last logits, its KV cache, the captured
post-RoPE window queries, and a continuation over a cache with dropped (masked) positions.
Prints and optionally writes a JSON report; exits 1 if they disagree beyond fp16 noise.

Example:
  python3 bench/quality/check_transformers.py --model bench/quality/checkpoints/reference
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data  # noqa: E402
import harness  # noqa: E402
from modeling import LanguageModel  # noqa: E402


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--data-dir", default=harness.DEFAULT_DATA)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import transformers
    from transformers import AutoTokenizer
    report = {"transformers": transformers.__version__, "torch": torch.__version__}
    text = data.wikitext_text(os.path.join(args.data_dir, "test.txt"))[:200000]
    hf_tok = AutoTokenizer.from_pretrained(args.model)
    mine_tok = data.load_tokenizer(args.model)
    hf_ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    ids = mine_tok.encode(text)
    report["tokenizer_level"] = mine_tok.level
    report["tokenizer_equal"] = hf_ids == ids
    report["tokenizer_tokens"] = len(ids)
    report["tokenizer_hf_tokens"] = len(hf_ids)
    sample = ids[:2000]
    report["decode_equal"] = hf_tok.decode(sample, skip_special_tokens=True) == \
        mine_tok.decode(sample)
    if mine_tok.level == "char":
        report["decode_roundtrip"] = mine_tok.decode(ids) == text

    hf = LanguageModel(args.model, args.device, args.dtype, "transformers")
    mine = LanguageModel(args.model, args.device, args.dtype, "builtin")
    prompt = ids[:args.tokens]
    a, b = hf.prefill(prompt, window=16), mine.prefill(prompt, window=16)
    report["prefill_logit_max_diff"] = (a.last_logits - b.last_logits).abs().max().item()
    report["prefill_argmax_equal"] = int(a.last_logits.argmax()) == int(b.last_logits.argmax())
    report["kv_max_diff"] = (a.kv.float() - b.kv.float()).abs().max().item()
    report["kv_max_abs"] = b.kv.float().abs().max().item()
    report["queries_max_diff"] = (a.queries - b.queries).abs().max().item()
    report["queries_max_abs"] = b.queries.abs().max().item()

    n = len(prompt) - 64
    kv = b.kv[:, :, :n]
    keep = torch.ones(2, n, dtype=torch.bool, device=hf.device)
    keep[1, 100:400] = False
    cont = torch.tensor([prompt[n:]] * 2, device=hf.device)
    la, _ = hf.forward_with_cache(torch.stack([kv, kv]), keep, cont, n)
    lb, _ = mine.forward_with_cache(torch.stack([kv, kv]), keep, cont, n)
    report["continuation_logit_max_diff"] = (la - lb).abs().max().item()
    report["continuation_argmax_agreement"] = (la.argmax(-1) == lb.argmax(-1)).float().mean().item()
    report["masking_changes_logits"] = (la[0] - la[1]).abs().max().item()
    # Greedy decoding over the masked cache, both paths.
    same = []
    state_a = state_b = None
    tok_a = tok_b = cont[:, :1]
    for step in range(8):
        oa, state_a = hf.forward_with_cache(torch.stack([kv, kv]), keep, tok_a, n + step, state_a)
        ob, state_b = mine.forward_with_cache(torch.stack([kv, kv]), keep, tok_b, n + step,
                                              state_b)
        tok_a, tok_b = oa[:, -1:].argmax(-1), ob[:, -1:].argmax(-1)
        same.append((tok_a == tok_b).all().item())
    report["greedy_steps_equal"] = all(same)

    # The harness reads its tokenizers itself, so tokenization is reported, not gated.
    ok = (report["kv_max_diff"] <= 1e-2 * max(
        1.0, report["kv_max_abs"]) and report["prefill_logit_max_diff"] < 0.1 and
        report["continuation_logit_max_diff"] < 0.1 and report["queries_max_diff"] < 1e-2 * max(
            1.0, report["queries_max_abs"]))
    report["ok"] = bool(ok)
    print(json.dumps(report, indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
