"""Metric definitions: training (from the recorder) and serving (from the request book)."""
