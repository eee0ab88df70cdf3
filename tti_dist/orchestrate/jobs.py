"""Ray Jobs: run a sweep (or one run config) on a Ray cluster from a workstation.

`tti submit FILE --address http://HEAD:8265` ships the working directory to the cluster
(Ray's runtime_env `working_dir`) and starts the job entrypoint

    python -m tti_dist.cli sweep FILE --address auto --out OUT [--set k=v ...]

on the head node, where `FILE` is the path relative to the working directory. The Jobs API
is served by the Ray dashboard (port 8265 by default), so the address is the dashboard's
HTTP address, not the GCS/Ray Client address (`ray://...`, port 10001).

Everything that can be checked locally is checked before anything is contacted: the file
exists, is a valid sweep or run config, lies inside the working directory (and so do the
.py files its `imports` name), and the address is well formed. Then one quick `GET ADDRESS/api/version` (3 s timeout) makes an address
that does not answer a one-line error instead of a hang.

Token authentication (Ray 2.60 turns it on by default for new clusters): the client
sends `Authorization: Bearer <token>` with the token from RAY_AUTH_TOKEN, the file named by
RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (Ray's own lookup order). When such a token exists
and RAY_AUTH_MODE is unset, RAY_AUTH_MODE=token is set for this process, which is what
`ray job submit` needs by hand. RAY_AUTH_MODE=disabled sends no token.

`import ray` happens inside the functions only: `tti train` never pays for it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import re
import shlex
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tti_dist.config.load import read_yaml_mapping
from tti_dist.config.plugins import is_file_entry
from tti_dist.errors import ConfigError
from tti_dist.orchestrate.sweep_config import load_sweep

logger = logging.getLogger(__name__)

DASHBOARD_PORT = 8265
"""Ray's default dashboard (Jobs API) port."""

PROBE_TIMEOUT_S = 3.0
"""Connect/read timeout of the reachability check of --address."""

DEFAULT_EXCLUDES = [
    "/.venv", "/venv", ".git", "/runs", "/sweeps", "*.egg-info", "__pycache__", "*.pyc",
    ".pytest_cache", ".mypy_cache", ".ruff_cache", "/build", "/dist",
]
"""Never uploaded with the working directory (gitwildmatch patterns; a leading / anchors a
pattern at the working directory). Local run and sweep outputs, virtual environments and
caches would make the upload large (Ray refuses packages over 512 MiB) and are useless on
the cluster."""

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class Submission:
    """Everything `submit` sends, computed locally (no network)."""

    path: Path             # the sweep or run config, absolute
    kind: str              # "sweep" or "run"
    working_dir: Path      # shipped to the cluster as runtime_env.working_dir, absolute
    rel_path: str          # `path` relative to working_dir (POSIX), as the entrypoint names it
    out: str               # --out of the entrypoint (relative: inside the job's working directory)
    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Local checks


def normalize_address(address: str | None) -> str:
    """The dashboard URL for `address`: http(s)://host:port kept, host:port gets http://.

    The Jobs API is HTTP on the dashboard; `ray://` (Ray Client) and `auto` name other
    services, so they are refused with a hint instead of failing later inside Ray.
    """
    hint = f"tti submit needs the cluster's dashboard (Jobs API) address, e.g. http://HEAD:{DASHBOARD_PORT}"
    if address is None or not str(address).strip():
        raise ConfigError(f"--address: missing; {hint} (or set RAY_API_SERVER_ADDRESS to it)")
    addr = str(address).strip().rstrip("/")
    if "://" in addr:
        scheme = addr.split("://", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise ConfigError(f"--address: '{address}' is a {scheme}:// address; {hint}")
        if not addr.split("://", 1)[1]:
            raise ConfigError(f"--address: '{address}' names no host; {hint}")
        return addr
    if addr in ("auto", "local"):
        raise ConfigError(f"--address: '{address}' only works inside the cluster; {hint}")
    if re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):\d{1,5}", addr):
        return "http://" + addr
    raise ConfigError(f"--address: '{address}' is not host:port or http(s)://host:port; {hint}")


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def validate_file(path: str | Path, overrides: list[str] | tuple[str, ...], working_dir: Path) -> str:
    """Check a sweep or run config as the cluster will read it (`load_sweep`: every trial
    validated; a run config is a one-trial sweep); returns "sweep" or "run"."""
    path = Path(path)
    raw = read_yaml_mapping(path, field="CONFIG")
    kind = "sweep" if "axes" in raw or "base" in raw else "run"
    base = raw.get("base")
    if kind == "sweep" and isinstance(base, str):
        # The base config travels with the sweep file only if it is inside the working dir.
        base_path = (path.parent / base).resolve()
        if not _inside(base_path, working_dir):
            raise ConfigError(f"base: '{base}' ({base_path}) is outside the working directory '{working_dir}' "
                              "that is shipped to the cluster; pass --working-dir")
    sweep = load_sweep(path, list(overrides))
    _check_plugins_shipped(sweep, working_dir)
    return kind


