"""The test tree itself: pytest's default (rootdir-relative "prepend") import mode puts every
test folder on sys.path without packages, so two test modules with one basename in different
tiers make the whole `pytest tests` collection fail even though each tier passes alone."""

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_module_basenames_are_unique_across_tiers():
    by_name = defaultdict(list)
    for path in TESTS.rglob("*.py"):
        if path.name != "conftest.py" and "__pycache__" not in path.parts:
            by_name[path.name].append(str(path.relative_to(TESTS)))
    clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not clashes, f"rename one of each: {clashes}"


REPO = TESTS.parent


def _imports(path: Path) -> set[str]:
    """Every module a file imports (top level or inside functions), as dotted names."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def job_imports_of_jobs(root: Path) -> dict[str, list[str]]:
    """``{job file: [other jobs modules it imports]}``: a jobs module may import only ``jobs.cli``."""
    found = {}
    for path in sorted((root / "jobs").glob("*.py")):
        own = f"jobs.{path.stem}"
        bad = sorted(n for n in _imports(path)
                     if n.startswith("jobs.") and n.count(".") == 1 and n not in ("jobs.cli", own))
        if bad:
            found[path.name] = bad
    return found


def test_no_job_imports_another_job():
    assert job_imports_of_jobs(REPO) == {}, "a jobs module may import only jobs.cli; move shared code to pipeline/"


def test_the_layout_check_catches_a_job_importing_a_job(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "a.py").write_text("from jobs import cli\n\ndef run():\n    from jobs import b\n")
    (tmp_path / "jobs" / "c.py").write_text("from jobs.b import helper\n")
    (tmp_path / "jobs" / "ok.py").write_text("from jobs import cli\nimport pipeline.train\n")
    assert job_imports_of_jobs(tmp_path) == {"a.py": ["jobs.b"], "c.py": ["jobs.b"]}


def test_dependencies_point_one_way():
    """model <- pipeline <- jobs: model knows nothing of Ray, storage or pipeline; pipeline never imports jobs."""
    for path in (REPO / "model").glob("*.py"):
        bad = sorted(n for n in _imports(path) if n.split(".")[0] in ("ray", "pipeline", "jobs"))
        assert not bad, f"model/{path.name} imports {bad}"
    for path in (REPO / "pipeline").rglob("*.py"):
        bad = sorted(n for n in _imports(path) if n.split(".")[0] == "jobs")
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


# The packages of pipeline/ by job, and what each may import besides the shared top-level
# modules (storage, config, runrecord, raysetup, weights, instances, results, evaluate, cluster):
# data knows no job; train and infer are independent of each other; distill builds on train and
# infer; show reads results (and decodes pixels as infer does); nothing builds on distill or show.
JOB_PACKAGES = ("data", "train", "infer", "distill", "show")
MAY_IMPORT = {
    "data": set(),
    "train": {"data"},
    "infer": {"data"},
    "distill": {"data", "train", "infer"},
    "show": {"data", "infer"},
}
SHARED_MAY_IMPORT = {"data", "infer"}  # shared modules read datasets (data) and paste RLE (infer.paste)


def package_violations(root: Path) -> list[str]:
    """``"<file> imports pipeline.<pkg>"`` for every import across pipeline's packages that the
    table above does not allow."""
    found = []
    for path in sorted((root / "pipeline").rglob("*.py")):
        rel = path.relative_to(root / "pipeline").parts
        own = rel[0] if len(rel) > 1 else None  # None: a shared top-level module
        allowed = MAY_IMPORT.get(own, set()) if own else SHARED_MAY_IMPORT
        for name in sorted(_imports(path)):
            parts = name.split(".")
            if parts[0] != "pipeline" or len(parts) < 2 or parts[1] not in JOB_PACKAGES:
                continue
            if parts[1] != own and parts[1] not in allowed:
                found.append(f"pipeline/{'/'.join(rel)} imports pipeline.{parts[1]}")
    return sorted(set(found))


def test_pipeline_packages_depend_as_the_architecture_says():
    assert package_violations(REPO) == []


def test_the_package_check_catches_a_wrong_way_import(tmp_path):
    for pkg in ("data", "train", "infer"):
        (tmp_path / "pipeline" / pkg).mkdir(parents=True)
    (tmp_path / "pipeline" / "data" / "a.py").write_text("def f():\n    from pipeline.train import loop\n")
    (tmp_path / "pipeline" / "infer" / "b.py").write_text("import pipeline.data.format\nfrom pipeline import storage\n")
    (tmp_path / "pipeline" / "train" / "c.py").write_text("from pipeline.infer.driver import run_inference\n")
    (tmp_path / "pipeline" / "results.py").write_text("from pipeline.distill import run\n")
    assert package_violations(tmp_path) == ["pipeline/data/a.py imports pipeline.train",
                                            "pipeline/results.py imports pipeline.distill",
                                            "pipeline/train/c.py imports pipeline.infer"]
