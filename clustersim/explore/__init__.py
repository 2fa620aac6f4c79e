"""Exploring plans: compare side by side, search the parallel layouts (local or Ray backends)."""
