"""What a legitimate client (fail2ban's curl: a new TLS connection per PUT and DELETE) gets from web-ipt-d while
connection floods run against it, from another remote address and from localhost. Not a test: see
tests/test_attack.py for the assertions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from common import machine_info  # first: it puts src/ and tests/ on sys.path

from tests import flood
from tests.harness import FAST_HASH, PASSWORDS, PEER4, PORT, SERVER4, Daemon, RssSampler, make_pki, proc_status_kib
from tests.netns import NetNS, veth_pair

ATTACKS = {
    "none": "no attack",
    "a": "slowhttptest -H: {slow_connections:,} connections from one address, {rate:g}/s, a header line every "
         "{interval:g} s",
    "b": "{connections} silent TCP connections over {sources} addresses, reconnecting (at most {rate:g}/s)",
    "c": "{connections} slow request heads over finished TLS handshakes over {sources} addresses, a header line "
         "every {interval:g} s, reconnecting (at most {rate:g}/s)",
}
TARGET_P50_MS = 250.0
MAX_RSS_BYTES = 150_000_000  # the 150 MB, read as 10^6 bytes


@dataclass
class AttackResult:
    attack: str
    description: str
    clients: dict[str, dict[str, Any]]  # location -> summarize() of the requests sent under attack
    after: dict[str, Any]  # summarize() of the requests sent once the attack was over
    rss_max_kib: int  # the largest VmRSS sampled while the attack ran
    hwm_kib: int  # VmHWM (the process's peak) when the attack ended
    log_lines: int  # written from the attack's start to 1 s after its end
    tracebacks: int
    attacker: dict[str, Any]
    alive: bool
    seconds: float
    failures: list[str] = field(default_factory=list)


def describe(attack: str, args: argparse.Namespace) -> str:
    return ATTACKS[attack].format(slow_connections=args.slow_connections, rate=args.rate, interval=args.interval,
                                  connections=args.connections, sources=args.sources)


def run_attack(attack: str, args: argparse.Namespace, pki: Any, hashes: dict[str, str], root: Path) -> AttackResult:
    """A fresh daemon and peer for one attack; the legitimate clients before, during and after it."""
    workdir = Path(tempfile.mkdtemp(prefix="wipt-", dir=root))
    sources = flood.source_addresses(args.sources)
    started = time.monotonic()
    with NetNS.create() as ns, NetNS.create() as peer:
        _, peer_if = veth_pair(ns, peer)
        flood.add_addresses(peer, peer_if, sources)
        d = Daemon(ns, workdir, pki, hashes)
        d.config["listen"] = [f"127.0.0.1:{PORT}", f"{SERVER4}:{PORT}"]
        d.config["log"]["level"] = args.log_level
        try:
            if args.src is not None:
                d.start(PYTHONPATH=str(args.src))
            else:
                d.start()
            assert d.proc is not None
            ctx = d.context()
            clients = [flood.LegitClient("remote", peer, SERVER4, PORT, PEER4, ctx, timeout=args.request_timeout),
                       flood.LegitClient("localhost", ns, "127.0.0.1", PORT, None, ctx, timeout=args.request_timeout)]
            addresses = flood.fresh_addresses("198.18.0.0/15")
            flood.legit_run(clients, 2, addresses, pause=0)  # warm: the auth cache, the first handshakes
            log_path = workdir / "web-ipt-d.log"
            log_before, text_before = flood.count_lines(log_path), len(d.log())
            attack_cm, ramped, report = make_attack(attack, args, peer, peer_if, sources)
            print(f"  {attack}: attacking ...", file=sys.stderr, flush=True)
            with RssSampler(d.proc.pid) as rss:
                with attack_cm:
                    ramped()
                    during = flood.legit_run(clients, args.pairs, addresses, pause=args.pause,
                                             deadline=time.monotonic() + args.budget)
                    attacker = report()
                hwm = proc_status_kib(d.proc.pid, "VmHWM")
            time.sleep(1.0)  # the attacker's last sockets are reset, and logged; then "afterwards"
            log_lines = flood.count_lines(log_path) - log_before
            alive = d.proc.poll() is None
            after = flood.legit_run(clients, 5, addresses, pause=0) if alive else []
            written = d.log()[text_before:]
        finally:
            d.close()
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    return AttackResult(
        attack, describe(attack, args),
        {c.name: flood.summarize([o for o in during if o.where == c.name]) for c in clients},
        flood.summarize(after), rss.max_kib, hwm, log_lines, written.count("Traceback"), attacker, alive,
        time.monotonic() - started, [flood.describe_failures(during)] if not all(o.ok for o in during) else [])


def make_attack(attack: str, args: argparse.Namespace, peer: NetNS, peer_if: str, sources: list[str]
                ) -> tuple[AbstractContextManager[Any], Callable[[], Any], Callable[[], dict[str, Any]]]:
    """(the attack as a context manager, wait until it has ramped up, what the attacker did)."""
    duration = args.ramp_timeout + args.budget + 15
    if attack == "none":
        return nullcontext(), lambda: None, lambda: {}
    if attack == "a":
        slow = flood.SlowHTTPTest(peer, f"https://{SERVER4}:{PORT}/health", connections=args.slow_connections,
                                  rate=int(args.rate), interval=int(args.interval), duration=duration)

        class Slowloris:
            # slowhttptest cannot bind(): its connections leave from one attacker address by a route's `src`.
            def __enter__(self) -> None:
                self.route = flood.preferred_source(peer, peer_if, SERVER4, sources[0])
                self.route.__enter__()
                slow.start()

            def __exit__(self, *exc: object) -> None:
                try:
                    slow.stop()
                finally:
                    self.route.__exit__(None, None, None)

        return (Slowloris(), lambda: slow.wait_ramped(args.ramp_timeout),
                lambda: {"runs": slow.runs, "max_connected": slow.max_connected, "opened": slow.max_opened,
                         "last_status": dict(slow.counters)})
    kind = {"b": "silent", "c": "heads"}[attack]
    proc = flood.FloodProcess(peer, kind, SERVER4, PORT, sources, connections=args.connections, rate=args.rate,
                              interval=args.interval, duration=duration)
    return proc, lambda: proc.wait_ramped(args.ramp_timeout), lambda: dict(proc.latest)


# -- output ----------------------------------------------------------------------------------


def ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.1f}"


def markdown(results: Sequence[AttackResult], machine: dict[str, Any], args: argparse.Namespace) -> str:
    out = [f"Attack run: {machine['nproc']} vCPUs ({machine['cpu']}), kernel {machine['kernel']}, Python "
           f"{machine['python']}, load average {machine['loadavg_start']} at the start; {args.pairs} PUT+DELETE "
           f"pairs per client location, spread over {args.window:g} s, under each attack; "
           f"{machine['run_s'] / 60:.1f} minutes in all.", "",
           "| attack | client | answered | p50 ms | p99 ms | max ms | peak RSS MiB | log lines | afterwards |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for i, (where, s) in enumerate(r.clients.items()):
            per_attack = (f"{max(r.rss_max_kib, r.hwm_kib) / 1024:.1f} | {r.log_lines:,}"
                          f"{f' ({r.tracebacks} tracebacks)' if r.tracebacks else ''} | "
                          f"{r.after['answered']}/{r.after['total']}" if i == 0 else " | | ")
            out.append(f"| {r.attack if i == 0 else ''} | {where} | {s['answered']}/{s['total']} | {ms(s['p50_ms'])} "
                       f"| {ms(s['p99_ms'])} | {ms(s['max_ms'])} | {per_attack} |")
    out += ["", "answered: requests answered with the expected status (PUT 201, DELETE 200), each over a new TLS "
                "connection; p50/p99/max over the answered ones (nearest rank). Peak RSS: the larger of the largest "
                "VmRSS sampled every 0.2 s during the attack and VmHWM at its end. Log lines: written from the "
                "attack's start to 1 s after its end. Afterwards: 5 pairs per location, 1 s after the attacker "
                "stopped.", "",
            "The attacks:", ""]
    out += [f"- **{r.attack}**: {r.description}; attacker: {json.dumps(r.attacker)}" for r in results]
    out += ["", "Target checks (the issue):", "", "| check | measured | result |", "|---|---|---|"]
    for what, figure, ok in checks(results):
        out.append(f"| {what} | {figure} | {'met' if ok else '**NOT MET**'} |")
    return "\n".join(out)


def checks(results: Sequence[AttackResult]) -> list[tuple[str, str, bool]]:
    rows = []
    for r in (r for r in results if r.attack != "none"):
        for where, s in r.clients.items():
            rows.append((f"{r.attack}, {where}: every request answered", f"{s['answered']}/{s['total']}",
                         s["answered"] == s["total"] and s["total"] > 0))
            rows.append((f"{r.attack}, {where}: p50 <= {TARGET_P50_MS:g} ms", f"{ms(s['p50_ms'])} ms",
                         not math.isnan(s["p50_ms"]) and s["p50_ms"] <= TARGET_P50_MS))
        peak = max(r.rss_max_kib, r.hwm_kib) * 1024
        rows.append((f"{r.attack}: RSS <= 150 MB", f"{peak / 1e6:.1f} MB", peak <= MAX_RSS_BYTES))
        rows.append((f"{r.attack}: up and serving afterwards, no traceback",
                     f"{'up' if r.alive else 'exited'}, {r.after['answered']}/{r.after['total']}, "
                     f"{r.tracebacks} tracebacks",
                     r.alive and r.after["answered"] == r.after["total"] > 0 and r.tracebacks == 0))
    return rows


# -- the command ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default="none,a,b,c", help="comma list from none, a, b, c (default all, in order)")
    p.add_argument("--quick", action="store_true",
                   help="10 pairs per location over 12 s, a 30 s budget (about a minute and a half)")
    p.add_argument("--pairs", type=int, help="PUT+DELETE pairs per client location under each attack (default 50)")
    p.add_argument("--window", type=float,
                   help="seconds the pairs are spread over (default 20: longer than the daemon's handshake and "
                        "header deadlines, so the requests also meet the attack after its first timeouts)")
    p.add_argument("--budget", type=float, help="seconds after which no more legitimate requests are sent "
                                                "under an attack (default 60)")
    p.add_argument("--request-timeout", type=float, default=5.0, help="the legitimate client's socket timeout")
    p.add_argument("--slow-connections", type=int, default=1000, help="slowhttptest -c for attack a")
    p.add_argument("--connections", type=int, default=600, help="connections of attacks b and c")
    p.add_argument("--sources", type=int, default=100, help="attacker addresses for b and c (a uses the first)")
    p.add_argument("--rate", type=float, default=250.0, help="attacker (re)connects a second (slowhttptest -r)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between slow header lines (a, c)")
    p.add_argument("--ramp-timeout", type=float, default=15.0,
                   help="at most this long for an attack to start all its connections")
    p.add_argument("--log-level", default="INFO", help="the daemon's log.level (default INFO, as deployed)")
    p.add_argument("--src", type=Path, metavar="DIR", help="run web-ipt-d from this source tree instead of src/")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write every figure")
    p.add_argument("--keep", action="store_true", help="keep each daemon's work dir (config, log)")
    args = p.parse_args(argv)
    args.pairs = args.pairs if args.pairs is not None else (10 if args.quick else 50)
    args.budget = args.budget if args.budget is not None else (30.0 if args.quick else 60.0)
    args.window = args.window if args.window is not None else (12.0 if args.quick else 20.0)
    args.pause = args.window / max(1, args.pairs)
    args.attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    if not args.attacks or any(a not in ATTACKS for a in args.attacks):
        p.error(f"--attacks takes a comma list of {', '.join(ATTACKS)}")
    if args.pairs < 1 or args.connections < 1 or args.slow_connections < 1 or not 1 <= args.sources <= 200:
        p.error("--pairs, --connections and --slow-connections must be positive; --sources 1 to 200")
    if args.src is not None and not (args.src / "webiptd" / "__init__.py").is_file():
        p.error(f"--src {args.src}: no webiptd package there")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("slowhttptest") is None:
        print("bench/attack.py needs root, iproute2 and slowhttptest (Debian's package)", file=sys.stderr)
        return 2
    # Ctrl-C and SIGTERM unwind through the finally blocks, which stop the floods and delete the namespaces.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    machine = machine_info()
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="wipt-attack-", dir="/tmp"))
    results: list[AttackResult] = []
    try:
        pki = make_pki(root / "pki")
        hashes = {name: FAST_HASH.hash(pw) for name, pw in PASSWORDS.items()}
        for attack in args.attacks:
            print(f"attack {attack}: {describe(attack, args)}  [{(time.monotonic() - started) / 60:.1f} min]",
                  file=sys.stderr, flush=True)
            results.append(run_attack(attack, args, pki, hashes, root))
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    machine["run_s"] = time.monotonic() - started
    print(markdown(results, machine, args))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": [asdict(r) for r in results]}, indent=1, default=str) + "\n")
    return 0 if all(ok for _, _, ok in checks(results)) else 1


if __name__ == "__main__":
    sys.exit(main())
