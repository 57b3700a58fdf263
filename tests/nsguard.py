"""Exec a command only when we are provably outside the machine's initial network namespace.

Usage: nsguard.py [--expect-netns-ino=N] PROGRAM [ARG...]   (exit status 97 = refused)
"""

# Standard library only and no package imports: this runs under `ip netns exec`,
# before anything of the project is importable, and tests/netns.py loads it by path.
from __future__ import annotations

import os
import sys

REFUSED_EXIT = 97
EXPECT_OPTION = "--expect-netns-ino="

# Linux >= 6.18 gives init_net this fixed nsfs inode (uapi linux/nsfs.h NET_NS_INIT_INO).
# Older kernels allocate namespace inodes from 0xF0000000 upwards, so no namespace
# we create can ever carry this number: treating it as forbidden is always safe.
NET_NS_INIT_INO = 0xEFFFFFF9


def current_netns_inode() -> int:
    """Inode of the calling thread's network namespace."""
    # thread-self, not self: a thread that called setns() sees its own namespace.
    return os.stat("/proc/thread-self/ns/net").st_ino


def _is_kthreadd(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            fields = dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)
    except OSError:
        return False
    return fields.get("Name") == "kthreadd" and fields.get("PPid") == "0"


def observed_initial_netns_inodes() -> list[int]:
    """Initial-namespace inodes we could actually read, most authoritative first."""
    found: list[int] = []
    # PID 1's namespace is the definition the project uses.  Some sandboxes deny it
    # even to root (EACCES), so it is not the only source.
    try:
        found.append(os.stat("/proc/1/ns/net").st_ino)
    except OSError:
        pass
    # Kernel threads always live in init_net; kthreadd is PID 2 unless we are in a
    # PID namespace, which the Name/PPid check rules out.
    if _is_kthreadd(2):
        try:
            found.append(os.stat("/proc/2/ns/net").st_ino)
        except OSError:
            pass
    return found


def forbidden_netns_inodes() -> frozenset[int]:
    return frozenset(observed_initial_netns_inodes()) | {NET_NS_INIT_INO}


def refusal_reason(expected_ino: int | None = None) -> str | None:
    """Why running here would be unsafe, or None when it is safe."""
    current = current_netns_inode()
    observed = observed_initial_netns_inodes()
    if current in observed or current == NET_NS_INIT_INO:
        return f"current network namespace (inode {current}) is the initial one"
    if expected_ino is not None and current != expected_ino:
        return f"current network namespace inode {current} is not the expected {expected_ino}"
    if expected_ino is None and not observed:
        # Fail closed: without a reference we cannot prove we are elsewhere.
        return "cannot read the initial network namespace to compare against"
    return None


def main(argv: list[str]) -> int:
    args = argv[1:]
    expected: int | None = None
    if args and args[0].startswith(EXPECT_OPTION):
        expected = int(args.pop(0)[len(EXPECT_OPTION):])
    if not args:
        print(f"usage: {argv[0]} [{EXPECT_OPTION}N] PROGRAM [ARG...]", file=sys.stderr)
        return 2
    reason = refusal_reason(expected)
    if reason is not None:
        print(f"nsguard: REFUSING to run {args[0]!r}: {reason}", file=sys.stderr)
        return REFUSED_EXIT
    sys.stdout.flush()
    sys.stderr.flush()
    # exec (not a child) so the PID our caller holds is the real program's PID.
    try:
        os.execvp(args[0], args)
    except OSError as exc:
        print(f"nsguard: cannot execute {args[0]!r}: {exc}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv))
