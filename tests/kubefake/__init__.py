"""A small, faithful fake of the Kubernetes API server for nodecache's tests."""
