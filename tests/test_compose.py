"""docker-compose.yml, .env.example and docker/: checked by reading them.

No Docker engine runs where these tests run, so the compose file is parsed with PyYAML and
its variables are interpolated the way ``docker compose`` does (``${VAR}``, ``${VAR:-x}``,
``${VAR:?msg}``, ``$$``), once with the values of ``.env.example`` and once with an empty
environment (the defaults a missing ``.env`` entry falls back to).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

COMPOSE_TEXT = COMPOSE_FILE.read_text(encoding="utf-8")
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]

# The seed's development keys: they belong in .env.example, never in the compose file.
SEED_SECRETS = ("minioadmin0", "minioadmin1230", "minioadmin")
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|_USER$|TOKEN", re.IGNORECASE)
RELEASE_TAG = re.compile(r"^RELEASE\.\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}Z$")

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(LookupError):
    pass


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Resolve compose variables in ``text`` as ``docker compose`` does."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["plain"]
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        # With ":" an empty value counts as unset, as in the shell.
        present = bool(value) if op and op.startswith(":") else value is not None
        if op in (":-", "-"):
            return (value or "") if present else arg
        if op in (":?", "?"):
            if not present:
                raise MissingVariable(f"{name}: {arg}")
            return value or ""
        if op in (":+", "+"):
            return arg if present else ""
        return value or ""

    # A "${" that is not a whole reference is a typo compose would reject.
    assert "${" not in _VAR.sub("", text), f"broken variable reference in {text!r}"
    return _VAR.sub(replace, text)


def referenced(text: str) -> Iterator[tuple[str, str | None]]:
    """(name, operator) of each variable ``text`` interpolates; ``$$`` escapes are not."""
    for match in _VAR.finditer(text):
        if not match["escaped"]:
            yield (match["braced"] or match["plain"]), match["op"]


def var_name(value: str) -> str:
    """The one variable a value consists of."""
    names = [name for name, _ in referenced(value)]
    assert len(names) == 1, value
    return names[0]


def strings(node: Any) -> Iterator[str]:
    """Every string in a parsed YAML tree, keys included."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f"not NAME=value: {raw!r}"
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), raw
        values[name] = value.strip().strip("'\"")
    return values


ENV = read_env_file(ENV_EXAMPLE)
ENVIRONMENTS = {"env-example": ENV, "defaults": {}}


