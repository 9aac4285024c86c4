"""The maskray-results format: the one schema, writer and reader of inference results (GUIDE.md "Results format").

A results prefix (local folder or ``s3://bucket/prefix``) holds::

    provenance.json     what produced the results: ``format`` (:data:`FORMAT`), model digest,
                        every result-changing option, input identity (written by the infer driver)
    <unit>.parquet      :data:`RESULT_SCHEMA` rows of one unit of work, written whole and atomically
                        by the task that computed it (:func:`write_unit`): a whole input shard keeps
                        its name (``part-00003.parquet``), a row range is
                        ``part-00003.rows-0000064-0000128.parquet``, a run of raw files
                        ``files-0000000-0000016.parquet``

One row per input image: ``image_id`` int64, ``file_name`` string (the object path for raw-image
input), ``instances`` list<:data:`INSTANCE_TYPE`>, ``error`` string (null when the image was
processed), ``model`` string (the model id). One instance:

- ``category_id`` int32, ``score`` float32, ``bbox`` 4 x float32 (COCO xywh, pixels),
- ``segmentation`` struct<size [h, w], counts binary (compressed COCO RLE)> in full-image
  coordinates; null for a model without masks,
- ``keypoints`` list<float32> ``x, y, score`` x K in original-image pixels; null for a model without
  keypoints. ``score`` is the predictor's per-keypoint score (torchvision's ``keypoints_scores``:
  the keypoint heatmap's logit at the chosen location); COCO's ``v`` follows from it by the model's
  rule (:func:`model.keypoint_heads.to_coco_keypoints`: 2 where ``score >=``
  :data:`KEYPOINT_VISIBLE_SCORE`, else 1).

Versions: every file carries its format in the Parquet schema metadata (``maskray.format``).
:data:`FORMAT` is the current one; :data:`OLDER_FORMATS` are read as well ("maskray-results/1":
every file written before keypoints existed; the same columns without ``keypoints``, whose
provenance.json already said "/2"): :func:`read_table` and :func:`iter_rows` give them the current
schema with ``keypoints`` null. A file with any other tag, or one that is not Parquet, is refused
with one line naming the file (:class:`ResultsError`); a file without a tag (written by hand) is
read when it has the columns asked for.

Writing is per unit (:func:`write_unit`), reading per file (:func:`iter_batches`,
:func:`read_table`) or per prefix (:func:`unit_names`, :func:`iter_rows`, :func:`read_provenance`),
and :func:`write_coco_json` streams COCO results (``pycocotools.COCO.loadRes`` layout) out of a
prefix. This module imports neither torch nor the model at module level (the gallery and the
read tasks use it); :func:`to_result_instances` imports them when called.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from model.errors import MaskrayError, error_text
from model.keypoint_heads import VISIBLE_LOGIT as KEYPOINT_VISIBLE_SCORE  # noqa: F401 - the one rule, re-exported
from model.keypoint_heads import to_coco_keypoints
from pipeline import storage
from pipeline.data.format import RLE_TYPE

logger = logging.getLogger(__name__)

FORMAT = "maskray-results/2"
OLDER_FORMATS = ("maskray-results/1",)  # read as FORMAT with keypoints null
FORMAT_KEY = b"maskray.format"
PROVENANCE = "provenance.json"
SUFFIX = ".parquet"
BATCH_ROWS = 256  # rows per record batch when streaming a results file

INSTANCE_TYPE = pa.struct([
    pa.field("category_id", pa.int32()),
    pa.field("score", pa.float32()),
    pa.field("bbox", pa.list_(pa.float32(), 4)),  # COCO xywh, pixels
    pa.field("segmentation", RLE_TYPE),  # null for a model without masks
    pa.field("keypoints", pa.list_(pa.float32())),  # x, y, score x K; null for a model without keypoints
])

RESULT_SCHEMA = pa.schema([
    pa.field("image_id", pa.int64()),
    pa.field("file_name", pa.string()),
    pa.field("instances", pa.list_(INSTANCE_TYPE)),
    pa.field("error", pa.string()),  # null when the image was processed
    pa.field("model", pa.string()),  # model id
], metadata={FORMAT_KEY: FORMAT.encode()})

T = TypeVar("T")


class ResultsError(MaskrayError):
    """A results file or prefix that cannot be read as maskray-results."""


# --------------------------------------------------------------------------- instances


def to_result_instances(boxes: Any, labels: Any, scores: Any, masks: Any, height: int, width: int,
                        category_ids: Sequence[int], keypoints: Any = None) -> list[dict]:
    """One image's predictions (original frame) -> its results instances (:data:`INSTANCE_TYPE` dicts).

    ``boxes`` float ``[N, 4]`` xyxy pixels, ``labels`` int ``[N]`` (1..K: label ``i`` is
    ``category_ids[i - 1]``), ``scores`` float ``[N]``, ``masks`` float ``[N, 1, M, M]`` mask
    probabilities (pasted and RLE-encoded one instance at a time by
    :func:`pipeline.infer.paste.encode_instance_masks`) or None (no ``segmentation``),
    ``keypoints`` float ``[N, K, 3]`` (x, y, score) pixels or None (a row of NaN: that instance has
    none); numpy arrays or tensors."""
    import numpy as np
    import torch

    from pipeline.infer.paste import encode_instance_masks

    boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
    n = boxes_t.shape[0]
    if n == 0:
        return []
    if masks is None:
        counts: list[bytes | None] = [None] * n
    else:
        masks_t = torch.as_tensor(np.asarray(masks, dtype=np.float32))
        counts, _ = encode_instance_masks(masks_t, boxes_t, (height, width))
    if keypoints is None:
        points: list[list[float] | None] = [None] * n
    else:
        array = np.asarray(keypoints, dtype=np.float32)
        if array.ndim != 3 or array.shape[0] != n or array.shape[2] != 3:
            raise ResultsError(f"keypoints must be [{n}, K, 3] (x, y, score), got {list(array.shape)}")
        # a row of NaN: a detection whose category names no keypoints (Predictor.keypoint_labels)
        points = [None if np.isnan(row).all() else row.tolist() for row in array.reshape(n, -1)]
    xywh = torch.cat([boxes_t[:, :2], boxes_t[:, 2:] - boxes_t[:, :2]], dim=1)  # float32, as Instances.to_coco
    out = []
    for box, label, score, c, kp in zip(xywh.tolist(), np.asarray(labels).tolist(), np.asarray(scores).tolist(),
                                        counts, points):
        if not 1 <= int(label) <= len(category_ids):
            raise ResultsError(f"label {label} has no category (model labels are 1..{len(category_ids)})")
        out.append({
            "category_id": int(category_ids[int(label) - 1]),
            "score": float(score),
            "bbox": [float(v) for v in box],
            "segmentation": None if c is None else {"size": [int(height), int(width)], "counts": c},
            "keypoints": kp,
        })
    return out


def result_instances_from_coco(coco_results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """COCO result dicts (``Instances.to_coco``; ``keypoints`` here are x, y, score x K) -> the
    ``instances`` of a results row: RLE ``counts`` as bytes. The inverse of :func:`to_coco_results`."""
    rows = []
    for r in coco_results:
        item = {"category_id": int(r["category_id"]), "score": float(r["score"]), "bbox": list(r["bbox"])}
        seg = r.get("segmentation")
        item["segmentation"] = None if seg is None else {
            "size": list(seg["size"]),
            "counts": seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else bytes(seg["counts"]),
        }
        item["keypoints"] = None if r.get("keypoints") is None else [float(v) for v in r["keypoints"]]
        rows.append(item)
    return rows


def to_coco_results(image_id: int, items: Iterable[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """COCO dicts (``image_id``, ``category_id``, ``score``, ``bbox``, ``segmentation`` with str
    ``counts`` when present, ``keypoints`` when present) from a results row's ``instances`` (or a
    shard row's ``annotations``: same fields; ``score`` 1.0 where null). ``keypoints`` are copied as
    stored (results: x, y, score; annotations: x, y, v): :func:`coco_result_json` writes a result's as COCO's."""
    out = []
    for item in items or []:
        r = {"image_id": int(image_id), "category_id": int(item["category_id"]),
             "score": 1.0 if item.get("score") is None else float(item["score"]),
             "bbox": [float(v) for v in item["bbox"]]}
        seg = item.get("segmentation")
        if seg is not None:
            counts = seg["counts"]
            r["segmentation"] = {"size": [int(v) for v in seg["size"]],
                                 "counts": counts if isinstance(counts, (str, list)) else bytes(counts).decode("ascii")}
        if item.get("keypoints"):
            r["keypoints"] = [float(v) for v in item["keypoints"]]
        out.append(r)
    return out


# --------------------------------------------------------------------------- writing


def result_table(image_ids: Sequence[int], file_names: Sequence[str | None], instances: Sequence[list[dict]],
                 errors: Sequence[str | None], model: str) -> pa.Table:
    """One unit's rows (in unit order) as a :data:`RESULT_SCHEMA` table; ``instances`` are
    :func:`to_result_instances` lists (``[]`` for an error row)."""
    n = len(image_ids)
    if not len(file_names) == len(instances) == len(errors) == n:
        raise ResultsError(f"a unit's columns differ in length: {n} image ids, {len(file_names)} file names, "
                           f"{len(instances)} instance lists, {len(errors)} errors")
    return pa.table({
        "image_id": pa.array(image_ids, pa.int64()),
        "file_name": pa.array(file_names, pa.string()),
        "instances": pa.array(instances, RESULT_SCHEMA.field("instances").type),
        "error": pa.array(errors, pa.string()),
        "model": pa.array([model] * n, pa.string()),
    }, schema=RESULT_SCHEMA)


def merge_rows(existing: pa.Table, fresh: pa.Table, positions: Sequence[int]) -> pa.Table:
    """``existing`` (any readable version) with the rows at ``positions`` replaced by ``fresh``
    (same order), in the current schema."""
    import numpy as np

    existing = upgrade(existing)
    index = np.arange(existing.num_rows)
    source = np.zeros(existing.num_rows, dtype=bool)
    index[list(positions)] = np.arange(len(positions))
    source[list(positions)] = True
    both = pa.concat_tables([existing.select(fresh.column_names).cast(fresh.schema), fresh])
    take = np.where(source, existing.num_rows + index, np.arange(existing.num_rows))
    return both.take(pa.array(take))


def _call(call: Callable[[], T], what: str) -> T:
    return call()


def write_unit(output_uri: str, name: str, table: pa.Table, *, positions: Sequence[int] | None = None,
               attempt: Callable[[Callable[[], Any], str], Any] = _call) -> pa.Table:
    """Write one unit's results file ``<output_uri>/<name>`` whole and atomically
    (:func:`pipeline.storage.write_bytes`: tmp + rename locally, one PUT on S3); returns what it wrote.

    With ``positions`` (``--retry-errors``), ``table`` holds only those rows: they replace the rows
    at those positions of the existing file (:func:`merge_rows`). ``attempt(call, what)`` runs each
    storage call (the infer stages pass their bounded retries). A task that runs again rewrites the
    same complete file, so the file always holds exactly one row per image of the unit."""
    uri = storage.join(output_uri, name)
    if positions is not None:
        existing = _parse(uri, attempt(lambda: storage.read_bytes(uri), f"reading {uri}"))
        table = merge_rows(existing, table, positions)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    attempt(lambda: storage.write_bytes(uri, sink.getvalue()), f"writing {uri}")
    return table


# --------------------------------------------------------------------------- reading


def check_version(uri: str, schema: pa.Schema) -> str | None:
    """The format tag of a results file's schema (None: untagged); one line naming ``uri`` and
    the tag when it is neither :data:`FORMAT` nor one of :data:`OLDER_FORMATS`."""
    tag = (schema.metadata or {}).get(FORMAT_KEY)
    if tag is None:
        return None
    version = tag.decode(errors="replace")
    if version != FORMAT and version not in OLDER_FORMATS:
        raise ResultsError(f"{uri}: results format {version!r} is not one this maskray reads "
                           f"({', '.join((FORMAT, *OLDER_FORMATS))}); read it with the maskray that wrote it")
    return version


def upgrade(table: pa.Table) -> pa.Table:
    """A table of any readable version in the current schema: an ``instances`` column without
    ``keypoints`` gets them null (columns not in ``table`` stay absent)."""
    if "instances" not in table.column_names:
        return table
    current = RESULT_SCHEMA.field("instances").type
    if table.schema.field("instances").type == current:
        return table
    i = table.column_names.index("instances")
    return table.set_column(i, RESULT_SCHEMA.field("instances"), table.column(i).cast(current))


def _not_results(uri: str, exc: BaseException) -> ResultsError:
    return ResultsError(f"{uri}: not a results file ({error_text(exc)})")


def _parse(uri: str, data: bytes, columns: list[str] | None = None) -> pa.Table:
    """Bytes of a results file -> its table, version checked, in the current schema."""
    try:
        parquet = pq.ParquetFile(io.BytesIO(data))
        check_version(uri, parquet.schema_arrow)
        table = parquet.read(columns=columns)
    except ResultsError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file: one line naming it
        raise _not_results(uri, exc) from exc
    return upgrade(table)


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One results file (``columns`` of it) as a table in the current schema."""
    return _parse(uri, storage.read_bytes(uri), columns)