def _check_plugins_shipped(sweep, working_dir: Path) -> None:
    """The trials' `imports` must reach the cluster: a .py file must lie inside the working
    directory (ConfigError); a module loaded here from outside it must be installed on the
    cluster (or shipped with --runtime-env py_modules), which cannot be checked from here (a
    warning)."""
    imports = dict.fromkeys(entry for plan in sweep.trials for entry in plan.cfg.imports)
    for entry in imports:
        if is_file_entry(entry):
            if not _inside(Path(entry), working_dir):
                raise ConfigError(f"imports: '{entry}' is outside the working directory '{working_dir}' that is "
                                  "shipped to the cluster; move it inside or pass --working-dir")
            continue
        origin = getattr(sys.modules.get(entry), "__file__", None)
        if origin is not None and not _inside(Path(origin).resolve(), working_dir):
            logger.warning("imports: module %r is loaded from %s, outside the working directory %s: the cluster "
                           "must have it installed, or ship it with --runtime-env (py_modules)", entry, origin,
                           working_dir)


def _stamp_name(text: str) -> str:
    """A submission-id-safe form of a file stem."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "job"


def load_runtime_env(runtime_env: str | Path | dict | None) -> dict[str, Any]:
    """The extra runtime_env mapping: a dict as given, or the mapping in a YAML file."""
    if runtime_env is None:
        return {}
    if isinstance(runtime_env, dict):
        extra = copy.deepcopy(runtime_env)
    else:
        p = Path(runtime_env)
        if not p.is_file():
            raise ConfigError(f"--runtime-env: '{runtime_env}' does not exist or is not a file")
        extra = read_yaml_mapping(p, field="--runtime-env")
    if "working_dir" in extra:
        raise ConfigError("--runtime-env: sets working_dir; pass --working-dir instead "
                          "(the submitted file must lie inside it)")
    return extra


def merge_runtime_env(default: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `default`: keys replace, except that `excludes` lists are joined and
    `env_vars` mappings merged, so a cluster file adds to the defaults instead of dropping them."""
    merged = copy.deepcopy(default)
    for key, value in extra.items():
        if key == "excludes" and isinstance(value, list):
            merged["excludes"] = list(merged.get("excludes", [])) + [v for v in value if v not in merged.get("excludes", [])]
        elif key == "env_vars" and isinstance(value, dict):
            # Ray wants strings; YAML reads `PYTHONUNBUFFERED: 1` as an int.
            merged["env_vars"] = {**merged.get("env_vars", {}), **{str(k): str(v) for k, v in value.items()}}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def prepare_submission(path: str | Path, out: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                       working_dir: str | Path | None = None, runtime_env: str | Path | dict | None = None,
                       stamp: str | None = None) -> Submission:
    """Validate everything locally and build the job request (contacts nothing).

    OUT defaults to `sweeps/<stem>-<time>`, relative to the job's working directory on the
    node that runs the entrypoint. Ray deletes that copy of the working directory when it is
    no longer used, so for real work pass an absolute OUT on storage every node shares.
    """
    wd = Path(working_dir if working_dir is not None else os.getcwd()).resolve()
    if not wd.is_dir():
        raise ConfigError(f"--working-dir: '{working_dir}' does not exist or is not a directory")
    file_path = Path(path).resolve()
    if not _inside(file_path, wd):
        raise ConfigError(f"CONFIG: '{path}' is outside the working directory '{wd}' that is shipped to the "
                          "cluster; pass --working-dir")
    kind = validate_file(file_path, overrides, wd)
    extra = load_runtime_env(runtime_env)

    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    stem = _stamp_name(file_path.stem)
    out = out if out else f"sweeps/{stem}-{stamp}"
    rel = file_path.relative_to(wd).as_posix()
    argv = ["python", "-m", "tti_dist.cli", "sweep", rel, "--address", "auto", "--out", out]
    for override in overrides:
        argv += ["--set", override]
    env = merge_runtime_env({"working_dir": str(wd), "excludes": list(DEFAULT_EXCLUDES)}, extra)
    metadata = {"tti_file": rel, "tti_kind": kind, "tti_out": out, "tti_overrides": " ".join(overrides)}
    return Submission(path=file_path, kind=kind, working_dir=wd, rel_path=rel, out=out,
                      submission_id=f"tti-{stem}-{stamp}", entrypoint=shlex.join(argv),
                      runtime_env=env, metadata=metadata)


