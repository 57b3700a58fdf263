"""Section `throughput`: blocks/s, unblocks/s, latency and server CPU per request through HTTPS, per target, N and
client count. Alone: `bench/throughput.py [run.py's options]`, which also prints the start and memory figures.
"""

from __future__ import annotations

import argparse
import math
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from clients import ClientPool
from common import host_busy_seconds, paths, percentile, proc_cpu_seconds, proc_sys_seconds
from targets import BaselineTarget, Server, Target

OTHER_LOAD_WARNING = 0.25  # cores busy outside the server and the clients that make a phase suspect


@dataclass(frozen=True)
class Phase:
    name: str
    method: str
    expect: int
    must_contain: str | None


PHASES = {
    # The HTTPS stack alone (TLS, parsing, auth cache, JSON), no firewall worker: the clients' ceiling.
    "version": Phase("version", "GET", 200, None),
    # A round trip through the worker's queue, without SQLite or a kernel commit (web-ipt-d only).
    "lookup": Phase("lookup", "GET", 404, None),
    "block": Phase("block", "PUT", 201, None),
    "unblock": Phase("unblock", "DELETE", 200, '"deleted":true'),
}


@dataclass
class PhaseResult:
    target: str
    existing: int
    op: str
    clients: int
    ops: int
    errors: int
    wall_s: float
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    client_cpu_cores: float
    server_cpu_cores: float
    host_cpu_cores: float
    cut_by_budget: bool
    first_errors: list[str]
    latencies_ms: list[float] = field(repr=False)
    server_sys_cores: float = math.nan  # the kernel's share of server_cpu_cores


def summarise(target: str, existing: int, op: str, clients: int, replies: list[dict[str, Any]], asked: int,
              server_cpu: float, host_cpu: float, server_sys: float = math.nan) -> PhaseResult:
    lat = sorted(x * 1000 for r in replies for x in r["latencies"])
    wall = max(r["t1"] for r in replies) - min(r["t0"] for r in replies)
    errors = [e for r in replies for e in r["errors"]]
    return PhaseResult(
        target, existing, op, clients, len(lat), len(errors), wall, len(lat) / wall if wall > 0 else math.nan,
        percentile(lat, 50), percentile(lat, 99), lat[-1] if lat else math.nan,
        sum(lat) / len(lat) if lat else math.nan,
        sum(r["cpu"] for r in replies) / wall, server_cpu / wall, host_cpu / wall, len(lat) < asked,
        [e for e in errors if e][:5], lat, server_sys / wall,
    )


def measure(pool: ClientPool, server: Server, target: str, existing: int, phase: Phase, clients: int,
            todo: Sequence[str], budget: float) -> tuple[PhaseResult, list[str]]:
    def sample() -> tuple[float, float, float]:
        return proc_cpu_seconds(server.pid), host_busy_seconds(), proc_sys_seconds(server.pid)

    replies, sent, (cpu0, host0, sys0), (cpu1, host1, sys1) = pool.run(
        clients, phase.method, todo, phase.expect, phase.must_contain, budget, sample)
    result = summarise(target, existing, phase.name, clients, replies, len(todo), cpu1 - cpu0, host1 - host0,
                       sys1 - sys0)
    per_op = result.server_cpu_cores / result.ops_per_s * 1000 if result.ops_per_s > 0 else math.nan
    sys_op = result.server_sys_cores / result.ops_per_s * 1000 if result.ops_per_s > 0 else math.nan
    print(f"  {phase.name:8} N={existing:<6} clients={clients:<2} {result.ops:6} ops {result.ops_per_s:8.0f} ops/s  "
          f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  server CPU {per_op:.3f} ms/op "
          f"({sys_op:.3f} of it in the kernel)  errors {result.errors}"
          f"{'  (cut by the time budget)' if result.cut_by_budget else ''}", file=sys.stderr, flush=True)
    return result, sent


