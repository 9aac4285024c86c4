"""The maskray-shards/1 dataset format (see GUIDE.md; the results format is :mod:`pipeline.results`).

A dataset is a prefix (local folder or ``s3://bucket/prefix``) holding ``manifest.json`` and
``part-NNNNN.parquet`` shards. Readers take exactly the shards the manifest lists, so shards
written by an interrupted run are never read. One Parquet row per image (:data:`SHARD_SCHEMA`):

- ``image_id`` int64, ``file_name`` string, ``width``/``height`` int32,
- ``image`` binary: the original encoded file bytes, never re-encoded,
- ``annotations`` list<struct<id int64, category_id int32, bbox 4×float32 (COCO xywh),
  area float32, iscrowd bool, segmentation struct<size 2×int32 [h, w], counts binary
  (compressed COCO RLE)>, score float32 (null for human labels), keypoints list<float32>
  (``x, y, v`` × K, null when the category has none), num_keypoints int32 (count of v > 0)>>;
  empty for unlabeled images. Shards written before the keypoint columns existed read with
  those keys absent: treat a missing key as null (``ann.get("keypoints")``).

Categories with keypoints keep COCO's ``keypoints`` (names) and ``skeleton`` (1-based pairs) in
the manifest (checked by :func:`pipeline.data.keypoints.check_category`).

Python rows are plain dicts with those keys (``bbox``/``size`` as lists, ``counts`` as bytes).
:class:`ShardWriter` bounds shards by images and bytes, writes each one atomically
(:func:`pipeline.storage.write_bytes`) and returns the :class:`ShardInfo` list for the
:class:`Manifest`, which is written last.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from model.errors import MaskrayError
from pipeline import storage
from pipeline.data.keypoints import KeypointError, check_category

log = logging.getLogger(__name__)

FORMAT = "maskray-shards/1"
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "part-{index:05d}.parquet"

DEFAULT_IMAGES_PER_SHARD = 1000
DEFAULT_MAX_SHARD_BYTES = 256 * 1024 * 1024
DEFAULT_ROW_GROUP_SIZE = 64

RLE_TYPE = pa.struct([
    pa.field("size", pa.list_(pa.int32(), 2)),  # [height, width]
    pa.field("counts", pa.binary()),  # compressed COCO RLE string
])

ANNOTATION_TYPE = pa.struct([
    pa.field("id", pa.int64()),
    pa.field("category_id", pa.int32()),
    pa.field("bbox", pa.list_(pa.float32(), 4)),  # COCO xywh, pixels
    pa.field("area", pa.float32()),
    pa.field("iscrowd", pa.bool_()),
    pa.field("segmentation", RLE_TYPE),
    pa.field("score", pa.float32()),  # null for human labels; confidence for pseudo-labels
    pa.field("keypoints", pa.list_(pa.float32())),  # x, y, v x K; null when the category has none
    pa.field("num_keypoints", pa.int32()),  # count of v > 0; null when keypoints are
])

SHARD_SCHEMA = pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("file_name", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("image", pa.binary()),
    pa.field("annotations", pa.list_(ANNOTATION_TYPE)),
], metadata={b"maskray.format": FORMAT.encode()})


class FormatError(MaskrayError):
    """A dataset, manifest or row does not follow maskray-shards/1."""


# ---------------------------------------------------------------------------------------------
# Manifest


@dataclass
class ShardInfo:
    """One shard: ``path`` relative to the dataset prefix, and what it holds."""

    path: str
    images: int
    instances: int
    bytes: int = 0

    def __post_init__(self) -> None:
        if not self.path or self.path.startswith("/") or ".." in self.path.split("/"):
            raise FormatError(f"shard path {self.path!r} must be relative to the dataset prefix")
        if self.images < 0 or self.instances < 0 or self.bytes < 0:
            raise FormatError(f"shard {self.path}: negative counts")


@dataclass
class Manifest:
    """``manifest.json``: categories (COCO dicts with ``id`` and ``name``), shards, provenance.

    ``extra`` holds anything else worth keeping (e.g. ``round`` and ``teacher`` for
    pseudo-labels, ``skipped`` counts from convert).
    """

    categories: list[dict]
    shards: list[ShardInfo] = field(default_factory=list)
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise FormatError(f"unsupported dataset format {self.format!r} (expected {FORMAT!r})")
        self.shards = [s if isinstance(s, ShardInfo) else ShardInfo(**s) for s in self.shards]
        ids = []
        for cat in self.categories:
            if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
                raise FormatError(f"category {cat!r} needs 'id' and 'name'")
            ids.append(int(cat["id"]))
            try:
                check_category(cat)
            except KeypointError as exc:
                raise FormatError(str(exc)) from None
        if len(set(ids)) != len(ids):
            raise FormatError(f"duplicate category ids in {ids}")
        paths = [s.path for s in self.shards]
        if len(set(paths)) != len(paths):
            raise FormatError("a shard is listed twice in the manifest")

    @property
    def category_ids(self) -> list[int]:
        """Category ids in order: model label ``i`` (1..K) is ``category_ids[i - 1]``."""
        return [int(c["id"]) for c in self.categories]

    @property
    def num_images(self) -> int:
        return sum(s.images for s in self.shards)

    @property
    def num_instances(self) -> int:
        return sum(s.instances for s in self.shards)

    def to_dict(self) -> dict:
        return {"format": self.format, "categories": self.categories,
                "shards": [asdict(s) for s in self.shards], "source": self.source,
                "extra": self.extra,
                "images": self.num_images, "instances": self.num_instances}

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        if not isinstance(data, dict):
            raise FormatError("manifest is not a JSON object")
        if data.get("format") != FORMAT:
            raise FormatError(f"unsupported dataset format {data.get('format')!r} "
                              f"(expected {FORMAT!r})")
        try:
            return cls(categories=list(data.get("categories") or []),
                       shards=[ShardInfo(**s) for s in data.get("shards") or []],
                       source=str(data.get("source") or ""), extra=dict(data.get("extra") or {}))
        except TypeError as exc:
            raise FormatError(f"malformed manifest: {exc}") from exc


def manifest_uri(dataset_uri: str) -> str:
    """The manifest of a dataset; ``dataset_uri`` may name the prefix or the manifest itself."""
    dataset_uri = str(dataset_uri)
    if dataset_uri.rstrip("/").endswith(".json"):
        return dataset_uri
    return storage.join(dataset_uri, MANIFEST_NAME)


def dataset_root(dataset_uri: str) -> str:
    """The dataset prefix (strips a trailing ``manifest.json``)."""
    dataset_uri = str(dataset_uri).rstrip("/")
    if dataset_uri.endswith(".json"):
        return dataset_uri.rsplit("/", 1)[0] if "/" in dataset_uri else "."
    return dataset_uri


def read_manifest(uri: str) -> Manifest:
    """The :class:`Manifest` of the dataset at ``uri`` (prefix or ``.../manifest.json``)."""
    muri = manifest_uri(uri)
    try:
        raw = storage.read_bytes(muri)
    except storage.StorageError as exc:
        if str(exc).endswith(": not found"):
            raise storage.StorageError(
                f"{muri}: not found (is {dataset_root(uri)} a maskray dataset? "
                f"create one with `maskray convert` or `maskray pack`)") from None
        raise
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{muri}: malformed JSON ({exc})") from None
    try:
        return Manifest.from_dict(data)
    except FormatError as exc:
        raise FormatError(f"{muri}: {exc}") from None


def write_manifest(uri: str, manifest: Manifest) -> str:
    """Write ``manifest.json`` (atomically) under the dataset ``uri``; returns its URI."""
    muri = manifest_uri(uri)
    storage.write_bytes(muri, (json.dumps(manifest.to_dict(), indent=1) + "\n").encode())
    return muri


def shard_uris(dataset_uri: str, manifest: Manifest | None = None) -> list[str]:
    """URIs of the shards the manifest lists, in order."""
    manifest = manifest or read_manifest(dataset_uri)
    root = dataset_root(dataset_uri)
    return [storage.join(root, s.path) for s in manifest.shards]


# ---------------------------------------------------------------------------------------------
# Rows


def make_annotation(*, id: int, category_id: int, bbox, area: float, iscrowd: bool,
                    size, counts: bytes | str, score: float | None = None,
                    keypoints=None, num_keypoints: int | None = None) -> dict:
    """An annotation dict in shard layout (``counts`` must already be compressed RLE;
    ``keypoints`` ``x, y, v`` × K or None, checked by the caller)."""
    return {"id": int(id), "category_id": int(category_id),
            "bbox": [float(v) for v in bbox], "area": float(area), "iscrowd": bool(iscrowd),
            "segmentation": {"size": [int(size[0]), int(size[1])],
                             "counts": counts.encode() if isinstance(counts, str) else bytes(counts)},
            "score": None if score is None else float(score),
            "keypoints": None if keypoints is None else [float(v) for v in keypoints],
            "num_keypoints": None if num_keypoints is None else int(num_keypoints)}


def make_row(*, image_id: int, file_name: str, width: int, height: int, image: bytes,
             annotations: Iterable[dict] = ()) -> dict:
    return {"image_id": int(image_id), "file_name": str(file_name), "width": int(width),
            "height": int(height), "image": bytes(image), "annotations": list(annotations)}


def rows_to_table(rows: list[dict], schema: pa.Schema = SHARD_SCHEMA) -> pa.Table:
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, KeyError) as exc:
        raise FormatError(f"row does not match the shard schema: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Collects rows and writes bounded Parquet shards ``part-NNNNN.parquet`` under ``out_uri``.

    A shard is flushed when it reaches ``images_per_shard`` rows or about ``max_shard_bytes``
    of image bytes; each is built in memory and written with one atomic
    :func:`~pipeline.storage.write_bytes`, so a crash leaves either no shard or a whole one
    (and no manifest lists it until :meth:`close` returns and the caller writes the manifest).
    Shard names are deterministic (``first_index`` onwards), so a rerun over the same input
    rewrites the same shards. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, out_uri: str, *, images_per_shard: int = DEFAULT_IMAGES_PER_SHARD,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 row_group_size: int = DEFAULT_ROW_GROUP_SIZE, first_index: int = 0,
                 schema: pa.Schema = SHARD_SCHEMA, compression: str = "zstd") -> None:
        if images_per_shard < 1:
            raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}")
        if max_shard_bytes < 1 or row_group_size < 1:
            raise ValueError("max_shard_bytes and row_group_size must be >= 1")
        self.out_uri = str(out_uri)
        self.images_per_shard = images_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.row_group_size = row_group_size
        self.schema = schema
        self.compression = compression
        self.shards: list[ShardInfo] = []
        self._index = first_index
        self._rows: list[dict] = []
        self._bytes = 0
        self._closed = False

    def add(self, row: dict) -> None:
        """Add one image row (see :func:`make_row`); may flush a finished shard."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        size = len(row.get("image") or b"") + 64 * len(row.get("annotations") or ())
        if self._rows and self._bytes + size > self.max_shard_bytes:
            self.flush()
        self._rows.append(row)
        self._bytes += size
        if len(self._rows) >= self.images_per_shard:
            self.flush()

    def flush(self) -> ShardInfo | None:
        """Write the pending rows as one shard now (no-op when empty)."""
        if not self._rows:
            return None
        table = rows_to_table(self._rows, self.schema)
        sink = io.BytesIO()
        pq.write_table(table, sink, row_group_size=self.row_group_size,
                       compression=self.compression, use_dictionary=["file_name"],
                       write_statistics=["image_id"])
        data = sink.getvalue()
        name = SHARD_PATTERN.format(index=self._index)
        storage.write_bytes(storage.join(self.out_uri, name), data)
        instances = sum(len(r.get("annotations") or ()) for r in self._rows)
        info = ShardInfo(path=name, images=len(self._rows), instances=instances, bytes=len(data))
        log.debug("wrote %s: %d images, %d instances, %d bytes", name, info.images,
                  info.instances, info.bytes)
        self.shards.append(info)
        self._index += 1
        self._rows, self._bytes = [], 0
        return info

    def close(self) -> list[ShardInfo]:
        """Flush the last shard; returns every :class:`ShardInfo` written."""
        if not self._closed:
            self.flush()
            self._closed = True
        return list(self.shards)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # do not write a shard from a failed run's leftovers
            self._closed = True
            self._rows = []


# ---------------------------------------------------------------------------------------------
# Reading without Ray


def iter_shard_rows(uri: str, columns: list[str] | None = None,
                    batch_size: int = DEFAULT_ROW_GROUP_SIZE) -> Iterator[dict]:
    """Rows of one shard as dicts, streamed a batch at a time."""
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
                yield from batch.to_pylist()
    except (pa.ArrowInvalid, OSError) as exc:
        raise storage.storage_error(uri, exc) from exc


def read_rows(dataset_uri: str, columns: list[str] | None = None) -> Iterator[dict]:
    """Every row of the dataset (manifest order) as dicts, via pyarrow (no Ray).

    For small sets (validation, evaluation, tests); use
    :func:`pipeline.data.decode.read_shards` for streaming at scale.
    """
    for uri in shard_uris(dataset_uri):
        yield from iter_shard_rows(uri, columns)
