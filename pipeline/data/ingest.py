"""Resumable, chunked ingestion into maskray-shards/1: the run that ``maskray convert`` and
``maskray pack`` share, on Ray Data tasks (``runner="ray"``) or in one process (``"local"``).

A run is three steps, each a function of what is in storage, so any of them can be redone:

1. **plan** (one task): list or parse the source, give images their ids in sorted order and cut
   the items into fixed chunks of at most ``images_per_shard`` images and ``max_shard_bytes``
   listed bytes, written as ``_ingest/chunk-NNNNN.json``; then ``_ingest/plan.json`` (counts
   and the problems found while planning) last. Chunk ``k`` becomes shard
   ``part-{k:05d}.parquet``: the assignment is deterministic. A rerun with the same inputs and
   options reuses the plan (objects added to the source since are not picked up; write to a
   new prefix for them); other inputs or options discard the old state first.
2. **chunks** (one Ray Data task each, in parallel on the cluster): read the chunk's objects
   (``workers`` threads), check headers (the one pixel limit of :mod:`pipeline.data.decode`) and
   decode, build rows, write the shard atomically, then ``_ingest/done-NNNNN.json``: its
   :class:`~pipeline.data.format.ShardInfo`, counts and every problem by key. A chunk that already
   has a done record is skipped, so an interrupted run completes without losing or
   duplicating an image. Per-object errors, AccessDenied included, are problems of the chunk;
   an unreachable endpoint or a missing bucket stops the run.
3. **driver**: streams the small done records (never rows or pixels), sums the counts, keeps
   the first :data:`MAX_REPORT_PROBLEMS` problems and writes ``manifest.json`` last. Its
   memory grows with the number of shards only.

``_ingest/`` stays next to the shards as the record of the run (readers take only what the
manifest lists); every problem is in the plan and done records.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from model.errors import MaskrayError
from pipeline import storage
from pipeline.config import option, require, run_only_keys, to_dict
from pipeline.data.decode import DEFAULT_MAX_PIXELS
from pipeline.data.format import (DEFAULT_IMAGES_PER_SHARD, DEFAULT_MAX_SHARD_BYTES,
                             DEFAULT_ROW_GROUP_SIZE, Manifest, ShardInfo, ShardWriter,
                             manifest_uri, write_manifest)

log = logging.getLogger(__name__)

INGEST_DIR = "_ingest"
PLAN_NAME = "plan.json"
PLAN_VERSION = 1
RUNNERS = ("auto", "ray", "local")
MAX_REPORT_PROBLEMS = 1000  # kept in the driver's report; all of them are in _ingest/
MAX_PROBLEMS_LOGGED = 50


@dataclass(frozen=True)
class IngestConfig:
    """How a convert/pack run cuts and reads (see the module docstring); ``maskray convert`` /
    ``pack`` flags and ``--set`` map onto these fields (``jobs.cli.add_config_arguments``)."""

    CONFIG_ROOT: ClassVar[bool] = True

    images_per_shard: int = option(DEFAULT_IMAGES_PER_SHARD, f"images per shard (default {DEFAULT_IMAGES_PER_SHARD})")
    max_shard_bytes: int = option(DEFAULT_MAX_SHARD_BYTES, "approximate shard size limit in bytes (default 256 MiB)")
    row_group_size: int = option(DEFAULT_ROW_GROUP_SIZE, f"rows per Parquet row group (default {DEFAULT_ROW_GROUP_SIZE})")
    max_pixels: int | None = option(DEFAULT_MAX_PIXELS, "images with more pixels (read from the header) are "
                                    f"skipped before decoding (default {DEFAULT_MAX_PIXELS:,})")
    workers: int = option(8, "threads reading images in each shard's task (default 8)", result=False)
    # "ray": Ray Data tasks on the cluster; "local": this process (threads); "auto" (what
    # maskray convert/pack default to): Ray when RAY_ADDRESS is set (a cluster, or a
    # submitted job's driver) or Ray is already initialised here, else this process
    runner: str = option("auto", "ray: one Ray Data task per shard on the cluster (RAY_ADDRESS, else a local "
                         "Ray); local: this process only; auto (default): ray when RAY_ADDRESS is set "
                         "(e.g. a submitted job), else local", result=False)

    def __post_init__(self) -> None:
        require(self.images_per_shard >= 1, "images_per_shard", f"must be >= 1, got {self.images_per_shard}")
        require(self.max_shard_bytes >= 1, "max_shard_bytes", f"must be >= 1, got {self.max_shard_bytes}")
        require(self.row_group_size >= 1, "row_group_size", f"must be >= 1, got {self.row_group_size}")
        require(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        require(self.max_pixels is None or self.max_pixels >= 1, "max_pixels",
                f"must be >= 1 or None, got {self.max_pixels}")
        require(self.runner in RUNNERS, "runner", f"{self.runner!r} is not one of {', '.join(RUNNERS)}")

    def planning(self) -> dict:
        """The settings that decide the plan and the shards' contents (the plan's identity): every
        field but the run-only ones (:func:`pipeline.config.run_only_keys`)."""
        skip = run_only_keys(IngestConfig)
        return {k: v for k, v in to_dict(self).items() if k not in skip}


# ---------------------------------------------------------------------------------------------
# Reports


@dataclass
class Problem:
    """One skipped item: ``source`` is the file or URI at fault, ``kind`` ``image``/``annotation``
    /``file``, ``id`` its id (or index), ``reason`` a short category, ``detail`` the specifics."""

    source: str
    kind: str
    id: Any
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        ident = f" {self.id}" if self.id is not None else ""
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.source}: {self.kind}{ident}: {self.reason}{detail}"

    def to_dict(self) -> dict:
        return {"source": self.source, "kind": self.kind, "id": self.id, "reason": self.reason,
                "detail": self.detail}


@dataclass
class ConvertReport:
    """What a conversion did; ``*_in == *_written + *_skipped`` always holds.

    ``problems`` holds the first :data:`MAX_REPORT_PROBLEMS` (``problems_total`` counts all;
    every one is in the run's ``_ingest/`` records).
    """

    out: str
    images_in: int = 0
    images_written: int = 0
    images_skipped: int = 0
    instances_in: int = 0
    instances_written: int = 0
    instances_skipped: int = 0
    shards: list = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    problems_total: int = 0
    instance_skip_reasons: Counter = field(default_factory=Counter)
    image_skip_reasons: Counter = field(default_factory=Counter)
    chunks_reused: int = 0

    def check(self) -> None:
        if self.images_in != self.images_written + self.images_skipped or \
                self.instances_in != self.instances_written + self.instances_skipped:
            raise MaskrayError(f"{self.out}: counts do not add up (images {self.images_in} in, "
                               f"{self.images_written} written, {self.images_skipped} skipped; "
                               f"instances {self.instances_in} in, {self.instances_written} "
                               f"written, {self.instances_skipped} skipped)")

    def summary(self, max_problems: int = 20) -> str:
        lines = [f"images: {self.images_in} in, {self.images_written} written, "
                 f"{self.images_skipped} skipped",
                 f"instances: {self.instances_in} in, {self.instances_written} written, "
                 f"{self.instances_skipped} skipped",
                 f"shards: {len(self.shards)} -> {self.out}"]
        if self.chunks_reused:
            lines.append(f"resumed: {self.chunks_reused} shards kept from an earlier run")
        if self.image_skip_reasons:
            lines.append("skipped images: " + ", ".join(
                f"{reason}: {n}" for reason, n in sorted(self.image_skip_reasons.items())))
        if self.instance_skip_reasons:
            lines.append("skipped instances: " + ", ".join(
                f"{reason}: {n}" for reason, n in sorted(self.instance_skip_reasons.items())))
        for problem in self.problems[:max_problems]:
            lines.append(f"  {problem}")
        if self.problems_total > max_problems:
            lines.append(f"  ... and {self.problems_total - max_problems} more problems (all in "
                         f"{storage.join(self.out, INGEST_DIR)})")
        return "\n".join(lines)

    # records: the JSON-able counts + problems of one plan or chunk
    def to_record(self) -> dict:
        return {"images_in": self.images_in, "images_written": self.images_written,
                "images_skipped": self.images_skipped, "instances_in": self.instances_in,
                "instances_written": self.instances_written,
                "instances_skipped": self.instances_skipped,
                "image_skip_reasons": dict(self.image_skip_reasons),
                "instance_skip_reasons": dict(self.instance_skip_reasons),
                "problems": [p.to_dict() for p in self.problems]}

    def merge(self, record: dict) -> None:
        """Add a plan/chunk record's counts; keep its problems up to the report's bound."""
        for key in ("images_in", "images_written", "images_skipped", "instances_in",
                    "instances_written", "instances_skipped"):
            setattr(self, key, getattr(self, key) + int(record.get(key, 0)))
        self.image_skip_reasons.update(record.get("image_skip_reasons") or {})
        self.instance_skip_reasons.update(record.get("instance_skip_reasons") or {})
        for p in record.get("problems") or ():
            self.problems_total += 1
            if self.problems_total <= MAX_PROBLEMS_LOGGED:
                log.warning("skipped %s", Problem(**p))
            elif self.problems_total == MAX_PROBLEMS_LOGGED + 1:
                log.warning("more problems; see the summary at the end")
            if len(self.problems) < MAX_REPORT_PROBLEMS:
                self.problems.append(Problem(**p))


class Reporter:
    """Counts and problems of one plan or chunk (unbounded: one chunk's worth)."""

    def __init__(self, out: str = "") -> None:
        self.report = ConvertReport(out=out)

    def problem(self, source: str, kind: str, id: Any, reason: str, detail: str = "") -> None:
        self.report.problems.append(Problem(str(source), kind, id, reason, detail))

    def skip_image(self, source: str, id: Any, reason: str, detail: str = "",
                   annotations: int = 0) -> None:
        if annotations:
            detail = f"{detail}; " if detail else ""
            detail += f"{annotations} annotation{'s' if annotations != 1 else ''} dropped with it"
        self.problem(source, "image", id, reason, detail)
        self.report.images_skipped += 1
        self.report.image_skip_reasons[reason] += 1
        if annotations:
            self.report.instances_skipped += annotations
            self.report.instance_skip_reasons["image skipped"] += annotations

    def skip_annotation(self, source: str, id: Any, reason: str, detail: str = "") -> None:
        self.problem(source, "annotation", id, reason, detail)
        self.report.instances_skipped += 1
        self.report.instance_skip_reasons[reason] += 1


# ---------------------------------------------------------------------------------------------
# A job: what to plan and how to turn a chunk into rows


@dataclass(frozen=True)
class IngestJob:
    """One convert/pack run. ``plan_items(job, add, rep)`` lists/parses the source, calls
    ``add(item, nbytes)`` per image in order and counts what it skips; ``chunk_rows(job, items,
    rep)`` yields the rows of one chunk. Both are module-level functions (pickled by name)."""

    kind: str
    source: str  # the COCO json or the images prefix: the manifest's ``source``
    images_uri: str
    out_uri: str
    options: IngestConfig
    plan_items: Callable
    chunk_rows: Callable
    params: dict = field(default_factory=dict)  # kind-specific (first_id, suffixes...)
    manifest_extra: dict = field(default_factory=dict)
    digest: Callable | None = None  # digest(job) -> str: the source's content identity

    def settings(self, source_digest: str) -> dict:
        """What decides the plan and the shards (the run record kept in the plan)."""
        return json.loads(json.dumps({"version": PLAN_VERSION, "kind": self.kind, "source": self.source,
                                      "images": self.images_uri, "digest": source_digest,
                                      "options": self.options.planning(), "params": self.params}, default=str))

    def identity(self, source_digest: str) -> str:
        blob = json.dumps(self.settings(source_digest), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def state_uri(out_uri: str, name: str) -> str:
    return storage.join(out_uri, INGEST_DIR, name)


def chunk_name(index: int) -> str:
    return f"chunk-{index:05d}.json"


def done_name(index: int) -> str:
    return f"done-{index:05d}.json"


def _read_json(uri: str) -> Any | None:
    """The JSON at ``uri``; None when missing or unreadable (a torn record is redone)."""
    try:
        return json.loads(storage.read_bytes(uri))
    except storage.StorageError as exc:
        if str(exc).endswith(": not found"):
            return None
        raise
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def _write_json(uri: str, obj: Any) -> None:
    storage.write_bytes(uri, json.dumps(obj, separators=(",", ":"), default=str).encode())


class _Chunker:
    """Cuts the planned items into chunk files as they come (plan task memory: one chunk)."""

    def __init__(self, out_uri: str, images_per_shard: int, max_shard_bytes: int) -> None:
        self.out_uri, self.limit, self.max_bytes = out_uri, images_per_shard, max_shard_bytes
        self.count = 0
        self._items: list[dict] = []
        self._bytes = 0

    def add(self, item: dict, nbytes: int = 0) -> None:
        if self._items and self._bytes + nbytes > self.max_bytes:
            self.flush()
        self._items.append(item)
        self._bytes += nbytes
        if len(self._items) >= self.limit:
            self.flush()

    def flush(self) -> None:
        if self._items:
            _write_json(state_uri(self.out_uri, chunk_name(self.count)), self._items)
            self.count += 1
            self._items, self._bytes = [], 0


def _clear_state(out_uri: str) -> None:
    """Remove an earlier run's state and the shards it wrote (no manifest lists them now)."""
    for uri in storage.list_files(storage.join(out_uri, INGEST_DIR)):
        if uri.rsplit("/", 1)[-1].startswith("done-"):
            done = _read_json(uri)
            if isinstance(done, dict) and isinstance(done.get("shard"), dict):
                storage.delete(storage.join(out_uri, ShardInfo(**done["shard"]).path))
        storage.delete(uri)


def plan_task(job: IngestJob) -> dict:
    """Step 1: the plan record (reused when an earlier run made the same one)."""
    digest = job.digest(job) if job.digest else ""
    identity, settings = job.identity(digest), job.settings(digest)
    plan_uri = state_uri(job.out_uri, PLAN_NAME)
    existing = _read_json(plan_uri)
    if isinstance(existing, dict) and existing.get("identity") == identity:
        log.info("resuming %s: reusing its plan (%d chunks)", job.out_uri, existing["chunks"])
        return existing
    if existing is not None:
        # ingest's rule for a changed rerun: the shards are a function of these settings, so an
        # earlier run's state is discarded (never refused: nothing downstream is lost)
        from pipeline import runrecord

        old = existing.get("settings") if isinstance(existing, dict) else None
        changed = runrecord.describe(old, settings, runrecord.differences(old, settings)) if old else "unrecorded"
        log.info("%s: an earlier run with other inputs or options (%s); its state is discarded",
                 job.out_uri, changed)
    _clear_state(job.out_uri)
    rep = Reporter(job.out_uri)
    chunker = _Chunker(job.out_uri, job.options.images_per_shard, job.options.max_shard_bytes)
    extra = job.plan_items(job, chunker.add, rep) or {}
    chunker.flush()
    record = rep.report.to_record()
    problems = record.pop("problems")
    _write_json(state_uri(job.out_uri, "plan-problems.json"), problems)
    plan = {"version": PLAN_VERSION, "identity": identity, "settings": settings, "chunks": chunker.count,
            "record": record, "problems": problems[:MAX_REPORT_PROBLEMS],
            "problems_total": len(problems), "extra": extra}
    _write_json(plan_uri, plan)  # last: a plan is used only once all its chunks are written
    return plan


def chunk_task(job: IngestJob, index: int) -> dict:
    """Step 2 for chunk ``index``: its done record (the earlier one when it exists)."""
    done_uri = state_uri(job.out_uri, done_name(index))
    done = _read_json(done_uri)
    if isinstance(done, dict) and done.get("index") == index:
        done["reused"] = True
        return done
    items = _read_json(state_uri(job.out_uri, chunk_name(index)))
    if not isinstance(items, list):
        raise MaskrayError(f"{state_uri(job.out_uri, chunk_name(index))}: missing or torn chunk "
                           f"file of the plan; rerun to plan again")
    rep = Reporter(job.out_uri)
    # invariant: one chunk -> at most one shard, named by the chunk index
    writer = ShardWriter(job.out_uri, images_per_shard=len(items) + 1,
                         max_shard_bytes=1 << 62, row_group_size=job.options.row_group_size,
                         first_index=index)
    with writer:
        for row in job.chunk_rows(job, items, rep):
            writer.add(row)
            rep.report.images_written += 1
            rep.report.instances_written += len(row["annotations"])
    shard = writer.shards[0].__dict__ if writer.shards else None
    record = {"index": index, "shard": shard, **rep.report.to_record()}
    _write_json(done_uri, record)  # after the shard: a done record means the shard is there
    record["reused"] = False
    return record


# ---------------------------------------------------------------------------------------------
# Runners


def _ray_chunk_row(row: dict, job: IngestJob) -> dict:
    return {"record": json.dumps(chunk_task(job, int(row["chunk"])), default=str)}


def _maskray_cause(exc: BaseException) -> BaseException | None:
    """The MaskrayError (e.g. StorageError) a Ray task raised, under Ray's wrappers."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MaskrayError):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def _run_ray(job: IngestJob) -> tuple[dict, Iterator[dict]]:
    import ray
    import ray.data

    plan_remote = ray.remote(num_cpus=1, max_retries=2)(plan_task)
    try:
        plan = ray.get(plan_remote.remote(job))
    except Exception as exc:  # noqa: BLE001 - surface our one-line error, not Ray's wrapper
        cause = _maskray_cause(exc)
        raise (cause or exc) from None
    n = plan["chunks"]

    def records() -> Iterator[dict]:
        if n == 0:
            return
        ctx = ray.data.DataContext.get_current()
        bars = ctx.enable_progress_bars
        ctx.enable_progress_bars = False
        try:
            ds = ray.data.from_items([{"chunk": k} for k in range(n)], override_num_blocks=n)
            # one task per chunk (a task that dies with its node is retried by Ray Data)
            ds = ds.map(_ray_chunk_row, fn_kwargs={"job": job}, num_cpus=1)
            for row in ds.iter_rows():
                yield json.loads(row["record"])
        except Exception as exc:  # noqa: BLE001
            cause = _maskray_cause(exc)
            raise (cause or exc) from None
        finally:
            ctx.enable_progress_bars = bars

    return plan, records()


def resolve_runner(runner: str) -> str:
    """``"ray"`` or ``"local"`` for an :class:`IngestConfig` runner (``"auto"`` decided here)."""
    if runner != "auto":
        return runner
    import os

    if os.environ.get("RAY_ADDRESS"):
        return "ray"
    try:
        import ray
    except ImportError:
        return "local"
    return "ray" if ray.is_initialized() else "local"


def _ensure_ray() -> bool:
    """Start/join Ray through :func:`pipeline.raysetup.init` unless it is up; True if started."""
    import ray

    if ray.is_initialized():
        return False
    from pipeline import raysetup

    raysetup.init()
    return True


def _prepare_output(out_uri: str) -> None:
    """Check access, remove the old manifest (the dataset is unreadable until this run
    completes) and temporary files that an interrupted local run left behind."""
    import os

    storage.check_access(out_uri)
    storage.makedirs(out_uri)
    if not storage.is_s3(out_uri):
        folder = storage.resolve(out_uri)[1]
        for name in os.listdir(folder):
            if name.startswith(".part-") and name.endswith(".tmp"):
                log.info("removing %s left by an interrupted run", os.path.join(folder, name))
                os.unlink(os.path.join(folder, name))
    muri = manifest_uri(out_uri)
    if storage.exists(muri):
        log.info("removing the existing %s; it is rewritten when the run completes", muri)
        storage.delete(muri)


def run(job: IngestJob, *, categories: Iterable[dict] | None = None,
        on_record: Callable[[dict], None] | None = None) -> ConvertReport:
    """Plan, write every chunk, then the manifest; returns the :class:`ConvertReport`.

    ``categories`` go into the manifest; when None, the plan's (``extra["categories"]``, from
    a COCO json parsed in the plan task).
    ``on_record`` is called with each chunk's done record as the driver receives it (tests use
    it to interrupt a run).
    """
    _prepare_output(job.out_uri)
    runner = resolve_runner(job.options.runner)
    started = _ensure_ray() if runner == "ray" else False
    try:
        if runner == "ray":
            plan, records = _run_ray(job)
        else:
            plan = plan_task(job)
            records = (chunk_task(job, k) for k in range(plan["chunks"]))
        report = ConvertReport(out=str(job.out_uri))
        report.merge({**plan["record"], "problems": plan["problems"]})
        report.problems_total += plan["problems_total"] - len(plan["problems"])
        shards: dict[int, ShardInfo] = {}
        for record in records:
            report.merge(record)
            report.chunks_reused += bool(record.get("reused"))
            if record.get("shard"):
                shards[int(record["index"])] = ShardInfo(**record["shard"])
            if on_record is not None:
                on_record(record)
    finally:
        if started:
            import ray

            ray.shutdown()
    report.shards = [shards[k] for k in sorted(shards)]
    report.check()
    extra = dict(job.manifest_extra)
    extra.update(plan.get("extra") or {})
    planned_categories = extra.pop("categories", [])
    categories = planned_categories if categories is None else categories
    extra.update({"images_in": report.images_in,
                  "skipped_images": dict(report.image_skip_reasons)})
    if job.kind == "coco":
        extra.update({"instances_in": report.instances_in,
                      "skipped_instances": dict(report.instance_skip_reasons)})
    write_manifest(job.out_uri, Manifest(categories=list(categories), shards=report.shards,
                                         source=job.source, extra=extra))
    log.info("%s -> %s: %d images, %d instances, %d shards", job.source, job.out_uri,
             report.images_written, report.instances_written, len(report.shards))
    return report
