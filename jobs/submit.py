"""``maskray submit | status | logs | stop``: maskray jobs on a running Ray cluster.

``maskray submit [--address URL] [--wait] -- train|infer|distill|convert|pack ARGS...`` sends the same
command a user runs locally (``python -m jobs.<module> ARGS``) to a cluster through Ray's Job
Submission SDK (``ray.job_submission.JobSubmissionClient``). Only what the jobs need travels as
the job's ``working_dir``: the allowlist :data:`WORKING_DIR_ALLOWLIST` (code, configs, the
lock), staged in a temporary folder without secrets-looking files, merged with the runtime env
in ``infra/runtime_env.yaml``. Ray token authentication: the client sends ``RAY_AUTH_TOKEN`` /
``~/.ray/auth_token`` when ``RAY_AUTH_MODE=token`` (see ``infra/README.md``). The address comes from ``--address``, else ``RAY_ADDRESS``,
else the local dashboard ``http://127.0.0.1:8265``.

Credentials never travel with a job: a runtime env is stored in the job's metadata and shown
by the dashboard, so an env var that looks like a secret is refused. The cluster gets its
credentials from its own secrets (Kubernetes ``secretKeyRef``/``envFrom``, IAM roles); see
``infra/README.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUNTIME_ENV_FILE = PROJECT_ROOT / "infra" / "runtime_env.yaml"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# maskray command -> module run on the cluster as ``python -m <module>``.
JOB_MODULES: dict[str, str] = {"train": "jobs.train", "infer": "jobs.infer", "distill": "jobs.distill",
                               "convert": "jobs.convert", "pack": "jobs.pack"}

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

# Names of env vars that carry credentials: never put into a job's runtime env.
_SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|SESSION_KEY|PRIVATE_KEY|CREDENTIAL|API_KEY",
                          re.IGNORECASE)

TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


# --------------------------------------------------------------------------- arguments

def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None, metavar="URL",
                        help=f"Ray dashboard URL of the cluster (default: $RAY_ADDRESS, else {DEFAULT_ADDRESS})")


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    _add_address(parser)
    parser.add_argument("--wait", action="store_true",
                        help="follow the job's logs until it ends; exit non-zero unless it SUCCEEDED")
    parser.add_argument("--runtime-env", default=str(RUNTIME_ENV_FILE), metavar="YAML",
                        help="runtime env merged with the project working_dir (default: infra/runtime_env.yaml)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra (non-secret) env var for the job; repeatable")
    parser.add_argument("--submission-id", default=None, help="submission id to use (default: Ray generates one)")
    parser.add_argument("--entrypoint-num-cpus", type=float, default=None, metavar="N",
                        help="CPUs reserved for the entry point process (the driver)")
    parser.add_argument("--entrypoint-num-gpus", type=float, default=None, metavar="N",
                        help="GPUs reserved for the entry point process (the driver)")
    parser.add_argument("job", choices=sorted(JOB_MODULES), help="the maskray command to run on the cluster")
    parser.add_argument("job_args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="its arguments, as for the local command (put `--` before the command)")


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    _add_address(parser)
    parser.add_argument("submission_id", nargs="?", default=None, metavar="ID",
                        help="submission id (default: list all jobs of the cluster)")


def add_logs_arguments(parser: argparse.ArgumentParser) -> None:
    _add_address(parser)
    parser.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until the job ends")
    parser.add_argument("submission_id", metavar="ID", help="submission id")


def add_stop_arguments(parser: argparse.ArgumentParser) -> None:
    _add_address(parser)
    parser.add_argument("--wait", action="store_true", help="wait until the job has stopped")
    parser.add_argument("submission_id", metavar="ID", help="submission id")


# --------------------------------------------------------------------------- pieces

def _error(message: str) -> Exception:
    from model.errors import MaskrayError

    return MaskrayError(message)


def resolve_address(address: str | None) -> str:
    """``--address``, else ``$RAY_ADDRESS``, else the local dashboard; a bare host:port gets http://."""
    address = (address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).strip()
    if "://" not in address and address != "auto":
        address = f"http://{address}"
    return address.rstrip("/")


def build_entrypoint(job: str, job_args: list[str]) -> str:
    """The shell command the cluster runs: ``python -m jobs.<module> ARGS`` (arguments quoted)."""
    if job not in JOB_MODULES:
        raise _error(f"maskray submit: unknown job {job!r}; choose one of {', '.join(sorted(JOB_MODULES))}")
    args = list(job_args)
    if args and args[0] == "--":
        args = args[1:]
    return shlex.join(["python", "-m", JOB_MODULES[job], *args])


