"""Which process is calling (its peer): the kernel's word for it, never the caller's (for shared
memory here, and for the namespace of a pod on the node socket in agent/kube/callers.py).

Over a Unix socket the kernel says who is at the other end (SO_PEERCRED). Over TCP on
loopback the caller is on this machine: its socket is found in ``/proc/net/tcp[6]`` and
its process by the socket's inode under ``/proc/*/fd`` (what ``ss -p`` does). Anything
else (a remote peer, gRPC over the Unix socket, whose library hides the connection) is
unknown. A caller's *scope* is its pod (the pod UID in its cgroup path) or, outside any
pod, its user: what it may share with no one else.

A PID is only a number: once its process exits, another may get it. So a connection's peer
is held by a pidfd where the kernel gives one (SO_PEERPIDFD: the very process that
connected), else by its start time, which must not be later than the connection's accept;
and it is checked again on every request that uses it (``connection_peer``), which is
refused ("reconnect") once that process is gone.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import signal
import socket
import struct
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nodecache.serve.errors import Forbidden

__all__ = [
    "CallerGone",
    "Peer",
    "boot_seconds",
    "connection_peer",
    "peer_at",
    "peer_of_grpc",
    "pod_uid_of",
]

# Only the kubelet's own cgroup layouts name a pod, anchored at the root: cgroupfs
# (/kubepods[/burstable|/besteffort]/pod<uid>/...) and systemd
# (/kubepods.slice/[kubepods-<qos>.slice/]kubepods-[<qos>-]pod<uid_with_underscores>.slice/...).
# A "pod<uid>" elsewhere (a user's own systemd scope, say) is anyone's to choose. An agent
# in a cgroup namespace of its own sees other pods' paths from an ancestor of its own
# cgroup (/../../kubepods-besteffort.slice/...): the kubelet's, where no one else creates
# cgroups, so there the path may start at any of the layout's levels.
_HEX_UID = r"[0-9a-f]{8}{sep}[0-9a-f]{4}{sep}[0-9a-f]{4}{sep}[0-9a-f]{4}{sep}[0-9a-f]{12}"
_UP = r"(?:/\.\.)+"
_POD_CGROUP = re.compile(
    r"^[0-9]+:[^:\n]*:(?:"
    rf"(?:{_UP}(?:/kubepods)?|/kubepods)(?:/burstable|/besteffort)?"
    r"/pod(?P<fs>" + _HEX_UID.replace("{sep}", "-") + ")"
    rf"|(?:{_UP}(?:/kubepods\.slice)?|/kubepods\.slice)(?:/kubepods-pod"
    r"|(?:/kubepods-burstable\.slice)?/kubepods-burstable-pod"
    r"|(?:/kubepods-besteffort\.slice)?/kubepods-besteffort-pod)"
    r"(?P<sd>" + _HEX_UID.replace("{sep}", "_") + r")\.slice"
    r")(?:/[^\n]*)?$",
    re.MULTILINE,
)
_PROC = Path("/proc")
# The kernel hands out a pidfd of a Unix socket's peer from Linux 6.5; Python 3.11 has no
# name for the option.
SO_PEERPIDFD = 77
_TICKS = os.sysconf("SC_CLK_TCK")


class CallerGone(Forbidden):
    """The process that opened the connection has exited: its PID may be another's now (403)."""

    def __init__(self) -> None:
        super().__init__("the process that opened this connection is gone: reconnect")


class _PidFd:
    """A pidfd: it names one process for as long as it is open, whatever its PID becomes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        weakref.finalize(self, os.close, fd)

    def running(self) -> bool:
        """Whether the process has not been reaped (its PID then still names it)."""
        try:
            signal.pidfd_send_signal(self.fd, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # the kernel looks for the process before it checks permission
        return True


@dataclass(frozen=True)
class Peer:
    """A calling process, as the kernel named it."""

    pid: int
    uid: int
    started: int  # the process's start time (clock ticks after boot): a reused PID differs
    scope: str  # "pod:<uid>" or "uid:<n>"
    socket: tuple[int, int] | None = None  # over TCP: the caller's (fd, inode) of it
    pidfd: _PidFd | None = field(default=None, compare=False, repr=False)

    def alive(self) -> bool:
        """Whether this very process still runs (not another one with its PID): one
        syscall with a pidfd, else one small /proc read."""
        if self.pidfd is not None:
            return self.pidfd.running()
        return _start_time(self.pid) == self.started

    def holds_socket(self) -> bool:
        """Whether the process still holds the TCP socket it was found by: then a
        connection from that socket's address is still its own (one readlink)."""
        if self.socket is None:
            return False
        fd, inode = self.socket
        try:
            return os.readlink(_PROC / str(self.pid) / "fd" / str(fd)) == f"socket:[{inode}]"
        except OSError:
            return False

    def root(self) -> Path:
        """The caller's own view of the filesystem: its mount namespace, its /dev/shm."""
        return _PROC / str(self.pid) / "root"


