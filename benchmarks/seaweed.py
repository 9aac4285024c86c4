"""The SeaweedFS S3 server of the integration fixtures, for benchmarks run as scripts.

``tests/integration/conftest.py`` owns ``SeaweedServer`` (free ports, start, wait for the bucket,
stop); the benchmarks load that module by path rather than keep a copy.
"""

from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seaweed_server_class():
    """``SeaweedServer`` from tests/integration/conftest.py (its ``ports`` helper beside it)."""
    path = os.path.join(ROOT, "tests", "integration", "conftest.py")
    sys.path.insert(0, os.path.dirname(path))  # its `ports` helper sits next to it
    spec = importlib.util.spec_from_file_location("_maskray_it_conftest", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module.SeaweedServer
