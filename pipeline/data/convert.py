"""Converters into maskray-shards/1: COCO json + images (:func:`convert_coco`) and a folder or
bucket prefix of raw images (:func:`pack_images`), run by :mod:`pipeline.data.ingest` (plan, one
Ray Data task per shard, manifest last; resumable).

Images are stored as their original bytes, after the one pixel limit
(:func:`pipeline.data.decode.check_pixels`, on the header) and a full decode (truncated or corrupt
files are caught here, not in training). Polygons and uncompressed RLE become compressed RLE
once, here, with pycocotools; compressed RLE is kept as is. Per-item problems (an annotation
whose image is missing, a missing, unreadable or access-denied object, an image over the pixel
limit, a ``file_name`` outside the images root, a box or area that is not finite in float32, a
degenerate box, an unknown category, an empty segmentation, duplicates, malformed entries,
keypoints that do not fit their category: see :func:`pipeline.data.keypoints.check_annotation`)
are reported with the file/key and id and skipped; the rest is converted and the counts add up
(in = written + skipped). Problems that make the whole input unusable (unreadable or malformed
JSON, no ``categories``, a malformed keypoint skeleton, an unreachable endpoint, a missing
bucket) raise a one-line :class:`~model.errors.MaskrayError`.

Keypoints (COCO person_keypoints and any other skeleton) are kept as given: an annotation's
``keypoints`` and ``num_keypoints`` (each null when absent) and a category's ``keypoints`` names
and ``skeleton``. :func:`export_coco` writes shards back as COCO JSON; the round trip keeps
every keypoint value (float32 holds COCO's integer pixel coordinates exactly; other numbers
come back as the shortest decimal of their float32, e.g. 473.07 stays 473.07).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from model.errors import MaskrayError
from pipeline import storage
from pipeline.data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image
from pipeline.data.format import (DEFAULT_IMAGES_PER_SHARD, DEFAULT_MAX_SHARD_BYTES,
                             DEFAULT_ROW_GROUP_SIZE, make_annotation, make_row, read_manifest)
from pipeline.data.ingest import (ConvertReport, IngestConfig, IngestJob, Problem,  # noqa: F401
                             Reporter)
from pipeline.data.ingest import run as run_ingest
from pipeline.data.keypoints import KeypointError, check_annotation, check_category

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm", ".pbm", ".pnm")
FLOAT32_MAX = float(np.finfo(np.float32).max)  # ~3.4e38: beyond it a float32 column holds inf


class ConvertError(MaskrayError):
    """The input as a whole cannot be converted (unreadable/malformed JSON, no categories)."""


# ---------------------------------------------------------------------------------------------
# Helpers


def _int_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _finite32(value: Any) -> bool:
    """A JSON number that stays finite as float32 (math.isfinite passes 1e39; float32 does not)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and abs(float(value)) <= FLOAT32_MAX)


def _prefetch(items: list, fn: Callable, workers: int) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """``(item, fn(item), error)`` in order, with up to ``4 * workers`` calls in flight."""
    def call(item):
        try:
            return fn(item), None
        except Exception as exc:  # noqa: BLE001 - handed back to the caller in order
            return None, exc

    window = max(1, 4 * workers)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = []
        it = iter(items)
        for item in it:
            futures.append((item, pool.submit(call, item)))
            if len(futures) >= window:
                break
        while futures:
            item, fut = futures.pop(0)
            nxt = next(it, _END)
            if nxt is not _END:
                futures.append((nxt, pool.submit(call, nxt)))
            result, error = fut.result()
            yield item, result, error


_END = object()


def _fatal_storage(exc: storage.StorageError) -> bool:
    """Errors that will hit every object (endpoint, bucket) stop the run; a per-object error
    (not found, AccessDenied on one key) is that object's problem."""
    text = str(exc)
    return not text.endswith(": not found") and ("cannot reach" in text
                                                  or "does not exist" in text)


