"""A cold-cache burst: N clients log in at once with one credential not yet verified, with single flight
(webiptd.auth.Authenticator: one bcrypt verify for all) and with a verify each, as before. Not a test.
"""

from __future__ import annotations

import argparse
import base64
import functools
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from webiptd import passwords  # noqa: E402
from webiptd.auth import Authenticator  # noqa: E402
from webiptd.config import User  # noqa: E402


def burst(n: int, login: Callable[[], object]) -> list[float]:
    """Start n threads at one barrier; each one's seconds from the barrier to its login's end."""
    barrier = threading.Barrier(n)
    took = [0.0] * n

    def one(i: int) -> None:
        barrier.wait()
        start = time.perf_counter()
        login()
        took[i] = time.perf_counter() - start

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return took


def figures(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"p50 {statistics.median(ms):7.0f} ms   p99 {p99:7.0f} ms   max {ms[-1]:7.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="bursts of each kind, each with a fresh cache")
    args = ap.parse_args()
    password = "correct horse battery staple"
    password_hash = passwords.hash_password(password)  # the default scheme and cost, as -hash_password makes
    header = "Basic " + base64.b64encode(f"fail2ban:{password}".encode()).decode()
    user = User("fail2ban", password_hash, ("*",), (), False)

    one = burst(1, lambda: passwords.verify(password, password_hash))
    print(f"one verify ({password_hash[:7]}…): {one[0] * 1000:.0f} ms")
    shared: list[float] = []
    separate: list[float] = []
    for _ in range(args.rounds):
        authn = Authenticator({"fail2ban": user})  # a new config generation: an empty cache
        shared += burst(args.clients, functools.partial(authn.authenticate, header))
        separate += burst(args.clients, lambda: passwords.verify(password, password_hash))
    print(f"{args.clients} clients at once, {args.rounds} bursts:")
    print(f"  single flight (one verify):      {figures(shared)}")
    print(f"  a verify each (before):          {figures(separate)}")
    print(f"  slowest login, before / now: {max(separate) / max(shared):.1f}x")


if __name__ == "__main__":
    main()
