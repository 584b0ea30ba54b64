"""Which process is calling (its peer): the kernel's word for it, never the caller's (for shared
memory here, and for the namespace of a pod on the node socket in agent/kube/callers.py).

Over a Unix socket the kernel says who is at the other end (SO_PEERCRED). Over TCP on
loopback the caller is on this machine: its socket is found in ``/proc/net/tcp[6]`` and
its process by the socket's inode under ``/proc/*/fd`` (what ``ss -p`` does). Anything
else (a remote peer, gRPC over the Unix socket, whose library hides the connection) is
unknown. A caller's *scope* is its pod (the pod UID in its cgroup path) or, outside any
pod, its user: what it may share with no one else.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

__all__ = ["Peer", "peer_at", "peer_of_grpc", "peer_pid", "pod_uid_of"]

_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)
_PROC = Path("/proc")


@dataclass(frozen=True)
class Peer:
    """A calling process, as the kernel named it."""

    pid: int
    uid: int
    started: int  # the process's start time (clock ticks after boot): a reused PID differs
    scope: str  # "pod:<uid>" or "uid:<n>"
    socket: tuple[int, int] | None = None  # over TCP: the caller's (fd, inode) of it

    def alive(self) -> bool:
        """Whether this very process still runs (not another one with its PID)."""
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


def peer_pid(transport: Any) -> int | None:
    """The PID of the process at the other end of a Unix socket; None over TCP."""
    creds = _peer_credentials(transport)
    return creds[0] if creds else None


def pod_uid_of(pid: int, proc_root: Path = _PROC) -> str | None:
    """The pod UID in ``pid``'s cgroup path, or None for a process outside any pod."""
    try:
        text = (proc_root / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    match = _POD_UID.search(text)
    return match.group(1).replace("_", "-") if match else None


def peer_at(transport: Any) -> Peer | None:
    """The process behind an aiohttp/asyncio transport, or None if the kernel cannot
    tell. Blocking (it may walk /proc): call it from a thread."""
    creds = _peer_credentials(transport)
    if creds is not None:
        return _peer(*creds)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    peer, local = sock.getpeername(), sock.getsockname()
    return _tcp_peer(peer[0], peer[1], local[1])


def peer_of_grpc(peer: str, ports: set[int]) -> Peer | None:
    """The process behind a gRPC ``context.peer()`` (``ipv4:127.0.0.1:40000``,
    ``ipv6:[::1]:40000``) connected to one of our ``ports``. Blocking: from a thread."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host, _, port = rest.rpartition(":")
    try:
        return _tcp_peer(host.strip("[]"), int(port), None, ports)
    except ValueError:
        return None


def _peer_credentials(transport: Any) -> tuple[int, int] | None:
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return (pid, uid) if pid else None


def _peer(pid: int, uid: int) -> Peer | None:
    started = _start_time(pid)
    if started is None:
        return None
    pod = pod_uid_of(pid)
    return Peer(pid, uid, started, f"pod:{pod}" if pod else f"uid:{uid}")


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
    host: str, port: int, server_port: int | None, ports: set[int] | None = None
) -> Peer | None:
    """The process owning the loopback TCP socket ``host:port`` (the caller's end)."""
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
            caller = None if uid is None else _peer(pid, uid)
            return None if caller is None else replace(caller, socket=(fd, inode))
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
