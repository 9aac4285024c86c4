"""The stages of ``run_inference``: read + decode a unit (CPU task); model + post-process + write a unit (actor).

A *unit* is the pipeline's unit of work and of commit: a bounded row range of one input shard,
or a bounded list of image files of a raw prefix. It travels as ONE Ray Data row from start to
end (so no bundling or block slicing can ever split it), and ends as one results file
``<output>/<unit name>`` written atomically by :func:`write_units` in the model actor
(:class:`SegmentAndWrite`): result bytes never pass through the driver.

Unit row (planned by :mod:`pipeline.infer.driver`): ``unit`` (results file name), ``source``
("shard" | "files"), ``uri`` (the shard), ``start``/``stop``/``total`` (shard rows), ``paths``
(object URIs of a files unit), ``prefix`` (the raw prefix, for stable ids), ``only`` (positions
to recompute with ``--retry-errors``; empty = all).

Decoded unit (:func:`read_units`): ``unit``, ``positions`` (list<int64>: 0-based position in
the unit), ``image_ids``, ``file_names``, ``heights``/``widths`` (original frame, after EXIF),
``pixels`` (list<large_binary>: uint8 ``[3,H,W]``, C-contiguous, the original size: the model
stage resizes and normalizes on its device), ``errors`` (list<string>, null = fine), ``merge``.

Group (:func:`read_groups`, what travels from the read stage to the model stage): consecutive
decoded units of one read task, about :data:`GROUP_BYTES` of pixels (a larger unit is a group
alone), as ONE row whose every column is the list of its units' values (:func:`group` /
:func:`ungroup`, zero-copy). Small units travel together (one Ray object, one model-stage task
per group: Ray Data's per-block cost is paid per ~8 MB, not per unit), while the model stage still
commits and reports every unit on its own (:class:`SegmentAndWrite` yields one metadata row per
unit as soon as its file is written).

Error rows: ``read failed``/``inference failed`` can be transient (``--retry-errors`` recomputes
them); ``decode failed``/``post-processing failed`` are the image's own fault.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from model.errors import MaskrayError, error_text

# invariant: this module imports neither torch nor the model at module level, so the read tasks'
# worker processes never import them (torch + torchvision cost ~5 s of one core per cold process
# here); only the post-processing (in the model actor) imports torch, lazily.

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
TRANSIENT_ERRORS = ("read failed:", "inference failed:")
STORAGE_ATTEMPTS = 4  # tries of one storage call on a transient error (backoff 0.5, 1, 2 s + jitter)
# Pixels per group (bytes). One Ray Data block per 100-image unit of 64-px images cost the driver's
# executor ~15 ms of CPU per unit, a third of a 2-core run's wall time; groups of ~8 MB cut the
# run's wall time ~20 % (benchmarks/RESULTS.md, issue 13 item 4). A group ships as one object.
GROUP_BYTES = 8 * 2**20
_PERMANENT_HINTS = ("not found", "no such file", "does not exist", "nosuchkey", "nosuchbucket", "access denied",
                    "forbidden", "invalidaccesskeyid", "signaturedoesnotmatch")

T = TypeVar("T")


def is_transient(error: str | None) -> bool:
    """Whether a stored row error may go away on a retry (``--retry-errors``)."""
    return error is not None and error.startswith(TRANSIENT_ERRORS)


def with_retries(call: Callable[[], T], what: str, attempts: int = STORAGE_ATTEMPTS,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, retried with exponential backoff and jitter on transient storage errors
    (throttling, 5xx, timeouts, dropped connections: any ``OSError`` not naming a missing object
    or a credential problem); the last error is raised."""
    for attempt in range(attempts):
        try:
            return call()
        except OSError as exc:
            text = str(exc).lower()
            if attempt + 1 >= attempts or isinstance(exc, FileNotFoundError) or any(h in text for h in _PERMANENT_HINTS):
                raise
            delay = 0.5 * 2 ** attempt * (1 + random.random() / 2)
            logger.warning("%s: %s; retrying in %.1f s", what, error_text(exc), delay)
            sleep(delay)
    raise AssertionError("unreachable")


