"""Control tier: declaration sources, the node reconcile loop, status, and the CLI."""