def iter_batches(uri: str, columns: list[str] | None = None, batch_size: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Record batches of one results file, streamed (``batch_size`` rows, only ``columns``: nested
    paths such as ``instances.list.element.score`` read one field of every instance), as stored:
    an old file's ``instances`` lack ``keypoints`` (:func:`iter_rows` fills them in)."""
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            check_version(uri, parquet.schema_arrow)
            yield from parquet.iter_batches(batch_size=batch_size, columns=columns)
    except MaskrayError:
        raise
    except FileNotFoundError as exc:
        raise storage.storage_error(uri, exc) from exc
    except Exception as exc:  # noqa: BLE001 - a damaged file: one line naming it
        raise _not_results(uri, exc) from exc


def unit_names(results_uri: str) -> list[str]:
    """Names of the results files (``*.parquet``) directly under ``results_uri``, sorted."""
    return sorted(name for name in (storage.relative(u, results_uri)
                                    for u in storage.list_files(results_uri, suffixes=(SUFFIX,)))
                  if "/" not in name)


def result_files(results_uri: str) -> list[str]:
    """URIs of the results files directly under ``results_uri``, sorted; one line when there are none."""
    names = unit_names(results_uri)
    if not names:
        raise ResultsError(f"--results {results_uri}: no {SUFFIX} results files there")
    return [storage.join(results_uri, n) for n in names]


def iter_rows(results_uri: str, columns: list[str] | None = None,
              image_ids: Iterable[int] | None = None) -> Iterator[dict]:
    """Rows of every results file under ``results_uri`` (file name order, one batch in memory at
    a time) as dicts in the current schema (``instances[].keypoints`` None where not stored);
    with ``image_ids`` only those rows, and the reading stops once all were found."""
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    if wanted is not None and columns is not None and "image_id" not in columns:
        columns = ["image_id", *columns]
    if wanted is not None and not wanted:
        return
    for uri in result_files(results_uri):
        for batch in iter_batches(uri, columns):
            table = pa.Table.from_batches([batch])
            if wanted is not None:
                table = table.filter(pc.is_in(table.column("image_id"), value_set=pa.array(sorted(wanted), pa.int64())))
            for row in upgrade(table).to_pylist():
                if wanted is not None:
                    wanted.discard(int(row["image_id"]))
                yield row
            if wanted is not None and not wanted:
                return


def read_provenance(results_uri: str) -> dict:
    """``<results_uri>/provenance.json`` as a dict; {} when there is none."""
    uri = storage.join(results_uri, PROVENANCE)
    if not storage.exists(uri):
        return {}
    try:
        record = json.loads(storage.read_bytes(uri))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{uri}: malformed JSON ({exc})") from None
    if not isinstance(record, dict):
        raise ResultsError(f"{uri}: not a JSON object")
    return record


# --------------------------------------------------------------------------- COCO export


def coco_result_json(image_id: int, instance: dict) -> str:
    """One COCO result (``COCO.loadRes`` layout) as JSON: ``bbox`` rounded to 0.001 px, ``score``
    to 1e-5, ``segmentation`` compressed RLE when the instance has one, ``keypoints`` as COCO's
    ``x, y, v`` x K (``v`` by :func:`model.keypoint_heads.to_coco_keypoints`) when it has them."""
    item: dict[str, Any] = {"image_id": int(image_id), "category_id": int(instance["category_id"]),
                            "bbox": [round(float(v), 3) for v in instance["bbox"]],
                            "score": round(float(instance["score"]), 5)}
    seg = instance.get("segmentation")
    if seg is not None:
        item["segmentation"] = {"size": [int(v) for v in seg["size"]], "counts": bytes(seg["counts"]).decode("ascii")}
    if instance.get("keypoints"):
        item["keypoints"] = [round(v, 3) for v in to_coco_keypoints(instance["keypoints"])]
    return json.dumps(item)


def write_coco_json(results_uri: str, names: Sequence[str], json_uri: str) -> int:
    """COCO results JSON (``pycocotools.COCO.loadRes`` layout: segm, and keypoints where present)
    from the results files ``names`` under ``results_uri``, streamed: one record batch in memory
    at a time, the JSON written as it goes (atomically: a temporary name then a rename locally, one
    multipart upload on S3). Returns the instance count."""
    fs, path = storage.resolve(json_uri)
    local = not storage.is_s3(json_uri)
    target = f"{path}.tmp" if local else path
    if local:
        import os

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    count = 0
    with fs.open_output_stream(target) as out:
        out.write(b"[")
        for name in names:
            uri = storage.join(results_uri, name)
            for batch in iter_batches(uri, ["image_id", "instances"]):
                for image_id, instances in zip(batch.column("image_id").to_pylist(),
                                               batch.column("instances").to_pylist()):
                    for inst in instances or []:
                        out.write(((",\n" if count else "") + coco_result_json(image_id, inst)).encode())
                        count += 1
        out.write(b"]\n")
    if local:
        fs.move(target, path)
    if not count:
        logger.warning("%s holds no instances (pycocotools COCO.loadRes cannot load an empty list)", json_uri)
    return count
