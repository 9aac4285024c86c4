"""``maskray submit`` against a real two-node Ray cluster started with the ``ray`` CLI.

The cluster (head with the dashboard + one worker node, 3 CPUs in all) lives in its own temp
dir and on free ports, so it never touches another Ray on this machine; it is stopped by the
processes it started (found through that temp dir), never with a global ``ray stop``.

- a tiny shapes training job: ``maskray submit --wait -- train --config <tiny>`` -> SUCCEEDED,
  a checkpoint in the storage path, ``maskray status`` / ``logs`` agree;
- an entry point that fails -> ``maskray submit --wait`` exits non-zero and shows the error;
- ``maskray stop`` ends a running job (STOPPED);
- a job run by a ``python`` without maskray's dependencies says the cluster lacks our environment;
- a head with token authentication (Ray 2.60's default for ``ray start --head``): ``maskray
  status`` without the token fails with one line naming the fix, with the token in
  ``~/.ray/auth_token`` it works without ``RAY_AUTH_MODE`` set, a wrong token is named.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from ports import free_ports

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can see (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry.name)] = (ppid, cmdline)
    return table


def _cluster_pids(temp_dir: str) -> set[int]:
    """Every process of the cluster: those naming our temp dir, and all their descendants."""
    table = _processes()
    pids = {pid for pid, (_, cmdline) in table.items() if temp_dir in cmdline and pid != os.getpid()}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in table.items() if ppid in pids} - pids
        grew = bool(children)
        pids |= children
    return pids


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a parent that is not us)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_cluster(temp_dir: str) -> None:
    """SIGTERM the cluster's processes, SIGKILL what is left after 5 s."""
    pids = _cluster_pids(temp_dir)
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = {pid for pid in pids if _alive(pid)}
        if not pids:
            return


class LocalCluster:
    def __init__(self, temp_dir: str, address: str, env: dict[str, str]):
        self.temp_dir, self.address, self.env = temp_dir, address, env

    def maskray(self, command: str, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
        """``maskray <command> --address <dashboard> ARGS``: the console script of this environment."""
        argv = [str(BIN / "maskray"), command, "--address", self.address, *args]
        return subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)


def _start_cluster(env: dict[str, str], *, workers: int = 1) -> tuple[str, str]:
    """Head (2 CPUs, dashboard) + ``workers`` worker nodes (1 CPU) in a fresh temp dir; (temp dir, dashboard URL)."""
    # Short path: Ray's unix sockets live under the temp dir (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="mr-infra-", dir="/tmp")
    gcs, dashboard, client, agent, metrics, agent_grpc, runtime_env_agent = free_ports(7)
    ray = str(BIN / "ray")
    common = ["--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir, "--disable-usage-stats"]
    try:
        subprocess.run([ray, "start", "--head", "--port", str(gcs), "--dashboard-port", str(dashboard),
                        "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus", "2",
                        "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
                        "--metrics-export-port", str(metrics), "--dashboard-agent-grpc-port", str(agent_grpc),
                        "--runtime-env-agent-port", str(runtime_env_agent), *common],
                       env=env, check=True, capture_output=True, text=True, timeout=120)
        for _ in range(workers):
            w_agent, w_metrics, w_grpc, w_renv = free_ports(4)
            subprocess.run([ray, "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", "1",
                            "--dashboard-agent-listen-port", str(w_agent), "--metrics-export-port", str(w_metrics),
                            "--dashboard-agent-grpc-port", str(w_grpc), "--runtime-env-agent-port", str(w_renv),
                            *common], env=env, check=True, capture_output=True, text=True, timeout=120)
    except BaseException:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return temp_dir, f"http://127.0.0.1:{dashboard}"


def _cluster_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1",
               # a node has 30 s to register with the GCS by default: too short on an overloaded machine
               RAY_raylet_start_wait_time_s="120")
    return env


