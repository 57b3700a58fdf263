"""The ipset backend on its own in a private namespace: the time of one apply() of one scoped Add, and of one
Remove, with 0, 10k and 100k single-port atoms already in the chain's port set (distinct hosts of 198.18.0.0/15);
the median and p95 of 200 each, next to the same for an entry of all traffic. `bench/scoped_direct.py [--sizes ...]`.
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from common import POOLS, percentile
from tests.netns import NetNS
from webiptd.config import Chain
from webiptd.firewall.ipset import IpsetBackend
from webiptd.firewall.ops import Add, Op, Remove
from webiptd.scope import Scope

SSH = Scope("tcp", ((22, 22),))


def timed(backend: IpsetBackend, chains: dict[str, Chain], first: int, rounds: int,
          scope: Scope | None) -> tuple[list[float], list[float]]:
    """Seconds of each apply() of one Add, then of its Remove, `rounds` times, sorted; in the backend's namespace."""
    adds: list[float] = []
    removes: list[float] = []
    for i in range(rounds):
        network = ipaddress.ip_network(POOLS["ipv4"][first + i])
        start = time.perf_counter()
        backend.apply([Add("bench", network, "DROP", time.time() + 600, scope)], chains)
        adds.append(time.perf_counter() - start)
        start = time.perf_counter()
        backend.apply([Remove("bench", network, "DROP", scope)], chains)
        removes.append(time.perf_counter() - start)
    return sorted(adds), sorted(removes)


def one_size(size: int, rounds: int) -> list[str]:
    """The table rows for `size` atoms in place, in a namespace of their own."""
    rows = []
    with NetNS.create(prefix="wbench") as ns, tempfile.TemporaryDirectory(prefix="wbench-") as tmp:
        chain = Chain("bench", ("INPUT",), "DROP", backend="ipset", maxelem=262144)
        chains = {chain.name: chain}
        backend = ns.call(partial(IpsetBackend, str(Path(tmp) / "xtables.lock")))
        try:
            ns.call(partial(backend.prepare, [chain]))
            fill: list[Op] = [Add("bench", ipaddress.ip_network(POOLS["ipv4"][i]), "DROP", None, SSH)
                              for i in range(size)]
            ns.call(partial(backend.apply, fill, chains))  # one `ipset restore` from BULK_MIN on
            if size:
                listed = ns.run(["ipset", "list", "-t", "bench-p4"]).stdout
                if f"Number of entries: {size}\n" not in listed:
                    raise RuntimeError(f"the port set does not hold {size} entries:\n{listed}")
            for scope in (SSH, None):
                adds, removes = ns.call(partial(timed, backend, chains, size, rounds, scope))
                rows.append(f"| {size:,} | {scope or 'all'} | {statistics.median(adds) * 1e3:.3f} | "
                            f"{percentile(adds, 95) * 1e3:.3f} | {statistics.median(removes) * 1e3:.3f} | "
                            f"{percentile(removes, 95) * 1e3:.3f} |")
                print(rows[-1], file=sys.stderr, flush=True)
        finally:
            ns.call(backend.close)
    return rows


def measure(sizes: list[int], rounds: int) -> list[str]:
    lines = ["| atoms in the set | scope | Add median ms | Add p95 ms | Remove median ms | Remove p95 ms |",
             "|---:|---|---:|---:|---:|---:|"]
    for size in sizes:
        lines += one_size(size, rounds)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    print("\n".join(measure(args.sizes, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
