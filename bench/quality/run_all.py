#!/usr/bin/env python3
"""Runs the whole quality study in one process, stage by stage, under a deadline: train the
reference model, build the outlier model, check transformers against the built-in model, run
the INT4 probe on both models, then the PPL and NIAH sweeps. Each stage prints the equivalent
stand-alone command (what docs/QUALITY.md lists); a stage that fails is logged and the next one
runs. Results land in --out as JSON/YAML; checkpoints in --checkpoints (reused if present).

By default two reference-model variants train side by side on the GPU (--train-variants: a
wider one, and train_reference.py's char preset) and the better one on held-out data is kept.

Example (one H200: 531 s with --deadline-s 540, which skipped the outlier model's NIAH sweep; a
second run with --stages outlier,out_niah did it in 98 s):
  python3 bench/quality/run_all.py --out /tmp/quality --checkpoints bench/quality/checkpoints
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import check_transformers  # noqa: E402
import harness  # noqa: E402
import make_outlier_model  # noqa: E402
import spectrumkv_probe  # noqa: E402
import train_reference  # noqa: E402
from modeling import have_transformers  # noqa: E402

SCRIPT_DIR = "bench/quality"

REF_GRID = ["--policies", ",".join(harness.ALL_POLICIES),
            "--scorings", "attention,key_norm,positional", "--quantizers", "absmax,kcn"]
OUTLIER_GRID = ["--policies", "uniform_int8,uniform_int4,pdtrim,3tier,2tier,sinkprotect",
                "--scorings", "attention,positional", "--quantizers", "absmax,kcn"]


def train_variants(ref, train_argv, variants, results):
    """Trains each flag set of `variants` concurrently (subprocesses), keeps the best by
    train_reference.selection_key on the held-out slice of valid.txt, moves it to `ref`, and
    copies every variant's train_log.json to `results` as train_log_v<i>.json."""
    procs, outs = [], []
    for i, extra in enumerate(variants):
        out = f"{ref}_v{i}"
        argv_ = ["--out", out] + train_argv + extra
        print(f"== train variant {i}: python3 {SCRIPT_DIR}/train_reference.py "
              f"{' '.join(argv_)}", flush=True)
        log = open(os.path.join(results, f"train_v{i}.log"), "w")
        procs.append((subprocess.Popen([sys.executable, "-u", train_reference.__file__] + argv_,
                                       stdout=log, stderr=subprocess.STDOUT), log))
        outs.append(out)
    summary = []
    for i, ((proc, log), out) in enumerate(zip(procs, outs)):
        rc = proc.wait()
        log.close()
        path = os.path.join(out, "train_log.json")
        if rc != 0 or not os.path.exists(path):
            summary.append((i, None))
            continue
        with open(path) as f:
            entry = json.load(f)
        shutil.copy(path, os.path.join(results, f"train_log_v{i}.json"))
        summary.append((i, entry["selected"]))
        print(f"== train variant {i}: steps {entry['steps_run']}, kept {entry['selected']}",
              flush=True)
    ok = [(i, sel) for i, sel in summary if sel is not None]
    if not ok:
        return "failed: no variant finished"
    best = max(ok, key=lambda x: train_reference.selection_key(x[1]))[0]
    if os.path.exists(ref):
        shutil.rmtree(ref)
    shutil.move(outs[best], ref)
    return f"variant {best} kept of {len(variants)} ({[i for i, _ in ok]} finished)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoints", default=os.path.join(SCRIPT_DIR, "checkpoints"))
    p.add_argument("--data-dir", default=harness.DEFAULT_DATA)
    p.add_argument("--deadline-s", type=float, default=570)
    p.add_argument("--train-minutes", type=float, default=3.5)
    p.add_argument("--train-args", default="",
                   help="extra train_reference.py flags (one string, split on spaces)")
    p.add_argument("--train-variants",
                   default="--hidden 384 --heads 6 --intermediate 1024 --batch 16 --dropout 0.2;",
                   help="';'-separated train_reference.py flag sets, trained side by side on the "
                        "same device (each with the same time budget); the one whose kept "
                        "checkpoint ranks best on held-out data (train_reference.selection_key) "
                        "becomes the reference model")
    p.add_argument("--stages", default="train,outlier,check,probe,ref_ppl,out_ppl,fp_niah,"
                   "ref_niah,out_niah")
    p.add_argument("--windows", type=int, default=48, help="PD-protocol PPL windows")
    p.add_argument("--context", type=int, default=2048,
                   help="NIAH and probe prompt tokens; PPL windows are this long too")
    p.add_argument("--ppl-limit-s", type=float, default=100)
    p.add_argument("--niah-limit-s", type=float, default=200)
    p.add_argument("--out-ppl-limit-s", type=float, default=45)
    p.add_argument("--out-niah-limit-s", type=float, default=70)
    p.add_argument("--threads", type=int, default=12)
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--device", default=None, help="default: cuda where available")
    args = p.parse_args(argv)
    started = time.time()
    os.makedirs(args.out, exist_ok=True)
    ref = os.path.join(args.checkpoints, "reference")
    outlier = os.path.join(args.checkpoints, "outlier")
    data = ["--data-dir", args.data_dir]
    device = ["--dtype", args.dtype] + (["--device", args.device] if args.device else [])
    common = data + device + ["--threads", str(args.threads)]
    status = {}
    backend = ["--backend", "auto"]

    def remaining():
        return args.deadline_s - (time.time() - started)

    def stage(name, module, argv_, budget_s=None, limit_flag=False):
        if name.split(":")[0] not in args.stages.split(","):
            return
        left = remaining() - 10
        if left < 20:
            print(f"== {name}: skipped, {remaining():.0f} s left", flush=True)
            status[name] = "skipped (deadline)"
            return
        argv_ = list(argv_)
        if limit_flag:
            argv_ += ["--time-limit-s", str(int(min(budget_s or left, left)))]
        print(f"== {name} at {time.time() - started:.0f} s: python3 {SCRIPT_DIR}/"
              f"{module.__name__}.py {' '.join(argv_)}", flush=True)
        t0 = time.time()
        try:
            rc = module.main(argv_)
            status[name] = f"rc {rc if isinstance(rc, int) else 0} in {time.time() - t0:.0f} s"
        except SystemExit as e:
            status[name] = f"exit {e.code} in {time.time() - t0:.0f} s"
        except Exception:  # keep going: later stages may still work
            traceback.print_exc()
            status[name] = f"failed: {traceback.format_exc().splitlines()[-1]}"
        print(f"== {name}: {status[name]}", flush=True)

    if not os.path.exists(os.path.join(ref, "config.json")):
        train_argv = ["--time-budget-min", str(args.train_minutes), "--max-minutes",
                      str(args.train_minutes + 0.75)] + data + args.train_args.split()
        variants = [v.split() for v in args.train_variants.split(";")] \
            if args.train_variants else []
        if not variants:
            stage("train", train_reference, ["--out", ref] + train_argv)
        elif "train" in args.stages.split(","):
            status["train"] = train_variants(ref, train_argv, variants, args.out)
            print(f"== train: {status['train']}", flush=True)
    else:
        status["train"] = "reused existing checkpoint"
    if not os.path.exists(os.path.join(outlier, "config.json")):
        stage("outlier", make_outlier_model, ["--src", ref, "--dst", outlier] + data)
    if have_transformers():
        for name, model in (("reference", ref), ("outlier", outlier)):
            stage(f"check:{name}", check_transformers,
                  ["--model", model, "--out", os.path.join(args.out, f"check_{name}.json")]
                  + data + device)
        if any(k.startswith("check") and not v.startswith("rc 0") for k, v in status.items()):
            print("== transformers and the built-in model disagree or failed: using the "
                  "built-in model for the evaluations", flush=True)
            backend = ["--backend", "builtin"]
    ctx = str(args.context)
    for name, model in (("reference", ref), ("outlier", outlier)):
        for scoring in ("positional", "attention"):
            stage(f"probe:{name}:{scoring}", spectrumkv_probe,
                  ["--model", model, "--quantizers", "absmax,kcn", "--scoring", scoring,
                   "--context", ctx,
                   "--out", os.path.join(args.out, f"policy_{name}_{scoring}.yaml"),
                   "--json", os.path.join(args.out, f"probe_{name}_{scoring}.json")]
                  + backend + common)
    budgets = ["--budgets", "0.25:0.75:0.05", "--budget-kinds", "wire,element"]
    ppl = ["--protocols", "ppl", "--windows", str(args.windows), "--seq-len", ctx]
    stage("ref_ppl", harness, ["--model", ref] + ppl +
          ["--out", os.path.join(args.out, "ppl_reference.json")]
          + REF_GRID + budgets + backend + common, args.ppl_limit_s, True)
    small = ["--budgets", "0.3,0.5,0.7", "--budget-kinds", "element,wire"]
    stage("out_ppl", harness, ["--model", outlier] + ppl +
          ["--out", os.path.join(args.out, "ppl_outlier.json")]
          + OUTLIER_GRID + small + backend + common, args.out_ppl_limit_s, True)
    stage("fp_niah", harness, ["--model", ref, "--protocols", "niah", "--niah-context",
                               f"{args.context // 2},{ctx}", "--policies", "",
                               "--out", os.path.join(args.out, "niah_reference_fp.json")]
          + backend + common, 60, True)
    stage("ref_niah", harness, ["--model", ref, "--protocols", "niah", "--niah-context", ctx,
                                "--niah-budgets",
                                "wire=0.25,0.3,0.4,0.5,0.6,0.7,0.75;element=0.3,0.5,0.7",
                                "--niah-budget-kinds", "wire,element",
                                "--out", os.path.join(args.out, "niah_reference.json")]
          + REF_GRID + backend + common, args.niah_limit_s, True)
    stage("out_niah", harness, ["--model", outlier, "--protocols", "niah",
                                "--niah-context", ctx, "--niah-budgets", "0.3,0.5,0.7",
                                "--niah-budget-kinds", "element",
                                "--out", os.path.join(args.out, "niah_outlier.json")]
          + OUTLIER_GRID + backend + common, args.out_niah_limit_s, True)
    summary = {"status": status, "elapsed_s": time.time() - started}
    with open(os.path.join(args.out, "run_all.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1), flush=True)


if __name__ == "__main__":
    main()
