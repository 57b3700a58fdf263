"""The legacy filter tables through python-iptables (libiptc), shared by the iptables and ipset backends:
the xtables lock, our chains and their hook jumps, and the rule shapes both recognise.
See iptables(8) and iptables-extensions(8).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
from typing import Iterator

import iptc

from webiptd.config import TARGETS, Chain
from webiptd.net import Network

logger = logging.getLogger(__name__)

LOCK_PATH = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")
VERSIONS = (4, 6)
ANY = {4: "0.0.0.0/0.0.0.0", 6: "::/0"}
DEFAULT_REJECT = {4: "icmp-port-unreachable", 6: "icmp6-port-unreachable"}


def _only_filter_exists() -> None:
    # python-iptables decides whether a jump target is a chain by opening every table, and opening
    # one instantiates it in the kernel (nat pulls in conntrack). Our chains live in filter only,
    # so tell it the other tables are absent rather than create them on the host. This is class-level
    # state of python-iptables, so it holds for the whole process; setting it again changes nothing.
    for table_class in (iptc.Table, iptc.Table6):
        for other in table_class.ALL:
            if other != "filter":
                table_class.existing_table_names[other] = False


def new_rule(version: int) -> iptc.Rule:
    return iptc.Rule() if version == 4 else iptc.Rule6()


def verdict(version: int, rule: iptc.Rule) -> str | None:
    """What all our block shapes share: the rule's target (DROP, or REJECT with its default reply) when it
    applies to any protocol and interface; None for any other rule. Addresses are the caller's to check."""
    target: str = rule.target.name
    if target not in TARGETS or rule.in_interface or rule.out_interface:
        return None
    if rule.protocol not in (None, "ip", "all") or (version == 4 and rule.fragment):
        return None
    if target == "REJECT" and rule.target.get_all_parameters().get("reject-with") != [DEFAULT_REJECT[version]]:
        return None
    return target


def per_address(version: int, rule: iptc.Rule, match: str | None = None) -> tuple[Network, str, str] | None:
    """(network, target, match) for a rule of the iptables backend's shapes, `-s NETWORK -j DROP|REJECT`
    (match source) or `-d NETWORK -j DROP|REJECT` (destination); else None.

    A rule with neither address blocks a /0 either way: it gets `match` when given, else source.
    """
    if rule.matches or rule.src.startswith("!") or rule.dst.startswith("!"):
        return None
    target = verdict(version, rule)
    if target is None:
        return None
    if rule.src != ANY[version] and rule.dst != ANY[version]:
        return None
    if rule.dst != ANY[version]:
        text, found = rule.dst, "destination"
    elif rule.src != ANY[version]:
        text, found = rule.src, "source"
    else:
        text, found = rule.src, match or "source"
    try:
        return ipaddress.ip_network(text, strict=True), target, found
    except ValueError:
        return None


def jump_interfaces(hook: str, interface: str | None) -> tuple[str | None, str | None]:
    """(in, out) interface of the jump from `hook` for a chain's `interface`: `-i` from INPUT and FORWARD,
    `-o` from OUTPUT (the config allows an interface only with these hooks)."""
    if interface is None:
        return None, None
    return (None, interface) if hook == "OUTPUT" else (interface, None)


def plain_jump(version: int, rule: iptc.Rule, chain: str) -> tuple[str | None, str | None] | None:
    """(in, out) interface of a jump of our shape to `chain`, `-j CHAIN` with at most `-i` or `-o`; None for
    any other rule, a jump with a match, an address, a protocol or a negated interface among them."""
    if rule.target.name != chain or rule.matches or rule.src != ANY[version] or rule.dst != ANY[version]:
        return None
    if rule.protocol not in (None, "ip", "all") or (version == 4 and rule.fragment):
        return None
    interfaces = rule.in_interface or None, rule.out_interface or None
    if any(i is not None and i.startswith("!") for i in interfaces):
        return None
    return interfaces


def _describe(interfaces: tuple[str | None, str | None]) -> str:
    """The interfaces of a jump as iptables writes them (" -i eth0"), for the log."""
    return "".join(f" {flag} {name}" for flag, name in zip(("-i", "-o"), interfaces) if name is not None)


class Xtables:
    """The filter table of each family, and the lock every change to them takes.

    python-iptables keeps one Table object per table for the whole process, so every Xtables shares them;
    the worker thread is their only user.
    """

    def __init__(self, lock_path: str = LOCK_PATH):
        self._lock_path = lock_path
        _only_filter_exists()
        self._tables: dict[int, iptc.Table] = {4: iptc.Table(iptc.Table.FILTER), 6: iptc.Table6(iptc.Table6.FILTER)}
        for table in self._tables.values():
            table.autocommit = False

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The lock `iptables -w` takes. python-iptables takes none of its own; without it, concurrent
        writers silently lose rules."""
        fd = os.open(self._lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def table(self, version: int) -> iptc.Table:
        return self._tables[version]

    def rules(self, version: int, chain: str) -> list[iptc.Rule]:
        """The rules of `chain` in the table as last refreshed; none when there is no such chain."""
        table = self._tables[version]
        return iptc.Chain(table, chain).rules if table.is_chain(chain) else []

    def ensure_chain(self, version: int, chain: Chain) -> None:
        """Create `chain` if missing and jump to it from position 1 of each of its hooks; commit is the caller's.

        A jump of our shape to the chain with another interface than the config's (a reload changed it) is
        replaced, in the same commit, so the chain is never skipped on the way. Jumps with other matches
        are someone else's and left alone.
        """
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
            wanted = jump_interfaces(hook, chain.interface)
            jumps = [(rule, found) for rule in hook_chain.rules
                     if (found := plain_jump(version, rule, chain.name)) is not None]
            if not any(found == wanted for _, found in jumps):
                jump = new_rule(version)
                if wanted[0] is not None:
                    jump.in_interface = wanted[0]
                if wanted[1] is not None:
                    jump.out_interface = wanted[1]
                jump.target = jump.create_target(chain.name)
                hook_chain.insert_rule(jump, 0)
                logger.info("inserted jump %s -> %s%s at position 1 (ipv%d)", hook, chain.name,
                            _describe(wanted), version)
            for rule, found in jumps:
                if found != wanted:
                    hook_chain.delete_rule(rule)
                    logger.info("removed jump %s -> %s%s, which the config no longer has (ipv%d)", hook,
                                chain.name, _describe(found), version)

    def structure_missing(self, version: int, chain: Chain) -> str | None:
        """What is gone of `chain` and its hook jumps in a refreshed table, or None."""
        table = self._tables[version]
        if not table.is_chain(chain.name):
            return f"chain {chain.name} (ipv{version}) is gone"
        for hook in chain.hooks:
            if not table.is_chain(hook):
                continue
            wanted = jump_interfaces(hook, chain.interface)
            if not any(plain_jump(version, r, chain.name) == wanted for r in iptc.Chain(table, hook).rules):
                return f"the jump from {hook} to {chain.name}{_describe(wanted)} (ipv{version}) is gone"
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

    def close(self) -> None:
        for table in self._tables.values():
            with contextlib.suppress(Exception):
                table.close()
