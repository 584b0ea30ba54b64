"""CSI node service (driver ``csi.nodecache.io``): ephemeral inline volumes for pods.

``csi.proto`` is the official one of the container-storage-interface spec, CSI spec v1.12.0,
copied verbatim; ``csi_pb2*.py`` are generated from it by ``scripts/gen-csi``.
"""
