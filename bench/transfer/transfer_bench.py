#!/usr/bin/env python3
"""Transfer benchmarks of spectrumkvd (docs/BENCHMARKS.md, "Daemon to daemon").

Part 1, goodput: two daemons over UCX on loopback move uncompressed payloads (budget 1.0) of
16, 64 and 256 MiB (--sizes; llama3-8b KV of 128, 512, 2048 tokens) and ucx_perftest moves
messages of the same sizes over the same UCX transport, in the same run; so does the daemons'
UCX transport alone (build/bin/transport_bench: same chunking, no codec or gRPC). Goodput =
logical KV bytes / the end-to-end time the client sees (Send call to both Send and Receive
returning); with --concurrency N also a stream of transfers, N in flight at any time (all bytes /
the wall time). With --lanes 1 4 the daemons run once per lane count (transport.ucx_lanes:
chunks over that many UCX connections), and ucx_perftest also runs as that many pairs at once,
the like-for-like peer of a daemon with several connections.

Part 2, shaped links: a network namespace of the benchmark's own, its loopback shaped with
`tc tbf` to 10 and 25 Gbit/s; both daemons and the client run inside it; the 4096-token
llama3-8b KV is delivered at b = 1.0, 0.5 and 0.3 and the ratio to the uncompressed time is
reported (everything included: scoring, packing, network, unpacking, RPCs).

Needs root (network namespaces), a built tree (build/bin) and ucx_perftest (ucx-utils).
Bounded: every run has a timeout. Usage: bench/transfer/transfer_bench.py [--quick] [--json F]
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "build", "bin")
NS = "skvbench"


def run(cmd, timeout, env=None, check=True):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def ns_prefix(ns):
    return ["ip", "netns", "exec", ns] if ns else []


def ucx_options(pairs):
    """NAME=VALUE strings as entries of a YAML flow mapping (transport.ucx_options)."""
    return [p.replace("=", ": ", 1) for p in pairs]


class Daemons:
    """A prefill and a decode daemon over UCX, optionally inside a network namespace."""

    def __init__(self, work, ns=None, tls="tcp", chunk="4MiB", workers=2, log_level="info",
                 lanes=4, score_threads=0, pack_slices=0, in_flight=2, ucx_options=(),
                 codec_options=()):
        self.work, self.ns, self.procs = work, ns, []
        env = dict(os.environ, UCX_ERROR_SIGNALS="", UCX_WARN_UNUSED_ENV_VARS="n")
        for name in ("prefill", "decode"):
            cfg = os.path.join(work, f"{name}.yaml")
            with open(cfg, "w") as f:
                f.write(f"""node_name: {name}
listen: {{unix_socket: {work}/{name}.sock}}
metrics: {{address: "127.0.0.1:0"}}
transport: {{kind: ucx, address: "127.0.0.1:0", ucx_tls: "{tls}", ucx_lanes: {lanes},
            ucx_chunks_in_flight: {in_flight}, ucx_options: {{{", ".join(ucx_options)}}}}}
limits: {{staging_bytes: 3GiB, max_inflight_bytes: 3GiB}}
codec: {{chunk_bytes: {chunk}, worker_threads: {workers}, score_threads: {score_threads},
        pack_slices: {pack_slices}{"".join(", " + o for o in codec_options)}}}
