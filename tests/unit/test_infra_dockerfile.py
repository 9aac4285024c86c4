"""infra/Dockerfile builds the locked environment: checked by parsing it against uv.lock and
pyproject.toml (no Docker engine runs here)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib

import pytest

from test_infra_schema import ROOT

DOCKERFILE = ROOT / "infra" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, ``\\`` continuations joined, ARG defaults expanded."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, rest = current.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    args = {}
    expanded = []
    for keyword, rest in out:
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value.strip('"')
        rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest)
        expanded.append((keyword, rest))
    return expanded


def env_of(steps: list[tuple[str, str]], upto: int | None = None) -> dict[str, str]:
    env = {}
    for keyword, rest in steps[:upto]:
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


@pytest.fixture(scope="module")
def steps():
    return instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def lock():
    return tomllib.loads((ROOT / "uv.lock").read_text())


def locked(lock, name):
    return next(p["version"] for p in lock["package"] if p["name"] == name)


def index_of(steps, keyword, pattern):
    return next(i for i, (k, r) in enumerate(steps) if k == keyword and re.search(pattern, r))


def test_base_image_cuda_matches_the_locked_torch(steps, lock):
    base = next(r for k, r in steps if k == "FROM")
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?devel-ubuntu[\d.]+", base)
    assert match, f"FROM {base}: want an nvidia/cuda <X.Y.Z>-devel image (nvcc builds the op)"
    torch_deps = next(p for p in lock["package"] if p["name"] == "torch")["dependencies"]
    assert any(d["name"] == "cuda-toolkit" for d in torch_deps), "the locked torch is a CUDA build"
    toolkit = locked(lock, "cuda-toolkit").split(".")[:2]
    assert list(match.groups()) == toolkit, f"base CUDA {match.groups()} != locked torch's CUDA {toolkit}"
    import torch

    if torch.version.cuda:  # the installed env is the lock's: same CUDA
        assert torch.version.cuda.split(".")[:2] == toolkit


def test_python_is_the_one_the_lock_requires(steps, lock):
    requires = lock["requires-python"]
    assert requires == "==3.11.*"
    assert env_of(steps)["UV_PYTHON"] == "3.11"


def test_environment_comes_from_the_committed_lock(steps):
    runs = [r for k, r in steps if k == "RUN"]
    syncs = [r for r in runs if re.search(r"\buv sync\b", r)]
    assert syncs and all("--frozen" in r for r in syncs), "every uv sync installs exactly uv.lock"
    assert not any(re.search(r"\buv (lock|add|pip install)\b|\bpip3? install\b", r) for r in runs)
    copy_lock = index_of(steps, "COPY", r"\buv\.lock\b")
    assert "pyproject.toml" in steps[copy_lock][1]
    assert copy_lock < index_of(steps, "RUN", r"\buv sync\b"), "the lock is in the image before syncing"
    assert "--no-install-project" in steps[index_of(steps, "RUN", r"\buv sync\b")][1], "deps layer first"
    uv = next(r for k, r in steps if k == "COPY" and "astral-sh/uv" in r)
    assert re.search(r"ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+ ", uv), "uv pinned to a release"
    env = env_of(steps)
    assert env["VIRTUAL_ENV"] + "/bin" in env["PATH"].split(":")[0], "python/ray/maskray on PATH are the env's"


def test_op_is_built_for_sm80_and_sm90_after_the_project_is_installed(steps):
    build = index_of(steps, "RUN", r"python -m model\.build\b")
    last_sync = max(i for i, (k, r) in enumerate(steps) if k == "RUN" and "uv sync" in r)
    assert last_sync < build
    assert env_of(steps, build)["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"
    builds = [shlex.split(part) for part in steps[build][1].split("&&")]
    archs = [b[b.index("--arch") + 1:] for b in builds]
    assert all("--cuda" in b for b in builds) and ["8.0", "9.0"] in archs
    assert ["8.0"] in archs and ["9.0"] in archs, "the libraries model.ops looks up on an A100 / H100 node"
    assert "MASKRAY_OPS_DIR" in env_of(steps, build), "the op cache is in the image, not in a home folder"
    result = subprocess.run([sys.executable, "-m", "model.build", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--arch" in result.stdout and "--cuda" in result.stdout


def test_copied_sources_exist_and_the_context_leaves_out_envs_data_and_vcs(steps):
    for keyword, rest in steps:
        if keyword == "COPY" and "--from=" not in rest:
            sources = [a for a in shlex.split(rest) if not a.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repo"
    ignore = (ROOT / "infra" / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", ".tools", "data", "outputs", "demo-out", "*.pt", "*.parquet"} <= set(ignore)
    workdir = [r for k, r in steps if k == "WORKDIR"][-1]
    assert env_of(steps)["VIRTUAL_ENV"] == f"{workdir}/.venv"


def test_no_credentials_are_baked_in(steps):
    for keyword, rest in steps:
        if keyword in ("ENV", "ARG"):
            assert not re.search(r"SECRET|ACCESS_KEY|TOKEN|PASSWORD|AWS_", rest, re.I), f"{keyword} {rest}"
        assert not re.search(r"\.aws\b|credentials", rest), f"{keyword} {rest}"
