"""Section `million` (issue 13): web-ipt-d with a million entries on the set backends. Restore at start, a bulk
load of the million through the API, listing throughput, single PUT/DELETE latency at 0 and at 1M, wrk at 1M.
Runs when `bench/run.py --sizes` includes 1000000, or alone: `bench/million.py [options]`. Root; namespaces.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import ipaddress
import json
import math
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import quote

from common import CHAIN, HOST, PORT, int_list, loadavg, machine_info, percentile

import wrk as wrk_section
from targets import SET_BACKENDS, BenchPki, Server, WebiptdTarget, catalog, make_bench_pki
from tests.harness import proc_status_kib
from tests.netns import NetNS

MILLION = 1_000_000
# 198.18.0.0/15 holds 131,072 addresses, so the million are IPv6: 2001:db8:b:: + i (RFC 3849's documentation
# range, never contacted; bench/wrk/block.lua numbers the same pool). The million sit in the chain's -v6 set.
POOL = wrk_section.WRK_POOLS["ipv6"]
FAMILY = "ipv6"
PAGE = 10_000  # listing page, and the JSON bulk POST of the fallback: today's limit on one group commit


def item(i: int) -> str:
    """Pool address i as text, the way block.lua writes it (valid, not always canonical: the daemon normalises)."""
    return f"2001:db8:b::{i >> 16:x}:{i & 0xffff:x}"


@dataclass
class Mem:
    rss_kib: int
    hwm_kib: int

    @classmethod
    def of(cls, pid: int) -> Mem:
        return cls(proc_status_kib(pid, "VmRSS"), proc_status_kib(pid, "VmHWM"))


@dataclass
class BackendResult:
    backend: str
    count: int
    # restore at start
    populate_s: float = math.nan
    ready_s: float = math.nan
    ready: Mem | None = None
    kernel_at_ready: int = -1
    # bulk load through the API, per way: {"way", "posts", "seconds", "per_s", "created", "mem", "kernel", "note"}
    bulk: list[dict[str, Any]] = field(default_factory=list)
    # listing: {"way", "entries", "bytes", "seconds", "per_s", "mem_after", "note"}
    listing: list[dict[str, Any]] = field(default_factory=list)
    # single requests: {"n", "op", "ops", "p50_ms", "p99_ms"}
    latency: list[dict[str, Any]] = field(default_factory=list)
    wrk: list[dict[str, Any]] = field(default_factory=list)
    end: Mem | None = None
    notes: list[str] = field(default_factory=list)


class MillionTarget(WebiptdTarget):
    """web-ipt-d with room for a million: limits.max_bulk_items 1,000,000, sets of maxelem 2,000,000, long idle and
    worker timeouts; the million written to the state DB in chunks (through the daemon's own Store) when a start
    needs them in place."""

    def config(self, workdir: Path, pki: BenchPki) -> dict[str, Any]:
        config = super().config(workdir, pki)
        config["chains"][CHAIN]["maxelem"] = 2_000_000
        # idle_timeout: the keep-alive connection waits while the run counts the kernel's million (nft: seconds).
        config["limits"].update(max_bulk_items=MILLION, worker_timeout=60, idle_timeout=600)
        return config

    def populate(self, state_dir: Path, family: str, existing: int) -> None:
        from webiptd.commands import Entry
        from webiptd.state import Store

        store = Store(state_dir)
        try:
            now = time.time()
            for lo in range(0, existing, 100_000):
                store.write([Entry(CHAIN, ipaddress.ip_network(POOL.network_address + i), "DROP", now, None, "bench")
                             for i in range(lo, min(existing, lo + 100_000))], [])
        finally:
            store.close()


def count_kernel(ns: NetNS, backend: str) -> int:
    """Entries in the chain's -v6 set (ipset list -t; nft -j list set, which takes seconds at 1M)."""
    name = f"{CHAIN}-v6"
    if backend == "ipset":
        out = ns.run(["ipset", "list", "-t", name], timeout=600).stdout
        found = re.search(r"^Number of entries: (\d+)$", out, re.M)
        return int(found.group(1)) if found else -1
    out = ns.run(["nft", "-j", "list", "set", "inet", "web-ipt-d", name], timeout=600).stdout
    return sum(len(x.get("set", {}).get("elem", [])) for x in json.loads(out)["nftables"])


class Api:
    """One keep-alive HTTPS connection into the namespace, verified against the bench CA."""

    def __init__(self, ns: NetNS, pki: BenchPki, timeout: float = 900):
        self.conn = ns.https_connection(HOST, PORT, pki.certs.client_context(), timeout=timeout)
        self.auth = pki.authorization

    def send(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
             ) -> http.client.HTTPResponse:
        self.conn.request(method, path, body=body, headers={"Authorization": self.auth, **(headers or {})})
        return self.conn.getresponse()

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
             ) -> tuple[int, bytes]:
        reply = self.send(method, path, body, headers)
        return reply.status, reply.read()

    def close(self) -> None:
        self.conn.close()


