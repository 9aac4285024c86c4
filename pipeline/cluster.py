"""Submitting maskray jobs to a running Ray cluster (Ray's Job Submission SDK).

A job on the cluster is the command a user runs locally, ``python -m <module> ARGS``, run by the
cluster's ``python``; the caller names the module (``jobs.cli.COMMANDS``: this library never
imports ``jobs``). Only what the jobs need travels as the job's ``working_dir``: the allowlist
:data:`WORKING_DIR_ALLOWLIST` (code, configs, the lock), staged in a temporary folder without
secrets-looking files, merged with the runtime env in ``infra/runtime_env.yaml``. The address is
``--address``, else ``RAY_ADDRESS``, else the local dashboard ``http://127.0.0.1:8265``.

Token authentication (Ray 2.60's ``ray start --head`` turns it on once ``~/.ray/auth_token``
exists): :func:`connect` sends the token Ray's own loader finds (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``) with ``RAY_AUTH_MODE=token``, and to a
cluster on this machine when ``RAY_AUTH_MODE`` is unset (:func:`auth_headers`). A cluster that
refuses the request gives one line naming the fix.

Credentials never travel with a job: a runtime env is stored in the job's metadata and shown by
the dashboard, so an env var that looks like a secret is refused. The cluster gets its
credentials from its own secrets (Kubernetes ``secretKeyRef``/``envFrom``, IAM roles); see
``infra/README.md``.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from model.errors import MaskrayError

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUNTIME_ENV_FILE = PROJECT_ROOT / "infra" / "runtime_env.yaml"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# What a job needs on the cluster, relative to the project root: the ONLY paths uploaded as its
# working_dir (an allowlist, so a .env, a key or a credentials file next to the code never
# travels). The locked environment is already on the nodes; data and outputs live in storage.
WORKING_DIR_ALLOWLIST: tuple[str, ...] = (
    "pyproject.toml", "uv.lock", "model", "pipeline", "jobs", "configs", "infra/runtime_env.yaml",
)
# Never uploaded, even inside an allowed folder (fnmatch on each file's name).
NEVER_UPLOADED: tuple[str, ...] = (
    ".env", ".env.*", "*.env", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ed25519*",
    "*credentials*", ".netrc", ".pypirc", "*.kubeconfig", "auth_token", "*.pyc", "*.so",
)
NEVER_UPLOADED_DIRS: tuple[str, ...] = ("__pycache__", ".aws", ".ssh", ".ray", ".git", "build")

# Still applied by Ray to the staged folder (gitignore syntax); the runtime env file adds more.
WORKING_DIR_EXCLUDES: tuple[str, ...] = ("**/__pycache__/", "*.parquet", "*.pt")

# The packages of this project: a job that cannot import one of these lacks the working_dir,
# any other missing module means the cluster's python lacks maskray's environment.
PROJECT_PACKAGES: tuple[str, ...] = ("model", "pipeline", "jobs")

# Names of env vars that carry credentials: never put into a job's runtime env.
_SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|SESSION_KEY|PRIVATE_KEY|CREDENTIAL|API_KEY",
                          re.IGNORECASE)
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_MISSING_MODULE = re.compile(r"No module named '?([\w.]+)'?")

TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")

AUTH_FIX = ("put the cluster's token (`ray get-auth-token` on its head prints it) in ~/.ray/auth_token or "
            "RAY_AUTH_TOKEN and set RAY_AUTH_MODE=token")


class ClusterError(MaskrayError):
    """The cluster cannot be reached, refuses us, or does not know the job."""


# --------------------------------------------------------------------------- what is submitted

@dataclass(frozen=True)
class JobRequest:
    """One submission: ``python -m <module> <args>`` on the cluster, with its runtime env.

    ``command`` is the maskray command name (stored in the job's metadata); ``env`` holds extra
    ``KEY=VALUE`` variables, refused when named like a credential; the entry point's CPUs/GPUs
    are reserved for the driver process (None: Ray's default).
    """

    command: str
    module: str
    args: tuple[str, ...] = ()
    runtime_env_file: Path = RUNTIME_ENV_FILE
    env: tuple[str, ...] = ()
    submission_id: str | None = None
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None

    def __post_init__(self) -> None:
        if not _MODULE.fullmatch(self.module or ""):
            raise ClusterError(f"maskray submit: {self.module!r} is not a module name (python -m MODULE)")
        args = tuple(str(a) for a in self.args)
        if args[:1] == ("--",):
            args = args[1:]
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "env", tuple(self.env))
        object.__setattr__(self, "runtime_env_file", Path(self.runtime_env_file))
        for name in ("entrypoint_num_cpus", "entrypoint_num_gpus"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ClusterError(f"--{name.replace('_', '-')} {value}: must be >= 0")
        extra_env_vars(self.env)

    @property
    def entrypoint(self) -> str:
        """The shell command the cluster runs, arguments quoted."""
        return shlex.join(["python", "-m", self.module, *self.args])


def extra_env_vars(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``--env KEY=VALUE`` items as a mapping; refuses a malformed item or a credential's name."""
    env_vars = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ClusterError(f"--env {item!r}: expected KEY=VALUE")
        check_no_secrets({name: value}, "--env")
        env_vars[name] = value
    return env_vars


def resolve_address(address: str | None) -> str:
    """``--address``, else ``$RAY_ADDRESS``, else the local dashboard; a bare host:port gets http://."""
    address = (address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).strip()
    if "://" not in address and address != "auto":
        address = f"http://{address}"
    return address.rstrip("/")


def paths_outside_project(job_args: list[str] | tuple[str, ...], root: Path = PROJECT_ROOT) -> list[str]:
    """Local files named in ``job_args`` that do not travel with the working_dir (outside ``root``)."""
    outside = []
    for arg in job_args:
        value = arg.split("=", 1)[-1] if arg.startswith("-") or "=" in arg else arg
        if not value or "://" in value or value.startswith("-"):
            continue
        path = Path(value).expanduser()
        try:
            if path.exists() and not path.resolve().is_relative_to(root.resolve()):
                outside.append(value)
        except OSError:
            continue
    return outside


def check_no_secrets(env_vars: dict[str, str], source: str) -> None:
    """Refuse env vars that carry credentials: runtime envs are stored and shown by the dashboard."""
    for name in env_vars:
        if _SECRET_NAME.search(name):
            raise ClusterError(
                f"{source}: env var {name} looks like a credential; a job's runtime env is stored and shown by "
                "the dashboard, so give the cluster its credentials through its own secrets (see infra/README.md)")


def stage_working_dir(root: Path, dest: Path) -> list[str]:
    """Copy the allowlisted paths of ``root`` (:data:`WORKING_DIR_ALLOWLIST`, minus
    :data:`NEVER_UPLOADED` names and :data:`NEVER_UPLOADED_DIRS`) into ``dest``; returns the
    relative paths copied, sorted. Symlinks are not followed out of ``root``."""
    import fnmatch
    import shutil

    root, dest = Path(root).resolve(), Path(dest)
    copied: list[str] = []

    def take(path: Path) -> None:
        rel = path.relative_to(root)
        if any(fnmatch.fnmatch(path.name, pat) for pat in NEVER_UPLOADED):
            return
        if not path.resolve().is_relative_to(root):
            return
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        copied.append(rel.as_posix())

    for entry in WORKING_DIR_ALLOWLIST:
        path = root / entry
        if path.is_file():
            take(path)
        elif path.is_dir():
            for folder, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in NEVER_UPLOADED_DIRS and not d.startswith("."))
                for name in sorted(files):
                    take(Path(folder) / name)
    return sorted(copied)


def load_runtime_env(path: str | Path, *, extra_env: list[str] | tuple[str, ...] = (),
                     working_dir: Path | None = None) -> dict:
    """The runtime env of a submission: ``path`` (YAML mapping) + ``working_dir`` + excludes + ``extra_env``.

    ``working_dir`` is the folder :func:`stage_working_dir` filled (never the project folder
    itself); a ``working_dir`` in the file (e.g. a zip URI in storage) wins over it; the file's
    ``excludes`` are added to :data:`WORKING_DIR_EXCLUDES`.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ClusterError(f"{path}: runtime env file not found (--runtime-env)")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ClusterError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(loaded, dict):
        raise ClusterError(f"{path}: a runtime env must be a YAML mapping, got {type(loaded).__name__}")
    env = dict(loaded)
    env_vars = env.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        raise ClusterError(f"{path}: env_vars must be a mapping of NAME: value")
    env_vars = {str(k): str(v) for k, v in env_vars.items()}
    check_no_secrets(env_vars, str(path))
    env_vars.update(extra_env_vars(extra_env))
    if env_vars:
        env["env_vars"] = env_vars
    else:
        env.pop("env_vars", None)
    if "working_dir" not in env and working_dir is not None:
        env["working_dir"] = str(working_dir)
    if "working_dir" in env:
        excludes = list(WORKING_DIR_EXCLUDES)
        for pattern in env.get("excludes") or []:
            if pattern not in excludes:
                excludes.append(str(pattern))
        env["excludes"] = excludes
    return env


# --------------------------------------------------------------------------- the client

def is_local(url: str) -> bool:
    """Whether the dashboard ``url`` is on this machine (a loopback host)."""
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_headers(url: str) -> dict[str, str]:
    """``{"authorization": "Bearer <token>"}`` to send to the dashboard at ``url``, else ``{}``.

    The token is what Ray's loader finds (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, else
    ``~/.ray/auth_token``). It is sent with ``RAY_AUTH_MODE=token``, and, with ``RAY_AUTH_MODE``
    unset, to a cluster on this machine only: Ray's own rule (``ray.init`` enables token auth
    for a local cluster it finds, never for an explicit remote address). ``disabled``: never.
    """
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled" or (mode != "token" and not is_local(url)):
        return {}
    try:
        from ray._raylet import AuthenticationTokenLoader

        return dict(AuthenticationTokenLoader.instance().get_token_for_http_header(ignore_auth_mode=True))
    except Exception as exc:  # noqa: BLE001 - an unreadable token: the cluster's answer names the fix
        logger.debug("no Ray auth token loaded (%s)", exc)
        return {}


def auth_error_message(url: str, exc: BaseException, *, sent_token: bool) -> str | None:
    """One line naming the fix when ``exc`` is the cluster refusing us (HTTP 401/403), else None."""
    from ray.exceptions import AuthenticationError

    text = str(getattr(exc, "message", None) or exc).strip()
    if not (isinstance(exc, AuthenticationError) or re.search(r"status code 40[13]\b", text)):
        return None
    if "Authentication failed" in text or "Forbidden" in text or "status code 403" in text:
        return (f"the Ray cluster at {url} refused the auth token sent from here (Forbidden: Invalid "
                f"authentication token): {AUTH_FIX}")
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if sent_token:
        why = "a token was sent but not received"
    elif mode == "disabled":
        why = "RAY_AUTH_MODE=disabled here"
    elif mode == "token" or is_local(url):
        why = "no token found here"
    else:
        why = "RAY_AUTH_MODE is not token here, so no token goes to a remote cluster"
    return f"the Ray cluster at {url} requires token authentication ({why}): {AUTH_FIX}"


def connect(address: str | None):
    """A ``JobSubmissionClient`` for ``address``, sending the auth token when there is one.

    Raises :class:`ClusterError` (one line) when the dashboard does not answer or refuses us.
    """
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        # Ray logs every packaging step at INFO and warns about directories we exclude anyway.
        for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
    headers = auth_headers(url)
    try:
        return JobSubmissionClient(url, headers=headers or None)
    except Exception as exc:  # noqa: BLE001 - sorted below; anything else propagates unchanged
        message = auth_error_message(url, exc, sent_token=bool(headers))
        if message:
            raise ClusterError(message) from exc
        if isinstance(exc, (ConnectionError, RuntimeError, ValueError)):
            raise ClusterError(f"cannot reach the Ray dashboard at {url} ({str(exc).strip().splitlines()[0]}); "
                               "is the cluster up? pass --address or set RAY_ADDRESS") from exc
        raise


def dashboard_url(client, submission_id: str) -> str:
    return f"{client.get_address().rstrip('/')}/#/jobs/{submission_id}"


def status_name(status) -> str:
    """``JobStatus.SUCCEEDED`` or ``"SUCCEEDED"`` -> ``"SUCCEEDED"``."""
    return str(getattr(status, "value", status))


# --------------------------------------------------------------------------- jobs

def submit(client, request: JobRequest, *, root: Path = PROJECT_ROOT) -> str:
    """Stage ``root``'s allowlist, submit ``request``; returns the submission id."""
    import tempfile

    # the upload happens inside submit_job, so the staged folder lives until it returns
    with tempfile.TemporaryDirectory(prefix="maskray-submit-") as staged:
        shipped = stage_working_dir(root, Path(staged))
        logger.debug("working_dir: %d files (%s)", len(shipped), ", ".join(WORKING_DIR_ALLOWLIST))
        runtime_env = load_runtime_env(request.runtime_env_file, extra_env=request.env, working_dir=Path(staged))
        submission_id = client.submit_job(
            entrypoint=request.entrypoint,
            runtime_env=runtime_env,
            submission_id=request.submission_id,
            entrypoint_num_cpus=request.entrypoint_num_cpus,
            entrypoint_num_gpus=request.entrypoint_num_gpus,
            metadata={"maskray_command": request.command},
        )
    logger.info("submitted %s", request.entrypoint)
    return submission_id


