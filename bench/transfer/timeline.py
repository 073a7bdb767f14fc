#!/usr/bin/env python3
"""Per-transfer timeline of two daemons, from their debug logs (docs/BENCHMARKS.md).

With `logging: {level: debug}` each daemon logs, per transfer id, when a Send was accepted, began
to run, offered its payload, finished its scoring pass (if it makes one), and finished, and when
the receiver accepted the offer, had its first chunk (the prelude), its first chunk of layers and
then every chunk, verified and unpacked every chunk, and finished. This prints the median gap
between consecutive events over all transfers found in both logs, and (with --run) the last
chunks' arrivals and unpacks against the last arrival, the last verification's start and length
and the wake-up of its slices, the layer chunks' arrival rate in thirds of the link phase, how
the sender packed and sealed its first layer chunk, and when it packed its last chunk.

  timeline.py PREFILL_LOG DECODE_LOG      read two daemons' debug logs
  timeline.py --run [--sizes MIB...] [--pool-memory host cuda] [--rounds N] [--lanes L]
              [--in-flight K] [--chunk C] [--workers W] [--score-threads S] [--bin DIR]
              [--delivery B] [--scoring S] [--rate R] [--ucx-option NAME=VALUE]
                                          start two daemons with debug logs (as transfer_bench.py
                                          does), move uncompressed llama3-8b KV one transfer at a
                                          time, and print the client's end to end beside the
                                          daemons' timeline and the offer's way through the lanes;
                                          with --delivery, the 4096-token llama3-8b KV at budget
                                          B instead (scored with S), and with --rate through a
                                          namespace's lo shaped to R (ip, tc; root), then
                                          what that link carried (shaper drops, TCP
                                          retransmissions)
"""
import argparse
import collections
import datetime
import os
import re
import shutil
import statistics
import sys
import tempfile

EVENT = re.compile(r"(\S+)Z D (send|receive) (\S+?)(?::| from \S+:) "
                   r"(accepted|running|offering|scored|done|offer of|first chunk|first layer|all)")
ORDER = ["send accepted", "send running", "send offering", "receive offer of", "send scored",
         "receive first chunk", "receive first layer", "receive all", "receive done", "send done"]
OPTIONAL = {"send scored"}  # only transfers that make a scoring pass


def parse(path):
    events = collections.defaultdict(dict)
    with open(path) as f:
        for line in f:
            m = EVENT.match(line)
            if m:
                t = datetime.datetime.fromisoformat(m.group(1)).timestamp()
                events[m.group(3)][m.group(2) + " " + m.group(4)] = t
    return events


def gaps_ms(prefill_log, decode_log):
    """{"A -> B": [ms, ...]} over the transfers found in both logs."""
    sender, receiver = parse(prefill_log), parse(decode_log)
    gaps = collections.defaultdict(list)
    for tid, e in sender.items():
        e = dict(e, **receiver.get(tid, {}))
        if not all(k in e for k in ORDER if k not in OPTIONAL):
            continue
        order = [k for k in ORDER if k in e]
        for a, b in zip(order, order[1:]):
            gaps[f"{a} -> {b}"].append((e[b] - e[a]) * 1e3)
        gaps["send accepted -> send done"].append((e["send done"] - e["send accepted"]) * 1e3)
    return gaps


LANE_SEND = re.compile(r"(\S+)Z D ucx0: send \d+ bytes to \S+ \(control\)")
LANE_RECV = re.compile(r"(\S+)Z D ucx0: control message \d+ from ")
OFFERING = re.compile(r"(\S+)Z D send \S+: offering ")
BOUND = re.compile(r"(\S+)Z D receive \S+ from \S+: offer of ")


