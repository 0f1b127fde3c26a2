"""One engine per tracking URI in this process; exit and fork handling.

At exit every engine sends what it holds until ``exit_timeout`` seconds pass with nothing
stored (a fleet draining slowly is not cut off); what is left is counted on stderr. After
``os.fork`` the child resets every engine in place: the parent's queued events stay the
parent's (never sent twice), and the child's worker starts on its first event.
``multiprocessing`` children leave through ``os._exit`` without running ``atexit``, so
their engines also register a multiprocessing finalizer.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util
import os
import shlex
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from asynctrack._engine import limiter
from asynctrack._engine.engine import Engine, State
from asynctrack._engine.stats import Stats
from asynctrack._engine.transport import redact
from asynctrack.config import EngineConfig

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_settings: dict[str, Any] = {}  # configure()'s keywords, for every URI
_uri_settings: dict[str, dict[str, Any]] = {}  # configure_engine()'s, on top, for one URI
_config: EngineConfig | None = None


def configure(**settings: Any) -> EngineConfig:
    """Set the engine's knobs (see :class:`asynctrack.config.EngineConfig`) for this process.

    Call it before logging: engines already running keep their settings, so doing otherwise
    raises ``RuntimeError``. Settings given to :func:`configure_engine` for one URI stay,
    on top of these.
    """
    global _config
    config = EngineConfig.resolve(**settings)
    with _lock:
        if any(e.state is State.OPEN for e in _engines.values()):
            raise RuntimeError("asynctrack.configure() must be called before anything is logged")
        _settings.clear()
        _settings.update(settings)
        _config = config
        for uri in list(_engines):
            _engines[uri] = _new_engine(uri)
    return config


def configure_engine(tracking_uri: str, **settings: Any) -> EngineConfig:
    """Settings for the engine of one tracking URI (say, its ``artifacts_destination``),
    before anything is logged to it, on top of :func:`configure`'s; other URIs keep the
    process-wide settings."""
    EngineConfig.resolve(**{**_settings, **settings})  # a bad value fails here, not later
    with _lock:
        engine = _engines.get(tracking_uri)
        if engine is not None and engine.state is State.OPEN:
            raise RuntimeError(f"the engine for {redact(tracking_uri)} is already running")
        _uri_settings[tracking_uri] = {**_uri_settings.get(tracking_uri, {}), **settings}
        engine = _engines[tracking_uri] = _new_engine(tracking_uri)
    return engine.config


def _new_engine(tracking_uri: str) -> Engine:
    """An engine with the process's settings and the URI's own (under ``_lock``)."""
    own = _uri_settings.get(tracking_uri)
    if own:
        config = EngineConfig.resolve(**{**_settings, **own})
    else:
        global _config
        if _config is None:
            _config = EngineConfig.resolve()
        config = _config
    engine = Engine(tracking_uri, config)
    _register_mp_finalizer(engine)
    return engine


def get_engine(tracking_uri: str) -> Engine:
    engine = _engines.get(tracking_uri)
    if engine is not None:
        return engine
    with _lock:
        engine = _engines.get(tracking_uri)
        if engine is None:
            engine = _engines[tracking_uri] = _new_engine(tracking_uri)
        return engine


def all_engines() -> list[Engine]:
    with _lock:
        return list(_engines.values())


def flush_all(timeout: float | None = None) -> None:
    """Flush every engine; the deadline is shared, and the first error is raised."""
    deadline = None if timeout is None else time.monotonic() + timeout
    errors: list[BaseException] = []
    for engine in all_engines():
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            engine.flush(remaining)
        except Exception as exc:  # flush the other engines before raising
            errors.append(exc)
    if errors:
        raise errors[0]


def stats() -> Stats:
    total = Stats()
    for engine in all_engines():
        total = total + engine.stats()
    return total


#: Called at exit before the engines close (the run layer ends the runs still open).
before_exit: list[Callable[[], None]] = []


def shutdown() -> None:
    """Interpreter exit: send within the deadline, then say on stderr what is left."""
    for hook in before_exit:
        hook()
    engines = all_engines()
    if not engines:
        return
    for engine in engines:
        _close(engine, engine.config.exit_timeout)


def _close(engine: Engine, timeout: float) -> None:
    """Close ``engine``; then, if anything was not stored, one summary on stderr: what is
    left and where it is kept, and what the server refused, a line a reason."""
    left = engine.close(timeout)
    refusals = engine.ledger.refusal_lines()
    drops = engine.stats().dropped_reasons
    if not (left or refusals or drops):
        return
    server = redact(engine.tracking_uri)
    lines = []
    if left:
        held = engine.kept_events()
        if held and held[0].count >= left:  # the server answered: nothing was waited out
            why = f"the server refused the credentials or a permission ({held[0].reason})"
        else:
            cause = engine.last_error()
            why = f"{engine.config.exit_timeout:g} s passed without progress" + (
                f"; last error: {cause}" if cause else ""
            )
        spooled, where = engine.spooled(), engine.spool_dir()
        fixed = " once the credentials or permissions are fixed" if held else ""
        kept = (
            f"; {spooled} of them are kept in the spool {where}: run "
            f"`asynctrack sync {shlex.quote(where)}`{fixed} to send them"
            if spooled
            else ""
        )
        lines.append(
            f"asynctrack: {left} event(s) could not be stored at {server} at exit: {why}{kept}"
        )
    if refusals:
        lines.append(
            f"asynctrack: {server}: {engine.ledger.sent} event(s) stored, "
            f"{engine.ledger.rejected} refused:"
        )
        lines += [f"  {line}" for line in refusals]
    for reason, count in drops.items():
        lines.append(f"asynctrack: {server}: {count} event(s) dropped: {reason}")
    sys.stderr.write("\n".join(lines) + "\n")


def _register_mp_finalizer(engine: Engine) -> None:
    if multiprocessing.parent_process() is None:
        return  # the main process exits through atexit
    # A weak reference: the finalizer must not keep a discarded engine alive.
    ref = weakref.ref(engine)

    def close() -> None:
        alive = ref()
        if alive is not None:
            _close(alive, alive.config.exit_timeout)

    multiprocessing.util.Finalize(engine, close, exitpriority=100)


def _register_all_mp_finalizers(_: object) -> None:
    # multiprocessing calls this in a new Process after clearing the finalizers it inherited
    # (and after our at-fork hook, too early to know it is a multiprocessing child).
    for engine in all_engines():
        _register_mp_finalizer(engine)


class _Token:
    """multiprocessing keeps after-fork callbacks in a weak mapping: this keeps ours alive."""


_after_fork_token = _Token()


def _after_fork_in_child() -> None:
    """The one fork hook: every engine starts afresh, with nothing of its parent's."""
    global _lock
    _lock = threading.Lock()  # the parent may have held it while forking
    limiter.after_fork_in_child()
    for engine in _engines.values():
        engine.after_fork()
        _register_mp_finalizer(engine)


# After MLflow's own exit hook is registered, so ours runs first (atexit is last-in,
# first-out): MLflow's ends open runs with blocking calls retried for minutes.
import mlflow.tracking.fluent  # noqa: E402, F401

atexit.register(shutdown)
os.register_at_fork(after_in_child=_after_fork_in_child)
multiprocessing.util.register_after_fork(_after_fork_token, _register_all_mp_finalizers)
