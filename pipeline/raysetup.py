"""Ray start-up shared by the jobs: ``init`` with maskray's worker set-up hook.

The hook works around a busy loop in Ray Data 2.60's streaming executor: when every task
of a pipeline has finished but its consumers have not yet taken the output (backpressure),
``StreamingExecutor._scheduling_loop_step`` returns at once, without the ``ray.wait`` that
paces it while tasks run, so the scheduling thread spins. For a Ray Train ``streaming_split``
that thread lives in the ``SplitCoordinator`` actor and burned 60-80 % of a core for most of
every epoch here (measured with ``ps`` and py-spy on 2 cores: training ran at 4.5 img/s while
it spun and 6.7 img/s once the epoch's data was produced). The patch sleeps
``IDLE_SLEEP_S`` after a step that left no task running; the executor then reacts to a
consumer within that delay, which is far below one training step.

The hook runs in every worker process Ray starts for a job (``worker_process_setup_hook``),
the driver patches itself in :func:`init`. It is a no-op when Ray Data's internals differ
from what it expects (another Ray version), so it can only ever remove the spin.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

SETUP_HOOK = "pipeline.raysetup.setup_worker"
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in a submitted job's driver
IDLE_SLEEP_S = 0.02


def pace_idle_scheduling() -> bool:
    """Patch ``StreamingExecutor._scheduling_loop_step`` to sleep when no task is running.

    Returns whether the executor is (now) patched; False when Ray Data lacks the method.
    """
    try:
        from ray.data._internal.execution import streaming_executor
    except ImportError:
        return False
    executor = getattr(streaming_executor, "StreamingExecutor", None)
    step = getattr(executor, "_scheduling_loop_step", None)
    if step is None:
        return False
    if getattr(step, "maskray_paced", False):
        return True

    def paced_step(self, topology) -> bool:
        keep_going = step(self, topology)
        # invariant: a step that leaves tasks running was paced by ray.wait inside it
        if keep_going and not any(op.num_active_tasks() for op in topology):
            time.sleep(IDLE_SLEEP_S)
        return keep_going

    paced_step.maskray_paced = True  # type: ignore[attr-defined]
    executor._scheduling_loop_step = paced_step
    return True


def setup_worker() -> None:
    """The ``worker_process_setup_hook`` of maskray's Ray jobs."""
    pace_idle_scheduling()


def runtime_env(base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base`` (a Ray runtime env) with maskray's worker set-up hook, unless it names another."""
    env = dict(base or {})
    env.setdefault("worker_process_setup_hook", SETUP_HOOK)
    return env


def init(address: str | None = None, **kwargs: Any) -> None:
    """``ray.init(address, **kwargs)`` with the worker set-up hook in its runtime env.

    Inside a submitted Ray job the job's own runtime env (``infra/runtime_env.yaml``, which
    names the hook too) applies and none is passed here, so the two never conflict.
    """
    import os

    import ray

    pace_idle_scheduling()  # the driver runs executors too (ds.write, iter_batches)
    if JOB_CONFIG_ENV not in os.environ and "runtime_env" not in kwargs:
        kwargs["runtime_env"] = runtime_env()
    ray.init(address=address, **kwargs)
