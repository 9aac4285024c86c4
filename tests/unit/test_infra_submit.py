"""``maskray submit/status/logs/stop`` without a cluster: arguments, runtime env, entry point,
staging, token auth and the exit codes / messages, against a fake JobSubmissionClient
(``jobs.submit`` is the thin job, ``pipeline.cluster`` the library)."""

from __future__ import annotations

import argparse

import pytest

from jobs import submit
from model.errors import MaskrayError
from pipeline import cluster


def parse(adder, argv):
    parser = argparse.ArgumentParser()
    adder(parser)
    return parser.parse_args(argv)


class FakeClient:
    """Records calls; the job goes through ``statuses`` one poll at a time."""

    def __init__(self, statuses=("RUNNING", "SUCCEEDED"), logs="line 1\nline 2\n", message="", stream=True):
        self.statuses = list(statuses)
        self.logs = logs
        self.message = message
        self.stream = stream
        self.submitted = {}
        self.stopped = []

    def get_address(self):
        return "http://head:8265"

    def submit_job(self, **kwargs):
        self.submitted = kwargs
        return kwargs.get("submission_id") or "raysubmit_123"

    def get_job_status(self, submission_id):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def get_job_logs(self, submission_id):
        return self.logs

    async def tail_job_logs(self, submission_id):
        if not self.stream:
            raise ConnectionError("websocket refused")
        yield self.logs

    def get_job_info(self, submission_id):
        if submission_id == "missing":
            raise RuntimeError("Request failed with status code 404: Job missing does not exist.")
        return argparse.Namespace(status=self.statuses[-1], message=self.message, entrypoint="python -m jobs.train")

    def stop_job(self, submission_id):
        self.stopped.append(submission_id)
        return True

    def list_jobs(self):
        return []


@pytest.fixture
def fake(monkeypatch):
    holder = {}

    def install(**kwargs):
        client = FakeClient(**kwargs)
        holder["address"] = None
        monkeypatch.setattr(cluster, "connect", lambda address: holder.__setitem__("address", address) or client)
        monkeypatch.setattr(cluster.time, "sleep", lambda s: None)
        return client

    install.holder = holder
    return install


def test_double_dash_separates_the_job_command_and_its_arguments():
    args = parse(submit.add_submit_arguments, ["--address", "http://h:1", "--wait", "--", "train", "--config", "c.yaml",
                                               "--set", "name=x y"])
    assert (args.address, args.wait, args.job) == ("http://h:1", True, "train")
    request = submit.job_request(args)
    assert request.entrypoint == "python -m jobs.train --config c.yaml --set 'name=x y'"
    assert (request.command, request.module) == ("train", "jobs.train")
    args = parse(submit.add_submit_arguments, ["infer", "--verbose"])
    assert submit.job_request(args).entrypoint == "python -m jobs.infer --verbose"
    # ingestion runs on the cluster too (RAY_ADDRESS is set in a job's driver: --runner auto -> ray)
    args = parse(submit.add_submit_arguments, ["--", "pack", "--images", "s3://b/raw", "--out", "s3://b/ds"])
    assert submit.job_request(args).entrypoint == "python -m jobs.pack --images s3://b/raw --out s3://b/ds"
    with pytest.raises(SystemExit):
        parse(submit.add_submit_arguments, ["--", "synth", "x"])


def test_every_cluster_command_runs_its_cli_module():
    from jobs import cli

    for command in submit.CLUSTER_COMMANDS:
        args = parse(submit.add_submit_arguments, [command, "--help-me"])
        assert submit.job_request(args).module == cli.COMMANDS[command][0]


def test_a_job_request_checks_itself():
    with pytest.raises(MaskrayError, match="not a module name"):
        cluster.JobRequest(command="train", module="jobs.train; rm -rf /")
    with pytest.raises(MaskrayError, match="must be >= 0"):
        cluster.JobRequest(command="train", module="jobs.train", entrypoint_num_gpus=-1)
    with pytest.raises(MaskrayError, match="looks like a credential"):
        cluster.JobRequest(command="train", module="jobs.train", env=("HF_TOKEN=x",))
    with pytest.raises(MaskrayError, match="KEY=VALUE"):
        cluster.JobRequest(command="train", module="jobs.train", env=("NOVALUE",))


