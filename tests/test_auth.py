"""Every credential source plain MLflow honours, on asynctrack's own HTTP path, against
MLflow's basic-auth app (``MlflowAuthServer``, one per session).

Each source is tried as a user's script in its own process (its environment, its netrc,
its engines): a tracker run and a patched ``mlflow.log_metric`` run, read back through
plain ``MlflowClient`` with the same credentials. The scripts' output, their spool
directory and ``owner.json`` are searched for the password and its basic-auth token.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

import asynctrack
from asynctrack._engine import runtime, spool
from asynctrack._engine.events import MetaEvent
from asynctrack._engine.transport import redact
from asynctrack.cli import main
from asynctrack.testing import MlflowAuthServer

# the CLI sets MLflow's process-wide tracking URI: the next test must not inherit it
pytestmark = pytest.mark.usefixtures("restore_tracking_uri")

STEPS = 300  # points per run: three log_batch calls' worth with the small batches below

# A user's training script: a tracker run, then plain MLflow code under the drop-in.
SCRIPT = f"""
import json, sys
import mlflow
import asynctrack
from asynctrack import MLflowExperimentTracker

asynctrack.configure(flush_interval=0.05)
experiment = sys.argv[1]
tracker = MLflowExperimentTracker(experiment_name=experiment)
with tracker.start_run(run_name="tracker"):
    tracker.log_param("lr", "0.1")
    for step in range({STEPS}):
        tracker.log_metric("loss", step / 10, step=step)
asynctrack.patch_mlflow()
mlflow.set_experiment(experiment)
with mlflow.start_run(run_name="patched") as run:
    for step in range({STEPS}):
        mlflow.log_metric("acc", step / 100, step=step)
asynctrack.flush()
stats = asynctrack.stats()
print("result", json.dumps({{"tracker": tracker.run_id, "patched": run.info.run_id,
                             "sent": stats.sent, "rejected": stats.rejected}}))
"""


class User(NamedTuple):
    name: str
    password: str

    @property
    def secrets(self) -> list[str]:
        """What must never be shown: the password and the basic-auth header's token."""
        pair = f"{self.name}:{self.password}".encode()
        return [self.password, base64.standard_b64encode(pair).decode()]


@pytest.fixture
def user(mlflow_auth_server: MlflowAuthServer) -> User:
    found = User(f"u-{uuid.uuid4().hex[:10]}", f"pw-{secrets.token_urlsafe(16)}")
    mlflow_auth_server.create_user(*found)
    return found


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, str]]:
    """An environment with no credential of any kind; ``HOME`` (netrc, MLflow's credentials
    file) points at an empty directory."""
    for name in (
        "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_URI", "NETRC",
    ):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("ASYNCTRACK_SPOOL_DIR", str(tmp_path / "spool"))
    yield dict(os.environ)


class Case(NamedTuple):
    """What every test here uses: the server, a fresh user, an environment with no
    credential of any kind (an empty HOME), and pytest's monkeypatch and tmp_path."""

    server: MlflowAuthServer
    user: User
    env: dict[str, str]
    monkeypatch: pytest.MonkeyPatch
    tmp: Path


