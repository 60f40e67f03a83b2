"""tfsearch: per-class hyperparameter search for TransFusion surface anomaly detection."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`tfsearch.Detector`, imported on first use: `import tfsearch` (and the report) must not load torch."""
    if name == "Detector":
        from tfsearch.detector import Detector

        return Detector
    raise AttributeError(f"module 'tfsearch' has no attribute {name!r}")
