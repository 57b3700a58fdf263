"""systemd integration: socket activation, readiness and status notification, the watchdog (sd_listen_fds(3),
sd_notify(3), sd_watchdog_enabled(3)). Everything is a no-op when the daemon is not run by systemd."""

from __future__ import annotations

import logging
import os
import socket

from systemd import daemon as sd  # type: ignore[attr-defined]

logger = logging.getLogger(__name__)


def listen_sockets() -> list[socket.socket]:
    """The sockets systemd passed (LISTEN_FDS for this PID), or none. Unsets the variables."""
    fds = sd.listen_fds(unset_environment=True)
    socks = []
    for fd in fds:
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise RuntimeError(f"passed socket fd {fd} is not a TCP socket; use ListenStream= with an IP address")
        socks.append(sock)
    return socks


_notify_sock: socket.socket | None = None


def notify(*lines: str) -> None:
    """Send state lines such as READY=1 to the service manager, if there is one; never blocks.

    python-systemd's notify() blocks while holding the GIL when the manager is not
    reading, which would freeze every thread; this is sd_notify(3)'s protocol over a
    non-blocking datagram socket instead, as gunicorn does.
    """
    global _notify_sock
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket
    try:
        if _notify_sock is None:
            _notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            _notify_sock.setblocking(False)
        _notify_sock.sendto("\n".join(lines).encode(), path)
    except OSError as exc:
        # Like sd_notify(3), a lost notification is reported, never fatal: a full queue or a
        # vanished socket must not stall the daemon or turn a periodic STATUS= into an exit.
        logger.warning("could not notify the service manager: %s", exc)


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half the configured timeout), or None when there is no watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        logger.warning("ignoring malformed WATCHDOG_USEC=%r", usec)
        return None