def bulk_load(api: Api, pid: int, count: int, posts: int, fallback: bool,
              order: Sequence[int] | None = None, query: str = "") -> dict[str, Any]:
    """`count` addresses in `posts` text/plain POSTs; with `fallback` (text/plain not built), JSON lists of PAGE;
    `order`: the pool's indices in the order to send them (a shuffle: a real feed's order), else 0, 1, 2, ...;
    `query`: the POSTs' query string (`?timeout=...`)."""
    note = ""
    if fallback:
        posts = math.ceil(count / PAGE)
    per = math.ceil(count / posts)
    created = existing = 0
    seconds = 0.0
    for lo in range(0, count, per):
        items = [item(i if order is None else order[i]) for i in range(lo, min(count, lo + per))]
        if fallback:
            body, ctype = json.dumps(items).encode(), "application/json"
        else:
            body, ctype = ("\n".join(items) + "\n").encode(), "text/plain; charset=utf-8"
        del items
        t0 = time.perf_counter()
        status, raw = api.call("POST", f"/chain/{CHAIN}{query}", body, {"Content-Type": ctype})
        seconds += time.perf_counter() - t0
        if status in (400, 415) and not fallback and lo == 0:
            return {"unsupported": status, "answer": raw[:300].decode(errors="replace")}
        if status != 200:
            raise RuntimeError(f"POST of {len(body):,} bytes answered {status}: {raw[:500]!r}")
        doc = json.loads(raw)
        created += doc["created"]
        existing += doc["existing"]
        if doc.get("failed"):
            raise RuntimeError(f"POST: {doc['failed']} failed: {raw[:500]!r}")
    if fallback:
        note = f"text/plain not built: JSON lists of {PAGE:,}"
    return {"posts": math.ceil(count / per), "seconds": seconds, "per_s": count / seconds, "created": created,
            "existing": existing, "mem": asdict(Mem.of(pid)), "note": note}


def list_pages(api: Api, pid: int) -> dict[str, Any]:
    """GET /chain/<c>?limit=PAGE, then &after=<next> until next is null."""
    entries = pages = size = 0
    cursor: str | None = None
    t0 = time.perf_counter()
    while True:
        query = f"limit={PAGE}" + ("" if cursor is None else "&after=" + cursor)
        status, raw = api.call("GET", f"/chain/{CHAIN}?{query}")
        if status != 200:
            answer = raw[:200].decode(errors="replace").strip()
            return {"way": f"pages of {PAGE:,}", "note": f"not built: {status} {answer}"}
        doc = json.loads(raw)
        if "next" not in doc:
            return {"way": f"pages of {PAGE:,}", "note": "not built: the answer has no `next` (limit ignored)"}
        entries, pages, size = entries + len(doc["entries"]), pages + 1, size + len(raw)
        if doc["next"] is None:
            break
        cursor = quote(doc["next"], safe="")
    seconds = time.perf_counter() - t0
    return {"way": f"pages of {PAGE:,} ({pages} pages)", "entries": entries, "bytes": size, "seconds": seconds,
            "per_s": entries / seconds, "mem_after": asdict(Mem.of(pid)), "note": ""}


