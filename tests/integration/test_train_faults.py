"""A Ray Train worker SIGKILLed mid-run: the group restarts from the last checkpoint and ends exactly at max_iters."""

import json
import logging
import os
import signal
import time

import pytest
import torch

from train_support import (checkpoint_registered, make_shapes_dataset, run_in_thread, run_uri, tiny_config,
                           write_config)


def train_workers(ray_pids: set[int]) -> list[int]:
    """Pids of live Ray Train workers of this test's Ray (process title ``ray::RayTrainWorker...``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) not in ray_pids:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::RayTrainWorker"):
            found.append(int(entry))
    return found


def descendants(pid: int) -> set[int]:
    """All processes below ``pid`` (from /proc/*/stat parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.mark.slow
def test_worker_sigkill_recovers_from_last_checkpoint(ray_local, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.train.engine")
    make_shapes_dataset(str(tmp_path / "train"), images=16, seed=0)
    config = tiny_config(str(tmp_path / "train"), "", str(tmp_path / "runs"), "killed",
                         max_failures=2, **{"schedule.max_iters": 12})
    path = write_config(tmp_path / "train.yaml", config)
    run = run_uri(config)
    thread, outcome = run_in_thread(path)
    wait_for(lambda: checkpoint_registered(run, "checkpoint_0000004"), 600, "the checkpoint of iteration 4")
    # only this test's Ray: processes below this pytest process (the raylet and its workers)
    workers = wait_for(lambda: train_workers(descendants(os.getpid())), 30, "Ray Train worker processes")
    os.kill(workers[-1], signal.SIGKILL)
    thread.join(timeout=900)  # a restart takes minutes on a loaded 2-core machine
    assert not thread.is_alive(), "training did not finish after the worker was killed"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["rc"] == 0

    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.train.engine"]
    resumed = [line for line in lines if line.startswith("resumed from")]
    assert resumed, lines
    at = int(resumed[-1].rsplit(" ", 1)[1])
    # the last checkpoint Ray Train had registered when the worker died: 4, or a later one
    # reported before the kill landed; never iteration 0, always a checkpoint boundary
    assert at in (4, 6, 8, 10), resumed
    final = json.loads(open(os.path.join(run, "final_metrics.json")).read())
    assert final["iteration"] == 12
    state = torch.load(os.path.join(run, "checkpoint_0000012", "train_state.pt"), weights_only=True)
    assert state["iteration"] == 12
    # no iteration past the end, none skipped: the last interval line is exactly 12/12
    iters = [line for line in lines if line.startswith("iter ")]
    assert iters[-1].startswith("iter 12/12 ")
    assert not any(line.startswith("iter 14/") for line in lines)
