"""The ipset and nftables backends on their own at a million entries, each in a private namespace, no daemon: the
rate of apply() for 1M Adds in chunks (half of them with an expiry; IPv4 and IPv6), then the time and peak memory
of read() in a child process, and the time of missing(). `bench/backends_million.py [--backends ...] [--total N]`.

The entries: the hosts of 198.18.0.0/15 (131,072), then hosts of 2001:db8::/32; never contacted.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import resource
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Iterator

from common import POOLS
from tests.netns import NetNS
from webiptd.config import Chain
from webiptd.firewall.ops import Add, Op
from webiptd.net import Network

CHAIN = "bench"
V6 = ipaddress.ip_network("2001:db8::/32")
MAXELEM = 1 << 20


def networks(total: int) -> Iterator[Network]:
    v4 = POOLS["ipv4"]
    for i in range(min(total, v4.num_addresses)):
        yield ipaddress.IPv4Network((int(v4.network_address) + i, 32))
    for i in range(total - v4.num_addresses):
        yield ipaddress.IPv6Network((int(V6.network_address) + i + 1, 128))


def chunks(total: int, size: int, now: float) -> Iterator[list[Op]]:
    """Adds of `total` networks, `size` at a time; every other one expires in an hour."""
    chunk: list[Op] = []
    for i, network in enumerate(networks(total)):
        chunk.append(Add(CHAIN, network, "DROP", now + 3600 if i % 2 else None))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def make(backend: str, lock: str) -> Any:
    if backend == "ipset":
        from webiptd.firewall.ipset import IpsetBackend
        return IpsetBackend(lock)
    from webiptd.firewall.nftables import NftablesBackend
    return NftablesBackend()


def chain_of(backend: str) -> Chain:
    return Chain(CHAIN, ("INPUT",), "DROP", backend=backend, maxelem=MAXELEM)


def fill(backend: Any, chain: Chain, total: int, size: int) -> dict[str, float]:
    """In the namespace: prepare, apply every chunk (the ops are built outside the timing), then missing()."""
    chains = {chain.name: chain}
    backend.prepare([chain])
    spent = 0.0
    slowest = 0.0
    for ops in chunks(total, size, time.time()):
        start = time.perf_counter()
        backend.apply(ops, chains)
        took = time.perf_counter() - start
        spent += took
        slowest = max(slowest, took)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        gone = backend.missing([chain], {chain.name: total})
        times.append(time.perf_counter() - start)
        if gone is not None:
            raise RuntimeError(f"missing() after the fill: {gone}")
    return {"apply_s": spent, "rate": total / spent, "slowest_chunk_s": slowest, "missing_s": sorted(times)[2]}


def vm_hwm() -> int:
    """Peak resident memory of this process so far, in KiB (proc(5), VmHWM)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def child_read(name: str, lock: str) -> None:
    """In a child in the namespace: prepare, then one read() consumed as the worker does; print JSON."""
    backend = make(name, lock)
    chain = chain_of(name)
    backend.prepare([chain])
    before = vm_hwm()
    start = time.perf_counter()
    atoms = sum(1 for _ in backend.read([CHAIN]))
    took = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"read_s": took, "atoms": atoms, "hwm_before_kib": before, "hwm_after_kib": vm_hwm(),
                      "child_maxrss_kib": children}))
    backend.close()


def one(name: str, total: int, size: int) -> dict[str, Any]:
    with NetNS.create(prefix="wbench") as ns, tempfile.TemporaryDirectory(prefix="wbench-") as tmp:
        lock = str(Path(tmp) / "xtables.lock")
        backend = ns.call(partial(make, name, lock))
        try:
            result: dict[str, Any] = ns.call(partial(fill, backend, chain_of(name), total, size))
        finally:
            ns.call(backend.close)
        out = ns.run([sys.executable, __file__, "--child-read", name, "--lock", lock], timeout=600).stdout
        result.update(json.loads(out.strip().splitlines()[-1]))
        if result["atoms"] != total:
            raise RuntimeError(f"read() found {result['atoms']} atoms, not {total}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", nargs="+", default=["ipset", "nftables"], choices=["ipset", "nftables"])
    parser.add_argument("--total", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=20_000)
    parser.add_argument("--child-read", choices=["ipset", "nftables"], help=argparse.SUPPRESS)
    parser.add_argument("--lock", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_read:
        child_read(args.child_read, args.lock)
        return 0
    print("| backend | entries | chunk | apply s | entries/s | slowest chunk s | read s | read peak MiB "
          "(VmHWM rise) | child tool MiB | missing() ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.backends:
        r = one(name, args.total, args.chunk)
        print(f"| {name} | {args.total:,} | {args.chunk:,} | {r['apply_s']:.2f} | {r['rate']:,.0f} | "
              f"{r['slowest_chunk_s']:.3f} | {r['read_s']:.2f} | "
              f"{(r['hwm_after_kib'] - r['hwm_before_kib']) / 1024:.0f} | {r['child_maxrss_kib'] / 1024:.0f} | "
              f"{r['missing_s'] * 1e3:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
