"""Section `fleet` (issue 11): three daemons sharing a chain through a private Redis (tests/fleet_net.py).
Measures how fast a ban on A reaches B's and C's kernels at a paced rate, how fast a stopped node catches up on
100k bans, and what the fleet costs A's local block rate; `--parts busy`: how fast B's bans reach A while A
itself publishes thousands of changes a second. Run as root: `bench/fleet.py`, or
`bench/run.py --sections fleet`. Prints Markdown tables; not a test.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import mmap
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from common import PORT, loadavg, percentile, proc_cpu_seconds  # first: it puts src/ and tests/ on sys.path

from clients import ClientPool, LeanClient
from tests.harness import FAST_HASH, PASSWORDS, basic, client_context, make_pki, stop_process

FIRST = "198.18.0.0"  # the bench's IPv4 pool (common.POOLS); propagation takes the first addresses
CATCHUP_OFFSET = 16_384  # catch-up's addresses start here, after propagation's
POOL = 131_072  # addresses in 198.18.0.0/15
BUSY_OFFSET = 65_536  # the busy part's load on A: its addresses start here (it runs in a fleet of its own)
PACE_CONNS = 8
WATCH_SLEEP = 0.0005  # between two probes of a watcher: the resolution it aims at
WATCH_WINDOW = 1024  # most elements one probe asks about (when many lag)
PROGRESS = struct.Struct("=q")  # a pacer's slot in the progress file: the last index it sent
IPSET_CMD_TEST = 11  # ip_set.h: answers 0 (in the set) or IPSET_ERR_EXIST (not in it)


# -- agents: small processes started inside a node's namespace ------------------------------------------------


class _Here:
    """LeanClient's namespace, for a process already inside it: plain connects."""

    @staticmethod
    def connect(host: str, port: int, timeout: float | None = None, source: str | None = None) -> socket.socket:
        return socket.create_connection((host, port), timeout=timeout)


def _path(chain: str, index: int) -> str:
    return f"/chain/{chain}/ipv4/{ipaddress.IPv4Address(FIRST) + index}"


def _pace(spec: dict[str, Any]) -> list[list[Any]]:
    """One keep-alive connection sending its share of the PUTs, each at its due time (open loop: a late request is
    sent at once, its lateness recorded). Rows: index, due, sent, answered (monotonic), answered (wall), status."""
    conn = LeanClient(_Here(), spec["host"], spec["port"], client_context(spec["cafile"]),
                      os.environ["WIPT_BENCH_AUTH"], 30.0)
    status, _ = conn.request("GET", "/version")
    if status != 200:
        raise RuntimeError(f"GET /version answered {status}")
    rows: list[list[Any]] = []
    start, rate = spec["start_at"], spec["rate"]
    with open(spec["progress"], "r+b") as fd:
        progress = mmap.mmap(fd.fileno(), 0)
    slot = spec["index"] * PROGRESS.size
    for i in range(spec["index"], spec["count"], spec["conns"]):
        due = start + i / rate
        while (left := due - time.monotonic()) > 0:
            time.sleep(left)
        sent = time.monotonic()
        PROGRESS.pack_into(progress, slot, i)
        status, _ = conn.request("PUT", _path(spec["chain"], i))
        rows.append([i, due, sent, time.monotonic(), time.time(), status])
    conn.close()
    return rows


def _ipset_probe(set_name: str) -> Callable[[list[int]], list[bool]]:
    from webiptd.firewall.ipset_netlink import IpsetNetlink, Element

    nl = IpsetNetlink()
    base = ipaddress.IPv4Address(FIRST)

    def probe(indices: list[int]) -> list[bool]:
        # IpsetNetlink.test: one message an element (apply() sends the batch form, which a test does not take:
        # every probe then failed, and the kernel column was empty).
        return nl.test([Element(IPSET_CMD_TEST, set_name, ipaddress.ip_network(base + i), False) for i in indices])

    return probe


def _nft_probe(set_name: str) -> Callable[[list[int]], list[bool]]:
    import nftables

    nft = nftables.Nftables()
    nft.set_json_output(True)
    base = int(ipaddress.IPv4Address(FIRST))
    query = {"nftables": [{"list": {"set": {"family": "inet", "table": "web-ipt-d", "name": set_name}}}]}

    def probe(indices: list[int]) -> list[bool]:
        rc, out, err = nft.json_cmd(query)
        if rc != 0:
            raise RuntimeError(f"nft list set {set_name}: {err}")
        held = set()
        for item in out["nftables"]:
            for elem in item.get("set", {}).get("elem", []):
                val = elem["elem"]["val"] if isinstance(elem, dict) and "elem" in elem else elem
                if isinstance(val, str):
                    held.add(int(ipaddress.IPv4Address(val)) - base)
        return [i in held for i in indices]

    return probe


