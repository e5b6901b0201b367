"""Temper: from a frontier-API prototype to a tuned, gated, registered self-hosted model."""