def stable_image_id(relative_path: str) -> int:
    """A 63-bit id of a raw image from its path under the input prefix (stable across reruns and copies)."""
    return int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big") >> 1


# --------------------------------------------------------------------------- decode


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """``[C,H,W]`` pixels as an image viewer shows them for an EXIF ``orientation`` (as
    ``PIL.ImageOps.exif_transpose``); C-contiguous."""
    ops = {
        1: lambda x: x,
        2: lambda x: np.flip(x, -1),
        3: lambda x: np.flip(x, (-1, -2)),
        4: lambda x: np.flip(x, -2),
        5: lambda x: np.swapaxes(x, -1, -2),
        6: lambda x: np.rot90(x, -1, (-2, -1)),
        7: lambda x: np.flip(np.swapaxes(x, -1, -2), (-1, -2)),
        8: lambda x: np.rot90(x, 1, (-2, -1)),
    }
    return np.ascontiguousarray(ops[orientation](image))


def decode_pixels(data: bytes | None, *, max_pixels: int | None, exif: bool = True,
                  intensity: str | None = None) -> np.ndarray:
    """Encoded bytes -> uint8 ``[3,H,W]`` numpy array, C-contiguous (``pipeline.data.decode.decode_array``:
    one-line errors for empty, corrupt, truncated or over-``max_pixels`` data; ``intensity`` maps
    16/32-bit images, None = its default), EXIF orientation applied unless ``exif`` is False."""
    from pipeline.data.decode import DEFAULT_INTENSITY, decode_array_oriented

    image, orientation = decode_array_oriented(data, max_pixels=max_pixels, intensity=intensity or DEFAULT_INTENSITY)
    return apply_orientation(image.transpose(2, 0, 1), orientation if exif else 1)


def decode(data: bytes | None, *, max_pixels: int | None, exif: bool = True, intensity: str | None = None):
    """:func:`decode_pixels` as a ``torch.uint8`` tensor ``[3,H,W]``."""
    import torch

    return torch.from_numpy(decode_pixels(data, max_pixels=max_pixels, exif=exif, intensity=intensity))


# --------------------------------------------------------------------------- read + decode


def _read_shard_rows(unit: dict) -> tuple[list[int], list[str], list[bytes | None]]:
    """``(image_ids, file_names, image bytes)`` of rows ``start..stop-1`` of a shard (only the
    row groups overlapping the range are fetched)."""
    import pyarrow.parquet as pq

    from pipeline import storage

    start, stop = int(unit["start"]), int(unit["stop"])

    def read():
        fs, path = storage.resolve(unit["uri"])
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            if parquet.metadata.num_rows != unit["total"]:
                raise MaskrayError(f"shard {unit['uri']} has {parquet.metadata.num_rows} rows but the manifest "
                                   f"says {unit['total']}; the dataset is inconsistent")
            groups, first, offset = [], None, 0
            for g in range(parquet.num_row_groups):
                n = parquet.metadata.row_group(g).num_rows
                if offset < stop and offset + n > start:
                    groups.append(g)
                    first = offset if first is None else first
                offset += n
            return parquet.read_row_groups(groups, columns=["image_id", "file_name", "image"]).slice(
                start - first, stop - start)

    table = with_retries(read, f"reading {unit['uri']}")
    return (table.column("image_id").to_pylist(), table.column("file_name").to_pylist(),
            table.column("image").to_pylist())


