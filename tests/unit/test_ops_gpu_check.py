"""benchmarks/gpu_check.sh in its CPU quick mode (what CI runs so the GPU script cannot rot):
every step passes and the dated section lands in the --results file with figures."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_cpu_quick_writes_a_section_with_figures(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nearlier text stays\n")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--quick", "--results", str(results)],
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
        capture_output=True, text=True, timeout=600,
    )
    text = results.read_text()
    assert proc.returncode == 0, proc.stderr[-3000:] + text[-3000:]
    assert text.startswith("# Results\n\nearlier text stays\n")
    assert re.search(r"^## GPU check \(\d{4}-\d\d-\d\d \d\d:\d\d UTC, benchmarks/gpu_check.sh --device cpu --quick\)$",
                     text, re.M)
    statuses = dict(re.findall(r"^### (\w+): (ok|skipped|FAILED[^,]*)", text, re.M))
    assert set(statuses) == {"environment", "build_op", "tests_gpu", "roi_align_benchmark", "model_benchmark_bf16",
                             "predictor", "pretrained", "keypoint_model"}
    assert all(s in ("ok", "skipped") for s in statuses.values()), statuses
    # figures: RoIAlign ratios vs torchvision and the per-level pooler, model images/s, Predictor images/s
    assert re.search(r"^FPN 4 levels .*fwd\+bwd\s+[\d.]+\s+tv\s+[\d.]+\s+[\d.]+x", text, re.M)
    assert re.search(r"^FPN 4 levels .*fwd\+bwd\s+[\d.]+\s+per-level\s+[\d.]+\s+[\d.]+x", text, re.M)
    assert re.search(r"^infer\s+[\d.]+\s+[\d.]+\s+[\d.]+$", text, re.M)
    assert re.search(r"^train\s+[\d.]+\s+[\d.]+\s+[\d.]+$", text, re.M)
    assert re.search(r"^predictor images/s: [\d.]+$", text, re.M) or "skipped: pipeline.infer.predictor" in text
    assert re.search(r"^coco-size: 1 photos  torchvision loop [\d.]+ s .* maskray Predictor [\d.]+ s .* ratio [\d.]+x",
                     text, re.M)
    # Keypoint R-CNN: torchvision's weights agree in maskray's model, then images/s of both
    assert re.search(r"^agreement \(float32\): \d+ detections, max \|box\| [\d.e+-]+ px", text, re.M)
    assert re.search(r"^kp infer\s+[\d.]+\s+[\d.]+\s+[\d.]+$", text, re.M)
    assert re.search(r"^kp train\s+[\d.]+\s+[\d.]+\s+[\d.]+$", text, re.M)
