"""The daemon's life: open listeners, reconcile, serve, reload on SIGHUP, stop on SIGTERM or SIGINT.

Signal handlers do nothing but wake the main thread (signal.set_wakeup_fd); the main thread does the work.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import ipaddress
import logging
import os
import select
import signal
import socket
import threading
import time

from webiptd import __version__, config as config_mod, log, systemd
from webiptd.auth import Authenticator
from webiptd.commands import Reconfigure
from webiptd.config import Config, ConfigError
from webiptd.http.app import App, Generation, Runtime
from webiptd.http.server import EXPIRE_EVERY, Loop, Server
from webiptd.metrics import Metrics

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STATUS_EVERY = 10.0
# sysexits(3) EX_CONFIG: a store this release cannot use; systemd does not restart on it (RestartPreventExitStatus=).
EXIT_STORE = 78
RECONFIGURE_TIMEOUT = 300.0  # seconds a reload waits for the worker to apply the new chains


def bind(listen: config_mod.Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "[::]" means dual-stack; any other IPv6 address means just that address.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if listen.host == "::" else 1)
        sock.bind((listen.host, listen.port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def open_listeners(config: Config) -> list[socket.socket]:
    """systemd's sockets when socket-activated, else the config's `listen` addresses."""
    passed = systemd.listen_sockets()
    if passed:
        if config.plain_http:
            for sock in passed:
                host = sock.getsockname()[0]
                if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
                    raise RuntimeError(f"plain_http is on but systemd passed a socket on {host}, not loopback")
        logger.info("serving on %d socket(s) passed by systemd", len(passed))
        return passed
    socks = []
    try:
        for listen in config.listen:
            socks.append(bind(listen))
            logger.info("listening on %s", listen)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


M_ARENA_MAX = -8  # mallopt(3), glibc's malloc.h


def limit_malloc_arenas() -> None:
    """At most two glibc malloc arenas, before any thread starts.

    glibc gives threads that contend for malloc arenas of their own (up to 8 per core); with a thread per
    connection each keeps its freed memory. Measured at 100k entries with 16 clients: RSS after the
    phases 77.2 -> 75.9 MiB, and no change in CPU per request (bench/README.md).
    """
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass  # not glibc


# The collector's young generation: collected after this many new container objects rather than 700. A reconcile or a
# bulk load makes millions of short-lived ones (ops, entries, rows) that live a chunk long; with 700, each was walked
# again and again on its way to the oldest generation, a third of a 1M restore's time (bench/README.md).
GC_YOUNG = 100_000


def tune_gc() -> None:
    gc.set_threshold(GC_YOUNG, 50, 100)


def release_memory() -> None:
    """Hand the first reconcile's transient memory back to the OS: the backend's big messages are native heap
    that glibc keeps otherwise (135 of 270 MiB at 100k entries with nftables). malloc_trim(3) is glibc's."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Daemon:
    def __init__(self, config: Config, sockets: list[socket.socket] | None = None, verbose: bool = False):
        self.config = config
        self.sockets = sockets
        self.verbose = verbose

    def run(self) -> int:
        # Imported here so that -check_config and -hash_password never load libiptc.
        from webiptd.firewall.router import ByChain
        from webiptd.firewall.host import host_errors, host_warnings
        from webiptd.firewall.worker import Worker
        from webiptd.state import Reader, Store, StoreError

        limit_malloc_arenas()
        tune_gc()
        config = self.config
        log.setup(config.log, verbose_stderr=self.verbose)
        logger.info("starting web-ipt-d %s with %s", __version__, config.path)
        for chain in config.chains.values():
            logger.info("chain %s: backend %s, target %s, hooks %s, match %s, interface %s", chain.name,
                        chain.backend, chain.target, ",".join(chain.hooks) or "none", chain.match,
                        chain.interface or "any")
        if config.plain_http:
            logger.warning("plain_http is on: credentials cross loopback unencrypted")
        for problem in host_errors(config.chains.values()):
            logger.error("%s", problem)
        for warning in host_warnings(config.chains.values()):
            logger.warning("%s", warning)
        try:  # before the listeners: a store this code cannot use stops the start with one line, not a traceback
            store = Store(config.state_dir)
        except StoreError as exc:
            logger.critical("%s", exc)
            return EXIT_STORE
        socks = self.sockets if self.sockets is not None else open_listeners(config)
        backend = ByChain(config.chains.values())
        metrics = Metrics()
        worker = Worker(backend, store, config.chains.values(), kernel_check=config.limits.kernel_check,
                        metrics=metrics, node=None if config.fleet is None else config.fleet.node)
        try:
            worker.start()
        except BaseException:
            store.close()
            backend.close()
            raise
        release_memory()
        gc.freeze()  # what the start made lives as long as the process: never walked again by a collection
        runtime = Runtime(Generation(config, Authenticator(config.users)), worker, metrics=metrics,
                          reader=Reader(store.path))
        app = App(runtime)
        loop = Loop(runtime, app)  # one thread for every connection between requests and the common requests
        loop.start()
        servers = [Server(sock, runtime, app, loop) for sock in socks]
        for srv in servers:
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": EXPIRE_EVERY}, daemon=True,
                             name=f"accept-{srv.server_address}").start()

        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGHUP, *STOP_SIGNALS):
            signal.signal(sig, lambda *_: None)  # the wakeup fd carries the signal number

        fleet = None
        if config.fleet is not None:
            from webiptd.fleet import FleetNode  # only with a fleet: no redis import otherwise
            fleet = FleetNode(config.fleet, worker, store.path, lambda: runtime.generation.config)  # sends nothing
            runtime.fleet_status, runtime.fleet_line = fleet.status, fleet.status_line
            metrics.watch(fleet.collect)
        systemd.notify("READY=1", f"STATUS={self._status(runtime)}")
        logger.info("ready: %d blocks in %d chains", worker.count, len(config.chains))
        if fleet is not None:  # after READY: the start never waits for Redis
            fleet.start()
        watchdog = systemd.watchdog_interval()
        tick = min(watchdog or STATUS_EVERY, 1.0)
        last_status = time.monotonic()
        try:
            while True:
                readable, _, _ = select.select([wake_r], [], [], tick)
                signums = os.read(wake_r, 64) if readable else b""
                if any(s in STOP_SIGNALS for s in signums):
                    logger.info("stopping on signal")
                    break
                if signal.SIGHUP in signums:
                    self._reload(runtime)
                if not worker.is_alive():
                    logger.critical("the firewall worker died; exiting so that systemd restarts us")
                    return 1
                now = time.monotonic()
                if watchdog and now - worker.heartbeat < 2 * watchdog:
                    systemd.notify("WATCHDOG=1")
                if now - last_status >= STATUS_EVERY:
                    systemd.notify(f"STATUS={self._status(runtime)}")
                    last_status = now
        finally:
            if fleet is not None:
                fleet.stop()
            self._stop(runtime, servers, store, backend)
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)
        return 0

    @staticmethod
    def _status(runtime: Runtime, note: str = "") -> str:
        gen = runtime.generation
        text = (f"{runtime.worker.count} blocks in {len(gen.config.chains)} chains, "
                f"{len(runtime.admission)} connections")
        if runtime.fleet_line is not None:
            text = f"{text}, {runtime.fleet_line()}"
        return f"{text}; {note}" if note else text

    def _reload(self, runtime: Runtime) -> None:
        systemd.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        old = runtime.generation.config
        try:
            new = config_mod.load(old.path)
        except ConfigError as exc:
            for problem in exc.problems:
                logger.error("reload refused, still serving the previous config: %s: %s", exc.path, problem)
            systemd.notify("READY=1", f"STATUS={self._status(runtime, 'reload FAILED, serving the previous config')}")
            return
        for key in ("listen", "state_dir", "fleet"):
            if getattr(new, key) != getattr(old, key):
                logger.warning("%s changed; that takes a restart, the old value stays in force", key)
        new = dataclasses.replace(new, fleet=old.fleet)
        if new.plain_http != old.plain_http:
            logger.warning("plain_http changed; that takes a restart, the old value stays in force")
            new = dataclasses.replace(new, plain_http=old.plain_http, tls=old.tls, ssl_context=old.ssl_context)
        # The worker takes the new chains first, and only then do requests see the new config: a request
        # for a chain the reload adds is a 404 until the worker knows that chain, never sent to a default.
        try:
            runtime.worker.submit(Reconfigure(tuple(new.chains.values()), new.limits.kernel_check)).result(
                timeout=RECONFIGURE_TIMEOUT)
        except Exception as exc:
            logger.error("reload FAILED: applying the chains of %s failed (%s); still serving the previous "
                         "config", new.path, exc.__class__.__name__)
            try:  # the worker may have taken some of the new chains: give it back the ones in force
                runtime.worker.submit(Reconfigure(tuple(old.chains.values()), old.limits.kernel_check)).result(
                    timeout=RECONFIGURE_TIMEOUT)
            except Exception as again:
                logger.error("restoring the previous chains failed too (%s)", again.__class__.__name__)
            systemd.notify("READY=1", f"STATUS={self._status(runtime, 'reload FAILED, serving the previous config')}")
            return
        log.setup(new.log, verbose_stderr=self.verbose)
        runtime.generation = Generation(new, Authenticator(new.users))
        logger.info("reloaded %s: %d users, %d chains", new.path, len(new.users), len(new.chains))
        systemd.notify("READY=1", f"STATUS={self._status(runtime, 'reloaded')}")

    @staticmethod
    def _stop(runtime: Runtime, servers: list[Server], store: object, backend: object) -> None:
        systemd.notify("STOPPING=1")
        runtime.stopping = True
        limits = runtime.generation.config.limits
        for srv in servers:
            srv.shutdown()
        try:
            runtime.admission.close_waiting()
            if not runtime.admission.wait_empty(limits.request_timeout + limits.worker_timeout):
                logger.warning("closing %d connections still busy at shutdown", len(runtime.admission))
                runtime.admission.close_waiting(everything=True)
        finally:
            try:
                runtime.worker.stop()
            finally:
                for srv in servers:
                    srv.server_close()
                store.close()  # type: ignore[attr-defined]
                backend.close()  # type: ignore[attr-defined]
                logger.info("stopped")
