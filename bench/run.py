"""web-ipt-d against per-request iptables: blocks/s, unblocks/s, latency, restore, RSS and packet path.
Run as root (bench/README.md); every server runs in a private network namespace made and removed here.
Prints Markdown tables and the target checks; not a test. Each section also runs alone (--sections).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from common import BENCH, POOLS, int_list, loadavg, machine_info  # first: it puts src/ and tests/ on sys.path

import fleet as fleet_section
import million as million_section
import packets as packet_section
import report
import restore
from clients import ClientPool
from packets import PacketResult
from restore import SizeResult
from targets import TARGET_NAMES, catalog, make_bench_pki
from throughput import PHASES, PhaseResult, plot

# In the order they run for each target; `restore` alone starts the servers and requests nothing.
SECTIONS = {
    "throughput": "request phases per N and client count; the start, restore and memory figures come with them",
    "restore": "start with N entries, READY=1 and RSS only (left out when throughput runs: it measures the same)",
    "packets": "iperf3 through a server's namespace at the smallest and largest N (see --packets)",
    "fleet": "three daemons sharing a chain through Redis: propagation, catch-up, cost (bench/fleet.py; not default)",
}
QUICK = {"sizes": [0, 10_000], "ops": 600, "budget": 4.0, "packet_seconds": 1.0, "packet_repeats": 1}
DEFAULTS = {"sizes": [0, 10_000, 100_000], "ops": 3000, "budget": 10.0, "packet_seconds": 3.0, "packet_repeats": 2}


def parse_args(argv: Sequence[str] | None = None, sections: Sequence[str] = ("throughput", "packets")
               ) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(sections),
                   help="comma list from " + "; ".join(f"{k}: {v}" for k, v in SECTIONS.items())
                        + f" (default {','.join(sections)})")
    p.add_argument("--quick", action="store_true",
                   help="a smaller run (about 2 minutes): N=0,10k, 600 ops, 4 s budgets, 1 s packet runs, no plot "
                        "unless --plot; explicit options still win")
    p.add_argument("--targets",
                   help=f"comma list from {', '.join(TARGET_NAMES)}; by default all, skipping set backends this "
                        "checkout or host lacks (named explicitly, a missing one is an error)")
    p.add_argument("--baseline-iptables", default="iptables", choices=("iptables", "iptables-nft", "iptables-legacy"),
                   help="the command the baseline runs per request (default iptables, the host's: iptables-nft on "
                        "Debian 12)")
    p.add_argument("--clients", type=int_list, default=[4, 16], help="keep-alive client processes (default 4,16)")
    p.add_argument("--sizes", type=int_list,
                   help="existing entries N (default 0,10000,100000); 1000000 adds the million section on the set "
                        "backends (bench/million.py) and is left out of the others")
    p.add_argument("--ops", type=int, help="fresh addresses per block phase, unblocked after (default 3000)")
    p.add_argument("--budget", type=float, help="seconds after which a phase sends no more requests (default 10)")
    p.add_argument("--phases", default="block,unblock",
                   help="what to measure, in order, from: " + ", ".join(PHASES) + " (default block,unblock)")
    p.add_argument("--family", choices=sorted(POOLS), default="ipv4", help="address family (default ipv4)")
    p.add_argument("--packets", choices=("ends", "all", "none"), default="ends",
                   help="packet-path runs at the smallest and largest N (ends, default), every N, or none")
    p.add_argument("--packet-seconds", type=float, help="length of one iperf3 run (default 3)")
    p.add_argument("--packet-repeats", type=int, help="iperf3 runs per test, best counts (default 2)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write every figure, raw latencies included")
    p.add_argument("--plot", type=Path, metavar="PNG",
                   help=f"p50 latency against N (default {BENCH / 'latency.png'} for a full run with the throughput "
                        "section; needs matplotlib)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    p.add_argument("--src", type=Path, metavar="DIR",
                   help="run web-ipt-d from this source tree (say a scratch copy with a proposed change) instead of "
                        "this checkout's src/")
    p.add_argument("--keep", action="store_true", help="keep each run's work dir (config, logs, state DB)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="sample web-ipt-d with py-spy (pip install py-spy) during the measured phases; raw stacks and "
                        "a per-thread summary per target and N go to DIR (costs the server a little CPU)")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not args.sections or any(s not in SECTIONS for s in args.sections):
        p.error(f"--sections takes a comma list of {', '.join(SECTIONS)}")
    if "throughput" in args.sections and "restore" in args.sections:
        args.sections.remove("restore")  # the throughput section's servers give the same figures
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    if args.plot is None and not args.quick and "throughput" in args.sections:
        args.plot = BENCH / "latency.png"
    if args.no_plot:
        args.plot = None
    if args.ops < 1 or min(args.clients) < 1 or args.budget <= 0 or args.packet_repeats < 1:
        p.error("--ops, --clients, --budget and --packet-repeats must be positive")
    # A million is its own section (bench/million.py): the other sections keep their sizes.
    args.million = million_section.MILLION in args.sizes
    args.sizes = sorted(set(args.sizes) - {million_section.MILLION})
    args.clients = sorted(set(args.clients))
    if args.src is not None and not (args.src / "webiptd" / "__init__.py").is_file():
        p.error(f"--src {args.src}: no webiptd package there")
    targets = catalog(args.baseline_iptables, args.src)
    explicit = args.targets_explicit = args.targets is not None
    names = [t.strip() for t in (args.targets or ",".join(targets)).split(",") if t.strip()]
    unknown = [t for t in names if t not in targets]
    if unknown or not names:
        p.error(f"unknown target(s) {unknown}; known: {', '.join(targets)}")
    args.skipped = {}
    for name in list(names):
        reason = targets[name].unavailable()
        if reason is not None:
            if explicit:
                p.error(f"target {name} cannot run here: {reason}")
            args.skipped[name] = reason
            names.remove(name)
    args.targets = names
    phase_names = [x.strip() for x in args.phases.split(",") if x.strip()]
    if not phase_names or any(x not in PHASES for x in phase_names) or len(set(phase_names)) != len(phase_names):
        p.error(f"--phases takes a comma list of {', '.join(PHASES)}, each at most once")
    if ("block" in phase_names) != ("unblock" in phase_names) or (
            "block" in phase_names and phase_names.index("block") > phase_names.index("unblock")) or (
            "lookup" in phase_names and "block" in phase_names
            and phase_names.index("block") < phase_names.index("lookup") < phase_names.index("unblock")):
        p.error("--phases: block must be followed by unblock, with no lookup between them")
    args.phases = [PHASES[x] for x in phase_names]
    pool = POOLS[args.family]
    if args.sizes and max(args.sizes) + args.ops > pool.num_addresses:
        p.error(f"the largest N plus --ops must fit in the {pool} pool ({pool.num_addresses} addresses)")
    return args


def fleet_args(args: argparse.Namespace) -> argparse.Namespace:
    """bench/fleet.py's options from run.py's: the set backends among --targets (ipset by default), and with
    --quick shorter runs (4 s paced and cost runs, 20k bans to catch up, one pair)."""
    backends = [t for t in args.targets if t in ("ipset", "nftables")] if args.targets_explicit else ["ipset"]
    argv = ["--backends", ",".join(backends or ["ipset"])]
    if args.quick:
        argv += ["--seconds", "4", "--catchup", "20000", "--cost-seconds", "4", "--pairs", "1"]
    return fleet_section.parse_args(argv)


def million_args(args: argparse.Namespace) -> argparse.Namespace:
    """bench/million.py's options from run.py's: the set backends among --targets; --quick leaves out wrk."""
    backends = [t for t in args.targets if t in million_section.SET_BACKENDS]
    argv = ["--targets", ",".join(backends)] + (["--no-wrk", "--ops", "200"] if args.quick else [])
    return million_section.parse_args(argv + (["--keep"] if args.keep else []))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None, sections: Sequence[str] = ("throughput", "packets")) -> int:
    args = parse_args(argv, sections)
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables-legacy-save") is None:
        print(f"{Path(sys.argv[0]).name} needs root, iproute2 and iptables (legacy tools) to run the servers in "
              "private network namespaces", file=sys.stderr)
        return 2
    for name, reason in args.skipped.items():
        print(f"skipping target {name}: {reason}", file=sys.stderr)
    # Ctrl-C and SIGTERM both unwind through the finally blocks below, which stop what we started.
    # SIGINT is set explicitly because a shell starts background jobs with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    targets = catalog(args.baseline_iptables, args.src)
    machine = machine_info()
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="wipt-bench-", dir="/tmp"))
    pool: ClientPool | None = None
    phases: list[PhaseResult] = []
    sizes: list[SizeResult] = []
    packets: list[PacketResult] = []
    packet_sizes = ({"ends": sorted({args.sizes[0], args.sizes[-1]}), "all": args.sizes, "none": []}[args.packets]
                    if args.sizes else [])
    fleet_results: dict[str, Any] | None = None
    million_results: list[million_section.BackendResult] = []
    try:
        print(f"generating the test CA and a bcrypt user in {root} ...", file=sys.stderr, flush=True)
        pki = make_bench_pki(root)
        if "throughput" in args.sections:
            pool = ClientPool(max(args.clients))
        for name in args.targets:
            if "throughput" in args.sections or "restore" in args.sections:
                for existing in args.sizes:
                    print(f"{name}: N={existing:,}  [{(time.monotonic() - started) / 60:.1f} min]", file=sys.stderr,
                          flush=True)
                    size, got = restore.bench_size(pool, targets[name], pki, root, args, existing)
                    sizes.append(size)
                    phases.extend(got)
            if "packets" in args.sections and packet_sizes:
                packets += packet_section.packet_stage(targets[name], pki, root, args, packet_sizes)
        if "fleet" in args.sections:
            fleet_results = fleet_section.section(fleet_args(args))
        if args.million and any(t in million_section.SET_BACKENDS for t in args.targets):
            million_results = million_section.section(million_args(args), args.src)
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
    if set(args.sections) - {"fleet"}:
        print(report.markdown(phases, sizes, packets, machine, args, targets))
    if fleet_results is not None:
        print("\n".join(fleet_section.tables(fleet_results)))
    if million_results:
        print("\n" + "\n".join(million_section.tables(million_results)))
    if args.plot is not None and phases and plot(phases, args, args.plot):
        print(f"plot: {args.plot}", file=sys.stderr)
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        settings["phases"] = [p.name for p in args.phases]
        data = {"machine": machine, "args": settings, "phases": [asdict(p) for p in phases],
                "sizes": [asdict(s) for s in sizes], "packets": [asdict(p) for p in packets],
                "checks": [dict(zip(("target", "measured", "result"), c))
                           for c in report.checks(phases, sizes, packets, args)], "fleet": fleet_results,
                "million": [asdict(r) for r in million_results]}
        args.json.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return 1 if any(p.errors for p in phases) else 0


if __name__ == "__main__":
    sys.exit(main())
