"""``run_inference``: plan units, check provenance, run the Ray Data pipeline, watch progress.

Stages (every one in Ray tasks/actors; the driver sees unit names and counts only)::

    units (one Ray Data row each; a few units per read task) -> read + decode (CPU task,
      uint8 at the original size), yielded in groups of ~8 MB of pixels (one row and one block
      per group: Ray Data's per-block cost is paid per group, not per unit)
      -> model + post-process + write (actor pool, :class:`~pipeline.infer.stages.SegmentAndWrite`:
         per unit of the group: resize/normalize on the model's device, boxes + 28x28 mask
         probabilities, per-instance paste + RLE, one results file written atomically)
      -> one metadata row (counts) per unit back to the driver, yielded as each unit is committed

Why the write is in the model actor and not a third stage of CPU tasks (as it was): on a
small node Ray Data's scheduler (it ranks operators by object-store use) kept giving the free
CPU to the read stage, so no results file was committed until every unit had been read, and
the first write task then paid a cold ``import torch`` (measured: first commit 36-46 s after
the start with 20,000 images, benchmarks/RESULTS.md). In the actor, torch is already imported
and each unit is committed as soon as it is computed. The post-processing is per instance
within its box (:mod:`pipeline.infer.paste`), milliseconds per image.

Results prefix layout::

    <output>/provenance.json      what produced the results (model digest, options, input identity)
    <output>/<unit>.parquet       pipeline.results rows of one unit; a unit is a shard
                                  (``part-00003.parquet``: same name as the input shard) or a row
                                  range of one (``part-00003.rows-0000064-0000128.parquet``), or a
                                  run of raw image files (``files-0000000-0000016.parquet``)

Tiled inference (``--tile SIZE``, :mod:`pipeline.infer.tiles`): the read task cuts each image
larger than SIZE into tiles and yields them as *part* rows of a few tiles, each a unit of work
that any model actor takes (the tiles of one huge image spread over the whole pool); the actor
pastes the tiles' instances in full-image coordinates and writes the part under
``<output>/_tiles/<unit>/``; the unit's other images travel as its *base* part. The actor that
writes a unit's last part merges its tiled images across seams and writes ``<output>/<unit>``
(one row per image, never per tile), then deletes the parts; a rerun skips the parts written.
Part rows report to the driver as not committed; only the merged unit counts.

Exactly-once invariant: ``<output>/<unit>`` exists <=> it holds exactly one row per image of the
unit. Each unit is a single Ray Data row, then a single entry of one group row (a row is never
split by Ray Data's bundling), and its file is written whole and atomically by the task that made
it; a retried task (actor death) rewrites the same files. A rerun skips units whose file exists.

Why not Ray Data's own ``write_parquet`` + ``CheckpointConfig(id_column="image_id")``: its
checkpoint is written after the data file, per block, so a crash between the two re-processes the
block on resume and leaves the first file too (duplicates: at-least-once, not exactly-once);
files are named by task uuid, so a rerun cannot tell finished work from a partial attempt; and
the checkpointed ids are loaded into memory before the run (grows with the images). The unit
file above is the smallest mechanism that keeps exactly-once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from model.errors import MaskrayError, error_text
from pipeline.infer.config import InferConfig
from pipeline.infer.predictor import Predictor
from pipeline.infer.stages import IMAGE_SUFFIXES, SegmentAndWrite, is_transient, read_groups, write_units
from pipeline.infer.tiles import delete_stale_parts
from pipeline.results import FORMAT as RESULTS_FORMAT
from pipeline.results import PROVENANCE, read_table, unit_names, write_coco_json
from pipeline.weights import read_model, reported_categories, source_format

logger = logging.getLogger(__name__)

MAX_RESTARTS = 2  # a dead model actor is restarted at most this often ...
MAX_TASK_RETRIES = 2  # ... and a unit retried on a new actor at most this often; then the run stops
PROGRESS_SECONDS = 10.0
TASK_IMAGES = 4096  # images per read task (several units of small images share one Ray task)
MAX_UNITS_PER_TASK = 64
READ_GROUPS_UNCONSUMED = 2  # groups a read task may leave for the model stage before it waits
# Groups queued on each model actor. Ray Data's default (2) left a CPU actor idle ~40 % of the
# time on 2 cores with one 100-image unit of 64-px images per task (~25 ms of work each): the
# driver's scheduling loop, sharing the cores, did not hand over the next one in time; with ~8 MB
# groups 4 still beat 2 (10.3/9.3 s vs 13.3/10.0 s). Each queued group pins its pixels in the
# object store: ~8 MB of small images, or one unit of large ones (8 x 12-MP = 288 MB at
# --images-per-unit 8). benchmarks/RESULTS.md, issue 13.
GROUPS_IN_FLIGHT_PER_ACTOR = 4
# Read tasks (so groups) per model actor at least, when there are enough units: more than one
# actor can hold queued, so the first actor up is never handed every group while the others start
# (2 per actor left the second of 2 CPU actors idle: 0.52x the loop instead of 0.9x).
TASKS_PER_ACTOR = GROUPS_IN_FLIGHT_PER_ACTOR + 1
# With --tile and more than one actor, the model stage starts handing out work only once its
# minimum actors are up (Ray Data's DataContext.wait_for_min_actors_s; then each part goes to the
# least busy actor): without it, the first actor up took the first GROUPS_IN_FLIGHT_PER_ACTOR tile
# parts of an image and the others had none (tests/integration/test_infer_tiled.py). The wait
# blocks the whole executor (the read tasks too) until the actors have loaded their model, so a
# single-actor run (the default) does not wait: its reads overlap the actor's start-up. Bounded,
# for a cluster that cannot place them: the run then stops with Ray's "Timed out while starting
# actors".
TILED_WAIT_FOR_ACTORS_S = 900


def units_per_task(images_per_unit: int, units: int | None = None, actors: int = 1) -> int:
    """Units per read task: ~:data:`TASK_IMAGES` images, at most :data:`MAX_UNITS_PER_TASK` units,
    and, for a run of ``units`` units on ``actors`` model actors, few enough to make
    :data:`TASKS_PER_ACTOR` tasks per actor (a group goes to one actor: 8 units in 4 groups were
    all queued on the first actor up, and the second stayed idle).

    Between one read task's end and the next one's start Ray Data spends 0.1-0.3 s on a 2-core
    node (the longer while the model actor imports torch), against ~15 ms of reading and
    decoding per 100-image unit of 64-px images: with one read task running at a time (the
    actor holds the other CPU), ten units per task kept the read stage idle over half the
    time (20,000 images in 200 units: 97 read before the actor's first model call at 5.0 s;
    with forty per task 167-174 by 5.8 s; benchmarks/RESULTS.md, "maskray infer plumbing").
    A task's units travel in ~8 MB groups (:func:`~pipeline.infer.stages.read_groups`), so a
    large unit (12-MP photos) never waits for the others, and a task holds at most
    :data:`READ_GROUPS_UNCONSUMED` unconsumed groups whatever its size.
    """
    per_task = max(1, min(MAX_UNITS_PER_TASK, TASK_IMAGES // max(1, images_per_unit)))
    if units is not None:
        per_task = min(per_task, max(1, -(-units // (TASKS_PER_ACTOR * max(1, actors)))))
    return per_task


@dataclasses.dataclass
class InferenceSummary:
    """What one ``run_inference`` call did (counts cover the units processed in this run)."""

    images: int = 0
    errors: int = 0
    instances: int = 0
    seconds: float = 0.0
    units_done: int = 0
    units_skipped: int = 0
    images_skipped: int = 0
    first_commit_seconds: float | None = None
    coco_json: str | None = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"images: {self.images}  errors: {self.errors}  instances: {self.instances}  "
                f"images/s: {self.images_per_second:.2f}  wall time: {self.seconds:.1f} s  "
                f"(units: {self.units_done} done, {self.units_skipped} skipped)")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One unit of work and of commit (see the module docstring)."""

    unit: str
    source: str  # "shard" | "files"
    uri: str = ""
    start: int = 0
    stop: int = 0
    total: int = 0
    paths: tuple[str, ...] = ()
    prefix: str = ""
    only: tuple[int, ...] = ()

    @property
    def images(self) -> int:
        return len(self.only) if self.only else (self.stop - self.start if self.source == "shard" else len(self.paths))

    def describe(self) -> str:
        if self.source == "shard":
            return f"{self.uri} rows {self.start}-{self.stop - 1}"
        return f"{len(self.paths)} files from {self.paths[0]}" if self.paths else self.unit

    def row(self) -> dict:
        d = dataclasses.asdict(self)
        d["paths"], d["only"] = list(self.paths), list(self.only)
        return d