def list_stream(api: Api, pid: int, accept: str) -> dict[str, Any]:
    """GET /chain/<c> (no limit), read as it comes; entries counted without building the document."""
    t0 = time.perf_counter()
    reply = api.send("GET", f"/chain/{CHAIN}", headers={"Accept": accept})
    first = time.perf_counter() - t0
    ctype = reply.getheader("Content-Type") or ""
    chunked = (reply.getheader("Transfer-Encoding") or "").lower() == "chunked"
    size = entries = 0
    tail = b""
    marker = b"\n" if ctype.startswith("text/plain") else b'"network"'
    while chunk := reply.read(1 << 20):
        size += len(chunk)
        data = tail + chunk
        entries += data.count(marker)
        tail = data[-(len(marker) - 1):] if len(marker) > 1 else b""  # a marker cut in two by the chunks
    seconds = time.perf_counter() - t0
    if reply.status != 200:
        return {"way": f"whole chain, Accept {accept}", "note": f"{reply.status}"}
    note = ("chunked" if chunked else "one document (not chunked)") + f", {ctype}; first byte {first:.2f} s"
    return {"way": f"whole chain, Accept {accept}", "entries": entries, "bytes": size, "seconds": seconds,
            "per_s": entries / seconds, "mem_after": asdict(Mem.of(pid)), "note": note}


def singles(api: Api, n: int, start: int, ops: int) -> list[dict[str, Any]]:
    """`ops` PUTs of fresh addresses one after another on one connection, then DELETEs of the same."""
    out = []
    for method, want in (("PUT", 201), ("DELETE", 200)):
        took = []
        for i in range(start, start + ops):
            t0 = time.perf_counter()
            status, raw = api.call(method, f"/chain/{CHAIN}/{FAMILY}/{item(i)}")
            took.append((time.perf_counter() - t0) * 1000)
            if status != want:
                raise RuntimeError(f"{method} answered {status}: {raw[:300]!r}")
        took.sort()
        out.append({"n": n, "op": method, "ops": ops, "p50_ms": percentile(took, 50), "p99_ms": percentile(took, 99)})
    return out


@contextlib.contextmanager
def daemon(target: MillionTarget, pki: BenchPki, root: Path, existing: int, name: str
           ) -> Iterator[tuple[NetNS, Server, Api]]:
    """A fresh namespace and daemon with `existing` entries restored at start, and a warm connection to it."""
    with NetNS.create(prefix="wbench") as ns:
        server = target.start(ns, Path(tempfile.mkdtemp(prefix=f"m-{name}-", dir=root)), pki, FAMILY, existing)
        try:
            api = Api(ns, pki)
            api.call("GET", "/version")  # fills the auth cache: no measured request pays bcrypt
            yield ns, server, api
            api.close()
        finally:
            server.stop()


def bulk_part(target: MillionTarget, pki: BenchPki, root: Path, args: argparse.Namespace, res: BackendResult,
              posts: int, latency: bool, shuffled: bool = False) -> bool:
    """Into a fresh daemon: with `latency`, the single requests at 0 first; then the million in `posts` text/plain
    POSTs (`shuffled`: in a random order, fixed by a seed), or, when the daemon does not take text/plain, in JSON
    lists of PAGE (then False)."""
    order = random.Random(13).sample(range(args.count), args.count) if shuffled else None
    with daemon(target, pki, root, 0, f"bulk{posts}{'s' if shuffled else ''}") as (ns, server, api):
        if latency:
            res.latency += singles(api, 0, args.count + 10, args.ops)
            print(f"  at 0: {res.latency[-2:]}", file=sys.stderr, flush=True)
        if "bulk" not in args.parts:
            return True
        got = bulk_load(api, server.pid, args.count, posts, False, order)
        text = "unsupported" not in got
        if not text:
            res.notes.append(f"text/plain bulk not built: {got['unsupported']} {got['answer']!r}; the bulk "
                             f"load is JSON lists of {PAGE:,} per POST")
            got = bulk_load(api, server.pid, args.count, 1, True)
            got["way"] = f"JSON, {got['posts']} POST{'s' if got['posts'] > 1 else ''} of {PAGE:,}"
        else:
            got["way"] = ("text/plain, one POST" if posts == 1 else f"text/plain, {posts} POSTs") + (
                ", shuffled" if shuffled else "")
        got["kernel"] = count_kernel(ns, target.backend)
        res.bulk.append(got)
        print(f"  bulk: {got}", file=sys.stderr, flush=True)
        if text and posts == 1 and not shuffled:
            # The same list posted again, as a feed is refreshed: as it was (every item held as the load leaves
            # it), then with a timeout (every item's expiry changes, in the store and the kernel).
            for query, way in (("", "the same million again"), ("?timeout=86400", "again, with ?timeout=86400")):
                again = bulk_load(api, server.pid, args.count, 1, False, None, query)
                again["way"] = f"text/plain, one POST: {way}"
                again["kernel"] = count_kernel(ns, target.backend)
                res.bulk.append(again)
                print(f"  bulk: {again}", file=sys.stderr, flush=True)
        return text


