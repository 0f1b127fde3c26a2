"""Fast tests of the engine's pure logic and of the worker with a fake transport.

Packing (``batching.pack_meta``), the request body (``transport.encode_log_batch``), key
checks (``events.check_key``), configuration (``config.EngineConfig``), and the worker's
queue policies, refusal splitting, retries and ordering, none of which needs a server.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from google.protobuf import json_format
from mlflow.protos.service_pb2 import LogBatch

from asynctrack import (
    AsyncTrackError,
    ConfigError,
    DeliveryError,
    EngineClosedError,
    FlushTimeoutError,
    QueueFullError,
)
from asynctrack._engine.batching import MAX_PARAMS, MAX_TAGS, pack_meta
from asynctrack._engine.engine import Engine
from asynctrack._engine.events import MetaEvent, check_key, end_event, to_json_number
from asynctrack._engine.queue import SHED
from asynctrack._engine.transport import Held, Refused, Transient, encode_log_batch
from asynctrack.config import (
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_FULL_POLICY,
    DEFAULT_QUEUE_CAPACITY,
    EngineConfig,
)
from asynctrack.errors import AccessDeniedError

# ---------------------------------------------------------------------------- pack_meta


def param(key: str, value: str, run_id: str = "r") -> MetaEvent:
    return MetaEvent("param", run_id, key, value)


def tag(key: str, value: str, run_id: str = "r") -> MetaEvent:
    return MetaEvent("tag", run_id, key, value)


def test_pack_meta_keeps_order_and_last_tag_value() -> None:
    events = [tag("t", "1"), param("a", "x"), tag("u", "u"), tag("t", "2"), param("b", "y")]
    (batch,) = pack_meta("r", events)
    assert batch.run_id == "r"
    assert list(batch.params.items()) == [("a", "x"), ("b", "y")]
    assert batch.tags == {"u": "u", "t": "2"}
    assert list(batch.tags) == ["u", "t"]  # re-set tags move to the end
    assert len(batch) == 4


def test_pack_meta_folds_repeated_equal_param() -> None:
    (batch,) = pack_meta("r", [param("a", "1"), param("a", "1"), param("b", "2")])
    assert batch.params == {"a": "1", "b": "2"}


def test_pack_meta_never_puts_one_param_key_twice_in_a_batch() -> None:
    batches = pack_meta("r", [param("a", "1"), param("b", "2"), param("a", "3")])
    assert [b.params for b in batches] == [{"a": "1", "b": "2"}, {"a": "3"}]


def test_pack_meta_splits_at_100_params_and_100_tags() -> None:
    events = [param(f"p{i}", str(i)) for i in range(250)]
    events += [tag(f"t{i}", str(i)) for i in range(250)]
    batches = pack_meta("r", events)
    assert all(len(b.params) <= MAX_PARAMS and len(b.tags) <= MAX_TAGS for b in batches)
    params = [kv for b in batches for kv in b.params.items()]
    tags = [kv for b in batches for kv in b.tags.items()]
    assert params == [(f"p{i}", str(i)) for i in range(250)]
    assert tags == [(f"t{i}", str(i)) for i in range(250)]


def test_pack_meta_same_tag_never_forces_a_split() -> None:
    events = [tag(f"t{i}", "x") for i in range(100)] + [tag("t5", f"v{i}") for i in range(300)]
    (batch,) = pack_meta("r", events)
    assert len(batch.tags) == 100
    assert batch.tags["t5"] == "v299"


def test_pack_meta_last_tag_wins_across_batches() -> None:
    events: list[MetaEvent] = []
    for i in range(350):
        events += [param(f"p{i}", "v"), tag("phase", f"v{i}")]
    batches = pack_meta("r", events)
    assert len(batches) == 4
    # Applied in order, the batches leave the last value.
    final: dict[str, str] = {}
    for b in batches:
        final.update(b.tags)
    assert final == {"phase": "v349"}


def test_pack_meta_bodies_stay_under_one_megabyte() -> None:
    # Non-ASCII text is escaped to six bytes a character in the JSON body.
    events = [param(f"p{i}", "é" * 6000) for i in range(100)]
    events += [tag(f"t{i}", "ж" * 8000) for i in range(100)]
    batches = pack_meta("r", events)
    assert len(batches) > 1
    for b in batches:
        params = list(b.params.items())
        tags = list(b.tags.items())
        assert len(encode_log_batch("r", (), params, tags)) < 1_000_000
    assert sum(len(b) for b in batches) == 200


def test_pack_meta_empty() -> None:
    assert pack_meta("r", []) == []


# ---------------------------------------------------------------------------- encoding


def _parse(body: str) -> Any:
    message = LogBatch()
    json_format.Parse(body, message)
    return message


def test_encode_log_batch_is_valid_json_mlflow_can_parse() -> None:
    # Milliseconds are truncated, as MLflow's get_current_time_millis does.
    metrics = [
        ("run-1", "loss", 0.5, 1700000000.1234, 3),
        ("run-1", "ключ/accuracy", 2, 1700000000.9996, 4),
        ("run-1", "big", 2**70, 1.0, 0),
    ]
    params = [("lr", "0.1"), ("quote", 'say "hi"\n\\')]
    tags = [("unicode", "日本語 ✓"), ("empty", "")]
    body = encode_log_batch("run-1", metrics, params, tags)
    data = json.loads(body)
    assert data["run_id"] == "run-1"
    assert data["metrics"] == [
        {"key": "loss", "value": 0.5, "timestamp": 1700000000123, "step": 3},
        {"key": "ключ/accuracy", "value": 2.0, "timestamp": 1700000000999, "step": 4},
        {"key": "big", "value": float(2**70), "timestamp": 1000, "step": 0},
    ]
    assert data["params"] == [{"key": k, "value": v} for k, v in params]
    assert data["tags"] == [{"key": k, "value": v} for k, v in tags]
    message = _parse(body)
    assert message.run_id == "run-1"
    assert [(m.key, m.value, m.timestamp, m.step) for m in message.metrics] == [
        ("loss", 0.5, 1700000000123, 3),
        ("ключ/accuracy", 2.0, 1700000000999, 4),
        ("big", float(2**70), 1000, 0),
    ]
    assert [(p.key, p.value) for p in message.params] == params
    assert [(t.key, t.value) for t in message.tags] == tags


def test_encode_log_batch_nan_and_infinity() -> None:
    metrics = [
        ("r", "nan", math.nan, 1.0, 0),
        ("r", "pos", math.inf, 1.0, 0),
        ("r", "neg", -math.inf, 1.0, 0),
        ("r", "negzero", -0.0, 1.0, 0),
    ]
    body = encode_log_batch("r", metrics, (), ())
    data = json.loads(body)
    assert [m["value"] for m in data["metrics"]] == ["NaN", "Infinity", "-Infinity", -0.0]
    values = [m.value for m in _parse(body).metrics]
    assert math.isnan(values[0])
    assert values[1:3] == [math.inf, -math.inf]
    assert math.copysign(1.0, values[3]) == -1.0


def test_encode_log_batch_without_params_or_tags() -> None:
    data = json.loads(encode_log_batch("r", [("r", "m", 1.0, 2.0, 5)], (), ()))
    assert data == {
        "run_id": "r",
        "metrics": [{"key": "m", "value": 1.0, "timestamp": 2000, "step": 5}],
    }
    assert json.loads(encode_log_batch("r", (), [("p", "v")], ())) == {
        "run_id": "r",
        "metrics": [],
        "params": [{"key": "p", "value": "v"}],
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1.5, "1.5"), (3, "3.0"), (1e308, "1e+308"), (math.nan, '"NaN"'), (-math.inf, '"-Infinity"')],
)
def test_to_json_number(value: float, expected: str) -> None:
    assert to_json_number(value) == expected


# ---------------------------------------------------------------------------- check_key


@pytest.mark.parametrize(
    "key", ["loss", "a/b", "train loss: epoch-1.mean_x", "ключ", "k" * 250, "a.b", "x_"]
)
def test_check_key_accepts_mlflow_keys(key: str) -> None:
    assert check_key(key, "metric") == key
    assert check_key(key, "metric") == key  # second time from the cache


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("k" * 251, "exceeds the maximum length of 250"),
        ("bad key!", "Names may only contain"),
        ("a;b", "Names may only contain"),
        ("../x", "would resolve"),
        ("a/../b", "would resolve"),
        ("/abs", "would resolve"),
        ("a//b", "would resolve"),
        ("a/", "would resolve"),
        (".", "would resolve"),
        ("", "would resolve"),
        (5, "must be a string.*param key of type int"),
        (None, "must be a string.*param key of type NoneType"),
        (b"bytes", "must be a string.*param key of type bytes"),
    ],
)
def test_check_key_rejects(key: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        check_key(key, "param")
    assert "(param key" in str(info.value)  # MLflow's words, then which key


# ---------------------------------------------------------------------------- EngineConfig


def test_engine_config_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("QUEUE_CAPACITY", "FLUSH_INTERVAL", "FULL_POLICY", "EXIT_TIMEOUT"):
        monkeypatch.delenv(f"ASYNCTRACK_{name}", raising=False)
    config = EngineConfig.resolve()
    assert config.queue_capacity == DEFAULT_QUEUE_CAPACITY
    assert config.flush_interval == DEFAULT_FLUSH_INTERVAL
    assert config.full_policy == DEFAULT_FULL_POLICY == "block"
    assert 5 <= config.exit_timeout <= 15  # "about 10 s"


@pytest.mark.parametrize(
    "settings",
    [
        {"queue_capacity": 0},
        {"queue_capacity": -5},
        {"queue_capacity": 1.5},
        {"queue_capacity": True},
        {"queue_capacity": "10"},
        {"max_in_flight": 0},
        {"flush_interval": 0},
        {"flush_interval": -1.0},
        {"flush_interval": math.nan},
        {"flush_interval": "1"},
        {"flush_interval": True},
        {"exit_timeout": 0},
        {"flush_timeout": -3},
        {"request_timeout": "5"},
        {"full_policy": "wait"},
        {"full_policy": "DROP"},
    ],
)
def test_engine_config_rejects_invalid_values(settings: dict[str, Any]) -> None:
    (name,) = settings
    with pytest.raises(ConfigError, match=name) as info:
        EngineConfig(**settings)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, AsyncTrackError)


def test_engine_config_accepts_valid_values() -> None:
    config = EngineConfig(
        queue_capacity=1, flush_interval=0.01, max_in_flight=1, exit_timeout=math.inf,
        flush_timeout=2, request_timeout=0.5, full_policy="drop",
    )  # fmt: skip
    assert (config.queue_capacity, config.flush_timeout, config.full_policy) == (1, 2, "drop")


def test_resolve_order_keyword_then_env_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCTRACK_QUEUE_CAPACITY", " 1234 ")
    monkeypatch.setenv("ASYNCTRACK_FLUSH_INTERVAL", "0.25")
    monkeypatch.setenv("ASYNCTRACK_FULL_POLICY", "DROP")
    monkeypatch.setenv("ASYNCTRACK_MAX_IN_FLIGHT", "")  # empty: ignored
    monkeypatch.delenv("ASYNCTRACK_EXIT_TIMEOUT", raising=False)
    config = EngineConfig.resolve(queue_capacity=99, flush_interval=None)
    assert config.queue_capacity == 99  # keyword beats environment
    assert config.flush_interval == 0.25  # None falls through to the environment
    assert config.full_policy == "drop"
    assert config.max_in_flight == EngineConfig().max_in_flight
    assert config.exit_timeout == EngineConfig().exit_timeout


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("ASYNCTRACK_QUEUE_CAPACITY", "lots", "ASYNCTRACK_QUEUE_CAPACITY must be a number"),
        ("ASYNCTRACK_QUEUE_CAPACITY", "1.5", "ASYNCTRACK_QUEUE_CAPACITY must be a number"),
        ("ASYNCTRACK_QUEUE_CAPACITY", "0", "queue_capacity must be a positive integer"),
        ("ASYNCTRACK_FLUSH_INTERVAL", "soon", "ASYNCTRACK_FLUSH_INTERVAL must be a number"),
        ("ASYNCTRACK_EXIT_TIMEOUT", "-1", "exit_timeout must be positive"),
        ("ASYNCTRACK_EXIT_TIMEOUT", "nan", "exit_timeout must be positive"),
        ("ASYNCTRACK_FULL_POLICY", "sometimes", "full_policy must be one of"),
    ],
)
def test_resolve_rejects_bad_environment(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str, message: str
) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ConfigError, match=message):
        EngineConfig.resolve()


def test_resolve_rejects_unknown_setting() -> None:
    with pytest.raises(ConfigError, match=r"unknown engine setting.*queue_size"):
        EngineConfig.resolve(queue_size=10)


# ---------------------------------------------------------------------------- worker


class FakeTransport:
    """Records what would be sent; can refuse keys, fail transiently, or hold requests."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, list[Any], list[tuple[str, str]], list[tuple[str, str]]]] = []
        self.ended: list[tuple[str, str]] = []
        self.order: list[str] = []  # "batch:<run>" or "end:<run>", as received
        self.refuse: dict[str, Refused] = {}  # key -> refusal for any batch holding it
        self.refuse_runs: dict[str, Refused] = {}
        self.transient_failures = 0
        self.attempts: dict[str, int] = {}  # log_batch calls per run, refused ones included
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.deny = ""  # an answer about the credentials for every request, while set
        self.refreshes = 0

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[Any],
        params: Sequence[tuple[str, str]],
        tags: Sequence[tuple[str, str]],
    ) -> None:
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        with self.lock:
            self.attempts[run_id] = self.attempts.get(run_id, 0) + 1
            if self.deny:
                raise Held(self.deny)
            if self.transient_failures:
                self.transient_failures -= 1
                raise Transient("HTTP 503")
            if run_id in self.refuse_runs:
                raise self.refuse_runs[run_id]
            keys = [m[1] for m in metrics] + [k for k, _ in params] + [k for k, _ in tags]
            for key in keys:
                if key in self.refuse:
                    raise self.refuse[key]
            param_keys = [k for k, _ in params]
            assert len(param_keys) == len(set(param_keys)), "a param key twice in one call"
            assert len(metrics) <= 1000 and len(params) <= 100 and len(tags) <= 100
            self.calls.append((run_id, list(metrics), list(params), list(tags)))
            self.order.append(f"batch:{run_id}")

    def end_run(self, run_id: str, status: str, end_time: int) -> None:
        with self.lock:
            if self.deny:
                raise Held(self.deny)
            self.ended.append((run_id, status))
            self.order.append(f"end:{run_id}")

    def refresh(self) -> None:
        with self.lock:
            self.refreshes += 1

    def metrics(self, run_id: str | None = None) -> list[tuple[str, float, int]]:
        with self.lock:
            return [
                (m[1], m[2], m[4])
                for run, metrics, _, _ in self.calls
                for m in metrics
                if run_id is None or run == run_id
            ]

    def tags(self, run_id: str) -> dict[str, str]:
        final: dict[str, str] = {}
        with self.lock:
            for run, _, _, tags in self.calls:
                if run == run_id:
                    final.update(tags)
        return final


