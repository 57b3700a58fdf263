"""The baseline for bench/run.py: a stdlib HTTPS server on web-ipt-d's paths that runs one `iptables -w -I/-D`
process per request, as the Go web-ipt-d, rfw and fail2ban's default actions change the firewall.
Run it only inside a private network namespace: bench/targets.py starts it there.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
TOOL_TIMEOUT = 300.0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as web-ipt-d
    server_version = "webiptd-bench-baseline"
    timeout = 300  # idle keep-alive connections survive the pauses between phases
    # Headers and body go out in two writes; with Nagle on, the second waits for the client's delayed ACK (40 ms).
    disable_nagle_algorithm = True
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # like the peers at their default level: no line per request

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        # A cheap check: one SHA-256 and a constant-time compare (web-ipt-d pays bcrypt once, then an HMAC).
        given = hashlib.sha256(self.headers.get("Authorization", "").encode()).digest()
        if hmac.compare_digest(given, self.server.auth_digest):
            return True
        self._send(401, {"error": "unauthorized"})
        return False

    def _address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The address of /chain/<chain>/<family>/<address>; None once a 4xx has been answered."""
        parts = self.path.split("/")
        if len(parts) != 5 or parts[0] or parts[1] != "chain" or parts[2] != self.server.chain:
            self._send(404, {"error": "not_found"})
            return None
        try:
            addr = ipaddress.ip_address(parts[4])
        except ValueError:
            self._send(400, {"error": "bad_address"})
            return None
        if parts[3] != f"ipv{addr.version}":
            self._send(400, {"error": "bad_address"})
            return None
        return addr

    def _iptables(self, op: str, addr: ipaddress.IPv4Address | ipaddress.IPv6Address
                  ) -> subprocess.CompletedProcess[str]:
        """One process per change: `iptables -w -I|-D <chain> -s <addr> -j <target>`."""
        srv = self.server
        return subprocess.run([srv.tools[addr.version], "-w", op, srv.chain, "-s", str(addr), "-j", srv.target],
                              capture_output=True, text=True, env=ENV, timeout=TOOL_TIMEOUT)

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path == "/version":
            self._send(200, {"version": "baseline"})
        else:
            self._send(404, {"error": "not_found"})

    def do_PUT(self) -> None:
        if not self._authorized() or (addr := self._address()) is None:
            return
        result = self._iptables("-I", addr)
        if result.returncode == 0:
            self._send(201, {"address": str(addr), "created": True})
        else:
            self._send(500, {"error": "iptables", "message": result.stderr.strip()[:200]})

    def do_DELETE(self) -> None:
        if not self._authorized() or (addr := self._address()) is None:
            return
        result = self._iptables("-D", addr)
        if result.returncode == 0:
            self._send(200, {"address": str(addr), "deleted": True})
        elif result.returncode == 1:  # no such rule
            self._send(404, {"address": str(addr), "deleted": False})
        else:
            self._send(500, {"error": "iptables", "message": result.stderr.strip()[:200]})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], ssl_context: ssl.SSLContext, auth_digest: bytes, chain: str,
                 target: str, tools: dict[int, str]):
        self.ssl_context = ssl_context
        self.auth_digest = auth_digest
        self.chain = chain
        self.target = target
        self.tools = tools
        super().__init__(address, Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake runs in the connection's own thread, not in the accept loop.
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        super().finish_request(tls, client_address)


def notify(message: str) -> None:
    """sd_notify(3) without libsystemd; a no-op without NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), path)


def ensure_chain(tools: dict[int, str], chain: str, hook: str) -> None:
    """Create `chain` and its jump from `hook` when missing (what fail2ban's actionstart does)."""
    for tool in tools.values():
        subprocess.run([tool, "-w", "-N", chain], capture_output=True, env=ENV, timeout=TOOL_TIMEOUT)
        if subprocess.run([tool, "-w", "-C", hook, "-j", chain], capture_output=True, env=ENV,
                          timeout=TOOL_TIMEOUT).returncode != 0:
            subprocess.run([tool, "-w", "-I", hook, "1", "-j", chain], check=True, capture_output=True, env=ENV,
                           timeout=TOOL_TIMEOUT)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--listen", default="127.0.0.1:8820", help="host:port (default 127.0.0.1:8820)")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password-env", default="BASELINE_PASSWORD",
                   help="environment variable holding the password (default BASELINE_PASSWORD)")
    p.add_argument("--chain", default="bench")
    p.add_argument("--hook", default="INPUT")
    p.add_argument("--target", default="DROP", choices=("DROP", "REJECT"))
    p.add_argument("--iptables", default="iptables",
                   help="the command: iptables (the host's, iptables-nft on Debian 12), iptables-nft or "
                        "iptables-legacy; ip6tables is derived from it")
    args = p.parse_args(argv)
    tools = {}
    for version, name in ((4, args.iptables), (6, args.iptables.replace("iptables", "ip6tables", 1))):
        path = shutil.which(name, path=ENV["PATH"])
        if path is None:
            print(f"baseline: {name} not found", file=sys.stderr)
            return 2
        tools[version] = path
    password = os.environ.get(args.password_env, "")
    digest = hashlib.sha256(("Basic " + base64.b64encode(f"{args.user}:{password}".encode()).decode()).encode())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(args.cert, args.key)
    ensure_chain(tools, args.chain, args.hook)
    host, _, port = args.listen.rpartition(":")
    server = Server((host.strip("[]"), int(port)), ctx, digest.digest(), args.chain, args.target, tools)
    # The handler only starts the shutdown; serve_forever() returns in the main thread.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    notify("READY=1")
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
