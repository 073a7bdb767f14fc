#!/usr/bin/env python3
"""SpectrumKV quality harness: runs a causal LM's prompt KV cache through the real codec
(libspectrumkv_codec.so: score -> plan -> pack -> unpack, the bytes the daemon sends) and
measures what the decode side gets out of the reconstruction.

Protocols (SPEC.md, "How quality is judged here"):
  ppl   PD-faithful perplexity. Each window of --seq-len test tokens is split into a prefix and a
        continuation of --cont-len tokens. The prefix is prefilled at full precision; its KV goes
        through the codec; the continuation is teacher-forced over the reconstructed cache with
        dropped positions masked out (kept tokens keep their RoPE positions). Scored: the
        continuation tokens after the first (the first comes from the prefill's logits, the same
        for every method), the same tokens for every method. Reported: PPL, delta vs full
        precision (with a standard error over windows), token KL(p_full || p_method) and top-1
        agreement on the same positions (the KL protocol).
  niah  Needle in a haystack. The prompt (haystack, needle at a depth, question) is prefilled at
        full precision, which yields the first answer token (as in PD serving); the prompt KV goes
        through the codec and the rest of the answer is decoded greedily over the reconstruction.
        Success: the answer appears in the output (case-insensitive).

Every method is planned on the same prompt, with the same precomputed scores per scoring mode
(computed by the codec's own Score on the full-precision KV and the captured window queries).
Budgets are element budgets (the paper's b) or wire budgets (every payload byte counted); both
realized budgets are reported for every method.

Example (reference model on a GPU):
  python3 bench/quality/harness.py --model bench/quality/checkpoints/reference \
      --protocols ppl,niah --device cuda --out results.json
"""

import argparse
import concurrent.futures as futures
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data  # noqa: E402
from modeling import LanguageModel, kv_to_numpy, numpy_to_kv  # noqa: E402
from skv_codec import Codec, RoundTrip  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_DATA = os.environ.get("SPECTRUMKV_DATA",
                              os.path.join(REPO, "..", "shared", "data", "wikitext-2"))

ALL_POLICIES = ("uniform_int8", "uniform_int4", "pdtrim", "random_tier", "3tier", "2tier",
                "sinkprotect")
# Fallback answer words for checkpoints that do not ship niah_pool.json.
FALLBACK_POOL = ("apple river stone cloud garden silver window forest orange bridge candle "
                 "mountain pepper rocket violin marble harbor lantern meadow falcon copper "
                 "island thunder velvet").split()


@dataclass(frozen=True)
class Method:
    """One way of sending the prompt KV. scoring/quantizer are "none" where they do not apply."""

    policy: str
    scoring: str = "none"
    quantizer: str = "none"
    budget: float = 1.0
    budget_kind: str = "element"

    def label(self) -> str:
        if self.policy == "full":
            return "full"
        parts = [self.policy]
        if self.scoring != "none":
            parts.append(self.scoring)
        if self.quantizer != "none":
            parts.append(self.quantizer)
        if not self.policy.startswith("uniform"):
            parts.append(f"{self.budget_kind[0]}{self.budget:.2f}")
        return "/".join(parts)

    def codec_options(self, scores: Dict[str, np.ndarray], seed: int, sinks: int) -> dict:
        scoring = self.scoring if self.scoring != "none" else "positional"
        return dict(policy=self.policy, budget=self.budget, budget_kind=self.budget_kind,
                    quantizer=self.quantizer if self.quantizer != "none" else "absmax",
                    scoring=scoring, precomputed_scores=scores[scoring], seed=seed, sinks=sinks)


