"""Scoped entries (a protocol and destination ports) through the daemon: single scoped PUT and DELETE, and the
union change of a host that already has a port list, with 0, 10k and 100k scoped entries in place, per backend.
Run as root: `bench/scoped.py [--quick] [--targets ipset,nftables,iptables]`; bench/README.md, "Scoped entries".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from common import CHAIN, HOST, PORT, POOLS, REQUEST_TIMEOUT, address, int_list, loadavg, machine_info

from clients import ClientPool
from targets import BenchPki, Server, WebiptdTarget, catalog, make_bench_pki
from tests.harness import client_context, proc_status_kib
from tests.netns import NetNS
from throughput import Phase, PhaseResult, measure

FAMILY = "ipv4"
TARGETS = ("ipset", "nftables", "iptables")
# The iptables backend writes a rule per entry (multiport), which every change and every packet walks: it is not
# meant to stay flat, and 100k rules take minutes to fill. It runs up to this N unless --iptables-max says otherwise.
IPTABLES_MAX = 10_000
# The fills: the query of each bulk POST, and the share of N it gets.
FILLS = {
    "uniform": (("proto=tcp&port=22,80", 1.0),),
    "mixed": (("proto=tcp&port=22", 0.5), ("proto=udp", 0.5)),
}
SCOPED = "proto=tcp&port=22,80"  # what the measured PUT and DELETE name
EXTRA = "proto=tcp&port=443"  # a second port list on the same hosts: the union 22,80 becomes 22,80,443 and back


@dataclass(frozen=True)
class ScopedPhase:
    phase: Phase
    query: str
    hosts: str  # which hosts it names: "fresh" ones, those the "put" phase blocked, or those "union put" did


# In this order on the same fresh hosts, so that each clients count starts and ends at N entries.
PHASES = (
    ScopedPhase(Phase("put", "PUT", 201, None), f"{SCOPED}&timeout=600", "fresh"),
    # The host has tcp/22,80: the worker sends Remove(tcp/22,80) + Add(tcp/22,80,443) in one apply().
    ScopedPhase(Phase("union put", "PUT", 201, None), f"{EXTRA}&timeout=600", "put"),
    # And back: Remove(tcp/22,80,443) + Add(tcp/22,80).
    ScopedPhase(Phase("union delete", "DELETE", 200, '"deleted":true'), EXTRA, "union put"),
    ScopedPhase(Phase("delete", "DELETE", 200, '"deleted":true'), SCOPED, "put"),
)
QUICK = {"sizes": [0, 10_000], "ops": 500, "budget": 5.0}
DEFAULTS = {"sizes": [0, 10_000, 100_000], "ops": 2000, "budget": 20.0}


@dataclass
class FillResult:
    target: str
    fill: str
    existing: int
    posts: int
    fill_s: float
    kernel_items: int  # rules (iptables) or set elements (ipset, nftables) of the chain after the fill
    startup_s: float
    rss_kib_filled: int
    rss_kib_end: int


@dataclass
class ScopedTarget(WebiptdTarget):
    """web-ipt-d as the throughput section starts it, with room for the bench's bulk POSTs of `chunk` items."""

    chunk: int = 10_000

    def config(self, workdir: Path, pki: BenchPki) -> dict[str, Any]:
        config = super().config(workdir, pki)
        # A fill POST waits for one group commit of `chunk` atoms; the measured requests never come near these.
        config["limits"].update(max_bulk_items=self.chunk, worker_timeout=60)
        return config


def kernel_items(ns: NetNS, backend: str) -> int:
    """Rules (iptables) or set elements (every set of the chain: ipset, nftables) the kernel holds for the chain.

    Each atom is at least one of them (a port list is an element a port in ipset's and nftables' port sets)."""
    if backend == "iptables":
        return sum(1 for line in ns.iptables_save(4).splitlines() if line.startswith(f"-A {CHAIN} "))
    if backend == "ipset":
        out = ns.run(["ipset", "list", "-t"]).stdout
        found = re.findall(r"^Name: (\S+)\n(?:.*\n)*?Number of entries: (\d+)$", out, re.M)
        return sum(int(n) for name, n in found if name.startswith(f"{CHAIN}-"))
    if backend == "nftables":
        doc = json.loads(ns.run(["nft", "-j", "list", "table", "inet", "web-ipt-d"], timeout=300).stdout)
        return sum(len(item["set"].get("elem", [])) for item in doc["nftables"]
                   if "set" in item and item["set"]["name"].startswith(f"{CHAIN}-"))
    raise ValueError(backend)


