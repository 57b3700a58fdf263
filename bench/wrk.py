"""Section `wrk`: web-ipt-d under wrk (16 keep-alive TLS connections, C clients that cost the server's cores little):
blocks/s and unblocks/s of fresh addresses with N entries in place, latency, server CPU a request, and /health.
Run as root (bench/README.md); each daemon runs in a private network namespace made and removed here.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from common import (
    BENCH, CHAIN, HOST, POOLS, PORT, USER, int_list, loadavg, machine_info, proc_cpu_seconds, proc_sys_seconds,
)

from targets import BenchPki, Server, WebiptdTarget, catalog, make_bench_pki
from tests.harness import proc_status_kib
from tests.netns import NetNS

SCRIPTS = BENCH / "wrk"
# The block.lua pools: index i is 198.18.0.0 + i (RFC 2544, 131,072 addresses) or 2001:db8:b:: + i (RFC 3849).
WRK_POOLS = {"ipv4": POOLS["ipv4"], "ipv6": ipaddress.ip_network("2001:db8:b::/48")}


@dataclass
class WrkResult:
    target: str
    existing: int
    op: str  # block, unblock, health
    connections: int
    requests: int  # wrk's count, /health fill-ins included
    answered: int  # the pass's own requests answered (block.lua's count; /health: 200s)
    ok: int  # block: 201; unblock: 200 with "deleted":true; health: 200
    other: int  # any other status (block: 200 existing counts here too)
    errors: dict[str, int]
    seconds: float
    per_s: float  # answered / seconds
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_ms: float  # the daemon's CPU (every thread) per request wrk counted
    server_sys_ms: float = math.nan  # its kernel part
    switches: float = math.nan  # the daemon's threads' context switches (voluntary and not) per request
    batch: float = math.nan  # commands in one of the worker's batches, on average over the pass
    kernel_after: int = -1
    kernel_expected: int = -1
    sent: list[int] = field(default_factory=list)  # per wrk thread: addresses sent (in flight at a cut included)


def wrk_command(connections: int, threads: int, seconds: float, script: str, url: str, authorization: str | None,
                script_args: Sequence[str] = ()) -> list[str]:
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s", "--timeout", "30s",
            "--latency", "-s", str(SCRIPTS / script)]
    if authorization is not None:
        argv += ["-H", f"Authorization: {authorization}"]
    return [*argv, url, "--", *script_args]


def context_switches(pid: int) -> dict[int, int]:
    """Each thread's context switches so far, voluntary (it waited: a lock, the GIL, a socket) and not (proc(5))."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text(encoding="ascii")
        except OSError:
            continue  # the thread ended
        out[int(task.name)] = sum(int(line.split()[1]) for line in text.splitlines()
                                  if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")))
    return out


def run_wrk(ns: NetNS, pid: int, argv: list[str], seconds: float
            ) -> tuple[dict[str, Any], float, float, tuple[float, int]]:
    """wrk in the namespace: its JSON line, the wall seconds and the daemon's CPU seconds over the run, and its
    system seconds and context switches (each thread's, read every 0.2 s: a connection thread that ends when wrk
    closes its connection keeps its last reading)."""
    switches0 = context_switches(pid)
    seen = dict(switches0)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            seen.update(context_switches(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu0, sys0, t0 = proc_cpu_seconds(pid), proc_sys_seconds(pid), time.monotonic()
    try:
        done = ns.run(argv, timeout=seconds + 120, check=False)
    finally:
        stop.set()
        sampler.join()
    wall, cpu = time.monotonic() - t0, proc_cpu_seconds(pid) - cpu0
    kernel = proc_sys_seconds(pid) - sys0
    seen.update(context_switches(pid))
    switches = sum(n - switches0.get(tid, 0) for tid, n in seen.items())
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK-JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-2000:]} {done.stderr[-2000:]}")
    if done.stderr.strip():
        print("  " + done.stderr.strip().replace("\n", "\n  "), file=sys.stderr)
    return json.loads(line.removeprefix("WRK-JSON ")), wall, cpu, (kernel, switches)


def result(target: str, existing: int, op: str, connections: int, got: dict[str, Any], cpu: float,
           extra: tuple[float, int] = (math.nan, 0)) -> WrkResult:
    threads = got["threads"]
    answered = sum(t["answered"] for t in threads)
    ok = sum(t.get("created", 0) + t.get("deleted", 0) for t in threads) if op != "health" else answered
    other = sum(t.get("other", 0) + t.get("existed", 0) for t in threads)
    if op == "health":
        seconds = got["duration_us"] / 1e6
    else:  # from the first request a thread sent to the last answer any thread got
        seconds = (max(t["last_us"] for t in threads) - min(t["first_us"] for t in threads)) / 1e6
    return WrkResult(target, existing, op, connections, got["requests"], answered, ok, other, got["errors"], seconds,
                     answered / seconds if seconds else math.nan, got["p50_us"] / 1000, got["p99_us"] / 1000,
                     got["max_us"] / 1000, cpu / got["requests"] * 1000 if got["requests"] else math.nan,
                     extra[0] / got["requests"] * 1000 if got["requests"] else math.nan,
                     extra[1] / got["requests"] if got["requests"] else math.nan,
                     sent=[t["sent"] for t in threads if "sent" in t])


def batch_totals(ns: NetNS, pki: BenchPki) -> tuple[float, float]:
    """The worker's batches so far and the commands in them: webiptd_batch_size_commands' count and sum."""
    conn = ns.https_connection(HOST, PORT, pki.certs.client_context(), timeout=30)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": pki.authorization})
        reply = conn.getresponse()
        text = reply.read().decode()
    finally:
        conn.close()
    found = dict(line.split(" ", 1) for line in text.splitlines() if line.startswith("webiptd_batch_size_commands_"))
    return float(found.get("webiptd_batch_size_commands_count", "nan")), float(
        found.get("webiptd_batch_size_commands_sum", "nan"))


def wrk_passes(ns: NetNS, server: Server, target: str, existing: int, family: str, start: int, count: int,
               args: argparse.Namespace, count_kernel: Any = None,
               batches: Callable[[], tuple[float, float]] | None = None) -> list[WrkResult]:
    """Block `count` fresh addresses of WRK_POOLS[family] from index `start` (wrk, bounded by --seconds), unblock
    every address sent, then /health; the kernel's count after each of the first two (`count_kernel`, optional), and
    the worker's mean batch in each of them (`batches`, batch_totals() of the daemon, optional)."""
    url = f"https://{HOST}:{PORT}/"
    threads = args.threads
    quotas = [count // threads + (1 if t < count % threads else 0) for t in range(threads)]
    out: list[WrkResult] = []
    profiler = None
    if args.profile is not None and existing == max(args.sizes):
        profiler = spy(server.pid, args.profile / f"{target}-{existing}-block", args.seconds)
    elif args.perf is not None and existing == max(args.sizes):
        profiler = Perf(server.pid, args.perf / f"{target}-{existing}-block", args.seconds)
    before = batches() if batches is not None else None
    try:
        got, wall, cpu, extra = run_wrk(ns, server.pid, wrk_command(
            args.connections, threads, args.seconds, "block.lua", url, server.authorization,
            ["PUT", CHAIN, family, str(start), ",".join(map(str, quotas))]), args.seconds)
    finally:
        if profiler is not None:
            profiler.stop()
    block = result(target, existing, "block", args.connections, got, cpu, extra)
    if batches is not None and before is not None:
        after = batches()
        block.batch, before = mean_batch(before, after), after

    out.append(block)
    if count_kernel is not None:
        block.kernel_after, block.kernel_expected = count_kernel(), existing + block.ok
    # The unblock pass deletes every address a thread sent, answered or still in flight when wrk stopped; its
    # bound is twice the block pass's, so that it normally finishes and the kernel is back at N.
    got, wall, cpu, extra = run_wrk(ns, server.pid, wrk_command(
        args.connections, threads, 2 * args.seconds, "block.lua", url, server.authorization,
        ["DELETE", CHAIN, family, str(start), ",".join(map(str, block.sent))]), args.seconds)
    unblock = result(target, existing, "unblock", args.connections, got, cpu, extra)
    if batches is not None and before is not None:
        unblock.batch = mean_batch(before, batches())
    out.append(unblock)
    if count_kernel is not None:
        unblock.kernel_after, unblock.kernel_expected = count_kernel(), existing
    got, wall, cpu, extra = run_wrk(ns, server.pid, wrk_command(args.connections, threads, args.health_seconds,
                                                                "health.lua", url, None), args.health_seconds)
    out.append(result(target, existing, "health", args.connections, got, cpu, extra))
    return out


def mean_batch(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Commands a batch between two batch_totals()."""
    batches, commands = after[0] - before[0], after[1] - before[1]
    return commands / batches if batches > 0 else math.nan


def spy(pid: int, out: Path, seconds: float) -> Any:
    """py-spy record of the daemon for about `seconds` (raw stacks per thread, and their summary): the throughput
    section's Profiler with two more options.

    Not --native: it cannot be --nonblocking (py-spy then stops the daemon for every sample: 95 blocks/s instead of
    1,000 here) and it samples waiting threads as if they ran. A C call (OpenSSL, SQLite, netlink) shows as the
    Python frame that made it. --gil: only the thread holding the GIL, so waits (a lock, the next request's SSL
    read) are left out; C work done with the GIL released (OpenSSL's crypto, SQLite's fsync) is then left out too:
    the per-thread CPU from /proc that wrk_passes prints with a profile covers it."""
    from throughput import Profiler

    return Profiler(pid, out, ["--gil", "--duration", str(int(seconds) + 2)], top=40)


def warm(ns: NetNS, pki: BenchPki) -> None:
    """One authenticated request first: the daemon's auth cache then holds the bench user, so that no measured
    request pays the bcrypt verify (the throughput section's clients do the same in their warm-up)."""
    conn = ns.https_connection(HOST, PORT, pki.certs.client_context(), timeout=30)
    try:
        conn.request("GET", "/version", headers={"Authorization": pki.authorization})
        reply = conn.getresponse()
        reply.read()
        if reply.status != 200:
            raise RuntimeError(f"GET /version answered {reply.status}")
    finally:
        conn.close()


class Perf:
    """perf record -g of the daemon (every thread, user and kernel) for about `seconds`; then its report by shared
    object (the interpreter, OpenSSL, SQLite, the kernel) and by symbol, as text. py-spy says which Python code;
    this says how much of the CPU is Python code at all."""

    def __init__(self, pid: int, out: Path, seconds: float):
        out.parent.mkdir(parents=True, exist_ok=True)
        self.data = out.with_suffix(".perf.data")
        self.out = out
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            ["perf", "record", "-F", "499", "-g", "-p", str(pid), "-o", str(self.data), "--", "sleep",
             str(int(seconds) + 1)], stdout=subprocess.DEVNULL, stderr=open(out.with_suffix(".stderr"), "wb"))
        time.sleep(0.5)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
        for sort, name in (("dso", "dso"), ("dso,sym", "sym")):
            report = subprocess.run(["perf", "report", "-i", str(self.data), "--stdio", "--no-children",
                                     "--sort", sort, "-g", "none", "--percent-limit", "0.5"],
                                    capture_output=True, text=True, timeout=300)
            self.out.with_suffix(f".perf-{name}.txt").write_text(report.stdout, encoding="utf-8")
        print(f"  perf: {self.out.with_suffix('.perf-dso.txt')} and .perf-sym.txt", file=sys.stderr)


@dataclass
class _MetricsTarget(WebiptdTarget):
    """The target's daemon, with the bench user allowed to read /metrics (for batch_totals)."""

    def config(self, workdir: Path, pki: BenchPki) -> dict[str, Any]:
        config = super().config(workdir, pki)
        config["users"][USER]["metrics"] = True
        return config


def bench_target(target: WebiptdTarget, pki: BenchPki, root: Path, args: argparse.Namespace,
                 existing: int) -> list[WrkResult]:
    """A fresh namespace and daemon with `existing` entries (198.18.0.0 + 0..N-1), then wrk_passes() on fresh ones."""
    target = _MetricsTarget(**{f.name: getattr(target, f.name) for f in fields(target)})
    pool = WRK_POOLS["ipv4"].num_addresses
    count = min(args.count, pool - existing)
    if count < args.threads:
        raise RuntimeError(f"N={existing:,} leaves no fresh addresses in {WRK_POOLS['ipv4']}")
    workdir = Path(tempfile.mkdtemp(prefix=f"wrk-{target.name}-{existing}-", dir=root))
    with NetNS.create(prefix="wbench") as ns:
        server = target.start(ns, workdir, pki, "ipv4", existing)
        try:
            print(f"  ready in {server.startup_s:.2f} s, RSS {proc_status_kib(server.pid, 'VmRSS') / 1024:.1f} MiB",
                  file=sys.stderr, flush=True)
            if server.count() != existing:
                raise RuntimeError(f"expected {existing} entries after start, found {server.count()}")
            warm(ns, pki)
            got = wrk_passes(ns, server, target.name, existing, "ipv4", existing, count, args, server.count,
                             lambda: batch_totals(ns, pki))
        finally:
            code = server.stop()
    if code != 0:
        raise RuntimeError(f"the daemon exited with {code} on SIGTERM; see {workdir} (use --keep)")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return got


def table(results: list[WrkResult]) -> list[str]:
    out = ["| target | N | op | requests | ok | other | errors | s | per s | p50 ms | p99 ms | max ms "
           "| server CPU ms/req | of it sys | switches/req | cmds/batch | kernel after (expected) |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        errors = sum(r.errors.values())
        kernel = "" if r.kernel_after < 0 else f"{r.kernel_after:,} ({r.kernel_expected:,})"
        out.append(f"| {r.target} | {r.existing:,} | {r.op} | {r.requests:,} | {r.ok:,} | {r.other:,} | {errors} | "
                   f"{r.seconds:.2f} | {r.per_s:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.max_ms:.1f} | "
                   f"{r.server_cpu_ms:.3f} | {r.server_sys_ms:.3f} | {r.switches:.1f} | {r.batch:.1f} | {kernel} |")
    return out


def tables(results: list[WrkResult], args: argparse.Namespace) -> list[str]:
    out = [f"wrk: {args.connections} keep-alive TLS connections, {args.threads} wrk threads, "
           f"up to {args.count:,} fresh addresses a pass, each pass cut at {args.seconds:g} s "
           f"(/health: {args.health_seconds:g} s).", "", *table(results)]
    out += ["", "requests: wrk's count (a thread past its quota fills in with GET /health until its last answer: "
                "at most a few). ok: 201 (block), 200 with deleted true (unblock), 200 (health); other: any other "
                "status. s and per s: from a thread's first request to the last answer, the pass's own answers a "
                "second (/health: wrk's duration); p50/p99/max: wrk's latency of every request. server CPU: the "
                "daemon's CPU seconds (all threads) / requests, of it sys: the kernel's part; switches: its "
                "threads' context switches (voluntary and not; a thread's last reading, every 0.2 s, if it ended) / "
                "requests; cmds/batch: the worker's commands a batch (webiptd_batch_size_commands). The kernel count "
                "after the block pass may exceed "
                "the expected by requests in flight when wrk stopped at its duration."]
    found = checks(results)
    if found:
        out += ["", "Target checks (issue 13):", "", "| target | measured | result |", "|---|---|---|"]
        out += [f"| {what} | {figure} | {result} |" for what, figure, result in found]
    return out


# Issue 13's target for wrk: at 100k entries, 16 connections.
MIN_BLOCKS = 4000
MAX_P99_MS = 15.0


def checks(results: list[WrkResult]) -> list[tuple[str, str, str]]:
    out = []
    for r in results:
        if r.op == "block" and r.existing == 100_000 and r.connections == 16:
            out.append((f"{r.target}: >= {MIN_BLOCKS:,} blocks/s with wrk at 100k, p99 <= {MAX_P99_MS:g} ms",
                        f"{r.per_s:,.0f} blocks/s, p99 {r.p99_ms:.2f} ms",
                        "met" if r.per_s >= MIN_BLOCKS and r.p99_ms <= MAX_P99_MS else "**NOT MET**"))
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="ipset,nftables", help="comma list of web-ipt-d backends (default "
                                                               "ipset,nftables)")
    p.add_argument("--sizes", type=int_list, default=[0, 100_000], help="entries N in place (default 0,100000)")
    p.add_argument("--connections", type=int, default=16, help="keep-alive connections (default 16)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2: the machine's cores)")
    p.add_argument("--seconds", type=float, default=10.0, help="a pass's duration bound (default 10)")
    p.add_argument("--count", type=int, default=30_000,
                   help="fresh addresses a pass at most (default 30000; at N=100k the pool leaves 31,072)")
    p.add_argument("--health-seconds", type=float, default=5.0, help="the /health pass (default 5)")
    p.add_argument("--src", type=Path, metavar="DIR", help="run web-ipt-d from this source tree")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="py-spy record of the daemon during the block pass at the largest N, to DIR")
    p.add_argument("--perf", type=Path, metavar="DIR",
                   help="perf record -g of the daemon during the block pass at the largest N, to DIR (not with "
                        "--profile)")
    p.add_argument("--keep", action="store_true", help="keep each run's work dir")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON")
    args = p.parse_args(argv)
    targets = catalog(src=args.src)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for name in args.targets:
        if name not in targets or name == "baseline":
            p.error(f"--targets: {name} is not a web-ipt-d backend")
        reason = targets[name].unavailable()
        if reason is not None:
            p.error(f"target {name} cannot run here: {reason}")
    if args.connections < args.threads or args.threads < 1 or args.count < 1:
        p.error("--connections must be at least --threads, both and --count positive")
    if shutil.which("wrk") is None:
        p.error("wrk is missing: apt-get install wrk")
    args.sizes = sorted(set(args.sizes))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import os

    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/wrk.py needs root: its daemons run in private network namespaces", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    targets = catalog(src=args.src)
    machine = machine_info()
    root = Path(tempfile.mkdtemp(prefix="wipt-wrk-", dir="/tmp"))
    results: list[WrkResult] = []
    try:
        pki = make_bench_pki(root)
        for name in args.targets:
            target = targets[name]
            assert isinstance(target, WebiptdTarget)
            for existing in args.sizes:
                print(f"{name}: N={existing:,}", file=sys.stderr, flush=True)
                results += bench_target(target, pki, root, args, existing)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    machine["loadavg_end"] = loadavg()
    print(f"Machine: nproc {machine['nproc']}, kernel {machine['kernel']}, Python {machine['python']}, "
          f"{machine['openssl']}; load average {machine['loadavg_start']} at start, {machine['loadavg_end']} at end.")
    print()
    print("\n".join(tables(results, args)))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "wrk": [asdict(r) for r in results]}, indent=1) + "\n",
                             encoding="utf-8")
    return 1 if any(sum(r.errors.values()) or r.other for r in results if r.op != "health") else 0


if __name__ == "__main__":
    sys.exit(main())