def follow_logs(client, submission_id: str, out: TextIO | None = None, *, poll_s: float = 1.0) -> str:
    """Write the job's logs to ``out`` (stdout) until it ends; returns its final status name.

    Streams with ``tail_job_logs`` (websocket); where that is not possible (e.g. a proxy that
    drops websockets) falls back to polling ``get_job_logs``.
    """
    import asyncio

    out = out or sys.stdout
    printed = 0

    async def tail() -> None:
        nonlocal printed
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()
            printed += len(chunk)

    try:
        asyncio.run(tail())
    except Exception as exc:  # noqa: BLE001 - any streaming failure: fall back to polling
        logger.debug("log streaming failed (%s); polling instead", exc)
    while True:
        status = status_name(client.get_job_status(submission_id))
        logs = client.get_job_logs(submission_id)
        if len(logs) > printed:
            out.write(logs[printed:])
            out.flush()
            printed = len(logs)
        if status in TERMINAL_STATES:
            return status
        time.sleep(poll_s)


def wait_for_status(client, submission_id: str, *, timeout_s: float = 60.0, poll_s: float = 0.5) -> str:
    """Poll until the job is in a terminal state (or ``timeout_s``); returns the last status name."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = status_name(client.get_job_status(submission_id))
        if status in TERMINAL_STATES or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


def summarize_failure(message: str) -> str:
    """One line from Ray's failure message.

    A module missing from the cluster's ``python`` (not one of :data:`PROJECT_PACKAGES`) says that
    the cluster lacks maskray's environment. Otherwise: the message's first line and, where Ray
    appended the job's last logs, the last non-blank log line (the job's own one-line error).
    """
    lines = [line.strip() for line in (message or "").strip().splitlines() if line.strip()]
    if not lines:
        return "no message from Ray"
    missing = _MISSING_MODULE.search(message)
    if missing and missing.group(1).split(".")[0] not in PROJECT_PACKAGES:
        return (f"No module named '{missing.group(1)}' on the cluster: its `python` lacks maskray's environment "
                "(Python 3.11 with the locked dependencies); start Ray on every node from that environment "
                "(`. .venv/bin/activate && ray start ...`, or the infra/Dockerfile image)")
    head = lines[0].split(", last available logs")[0].rstrip(":")
    return head if len(lines) == 1 else f"{head}; last log line: {lines[-1]}"


@dataclass(frozen=True)
class JobState:
    """A submitted job as ``maskray status`` shows it: ``message`` is one line ("" when Ray has none)."""

    submission_id: str
    status: str
    entrypoint: str
    message: str = ""


def job_state(client, submission_id: str) -> JobState:
    """The job's status, entry point and one-line message (:func:`summarize_failure` when FAILED)."""
    info = _job_info(client, submission_id)
    status = status_name(info.status)
    message = (info.message or "").strip()
    if message:
        message = summarize_failure(message) if status == "FAILED" else message.splitlines()[0]
    return JobState(submission_id, status, info.entrypoint, message)


