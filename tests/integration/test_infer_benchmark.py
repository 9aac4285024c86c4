"""The plumbing benchmark (``benchmarks/infer.py --noop``) runs end to end at a tiny size: the
figures of issue 13 item 4 come from it, and twice a change elsewhere crashed one of its modes
unnoticed (a predictor hook the model actor no longer called; a helper the spawned driver-RSS
child pickled by reference). Its own local Ray instances, started and stopped by the script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_noop_benchmark_reports_every_figure(tmp_path):
    report = tmp_path / "noop.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "infer.py"), "--noop", "--images", "240", "--shards", "4",
           "--size", "32", "--actors", "1", "--images-per-unit", "30", "--driver-rss", "120", "--json", str(report)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    noop = json.loads(report.read_text())["noop"]
    assert noop["loop"]["images"] == 240 and noop["loop"]["images_per_s"] > 0
    (run,) = noop["pipeline"]
    assert run["images"] == 240 and run["instances"] == 0
    assert run["ratio_end_to_end"] > 0 and run["ratio_steady"] > 0
    assert 0 < run["first_model_call_s"] <= run["first_commit_s"] <= run["seconds"]
    assert 0.0 <= run["steal"] <= 1.0 and 0.0 <= noop["loop"]["steal"] <= 1.0
    assert noop["bytes"]["decode_to_model_bytes_per_image"] == 3 * 32 * 32
    (rss,) = noop["driver_rss"]
    assert rss["images"] == 120 and rss["instances"] == 120 * 5 and rss["driver_peak_rss"] > 0
    assert "ratio to the loop: end to end" in done.stdout and "driver peak RSS at 120 images" in done.stdout
