"""The KubeRay manifests, the cluster-launcher YAML and the docs in infra/ describe things that exist.

- every YAML parses; RayJob documents validate against the vendored ray.io/v1 schema subset
  (tests/unit/test_infra_schema.py), RayCluster specs against its RayClusterSpec;
- every image is the one infra/Dockerfile builds, with the locked Ray version;
- every ``python -m jobs.<x> ...`` entry point is a real command whose parser accepts the
  arguments (and ``--help`` runs), config files exist in the repo and load (train);
- every ``maskray <cmd>`` / ``python -m <module>`` / ``configs/*.yaml`` named in infra/ exists;
- infra/cluster.yaml passes Ray's own cluster-config schema and installs from the lock.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from jobs import cli
from test_infra_schema import ROOT, load_rayjob_schema, raycluster_spec_schema, validate

INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
RAYJOBS = [p for p in MANIFESTS if p.name.startswith("rayjob-")]
IMAGE_WORKDIR = "/opt/maskray"  # WORKDIR of infra/Dockerfile (checked below): the project root in the image


def _version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _locked(name: str) -> str:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return next(p["version"] for p in lock["package"] if p["name"] == name)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _pod_templates(doc: dict) -> list[dict]:
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec", spec) if doc["kind"] == "RayJob" else spec
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in spec:
        templates.append(spec["submitterPodTemplate"])
    return templates


def _module_parser(module_name: str) -> argparse.ArgumentParser:
    """The parser ``python -m <module>`` builds (same as jobs.cli.module_main)."""
    command = next(c for c, (m, _) in cli.COMMANDS.items() if m == module_name)
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"python -m {module_name}", exit_on_error=False)
    parser.add_argument("--verbose", action="store_true")
    (getattr(module, f"add_{command}_arguments", None) or module.add_arguments)(parser)
    return parser


def _repo_path(path: str) -> Path:
    """A path as a job sees it (relative to the project root, or under the image's WORKDIR)."""
    if path.startswith(IMAGE_WORKDIR + "/"):
        path = path[len(IMAGE_WORKDIR) + 1:]
    return ROOT / path


def _require_module(module_name: str) -> None:
    if importlib.util.find_spec(module_name) is None:
        pytest.skip(f"{module_name} has not landed yet (its entry point cannot be checked)")


def test_there_is_a_raycluster_and_a_rayjob_per_job():
    assert {p.name for p in MANIFESTS} >= {"raycluster.yaml", "rayjob-train.yaml", "rayjob-infer.yaml",
                                           "rayjob-distill.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_ray_io_v1_schema(path):
    docs = _docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1"
        assert doc["kind"] in ("RayJob", "RayCluster")
        assert doc["metadata"]["name"]
        if doc["kind"] == "RayJob":
            errors = validate(doc, load_rayjob_schema())
        else:
            assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
            errors = validate(doc["spec"], raycluster_spec_schema(), "spec")
        assert errors == [], f"{path.name}:\n" + "\n".join(errors)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_runs_the_image_infra_dockerfile_builds(path):
    dockerfile = (INFRA / "Dockerfile").read_text()
    image = f"maskray:{_version()}"
    assert f"-t {image} " in dockerfile, "infra/Dockerfile documents the tag the manifests use"
    assert f"WORKDIR {IMAGE_WORKDIR}" in dockerfile
    for doc in _docs(path):
        cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert cluster["rayVersion"] == _locked("ray"), "rayVersion must be the locked Ray"
        images = [c["image"] for t in _pod_templates(doc) for c in t["spec"]["containers"]]
        images += [cluster["autoscalerOptions"]["image"]] if "image" in cluster.get("autoscalerOptions", {}) else []
        assert images and all(i == image or i.endswith("/" + image) for i in images), images


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_pods_get_credentials_only_from_cluster_secrets(path):
    for doc in _docs(path):
        for template in _pod_templates(doc):
            for container in template["spec"]["containers"]:
                for env in container.get("env", []):
                    if re.search(r"SECRET|KEY_ID|TOKEN|PASSWORD", env["name"], re.I):
                        assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), env
                for source in container.get("envFrom", []):
                    assert set(source) <= {"secretRef", "configMapRef", "prefix"}


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_entrypoint_is_a_real_command(path):
    for doc in _docs(path):
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[:2] == ["python", "-m"], argv
        module_name = argv[2]
        assert module_name in {m for m, _ in cli.COMMANDS.values()}, f"{module_name} is not a maskray job module"
        assert module_name == cli.COMMANDS[path.stem.split("-", 1)[1]][0], f"{path.name} runs {module_name}"
        _require_module(module_name)
        args = _module_parser(module_name).parse_args(argv[3:])
        config = getattr(args, "config", None)
        if config:
            assert _repo_path(config).is_file(), f"{path.name}: config {config} is not in the repo"
        if module_name == "jobs.train":
            from pipeline.train.config import load_config

            load_config(str(_repo_path(config)), args.overrides)  # raises on an unknown key or bad value
        if module_name == "jobs.distill":
            from pipeline.distill.config import load_distill_config

            load_distill_config(str(_repo_path(config)), args.overrides)
        runtime_env = yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}")
        assert "working_dir" not in runtime_env, "RayJobs run the code baked in the image"