def run_phases(pool: ClientPool, server: Server, target: Target, existing: int, args: argparse.Namespace,
               checked: dict[str, int]) -> list[PhaseResult]:
    """Every phase at every client count against one running server with `existing` entries.

    After each block and unblock, the kernel's count goes into `checked`; a wrong count stops the run.
    """
    phases: list[PhaseResult] = []
    profiler = Profiler(server.pid, args.profile / f"{target.name}-{existing}") if args.profile is not None else None
    try:
        fresh = paths(args.family, existing, args.ops)
        for clients in args.clients:
            blocked: list[str] = []
            for phase in args.phases:
                if phase.name == "version":
                    todo = ["/version"] * args.ops
                elif phase.name == "unblock":
                    todo = blocked
                else:
                    todo = fresh
                if phase.name == "lookup" and isinstance(target, BaselineTarget):
                    continue  # the baseline has no lookup
                result, sent = measure(pool, server, target.name, existing, phase, clients, todo, args.budget)
                phases.append(result)
                if phase.name == "block":
                    blocked = sent
                    checked[f"after block c={clients}"] = n = server.count()
                    if n != existing + len(sent):
                        raise RuntimeError(f"expected {existing + len(sent)} entries after block, found {n}")
                elif phase.name == "unblock":
                    unblocked = set(sent)
                    left = [p for p in blocked if p not in unblocked]
                    if left:  # cut by the budget: take the rest away untimed, so the next phase starts at N
                        print(f"  removing the {len(left)} blocks the budget left, untimed", file=sys.stderr)
                        if server.remove is not None:
                            server.remove(left)
                        else:
                            pool.run(len(pool), "DELETE", left, 200, '"deleted":true')
                    checked[f"after unblock c={clients}"] = n = server.count()
                    if n != existing:
                        raise RuntimeError(f"expected {existing} entries after unblock, found {n}")
    finally:
        if profiler is not None:
            profiler.stop()
    return phases