def read_units(batch: Any, *, max_pixels: int | None, exif: bool = True, intensity: str | None = None) -> Any:
    """Ray Data stage: unit rows -> decoded units (see the module docstring). A row whose image
    cannot be read or decoded carries ``error`` from here on; a shard that cannot be read after
    :data:`STORAGE_ATTEMPTS` tries fails the task (Ray Data then stops the run naming it)."""
    import pyarrow as pa

    from pipeline import storage

    out: dict[str, list] = {k: [] for k in ("unit", "positions", "image_ids", "file_names", "heights", "widths",
                                            "pixels", "errors", "merge")}
    for unit in batch.to_pylist():
        if unit["source"] == "shard":
            ids, names, datas = _read_shard_rows(unit)
            read_errors: list[str | None] = [None] * len(ids)
        else:
            ids, names, datas, read_errors = [], [], [], []
            for uri in unit["paths"]:
                ids.append(stable_image_id(storage.relative(uri, unit["prefix"])))
                names.append(uri)
                try:
                    datas.append(with_retries(lambda uri=uri: storage.read_bytes(uri), f"reading {uri}"))
                    read_errors.append(None)
                except Exception as exc:  # noqa: BLE001 - an unreadable object is its own error row
                    datas.append(None)
                    read_errors.append(f"read failed: {error_text(exc)}")
        positions = list(unit["only"]) or list(range(len(ids)))
        heights, widths, pixels, errors = [], [], [], []
        for p in positions:
            error = read_errors[p]
            h = w = 0
            blob = b""
            if error is None:
                try:
                    image = decode_pixels(datas[p], max_pixels=max_pixels, exif=exif, intensity=intensity)
                    h, w = int(image.shape[-2]), int(image.shape[-1])
                    blob = memoryview(image).cast("B")  # C-contiguous: pyarrow copies it once
                except Exception as exc:  # noqa: BLE001 - a bad image is an error row, never a crash
                    error = f"decode failed: {error_text(exc)}"
            heights.append(h)
            widths.append(w)
            pixels.append(blob)
            errors.append(error)
        out["unit"].append(unit["unit"])
        out["positions"].append(positions)
        out["image_ids"].append([int(ids[p]) for p in positions])
        out["file_names"].append([names[p] for p in positions])
        out["heights"].append(heights)
        out["widths"].append(widths)
        out["pixels"].append(pixels)
        out["errors"].append(errors)
        out["merge"].append(bool(unit["only"]))
    types = {"unit": pa.string(), "positions": pa.list_(pa.int64()), "image_ids": pa.list_(pa.int64()),
             "file_names": pa.list_(pa.string()), "heights": pa.list_(pa.int32()), "widths": pa.list_(pa.int32()),
             "pixels": pa.list_(pa.large_binary()), "errors": pa.list_(pa.string()), "merge": pa.bool_()}
    return pa.table({k: pa.array(v, types[k]) for k, v in out.items()})


def pixel_bytes(table: Any) -> int:
    """Bytes of pixels in a decoded-units table (what one stage ships to the model stage)."""
    return int(sum(len(b) for b in table.column("pixels").combine_chunks().flatten().to_pylist()))


def group(units: Any) -> Any:
    """Decoded units (one row each) -> ONE row whose every column is the list of the units' values."""
    import pyarrow as pa

    offsets = pa.array([0, units.num_rows], pa.int32())
    return pa.table({name: pa.ListArray.from_arrays(offsets, units.column(name).combine_chunks())
                     for name in units.column_names})


def ungroup(groups: Any) -> Any:
    """Group rows (:func:`group`) -> their decoded units, one row each, in order (zero-copy)."""
    import pyarrow as pa

    return pa.table({name: groups.column(name).combine_chunks().flatten() for name in groups.column_names})


def read_groups(batch: Any, *, max_pixels: int | None, exif: bool = True, intensity: str | None = None,
                group_bytes: int = GROUP_BYTES) -> Iterator[Any]:
    """Ray Data stage (generator): a read task's unit rows -> :func:`read_units` one unit at a
    time, yielded in groups (:func:`group`) of consecutive units holding >= ``group_bytes`` of
    pixels (the last group may hold less); a unit of that size or more is a group alone, yielded
    as soon as it is decoded."""
    import pyarrow as pa

    pending, size = [], 0
    for k in range(batch.num_rows):
        decoded = read_units(batch.slice(k, 1), max_pixels=max_pixels, exif=exif, intensity=intensity)
        pending.append(decoded)
        size += decoded.column("pixels").nbytes
        if size >= group_bytes:
            yield group(pa.concat_tables(pending))
            pending, size = [], 0
    if pending:
        yield group(pa.concat_tables(pending))


# --------------------------------------------------------------------------- post-process + write