def offer_legs_ms(prefill_log, decode_log):
    """The offer's way, from the lanes' debug lines: the worker hands it to lane 0 ("offering"),
    lane 0 sends it (from the worker's own thread when lane 0's thread sleeps, else lane 0's
    thread does), the receiver's lane 0 gets it, the receiver binds it.
    Lane lines carry no transfer id, so this pairs each offer with the next control message
    sent and received after it: meaningful for transfers run one at a time only."""
    def times(path, pattern):
        with open(path) as f:
            return [datetime.datetime.fromisoformat(m.group(1)).timestamp()
                    for m in map(pattern.match, f) if m]
    offering, sent = times(prefill_log, OFFERING), times(prefill_log, LANE_SEND)
    received, bound = times(decode_log, LANE_RECV), times(decode_log, BOUND)
    legs = collections.defaultdict(list)
    for t0 in offering:
        t1 = next((t for t in sent if t >= t0), None)
        # The sending thread logs after the send returns: the receiver may log first.
        t2 = next((t for t in received if t1 is not None and t >= t0), None)
        t3 = next((t for t in bound if t2 is not None and t >= t2), None)
        if t3 is None:
            continue
        legs["offer: handed to lane 0 -> sent by it"].append((t1 - t0) * 1e3)
        legs["offer: sent -> the receiver's lane 0 has it"].append((t2 - t1) * 1e3)
        legs["offer: received -> bound"].append((t3 - t2) * 1e3)
    return legs


PACKED = re.compile(r"(\S+)Z D send (\S+): chunk (\d+) packed \(its last slice began "
                    r"([\d.]+) ms after packing began, the slices ended at ([\d.]+) ms, "
                    r"sealed at ([\d.]+) ms\)")
PACKING = re.compile(r"(\S+)Z D send (\S+): packing$")


def packing_ms(prefill_log, decode_log):
    """After the sender's scoring pass: when it began packing (its staging allocated and the
    prelude sent), how its first layer chunk was packed and when the receiver began to take it,
    and when the last chunk was packed (how long packing keeps the workers busy beside the
    lanes)."""
    scored = {tid: e["send scored"] for tid, e in parse(prefill_log).items()
              if "send scored" in e}
    first_layer = {tid: e["receive first layer"] for tid, e in parse(decode_log).items()
                   if "receive first layer" in e}
    began, first, last = {}, {}, {}
    with open(prefill_log) as f:
        for line in f:
            m = PACKING.match(line.rstrip("\n"))
            if m:
                began[m.group(2)] = datetime.datetime.fromisoformat(m.group(1)).timestamp()
            m = PACKED.match(line)
            if m:
                t = datetime.datetime.fromisoformat(m.group(1)).timestamp()
                last[m.group(2)] = max(t, last.get(m.group(2), t))
                if m.group(3) == "1":
                    first[m.group(2)] = (t, *map(float, m.group(4, 5, 6)))
    rows = collections.defaultdict(list)
    for tid, t0 in scored.items():
        if tid in began:
            rows["pack: packing began (vs send scored)"].append((began[tid] - t0) * 1e3)
        if tid in first:
            t, last_slice, slices_done, sealed = first[tid]
            rows["pack: first layer chunk packed (vs scored)"].append((t - t0) * 1e3)
            rows["pack: its last slice began (vs packing)"].append(last_slice)
            rows["pack: its slices ended (vs packing)"].append(slices_done)
            rows["pack: it was sealed (vs packing)"].append(sealed)
            if tid in first_layer:
                rows["pack: it packed -> receiver began taking it"].append(
                    (first_layer[tid] - t) * 1e3)
        if tid in last:
            rows["pack: last chunk packed (vs send scored)"].append((last[tid] - t0) * 1e3)
    return rows


CHUNK_IN = re.compile(r"(\S+)Z D receive (\S+): chunk \d+ in")
UNPACKED = re.compile(r"(\S+)Z D receive (\S+): layers \d+ to \d+ unpacked")
VERIFIED = re.compile(r"(\S+)Z D receive (\S+): layers \d+ to \d+ verified in ([\d.]+) ms")
SLICES = re.compile(r"(\S+)Z D receive (\S+): layers \d+ to \d+ in \d+ slices: the last began "
                    r"([\d.]+) ms after the verification, the longest ran ([\d.]+) ms")


