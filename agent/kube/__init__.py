"""Kubernetes side of the agent: API access, watches, status reports, the reconciler.

The official ``kubernetes`` client is blocking; everything here runs it in threads and
turns its exceptions into ``nodecache.agent.kube.errors`` at the boundary.
"""
