"""A small validator for the OpenAPI v3 subset that Kubernetes CRDs use, and its own tests.

``validate(value, schema)`` returns a list of "path: problem" strings (empty when valid). It
checks what the vendored RayJob schema (infra/schema/rayjob-v1.yaml) states: ``type`` (with
``format`` int32/int64 ranges), ``required``, unknown properties (an object that lists
``properties`` and no ``additionalProperties`` rejects other keys, as the API server's strict
field validation does), ``additionalProperties`` schemas, ``items``, ``enum``, ``anyOf``
(int-or-string quantities), ``pattern``, ``minimum``, ``minItems``, ``maxLength``. No new
dependency; tests/unit/test_infra_manifests.py uses it on the KubeRay manifests.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "infra" / "schema" / "rayjob-v1.yaml"

_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def load_rayjob_schema() -> dict:
    return yaml.safe_load(SCHEMA_FILE.read_text())["openAPIV3Schema"]


def raycluster_spec_schema() -> dict:
    """RayCluster's ``spec`` is the same RayClusterSpec type as RayJob's ``spec.rayClusterSpec``."""
    return load_rayjob_schema()["properties"]["spec"]["properties"]["rayClusterSpec"]


def _type_ok(value, expected: str) -> bool:
    if expected == "string":
        return isinstance(value, str)
    if expected == "boolean":
        return isinstance(value, bool)
    if expected == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected == "object":
        return isinstance(value, dict)
    if expected == "array":
        return isinstance(value, list)
    raise ValueError(f"schema uses unsupported type {expected!r}")


def validate(value, schema: dict, path: str = "") -> list[str]:
    """Problems of ``value`` against ``schema`` as ``"<dotted.path>: <problem>"`` strings."""
    where = path or "<root>"
    errors: list[str] = []
    if "anyOf" in schema:
        if all(validate(value, alt, path) for alt in schema["anyOf"]):
            kinds = " or ".join(alt.get("type", "?") for alt in schema["anyOf"])
            return [f"{where}: expected {kinds}, got {type(value).__name__} {value!r}"]
    expected = schema.get("type")
    if expected is not None and not _type_ok(value, expected):
        return [f"{where}: expected {expected}, got {type(value).__name__} {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{where}: longer than {schema['maxLength']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = _INT_RANGES.get(schema.get("format"), (None, None))
        if expected == "integer" and low is not None and not low <= value <= high:
            errors.append(f"{where}: {value} is out of {schema['format']} range")
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: {value} is below the minimum {schema['minimum']}")
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: missing required field {key!r}")
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if props is not None and key in props:
                errors += validate(item, props[key], child)
            elif isinstance(extra, dict):
                errors += validate(item, extra, child)
            elif props is not None and extra is not True:
                errors.append(f"{where}: unknown field {key!r} (known: {', '.join(sorted(props))})")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(f"{where}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors


# --------------------------------------------------------------------------- tests of the validator

SCHEMA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "mode": {"type": "string", "enum": ["a", "b"]},
        "count": {"type": "integer", "format": "int32"},
        "ratio": {"type": "number"},
        "flag": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "free": {"type": "object"},
        "qty": {"anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": r"^[0-9]+(Gi|Mi)?$"},
    },
}


def test_valid_document_has_no_errors():
    doc = {"name": "x", "mode": "a", "count": 3, "ratio": 1, "flag": False, "tags": ["t"],
           "labels": {"k": "v"}, "free": {"anything": [1, {"goes": True}]}, "qty": "16Gi"}
    assert validate(doc, SCHEMA) == []
    assert validate({"name": "x", "qty": 4}, SCHEMA) == []


@pytest.mark.parametrize("doc, fragment", [
    ({}, "missing required field 'name'"),
    ({"name": 1}, "name: expected string"),
    ({"name": "x", "mode": "c"}, "mode: 'c' is not one of"),
    ({"name": "x", "count": "3"}, "count: expected integer"),
    ({"name": "x", "count": True}, "count: expected integer"),
    ({"name": "x", "count": 2**31}, "out of int32 range"),
    ({"name": "x", "flag": "yes"}, "flag: expected boolean"),
    ({"name": "x", "tags": []}, "fewer than 1 items"),
    ({"name": "x", "tags": ["a", 2]}, "tags[1]: expected string"),
    ({"name": "x", "labels": {"k": 1}}, "labels.k: expected string"),
    ({"name": "x", "nmae": "typo"}, "unknown field 'nmae'"),
    ({"name": "x", "qty": 1.5}, "qty: expected integer or string"),
    ({"name": "x", "qty": "16GB"}, "does not match"),
])
def test_each_rule_reports_the_path_at_fault(doc, fragment):
    errors = validate(doc, SCHEMA)
    assert any(fragment in e for e in errors), errors


def test_vendored_rayjob_schema_catches_real_mistakes():
    schema = load_rayjob_schema()
    good = {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "j"},
        "spec": {"entrypoint": "python -m jobs.train --config c.yaml", "shutdownAfterJobFinishes": True,
                 "rayClusterSpec": {"headGroupSpec": {"rayStartParams": {},
                                                      "template": {"spec": {"containers": [
                                                          {"name": "ray-head", "image": "maskray:0.1.0"}]}}}}},
    }
    assert validate(good, schema) == []
    bad = yaml.safe_load(yaml.safe_dump(good))
    bad["spec"]["shutdownAfterJobFinish"] = True  # typo of a real field
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0  # must be a string
    bad["spec"]["rayClusterSpec"]["autoscalerOptions"] = {"upscalingMode": "Fast"}
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"] = [{"groupName": "gpu", "template": {"spec": {"containers": []}}}]
    errors = "\n".join(validate(bad, schema))
    assert "unknown field 'shutdownAfterJobFinish'" in errors
    assert "rayStartParams.num-gpus: expected string" in errors
    assert "upscalingMode: 'Fast' is not one of" in errors
    assert "missing required field 'maxReplicas'" in errors and "missing required field 'minReplicas'" in errors


def test_schema_subset_keeps_the_crd_shape():
    """The vendored subset is still the CRD's structure: spec, rayClusterSpec, pod templates."""
    spec = load_rayjob_schema()["properties"]["spec"]
    assert spec["properties"]["submissionMode"]["default"] == "K8sJobMode"
    cluster = spec["properties"]["rayClusterSpec"]
    assert cluster["required"] == ["headGroupSpec"]
    worker = cluster["properties"]["workerGroupSpecs"]["items"]
    assert worker["required"] == ["groupName", "maxReplicas", "minReplicas", "template"]
    for template in (cluster["properties"]["headGroupSpec"]["properties"]["template"], worker["properties"]["template"],
                     spec["properties"]["submitterPodTemplate"]):
        assert template["properties"]["spec"]["required"] == ["containers"]
    assert "ray-project/kuberay" in SCHEMA_FILE.read_text().split("\nopenAPIV3Schema:")[0]