def _watch(spec: dict[str, Any]) -> dict[str, Any]:
    """Ask the kernel, in a tight loop, about each element whose PUT was sent to A and is not yet seen;
    note when each is first seen (monotonic, after the probe that found it: an upper bound)."""
    probe = (_ipset_probe if spec["backend"] == "ipset" else _nft_probe)(spec["set"])
    count = spec["count"]
    with open(spec["progress"], "rb") as fd:
        progress = mmap.mmap(fd.fileno(), 0, prot=mmap.PROT_READ)
    slots = range(0, len(progress), PROGRESS.size)
    seen: list[float | None] = [None] * count
    lo, rounds, probe_s = 0, 0, 0.0
    while lo < count and time.monotonic() < spec["deadline"]:
        due = min(count, 1 + max(PROGRESS.unpack_from(progress, k)[0] for k in slots))  # sent so far
        todo = [i for i in range(lo, min(due, lo + WATCH_WINDOW)) if seen[i] is None]
        if todo:
            t0 = time.monotonic()
            present = probe(todo)
            t1 = time.monotonic()
            rounds += 1
            probe_s += t1 - t0
            for i, there in zip(todo, present):
                if there:
                    seen[i] = t1
            while lo < count and seen[lo] is not None:
                lo += 1
        time.sleep(WATCH_SLEEP)
    return {"seen": seen, "rounds": rounds, "probe_s": probe_s}


def agent_main(kind: str, spec_text: str) -> int:
    spec = json.loads(spec_text)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us by PID
    result: Any = _pace(spec) if kind == "pace" else _watch(spec)
    sys.stdout.write(json.dumps(result))
    return 0


# -- the fleet --------------------------------------------------------------------------------------------


def _configure(name: str, config: dict[str, Any]) -> None:
    config["log"]["level"] = "INFO"  # audit lines are INFO; DEBUG would cost every request a line
    config["limits"].update(worker_timeout=60, request_timeout=60)


