"""Section `packets`: iperf3 TCP and 64-byte UDP from a peer that is not blocked, into a server's namespace with N
entries in place. Alone: `bench/packets.py [run.py's options]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from targets import BenchPki, Target
from tests.harness import PEER4, SERVER4, stop_process
from tests.netns import NetNS, veth_pair

# The packet-path peers: TEST-NET-2 only (this machine's own uplink is TEST-NET-1).
SERVER_ADDR, PEER_ADDR = SERVER4, PEER4
IPERF_PORT = 5201


@dataclass
class PacketResult:
    target: str
    existing: int
    tcp_bps: float  # best run
    udp_sent_pps: float
    udp_received_pps: float
    runs: dict[str, list[float]]  # every run, in order, to show the noise


def packet_stage(target: Target, pki: BenchPki, workdir_root: Path, args: argparse.Namespace,
                 sizes: Sequence[int]) -> list[PacketResult]:
    """iperf3 from a peer that is not blocked into the server's namespace, at each of `sizes` side by side.

    One namespace per N, each with its server running and N entries in place, and its own peer namespace
    on a veth pair (198.51.100.2 -> 198.51.100.1). Every packet walks the chain's INPUT hook and misses.
    The runs alternate between the sizes (TCP at each N, then 64-byte UDP at each N, repeated), so a
    burst of other load on the machine hits both sides alike; the best run of each counts.
    """
    iperf = shutil.which("iperf3")
    if iperf is None:
        print("no packet path: iperf3 is missing (apt-get install iperf3)", file=sys.stderr)
        return []
    seconds, family = args.packet_seconds, args.family
    with contextlib.ExitStack() as stack:
        servers: dict[int, NetNS] = {}
        for existing in sizes:
            workdir = Path(tempfile.mkdtemp(prefix=f"{target.name}-packets-{existing}-", dir=workdir_root))
            ns = stack.enter_context(NetNS.create(prefix="wpkt"))
            server = target.start(ns, workdir, pki, family, existing)
            stack.callback(server.stop)
            peer = stack.enter_context(NetNS.create(prefix="wpeer"))
            veth_pair(ns, peer, (f"{SERVER_ADDR}/24",), (f"{PEER_ADDR}/24",))
            iperf_server = ns.popen([iperf, "-s", "-B", SERVER_ADDR, "-p", str(IPERF_PORT)], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stack.callback(stop_process, iperf_server)
            deadline = time.monotonic() + 10
            while f"{SERVER_ADDR}:{IPERF_PORT}" not in ns.run(["ss", "-Hltn"]).stdout:
                if iperf_server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the iperf3 server did not start")
                time.sleep(0.05)
            if server.count() != existing:
                raise RuntimeError(f"expected {existing} entries in the packet-path namespace")
            servers[existing] = peer
        print(f"  packet path at N={', '.join(f'{n:,}' for n in sizes)}: iperf3 TCP and 64-byte UDP, "
              f"{seconds:g} s a run, {args.packet_repeats} rounds", file=sys.stderr, flush=True)
        client = [iperf, "-c", SERVER_ADDR, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J"]
        runs: dict[int, dict[str, list[float]]] = {n: {"tcp_bps": [], "udp_sent_pps": [], "udp_received_pps": []}
                                                   for n in sizes}
        for _ in range(args.packet_repeats):
            for existing, peer in servers.items():
                tcp = json.loads(peer.run(client, timeout=seconds + 120).stdout)
                runs[existing]["tcp_bps"].append(tcp["end"]["sum_received"]["bits_per_second"])
            for existing, peer in servers.items():
                udp = json.loads(peer.run([*client, "-u", "-l", "64", "-b", "0"], timeout=seconds + 120).stdout)
                sent, received = udp["end"]["sum_sent"], udp["end"]["sum_received"]
                runs[existing]["udp_sent_pps"].append(sent["packets"] / sent["seconds"])
                runs[existing]["udp_received_pps"].append(received["bytes"] / 64 / received["seconds"])
    results = [PacketResult(target.name, n, max(r["tcp_bps"]), max(r["udp_sent_pps"]), max(r["udp_received_pps"]),
                            r) for n, r in runs.items()]
    for r in results:
        print(f"  N={r.existing:<7,} TCP {r.tcp_bps / 1e9:6.2f} Gb/s   UDP 64 B received "
              f"{r.udp_received_pps / 1e3:6.1f} kpps, sent {r.udp_sent_pps / 1e3:6.1f} kpps",
              file=sys.stderr, flush=True)
    return results


def find_packets(packets: list[PacketResult], target: str, existing: int) -> PacketResult | None:
    return next((p for p in packets if (p.target, p.existing) == (target, existing)), None)


def tables(packets: list[PacketResult], args: argparse.Namespace) -> list[str]:
    """The packet-path table with its heading (Markdown lines)."""
    out = [f"Packet path for a peer that is not blocked: iperf3 from {PEER_ADDR} to {SERVER_ADDR} over a "
           "veth pair, into the server's namespace through the chain's INPUT hook, with the server running "
           f"and N entries in place; the sizes side by side, runs alternating, best of {args.packet_repeats} "
           f"runs of {args.packet_seconds:g} s:", "",
           "| target | N | TCP Gb/s | UDP 64 B received kpps | UDP 64 B sent kpps | TCP vs N=0 "
           "| UDP received vs N=0 | every run: TCP Gb/s; UDP received kpps |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for pk in packets:
        empty = find_packets(packets, pk.target, 0)
        rel = [f"{getattr(pk, k) / getattr(empty, k):.0%}" if empty and pk.existing and getattr(empty, k) else ""
               for k in ("tcp_bps", "udp_received_pps")]
        every = (", ".join(f"{v / 1e9:.1f}" for v in pk.runs["tcp_bps"]) + "; "
                 + ", ".join(f"{v / 1e3:.0f}" for v in pk.runs["udp_received_pps"]))
        out.append(f"| {pk.target} | {pk.existing:,} | {pk.tcp_bps / 1e9:.2f} | {pk.udp_received_pps / 1e3:.1f} | "
                   f"{pk.udp_sent_pps / 1e3:.1f} | {rel[0]} | {rel[1]} | {every} |")
    return out


if __name__ == "__main__":
    import run

    sys.exit(run.main(sections=("packets",)))
