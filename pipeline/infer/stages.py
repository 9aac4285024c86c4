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

Tiled read (``--tile``, :func:`tiled_rows`): a unit's images larger than the tile size become
*part* rows (a few tiles of one image each, cut from one open image source: a TIFF region
reader, or the image decoded whole once), then the unit's other images one *base* row; decoded
rows then also carry ``part`` (the part file name; null for a plain unit, ``check`` for a merge
check), ``regions`` (per tile ``[x0, y0, x1, y1]`` in the full image), ``full_size`` (``[H, W]``)
and ``tiled`` (the base's JSON: tiled positions and tile counts). :func:`write_units` writes parts
under ``<output>/_tiles/<unit>/`` and the actor writing the last one merges the unit
(:mod:`pipeline.infer.tiles`).

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


def fetch_unit(unit: dict, lazy: Callable[[str], bool] | None = None
               ) -> tuple[list[int], list[str], list[bytes | str | None], list[str | None]]:
    """``(image_ids, file_names, image bytes, read errors)`` of a unit row (its shard rows, or its
    files read whole; a files unit's path for which ``lazy(path)`` is true is given as its URI, for
    a region reader to open); an unreadable file is its own ``read failed`` error."""
    from pipeline import storage

    if unit["source"] == "shard":
        ids, names, datas = _read_shard_rows(unit)
        return ids, names, list(datas), [None] * len(ids)
    ids, names, datas, read_errors = [], [], [], []
    for uri in unit["paths"]:
        ids.append(stable_image_id(storage.relative(uri, unit["prefix"])))
        names.append(uri)
        if lazy is not None and lazy(uri):
            datas.append(uri)
            read_errors.append(None)
            continue
        try:
            datas.append(with_retries(lambda uri=uri: storage.read_bytes(uri), f"reading {uri}"))
            read_errors.append(None)
        except Exception as exc:  # noqa: BLE001 - an unreadable object is its own error row
            datas.append(None)
            read_errors.append(f"read failed: {error_text(exc)}")
    return ids, names, datas, read_errors


def read_units(batch: Any, *, max_pixels: int | None, exif: bool = True, intensity: str | None = None) -> Any:
    """Ray Data stage: unit rows -> decoded units (see the module docstring). A row whose image
    cannot be read or decoded carries ``error`` from here on; a shard that cannot be read after
    :data:`STORAGE_ATTEMPTS` tries fails the task (Ray Data then stops the run naming it)."""
    import pyarrow as pa

    out: dict[str, list] = {k: [] for k in ("unit", "positions", "image_ids", "file_names", "heights", "widths",
                                            "pixels", "errors", "merge")}
    for unit in batch.to_pylist():
        ids, names, datas, read_errors = fetch_unit(unit)
        positions = list(unit["only"]) or list(range(len(ids)))
        heights, widths, pixels, errors = [], [], [], []
        for p in positions:
            error = read_errors[p]
            h = w = 0
            image = None
            if error is None:
                try:
                    image = decode_pixels(datas[p], max_pixels=max_pixels, exif=exif, intensity=intensity)
                    h, w = int(image.shape[-2]), int(image.shape[-1])
                except Exception as exc:  # noqa: BLE001 - a bad image is an error row, never a crash
                    error = f"decode failed: {error_text(exc)}"
            heights.append(h)
            widths.append(w)
            pixels.append(image)
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
             "errors": pa.list_(pa.string()), "merge": pa.bool_()}
    return pa.table({k: pixel_lists(v) if k == "pixels" else pa.array(v, types[k]) for k, v in out.items()})


