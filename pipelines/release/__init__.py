"""Around the registry: promotion and rollback, re-scoring, merging an adapter (pulling a
version is `temper.tracking.pull`, shared with the online server)."""