def environment(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def command(service: str) -> list[str]:
    cmd = SERVICES[service].get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def bucket_creator() -> str:
    for name, service in SERVICES.items():
        text = " ".join([*command(name), str(service.get("entrypoint", ""))])
        if service.get("image", "").startswith("quay.io/minio/mc:") and "mc mb" in text:
            return name
    raise AssertionError("no one-shot service runs `mc mb` to create the bucket")


def split_image(image: str) -> tuple[str, str]:
    assert "@" not in image or ":" in image.split("@")[0], f"{image}: a digest needs a tag too"
    name = image.split("@")[0]
    repo, sep, tag = name.rpartition(":")
    assert sep and "/" not in tag, f"{image}: no tag"
    return repo, tag


# -- services and images ---------------------------------------------------------------


def test_services_present() -> None:
    assert {"mlflow", "postgres", "minio"} <= set(SERVICES)
    creator = bucket_creator()
    assert SERVICES[creator].get("restart", "no") == "no"


def test_every_image_is_pinned() -> None:
    for name, service in SERVICES.items():
        image = service.get("image")
        assert image, f"{name}: no image name (a built image gets a pinned name too)"
        assert "$" not in image, f"{name}: image chosen by a variable"
        repo, tag = split_image(image)
        assert tag.lower() not in {"latest", "stable", "main", "edge"}, f"{name}: {image}"
        assert re.search(r"\d", tag), f"{name}: {image} is not a version"
        if repo.endswith("minio/minio") or repo.endswith("minio/mc"):
            assert repo.startswith("quay.io/minio/"), f"{name}: {image} not from quay.io"
            assert RELEASE_TAG.match(tag), f"{name}: {image} is not a RELEASE tag"
    assert re.fullmatch(r"\d+\.\d+-alpine", split_image(SERVICES["postgres"]["image"])[1])


def dockerfile_of(service: str) -> Path | None:
    build = SERVICES[service].get("build")
    if build is None:
        return None
    if isinstance(build, str):
        build = {"context": build}
    return ROOT / build["context"] / build.get("dockerfile", "Dockerfile")  # type: ignore[no-any-return]


def test_mlflow_server_image_is_pinned_and_brings_the_drivers() -> None:
    dockerfile = dockerfile_of("mlflow")
    if dockerfile is None:
        repo, tag = split_image(SERVICES["mlflow"]["image"])
        assert repo == "ghcr.io/mlflow/mlflow" and re.fullmatch(r"v3\.\d+\.\d+", tag)
        return
    text = dockerfile.read_text(encoding="utf-8")
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert froms, dockerfile
    for base in froms:
        assert "$" not in base, base
        repo, tag = split_image(base)
        assert tag != "latest", base
    repo, tag = split_image(froms[-1])
    assert repo == "ghcr.io/mlflow/mlflow", froms[-1]
    version = re.fullmatch(r"v(\d+\.\d+\.\d+)", tag)
    assert version, f"{froms[-1]}: not an exact MLflow release"
    # The library's own MLflow floor (pyproject: mlflow>=X.Y) is the server's release line.
    floor = re.search(r'"mlflow>=(\d+\.\d+)', (ROOT / "pyproject.toml").read_text("utf-8"))
    assert floor and version[1].startswith(floor[1] + "."), (version[1], floor)
    # The built image's name carries the same version.
    assert split_image(SERVICES["mlflow"]["image"])[1].startswith(version[1])
    # psycopg2 and boto3, each pinned to one release.
    for package in ("psycopg2-binary", "boto3"):
        assert re.search(rf"\b{re.escape(package)}==\d+(\.\d+)+", text), package


# -- health and start order ------------------------------------------------------------


def health_test(service: str) -> str:
    check = SERVICES[service].get("healthcheck")
    assert check and not check.get("disable"), f"{service}: no health check"
    test = check["test"]
    parts = [test] if isinstance(test, str) else [str(part) for part in test]
    assert parts[0] not in ("NONE",), f"{service}: health check disabled"
    return " ".join(parts)


def test_health_checks() -> None:
    assert "pg_isready" in health_test("postgres")
    minio = health_test("minio")
    assert "mc ready" in minio or "/minio/health/live" in minio, minio
    mlflow = health_test("mlflow")
    assert "/health" in mlflow and "urllib" in mlflow, mlflow
    assert "curl" not in mlflow and "wget" not in mlflow, "the MLflow image has neither"
    # Healthcheck commands see the container's environment, not .env: `$$` only.
    for name in ("postgres", "minio", "mlflow"):
        assert not list(referenced(health_test(name))), name


def depends(service: str) -> dict[str, str]:
    deps = SERVICES[service].get("depends_on") or {}
    assert isinstance(deps, Mapping), f"{service}: depends_on without conditions"
    return {name: spec.get("condition") for name, spec in deps.items()}


def test_start_order() -> None:
    creator = bucket_creator()
    assert depends(creator) == {"minio": "service_healthy"}
    assert depends("mlflow") == {
        "postgres": "service_healthy",
        "minio": "service_healthy",
        creator: "service_completed_successfully",
    }


# -- network exposure ------------------------------------------------------------------


def published(service: dict[str, Any], env: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    """(host_ip, spec) of each published port."""
    for port in service.get("ports") or []:
        if isinstance(port, Mapping):
            yield interpolate(str(port.get("host_ip", "")), env), str(port)
            continue
        spec = interpolate(str(port), env)
        parts = spec.split("/")[0].rsplit(":", 2)
        yield (parts[0] if len(parts) == 3 else ""), spec


@pytest.mark.parametrize("env_name", sorted(ENVIRONMENTS))
def test_ports_bound_to_loopback(env_name: str) -> None:
    env = ENVIRONMENTS[env_name]
    seen = {}
    for name, service in SERVICES.items():
        assert service.get("network_mode") != "host", name
        for host_ip, spec in published(service, env):
            assert host_ip == "127.0.0.1", f"{name}: {spec} is published beyond this machine"
            seen[spec] = name
    assert seen == {
        "127.0.0.1:5000:5000": "mlflow",
        "127.0.0.1:9000:9000": "minio",
        "127.0.0.1:9001:9001": "minio",
    }


@pytest.mark.parametrize("env_name", sorted(ENVIRONMENTS))
def test_allowed_hosts_serve_containers_and_localhost(env_name: str) -> None:
    env = ENVIRONMENTS[env_name]
    value = flag(command("mlflow"), "--allowed-hosts")
    assert value is not None, "mlflow server without --allowed-hosts"
    hosts = interpolate(value, env).split(",")
    assert "*" not in hosts
    # MLflow compares the Host header exactly (port included) unless a pattern has "*".
    for host in ("mlflow", "mlflow:5000", "localhost", "localhost:5000", "127.0.0.1:5000"):
        assert host in hosts, (host, hosts)


# -- credentials -----------------------------------------------------------------------


def secret_values() -> set[str]:
    return {v for k, v in ENV.items() if CREDENTIAL_NAME.search(k) and len(v) >= 4}


def test_no_secret_literal_in_compose_file() -> None:
    lowered = COMPOSE_TEXT.lower()
    for secret in SEED_SECRETS:
        assert secret not in lowered, secret
    values = secret_values()
    assert {"minioadmin0", "minioadmin1230"} <= values
    for value in values - {"mlflow"}:  # the user name "mlflow" is also the service's name
        assert value not in COMPOSE_TEXT, value


def test_every_credential_is_interpolated() -> None:
    checked = 0
    for name in SERVICES:
        for key, value in environment(name).items():
            if CREDENTIAL_NAME.search(key) or key == "PGPASSWORD":
                assert re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?\?[^}]*)?\}", value), (
                    f"{name}.{key} = {value!r}: credentials come from .env, required"
                )
                checked += 1
    assert checked >= 9
    # The MLflow server's S3 keys are MinIO's.
    mlflow, minio = environment("mlflow"), environment("minio")
    assert var_name(mlflow["AWS_ACCESS_KEY_ID"]) == var_name(minio["MINIO_ROOT_USER"])
    assert var_name(mlflow["AWS_SECRET_ACCESS_KEY"]) == var_name(minio["MINIO_ROOT_PASSWORD"])


