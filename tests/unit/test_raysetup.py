"""The Ray Data idle-loop pacing hook (pipeline.raysetup) on a stand-in executor; no Ray started."""

import pytest

from pipeline import raysetup


class FakeOp:
    def __init__(self, active: int):
        self.active = active

    def num_active_tasks(self) -> int:
        return self.active


@pytest.fixture
def patched(monkeypatch):
    from ray.data._internal.execution import streaming_executor

    calls = []

    def step(self, topology):
        calls.append(topology)
        return not topology.get("finished")  # the executor's "keep going"

    monkeypatch.setattr(streaming_executor.StreamingExecutor, "_scheduling_loop_step", step)
    assert raysetup.pace_idle_scheduling()
    assert raysetup.pace_idle_scheduling()  # idempotent: a second hook call does not wrap twice
    return streaming_executor.StreamingExecutor._scheduling_loop_step, calls


def test_a_step_with_no_running_task_sleeps(patched, monkeypatch):
    step, calls = patched
    slept = []
    monkeypatch.setattr(raysetup.time, "sleep", slept.append)
    assert step(None, {FakeOp(0): None, FakeOp(0): None}) is True
    assert slept == [raysetup.IDLE_SLEEP_S] and len(calls) == 1


def test_a_step_with_running_tasks_or_at_the_end_does_not_sleep(patched, monkeypatch):
    step, calls = patched
    slept = []
    monkeypatch.setattr(raysetup.time, "sleep", slept.append)
    assert step(None, {FakeOp(0): None, FakeOp(2): None}) is True
    assert step(None, {"finished": True}) is False  # the last step returns at once
    assert slept == [] and len(calls) == 2


def test_runtime_env_names_the_hook_without_overriding_one_given():
    assert raysetup.runtime_env()["worker_process_setup_hook"] == raysetup.SETUP_HOOK
    env = raysetup.runtime_env({"env_vars": {"A": "1"}, "worker_process_setup_hook": "mine.hook"})
    assert env == {"env_vars": {"A": "1"}, "worker_process_setup_hook": "mine.hook"}
    module, _, name = raysetup.SETUP_HOOK.rpartition(".")
    assert callable(getattr(__import__(module, fromlist=[name]), name))


@pytest.fixture
def fake_ray(monkeypatch):
    """``ray.init`` / ``ray.is_initialized`` recorded instead of run: no Ray starts."""
    import ray

    calls = []
    state = {"up": False}

    def fake_init(**kwargs):
        calls.append(kwargs)
        state["up"] = True

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: state["up"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(raysetup.JOB_CONFIG_ENV, raising=False)
    return calls, state


def test_init_without_ray_address_starts_a_private_local_instance(fake_ray):
    calls, _ = fake_ray
    assert raysetup.init(num_cpus=2) is True
    (kwargs,) = calls
    assert kwargs["address"] == "local"  # never ray.init() with no address (that joins a `ray start` cluster)
    assert kwargs["num_cpus"] == 2 and kwargs["include_dashboard"] is False
    assert kwargs["runtime_env"]["worker_process_setup_hook"] == raysetup.SETUP_HOOK
    assert kwargs["log_to_driver"] is False  # quiet unless verbose


def test_init_joins_ray_address_and_drops_local_sizing(fake_ray, monkeypatch):
    calls, _ = fake_ray
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert raysetup.init(num_cpus=2, object_store_memory=10**8, verbose=True) is True
    (kwargs,) = calls
    assert kwargs["address"] == "ray://head:10001"
    assert "num_cpus" not in kwargs and "object_store_memory" not in kwargs and "include_dashboard" not in kwargs
    assert kwargs["log_to_driver"] is True


def test_init_is_a_no_op_when_ray_is_already_up(fake_ray):
    calls, state = fake_ray
    state["up"] = True
    assert raysetup.init("local", num_cpus=2) is False
    assert calls == []


def test_init_in_a_submitted_job_keeps_the_jobs_runtime_env(fake_ray, monkeypatch):
    calls, _ = fake_ray
    monkeypatch.setenv(raysetup.JOB_CONFIG_ENV, "{}")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    raysetup.init()
    assert "runtime_env" not in calls[0] and calls[0]["address"] == "127.0.0.1:6379"


def test_a_local_start_that_times_out_is_retried_then_gives_up(fake_ray, monkeypatch):
    import ray

    calls, state = fake_ray
    tries = []

    def flaky(**kwargs):
        tries.append(kwargs["address"])
        if len(tries) < 2:
            raise Exception("The current node timed out during startup. This could happen because ...")
        state["up"] = True

    monkeypatch.setattr(ray, "init", flaky)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    assert raysetup.init() is True and tries == ["local", "local"]

    state["up"] = False
    tries.clear()
    monkeypatch.setattr(ray, "init", lambda **kw: (tries.append(1), (_ for _ in ()).throw(
        Exception("The current node timed out during startup."))))
    with pytest.raises(Exception, match="timed out during startup"):
        raysetup.init()
    assert len(tries) == raysetup.START_ATTEMPTS
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # joining a cluster: no second start
    tries.clear()
    with pytest.raises(Exception, match="timed out"):
        raysetup.init()
    assert len(tries) == 1
