"""The floor under web-ipt-d's request path: a canned HTTPS answer behind TLS and a thread per connection, with
and without a hand-off to a worker thread, measured with bench/clients.py's keep-alive clients. Not a test.
"""

from __future__ import annotations

import argparse
import queue
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from common import address, host_busy_seconds, proc_cpu_seconds  # first: it puts src/ and tests/ on sys.path

from clients import ClientPool
from tests.harness import basic, make_pki, stop_process
from tests.netns import NetNS

MODES = {
    "none": "the connection thread answers at once",
    "future": "it hands each request to one worker thread through queue.Queue and waits on a "
              "concurrent.futures.Future, as web-ipt-d did first",
    "pending": "the same through queue.SimpleQueue and a lock the worker releases, as the daemon's "
               "firewall.pending.Pending does now",
    "selector": "one thread serves every connection (non-blocking TLS, a selector) and hands each batch of "
                "requests to one worker thread, woken once a batch and answered through a pipe",
}
PORT = 8820


def serve(certfile: str, keyfile: str, mode: str) -> None:
    """The server, in a child process inside the namespace (see main)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, keyfile)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", PORT))
    listener.listen(128)
    answers = {b"GET": b'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}',
               b"PUT": b'HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}'}
    futures: queue.Queue[Future[int]] = queue.Queue()
    pendings: queue.SimpleQueue[threading.Lock] = queue.SimpleQueue()

    def future_worker() -> None:
        while True:
            batch = [futures.get()]
            while not futures.empty():
                batch.append(futures.get_nowait())
            for fut in batch:
                fut.set_running_or_notify_cancel()
                fut.set_result(1)

    def pending_worker() -> None:
        while True:
            batch = [pendings.get()]
            while not pendings.empty():
                batch.append(pendings.get_nowait())
            for lock in batch:
                lock.release()

    def connection(raw: socket.socket) -> None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = ctx.wrap_socket(raw, server_side=True)
        rfile = conn.makefile("rb", 65536)
        while line := rfile.readline(8193):
            while rfile.readline(8193) not in (b"\r\n", b"\n", b""):
                pass
            if mode == "future":
                fut: Future[int] = Future()
                futures.put(fut)
                fut.result(5)
            elif mode == "pending":
                lock = threading.Lock()
                lock.acquire()
                pendings.put(lock)
                lock.acquire(timeout=5)
            conn.sendall(answers[line.split(b" ", 1)[0]])

    threading.Thread(target=future_worker, daemon=True).start()
    threading.Thread(target=pending_worker, daemon=True).start()
    if mode == "selector":
        serve_selector(ctx, listener, answers)
        return
    print("ready", flush=True)
    while True:
        raw, _ = listener.accept()
        threading.Thread(target=connection, args=(raw,), daemon=True).start()


def serve_selector(ctx: ssl.SSLContext, listener: socket.socket, answers: dict[bytes, bytes]) -> None:
    import collections
    import os
    import selectors
    sel = selectors.DefaultSelector()
    jobs: queue.SimpleQueue[list[tuple[Any, bytes]]] = queue.SimpleQueue()
    done: collections.deque[list[tuple[Any, bytes]]] = collections.deque()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    buffers: dict[Any, bytearray] = {}

    def worker() -> None:
        while True:
            batch = jobs.get()
            while not jobs.empty():
                batch.extend(jobs.get_nowait())
            done.append(batch)
            os.write(wake_w, b"x")

    def handshake(raw: socket.socket) -> None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = ctx.wrap_socket(raw, server_side=True)
        conn.setblocking(False)
        buffers[conn] = bytearray()
        sel.register(conn, selectors.EVENT_READ)

    def accept() -> None:
        while True:
            raw, _ = listener.accept()
            threading.Thread(target=handshake, args=(raw,), daemon=True).start()

    threading.Thread(target=worker, daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    sel.register(wake_r, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        batch = []
        for key, _ in sel.select():
            if key.fileobj == wake_r:
                os.read(wake_r, 4096)
                while done:
                    for conn, method in done.popleft():
                        conn.sendall(answers[method])
                continue
            conn = key.fileobj
            buf = buffers[conn]
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        sel.unregister(conn)
                        conn.close()
                        break
                    buf += data
                    if not conn.pending():
                        break
            except ssl.SSLWantReadError:
                pass
            while (end := buf.find(b"\r\n\r\n")) >= 0:
                batch.append((conn, bytes(buf[:buf.index(b" ")])))
                del buf[:end + 4]
        if batch:
            jobs.put(batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modes", nargs="?", default=",".join(MODES),
                   help="comma list from " + "; ".join(f"{k}: {v}" for k, v in MODES.items()) + " (default all)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=6000)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        p.error(f"modes are {', '.join(MODES)}")
    root = Path(tempfile.mkdtemp(prefix="wipt-handoff-"))
    pki = make_pki(root, "bench")
    pool = ClientPool(args.clients)
    try:
        for mode in modes:
            with NetNS.create(prefix="whand") as ns:
                proc = ns.popen([sys.executable, __file__, "--serve", str(pki.server_cert), str(pki.server_key), mode],
                                stdout=subprocess.PIPE)
                try:
                    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
                    server: Any = argparse.Namespace(ns=ns, host="127.0.0.1", port=PORT, cafile=pki.ca,
                                                     authorization=basic("a", "b"))
                    pool.connect(server)
                    todo = [f"/chain/bench/ipv4/{address('ipv4', i)}" for i in range(args.requests)]
                    for _ in range(args.rounds):
                        cpu0, host0 = proc_cpu_seconds(proc.pid), host_busy_seconds()
                        replies, sent, _, _ = pool.run(args.clients, "PUT", todo, 201)
                        cpu1, host1 = proc_cpu_seconds(proc.pid), host_busy_seconds()
                        wall = max(r["t1"] for r in replies) - min(r["t0"] for r in replies)
                        n = len(sent)
                        clients = sum(r["cpu"] for r in replies)
                        print(f"{mode:8} {args.clients} clients: {n / wall:7,.0f} requests/s; CPU per request: "
                              f"server {1e3 * (cpu1 - cpu0) / n:.3f} ms, clients {1e3 * clients / n:.3f} ms, "
                              f"machine {1e3 * (host1 - host0) / n:.3f} ms")
                    pool.disconnect()
                finally:
                    stop_process(proc)
    finally:
        pool.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(*sys.argv[2:])
    else:
        main()
