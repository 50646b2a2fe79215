"""Active-active cluster: N gateways share one address (docs/cluster.md)."""
