"""Around the registry: promotion and rollback, pulling a version, merging an adapter."""
