"""Packing params and tags into ``log_batch`` calls the server accepts.

MLflow's limits (``mlflow/utils/validation.py`` and the REST handler): at most 100 params
and 100 tags a call, a JSON body under 1 MB, and never the same param key twice in one
call, even with an equal value. Metrics are cut at 1000 a call by the worker; their bodies
stay far below 1 MB (a key is at most 250 characters).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from asynctrack._engine.events import MetaEvent

MAX_METRICS = 1000
MAX_PARAMS = 100
MAX_TAGS = 100
# Leave room under the server's 1 MB for the envelope and JSON escaping.
MAX_BODY_BYTES = 900_000


@dataclass
class MetaBatch:
    """Params and tags of one run, in the order they were logged."""

    run_id: str
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    size: int = 0

    def __len__(self) -> int:
        return len(self.params) + len(self.tags)

    def events(self) -> list[MetaEvent]:
        return [MetaEvent("param", self.run_id, k, v) for k, v in self.params.items()] + [
            MetaEvent("tag", self.run_id, k, v) for k, v in self.tags.items()
        ]


def _encoded_size(key: str, value: str) -> int:
    return len(json.dumps(key)) + len(json.dumps(value)) + 20


def pack_meta(run_id: str, events: Iterable[MetaEvent]) -> list[MetaBatch]:
    """Split one run's params and tags, in logging order, into acceptable batches.

    A tag set twice keeps its last value (tags overwrite, and the last ``set_tag`` must win);
    a param key seen again starts a new batch, so the server judges the second value alone.
    """
    batches: list[MetaBatch] = []
    current = MetaBatch(run_id)
    for event in events:
        size = _encoded_size(event.key, event.value)
        if event.kind == "param":
            if current.params.get(event.key) == event.value:
                continue
            full = len(current.params) >= MAX_PARAMS or event.key in current.params
        else:
            full = len(current.tags) >= MAX_TAGS and event.key not in current.tags
        if full or current.size + size > MAX_BODY_BYTES:
            batches.append(current)
            current = MetaBatch(run_id)
        target = current.params if event.kind == "param" else current.tags
        target.pop(event.key, None)  # re-insert so dict order stays the logging order
        target[event.key] = event.value
        current.size += size
    if len(current):
        batches.append(current)
    return batches