def bulk_fill(server: Server, pki: BenchPki, fill: str, existing: int, chunk: int) -> int:
    """Block hosts 0 .. existing-1 of the pool by bulk POSTs of `chunk` items, with the fill's queries; the POSTs."""
    conn = server.ns.https_connection(HOST, PORT, client_context(pki.ca), timeout=REQUEST_TIMEOUT)
    posts = 0
    try:
        start = 0
        for i, (query, share) in enumerate(FILLS[fill]):
            end = existing if i == len(FILLS[fill]) - 1 else start + int(existing * share)
            for first in range(start, end, chunk):
                items = [address(FAMILY, j) for j in range(first, min(first + chunk, end))]
                conn.request("POST", f"/chain/{CHAIN}?{query}", body=json.dumps(items).encode(),
                             headers={"Authorization": pki.authorization, "Content-Type": "application/json"})
                resp = conn.getresponse()
                body = resp.read()
                posts += 1
                created = json.loads(body).get("created") if resp.status == 200 else None
                if created != len(items):
                    raise RuntimeError(f"POST ?{query} of {len(items)} items: {resp.status} {body[:300]!r}")
            start = end
    finally:
        conn.close()
    return posts


def run_phases(pool: ClientPool, server: Server, name: str, existing: int, args: argparse.Namespace
               ) -> list[PhaseResult]:
    """The four phases at each client count, on `args.ops` fresh hosts; back to the fill's kernel items after each."""
    results: list[PhaseResult] = []
    for clients in args.clients:
        before = kernel_items(server.ns, name)
        hosts = {"fresh": [address(FAMILY, i) for i in range(existing, existing + args.ops)]}
        for step in PHASES:
            todo = [f"/chain/{CHAIN}/{FAMILY}/{h}?{step.query}" for h in hosts[step.hosts]]
            result, sent = measure(pool, server, name, existing, step.phase, clients, todo, args.budget)
            results.append(result)
            if step.phase.method == "PUT":
                hosts[step.phase.name] = [p.partition("?")[0].rpartition("/")[2] for p in sent]
                n = kernel_items(server.ns, name)
                if n < before + len(hosts["put"]):
                    raise RuntimeError(f"after {step.phase.name}: {n} kernel items, expected at least "
                                       f"{before + len(hosts['put'])}")
            elif len(sent) < len(todo):  # cut by the budget: the rest goes untimed, so the next phase starts clean
                print(f"  removing the {len(todo) - len(sent)} entries the budget left, untimed", file=sys.stderr)
                done = set(sent)
                pool.run(len(pool), "DELETE", [t for t in todo if t not in done], 200, '"deleted":true')
        n = kernel_items(server.ns, name)
        if n != before:
            raise RuntimeError(f"after the phases with {clients} clients: {n} kernel items, expected {before}")
    return results


def bench_one(pool: ClientPool, target: ScopedTarget, pki: BenchPki, root: Path, args: argparse.Namespace,
              fill: str, existing: int) -> tuple[FillResult, list[PhaseResult]]:
    """A fresh namespace and daemon, filled with `existing` entries the `fill` way, and the phases against it."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{target.name}-{fill}-{existing}-", dir=root))
    with NetNS.create(prefix="wbench") as ns:
        server = target.start(ns, workdir, pki, FAMILY, 0)
        try:
            t0 = time.perf_counter()
            posts = bulk_fill(server, pki, fill, existing, args.chunk) if existing else 0
            fill_s = time.perf_counter() - t0
            items = kernel_items(ns, target.name)
            if items < existing:
                raise RuntimeError(f"{items} kernel items after a fill of {existing}")
            rss_filled = proc_status_kib(server.pid, "VmRSS")
            print(f"  filled: {existing:,} entries ({fill}) by {posts} POSTs in {fill_s:.1f} s, {items:,} kernel "
                  "items", file=sys.stderr, flush=True)
            pool.connect(server)
            phases = run_phases(pool, server, target.name, existing, args)
            pool.disconnect()
            rss_end = proc_status_kib(server.pid, "VmRSS")
        finally:
            code = server.stop()
    if code != 0:
        raise RuntimeError(f"the server exited with {code} on SIGTERM; see {workdir} (use --keep)")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return FillResult(target.name, fill, existing, posts, fill_s, items, server.startup_s, rss_filled,
                      rss_end), phases


def sizes_for(name: str, args: argparse.Namespace) -> list[int]:
    return [n for n in args.sizes if name != "iptables" or n <= args.iptables_max]


def cpu_per_op(p: PhaseResult) -> float:
    """The daemon's CPU milliseconds per request."""
    return p.server_cpu_cores / p.ops_per_s * 1000 if p.ops_per_s > 0 else math.nan


