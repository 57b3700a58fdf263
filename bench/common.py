"""What every bench module shares: the address pool, CPU readings and machine facts. Import it before anything
from tests/ or webiptd: it puts this checkout's src/ and the repository on sys.path.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import math
import os
import platform
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
# tests.netns is the one vetted way into a private namespace; src/ lets a plain checkout run too.
for _p in (str(REPO / "src"), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from tests.harness import PORT  # noqa: E402, F401  (the bench's modules take it from here)
from webiptd import __version__  # noqa: E402

HOST = "127.0.0.1"
CHAIN = "bench"
USER = "bench"
# Entries are never contacted: they only exist as matches inside the private namespace.
# RFC 2544's benchmarking range (131,072 addresses) and a /48 of RFC 3849's IPv6 documentation range: the ranges the
# project blocks in tests and benches, only ever matches inside the namespaces, never contacted.
POOLS = {"ipv4": ipaddress.ip_network("198.18.0.0/15"), "ipv6": ipaddress.ip_network("2001:db8:a::/48")}
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT = 300.0
# One request may take this long before a client gives up and the run fails. The baseline's `iptables-nft -D`
# at 100k rules with 16 concurrent deletes took up to 113 s here: each one re-reads the whole ruleset and
# starts again when another commit got in first.
REQUEST_TIMEOUT = 900.0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def proc_cpu_seconds(pid: int) -> float:
    """CPU of every thread of `pid` so far, plus its reaped children's (proc(5), fields 14-17).

    The children count for the baseline, whose work is done by one iptables process per request.
    """
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return sum(int(v) for v in fields[11:15]) / CLK_TCK


def proc_sys_seconds(pid: int) -> float:
    """The kernel's share of proc_cpu_seconds(): system time of `pid` and its reaped children."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[12]) + int(fields[14])) / CLK_TCK


def host_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy so far: every field of proc(5)'s `cpu` line but idle and iowait."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice, already counted in user/nice]
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK


def address(family: str, index: int) -> str:
    pool = POOLS[family]
    if index >= pool.num_addresses:
        raise ValueError(f"{family} pool {pool} has only {pool.num_addresses} addresses")
    return str(pool.network_address + index)


def paths(family: str, start: int, count: int) -> list[str]:
    return [f"/chain/{CHAIN}/{family}/{address(family, i)}" for i in range(start, start + count)]


def path_address(path: str) -> str:
    return path.rpartition("/")[2]


def int_list(text: str) -> list[int]:
    try:
        values = [int(x.replace("_", "").replace("k", "000")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    import importlib.metadata as md
    for dist in ("python-iptables",):
        try:
            versions[dist] = md.version(dist)
        except Exception:
            versions[dist] = "-"
    tools = {}
    for tool, flag in (("iptables", "-V"), ("ipset", "-v"), ("nft", "-v"), ("iperf3", "-v")):
        try:
            out = subprocess.run([tool, flag], capture_output=True, text=True, timeout=10).stdout.strip()
            tools[tool] = out.splitlines()[0] if out else "?"
        except (OSError, subprocess.SubprocessError):
            tools[tool] = "missing"
    return {"nproc": os.cpu_count(), "cpu": model, "loadavg_start": loadavg(), "kernel": platform.release(),
            "python": platform.python_version(), "openssl": ssl.OPENSSL_VERSION, **versions, "tools": tools,
            "web-ipt-d": __version__}