logging: {{level: {log_level}}}
""")
            log = open(os.path.join(work, f"{name}.log"), "w")
            self.procs.append(subprocess.Popen(
                ns_prefix(ns) + [os.path.join(BIN, "spectrumkvd"), "--config", cfg],
                stdout=log, stderr=log, env=env))
        for name in ("prefill", "decode"):
            for _ in range(200):
                p = run(ns_prefix(ns) + [os.path.join(BIN, "spectrumkv"), "health", "--daemon",
                                         f"unix:{work}/{name}.sock", "--timeout-s", "1"],
                        10, check=False)
                if p.returncode == 0:
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"{name} did not start")

    def frontend(self, args, timeout=600):
        cmd = ns_prefix(self.ns) + [
            os.path.join(BIN, "spectrumkv"), "fake-frontend", "--sender",
            f"unix:{self.work}/prefill.sock", "--receiver", f"unix:{self.work}/decode.sock",
            "--json"] + args
        return json.loads(run(cmd, timeout).stdout)

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            p.wait(timeout=60)


def perftest(size, iters, ns=None, tls="tcp", test="tag_bw", port=24777):
    env = dict(os.environ, UCX_TLS=tls, UCX_WARN_UNUSED_ENV_VARS="n")
    server = subprocess.Popen(ns_prefix(ns) + ["ucx_perftest", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    time.sleep(0.5)
    try:
        out = run(ns_prefix(ns) + ["ucx_perftest", "127.0.0.1", "-p", str(port), "-t", test,
                                   "-s", str(size), "-n", str(iters), "-w", "3"], 300,
                  env=env).stdout
    finally:
        server.wait(timeout=30)
    return perftest_bandwidth(out)


def perftest_bandwidth(out):
    final = [l for l in out.splitlines() if l.startswith("Final:")][-1].split()
    return float(final[6]) * 1048576  # "overall" bandwidth; ucx_perftest's MB is 2^20 bytes


def perftest_pairs(size, iters, pairs, tls="tcp", port=24800):
    """`pairs` ucx_perftest tag_bw pairs at once, each on its own port (connection): the sum of
    their bandwidths, the peer of a daemon whose transport uses that many connections."""
    env = dict(os.environ, UCX_TLS=tls, UCX_WARN_UNUSED_ENV_VARS="n")
    servers = [subprocess.Popen(["ucx_perftest", "-p", str(port + i)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env) for i in range(pairs)]
    time.sleep(0.5)
    clients = []
    try:
        clients = [subprocess.Popen(["ucx_perftest", "127.0.0.1", "-p", str(port + i), "-t",
                                     "tag_bw", "-s", str(size), "-n", str(iters), "-w", "3"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=env) for i in range(pairs)]
        outs = []
        for i, c in enumerate(clients):
            out, err = c.communicate(timeout=300)
            if c.returncode != 0 or "Final:" not in out:
                raise RuntimeError(f"ucx_perftest pair {i} (port {port + i}) exited "
                                   f"{c.returncode}:\n{out}\n{err}")
            outs.append(out)
    finally:
        for p in clients + servers:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
    return sum(perftest_bandwidth(o) for o in outs)


TOKEN_BYTES = 128 << 10  # FP16 KV of one llama3-8b token: 32 layers x 2 x 8 heads x 128 x 2 B


def goodput(args, pool_memory="host"):
    """Uncompressed transfers of each size, for each --lanes count: the daemons' goodput one
    transfer at a time (logical bytes / the end-to-end median) and, for each --concurrency N
    above 1, the goodput of a stream that keeps N transfers in flight (fake-frontend
    --streaming: N slots of --rounds transfers each, all bytes / the wall time); ucx_perftest of
    the same message size on the same transport in the same run (one pair, and as many pairs at
    once as the daemons have lanes); the daemons' UCX transport alone with the same lanes."""
    rows = []
    for lanes in args.lanes:
        block = []
        with tempfile.TemporaryDirectory(prefix="skv-bench-") as work:
            d = Daemons(work, tls=args.tls, chunk=args.chunk, workers=args.workers, lanes=lanes,
                        in_flight=args.in_flight, ucx_options=ucx_options(args.ucx_option),
                        codec_options=codec_options(args.codec_option))
            try:
                for mib in args.sizes:
                    block.append(goodput_row(args, d, mib, pool_memory, lanes))
                    print_goodput(block[-1:], args.tls, header=False, file=sys.stderr)
            finally:
                d.stop()
        # The daemons' UCX transport alone (bench/transport_bench.cc): same chunking, no codec.
        tool = os.path.join(BIN, "transport_bench")
        if os.path.exists(tool):
            out = json.loads(run([tool, "--sizes"] + [str(m) for m in args.sizes] +
                                 ["--chunk-bytes", str(parse_bytes(args.chunk)), "--tls",
                                  args.tls, "--lanes", str(lanes), "--rounds",
                                  str(max(5, args.rounds)), "--json"], 600).stdout)
            for row, t in zip(block, out["rows"]):
                row["transport_alone_Bps"] = {"cold": t["cold_Bps"], "hot": t["hot_Bps"],
                                              "stream": t["stream_Bps"]}
        rows += block
    return rows


