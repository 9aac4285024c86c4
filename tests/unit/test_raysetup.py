"""The one Ray start-up rule (pipeline.raysetup) with ray.init recorded, and the idle-loop pacing
(pipeline.raypace) on a stand-in executor; no Ray started."""

import pytest

from pipeline import raysetup


class FakeOp:
    def __init__(self, active: int):
        self.active = active

    def num_active_tasks(self) -> int:
        return self.active


class FakeExecutor:
    def __init__(self, *active: int):
        self._topology = {FakeOp(n): None for n in active}


def test_a_step_with_no_running_task_sleeps(monkeypatch):
    from pipeline import raypace

    slept = []
    monkeypatch.setattr(raypace.time, "sleep", slept.append)
    raypace.PaceIdleLoop().on_execution_step(FakeExecutor(0, 0))
    assert slept == [raypace.IDLE_SLEEP_S]


def test_a_step_with_running_tasks_does_not_sleep(monkeypatch):
    from pipeline import raypace

    slept = []
    monkeypatch.setattr(raypace.time, "sleep", slept.append)
    raypace.PaceIdleLoop().on_execution_step(FakeExecutor(0, 2))
    raypace.PaceIdleLoop().on_execution_step(FakeExecutor())  # no topology yet: nothing to pace
    assert slept == []


def test_the_pacing_rides_in_every_new_datasets_context():
    """Registered once in the current DataContext; the copy a Dataset takes at creation (and so a
    split coordinator, which adopts the dataset's context) carries it, and the executor's callback
    list includes it. No Dataset is made: that would start Ray in this Ray-free tier."""
    from ray.data import DataContext

    from pipeline import raypace

    context = DataContext.get_current()
    before = list(context.custom_execution_callback_classes)
    try:
        assert raysetup.pace_idle_scheduling() and raysetup.pace_idle_scheduling()
        assert context.custom_execution_callback_classes.count(raypace.PaceIdleLoop) == 1  # idempotent
        assert raypace.PaceIdleLoop in context.execution_callback_classes
        assert raypace.PaceIdleLoop in context.copy().custom_execution_callback_classes
        assert raypace.PaceIdleLoop in context.copy().execution_callback_classes
    finally:
        context.custom_execution_callback_classes[:] = before


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
    return calls, state


def test_init_without_ray_address_starts_a_private_local_instance(fake_ray):
    calls, _ = fake_ray
    assert raysetup.init(num_cpus=2) is True
    (kwargs,) = calls
    assert kwargs["address"] == "local"  # never ray.init() with no address (that joins a `ray start` cluster)
    assert kwargs["num_cpus"] == 2 and kwargs["include_dashboard"] is False
    # idle task workers survive beside a Ray Train run's actors (Ray's soft limit counts actors)
    assert kwargs["_system_config"] == {"num_workers_soft_limit": 2 + raysetup.EXTRA_IDLE_WORKERS}
    assert "runtime_env" not in kwargs  # Ray's pre-started workers serve the default env only
    assert kwargs["log_to_driver"] is False  # quiet unless verbose


def test_init_joins_ray_address_and_drops_local_sizing(fake_ray, monkeypatch):
    calls, _ = fake_ray
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert raysetup.init(num_cpus=2, object_store_memory=10**8, verbose=True) is True
    (kwargs,) = calls
    assert kwargs["address"] == "ray://head:10001"
    assert "num_cpus" not in kwargs and "object_store_memory" not in kwargs and "include_dashboard" not in kwargs
    assert "_system_config" not in kwargs  # a cluster's own settings apply
    assert kwargs["log_to_driver"] is True


def test_init_is_a_no_op_when_ray_is_already_up(fake_ray):
    calls, state = fake_ray
    state["up"] = True
    assert raysetup.init("local", num_cpus=2) is False
    assert calls == []


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
