"""The command line: flags and wiring only. Every flag works with one dash or two."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from webiptd import __version__, config as config_mod
from webiptd.config import ConfigError, config_warnings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="web-ipt-d", add_help=False, allow_abbrev=False,
        description="A small, safe HTTPS API that blocks and unblocks addresses and networks in the host firewall "
                    "(iptables, ipset or nftables): for all traffic or some protocols and ports, coming in, going "
                    "out or forwarded, with a claim per owner; and allow chains that let listed addresses through.",
        epilog="Without an action flag, runs the daemon. Every flag also works with two dashes. The API: "
               "PUT, DELETE and GET /chain/<chain>/<ipv4|ipv6>/<address>[/<prefix>][?timeout=&owner=&proto=&port=], "
               "GET and POST /chain/<chain>, GET /chains; docs/api.md has the rest.",
    )
    p.add_argument("-config", "--config", metavar="PATH", type=Path, default=config_mod.DEFAULT_PATH,
                   help=f"the config file (default: {config_mod.DEFAULT_PATH})")
    actions = p.add_mutually_exclusive_group()
    actions.add_argument("-version", "--version", action="store_true", help="print the version and exit")
    actions.add_argument("-write_config", "--write_config", action="store_true",
                         help="write a sample config.yaml into the current directory: every key, "
                              "its default and what it does")
    actions.add_argument("-check_config", "--check_config", action="store_true",
                         help="validate the config and every file it names; exit 1 listing each problem")
    actions.add_argument("-hash_password", "--hash_password", action="store_true",
                         help="read a password (stdin, or a prompt on a tty) and print a bcrypt hash for the config")
    actions.add_argument("-demo", "--demo", action="store_true",
                         help="run a demo on https://localhost:8820 with its own certificate and user; "
                              "its rules go into a private network namespace (needs root)")
    actions.add_argument("-gen_certs", "--gen_certs", metavar="DIR", type=Path,
                         help="make a CA, a server certificate for every -host, and a client certificate: "
                              "ca.crt, ca.key, server.crt, server.key, client.crt, client.key in DIR "
                              "(created mode 0700 if missing; keys mode 0600). A CA already in DIR "
                              "(ca.crt and ca.key) is reused, never overwritten; server.* and client.* "
                              "are replaced on every run")
    p.add_argument("-host", "--host", metavar="NAME", action="append", dest="hosts", default=[],
                   help="with -gen_certs: a DNS name or IP address clients reach the server by "
                        "(at least one; repeat the flag for more)")
    p.add_argument("-client_name", "--client_name", metavar="NAME",
                   help="with -gen_certs: the client certificate's CN (default: web-ipt-d-client); "
                        "with tls.client_cert_auth it logs in as the config user of that name")
    p.add_argument("-h", "-help", "--help", action="help", help="show this help and exit")
    return p


def write_config() -> int:
    target = Path("config.yaml")
    text = config_mod.sample()
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"web-ipt-d: {target.resolve()} exists; not overwriting it", file=sys.stderr)
        return 1
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {target.resolve()}")
    return 0


def load_or_report(path: Path) -> config_mod.Config | None:
    """The config, or None after printing each problem on its own line to stderr."""
    try:
        return config_mod.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{exc.path}: {problem}", file=sys.stderr)
        return None


def check_config(path: Path) -> int:
    cfg = load_or_report(path)
    if cfg is None:
        return 1
    from webiptd.firewall.host import host_errors, host_warnings  # reads files only; loads no firewall library

    problems = host_errors(cfg.chains.values())
    for problem in problems:
        print(f"{path}: error: {problem}", file=sys.stderr)
    for warning in host_warnings(cfg.chains.values()) + config_warnings(cfg):
        print(f"{path}: warning: {warning}", file=sys.stderr)
    if problems:
        return 1
    transport = "plain HTTP on loopback" if cfg.tls is None else f"TLS {cfg.tls.min_version} or later"
    backends = sorted({c.backend for c in cfg.chains.values()})
    print(f"{path}: ok: {len(cfg.users)} users, {len(cfg.chains)} chains, "
          f"backend{'s' if len(backends) > 1 else ''} {', '.join(backends) or 'none'}, {transport}")
    for chain in cfg.chains.values():
        where = f", priority {chain.priority}" if chain.backend == "nftables" else ""
        print(f"  chain {chain.name}: backend {chain.backend}, target {chain.target}, "
              f"hooks {','.join(chain.hooks) or 'none'}{where}{', shared' if chain.shared else ''}")
    if cfg.fleet is not None:  # not contacted: -check_config reads files only
        print(f"  fleet: node {cfg.fleet.node}, redis {cfg.fleet.redis_display}, key prefix {cfg.fleet.key_prefix!r}, "
              f"retention {cfg.fleet.retention} s")
    return 0


def hash_password() -> int:
    from webiptd.passwords import hash_password as make_hash

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("web-ipt-d: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("web-ipt-d: refusing an empty password", file=sys.stderr)
        return 1
    try:
        hashed = make_hash(password)
    except ValueError as exc:  # bcrypt >= 5 refuses passwords over 72 bytes rather than truncate them
        print(f"web-ipt-d: cannot hash this password: {exc}", file=sys.stderr)
        return 1
    print(hashed)
    return 0


def gen_certs(directory: Path, hosts: list[str], client_name: str | None) -> int:
    from webiptd import certs

    directory = directory.absolute()
    try:
        done = certs.generate(directory, hosts, certs.DEFAULT_CLIENT_NAME if client_name is None else client_name)
    except certs.CertError as exc:
        print(f"web-ipt-d: {exc}", file=sys.stderr)
        return 1
    if done.ca_reused:
        print(f"reused the CA {directory / 'ca.crt'} and its key {directory / 'ca.key'} (not modified): "
              f"{certs.describe(done.ca)}; SHA-256 {certs.fingerprint(done.ca)}")
    details = {"ca.crt": certs.describe(done.ca) + f"; SHA-256 {certs.fingerprint(done.ca)}",
               "server.crt": certs.describe(done.server), "client.crt": certs.describe(done.client)}
    for path in done.written:
        verb = "replaced" if path in done.replaced else "wrote"
        print(f"{verb} {path}: " + details.get(path.name, "private key, mode 0600"))
    host = hosts[0] if ":" not in hosts[0] else f"[{hosts[0]}]"
    print(f"server config:  tls: {{cert: {directory / 'server.crt'}, key: {directory / 'server.key'}, "
          f"client_ca: {directory / 'ca.crt'}}}")
    print(f"a client:       curl --cacert {directory / 'ca.crt'} --cert {directory / 'client.crt'} "
          f"--key {directory / 'client.key'} https://{host}:8820/health")
    return 0


def run_daemon(path: Path) -> int:
    from webiptd.daemon import Daemon

    cfg = load_or_report(path)
    return 1 if cfg is None else Daemon(cfg).run()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.gen_certs is None and (args.hosts or args.client_name is not None):
        print("web-ipt-d: -host and -client_name go with -gen_certs DIR", file=sys.stderr)
        return 1
    if args.version:
        print(f"web-ipt-d {__version__}")
        return 0
    if args.write_config:
        return write_config()
    if args.check_config:
        return check_config(args.config)
    if args.hash_password:
        return hash_password()
    if args.gen_certs is not None:
        return gen_certs(args.gen_certs, args.hosts, args.client_name)
    if args.demo:
        from webiptd.demo import run_demo

        return run_demo()
    return run_daemon(args.config)


if __name__ == "__main__":
    sys.exit(main())