def tail_ms(decode_log, last=4):
    """The receiver's last `last` chunk arrivals and chunk unpacks, ms before (-) or after its
    last chunk arrived, medians over the transfers, latest first (#1): how much work the drain
    finds waiting. For the chunk verified last (host pools cut in slices): when its verification
    began, how long it took, how late its last slice began and how long its longest ran."""
    per = collections.defaultdict(lambda: {"in": [], "unpacked": [], "verified": [], "slices": []})
    with open(decode_log) as f:
        for line in f:
            for kind, pattern in (("in", CHUNK_IN), ("unpacked", UNPACKED),
                                  ("verified", VERIFIED), ("slices", SLICES)):
                m = pattern.match(line)
                if m:
                    t = datetime.datetime.fromisoformat(m.group(1)).timestamp()
                    per[m.group(2)][kind].append((t, *map(float, m.groups()[2:])))
    rows = collections.defaultdict(list)
    for e in per.values():
        if not e["in"]:
            continue
        end = max(e["in"])[0]
        # Arrivals of the layer chunks (the prelude, first in, left out) in thirds: the time
        # between the last arrival before a third and its last arrival, per chunk in it. Equal
        # chunks at the link's rate give equal thirds.
        arrivals = sorted(t for t, in e["in"])
        n = len(arrivals) - 1
        if n >= 3:
            ends = [arrivals[0]] + [arrivals[round(n * k / 3)] for k in (1, 2, 3)]
            counts = [round(n * k / 3) - round(n * (k - 1) / 3) for k in (1, 2, 3)]
            for label, a, b, c in zip(("first", "middle", "last"), ends, ends[1:], counts):
                rows[f"link: ms per chunk in, {label} third"].append((b - a) * 1e3 / c)
        for kind in ("in", "unpacked"):
            for rank, (t,) in enumerate(sorted(e[kind], reverse=True)[:last]):
                label = "arrived" if kind == "in" else "unpacked"
                rows[f"tail: {label} #{rank + 1} (vs the last chunk in)"].append((t - end) * 1e3)
        if e["verified"] and e["slices"]:
            t, verify_ms = max(e["verified"])
            _, last_start_ms, longest_ms = max(e["slices"])
            rows["tail: last verify began (vs the last chunk in)"].append(
                (t - end) * 1e3 - verify_ms)
            rows["tail: last verify took"].append(verify_ms)
            rows["tail: its last slice began after it"].append(last_start_ms)
            rows["tail: its longest slice ran"].append(longest_ms)
    return rows


def print_gaps(gaps):
    for k, v in gaps.items():
        print("%-46s median %8.3f ms  (n=%d, min %.3f)" % (k, statistics.median(v), len(v), min(v)),
              flush=True)


def run(args):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import transfer_bench as tb
    if args.bin:
        tb.BIN = args.bin
    ns = None
    if args.rate:
        tb.shape_namespace(args.rate)
        ns = tb.NS
    try:
        for memory in args.pool_memory:
            for mib in ([0] if args.delivery else args.sizes):
                one(args, tb, ns, memory, mib)
                if ns:
                    st = tb.link_stats(ns)
                    print(f"link so far: the shaper sent {st.get('shaper_packets', '?')} packets "
                          f"({st.get('shaper_bytes', 0) / 1e6:.1f} MB), dropped "
                          f"{st.get('shaper_dropped', '?')}; TCP sent "
                          f"{st.get('tcp_out_segments', '?')} segments, retransmitted "
                          f"{st.get('tcp_retransmitted', '?')}", flush=True)
    finally:
        if ns:
            tb.run(["ip", "netns", "del", ns], 10, check=False)