def uncompressed_round(d, mib, pool_memory, concurrency, rounds, timeout_s=120):
    """fake-frontend's round of uncompressed llama3-8b KV of `mib` MiB through daemons `d`: one
    transfer at a time (concurrency 1), else a stream of `concurrency` in flight (--streaming);
    raises unless every transfer succeeded and was verified."""
    r = d.frontend(["--model", "llama3-8b", "--tokens", str((mib << 20) // TOKEN_BYTES),
                    "--budgets", "1.0", "--rounds", str(rounds), "--concurrency",
                    str(concurrency), "--pool-memory", pool_memory, "--timeout-s",
                    str(timeout_s)] + (["--streaming"] if concurrency > 1 else []))
    rnd = r["rounds"][0]
    if rnd["failed"] or not rnd["verified"]:
        raise RuntimeError(f"{pool_memory} pools, {mib} MiB x{concurrency}: {rnd['errors'][:3]}")
    return rnd


def goodput_row(args, d, mib, pool_memory, lanes):
    tokens = (mib << 20) // TOKEN_BYTES
    size = mib << 20
    row = {"size_mib": mib, "tokens": tokens, "pool_memory": pool_memory, "lanes": lanes,
           "concurrent": {}}
    for c in sorted(set([1] + args.concurrency)):
        rnd = uncompressed_round(d, mib, pool_memory, c, args.rounds)
        if c == 1:
            e2e = rnd["median_s"]["end_to_end"]
            logical = rnd["logical_bytes"] / rnd["ok"]
            row.update({"logical_bytes": logical, "wire_bytes": rnd["wire_bytes"] / rnd["ok"],
                        "daemon_e2e_s": e2e, "daemon_goodput_Bps": logical / e2e,
                        # The sending daemon's own clock (Send accepted -> done): without the
                        # frontend's two gRPC legs.
                        "send_total_s": rnd["median_s"]["send_total"],
                        "stages_s": rnd["median_s"]})
        else:
            row["concurrent"][str(c)] = {"goodput_Bps": rnd["goodput_Bps"],
                                         "batch_wall_s": rnd["batch_wall_s"]}
    iters = max(4, 2048 // mib)
    perf = {}
    for test in ("tag_bw", "ucp_am_bw"):
        perf[test] = statistics.median(
            [perftest(size, iters, tls=args.tls, test=test) for _ in range(3)])
    row["perftest_Bps"] = perf
    if lanes > 1:
        row["perftest_pairs_Bps"] = statistics.median(
            [perftest_pairs(size, iters, lanes, tls=args.tls) for _ in range(3)])
    return row


def parse_bytes(text):
    """"4MiB" -> 4194304 (the config's byte sizes: B, KiB, MiB, GiB or a plain number)."""
    for suffix, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[:-len(suffix)]) * scale)
    return int(text)


def print_goodput(rows, tls, header=True, file=None):
    """The rows as a table on `file` (stdout); header=False: the rows alone, flushed (progress)."""
    if header:
        print_goodput_header(tls, file)
    for r in rows:
        best = max(r["perftest_Bps"].values())
        pairs = r.get("perftest_pairs_Bps", best)
        conc = "  ".join("x%s: %.2f (%.0f%%, %.0f%%)" % (
            c, v["goodput_Bps"] / 1e9, 100 * v["goodput_Bps"] / best,
            100 * v["goodput_Bps"] / pairs) for c, v in r["concurrent"].items())
        alone = r.get("transport_alone_Bps", {})
        send_s = r.get("send_total_s", 0)
        on_send_clock = r["logical_bytes"] / send_s if send_s else 0
        print("%6s %5d %5d MiB %12.2f %9.2f/%-9.2f %12.2f %12.2f %12.2f %9.1f %5.0f%% %5.0f%% "
              "%8.2f %5.0f%%  %s" % (
                  r["pool_memory"], r.get("lanes", 1), r["size_mib"],
                  r["daemon_goodput_Bps"] / 1e9, alone.get("cold", 0) / 1e9,
                  alone.get("stream", 0) / 1e9, r["perftest_Bps"]["tag_bw"] / 1e9,
                  r["perftest_Bps"]["ucp_am_bw"] / 1e9, pairs / 1e9, r["daemon_e2e_s"] * 1e3,
                  100 * r["daemon_goodput_Bps"] / best, 100 * r["daemon_goodput_Bps"] / pairs,
                  send_s * 1e3, 100 * on_send_clock / best, conc), file=file, flush=True)