def _started(env: dict[str, str], *, workers: int) -> tuple[str, str]:
    """:func:`_start_cluster`, retried once from scratch when a start fails."""
    for attempt in (1, 2):
        try:
            return _start_cluster(env, workers=workers)
        except subprocess.CalledProcessError as exc:
            if attempt == 2:
                pytest.fail(f"ray start failed twice: {exc.stderr[-2000:]}")


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("ray", path=str(BIN)) is None or shutil.which("maskray", path=str(BIN)) is None:
        pytest.skip("the ray / maskray console scripts are not in this environment")
    # RAY_AUTH_MODE pinned: Ray 2.60 turns token auth on when ~/.ray/auth_token exists (another
    # local Ray may have made one); this private cluster and its clients agree on "disabled".
    env = {**_cluster_env(), "RAY_AUTH_MODE": "disabled"}
    temp_dir, address = _started(env, workers=1)
    try:
        yield LocalCluster(temp_dir, address, env)
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submission_id(stdout: str) -> str:
    match = re.search(r"submission id: (\S+)", stdout)
    assert match, stdout
    return match.group(1)


def test_failing_entry_point_exits_non_zero_and_shows_the_error(cluster, tmp_path):
    missing = tmp_path / "no-such-config.yaml"
    result = cluster.maskray("submit", "--wait", "--", "train", "--config", str(missing))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "/#/jobs/" in result.stdout
    error = [line for line in result.stderr.splitlines() if "maskray submit: error:" in line]
    assert len(error) == 1 and "FAILED" in error[0], result.stderr
    # the job's own error reached the user: in the followed log and in the one-line summary
    expected = "no-such-config.yaml" if importlib.util.find_spec("jobs.train") else "No module named jobs.train"
    assert expected in result.stdout and expected in error[0], result.stdout + result.stderr
    status = cluster.maskray("status", _submission_id(result.stdout))
    assert status.returncode == 0 and "\tFAILED\t" in status.stdout


def test_a_cluster_python_without_our_environment_is_named(cluster, tmp_path):
    """The head started from an un-activated venv: the job's `python` is the system's, which lacks
    maskray's dependencies. Reproduced by putting a `python` -> system python3 first on the job's PATH."""
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system is None or subprocess.run([system, "-c", "import pyarrow, torch"], capture_output=True).returncode == 0:
        pytest.skip("no system python3 lacking maskray's dependencies on this machine")
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").symlink_to(system)
    result = cluster.maskray("submit", "--env", f"PATH={shim}:/usr/bin:/bin", "--wait", "--", "train", "--config",
                             "configs/shapes-cpu.yaml")
    assert result.returncode == 1, result.stdout + result.stderr
    error = [line for line in result.stderr.splitlines() if "maskray submit: error:" in line]
    assert len(error) == 1 and "FAILED: No module named '" in error[0], result.stderr
    assert "on the cluster: its `python` lacks maskray's environment" in error[0], error[0]
    status = cluster.maskray("status", _submission_id(result.stdout))
    assert "lacks maskray's environment" in status.stdout, status.stdout


def _tiny_dataset(root: Path) -> Path:
    from pipeline.data.convert import convert_coco
    from pipeline.data.synth import synthesize

    synthesize(str(root / "coco"), images=4, seed=0, size=64, num_categories=2, max_objects=2, workers=1)
    convert_coco(str(root / "coco" / "annotations.json"), str(root / "coco" / "images"), str(root / "shards"), workers=1)
    return root / "shards"


