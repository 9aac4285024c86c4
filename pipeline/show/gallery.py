"""A static HTML gallery of a results prefix (``maskray show --results``): no model, no Ray, no server.

:func:`build_gallery` reads ``<results>/provenance.json`` (:func:`pipeline.results.read_provenance`)
to find the images (``input.uri``, ``input.kind``: "shards" = a maskray dataset whose rows are keyed
by ``image_id``, "files" = a prefix of raw images, each result row's ``file_name`` being the image's
object path), and writes::

    <out>/index.html              the page: "showing N of M images", per-category instance counts,
                                  a score histogram (inline SVG), thumbnails linking to the
                                  overlays, and the error rows (file name + error)
    <out>/overlays/<k>-<id>.jpg   overlays (masks, boxes, "name score"), longer side ``long_side`` px
    <out>/thumbs/<k>-<id>.jpg     thumbnails, longer side :data:`THUMB_SIDE` px
    <out>/crops/<k>-<id>-<n>.jpg  huge images only (over ``large_pixels``): full-resolution crops
                                  around the best detections; the overlay is then an overview read
                                  region by region (:mod:`pipeline.show.large`)

The page uses relative links only and no script, font or style from elsewhere, so it works opened
from ``file://`` or copied anywhere (an ``s3://`` out prefix included).

Bounded work whatever the size of the run: the counts and the histogram are computed over ALL
rows by streaming the results files one at a time, one record batch at a time
(:func:`pipeline.results.iter_batches`), reading only the
columns they need (``error``, ``file_name``, and each instance's ``category_id`` and ``score``:
never the masks); what is kept is a counter per category, :data:`SCORE_BINS` histogram bins and
at most :data:`MAX_ERRORS_LISTED` error rows. Overlays are drawn for the first ``limit`` rows
without an error only, one image at a time: the image is shrunk to ``long_side`` first, and each
instance's mask is decoded alone and sampled down to that size (a 12-MP photo never has a
full-size mask stack). A row whose image cannot be found becomes an entry marked
"image not found".
"""

from __future__ import annotations

import html
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.errors import MaskrayError, error_text
from pipeline.results import PROVENANCE, iter_batches, read_provenance, result_files
from pipeline.show.large import LARGE_PIXELS, is_large, render_large

logger = logging.getLogger(__name__)

PAGE = "index.html"
DEFAULT_LIMIT = 64  # overlays drawn
THUMB_SIDE = 256  # px, longer side of a thumbnail
SCORE_BINS = 20  # histogram bins over [0, 1]
MAX_ERRORS_LISTED = 500  # error rows named on the page (all are counted)
DEFAULT_CROPS = 16  # huge images: full-resolution crops around the best detections
_STAT_COLUMNS = ["file_name", "error", "instances.list.element.category_id", "instances.list.element.score"]


# --------------------------------------------------------------------------- names


def category_names(provenance: dict, manifest_categories: Sequence[dict] = ()) -> dict[int, str]:
    """``category id -> name``: the provenance's ``categories`` (list of ``{id, name}``) first,
    then the dataset manifest's; ids with neither are named by the caller (the bare id)."""
    names: dict[int, str] = {}
    for source in (provenance.get("categories") or [], manifest_categories or []):
        for c in source:
            if isinstance(c, dict) and "id" in c and "name" in c:
                names.setdefault(int(c["id"]), str(c["name"]))
    return names


# --------------------------------------------------------------------------- streaming statistics


