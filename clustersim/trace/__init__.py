"""Arrow event traces: the file format (schema), a streaming atomic writer, a checking reader.

Depends on ``clustersim.spec`` only, never on the engine.
"""

from clustersim.trace.reader import TraceError, TraceReader
from clustersim.trace.schema import VERSION
from clustersim.trace.writer import TraceWriter

__all__ = ["VERSION", "TraceError", "TraceReader", "TraceWriter"]
