"""The iptables backend: one `-s NETWORK -j DROP|REJECT` rule per block, through python-iptables (libiptc),
each batch committed once per table under the xtables lock.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

import iptc

from webiptd.config import Chain
from webiptd.firewall.ops import Add, Op, apply_in_parts
from webiptd.firewall.xtables import LOCK_PATH, VERSIONS, Xtables, new_rule, per_address
from webiptd.net import Network

logger = logging.getLogger(__name__)


class IptablesBackend:
    name = "iptables"

    def __init__(self, lock_path: str = LOCK_PATH):
        self._xt = Xtables(lock_path)
        self._templates: dict[tuple[int, str], iptc.Rule] = {}

    def _rule(self, version: int, network: Network, target: str) -> iptc.Rule:
        """The rule for `network`: one reused rule per family and target, with only its source changed.

        libiptc copies a rule on insert and compares on delete, so reusing one is safe; building a new
        one (python-iptables loads the target's extension each time) was a fifth of the worker's time.
        """
        rule = self._templates.get((version, target))
        if rule is None:
            rule = new_rule(version)
            rule.target = rule.create_target(target)
            self._templates[(version, target)] = rule
        rule.src = str(network)
        return rule

    def expires_in_kernel(self, chain: str) -> bool:
        return False  # one rule per network has no timeout; the worker expires them

    def shares_target(self, chain: str) -> bool:
        return False  # each rule has its own

    def prepare(self, chains: Iterable[Chain]) -> None:
        chains = list(chains)
        with self._xt.lock():
            for version in VERSIONS:
                table = self._xt.table(version)
                table.refresh()
                for chain in chains:
                    self._xt.ensure_chain(version, chain)
                table.commit()

    def read(self, chains: Iterable[str]) -> dict[tuple[str, Network], str]:
        found: dict[tuple[str, Network], str] = {}
        names = list(chains)
        with self._xt.lock():
            for version in VERSIONS:
                self._xt.table(version).refresh()
                for name in names:
                    for rule in self._xt.rules(version, name):
                        parsed = per_address(version, rule)
                        if parsed is None:
                            logger.warning("chain %s (ipv%d) holds a rule web-ipt-d did not make; leaving it "
                                           "alone: src=%s target=%s", name, version, rule.src, rule.target.name)
                            continue
                        found[(name, parsed[0])] = parsed[1]
        return found

    def missing(self, chains: Iterable[Chain], counts: Mapping[str, int]) -> str | None:
        # Each entry is one rule, and the kernel never drops one by itself: fewer rules than entries means
        # some went (rules of other shapes, left alone, can only make the count larger).
        chains = list(chains)
        with self._xt.lock():
            have = dict.fromkeys((c.name for c in chains), 0)
            for version in VERSIONS:
                self._xt.table(version).refresh()
                for chain in chains:
                    gone = self._xt.structure_missing(version, chain)
                    if gone is not None:
                        return gone
                    have[chain.name] += self._xt.count_rules(version, chain.name)
        for chain in chains:
            if have[chain.name] < counts.get(chain.name, 0):
                return f"chain {chain.name} has {have[chain.name]} rules for {counts[chain.name]} blocks"
        return None

    def apply(self, ops: Iterable[Op], chains: Mapping[str, Chain]) -> None:
        by_version: dict[int, list[Op]] = {}
        for op in ops:
            by_version.setdefault(op.network.version, []).append(op)
        with self._xt.lock():
            # Each table commits on its own; a failure undoes the ones that did, so the batch fails as a whole.
            apply_in_parts(by_version, lambda version, part: self._commit(version, part, chains),
                           label=lambda version: f"ipv{version}")

    def _commit(self, version: int, ops: list[Op], chains: Mapping[str, Chain]) -> None:
        table = self._xt.table(version)
        table.refresh()  # drops whatever a failed attempt left uncommitted
        for name in {op.chain for op in ops}:
            if name in chains:
                self._xt.ensure_chain(version, chains[name])
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
        self._xt.close()