def bench_backend(target: MillionTarget, pki: BenchPki, root: Path, args: argparse.Namespace) -> BackendResult:
    res = BackendResult(target.name, args.count)
    # 1. Single requests at 0, then the million in one POST into the same fresh daemon; 2. in 10 POSTs into another
    # (text/plain only: the JSON fallback of 1. is already many POSTs).
    text = True
    if {"bulk", "latency"} & set(args.parts):
        text = bulk_part(target, pki, root, args, res, 1, "latency" in args.parts)
    if text and "bulk" in args.parts:
        bulk_part(target, pki, root, args, res, 10, False)
        # The same million in a random order, as a real feed comes: each batch's keys spread over the whole store.
        bulk_part(target, pki, root, args, res, 1, False, shuffled=True)
    # 3. The million in the state DB, restored at start; then single requests, listing and wrk at 1M.
    if "restore" not in args.parts:
        return res
    with daemon(target, pki, root, args.count, "restore") as (ns, server, api):
        res.populate_s, res.ready_s, res.ready = server.populate_s, server.startup_s, Mem.of(server.pid)
        res.kernel_at_ready = count_kernel(ns, target.backend)
        print(f"  restore: populate {res.populate_s:.1f} s, READY {res.ready_s:.1f} s, {res.ready}, kernel "
              f"{res.kernel_at_ready:,}", file=sys.stderr, flush=True)
        if "latency" in args.parts:
            res.latency += singles(api, args.count, args.count + 10, args.ops)
            print(f"  at 1M: {res.latency[-2:]}", file=sys.stderr, flush=True)
        for way in args.listing:
            got = list_pages(api, server.pid) if way == "pages" else list_stream(
                api, server.pid, "text/plain" if way == "text" else "application/json")
            res.listing.append(got)
            print(f"  listing: {got}", file=sys.stderr, flush=True)
        if args.wrk:
            counter = (lambda: count_kernel(ns, target.backend)) if target.backend == "ipset" else None
            wargs = argparse.Namespace(threads=2, connections=16, seconds=args.wrk_seconds, count=args.wrk_count,
                                       health_seconds=2.0, profile=None, perf=None, sizes=[args.count])
            res.wrk = [asdict(r) for r in wrk_section.wrk_passes(
                ns, server, target.name, args.count, FAMILY, args.count + 100_000, args.wrk_count, wargs, counter)]
        res.end = Mem.of(server.pid)
    return res


# Issue 13's targets at a million entries, checked by `checks()` (bench/wrk.py checks the wrk one at 100k).
MAX_RESTORE_S = 10.0
MAX_RSS_BYTES = 150_000_000  # "150 MB", read as 10^6 bytes, the stricter reading
MAX_PEAK_BYTES = 250_000_000
MAX_BULK_S = 10.0
MAX_FLAT = 1.25  # p50 at 1M / p50 at 0


