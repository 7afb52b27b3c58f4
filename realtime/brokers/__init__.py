"""Broker implementations: memory (embedded default); Redis joins nodes into a cluster."""
