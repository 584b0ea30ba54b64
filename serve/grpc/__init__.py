"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``).

The service is Triton's, from its own ``grpc_service.proto`` and ``model_config.proto``
(github.com/triton-inference-server/common r26.07, kept verbatim): a superset of KServe's,
so Triton's tools find every method they call; what nodecache does not serve answers
UNIMPLEMENTED.
"""