@pytest.fixture
def case(
    mlflow_auth_server: MlflowAuthServer,
    user: User,
    clean_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Case:
    return Case(mlflow_auth_server, user, clean_env, monkeypatch, tmp_path)


@pytest.fixture
def own_engine() -> Iterator[list[str]]:
    """Tracking URIs whose engines a test starts in this process: closed and forgotten
    after it, so no later test's ``asynctrack.flush()`` meets what they keep (events held
    for a wrong password) or counts what they sent."""
    uris: list[str] = []
    yield uris
    for uri in uris:
        engine = runtime._engines.pop(uri, None)
        if engine is not None:
            engine.close(1.0)


def with_userinfo(url: str, user: User) -> str:
    return url.replace("http://", f"http://{user.name}:{user.password}@")


def write_netrc(path: Path, url: str, user: User) -> Path:
    host = url.split("//")[1].split(":")[0]
    path.write_text(f"machine {host}\n  login {user.name}\n  password {user.password}\n")
    path.chmod(0o600)
    return path


def run_script(env: dict[str, str], experiment: str) -> tuple[dict[str, Any], str]:
    """Run SCRIPT; its result and everything it printed (stdout and stderr)."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, experiment],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-3000:]
    [line] = [x for x in done.stdout.splitlines() if x.startswith("result ")]
    result: dict[str, Any] = json.loads(line.removeprefix("result "))
    return result, printed


def assert_all_stored(client: MlflowClient, result: dict[str, Any]) -> None:
    assert result["rejected"] == 0
    loss = client.get_metric_history(result["tracker"], "loss")
    assert sorted((m.step, m.value) for m in loss) == [(s, s / 10) for s in range(STEPS)]
    assert client.get_run(result["tracker"]).data.params == {"lr": "0.1"}
    assert client.get_run(result["tracker"]).info.status == "FINISHED"
    acc = client.get_metric_history(result["patched"], "acc")
    assert sorted((m.step, m.value) for m in acc) == [(s, s / 100) for s in range(STEPS)]
    assert client.get_run(result["patched"]).info.status == "FINISHED"


def assert_nothing_shows(user: User, *texts: str, spool_root: Path | None = None) -> None:
    """No secret of ``user`` in ``texts``, nor in any file under ``spool_root``."""
    places = {f"text {n}": text for n, text in enumerate(texts)}
    if spool_root is not None and spool_root.exists():
        for path in spool_root.rglob("*"):
            if path.is_file():
                places[str(path)] = path.read_bytes().decode("latin-1")
    for where, text in places.items():
        for secret in user.secrets:
            assert secret not in text, f"a secret of {user.name} shows in {where}"


def test_env_username_and_password(case: Case) -> None:
    env = {
        **case.env,
        "MLFLOW_TRACKING_URI": case.server.url,
        "MLFLOW_TRACKING_USERNAME": case.user.name,
        "MLFLOW_TRACKING_PASSWORD": case.user.password,
    }
    result, printed = run_script(env, f"env-{case.user.name}")

    case.monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", case.user.name)
    case.monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", case.user.password)
    assert_all_stored(MlflowClient(case.server.url), result)
    assert_nothing_shows(case.user, printed, spool_root=case.tmp / "spool")


def test_userinfo_in_the_tracking_uri(case: Case) -> None:
    uri = with_userinfo(case.server.url, case.user)
    result, printed = run_script({**case.env, "MLFLOW_TRACKING_URI": uri}, f"uri-{case.user.name}")

    assert_all_stored(MlflowClient(uri), result)
    # MLflow's own "View run ... at" line would show the password; ours shows ***
    assert f"{case.server.url.replace('http://', 'http://***@')}/#/experiments/" in printed
    assert_nothing_shows(case.user, printed, spool_root=case.tmp / "spool")


def test_netrc_file_named_by_NETRC(case: Case) -> None:
    netrc = write_netrc(case.tmp / "netrc", case.server.url, case.user)
    env = {**case.env, "MLFLOW_TRACKING_URI": case.server.url, "NETRC": str(netrc)}
    result, printed = run_script(env, f"netrc-{case.user.name}")

    case.monkeypatch.setenv("NETRC", str(netrc))
    assert_all_stored(MlflowClient(case.server.url), result)
    assert_nothing_shows(case.user, printed, spool_root=case.tmp / "spool")


def test_netrc_wins_over_the_environment_as_in_mlflow(case: Case) -> None:
    # requests lets a netrc entry replace the header MLflow built from its variables: a
    # wrong MLFLOW_TRACKING_PASSWORD does not matter to plain MLflow then, nor to us.
    netrc = write_netrc(case.tmp / "netrc", case.server.url, case.user)
    wrong = {
        "MLFLOW_TRACKING_USERNAME": case.user.name,
        "MLFLOW_TRACKING_PASSWORD": "not-it-000000",
    }
    env = {**case.env, "MLFLOW_TRACKING_URI": case.server.url, "NETRC": str(netrc)}
    result, _ = run_script({**env, **wrong}, f"netrc-env-{case.user.name}")

    case.monkeypatch.setenv("NETRC", str(netrc))
    for name, value in wrong.items():
        case.monkeypatch.setenv(name, value)
    assert_all_stored(MlflowClient(case.server.url), result)  # plain MLflow agrees


def test_bearer_token(case: Case) -> None:
    # MLflow's basic-auth app takes no bearer token; the test server's authorization
    # function (MLflow's extension point) maps tokens it issued to users.
    token = case.server.issue_token(case.user.name)
    env = {
        **case.env,
        "MLFLOW_TRACKING_URI": case.server.url,
        "MLFLOW_TRACKING_TOKEN": token,
    }
    result, printed = run_script(env, f"token-{case.user.name}")

    case.monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
    assert_all_stored(MlflowClient(case.server.url), result)
    assert token not in printed


def crash_spool(root: Path, owner_uri: str, run_id: str) -> Path:
    """A writer directory as a process that died leaves it: 500 points and the run's end."""
    writer = spool.Writer(root, owner_uri, segment_bytes=1 << 20, limit_bytes=1 << 30)
    points = [(run_id, "loss", step / 4, 1_700_000_000.0 + step, step) for step in range(500)]
    writer.append(spool.encode(points))
    writer.append(spool.encode([MetaEvent("end", run_id, "status", "FINISHED")]))
    writer.close(empty=False)
    return writer.directory


def test_sync_with_credentials_in_the_tracking_uri(case: Case) -> None:
    uri = with_userinfo(case.server.url, case.user)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment(f"sync-{case.user.name}")).info.run_id
    # the engine writes the URI redacted: the spool never keeps the password
    directory = crash_spool(case.tmp / "crash", redact(uri), run_id)

    # without credentials (the spool has none), the CLI asks for them and keeps everything
    kept = CliRunner().invoke(main, ["sync", str(directory)])
    assert kept.exit_code == 1 and "--tracking-uri" in kept.output
    synced = CliRunner().invoke(main, ["sync", str(directory), "--tracking-uri", uri])
    summary = ["--tracking-uri", uri, "runs", "summary", f"sync-{case.user.name}"]
    listed = CliRunner().invoke(main, summary)

    assert synced.exit_code == 0, synced.output
    assert "stored 501 events, refused 0, 0 left" in synced.output
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, s / 4) for s in range(500)]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert listed.exit_code == 0 and "metrics.loss.max    124.75" in listed.output
    assert_nothing_shows(case.user, kept.output, synced.output, listed.output)


