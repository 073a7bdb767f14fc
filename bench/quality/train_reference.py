#!/usr/bin/env python3
"""Trains the quality harness's reference model from scratch: a small Llama-architecture causal
LM (GQA, RoPE) on WikiText-2 valid.txt plus synthetic needle-retrieval sequences, with a fixed
seed, and saves a Hugging Face checkpoint directory (config.json, safetensors weights, a
word-level tokenizer.json, niah_pool.json with the needle answer words, train_log.json).

No pretrained weights can be downloaded where this project runs, so the harness is exercised on
this model. It is trained on valid.txt and evaluated on test.txt (the tokenized WikiText-2 with
<unk>; words of test.txt missing from valid.txt's vocabulary become <unk>), so its perplexity is
not comparable to published WikiText-2 numbers; what matters is the change under the codec.

Training rows are --seq-len tokens of valid.txt (its first 95%; the last 5% is held out for
monitoring). A fraction --needle-frac of rows also hold a needle "<key> a b c d ." at a random
place and, later, the question "<eos> what is the <subject> ? <key>" followed by the answer,
so the model learns to retrieve from anywhere in its context (the NIAH protocol's skill). The
checkpoint kept is the one with the lowest held-out loss among evaluations whose held-out
needle accuracy is at least 0.95 (the last evaluation if none reaches it).

Example (about 4 minutes on one H100):
  python3 bench/quality/train_reference.py --out bench/quality/checkpoints/reference
"""

import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data  # noqa: E402
import tiny_llama  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


class NeedleRows:
    """Builds training and held-out rows (token ids) with and without needles."""

    def __init__(self, tok: data.WordTokenizer, stream, pool, seq_len: int, seed: int):
        self.tok, self.stream, self.pool, self.seq_len = tok, stream, pool, seq_len
        self.rng = random.Random(seed)

    def plain(self):
        off = self.rng.randrange(0, len(self.stream) - self.seq_len)
        return self.stream[off:off + self.seq_len], None

    def needle(self):
        """A row with one needle and its question; returns (ids, answer positions)."""
        rng, tok = self.rng, self.tok
        key, kind = rng.choice(data.NEEDLE_KEYS)
        answer = data.random_answer(rng, kind, self.pool)
        needle = tok.encode(data.needle_text(key, answer))
        question = tok.encode(data.question_text(key))
        answer_ids = tok.encode(" ".join(answer))
        tail = len(question) + len(answer_ids)
        # The answer ends at `end`; the needle starts anywhere before the question.
        end = rng.randint(len(needle) + tail + 32, self.seq_len)
        q_start = end - tail
        n_pos = rng.randint(0, q_start - len(needle))
        hay_len = self.seq_len - len(needle) - tail
        off = rng.randrange(0, len(self.stream) - hay_len)
        hay = self.stream[off:off + hay_len]
        row = (hay[:n_pos] + needle + hay[n_pos:q_start - len(needle)] + question + answer_ids +
               hay[q_start - len(needle):])
        assert len(row) == self.seq_len
        answer_pos = list(range(q_start + len(question), end))
        return row, answer_pos

    def batch(self, size: int, needle_frac: float, device):
        rows, mask = [], torch.zeros(size, self.seq_len, dtype=torch.bool)
        for i in range(size):
            if self.rng.random() < needle_frac:
                row, pos = self.needle()
                mask[i, pos] = True
            else:
                row, _ = self.plain()
            rows.append(row)
        return torch.tensor(rows, device=device), mask.to(device)


def losses(model, ids, answer_mask):
    """(LM loss over all next-token predictions, answer-token loss, answer-token accuracy)."""
    logits, _, _ = model(ids[:, :-1])
    targets = ids[:, 1:]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         reduction="none").view_as(targets)
    amask = answer_mask[:, 1:]
    lm = ce.mean()
    if amask.any():
        ans = ce[amask].mean()
        acc = (logits.argmax(-1) == targets)[amask].float()
    else:
        ans, acc = torch.zeros((), device=ids.device), torch.ones(1, device=ids.device)
    return lm, ans, acc


