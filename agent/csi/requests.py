"""Checking kubelet's requests before anything touches the filesystem (pure, no I/O).

Every field is checked and every refusal names the field, with the status code the CSI
spec gives: INVALID_ARGUMENT for a missing or malformed field or attribute,
FAILED_PRECONDITION for a capability this driver cannot give (block volumes).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

__all__ = [
    "EPHEMERAL",
    "POD_NAME",
    "POD_NAMESPACE",
    "Publish",
    "RequestError",
    "parse_publish",
    "parse_unpublish",
    "pod_label",
]

# Added by kubelet to volume_context (CSIDriver podInfoOnMount: true). kubelet overwrites
# whatever a pod's volumeAttributes put under these keys, so the namespace can be trusted.
KUBELET_PREFIX = "csi.storage.k8s.io/"
POD_NAMESPACE = KUBELET_PREFIX + "pod.namespace"
POD_NAME = KUBELET_PREFIX + "pod.name"
EPHEMERAL = KUBELET_PREFIX + "ephemeral"
MODEL = "model"
SOCKET = "socket"
_MAX_PATH = 4096
_MAX_NAME = 253  # a Kubernetes object name


class RequestError(Exception):
    """A request refused with a gRPC status code and a message for the pod's events."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Publish:
    """A checked NodePublishVolume: mount ``model`` (or, when None, the socket folder)."""

    volume_id: str
    target: str
    model: str | None
    namespace: str
    pod: str  # "namespace/name", for logs


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _volume_id(value: str) -> str:
    if not value:
        raise _invalid("volume_id is required")
    if len(value) > _MAX_PATH or "\0" in value:
        raise _invalid("volume_id is malformed")
    return value


def _target_path(value: str) -> str:
    """An absolute, normal path: no relative part, no ``.`` or ``..``, no doubled or trailing
    slash, so the path checked is the path mounted."""
    if not value:
        raise _invalid("target_path is required")
    if "\0" in value or len(value) > _MAX_PATH:
        raise _invalid("target_path is malformed")
    if not value.startswith("/"):
        raise _invalid(f"target_path must be absolute: {value!r}")
    if os.path.normpath(value) != value or value.startswith("//"):
        raise _invalid(f"target_path must be a normal path (no '.', '..' or '//'): {value!r}")
    return value


def _capability(request: Any) -> None:
    if not request.HasField("volume_capability"):
        raise _invalid("volume_capability is required")
    kind = request.volume_capability.WhichOneof("access_type")
    if kind == "block":
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "volume_capability.block: this driver publishes folders only (access type mount)",
        )
    if kind != "mount":
        raise _invalid("volume_capability.access_type is required (mount)")


def pod_label(context: Mapping[str, str]) -> str:
    """``namespace/name`` of the pod a request is for, as far as kubelet said."""
    return f"{context.get(POD_NAMESPACE, '?')}/{context.get(POD_NAME, '?')}"


def _source(context: Mapping[str, str]) -> str | None:
    """The model named by the volume attributes, or None for the socket folder."""
    for key in sorted(context):
        if key not in (MODEL, SOCKET) and not key.startswith(KUBELET_PREFIX):
            raise _invalid(f"unknown volume attribute {key!r} (use 'model' or 'socket')")
    if MODEL in context and SOCKET in context:
        raise _invalid("volume attributes 'model' and 'socket' exclude each other")
    if SOCKET in context:
        if context[SOCKET] != "true":
            raise _invalid(f"volume attribute 'socket' must be \"true\", not {context[SOCKET]!r}")
        return None
    if MODEL not in context:
        raise _invalid("volume attribute 'model' (a model name) or 'socket' is required")
    name = context[MODEL]
    if not name or len(name) > _MAX_NAME or not name.isprintable():
        raise _invalid(f"volume attribute 'model' is not a model name: {name!r}")
    return name


def parse_publish(request: Any) -> Publish:
    """Check a NodePublishVolumeRequest. ``readonly`` is not read: the mount is read-only
    whatever the pod asked."""
    volume_id = _volume_id(request.volume_id)
    target = _target_path(request.target_path)
    _capability(request)
    context = dict(request.volume_context)
    model = _source(context)
    if context.get(EPHEMERAL) != "true":
        raise _invalid(
            f'volume attribute {EPHEMERAL!r} is not "true": only inline ephemeral volumes '
            "are supported, with podInfoOnMount in the CSIDriver"
        )
    namespace = context.get(POD_NAMESPACE, "")
    if not namespace:
        raise _invalid(f"volume attribute {POD_NAMESPACE!r} is required (podInfoOnMount)")
    return Publish(volume_id, target, model, namespace, pod_label(context))


def parse_unpublish(request: Any) -> tuple[str, str]:
    """Check a NodeUnpublishVolumeRequest: its volume id and target path."""
    return _volume_id(request.volume_id), _target_path(request.target_path)
