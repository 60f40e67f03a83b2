"""tfsearch: per-class hyperparameter search for TransFusion surface anomaly detection."""

__version__ = "0.2.0"


def __getattr__(name: str):
    """`tfsearch.Detector`, imported on first use: `import tfsearch` (and the report) must not load torch."""
    if name == "Detector":
        from tfsearch.deploy.detector import Detector

        return Detector
    raise AttributeError(f"module 'tfsearch' has no attribute {name!r}")