def _storage_reason(exc: storage.StorageError, missing: str) -> str:
    text = str(exc)
    if text.endswith(": not found"):
        return missing
    if "access denied" in text or "permission denied" in text:
        return "access denied"
    return "unreadable file"


def _decode_reason(exc: ImageDecodeError) -> str:
    return "over the pixel limit" if "(max_pixels)" in str(exc) else "unreadable image"


def confine(images_uri: str, file_name: Any) -> tuple[str | None, str]:
    """``(uri, "")`` of ``file_name`` under ``images_uri``, or ``(None, why)`` when it would
    leave it: absolute paths, URIs, ``..`` escapes (also via normalisation, e.g.
    ``a/../../x``) and, locally, symlinks that resolve outside the root."""
    if not isinstance(file_name, str) or not file_name or "\x00" in file_name:
        return None, f"file_name {file_name!r} is not a relative path"
    if "://" in file_name or file_name.startswith(("/", "~")):
        return None, f"file_name {file_name!r} is absolute; it must be relative to {images_uri}"
    norm = posixpath.normpath(file_name)
    if norm == ".." or norm.startswith("../") or norm in (".", ""):
        return None, f"file_name {file_name!r} leaves {images_uri}"
    uri = storage.join(images_uri, norm)
    if not storage.is_s3(images_uri):
        root = os.path.realpath(storage.resolve(images_uri)[1])
        real = os.path.realpath(storage.resolve(uri)[1])
        if os.path.commonpath([root, real]) != root:
            return None, f"file_name {file_name!r} resolves outside {images_uri} (symlink)"
    return uri, ""


def _segmentation_to_rle(seg: Any, height: int, width: int) -> tuple[dict | None, str, str]:
    """``(rle, reason, detail)``: compressed RLE of a COCO segmentation, or None + why not."""
    from pycocotools import mask as mask_utils

    if seg is None or seg == [] or seg == {} or (isinstance(seg, list)
                                                 and all(p == [] for p in seg)):
        return None, "empty segmentation", ""
    try:
        if isinstance(seg, list):  # polygons
            polys = []
            for poly in seg:
                if not isinstance(poly, list) or not all(
                        isinstance(v, (int, float)) and not isinstance(v, bool)
                        and math.isfinite(v) for v in poly):
                    return None, "malformed segmentation", "polygon coordinates must be numbers"
                if len(poly) >= 6 and len(poly) % 2 == 0:
                    polys.append([float(v) for v in poly])
            if not polys:
                return None, "empty segmentation", "no polygon with 3 or more points"
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            size = [int(v) for v in seg["size"]]
            if size != [height, width]:
                return None, "segmentation size mismatch", f"RLE size {size} but image is " \
                                                           f"{height}x{width}"
            counts = seg["counts"]
            if isinstance(counts, list):  # uncompressed (crowd) RLE
                if not counts:
                    return None, "empty segmentation", "RLE without counts"
                if sum(int(c) for c in counts) != height * width:
                    return None, "malformed segmentation", "RLE counts do not add up to h*w"
                rle = mask_utils.frPyObjects(seg, height, width)
            elif isinstance(counts, (str, bytes)):
                if not counts:
                    return None, "empty segmentation", "RLE without counts"
                rle = {"size": size, "counts": counts.encode() if isinstance(counts, str)
                       else counts}
            else:
                return None, "malformed segmentation", "RLE counts must be a list or string"
        else:
            return None, "malformed segmentation", "neither polygons nor RLE"
        area = float(mask_utils.area(rle))
    except (ValueError, TypeError, OverflowError) as exc:
        return None, "malformed segmentation", str(exc)
    if area <= 0:
        return None, "empty segmentation", "the mask has no pixels"
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]],
            "counts": counts.encode() if isinstance(counts, str) else bytes(counts)}, "", ""


# ---------------------------------------------------------------------------------------------
# COCO


