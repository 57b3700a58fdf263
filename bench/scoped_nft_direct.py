"""The nftables backend on its own in a private namespace: the time of one apply() of one scoped Add, and of one
Remove, with N atoms of the same kind already in the chain's sets, beside the same for plain hosts (`<chain>-v4`)
as the reference. An atom of ports is one range of `--width` ports (1: a single port): up to
nftables.MAX_FLAT_RANGE ports one hash element a port (`<chain>-v4-port`), wider one range element of the pipapo
set (`<chain>-v4-ports`); `--flat-max` sets that threshold for the run, to compare both at one width.
`bench/scoped_nft_direct.py [--sizes 0,10000,100000] [--width 1] [--flat-max 64]`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402, F401  (puts src/ and the repository on sys.path)

from tests.netns import NetNS  # noqa: E402
from webiptd.config import Chain  # noqa: E402
from webiptd.firewall import nftables  # noqa: E402
from webiptd.firewall.nftables import NftablesBackend  # noqa: E402
from webiptd.firewall.ops import Add, Op, Remove  # noqa: E402
from webiptd.scope import Scope  # noqa: E402

CHAIN = Chain("bench", ("INPUT",), "DROP", backend="nftables", maxelem=1_048_576)
HOSTS = ipaddress.ip_network("198.18.0.0/15")  # blocked, never contacted
FILL_BATCH = 4000


def host(i: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network((int(HOSTS.network_address) + i, 32))


def one(scope: Scope | None, i: int, expires: float | None) -> tuple[Op, Op]:
    return (Add(CHAIN.name, host(i), "DROP", expires, scope=scope), Remove(CHAIN.name, host(i), "DROP", scope=scope))


def measure(ns: NetNS, size: int, scope: Scope | None, rounds: int) -> dict[str, float]:
    backend = ns.call(NftablesBackend)
    chains = {CHAIN.name: CHAIN}
    try:
        ns.call(lambda: backend.prepare([CHAIN]))
        expires = time.time() + 86400
        started = time.perf_counter()
        for lo in range(0, size, FILL_BATCH):
            ops = [one(scope, i, expires)[0] for i in range(lo, min(size, lo + FILL_BATCH))]
            ns.call(lambda ops=ops: backend.apply(ops, chains))  # type: ignore[misc]
        fill = time.perf_counter() - started
        adds, removes = [], []

        def timed() -> None:
            for r in range(rounds):
                add, remove = one(scope, size + r, expires)
                t0 = time.perf_counter()
                backend.apply([add], chains)
                t1 = time.perf_counter()
                backend.apply([remove], chains)
                t2 = time.perf_counter()
                adds.append(t1 - t0)
                removes.append(t2 - t1)
        ns.call(timed)  # one thread in the namespace for all rounds: the apply, not the hand-off, is timed
        return {"fill_s": round(fill, 2), "add_ms": round(statistics.median(adds) * 1000, 3),
                "remove_ms": round(statistics.median(removes) * 1000, 3),
                "add_p90_ms": round(sorted(adds)[int(len(adds) * 0.9)] * 1000, 3)}
    finally:
        ns.call(backend.close)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="0,10000,100000")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--kinds", default="ports,plain")
    parser.add_argument("--width", type=int, default=1, help="ports in the one range of a `ports` atom")
    parser.add_argument("--flat-max", type=int, default=nftables.MAX_FLAT_RANGE,
                        help="the widest range kept one hash element a port (0: every range in the pipapo set)")
    args = parser.parse_args()
    nftables.MAX_FLAT_RANGE = args.flat_max
    scopes = {"ports": Scope("tcp", ((1000, 1000 + args.width - 1),)), "proto": Scope("tcp"), "plain": None}
    for kind in args.kinds.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            with NetNS.create() as ns:
                result = measure(ns, size, scopes[kind], args.rounds)
            shape = {"width": args.width, "set": "hash" if args.width <= args.flat_max else "pipapo"} \
                if kind == "ports" else {}
            print(json.dumps({"kind": kind, **shape, "existing": size, "rounds": args.rounds, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
