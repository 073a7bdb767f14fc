#!/usr/bin/env python3
"""Per-transfer timeline of two daemons, from their debug logs (docs/BENCHMARKS.md).

With `logging: {level: debug}` each daemon logs, per transfer id, when a Send was accepted, began
to run, offered its payload, and finished, and when the receiver accepted the offer, had every
chunk, and finished. This prints the median gap between consecutive events over all transfers
found in both logs.
"""
import collections
import datetime
import re
import statistics
import sys

EVENT = re.compile(r"(\S+)Z D (send|receive) (\S+?)(?::| from \S+:) "
                   r"(accepted|running|offering|done|offer of|all)")
ORDER = ["send accepted", "send running", "send offering", "receive offer of", "receive all",
         "receive done", "send done"]


def parse(path):
    events = collections.defaultdict(dict)
    with open(path) as f:
        for line in f:
            m = EVENT.match(line)
            if m:
                t = datetime.datetime.fromisoformat(m.group(1)).timestamp()
                events[m.group(3)][m.group(2) + " " + m.group(4)] = t
    return events


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: timeline.py PREFILL_LOG DECODE_LOG")
    sender, receiver = parse(sys.argv[1]), parse(sys.argv[2])
    gaps = collections.defaultdict(list)
    for tid, e in sender.items():
        e = dict(e, **receiver.get(tid, {}))
        if not all(k in e for k in ORDER):
            continue
        for a, b in zip(ORDER, ORDER[1:]):
            gaps[f"{a} -> {b}"].append((e[b] - e[a]) * 1e3)
        gaps["send accepted -> send done"].append((e["send done"] - e["send accepted"]) * 1e3)
    if not gaps:
        sys.exit("no transfer found in both logs (are they debug logs of a sender and a receiver?)")
    for k, v in gaps.items():
        print("%-40s median %8.3f ms  (n=%d, min %.3f)" % (k, statistics.median(v), len(v), min(v)))


if __name__ == "__main__":
    main()