def load_coco(coco_uri: str) -> dict:
    """The COCO json at ``coco_uri`` (a one-line ConvertError when it cannot be used at all)."""
    raw = storage.read_bytes(coco_uri)
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise ConvertError(f"{coco_uri}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ConvertError(f"{coco_uri}: malformed JSON at line {exc.lineno} column {exc.colno}:"
                           f" {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{coco_uri}: expected a JSON object with images/annotations/"
                           f"categories, got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ConvertError(f"{coco_uri}: missing or non-list '{key}'")
    if not isinstance(data.get("annotations", []), list):
        raise ConvertError(f"{coco_uri}: 'annotations' is not a list")
    return data


def _categories(coco_uri: str, cats: list) -> list[dict]:
    out, seen = [], set()
    for i, cat in enumerate(cats):
        cid = _int_id(cat.get("id")) if isinstance(cat, dict) else None
        if cid is None or not isinstance(cat.get("name"), str):
            raise ConvertError(f"{coco_uri}: categories[{i}] needs an integer 'id' and a 'name'")
        if cid in seen:
            raise ConvertError(f"{coco_uri}: duplicate category id {cid}")
        seen.add(cid)
        entry = {"id": cid, "name": cat["name"]}
        for key in ("supercategory", "keypoints", "skeleton"):
            if key in cat:
                entry[key] = cat[key]
        try:
            check_category(entry)
        except KeypointError as exc:
            raise ConvertError(f"{coco_uri}: categories[{i}]: {exc}") from None
        out.append(entry)
    if not out:
        raise ConvertError(f"{coco_uri}: 'categories' is empty")
    return out



def _coco_digest(job: IngestJob) -> str:
    return hashlib.sha256(storage.read_bytes(job.source)).hexdigest()


def _plan_coco(job: IngestJob, add: Callable, rep: Reporter) -> dict:
    """Parse and check the COCO json (everything that does not need the pixels); one item per
    usable image, in the json's order, with its annotations."""
    coco_uri, images_uri = job.source, job.images_uri
    data = load_coco(coco_uri)
    categories = _categories(coco_uri, data["categories"])
    cat_ids = {c["id"] for c in categories}
    num_kpts = {c["id"]: len(c.get("keypoints") or []) for c in categories}
    report = rep.report
    src = str(coco_uri)

    images: dict[int, dict] = {}
    order: list[int] = []
    for index, entry in enumerate(data["images"]):
        report.images_in += 1
        iid = _int_id(entry.get("id")) if isinstance(entry, dict) else None
        name = entry.get("file_name") if isinstance(entry, dict) else None
        if iid is None or not isinstance(name, str) or not name:
            rep.skip_image(src, f"images[{index}]", "malformed image entry",
                           "needs an integer 'id' and a 'file_name'")
            continue
        if iid in images:
            rep.skip_image(src, iid, "duplicate image id")
            continue
        images[iid] = entry
        order.append(iid)

    by_image: dict[int, list[dict]] = defaultdict(list)
    seen_ann: set[int] = set()
    for index, ann in enumerate(data.get("annotations") or []):
        report.instances_in += 1
        aid = _int_id(ann.get("id")) if isinstance(ann, dict) else None
        if aid is None:
            rep.skip_annotation(src, f"annotations[{index}]", "malformed annotation",
                                "needs an integer 'id'")
            continue
        if aid in seen_ann:
            rep.skip_annotation(src, aid, "duplicate annotation id")
            continue
        seen_ann.add(aid)
        iid = _int_id(ann.get("image_id"))
        if iid is None or iid not in images:
            rep.skip_annotation(src, aid, "image not in images",
                                f"image_id {ann.get('image_id')!r}")
            continue
        cid = _int_id(ann.get("category_id"))
        if cid is None or cid not in cat_ids:
            rep.skip_annotation(src, aid, "unknown category",
                                f"category_id {ann.get('category_id')!r} not in categories")
            continue
        bbox = ann.get("bbox")
        if bbox is not None:
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_finite32(v) for v in bbox)):
                rep.skip_annotation(src, aid, "malformed bbox",
                                    f"bbox {bbox!r} must be 4 numbers finite in float32")
                continue
            if bbox[2] <= 0 or bbox[3] <= 0:
                rep.skip_annotation(src, aid, "degenerate box", f"bbox {bbox} has w or h <= 0")
                continue
        area = ann.get("area")
        if isinstance(area, (int, float)) and not isinstance(area, bool) \
                and math.isfinite(area) and not _finite32(area):
            rep.skip_annotation(src, aid, "malformed area", f"area {area!r} overflows float32")
            continue
        seg = ann.get("segmentation")
        if seg is None or seg == [] or seg == {} or (isinstance(seg, list)
                                                     and all(p == [] for p in seg)):
            rep.skip_annotation(src, aid, "empty segmentation")
            continue
        reason, detail = check_annotation(ann.get("keypoints"), ann.get("num_keypoints"),
                                          num_kpts[cid])
        if reason:
            rep.skip_annotation(src, aid, reason, f"image {iid}, category {cid}: {detail}")
            continue
        by_image[iid].append(ann)
    del data, seen_ann

    sizes = dict(storage.list_file_sizes(images_uri))  # listed sizes cut shards by bytes
    for iid in order:
        entry = images[iid]
        anns = by_image.pop(iid, [])
        uri, why = confine(images_uri, entry["file_name"])
        if uri is None:
            rep.skip_image(src, iid, "file_name outside the images root", why, len(anns))
            continue
        add({"id": iid, "file_name": entry["file_name"], "uri": uri,
             "width": entry.get("width"), "height": entry.get("height"), "anns": anns},
            sizes.get(uri, 0))
    return {"categories": categories, "images": str(images_uri)}


