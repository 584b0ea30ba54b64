"""Memory tier: runtimes, the model repository, and the Open Inference Protocol server."""
