"""tfsearch: per-class hyperparameter search for TransFusion surface anomaly detection."""

__version__ = "0.1.0"
