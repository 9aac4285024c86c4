"""The alternating timing loop the model benchmarks share (``model.py``, ``keypoint_model.py``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternating_rates(models: dict, step: Callable[[str, str], None], sync: Callable[[], None], mode: str, *,
                      warmup: int, rounds: int, iters: int, batch: int) -> dict[str, float]:
    """Median images/s of each model in ``mode`` ("infer" or "train"): ``warmup`` steps each, then
    ``rounds`` rounds of ``iters`` steps, the models' order reversed every other round so neither
    always runs first; ``sync`` waits for the device before and after each timed run."""
    for name in models:
        models[name].train(mode == "train")
        for _ in range(warmup):
            step(name, mode)
    sync()
    rates: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                step(name, mode)
            sync()
            rates[name].append(batch * iters / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}