@pytest.fixture
def make_engine() -> Iterator[Any]:
    engines: list[Engine] = []

    def make(**settings: Any) -> tuple[Engine, FakeTransport]:
        transport = FakeTransport()
        settings.setdefault("flush_interval", 1000.0)  # only flush() or a full queue sends
        engine = Engine("fake://", EngineConfig.resolve(**settings), lambda u, t: transport)  # type: ignore[return-value]
        engines.append(engine)
        return engine, transport

    yield make
    for engine in engines:
        engine.close(5)


def metric(i: int, run_id: str = "r", key: str = "m") -> tuple[str, str, float, float, int]:
    return (run_id, key, float(i), 1700000000.0 + i / 1000, i)


def test_engine_delivers_in_batches_of_at_most_1000(make_engine: Any) -> None:
    engine, transport = make_engine()
    for i in range(2500):
        engine.put(metric(i))
    engine.flush(10)
    assert sorted(transport.metrics()) == [("m", float(i), i) for i in range(2500)]
    assert max(len(c[1]) for c in transport.calls) == 1000
    stats = engine.stats()
    assert (stats.sent, stats.queued, stats.rejected, stats.in_flight) == (2500, 0, 0, 0)
    assert stats.batches_sent == len(transport.calls) >= 3


def test_a_refused_credential_answers_the_flush_at_once_and_keeps_the_events(
    make_engine: Any, tmp_path: Any
) -> None:
    engine, transport = make_engine(spool_dir=str(tmp_path))
    transport.deny = "HTTP 401: You are not authenticated"
    for i in range(10):
        engine.put(metric(i))
    with pytest.raises(AccessDeniedError) as info:
        engine.flush()  # no deadline to wait out: the server answered
    (kept,) = info.value.kept
    assert (kept.count, kept.reason) == (10, "HTTP 401: You are not authenticated")
    assert kept.where == engine.spool_dir() and engine.spool_dir() in str(info.value)
    assert info.value.error_code == "UNAUTHENTICATED"
    assert (engine.stats().kept, engine.stats().rejected, engine.spooled()) == (10, 0, 10)
    transport.deny = ""  # the password is fixed: the next flush delivers
    engine.flush()
    assert transport.metrics() == [("m", float(i), i) for i in range(10)]
    assert (engine.stats().kept, engine.stats().sent, engine.spooled()) == (0, 10, 0)
    assert transport.refreshes >= 2  # credentials resolved again before each round