@dataclass
class ResultStats:
    """Counts over every results row, in memory that does not grow with the rows.

    ``per_category``: ``category id -> [instances, instances scoring >= score_thresh]``;
    ``histogram``: int64 [:data:`SCORE_BINS`] instance counts over equal score bins of [0, 1];
    ``error_rows``: the first :data:`MAX_ERRORS_LISTED` ``(file_name, error)`` pairs.
    """

    score_thresh: float
    images: int = 0
    errors: int = 0
    instances: int = 0
    per_category: dict[int, list[int]] = field(default_factory=dict)
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(SCORE_BINS, np.int64))
    error_rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, batch: Any) -> None:
        """Count one record batch with the columns of :data:`_STAT_COLUMNS`."""
        import pyarrow.compute as pc

        self.images += batch.num_rows
        flat = pc.list_flatten(batch.column("instances"))
        cats = flat.field("category_id").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        scores = flat.field("score").fill_null(0.0).to_numpy(zero_copy_only=False).astype(np.float64)
        self.instances += len(cats)
        high = scores >= self.score_thresh
        for ids, slot in ((cats, 0), (cats[high], 1)):
            values, counts = np.unique(ids, return_counts=True)
            for v, n in zip(values.tolist(), counts.tolist()):
                self.per_category.setdefault(int(v), [0, 0])[slot] += int(n)
        self.histogram += np.histogram(np.clip(scores, 0.0, 1.0), bins=SCORE_BINS, range=(0.0, 1.0))[0]
        errors = batch.column("error")
        failed = pc.indices_nonzero(pc.is_valid(errors)).to_numpy()
        self.errors += len(failed)
        room = MAX_ERRORS_LISTED - len(self.error_rows)
        if room > 0 and len(failed):
            names = batch.column("file_name")
            for i in failed[:room].tolist():
                self.error_rows.append((str(names[i].as_py()), str(errors[i].as_py())))


def scan_results(files: Sequence[str], *, score_thresh: float,
                 limit: int) -> tuple[ResultStats, list[tuple[str, list[int]]]]:
    """``(stats over every row, sample)``: the sample is the first ``limit`` rows without an
    error, as ``(results file, row positions in it)`` pairs in file order."""
    stats = ResultStats(score_thresh)
    sample: list[tuple[str, list[int]]] = []
    taken = 0
    for uri in files:
        offset, positions = 0, []
        for batch in iter_batches(uri, _STAT_COLUMNS):
            stats.add(batch)
            if taken < limit:
                ok = np.flatnonzero(batch.column("error").is_null().to_numpy(zero_copy_only=False))
                chosen = (ok[:limit - taken] + offset).tolist()
                positions += chosen
                taken += len(chosen)
            offset += batch.num_rows
        if positions:
            sample.append((uri, positions))
    return stats, sample


def sample_rows(sample: Sequence[tuple[str, list[int]]]) -> list[dict]:
    """The sampled rows (``image_id``, ``file_name``, ``instances`` with masks), in order."""
    rows: list[dict] = []
    for uri, positions in sample:
        last, offset = max(positions), 0
        for batch in iter_batches(uri, ["image_id", "file_name", "instances"]):
            picked = [p - offset for p in positions if offset <= p < offset + batch.num_rows]
            if picked:
                rows.extend(batch.take(picked).to_pylist())
            offset += batch.num_rows
            if offset > last:
                break
    return rows


# --------------------------------------------------------------------------- images


