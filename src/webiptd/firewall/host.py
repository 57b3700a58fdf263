"""What this host offers each backend: the checks behind the start-up log's and -check_config's notes.

Only reads files, lists interfaces and looks libraries up; never loads a kernel module, a firewall library or
touches a rule.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import platform
import shutil
import socket
from pathlib import Path
from typing import Iterable

from webiptd.config import FILTER_BUILTINS, Chain

# The distribution's binding is pure Python over ctypes, so linking its directory into a venv is enough.
VENV_LINK = ("ln -sfn \"$(/usr/bin/python3 -c 'import nftables, os; print(os.path.dirname(nftables.__file__))')\" "
             "\"$(<venv>/bin/python -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')/nftables\"")
NFTABLES_MISSING = ("install python3-nftables (libnftables' own Python binding, with libnftables1) and, when "
                    f"web-ipt-d runs from a venv, link it in: {VENV_LINK}")


def iptables_is_nft_variant() -> bool:
    """True when the host's `iptables` command is iptables-nft (Debian 12's default)."""
    path = shutil.which("iptables")
    return path is not None and "nft" in os.path.basename(os.path.realpath(path))


def _names(chains: Iterable[Chain], backend: str) -> list[str]:
    return [c.name for c in chains if c.backend == backend]


def _module_missing(name: str) -> bool:
    """True only when the kernel provably lacks module `name`: not loaded, not built in, not installed."""
    if Path("/sys/module", name).exists():
        return False
    base = Path("/lib/modules", platform.release())
    try:
        listed = (base / "modules.dep").read_text(errors="replace") + (base / "modules.builtin").read_text(
            errors="replace")
    except OSError:
        return False  # no module index to look in (a container, a custom kernel): no verdict
    return f"/{name}.ko" not in listed


def _legacy_tables() -> list[str]:
    """The legacy (x_tables) tables that exist in this network namespace, IPv4 and IPv6."""
    found: list[str] = []
    for path in ("/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"):
        try:
            found += [t for t in Path(path).read_text().split() if t not in found]
        except OSError:
            pass
    return found


def _interfaces() -> list[str] | None:
    """The names of this network namespace's interfaces; None when they cannot be listed."""
    try:
        return [name for _, name in socket.if_nameindex()]
    except OSError:
        return None


def _has_interface(names: list[str], interface: str) -> bool:
    """Whether a name matches a chain's `interface`, where a trailing "+" is a prefix (iptables(8), -i)."""
    if interface.endswith("+"):
        return any(name.startswith(interface[:-1]) for name in names)
    return interface in names


def host_errors(chains: Iterable[Chain]) -> list[str]:
    """Why a backend some chain names cannot work on this host; the daemon would fail to start."""
    chains = list(chains)
    errors: list[str] = []
    nft = _names(chains, "nftables")
    if nft and importlib.util.find_spec("nftables") is None:
        errors.append(f"chains {', '.join(nft)} use the nftables backend, but Python cannot import nftables: "
                      + NFTABLES_MISSING)
    if nft and ctypes.util.find_library("nftables") is None:
        errors.append(f"chains {', '.join(nft)} use the nftables backend, but libnftables is not installed: "
                      "install libnftables1 (Debian, Ubuntu) or nftables (RHEL, Fedora)")
    # The ipset backend talks netlink itself (the standard library's socket) and runs the ipset command.
    ipset = _names(chains, "ipset")
    if ipset and shutil.which("ipset") is None:
        errors.append(f"chains {', '.join(ipset)} use the ipset backend, but the ipset command is missing: "
                      "install ipset")
    if ipset and _module_missing("ip_set"):
        errors.append(f"chains {', '.join(ipset)} use the ipset backend, but this kernel has no ip_set module")
    return errors


def host_warnings(chains: Iterable[Chain]) -> list[str]:
    """Where a chain's backend works but conflicts with what the host runs."""
    chains = list(chains)
    warnings: list[str] = []
    xtables = [c.name for c in chains if c.backend in ("iptables", "ipset")]
    if xtables and iptables_is_nft_variant():
        warnings.append(f"chains {', '.join(xtables)} use the legacy iptables tables (python-iptables), but this "
                        "host's `iptables` is the nft variant, so `iptables -S` does not show their rules. They "
                        "still filter packets: see them with `iptables-legacy -S` and `ip6tables-legacy -S`; on a "
                        "host with no legacy iptables, use the nftables backend")
    if xtables and (_module_missing("ip_tables") or _module_missing("ip6_tables")):
        warnings.append(f"chains {', '.join(xtables)} need the legacy ip_tables and ip6_tables kernel modules, "
                        "which this kernel lacks: use the nftables backend")
    user_hooks = sorted({hook for c in chains if c.backend in ("iptables", "ipset") for hook in c.hooks
                         if hook not in FILTER_BUILTINS})
    if user_hooks and iptables_is_nft_variant():
        warnings.append(f"hook chains {', '.join(user_hooks)} are looked for in the legacy tables, but this host's "
                        "`iptables` is the nft variant: a chain that other tools make with it (Docker's DOCKER-USER) "
                        "is not there, so nothing is hooked to it. Hook FORWARD instead (docs/docker.md)")
    names = _interfaces()
    for chain in chains:
        if chain.interface is not None and names is not None and not _has_interface(names, chain.interface):
            warnings.append(f"chain {chain.name} matches interface {chain.interface}, which this host does not have "
                            "(yet): the chain sees no packet until it appears")
    nft = _names(chains, "nftables")
    legacy = _legacy_tables()
    if nft and not xtables and legacy:
        warnings.append(f"chains {', '.join(nft)} use the nftables backend, and this host also has legacy iptables "
                        f"tables ({', '.join(legacy)}): both filter every packet, and a drop in either is final")
    return warnings