def pixel_lists(rows: Sequence[Sequence[np.ndarray | None]]) -> Any:
    """The ``pixels`` column: per row, its images (uint8 ``[3,h,w]``; None = no pixels, an
    error row) as a ``list<large_binary>`` array, the bytes of each image in C order, copied
    once into one buffer.

    Built from buffers, never by ``pa.array`` of memoryviews: pyarrow (26.0.1) never releases
    the object behind a memoryview it converts, so every decoded image stayed in the read
    worker for good (+3 MB per 1024-px tile: 3.7 GB peak RSS for one 20,000^2 PNG with
    ``--tile 1024``, tests/integration/test_infer_tiled_memory.py)."""
    import pyarrow as pa

    images = [im for row in rows for im in row]
    offsets = np.zeros(len(images) + 1, dtype=np.int64)
    np.cumsum([0 if im is None else im.nbytes for im in images], out=offsets[1:])
    data = np.empty(int(offsets[-1]), dtype=np.uint8)
    for im, start, stop in zip(images, offsets[:-1], offsets[1:]):
        if im is not None:
            data[start:stop] = im.reshape(-1)
    values = pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(images),
                                              [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    row_offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(row) for row in rows], out=row_offsets[1:])
    return pa.ListArray.from_arrays(pa.array(row_offsets, pa.int32()), values)


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
                group_bytes: int = GROUP_BYTES, tiling: dict | None = None) -> Iterator[Any]:
    """Ray Data stage (generator): a read task's unit rows -> :func:`read_units` one unit at a
    time (with ``tiling``, :func:`tiled_rows`: a unit's tile parts and base), yielded in groups
    (:func:`group`) of consecutive rows holding >= ``group_bytes`` of pixels (the last group may
    hold less); a row of that size or more is a group alone, yielded as soon as it is decoded."""
    import pyarrow as pa

    def decoded_rows() -> Iterator[Any]:
        for k in range(batch.num_rows):
            if tiling is None:
                yield read_units(batch.slice(k, 1), max_pixels=max_pixels, exif=exif, intensity=intensity)
            else:
                yield from tiled_rows(batch.slice(k, 1).to_pylist()[0], max_pixels=max_pixels, exif=exif,
                                      intensity=intensity, **tiling)

    pending, size = [], 0
    for decoded in decoded_rows():
        if tiling is not None and decoded.column("regions")[0].as_py():
            # a tile part is a group alone: the parts of one image spread over the actors
            if pending:
                yield group(pa.concat_tables(pending))
                pending, size = [], 0
            yield group(decoded)
            continue
        pending.append(decoded)
        size += decoded.column("pixels").nbytes
        if size >= group_bytes:
            yield group(pa.concat_tables(pending))
            pending, size = [], 0
    if pending:
        yield group(pa.concat_tables(pending))


# --------------------------------------------------------------------------- tiled read (--tile)

TIFF_SUFFIXES = (".tif", ".tiff")
SHRINK_STRIP_PIXELS = 16 * 2**20  # pixels of the full image per strip when shrinking it for the whole-image pass