def _command_lines(path: Path) -> list[str]:
    """Lines of ``path`` that hold commands: content, indented examples in comments, README code."""
    lines = []
    fenced = False
    for line in path.read_text().splitlines():
        if path.suffix == ".md":
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            if fenced or line.startswith("    ") or "`" in line:
                lines += [line] if fenced or line.startswith("    ") else re.findall(r"`([^`]+)`", line)
            continue
        comment = re.match(r"\s*#(.*)$", line)
        if comment is None:
            lines.append(line)
        elif re.match(r"\s{2,}\S", comment.group(1)):
            lines.append(comment.group(1))
    return lines


def _named_in_infra() -> tuple[set[str], set[str], set[str]]:
    """``maskray <cmd>``, ``python -m <module>`` and ``configs/<file>`` in the commands of infra/."""
    commands, modules, configs = set(), set(), set()
    for path in INFRA.rglob("*"):
        if not path.is_file() or path.parent.name == "schema":
            continue
        for line in _command_lines(path):
            commands |= set(re.findall(r"\bmaskray ([a-z][a-z-]*)\b", line))
            modules |= set(re.findall(r"python3? -m ([a-z_][\w.]*)", line))
            configs |= set(re.findall(r"\bconfigs/[\w.-]+\.ya?ml\b", line))
    return commands, modules - {"pip"}, configs


def test_every_maskray_command_named_in_infra_exists():
    commands, _, _ = _named_in_infra()
    assert "submit" in commands
    unknown = commands - set(cli.COMMANDS)
    assert not unknown, f"infra/ names maskray commands that do not exist: {unknown}"


