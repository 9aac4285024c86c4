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