def boot_seconds() -> float:
    """Now, on the clock of /proc's start times (for a connection's accept time)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def pod_uid_of(pid: int, proc_root: Path = _PROC) -> str | None:
    """The pod UID of ``pid``'s cgroup (in a kubelet layout), or None for a process outside
    any pod (or in cgroups that name different pods)."""
    try:
        text = (proc_root / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    uids = {(m["fs"] or m["sd"].replace("_", "-")) for m in _POD_CGROUP.finditer(text)}
    return uids.pop() if len(uids) == 1 else None


# Per connection (its aiohttp protocol): a TCP caller is found by walking /proc, once.
_CONNECTIONS: weakref.WeakKeyDictionary[Any, Peer] = weakref.WeakKeyDictionary()


def connection_peer(
    connection: Any, transport: Any, *, tcp: bool = True, find: bool = True
) -> Peer | None:
    """The process behind ``connection`` (an aiohttp protocol, which may note its accept
    time as ``accepted``, in ``boot_seconds``), found once and checked again on each call
    (one syscall, or one small /proc read): CallerGone once it has exited; None if the
    kernel cannot tell, or (unless ``tcp``) the connection is not a Unix socket's, or
    (unless ``find``) it was not found before. Finding a TCP caller walks /proc: call it
    from a thread then."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if not tcp and (sock is None or sock.family != socket.AF_UNIX):
        return None
    known = _CONNECTIONS.get(connection)
    if known is not None:
        if not known.alive():
            raise CallerGone()
        return known
    if not find:
        return None
    found = peer_at(transport, getattr(connection, "accepted", None))
    if found is not None:
        _CONNECTIONS[connection] = found
    return found


def peer_at(transport: Any, accepted: float | None = None) -> Peer | None:
    """The process behind an aiohttp/asyncio transport accepted at ``accepted`` (in
    ``boot_seconds``, if known), or None if the kernel cannot tell; CallerGone if the
    process that connected has exited. Blocking (it may walk /proc): from a thread."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and sock.family == socket.AF_UNIX:
        return _unix_peer(sock, accepted)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    peer, local = sock.getpeername(), sock.getsockname()
    return _tcp_peer(peer[0], peer[1], local[1], accepted=accepted)


def peer_of_grpc(peer: str, ports: set[int]) -> Peer | None:
    """The process behind a gRPC ``context.peer()`` (``ipv4:127.0.0.1:40000``,
    ``ipv6:[::1]:40000``) connected to one of our ``ports``. Blocking: from a thread."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host, _, port = rest.rpartition(":")
    try:
        return _tcp_peer(host.strip("[]"), int(port), None, ports)
    except (ValueError, CallerGone):
        return None


def _unix_peer(sock: socket.socket, accepted: float | None) -> Peer | None:
    """The process that connected: SO_PEERCRED's PID, held by SO_PEERPIDFD's pidfd where
    the kernel has it, else by a start time no later than the accept."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    if not pid:
        return None
    try:
        pidfd = _PidFd(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:  # ESRCH: the connector has exited
            raise CallerGone() from None
        return _peer(pid, uid, None, accepted)  # before Linux 6.5
    return _peer(pid, uid, pidfd, None)


def _peer(pid: int, uid: int, pidfd: _PidFd | None = None, accepted: float | None = None) -> Peer:
    """The Peer of ``pid``, read from /proc. With a pidfd, the reads count only if the
    process still runs after them; without, a process started after the connection's
    accept cannot be the one that connected (its PID was reused)."""
    started = _start_time(pid)
    pod = pod_uid_of(pid)
    if started is None or (pidfd is not None and not pidfd.running()):
        raise CallerGone()
    if pidfd is None and accepted is not None and started > int(accepted * _TICKS):
        raise CallerGone()
    return Peer(pid, uid, started, f"pod:{pod}" if pod else f"uid:{uid}", pidfd=pidfd)


def _start_time(pid: int) -> int | None:
    try:  # os.open and bytes: a quarter of what a pathlib read_text costs
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # Field 22, counted after the command name, which may hold spaces and parentheses.
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def _tcp_peer(
    host: str,
    port: int,
    server_port: int | None,
    ports: set[int] | None = None,
    accepted: float | None = None,
) -> Peer | None:
    """The process owning the loopback TCP socket ``host:port`` (the caller's end); one
    started after the connection's accept is refused (CallerGone)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if not address.is_loopback:
        return None  # another machine: no process of ours to name
    wanted = {server_port} if server_port is not None else (ports or set())
    for table in ("tcp", "tcp6"):
        inode = _socket_of(_PROC / "net" / table, address, port, wanted)
        if inode is not None:
            owner = _owner_of(inode)
            if owner is None:
                return None
            pid, fd = owner
            uid = _effective_uid(pid)
            if uid is None:
                return None
            return replace(_peer(pid, uid, None, accepted), socket=(fd, inode))
    return None


def _socket_of(
    table: Path, address: ipaddress._BaseAddress, port: int, server_ports: set[int]
) -> int | None:
    """The inode of the established socket whose local end is ``address:port``."""
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if state != "01":  # ESTABLISHED
            continue
        local_ip, local_port = _endpoint(local)
        if local_port != port or local_ip != address:
            continue
        if server_ports and _endpoint(remote)[1] not in server_ports:
            continue
        return int(fields[9])
    return None


def _effective_uid(pid: int) -> int | None:
    """The process's user now (a socket's owner is whoever created it)."""
    try:
        status = (_PROC / str(pid) / "status").read_text()
    except OSError:
        return None
    line = next((line for line in status.splitlines() if line.startswith("Uid:")), None)
    return int(line.split()[2]) if line else None


def _endpoint(text: str) -> tuple[ipaddress._BaseAddress, int]:
    """``/proc/net/tcp``'s ``0100007F:1F90``: the address as 32-bit words in host order."""
    ip_hex, port_hex = text.split(":")
    raw = bytes.fromhex(ip_hex)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address, int(port_hex, 16)


def _owner_of(inode: int) -> tuple[int, int] | None:
    """(pid, fd) of the process holding socket ``inode`` open (the lowest PID, if several
    share it)."""
    target = f"socket:[{inode}]"
    for entry in sorted(_PROC.iterdir(), key=lambda p: (len(p.name), p.name)):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(entry / "fd"):
                if os.readlink(fd.path) == target:
                    return int(entry.name), int(fd.name)
        except OSError:
            continue
    return None
