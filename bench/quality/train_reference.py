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
monitoring). A fraction --needle-frac of rows also hold 1-4 needles "<key> a b c d ." with
distinct keys at random places, each followed later by its question "<eos> what is the
<subject> ? <key>" and the answer, so the model learns to retrieve from anywhere in its context
(the NIAH protocol's skill); a fraction --copy-frac repeat a random span (induction). The LM
loss is taken on the plain rows, the answer loss (x --answer-weight) on the answers and second
copies. The first --short-frac of the steps use --short-seq-len rows (same tokens per step): a
length curriculum under which retrieval forms within ~1000 steps (without it, and with the LM
loss on every row, it had not formed after 2400 steps). The checkpoint kept is the one with the
lowest held-out loss among evaluations whose held-out needle accuracy is at least 0.9 (else the
one with the best needle accuracy).

The reported model (docs/QUALITY.md) is, on one H200 in 198 s:
  python3 bench/quality/train_reference.py --steps 2581 --out bench/quality/checkpoints/reference
(run_all.py passes --time-budget-min 3.5 instead, which chose 2581 steps on that card.)
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
    """Builds training and held-out rows (token ids) of three kinds, each with a mask of the
    positions whose prediction needs the context (weighted by --answer-weight):
      plain   --seq-len tokens of the stream;
      needle  1 to 4 needles with distinct keys at random places, each followed later by its
              question and answer, so a question must find its own needle among distractors;
      copy    a random span of 16-64 tokens repeated later verbatim (induction: the second
              copy is predictable only from the first), which makes copying heads form early."""

    def __init__(self, tok: data.WordTokenizer, stream, pool, seq_len: int, seed: int):
        self.tok, self.stream, self.pool, self.seq_len = tok, stream, pool, seq_len
        self.rng = random.Random(seed)
        self.max_needles = 4 if seq_len >= 1024 else 2

    def _hay(self, length):
        off = self.rng.randrange(0, len(self.stream) - length)
        return self.stream[off:off + length]

    def plain(self):
        return self._hay(self.seq_len), []

    def _assemble(self, inserts):
        """Haystack with segments inserted at haystack positions: inserts = [(pos, order, ids,
        scored)] where `scored` marks which ids are answer tokens. Returns (row, positions)."""
        extra = sum(len(ids) for _, _, ids, _ in inserts)
        hay = self._hay(self.seq_len - extra)
        row, scored, last = [], [], 0
        for pos, _, ids, marks in sorted(inserts, key=lambda x: (x[0], x[1])):
            row += hay[last:pos]
            last = pos
            scored += [len(row) + i for i, m in enumerate(marks) if m]
            row += ids
        row += hay[last:]
        assert len(row) == self.seq_len
        return row, scored

    def needle(self, count=None):
        rng, tok = self.rng, self.tok
        count = count or rng.randint(1, 4)
        inserts, extra = [], 0
        keys = rng.sample(range(len(data.NEEDLE_KEYS)), count)
        segments = []
        for k in keys:
            key, kind = data.NEEDLE_KEYS[k]
            answer = data.random_answer(rng, kind, self.pool)
            needle = tok.encode(data.needle_text(key, answer))
            qa = tok.encode(data.question_text(key)) + tok.encode(" ".join(answer))
            segments.append((needle, qa, len(answer)))
            extra += len(needle) + len(qa)
        hay_len = self.seq_len - extra
        for i, (needle, qa, n_answer) in enumerate(segments):
            a, b = sorted(rng.sample(range(hay_len + 1), 2))
            inserts.append((a, 2 * i, needle, [False] * len(needle)))
            inserts.append((b, 2 * i + 1, qa, [False] * (len(qa) - n_answer) + [True] * n_answer))
        return self._assemble(inserts)

    def copy(self):
        rng = self.rng
        span = self._hay(rng.randint(16, min(64, self.seq_len // 4)))
        a, b = sorted(rng.sample(range(self.seq_len - 2 * len(span) + 1), 2))
        return self._assemble([(a, 0, span, [False] * len(span)),
                               (b, 1, span, [False] + [True] * (len(span) - 1))])

    def batch(self, size: int, needle_frac: float, device, copy_frac: float = 0.0):
        """(ids [size, seq_len], answer mask, plain-row flags)."""
        rows, mask = [], torch.zeros(size, self.seq_len, dtype=torch.bool)
        plain = torch.zeros(size, dtype=torch.bool)
        for i in range(size):
            u = self.rng.random()
            if u < needle_frac:
                row, pos = self.needle(count=self.rng.randint(1, self.max_needles))
            elif u < needle_frac + copy_frac:
                row, pos = self.copy()
            else:
                row, pos = self.plain()
                plain[i] = True
            mask[i, pos] = True
            rows.append(row)
        return torch.tensor(rows, device=device), mask.to(device), plain.to(device)


def selection_key(entry):
    """Checkpoint preference: retrieval first (held-out needle accuracy >= 0.9), then the lowest
    held-out loss; below 0.9, the best needle accuracy."""
    if entry["held_needle_acc"] >= 0.9:
        return (1, -entry["held_lm"])
    return (0, entry["held_needle_acc"])


def losses(model, ids, answer_mask, lm_rows=None):
    """(LM loss, answer-token loss, answer-token accuracy). The LM loss is the mean over every
    next-token prediction of the rows in `lm_rows` (all rows if None); the answer loss is the
    mean over the positions in `answer_mask`."""
    logits, _, _ = model(ids[:, :-1])
    targets = ids[:, 1:]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         reduction="none").view_as(targets)
    amask = answer_mask[:, 1:]
    if lm_rows is None:
        lm = ce.mean()
    elif lm_rows.any():
        lm = ce[lm_rows].mean()
    else:
        lm = torch.zeros((), device=ids.device)
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
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--short-seq-len", type=int, default=256,
                   help="curriculum: rows of this length (same tokens per step) first")
    p.add_argument("--short-frac", type=float, default=0.35,
                   help="fraction of the steps trained on short rows")
    p.add_argument("--lm-on-synthetic", action="store_true",
                   help="also train the LM loss on the haystack of needle and copy rows "
                        "(default: LM loss on plain rows only, answers on the others)")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.1,
                   help="embedding and residual dropout (valid.txt is small: it overfits)")
    p.add_argument("--attn-dropout", type=float, default=0.0)
    p.add_argument("--needle-frac", type=float, default=0.5)
    p.add_argument("--copy-frac", type=float, default=0.25)
    p.add_argument("--answer-weight", type=float, default=2.0,
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
    p.add_argument("--time-budget-min", type=float, default=0.0,
                   help="if > 0: after 30 steps, lower --steps to what fits this many minutes "
                        "(train_log.json records the steps run; pass them as --steps to rerun)")
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
    model = tiny_llama.TinyLlama(config, dropout=args.dropout, attn_dropout=args.attn_dropout)
    model.init_weights()
    model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f} M parameters, {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads} heads / {args.kv_heads} KV heads of {args.head_dim}", flush=True)

    train = NeedleRows(tok, train_stream, pool, args.seq_len, args.seed + 1)
    short = NeedleRows(tok, train_stream, pool, args.short_seq_len, args.seed + 3)
    short_batch = args.batch * args.seq_len // args.short_seq_len
    held = NeedleRows(tok, held_stream, pool, args.seq_len, args.seed + 2)
    held_rows = torch.stack([torch.tensor(held.plain()[0]) for _ in range(args.held_rows)])
    held_needles = [held.needle(count=1) for _ in range(args.held_needles)]
    held_mask = torch.zeros(len(held_needles), args.seq_len, dtype=torch.bool)
    for i, (_, pos) in enumerate(held_needles):
        held_mask[i, pos] = True
    held_needles = (torch.tensor([r for r, _ in held_needles]), held_mask)
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
        if step < args.short_frac * args.steps:
            batch, amask, plain = short.batch(short_batch, args.needle_frac, device,
                                              args.copy_frac)
        else:
            batch, amask, plain = train.batch(args.batch, args.needle_frac, device,
                                              args.copy_frac)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            lm, ans, _ = losses(model, batch, amask, None if args.lm_on_synthetic else plain)
            loss = lm + args.answer_weight * ans
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step + 1 == 10:
            t10 = time.time()
        if step + 1 == 40 and args.time_budget_min > 0:
            rate = (time.time() - t10) / 30  # steady state, after start-up and warm-up
            fit = int((args.time_budget_min * 60 - (time.time() - started)) / rate) + 40
            if fit < args.steps:
                print(f"{rate * 1e3:.0f} ms/step: --steps {args.steps} -> {fit} to fit "
                      f"{args.time_budget_min} min", flush=True)
                args.steps = max(fit, args.warmup + 1)
        last = step + 1 == args.steps or (time.time() - started) / 60 > args.max_minutes
        if (step + 1) % args.eval_every == 0 or last:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                held_lm, needle_acc = evaluate(model, held_rows, held_needles, 16)
            entry = {"step": step + 1, "train_lm": lm.item(), "train_answer": ans.item(),
                     "held_lm": held_lm, "held_ppl": math.exp(held_lm),
                     "held_needle_acc": needle_acc, "elapsed_s": time.time() - started}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            better = best is None or selection_key(entry) > selection_key(best)
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
