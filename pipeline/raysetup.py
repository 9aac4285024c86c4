"""THE Ray start-up rule of every maskray job (train, infer, distill, demo, benchmarks): :func:`init`.

* ``RAY_ADDRESS`` set (a submitted Ray job, or the user's ``RAY_ADDRESS=auto`` / ``ray://``)
  -> join that cluster;
* otherwise a private local instance (``address="local"``): never silently joining whatever
  ``ray start`` cluster happens to run on this machine;
* Ray already initialised in this process (the demo, a test fixture, a notebook) -> nothing
  is done: the caller uses that Ray and must not shut it down (``init`` returns False).

Together with it, the console quieting (:func:`quiet_console`): Ray's own progress output and
C++ log lines stay off the console unless ``verbose``; maskray's one-line logs are the console.

It also paces Ray Data's idle scheduling loop in every executor of the job
(:mod:`pipeline.raypace`, a ``DataContext`` execution callback registered by :func:`init`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

logger = logging.getLogger(__name__)

def pace_idle_scheduling() -> bool:
    """Ray Data's idle scheduling loop paced in this process's ``DataContext`` (and so in every
    Dataset made after it, the Ray Train split coordinator included): :mod:`pipeline.raypace`."""
    from pipeline import raypace

    return raypace.install()


# ray.init options that only make sense when this process starts the instance
LOCAL_ONLY = ("num_cpus", "num_gpus", "resources", "object_store_memory", "include_dashboard", "_system_config")

# Idle worker processes Ray keeps alive beyond the CPU count, on a local instance. Ray's soft
# limit (default: the CPU count) counts actors too, so during a Ray Train run (controller, workers,
# split coordinator, Ray Data's own actors: ~8) every idle task worker was killed 1 s after its
# task, and the next decode task started a fresh process that imports Ray Data + torch (~8 s of
# one core here) in the middle of training: measured 35 % of the demo's training throughput
# (benchmarks/RESULTS.md, issue 14). On a cluster set RAY_num_workers_soft_limit on the nodes.
EXTRA_IDLE_WORKERS = 16


def quiet_console(verbose: bool = False) -> None:
    """Ray's progress output, print patching and C++ log lines off the console unless ``verbose``.

    Environment variables are set with ``setdefault`` (a user's own setting wins); they reach
    the raylet and workers only when set before :func:`init` starts Ray. Progress bars of Ray
    Data are left to each dataset (the train stream turns its own off; infer keeps its bar).
    """
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if not verbose:
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        import ray.data  # noqa: F401 - it configures its loggers (INFO) on import: set them after that

        for name in ("ray", "ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # "Token authentication is enabled for this Ray cluster": true of every Ray 2.60 start, not news
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Their one warning each is about progress bars ("Progress bars disabled"; "tqdm is not
    # installed", when a worker's bar reaches the driver): maskray's own choice, not news.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    logging.getLogger("ray.experimental.tqdm_ray").setLevel(logging.ERROR)


def resolve_address(address: str | None = None) -> str:
    """The address :func:`init` uses: ``address``, else ``RAY_ADDRESS``, else ``"local"``."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def init(address: str | None = None, *, verbose: bool = False, **kwargs: Any) -> bool:
    """Start or join Ray by the one rule (module docstring); True when this call started it.

    ``kwargs`` go to ``ray.init``; options that size a local instance (:data:`LOCAL_ONLY`) are
    dropped when joining a cluster. Defaults: ``log_to_driver=verbose``, ``logging_level``
    INFO/WARNING, no dashboard for a local instance. No runtime env is set (a submitted job's
    own applies): a non-default one keeps Ray from using its pre-started worker processes
    (:mod:`pipeline.raypace`).
    """
    import ray

    if ray.is_initialized():
        return False
    quiet_console(verbose)
    pace_idle_scheduling()  # the driver runs executors too (ds.write, iter_batches)
    address = resolve_address(address)
    if address == "local":
        kwargs.setdefault("include_dashboard", False)
        system = dict(kwargs.pop("_system_config", None) or {})
        cpus = kwargs.get("num_cpus") or os.cpu_count() or 1
        system.setdefault("num_workers_soft_limit", int(cpus) + EXTRA_IDLE_WORKERS)
        kwargs["_system_config"] = system
    else:
        dropped = [k for k in LOCAL_ONLY if kwargs.pop(k, None) is not None]
        if dropped:
            logger.debug("joining Ray at %s: ignoring %s", address, ", ".join(dropped))
    kwargs.setdefault("log_to_driver", verbose)
    kwargs.setdefault("logging_level", logging.INFO if verbose else logging.WARNING)
    attempts = START_ATTEMPTS if address == "local" else 1
    for attempt in range(1, attempts + 1):
        before = _child_pids()
        try:
            ray.init(address=address, **kwargs)
            return True
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            logger.warning("Ray's local instance did not register within Ray's fixed 30 s (a busy machine); "
                           "starting it again (attempt %d of %d)", attempt + 1, attempts)
            ray.shutdown()
            _stop_new_children(before)
    return True  # pragma: no cover - the loop returns or raises


# A saturated machine can make the raylet miss Ray 2.60's fixed 30 s registration window ("The
# current node timed out during startup"); a private local instance is then started again.
START_ATTEMPTS = 3


def _child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _stop_new_children(before: set[int]) -> None:
    """Stop the processes a failed ``ray.init`` left (GCS, raylet, reaper: our children since ``before``)."""
    import psutil

    leftovers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for proc in leftovers:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(leftovers, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
