"""The data-distillation round scheduler: a resumable state machine persisted in storage.

Layout under the work directory (a local path or ``s3://`` URI)::

    rounds/round-0/state.json     teacher trained on the labeled data alone, evaluated
    rounds/round-0/teacher/...    its training run (checkpoints)
    rounds/round-K/state.json     K >= 1: teacher = round K-1's model; pseudo-labels; student; eval
    rounds/round-K/pseudo/...     the pseudo-label dataset of round K (manifest extra: round, teacher)
    rounds/round-K/student/...    the student's training run
    rounds/round-K/control/...    with student.control: the student's run on the labeled data alone

Round 0 has the steps ``teacher`` and ``eval``; round K >= 1 has ``teacher`` (take round K-1's
model and its metrics), ``pseudo_labels``, ``student`` and ``eval``, then ``control`` (train and
score the control) when one is configured. ``state.json`` is rewritten
(atomically) after every finished step, so killing the scheduler anywhere and re-running the
same command continues at the first unfinished step; a finished round is never redone and a
round only ever reads the pseudo-label set recorded in its own state. The loop stops after
``rounds`` rounds, or after the first round whose student gains less than ``min_gain`` mask AP
(in AP points, i.e. 100 x COCO AP) over its teacher.

The work itself is injected as :class:`StepFunctions`, so the scheduler is tested without
models, Ray or storage servers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from model.errors import MaskrayError

logger = logging.getLogger(__name__)

STATE_VERSION = "maskray-round/1"
ROUND0_STEPS = ("teacher", "eval")
ROUND_STEPS = ("teacher", "pseudo_labels", "student", "eval")
CONTROL_STEP = "control"  # after ROUND_STEPS when the round has a control (student.control)
PENDING, DONE = "pending", "done"


@dataclass
class PseudoLabels:
    """What a pseudo-labeling step produced: the dataset URI, the per-class thresholds (keyed
    by category id) and counts; ``round`` and ``teacher`` as written in its manifest."""

    dataset: str
    thresholds: dict[int, float]
    images: int
    instances: int
    round: int
    teacher: str


@dataclass
class StepFunctions:
    """The work of each step. Every function writes only under the ``out`` URI it is given and
    returns what the state records:

    - ``train_teacher(out) -> checkpoint URI`` (round 0: labeled data only)
    - ``pseudo_label(round, teacher, out) -> PseudoLabels``
    - ``train_student(round, pseudo_dataset, out) -> checkpoint URI``
    - ``evaluate(checkpoint) -> metrics`` ({"bbox": {"AP", ...}, "segm": {"AP", ...}}, in [0, 1])
    - ``train_control(round, teacher, out) -> checkpoint URI`` (optional): the student's run on the
      labeled data alone; rounds have a ``control`` step when it is given
    """

    train_teacher: Callable[[str], str]
    pseudo_label: Callable[[int, str, str], PseudoLabels]
    train_student: Callable[[int, str, str], str]
    evaluate: Callable[[str], dict]
    train_control: Callable[[int, str, str], str] | None = None


@dataclass
class RoundState:
    round: int
    status: dict[str, str]
    teacher: str | None = None
    thresholds: dict[str, float] | None = None
    pseudo_dataset: str | None = None
    pseudo_images: int | None = None
    pseudo_instances: int | None = None
    student: str | None = None
    control: str | None = None
    metrics: dict[str, dict] = field(default_factory=dict)
    wall_time: dict[str, float] = field(default_factory=dict)
    config_hash: str = ""
    version: str = STATE_VERSION

    @classmethod
    def new(cls, k: int, config_hash: str = "", *, control: bool = False) -> "RoundState":
        steps = ROUND0_STEPS if k == 0 else ROUND_STEPS + ((CONTROL_STEP,) if control else ())
        return cls(round=k, status={s: PENDING for s in steps}, config_hash=config_hash)

    @property
    def steps(self) -> tuple[str, ...]:
        """The steps of this round, in the order they run (``status`` is stored sorted)."""
        if self.round == 0:
            return ROUND0_STEPS
        return ROUND_STEPS + ((CONTROL_STEP,) if CONTROL_STEP in self.status else ())

    @property
    def done(self) -> bool:
        return all(self.status.get(s) == DONE for s in self.steps)

    @property
    def model(self) -> str | None:
        """The checkpoint this round produced: round 0's teacher, else the student."""
        return self.teacher if self.round == 0 else self.student

    @property
    def model_metrics(self) -> dict | None:
        return self.metrics.get("teacher" if self.round == 0 else "student")

    def gain(self) -> float | None:
        """Student mask AP minus teacher mask AP, in AP points (None for round 0 / unfinished)."""
        if self.round == 0 or "student" not in self.metrics or "teacher" not in self.metrics:
            return None
        return 100.0 * (_ap(self.metrics["student"], "segm") - _ap(self.metrics["teacher"], "segm"))

    def gain_over_control(self) -> float | None:
        """Student mask AP minus its control's (the same run on labeled data alone), in AP points:
        what the pseudo-labels gave. None without a scored control."""
        if "student" not in self.metrics or "control" not in self.metrics:
            return None
        return 100.0 * (_ap(self.metrics["student"], "segm") - _ap(self.metrics["control"], "segm"))

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, uri: str = "state.json") -> "RoundState":
        try:
            raw = json.loads(data)
            if raw.get("version") != STATE_VERSION:
                raise MaskrayError(f"{uri}: unknown round state version {raw.get('version')!r}; expected {STATE_VERSION}")
            return cls(**raw)
        except (ValueError, TypeError) as exc:
            raise MaskrayError(f"{uri}: unreadable round state ({exc}); delete it to redo that round") from exc