def test_the_maskray_cli_passes_everything_after_the_job_to_it():
    from jobs import cli

    args = cli.build_parser().parse_args(["submit", "--address", "http://h:1", "--wait", "--", "distill", "--config",
                                          "c.yaml", "--set", "rounds=2", "--verbose"])
    assert (args._module, args._runner, args.job) == ("jobs.submit", "run_submit", "distill")
    assert args.job_args == ["--config", "c.yaml", "--set", "rounds=2", "--verbose"] and args.wait
    for command in ("status", "logs", "stop"):
        parsed = cli.build_parser().parse_args([command, "raysubmit_1"] if command != "status" else [command])
        assert parsed._runner == f"run_{command}"


def test_local_files_outside_the_project_are_flagged(tmp_path):
    outside = tmp_path / "c.yaml"
    outside.write_text("x: 1\n")
    args = ["--config", str(outside), "--set", f"data.train={tmp_path}", "--set", "data.val=s3://b/v",
            "--config", "configs/shapes-cpu.yaml", "--out=relative/missing"]
    assert cluster.paths_outside_project(args) == [str(outside), str(tmp_path)]


def test_address_from_flag_then_env_then_local(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert cluster.resolve_address(None) == "http://10.0.0.5:8265"
    assert cluster.resolve_address("https://ray.example.com/") == "https://ray.example.com"


def test_runtime_env_is_the_staged_folder_plus_the_file(tmp_path):
    env = cluster.load_runtime_env(cluster.RUNTIME_ENV_FILE, extra_env=["MASKRAY_X=1"], working_dir=tmp_path)
    assert env["working_dir"] == str(tmp_path)
    for pattern in ("*.parquet", "*.pt", "**/__pycache__/"):
        assert pattern in env["excludes"]
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1" and env["env_vars"]["MASKRAY_X"] == "1"
    own = tmp_path / "env.yaml"
    own.write_text("working_dir: s3://bucket/pkg.zip\nexcludes: ['*.ckpt']\npip: [six]\n")
    env = cluster.load_runtime_env(own)
    assert env["working_dir"] == "s3://bucket/pkg.zip" and env["pip"] == ["six"] and "*.ckpt" in env["excludes"]
    own.write_text("- not a mapping\n")
    with pytest.raises(MaskrayError, match="must be a YAML mapping"):
        cluster.load_runtime_env(own)
    with pytest.raises(MaskrayError, match="not found"):
        cluster.load_runtime_env(tmp_path / "nope.yaml")
    with pytest.raises(MaskrayError, match="KEY=VALUE"):
        cluster.load_runtime_env(cluster.RUNTIME_ENV_FILE, extra_env=["NOVALUE"])


def test_submit_prints_id_and_dashboard_url(fake, capsys):
    client = fake()
    args = parse(submit.add_submit_arguments, ["--address", "http://head:8265", "--", "train", "--config", "c.yaml"])
    assert submit.run_submit(args) == 0
    out = capsys.readouterr().out
    assert "submission id: raysubmit_123" in out and "http://head:8265/#/jobs/raysubmit_123" in out
    assert client.submitted["entrypoint"] == "python -m jobs.train --config c.yaml"
    staged = client.submitted["runtime_env"]["working_dir"]
    assert staged != str(cluster.PROJECT_ROOT) and "maskray-submit-" in staged
    assert fake.holder["address"] == "http://head:8265"


@pytest.mark.parametrize("stream", [True, False], ids=["websocket", "polling"])
def test_wait_follows_logs_and_succeeds(fake, capsys, stream):
    fake(statuses=["RUNNING", "RUNNING", "SUCCEEDED"], stream=stream)
    args = parse(submit.add_submit_arguments, ["--wait", "--", "train", "--config", "c.yaml"])
    assert submit.run_submit(args) == 0
    captured = capsys.readouterr()
    assert captured.out.count("line 1") == 1 and "line 2" in captured.out
    assert "SUCCEEDED" in captured.err


@pytest.mark.parametrize("status", ["FAILED", "STOPPED"])
def test_wait_exits_non_zero_and_shows_the_error(fake, capsys, status):
    fake(statuses=["RUNNING", status], logs="Traceback...\nmaskray train: error: c.yaml: no such file\n",
         message="Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"
                 "Traceback...\nmaskray train: error: c.yaml: no such file\n")
    args = parse(submit.add_submit_arguments, ["--wait", "--", "train", "--config", "c.yaml"])
    assert submit.run_submit(args) == 1
    err = capsys.readouterr().err
    assert f"job raysubmit_123 {status}" in err
    assert "exit code 1; last log line: maskray train: error: c.yaml: no such file" in err


def test_status_logs_stop(fake, capsys):
    client = fake(statuses=["FAILED"], message="boom\nmore")
    assert submit.run_status(parse(submit.add_status_arguments, ["raysubmit_123"])) == 0
    assert capsys.readouterr().out.splitlines() == ["raysubmit_123\tFAILED\tpython -m jobs.train",
                                                    "boom; last log line: more"]
    assert submit.run_logs(parse(submit.add_logs_arguments, ["raysubmit_123"])) == 0
    assert capsys.readouterr().out == "line 1\nline 2\n"
    client.statuses = ["RUNNING", "STOPPED"]
    assert submit.run_stop(parse(submit.add_stop_arguments, ["--wait", "raysubmit_123"])) == 0
    assert client.stopped == ["raysubmit_123"] and "STOPPED" in capsys.readouterr().out
    with pytest.raises(MaskrayError, match="no job 'missing'"):
        submit.run_status(parse(submit.add_status_arguments, ["missing"]))


def test_unreachable_dashboard_is_one_clear_line(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MaskrayError, match=rf"cannot reach the Ray dashboard at http://127.0.0.1:{port}"):
        cluster.connect(f"127.0.0.1:{port}")


def test_working_dir_is_an_allowlist_and_never_ships_secrets(tmp_path):
    project = tmp_path / "project"
    for rel, text in {
        "pyproject.toml": "[project]", "uv.lock": "lock", "pipeline/a.py": "x = 1",
        "pipeline/sub/b.py": "y = 2", "model/cuda/op.cu": "//", "jobs/train.py": "", "configs/c.yaml": "a: 1",
        "infra/runtime_env.yaml": "{}", "infra/cluster.yaml": "not needed by a job",
        ".env": "AWS_SECRET_ACCESS_KEY=leak", "key.pem": "-----BEGIN", "credentials": "[default]",
        "pipeline/.env": "leak", "pipeline/server.pem": "leak", "configs/aws_credentials.ini": "leak",
        "pipeline/__pycache__/a.cpython-311.pyc": "", "model/_op.so": "", "data/big.parquet": "",
        "notes/todo.md": "", ".aws/credentials": "leak", "jobs/.ssh/id_rsa": "leak",
    }.items():
        path = project / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (project / "pipeline" / "outside.py").symlink_to(tmp_path / "elsewhere.py")
    (tmp_path / "elsewhere.py").write_text("secret = 1")
    dest = tmp_path / "staged"
    shipped = cluster.stage_working_dir(project, dest)
    assert shipped == ["configs/c.yaml", "infra/runtime_env.yaml", "jobs/train.py", "model/cuda/op.cu",
                       "pipeline/a.py", "pipeline/sub/b.py", "pyproject.toml", "uv.lock"]
    on_disk = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert on_disk == shipped
    # the real project stages its code and nothing that looks like a secret
    real = cluster.stage_working_dir(cluster.PROJECT_ROOT, tmp_path / "real")
    assert "pipeline/data/ingest.py" in real and "jobs/train.py" in real and "pyproject.toml" in real
    assert not any(p.endswith((".pem", ".env", ".so")) or "credentials" in p for p in real)


def test_submitted_runtime_env_holds_no_key_value(fake, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASUBMITKEY0000001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "submit-secret-value-0001")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "submit-session-token-0001")
    client = fake()
    args = parse(submit.add_submit_arguments, ["--env", "MASKRAY_X=1", "--", "train", "--config", "c.yaml"])
    assert submit.run_submit(args) == 0
    import json

    blob = json.dumps(client.submitted, default=str)
    for value in ("AKIASUBMITKEY0000001", "submit-secret-value-0001", "submit-session-token-0001"):
        assert value not in blob
    with pytest.raises(MaskrayError, match="looks like a credential"):
        cluster.load_runtime_env(cluster.RUNTIME_ENV_FILE, extra_env=["AWS_SECRET_ACCESS_KEY=x"])