def test_at_exit_what_is_held_back_stays_in_the_spool_and_one_story_is_told(
    make_engine: Any, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from asynctrack._engine import runtime

    # an exit timeout no test outlives: waiting it out would fail the test
    engine, transport = make_engine(spool_dir=str(tmp_path), exit_timeout=3600)
    transport.refuse["bad"] = Refused("INVALID_PARAMETER_VALUE: no", splittable=True)
    for i in range(3):
        engine.put(("r", "bad", 1.0, 1.5, i))
    engine.put(metric(0))
    with pytest.raises(DeliveryError):
        engine.flush()
    transport.deny = "HTTP 403: Permission denied"
    for i in range(1, 5):
        engine.put(metric(i))
    engine.put(end_event("r", "FINISHED"))
    runtime._close(engine, 3600)  # the server answered: nothing to wait out
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("asynctrack: 5 event(s) could not be stored at fake:// at exit")
    assert "HTTP 403: Permission denied" in lines[0] and "asynctrack sync" in lines[0]
    assert lines[1] == "asynctrack: fake://: 1 event(s) stored, 3 refused:"
    assert lines[2].startswith("  3 refused (run r: metric 'bad', metric 'bad', metric 'bad')")
    assert len(lines) == 3
    assert engine.spooled() == 5  # four metrics and the run's end, for `asynctrack sync`


def test_full_policy_raise(make_engine: Any) -> None:
    engine, transport = make_engine(queue_capacity=5, full_policy="raise")
    for i in range(5):
        engine.put(metric(i))
    with pytest.raises(QueueFullError, match=r"queue full \(5 events\)") as info:
        engine.put(metric(5))
    assert isinstance(info.value, BufferError)
    engine.flush(10)
    assert transport.metrics() == [("m", float(i), i) for i in range(5)]
    assert engine.stats().dropped == 0


def test_full_policy_drop_counts_what_it_drops(make_engine: Any) -> None:
    engine, transport = make_engine(queue_capacity=5, full_policy="drop")
    for i in range(8):
        engine.put(metric(i))  # never raises
    assert engine.stats().dropped == 3
    engine.flush(10)
    assert transport.metrics() == [("m", float(i), i) for i in range(5)]
    stats = engine.stats()
    assert (stats.sent, stats.dropped, stats.queued) == (5, 3, 0)


def test_full_policy_block_waits_for_room(make_engine: Any) -> None:
    engine, transport = make_engine(queue_capacity=5)
    for i in range(200):
        engine.put(metric(i))  # a full queue wakes the worker, which makes room
    engine.flush(10)
    assert sorted(transport.metrics()) == [("m", float(i), i) for i in range(200)]
    assert engine.stats().dropped == 0


def test_full_policy_block_waits_once_then_training_goes_on(
    make_engine: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without a spool: the worker's window (as large as the queue) and the queue fill up.
    engine, transport = make_engine(
        queue_capacity=2, max_in_flight=1, flush_timeout=0.3, spool=False
    )
    transport.gate.clear()
    engine.put(metric(0, run_id="a"))
    engine.put(metric(0, run_id="b"))
    flusher = threading.Thread(target=engine.flush, args=(30,))
    flusher.start()
    # The worker now waits for "a"'s request (held) before it can send "b"'s batch.
    assert transport.entered.wait(10)
    assert engine.stats().in_flight == 1
    for i in range(1, 100):
        engine.put(metric(i, run_id="c"))  # one wait of flush_timeout, then no more
    stats = engine.stats()
    assert 95 <= stats.dropped <= 97
    assert stats.dropped_reasons == {SHED: stats.dropped}
    assert capsys.readouterr().err.count("training goes on") == 1  # said once
    transport.gate.set()
    flusher.join(30)
    engine.flush(10)
    kept = transport.metrics("c")
    assert len(kept) == 99 - stats.dropped == len(transport.metrics()) - 2
    engine.put(metric(100, run_id="c"))  # room again: kept again
    engine.flush(10)
    assert transport.metrics("c")[-1] == ("m", 100.0, 100)


def test_with_a_spool_a_stuck_server_never_blocks_the_caller(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asynctrack._engine import loop as worker

    monkeypatch.setattr(worker, "WINDOW", 10_000)
    # flush_timeout is also how long a caller may wait for room: a stuck worker would fail
    # it every time, a busy machine never
    engine, transport = make_engine(queue_capacity=2, max_in_flight=1, flush_timeout=5.0)
    transport.gate.clear()
    engine.put(metric(0, run_id="a"))
    flusher = threading.Thread(target=engine.flush, args=(60,))
    flusher.start()
    assert transport.entered.wait(10)  # "a"'s request is held: the sender is stuck
    for i in range(1, 50_001):  # far beyond the queue and the worker's window
        engine.put(metric(i, run_id="c"))
    assert engine.stats().dropped == 0
    assert engine.intake.backlog is not None  # the rest waits on disk only
    transport.gate.set()
    flusher.join(60)
    engine.flush(60)
    assert transport.metrics("c") == [("m", float(i), i) for i in range(1, 50_001)]
    stats = engine.stats()
    assert (stats.queued, stats.spooled) == (0, 0)


def test_a_slow_fsync_never_blocks_the_caller(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asynctrack._engine import spool

    syncing, released = threading.Event(), threading.Event()
    real_sync = spool.Writer.sync

    def slow_sync(self: spool.Writer) -> None:  # a busy disk
        syncing.set()
        released.wait(30)
        real_sync(self)

    monkeypatch.setattr(spool.Writer, "sync", slow_sync)
    engine, transport = make_engine(queue_capacity=2, flush_timeout=5.0, spool_sync_interval=0.01)
    try:
        i = 0
        while not syncing.is_set():
            engine.put(metric(i))
            i += 1
        for _ in range(5_000):  # the worker must go on taking from the queue meanwhile
            engine.put(metric(i))
            i += 1
    finally:
        released.set()
    engine.flush(30)
    assert len(transport.metrics()) == i


def test_flush_timeout_keeps_events_queued(make_engine: Any) -> None:
    engine, transport = make_engine()
    transport.gate.clear()
    for i in range(10):
        engine.put(metric(i))
    with pytest.raises(FlushTimeoutError, match="10 event") as info:
        engine.flush(0.2)
    assert isinstance(info.value, TimeoutError)
    assert info.value.pending == 10
    transport.gate.set()
    engine.flush(10)
    assert len(transport.metrics()) == 10
    assert engine.stats().queued == 0


def test_refused_event_is_isolated_and_the_rest_delivered(make_engine: Any) -> None:
    engine, transport = make_engine()
    transport.refuse["bad"] = Refused("INVALID_PARAMETER_VALUE: nope", splittable=True)
    for i in range(100):
        engine.put(metric(i, key="bad" if i == 37 else "good"))
    engine.put(MetaEvent("param", "r", "p_ok", "1"))
    engine.put(MetaEvent("param", "r", "bad", "2"))
    engine.put(MetaEvent("tag", "r", "t_ok", "3"))
    with pytest.raises(DeliveryError) as info:
        engine.flush(10)
    rejections = sorted((r.run_id, r.kind, r.key, r.reason) for r in info.value.rejections)
    assert rejections == [
        ("r", "metric", "bad", "INVALID_PARAMETER_VALUE: nope"),
        ("r", "param", "bad", "INVALID_PARAMETER_VALUE: nope"),
    ]
    good = transport.metrics()
    assert sorted(good) == [("good", float(i), i) for i in range(100) if i != 37]
    stored_params = [kv for c in transport.calls for kv in c[2]]
    assert stored_params == [("p_ok", "1")]
    assert transport.tags("r") == {"t_ok": "3"}
    stats = engine.stats()
    assert (stats.sent, stats.rejected, stats.queued) == (101, 2, 0)
    engine.flush(10)  # reported once


def test_whole_request_refusal_is_not_split(make_engine: Any) -> None:
    engine, transport = make_engine()
    transport.refuse_runs["gone"] = Refused("RESOURCE_DOES_NOT_EXIST: no run", splittable=False)
    for i in range(50):
        engine.put(metric(i, run_id="gone"))
        engine.put(metric(i, run_id="ok"))
    with pytest.raises(DeliveryError) as info:
        engine.flush(10)
    assert len(info.value.rejections) == 50
    assert {r.run_id for r in info.value.rejections} == {"gone"}
    assert transport.attempts["gone"] == 1  # splitting could not help, so it was not tried
    assert len(transport.metrics("ok")) == 50


def test_transient_failures_are_retried(make_engine: Any) -> None:
    engine, transport = make_engine()
    transport.transient_failures = 2
    for i in range(10):
        engine.put(metric(i))
    engine.flush(30)
    assert transport.metrics() == [("m", float(i), i) for i in range(10)]
    stats = engine.stats()
    assert stats.retried == 20  # ten events, re-sent twice
    assert (stats.sent, stats.rejected) == (10, 0)


def test_run_end_sends_the_runs_events_first(make_engine: Any) -> None:
    engine, transport = make_engine()
    for i in range(1500):
        engine.put(metric(i, run_id="a"))
    engine.put(MetaEvent("tag", "a", "t", "last"))
    engine.end_run("a", "FINISHED", timeout=10)
    assert transport.ended == [("a", "FINISHED")]
    assert transport.order[-1] == "end:a"
    assert len(transport.metrics("a")) == 1500
    assert transport.tags("a") == {"t": "last"}


def test_run_end_reports_only_that_runs_refusals(make_engine: Any) -> None:
    engine, transport = make_engine()
    transport.refuse["bad_a"] = Refused("no a", splittable=True)
    transport.refuse["bad_b"] = Refused("no b", splittable=True)
    engine.put(metric(0, run_id="a", key="bad_a"))
    engine.put(metric(0, run_id="b", key="bad_b"))
    with pytest.raises(DeliveryError) as info:
        engine.end_run("a", "FINISHED", timeout=10)
    assert [(r.run_id, r.key) for r in info.value.rejections] == [("a", "bad_a")]
    with pytest.raises(DeliveryError) as later:
        engine.flush(10)
    assert [(r.run_id, r.key) for r in later.value.rejections] == [("b", "bad_b")]


def test_tags_of_one_run_land_in_order(make_engine: Any) -> None:
    engine, transport = make_engine(max_in_flight=4)
    for i in range(400):
        engine.put(MetaEvent("param", "r", f"p{i}", "v"))  # forces several batches
        engine.put(MetaEvent("tag", "r", "phase", f"v{i}"))
    engine.flush(10)
    assert transport.tags("r") == {"phase": "v399"}
    assert len([kv for c in transport.calls for kv in c[2]]) == 400


def test_closed_engine_refuses_new_events(make_engine: Any) -> None:
    engine, transport = make_engine()
    for i in range(3):
        engine.put(metric(i))
    assert engine.close(5) == 0
    assert len(transport.metrics()) == 3
    with pytest.raises(EngineClosedError):
        engine.put(metric(3))


def test_close_reports_what_is_left(make_engine: Any) -> None:
    engine, transport = make_engine()
    transport.gate.clear()
    for i in range(7):
        engine.put(metric(i))
    assert engine.close(0.2) == 7
    transport.gate.set()


# ---------------------------------------------------------------------------- exit report


def test_exit_reports_how_many_events_were_not_stored(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from asynctrack._engine import runtime

    engine, transport = make_engine(exit_timeout=0.3)
    transport.gate.clear()
    for i in range(7):
        engine.put(metric(i))
    monkeypatch.setattr(runtime, "_engines", {"fake://": engine})
    runtime.shutdown()
    transport.gate.set()
    err = capsys.readouterr().err
    assert "asynctrack: 7 event(s) could not be stored at fake://" in err
    with pytest.raises(EngineClosedError):
        engine.put(metric(8))


def test_exit_report_names_the_configured_deadline(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from asynctrack._engine import runtime

    engine, transport = make_engine(exit_timeout=0.3)
    transport.gate.clear()
    engine.put(metric(0))
    monkeypatch.setattr(runtime, "_engines", {"fake://": engine})
    runtime.shutdown()
    transport.gate.set()
    assert "at exit: 0.3 s passed without progress" in capsys.readouterr().err


SECRET_URI = "http://alice:s3cret-pw@127.0.0.1:1"


def _engine_at(uri: str, **settings: Any) -> tuple[Engine, FakeTransport]:
    transport = FakeTransport()
    settings.setdefault("flush_interval", 1000.0)
    engine = Engine(uri, EngineConfig.resolve(**settings), lambda uri, timeout: transport)  # type: ignore[return-value]
    return engine, transport


def test_exit_report_hides_credentials(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from asynctrack._engine import runtime

    engine, transport = _engine_at(SECRET_URI, exit_timeout=0.2)
    transport.gate.clear()
    engine.put(metric(0))
    monkeypatch.setattr(runtime, "_engines", {SECRET_URI: engine})
    runtime.shutdown()
    transport.gate.set()
    err = capsys.readouterr().err
    assert "1 event(s) could not be stored at http://***@127.0.0.1:1" in err
    assert "s3cret" not in err


def test_error_messages_hide_credentials() -> None:
    engine, transport = _engine_at(SECRET_URI, queue_capacity=1, full_policy="raise")
    transport.gate.clear()
    try:
        engine.put(metric(0))
        with pytest.raises(QueueFullError) as full:
            engine.put(metric(1))
        with pytest.raises(FlushTimeoutError) as timeout:
            engine.flush(0.1)
    finally:
        transport.gate.set()
        engine.close(5)
    assert "s3cret" not in str(full.value)
    assert "s3cret" not in str(timeout.value)
    assert "s3cret" not in repr(engine)
    assert "http://***@127.0.0.1:1" in str(timeout.value)


# ---------------------------------------------------------------------------- the spool


def test_spool_limit_reached_makes_callers_wait_once_and_says_why(
    make_engine: Any, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    engine, transport = make_engine(
        queue_capacity=10,
        max_in_flight=1,
        flush_timeout=0.5,
        spool_dir=str(tmp_path),
        spool_limit=20_000,
    )
    transport.gate.clear()
    engine.put(metric(0, run_id="a"))
    flusher = threading.Thread(target=engine.flush, args=(60,))
    flusher.start()
    assert transport.entered.wait(10)
    accepted = 0
    for i in range(1, 200_000):
        engine.put(metric(i, run_id="c"))
        if engine.stats().dropped:
            break
        accepted += 1
    err = capsys.readouterr().err
    assert "spool limit of 20000 bytes reached" in err and str(tmp_path) in err
    transport.gate.set()
    flusher.join(60)
    engine.flush(60)
    assert len(transport.metrics("c")) == accepted  # nothing accepted was lost


def test_unusable_spool_dir_warns_naming_it_and_keeps_events_in_memory(
    make_engine: Any, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the spool's directory should be")
    engine, transport = make_engine(spool_dir=str(blocked))
    for i in range(100):
        engine.put(metric(i))
    engine.flush(10)
    assert transport.metrics() == [("m", float(i), i) for i in range(100)]
    assert any(str(blocked) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert engine.spool_dir() == ""


def test_spool_files_are_owner_only_and_gone_once_stored(make_engine: Any, tmp_path: Any) -> None:
    import stat

    engine, _ = make_engine(spool_dir=str(tmp_path))
    for i in range(10):
        engine.put(metric(i))
    engine.flush(10)
    directory = tmp_path / engine.spool_dir().rsplit("/", 1)[-1]
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for entry in directory.iterdir():
        assert stat.S_IMODE(entry.stat().st_mode) == 0o600, entry
    assert engine.stats().durable <= engine.stats().sent
    engine.close(5)
    assert not directory.exists()  # everything stored: the directory is removed


def test_a_backlog_over_many_segments_arrives_in_order_and_the_segments_go(
    make_engine: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asynctrack._engine import loop as worker

    monkeypatch.setattr(worker, "SEGMENT_BYTES", 32 * 1024)
    monkeypatch.setattr(worker, "WINDOW", 1000)
    engine, transport = make_engine(max_in_flight=1, spool_dir=str(tmp_path))
    transport.gate.clear()
    engine.put(metric(0, run_id="a"))
    flusher = threading.Thread(target=engine.flush, args=(60,))
    flusher.start()
    assert transport.entered.wait(10)
    for i in range(1, 30_001):
        engine.put(metric(i, run_id="c"))
        if i % 7000 == 0:
            engine.put(MetaEvent("tag", "c", "phase", str(i)))  # the last one must win
    directory = tmp_path / engine.spool_dir().rsplit("/", 1)[-1]
    transport.gate.set()
    flusher.join(60)
    engine.flush(60)
    assert transport.metrics("c") == [("m", float(i), i) for i in range(1, 30_001)]
    assert transport.tags("c") == {"phase": "28000"}
    assert engine.stats().spooled == 0
    assert len(list(directory.glob("*.seg"))) <= 1  # settled segments are removed


# ---------------------------------------------------------------------------- run end under load


class SlowTransport(FakeTransport):
    """A server that stores every batch, each a little later than the last."""

    def log_batch(self, *args: Any) -> None:
        time.sleep(0.15)
        super().log_batch(*args)


def test_a_flush_without_a_timeout_waits_while_the_server_makes_progress() -> None:
    transport = SlowTransport()
    transport.gate.set()
    config = EngineConfig.resolve(flush_interval=1000.0, flush_timeout=1.0, max_in_flight=1)
    engine = Engine("fake://", config, lambda uri, timeout: transport)  # type: ignore[return-value]
    try:
        for i in range(16000):  # 16 batches of 1000: about 2.4 s, more than flush_timeout
            engine.put(metric(i))
        engine.flush()  # the deadline counts from the last batch stored, not from the start
        assert len(transport.metrics()) == 16000
        for i in range(16000, 24000):
            engine.put(metric(i))
        with pytest.raises(FlushTimeoutError, match=r"after 0\.5 s with"):
            engine.flush(0.5)  # a number is a fixed deadline
    finally:
        engine.close(10)


def test_exit_waits_while_the_server_makes_progress() -> None:
    transport = SlowTransport()  # 0.15 s a batch
    config = EngineConfig.resolve(flush_interval=1000.0, exit_timeout=1.0, max_in_flight=1)
    engine = Engine("fake://", config, lambda uri, timeout: transport)  # type: ignore[return-value]
    for i in range(16000):  # about 2.4 s of sending, more than exit_timeout
        engine.put(metric(i))
    assert engine.close(config.exit_timeout) == 0
    assert len(transport.metrics()) == 16000