# ---------------------------------------------------------------------------------------
# Talking to the cluster


def _auth_token() -> tuple[str | None, str]:
    """(token, where it came from), in Ray's lookup order; (None, ...) when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        token = Path(token_path).read_text().strip()
    except OSError:
        return None, token_path
    return (token or None), token_path


def auth_headers() -> dict[str, str]:
    """The Authorization header for a token-authenticated cluster ({} without a token).

    Sets RAY_AUTH_MODE=token for this process when a token exists and the mode is unset,
    like `RAY_AUTH_MODE=token ray job submit`. The header is passed explicitly as well, so
    it does not matter whether Ray read its configuration before the variable was set.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.strip().lower() != "token":
        return {}
    token, source = _auth_token()
    if token is None:
        return {}
    if mode is None:
        os.environ["RAY_AUTH_MODE"] = "token"
        logger.debug("using the Ray auth token from %s (RAY_AUTH_MODE=token)", source)
    return {"Authorization": f"Bearer {token}"}


def _auth_error(url: str, status: int) -> ConfigError:
    token, source = _auth_token()
    disabled = os.environ.get("RAY_AUTH_MODE", "").strip().lower() not in ("", "token")
    if status == 401 or token is None or disabled:
        why = "RAY_AUTH_MODE disables it here" if disabled else f"none was found (looked in RAY_AUTH_TOKEN, {source})"
        return ConfigError(f"--address: the cluster at {url} requires a Ray auth token (HTTP {status}) and {why}; "
                           "copy the head's token (`ray get-auth-token` on the head node) to ~/.ray/auth_token "
                           "or set RAY_AUTH_TOKEN")
    return ConfigError(f"--address: the cluster at {url} refused the Ray auth token from {source} (HTTP {status}); "
                       "use the head's token (`ray get-auth-token` on the head node)")


def probe(url: str, headers: dict[str, str] | None = None, timeout: float = PROBE_TIMEOUT_S) -> str:
    """GET URL/api/version within `timeout` seconds; the cluster's Ray version, or a one-line
    ConfigError naming --address (Ray's client has no connect timeout and would hang)."""
    hint = f"start a head with `ray start --head` or check the dashboard port ({DASHBOARD_PORT})"
    request = urllib.request.Request(url + "/api/version", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise _auth_error(url, exc.code) from None
        raise ConfigError(f"--address: {url} answered HTTP {exc.code} to GET /api/version; is it the Ray "
                          f"dashboard? ({hint})") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(reason, (TimeoutError, socket.timeout)):
            why = f"no answer within {timeout:g} s"
        elif isinstance(reason, socket.gaierror):
            why = "unknown host"
        else:
            why = str(reason).splitlines()[0] if str(reason) else type(reason).__name__
        raise ConfigError(f"--address: nothing answers at {url} ({why}); {hint}") from None
    try:
        version = json.loads(body)["ray_version"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"--address: {url} answered GET /api/version without a Ray version; is it the Ray "
                          f"dashboard? ({hint})") from None
    return str(version)


@dataclass
class _Cluster:
    url: str
    client: Any  # ray.job_submission.JobSubmissionClient


def connect(address: str | None) -> _Cluster:
    """A JobSubmissionClient for the dashboard at `address`, after the quick reachability check."""
    url = normalize_address(address)
    headers = auth_headers()
    probe(url, headers)
    # lazy: `tti train` and the local commands never pay for importing Ray
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(url, headers=headers)
    except AuthenticationError:
        raise _auth_error(url, 401 if not headers else 403) from None
    except ConnectionError as exc:
        raise ConfigError(f"--address: nothing answers at {url} ({exc}); start a head with `ray start --head` "
                          f"or check the dashboard port ({DASHBOARD_PORT})") from None
    return _Cluster(url, client)


def _unknown_job(exc: Exception) -> bool:
    text = str(exc)
    return "status code 404" in text or "does not exist" in text


def _job_call(cluster: _Cluster, job_id: str, fn, *args):
    """Call a client method about one job; a missing job becomes a one-line ConfigError."""
    # lazy: Ray is imported only where a cluster is contacted
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args)
    except AuthenticationError:
        raise _auth_error(cluster.url, 403) from None
    except RuntimeError as exc:
        if _unknown_job(exc):
            raise ConfigError(f"JOB: no job '{job_id}' on the cluster at {cluster.url} (job ids are printed by "
                              "`tti submit`; the dashboard's Jobs page lists them)") from None
        raise


