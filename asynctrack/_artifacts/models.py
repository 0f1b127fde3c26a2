"""``log_model``: the model saved at the call, logged as an MLflow 3 logged model in the
background.

This follows ``mlflow.models.Model.log`` (mlflow 3.17), split where the caller must not
wait. At the call the flavor's ``save_model`` writes the model into the staging area, with
the signature inferred from ``input_example``, so later changes to the model object do not
leak into what is stored. The worker then does the rest as MLflow does: create the logged
model (``source_run_id`` = the run, the run's params), link it to the run as an output,
stamp its id into ``MLmodel``, upload the files to the model's own artifact location
(``<experiment>/models/m-<id>/artifacts``), finalize it READY (FAILED if anything is
refused) and, with ``registered_model_name``, create a model version from
``models:/m-<id>``. Both ``runs:/<run_id>/<name>`` and ``models:/m-<id>`` then load it.
Each step's failures are sorted as an artifact upload's are (:mod:`.upload`): retried
while the server is away, kept when the credentials or a permission are refused (the job
runs again later from the step it stopped at), final only when refused.

Inferring pip requirements starts a Python subprocess that loads the model (about 10 s
for scikit-learn); for scikit-learn models given no explicit requirements, that inference
moves to the worker and rewrites ``requirements.txt``/``conda.yaml`` before the upload.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import anyio.to_thread

from asynctrack._artifacts import staging
from asynctrack._artifacts.paths import check_model_name
from asynctrack._artifacts.upload import Upload, clean_at_stop, mlflow_call, store
from asynctrack._engine import spool
from asynctrack._engine.events import Job
from asynctrack._engine.jobs import JobContext
from asynctrack._engine.retry import GaveUp
from asynctrack._engine.transport import Held, redact
from asynctrack.errors import (
    AccessDeniedError,
    DeliveryError,
    FlushTimeoutError,
    KeptEvents,
    Rejection,
)

# MLflow's default wait for a new model version to become READY.
_AWAIT_REGISTRATION = 300
# scikit-learn's node storage of decision trees, which skops will not load untrusted.
_TRUSTED_TREE_TYPES = ("sklearn.tree._tree.Tree",)

logger = logging.getLogger("asynctrack")


class LoggedModelHandle:
    """What ``log_model`` returns: the model's URIs, and a way to wait until it is stored.

    ``runs_uri`` is known at once; ``model_id`` and ``model_uri`` (``models:/m-<id>``) once
    the server has created the logged model, a moment after the call (reading them waits for
    that). ``wait()`` returns MLflow's ``ModelInfo`` once the files are stored (and the
    version registered), or raises what went wrong; a failure is also reported by the next
    ``flush()`` or the run's end. While the server holds the model back (credentials or a
    permission refused), ``wait()`` raises AccessDeniedError at once: the model is kept and
    tried again, and a ``wait()`` after that try waits for its outcome.
    """

    def __init__(
        self, run_id: str, name: str, timeout: float, server: str = "", where: str = ""
    ) -> None:
        self.run_id = run_id
        self.name = name
        self._timeout = timeout
        self._server, self._where = server, where  # for AccessDeniedError: who, and the spool
        self._model_id: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._info: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._held: AccessDeniedError | None = None  # while held back, until the next try

    def __repr__(self) -> str:
        if not self._info.done():
            state = "pending"
        else:
            state = "failed" if self._info.exception() is not None else "stored"
        return f"LoggedModelHandle(runs_uri={self.runs_uri!r}, {state})"

    @property
    def runs_uri(self) -> str:
        return f"runs:/{self.run_id}/{self.name}"

    @property
    def model_id(self) -> str:
        """The logged model's id (``m-...``); waits until the server has created it."""
        return str(self._result("_model_id", None, "created"))

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_id}"

    def done(self) -> bool:
        return self._info.done()

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the model is stored (and registered); return its ``ModelInfo``."""
        return self._result("_info", timeout, "stored")

    async def wait_async(self, timeout: float | None = None) -> Any:
        """:meth:`wait` without blocking the event loop."""
        return await anyio.to_thread.run_sync(self.wait, timeout, abandon_on_cancel=True)

    def _result(self, name: str, timeout: float | None, what: str) -> Any:
        limit = self._timeout if timeout is None else timeout
        future: concurrent.futures.Future[Any] = getattr(self, name)
        try:
            if self._held is not None and not future.done():
                raise self._held
            return future.result(limit)
        except concurrent.futures.TimeoutError:
            raise FlushTimeoutError(
                f"model {self.name!r} of run {self.run_id} not {what} after {limit} s; "
                "it is still being logged",
                1,
            ) from None
        except AccessDeniedError:
            raise
        except Exception as exc:
            raise DeliveryError([Rejection(self.run_id, "model", self.name, str(exc))]) from None

    def _fail(self, exc: BaseException) -> None:
        for future in (self._model_id, self._info):
            if not future.done():
                future.set_exception(exc)

    def _hold(self, reason: str) -> None:
        """Held back for credentials or a permission: whoever waits is told at once, until
        the next try (``_resume``)."""
        self._held = AccessDeniedError([], [KeptEvents(self._server, 1, reason, self._where)])
        for name in ("_model_id", "_info"):
            future = getattr(self, name)
            if not future.done():  # a fresh one for the next try's outcome
                setattr(self, name, concurrent.futures.Future())
                future.set_exception(self._held)

    def _resume(self) -> None:
        self._held = None


def log_model(
    run: Any,
    model: Any,
    name: str,
    *,
    input_example: Any = None,
    registered_model_name: str | None = None,
    flavor: ModuleType | None = None,
    signature: Any = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    model_type: str | None = None,
    step: int = 0,
    metadata: dict[str, Any] | None = None,
    await_registration_for: int = _AWAIT_REGISTRATION,
    **save_kwargs: Any,
) -> LoggedModelHandle:
    """Save ``model`` with ``flavor`` (default ``mlflow.sklearn``) now; log it in the
    background. ``save_kwargs`` go to the flavor's ``save_model`` (``pip_requirements``,
    ``serialization_format``, ``skops_trusted_types``...)."""
    import mlflow.sklearn
    from mlflow.models import Model

    check_model_name(name)
    flavor = flavor or mlflow.sklearn
    defer = flavor is mlflow.sklearn and not {"pip_requirements", "conda_env"} & save_kwargs.keys()
    extra_requirements = save_kwargs.pop("extra_pip_requirements", None) if defer else None
    if defer:
        save_kwargs["pip_requirements"] = []  # a placeholder; the worker writes the real ones
    area = staging.new_area(run.engine)
    local = area / name

    def save(**extra: Any) -> None:
        shutil.rmtree(local, ignore_errors=True)
        flavor.save_model(
            model,
            str(local),
            mlflow_model=Model(run_id=run.run_id, metadata=metadata),
            signature=signature,
            input_example=input_example,
            **save_kwargs,
            **extra,
        )

    try:
        _save_trusting_trees(save, flavor, name, save_kwargs)
        for pycache in local.rglob("__pycache__"):  # save_model may load the model back
            shutil.rmtree(pycache, ignore_errors=True)
    except BaseException:
        staging.remove(area)
        raise
    engine = run.engine
    server = redact(run.tracking_uri)
    handle = LoggedModelHandle(
        run.run_id, name, engine.config.flush_timeout, server, engine.spool_dir()
    )
    job = _LoggedModel(
        run=run,
        name=name,
        area=area,
        local=local,
        handle=handle,
        flavor_name=flavor.FLAVOR_NAME,
        infer_requirements=defer,
        extra_requirements=extra_requirements,
        registered_model_name=registered_model_name,
        params={**{k: str(v) for k, v in (params or {}).items()}, **run.params},
        tags={k: str(v) for k, v in (tags or {}).items()},
        model_type=model_type,
        step=step,
        await_registration_for=await_registration_for,
    )
    job.queue()
    return handle


def _save_trusting_trees(
    save: Callable[..., None], flavor: ModuleType, name: str, save_kwargs: dict[str, Any]
) -> None:
    """Save; if skops refused scikit-learn's tree storage, save again trusting it.

    MLflow 3 saves scikit-learn models with skops, which refuses to load
    ``sklearn.tree._tree.Tree`` (inside every decision tree, random forest and gradient
    boosting model) unless told to trust it: the seed's own examples would fail. The model
    was built in this process, so for scikit-learn models given neither
    ``skops_trusted_types`` nor ``serialization_format`` that one type is trusted, and
    recorded in MLmodel as MLflow does when the user passes it. Any other untrusted type
    still fails with MLflow's error; ``skops_trusted_types=[]`` restores MLflow's refusal.
    """
    import mlflow.sklearn
    from mlflow.exceptions import MlflowException

    try:
        save()
    except MlflowException as exc:
        chosen = {"skops_trusted_types", "serialization_format"} & save_kwargs.keys()
        if flavor is not mlflow.sklearn or chosen or not _untrusted_types_refused(exc):
            raise
        save(skops_trusted_types=list(_TRUSTED_TREE_TYPES))
        logger.info(
            "asynctrack: model %r saved with skops_trusted_types=%s (pass "
            "skops_trusted_types=[] to refuse them as mlflow.sklearn does)",
            name,
            list(_TRUSTED_TREE_TYPES),
        )


def _untrusted_types_refused(exc: BaseException) -> bool:
    try:
        from skops.io.exceptions import UntrustedTypesFoundException
    except ImportError:
        return False
    return isinstance(exc.__context__, UntrustedTypesFoundException)


@dataclass(eq=False)
class _LoggedModel:
    """One ``log_model`` call's background work."""

    run: Any
    name: str
    area: Path
    local: Path
    handle: LoggedModelHandle
    flavor_name: str
    infer_requirements: bool
    extra_requirements: Any
    registered_model_name: str | None
    params: dict[str, str]
    tags: dict[str, str]
    model_type: str | None
    step: int
    await_registration_for: int
    files: list[staging.StagedFile] = field(default_factory=list)
    mlmodel: Any = None  # the MLmodel as stamped
    logged: Any = None  # the logged model, once created
    upload: Upload | None = None  # the files as their upload goes, once prepared

    def spec(self) -> dict[str, Any]:
        """What the spool keeps (plain values) for ``asynctrack sync`` to log the model
        after a crash, with the staged files (see ``replayed``)."""
        extra = self.extra_requirements
        return {
            "name": self.name,
            "experiment_id": self.run.experiment_id,
            "flavor_name": self.flavor_name,
            "infer_requirements": self.infer_requirements,
            "extra_requirements": extra if isinstance(extra, (str, type(None))) else list(extra),
            "registered_model_name": self.registered_model_name,
            "params": self.params,
            "tags": self.tags,
            "model_type": self.model_type,
            "step": self.step,
            "await_registration_for": self.await_registration_for,
        }

    def queue(self) -> None:
        self.files = staging.staged_tree(self.local)
        counters = self.run.engine.files
        counters.queued(len(self.files), sum(f.size for f in self.files))
        try:
            job = Job(
                self.run.run_id,
                "model",
                self.name,
                self.work,
                spooled=(str(self.area), self.spec()),
            )
            self.run.engine.put(job)
        except BaseException:
            counters.queued(-len(self.files), -sum(f.size for f in self.files))
            staging.remove(self.area)
            raise

    async def work(self, jobs: JobContext) -> None:
        clean_at_stop(jobs)
        self.handle._resume()
        try:
            info = await self._log(jobs)
        except Held as exc:  # kept: the dispatcher runs this job again later
            self.handle._hold(exc.reason)
            raise
        except (asyncio.CancelledError, GaveUp) as exc:
            # Cut short (the exit deadline, or sync's): the staged files stay, and the
            # spool's record lets `asynctrack sync` log the model.
            self.handle._fail(exc)
            raise
        except BaseException as exc:  # refused: reported, and nothing is left to redo
            for staged in self.files if self.upload is None else self.upload.files:
                jobs.files.failed(staged.size)
            self.handle._fail(exc)
            if self.logged is not None:
                await jobs.run_blocking(partial(self._finalize_failed, self.logged))
            raise
        self.handle._info.set_result(info)

    async def _log(self, jobs: JobContext) -> Any:
        """The steps not done yet (a job held back goes on from where it stopped)."""
        if self.logged is None:
            self.logged = await mlflow_call(jobs, self._create)
            self.handle._model_id.set_result(self.logged.model_id)
        if self.upload is None:
            await jobs.run_blocking(partial(self._prepare, self.logged, jobs.files))
            self.upload = Upload(self.files)
        await store(jobs, self.logged.artifact_location, self.run.tracking_uri, self.upload)
        return await mlflow_call(jobs, partial(self._finish, self.logged))

    def _client(self) -> Any:
        from asynctrack._gate import plain_client

        return plain_client(self.run.tracking_uri)

    def _create(self) -> Any:
        """Create the logged model and make it an output of the run (as Model.log does)."""
        from mlflow.entities import LoggedModelOutput
        from mlflow.tracking.context.registry import resolve_tags

        client = self._client()
        server_params = client.get_run(self.run.run_id).data.params
        logged = client._create_logged_model(
            experiment_id=self.run.experiment_id,
            name=self.name,
            source_run_id=self.run.run_id,
            tags=resolve_tags(self.tags),
            params={**self.params, **server_params},
            model_type=self.model_type,
            flavor=self.flavor_name,
        )
        client.log_outputs(self.run.run_id, [LoggedModelOutput(logged.model_id, step=self.step)])
        return logged

    def _prepare(self, logged: Any, counters: Any) -> None:
        """Stamp the model's id into MLmodel and write its requirements; re-list the files."""
        from mlflow.models import Model

        path = self.local / "MLmodel"
        model = Model.load(str(path))
        model.artifact_path = logged.artifact_location
        model.model_uuid = logged.model_id
        model.model_id = logged.model_id
        model.save(str(path))
        self.mlmodel = model
        if self.infer_requirements:
            _write_requirements(self.local, model.flavors["sklearn"], self.extra_requirements)
        before = self.files
        self.files = staging.staged_tree(self.local)
        counters.queued(
            len(self.files) - len(before),
            sum(f.size for f in self.files) - sum(f.size for f in before),
        )

    def _finish(self, logged: Any) -> Any:
        from mlflow.entities.logged_model_status import LoggedModelStatus

        client = self._client()
        logged = client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        info = self.mlmodel.get_model_info(logged)
        if self.registered_model_name is not None:
            version = _register(
                client,
                self.registered_model_name,
                logged.model_id,
                self.tags,
                self.await_registration_for,
            )
            info.registered_model_version = version.version
        return info

    def _finalize_failed(self, logged: Any) -> None:
        from mlflow.entities.logged_model_status import LoggedModelStatus

        try:
            self._client().finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        except Exception:  # the failure being reported is the one that matters
            return


