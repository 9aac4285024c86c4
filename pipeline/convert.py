"""Converters into maskray-shards/1: COCO json + images (:func:`convert_coco`) and a folder or
bucket prefix of raw images (:func:`pack_images`).

Images are stored as their original bytes. Polygons and uncompressed RLE become compressed RLE
once, here, with pycocotools; compressed RLE is kept as is. Per-item problems (an annotation
whose image is missing, a missing or unreadable image file, a degenerate box, an unknown
category, an empty segmentation, duplicates, malformed entries…) are reported with the file and
id and skipped; the rest is converted and the counts add up (in = written + skipped). Problems
that make the whole input unusable (unreadable or malformed JSON, no ``categories``, storage
access errors) raise a one-line :class:`~model.errors.MaskrayError`.

Output is written shard by shard (atomically) and ``manifest.json`` last; an existing manifest
at the output is removed first, so an interrupted run leaves nothing a reader takes, and a
rerun over the same input rewrites the same shards and completes the dataset.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from model.errors import MaskrayError
from pipeline import storage
from pipeline.dataset import ImageDecodeError, open_image
from pipeline.format import (DEFAULT_IMAGES_PER_SHARD, DEFAULT_MAX_SHARD_BYTES,
                             DEFAULT_ROW_GROUP_SIZE, Manifest, ShardWriter, make_annotation,
                             make_row, manifest_uri, read_manifest, write_manifest)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm", ".pbm", ".pnm")
MAX_PROBLEMS_LOGGED = 50


class ConvertError(MaskrayError):
    """The input as a whole cannot be converted (unreadable/malformed JSON, no categories)."""


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


@dataclass
class ConvertReport:
    """What a conversion did; ``*_in == *_written + *_skipped`` always holds."""

    out: str
    images_in: int = 0
    images_written: int = 0
    images_skipped: int = 0
    instances_in: int = 0
    instances_written: int = 0
    instances_skipped: int = 0
    shards: list = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    instance_skip_reasons: Counter = field(default_factory=Counter)
    image_skip_reasons: Counter = field(default_factory=Counter)

    def check(self) -> None:
        assert self.images_in == self.images_written + self.images_skipped, self
        assert self.instances_in == self.instances_written + self.instances_skipped, self

    def summary(self, max_problems: int = 20) -> str:
        lines = [f"images: {self.images_in} in, {self.images_written} written, "
                 f"{self.images_skipped} skipped",
                 f"instances: {self.instances_in} in, {self.instances_written} written, "
                 f"{self.instances_skipped} skipped",
                 f"shards: {len(self.shards)} -> {self.out}"]
        if self.image_skip_reasons:
            lines.append("skipped images: " + ", ".join(
                f"{reason}: {n}" for reason, n in sorted(self.image_skip_reasons.items())))
        if self.instance_skip_reasons:
            lines.append("skipped instances: " + ", ".join(
                f"{reason}: {n}" for reason, n in sorted(self.instance_skip_reasons.items())))
        for problem in self.problems[:max_problems]:
            lines.append(f"  {problem}")
        if len(self.problems) > max_problems:
            lines.append(f"  ... and {len(self.problems) - max_problems} more problems")
        return "\n".join(lines)


class _Reporter:
    def __init__(self, report: ConvertReport) -> None:
        self.report = report

    def problem(self, source: str, kind: str, id: Any, reason: str, detail: str = "") -> None:
        problem = Problem(str(source), kind, id, reason, detail)
        self.report.problems.append(problem)
        if len(self.report.problems) <= MAX_PROBLEMS_LOGGED:
            log.warning("skipped %s", problem)
        elif len(self.report.problems) == MAX_PROBLEMS_LOGGED + 1:
            log.warning("more problems; see the summary at the end")

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
# Helpers


def _int_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


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
    """Errors that will hit every file (credentials, endpoint, bucket) stop the conversion."""
    text = str(exc)
    return not text.endswith(": not found") and ("access denied" in text
                                                  or "cannot reach" in text
                                                  or "does not exist" in text)


def _check_image(data: bytes) -> tuple[int, int]:
    """``(width, height)`` after fully decoding ``data`` (raises ImageDecodeError)."""
    img = open_image(data, max_pixels=None)
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt streams raise several types
        raise ImageDecodeError(f"corrupt or truncated {img.format or 'image'} data "
                               f"({len(data)} bytes: {exc})") from None
    return img.size


def _prepare_output(out_uri: str) -> None:
    """Check access, remove the old manifest (the dataset is unreadable until this run
    completes) and temporary files that an interrupted local run left behind."""
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
        log.info("removing the existing %s; it is rewritten when the conversion completes", muri)
        storage.delete(muri)


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
        if "supercategory" in cat:
            entry["supercategory"] = cat["supercategory"]
        out.append(entry)
    if not out:
        raise ConvertError(f"{coco_uri}: 'categories' is empty")
    return out


def convert_coco(coco_uri: str, images_uri: str, out_uri: str, *,
                 images_per_shard: int = DEFAULT_IMAGES_PER_SHARD,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 row_group_size: int = DEFAULT_ROW_GROUP_SIZE, workers: int = 8) -> ConvertReport:
    """COCO json + image folder/prefix -> maskray shards + manifest under ``out_uri``.

    ``images_uri`` is where the COCO ``file_name``s are relative to. Returns a
    :class:`ConvertReport` (print ``report.summary()``).
    """
    data = load_coco(coco_uri)
    categories = _categories(coco_uri, data["categories"])
    cat_ids = {c["id"] for c in categories}
    report = ConvertReport(out=str(out_uri))
    rep = _Reporter(report)
    src = str(coco_uri)

    # images
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

    # annotations (everything that does not need the pixels)
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
            ok = (isinstance(bbox, list) and len(bbox) == 4
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                          and math.isfinite(v) for v in bbox))
            if not ok:
                rep.skip_annotation(src, aid, "malformed bbox", f"bbox {bbox!r}")
                continue
            if bbox[2] <= 0 or bbox[3] <= 0:
                rep.skip_annotation(src, aid, "degenerate box", f"bbox {bbox} has w or h <= 0")
                continue
        seg = ann.get("segmentation")
        if seg is None or seg == [] or seg == {} or (isinstance(seg, list)
                                                     and all(p == [] for p in seg)):
            rep.skip_annotation(src, aid, "empty segmentation")
            continue
        by_image[iid].append(ann)

    # images with pixels, in order; rows to the writer
    _prepare_output(out_uri)

    def fetch(iid: int) -> tuple[bytes, tuple[int, int]]:
        data_ = storage.read_bytes(storage.join(images_uri, images[iid]["file_name"]))
        return data_, _check_image(data_)

    writer = ShardWriter(out_uri, images_per_shard=images_per_shard,
                         max_shard_bytes=max_shard_bytes, row_group_size=row_group_size)
    with writer:
        for iid, result, error in _prefetch(order, fetch, workers):
            entry = images[iid]
            file_uri = storage.join(images_uri, entry["file_name"])
            anns = by_image.pop(iid, [])
            if isinstance(error, storage.StorageError):
                if _fatal_storage(error):
                    raise error
                rep.skip_image(file_uri, iid, "missing image file", annotations=len(anns))
                continue
            if isinstance(error, ImageDecodeError):
                rep.skip_image(file_uri, iid, "unreadable image", str(error), len(anns))
                continue
            if error is not None:
                raise error
            raw, (width, height) = result
            jw, jh = entry.get("width"), entry.get("height")
            if (jw is not None and _int_id(jw) != width) or (jh is not None
                                                            and _int_id(jh) != height):
                rep.skip_image(file_uri, iid, "size mismatch",
                               f"file is {width}x{height}, {coco_uri} says {jw}x{jh}", len(anns))
                continue
            rows_anns = []
            for ann in anns:
                rle, reason, detail = _segmentation_to_rle(ann["segmentation"], height, width)
                if rle is None:
                    rep.skip_annotation(src, ann["id"], reason, detail)
                    continue
                bbox = ann.get("bbox")
                if bbox is None:
                    from pycocotools import mask as mask_utils

                    bbox = [float(v) for v in mask_utils.toBbox(rle)]
                area = ann.get("area")
                if not isinstance(area, (int, float)) or isinstance(area, bool) \
                        or not math.isfinite(area) or area <= 0:
                    from pycocotools import mask as mask_utils

                    area = float(mask_utils.area(rle))
                score = ann.get("score")
                rows_anns.append(make_annotation(
                    id=ann["id"], category_id=ann["category_id"], bbox=bbox, area=area,
                    iscrowd=bool(ann.get("iscrowd", 0)), size=rle["size"], counts=rle["counts"],
                    score=score if isinstance(score, (int, float)) else None))
            writer.add(make_row(image_id=iid, file_name=entry["file_name"], width=width,
                                height=height, image=raw, annotations=rows_anns))
            report.images_written += 1
            report.instances_written += len(rows_anns)
    report.shards = writer.shards
    manifest = Manifest(categories=categories, shards=writer.shards, source=str(coco_uri),
                        extra={"images": str(images_uri), "images_in": report.images_in,
                               "instances_in": report.instances_in,
                               "skipped_images": dict(report.image_skip_reasons),
                               "skipped_instances": dict(report.instance_skip_reasons)})
    write_manifest(out_uri, manifest)
    report.check()
    log.info("converted %s: %d images, %d instances, %d shards", coco_uri,
             report.images_written, report.instances_written, len(report.shards))
    return report


# ---------------------------------------------------------------------------------------------
# Raw images


def categories_from(uri: str) -> list[dict]:
    """Categories of a maskray dataset (prefix or manifest) or of a COCO json file."""
    name = os.path.basename(str(uri).rstrip("/"))
    if name.endswith(".json") and name != "manifest.json":
        return _categories(uri, load_coco(uri)["categories"])
    return read_manifest(uri).categories


def pack_images(images_uri: str, out_uri: str, *, suffixes: Iterable[str] = IMAGE_SUFFIXES,
                first_id: int = 1, categories: list[dict] | None = None,
                images_per_shard: int = DEFAULT_IMAGES_PER_SHARD,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                row_group_size: int = DEFAULT_ROW_GROUP_SIZE, workers: int = 8) -> ConvertReport:
    """Every file under ``images_uri`` -> unlabeled shards (empty ``annotations``).

    Files are taken in sorted order; ``image_id`` is ``first_id`` + their index among the files
    with an image suffix, ``file_name`` the path relative to ``images_uri``. Files without an
    image suffix and files that do not decode are reported and skipped (images_in counts every
    file). ``categories`` (e.g. from :func:`categories_from`) go into the manifest.
    """
    wanted = tuple(s.lower() for s in suffixes)
    files = storage.list_files(images_uri)
    if not files:
        raise ConvertError(f"{images_uri}: no files found")
    report = ConvertReport(out=str(out_uri))
    rep = _Reporter(report)
    candidates = []
    for uri in files:
        report.images_in += 1
        if not uri.lower().endswith(wanted):
            ext = os.path.splitext(uri)[1] or "no suffix"
            rep.skip_image(uri, None, "not an image", f"suffix {ext}")
            continue
        candidates.append((first_id + len(candidates), uri))
    _prepare_output(out_uri)

    def fetch(item):
        data_ = storage.read_bytes(item[1])
        return data_, _check_image(data_)

    writer = ShardWriter(out_uri, images_per_shard=images_per_shard,
                         max_shard_bytes=max_shard_bytes, row_group_size=row_group_size)
    with writer:
        for (iid, uri), result, error in _prefetch(candidates, fetch, workers):
            if isinstance(error, storage.StorageError):
                if _fatal_storage(error):
                    raise error
                rep.skip_image(uri, iid, "unreadable file", str(error))
                continue
            if isinstance(error, ImageDecodeError):
                rep.skip_image(uri, iid, "unreadable image", str(error))
                continue
            if error is not None:
                raise error
            raw, (width, height) = result
            writer.add(make_row(image_id=iid, file_name=storage.relative(uri, images_uri),
                                width=width, height=height, image=raw))
            report.images_written += 1
    report.shards = writer.shards
    manifest = Manifest(categories=list(categories or []), shards=writer.shards,
                        source=str(images_uri),
                        extra={"unlabeled": True, "images_in": report.images_in,
                               "skipped_images": dict(report.image_skip_reasons)})
    write_manifest(out_uri, manifest)
    report.check()
    return report