def _coco_rows(job: IngestJob, items: list[dict], rep: Reporter) -> Iterator[dict]:
    """The rows of one convert chunk (pixels checked; segmentations -> compressed RLE)."""
    from pycocotools import mask as mask_utils

    src, max_pixels = str(job.source), job.options.max_pixels

    def fetch(item: dict) -> tuple[bytes, tuple[int, int]]:
        raw = storage.read_bytes(item["uri"])
        return raw, load_image(raw, max_pixels=max_pixels).size

    for item, result, error in _prefetch(items, fetch, job.options.workers):
        iid, file_uri, anns = item["id"], item["uri"], item["anns"]
        if isinstance(error, storage.StorageError):
            if _fatal_storage(error):
                raise error
            detail = "" if str(error).endswith(": not found") else str(error)
            rep.skip_image(file_uri, iid, _storage_reason(error, "missing image file"), detail,
                           len(anns))
            continue
        if isinstance(error, ImageDecodeError):
            rep.skip_image(file_uri, iid, _decode_reason(error), str(error), len(anns))
            continue
        if error is not None:
            raise error
        raw, (width, height) = result
        jw, jh = item["width"], item["height"]
        if (jw is not None and _int_id(jw) != width) or (jh is not None and _int_id(jh) != height):
            rep.skip_image(file_uri, iid, "size mismatch",
                           f"file is {width}x{height}, {src} says {jw}x{jh}", len(anns))
            continue
        rows_anns = []
        for ann in anns:
            rle, reason, detail = _segmentation_to_rle(ann["segmentation"], height, width)
            if rle is None:
                rep.skip_annotation(src, ann["id"], reason, detail)
                continue
            bbox = ann.get("bbox")
            if bbox is None:
                bbox = [float(v) for v in mask_utils.toBbox(rle)]
            area = ann.get("area")
            if not isinstance(area, (int, float)) or isinstance(area, bool) \
                    or not math.isfinite(area) or area <= 0:
                area = float(mask_utils.area(rle))
            score = ann.get("score")
            rows_anns.append(make_annotation(
                id=ann["id"], category_id=ann["category_id"], bbox=bbox, area=area,
                iscrowd=bool(ann.get("iscrowd", 0)), size=rle["size"], counts=rle["counts"],
                score=score if _finite32(score) else None, keypoints=ann.get("keypoints"),
                num_keypoints=ann.get("num_keypoints")))
        yield make_row(image_id=iid, file_name=item["file_name"], width=width, height=height,
                       image=raw, annotations=rows_anns)