def _ap(metrics: dict, kind: str) -> float:
    try:
        return float(metrics[kind]["AP"])
    except (KeyError, TypeError) as exc:
        raise MaskrayError(f"round metrics lack {kind}.AP: {metrics!r}") from exc


def round_dir(work_dir: str, k: int) -> str:
    from pipeline import storage

    return storage.join(work_dir, "rounds", f"round-{k}")


def state_uri(work_dir: str, k: int) -> str:
    from pipeline import storage

    return storage.join(round_dir(work_dir, k), "state.json")


def load_state(work_dir: str, k: int) -> RoundState | None:
    from pipeline import storage

    uri = state_uri(work_dir, k)
    if not storage.exists(uri):
        return None
    state = RoundState.from_json(storage.read_bytes(uri), uri)
    if state.round != k:
        raise MaskrayError(f"{uri}: holds round {state.round}, expected round {k}")
    return state


def save_state(work_dir: str, state: RoundState) -> None:
    from pipeline import storage

    storage.write_bytes(state_uri(work_dir, state.round), state.to_json())


def load_states(work_dir: str) -> list[RoundState]:
    """Every consecutive round state from round 0 on (for the summary)."""
    states = []
    while (state := load_state(work_dir, len(states))) is not None:
        states.append(state)
    return states