class ImageSource:
    """Encoded image bytes of a results row, from where its run read them.

    ``kind`` "files": ``file_name`` is the object path; with ``override`` its path relative to
    ``recorded`` is looked up under ``override`` instead. ``kind`` "shards": rows of the dataset at
    ``override or recorded`` with the sampled ``image_id``\\s, fetched together by :meth:`prefetch`.
    """

    def __init__(self, kind: str, recorded: str, override: str | None = None) -> None:
        if kind not in ("shards", "files"):
            raise MaskrayError(f"results input kind {kind!r} is not 'shards' or 'files'")
        self.kind, self.recorded, self.override = kind, recorded, override
        self.root = override or recorded
        self._by_id: dict[int, bytes] = {}
        self._dataset_error: str | None = None

    def manifest_categories(self) -> list[dict]:
        """The dataset's categories (shards only; [] when it cannot be read)."""
        from pipeline.data.format import read_manifest

        if self.kind != "shards":
            return []
        try:
            return list(read_manifest(self.root).categories)
        except MaskrayError as exc:
            self._dataset_error = error_text(exc)
            logger.warning("dataset %s: %s", self.root, self._dataset_error)
            return []

    def prefetch(self, image_ids: Sequence[int]) -> None:
        """Shards: read the encoded images of ``image_ids`` (one shard at a time, filtered by id,
        only the ``image_id`` and ``image`` columns), stopping once all are found."""
        import pyarrow.dataset as pads

        from pipeline import storage
        from pipeline.data.format import shard_uris

        wanted = {int(i) for i in image_ids}
        if self.kind != "shards" or not wanted or self._dataset_error:
            return
        try:
            uris = shard_uris(self.root)
        except MaskrayError as exc:
            self._dataset_error = error_text(exc)
            return
        for uri in uris:
            fs, path = storage.resolve(uri)
            try:
                table = pads.dataset(path, filesystem=fs, format="parquet").to_table(
                    columns=["image_id", "image"], filter=pads.field("image_id").isin(sorted(wanted - self._by_id.keys())))
            except Exception as exc:  # noqa: BLE001 - one unreadable shard: its images are not found
                logger.warning("shard %s: %s", uri, error_text(exc))
                continue
            for image_id, data in zip(table.column("image_id").to_pylist(), table.column("image").to_pylist()):
                self._by_id[int(image_id)] = data
            if wanted <= self._by_id.keys():
                break

    def read(self, row: dict, *, tiff_by_uri: bool = False) -> tuple[bytes | str | None, str | None]:
        """``(encoded bytes, None)``, or ``(None, why)`` ("image not found ..."). With
        ``tiff_by_uri``, a raw TIFF file is returned as its URI instead (read region by region
        later, never fetched whole)."""
        from pipeline import storage

        if self.kind == "shards":
            data = self._by_id.get(int(row["image_id"]))
            if data is None:
                why = f" ({self._dataset_error})" if self._dataset_error else ""
                return None, f"image not found: image_id {row['image_id']} is not in {self.root}{why}"
            return data, None
        uri = str(row["file_name"] or "")
        if self.override:
            uri = storage.join(self.override, storage.relative(uri, self.recorded))
        if tiff_by_uri and uri.lower().endswith((".tif", ".tiff")) and storage.exists(uri):
            return uri, None
        try:
            return storage.read_bytes(uri), None
        except MaskrayError as exc:
            if not storage.exists(uri):
                return None, f"image not found: {uri}"
            return None, f"image could not be read: {error_text(exc)}"


def _decode_mask_at(seg: dict, frame: tuple[int, int], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """bool [len(rows), len(cols)]: one instance's RLE (``size`` must be ``frame`` = (H, W)),
    decoded alone at full size and sampled at the display grid ``rows`` x ``cols``."""
    from pycocotools import mask as mask_utils

    size = [int(v) for v in seg["size"]]
    if tuple(size) != tuple(frame):
        raise MaskrayError(f"a mask is {size[1]}x{size[0]} but the image is {frame[1]}x{frame[0]}")
    full = mask_utils.decode({"size": size, "counts": bytes(seg["counts"])})
    return full[np.ix_(rows, cols)] > 0


def render(data: bytes, instances: Sequence[dict], label_of: dict[int, int], label_names: Sequence[str], *,
           long_side: int, score_thresh: float, decode_options: dict,
           skeletons: Sequence[Sequence[Sequence[int]] | None] | None = None) -> Any:
    """A PIL RGB overlay of one image, longer side ``long_side`` px: the image is decoded as its
    inference run decoded it (``decode_options``: ``max_pixels``, ``exif``, ``intensity``), resized
    (area average when shrinking, nearest when enlarging), and the instances scoring >=
    ``score_thresh`` drawn at that size (:func:`pipeline.show.draw.render_overlay`), keypoints
    included (joined by ``skeletons[label - 1]``)."""
    import torch
    from PIL import Image

    from pipeline.infer.stages import decode_pixels
    from pipeline.instances import Instances
    from pipeline.show.draw import render_overlay

    pixels = decode_pixels(data, **decode_options)  # uint8 [3, H, W]
    height, width = int(pixels.shape[1]), int(pixels.shape[2])
    scale = long_side / max(height, width)
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    picture = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))
    del pixels
    picture = picture.resize((w, h), Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BOX)
    canvas = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).contiguous()
    kept = [i for i in instances if i["score"] is not None and float(i["score"]) >= score_thresh]
    rows = np.minimum(((np.arange(h) + 0.5) * height / h).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * width / w).astype(np.int64), width - 1)
    masks = torch.from_numpy(np.stack(
        [_decode_mask_at(i["segmentation"], (height, width), rows, cols) if i.get("segmentation") else
         np.zeros((h, w), bool) for i in kept])) if kept else torch.zeros(0, h, w, dtype=torch.bool)
    boxes = torch.tensor([[float(v) for v in i["bbox"]] for i in kept], dtype=torch.float32).reshape(-1, 4)
    boxes = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1) * torch.tensor([w / width, h / height] * 2)
    found = Instances((h, w), boxes, torch.tensor([float(i["score"]) for i in kept], dtype=torch.float32),
                      torch.tensor([label_of[int(i["category_id"])] for i in kept], dtype=torch.int64), masks,
                      _keypoints_at(kept, (w / width, h / height)))
    drawn = render_overlay(canvas, found, label_names, score_thresh=score_thresh, long_side=max(h, w),
                           skeletons=skeletons)
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())


