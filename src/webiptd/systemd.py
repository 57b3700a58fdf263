"""systemd integration: socket activation, readiness and status notification, the watchdog.

See sd_listen_fds(3), sd_notify(3) and sd_watchdog_enabled(3). Everything is a no-op
when the daemon is not run by systemd.
"""

from __future__ import annotations

import logging
import os
import socket

from systemd import daemon as sd

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


def notify(*lines: str) -> None:
    """Send state lines such as READY=1 to the service manager, if there is one."""
    if os.environ.get("NOTIFY_SOCKET"):
        try:
            sd.notify("\n".join(lines))
        except OSError as exc:
            # Like sd_notify(3), a lost notification is reported, never fatal: a vanished
            # socket must not turn a periodic STATUS= into an exit.
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
