"""The published volumes, kept in a small JSON file so a restarted agent finds them again.

Written before a mount is made and after it is removed: a crash in between leaves a record
without a mount (dropped on the next start) rather than a mount without a record.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["STATE_FILE", "Volume", "VolumeState"]

log = logging.getLogger(__name__)

STATE_FILE = "csi-volumes.json"


@dataclass(frozen=True)
class Volume:
    """One published volume: what is mounted at ``target``, for which pod."""

    volume_id: str
    target: str
    model: str | None  # None: the socket folder
    pod: str  # "namespace/name", for logs

    def same_publish(self, other: Volume) -> bool:
        """Whether ``other`` asks for exactly this mount (the pod label aside)."""
        return (self.volume_id, self.target, self.model) == (
            other.volume_id,
            other.target,
            other.model,
        )


class VolumeState:
    """The records, by target path, mirrored to ``<state_dir>/csi-volumes.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATE_FILE
        self.volumes: dict[str, Volume] = {}

    def load(self) -> None:
        """Read the file; a missing file is an empty state, an unreadable one is logged and
        treated as empty (mounts it named are still unmounted by kubelet's unpublish)."""
        try:
            data = json.loads(self.path.read_text())
            self.volumes = {v["target"]: Volume(**v) for v in data["volumes"]}
        except FileNotFoundError:
            self.volumes = {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("csi: ignoring unreadable state file %s: %s", self.path, exc)
            self.volumes = {}

    def put(self, volume: Volume) -> None:
        self.volumes[volume.target] = volume
        self._save()

    def remove(self, target: str) -> Volume | None:
        volume = self.volumes.pop(target, None)
        if volume is not None:
            self._save()
        return volume

    def _save(self) -> None:
        """Replace the file atomically (write, fsync, rename), so a crash leaves the old or
        the new state, never half of one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        body = {"volumes": [asdict(v) for v in self.volumes.values()]}
        with open(tmp, "w") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