def shard_name(shard_path: str) -> str:
    return shard_path.rstrip("/").rsplit("/", 1)[-1]


def plan_shard_units(name: str, uri: str, count: int, images_per_unit: int) -> list[Unit]:
    """Units of one shard: the whole shard when it fits ``images_per_unit`` (results file named
    like the shard), else consecutive row ranges of ``images_per_unit`` rows."""
    if count <= images_per_unit:
        return [Unit(name, "shard", uri, 0, count, count)]
    stem = name[:-len(".parquet")] if name.endswith(".parquet") else name
    return [Unit(f"{stem}.rows-{a:07d}-{min(a + images_per_unit, count):07d}.parquet", "shard", uri, a,
                 min(a + images_per_unit, count), count) for a in range(0, count, images_per_unit)]


def shard_unit_images(images: int, shard_bytes: int, images_per_unit: int, unit_bytes: int) -> int:
    """Images per unit of a shard of ``images`` images and ``shard_bytes`` bytes (its manifest
    entry; 0 = not recorded): ``images_per_unit``, fewer when the shard's mean bytes per image
    would put more than ``unit_bytes`` of it in one unit (0 = no byte bound); at least 1."""
    if unit_bytes <= 0 or shard_bytes <= 0 or images <= 0:
        return images_per_unit
    return max(1, min(images_per_unit, unit_bytes * images // shard_bytes))


def file_groups(sizes: Sequence[int], images_per_unit: int, unit_bytes: int) -> list[tuple[int, int]]:
    """``[start, stop)`` index ranges of consecutive files of ``sizes`` bytes: each range holds at most
    ``images_per_unit`` files and, unless one file alone is larger, at most ``unit_bytes`` bytes
    (0 = no byte bound)."""
    ranges, start, total = [], 0, 0
    for k, size in enumerate(sizes):
        full = k - start >= images_per_unit or (unit_bytes > 0 and k > start and total + size > unit_bytes)
        if full:
            ranges.append((start, k))
            start, total = k, 0
        total += size
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def plan(input_uri: str, images_per_unit: int, unit_bytes: int = 0) -> tuple[list[Unit], dict]:
    """``(units, input identity)`` of a dataset prefix (``manifest.json`` + shards) or of a raw
    prefix of image files (keyed by object path, sorted). A unit holds at most ``images_per_unit``
    images and about ``unit_bytes`` of encoded images at most (0 = no byte bound; a shard's units
    by its mean bytes per image, :func:`shard_unit_images`; files by their sizes,
    :func:`file_groups`)."""
    from pipeline import storage
    from pipeline.data.format import manifest_uri, read_manifest, shard_uris

    if storage.exists(manifest_uri(input_uri)):
        raw = storage.read_bytes(manifest_uri(input_uri))
        manifest = read_manifest(input_uri)
        units: list[Unit] = []
        names = set()
        for info, uri in zip(manifest.shards, shard_uris(input_uri, manifest)):
            name = shard_name(info.path)
            if name in names:
                raise MaskrayError(f"dataset {input_uri}: the manifest lists two shards named {name}, "
                                   "which would share one results file")
            names.add(name)
            per = shard_unit_images(int(info.images), int(info.bytes), images_per_unit, unit_bytes)
            units.extend(plan_shard_units(name, uri, int(info.images), per))
        return units, {"uri": input_uri, "kind": "shards", "manifest_sha256": hashlib.sha256(raw).hexdigest()}
    sizes = dict(storage.list_file_sizes(input_uri, suffixes=IMAGE_SUFFIXES))
    files = sorted(sizes)
    if not files:
        raise MaskrayError(f"--input {input_uri}: no manifest.json and no image files "
                           f"({', '.join(IMAGE_SUFFIXES)}) there")
    listing = "\n".join(f"{storage.relative(u, input_uri)}\t{sizes[u]}" for u in files)
    units = [Unit(f"files-{a:07d}-{b:07d}.parquet", "files", paths=tuple(files[a:b]), prefix=input_uri)
             for a, b in file_groups([sizes[u] for u in files], images_per_unit, unit_bytes)]
    return units, {"uri": input_uri, "kind": "files", "files": len(files),
                   "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()}


def model_digest(model_id: str) -> str:
    """The digest part of a model id (``<uri>#sha256:<hex>``,
    :attr:`pipeline.weights.ModelSource.model_id`): same bytes, same model."""
    return model_id.rsplit("#", 1)[-1]


# provenance keys that say where a model came from and what results name (a rerun naming the
# same bytes another way is the same run): recorded, never compared
INFORMATIONAL = ("model_source", "categories")


def check_provenance(output_uri: str, record: dict, *, overwrite: bool, existing: Sequence[str]) -> None:
    """The run record's rule for an output prefix (:mod:`pipeline.runrecord`): refuse (one line
    naming the first differences) when ``output_uri`` holds results made differently, unless
    ``overwrite`` (then the old results files are deleted); then record."""
    from pipeline import runrecord, storage

    uri = storage.join(output_uri, PROVENANCE)
    old = runrecord.read(uri)
    if old is None and existing and not overwrite:
        raise runrecord.RunChangedError(
            f"--output {output_uri} holds {len(existing)} results files but no {PROVENANCE} (made by another "
            "version or by hand); pass --overwrite to recompute them")
    from pipeline.config import field_defaults

    # results recorded before an option existed were made with its default (e.g. --tile off), or
    # with what it then meant: units planned by their image count alone
    defaults = {f"options.{key}": value for key, value in field_defaults(InferConfig).items()}
    defaults["options.unit_bytes"] = 0
    diff = runrecord.compare(old, record, ignore=INFORMATIONAL, what=f"--output {output_uri}", flag="--overwrite",
                             alternative="choose another --output", override=overwrite, defaults=defaults)
    if overwrite and (diff or existing):
        for name in existing:
            storage.delete(storage.join(output_uri, name))
        if existing:
            logger.info("--overwrite: deleted %d results files under %s", len(existing), output_uri)
    if old != record:
        runrecord.write(uri, record)


def transient_positions(uri: str) -> list[int]:
    """Positions of a results file's rows whose ``error`` may be transient."""
    errors = read_table(uri, columns=["error"]).column("error").to_pylist()
    return [i for i, e in enumerate(errors) if is_transient(e)]


def cpu_actor_threads(node_cpus: Sequence[float], actors: int) -> int:
    """Threads (``Predictor(threads=)``) for each of ``actors`` CPU model actors on nodes with
    ``node_cpus``: the cluster's CPUs shared out among the actors (at least 1, at most the
    largest node's); the model is the bottleneck on CPU (benchmarks/RESULTS.md, Inference)."""
    if actors < 1:
        raise MaskrayError(f"actors {actors} must be >= 1")
    cpus = [c for c in node_cpus if c > 0]
    if not cpus:
        return 1
    return max(1, min(int(max(cpus)), int(sum(cpus) // actors)))


class Progress:
    """Console progress (done / total images, images/s, ETA), at most every ``every`` seconds
    (None: :data:`PROGRESS_SECONDS`).

    With ``--tile`` an image counts only once its unit is merged, so a run over one 400-MP image
    would show nothing for minutes: tile parts count as they are written (:meth:`add_part`),
    each part once (a retried task may report one again), and the line adds ``tiles D/T of tiled
    images``: T the tiles of the tiled images begun so far (each part's name holds its image's
    tile count), D those written in this run. When a unit commits, its tiled images count as
    wholly tiled (parts written before a resume are never reported). Memory: the part names of
    the units not yet committed."""

    def __init__(self, total: int, every: float | None = None) -> None:
        self.total, self.every = total, PROGRESS_SECONDS if every is None else every
        self.done = 0
        self.tiles_done = self.tiles_total = 0
        # per uncommitted unit with tile parts: the part names seen, {tiled position: the
        # image's tiles}, the tiles counted
        self._parts: dict[str, set[str]] = {}
        self._image_tiles: dict[str, dict[int, int]] = {}
        self._counted: dict[str, int] = {}
        self.started = self.last = time.perf_counter()

    def add(self, images: int, unit: str | None = None) -> None:
        """``images`` more done: those of the committed ``unit``."""
        self.done += images
        if unit in self._parts:
            self.tiles_done += sum(self._image_tiles.pop(unit).values()) - self._counted.pop(unit)
            del self._parts[unit]
        self._log(force=self.done >= self.total)

    def add_part(self, unit: str, part: str) -> None:
        """A part of the uncommitted ``unit`` was written (``part``: its file name; a base or
        ``check`` row has no tiles and is not counted)."""
        from pipeline.infer.tiles import parse_parts

        _, found = parse_parts([part])
        if not found:
            return
        names = self._parts.setdefault(unit, set())
        if part in names:
            return
        names.add(part)
        ((position, (tiles, of)),) = found.items()
        image_tiles = self._image_tiles.setdefault(unit, {})
        if position not in image_tiles:
            image_tiles[position] = of
            self.tiles_total += of
        self._counted[unit] = self._counted.get(unit, 0) + tiles
        self.tiles_done += tiles
        self._log()

    def _log(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        seconds = max(now - self.started, 1e-9)
        rate = self.done / seconds
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        tiles = (f"; tiles {self.tiles_done}/{self.tiles_total} of tiled images, "
                 f"{self.tiles_done / seconds:.1f} tiles/s" if self.tiles_total else "")
        logger.info("progress: %d/%d images (%.0f%%), %.1f images/s, ETA %s%s", self.done, self.total,
                    100.0 * self.done / max(self.total, 1), rate, f"{eta:.0f} s" if eta != float("inf") else "?",
                    tiles)


def run_inference(config: InferConfig, *, predictor_factory: type[Predictor] | None = None,
                  on_unit_committed: Callable[[str], None] | None = None) -> InferenceSummary:
    """Segment every image under ``config.input`` (maskray shards, or a prefix of image files)
    into results files under ``config.output`` (see the module docstring and
    :class:`~pipeline.infer.config.InferConfig` for every setting).

    ``predictor_factory`` replaces :class:`Predictor` in the actor pool (same keyword arguments;
    ``config.tta`` is passed to it as ``tta=`` when set: ``pipeline.distill.tta.TTAPredictor``,
    the teacher's pseudo-labelling). ``on_unit_committed(name)`` is called in the driver as each
    unit's results file is committed. Units run :func:`units_per_task` to a read task, and
    travel to the model stage in groups (:func:`~pipeline.infer.stages.read_groups`).
    """
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline import storage

    dataset_uri, output_uri, checkpoint_uri = config.input, config.output, config.checkpoint
    actors, max_actors = config.actor_range, config.actor_range[1]
    gpus_per_actor, cpus_per_actor, threads = config.gpus_per_actor, config.cpus_per_actor, config.threads
    amp, tta = config.autocast, config.tta
    started = time.perf_counter()
    units, identity = plan(dataset_uri, config.images_per_unit, config.unit_bytes)
    # sizes, categories, digest: no model built
    model_config, _, extra, source = read_model(checkpoint_uri)
    category_ids = list(model_config.category_ids())
    record = {
        "format": RESULTS_FORMAT,
        "model": model_digest(source.model_id),
        # informational (a rerun naming the same bytes another way is the same run): where the
        # model came from, and the categories results name
        "model_source": source.record(source_format(extra)),
        "categories": reported_categories(model_config),
        "input": identity,
        # the config's result-changing fields, and the eval sizes of the model built from the file
        "options": {**config.result_settings(), "min_size": model_config.min_size,
                    "max_size": model_config.max_size, "category_ids": category_ids},
    }
    existing = unit_names(output_uri)
    check_provenance(output_uri, record, overwrite=config.overwrite, existing=existing)
    done = set() if config.overwrite else set(existing)
    if config.overwrite or config.tile:
        stale = delete_stale_parts(output_uri, None if config.overwrite else done)
        if stale:
            logger.info("deleted %d tile part files of committed or overwritten units", stale)
    summary = InferenceSummary()
    pending: list[Unit] = []
    for unit in units:
        if unit.unit not in done:
            pending.append(unit)
            continue
        if config.retry_errors:
            only = transient_positions(storage.join(output_uri, unit.unit))
            if only:
                pending.append(dataclasses.replace(unit, only=tuple(only)))
                continue
        summary.units_skipped += 1
        summary.images_skipped += unit.images
    logger.info("%d units to process (%d images), %d already done", len(pending),
                sum(u.images for u in pending), summary.units_skipped)
    for unit in [u for u in pending if u.images == 0]:  # empty shards: an empty file, no Ray
        write_units(_empty_unit_table(unit), output_uri=output_uri, category_ids=category_ids)
        summary.units_done += 1
    pending = [u for u in pending if u.images > 0]

    if pending:
        from pipeline import raysetup

        raysetup.init()
        resources = ray.cluster_resources()
        if gpus_per_actor is None:
            gpus_per_actor = 1.0 if resources.get("GPU", 0) > 0 else 0.0
        if cpus_per_actor is None:
            cpus_per_actor = 1.0
            spare = float(resources.get("CPU", 0)) - 1.0
            if not gpus_per_actor and spare > 0 and max_actors * cpus_per_actor > spare:
                cpus_per_actor = max(0.1, spare / max_actors)
        if gpus_per_actor:
            threads = 0
        elif threads is None:
            threads = cpu_actor_threads(
                [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")], max_actors)
        largest = max(u.images for u in pending)
        logger.info("model actors: %s x (%.2f CPU, %.2f GPU, %s torch threads), batch size %d, %d units of up to %d "
                    "images", config.actors, cpus_per_actor, gpus_per_actor, threads or "default", config.batch_size,
                    len(pending), largest)
        sizes = ({"min_size": actors[0], "max_size": actors[1]} if actors[0] != actors[1] else {"size": actors[0]})
        compute = ActorPoolStrategy(**sizes, max_tasks_in_flight_per_actor=GROUPS_IN_FLIGHT_PER_ACTOR)
        per_task = units_per_task(largest, len(pending), max_actors)
        ds = ray.data.from_items([u.row() for u in pending], override_num_blocks=-(-len(pending) // per_task))
        # invariant: every output row (a group of units, then one unit's metadata) is its own
        # block, so the model stage starts on a group as soon as it is read, and each unit's
        # metadata reaches the driver when committed.
        ds.context.target_max_block_size = 1
        if config.tile and actors[0] > 1:
            ds.context.wait_for_min_actors_s = TILED_WAIT_FOR_ACTORS_S
        _unblock_model_outputs(ds.context)
        # batch_size=None: a read call sees its task's units (to group them); batch_size=1 in the
        # model stage: every call sees one whole group.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            tiling = None if not config.tile else {
                "tile": config.tile, "overlap": config.tile_overlap, "full_pass": config.tile_full_pass,
                "model_size": (model_config.min_size, model_config.max_size), "output_uri": output_uri,
                "max_whole_pixels": config.whole_pixel_limit}
            ds = ds.map_batches(read_groups, batch_size=None, batch_format="pyarrow",
                                fn_kwargs={"max_pixels": config.pixel_limit, "exif": config.exif,
                                           "intensity": config.intensity, "tiling": tiling},
                                # Ray Data's default: a read task waits once 2 of its groups are
                                # unconsumed (large units: the object store's backpressure holds);
                                # two objects per block (the block and its metadata)
                                _generator_backpressure_num_objects=2 * READ_GROUPS_UNCONSUMED)
            ds = ds.map_batches(
                SegmentAndWrite, batch_size=1, batch_format="pyarrow", compute=compute,
                num_gpus=gpus_per_actor, num_cpus=cpus_per_actor,
                fn_constructor_kwargs={"output_uri": output_uri, "category_ids": category_ids,
                                       "predictor_factory": predictor_factory,
                                       "checkpoint_uri": checkpoint_uri,
                                       "score_threshold": config.score_threshold,
                                       "threads": threads, "batch_size": config.batch_size, "amp": amp,
                                       **({"tta": tta} if tta is not None else {})},
                # Bounded: a unit that kills its actor every time stops the run after a few tries
                # (never an endless restart loop); retried units rewrite the same file.
                max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES,
            )
        _watch(ds, pending, summary, started, on_unit_committed)

    summary.seconds = time.perf_counter() - started
    if config.coco_json is not None:
        write_coco_json(output_uri, [u.unit for u in units], config.coco_json)
        summary.coco_json = config.coco_json
    return summary


def _unblock_model_outputs(context: Any) -> None:
    """Let a model-stage task yield the metadata rows of all its units (<= :data:`MAX_UNITS_PER_TASK`,
    a few bytes each) without waiting for the driver to take them. Ray Data's default (2
    unconsumed blocks per task, then the task blocks until the driver's scheduling loop takes
    one) left the model actor idle ~40 % of a run on 2 cores. The read stage sets its own bound."""
    if not hasattr(context, "_max_num_blocks_in_streaming_gen_buffer"):
        raise MaskrayError("this Ray Data has no DataContext._max_num_blocks_in_streaming_gen_buffer "
                           "(maskray is pinned to Ray 2.60)")
    context._max_num_blocks_in_streaming_gen_buffer = MAX_UNITS_PER_TASK


def _empty_unit_table(unit: Unit) -> Any:
    import pyarrow as pa

    return pa.table({"unit": [unit.unit], "positions": pa.array([[]], pa.list_(pa.int64())),
                     "image_ids": pa.array([[]], pa.list_(pa.int64())), "file_names": pa.array([[]], pa.list_(pa.string())),
                     "heights": pa.array([[]], pa.list_(pa.int32())), "widths": pa.array([[]], pa.list_(pa.int32())),
                     "errors": pa.array([[]], pa.list_(pa.string())), "preds": pa.array([[]], pa.list_(pa.large_binary())),
                     "merge": [False], "model": [""]})


def _watch(ds: Any, pending: list[Unit], summary: InferenceSummary, started: float,
           on_unit_committed: Callable[[str], None] | None) -> None:
    """Consume the metadata rows (counts only), log progress, and stop with the units left when
    the pipeline fails."""
    left = {u.unit: u for u in pending}
    progress = Progress(sum(u.images for u in pending))
    # prefetch_batches=0: with prefetching, Ray Data hands over a block only once the next one is
    # ready, so every commit would be reported one unit late (and the last until the end).
    batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0))
    try:
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as exc:  # a stage failed for good (bounded retries spent)
                raise MaskrayError(f"inference stopped ({error_text(exc)}); {len(left)} units not committed: "
                                   f"{_name_units(left.values())}; finished units are kept, rerun to resume") from exc
            for row in batch.to_pylist():
                if row.get("part") and row["unit"] in left:
                    progress.add_part(row["unit"], row["part"])
                if not row.get("committed", True):
                    continue  # a tile part written; its unit is committed by the last part's merge
                if left.pop(row["unit"], None) is None:
                    continue  # a retried unit reported twice: its file was rewritten whole
                if summary.first_commit_seconds is None:
                    summary.first_commit_seconds = time.perf_counter() - started
                summary.units_done += 1
                summary.images += row["images"]
                summary.errors += row["errors"]
                summary.instances += row["instances"]
                progress.add(row["images"], row["unit"])
                if on_unit_committed is not None:
                    on_unit_committed(row["unit"])
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # stops the streaming executor at once when the caller raised
    if left:
        raise MaskrayError(f"inference ended with {len(left)} units not committed: {_name_units(left.values())}; "
                           "rerun to finish them")


def _name_units(units: Any, limit: int = 5) -> str:
    units = list(units)
    text = ", ".join(u.describe() for u in units[:limit])
    return text + (f" and {len(units) - limit} more" if len(units) > limit else "")

