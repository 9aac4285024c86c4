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
