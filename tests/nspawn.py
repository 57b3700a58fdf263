"""A real systemd booted as PID 1 in a throwaway systemd-nspawn container over an overlay of /.

Issue 3's recipe: a private mount namespace, a tmpfs on /run/systemd, / bound non-recursively
as the overlay's lower dir, cgroups of our own, and --private-network so firewall changes stay inside.
bpf(2) is let through nspawn's syscall filter, so systemd inside enforces IPAddressDeny= as on a host.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from tests.netns import NetNS, _addr_cmd, _check_no_host_overlap, current_netns_inode, initial_netns_inode

NSPAWN = shutil.which("systemd-nspawn")
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
_boots = itertools.count()
_links = itertools.count()
PR_SET_PDEATHSIG = 1


def _dies_with_us(sig: signal.Signals) -> Any:
    """A preexec_fn: the child gets `sig` if the test process dies first (even by SIGKILL), so
    neither the mount namespace nor a container outlives an interrupted run."""
    parent = os.getpid()

    def preexec() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # already orphaned before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


def missing_reason() -> str | None:
    """Why a container cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "needs root to boot systemd in a container"
    if NSPAWN is None:
        return "systemd-nspawn is missing (Debian package systemd-container)"
    for tool in ("unshare", "nsenter", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is missing"
    return None


def _wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _ns_inode(pid: int, kind: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except FileNotFoundError:
        return None


class Disk:
    """A private mount namespace holding the overlay's layers: / (lower) and a tmpfs (upper).

    The upper dir is the containers' disk: it outlives a container, so a second boot on the
    same Disk is a reboot (same files, fresh /run, fresh network namespace, fresh firewall).
    """

    def __init__(self, base: Path, size: str = "4g") -> None:
        self.base = base
        self.lower, self.layers, self.merged = base / "lower", base / "layers", base / "merged"
        for d in (self.lower, self.layers, self.merged):
            d.mkdir(parents=True)
        # The holder's only job is to keep the mount namespace alive between boots.
        self._holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "sleep", "infinity"],
                                        stdin=subprocess.DEVNULL, preexec_fn=_dies_with_us(signal.SIGKILL))
        own = _ns_inode(os.getpid(), "mnt")
        try:
            _wait_for(lambda: _ns_inode(self._holder.pid, "mnt") not in (None, own), 10, "the private mount namespace")
            self.mount_ns(f"""
                mount -t tmpfs -o mode=0755 tmpfs /run/systemd
                mount --bind / {self.lower}
                mount -t tmpfs -o mode=0755,size={size} tmpfs {self.layers}
                mkdir {self.layers}/upper {self.layers}/work
            """)
        except BaseException:
            self.close()
            raise

    def mount_ns(self, script: str) -> None:
        """Run a shell script in the Disk's mount namespace (and nowhere else)."""
        subprocess.run(["nsenter", "-t", str(self._holder.pid), "-m", "--", "sh", "-euc", script],
                       check=True, stdin=subprocess.DEVNULL)

    def boot(self, unit: str = "basic.target", binds: dict[Path, str] | None = None) -> Container:
        """Boot systemd with `unit` as its target; `binds` maps host dirs to paths inside (read-write)."""
        return Container(self, unit, binds or {})

    def close(self) -> None:
        # Killing the last process in the mount namespace frees it and every mount in it.
        if self._holder.poll() is None:
            self._holder.kill()
            self._holder.wait()


