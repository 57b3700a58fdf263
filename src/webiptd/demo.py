"""`web-ipt-d -demo`: the real daemon on https://localhost:8820 with a throwaway certificate and user; its
sockets are opened in the host's network namespace, its rules live in a private one, its files in a temp dir."""

from __future__ import annotations

import ctypes
import os
import secrets
import socket
import sys
import tempfile
from pathlib import Path

from webiptd import certs, config as config_mod
from webiptd.passwords import hash_password
from webiptd.daemon import Daemon, bind

CLONE_NEWNET = 0x40000000
PORT = 8820

CONFIG = """\
# Written by `web-ipt-d -demo`; see the sample config for what each key means.
listen: ["127.0.0.1:{port}", "[::1]:{port}"]
tls:
  cert: {dir}/server.crt
  key: {dir}/server.key
state_dir: {dir}/state
users:
  demo:
    password_hash: "{hash}"
    chains: ["*"]
chains:
  demo:
    hooks: [INPUT]
    target: DROP
log:
  file: {dir}/web-ipt-d.log
  level: INFO
"""


def unshare_network() -> None:
    """Move this (still single-threaded) process into a new, empty network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET) failed: {os.strerror(err)}")


def run_demo() -> int:
    if os.geteuid() != 0:
        print("web-ipt-d -demo needs root: it makes a private network namespace for its rules", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="web-ipt-d-demo-"))
    ca, ca_key = certs.make_ca("web-ipt-d demo CA")
    cert, key = certs.issue(ca, ca_key, "localhost", ["localhost", "127.0.0.1", "::1"])
    certs.write_cert(workdir / "ca.crt", ca)
    certs.write_cert(workdir / "server.crt", cert)
    certs.write_key(workdir / "server.key", key)
    password = secrets.token_urlsafe(12)
    path = workdir / "config.yaml"
    path.write_text(CONFIG.format(port=PORT, dir=workdir, hash=hash_password(password)), encoding="utf-8")
    cfg = config_mod.load(path)
    sockets: list[socket.socket] = []
    for listen in cfg.listen:
        try:
            sockets.append(bind(listen))
        except OSError as exc:
            if listen.host == "::1" and sockets:
                continue  # a host without IPv6 loopback still gets the IPv4 demo
            print(f"web-ipt-d: cannot listen on {listen}: {exc}", file=sys.stderr)
            return 1
    unshare_network()
    base = f"https://localhost:{PORT}"
    curl = f"curl --cacert {workdir}/ca.crt -u demo:{password}"
    print(f"""web-ipt-d demo: {base}   user demo, password {password}
Its rules go into a private network namespace; this host's firewall is untouched.
Try, in another shell:
  {curl} -X PUT '{base}/chain/demo/ipv4/203.0.113.7?timeout=60'
  {curl} -X PUT {base}/chain/demo/ipv6/2001:db8::/32
  {curl} {base}/chain/demo
  {curl} -X DELETE {base}/chain/demo/ipv4/203.0.113.7
  nsenter -t {os.getpid()} -n iptables-legacy -S demo
Files (config, state, log) are in {workdir}. Stop with Ctrl-C.
""", flush=True)
    return Daemon(cfg, sockets=sockets, verbose=True).run()