def print_goodput_header(tls, file=None):
    print("\nGoodput, uncompressed (budget 1.0), UCX_TLS=%s, medians; 'vs 1' is the share of the "
          "best ucx_perftest of one pair, 'vs N' of N tag_bw pairs at once (N = lanes); e2e: the "
          "frontend's Send call to both calls' return; Send ms: the sending daemon's own clock "
          "(Send accepted -> done, without the frontend's gRPC legs), 'vs 1' of it beside" % tls,
          file=file)
    print("%6s %5s %9s %12s %19s %12s %12s %12s %9s %6s %6s %8s %6s  %s" % (
        "pools", "lanes", "size", "daemon GB/s", "transport 1/stream", "tag_bw GB/s",
        "am_bw GB/s", "N pairs GB/s", "e2e ms", "vs 1", "vs N", "Send ms", "vs 1",
        "daemon streaming, K in flight: GB/s (vs 1, vs N)"), file=file)


def shape_namespace(rate):
    """(Re)creates the namespace NS with its lo up and shaped to `rate` by tc tbf."""
    run(["ip", "netns", "del", NS], 10, check=False)
    run(["ip", "netns", "add", NS], 10)
    try:
        run(["ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up"], 10)
        run(["ip", "netns", "exec", NS, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
             "rate", rate, "burst", "1mb", "latency", "10ms"], 10)
    except BaseException:
        run(["ip", "netns", "del", NS], 10, check=False)
        raise


def link_stats(ns):
    """What the shaped link in namespace `ns` has carried so far: packets the tbf shaper sent
    and dropped, and the TCP segments retransmitted in the namespace."""
    out = {}
    q = run(["ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", "lo"], 10,
            check=False).stdout
    m = re.search(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)", q)
    if m:
        out.update(shaper_bytes=int(m.group(1)), shaper_packets=int(m.group(2)),
                   shaper_dropped=int(m.group(3)), shaper_overlimits=int(m.group(4)))
    snmp = run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], 10, check=False).stdout
    tcp = [line.split() for line in snmp.splitlines() if line.startswith("Tcp:")]
    if len(tcp) == 2:
        fields = dict(zip(tcp[0][1:], tcp[1][1:]))
        out.update(tcp_out_segments=int(fields.get("OutSegs", 0)),
                   tcp_retransmitted=int(fields.get("RetransSegs", 0)))
    return out


def codec_options(pairs):
    """--codec-option NAME=VALUE entries as YAML flow-map entries."""
    out = []
    for p in pairs:
        name, _, value = p.partition("=")
        out.append(f"{name}: {value}")
    return out


def delivery(d, rounds, scoring, extra=(), quantizer="absmax"):
    """The 4096-token llama3-8b KV at b = 1.0, 0.5 and 0.3 through daemons `d`: a row per
    budget, with its end-to-end median and its ratio to the uncompressed (b = 1.0) one.
    (quantizer progressive: b = 0.3 as a progressive payload, the other two as absmax ones.)"""
    r = d.frontend(["--model", "llama3-8b", "--tokens", "4096", "--budgets", "1.0", "0.5", "0.3",
                    "--rounds", str(rounds), "--scoring", scoring, "--timeout-s", "120",
                    "--quantizer", quantizer] + list(extra))
    base = r["rounds"][0]["median_s"]["end_to_end"]
    rows = []
    for rnd in r["rounds"]:
        e2e = rnd["median_s"]["end_to_end"]
        ok = max(1, rnd["ok"])
        rows.append({"scoring": scoring, "quantizer": quantizer, "budget": rnd["budget"],
                     "ok": rnd["ok"],
                     "failed": rnd["failed"], "errors": rnd["errors"],
                     "wire_bytes": rnd["wire_bytes"] / ok,
                     "logical_bytes": rnd["logical_bytes"] / ok, "e2e_s": e2e,
                     "ratio_to_uncompressed": e2e / base, "stages_s": rnd["median_s"],
                     "verified": rnd["verified"]})
    return rows