def _job_exists(cluster: _Cluster, job_id: str) -> bool:
    try:
        cluster.client.get_job_info(job_id)
    except RuntimeError as exc:
        if _unknown_job(exc):
            return False
        raise
    return True


def submit_entrypoint(entrypoint: str, address: str | None, runtime_env: dict[str, Any] | None = None,
                      submission_id: str | None = None, metadata: dict[str, str] | None = None,
                      cluster: _Cluster | None = None) -> str:
    """Submit a raw shell command as a Ray Job; returns the job (submission) id."""
    cluster = cluster or connect(address)
    # lazy: Ray is imported only where a cluster is contacted
    from ray.exceptions import AuthenticationError

    try:
        job_id = cluster.client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env or None,
                                           submission_id=submission_id, metadata=metadata or None)
    except AuthenticationError:
        raise _auth_error(cluster.url, 403) from None
    logger.info("submitted job %s to %s", job_id, cluster.url)
    return job_id


def submit(path: str | Path, address: str | None, out: str | None = None,
           overrides: list[str] | tuple[str, ...] = (), working_dir: str | Path | None = None,
           wait: bool = False, runtime_env: str | Path | dict | None = None) -> str:
    """Run a sweep file (or a run config, as a one-trial sweep) on the cluster at `address`.

    Everything is validated locally first (see `prepare_submission`). The job id is
    `tti-<stem>-<YYYYmmdd-HHMMSS>` (with `-2`, `-3`, ... when that id is taken). With
    `wait`, blocks until the job ends; returns the job id either way.
    """
    overrides = list(overrides)
    normalize_address(address)  # a malformed address fails before the (slower) config checks
    plan = prepare_submission(path, out, overrides, working_dir, runtime_env)
    cluster = connect(address)
    stamp = plan.submission_id[len(f"tti-{_stamp_name(plan.path.stem)}-"):]
    n = 1
    while _job_exists(cluster, plan.submission_id):
        n += 1
        plan = prepare_submission(path, out, overrides, working_dir, runtime_env, stamp=f"{stamp}-{n}")
    if not Path(plan.out).is_absolute():
        logger.warning("--out %s is relative: it is written inside the job's copy of the working directory on the "
                       "head node, which Ray deletes eventually; pass an absolute path on shared storage to keep it",
                       plan.out)
    job_id = submit_entrypoint(plan.entrypoint, None, plan.runtime_env, plan.submission_id, plan.metadata,
                               cluster=cluster)
    if wait:
        wait_for(job_id, None, cluster=cluster)
    return job_id


def info(job_id: str, address: str | None, cluster: _Cluster | None = None):
    """Ray's JobDetails of one job (status, message, entrypoint, metadata, times)."""
    cluster = cluster or connect(address)
    return _job_call(cluster, job_id, cluster.client.get_job_info, job_id)


def status(job_id: str, address: str | None, cluster: _Cluster | None = None) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    return str(info(job_id, address, cluster).status)


def wait_for(job_id: str, address: str | None, timeout: float | None = None, poll_s: float = 2.0,
             cluster: _Cluster | None = None) -> str:
    """Poll until the job ends (or `timeout` seconds pass); its last status."""
    cluster = cluster or connect(address)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = status(job_id, None, cluster)
        if state in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return state
        time.sleep(poll_s)


def logs(job_id: str, address: str | None, follow: bool = False,
         cluster: _Cluster | None = None) -> str | Iterator[str]:
    """The job's driver output so far (a str), or with `follow` an iterator of chunks that
    ends when the job does."""
    cluster = cluster or connect(address)
    if not follow:
        return _job_call(cluster, job_id, cluster.client.get_job_logs, job_id)
    _job_call(cluster, job_id, cluster.client.get_job_info, job_id)  # unknown id: one line, now
    return _follow(cluster, job_id)


def _follow(cluster: _Cluster, job_id: str) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    stream = cluster.client.tail_job_logs(job_id)
    try:
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


def stop(job_id: str, address: str | None, cluster: _Cluster | None = None) -> bool:
    """Ask the job to stop (SIGTERM, then SIGKILL after Ray's grace period); True when it was
    still running, False when it had already ended."""
    cluster = cluster or connect(address)
    return bool(_job_call(cluster, job_id, cluster.client.stop_job, job_id))