def replayed(record: spool.Model) -> tuple[Job | None, list[str]]:
    """A ``log_model`` a dead process left staged (its spool's record), for ``sync``: the
    job that logs it (the whole flow again: a logged model the dead process had created
    stays PENDING beside the new one), or the model's name if its staged copy is gone."""
    run_id, area, spec = record.run_id, record.path, record.spec
    name = str(spec.get("name", area))
    if not (Path(area) / name / "MLmodel").is_file():
        return None, [name]

    async def work(jobs: JobContext) -> None:
        await _replayed(run_id, area, spec, jobs.tracking_uri).work(jobs)

    return Job(run_id, "model", name, work, spooled=(area, spec)), []


def _replayed(run_id: str, area: str, spec: dict[str, Any], tracking_uri: str) -> _LoggedModel:
    local = Path(area) / spec["name"]
    run = SimpleNamespace(
        run_id=run_id, experiment_id=spec["experiment_id"], tracking_uri=tracking_uri
    )
    return _LoggedModel(
        run=run,
        name=spec["name"],
        area=Path(area),
        local=local,
        handle=LoggedModelHandle(run_id, spec["name"], 0),
        flavor_name=spec["flavor_name"],
        infer_requirements=spec["infer_requirements"],
        extra_requirements=spec["extra_requirements"],
        registered_model_name=spec["registered_model_name"],
        params=spec["params"],
        tags=spec["tags"],
        model_type=spec["model_type"],
        step=spec["step"],
        await_registration_for=spec["await_registration_for"],
        files=staging.staged_tree(local),
    )


