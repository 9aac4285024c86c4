"""No credential is baked into infra/ (image, manifests, cluster config, runtime env, docs), and
``maskray submit`` refuses to put one into a job's runtime env (stored and shown by the dashboard)."""

from __future__ import annotations

import re

import pytest
import yaml

from test_infra_schema import ROOT

INFRA = ROOT / "infra"

# Key-like strings: cloud access key ids, private keys, provider tokens, and NAME=value / NAME: value
# assignments of secret-named variables to a literal.
KEY_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}\b"),
    "private key block": re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    "Slack/OpenAI-style token": re.compile(r"\b(?:xox[abpr]-[A-Za-z0-9-]{10,}|sk-[A-Za-z0-9]{20,})\b"),
    "secret assignment": re.compile(
        r"(?i)\b[\w.-]*(?:secret|password|passwd|token|access_key|api_key)[\w.-]*\b[\"']?\s*[:=]\s*[\"']?"
        r"(?!\$|\{|<|\.\.\.|None|null|true|false|\s|$)[A-Za-z0-9/+=_-]{8,}"),
    "base64 40-char secret": re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),
}


def find_keys(text: str) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for name, pattern in KEY_PATTERNS.items():
            for match in pattern.finditer(line):
                token = match.group(0)
                if name == "base64 40-char secret" and not (re.search(r"[A-Z]", token) and re.search(r"[a-z]", token)
                                                            and re.search(r"[0-9]", token)):
                    continue  # a path or a word, not a random key
                found.append(f"line {number}: {name}: {token[:12]}...")
    return found


def infra_files():
    return sorted(p for p in INFRA.rglob("*") if p.is_file())


def test_the_scanner_finds_planted_keys():
    key_id = "AKIA" + "Q3EXAMPLE7KEY2ID"
    secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKE9"
    planted = "\n".join([
        f"AWS_ACCESS_KEY_ID={key_id}",
        f"aws_secret_access_key: {secret}",
        "-----BEGIN RSA " + "PRIVATE KEY-----",
        "token: " + "ghp_" + "a1B2c3D4" * 5,
        f'env: {{name: X, value: "{secret}"}}',
    ])
    found = "\n".join(find_keys(planted))
    for line in range(1, 6):
        assert f"line {line}:" in found, found
    harmless = "\n".join([
        "secretRef:", "  name: maskray-aws", "key: AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY=...",
        "--from-literal=AWS_SECRET_ACCESS_KEY=...", "image: maskray:0.1.0", "/opt/maskray/configs/coco-r50-fpn-1x.yaml",
        "sha: 309c2e2193a2dcd15659e23b763c785056e05299",
    ])
    assert find_keys(harmless) == []


@pytest.mark.parametrize("path", infra_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_no_key_like_string_in_infra(path):
    assert find_keys(path.read_text()) == [], f"{path}: looks like a credential"


def test_runtime_env_carries_no_secret_names():
    env = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    for name in (env.get("env_vars") or {}):
        assert not re.search(r"SECRET|KEY_ID|ACCESS_KEY|TOKEN|PASSWORD", name, re.I), name


def test_submit_refuses_secret_env_vars(tmp_path):
    from pipeline import cluster as submit
    from model.errors import MaskrayError

    env_file = tmp_path / "env.yaml"
    env_file.write_text("env_vars:\n  AWS_SECRET_ACCESS_KEY: abc\n")
    with pytest.raises(MaskrayError, match="AWS_SECRET_ACCESS_KEY looks like a credential"):
        submit.load_runtime_env(env_file)
    env_file.write_text("env_vars: {}\n")
    for item in ("AWS_ACCESS_KEY_ID=x", "HF_TOKEN=x", "DB_PASSWORD=x"):
        with pytest.raises(MaskrayError, match="looks like a credential"):
            submit.load_runtime_env(env_file, extra_env=[item])
    assert submit.load_runtime_env(env_file, extra_env=["AWS_DEFAULT_REGION=us-west-2"])["env_vars"] == {
        "AWS_DEFAULT_REGION": "us-west-2"}
