"""Pacing of Ray Data 2.60's idle scheduling loop, as a Ray Data execution callback.

When every task of a pipeline has finished but its consumers have not yet taken the output
(backpressure), ``StreamingExecutor._scheduling_loop_step`` returns at once, without the
``ray.wait`` that paces it while tasks run, so the scheduling thread spins. For a Ray Train
``streaming_split`` that thread lives in the ``SplitCoordinator`` actor and burned 60-80 % of a
core for most of every epoch here (measured with ``ps`` and py-spy on 2 cores: training ran at
4.5 img/s while it spun and 6.7 img/s once the epoch's data was produced).

:class:`PaceIdleLoop` sleeps :data:`IDLE_SLEEP_S` after a step that left no task running; the
executor then reacts to a consumer within that delay, far below one training step. It rides in
the ``DataContext`` (``custom_execution_callback_classes``), which every Dataset copies at
creation and which the ``SplitCoordinator`` actor adopts, so it reaches every executor of a
maskray job without a runtime-env ``worker_process_setup_hook``: such a hook gives every worker
of the job a non-default runtime env, so Ray's pre-started workers cannot be used and each new
worker process imports Ray Data first (measured: 6.3 s to a first trivial task vs 0.9 s without,
benchmarks/RESULTS.md, issue 13 item 4).
"""

from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback

IDLE_SLEEP_S = 0.02


class PaceIdleLoop(ExecutionCallback):
    """Sleep after a scheduling step that left no task of any operator running."""

    def on_execution_step(self, executor) -> None:
        topology = getattr(executor, "_topology", None)
        # invariant: a step that leaves tasks running was paced by ray.wait inside it
        if topology and not any(op.num_active_tasks() for op in topology):
            time.sleep(IDLE_SLEEP_S)


def install(context=None) -> bool:
    """Register :class:`PaceIdleLoop` on ``context`` (default: this process's current
    ``DataContext``) once; returns whether it is registered."""
    from ray.data import DataContext

    context = context or DataContext.get_current()
    classes = getattr(context, "custom_execution_callback_classes", None)
    if classes is None:
        return False
    if PaceIdleLoop not in classes:
        classes.append(PaceIdleLoop)
    return True
