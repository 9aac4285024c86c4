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
