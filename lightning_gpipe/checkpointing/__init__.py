"""Checkpoint formats: optimizer state keyed by parameter name (any K), and sharded checkpoint folders."""