class RoundScheduler:
    """Runs rounds 0..``rounds`` under ``work_dir`` with ``steps``; see the module docstring."""

    def __init__(self, work_dir: str, steps: StepFunctions, *, rounds: int, min_gain: float = 0.0,
                 config_hash: str = "") -> None:
        if rounds < 0:
            raise MaskrayError(f"rounds: expected >= 0, got {rounds}")
        self.work_dir, self.steps, self.rounds = work_dir, steps, rounds
        self.min_gain, self.config_hash = float(min_gain), config_hash
        self.stop_reason: str | None = None

    def run(self) -> list[RoundState]:
        states: list[RoundState] = []
        self.stop_reason = None
        for k in range(self.rounds + 1):
            state = load_state(self.work_dir, k)
            if state is not None and state.done:
                logger.info("round %d: finished earlier, kept (%s)", k, state_uri(self.work_dir, k))
                if self.config_hash and state.config_hash and state.config_hash != self.config_hash:
                    logger.warning("round %d was run with a different configuration; it is kept as is", k)
            else:
                if state is None:
                    state = RoundState.new(k, self.config_hash, control=self.steps.train_control is not None)
                    save_state(self.work_dir, state)
                state = self._run_round(state, states[-1] if states else None)
            states.append(state)
            gain = state.gain()
            if gain is not None and gain < self.min_gain:
                self.stop_reason = (f"round {k} gained {gain:+.2f} mask AP < min_gain {self.min_gain:+.2f}; "
                                    f"stopping")
                logger.info(self.stop_reason)
                break
        else:
            self.stop_reason = f"finished {self.rounds} round(s)"
        return states

    # one round ---------------------------------------------------------------------------

    def _run_round(self, state: RoundState, prev: RoundState | None) -> RoundState:
        k = state.round
        out = round_dir(self.work_dir, k)
        from pipeline import storage

        for step in state.steps:
            if state.status.get(step) == DONE:
                logger.info("round %d: %s done earlier", k, step)
                continue
            logger.info("round %d: %s ...", k, step)
            start = time.perf_counter()
            if step == "teacher":
                if k == 0:
                    state.teacher = self.steps.train_teacher(storage.join(out, "teacher"))
                else:
                    if prev is None or not prev.done or prev.model is None:
                        raise MaskrayError(f"round {k}: round {k - 1} is not finished; cannot pick its teacher")
                    state.teacher = prev.model
                    state.metrics["teacher"] = prev.model_metrics
            elif step == "pseudo_labels":
                result = self.steps.pseudo_label(k, state.teacher, storage.join(out, "pseudo"))
                if result.round != k or result.teacher != state.teacher:
                    raise MaskrayError(f"round {k}: pseudo-labels {result.dataset} are of round {result.round} "
                                       f"teacher {result.teacher}, expected round {k} teacher {state.teacher}")
                state.pseudo_dataset = result.dataset
                state.thresholds = {str(c): float(t) for c, t in sorted(result.thresholds.items())}
                state.pseudo_images, state.pseudo_instances = result.images, result.instances
            elif step == "student":
                if not state.pseudo_dataset:
                    raise MaskrayError(f"round {k}: no pseudo-label dataset recorded in its state")
                state.student = self.steps.train_student(k, state.pseudo_dataset, storage.join(out, "student"))
            elif step == "eval":
                key = "teacher" if k == 0 else "student"
                state.metrics[key] = self.steps.evaluate(state.model)
            elif step == CONTROL_STEP:
                if self.steps.train_control is None:
                    raise MaskrayError(f"round {k}: its state has a control step but no control is configured "
                                       f"(student.control); delete {state_uri(self.work_dir, k)} to redo the round")
                state.control = self.steps.train_control(k, state.teacher, storage.join(out, "control"))
                state.metrics["control"] = self.steps.evaluate(state.control)
            else:  # pragma: no cover - the step names are ours
                raise MaskrayError(f"round {k}: unknown step {step!r} in its state")
            state.wall_time[step] = round(time.perf_counter() - start, 3)
            state.status[step] = DONE
            save_state(self.work_dir, state)
            logger.info("round %d: %s done in %.1f s", k, step, state.wall_time[step])
        return state


def format_summary(states: list[RoundState]) -> str:
    """Per round: teacher AP -> student AP (bbox, segm, in AP points), pseudo instances,
    thresholds, wall time."""
    def ap(m: dict | None, kind: str) -> str:
        return "-" if not m else f"{100 * _ap(m, kind):.1f}"

    def signed(value: float | None) -> str:
        return "-" if value is None else f"{value:+.1f}"

    controlled = any(CONTROL_STEP in s.status for s in states)  # columns for the control only when run
    header = ("round", "teacher bbox", "teacher segm", "student bbox", "student segm", "gain segm",
              *(("control segm", "gain vs control") if controlled else ()), "pseudo inst", "thresholds", "wall s")
    rows = []
    for s in states:
        student = s.metrics.get("student")
        thresholds = ("-" if not s.thresholds else
                      " ".join(f"{c}:{'none' if t > 1 else f'{t:.2f}'}" for c, t in s.thresholds.items()))
        rows.append((
            str(s.round), ap(s.metrics.get("teacher"), "bbox"), ap(s.metrics.get("teacher"), "segm"),
            ap(student, "bbox"), ap(student, "segm"), signed(s.gain()),
            *((ap(s.metrics.get("control"), "segm"), signed(s.gain_over_control())) if controlled else ()),
            "-" if s.pseudo_instances is None else f"{s.pseudo_instances}/{s.pseudo_images} img",
            thresholds, f"{sum(s.wall_time.values()):.0f}" + ("" if s.done else " (unfinished)"),
        ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
