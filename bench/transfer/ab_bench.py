#!/usr/bin/env python3
"""Alternating A/B of two daemon builds: uncompressed goodput one transfer at a time and streamed.

Two builds (folders with spectrumkvd; the client, spectrumkv, is taken from --bin-b, so only the
daemons differ; or one build twice with --pack-slices-a/-b, --in-flight-a/-b or --ucx-option-b
differing) run in turn, --reps times each (A, B, A, B, ...), each time as a fresh pair of daemons
(--lanes, --workers, --chunk) that moves uncompressed llama3-8b KV of every --sizes, with every
--pool-memory: one transfer at a time (logical bytes / the client's end-to-end median of
--rounds) and, for every --concurrency N above 1, a stream of N in flight (fake-frontend
--streaming, N slots x --rounds transfers; all bytes / wall time). Every transfer's arrival is
verified. Prints each measurement per build and rep, and the ratio of the medians B / A.
Machines are noisy: alternating builds in one run is how docs/BENCHMARKS.md compares them.

Usage: ab_bench.py --bin-a OLD/bin --bin-b NEW/bin [--reps 3] [--sizes 16 64]
       [--pool-memory host cuda] [--concurrency 1 8] [--pack-slices-a 1 --pack-slices-b 0]
       [--in-flight-a 1 --in-flight-b 2] [--ucx-option-b TCP_TX_SEG_SIZE=64k]
"""
import argparse
import collections
import os
import statistics
import sys
import tempfile

import transfer_bench as tb


def measure(d, memory, mib, c, rounds):
    rnd = tb.uncompressed_round(d, mib, memory, c, rounds)
    return (mib << 20) / rnd["median_s"]["end_to_end"] if c == 1 else rnd["goodput_Bps"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin-a", required=True, help="folder with the A build's spectrumkvd")
    ap.add_argument("--bin-b", required=True, help="folder with the B build's spectrumkvd and "
                                                    "the spectrumkv both use")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 64], metavar="MIB")
    ap.add_argument("--pool-memory", nargs="+", default=["host"], choices=["host", "cuda"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=10,
                    help="transfers one at a time; a stream runs N slots x rounds/2")
    ap.add_argument("--lanes", type=int, default=4)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--chunk", default="4MiB")
    ap.add_argument("--pack-slices-a", type=int, default=0, help="codec.pack_slices of A's daemons")
    ap.add_argument("--pack-slices-b", type=int, default=0, help="codec.pack_slices of B's daemons")
    ap.add_argument("--in-flight-a", type=int, default=2,
                    help="transport.ucx_chunks_in_flight of A's daemons")
    ap.add_argument("--in-flight-b", type=int, default=2,
                    help="transport.ucx_chunks_in_flight of B's daemons")
    ap.add_argument("--ucx-option-b", action="append", default=[], metavar="NAME=VALUE",
                    help="an entry of transport.ucx_options of B's daemons only")
    args = ap.parse_args()
    client = os.path.join(args.bin_b, "spectrumkv")
    for b in (args.bin_a, args.bin_b):
        if not os.path.exists(os.path.join(b, "spectrumkvd")):
            sys.exit(f"no spectrumkvd in {b}")
    res = collections.defaultdict(list)
    for rep in range(args.reps):
        for name, folder, slices, in_flight, options in (
                ("A", args.bin_a, args.pack_slices_a, args.in_flight_a, []),
                ("B", args.bin_b, args.pack_slices_b, args.in_flight_b, args.ucx_option_b)):
            with tempfile.TemporaryDirectory(prefix="skv-ab-") as work:
                # Daemons of this build, the one client: a folder of links to both.
                bins = os.path.join(work, "bin")
                os.mkdir(bins)
                os.symlink(os.path.abspath(os.path.join(folder, "spectrumkvd")),
                           os.path.join(bins, "spectrumkvd"))
                os.symlink(os.path.abspath(client), os.path.join(bins, "spectrumkv"))
                tb.BIN = bins
                d = tb.Daemons(work, chunk=args.chunk, workers=args.workers, lanes=args.lanes,
                               pack_slices=slices, in_flight=in_flight,
                               ucx_options=tb.ucx_options(options))
                try:
                    for memory in args.pool_memory:
                        for mib in args.sizes:
                            for c in args.concurrency:
                                gp = measure(d, memory, mib, c,
                                             args.rounds if c == 1 else max(1, args.rounds // 2))
                                res[(memory, mib, c, name)].append(gp / 1e9)
                                print(f"rep {rep} {name}: {memory} {mib} MiB x{c} "
                                      f"{gp / 1e9:.2f} GB/s", file=sys.stderr, flush=True)
                finally:
                    d.stop()
    print("%6s %8s %4s  %-24s %-24s %s" % ("pools", "size", "in", "A GB/s", "B GB/s",
                                           "median B/A"))
    for memory in args.pool_memory:
        for mib in args.sizes:
            for c in args.concurrency:
                a, b = res[(memory, mib, c, "A")], res[(memory, mib, c, "B")]
                print("%6s %4d MiB %4s  %-24s %-24s %.2f" % (
                    memory, mib, f"x{c}", " ".join("%.2f" % x for x in a),
                    " ".join("%.2f" % x for x in b), statistics.median(b) / statistics.median(a)))


if __name__ == "__main__":
    main()
