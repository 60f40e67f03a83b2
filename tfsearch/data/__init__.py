"""Datasets on disk (MVTec AD, VisA, folders) and the generated demos."""
