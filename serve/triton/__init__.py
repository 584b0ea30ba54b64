"""Triton's own extensions of the Open Inference Protocol, so Triton's tools (tritonclient,
perf_analyzer) work against the node: model configuration (``config``), statistics
(``statistics``) and system shared memory (``shm``)."""
