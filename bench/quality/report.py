#!/usr/bin/env python3
"""Turns the quality study's JSON results (run_all.py's --out folder) into the PNG plots and the
markdown tables of docs/QUALITY.md, and evaluates the issue's acceptance checks.

Example:
  python3 bench/quality/report.py --results /tmp/quality --figures docs/quality \
      --tables docs/quality/tables.md
"""

import argparse
import contextlib
import json
import os
import re

MAIN = [  # (label, policy, scoring, quantizer)
    ("pdtrim (sinks + recent, FP16)", "pdtrim", "none", "none"),
    ("random_tier", "random_tier", "none", "absmax"),
    ("2tier (attention)", "2tier", "attention", "absmax"),
    ("3tier (attention, absmax)", "3tier", "attention", "absmax"),
    ("3tier (attention, kcn)", "3tier", "attention", "kcn"),
    ("3tier (key_norm, absmax)", "3tier", "key_norm", "absmax"),
    ("3tier (positional, absmax)", "3tier", "positional", "absmax"),
    ("sinkprotect (attention, absmax)", "sinkprotect", "attention", "absmax"),
]
SPECTRUM = ("3tier", "2tier", "sinkprotect")


@contextlib.contextmanager
def figure(path, title, height):
    """Yields the axes of a new 8-inch-wide figure; on leaving, titles it, adds a grid and a
    legend, and saves it to `path` as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, height))
    try:
        yield ax
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def load(folder, name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def pick(rows, policy, scoring, quantizer, kind=None, budget=None):
    out = [r for r in rows if r["policy"] == policy and r["scoring"] == scoring and
           r["quantizer"] == quantizer and (kind is None or r["budget_kind"] == kind) and
           (budget is None or abs(r["budget"] - budget) < 1e-9)]
    return sorted(out, key=lambda r: r["budget"])


def fmt(x, digits=2, signed=True):
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def plot_ppl(ppl, kind, path, title):
    with figure(path, title, height=5) as ax:
        for label, p, s, q in MAIN:
            rows = pick(ppl["methods"], p, s, q, kind)
            if rows:
                x = [r[f"{kind}_budget"] for r in rows]
                ax.plot(x, [r["delta_ppl_pct"] for r in rows], marker="o", ms=3, label=label)
        for p, q, m in (("uniform_int8", "absmax", "s"), ("uniform_int4", "absmax", "^"),
                        ("uniform_int4", "kcn", "v")):
            rows = pick(ppl["methods"], p, "none", q)
            if rows:
                ax.scatter([rows[0][f"{kind}_budget"]], [rows[0]["delta_ppl_pct"]], marker=m, s=50,
                           zorder=5, label=f"{p} ({q})")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_xlabel(f"realized {kind} budget (fraction of FP16 KV bytes"
                      f"{', all payload bytes' if kind == 'wire' else ''})")
        ax.set_ylabel("ΔPPL vs full precision (%)  [symlog]")


def plot_kl(ppl, kind, path, title):
    with figure(path, title, height=5) as ax:
        for label, p, s, q in MAIN:
            rows = pick(ppl["methods"], p, s, q, kind)
            if rows:
                ax.plot([r[f"{kind}_budget"] for r in rows], [max(r["kl"], 1e-6) for r in rows],
                        marker="o", ms=3, label=label)
        ax.set_yscale("log")
        ax.set_xlabel(f"realized {kind} budget")
        ax.set_ylabel("mean token KL(p_full || p_method) (nats)")


def plot_niah(niah, kind, path, title, fp_acc):
    with figure(path, title, height=5) as ax:
        for label, p, s, q in MAIN:
            rows = pick(niah["methods"], p, s, q, kind)
            if rows:
                ax.plot([r["budget"] for r in rows], [100 * r["accuracy"] for r in rows],
                        marker="o", ms=3, label=label)
        ax.axhline(100 * fp_acc, color="black", ls="--", lw=1, label="full precision")
        ax.set_xlabel(f"{kind} budget")
        ax.set_ylabel("needle retrieval accuracy (%)")
        ax.set_ylim(-3, 103)


def plot_depth(niah, kind, budget, path, title):
    with figure(path, title, height=4) as ax:
        depths = sorted(float(d) for d in niah["full"]["per_depth"])
        ax.plot(depths, [100 * niah["full"]["per_depth"][str(d)] for d in depths], "k--",
                label="full precision")
        for label, p, s, q in MAIN:
            rows = pick(niah["methods"], p, s, q, kind, budget)
            if rows:
                ax.plot(depths, [100 * rows[0]["per_depth"].get(str(d), float("nan"))
                                 for d in depths], marker="o", ms=3, label=label)
        ax.set_xlabel("needle depth (fraction of the haystack)")
        ax.set_ylabel("accuracy over the 5 needles (%)")
        ax.set_ylim(-3, 103)


def plot_training(log, path):
    """Held-out loss (left axis) and held-out needle accuracy (right axis) against the step."""
    steps = [e["step"] for e in log["log"]]
    level = log["args"].get("tokenizer", "word")
    with figure(path, f"Reference model training ({level} level, {log.get('device', '?')}, "
                f"{log.get('train_seconds', 0):.0f} s): held-out curves", height=4) as ax:
        ax.plot(steps, [e["held_lm"] for e in log["log"]], marker="o", ms=3,
                label="held-out LM loss (nats/token, last 5% of valid.txt)")
        ax.plot(steps, [e["train_lm"] for e in log["log"]], marker=".", ms=2, lw=0.8,
                label="training LM loss (last batch)")
        ax.axvline(log["selected"]["step"], color="gray", ls=":", label="kept checkpoint")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax2 = ax.twinx()
        ax2.plot(steps, [100 * e["held_needle_acc"] for e in log["log"]], color="black",
                 ls="--", lw=1)
        ax2.set_ylabel("held-out needle accuracy (%), dashed")
        ax2.set_ylim(-3, 103)


def model_card(log, ppl):
    a, sel = log["args"], log["selected"]
    level = a.get("tokenizer", "word")
    rows = [("tokenizer", f"{level} level, vocabulary {log['vocab']}"),
            ("architecture", f"Llama, {a['layers']} layers, hidden {a['hidden']}, {a['heads']} "
                             f"query / {a['kv_heads']} KV heads of {a['head_dim']} (GQA), SwiGLU "
                             f"{a['intermediate']}, RoPE θ = {a['rope_theta']:g}, tied "
                             f"embeddings"),
            ("parameters", f"{log['parameters'] / 1e6:.2f} M"),
            ("training", f"{log['steps_run']} steps of {a['batch']} × {a['seq_len']} tokens "
                         f"(first {100 * a['short_frac']:.0f}% as {a['short_seq_len']}-token rows), "
                         f"{log['train_seconds']:.0f} s on {log.get('device', '?')}, seed "
                         f"{a['seed']}, dropout {a['dropout']}, weight decay {a['weight_decay']}"),
            ("kept checkpoint", f"step {sel['step']}: held-out loss {sel['held_lm']:.4f} nats/token"
                                f" (PPL {sel['held_ppl']:.3f}), held-out needle accuracy "
                                f"{100 * sel['held_needle_acc']:.1f}%")]
    best = min(log["log"], key=lambda e: e["held_lm"])
    rows.append(("lowest held-out loss of the run", f"step {best['step']}: {best['held_lm']:.4f} "
                 f"(needle accuracy {100 * best['held_needle_acc']:.1f}%)"))
    if ppl:
        f = ppl["full"]
        text = (f"PPL {f['ppl']:.3f} per token over {ppl['windows']} × "
                f"{ppl['scored_tokens_per_window']} continuation tokens")
        if "bits_per_char" in f:
            text += (f" ({f['bits_per_char']:.3f} bits/char; word-level equivalent "
                     f"{f['word_equivalent_ppl']:.1f} at {f['chars_per_word']:.2f} chars/word)")
        rows.append(("full-precision test.txt perplexity (PD protocol)", text))
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def ppl_table(ppl, kind, budgets=(0.3, 0.5, 0.7)):
    head = "| method | " + " | ".join(f"ΔPPL b={b} (±SE)" for b in budgets) + \
        " | KL b=0.3 | top-1 b=0.3 | realized " + ("wire" if kind == "element" else "element") + \
        " budget at 0.3/0.5/0.7 |"
    lines = [head, "|" + "---|" * (len(budgets) + 4)]
    for label, p, s, q in MAIN:
        cells, other = [], []
        kl = top1 = None
        for b in budgets:
            r = pick(ppl["methods"], p, s, q, kind, b)
            if r:
                cells.append(f"{r[0]['delta_ppl_pct']:+.3f} (±{r[0]['delta_se_pct']:.3f})")
                other.append(f"{r[0]['wire_budget' if kind == 'element' else 'element_budget']:.3f}")
                if b == 0.3:
                    kl, top1 = r[0]["kl"], r[0]["top1"]
            else:
                cells.append("–")
                other.append("–")
        lines.append(f"| {label} | " + " | ".join(cells) +
                     f" | {fmt(kl, 4, False)} | {fmt(top1, 3, False)} | {' / '.join(other)} |")
    for p, q in (("uniform_int8", "absmax"), ("uniform_int4", "absmax"), ("uniform_int4", "kcn")):
        r = pick(ppl["methods"], p, "none", q)
        if r:
            r = r[0]
            lines.append(f"| {p} ({q}), element {r['element_budget']:.2f} / wire "
                         f"{r['wire_budget']:.3f} | {r['delta_ppl_pct']:+.3f} "
                         f"(±{r['delta_se_pct']:.3f}) | | | {r['kl']:.4f} | {r['top1']:.3f} | |")
    return "\n".join(lines)


def kl_table(ppl, kind, budgets=(0.25, 0.3, 0.4, 0.5, 0.6, 0.7)):
    lines = ["| method | " + " | ".join(f"b={b}" for b in budgets) + " |",
             "|" + "---|" * (len(budgets) + 1)]
    for label, p, s, q in MAIN:
        cells = []
        for b in budgets:
            r = pick(ppl["methods"], p, s, q, kind, b)
            cells.append(f"{r[0]['kl']:.4f}" if r else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scoring_table(ppl, niah, kind, budget):
    lines = ["| policy | scoring | quantizer | ΔPPL (%) | KL | NIAH (%) |", "|---|---|---|---|---|---|"]
    for p in ("3tier", "sinkprotect", "2tier"):
        for s in ("attention", "key_norm", "positional"):
            for q in (("absmax",) if p == "2tier" else ("absmax", "kcn")):
                r = pick(ppl["methods"], p, s, q, kind, budget) if ppl else []
                n = pick(niah["methods"], p, s, q, kind, budget) if niah else []
                if not r and not n:
                    continue
                lines.append(f"| {p} | {s} | {q} | "
                             f"{fmt(r[0]['delta_ppl_pct'], 3) if r else '–'} | "
                             f"{fmt(r[0]['kl'], 4, False) if r else '–'} | "
                             f"{fmt(100 * n[0]['accuracy'], 1, False) if n else '–'} |")
    return "\n".join(lines)


def niah_table(niah, kind, budgets):
    lines = ["| method | " + " | ".join(f"b={b}" for b in budgets) + " |",
             "|" + "---|" * (len(budgets) + 1)]
    lines.append("| full precision | " + " | ".join(
        f"{100 * niah['full']['accuracy']:.1f}" for _ in budgets) + " |")
    for label, p, s, q in MAIN:
        cells = []
        for b in budgets:
            r = pick(niah["methods"], p, s, q, kind, b)
            cells.append(f"{100 * r[0]['accuracy']:.1f}" if r else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for p, q in (("uniform_int8", "absmax"), ("uniform_int4", "absmax"), ("uniform_int4", "kcn")):
        r = pick(niah["methods"], p, "none", q)
        if r:
            lines.append(f"| {p} ({q}) | {100 * r[0]['accuracy']:.1f} (fixed cost) |" +
                         " |" * (len(budgets) - 1))
    return "\n".join(lines)


def best_spectrum(niah, kind, budget):
    rows = [r for r in niah["methods"] if r["policy"] in SPECTRUM and r["budget_kind"] == kind
            and abs(r["budget"] - budget) < 1e-9]
    return max(rows, key=lambda r: r["accuracy"]) if rows else None


def acceptance(ppl, niah, probes):
    out = []
    for kind in ("element", "wire"):
        if ppl:
            t = pick(ppl["methods"], "3tier", "attention", "absmax", kind, 0.5)
            d = pick(ppl["methods"], "pdtrim", "none", "none", kind, 0.5)
            if t and d:
                a, b = t[0]["delta_ppl_pct"], d[0]["delta_ppl_pct"]
                ok = b > 0 and a <= b / 10
                out.append(f"- ΔPPL at {kind} b = 0.5: 3tier (attention, absmax) {a:+.3f}% "
                           f"(±{t[0]['delta_se_pct']:.3f}) vs pdtrim {b:+.3f}% "
                           f"(±{d[0]['delta_se_pct']:.3f}): {'HOLDS' if ok else 'DOES NOT HOLD'} "
                           f"(needs 3tier ≤ pdtrim/10 = {b / 10:+.3f}%). Token KL: 3tier "
                           f"{t[0]['kl']:.4f} vs pdtrim {d[0]['kl']:.4f} nats "
                           f"({d[0]['kl'] / max(t[0]['kl'], 1e-12):.0f}x).")
        if niah:
            best = best_spectrum(niah, kind, 0.3)
            d = pick(niah["methods"], "pdtrim", "none", "none", kind, 0.3)
            if best and d:
                ok = best["accuracy"] >= d[0]["accuracy"]
                out.append(f"- NIAH at {kind} b = 0.3: best SpectrumKV policy {best['label']} "
                           f"{100 * best['accuracy']:.1f}% vs pdtrim "
                           f"{100 * d[0]['accuracy']:.1f}%: {'HOLDS' if ok else 'DOES NOT HOLD'}.")
    for name, doc in probes.items():
        pol = doc["policy"]
        out.append(f"- probe {name}: full precision {pol['probe']['full_precision_passes']}/3, "
                   + ", ".join(f"{q} {n}/3" for q, n in pol["probe"]["passes"].items())
                   + f" -> policy {pol['policy']}, quantizer {pol['quantizer']}.")
    return "\n".join(out)


def probe_table(probes):
    lines = ["| model | scoring | full precision | absmax (paper) | kcn | written policy |",
             "|---|---|---|---|---|---|"]
    for name, doc in sorted(probes.items()):
        model, scoring = name.split("/")
        p = doc["policy"]
        lines.append(f"| {model} | {scoring} | {p['probe']['full_precision_passes']}/3 | "
                     f"{p['probe']['passes'].get('absmax', '–')}/3 | "
                     f"{p['probe']['passes'].get('kcn', '–')}/3 | {p['policy']} + "
                     f"{p['quantizer']} ({', '.join(p['allowed_tiers'])}) |")
    return "\n".join(lines)


def outlier_table(ppl_ref, ppl_out, niah_ref, niah_out):
    rows = [("full precision", None, None, None, None)]
    rows += [(f"{p} ({q})", p, "none", q, None) for p, q in
             (("uniform_int8", "absmax"), ("uniform_int4", "absmax"), ("uniform_int4", "kcn"))]
    for b in (0.3, 0.5, 0.7):
        rows += [(f"3tier attention {q} b={b}", "3tier", "attention", q, b)
                 for q in ("absmax", "kcn")]
        rows += [(f"3tier positional {q} b={b}", "3tier", "positional", q, b)
                 for q in ("absmax", "kcn")]
        rows.append((f"2tier attention b={b}", "2tier", "attention", "absmax", b))
        rows.append((f"pdtrim b={b}", "pdtrim", "none", "none", b))
    lines = ["| method (element budget) | reference ΔPPL (%) | outlier ΔPPL (%) | "
             "reference NIAH (%) | outlier NIAH (%) |", "|---|---|---|---|---|"]

    def cell(res, p, s, q, b, key):
        if res is None:
            return "–"
        if p is None:
            return (f"PPL {res['full']['ppl']:.2f}" if key == "delta_ppl_pct"
                    else f"{100 * res['full']['accuracy']:.1f}")
        r = pick(res["methods"], p, s, q, None if b is None else "element", b)
        if not r:
            return "–"
        return f"{r[0][key]:+.3f}" if key == "delta_ppl_pct" else f"{100 * r[0][key]:.1f}"

    for label, p, s, q, b in rows:
        lines.append(f"| {label} | {cell(ppl_ref, p, s, q, b, 'delta_ppl_pct')} | "
                     f"{cell(ppl_out, p, s, q, b, 'delta_ppl_pct')} | "
                     f"{cell(niah_ref, p, s, q, b, 'accuracy')} | "
                     f"{cell(niah_out, p, s, q, b, 'accuracy')} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True)
    p.add_argument("--figures", required=True)
    p.add_argument("--tables", required=True)
    args = p.parse_args(argv)
    os.makedirs(args.figures, exist_ok=True)
    r = lambda n: load(args.results, n)  # noqa: E731
    ppl_ref = (r("ppl_reference.json") or {}).get("ppl")
    ppl_out = (r("ppl_outlier.json") or {}).get("ppl")
    niah_ref = ((r("niah_reference.json") or {}).get("niah") or [None])[0]
    niah_out = ((r("niah_outlier.json") or {}).get("niah") or [None])[0]
    fp = (r("niah_reference_fp.json") or {}).get("niah") or []
    probes = {}
    for name in sorted(os.listdir(args.results)):
        m = re.match(r"probe_(\w+?)_(\w+)\.json$", name)
        if m:
            probes[f"{m.group(1)}/{m.group(2)}"] = r(name)
    device = (r("ppl_reference.json") or {}).get("device", "?")
    md = [f"<!-- generated by bench/quality/report.py from {args.results}; device {device} -->"]
    train_log = r("train_log.json")
    if train_log:
        plot_training(train_log, os.path.join(args.figures, "training.png"))
        md += ["\n### Reference model (train_log.json, ppl_reference.json)\n",
               model_card(train_log, ppl_ref)]
    if ppl_ref:
        for kind in ("wire", "element"):
            plot_ppl(ppl_ref, kind, os.path.join(args.figures, f"ppl_{kind}.png"),
                     f"Reference model, PD-faithful ΔPPL vs {kind} budget "
                     f"({ppl_ref['windows']} windows × {ppl_ref['scored_tokens_per_window']} "
                     f"tokens, {device})")
            plot_kl(ppl_ref, kind, os.path.join(args.figures, f"kl_{kind}.png"),
                    f"Reference model, token KL vs full precision, {kind} budget ({device})")
            md += [f"\n### ΔPPL, {kind} budgets (reference model)\n", ppl_table(ppl_ref, kind),
                   f"\n### Token KL (nats), {kind} budgets (reference model)\n",
                   kl_table(ppl_ref, kind)]
    if niah_ref:
        for kind in ("wire", "element"):
            plot_niah(niah_ref, kind, os.path.join(args.figures, f"niah_{kind}.png"),
                      f"Reference model, NIAH ({niah_ref['trials']} trials, context "
                      f"{niah_ref['context']}) vs {kind} budget", niah_ref["full"]["accuracy"])
        budgets = sorted({row["budget"] for row in niah_ref["methods"]
                          if row["budget_kind"] == "wire"})
        md += ["\n### NIAH accuracy (%), wire budgets (reference model)\n",
               niah_table(niah_ref, "wire", [b for b in budgets if b in (0.25, 0.3, 0.4, 0.5,
                                                                         0.6, 0.7, 0.75)]),
               "\n### NIAH accuracy (%), element budgets (reference model)\n",
               niah_table(niah_ref, "element", [0.3, 0.5, 0.7])]
        for kind in ("wire", "element"):
            plot_depth(niah_ref, kind, 0.3, os.path.join(args.figures, f"niah_depth_{kind}_030.png"),
                       f"Reference model, NIAH per depth at {kind} b = 0.3")
    if ppl_ref or niah_ref:
        for kind in ("wire", "element"):
            md += [f"\n### Scoring and quantizer at {kind} b = 0.3 (reference model)\n",
                   scoring_table(ppl_ref, niah_ref, kind, 0.3)]
    if fp or niah_ref:
        md += ["\n### Full-precision needle accuracy by context length\n",
               "| context | trials | accuracy (%) | source |", "|---|---|---|---|"]
        entries = [(e, "niah_reference_fp.json") for e in fp]
        if niah_ref:
            entries.append((niah_ref, "niah_reference.json (the sweep's own FP column)"))
        for entry, source in entries:
            md.append(f"| {entry['context']} | {entry['trials']} | "
                      f"{100 * entry['full']['accuracy']:.1f} | {source} |")
    if probes:
        md += ["\n### INT4 probe (3 NIAH trials, 3tier, element b = 0.3)\n", probe_table(probes)]
    if ppl_out or niah_out:
        md += ["\n### Outlier model vs reference model\n",
               outlier_table(ppl_ref, ppl_out, niah_ref, niah_out)]
    md += ["\n### Acceptance checks\n", acceptance(ppl_ref, niah_ref, probes)]
    with open(args.tables, "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