# --------------------------------------------------------------------------- token auth

def _refusing_client(status: int, body: str):
    """A JobSubmissionClient stand-in that fails as Ray 2.60's does against a token-auth cluster:
    its constructor's version check raises Ray's own AuthenticationError."""
    from ray._private.authentication.http_token_authentication import format_authentication_http_error
    from ray.exceptions import AuthenticationError

    seen = {}

    def client(address, headers=None, **kwargs):
        seen["headers"] = headers
        raise AuthenticationError(format_authentication_http_error(status, body))

    client.seen = seen
    return client


@pytest.fixture
def token_env(monkeypatch, tmp_path):
    """No token anywhere Ray's loader looks (a fresh HOME), its cache reset around the test."""
    from ray._raylet import AuthenticationTokenLoader

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    AuthenticationTokenLoader.instance().reset_cache()
    yield monkeypatch
    monkeypatch.undo()
    AuthenticationTokenLoader.instance().reset_cache()


def test_missing_token_names_the_fix_in_one_line(token_env):
    import ray.job_submission

    fake = _refusing_client(401, "Unauthorized: Missing authentication token")
    token_env.setattr(ray.job_submission, "JobSubmissionClient", fake)
    with pytest.raises(MaskrayError) as caught:
        cluster.connect("http://127.0.0.1:8265")
    message = str(caught.value)
    assert "\n" not in message and fake.seen["headers"] is None
    assert message.startswith("the Ray cluster at http://127.0.0.1:8265 requires token authentication (no token found here)")
    assert "~/.ray/auth_token" in message and "RAY_AUTH_MODE=token" in message and "ray get-auth-token" in message
    with pytest.raises(MaskrayError, match=r"\(RAY_AUTH_MODE is not token here, so no token goes to a remote cluster\)"):
        cluster.connect("http://head:8265")
    token_env.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(MaskrayError, match=r"\(RAY_AUTH_MODE=disabled here\).*RAY_AUTH_MODE=token"):
        cluster.connect("http://127.0.0.1:8265")