def test_compose_refuses_to_start_without_credentials() -> None:
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        interpolate(environment("postgres")["POSTGRES_PASSWORD"], {})
    with pytest.raises(MissingVariable, match="MINIO_ROOT_PASSWORD"):
        interpolate(environment("minio")["MINIO_ROOT_PASSWORD"], {})


# -- stores ----------------------------------------------------------------------------


def test_backend_store_is_postgres_through_psycopg2() -> None:
    value = flag(command("mlflow"), "--backend-store-uri")
    assert value is not None
    assert value.startswith("postgresql+psycopg2://"), value
    uri = urlsplit(interpolate(value, ENV))
    assert uri.hostname == "postgres" and uri.hostname in SERVICES
    assert uri.path == "/" + ENV["POSTGRES_DB"]
    assert uri.username == ENV["POSTGRES_USER"]
    # The password is not in the URI (libpq reads PGPASSWORD), so none leaks into `ps`.
    assert uri.password is None
    assert var_name(environment("mlflow")["PGPASSWORD"]) == "POSTGRES_PASSWORD"


def test_artifacts_are_proxied_to_minio() -> None:
    args = command("mlflow")
    assert "--serve-artifacts" in args and "--no-serve-artifacts" not in args
    destination = flag(args, "--artifacts-destination")
    assert destination is not None
    for env in ENVIRONMENTS.values():
        bucket = urlsplit(interpolate(destination, env))
        assert bucket.scheme == "s3" and bucket.netloc, destination
        creator_bucket = interpolate(environment(bucket_creator())["MLFLOW_BUCKET"], env)
        assert bucket.netloc == creator_bucket
    endpoint = urlsplit(environment("mlflow")["MLFLOW_S3_ENDPOINT_URL"])
    assert endpoint.hostname == "minio" and endpoint.hostname in SERVICES
    assert endpoint.port == 9000


def test_named_volumes() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for name, target in (("postgres", "/var/lib/postgresql/data"), ("minio", "/data")):
        mounts = [str(v) for v in SERVICES[name].get("volumes") or []]
        sources = {m.split(":")[0] for m in mounts if m.split(":")[1] == target}
        assert sources and sources <= declared, (name, mounts)


# -- .env.example ----------------------------------------------------------------------


def test_env_example_defines_every_variable() -> None:
    used = {}  # type: ignore[var-annotated]
    for text in strings(COMPOSE):
        for name, op in referenced(text):
            used[name] = used.get(name) or op
    assert used, "the compose file reads nothing from the environment"
    missing = sorted(set(used) - set(ENV))
    assert not missing, f".env.example lacks {missing}"
    for name, value in ENV.items():
        assert value, f"{name} is empty in .env.example"
    # Every interpolation resolves with .env.example alone.
    for text in strings(COMPOSE):
        interpolate(text, ENV)


def test_env_example_carries_the_seed_defaults_and_says_to_change_them() -> None:
    assert ENV["MINIO_ROOT_USER"] == "minioadmin0"
    assert ENV["MINIO_ROOT_PASSWORD"] == "minioadmin1230"
    assert len(ENV["MINIO_ROOT_PASSWORD"]) >= 8  # MinIO refuses shorter root passwords
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    assert "cp .env.example .env" in text
    assert re.search(r"change", text, re.IGNORECASE)
