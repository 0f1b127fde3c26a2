"""asynctrack's engine: the queue, the batcher, the worker and their lifecycle.

Private: trackers and decorators hand events to it through :func:`get_engine`.
"""

from asynctrack._engine.engine import Engine
from asynctrack._engine.runtime import all_engines, configure, flush_all, get_engine, stats

__all__ = ["Engine", "all_engines", "configure", "flush_all", "get_engine", "stats"]