def _register(client: Any, name: str, model_id: str, tags: dict[str, str], wait: int) -> Any:
    """A new version of registered model ``name`` from ``models:/<model_id>``, as
    ``mlflow.register_model`` makes it (the registered model is created if need be)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return client._create_model_version(
        name=name,
        source=f"models:/{model_id}",
        tags=tags or None,
        await_creation_for=wait,
        model_id=model_id,
    )


def _write_requirements(local: Path, conf: dict[str, Any], extra: Any) -> None:
    """What ``mlflow.sklearn.save_model`` writes when it infers requirements itself."""
    import yaml  # type: ignore[import-untyped, unused-ignore]
    from mlflow.models import infer_pip_requirements
    from mlflow.sklearn import get_default_pip_requirements
    from mlflow.utils.environment import _process_pip_requirements

    serialization = conf.get("serialization_format")
    defaults = get_default_pip_requirements(
        include_cloudpickle=serialization == "cloudpickle",
        include_skops=serialization == "skops",
    )
    inferred = infer_pip_requirements(
        str(local / conf["pickled_model"]), "sklearn", fallback=defaults
    )
    conda_env, pip_requirements, constraints = _process_pip_requirements(
        sorted(set(inferred).union(defaults)), None, extra
    )
    with open(local / "conda.yaml", "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if constraints:
        (local / "constraints.txt").write_text("\n".join(constraints))
    (local / "requirements.txt").write_text("\n".join(pip_requirements))
