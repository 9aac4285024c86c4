"""The round scheduler (pipeline.distill.rounds) with injected step functions: resumable, never redoes
a finished round, never mixes a pseudo-label set into the wrong round."""

import json
import os
import re

import pytest

from model.errors import MaskrayError
from pipeline.distill import rounds
from pipeline.distill.rounds import PseudoLabels, RoundScheduler, StepFunctions


class Killed(BaseException):
    """Stands for SIGKILL: nothing after the raise runs."""


class FakeSteps:
    """Deterministic steps that write files under the ``out`` they are given and count calls;
    ``kill_at`` = (step, round) raises Killed once, *after* the step wrote its files."""

    def __init__(self, kill_at=None, aps=None):
        self.calls = []
        self.kill_at = kill_at
        self.aps = aps or {"teacher": 0.10, 1: 0.15, 2: 0.18, 3: 0.19}

    def _maybe_kill(self, step, k):
        if self.kill_at == (step, k):
            self.kill_at = None
            raise Killed(f"{step} {k}")

    def functions(self):
        return StepFunctions(self.train_teacher, self.pseudo_label, self.train_student, self.evaluate)

    def train_teacher(self, out):
        self.calls.append(("teacher", 0))
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "model.pt")
        with open(path, "w") as f:
            f.write("teacher weights")
        self._maybe_kill("teacher", 0)
        return path

    def pseudo_label(self, k, teacher, out):
        self.calls.append(("pseudo_labels", k))
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "manifest.json"), "w") as f:
            json.dump({"extra": {"round": k, "teacher": teacher}}, f)
        self._maybe_kill("pseudo_labels", k)
        return PseudoLabels(dataset=out, thresholds={1: 0.5 + k / 10, 2: 1.000001}, images=90,
                            instances=100 + k, round=k, teacher=teacher)

    def train_student(self, k, pseudo, out):
        self.calls.append(("student", k))
        with open(os.path.join(pseudo, "manifest.json")) as f:
            extra = json.load(f)["extra"]
        assert extra["round"] == k  # the student of round k reads round k's pseudo-labels
        return self._save_model(out, f"student {k} trained on {pseudo}", ("student", k))

    def _save_model(self, out, text, step):
        """Write ``out/model.pt`` holding ``text``, then maybe be killed at ``step``."""
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "model.pt")
        with open(path, "w") as f:
            f.write(text)
        self._maybe_kill(*step)
        return path

    def evaluate(self, checkpoint):
        m = re.search(r"round-(\d+)/student", checkpoint)
        k = int(m.group(1)) if m else None
        self.calls.append(("eval", k or 0))
        ap = self.aps["teacher" if k is None else k]
        self._maybe_kill("eval", k or 0)
        return {"bbox": {"AP": ap + 0.05}, "segm": {"AP": ap}}


