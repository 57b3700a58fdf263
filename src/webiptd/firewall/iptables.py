"""The iptables backend: one rule per blocked network, through python-iptables (libiptc).

Every change happens under the xtables lock that `iptables -w` takes, on a freshly
refreshed table, and is committed once per table for a whole batch.
See iptables(8) and iptables-extensions(8).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
from typing import Iterable, Iterator, Mapping

import iptc

from webiptd.config import Chain, Network
from webiptd.firewall.ops import Add, Op, inverse

logger = logging.getLogger(__name__)

LOCK_PATH = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")
ANY = {4: "0.0.0.0/0.0.0.0", 6: "::/0"}
DEFAULT_REJECT = {4: "icmp-port-unreachable", 6: "icmp6-port-unreachable"}


class IptablesBackend:
    name = "iptables"

    def __init__(self, lock_path: str = LOCK_PATH):
        self._lock_path = lock_path
        # python-iptables decides whether a jump target is a chain by opening every table, and opening
        # one instantiates it in the kernel (nat pulls in conntrack). Our chains live in filter only,
        # so tell it the other tables are absent rather than create them on the host.
        for table_class in (iptc.Table, iptc.Table6):
            for other in table_class.ALL:
                if other != "filter":
                    table_class.existing_table_names[other] = False
        self._tables: dict[int, iptc.Table] = {4: iptc.Table(iptc.Table.FILTER), 6: iptc.Table6(iptc.Table6.FILTER)}
        for table in self._tables.values():
            table.autocommit = False
        self._templates: dict[tuple[int, str], iptc.Rule] = {}

    @contextlib.contextmanager
    def xtables_lock(self) -> Iterator[None]:
        # python-iptables takes no lock of its own; without it, concurrent writers silently lose rules.
        fd = os.open(self._lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _rule(self, version: int, network: Network, target: str) -> iptc.Rule:
        """The rule for `network`: one reused rule per family and target, with only its source changed.

        libiptc copies a rule on insert and compares on delete, so reusing one is safe; building a new
        one (python-iptables loads the target's extension each time) was a fifth of the worker's time.
        """
        rule = self._templates.get((version, target))
        if rule is None:
            rule = iptc.Rule() if version == 4 else iptc.Rule6()
            rule.target = rule.create_target(target)
            self._templates[(version, target)] = rule
        rule.src = str(network)
        return rule

    def table(self, version: int) -> iptc.Table:
        return self._tables[version]

    def ensure_chain(self, version: int, chain: Chain) -> None:
        """Create `chain` if missing and jump to it from position 1 of each of its hooks; commit is the caller's."""
        table = self._tables[version]
        if not table.is_chain(chain.name):
            table.create_chain(chain.name)
            logger.info("created chain %s (ipv%d)", chain.name, version)
        for hook in chain.hooks:
            if not table.is_chain(hook):
                logger.error("hook chain %s does not exist (ipv%d); chain %s is not hooked there",
                             hook, version, chain.name)
                continue
            hook_chain = iptc.Chain(table, hook)
            if not any(rule.target.name == chain.name for rule in hook_chain.rules):
                jump = iptc.Rule() if version == 4 else iptc.Rule6()
                jump.target = jump.create_target(chain.name)
                hook_chain.insert_rule(jump, 0)
                logger.info("inserted jump %s -> %s at position 1 (ipv%d)", hook, chain.name, version)

    def expires_in_kernel(self, chain: str) -> bool:
        return False  # one rule per network has no timeout; the worker expires them

    def shares_target(self, chain: str) -> bool:
        return False  # each rule has its own

    def prepare(self, chains: Iterable[Chain]) -> None:
        chains = list(chains)
        with self.xtables_lock():
            for version, table in self._tables.items():
                table.refresh()
                for chain in chains:
                    self.ensure_chain(version, chain)
                table.commit()

    def read(self, chains: Iterable[str]) -> dict[tuple[str, Network], str]:
        found: dict[tuple[str, Network], str] = {}
        names = list(chains)
        with self.xtables_lock():
            for version, table in self._tables.items():
                table.refresh()
                for name in names:
                    if not table.is_chain(name):
                        continue
                    for rule in iptc.Chain(table, name).rules:
                        parsed = self.parse_rule(version, rule)
                        if parsed is None:
                            logger.warning("chain %s (ipv%d) holds a rule web-ipt-d did not make; leaving it "
                                           "alone: src=%s target=%s", name, version, rule.src, rule.target.name)
                            continue
                        found[(name, parsed[0])] = parsed[1]
        return found

    @staticmethod
    def parse_rule(version: int, rule: iptc.Rule) -> tuple[Network, str] | None:
        """(network, target) for a rule of the one shape we make; None for anything else."""
        target = rule.target.name
        if target not in ("DROP", "REJECT") or rule.matches or rule.in_interface or rule.out_interface:
            return None
        if rule.protocol not in (None, "ip", "all") or rule.dst != ANY[version] or rule.src.startswith("!"):
            return None
        if target == "REJECT" and rule.target.get_all_parameters().get("reject-with") != [DEFAULT_REJECT[version]]:
            return None
        if version == 4 and rule.fragment:
            return None
        try:
            return ipaddress.ip_network(rule.src, strict=True), target
        except ValueError:
            return None

    def structure_missing(self, version: int, chain: Chain) -> str | None:
        """What is gone of `chain` and its hook jumps in a refreshed table, or None."""
        table = self._tables[version]
        if not table.is_chain(chain.name):
            return f"chain {chain.name} (ipv{version}) is gone"
        for hook in chain.hooks:
            if table.is_chain(hook) and not any(r.target.name == chain.name for r in iptc.Chain(table, hook).rules):
                return f"the jump from {hook} to {chain.name} (ipv{version}) is gone"
        return None

    def count_rules(self, version: int, chain: str) -> int:
        """The rules in `chain` of the refreshed table, counted without python-iptables' Rule objects
        (which take about 70 µs each to make: 0.7 s at 10k)."""
        table = self._tables[version]
        count = 0
        entry = table.first_rule(chain)
        while entry:
            count += 1
            entry = table.next_rule(entry)
        return count

    def missing(self, chains: Iterable[Chain], counts: Mapping[str, int]) -> str | None:
        # Each entry is one rule, and the kernel never drops one by itself: fewer rules than entries means
        # some went (rules of other shapes, left alone, can only make the count larger).
        chains = list(chains)
        with self.xtables_lock():
            have = dict.fromkeys((c.name for c in chains), 0)
            for version, table in self._tables.items():
                table.refresh()
                for chain in chains:
                    gone = self.structure_missing(version, chain)
                    if gone is not None:
                        return gone
                    have[chain.name] += self.count_rules(version, chain.name)
        for chain in chains:
            if have[chain.name] < counts.get(chain.name, 0):
                return f"chain {chain.name} has {have[chain.name]} rules for {counts[chain.name]} blocks"
        return None

    def apply(self, ops: Iterable[Op], chains: Mapping[str, Chain]) -> None:
        by_version: dict[int, list[Op]] = {}
        for op in ops:
            by_version.setdefault(op.network.version, []).append(op)
        with self.xtables_lock():
            committed: list[tuple[int, list[Op]]] = []
            try:
                for version, version_ops in by_version.items():
                    self._commit(version, version_ops, chains)
                    committed.append((version, version_ops))
            except Exception:
                # Each table commits on its own; undo the ones that did, so the batch fails as a whole.
                for version, done in committed:
                    try:
                        self._commit(version, [inverse(op) for op in reversed(done)], chains)
                    except Exception:
                        logger.exception("could not undo the ipv%d part of a failed batch", version)
                raise

    def _commit(self, version: int, ops: list[Op], chains: Mapping[str, Chain]) -> None:
        table = self._tables[version]
        table.refresh()  # drops whatever a failed attempt left uncommitted
        for name in {op.chain for op in ops}:
            if name in chains:
                self.ensure_chain(version, chains[name])
        for op in ops:
            rule = self._rule(version, op.network, op.target)
            chain = iptc.Chain(table, op.chain)
            if isinstance(op, Add):
                chain.append_rule(rule)
            else:
                try:
                    chain.delete_rule(rule)
                except iptc.IPTCError:
                    # Someone removed it behind our back; the end state is what was asked for.
                    logger.warning("rule for %s was already gone from chain %s", op.network, op.chain)
        table.commit()

    def close(self) -> None:
        for table in self._tables.values():
            with contextlib.suppress(Exception):
                table.close()