def tables(fills: list[FillResult], phases: list[tuple[str, PhaseResult]], args: argparse.Namespace) -> list[str]:
    out = ["| target | fill | N | clients | op | ops | ops/s | p50 ms | p99 ms | server CPU ms/op | other cores | "
           "errors |", "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for fill, p in phases:
        per_op = cpu_per_op(p)
        out.append(f"| {p.target} | {fill} | {p.existing:,} | {p.clients} | {p.op} | "
                   f"{p.ops:,}{'*' if p.cut_by_budget else ''} | {p.ops_per_s:,.0f} | {p.p50_ms:.2f} | "
                   f"{p.p99_ms:.2f} | {per_op:.2f} | {p.host_cpu_cores - p.server_cpu_cores - p.client_cpu_cores:.2f} "
                   f"| {p.errors} |")
    out += ["", f"Each row: {args.ops:,} fresh hosts (* = cut by the {args.budget:g} s budget). put: "
                f"`PUT ?{SCOPED}&timeout=600`; union put: `PUT ?{EXTRA}&timeout=600` on those hosts (the worker "
                "replaces the tcp/22,80 atom by tcp/22,80,443); union delete: `DELETE ?{EXTRA}` (back to "
                f"tcp/22,80); delete: `DELETE ?{SCOPED}`. p50/p99: nearest rank; server CPU: the daemon's CPU "
                "seconds per request; other cores: what the rest of the machine kept busy beside the daemon and the "
                "clients (kernel work for the daemon counts there too; 2 cores in all).".replace("{EXTRA}", EXTRA)]
    out += ["", "Fills (untimed for the table above; fresh namespace and daemon each):", "",
            "| target | fill | N | bulk POSTs | fill s | entries/s | kernel rules or elements | RSS filled MiB | "
            "RSS end MiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for f in fills:
        rate = f"{f.existing / f.fill_s:,.0f}" if f.existing else "-"
        out.append(f"| {f.target} | {f.fill} | {f.existing:,} | {f.posts} | {f.fill_s:.1f} | {rate} | "
                   f"{f.kernel_items:,} | {f.rss_kib_filled / 1024:.1f} | {f.rss_kib_end / 1024:.1f} |")
    out += ["", "Flatness: p50 at the largest N over p50 at N = 0, and the same for the daemon's CPU per request, "
                "which a busy machine disturbs less (mixed fills are compared with the uniform N = 0 run: with "
                "nothing in place they are the same daemon):", ""]
    heads = sorted({p.existing for _, p in phases})
    out += ["| target | fill | clients | op | " + " | ".join(f"p50 at {n:,} ms" for n in heads) +
            " | p50 largest / 0 | CPU/op largest / 0 |", "|---|---|---:|---|" + "---:|" * (len(heads) + 2)]
    for name in args.targets:
        for fill in args.fills:
            for clients in args.clients:
                for step in PHASES:
                    row = {p.existing: p for f, p in phases if p.target == name and p.clients == clients
                           and p.op == step.phase.name and (f == fill or (p.existing == 0 and f == args.fills[0]))}
                    if len(row) < 2 or 0 not in row:
                        continue
                    big, zero = row[max(row)], row[0]
                    cells = " | ".join(f"{row[n].p50_ms:.2f}" if n in row else "-" for n in heads)
                    out.append(f"| {name} | {fill} | {clients} | {step.phase.name} | {cells} | "
                               f"**{big.p50_ms / zero.p50_ms:.2f}** ({big.existing:,}) | "
                               f"{cpu_per_op(big) / cpu_per_op(zero):.2f} |")
    if "iptables" in args.targets and max(args.sizes) > args.iptables_max:
        out += ["", f"iptables stops at N = {args.iptables_max:,}: it writes a rule per scoped entry, which every "
                    "change and every packet walks; it is not meant to stay flat (the set backends are)."]
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="N = 0 and 10k, 500 hosts per phase, 5 s budgets; explicit options still win")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma list from {', '.join(TARGETS)} (default all)")
    p.add_argument("--fills", default=",".join(FILLS),
                   help="uniform: every entry ?proto=tcp&port=22,80; mixed: half ?proto=tcp&port=22, half ?proto=udp "
                        "(default both; mixed is not run at N = 0, where it is the uniform run)")
    p.add_argument("--sizes", type=int_list, help="scoped entries N in place (default 0,10000,100000)")
    p.add_argument("--iptables-max", type=int, default=IPTABLES_MAX,
                   help=f"the largest N for the iptables target (default {IPTABLES_MAX})")
    p.add_argument("--clients", type=int_list, default=[4, 16], help="keep-alive client processes (default 4,16)")
    p.add_argument("--ops", type=int, help="fresh hosts per phase (default 2000)")
    p.add_argument("--budget", type=float, help="seconds after which a phase sends no more requests (default 20)")
    p.add_argument("--chunk", type=int, default=10_000,
                   help="items per fill POST (the bench's limits.max_bulk_items; default 10000)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write every figure, raw latencies included")
    p.add_argument("--src", type=Path, metavar="DIR", help="run web-ipt-d from this source tree")
    p.add_argument("--keep", action="store_true", help="keep each run's work dir (config, logs, state DB)")
    args = p.parse_args(argv)
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    args.sizes = sorted(set(args.sizes))
    args.clients = sorted(set(args.clients))
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.fills = [f.strip() for f in args.fills.split(",") if f.strip()]
    if not args.targets or any(t not in TARGETS for t in args.targets):
        p.error(f"--targets takes a comma list of {', '.join(TARGETS)}")
    if not args.fills or any(f not in FILLS for f in args.fills):
        p.error(f"--fills takes a comma list of {', '.join(FILLS)}")
    if args.ops < 1 or min(args.clients) < 1 or args.budget <= 0 or args.chunk < 1:
        p.error("--ops, --clients, --budget and --chunk must be positive")
    if max(args.sizes) + args.ops > POOLS[FAMILY].num_addresses:
        p.error(f"the largest N plus --ops must fit in the {POOLS[FAMILY]} pool")
    if args.src is not None and not (args.src / "webiptd" / "__init__.py").is_file():
        p.error(f"--src {args.src}: no webiptd package there")
    known = catalog(src=args.src)
    for name in args.targets:
        reason = known[name].unavailable()
        if reason is not None:
            p.error(f"target {name} cannot run here: {reason}")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("bench/scoped.py needs root and iproute2 to run the daemons in private network namespaces",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    web = {"src": args.src.resolve()} if args.src is not None else {}
    machine = machine_info()
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="wipt-scoped-", dir="/tmp"))
    pool: ClientPool | None = None
    fills: list[FillResult] = []
    phases: list[tuple[str, PhaseResult]] = []
    try:
        print(f"generating the test CA and a bcrypt user in {root} ...", file=sys.stderr, flush=True)
        pki = make_bench_pki(root)
        pool = ClientPool(max(args.clients))
        for name in args.targets:
            target = ScopedTarget(name, f"web-ipt-d, {name} backend, scoped entries", backend=name,
                                  chunk=args.chunk, **web)
            for fill in args.fills:
                for existing in sizes_for(name, args):
                    if existing == 0 and fill != args.fills[0]:
                        continue  # nothing in place: the same run as the first fill's
                    print(f"{name}: {fill} N={existing:,}  [{(time.monotonic() - started) / 60:.1f} min]",
                          file=sys.stderr, flush=True)
                    result, got = bench_one(pool, target, pki, root, args, fill, existing)
                    fills.append(result)
                    phases += [(fill, p) for p in got]
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        if pool is not None:
            pool.close()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    machine["loadavg_end"] = loadavg()
    machine["run_s"] = time.monotonic() - started
    print(f"web-ipt-d {machine['web-ipt-d']}, {machine['nproc']} CPUs ({machine['cpu']}), kernel {machine['kernel']}, "
          f"Python {machine['python']}; load {machine['loadavg_start']} at the start; "
          f"{machine['run_s'] / 60:.1f} min\n")
    print("\n".join(tables(fills, phases, args)))
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        data = {"machine": machine, "args": settings, "fills": [asdict(f) for f in fills],
                "phases": [{"fill": f, **asdict(p)} for f, p in phases]}
        args.json.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return 1 if any(p.errors for _, p in phases) else 0


if __name__ == "__main__":
    sys.exit(main())