def failure_reason(client, submission_id: str) -> str:
    """Why a job that did not succeed ended: :func:`summarize_failure` of Ray's message."""
    try:
        message = (client.get_job_info(submission_id).message or "").strip()
    except Exception:  # noqa: BLE001 - the caller reports the status anyway
        message = ""
    return summarize_failure(message)


def list_jobs(client) -> list[JobState]:
    """Every job of the cluster, oldest first (message left empty)."""
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    return [JobState(j.submission_id or j.job_id, status_name(j.status), j.entrypoint) for j in jobs]


def job_logs(client, submission_id: str) -> str:
    """The job's logs so far; :class:`ClusterError` for an unknown id."""
    _job_info(client, submission_id)
    return client.get_job_logs(submission_id)


def stop(client, submission_id: str, *, wait: bool = False) -> tuple[bool, str | None]:
    """Ask the job to stop: (whether a stop was requested, its status: the current one when it had
    already ended, the final one after ``wait``, else None)."""
    _job_info(client, submission_id)
    if not client.stop_job(submission_id):
        return False, status_name(client.get_job_status(submission_id))
    return True, wait_for_status(client, submission_id) if wait else None


def _job_info(client, submission_id: str):
    try:
        return client.get_job_info(submission_id)
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            raise ClusterError(f"no job {submission_id!r} on {client.get_address()} (maskray status lists them)") from exc
        raise
