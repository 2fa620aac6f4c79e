"""Errors of the engines (training and serving)."""

from __future__ import annotations


class EngineError(ValueError):
    """A plan the engine cannot simulate (the message says why)."""