def method_grid(policies: Sequence[str], budgets, kinds: Sequence[str],
                scorings: Sequence[str], quantizers: Sequence[str]) -> List[Method]:
    """Every (policy, scoring, quantizer, budget, kind) that means something: pdtrim ignores
    scores and quantizers, random_tier ignores scores, 2tier has no INT4 (so no quantizer choice),
    uniform policies have a fixed cost (planned at element budget 1.0)."""
    out = []
    for p in policies:
        if p == "uniform_int8":
            out.append(Method(p, quantizer="absmax"))
        elif p == "uniform_int4":
            out += [Method(p, quantizer=q) for q in quantizers]
    for kind in kinds:
        for b in (budgets[kind] if isinstance(budgets, dict) else budgets):
            for p in policies:
                if p == "pdtrim":
                    out.append(Method(p, budget=b, budget_kind=kind))
                elif p == "random_tier":
                    out += [Method(p, "none", q, b, kind) for q in quantizers]
                elif p == "2tier":
                    out += [Method(p, s, "absmax", b, kind) for s in scorings]
                elif p in ("3tier", "sinkprotect"):
                    out += [Method(p, s, q, b, kind) for s in scorings for q in quantizers]
    return out


def parse_budgets(text: str):
    """"0.25:0.75:0.05" (inclusive range) or "0.3,0.5"; or per budget kind,
    "wire=0.25:0.75:0.05;element=0.3,0.5" (a dict)."""
    if "=" in text:
        return {k.strip(): parse_budgets(v) for k, v in
                (part.split("=", 1) for part in text.split(";") if part.strip())}
    if ":" in text:
        lo, hi, step = (float(x) for x in text.split(":"))
        count = int(round((hi - lo) / step)) + 1
        return [round(lo + i * step, 6) for i in range(count)]
    return [float(x) for x in text.split(",") if x]


def csv(text: str) -> List[str]:
    return [x for x in text.split(",") if x]


def _van_der_corput(i: int) -> float:
    """i's binary digits mirrored behind the point: 0, 0.5, 0.25, 0.75, 0.125, ..."""
    x, f = 0.0, 0.5
    while i:
        x += f * (i & 1)
        i >>= 1
        f /= 2
    return x


class Accumulator:
    """Per-method sums over samples."""

    def __init__(self):
        self.n = 0
        self.sums: Dict[str, float] = {}
        self.per_sample: Dict[str, List[float]] = {}
        self.tiers = np.zeros(4)

    def add(self, rt: Optional[RoundTrip], **values):
        self.n += 1
        if rt is not None:
            values.update(element_budget=rt.element_budget, wire_budget=rt.wire_budget,
                          payload_bytes=rt.payload_bytes, fp16_bytes=rt.fp16_bytes)
            self.tiers += [rt.counts[t] for t in ("fp16", "int8", "int4", "drop")]
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.per_sample.setdefault(k, []).append(float(v))

    def mean(self, key):
        return self.sums[key] / self.n if self.n else float("nan")


