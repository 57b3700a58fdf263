"""Section `restore`: each target started with N entries in place, the time to READY=1 and its RSS. The throughput
section measures the same around its phases; alone (`bench/restore.py [run.py's options]`) nothing is requested.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import throughput
from clients import ClientPool
from targets import BaselineTarget, BenchPki, Target
from tests.harness import proc_status_kib
from tests.netns import NetNS


@dataclass
class SizeResult:
    target: str
    existing: int
    populate: str
    populate_s: float
    startup_s: float
    rss_kib_ready: int
    rss_kib_end: int
    rss_kib_peak: int
    counts_checked: dict[str, int]
    tls: str = ""


def bench_size(pool: ClientPool | None, target: Target, pki: BenchPki, workdir_root: Path, args: argparse.Namespace,
               existing: int) -> tuple[SizeResult, list[throughput.PhaseResult]]:
    """A fresh namespace and server with `existing` entries: its start and RSS, and, given a client pool, the
    throughput section's phases in between (RSS at end is then after them)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{target.name}-{existing}-", dir=workdir_root))
    phases: list[throughput.PhaseResult] = []
    tls = ""
    with NetNS.create(prefix="wbench") as ns:
        server = target.start(ns, workdir, pki, args.family, existing)
        print(f"  ready: populate {server.populate_s:.2f} s, start to READY=1 {server.startup_s:.2f} s",
              file=sys.stderr, flush=True)
        try:
            rss_ready = proc_status_kib(server.pid, "VmRSS")
            checked = {"ready": server.count()}
            if checked["ready"] != existing:
                raise RuntimeError(f"expected {existing} entries after start, found {checked['ready']}")
            if pool is not None:
                info = pool.connect(server)
                tls = f"{info['tls']} {info['cipher']}"
                phases = throughput.run_phases(pool, server, target, existing, args, checked)
            rss_end = proc_status_kib(server.pid, "VmRSS")
            rss_peak = proc_status_kib(server.pid, "VmHWM")
            if pool is not None:
                pool.disconnect()
        finally:
            code = server.stop()
    if code != 0:
        raise RuntimeError(f"the server exited with {code} on SIGTERM; see {workdir} (use --keep)")
    populate = "iptables-restore" if isinstance(target, BaselineTarget) else "state DB"
    size = SizeResult(target.name, existing, populate, server.populate_s, server.startup_s, rss_ready, rss_end,
                      rss_peak, checked, tls)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return size, phases


def find_size(sizes: list[SizeResult], target: str, existing: int) -> SizeResult | None:
    return next((s for s in sizes if (s.target, s.existing) == (target, existing)), None)


def tables(sizes: list[SizeResult]) -> list[str]:
    """The start, restore and memory table with its note (Markdown lines)."""
    out = [
        "Start, restore and memory:",
        "",
        "| target | N | N put in place by | that took s | process start to READY=1 s | RSS at READY MiB "
        "| RSS at end MiB | peak RSS MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in sizes:
        out.append(f"| {s.target} | {s.existing:,} | {s.populate} | {s.populate_s:.2f} | {s.startup_s:.2f} | "
                   f"{s.rss_kib_ready / 1024:.1f} | {s.rss_kib_end / 1024:.1f} | {s.rss_kib_peak / 1024:.1f} |")
    out += ["", "For web-ipt-d, start to READY=1 is the restore: the N entries are in the state DB and the "
                "namespace's kernel is empty, so the daemon's reconcile adds all N before READY=1. For the baseline, "
                "the N rules were put in place by one iptables-restore before it started."]
    return out


if __name__ == "__main__":
    import run

    sys.exit(run.main(sections=("restore",)))