def test_sync_with_netrc_and_with_environment_credentials(case: Case) -> None:
    client = MlflowClient(with_userinfo(case.server.url, case.user))
    experiment = client.create_experiment(f"sync-env-{case.user.name}")
    runs = [client.create_run(experiment).info.run_id for _ in range(2)]
    first = crash_spool(case.tmp / "a", case.server.url, runs[0])
    second = crash_spool(case.tmp / "b", case.server.url, runs[1])

    netrc = write_netrc(case.tmp / "netrc", case.server.url, case.user)
    case.monkeypatch.setenv("NETRC", str(netrc))
    by_netrc = CliRunner().invoke(main, ["sync", str(first)])
    case.monkeypatch.delenv("NETRC")
    case.monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", case.user.name)
    case.monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", case.user.password)
    by_env = CliRunner().invoke(main, ["sync", str(second)])

    for result, run_id in ((by_netrc, runs[0]), (by_env, runs[1])):
        assert result.exit_code == 0, result.output
        assert len(client.get_metric_history(run_id, "loss")) == 500
    assert_nothing_shows(case.user, by_netrc.output, by_env.output)


def test_wrong_password_shows_no_secret_anywhere(
    case: Case,
    own_engine: list[str],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """What the user sees when the server says no: refusals, flush errors, reprs, logs, the
    spool and owner.json, with a wrong password in the URI (a secret all the same)."""
    right = MlflowClient(with_userinfo(case.server.url, case.user))
    run_id = right.create_run(right.create_experiment(f"wrong-{case.user.name}")).info.run_id
    wrong = User(case.user.name, f"pw-{secrets.token_urlsafe(16)}")
    uri = with_userinfo(case.server.url, wrong).replace("127.0.0.1", "localhost")
    own_engine.append(uri)
    asynctrack.configure_engine(uri, spool_dir=str(case.tmp / "spool"), flush_timeout=20.0)
    engine = asynctrack._engine.get_engine(uri)
    shown: list[str] = [repr(engine)]
    try:
        for step in range(50):
            engine.put((run_id, "loss", float(step), 1_700_000_000.0 + step, step))
        try:
            engine.flush(20.0)
        except asynctrack.AsyncTrackError as exc:  # refused, or kept for later: either way
            shown += [str(exc), repr(exc)]
        shown += [repr(engine), str(engine.stats()), engine.last_error()]
        [owner] = (case.tmp / "spool").rglob("owner.json")  # while the engine runs
        assert json.loads(owner.read_text())["tracking_uri"] == redact(uri)
        assert_nothing_shows(wrong, spool_root=case.tmp / "spool")
    finally:
        engine.close(1.0)
    out, err = capfd.readouterr()
    shown += [out, err, *(r.getMessage() for r in caplog.records)]
    assert any("401" in text or "authenticated" in text for text in shown)  # it did refuse
    for who in (wrong, case.user):
        assert_nothing_shows(who, *shown, spool_root=case.tmp / "spool")


class _PluginAuth:
    """A request-auth plugin's auth object: basic auth computed per request."""

    def __init__(self, user: User) -> None:
        self.user = user

    def __call__(self, request: Any) -> Any:
        from requests.auth import HTTPBasicAuth

        return HTTPBasicAuth(*self.user)(request)


def test_a_request_auth_plugin_goes_through_mlflow_and_is_counted(
    case: Case, own_engine: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking.request_auth import registry

    class Provider:
        def get_name(self) -> str:
            return "asynctrack-test-auth"

        def get_auth(self) -> Any:
            return _PluginAuth(case.user)

    case.monkeypatch.setattr(registry._request_auth_provider_registry, "_registry", [Provider()])
    case.monkeypatch.setenv("MLFLOW_TRACKING_AUTH", "asynctrack-test-auth")
    uri = case.server.url.replace("127.0.0.1", "localhost") + "/"  # its own engine
    client = MlflowClient(uri)
    own_engine.append(uri)
    asynctrack.configure_engine(uri, spool_dir=str(case.tmp / "spool"))
    tracker = asynctrack.MLflowExperimentTracker(f"plugin-{case.user.name}", tracking_uri=uri)
    with tracker.start_run(run_name="plugin"):
        for step in range(STEPS):
            tracker.log_metric("loss", step / 10, step=step)
    routed = asynctrack._engine.get_engine(uri).stats().mlflow_path

    assert tracker.run_id is not None
    assert len(client.get_metric_history(tracker.run_id, "loss")) == STEPS
    reason = "request-auth plugin MLFLOW_TRACKING_AUTH=asynctrack-test-auth"
    assert list(routed) == [reason] and routed[reason] >= 2  # the batches and the run's end
    err = capfd.readouterr().err
    assert err.count("go through MLflow's own HTTP client") == 1
    assert asynctrack.stats().mlflow_path == routed
    status = CliRunner().invoke(main, ["status", str(case.tmp / "spool")])
    assert "MLflow's HTTP client: " in status.output and f"({reason})" in status.output


def test_rotated_password_is_picked_up_by_refresh(case: Case) -> None:
    """``RestTransport.refresh`` reads MLflow's sources again (here the netrc
    file, rewritten after the password changed): the next request uses the new password."""
    from asynctrack._engine.transport import Held, RestTransport

    client = MlflowClient(with_userinfo(case.server.url, case.user))
    run_id = client.create_run(client.create_experiment(f"rotate-{case.user.name}")).info.run_id
    netrc = write_netrc(case.tmp / "netrc", case.server.url, case.user)
    case.monkeypatch.setenv("NETRC", str(netrc))
    transport = RestTransport(case.server.url, 10.0)
    transport.log_batch(run_id, [(run_id, "m", 1.0, 1_700_000_000.0, 0)], [], [])

    rotated = User(case.user.name, f"pw-{secrets.token_urlsafe(16)}")
    case.server.update_password(*rotated)
    with pytest.raises(Held):  # kept for later, not stored
        transport.log_batch(run_id, [(run_id, "m", 2.0, 1_700_000_000.0, 1)], [], [])
    write_netrc(netrc, case.server.url, rotated)
    transport.refresh()
    transport.log_batch(run_id, [(run_id, "m", 3.0, 1_700_000_000.0, 2)], [], [])

    reader = MlflowClient(with_userinfo(case.server.url, rotated))
    assert sorted(m.step for m in reader.get_metric_history(run_id, "m")) == [0, 2]


def test_the_view_run_line_hides_the_password(
    case: Case, own_engine: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Under the patch a run's end prints MLflow's "View run ... at" line, which MLflow
    writes with the tracking URI's ``user:password@``."""
    from asynctrack._mlflow import routing, sink

    uri = with_userinfo(case.server.url, case.user)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment(f"url-{case.user.name}")).info.run_id
    own_engine.append(uri)

    routing.print_run_url(sink.RunSink(uri, run_id))

    out = capsys.readouterr().out
    assert f"at: {case.server.url.replace('//', '//***@')}/#/experiments/" in out
    assert run_id in out
    assert_nothing_shows(case.user, out)


def test_the_auth_server_keeps_its_admin_password_out_of_its_repr(case: Case) -> None:
    token = case.server.issue_token(case.user.name)
    assert case.server.admin_password not in repr(case.server) and token not in repr(case.server)
    assert repr(case.server).startswith("MlflowAuthServer(url='http://127.0.0.1:")


# ---------------------------------------------------------------- refused, kept, delivered

# A long job whose password changes while it runs (a rotated secret): the rest is kept.
ROTATE = """
import sys
import asynctrack
from asynctrack import AccessDeniedError, MLflowExperimentTracker

asynctrack.configure(flush_interval=0.05, exit_timeout=5)
tracker = MLflowExperimentTracker(experiment_name=sys.argv[1])
try:
    with tracker.start_run(run_name="rotated"):
        for step in range(3000):
            tracker.log_metric("loss", step, step=step)
        tracker.flush()
        print(tracker.run_id, flush=True)
        sys.stdin.readline()  # the password changes now
        for step in range(3000, 6000):
            tracker.log_metric("loss", step, step=step)
except AccessDeniedError as exc:  # at once: the server answered
    print("kept", sum(k.count for k in exc.kept), flush=True)
"""


def credentials_env(case: Case, user: User) -> dict[str, str]:
    return {
        **case.env,
        "MLFLOW_TRACKING_URI": case.server.url,
        "MLFLOW_TRACKING_USERNAME": user.name,
        "MLFLOW_TRACKING_PASSWORD": user.password,
    }


def sync_with(env: dict[str, str], spool_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asynctrack.cli", "sync", str(spool_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_a_password_changed_mid_run_keeps_the_rest_for_sync_with_the_new_one(
    case: Case,
) -> None:
    env = credentials_env(case, case.user)
    script = subprocess.Popen(
        [sys.executable, "-c", ROTATE, f"rotate-{case.user.name}"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert script.stdin is not None and script.stdout is not None
    run_id = script.stdout.readline().strip()
    rotated = User(case.user.name, f"pw-{secrets.token_urlsafe(16)}")
    case.server.update_password(*rotated)
    out, err = script.communicate("go\n", timeout=240)
    assert script.returncode == 0, err[-3000:]
    assert "kept 3001" in out  # 3000 points and the run's end, reported at the run's end
    assert "could not be stored" in err and "asynctrack sync" in err and "credentials" in err

    spool_root = case.tmp / "spool"
    kept = sync_with(env, spool_root)  # still the old password: refused again, kept again
    assert kept.returncode == 1 and "kept: 3001 events" in kept.stdout, kept.stdout
    synced = sync_with(credentials_env(case, rotated), spool_root)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert "stored 3001 events" in synced.stdout

    reader = MlflowClient(with_userinfo(case.server.url, rotated))
    steps = sorted(m.step for m in reader.get_metric_history(run_id, "loss"))
    assert steps == list(range(6000))  # every point once
    assert reader.get_run(run_id).info.status == "FINISHED"  # its own end, kept
    assert_nothing_shows(case.user, out, err, kept.stdout, synced.stdout, spool_root=spool_root)


# A colleague with READ permission only logs into someone else's run; then gets EDIT.
COLLEAGUE = """
import sys
import asynctrack
from asynctrack import AccessDeniedError
import mlflow
from mlflow.entities import Metric, RunTag

asynctrack.patch_mlflow(quiet=True)
run_id = sys.argv[1]
client = mlflow.MlflowClient()
client.log_batch(run_id, metrics=[Metric("score", i / 10, 1_700_000_000_000 + i, i)
                                  for i in range(200)], tags=[RunTag("reviewer", "bob")])
try:
    asynctrack.flush()
except AccessDeniedError as exc:
    print("kept", exc.kept[0].count, exc.kept[0].reason, flush=True)
sys.stdin.readline()  # granted EDIT now
asynctrack.flush()  # a flush sends what was kept again, with credentials read anew
print("stats", asynctrack.stats().sent, asynctrack.stats().kept, flush=True)
"""


def test_a_read_only_user_is_delivered_once_granted_edit(
    case: Case, mlflow_auth_server: MlflowAuthServer
) -> None:
    owner = User(f"o-{uuid.uuid4().hex[:10]}", f"pw-{secrets.token_urlsafe(16)}")
    case.server.create_user(*owner)
    owners = MlflowClient(with_userinfo(case.server.url, owner))
    experiment = owners.create_experiment(f"owned-{owner.name}")
    run_id = owners.create_run(experiment).info.run_id
    script = subprocess.Popen(
        [sys.executable, "-c", COLLEAGUE, run_id],
        env=credentials_env(case, case.user),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert script.stdin is not None and script.stdout is not None
    first = script.stdout.readline()
    assert first.startswith("kept 201 HTTP 403"), first  # nothing refused, nothing lost
    case.server.grant(case.user.name, experiment, "EDIT")
    out, err = script.communicate("go\n", timeout=240)
    assert script.returncode == 0, err[-3000:]
    assert "stats 201 0" in out
    history = owners.get_metric_history(run_id, "score")
    assert sorted(m.step for m in history) == list(range(200))
    assert owners.get_run(run_id).data.tags["reviewer"] == "bob"


def test_a_crash_spool_synced_with_a_wrong_password_first_keeps_everything(case: Case) -> None:
    client = MlflowClient(with_userinfo(case.server.url, case.user))
    run_id = client.create_run(client.create_experiment(f"crash-{case.user.name}")).info.run_id
    directory = crash_spool(case.tmp / "crash", case.server.url, run_id)
    wrong = User(case.user.name, "not-the-password")

    refused = sync_with(credentials_env(case, wrong), directory)
    assert refused.returncode == 1, refused.stdout
    assert "kept: 501 events" in refused.stdout and "HTTP 401" in refused.stdout
    status = subprocess.run(
        [sys.executable, "-m", "asynctrack.cli", "status", str(directory)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "501" in status.stdout, status.stdout  # all still waiting on disk
    synced = sync_with(credentials_env(case, case.user), directory)
    assert synced.returncode == 0 and "stored 501 events" in synced.stdout, synced.stdout
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(500))
    assert client.get_run(run_id).info.status == "FINISHED"
