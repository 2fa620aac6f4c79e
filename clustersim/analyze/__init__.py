"""Analysing traces written by ``run --trace``: :func:`analyze` reads the trace's mode and
hands it to the training (:mod:`.training`) or serving (:mod:`.serving`) analysis; ``kernels``
and ``stream`` are the streaming machinery, ``perfetto`` and ``plots`` the exports."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from clustersim.analyze.serving import ServingTraceAnalysis, analyze_serving
from clustersim.analyze.training import TraceAnalysis, analyze_training
from clustersim.trace.reader import TraceReader


def analyze(
    path: str | Path,
    window_ms: tuple[float, float] | None = None,
    progress: Callable[[float], None] | None = None,
) -> TraceAnalysis | ServingTraceAnalysis:
    """Analyse a trace in one streaming pass: a training trace gives a
    :class:`~clustersim.analyze.training.TraceAnalysis` (``window_ms`` keeps the event rows of
    that interval for a timeline plot), a serving trace a
    :class:`~clustersim.analyze.serving.ServingTraceAnalysis` (no window)."""
    with TraceReader(path) as reader:
        serving = reader.metadata["run"].get("mode") == "inference"
    if serving:
        return analyze_serving(path, progress)
    return analyze_training(path, window_ms, progress)


__all__ = ["analyze"]
