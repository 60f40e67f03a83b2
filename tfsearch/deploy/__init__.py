"""Tuned models outside tfsearch: the export format, the Detector, `tfsearch predict`."""
