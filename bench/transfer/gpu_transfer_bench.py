#!/usr/bin/env python3
"""Two-daemon benchmark on a GPU machine (docs/BENCHMARKS.md, "Daemon to daemon on a GPU node").

Two spectrumkvd processes over UCX on one host move the 4096-token llama3-8b KV (536.9 MB FP16,
vLLM NHD blocks of 16 -> vLLM HND blocks of 32) at b = 1.0, 0.5 and 0.3, with the frontend's
pools in GPU memory (CUDA IPC handles; the daemons import them, score and pack with the CUDA
codec, stage through pinned host memory) and, in the same run, in shared host memory (CPU
codec). Each configuration runs over loopback and, where the machine allows network namespaces
and tc, over loopback shaped to 10 and 25 Gbit/s; ucx_perftest tag_bw of a 512 MiB message
over the same transport gives the raw-UCX reference of each link. Everything the client sees is
timed (Send call to both Send and Receive returning); every row that arrives is verified.

Needs a built tree (build/bin or --bin), ucx_perftest, and a CUDA device for the GPU pools.
Bounded: every run has a timeout. Usage: gpu_transfer_bench.py [--rounds N] [--json F]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import transfer_bench as tb


def shape_namespace(rate):
    """The shaped namespace's name; None where the machine does not allow `ip netns`."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        print(f"shaped link {rate} not available here: no ip or tc", file=sys.stderr)
        return None
    try:
        tb.shape_namespace(rate)
        return tb.NS
    except (RuntimeError, OSError) as e:
        print(f"ip netns for {rate} not available here: {str(e).splitlines()[0]}", file=sys.stderr)
        return None


def shape_own_lo(rate):
    """Inside a network namespace of this process's own (unshare -n): lo up, shaped to `rate`."""
    tb.run(["ip", "link", "set", "lo", "up"], 10)
    tb.run(["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", "1mb",
            "latency", "10ms"], 10)


def link_in_unshared_namespace(rate):
    """Where `ip netns` is refused but unshare(1) works: this script again, for the one link,
    in a network namespace of its own (everything it starts shares that namespace)."""
    if shutil.which("unshare") is None:
        return None
    with tempfile.TemporaryDirectory(prefix="skv-gpubench-ns-") as work:
        out = os.path.join(work, "link.json")
        # The same arguments, then this link only, no goodput part, results to `out` (argparse
        # keeps the last value of an option given twice).
        cmd = (["unshare", "-n", sys.executable, os.path.abspath(__file__)] + sys.argv[1:] +
               ["--in-namespace", "--rates", rate, "--goodput", "--json", out])
        p = subprocess.run(cmd, text=True, timeout=1800)
        if p.returncode != 0 or not os.path.exists(out):
            print(f"shaped link {rate} in an unshared namespace failed (exit {p.returncode})",
                  file=sys.stderr)
            return None
        with open(out) as f:
            links = json.load(f)["links"]
        return links[0] if links else None


def one_link(args, rate):
    ns = None
    if rate and args.in_namespace:
        shape_own_lo(rate)
    elif rate:
        ns = shape_namespace(rate)
        if ns is None:
            return link_in_unshared_namespace(rate)
    try:
        link = tb.perftest(512 << 20, 6, ns=ns, tls=args.tls, test="tag_bw")
        res = {"link": rate or "loopback", "perftest_512MiB_Bps": link, "runs": []}
        with tempfile.TemporaryDirectory(prefix="skv-gpubench-") as work:
            d = tb.Daemons(work, ns=ns, tls=args.tls, chunk=args.chunk, workers=args.workers,
                           lanes=args.lanes[0], score_threads=args.score_threads,
                           pack_slices=args.pack_slices, in_flight=args.in_flight,
                           codec_options=tb.codec_options(args.codec_option),
                           ucx_options=tb.ucx_options(args.ucx_option))
            try:
                for memory in args.pool_memory:
                    for scoring in args.scorings:
                        for q in args.quantizers:
                            if q == "progressive" and memory == "cuda":
                                continue  # the CUDA codec has no progressive kernels
                            for row in tb.delivery(d, args.rounds, scoring,
                                                   ["--pool-memory", memory], quantizer=q):
                                res["runs"].append(dict(row, pool_memory=memory))
            finally:
                d.stop()
        return res
    finally:
        if ns:
            tb.run(["ip", "netns", "del", tb.NS], 10, check=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tb.add_common_args(ap)
    ap.add_argument("--goodput", nargs="*", default=[], metavar="POOLS",
                    help="also measure uncompressed goodput against ucx_perftest (sizes: "
                         "--sizes) with these pools (cuda, host)")
    ap.add_argument("--rates", nargs="*", default=["", "10gbit", "25gbit"],
                    help="'' is plain loopback")
    ap.add_argument("--pool-memory", nargs="*", default=["cuda", "host"])
    ap.add_argument("--scorings", nargs="*", default=["key_norm"])
    ap.add_argument("--bin", default=tb.BIN, help="folder with spectrumkvd and spectrumkv")
    ap.add_argument("--json", default="")
    ap.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    tb.BIN = args.bin
    if shutil.which("ucx_perftest") is None:
        sys.exit("ucx_perftest not found (Debian package ucx-utils)")
    result = {"tls": args.tls, "chunk": args.chunk, "workers": args.workers,
              "score_threads": args.score_threads, "pack_slices": args.pack_slices,
              "codec_options": args.codec_option,
              "rounds": args.rounds, "lanes": args.lanes, "cpus": os.cpu_count(),
              "kernel": os.uname().release, "links": [], "goodput": []}
    for memory in args.goodput:
        result["goodput"] += tb.goodput(args, memory)
    if result["goodput"]:
        tb.print_goodput(result["goodput"], args.tls)
    for rate in args.rates:
        res = one_link(args, rate)
        if res is not None:
            result["links"].append(res)
    print("\nllama3-8b, 4096 tokens, UCX_TLS=%s, medians of %d" % (args.tls, args.rounds))
    print("%9s %6s %9s %11s %6s %9s %9s %7s %7s %7s %7s %7s %7s %5s" % (
        "link", "pools", "scoring", "quantizer", "b", "wire MB", "e2e ms", "ratio", "score",
        "pack", "stage", "net", "unpack", "ok"))
    for link in result["links"]:
        print("  %s: ucx_perftest tag_bw 512 MiB %.2f GB/s" % (
            link["link"], link["perftest_512MiB_Bps"] / 1e9))
        for x in link["runs"]:
            s = x["stages_s"]
            print("%9s %6s %9s %11s %6.2f %9.1f %9.1f %7.3f %7.2f %7.2f %7.2f %7.2f %7.2f %5s" % (
                link["link"], x["pool_memory"], x["scoring"], x["quantizer"], x["budget"],
                x["wire_bytes"] / 1e6,
                x["e2e_s"] * 1e3, x["ratio_to_uncompressed"], s["score"] * 1e3, s["pack"] * 1e3,
                s["stage_copy"] * 1e3, s["network"] * 1e3, s["unpack"] * 1e3,
                "yes" if x["verified"] and not x["failed"] else "NO"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