def shaped(args):
    out = []
    for rate in args.rates:
        shape_namespace(rate)
        try:
            link = perftest(256 << 20, 6, ns=NS, tls=args.tls, test="tag_bw")
            with tempfile.TemporaryDirectory(prefix="skv-bench-") as work:
                d = Daemons(work, ns=NS, tls=args.tls, chunk=args.chunk, workers=args.workers,
                            lanes=args.lanes[0], score_threads=args.score_threads,
                            codec_options=codec_options(args.codec_option),
                            pack_slices=args.pack_slices, in_flight=args.in_flight,
                            ucx_options=ucx_options(args.ucx_option))
                try:
                    res = {"rate": rate, "perftest_256MiB_Bps": link, "budgets": []}
                    for scoring in args.scorings:
                        for q in args.quantizers:
                            res["budgets"] += delivery(d, args.rounds, scoring, quantizer=q)
                    out.append(res)
                finally:
                    d.stop()
        finally:
            run(["ip", "netns", "del", NS], 10, check=False)
    return out


def add_common_args(ap):
    """The options of the daemons and of goodput(), shared with gpu_transfer_bench.py."""
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tls", default="tcp")
    ap.add_argument("--chunk", default="4MiB", help="codec.chunk_bytes of both daemons")
    ap.add_argument("--workers", type=int, default=2, help="codec.worker_threads of both daemons")
    ap.add_argument("--score-threads", type=int, default=0,
                    help="codec.score_threads of both daemons (0: as many as --workers)")
    ap.add_argument("--pack-slices", type=int, default=0,
                    help="codec.pack_slices of both daemons (0: as many as --workers)")
    ap.add_argument("--sizes", type=int, nargs="*", default=[16, 64, 256], metavar="MIB",
                    help="goodput: payload sizes in MiB (llama3-8b KV, 8 tokens per MiB)")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[],
                    help="goodput: also measure a stream with this many transfers in flight")
    ap.add_argument("--lanes", type=int, nargs="+", default=[4],
                    help="transport.ucx_lanes of both daemons (the daemon's default: 4); goodput "
                         "runs once per value (shaped links and GPU deliveries use the first)")
    ap.add_argument("--in-flight", type=int, default=2,
                    help="transport.ucx_chunks_in_flight of both daemons (the daemon's default: 2)")
    ap.add_argument("--ucx-option", action="append", default=[], metavar="NAME=VALUE",
                    help="an entry of transport.ucx_options of both daemons, e.g. TCP_SNDBUF=4m")
    ap.add_argument("--codec-option", action="append", default=[], metavar="NAME=VALUE",
                    help="another codec setting of both daemons, e.g. "
                         "progressive_chunks_in_flight=6")
    ap.add_argument("--quantizers", nargs="+", default=["absmax"],
                    choices=["absmax", "kcn", "progressive"],
                    help="deliveries: run once per quantizer")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--rates", nargs="*", default=["10gbit", "25gbit"])
    ap.add_argument("--scorings", nargs="*", default=["key_norm", "external"])
    ap.add_argument("--skip-goodput", action="store_true")
    ap.add_argument("--skip-shaped", action="store_true")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if shutil.which("ucx_perftest") is None:
        sys.exit("ucx_perftest not found (Debian package ucx-utils)")
    result = {"tls": args.tls, "chunk": args.chunk, "workers": args.workers,
              "score_threads": args.score_threads, "pack_slices": args.pack_slices,
              "codec_options": args.codec_option,
              "rounds": args.rounds, "lanes": args.lanes,
              "cpus": os.cpu_count(), "kernel": os.uname().release}
    if not args.skip_goodput:
        result["goodput"] = goodput(args)
        print_goodput(result["goodput"], args.tls)
    if not args.skip_shaped:
        result["shaped"] = shaped(args)
        print("\nShaped loopback (tc tbf), llama3-8b 4096 tokens, medians")
        print("%8s %10s %11s %7s %10s %10s %9s" % ("link", "scoring", "quantizer", "budget",
                                                    "wire MB", "e2e ms", "ratio"))
        for s in result["shaped"]:
            for b in s["budgets"]:
                print("%8s %10s %11s %7.2f %10.1f %10.1f %9.3f" % (
                    s["rate"], b["scoring"], b["quantizer"], b["budget"], b["wire_bytes"] / 1e6,
                    b["e2e_s"] * 1e3, b["ratio_to_uncompressed"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