def convert_coco(coco_uri: str, images_uri: str, out_uri: str, *,
                 images_per_shard: int = DEFAULT_IMAGES_PER_SHARD,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 row_group_size: int = DEFAULT_ROW_GROUP_SIZE, workers: int = 8,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, runner: str = "local",
                 on_record: Callable[[dict], None] | None = None) -> ConvertReport:
    """COCO json + image folder/prefix -> maskray shards + manifest under ``out_uri``.

    ``images_uri`` is where the COCO ``file_name``s are relative to (a name that leaves it is
    skipped). ``runner="ray"`` runs the plan and one task per shard on Ray (``maskray
    convert``); ``"local"`` in this process. A rerun after an interruption keeps the shards
    already written (:mod:`pipeline.data.ingest`). Returns a :class:`ConvertReport` (print
    ``report.summary()``).
    """
    options = IngestConfig(images_per_shard=images_per_shard, max_shard_bytes=max_shard_bytes,
                           row_group_size=row_group_size, workers=workers,
                           max_pixels=max_pixels, runner=runner)
    job = IngestJob(kind="coco", source=str(coco_uri), images_uri=str(images_uri),
                    out_uri=str(out_uri), options=options, plan_items=_plan_coco,
                    chunk_rows=_coco_rows, digest=_coco_digest)
    return run_ingest(job, on_record=on_record)


# ---------------------------------------------------------------------------------------------
# Back to COCO