class ArrayRegions:
    """The :class:`pipeline.data.regions.RegionSource` interface over an image decoded whole
    (uint8 ``[3,H,W]``, EXIF orientation applied): PNG, JPEG and the rest."""

    def __init__(self, chw: np.ndarray) -> None:
        self.chw = chw
        self.height, self.width = int(chw.shape[1]), int(chw.shape[2])

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """uint8 ``[y1-y0, x1-x0, 3]`` (a view)."""
        return self.chw[:, y0:y1, x0:x1].transpose(1, 2, 0)

    def read_chw(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """uint8 ``[3, y1-y0, x1-x0]``, C-contiguous (one copy of the region)."""
        return np.ascontiguousarray(self.chw[:, y0:y1, x0:x1])


def is_region_readable(data: bytes | str | None) -> bool:
    """Whether an image given by URI is a TIFF a region reader opens without fetching it whole
    (by its suffix): the tiled read passes such files' URIs, not their bytes."""
    return isinstance(data, str) and data.lower().endswith(TIFF_SUFFIXES)


def open_source(data: bytes | str | None, *, max_pixels: int | None, max_whole_pixels: int | None,
                exif: bool = True, intensity: str | None = None) -> Any:
    """A region source (``width``, ``height``, ``read(x0, y0, x1, y1)`` -> uint8 HWC) of an image
    (bytes or URI): :func:`pipeline.data.regions.open_regions` (a tiled TIFF / BigTIFF region by
    region, ``max_pixels`` per region; any other format decoded once in Pillow's own mode,
    ``max_whole_pixels`` for the whole). An image whose EXIF orientation must be applied (``exif``,
    orientation other than 1: photos) is decoded whole and turned (:func:`decode_pixels`), as the
    plain path does."""
    from pipeline import storage
    from pipeline.data.decode import DEFAULT_INTENSITY
    from pipeline.data.regions import open_regions

    source = open_regions(data, max_region_pixels=max_pixels, max_whole_pixels=max_whole_pixels,
                          intensity=intensity or DEFAULT_INTENSITY)
    if not exif or source.orientation == 1:
        return source
    source.close()
    if isinstance(data, str):
        data = with_retries(lambda: storage.read_bytes(data), f"reading {data}")
    return ArrayRegions(decode_pixels(data, max_pixels=max_whole_pixels, exif=exif, intensity=intensity))


def _close(source: Any) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        close()


def region_chw(source: Any, box: Sequence[int]) -> np.ndarray:
    """uint8 ``[3, y1-y0, x1-x0]`` C-contiguous pixels of ``box`` (x0, y0, x1, y1) of a source."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if isinstance(source, ArrayRegions):
        return source.read_chw(x0, y0, x1, y1)
    return np.ascontiguousarray(np.asarray(source.read(x0, y0, x1, y1)).transpose(2, 0, 1))


def shrink_chw(source: Any, size: tuple[int, int], max_region_pixels: int | None = None) -> np.ndarray:
    """The whole image of a source shrunk to ``size`` (width, height), uint8 ``[3,h,w]``: read in
    strips of about :data:`SHRINK_STRIP_PIXELS`, each resized with Pillow (bilinear, antialiased),
    so memory is one strip beside the output."""
    from PIL import Image

    tw, th = int(size[0]), int(size[1])
    width, height = int(source.width), int(source.height)
    strip = max(1, min(SHRINK_STRIP_PIXELS, max_region_pixels or SHRINK_STRIP_PIXELS) // width)
    out = np.empty((th, tw, 3), dtype=np.uint8)
    for y0 in range(0, height, strip):
        y1 = min(height, y0 + strip)
        t0, t1 = round(y0 * th / height), round(y1 * th / height)
        if t1 > t0:
            pixels = np.ascontiguousarray(source.read(0, y0, width, y1))
            out[t0:t1] = np.asarray(Image.fromarray(pixels).resize((tw, t1 - t0), Image.BILINEAR))
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def tile_chw(source: Any, boxes: Sequence[Sequence[int]], k: int, *, model_size: Sequence[int],
             max_pixels: int | None) -> np.ndarray:
    """uint8 ``[3,h,w]`` pixels of the ``k``-th model input of a tiled image whose tiles are
    ``boxes`` (:func:`pipeline.infer.tiles.tile_region`): tile ``boxes[k]`` at native resolution,
    or, for ``k == len(boxes)`` (``--tile-full-pass``), the whole image shrunk to ``model_size``
    (min, max) by :func:`pipeline.infer.tiles.full_pass_size` (:func:`shrink_chw`, strips of at
    most ``max_pixels``). The read stage and in-process tiling
    (:func:`pipeline.infer.tiles.segment_tiled`) both cut pixels here."""
    from pipeline.infer import tiles

    if k < len(boxes):
        return region_chw(source, boxes[k])
    width, height = int(source.width), int(source.height)
    return shrink_chw(source, tiles.full_pass_size(width, height, *model_size), max_pixels)


def decoded_row(unit: dict, positions: list[int], image_ids: list[int], file_names: list[str],
                images: list[np.ndarray | None], errors: list[str | None], *, part: str | None,
                regions: list[Sequence[int]] = (), full_size: Sequence[int] = (), tiled: str = "") -> Any:
    """One decoded row of the tiled read (the columns of :func:`read_units` and ``part``,
    ``regions``, ``full_size``, ``tiled``: see the module docstring); ``images`` uint8 ``[3,h,w]``
    (None for an error row)."""
    import pyarrow as pa

    heights = [0 if im is None else int(im.shape[1]) for im in images]
    widths = [0 if im is None else int(im.shape[2]) for im in images]
    return pa.table({
        "unit": pa.array([unit["unit"]], pa.string()),
        "positions": pa.array([positions], pa.list_(pa.int64())),
        "image_ids": pa.array([[int(i) for i in image_ids]], pa.list_(pa.int64())),
        "file_names": pa.array([file_names], pa.list_(pa.string())),
        "heights": pa.array([heights], pa.list_(pa.int32())),
        "widths": pa.array([widths], pa.list_(pa.int32())),
        "pixels": pixel_lists([images]),
        "errors": pa.array([errors], pa.list_(pa.string())),
        "merge": pa.array([bool(unit["only"])], pa.bool_()),
        "part": pa.array([part], pa.string()),
        "regions": pa.array([[list(map(int, r)) for r in regions]], pa.list_(pa.list_(pa.int64()))),
        "full_size": pa.array([list(map(int, full_size))], pa.list_(pa.int64())),
        "tiled": pa.array([tiled], pa.string()),
    })


def tiled_rows(unit: dict, *, tile: int, overlap: float, full_pass: bool, model_size: Sequence[int],
               output_uri: str, max_whole_pixels: int | None, max_pixels: int | None, exif: bool = True,
               intensity: str | None = None) -> Iterator[Any]:
    """The tiled read of one unit (``maskray infer --tile``): decoded rows, one image source open
    at a time.

    * Each image larger than ``tile`` yields its tiles (:func:`pipeline.infer.tiles.plan_tiles`,
      and with ``full_pass`` the whole image shrunk to ``model_size`` (min, max) as one more
      region) in part rows of :func:`~pipeline.infer.tiles.tiles_per_part` tiles, each one unit
      of work for whichever model actor is free; parts already under ``<output>/_tiles/<unit>/``
      (a resumed run) are skipped.
    * Then the unit's other images: as a plain decoded unit when nothing was tiled (committed as
      always), else as the unit's base part (``tiled``: JSON of the tiled positions and their tile
      counts, the unit's positions, the ``--retry-errors`` merge flag), or, when the base is
      already written, an empty ``check`` row so that some actor tries the merge.
    """
    from pipeline import storage
    from pipeline.infer import tiles

    name = unit["unit"]
    written = tiles.list_parts(output_uri, name)
    stale = set(tiles.stale_parts(written, tile, full_pass))
    for part in stale:  # cut otherwise by an earlier version: recomputed whole
        with_retries(lambda: storage.delete(storage.join(tiles.parts_uri(output_uri, name), part)),
                     f"deleting stale tile part {part}")
    written = [n for n in written if n not in stale]
    expected, _ = tiles.parse_parts(written)
    complete, done = tiles.complete_positions(written), set(written)
    base_tiled = None
    if expected is not None:
        base = next(n for n in written if n.startswith("base."))
        base_tiled = {int(p) for p in tiles.read_base_meta(output_uri, name, base)["tiled"]}
    ids, names, datas, read_errors = fetch_unit(unit, lazy=is_region_readable)
    positions = list(unit["only"]) or list(range(len(ids)))
    small: dict[str, list] = {"positions": [], "image_ids": [], "file_names": [], "images": [], "errors": []}
    tiled: dict[int, int] = {}
    for p in positions:
        if base_tiled is not None and (p not in base_tiled or p in complete):
            continue  # its row is in the written base / all its tiles are written
        source, error = None, read_errors[p]
        if error is None:
            try:
                source = open_source(datas[p], max_pixels=max_pixels, max_whole_pixels=max_whole_pixels, exif=exif,
                                     intensity=intensity)
            except Exception as exc:  # noqa: BLE001 - a bad image is an error row, never a crash
                error = f"decode failed: {error_text(exc)}"
        if source is None or not tiles.needs_tiles(source.width, source.height, tile):
            image = None
            if source is not None:
                try:
                    image = region_chw(source, (0, 0, source.width, source.height))
                except Exception as exc:  # noqa: BLE001
                    error = f"decode failed: {error_text(exc)}"
                _close(source)
            for key, value in zip(small, (p, ids[p], names[p], image, error)):
                small[key].append(value)
            continue
        width, height = int(source.width), int(source.height)
        boxes = tiles.plan_tiles(width, height, tile, overlap)
        count = len(boxes) + (1 if full_pass else 0)
        tiled[p] = count
        chunks = tiles.part_chunks(len(boxes), tile, full_pass)
        for a, b in chunks:
            part = tiles.part_name(p, a, b, count)
            if part in done:
                continue
            images, errors, regions = [], [], []
            for k in range(a, b):
                region = tiles.tile_region(boxes, k, width, height)
                try:
                    images.append(tile_chw(source, boxes, k, model_size=model_size, max_pixels=max_pixels))
                    errors.append(None)
                except Exception as exc:  # noqa: BLE001 - a region that cannot be read fails its image
                    images.append(None)
                    errors.append(f"decode failed: {error_text(exc)}")
                regions.append(region)
            yield decoded_row(unit, [p] * len(images), [ids[p]] * len(images), [names[p]] * len(images), images,
                              errors, part=part, regions=regions, full_size=(height, width))
        _close(source)
        del source
    import json

    if base_tiled is not None:
        yield decoded_row(unit, [], [], [], [], [], part="check")
    elif not tiled:
        yield decoded_row(unit, small["positions"], small["image_ids"], small["file_names"], small["images"],
                          small["errors"], part=None)
    else:
        meta = {"tiled": {str(p): n for p, n in tiled.items()}, "unit_positions": positions,
                "merge": bool(unit["only"])}
        yield decoded_row(unit, small["positions"], small["image_ids"], small["file_names"], small["images"],
                          small["errors"], part=tiles.base_name(sum(tiled.values())), tiled=json.dumps(meta))


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
    ``instances``, ``committed``: false for a ``--tile`` part that did not commit its unit,
    ``part``: the part's file name for a part row of ``--tile`` (its tiles and their image's
    tile count are in the name: :func:`pipeline.infer.tiles.parse_parts`), else null). A retried
    task rewrites the same complete file, so a unit's file always holds exactly one row per image
    of the unit."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.results import write_unit

    meta: dict[str, list] = {k: [] for k in ("unit", "images", "errors", "transient", "instances", "committed",
                                             "part")}
    for unit in (batch if isinstance(batch, list) else batch.to_pylist()):
        if unit.get("part") is None:
            table = write_unit(output_uri, unit["unit"], unit_table(unit, category_ids),
                               positions=unit["positions"] if unit["merge"] else None, attempt=with_retries)
            images = len(unit["positions"])
        else:  # --tile: a part of the unit; committed by whichever actor writes the last one
            table, images = write_part_and_merge(unit, output_uri=output_uri, category_ids=category_ids)
        errors = [] if table is None else [e for e in table.column("error").to_pylist() if e is not None]
        meta["unit"].append(unit["unit"])
        meta["images"].append(images)
        meta["errors"].append(len(errors))
        meta["transient"].append(sum(is_transient(e) for e in errors))
        meta["instances"].append(0 if table is None else
                                 int(pc.sum(pc.list_value_length(table.column("instances"))).as_py() or 0))
        meta["committed"].append(table is not None)
        meta["part"].append(unit.get("part"))
    return pa.table({k: pa.array(v, pa.string()) if k == "part" else v for k, v in meta.items()})


def tile_table(unit: dict, category_ids: Sequence[int]) -> Any:
    """A tile part's model-stage row -> its RESULT_SCHEMA table: one row per tile, instances in
    full-image coordinates (:func:`pipeline.infer.tiles.tile_instances`)."""
    from pipeline.infer.tiles import tile_instances
    from pipeline.results import result_table

    errors, instances = list(unit["errors"]), []
    full_size = tuple(unit["full_size"])
    for k, pred in enumerate(unit["preds"]):
        if errors[k] is not None or pred is None:
            instances.append([])
            continue
        try:
            instances.append(tile_instances(pred, tuple(unit["regions"][k]), (unit["heights"][k], unit["widths"][k]),
                                            full_size, category_ids))
        except Exception as exc:  # noqa: BLE001
            errors[k] = f"post-processing failed: {error_text(exc)}"
            instances.append([])
    return result_table(unit["image_ids"], unit["file_names"], instances, errors, unit["model"])


def write_part_and_merge(unit: dict, *, output_uri: str, category_ids: Sequence[int]) -> tuple[Any, int]:
    """Write a tiled unit's part (its base, a run of tiles of one image, or nothing for a
    ``check`` row) under ``<output>/_tiles/<unit>/``, then try the merge
    (:func:`pipeline.infer.tiles.try_merge`). Returns ``(the committed unit's table, its image
    count)`` when this call committed it, else ``(None, 0)``. A part rerun after its unit was
    committed (a retried task) writes nothing and reports the committed file."""
    import json

    from pipeline import storage
    from pipeline.infer import tiles
    from pipeline.results import read_table

    name, part = unit["unit"], unit["part"]
    final = storage.join(output_uri, name)
    if not unit["merge"] and with_retries(lambda: storage.exists(final), f"checking {final}"):
        table = read_table(final, columns=["error", "instances"])
        return table, table.num_rows
    if part != "check":
        if unit["tiled"]:  # the base: the unit's untiled images
            table = unit_table(unit, category_ids)
            meta = {"positions": list(unit["positions"]), **json.loads(unit["tiled"])}
        else:
            table = tile_table(unit, category_ids)
            meta = {"regions": [list(r) for r in unit["regions"]], "full_size": list(unit["full_size"])}
        tiles.write_part(output_uri, name, part, table, meta, attempt=with_retries)
    return tiles.try_merge(output_uri, name, attempt=with_retries)


class SegmentAndWrite:
    """Ray Data model stage (actor): groups of decoded units (:func:`read_groups`) -> per unit, the
    model (a :class:`~pipeline.infer.predictor.Predictor`, or ``predictor_factory``, built with
    ``predictor_kwargs``) -> :func:`write_units` (per-instance paste + RLE, one results file per
    unit, written atomically here) -> its metadata row, yielded at once (one Ray Data block per
    unit, so the driver hears of each commit when it happens).

    A group killed mid-way (the actor died) is retried whole on a new actor: its units rewrite the
    same files, so the exactly-once invariant of :func:`write_units` holds (the driver ignores a
    unit reported twice). On a GPU actor the paste and
    RLE run on the actor's CPU (milliseconds per image at 800 px, 0.17 s for 100 instances on a
    12-MP photo: benchmarks/RESULTS.md).

    Write-behind: a unit's post-processing and write (:func:`write_units`: paste, RLE, Parquet,
    the storage call and its fsync or PUT) run on one writer thread while the model runs the
    next unit of the group, so the model never waits on storage. Invariants: at most one unit
    is being written while one is being computed (memory: two units' predictions), metadata rows
    are yielded in unit order, and a row is yielded only once its file is committed."""

    def __init__(self, *, output_uri: str, category_ids: Sequence[int], predictor_factory: Any = None,
                 **predictor_kwargs: Any) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from pipeline.infer.predictor import Predictor

        self.predictor = (predictor_factory or Predictor)(**predictor_kwargs)
        self.output_uri = output_uri
        self.category_ids = list(category_ids)
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maskray-write")

    def __call__(self, groups: Any) -> Iterator[Any]:
        units = ungroup(groups)
        writing = None  # the previous unit's write (a Future of its metadata row)
        for k in range(units.num_rows):
            # the predictions stay numpy arrays in this process: never pickled between model and write
            preds = self.predictor.run_units(units.slice(k, 1))
            if writing is not None:
                yield writing.result()
            writing = self.writer.submit(write_units, preds, output_uri=self.output_uri,
                                         category_ids=self.category_ids)
        if writing is not None:
            yield writing.result()