def one(args, tb, ns, memory, mib):
    with tempfile.TemporaryDirectory(prefix="skv-timeline-") as work:
        d = tb.Daemons(work, ns=ns, chunk=args.chunk, workers=args.workers,
                       log_level="debug", lanes=args.lanes,
                       score_threads=args.score_threads, in_flight=args.in_flight,
                       ucx_options=tb.ucx_options(args.ucx_option),
                       codec_options=tb.codec_options(args.codec_option))
        try:
            if args.delivery:
                r = d.frontend(["--model", "llama3-8b", "--tokens", "4096", "--budgets",
                                str(args.delivery), "--rounds", str(args.rounds),
                                "--scoring", args.scoring, "--pool-memory", memory,
                                "--quantizer", args.quantizer, "--timeout-s", "120"])
                rnd = r["rounds"][0]
                if rnd["failed"] or not rnd["verified"]:
                    raise RuntimeError(f"delivery failed: {rnd['errors'][:3]}")
            else:
                rnd = tb.uncompressed_round(d, mib, memory, 1, args.rounds, timeout_s=60)
        finally:
            d.stop()
        med = rnd["median_s"]
        e2e = med["end_to_end"]
        if args.delivery:
            what = (f"4096-token llama3-8b at b = {args.delivery} ({args.scoring}, "
                    f"{rnd['wire_bytes'] / rnd['ok'] / 1e6:.1f} MB on the wire)")
        else:
            what = f"{mib} MiB"
        print(f"\n{memory} pools, {what}, link {args.rate or 'loopback'}, {args.lanes} "
              f"lanes x {args.in_flight} in flight, chunk {args.chunk}, {args.workers} workers: "
              f"client end to end {e2e * 1e3:.3f} ms "
              f"({rnd['logical_bytes'] / rnd['ok'] / e2e / 1e9:.2f} GB/s logical), medians of "
              f"{rnd['ok']}; stages (ms): score {med['score'] * 1e3:.3f}, pack "
              f"{med['pack'] * 1e3:.3f}, network {med['network'] * 1e3:.3f}, unpack "
              f"{med['unpack'] * 1e3:.3f}", flush=True)
        if args.keep_logs:
            os.makedirs(args.keep_logs, exist_ok=True)
            for name in ("prefill.log", "decode.log"):
                shutil.copy(os.path.join(work, name), os.path.join(
                    args.keep_logs, f"{memory}-{args.delivery or mib}-{name}"))
        gaps = gaps_ms(os.path.join(work, "prefill.log"), os.path.join(work, "decode.log"))
        if not gaps:
            sys.exit("no transfer found in both daemons' logs")
        print_gaps(gaps)
        print_gaps(offer_legs_ms(os.path.join(work, "prefill.log"),
                                 os.path.join(work, "decode.log")))
        print_gaps(tail_ms(os.path.join(work, "decode.log")))
        print_gaps(packing_ms(os.path.join(work, "prefill.log"), os.path.join(work, "decode.log")))


def main():
    if len(sys.argv) == 3 and not sys.argv[1].startswith("-"):
        gaps = gaps_ms(sys.argv[1], sys.argv[2])
        if not gaps:
            sys.exit("no transfer found in both logs (are they debug logs of a sender and a "
                     "receiver?)")
        print_gaps(gaps)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 usage="timeline.py PREFILL_LOG DECODE_LOG | timeline.py --run ...")
    ap.add_argument("--run", action="store_true", required=True,
                    help="start two daemons and time transfers (else: give two log files)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[16], metavar="MIB")
    ap.add_argument("--pool-memory", nargs="+", default=["host"], choices=["host", "cuda"])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--lanes", type=int, default=4)
    ap.add_argument("--in-flight", type=int, default=2,
                    help="transport.ucx_chunks_in_flight of both daemons")
    ap.add_argument("--ucx-option", action="append", default=[], metavar="NAME=VALUE",
                    help="an entry of transport.ucx_options of both daemons, e.g. TCP_SNDBUF=4m")
    ap.add_argument("--codec-option", action="append", default=[], metavar="NAME=VALUE",
                    help="another codec setting of both daemons")
    ap.add_argument("--keep-logs", default="", metavar="DIR",
                    help="copy both daemons' debug logs into DIR")
    ap.add_argument("--chunk", default="4MiB", help="codec.chunk_bytes of both daemons")
    ap.add_argument("--workers", type=int, default=8, help="codec.worker_threads of both daemons")
    ap.add_argument("--score-threads", type=int, default=0,
                    help="codec.score_threads of both daemons (0: as many as --workers)")
    ap.add_argument("--bin", default="", help="folder with spectrumkvd and spectrumkv "
                                              "(default: build/bin)")
    ap.add_argument("--delivery", type=float, default=0, metavar="B",
                    help="the 4096-token llama3-8b KV at budget B instead of --sizes")
    ap.add_argument("--scoring", default="key_norm", help="with --delivery")
    ap.add_argument("--quantizer", default="absmax", choices=["absmax", "kcn", "progressive"],
                    help="with --delivery")
    ap.add_argument("--rate", default="", help="shape the link (a namespace's lo) to this rate")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