def _agent(ns: Any, kind: str, spec: dict[str, Any], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return ns.popen([sys.executable, str(Path(__file__).resolve()), "--agent", kind, json.dumps(spec)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    env={**os.environ, **(env or {})})


def _collect(proc: subprocess.Popen[str], timeout: float) -> Any:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise RuntimeError("an agent did not finish in time") from None
    if proc.returncode != 0:
        raise RuntimeError(f"an agent failed ({proc.returncode}): {err[-2000:]}")
    return json.loads(out)


def _set_name(backend: str) -> str:
    from tests.fleet_net import CHAIN
    return f"{CHAIN}-v4"


def _kernel_count(d: Any, backend: str) -> int:
    name = _set_name(backend)
    if backend == "ipset":
        out = d.ns.run(["ipset", "list", "-t", name]).stdout
        return int(out.split("Number of entries:", 1)[1].split()[0])
    out = d.ns.run(["nft", "-j", "list", "set", "inet", "web-ipt-d", name]).stdout
    return sum(len(i.get("set", {}).get("elem", [])) for i in json.loads(out)["nftables"])


def _stats(values: Sequence[float]) -> dict[str, float]:
    s = sorted(values)
    return {"n": len(s), "p50": percentile(s, 50), "p99": percentile(s, 99), "max": s[-1] if s else math.nan}


_AUDIT_TIME = "%Y-%m-%d %H:%M:%S"


def _audit_times(log: str, source: str) -> dict[int, float]:
    """Index -> wall time of the audit line `user=fleet:<source> ... action=block ... network=<addr>/32`."""
    base = int(ipaddress.IPv4Address(FIRST))
    out: dict[int, float] = {}
    needle = f"user=fleet:{source} "
    for line in log.splitlines():
        if needle not in line or " action=block " not in line:
            continue
        stamp, ms = line[:19], line[20:23]
        net = line.split(" network=", 1)[1].split()[0]
        i = int(ipaddress.ip_network(net).network_address) - base
        out.setdefault(i, time.mktime(time.strptime(stamp, _AUDIT_TIME)) + int(ms) / 1000)
    return out


def propagation(f: Any, backend: str, rate: float, seconds: float, source: str = "a",
                watchers: Sequence[str] = ("b", "c"), busy: str | None = None) -> dict[str, Any]:
    """PUTs on `source` at `rate` for `seconds`; when each entry is in the `watchers`' kernels, against the 2xx.
    `busy`: a node that takes wrk's full load of blocks of its own meanwhile (from BUSY_OFFSET; 16 connections), so
    that it publishes thousands of changes a second and its follower reads mostly its own echo."""
    from tests.fleet_net import CHAIN
    count = int(rate * seconds)
    start_at = time.monotonic() + 4.0  # the agents' Python starts and connects first
    progress = f.root / "progress"
    progress.write_bytes(PROGRESS.pack(-1) * PACE_CONNS)
    watch = {n: _agent(f[n].ns, "watch", {"backend": backend, "set": _set_name(backend), "count": count,
                                          "progress": str(progress), "deadline": start_at + seconds + 30})
             for n in watchers}
    pki = f[source].pki
    authorization = basic("admin", PASSWORDS["admin"])
    load = None
    if busy is not None:
        from wrk import wrk_command
        load = f[busy].ns.popen(wrk_command(16, 1, seconds + 6, "block.lua", f"https://127.0.0.1:{PORT}/",
                                            authorization, ["PUT", CHAIN, "ipv4", str(BUSY_OFFSET), "60000"]),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pacers = [_agent(f[source].ns, "pace", {"host": "127.0.0.1", "port": PORT, "cafile": str(pki.ca),
                                            "chain": CHAIN, "count": count, "rate": rate, "conns": PACE_CONNS,
                                            "index": k, "start_at": start_at, "progress": str(progress)},
                     env={"WIPT_BENCH_AUTH": authorization}) for k in range(PACE_CONNS)]
    rows = sorted(r for p in pacers for r in _collect(p, seconds + 60))
    seen = {n: _collect(p, seconds + 60) for n, p in watch.items()}
    busy_rate = math.nan
    if load is not None:
        out, err = load.communicate(timeout=seconds + 120)
        got = _wrk_json(subprocess.CompletedProcess(load.args, load.returncode, out, err))
        from wrk import result
        done = result(busy or "", 0, "block", 16, got, 0.0)
        busy_rate = done.ok / done.seconds
    ok = [r for r in rows if 200 <= r[5] < 300]
    answered = {r[0]: r for r in ok}
    span = max(r[3] for r in rows) - min(r[2] for r in rows)
    out: dict[str, Any] = {
        "backend": backend, "offered": rate, "requests": len(rows), "ok": len(ok),
        "achieved": len(rows) / span if span > 0 else math.nan,
        "put_ms": _stats([(r[3] - r[2]) * 1000 for r in ok]),
        "late_ms": _stats([(r[2] - r[1]) * 1000 for r in rows]),
        "nodes": {}, "source": source, "busy": busy, "busy_rate": busy_rate,
    }
    for n in watchers:
        w = seen[n]
        kernel = [(w["seen"][i] - r[3]) * 1000 for i, r in answered.items() if w["seen"][i] is not None]
        audit = _audit_times(f[n].log(), source)
        logged = [(audit[i] - r[4]) * 1000 for i, r in answered.items() if i in audit]
        out["nodes"][n] = {"kernel_ms": _stats(kernel), "missing": len(answered) - len(kernel),
                           "probe_ms": 1000 * w["probe_s"] / max(1, w["rounds"]), "rounds": w["rounds"],
                           "audit_ms": _stats(logged)}
    return out


def catchup(f: Any, backend: str, total: int, chunk: int = 10_000) -> dict[str, Any]:
    """B stopped; A takes `total` bans in bulk POSTs; B started: until its lag is 0 and its kernel has them all."""
    from tests.fleet_net import EVENTS, bulk, host_range, wait_until
    assert f.stop("b") == 0, "node b did not stop cleanly"
    first = str(ipaddress.IPv4Address(FIRST) + CATCHUP_OFFSET)
    items = host_range(total, first)
    t0 = time.monotonic()
    for i in range(0, total, chunk):
        r = bulk(f["a"], items[i:i + chunk])
        if r.status != 200:
            raise RuntimeError(f"bulk POST on A: {r}")
    a_s = time.monotonic() - t0
    wait_until(lambda: f.published("a"), 300, "A published its outbox", every=0.2)
    a_published_s = time.monotonic() - t0
    expected = _kernel_count(f["a"], backend)
    b = f["b"]
    started = time.monotonic()
    b.start(wait=False)
    b.wait_notify("READY=1", timeout=120)
    ready = time.monotonic()
    end_id = f.redis.client().xinfo_stream(EVENTS)["last-generated-id"]
    lag0 = kernel = math.nan
    early_lag0 = math.nan  # /fleet said connected and lag 0 with the cursor short of the stream's end
    while time.monotonic() - started < 300 and (math.isnan(lag0) or math.isnan(kernel)):
        now = time.monotonic()
        if math.isnan(lag0):
            s = f.status("b")
            if s["connected"] and s["lag_events"] == 0:
                if s["last_applied_id"] == end_id:
                    lag0 = now
                elif math.isnan(early_lag0):
                    early_lag0 = now
        if math.isnan(kernel) and _kernel_count(b, backend) >= expected:
            kernel = now
        time.sleep(0.05)
    return {"backend": backend, "events": total, "a_bulk_s": a_s, "a_published_s": a_published_s,
            "expected": expected, "ready_s": ready - started, "lag0_s": lag0 - started,
            "kernel_s": kernel - started, "complete_s": max(lag0, kernel) - started,
            "after_ready_s": max(lag0, kernel) - ready, "early_lag0_s": early_lag0 - started}


@dataclass
class _Endpoint:
    ns: Any
    host: str
    port: int
    cafile: Path
    authorization: str


DAEMON_CPU, LOAD_CPU = 0, 1  # --pin: the daemon's core, and the one wrk (or the clients) and redis-server share


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` on `cpus` (sched_setaffinity(2) moves one thread; threads made later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            continue  # ended meanwhile


class _Load:
    """A cost run's load on A: `clients` Python processes (the throughput section's ClientPool, each request's
    address from a list), or wrk (C; bench/wrk/block.lua: fresh addresses of 198.18.0.0/15 from index 0) in A's
    namespace. Either blocks for `seconds` and then unblocks every address it sent."""

    def __init__(self, driver: str, clients: int, connections: int, seconds: float, ops: int, pinned: bool):
        self.driver, self.clients, self.connections, self.seconds, self.ops = driver, clients, connections, seconds, ops
        self.pinned = pinned
        self.pool: ClientPool | None = None
        if driver == "python":
            mine = os.sched_getaffinity(0)
            if pinned:  # the client processes inherit this process's affinity
                os.sched_setaffinity(0, {LOAD_CPU})
            try:
                self.pool = ClientPool(clients)
            finally:
                os.sched_setaffinity(0, mine)

    def run(self, d: Any, pki: Any, sample: Callable[[], Any], start: int = 0, quota: int | None = None,
            unblock: bool = True) -> dict[str, Any]:
        """Block the addresses from index `start` (at most `quota`, default `ops`), then unblock them (unless not
        `unblock`): the block pass's figures, and `sample()` before and after it."""
        from tests.fleet_net import CHAIN
        authorization = basic("admin", PASSWORDS["admin"])
        quota = self.ops if quota is None else quota
        if self.pool is not None:
            self.pool.connect(_Endpoint(d.ns, "127.0.0.1", PORT, pki.ca, authorization))
            todo = [_path(CHAIN, i) for i in range(start, start + quota)]
            try:
                replies, sent, before, after = self.pool.run(self.clients, "PUT", todo, 201, budget=self.seconds,
                                                             sample=sample)
                span = max(r["t1"] for r in replies) - min(r["t0"] for r in replies)
                lat = sorted(x for r in replies for x in r["latencies"])
                if unblock:
                    self.pool.run(self.clients, "DELETE", sent, 200)
            finally:
                self.pool.disconnect()
            return {"blocks": len(sent), "rate": len(sent) / span, "p50_ms": percentile(lat, 50) * 1000,
                    "p99_ms": percentile(lat, 99) * 1000, "errors": sum(len(r["errors"]) for r in replies),
                    "before": before, "after": after}
        from wrk import result, wrk_command
        url = f"https://127.0.0.1:{PORT}/"
        taskset = ["taskset", "-c", str(LOAD_CPU)] if self.pinned else []
        before = sample()
        done = d.ns.run(taskset + wrk_command(self.connections, 1, self.seconds, "block.lua", url, authorization,
                                              ["PUT", CHAIN, "ipv4", str(start), str(quota)]),
                        timeout=self.seconds + 120, check=False)
        after = sample()
        got = _wrk_json(done)
        block = result("a", 0, "block", self.connections, got, 0.0)
        if unblock:
            _wrk_json(d.ns.run(taskset + wrk_command(
                self.connections, 1, 4 * self.seconds, "block.lua", url, authorization,
                ["DELETE", CHAIN, "ipv4", str(start), ",".join(map(str, block.sent))]),
                timeout=4 * self.seconds + 120, check=False))
        return {"blocks": block.ok, "rate": block.ok / block.seconds, "p50_ms": block.p50_ms, "p99_ms": block.p99_ms,
                "errors": sum(block.errors.values()) + block.other, "before": before, "after": after}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def _wrk_json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK-JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-2000:]} {done.stderr[-2000:]}")
    got: dict[str, Any] = json.loads(line.removeprefix("WRK-JSON "))
    return got


def cost(pki: Any, hashes: dict[str, str], backend: str, seconds: float, pairs: int, clients: int,
         ops: int = 60_000, profile: Path | None = None, reference: Path | None = None, driver: str = "wrk",
         connections: int = 16, pinned: bool = False, slices: int = 0) -> dict[str, Any]:
    """A's block rate with a fleet (shared chain, Redis in its namespace, no other node) against the same config
    without; runs interleaved, the order swapped each pair. Every run's entries are unblocked after it. With
    `slices`, that many rounds of short runs instead (`seconds` each), nothing unblocked in between: each round
    blocks fresh addresses (a share of the pool), so that the variants' runs lie seconds apart rather than the
    minute an unblock pass takes, and this VM's drift weighs less on their ratio. With
    `reference` (another checkout's src/), a third variant `fleet-ref`: the fleet run by that code, interleaved with
    the other two, so that a change is compared under the same load. `pinned`: every daemon on DAEMON_CPU, the load
    and every redis-server on LOAD_CPU, so that the rate is the daemon's on a core of its own."""
    from tests.fleet_net import Fleet, wait_until
    made: list[Any] = []
    load: _Load | None = None
    runs: list[dict[str, Any]] = []
    try:
        fleets = {}
        variants = [("fleet", True), ("plain", False)] + ([("fleet-ref", True)] if reference is not None else [])
        for variant, on in variants:
            fl = Fleet(pki, hashes, (backend,), names=("a",), fleet=on, configure=_configure)
            made.append(fl)
            if variant == "fleet-ref":
                fl.redis.start()
                fl["a"].start(PYTHONPATH=str(reference))
            else:
                fl.start("a", redis_too=on)
            if on:
                wait_until(lambda fl=fl: fl.caught_up("a"), 30, "A follows the stream")
            if pinned:
                pin(fl["a"].pid, {DAEMON_CPU})
                if on:
                    pin(fl.redis.proc.pid, {LOAD_CPU})
            fleets[variant] = fl
        load = _Load(driver, clients, connections, seconds, ops, pinned)
        quota = min(ops, POOL // slices) if slices else ops
        pairs = slices or pairs
        for pair in range(pairs):
            order = [v for v, _ in variants]
            for variant in order[pair % len(order):] + order[:pair % len(order)] if len(order) > 2 else (
                    order if pair % 2 == 0 else order[::-1]):
                fl = fleets[variant]
                d = fl["a"]
                pids = [d.pid] + ([fl.redis.proc.pid] if variant != "plain" else [])
                names = thread_names(d.pid)

                def cpu(pids: list[int] = pids) -> tuple[list[float], dict[int, tuple[float, float]]]:
                    return [proc_cpu_seconds(p) for p in pids], thread_cpu(pids[0])

                batches0 = _batches(d)
                profiler = None
                if profile is not None:
                    from throughput import Profiler
                    profiler = Profiler(d.pid, profile / f"{backend}-{variant}-{pair + 1}",
                                        ["--gil", "--duration", str(int(seconds) + 2)], top=40)
                try:
                    got = load.run(d, pki, cpu, pair * quota if slices else 0, quota, unblock=not slices)
                finally:
                    if profiler is not None:
                        profiler.stop()
                (cpu0, threads0), (cpu1, threads1) = got["before"], got["after"]
                batches1 = _batches(d)
                outbox = fl.status("a")["outbox"] if variant != "plain" else None
                if variant != "plain":
                    wait_until(lambda fl=fl: fl.published("a"), 120, "A published its outbox", every=0.2)
                blocks = got["blocks"]
                runs.append({"pair": pair + 1, "variant": variant, "blocks": blocks, "rate": got["rate"],
                             "p50_ms": got["p50_ms"], "p99_ms": got["p99_ms"],
                             "errors": got["errors"], "outbox_at_end": outbox, "loadavg": loadavg(),
                             "daemon_cpu_ms": 1000 * (cpu1[0] - cpu0[0]) / max(1, blocks),
                             "thread_cpu_ms": by_thread(names, threads0, threads1, blocks),
                             "batch_mean": (batches1[1] - batches0[1]) / max(1, batches1[0] - batches0[0]),
                             "redis_cpu_ms": 1000 * (cpu1[1] - cpu0[1]) / max(1, blocks) if len(pids) > 1 else None})
    finally:
        if load is not None:
            load.close()
        for fl in made:
            fl.close()
    rate = {(r["pair"], r["variant"]): r["rate"] for r in runs}
    mean = {v: sum(rate[p, v] for p in range(1, pairs + 1)) / pairs for v in ("fleet", "plain")}
    cpu_ms = {v: sum(r["daemon_cpu_ms"] for r in runs if r["variant"] == v) / pairs for v, _ in variants}
    ref: dict[str, float] = {}
    if reference is not None:
        ref = {"ref_ratio": sum(rate[p, "fleet-ref"] for p in range(1, pairs + 1)) / pairs / mean["plain"],
               "ref_cpu_ratio": cpu_ms["plain"] / cpu_ms["fleet-ref"]}
    return {"backend": backend, "driver": driver, "pinned": pinned, "slices": slices,
            "clients": clients if driver == "python" else connections, "seconds": seconds, "runs": runs, **ref,
            "ratio": mean["fleet"] / mean["plain"], "cpu_ratio": cpu_ms["plain"] / cpu_ms["fleet"],
            "pair_ratios": [rate[p, "fleet"] / rate[p, "plain"] for p in range(1, pairs + 1)]}


# -- where a daemon's CPU goes, by thread ---------------------------------------------------------------------


def _py_spy() -> str:
    return shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


def thread_names(pid: int) -> dict[int, str]:
    """The daemon's threads by OS thread id, from `py-spy dump` (Python 3.11 does not name them in /proc); the
    connection threads pooled as `conn-*`. Empty without py-spy."""
    try:
        dump = subprocess.run([_py_spy(), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names = {}
    for tid, name in re.findall(r'^Thread (\d+) \([^)]*\): "([^"]*)"', dump.stdout, re.M):
        names[int(tid)] = "conn-*" if name.startswith("conn-") else name
    return names


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """CPU seconds (user, system) of each thread of `pid` so far (proc(5), /proc/PID/task/TID/stat)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue  # ended meanwhile
        tick = os.sysconf("SC_CLK_TCK")
        out[int(tid)] = int(fields[11]) / tick, int(fields[12]) / tick
    return out


def _batches(d: Any) -> tuple[float, float]:
    """The worker's batches so far and the commands in them (webiptd_batch_size_commands' count and sum)."""
    r = d.request("GET", "/metrics")
    found = dict(re.findall(r"^webiptd_batch_size_commands_(count|sum) (\S+)$", r.raw.decode(), re.M))
    return float(found.get("count", 0)), float(found.get("sum", 0))


def by_thread(names: dict[int, str], before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]],
              blocks: int) -> dict[str, list[float]]:
    """CPU ms a block of each named thread, [user + system, system] (threads of one name summed; unnamed ones as
    `other`)."""
    out: dict[str, list[float]] = {}
    for tid, (user, system) in after.items():
        user0, system0 = before.get(tid, (0.0, 0.0))
        total = out.setdefault(names.get(tid, "other"), [0.0, 0.0])
        total[0] += 1000 * (user + system - user0 - system0) / max(1, blocks)
        total[1] += 1000 * (system - system0) / max(1, blocks)
    return dict(sorted(out.items(), key=lambda x: -x[1][0]))


# -- the section --------------------------------------------------------------------------------------------


def run(backends: Sequence[str], parts: Sequence[str], rate: float, seconds: float, catchup_total: int,
        cost_seconds: float, pairs: int, clients: int, log: Callable[[str], None],
        profile: Path | None = None, reference: Path | None = None, driver: str = "wrk", connections: int = 16,
        pins: Sequence[bool] = (False,), busy_rate: float = 50, slices: int = 0) -> dict[str, Any]:
    from tests.fleet_net import Fleet, wait_until
    results: dict[str, Any] = {"propagation": [], "catchup": [], "busy": [], "cost": [], "loadavg_start": loadavg()}
    root = Path(tempfile.mkdtemp(prefix="wipt-fleet-", dir="/tmp"))
    pki = make_pki(root / "pki", "fleet bench")
    hashes = {name: FAST_HASH.hash(pw) for name, pw in PASSWORDS.items()}
    for backend in backends:
        if "propagation" in parts or "catchup" in parts:
            with Fleet(pki, hashes, (backend,) * 3, configure=_configure) as f:
                f.start()
                for n in f.nodes:
                    wait_until(lambda n=n: f.caught_up(n), 30, f"node {n} caught up")
                if "propagation" in parts:
                    log(f"{backend}: propagation, {rate:g}/s for {seconds:g} s")
                    results["propagation"].append(propagation(f, backend, rate, seconds))
                if "catchup" in parts:
                    log(f"{backend}: catch-up of {catchup_total:,} bans")
                    results["catchup"].append(catchup(f, backend, catchup_total))
        if "busy" in parts:
            with Fleet(pki, hashes, (backend,) * 3, configure=_configure) as f:
                f.start()
                for n in f.nodes:
                    wait_until(lambda n=n: f.caught_up(n), 30, f"node {n} caught up")
                log(f"{backend}: propagation from B, {busy_rate:g}/s for {seconds:g} s, while A takes wrk's load")
                results["busy"].append(propagation(f, backend, busy_rate, seconds, source="b", watchers=("a", "c"),
                                                   busy="a"))
        for pinned in pins if "cost" in parts else ():
            log(f"{backend}: cost, {f'{slices} rounds' if slices else f'{pairs} pairs'} of {cost_seconds:g} s runs, "
                f"{f'{clients} clients' if driver == 'python' else f'wrk, {connections} connections'}"
                f"{', pinned' if pinned else ''}")
            results["cost"].append(cost(pki, hashes, backend, cost_seconds, pairs, clients, profile=profile,
                                        reference=reference, driver=driver, connections=connections,
                                        pinned=pinned, slices=slices))
    results["loadavg_end"] = loadavg()
    shutil.rmtree(root, ignore_errors=True)
    return results


def _ms(s: dict[str, float]) -> str:
    return f"{s['p50']:.1f} | {s['p99']:.1f} | {s['max']:.1f}"


def tables(results: dict[str, Any]) -> list[str]:
    out = [f"Fleet (issue 11): three nodes, each in its own namespace, Redis in a fourth; 2 cores shared by all, "
           f"load average {results['loadavg_start']} at start, {results['loadavg_end']} at end."]
    if results["propagation"]:
        out += ["", "Propagation: A's 2xx to the entry in B's and C's kernels (a watcher in each node's namespace "
                "asks the kernel about every due element in a tight loop; the time after the probe that found it), "
                "and to the follower's audit line (log timestamp, ms, wall clock)", "",
                "| backend | PUTs on A (offered/s, sent/s, 2xx) | A's PUT p50 / p99 ms | node | kernel p50 | p99 "
                "| max ms | missing | probe ms | audit line p50 | p99 | max ms |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in results["propagation"]:
            for n, v in p["nodes"].items():
                out.append(f"| {p['backend']} | {p['offered']:g}, {p['achieved']:.0f}, {p['ok']:,} | "
                           f"{p['put_ms']['p50']:.1f} / {p['put_ms']['p99']:.1f} | {n} | {_ms(v['kernel_ms'])} | "
                           f"{v['missing']} | {v['probe_ms']:.2f} | {_ms(v['audit_ms'])} |")
    if results["busy"]:
        out += ["", "Busy: B's PUTs to the entry in A's and C's kernels while A takes wrk's full load of blocks of its "
                "own (A's follower reads mostly its own echo); C is idle", "",
                "| backend | PUTs on B (offered/s, sent/s, 2xx) | A's blocks/s meanwhile | node | kernel p50 | p99 | "
                "max ms | missing | audit line p50 | p99 | max ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in results["busy"]:
            for n, v in p["nodes"].items():
                out.append(f"| {p['backend']} | {p['offered']:g}, {p['achieved']:.0f}, {p['ok']:,} | "
                           f"{p['busy_rate']:,.0f} | {n} | {_ms(v['kernel_ms'])} | {v['missing']} | "
                           f"{_ms(v['audit_ms'])} |")
    if results["catchup"]:
        out += ["", "Catch-up: B stopped, A takes the bans in bulk POSTs of 10k, then B starts (seconds from "
                "B's process start)", "",
                "| backend | events | A: bulk / published s | READY | cursor at the stream's end, lag 0 "
                "| kernel complete | READY to complete | /fleet said lag 0 too early at |",
                "|---|---|---|---|---|---|---|---|"]
        for c in results["catchup"]:
            out.append(f"| {c['backend']} | {c['events']:,} | {c['a_bulk_s']:.1f} / {c['a_published_s']:.1f} | "
                       f"{c['ready_s']:.2f} | {c['lag0_s']:.2f} | {c['kernel_s']:.2f} | {c['after_ready_s']:.2f} | "
                       f"{'-' if math.isnan(c['early_lag0_s']) else format(c['early_lag0_s'], '.2f')} |")
    if results["cost"]:
        out += ["", "Cost: A's local block rate (PUTs, keep-alive connections, closed loop) with the fleet (shared "
                "chain, Redis up, no other node) and without; interleaved. Load: `python` N clients (ClientPool) or "
                f"`wrk` N connections; `pinned`: the daemon on CPU {DAEMON_CPU}, the load and redis-server on CPU "
                f"{LOAD_CPU}", "",
                "| backend, load | pair | variant | blocks/s | PUT p50 / p99 ms | CPU ms a block: daemon / redis "
                "| outbox at end | errors |", "|---|---|---|---|---|---|---|---|"]
        for c in results["cost"]:
            c["label"] = (f"{c['backend']}, {c.get('driver', 'python')} {c['clients']}"
                          f"{', pinned' if c.get('pinned') else ''}"
                          + (f", {len(c['pair_ratios'])} rounds of {c['seconds']:g} s" if c.get("slices") else ""))
            for r in c["runs"]:
                out.append(f"| {c['label']} | {r['pair']} | {r['variant']} | {r['rate']:.0f} | "
                           f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {r['daemon_cpu_ms']:.2f} / "
                           f"{'-' if r['redis_cpu_ms'] is None else format(r['redis_cpu_ms'], '.2f')} | "
                           f"{'-' if r['outbox_at_end'] is None else r['outbox_at_end']} | {r['errors']} |")
            out.append(f"| {c['label']} | all | fleet ÷ plain | **{c['ratio']:.3f}** | per pair "
                       f"{', '.join(f'{x:.3f}' for x in c['pair_ratios'])} | daemon plain ÷ fleet "
                       f"**{c['cpu_ratio']:.3f}** | | |")
            if "ref_ratio" in c:
                out.append(f"| {c['label']} | all | fleet-ref ÷ plain | **{c['ref_ratio']:.3f}** | | daemon plain ÷ "
                           f"fleet-ref **{c['ref_cpu_ratio']:.3f}** | | |")
        out += ["", "The daemon's CPU ms a block by thread, and of it in the kernel (/proc/PID/task, threads named by "
                "`py-spy dump`)", ""]
        for c in results["cost"]:
            for r in c["runs"]:
                parts = ", ".join(f"{name} {ms:.3f} (sys {sys_ms:.3f})" for name, (ms, sys_ms)
                                  in r["thread_cpu_ms"].items() if ms >= 0.0005)
                out.append(f"- {c['label']} pair {r['pair']} {r['variant']} ({r['batch_mean']:.2f} commands a "
                           f"batch): {parts}")
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="ipset", help="comma list of ipset, nftables (default ipset)")
    p.add_argument("--parts", default="propagation,catchup,cost", help="comma list of propagation, catchup, "
                   "busy, cost (default propagation,catchup,cost)")
    p.add_argument("--busy-rate", type=float, default=50, help="busy: paced PUTs per second on B (default 50)")
    p.add_argument("--rate", type=float, default=500, help="paced PUTs per second on A (default 500)")
    p.add_argument("--seconds", type=float, default=10, help="length of the paced run (default 10)")
    p.add_argument("--catchup", type=int, default=100_000, help="bans A takes while B is down (default 100000)")
    p.add_argument("--cost-seconds", type=float, default=10, help="length of one cost run (default 10)")
    p.add_argument("--pairs", type=int, default=2, help="fleet/plain pairs of cost runs (default 2)")
    p.add_argument("--slices", type=int, default=0, help="cost: this many rounds of short runs (--cost-seconds "
                   "each, say 2) with nothing unblocked in between, instead of --pairs")
    p.add_argument("--load", choices=("wrk", "python"), default="wrk", help="cost: what drives A: wrk (C, "
                   "bench/wrk/block.lua; default) or python (the throughput section's ClientPool, --clients processes)")
    p.add_argument("--clients", type=int, default=4, help="--load python: keep-alive clients (default 4)")
    p.add_argument("--connections", type=int, default=16, help="--load wrk: keep-alive connections, one wrk thread "
                   "(default 16)")
    p.add_argument("--pin", choices=("no", "yes", "both"), default="no", help="cost: the daemon on one core, the load "
                   "and redis-server on the other (yes), neither (no, default), or each in turn (both)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write every figure")
    p.add_argument("--profile", type=Path, metavar="DIR", help="py-spy record of A during each cost run (raw stacks "
                   "per thread and their summary, as the throughput section's --profile)")
    p.add_argument("--reference", type=Path, metavar="SRC", help="cost: also run the fleet with the code of SRC "
                   "(another checkout's src/), interleaved, as variant fleet-ref")
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    args.pins = {"no": (False,), "yes": (True,), "both": (False, True)}[args.pin]
    if args.pin != "no" and len(os.sched_getaffinity(0)) < 2:
        p.error("--pin needs two CPUs")
    if not set(args.backends) <= {"ipset", "nftables"} or \
            not set(args.parts) <= {"propagation", "catchup", "busy", "cost"}:
        p.error("--backends: ipset, nftables; --parts: propagation, catchup, busy, cost")
    if args.catchup + CATCHUP_OFFSET > POOL or max(args.rate, args.busy_rate) * args.seconds > CATCHUP_OFFSET:
        p.error("the addresses must fit the 198.18.0.0/15 pool")
    return args


def section(args: argparse.Namespace) -> dict[str, Any]:
    return run(args.backends, args.parts, args.rate, args.seconds, args.catchup, args.cost_seconds, args.pairs,
               args.clients, lambda text: print(text, file=sys.stderr, flush=True), args.profile, args.reference,
               args.load, args.connections, args.pins, args.busy_rate, args.slices)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--agent"]:
        return agent_main(argv[1], argv[2])
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/fleet.py needs root (namespaces)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        results = section(args)
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    print("\n".join(tables(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