def _keypoints_at(instances: Sequence[dict], scale: tuple[float, float]) -> Any:
    """float32 [N, K, 3] (x, y, score) of the instances' stored keypoints scaled by ``scale`` (sx, sy)
    to the display size; an instance without them gets score -inf (never drawn); None when none has any."""
    import torch

    points = [i.get("keypoints") or [] for i in instances]
    k = max((len(p) // 3 for p in points), default=0)
    if k == 0:
        return None
    out = torch.zeros(len(points), k, 3)
    out[:, :, 2] = float("-inf")
    for n, p in enumerate(points):
        if p:
            out[n, :len(p) // 3] = torch.tensor(p, dtype=torch.float32).reshape(-1, 3)
    out[:, :, 0] *= scale[0]
    out[:, :, 1] *= scale[1]
    return out


def _jpeg(picture: Any, quality: int) -> bytes:
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=quality)
    return out.getvalue()


# --------------------------------------------------------------------------- the page


@dataclass
class Entry:
    """One image on the page: its overlay and thumbnail (paths relative to the page), or a note."""

    image_id: int
    file_name: str
    instances: int
    overlay: str | None = None
    thumb: str | None = None
    thumb_size: tuple[int, int] = (0, 0)  # (width, height) px
    note: str | None = None
    crops: list[str] = field(default_factory=list)  # huge images: full-resolution crops around detections


@dataclass
class GallerySummary:
    """What :func:`build_gallery` wrote: ``shown`` entries of ``images`` results rows."""

    page: str
    shown: int
    images: int
    errors: int
    instances: int
    missing: int

    def line(self) -> str:
        return (f"showing {self.shown} of {self.images} images ({self.errors} error rows, {self.missing} images "
                f"not drawn, {self.instances} instances): {self.page}")


def histogram_svg(histogram: Sequence[int], score_thresh: float, *, width: int = 640, height: int = 220) -> str:
    """An inline SVG bar chart of score counts over equal bins of [0, 1] (``histogram[k]`` counts
    scores in ``[k/B, (k+1)/B)``), with a dashed line at ``score_thresh``."""
    left, right, top, bottom = 56, 12, 12, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(1, max(int(v) for v in histogram) if len(histogram) else 1)
    bar = plot_w / max(1, len(histogram))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="score histogram">',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>']
    for k, value in enumerate(int(v) for v in histogram):
        bar_h = plot_h * value / peak
        lo, hi = k / len(histogram), (k + 1) / len(histogram)
        parts.append(f'<rect x="{left + k * bar + 1:.1f}" y="{top + plot_h - bar_h:.1f}" width="{bar - 2:.1f}" '
                     f'height="{bar_h:.1f}" fill="#4a7bd0"><title>{lo:.2f}-{hi:.2f}: {value}</title></rect>')
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + tick * plot_w
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" font-size="12" text-anchor="middle">{tick:g}</text>')
    parts.append(f'<text x="{left - 6}" y="{top + 10}" font-size="12" text-anchor="end">{peak}</text>')
    parts.append(f'<text x="{left - 6}" y="{top + plot_h}" font-size="12" text-anchor="end">0</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" font-size="12" text-anchor="middle">score</text>')
    x = left + min(max(score_thresh, 0.0), 1.0) * plot_w
    parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="#c33" '
                 f'stroke-dasharray="4 3"><title>drawn from score {score_thresh:g}</title></line>')
    parts.append("</svg>")
    return "\n".join(parts)


