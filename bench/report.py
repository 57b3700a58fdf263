"""The report of a run: its heading, each section's tables, and the checks against issue 4's targets."""

from __future__ import annotations

import argparse
from typing import Any

import packets as packet_section
import restore
import throughput
from packets import PacketResult, find_packets
from restore import SizeResult, find_size
from targets import SET_BACKENDS, BaselineTarget, Target
from throughput import PhaseResult, find

# The targets (issue 4, deliverable 5), checked by `checks()`.
MIN_SET_BLOCKS = 3000  # blocks/s, 16 clients
MAX_FLAT = 1.25  # p50 at 100k / p50 at 0
MIN_RATIO = {10_000: 5.0, 100_000: 50.0}  # set backend blocks/s / baseline blocks/s
MAX_RESTORE_S = 3.0
MAX_RSS_BYTES = 80_000_000  # "80 MB", read as 10^6 bytes (76.3 MiB), the stricter reading
MAX_PACKET_LOSS = 0.10
MIN_IPTABLES_BLOCKS = 1000  # at 10k, 16 clients


def checks(phases: list[PhaseResult], sizes: list[SizeResult], packets: list[PacketResult],
           args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """The issue's targets: (what, the figures, met / NOT MET / not measured)."""
    out: list[tuple[str, str, str]] = []
    big, c16 = 100_000, 16

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "**NOT MET**")

    for backend in (t for t in args.targets if t in SET_BACKENDS):
        rows = [r for n in args.sizes if (r := find(phases, backend, n, "block", c16)) is not None]
        out.append((f"{backend}: >= {MIN_SET_BLOCKS:,} blocks/s with 16 clients, at every N",
                    ", ".join(f"{r.ops_per_s:,.0f} at N={r.existing:,}" for r in rows) or "-",
                    verdict(all(r.ops_per_s >= MIN_SET_BLOCKS for r in rows) if rows else None)))
        for op in ("block", "unblock"):
            lo, hi = find(phases, backend, 0, op, c16), find(phases, backend, big, op, c16)
            ok, figure = None, "-"
            if lo is not None and hi is not None:
                ok = hi.p50_ms <= MAX_FLAT * lo.p50_ms
                figure = f"{hi.p50_ms:.2f} / {lo.p50_ms:.2f} ms = {hi.p50_ms / lo.p50_ms:.2f}"
            out.append((f"{backend}: flat, p50 {op} at 100k <= {MAX_FLAT} x p50 at 0 (16 clients)", figure,
                        verdict(ok)))
        for n, need in MIN_RATIO.items():
            mine, base = find(phases, backend, n, "block", c16), find(phases, "baseline", n, "block", c16)
            ok, figure = None, "-"
            if mine is not None and base is not None:
                ok = mine.ops_per_s >= need * base.ops_per_s
                figure = (f"{mine.ops_per_s:,.0f} / {base.ops_per_s:,.1f} blocks/s = "
                          f"{mine.ops_per_s / base.ops_per_s:,.1f} x")
            out.append((f"{backend}: >= {need:g} x the baseline's blocks/s at N={n:,} (16 clients)", figure,
                        verdict(ok)))
        s = find_size(sizes, backend, big)
        out.append((f"{backend}: 100k restored at start in <= {MAX_RESTORE_S:g} s (process start to READY=1)",
                    "-" if s is None else f"{s.startup_s:.2f} s", verdict(None if s is None else
                                                                          s.startup_s <= MAX_RESTORE_S)))
        if s is None:
            out.append((f"{backend}: RSS <= 80 MB at 100k", "-", verdict(None)))
        else:
            rss = max(s.rss_kib_ready, s.rss_kib_end) * 1024
            out.append((f"{backend}: RSS <= 80 MB at 100k (larger of READY and end)",
                        f"{rss / 1e6:.1f} MB ({rss / 2**20:.1f} MiB); peak during restore "
                        f"{s.rss_kib_peak * 1024 / 1e6:.1f} MB", verdict(rss <= MAX_RSS_BYTES)))
        empty, full = find_packets(packets, backend, 0), find_packets(packets, backend, big)
        for key, label in (("tcp_bps", "TCP"), ("udp_received_pps", "UDP 64 B received")):
            a: float | None = getattr(empty, key) if empty else None
            b: float | None = getattr(full, key) if full else None
            ok, figure = None, "-"
            if a and b:
                ok = b >= (1 - MAX_PACKET_LOSS) * a
                figure = f"{b / a:.1%} of empty"
            out.append((f"{backend}: non-blocked {label} at 100k within 10% of empty", figure, verdict(ok)))
    if "iptables" in args.targets:
        r = find(phases, "iptables", 10_000, "block", c16)
        out.append((f"iptables: >= {MIN_IPTABLES_BLOCKS:,} blocks/s at N=10,000 (16 clients)",
                    "-" if r is None else f"{r.ops_per_s:,.0f}",
                    verdict(None if r is None else r.ops_per_s >= MIN_IPTABLES_BLOCKS)))
    return out


def markdown(phases: list[PhaseResult], sizes: list[SizeResult], packets: list[PacketResult],
             machine: dict[str, Any], args: argparse.Namespace, targets: dict[str, Target]) -> str:
    baseline = targets["baseline"]
    assert isinstance(baseline, BaselineTarget)
    if phases:
        what = (f"up to {args.ops:,} fresh {args.family} addresses blocked, then the same ones unblocked, per N and "
                f"client count; each phase stops sending after {args.budget:g} s")
    else:
        what = f"sections {', '.join(args.sections)}"
    out = [
        f"web-ipt-d {machine['web-ipt-d']} against the baseline: {what}. "
        f"Run time {machine.get('run_s', 0) / 60:.1f} min.",
        "",
        f"Machine: nproc {machine['nproc']} ({machine['cpu'] or 'unknown CPU'}), kernel {machine['kernel']}, "
        f"Python {machine['python']}, {machine['openssl']}, python-iptables {machine['python-iptables']}, "
        f"{machine['tools']['iptables']}, {machine['tools']['nft']}, "
        f"{machine['tools']['ipset']}; baseline command `{baseline.iptables}` ({baseline.variant()}); "
        f"load average at start {machine['loadavg_start']}, at end {machine.get('loadavg_end', '?')}.",
        "",
        "Targets: " + "; ".join(f"**{t}**: {targets[t].description}" for t in args.targets) + ".",
    ]
    if phases:
        out += ["", *throughput.tables(phases, machine, args)]
    if sizes:
        out += ["", *restore.tables(sizes)]
    if packets:
        out += ["", *packet_section.tables(packets, args)]
    out += ["", "Target checks (issue 4):", "", "| target | measured | result |", "|---|---|---|"]
    out += [f"| {what} | {figure} | {result} |" for what, figure, result in checks(phases, sizes, packets, args)]
    return "\n".join(out)