@torch.no_grad()
def evaluate(model, held_rows, held_needles, batch: int):
    """Held-out LM loss on plain rows, and the fraction of needle rows whose every answer token
    is predicted (teacher-forced argmax)."""
    model.eval()
    lm_sum, count = 0.0, 0
    for i in range(0, len(held_rows), batch):
        ids = held_rows[i:i + batch]
        lm, _, _ = losses(model, ids, torch.zeros_like(ids, dtype=torch.bool))
        lm_sum += lm.item() * len(ids)
        count += len(ids)
    ok = 0
    for i in range(0, len(held_needles[0]), batch):
        ids, mask = held_needles[0][i:i + batch], held_needles[1][i:i + batch]
        logits, _, _ = model(ids[:, :-1])
        right = (logits.argmax(-1) == ids[:, 1:]) | ~mask[:, 1:]
        ok += right.all(dim=1).sum().item()
    model.train()
    return lm_sum / count, ok / len(held_needles[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get(
        "SPECTRUMKV_DATA", os.path.join(REPO, "..", "shared", "data", "wikitext-2")))
    p.add_argument("--out", default=os.path.join(REPO, "bench", "quality", "checkpoints",
                                                 "reference"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--needle-frac", type=float, default=0.5)
    p.add_argument("--answer-weight", type=float, default=1.0,
                   help="weight of the answer-token loss added to the LM loss")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--rope-theta", type=float, default=1e6,
                   help="Qwen2.5's; makes the lowest-frequency RoPE pairs nearly constant, which "
                        "make_outlier_model.py relies on")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--held-rows", type=int, default=32)
    p.add_argument("--held-needles", type=int, default=128)
    p.add_argument("--max-minutes", type=float, default=9.0,
                   help="safety stop (the step count is the plan; this only guards the limit)")
    args = p.parse_args(argv)

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    started = time.time()
    device = torch.device(args.device)

    words = data.wikitext_words(os.path.join(args.data_dir, "valid.txt"))
    key_words = " ".join(k for k, _ in data.NEEDLE_KEYS).split() + ["what", "?", "."]
    tok = data.WordTokenizer.build(words, extra=key_words + data.DIGITS)
    pool = data.word_pool(words)
    ids = tok.encode_words(words)
    split = int(len(ids) * 0.95)
    train_stream, held_stream = ids[:split], ids[split:]
    print(f"vocab {len(tok)}, {len(ids)} tokens ({split} train, {len(held_stream)} held out), "
          f"answer pool {len(pool)} words", flush=True)

    config = tiny_llama.Config(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim, rope_theta=args.rope_theta,
        max_position_embeddings=args.seq_len, tie_word_embeddings=True,
        bos_token_id=tok.eos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = tiny_llama.TinyLlama(config, dropout=args.dropout)
    model.init_weights()
    model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f} M parameters, {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads} heads / {args.kv_heads} KV heads of {args.head_dim}", flush=True)

    train = NeedleRows(tok, train_stream, pool, args.seq_len, args.seed + 1)
    held = NeedleRows(tok, held_stream, pool, args.seq_len, args.seed + 2)
    held_rows = torch.stack([torch.tensor(held.plain()[0]) for _ in range(args.held_rows)])
    held_needles = held.batch(args.held_needles, 1.0, "cpu")
    held_rows = held_rows.to(device)
    held_needles = (held_needles[0].to(device), held_needles[1].to(device))

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 *
                          (1 + math.cos(math.pi * t)))

    use_amp = device.type == "cuda"
    log, best, best_state = [], None, None
    step = 0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        batch, amask = train.batch(args.batch, args.needle_frac, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            lm, ans, _ = losses(model, batch, amask)
            loss = lm + args.answer_weight * ans
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = step + 1 == args.steps or (time.time() - started) / 60 > args.max_minutes
        if (step + 1) % args.eval_every == 0 or last:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                held_lm, needle_acc = evaluate(model, held_rows, held_needles, 16)
            entry = {"step": step + 1, "train_lm": lm.item(), "train_answer": ans.item(),
                     "held_lm": held_lm, "held_ppl": math.exp(held_lm),
                     "held_needle_acc": needle_acc, "elapsed_s": time.time() - started}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            qualifies = needle_acc >= 0.95
            better = best is None or (qualifies, -held_lm) > (best["held_needle_acc"] >= 0.95,
                                                              -best["held_lm"])
            if better:
                best = entry
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if last:
            break

    model.load_state_dict(best_state)
    model.eval()
    tiny_llama.save_checkpoint(model, args.out, dtype=torch.float16)
    tok.save(args.out)
    with open(os.path.join(args.out, "niah_pool.json"), "w") as f:
        json.dump(pool, f)
    summary = {"args": vars(args), "parameters": params, "vocab": len(tok),
               "steps_run": step + 1, "selected": best, "log": log,
               "train_seconds": time.time() - started,
               "device": torch.cuda.get_device_name(device) if use_amp else "cpu",
               "torch": torch.__version__}
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"saved {args.out}: step {best['step']}, held-out ppl {best['held_ppl']:.2f}, "
          f"needle acc {best['held_needle_acc']:.3f}, {summary['train_seconds']:.0f} s",
          flush=True)


if __name__ == "__main__":
    main()