_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
td.n{text-align:right}.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:%dpx}figure img{display:block;max-width:100%%;height:auto;border:1px solid #ccc}
figcaption{font-size:12px;word-break:break-all}.missing{border:1px dashed #c33;padding:1em;color:#c33}
.err{color:#c33}""" % THUMB_SIDE


def _crop_links(crops: Sequence[str]) -> str:
    if not crops:
        return ""
    links = " ".join(f'<a class="crop" href="{html.escape(c)}">{k + 1}</a>' for k, c in enumerate(crops))
    return f"<br>full-resolution crops: {links}"


def page_html(*, results_uri: str, provenance: dict, stats: ResultStats, entries: Sequence[Entry],
              names: dict[int, str]) -> str:
    """The whole ``index.html`` (self-contained: inline style and SVG, relative links only)."""
    e = html.escape
    model = provenance.get("model") or "?"
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>maskray results: {e(results_uri)}</title>", f"<style>{_STYLE}</style></head><body>",
           f"<h1>maskray results</h1><p>{e(results_uri)} &middot; model {e(str(model))}</p>",
           f'<p id="showing">showing {len(entries)} of {stats.images} images</p>',
           f"<p>instances: {stats.instances}; rows with an error: {stats.errors}; the overlays draw instances "
           f"scoring &ge; {stats.score_thresh:g}.</p>",
           '<h2>Instances per category</h2><table id="categories"><tr><th>category id</th><th>name</th>'
           f"<th>instances</th><th>score &ge; {stats.score_thresh:g}</th></tr>"]
    for cid in sorted(stats.per_category):
        total, high = stats.per_category[cid]
        out.append(f'<tr data-category="{cid}"><td class="n">{cid}</td><td>{e(names.get(cid, str(cid)))}</td>'
                   f'<td class="n">{total}</td><td class="n">{high}</td></tr>')
    out.append("</table>")
    out.append(f'<h2>Scores</h2><div id="histogram">{histogram_svg(stats.histogram, stats.score_thresh)}</div>')
    out.append('<h2>Images</h2><div class="grid" id="gallery">')
    for entry in entries:
        caption = f"{e(entry.file_name)} &middot; instances: {entry.instances}"
        if entry.overlay:
            tw, th = entry.thumb_size
            out.append(f'<figure class="entry"><a href="{e(entry.overlay)}"><img src="{e(entry.thumb)}" '
                       f'width="{tw}" height="{th}" alt="{e(entry.file_name)}"></a>'
                       f"<figcaption>{caption}{_crop_links(entry.crops)}</figcaption></figure>")
        else:
            out.append(f'<figure class="entry"><div class="missing">{e(entry.note or "not drawn")}</div>'
                       f"<figcaption>{caption}</figcaption></figure>")
    out.append("</div>")
    out.append(f'<h2>Errors</h2><p>rows with an error: {stats.errors}'
               + (f" (the first {len(stats.error_rows)} are listed)" if stats.errors > len(stats.error_rows) else "")
               + '.</p><table id="errors"><tr><th>file</th><th>error</th></tr>')
    for name, error in stats.error_rows:
        out.append(f'<tr class="error-row"><td>{e(name)}</td><td class="err">{e(error)}</td></tr>')
    out.append("</table></body></html>\n")
    return "\n".join(out)


def build_gallery(results_uri: str, out_uri: str, *, images_uri: str | None = None, limit: int = DEFAULT_LIMIT,
                  long_side: int = 1280, score_thresh: float = 0.5, crops: int = DEFAULT_CROPS,
                  large_pixels: int = LARGE_PIXELS) -> GallerySummary:
    """Write ``<out_uri>/index.html`` with overlays of the first ``limit`` rows without an error
    of the results under ``results_uri`` (see the module docstring). The images come from the
    input its ``provenance.json`` records, or from ``images_uri`` (the same dataset or image
    prefix, moved). ``long_side`` px is the overlays' longer side; instances scoring >=
    ``score_thresh`` are drawn. An image of more than ``large_pixels`` pixels gets a downsampled
    overview read region by region and ``crops`` full-resolution crops around its best detections
    (``crops/<k>-<id>-<n>.jpg``, linked under its thumbnail; :mod:`pipeline.show.large`)."""
    from pipeline import storage

    if limit < 1:
        raise MaskrayError(f"--limit must be >= 1, got {limit}")
    if long_side < 16:
        raise MaskrayError(f"--long-side must be >= 16, got {long_side}")
    provenance = read_provenance(results_uri)
    recorded = provenance.get("input") or {}
    if not recorded.get("uri") and not images_uri:
        raise MaskrayError(f"--results {results_uri}: no {PROVENANCE} naming its input; pass --data with the images")
    kind = recorded.get("kind")
    if kind is None:
        from pipeline.data.format import manifest_uri

        kind = "shards" if storage.exists(manifest_uri(images_uri)) else "files"
    source = ImageSource(kind, str(recorded.get("uri") or images_uri), images_uri)
    files = result_files(results_uri)
    stats, sample = scan_results(files, score_thresh=score_thresh, limit=limit)
    rows = sample_rows(sample)
    source.prefetch([int(r["image_id"]) for r in rows])

    manifest_categories = source.manifest_categories()
    names = category_names(provenance, manifest_categories)
    options = provenance.get("options") or {}
    ids = sorted(names.keys() | {int(c) for c in options.get("category_ids") or []} | stats.per_category.keys()
                 | {int(i["category_id"]) for r in rows for i in r["instances"] or []})
    label_of = {cid: k + 1 for k, cid in enumerate(ids)}
    label_names = [names.get(cid, str(cid)) for cid in ids]
    skeleton_of = {int(c["id"]): c.get("skeleton") for c in [*(provenance.get("categories") or []), *manifest_categories]
                   if isinstance(c, dict) and "id" in c and c.get("skeleton")}
    skeletons = [skeleton_of.get(cid) for cid in ids]
    decode_options = {"max_pixels": options.get("max_pixels"), "exif": bool(options.get("exif", True)),
                      "intensity": options.get("intensity")}

    entries: list[Entry] = []
    for k, row in enumerate(rows):
        image_id = int(row["image_id"])
        entry = Entry(image_id, str(row["file_name"] or image_id), len(row["instances"] or []))
        data, entry.note = source.read(row, tiff_by_uri=True)
        if data is not None:
            try:
                stem = f"{k:05d}-{image_id}.jpg"
                if is_large(data, large_pixels):
                    picture, shown = render_large(data, row["instances"] or [], label_of, label_names,
                                                  long_side=long_side, score_thresh=score_thresh, crops=crops,
                                                  intensity=decode_options["intensity"], skeletons=skeletons)
                    for n, (_, crop) in enumerate(shown):
                        entry.crops.append(f"crops/{k:05d}-{image_id}-{n + 1}.jpg")
                        storage.write_bytes(storage.join(out_uri, entry.crops[-1]), _jpeg(crop, 90), fsync=False)
                else:
                    if isinstance(data, str):  # a TIFF given by its URI that is not huge: its bytes
                        data = storage.read_bytes(data)
                    picture = render(data, row["instances"] or [], label_of, label_names, long_side=long_side,
                                     score_thresh=score_thresh, decode_options=decode_options, skeletons=skeletons)
                entry.overlay, entry.thumb = f"overlays/{stem}", f"thumbs/{stem}"
                storage.write_bytes(storage.join(out_uri, entry.overlay), _jpeg(picture, 90), fsync=False)
                picture.thumbnail((THUMB_SIDE, THUMB_SIDE))
                entry.thumb_size = picture.size
                storage.write_bytes(storage.join(out_uri, entry.thumb), _jpeg(picture, 85), fsync=False)
            except Exception as exc:  # noqa: BLE001 - one bad image is a marked entry, not a failed page
                entry.note = f"could not draw: {error_text(exc)}"
        if entry.note:
            logger.warning("%s: %s", entry.file_name, entry.note)
        entries.append(entry)

    page = storage.join(out_uri, PAGE)
    storage.write_bytes(page, page_html(results_uri=results_uri, provenance=provenance, stats=stats,
                                        entries=entries, names=names).encode())
    return GallerySummary(page=page, shown=len(entries), images=stats.images, errors=stats.errors,
                          instances=stats.instances, missing=sum(1 for x in entries if x.overlay is None))