class Container:
    """One boot of systemd 252 as PID 1 on a Disk; `run` executes a command inside it."""

    def __init__(self, disk: Disk, unit: str, binds: dict[Path, str]) -> None:
        self.disk = disk
        self.name = f"webiptd-e2e-{os.getpid()}-{next(_boots)}"
        self.cgroups = [root / self.name for root in CGROUP_ROOTS if root.is_dir()]
        self.init_pid = 0
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.console_path = disk.base / f"{self.name}.console"
        disk.mount_ns(f"""
            mount -t overlay overlay \
                -o lowerdir={disk.lower},upperdir={disk.layers}/upper,workdir={disk.layers}/work {disk.merged}
        """)
        try:
            _remove_stale_cgroups()
            for cgroup in self.cgroups:
                cgroup.mkdir()
            join = "; ".join(f"echo $$ > {c}/cgroup.procs" for c in self.cgroups)
            # sh puts itself in the new cgroups, then becomes nspawn (same PID): nspawn's children
            # start there, so systemd inside gets a delegated subtree of its own.
            with open(self.console_path, "wb") as console:
                self.nspawn = subprocess.Popen(
                    ["nsenter", "-t", str(disk._holder.pid), "-m", "--", "sh", "-ec",
                     f'{join}; exec "$0" "$@"', str(NSPAWN), "-D", str(disk.merged), "--register=no",
                     "--keep-unit", "--private-network",
                     # nspawn's default allow list leaves out bpf(2) (bpffs is not namespaced), so systemd
                     # inside gets EPERM, and then IPAddressDeny=/IPAddressAllow= and DevicePolicy= have no
                     # effect, logged only at debug level in a container (bpf_firewall_supported(),
                     # emit_bpf_firewall_warning() in systemd 252). The container keeps CAP_SYS_ADMIN and
                     # CAP_NET_ADMIN, which the kernel wants to load and attach cgroup programs.
                     "--system-call-filter=bpf",
                     *(f"--bind={host}:{inside}" for host, inside in binds.items()),
                     "--boot", "--", f"--unit={unit}"],
                    env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"},
                    stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                    preexec_fn=_dies_with_us(signal.SIGTERM))
            self.init_pid = _wait_for(self._find_init, 30, "systemd to start in the container")
            self.netns_inode = _ns_inode(self.init_pid, "net")
            refused = {initial_netns_inode(), current_netns_inode()}
            if self.netns_inode is None or self.netns_inode in refused:
                raise RuntimeError(f"refusing to use the container: its network namespace ({self.netns_inode}) "
                                   "is not a private one")
        except BaseException:
            self.stop()
            raise

    def _find_init(self) -> int | None:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited with {self.nspawn.returncode}: {self.console_text()[-2000:]}")
        try:
            children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children").read_text().split()
            for child in children:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        except FileNotFoundError:
            pass
        return None

    def console_text(self) -> str:
        return self.console_path.read_text(errors="replace")

    def wait_booted(self, timeout: float = 60) -> str:
        """Wait until boot finished; returns "running" or "degraded"."""
        deadline = time.monotonic() + timeout
        while True:
            # Until systemd listens on its private socket, systemctl cannot connect and prints nothing.
            proc = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=timeout)
            state = proc.stdout.strip()
            if state in ("running", "degraded"):
                return state
            if state not in ("", "initializing", "starting") or time.monotonic() > deadline:
                raise RuntimeError(f"the container did not boot: {state!r} {proc.stderr}")
            time.sleep(0.05)

    def run(self, argv: Sequence[str], *, check: bool = True, input: str | None = None, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv inside the container (all its namespaces, its root), as root with a plain environment."""
        base_env = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "HOME": "/root", "TERM": "dumb"}
        proc = subprocess.run(["nsenter", "-t", str(self.init_pid), "-a", "-r", "-w", "--", *argv],
                              env={**base_env, **(env or {})}, capture_output=True, text=True, timeout=timeout,
                              **({"input": input} if input is not None else {"stdin": subprocess.DEVNULL}))
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited with {proc.returncode}\n"
                                 f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def link(self, peer: NetNS, inside_addrs: Sequence[str], peer_addrs: Sequence[str]) -> tuple[str, str]:
        """Link the container to `peer` (a tests/netns.py namespace) with a veth pair, address and raise
        both ends; return (inside ifname, peer ifname).

        The pair is made in `peer` with its other end sent straight into the container's namespace, as
        netns.veth_pair() does: it never exists in the machine's own, and deleting `peer` removes it.
        """
        _check_no_host_overlap([*inside_addrs, *peer_addrs])
        # The PID names the namespace: make sure it is still this container's (not a reused PID).
        if _ns_inode(self.init_pid, "net") != self.netns_inode:
            raise RuntimeError(f"the container's init {self.init_pid} is gone; not linking")
        n = next(_links)
        inside, outside = f"wiptc{n}", f"wiptc{n}p"
        peer.run(["ip", "link", "add", outside, "type", "veth", "peer", "name", inside, "netns", str(self.init_pid)])
        for addr in inside_addrs:
            self.run(_addr_cmd(inside, addr))
        for addr in peer_addrs:
            peer.run(_addr_cmd(outside, addr))
        self.run(["ip", "link", "set", inside, "up"])
        peer.run(["ip", "link", "set", outside, "up"])
        return inside, outside

    def path(self, inside: str) -> Path:
        """A path inside the container, as seen from the host (through its init's root)."""
        return Path(f"/proc/{self.init_pid}/root") / inside.lstrip("/")

    def stop(self, timeout: float = 60) -> None:
        """Halt the container (SIGTERM to nspawn), remove its cgroups and unmount the overlay."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"nspawn {self.nspawn.pid} did not halt in {timeout} s; killing it", file=sys.stderr)
                self.nspawn.kill()
                self.nspawn.wait()
        for cgroup in self.cgroups:
            _remove_cgroup(cgroup)
        self.disk.mount_ns(f"umount {self.disk.merged}")


def _remove_stale_cgroups() -> None:
    """Cgroups left by an earlier run that was killed (its containers died with it, see _dies_with_us)."""
    for root in CGROUP_ROOTS:
        for path in root.glob("webiptd-e2e-*-*") if root.is_dir() else ():
            owner = path.name.split("-")[2]
            if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                _remove_cgroup(path)


def _remove_cgroup(path: Path) -> None:
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir():
            _remove_cgroup(child)
    for _ in range(100):  # the last processes may take a moment to leave
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.05)
    print(f"could not remove cgroup {path}", file=sys.stderr)
