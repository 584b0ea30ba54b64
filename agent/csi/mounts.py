"""Read-only bind mounts through mount(2) and the kernel's table of them.

ctypes rather than the ``mount`` command: no util-linux needed in the image, no child
process per volume, and errno comes back as an OSError with the real code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
from pathlib import Path

__all__ = ["bind_readonly", "is_mount_point", "mount_points", "unmount"]

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MNT_DETACH = 0x2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_MOUNTINFO = Path("/proc/self/mountinfo")
_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _check(result: int, what: str, path: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}", path)


def bind_readonly(source: Path, target: Path) -> None:
    """Bind ``source`` at ``target`` read-only, nosuid, nodev.

    A bind mount takes the source's flags; read-only needs a second call (remount), as
    ``mount --bind`` + ``mount -o remount,bind,ro`` do. If the remount fails the bind is
    undone, so a writable mount is never left behind.
    """
    src, dst = os.fsencode(source), os.fsencode(target)
    _check(_libc.mount(src, dst, None, MS_BIND, None), "bind mount", str(target))
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    try:
        _check(_libc.mount(None, dst, None, flags, None), "read-only remount", str(target))
    except OSError:
        unmount(target)
        raise


def unmount(target: Path) -> None:
    """Unmount ``target``; lazily (detached) when it is busy, since kubelet unpublishes only
    after the pod's containers are gone and a straggling open file must not wedge it."""
    dst = os.fsencode(target)
    if _libc.umount2(dst, 0) == 0:
        return
    code = ctypes.get_errno()
    if code != errno.EBUSY:
        raise OSError(code, f"unmount: {os.strerror(code)}", str(target))
    _check(_libc.umount2(dst, MNT_DETACH), "lazy unmount", str(target))


def mount_points(mountinfo: bytes) -> list[str]:
    """The mount points in a ``/proc/<pid>/mountinfo`` text: field 5 of each line, where the
    kernel writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    points = []
    for line in mountinfo.splitlines():
        fields = line.split(b" ")
        if len(fields) > 4:
            raw = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4])
            points.append(os.fsdecode(raw))
    return points


def is_mount_point(target: Path) -> bool:
    """Whether something is mounted at ``target`` (symlinks in its parents resolved, as the
    kernel records the mount point)."""
    real = os.path.realpath(target)
    return real in mount_points(_MOUNTINFO.read_bytes())