def _artifacts(root):
    """Every file under root -> content; wall times (which differ run to run) removed."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path) as f:
                text = f.read()
            if name == "state.json":
                data = json.loads(text)
                assert set(data.pop("wall_time")) == set(data["status"]) or not all(
                    v == "done" for v in data["status"].values())
                text = json.dumps(data, sort_keys=True)
            files[os.path.relpath(path, root)] = text.replace(str(root), "<work>")
    return files


def _run(work, steps, n=2, **kw):
    return RoundScheduler(str(work), steps.functions(), rounds=n, min_gain=kw.pop("min_gain", -100), **kw).run()


def test_uninterrupted_run_layout_and_summary(tmp_path):
    steps = FakeSteps()
    states = _run(tmp_path, steps)
    assert [s.round for s in states] == [0, 1, 2] and all(s.done for s in states)
    assert steps.calls == [("teacher", 0), ("eval", 0), ("pseudo_labels", 1), ("student", 1), ("eval", 1),
                           ("pseudo_labels", 2), ("student", 2), ("eval", 2)]
    s1, s2 = states[1], states[2]
    assert s1.teacher == states[0].teacher and s2.teacher == s1.student   # teacher = previous round's model
    assert s1.pseudo_dataset.endswith("rounds/round-1/pseudo") and s2.pseudo_dataset.endswith("round-2/pseudo")
    assert s1.metrics["teacher"] == states[0].metrics["teacher"]
    assert s1.gain() == pytest.approx(5.0) and s2.gain() == pytest.approx(3.0)
    assert s1.thresholds == {"1": 0.6, "2": 1.000001}
    assert sorted(_artifacts(tmp_path)) == sorted([
        "rounds/round-0/state.json", "rounds/round-0/teacher/model.pt",
        "rounds/round-1/state.json", "rounds/round-1/pseudo/manifest.json", "rounds/round-1/student/model.pt",
        "rounds/round-2/state.json", "rounds/round-2/pseudo/manifest.json", "rounds/round-2/student/model.pt"])
    table = rounds.format_summary(rounds.load_states(str(tmp_path)))
    assert "10.0" in table and "15.0" in table and "+5.0" in table and "101/90 img" in table
    assert "2:none" in table


@pytest.mark.parametrize("kill_at", [("pseudo_labels", 1), ("student", 1), ("eval", 1), ("teacher", 0),
                                     ("student", 2)])
def test_killed_run_resumes_at_the_right_step_with_the_same_artifacts(tmp_path, kill_at):
    reference = FakeSteps()
    _run(tmp_path / "ref", reference)

    steps = FakeSteps(kill_at=kill_at)
    with pytest.raises(Killed):
        _run(tmp_path / "run", steps)
    state = rounds.load_state(str(tmp_path / "run"), kill_at[1])
    step_names = list(state.steps)
    killed = step_names.index(kill_at[0])
    # the killed step did not count as done (its files may exist, its state does not say done)
    assert [state.status[s] for s in step_names] == ["done"] * killed + ["pending"] * (len(step_names) - killed)

    before = len(steps.calls)
    _run(tmp_path / "run", steps)
    resumed = steps.calls[before:]
    # the rerun starts exactly at the killed step and never repeats an earlier one
    assert resumed[0] == kill_at
    assert resumed == reference.calls[reference.calls.index(kill_at):]
    assert _artifacts(tmp_path / "run") == _artifacts(tmp_path / "ref")


def test_later_rounds_never_touch_a_finished_round(tmp_path):
    steps = FakeSteps()
    _run(tmp_path, steps, n=1)
    r1 = tmp_path / "rounds/round-1"
    snapshot = {p: (r1 / p).read_bytes() for p in ("state.json", "pseudo/manifest.json", "student/model.pt")}
    calls = len(steps.calls)
    _run(tmp_path, steps, n=1)          # same command again: nothing to do
    assert len(steps.calls) == calls
    states = _run(tmp_path, steps, n=2)  # one more round
    assert steps.calls[calls:] == [("pseudo_labels", 2), ("student", 2), ("eval", 2)]
    assert {p: (r1 / p).read_bytes() for p in snapshot} == snapshot
    assert states[2].teacher == states[1].student and states[2].pseudo_dataset != states[1].pseudo_dataset


def test_stops_when_the_gain_is_below_min_gain(tmp_path):
    steps = FakeSteps(aps={"teacher": 0.10, 1: 0.15, 2: 0.155, 3: 0.3})
    sched = RoundScheduler(str(tmp_path), steps.functions(), rounds=3, min_gain=1.0)
    states = sched.run()
    assert [s.round for s in states] == [0, 1, 2] and "round 2 gained +0.50" in sched.stop_reason
    calls = len(steps.calls)
    states = RoundScheduler(str(tmp_path), steps.functions(), rounds=3, min_gain=1.0).run()
    assert len(states) == 3 and len(steps.calls) == calls   # rerun: still stopped, nothing redone
    assert not (tmp_path / "rounds/round-3").exists()


def test_pseudo_labels_of_another_round_are_refused(tmp_path):
    steps = FakeSteps()
    good = steps.pseudo_label

    def wrong_round(k, teacher, out):
        result = good(k, teacher, out)
        result.round = k - 1
        return result

    steps.pseudo_label = wrong_round
    with pytest.raises(MaskrayError, match="expected round 1"):
        _run(tmp_path, steps, n=1)
    assert rounds.load_state(str(tmp_path), 1).status["pseudo_labels"] == "pending"


def test_corrupt_state_is_a_clear_error(tmp_path):
    path = tmp_path / "rounds/round-0"
    path.mkdir(parents=True)
    (path / "state.json").write_text("{not json")
    with pytest.raises(MaskrayError, match="round-0/state.json"):
        _run(tmp_path, FakeSteps())


class ControlledSteps(FakeSteps):
    """FakeSteps with the round's control: the student's run on labeled data alone."""

    def __init__(self, control_aps, **kwargs):
        super().__init__(**kwargs)
        self.control_aps = control_aps

    def functions(self):
        return StepFunctions(self.train_teacher, self.pseudo_label, self.train_student, self.evaluate,
                             train_control=self.train_control)

    def train_control(self, k, teacher, out):
        self.calls.append(("control", k))
        assert teacher.endswith(f"round-{k - 1}/teacher/model.pt" if k == 1 else f"round-{k - 1}/student/model.pt")
        return self._save_model(out, f"control {k} from {teacher}", ("control", k))

    def evaluate(self, checkpoint):
        m = re.search(r"round-(\d+)/control", checkpoint)
        if m:
            self.calls.append(("eval control", int(m.group(1))))
            ap = self.control_aps[int(m.group(1))]
            return {"bbox": {"AP": ap + 0.05}, "segm": {"AP": ap}}
        return super().evaluate(checkpoint)


def test_control_is_trained_scored_and_reported_beside_the_gain(tmp_path):
    steps = ControlledSteps({1: 0.17}, kill_at=("control", 1))
    with pytest.raises(Killed):
        RoundScheduler(str(tmp_path), steps.functions(), rounds=1).run()
    states = RoundScheduler(str(tmp_path), steps.functions(), rounds=1).run()  # resumes at the control
    assert [c for c in steps.calls if c[0] != "eval"] == [
        ("teacher", 0), ("pseudo_labels", 1), ("student", 1), ("control", 1), ("control", 1), ("eval control", 1)]
    r1 = states[1]
    assert r1.steps == rounds.ROUND_STEPS + (rounds.CONTROL_STEP,) and r1.done
    assert r1.control.endswith("round-1/control/model.pt")
    # student 15.0 vs teacher 10.0 and control 17.0: +5.0 over the teacher, -2.0 against the control
    assert r1.gain() == pytest.approx(5.0) and r1.gain_over_control() == pytest.approx(-2.0)
    table = rounds.format_summary(states)
    header, _, row0, row1 = table.splitlines()
    assert "control segm" in header and "gain vs control" in header
    cells = [c.strip() for c in row1.split("|")]
    assert cells[:8] == ["1", "15.0", "10.0", "20.0", "15.0", "+5.0", "17.0", "-2.0"]  # bbox = segm + 5
    assert "control" not in rounds.format_summary(RoundScheduler(str(tmp_path / "plain"), FakeSteps().functions(),
                                                                 rounds=1).run())


def test_a_round_with_a_control_step_refuses_to_resume_without_one(tmp_path):
    steps = ControlledSteps({1: 0.17}, kill_at=("control", 1))
    with pytest.raises(Killed):
        RoundScheduler(str(tmp_path), steps.functions(), rounds=1).run()
    with pytest.raises(MaskrayError, match=r"round 1: its state has a control step but no control is configured"):
        RoundScheduler(str(tmp_path), FakeSteps().functions(), rounds=1).run()
