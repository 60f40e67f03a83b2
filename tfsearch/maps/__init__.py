"""Anomaly maps after inference: the map cache, fusion of λ and n, metrics, the standalone scorer (no torch)."""