def unit_table(unit: dict, category_ids: Sequence[int]) -> Any:
    """One model-stage output row -> a :data:`pipeline.results.RESULT_SCHEMA` table of its images
    (in unit order); its ``preds`` are packed (:func:`~pipeline.infer.predictor.pack`) or numpy
    dicts (``boxes``, ``labels``, ``scores``, and ``masks`` and/or ``keypoints`` [N, K, 3] when the
    model has them: :func:`pipeline.results.to_result_instances`)."""
    from pipeline.infer.predictor import unpack
    from pipeline.results import result_table, to_result_instances

    errors = list(unit["errors"])
    instances: list[list[dict]] = []
    for k, pred in enumerate(unit["preds"]):
        if errors[k] is not None or pred is None:
            instances.append([])
            continue
        try:
            p = unpack(pred) if isinstance(pred, bytes) else pred
            if "instances" in p:  # made by the predictor itself (pipeline.distill.tta.TTAPredictor)
                instances.append(p["instances"])
                continue
            instances.append(to_result_instances(p["boxes"], p["labels"], p["scores"], p.get("masks"),
                                                 unit["heights"][k], unit["widths"][k], category_ids,
                                                 keypoints=p.get("keypoints")))
        except Exception as exc:  # noqa: BLE001
            errors[k] = f"post-processing failed: {error_text(exc)}"
            instances.append([])
    return result_table(unit["image_ids"], unit["file_names"], instances, errors, unit["model"])


def write_units(batch: Any, *, output_uri: str, category_ids: Sequence[int]) -> Any:
    """Model-stage rows (a ``pyarrow.Table``, or the unit dicts of
    :meth:`~pipeline.infer.predictor.Predictor.run_units`) -> one results file per unit, each written atomically
    by :func:`pipeline.results.write_unit` (storage calls retried on transient errors: :func:`with_retries`);
    returns small metadata rows only (``unit``, ``images``, ``errors``, ``transient``,
    ``instances``, ``pixel_bytes``). A retried task rewrites the same complete file, so a unit's
    file always holds exactly one row per image of the unit."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.results import write_unit

    meta: dict[str, list] = {k: [] for k in ("unit", "images", "errors", "transient", "instances")}
    for unit in (batch if isinstance(batch, list) else batch.to_pylist()):
        table = write_unit(output_uri, unit["unit"], unit_table(unit, category_ids),
                           positions=unit["positions"] if unit["merge"] else None, attempt=with_retries)
        errors = [e for e in table.column("error").to_pylist() if e is not None]
        meta["unit"].append(unit["unit"])
        meta["images"].append(len(unit["positions"]))
        meta["errors"].append(len(errors))
        meta["transient"].append(sum(is_transient(e) for e in errors))
        meta["instances"].append(int(pc.sum(pc.list_value_length(table.column("instances"))).as_py() or 0))
    return pa.table(meta)


class SegmentAndWrite:
    """Ray Data model stage (actor): groups of decoded units (:func:`read_groups`) -> per unit, the
    model (a :class:`~pipeline.infer.predictor.Predictor`, or ``predictor_factory``, built with
    ``predictor_kwargs``) -> :func:`write_units` (per-instance paste + RLE, one results file per
    unit, written atomically here) -> its metadata row, yielded at once (one Ray Data block per
    unit, so the driver hears of each commit when it happens).

    A group killed mid-way (the actor died) is retried whole on a new actor: its units rewrite the
    same files, so the exactly-once invariant of :func:`write_units` holds (the driver ignores a
    unit reported twice). On a GPU actor the paste and
    RLE run on the actor's CPU after the unit's last batch (milliseconds per image at 800 px,
    0.17 s for 100 instances on a 12-MP photo: benchmarks/RESULTS.md); the GPU waits that long."""

    def __init__(self, *, output_uri: str, category_ids: Sequence[int], predictor_factory: Any = None,
                 **predictor_kwargs: Any) -> None:
        from pipeline.infer.predictor import Predictor

        self.predictor = (predictor_factory or Predictor)(**predictor_kwargs)
        self.output_uri = output_uri
        self.category_ids = list(category_ids)

    def __call__(self, groups: Any) -> Iterator[Any]:
        units = ungroup(groups)
        for k in range(units.num_rows):
            # the predictions stay numpy arrays in this process: never pickled between model and write
            yield write_units(self.predictor.run_units(units.slice(k, 1)), output_uri=self.output_uri,
                              category_ids=self.category_ids)