def test_the_token_goes_to_a_local_cluster_or_with_token_mode(token_env, tmp_path):
    import ray.job_submission
    from ray._raylet import AuthenticationTokenLoader

    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("a" * 32)
    bearer_a = {"authorization": "Bearer " + "a" * 32}
    assert cluster.auth_headers("http://127.0.0.1:8265") == bearer_a
    assert cluster.auth_headers("http://localhost:8265") == bearer_a
    # Ray's rule: no token to an explicit remote address unless RAY_AUTH_MODE=token
    assert cluster.auth_headers("http://10.0.0.5:8265") == {}
    token_env.setenv("RAY_AUTH_MODE", "token")
    assert cluster.auth_headers("http://10.0.0.5:8265") == bearer_a
    fake = _refusing_client(403, "Forbidden: Invalid authentication token")
    token_env.setattr(ray.job_submission, "JobSubmissionClient", fake)
    with pytest.raises(MaskrayError, match=r"refused the auth token sent from here .*~/.ray/auth_token") as caught:
        cluster.connect("http://10.0.0.5:8265")
    assert "\n" not in str(caught.value) and fake.seen["headers"] == bearer_a
    token_env.setenv("RAY_AUTH_MODE", "disabled")
    assert cluster.auth_headers("http://127.0.0.1:8265") == {}
    # RAY_AUTH_TOKEN wins over the file (Ray's loader, not ours)
    token_env.delenv("RAY_AUTH_MODE")
    token_env.setenv("RAY_AUTH_TOKEN", "b" * 32)
    AuthenticationTokenLoader.instance().reset_cache()
    assert cluster.auth_headers("http://127.0.0.1:8265") == {"authorization": "Bearer " + "b" * 32}


def test_other_client_errors_are_not_called_auth_errors():
    assert cluster.auth_error_message("http://h", RuntimeError("Request failed with status code 500: boom"),
                                      sent_token=False) is None
    assert "requires token authentication" in cluster.auth_error_message(
        "http://h", RuntimeError("Request failed with status code 401: Unauthorized."), sent_token=False)


def test_a_module_missing_on_the_cluster_says_the_cluster_lacks_our_environment(fake, capsys):
    ray_message = ("Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"
                   "  File \"/work/pipeline/storage.py\", line 12, in <module>\n    import pyarrow.fs\n"
                   "ModuleNotFoundError: No module named 'pyarrow'\n")
    fake(statuses=["RUNNING", "FAILED"], message=ray_message)
    assert submit.run_submit(parse(submit.add_submit_arguments, ["--wait", "--", "train", "--config", "c.yaml"])) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("maskray submit: error: job raysubmit_123 FAILED: No module named 'pyarrow' on the cluster")
    assert "lacks maskray's environment" in err and "ray start" in err
    assert submit.run_status(parse(submit.add_status_arguments, ["raysubmit_123"])) == 0
    assert "lacks maskray's environment" in capsys.readouterr().out
    # our own packages missing is the working_dir, not the environment: Ray's line as it is
    line = cluster.summarize_failure("Job entrypoint command failed with exit code 1, last available logs:\n"
                                     "/usr/bin/python: No module named jobs.train\n")
    assert line == "Job entrypoint command failed with exit code 1; last log line: /usr/bin/python: No module named jobs.train"
