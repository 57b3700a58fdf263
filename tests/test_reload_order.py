"""A reload's order, deterministically and without root: the worker takes the new chains before any request
sees the new config, and a reload whose chains the worker cannot apply is reported as failed and changes
nothing. The real worker and store; an in-memory backend that can hold the worker inside the reload."""

from __future__ import annotations

import base64
import ipaddress
import logging
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest
import yaml

from tests.conftest import FAST_HASH, PKI
from tests.test_worker_logic import RecordingBackend
from webiptd.auth import Authenticator
from webiptd.config import Chain, load
from webiptd.daemon import Daemon
from webiptd.firewall.worker import Worker
from webiptd.http.app import App, Generation, Runtime
from webiptd.state import Store

WAIT = 10
CLIENT = ipaddress.ip_address("198.51.100.9")
AUTH = "Basic " + base64.b64encode(b"admin:pw").decode()


class HoldingBackend(RecordingBackend):
    """prepare() (what a Reconfigure starts with) can be held, or made to fail once."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.fail_next_prepare = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def prepare(self, chains: Iterable[Chain], retired: Iterable[str] = ()) -> None:
        chains = list(chains)
        super().prepare(chains, retired)
        if self.hold:
            self.entered.set()
            assert self.release.wait(WAIT)
        if self.fail_next_prepare:
            self.fail_next_prepare = False
            raise OSError("simulated: the kernel refused the new chain")


def write_config(path: Path, pki: PKI, chains: list[str]) -> None:
    path.write_text(yaml.safe_dump({
        "listen": ["127.0.0.1:8820"],
        "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)},
        "state_dir": str(path.parent / "state"),
        "log": {"file": None},
        "users": {"admin": {"password_hash": FAST_HASH.hash("pw"), "chains": ["*"]}},
        "chains": {name: {"hooks": ["INPUT"], "target": "DROP"} for name in chains},
    }), encoding="utf-8")


class Setup:
    def __init__(self, tmp_path: Path, pki: PKI):
        self.path = tmp_path / "config.yaml"
        self.pki = pki
        write_config(self.path, pki, ["f2b-web"])
        config = load(self.path)
        self.backend = HoldingBackend()
        self.store = Store(config.state_dir)
        self.worker = Worker(self.backend, self.store, config.chains.values())
        self.worker.start(timeout=WAIT)
        self.runtime = Runtime(Generation(config, Authenticator(config.users)), self.worker)
        self.app = App(self.runtime)
        self.daemon = Daemon(config)

    def put(self, chain: str) -> int:
        return self.app.handle("PUT", f"/chain/{chain}/ipv4/203.0.113.5", AUTH, CLIENT).status

    def reload_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.daemon._reload, args=(self.runtime,))
        t.start()
        return t

    def close(self) -> None:
        self.worker.stop()
        self.store.close()


@pytest.fixture
def setup(tmp_path: Path, pki: PKI) -> Iterator[Setup]:
    s = Setup(tmp_path, pki)
    yield s
    s.close()


def test_requests_see_a_new_chain_only_once_the_worker_has_it(setup: Setup) -> None:
    s = setup
    old = s.runtime.generation
    write_config(s.path, s.pki, ["f2b-web", "f2b-new"])
    s.backend.hold = True
    reload = s.reload_in_thread()
    try:
        assert s.backend.entered.wait(WAIT), "the reload never reached the worker"
        # The worker is inside the reload: requests still see the config it has applied.
        assert s.runtime.generation is old
        assert s.put("f2b-new") == 404  # not queued behind the reload for a worker that lacks the chain
    finally:
        s.backend.release.set()
        reload.join(WAIT)
    assert s.runtime.generation is not old and "f2b-new" in s.runtime.generation.config.chains
    assert s.put("f2b-new") == 201
    applied = [op for ops in s.backend.applies for op in ops if op.chain == "f2b-new"]
    assert len(applied) == 1, s.backend.calls


def test_a_reload_the_worker_cannot_apply_is_reported_and_changes_nothing(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    s = setup
    old = s.runtime.generation
    write_config(s.path, s.pki, ["f2b-web", "f2b-new"])
    s.backend.fail_next_prepare = True
    with caplog.at_level(logging.INFO, logger="webiptd"):
        s.reload_in_thread().join(WAIT)
    assert s.runtime.generation is old, "a failed reload swapped the config in"
    assert any(r.levelno == logging.ERROR and "reload FAILED" in r.getMessage() for r in caplog.records)
    assert not any(r.getMessage().startswith("reloaded ") for r in caplog.records)
    # The worker was given back the chains in force, and serves them.
    prepares = [c for c in s.backend.calls if c[0] == "prepare"]
    assert prepares[-1] == ("prepare", ("f2b-web",)), prepares
    assert s.put("f2b-new") == 404
    assert s.put("f2b-web") == 201
    # A later reload that works goes through.
    s.reload_in_thread().join(WAIT)
    assert "f2b-new" in s.runtime.generation.config.chains and s.put("f2b-new") == 201


def test_the_reload_of_an_unreadable_config_keeps_everything(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    s = setup
    old = s.runtime.generation
    s.path.write_text("chains: [unclosed\n", encoding="utf-8")
    calls = len(s.backend.calls)
    with caplog.at_level(logging.INFO, logger="webiptd"):
        s.reload_in_thread().join(WAIT)
    assert s.runtime.generation is old
    assert not any(c[0] == "prepare" for c in s.backend.calls[calls:]), "a refused config reached the worker"
    assert any("reload refused" in r.getMessage() for r in caplog.records)


def test_chains_in_the_store_that_are_not_configured_are_unaffected(setup: Setup) -> None:
    """The order change must not lose entries of chains the reload keeps."""
    s = setup
    assert s.put("f2b-web") == 201
    write_config(s.path, s.pki, ["f2b-web", "f2b-new"])
    s.reload_in_thread().join(WAIT)
    r = s.app.handle("GET", "/chain/f2b-web/ipv4/203.0.113.5", AUTH, CLIENT)
    assert r.status == 200, r
    body: Any = r.body
    assert body["network"] == "203.0.113.5/32" or "203.0.113.5" in str(body)