@pytest.mark.parametrize("module_name", sorted(_named_in_infra()[1]))
def test_every_python_module_named_in_infra_answers_help(module_name):
    _require_module(module_name)
    result = subprocess.run([sys.executable, "-m", module_name, "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()


@pytest.mark.parametrize("config", sorted(_named_in_infra()[2]))
def test_every_config_named_in_infra_exists(config):
    assert (ROOT / config).is_file(), f"infra/ names {config}, which is not in the repo"


@pytest.mark.parametrize("help_of", sorted(_named_in_infra()[0] & set(cli.COMMANDS)))
def test_maskray_command_help_runs(help_of):
    """``maskray <cmd> --help`` for the commands infra/ and its README use."""
    _require_module(cli.COMMANDS[help_of][0])
    parser = argparse.ArgumentParser(prog=f"maskray {help_of}")
    module = importlib.import_module(cli.COMMANDS[help_of][0])
    (getattr(module, f"add_{help_of}_arguments", None) or module.add_arguments)(parser)
    assert help_of == "submit" or parser.format_help()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0


# --------------------------------------------------------------------------- cluster launcher

def _cluster() -> dict:
    return yaml.safe_load((INFRA / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _cluster()
    validate_config(prepare_config(copy.deepcopy(config)))
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu"]["min_wokers"] = 0
    with pytest.raises(Exception, match="min_wokers"):
        validate_config(prepare_config(broken))


def test_cluster_yaml_has_a_gpu_worker_type_and_optional_spot():
    types = _cluster()["available_node_types"]
    gpu = [t for name, t in types.items() if "gpu" in name]
    assert gpu and all(t["min_workers"] == 0 for t in gpu), "GPU workers scale from zero"
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in gpu)
    assert any("InstanceMarketOptions" not in t["node_config"] for t in gpu), "an on-demand GPU type too"
    for t in types.values():
        assert "IamInstanceProfile" in t["node_config"], "nodes reach S3 through an IAM role"


def test_cluster_yaml_installs_the_project_from_the_lock_and_builds_the_op():
    config = _cluster()
    assert config["file_mounts"] == {"/home/ubuntu/maskray": ".",  # the project root (ray up from there)
                                     "/home/ubuntu/.ray/auth_token": "~/.ray/auth_token"}  # Ray's token
    assert (ROOT / "pyproject.toml").is_file() and (ROOT / "uv.lock").is_file()
    setup = "\n".join(config["setup_commands"])
    assert re.search(r"uv sync --frozen\b", setup)
    assert "uv lock" not in setup
    for line in config["setup_commands"]:
        if "pip install" in line:  # only to bootstrap uv itself (as the Makefile does)
            assert re.search(r"pip install .*--target \S+ uv==[\d.]+$", line), line
    uv_pin = re.search(r"uv==([\d.]+)", setup).group(1)
    assert f"ghcr.io/astral-sh/uv:{uv_pin} " in (INFRA / "Dockerfile").read_text(), "one uv version everywhere"
    assert re.search(r"python -m model\.build$", setup, re.M), "built for the node's own GPU (or CPU on the head)"
    assert setup.index("uv sync") < setup.index("model.build")
    boto3 = re.search(r"boto3==([\d.]+)", "\n".join(config["head_setup_commands"])).group(1)
    assert boto3 == _locked("botocore"), "boto3 pinned to the locked botocore so the lock's packages stay"
    for key in ("rsync_exclude",):
        assert {".venv", ".git", "data"} <= set(config[key])
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "maskray/.venv/bin" in command, "Ray (and job entry points) run from the locked env"


def _ray_cluster_specs():
    for path in MANIFESTS:
        for doc in _docs(path):
            yield path.name, doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def test_every_ray_cluster_requires_ray_token_authentication():
    names = []
    for name, spec in _ray_cluster_specs():
        assert spec.get("authOptions") == {"mode": "token"}, f"{name}: dashboard/job API without auth"
        ports = [p["containerPort"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])]
        assert 10001 not in ports, f"{name}: Ray Client port opened but never used"
        names.append(name)
    assert len(names) == len(MANIFESTS)
    policy = yaml.safe_load((KUBERAY / "network" / "networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    selector = policy["spec"]["podSelector"]["matchExpressions"][0]
    assert selector["key"] == "ray.io/cluster" and selector["operator"] == "Exists"
    sources = policy["spec"]["ingress"][0]["from"]
    assert all("podSelector" in s and "ipBlock" not in s and "namespaceSelector" not in s for s in sources)


def test_cluster_launcher_dashboard_on_loopback_with_token_auth():
    config = _cluster()
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command, command
            assert "0.0.0.0" not in command, command
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head


def test_every_install_compiles_bytecode():
    """With PYTHONDONTWRITEBYTECODE=1 (set on our dev box, common in containers) no process writes
    .pyc, so an install without compiled bytecode makes every Ray worker compile Ray and torchvision
    from source on import (`import ray.train` 4.1 s instead of 1.5 s: benchmarks/RESULTS.md)."""
    make_env = re.search(r"^env:.*?(?=^\S)", (ROOT / "Makefile").read_text(), re.S | re.M).group(0)
    assert re.search(r"\$\(UV\) sync --frozen .*--compile-bytecode", make_env), make_env
    assert re.search(r"-m compileall .*\bmodel pipeline jobs\b", make_env), "our own packages too"
    setup = "\n".join(_cluster()["setup_commands"])
    assert re.search(r"uv sync --frozen --compile-bytecode", setup), setup
    assert re.search(r"^\s*UV_COMPILE_BYTECODE=1", (INFRA / "Dockerfile").read_text(), re.M)
