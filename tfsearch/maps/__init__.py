"""Anomaly maps after inference, numpy only: the map cache, the fusion of λ and n, the metrics, and the
standalone scorer."""
