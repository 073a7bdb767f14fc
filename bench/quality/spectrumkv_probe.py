#!/usr/bin/env python3
"""spectrumkv-probe: the deployment-time INT4 tolerance probe (paper §6), run through the real
codec, writing the per-model tier policy the daemon loads.

Protocol: three needle-in-a-haystack trials (needle "the secret code is ...", depths 0.25, 0.50
and 0.75, --context tokens) under 3-tier greedy at element budget b = 0.3 (about 80% of the
tokens INT4, 20% INT8), greedy decoding over the reconstructed prompt KV. INT4 is allowed for a
quantizer if at least 2 of 3 trials succeed. The full-precision model must pass the same trials
first (at least 2 of 3), otherwise the probe cannot tell anything and exits with status 2.

The default scoring is the paper's positional heuristic, under which the needles at those
depths sit in INT4 tokens, so the trials test INT4 itself; with --scoring attention the needle
tends to be ranked into INT8 and the probe is weaker.

Output (YAML): the probe's settings and per-trial outcomes, then the decision:
  int4_allowed: {absmax: false, kcn: true}
  policy: 3tier | 2tier        # 2tier when no probed quantizer keeps INT4
  quantizer: kcn               # the first quantizer (in --quantizers order) that passed
  allowed_tiers: [fp16, int8, int4, drop]

Example:
  python3 bench/quality/spectrumkv_probe.py --model bench/quality/checkpoints/outlier \
      --quantizers absmax,kcn --out outlier-policy.yaml
Exit status: 0 probe ran (whatever it decided), 2 full precision fails the trials, 64 usage.
"""

import argparse
import datetime
import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data  # noqa: E402
import harness  # noqa: E402
from modeling import LanguageModel  # noqa: E402
from skv_codec import Codec  # noqa: E402

PROBE_DEPTHS = (0.25, 0.5, 0.75)


def fingerprint(model_dir: str) -> str:
    """sha256 over config.json and the weight files' names and sizes (cheap, stable)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if name == "config.json":
            with open(path, "rb") as f:
                h.update(f.read())
        elif name.endswith((".safetensors", ".bin")):
            h.update(f"{name}:{os.path.getsize(path)}".encode())
    return h.hexdigest()[:16]


def yaml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(yaml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a quoted string is valid YAML


def write_yaml(path: str, doc: dict):
    lines = ["# SpectrumKV per-model tier policy, written by bench/quality/spectrumkv_probe.py"]

    def emit(obj, indent):
        for k, v in obj.items():
            if isinstance(v, dict):
                lines.append(" " * indent + f"{k}:")
                emit(v, indent + 2)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                lines.append(" " * indent + f"{k}:")
                for item in v:
                    first = True
                    for ik, iv in item.items():
                        prefix = "- " if first else "  "
                        lines.append(" " * indent + prefix + f"{ik}: {yaml_value(iv)}")
                        first = False
            else:
                lines.append(" " * indent + f"{k}: {yaml_value(v)}")

    emit(doc, 0)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(p)
    p.add_argument("--out", required=True, help="policy YAML to write")
    p.add_argument("--json", default=None, help="also write the full probe record as JSON")
    p.add_argument("--context", type=int, default=2048,
                   help="prompt tokens (the paper used 4096; use the model's trained context)")
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--scoring", default="positional")
    p.add_argument("--quantizers", default="absmax",
                   help="comma list, in order of preference (absmax = the paper's)")
    p.add_argument("--needle", type=int, default=0, help="index into data.NEEDLE_KEYS")
    p.add_argument("--pass-threshold", type=int, default=2)
    args = p.parse_args(argv)
    quantizers = harness.csv(args.quantizers)
    if not quantizers:
        p.error("--quantizers is empty")
    torch.manual_seed(0)

    lm = LanguageModel(args.model, args.device, args.dtype, args.backend)
    codec = Codec(args.codec_lib, args.codec_backend)
    test_ids = lm.encode(data.wikitext_text(os.path.join(args.data_dir, "test.txt")))
    pool = data.load_word_pool(args.model) or list(harness.FALLBACK_POOL)
    trials = data.niah_trials(lm.encode, test_ids, args.context, PROBE_DEPTHS, [args.needle],
                              pool, args.seed, lm.token_level)
    methods = [harness.Method("3tier", args.scoring, q, args.budget, "element")
               for q in quantizers]
    h = harness.Harness(lm, codec, args)
    result = h.run_niah(methods, trials)

    full_passes = result["full"]["successes"]
    trials_doc = []
    for t, depth in enumerate(PROBE_DEPTHS):
        entry = {"depth": depth, "full_precision": bool(result["full"]["per_depth"][str(depth)])}
        for row in result["methods"]:
            entry[row["quantizer"]] = bool(row["per_depth"][str(depth)])
        trials_doc.append(entry)
    passes = {row["quantizer"]: row["successes"] for row in result["methods"]}
    allowed = {q: passes[q] >= args.pass_threshold for q in quantizers}
    chosen = next((q for q in quantizers if allowed[q]), None)
    doc = {
        "model": os.path.abspath(args.model),
        "model_fingerprint": fingerprint(args.model),
        "probed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "probe": {
            "protocol": "niah-3tier", "trials": len(trials), "depths": list(PROBE_DEPTHS),
            "context_tokens": args.context, "policy": "3tier", "budget": args.budget,
            "budget_kind": "element", "scoring": args.scoring, "dtype": args.dtype,
            "pass_threshold": args.pass_threshold, "codec": codec.name,
            "device": harness.device_name(args.device),
            "full_precision_passes": full_passes,
            "passes": passes,
            "results": trials_doc,
        },
        "int4_allowed": allowed,
        "policy": "3tier" if chosen else "2tier",
        "quantizer": chosen or quantizers[0],
        "allowed_tiers": ["fp16", "int8", "int4", "drop"] if chosen else ["fp16", "int8", "drop"],
    }
    usable = full_passes >= args.pass_threshold
    if not usable:
        doc["policy"] = "2tier"
        doc["allowed_tiers"] = ["fp16", "int8", "drop"]
        doc["note"] = ("full precision fails the probe's trials: INT4 tolerance cannot be "
                       "established, so INT4 stays off")
    write_yaml(args.out, doc)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"policy": doc, "niah": result}, f, indent=1)
    print(f"probe {args.model}: full precision {full_passes}/3; " +
          ", ".join(f"{q} {passes[q]}/3" for q in quantizers) +
          f" -> policy {doc['policy']}, quantizer {doc['quantizer']} (wrote {args.out})",
          flush=True)
    return 0 if usable else 2


if __name__ == "__main__":
    sys.exit(main())