def _f32(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (a stored 473.07 -> 473.07)."""
    return float(str(np.float32(value)))


def _num(value: float) -> int | float:
    """A stored float32 as COCO writes it: an int when integral, else its shortest decimal."""
    out = _f32(value)
    return int(out) if out.is_integer() else out


def coco_annotation(image_id: int, ann: dict) -> dict:
    """One shard annotation as a COCO annotation dict (compressed RLE ``counts`` as str;
    ``score``, ``keypoints`` and ``num_keypoints`` only where stored)."""
    seg = ann["segmentation"]
    counts = seg["counts"]
    out = {"id": int(ann["id"]), "image_id": int(image_id), "category_id": int(ann["category_id"]),
           "segmentation": {"size": [int(v) for v in seg["size"]],
                            "counts": counts.decode() if isinstance(counts, bytes) else counts},
           "area": _f32(ann["area"]), "bbox": [_f32(v) for v in ann["bbox"]],
           "iscrowd": int(bool(ann["iscrowd"]))}
    if ann.get("score") is not None:
        out["score"] = _f32(ann["score"])
    if ann.get("keypoints") is not None:
        out["keypoints"] = [_num(v) for v in ann["keypoints"]]
    if ann.get("num_keypoints") is not None:
        out["num_keypoints"] = int(ann["num_keypoints"])
    return out


def export_coco(dataset_uri: str, out_uri: str) -> dict:
    """Write the labeled dataset at ``dataset_uri`` (maskray shards) as one COCO JSON file at
    ``out_uri``: ``images`` (id, file_name, width, height), ``annotations``
    (:func:`coco_annotation`) and the manifest's ``categories`` (with ``keypoints`` and
    ``skeleton`` where they have them). The reverse of :func:`convert_coco` for the
    annotations; image bytes are not read. Returns ``{"out", "images", "annotations"}``."""
    from pipeline.data.format import read_rows

    manifest = read_manifest(dataset_uri)
    images, annotations = [], []
    for row in read_rows(dataset_uri, columns=["image_id", "file_name", "width", "height",
                                                "annotations"]):
        image_id = int(row["image_id"])
        images.append({"id": image_id, "file_name": row["file_name"], "width": int(row["width"]),
                       "height": int(row["height"])})
        annotations.extend(coco_annotation(image_id, ann) for ann in row["annotations"] or ())
    coco = {"images": images, "annotations": annotations, "categories": manifest.categories}
    storage.write_bytes(out_uri, json.dumps(coco).encode())
    return {"out": str(out_uri), "images": len(images), "annotations": len(annotations)}


# ---------------------------------------------------------------------------------------------
# Raw images


def categories_from(uri: str) -> list[dict]:
    """Categories of a maskray dataset (prefix or manifest) or of a COCO json file."""
    name = os.path.basename(str(uri).rstrip("/"))
    if name.endswith(".json") and name != "manifest.json":
        return _categories(uri, load_coco(uri)["categories"])
    return read_manifest(uri).categories


def _plan_pack(job: IngestJob, add: Callable, rep: Reporter) -> dict:
    """List the prefix (sizes come with the listing); ids in sorted order of image files."""
    wanted = tuple(job.params["suffixes"])
    files = storage.list_file_sizes(job.images_uri)
    if not files:
        raise ConvertError(f"{job.images_uri}: no files found")
    next_id = job.params["first_id"]
    for uri, nbytes in files:
        rep.report.images_in += 1
        if not uri.lower().endswith(wanted):
            ext = os.path.splitext(uri)[1] or "no suffix"
            rep.skip_image(uri, None, "not an image", f"suffix {ext}")
            continue
        add({"id": next_id, "name": storage.relative(uri, job.images_uri)}, nbytes)
        next_id += 1
    return {"unlabeled": True}


def _pack_rows(job: IngestJob, items: list[dict], rep: Reporter) -> Iterator[dict]:
    """The rows of one pack chunk (header pixel limit, full decode check)."""
    max_pixels = job.options.max_pixels

    def fetch(item: dict) -> tuple[bytes, tuple[int, int]]:
        raw = storage.read_bytes(storage.join(job.images_uri, item["name"]))
        return raw, load_image(raw, max_pixels=max_pixels).size

    for item, result, error in _prefetch(items, fetch, job.options.workers):
        uri = storage.join(job.images_uri, item["name"])
        if isinstance(error, storage.StorageError):
            if _fatal_storage(error):
                raise error
            rep.skip_image(uri, item["id"], _storage_reason(error, "unreadable file"), str(error))
            continue
        if isinstance(error, ImageDecodeError):
            rep.skip_image(uri, item["id"], _decode_reason(error), str(error))
            continue
        if error is not None:
            raise error
        raw, (width, height) = result
        yield make_row(image_id=item["id"], file_name=item["name"], width=width, height=height,
                       image=raw)


def pack_images(images_uri: str, out_uri: str, *, suffixes: Iterable[str] = IMAGE_SUFFIXES,
                first_id: int = 1, categories: list[dict] | None = None,
                images_per_shard: int = DEFAULT_IMAGES_PER_SHARD,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                row_group_size: int = DEFAULT_ROW_GROUP_SIZE, workers: int = 8,
                max_pixels: int | None = DEFAULT_MAX_PIXELS, runner: str = "local",
                on_record: Callable[[dict], None] | None = None) -> ConvertReport:
    """Every file under ``images_uri`` -> unlabeled shards (empty ``annotations``).

    Files are taken in sorted order; ``image_id`` is ``first_id`` + their index among the files
    with an image suffix, ``file_name`` the path relative to ``images_uri``. Files without an
    image suffix, objects that cannot be read (AccessDenied included) and files that do not
    decode or exceed ``max_pixels`` are reported and skipped (images_in counts every file).
    ``categories`` (e.g. from :func:`categories_from`) go into the manifest. ``runner`` and
    resuming as for :func:`convert_coco`.
    """
    options = IngestConfig(images_per_shard=images_per_shard, max_shard_bytes=max_shard_bytes,
                           row_group_size=row_group_size, workers=workers,
                           max_pixels=max_pixels, runner=runner)
    job = IngestJob(kind="pack", source=str(images_uri), images_uri=str(images_uri),
                    out_uri=str(out_uri), options=options, plan_items=_plan_pack,
                    chunk_rows=_pack_rows,
                    params={"first_id": int(first_id),
                            "suffixes": [x.lower() for x in suffixes]})
    return run_ingest(job, categories=list(categories or []), on_record=on_record)
