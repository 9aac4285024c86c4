"""model.build: cache folder keying, loading, and the error on a failed compile."""

import pytest

from model import build, ops  # noqa: F401  (importing ops loads the library)
from model.errors import MaskrayError


def test_cache_folder_keyed_by_env_flags_and_arch(monkeypatch, tmp_path):
    monkeypatch.setenv("MASKRAY_OPS_DIR", str(tmp_path))
    cpu = build.build_dir(False, None)
    assert cpu.parent == tmp_path and cpu.name.startswith(build.torch_version_tag())
    assert build.build_dir(False, None) == cpu  # stable
    assert build.build_dir(True, ["8.0"]) != cpu
    assert build.build_dir(True, ["8.0"]) != build.build_dir(True, ["9.0"])
    monkeypatch.setattr(build, "CFLAGS", build.CFLAGS + ["-DX"])
    assert build.build_dir(False, None) != cpu


def test_loaded_library_is_the_cached_one():
    path = build.load()
    assert path == build.library_path() and path.exists()
    assert hasattr(__import__("torch").ops.maskray, "roi_align")


def test_failed_build_raises_maskray_error_with_compiler_lines(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def broken_load(**kwargs):
        raise RuntimeError(
            "Error building extension 'maskray_ops': [1/2] c++ -MMD -c roi_align.cpp -o roi_align.o\n"
            "FAILED: roi_align.o\n"
            "/src/roi_align.cpp:42:5: error: 'frobnicate' was not declared in this scope\n"
            "ninja: build stopped: subcommand failed.\n"
        )

    monkeypatch.setenv("MASKRAY_OPS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", broken_load)
    with pytest.raises(MaskrayError) as info:
        build.build(with_cuda=False)
    message = str(info.value)
    assert "'frobnicate' was not declared" in message and "Hint:" in message
    assert "\n" not in message
    log_file = build.build_dir(False, None) / "build.log"
    assert "FAILED: roi_align.o" in log_file.read_text()


def test_cuda_build_without_nvcc_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(build, "cuda_home", lambda: None)
    with pytest.raises(MaskrayError, match="nvcc not found"):
        build.build(with_cuda=True, arch=["9.0"])


def test_cpu_process_can_use_a_cuda_build(monkeypatch, tmp_path):
    monkeypatch.setenv("MASKRAY_OPS_DIR", str(tmp_path))
    assert build._compatible_library(False, None) is None
    cuda = build.build_dir(True, ["8.0", "9.0"])
    cuda.mkdir(parents=True)
    (cuda / f"{build.NAME}.so").write_bytes(b"")
    assert cuda.name.endswith("-cuda-sm80-sm90")
    assert build._compatible_library(False, None) == cuda / f"{build.NAME}.so"
    assert build._compatible_library(True, ["9.0"]) == cuda / f"{build.NAME}.so"
    assert build._compatible_library(True, ["10.0"]) is None


@pytest.mark.slow
def test_build_without_ninja_compiles_links_and_loads(tmp_path):
    """Some GPU images have no ninja: build() then compiles and links with plain compiler calls."""
    import subprocess
    import sys

    script = (
        "import torch, torchvision\n"
        "from model import build\n"
        "build.ninja_available = lambda: False\n"
        "path = build.build(with_cuda=False)\n"
        "assert path == build.build_dir(False, None) / 'maskray_ops.so' and path.exists(), path\n"
        "x = torch.randn(2, 3, 12, 14)\n"
        "rois = torch.tensor([[0, 1.0, 2.0, 9.0, 11.0], [1, -2.0, 0.5, 20.0, 7.0]])\n"
        "ours = torch.ops.maskray.roi_align(x, rois, 0.5, 3, 4, 2, True)\n"
        "torch.testing.assert_close(ours, torchvision.ops.roi_align(x, rois, (3, 4), 0.5, 2, True))\n"
        "print('ok')\n"
    )
    env = {**__import__("os").environ, "MASKRAY_OPS_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
    assert not list(tmp_path.glob("*/build.ninja"))  # really without ninja