def paths_outside_project(job_args: list[str], root: Path = PROJECT_ROOT) -> list[str]:
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
            raise _error(
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


def load_runtime_env(path: str | Path, *, extra_env: list[str] = (), working_dir: Path | None = None) -> dict:
    """The runtime env of a submission: ``path`` (YAML mapping) + ``working_dir`` + excludes + ``extra_env``.

    ``working_dir`` is the folder :func:`stage_working_dir` filled (never the project folder
    itself); a ``working_dir`` in the file (e.g. a zip URI in storage) wins over it; the file's
    ``excludes`` are added to :data:`WORKING_DIR_EXCLUDES`.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise _error(f"{path}: runtime env file not found (--runtime-env)")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise _error(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(loaded, dict):
        raise _error(f"{path}: a runtime env must be a YAML mapping, got {type(loaded).__name__}")
    env = dict(loaded)
    env_vars = env.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        raise _error(f"{path}: env_vars must be a mapping of NAME: value")
    env_vars = {str(k): str(v) for k, v in env_vars.items()}
    check_no_secrets(env_vars, str(path))
    for item in extra_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise _error(f"--env {item!r}: expected KEY=VALUE")
        check_no_secrets({name: value}, "--env")
        env_vars[name] = value
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


def make_client(address: str | None):
    """A ``JobSubmissionClient`` for ``address``; a clear error when the dashboard does not answer."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        # Ray logs every packaging step at INFO and warns about directories we exclude anyway.
        for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise _error(f"cannot reach the Ray dashboard at {url} ({str(exc).strip().splitlines()[0]}); "
                     "is the cluster up? pass --address or set RAY_ADDRESS") from exc


def dashboard_url(client, submission_id: str) -> str:
    return f"{client.get_address().rstrip('/')}/#/jobs/{submission_id}"


def _status_name(status) -> str:
    return str(getattr(status, "value", status))


def follow_logs(client, submission_id: str, out=None, *, poll_s: float = 1.0) -> str:
    """Print the job's logs until it ends; returns its final status name.

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
        status = _status_name(client.get_job_status(submission_id))
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
        status = _status_name(client.get_job_status(submission_id))
        if status in TERMINAL_STATES or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


def _report_end(client, submission_id: str, status: str) -> int:
    """Exit code for a finished job; prints why it failed (Ray's message, first line) to stderr."""
    if status == "SUCCEEDED":
        print(f"job {submission_id} SUCCEEDED", file=sys.stderr)
        return 0
    message = ""
    try:
        message = (client.get_job_info(submission_id).message or "").strip()
    except Exception:  # noqa: BLE001 - the status alone is still worth reporting
        pass
    print(f"maskray submit: error: job {submission_id} {status}: {summarize_failure(message)}", file=sys.stderr)
    return 1


def summarize_failure(message: str) -> str:
    """One line from Ray's failure message: its first line and, where Ray appended the job's last
    logs, the last non-blank log line (the job's own one-line error)."""
    lines = [line.strip() for line in (message or "").strip().splitlines() if line.strip()]
    if not lines:
        return "no message from Ray"
    head = lines[0].split(", last available logs")[0].rstrip(":")
    return head if len(lines) == 1 else f"{head}; last log line: {lines[-1]}"


# --------------------------------------------------------------------------- commands

def run_submit(args: argparse.Namespace) -> int:
    import tempfile

    entrypoint = build_entrypoint(args.job, args.job_args)
    for path in paths_outside_project(args.job_args):
        logger.warning("%s is outside the project folder: the job reads it on the cluster, which works only "
                       "where the nodes share this filesystem (use s3:// or a path inside the project)", path)
    client = make_client(args.address)
    # the upload happens inside submit_job, so the staged folder lives until it returns
    with tempfile.TemporaryDirectory(prefix="maskray-submit-") as staged:
        shipped = stage_working_dir(PROJECT_ROOT, Path(staged))
        logger.debug("working_dir: %d files (%s)", len(shipped), ", ".join(WORKING_DIR_ALLOWLIST))
        runtime_env = load_runtime_env(args.runtime_env, extra_env=args.env, working_dir=Path(staged))
        submission_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=args.submission_id,
            entrypoint_num_cpus=args.entrypoint_num_cpus,
            entrypoint_num_gpus=args.entrypoint_num_gpus,
            metadata={"maskray_command": args.job},
        )
    logger.info("submitted %s", entrypoint)
    print(f"submission id: {submission_id}")
    print(f"dashboard:     {dashboard_url(client, submission_id)}")
    sys.stdout.flush()
    if not args.wait:
        print(f"follow with:   maskray logs --follow {submission_id} --address {client.get_address()}", file=sys.stderr)
        return 0
    try:
        status = follow_logs(client, submission_id)
    except KeyboardInterrupt:
        print(f"\nmaskray submit: stopped following; job {submission_id} goes on "
              f"(maskray stop {submission_id} to end it)", file=sys.stderr)
        raise
    return _report_end(client, submission_id, status)


def run_status(args: argparse.Namespace) -> int:
    client = make_client(args.address)
    if args.submission_id is None:
        jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
        for job in jobs:
            print(f"{job.submission_id or job.job_id}\t{_status_name(job.status)}\t{job.entrypoint}")
        if not jobs:
            print("no jobs", file=sys.stderr)
        return 0
    info = _get_info(client, args.submission_id)
    status = _status_name(info.status)
    print(f"{args.submission_id}\t{status}\t{info.entrypoint}")
    if (info.message or "").strip():
        print(summarize_failure(info.message) if status == "FAILED" else info.message.strip().splitlines()[0])
    return 0


def run_logs(args: argparse.Namespace) -> int:
    client = make_client(args.address)
    _get_info(client, args.submission_id)
    if args.follow:
        follow_logs(client, args.submission_id)
    else:
        sys.stdout.write(client.get_job_logs(args.submission_id))
    return 0


def run_stop(args: argparse.Namespace) -> int:
    client = make_client(args.address)
    _get_info(client, args.submission_id)
    stopped = client.stop_job(args.submission_id)
    if not stopped:
        status = _status_name(client.get_job_status(args.submission_id))
        print(f"job {args.submission_id} already {status}")
        return 0
    if args.wait:
        status = wait_for_status(client, args.submission_id)
        print(f"job {args.submission_id} {status}")
    else:
        print(f"stop requested for job {args.submission_id}")
    return 0


def _get_info(client, submission_id: str):
    try:
        return client.get_job_info(submission_id)
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            raise _error(f"no job {submission_id!r} on {client.get_address()} (maskray status lists them)") from exc
        raise


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.module_main("submit"))