def checks(results: list[BackendResult]) -> list[tuple[str, str, str]]:
    """(what, the figures, met / NOT MET / not measured) for each backend."""
    out: list[tuple[str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "**NOT MET**")

    for r in results:
        b = r.backend
        out.append((f"{b}: restore of 1M at start <= {MAX_RESTORE_S:g} s (process start to READY=1)",
                    f"{r.ready_s:.1f} s", verdict(None if r.ready is None else r.ready_s <= MAX_RESTORE_S)))
        rss = [("after the restore", r.ready.rss_kib)] if r.ready else []
        rss += [(f"after the bulk load ({x['way']})", x["mem"]["rss_kib"]) for x in r.bulk]
        for what, kib in rss:
            out.append((f"{b}: RSS <= 150 MB {what}", f"{kib * 1024 / 1e6:.0f} MB",
                        verdict(kib * 1024 <= MAX_RSS_BYTES)))
        peaks = ([("the restore daemon, at its end", r.end.hwm_kib)] if r.end else []) + [
            (f"the bulk load ({x['way']})", x["mem"]["hwm_kib"]) for x in r.bulk]
        for what, kib in peaks:
            out.append((f"{b}: peak RSS <= 250 MB, {what}", f"{kib * 1024 / 1e6:.0f} MB",
                        verdict(kib * 1024 <= MAX_PEAK_BYTES)))
        for x in r.bulk:
            out.append((f"{b}: bulk load of 1M through the API <= {MAX_BULK_S:g} s ({x['way']})",
                        f"{x['seconds']:.1f} s", verdict(x["seconds"] <= MAX_BULK_S)))
        for op in ("PUT", "DELETE"):
            lo = next((x for x in r.latency if x["op"] == op and x["n"] == 0), None)
            hi = next((x for x in r.latency if x["op"] == op and x["n"] == r.count), None)
            out.append((f"{b}: single {op} p50 at 1M <= {MAX_FLAT} x p50 at 0",
                        "-" if not (lo and hi) else f"{hi['p50_ms']:.2f} / {lo['p50_ms']:.2f} ms = "
                                                     f"{hi['p50_ms'] / lo['p50_ms']:.2f}",
                        verdict(None if not (lo and hi) else hi["p50_ms"] <= MAX_FLAT * lo["p50_ms"])))
    return out


def tables(results: list[BackendResult]) -> list[str]:
    def mib(kib: int) -> str:
        return f"{kib / 1024:,.0f}"

    out = ["A million entries (IPv6 /128s of 2001:db8:b::/48, in the chain's -v6 set):", "",
           "| backend | restore: populate s | process start to READY=1 s | RSS at READY MiB | VmHWM MiB | kernel |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.ready is not None:
            out.append(f"| {r.backend} | {r.populate_s:.1f} | {r.ready_s:.1f} | {mib(r.ready.rss_kib)} | "
                       f"{mib(r.ready.hwm_kib)} | {r.kernel_at_ready:,} |")
    out += ["", "| backend | bulk load through the API | s | entries/s | created | RSS after MiB | VmHWM MiB "
                "| kernel |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for b in r.bulk:
            out.append(f"| {r.backend} | {b['way']} | {b['seconds']:.1f} | {b['per_s']:,.0f} | {b['created']:,} | "
                       f"{mib(b['mem']['rss_kib'])} | {mib(b['mem']['hwm_kib'])} | {b['kernel']:,} |")
    out += ["", "| backend | listing at the count | entries | MB | s | entries/s | RSS after MiB | VmHWM MiB | note |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        for x in r.listing:
            if "entries" not in x:
                out.append(f"| {r.backend} | {x['way']} | | | | | | | {x['note']} |")
                continue
            out.append(f"| {r.backend} | {x['way']} | {x['entries']:,} | {x['bytes'] / 1e6:,.1f} | {x['seconds']:.1f} "
                       f"| {x['per_s']:,.0f} | {mib(x['mem_after']['rss_kib'])} | {mib(x['mem_after']['hwm_kib'])} "
                       f"| {x['note']} |")
    out += ["", "| backend | op | ops | p50 ms at 0 | p50 ms at 1M | ratio | p99 ms at 0 | p99 ms at 1M |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for op in ("PUT", "DELETE"):
            lo = next((x for x in r.latency if x["op"] == op and x["n"] == 0), None)
            hi = next((x for x in r.latency if x["op"] == op and x["n"] == r.count), None)
            if lo and hi:
                out.append(f"| {r.backend} | {op} | {lo['ops']} | {lo['p50_ms']:.2f} | {hi['p50_ms']:.2f} | "
                           f"{hi['p50_ms'] / lo['p50_ms']:.2f} | {lo['p99_ms']:.2f} | {hi['p99_ms']:.2f} |")
    wrk_rows = [wrk_section.WrkResult(**w) for r in results for w in r.wrk]
    if wrk_rows:
        out += ["", "wrk at 1M (IPv6 fresh addresses):", ""]
        out += wrk_section.table(wrk_rows)
    for r in results:
        if r.end is not None:
            out.append(f"\n{r.backend}: at the end of the 1M daemon RSS {mib(r.end.rss_kib)} MiB, VmHWM "
                       f"{mib(r.end.hwm_kib)} MiB (after the listing and the rest).")
        out += [f"{r.backend}: {n}".replace("\n", " ") for n in r.notes]
    out += ["", "Target checks (issue 13, at a million):", "", "| target | measured | result |", "|---|---|---|"]
    out += [f"| {what} | {figure} | {result} |" for what, figure, result in checks(results)]
    out += ["", "Single requests: one keep-alive connection (http.client), one request at a time, fresh addresses "
                "of the same pool; p50/p99 nearest rank. Bulk: each way into a fresh daemon; s is the POSTs' time "
                "(the bodies are built before)."]
    return out


def section(args: argparse.Namespace, src: Path | None = None) -> list[BackendResult]:
    targets = catalog(src=src)
    root = Path(tempfile.mkdtemp(prefix="wipt-million-", dir="/tmp"))
    results = []
    try:
        pki = make_bench_pki(root)
        for name in args.targets:
            base = targets[name]
            assert isinstance(base, WebiptdTarget)
            print(f"{name}: a million", file=sys.stderr, flush=True)
            results.append(bench_backend(MillionTarget(base.name, base.description, base.backend, base.src), pki,
                                         root, args))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=",".join(SET_BACKENDS), help="set backends (default ipset,nftables)")
    p.add_argument("--count", type=int_list, default=[MILLION], help="entries (default 1000000)")
    p.add_argument("--ops", type=int, default=500, help="single PUTs (then DELETEs) at 0 and at the count "
                                                        "(default 500)")
    p.add_argument("--parts", default="latency,bulk,restore",
                   help="latency (single requests at 0 and at the count), bulk (the loads through the API), "
                        "restore (the start with the count in place; listing and wrk run on that daemon) "
                        "(default all)")
    p.add_argument("--listing", default="pages,json,text",
                   help="listing ways at the count: pages (limit and cursor), json (the whole chain), text "
                        "(Accept: text/plain) (default all)")
    p.add_argument("--no-wrk", dest="wrk", action="store_false", help="no wrk passes at the count")
    p.add_argument("--wrk-count", type=int, default=30_000, help="fresh addresses of the wrk passes (default 30000)")
    p.add_argument("--wrk-seconds", type=float, default=10.0, help="wrk pass bound (default 10)")
    p.add_argument("--src", type=Path, metavar="DIR", help="run web-ipt-d from this source tree")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", type=Path, metavar="PATH")
    args = p.parse_args(argv)
    args.count = args.count[0]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.listing = [w.strip() for w in args.listing.split(",") if w.strip()]
    args.parts = [w.strip() for w in args.parts.split(",") if w.strip()]
    if any(x not in ("latency", "bulk", "restore") for x in args.parts):
        p.error("--parts takes latency, bulk, restore")
    if any(t not in SET_BACKENDS for t in args.targets) or any(w not in ("pages", "json", "text")
                                                                for w in args.listing):
        p.error("--targets takes set backends; --listing pages, json, text")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import os

    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/million.py needs root: its daemons run in private network namespaces", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)
    machine = machine_info()
    try:
        results = section(args, args.src)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    print(f"Machine: nproc {machine['nproc']}, kernel {machine['kernel']}, Python {machine['python']}; load "
          f"average {machine['loadavg_start']} at start, {loadavg()} at end.\n")
    print("\n".join(tables(results)))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