def _tiny_config(root: Path, shards: Path, *, name: str, iters: int) -> Path:
    config = {
        "name": name, "storage_path": str(root / "runs"), "num_workers": 1, "cpus_per_worker": 1,
        "images_per_worker": 1, "log_every": 1,
        "data": {"train": str(shards), "val": "", "shuffle_buffer": 0, "decode_cpus": 0.25},
        "model": {"backbone": "resnet18", "min_size": 64, "max_size": 64, "trainable_layers": 3},
        "schedule": {"max_iters": iters, "warmup_iters": 0},
        "checkpoint": {"every": 0, "keep": 1},
        "eval": {"every": 0, "at_end": False},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    for module in ("jobs.train", "pipeline.train.engine", "pipeline.data.synth", "pipeline.data.convert"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} has not landed: the train job cannot run yet")
    from model import build

    build.load()  # the op is compiled once here (cached), not by each Ray worker
    root = tmp_path_factory.mktemp("submit-train")
    return root, _tiny_dataset(root)


@pytest.mark.slow
def test_train_job_succeeds_and_checkpoints_to_storage(cluster, shapes):
    root, shards = shapes
    config = _tiny_config(root, shards, name="submit-tiny", iters=2)
    started = time.monotonic()
    result = cluster.maskray("submit", "--wait", "--", "train", "--config", str(config), timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "SUCCEEDED" in result.stderr and "last checkpoint:" in result.stdout
    run = root / "runs" / "submit-tiny"
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["checkpoint"] and Path(final["model"]).is_file(), final
    assert list(run.rglob("model.pt")), "a checkpoint in the storage path"
    submission = _submission_id(result.stdout)
    status = cluster.maskray("status", submission)
    assert "\tSUCCEEDED\t" in status.stdout
    logs = cluster.maskray("logs", submission)
    assert logs.returncode == 0 and "last checkpoint:" in logs.stdout
    print(f"train job took {time.monotonic() - started:.1f} s")


@pytest.mark.slow
def test_stop_ends_a_running_job(cluster, shapes):
    root, shards = shapes
    config = _tiny_config(root, shards, name="submit-long", iters=100000)
    result = cluster.maskray("submit", "--", "train", "--config", str(config))
    assert result.returncode == 0, result.stderr
    submission = _submission_id(result.stdout)
    deadline = time.monotonic() + 60
    while "\tRUNNING\t" not in cluster.maskray("status", submission).stdout:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(1)
    stop = cluster.maskray("stop", "--wait", submission)
    assert stop.returncode == 0 and "STOPPED" in stop.stdout, stop.stdout + stop.stderr
    assert "\tSTOPPED\t" in cluster.maskray("status", submission).stdout


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    """A head (no worker) with token authentication on, its token given by RAY_AUTH_TOKEN and a
    HOME of its own, so no token of this machine's ~/.ray is read or written."""
    if shutil.which("ray", path=str(BIN)) is None or shutil.which("maskray", path=str(BIN)) is None:
        pytest.skip("the ray / maskray console scripts are not in this environment")
    import secrets

    token = secrets.token_hex(16)
    env = {**_cluster_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "HOME": str(tmp_path_factory.mktemp("head-home"))}
    temp_dir, address = _started(env, workers=0)
    try:
        yield temp_dir, address, token
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _client(token_cluster, home: Path, **extra: str) -> LocalCluster:
    """maskray run as a user on another machine would: a HOME of its own, no RAY_* set but ``extra``."""
    temp_dir, address, _ = token_cluster
    home.mkdir(parents=True, exist_ok=True)
    return LocalCluster(temp_dir, address, {**_cluster_env(), "HOME": str(home), **extra})


def test_token_auth_cluster_without_the_token_names_the_fix(token_cluster, tmp_path):
    _, address, _ = token_cluster
    for extra in ({}, {"RAY_AUTH_MODE": "disabled"}):
        result = _client(token_cluster, tmp_path / "home", **extra).maskray("status")
        assert result.returncode == 1, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"maskray status: error: the Ray cluster at {address} requires token authentication")
        assert "~/.ray/auth_token" in lines[0] and "RAY_AUTH_MODE=token" in lines[0], lines[0]
    wrong = _client(token_cluster, tmp_path / "home", RAY_AUTH_TOKEN="0" * 32).maskray("status")
    assert wrong.returncode == 1 and "refused the auth token sent from here" in wrong.stderr, wrong.stderr


@pytest.mark.slow
def test_token_auth_cluster_with_the_token_in_home_runs_a_job(token_cluster, tmp_path):
    """The token in ~/.ray/auth_token is enough: RAY_AUTH_MODE need not be set."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(token_cluster[2])
    client = _client(token_cluster, home)
    assert client.maskray("status").returncode == 0
    result = client.maskray("submit", "--wait", "--", "pack", "--help", timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "SUCCEEDED" in result.stderr and "--images" in result.stdout
    assert "\tSUCCEEDED\t" in client.maskray("status", _submission_id(result.stdout)).stdout