class Harness:
    def __init__(self, lm: LanguageModel, codec: Codec, args):
        self.lm, self.codec, self.args = lm, codec, args
        self.pool = futures.ThreadPoolExecutor(max_workers=args.threads)
        self.kv_bytes = 0
        self.started = time.time()

    def out_of_time(self) -> bool:
        return self.args.time_limit_s > 0 and time.time() - self.started > self.args.time_limit_s

    # -- shared steps ----------------------------------------------------------------------------

    def prefill_and_score(self, ids: List[int]):
        """Full-precision prefill plus the codec's scores of the prompt under every mode."""
        window = min(self.args.window, len(ids))
        pre = self.lm.prefill(ids, window=window)
        kv_np = kv_to_numpy(pre.kv)
        self.kv_bytes = kv_np.nbytes
        dtype = self.lm.dtype_name
        scores = {"positional": self.codec.score(kv_np, dtype, scoring="positional"),
                  "key_norm": self.codec.score(kv_np, dtype, scoring="key_norm")}
        if pre.queries is not None:
            scores["attention"] = self.codec.score(
                kv_np, dtype, scoring="attention", window_queries=pre.queries.cpu().numpy(),
                pool_kernel=self.args.pool_kernel, recency_decay=self.args.recency_decay)
        return pre, kv_np, scores

    def batch_size(self) -> int:
        fit = int(self.args.max_batch_bytes // max(1, self.kv_bytes))
        return max(1, min(self.args.batch, fit))

    def round_trips(self, kv_np, scores, methods: Sequence[Method], seed: int
                    ) -> Iterator[List[tuple]]:
        """Codec round trips of `methods`, in chunks of batch_size(); the next chunk is packed by
        the thread pool while the caller runs the model on the current one."""
        size = self.batch_size()
        chunks = [methods[i:i + size] for i in range(0, len(methods), size)]

        def submit(chunk):
            return [(m, self.pool.submit(self.codec.round_trip, kv_np, self.lm.dtype_name,
                                         **m.codec_options(scores, seed, self.args.sinks)))
                    for m in chunk]

        pending = submit(chunks[0]) if chunks else None
        for i in range(len(chunks)):
            current = pending
            pending = submit(chunks[i + 1]) if i + 1 < len(chunks) else None
            yield [(m, f.result()) for m, f in current]

    def stack(self, results: List[tuple]):
        """Reconstructed caches and keep masks of a chunk, on the model's device."""
        kv = torch.stack([numpy_to_kv(rt.kv, self.lm.dtype) for _, rt in results])
        n = kv.shape[3]
        keep = torch.ones(len(results), n, dtype=torch.bool)
        for i, (_, rt) in enumerate(results):
            if rt.dropped.size:
                keep[i, torch.from_numpy(rt.dropped.astype(np.int64))] = False
        return kv.to(self.lm.device, non_blocking=True), keep.to(self.lm.device)

    # -- PD-faithful perplexity and KL ------------------------------------------------------------

    def run_ppl(self, methods: Sequence[Method], words_ids: List[int]) -> dict:
        a = self.args
        seq, cont = a.seq_len, a.cont_len
        prefix = seq - cont
        total_windows = len(words_ids) // seq
        picks = np.linspace(0, total_windows - 1, num=min(a.windows, total_windows)).round()
        picks = sorted(set(int(x) for x in picks))
        # Visit the windows in van der Corput order (0, 1/2, 1/4, 3/4, ... of the file), so a run
        # cut by --time-limit-s still covers the whole of test.txt evenly.
        picks = [picks[i] for i in sorted(range(len(picks)), key=_van_der_corput)]
        acc = {m: Accumulator() for m in methods}
        full = Accumulator()
        identity_diff = 0.0
        boundary_ids = ([self.lm.encode(" ")[0], self.lm.encode("\n")[0]]
                        if self.lm.token_level == "char" else [])
        for wi, w in enumerate(picks):
            if self.out_of_time():
                print(f"ppl: time limit reached after {wi} windows", flush=True)
                break
            ids = words_ids[w * seq:(w + 1) * seq]
            pre, kv_np, scores = self.prefill_and_score(ids[:prefix])
            cont_ids = torch.tensor([ids[prefix:]], device=self.lm.device)
            targets = cont_ids[0, 1:]
            # Full precision: the uncompressed prefix KV through the same code path.
            keep_all = torch.ones(1, prefix, dtype=torch.bool, device=self.lm.device)
            logits, _ = self.lm.forward_with_cache(pre.kv[None], keep_all, cont_ids, prefix)
            lp_full = torch.log_softmax(logits[0, :-1], dim=-1)
            nll_full = -lp_full.gather(1, targets[:, None]).sum().item()
            # Character models: the words scored (WikiText ends every word with a space or a
            # newline), for a word-level equivalent of the per-character perplexity.
            words = sum(int((targets == t).sum()) for t in boundary_ids)
            full.add(None, nll=nll_full, tokens=len(targets), words=words)
            # Codec check: 3tier at element budget 1.0 sends every token at FP16, bit-exact, so
            # the continuation must match full precision exactly.
            check = Method("3tier", "positional", "absmax", 1.0, "element")
            rt = self.codec.round_trip(kv_np, self.lm.dtype_name,
                                       **check.codec_options(scores, 0, a.sinks))
            kv_c, keep_c = self.stack([(check, rt)])
            logits_c, _ = self.lm.forward_with_cache(kv_c, keep_c, cont_ids, prefix)
            identity_diff = max(identity_diff, (logits_c[0] - logits[0]).abs().max().item())
            for chunk in self.round_trips(kv_np, scores, methods, seed=42 + wi):
                kv, keep = self.stack(chunk)
                ids_b = cont_ids.expand(len(chunk), -1)
                logits_b, _ = self.lm.forward_with_cache(kv, keep, ids_b, prefix)
                lp = torch.log_softmax(logits_b[:, :-1], dim=-1)
                nll = -lp.gather(2, targets[None, :, None].expand(len(chunk), -1, 1))[..., 0]
                kl = (lp_full.exp()[None] * (lp_full[None] - lp)).sum(-1)  # [B, m-1]
                top1 = (lp.argmax(-1) == lp_full.argmax(-1)[None]).float()
                for i, (m, rt) in enumerate(chunk):
                    acc[m].add(rt, nll=nll[i].sum().item(), tokens=len(targets),
                               kl=kl[i].sum().item(), top1=top1[i].sum().item())
                del logits_b, lp, kl
            print(f"ppl window {wi + 1}/{len(picks)} (offset {w * seq}) done at "
                  f"{time.time() - self.started:.0f} s", flush=True)
        full_nll = np.array(full.per_sample["nll"])
        tokens = np.array(full.per_sample["tokens"])
        ppl_full = math.exp(full_nll.sum() / tokens.sum())
        rows = []
        for m, a_m in acc.items():
            if a_m.n == 0:
                continue
            nll = np.array(a_m.per_sample["nll"])
            k = len(nll)
            ppl = math.exp(nll.sum() / tokens[:k].sum())
            # Paired per-window differences of mean NLL: standard error of the mean difference,
            # mapped to percent of PPL (d ppl / ppl = d nll).
            diffs = (nll - full_nll[:k]) / tokens[:k]
            se = float(diffs.std(ddof=1) / math.sqrt(k)) if k > 1 else float("nan")
            rows.append({**asdict(m), "label": m.label(), "windows": k, "ppl": ppl,
                         "delta_ppl_pct": 100.0 * (ppl / math.exp(
                             full_nll[:k].sum() / tokens[:k].sum()) - 1.0),
                         "delta_se_pct": 100.0 * se,
                         "kl": a_m.sums["kl"] / a_m.sums["tokens"],
                         "top1": a_m.sums["top1"] / a_m.sums["tokens"],
                         "element_budget": a_m.mean("element_budget"),
                         "wire_budget": a_m.mean("wire_budget"),
                         "payload_bytes": a_m.mean("payload_bytes"),
                         "fp16_bytes": a_m.mean("fp16_bytes"),
                         "tier_fractions": (a_m.tiers / a_m.tiers.sum()).round(5).tolist()})
        extra = {}
        if boundary_ids:
            words = float(np.sum(full.per_sample["words"]))
            extra = {"token_level": "char", "scored_words": words,
                     "chars_per_word": float(tokens.sum() / words),
                     "bits_per_char": float(full_nll.sum() / tokens.sum() / math.log(2)),
                     "word_equivalent_ppl": math.exp(full_nll.sum() / words)}
        return {"protocol": "ppl", "seq_len": seq, "prefix_tokens": prefix,
                "scored_tokens_per_window": cont - 1, "windows": len(full_nll),
                "window_offsets": [w * seq for w in picks[:len(full_nll)]],
                "full": {"ppl": ppl_full, "nll_per_token": float(full_nll.sum() / tokens.sum()),
                         **extra},
                "codec_identity_max_logit_diff": identity_diff, "methods": rows}

    # -- needle in a haystack ---------------------------------------------------------------------

    def greedy(self, kv, keep, first: int, n: int, steps: int) -> torch.Tensor:
        """Greedy decoding of `steps` tokens after `first` for every cache in the batch."""
        b = kv.shape[0]
        tok = torch.full((b, 1), first, dtype=torch.long, device=self.lm.device)
        out, state = [tok], None
        for s in range(steps):
            logits, state = self.lm.forward_with_cache(kv, keep, tok, n + s, state)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            out.append(tok)
        return torch.cat(out, dim=1)

    def run_niah(self, methods: Sequence[Method], trials: Sequence[data.NiahTrial]) -> dict:
        acc = {m: Accumulator() for m in methods}
        full = Accumulator()
        full_by_depth: Dict[float, List[int]] = {}
        by_depth: Dict[Method, Dict[float, List[int]]] = {m: {} for m in methods}
        for ti, trial in enumerate(trials):
            if self.out_of_time():
                print(f"niah: time limit reached after {ti} trials", flush=True)
                break
            n = len(trial.prompt_ids)
            pre, kv_np, scores = self.prefill_and_score(trial.prompt_ids)
            first = int(pre.last_logits.argmax())
            steps = len(trial.answer_ids) + 1
            keep_all = torch.ones(1, n, dtype=torch.bool, device=self.lm.device)
            gen = self.greedy(pre.kv[None], keep_all, first, n, steps)
            ok = data.answer_found(self.lm.decode(gen[0].tolist()), trial.answer_text)
            full.add(None, success=ok)
            full_by_depth.setdefault(trial.depth, []).append(int(ok))
            answer_len = len(self.lm.encode(trial.answer_text))
            answer_pos = np.arange(trial.answer_pos, trial.answer_pos + answer_len)
            for chunk in self.round_trips(kv_np, scores, methods, seed=42 + ti):
                kv, keep = self.stack(chunk)
                gens = self.greedy(kv, keep, first, n, steps).tolist()
                for (m, rt), g in zip(chunk, gens):
                    success = data.answer_found(self.lm.decode(g), trial.answer_text)
                    needle_tiers = rt.tiers[0, answer_pos]
                    acc[m].add(rt, success=success, needle_int4=(needle_tiers == 2).any(),
                               needle_dropped=(needle_tiers == 3).any())
                    by_depth[m].setdefault(trial.depth, []).append(int(success))
            if (ti + 1) % 10 == 0 or ti + 1 == len(trials):
                print(f"niah trial {ti + 1}/{len(trials)} (context {n}) done at "
                      f"{time.time() - self.started:.0f} s; full precision "
                      f"{full.sums['success']:.0f}/{full.n}", flush=True)
        rows = []
        for m, a_m in acc.items():
            if a_m.n == 0:
                continue
            rows.append({**asdict(m), "label": m.label(), "trials": a_m.n,
                         "accuracy": a_m.mean("success"),
                         "successes": int(a_m.sums["success"]),
                         "needle_int4_frac": a_m.mean("needle_int4"),
                         "needle_dropped_frac": a_m.mean("needle_dropped"),
                         "element_budget": a_m.mean("element_budget"),
                         "wire_budget": a_m.mean("wire_budget"),
                         "per_depth": {str(d): float(np.mean(v))
                                       for d, v in sorted(by_depth[m].items())}})
        context = trials[0].context if trials else 0
        return {"protocol": "niah", "context": context, "trials": full.n,
                "full": {"accuracy": full.mean("success"), "successes": int(full.sums.get(
                    "success", 0)), "per_depth": {str(d): float(np.mean(v))
                                                  for d, v in sorted(full_by_depth.items())}},
                "methods": rows}


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def add_common_args(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="Hugging Face causal-LM checkpoint directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"],
                   help="model and KV dtype (the codec's FP16 tier is this 16-bit dtype)")
    p.add_argument("--backend", default="auto", choices=["auto", "transformers", "builtin"],
                   help="transformers where installed, else the built-in Llama")
    p.add_argument("--codec-lib", default=None, help="libspectrumkv_codec.so (default: build/)")
    p.add_argument("--codec-backend", default="cpu")
    p.add_argument("--data-dir", default=DEFAULT_DATA, help="WikiText-2 folder (test.txt)")
    p.add_argument("--window", type=int, default=32, help="attention scoring: window queries")
    p.add_argument("--pool-kernel", type=int, default=5)
    p.add_argument("--recency-decay", type=float, default=0.0)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--threads", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 1)))
    p.add_argument("--batch", type=int, default=32, help="caches per model forward")
    p.add_argument("--max-batch-bytes", type=float, default=2e9)
    p.add_argument("--time-limit-s", type=float, default=0, help="stop early (0 = no limit)")
    p.add_argument("--seed", type=int, default=1234, help="NIAH answers and haystack offsets")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--protocols", default="ppl,niah")
    p.add_argument("--out", required=True, help="JSON results")
    p.add_argument("--policies", default=",".join(ALL_POLICIES))
    p.add_argument("--scorings", default="attention,key_norm,positional")
    p.add_argument("--quantizers", default="absmax,kcn")
    p.add_argument("--budgets", default="0.25:0.75:0.05")
    p.add_argument("--budget-kinds", default="wire,element")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--cont-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--niah-context", default="2048", help="comma list of prompt lengths")
    p.add_argument("--niah-depths", type=int, default=19, help="depths 0.05, 0.10, ...")
    p.add_argument("--niah-needles", type=int, default=5)
    p.add_argument("--niah-policies", default=None, help="default: --policies")
    p.add_argument("--niah-scorings", default=None, help="default: --scorings")
    p.add_argument("--niah-quantizers", default=None, help="default: --quantizers")
    p.add_argument("--niah-budgets", default=None, help="default: --budgets")
    p.add_argument("--niah-budget-kinds", default=None, help="default: --budget-kinds")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    lm = LanguageModel(args.model, args.device, args.dtype, args.backend)
    codec = Codec(args.codec_lib, args.codec_backend)
    print(f"model {args.model} ({lm.backend}, {lm.num_layers} layers, {lm.num_kv_heads} KV "
          f"heads, head_dim {lm.head_dim}) on {device_name(args.device)}; codec {codec.name}: "
          f"{codec.reason}", flush=True)
    h = Harness(lm, codec, args)
    result = {"model": os.path.abspath(args.model), "backend": lm.backend, "dtype": args.dtype,
              "device": device_name(args.device), "codec": codec.name,
              "torch": torch.__version__, "command": " ".join(sys.argv), "args": vars(args)}
    test_text = data.wikitext_text(os.path.join(args.data_dir, "test.txt"))
    test_ids = lm.encode(test_text)
    protocols = csv(args.protocols)
    if "ppl" in protocols:
        methods = method_grid(csv(args.policies), parse_budgets(args.budgets),
                              csv(args.budget_kinds), csv(args.scorings), csv(args.quantizers))
        print(f"ppl: {len(methods)} methods", flush=True)
        result["ppl"] = h.run_ppl(methods, test_ids)
    if "niah" in protocols:
        pick = lambda a, b: a if a is not None else b  # noqa: E731
        methods = method_grid(csv(pick(args.niah_policies, args.policies)),
                              parse_budgets(pick(args.niah_budgets, args.budgets)),
                              csv(pick(args.niah_budget_kinds, args.budget_kinds)),
                              csv(pick(args.niah_scorings, args.scorings)),
                              csv(pick(args.niah_quantizers, args.quantizers)))
        pool = data.load_word_pool(args.model) or list(FALLBACK_POOL)
        result["niah"] = []
        for context in (int(c) for c in csv(args.niah_context)):
            trials = data.niah_trials(lm.encode, test_ids, context,
                                      data.default_depths(args.niah_depths),
                                      list(range(args.niah_needles)), pool, args.seed,
                                      lm.token_level)
            print(f"niah: context {context}, {len(trials)} trials, {len(methods)} methods",
                  flush=True)
            result["niah"].append(h.run_niah(methods, trials))
    result["elapsed_s"] = time.time() - h.started
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} in {result['elapsed_s']:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