class Profiler:
    """py-spy sampling the server during the measured phases; raw stacks plus a per-thread summary.

    --nonblocking keeps the target running while it is sampled, so figures drop only a little;
    threads blocked in a system call (waiting on a socket, a future or fsync) are not sampled.
    """

    def __init__(self, pid: int, out: Path, options: Sequence[str] = (), top: int = 25):
        """`options`: more of py-spy record's; `top`: the functions each thread's summary lists."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out = out.with_suffix(".txt")
        self._top = top
        self._err = open(out.with_suffix(".stderr"), "wb")
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--threads", "--nonblocking",
             *options, "--output", str(self.out)], stdout=subprocess.DEVNULL, stderr=self._err)
        time.sleep(1.0)  # let it attach before the first phase starts
        if self._proc.poll() is not None:
            self._err.close()
            raise RuntimeError(f"py-spy failed: {out.with_suffix('.stderr').read_text(errors='replace')}")

    def stop(self) -> None:
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._err.close()
        if self.out.exists():
            summary = self.out.with_suffix(".summary.txt")
            summary.write_text(profile_summary(self.out.read_text(), self._top), encoding="utf-8")
            print(f"  profile: {self.out} and {summary}", file=sys.stderr)


def profile_summary(raw: str, top: int = 25) -> str:
    """Per thread (connection threads pooled): share of samples, then the functions most often on the stack
    (inclusive) and at its top (self). Waits py-spy could not tell from work (Condition.wait, SSL reads) show up
    too; read them as "waiting for the worker" and "waiting for the next request"."""
    threads: dict[str, int] = {}
    inclusive: dict[tuple[str, str], int] = {}
    leaf: dict[tuple[str, str], int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        head, *frames = stack.split(";")
        name = head.partition(": ")[2] or head
        name = "conn-*" if name.startswith("conn-") else name
        threads[name] = threads.get(name, 0) + n
        total += n
        for func in {f.partition(" (")[0] for f in frames} - {"Thread._bootstrap", "Thread._bootstrap_inner",
                                                              "Thread.run"}:
            inclusive[(name, func)] = inclusive.get((name, func), 0) + n
        if frames:
            leaf[(name, frames[-1])] = leaf.get((name, frames[-1]), 0) + n
    if not total:
        return "no samples\n"
    out = [f"{total} samples"]
    out += [f"{100 * n / total:5.1f}%  thread {t}" for t, n in sorted(threads.items(), key=lambda x: -x[1])]
    for title, table in (("on the stack (inclusive)", inclusive), ("at the top of the stack (self)", leaf)):
        out.append(f"functions {title}, top {top}:")
        out += [f"{100 * n / total:5.1f}%  {t:16} {f}"
                for (t, f), n in sorted(table.items(), key=lambda x: -x[1])[:top]]
    return "\n".join(out) + "\n"


def find(phases: list[PhaseResult], target: str, existing: int, op: str, clients: int) -> PhaseResult | None:
    for p in phases:
        if (p.target, p.existing, p.op, p.clients) == (target, existing, op, clients):
            return p
    return None


def tables(phases: list[PhaseResult], machine: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The request table with its notes, and the ratios against the baseline (Markdown lines)."""
    out = [
        "| target | N | clients | op | ops | ops/s | p50 ms | p99 ms | server cores | server CPU ms/op | "
        "host cores | errors |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in phases:
        per_op = p.server_cpu_cores / p.ops_per_s * 1000 if p.ops_per_s > 0 else math.nan
        out.append(f"| {p.target} | {p.existing:,} | {p.clients} | {p.op} | {p.ops:,}{'*' if p.cut_by_budget else ''} "
                   f"| {p.ops_per_s:,.{1 if p.ops_per_s < 100 else 0}f} | {p.p50_ms:,.2f} | {p.p99_ms:,.2f} | "
                   f"{p.server_cpu_cores:.2f} | {per_op:,.2f} | {p.host_cpu_cores:.2f} | {p.errors} |")
    out += [
        "",
        f"ops: requests measured; * = the phase hit its {args.budget:g} s budget before all {args.ops:,} were sent. "
        "ops/s: requests / wall time from the common start to the last response. p50/p99: per-request latency, "
        "nearest rank. Server cores: CPU seconds of the server process (every thread, and its reaped children: the "
        "baseline's iptables processes) per wall second; server CPU ms/op: the same per request. Host cores: the whole "
        "machine, clients included (2 would be everything on this 2-vCPU machine).",
    ]
    busy = [p for p in phases if p.host_cpu_cores - p.client_cpu_cores - p.server_cpu_cores > OTHER_LOAD_WARNING
            and p.target != "baseline"]
    if busy:
        worst = max(p.host_cpu_cores - p.client_cpu_cores - p.server_cpu_cores for p in busy)
        out += ["", f"**Warning:** something other than the server and the clients kept up to {worst:.2f} of "
                    f"{machine['nproc']} cores busy during {len(busy)} web-ipt-d phases (kernel work on behalf of the "
                    "server counts there too); on a shared machine those figures understate what it can do."]
    rows = []
    for t in (t for t in args.targets if t != "baseline"):
        for n in args.sizes:
            for clients in args.clients:
                for op in ("block", "unblock"):
                    mine, base = find(phases, t, n, op, clients), find(phases, "baseline", n, op, clients)
                    if mine and base and base.ops_per_s > 0:
                        rows.append(f"| {t} | {n:,} | {clients} | {op} | {mine.ops_per_s:,.0f} | "
                                    f"{base.ops_per_s:,.1f} | **{mine.ops_per_s / base.ops_per_s:,.1f} x** | "
                                    f"{base.p50_ms / mine.p50_ms:,.1f} x |")
    if rows:
        out += ["", "Against the baseline (same N, clients and op):", "",
                "| target | N | clients | op | ops/s | baseline ops/s | throughput ratio | p50 latency ratio "
                "(baseline / target) |", "|---|---:|---:|---|---:|---:|---:|---:|", *rows]
    return out


def plot(phases: list[PhaseResult], args: argparse.Namespace, path: Path) -> bool:
    """p50 latency against N, per target, block and unblock; needs matplotlib (imported only here)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot: matplotlib is not installed; `{sys.executable} -m pip install matplotlib` to get {path}",
              file=sys.stderr)
        return False
    sizes = sorted(args.sizes)
    colours = {"baseline": "tab:red", "iptables": "tab:orange", "ipset": "tab:blue", "nftables": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, op in zip(axes, ("block", "unblock")):
        for t in args.targets:
            for clients, style in zip(sorted(args.clients, reverse=True), ("-", "--", ":", "-.")):
                pts = [(i, r.p50_ms) for i, n in enumerate(sizes) if (r := find(phases, t, n, op, clients))]
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", color=colours.get(t),
                            label=f"{t}, {clients} clients")
        ax.set_yscale("log")
        ax.set_xticks(range(len(sizes)), [f"{n:,}" for n in sizes])
        ax.set_xlabel("entries already blocked (N)")
        ax.set_title(f"{op}: p50 latency through HTTPS")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("p50 latency, ms (log scale)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("web-ipt-d backends against one `iptables -w` process per request (baseline)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    import run

    sys.exit(run.main(sections=("throughput",)))
