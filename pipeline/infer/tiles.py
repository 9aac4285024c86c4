"""Tiled inference of large images: the tile grid, a tile's instances in full-image coordinates,
the seam merge, and the part files that make tiles units of work (``maskray infer --tile``).

Grid (:func:`plan_tiles`)
    An image wider or taller than ``tile`` px is cut into ``tile`` x ``tile`` boxes (a side of
    the image shorter than ``tile`` gives tiles that short) whose starts step by ``stride =
    tile - round(tile * overlap)``; the last tile of a row or column is flush with the image's
    border (so it may overlap its neighbour by more). A tile is run at native resolution: the
    model's own min/max size rule still applies to it, as to any image. An image no larger than
    ``tile`` is one tile: the plain path.

Translation (:func:`tile_instances`)
    A tile's detections are pasted one instance at a time within their box, in the tile's frame
    (:func:`pipeline.infer.paste.paste_regions`), and that crop becomes an RLE in the FULL
    image's frame at the tile's offset (:func:`pipeline.infer.paste.crop_rle_counts`): memory is
    one box, never a full-size array. Boxes and keypoints are offset the same way. A region
    whose pixels were shrunk before the model (the whole-image pass, ``--tile-full-pass``) scales
    boxes back first, then pastes at full resolution.

Seam merge (:func:`merge_instances`), greedy in score order like SAHI's GREEDYNMM, with its
match measure restricted to the pixels both sides saw:
    * Every instance carries the region (tile box) it was predicted in. Two candidates can only
      match when they have the same category, their boxes intersect (a cheap pre-filter), and
      their regions intersect: R = region(a) ∩ region(b), the band both tiles saw.
    * Match measure: intersection over the smaller area *within R*,
      ``IoS_R = |a ∩ b ∩ R| / min(|a ∩ R|, |b ∩ R|)`` (0 when either has no pixel in R), on
      RLEs with pycocotools ``merge(intersect=True)`` / ``area``. SAHI's IoS on whole masks
      fails for a big object cut by a seam: each fragment extends far beyond the overlap band,
      so their intersection (the band) is small next to either fragment; within R both tiles
      see the same part of the object, so a cut object's fragments score ~1, and a duplicate
      (an object seen whole by two tiles, i.e. inside the band) scores ~1 as on whole masks.
    * Greedy: the highest-scoring instance left leads a group; every other instance matching the
      group (its union mask, within R = its region ∩ the union of the group's regions) joins,
      repeated until no more join, so an object cut by two seams (fragments in tiles 1 and 3
      that do not touch) is joined through tile 2's fragment. An instance never joins a group
      that already holds one from its own tile: the model's own NMS kept two detections of one
      tile apart, and so does the merge.
    * A group becomes one instance: mask = RLE union of the members (pycocotools ``merge``),
      box = the merged mask's box (``toBbox``), score = the members' maximum (the leader's),
      category = the leader's, keypoints = the leader's. A lone instance is kept as it was.
    * Matching needs ``overlap > 0``: with no overlap, tiles share no pixels, R is empty, and an
      object cut by a seam stays two instances. Fragments join only through the band, so an
      object should be narrower than ~one tile minus the band to be seen whole by some tile;
      larger objects are what ``--tile-full-pass`` is for (the whole image at model size, its
      region the whole image, merged by the same rule).
    * Like any IoS rule, a small object inside a larger one of the same category seen by another
      tile may merge into it (SAHI's known behaviour; the threshold is :data:`MATCH_THRESHOLD`).

In one process (:func:`segment_tiled`: ``maskray eval --tile``, the train config's ``eval.tile``)
images held in memory go through the same grid, the same pixels (:func:`pipeline.infer.stages.tile_chw`),
the same translation and the same merge (:func:`merge_tiles`), so what is scored is what
``maskray infer --tile`` writes.

Part files (tiles as units of work; :mod:`pipeline.infer.stages` makes them, the driver plans
units as before). A unit with at least one tiled image is committed in two steps:
``<output>/_tiles/<unit>/`` first receives

    base.tiles-NNNNNNN.parquet       the unit's untiled images (RESULT_SCHEMA rows), NNNNNNN = the
                                     number of tiles of its tiled images (metadata: positions,
                                     the tiled positions and their tile counts, the --retry-errors merge flag)
    pPPPPPP.tAAAAA-BBBBB-of-NNNNN.parquet
                                     tiles A..B-1 of the image at position P (one row per tile,
                                     instances already in full-image coordinates; metadata: the
                                     tile regions), written by whichever model actor ran them

and the model actor that writes the last missing part (:func:`try_merge`: it lists the folder)
merges every tiled image into one row and writes ``<output>/<unit>`` whole and atomically, then
deletes the parts. ``<output>/<unit>`` exists <=> it is complete (the invariant of
:mod:`pipeline.infer.driver`). A rerun's read task lists the folder and skips the parts already
there (resume mid-image). Two actors that finish the last two parts at once may both merge: they
write the same file, and the driver counts the unit once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from model.errors import MaskrayError
from pipeline.data.decode import DEFAULT_MAX_PIXELS

MATCH_THRESHOLD = 0.5  # IoS_R at or above which two instances are one object (SAHI's default)
TILES_DIR = "_tiles"  # <output>/_tiles/<unit>/<part>: parts of units not yet merged
PART_KEY = b"maskray.part"  # Parquet schema metadata of a part file (JSON)
# Tiles per part (a unit of work, one Ray Data block, one model-stage task, one part file):
# enough parts per image to spread it over MIN_PARTS_PER_IMAGE actors, and parts as large as that
# allows, because each part costs about 50 ms of its own on 2 cores (a task, a part file written
# and fsynced, a merge check): a 4096^2 mosaic at 128-px tiles took 86 s in 8-tile parts and 66 s
# in 64-tile ones (with the grid merge below; benchmarks/tiled.py)
MIN_PARTS_PER_IMAGE = 16
MAX_TILES_PER_PART = 64
# uint8 pixels per part at most (above one tile): 64 tiles of 128 px, 5 of 512, 1 of 1024. Larger
# parts (16 MB: 5 tiles of 1024 px) halved a 40k^2 TIFF's run with a no-op model but raised the peak
# RSS of the read task and the model actor by ~750 MB each (1.1 -> 1.9 GB: more of Ray's shared
# object store mapped in each, tests/integration/test_infer_tiled_memory.py): over its 1.5 GB bound
PART_BYTES = 4 * 2**20

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 pixels, x1/y1 exclusive

_BASE = re.compile(r"^base\.tiles-(\d+)\.parquet$")
_PART = re.compile(r"^p(\d+)\.t(\d+)-(\d+)-of-(\d+)\.parquet$")


# --------------------------------------------------------------------------- grid


def tile_stride(tile: int, overlap: float) -> int:
    """Pixels between the starts of neighbouring tiles: ``tile - round(tile * overlap)``, >= 1."""
    return max(1, tile - int(round(tile * overlap)))


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Starts of tiles along one side of ``length`` px: 0, stride, ... and a last one flush with the
    border (``length - tile``); ``[0]`` when the side fits one tile."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def needs_tiles(width: int, height: int, tile: int) -> bool:
    """Whether an image is cut into tiles (``tile`` > 0 and a side longer than it)."""
    return tile > 0 and (width > tile or height > tile)


def plan_tiles(width: int, height: int, tile: int, overlap: float) -> list[Box]:
    """Tile boxes ``(x0, y0, x1, y1)`` covering a ``width`` x ``height`` image, row by row (see the
    module docstring); one box, the whole image, when it fits one tile."""
    if width < 1 or height < 1:
        raise MaskrayError(f"a {width}x{height} image has no pixels to tile")
    if tile < 1:
        raise MaskrayError(f"tile {tile} must be >= 1")
    stride = tile_stride(tile, overlap)
    xs, ys = tile_starts(width, tile, stride), tile_starts(height, tile, stride)
    return [(x, y, min(x + tile, width), min(y + tile, height)) for y in ys for x in xs]


def tiles_per_part(tile: int, tiles: int) -> int:
    """Tiles in one part file (one unit of work) of an image cut into ``tiles`` tiles of ``tile``
    px: at most ``tiles // MIN_PARTS_PER_IMAGE`` (so an image of that many tiles or more makes at
    least that many parts: it spreads over as many actors), at most :data:`PART_BYTES` of uint8
    RGB and :data:`MAX_TILES_PER_PART`; one tile at least."""
    spread = tiles // MIN_PARTS_PER_IMAGE
    return max(1, min(MAX_TILES_PER_PART, PART_BYTES // (3 * tile * tile), spread))


def full_pass_size(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """``(width, height)`` of the whole-image pass: the image shrunk by the model's own size rule
    (shorter side to ``min_size``, longer at most ``max_size``), never enlarged."""
    scale = min(1.0, min_size / min(width, height), max_size / max(width, height))
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def tile_region(boxes: Sequence[Box], k: int, width: int, height: int) -> Box:
    """Where the ``k``-th model input of a tiled ``width`` x ``height`` image comes from:
    ``boxes[k]`` (:func:`plan_tiles`), or the whole image for ``k == len(boxes)`` (the
    whole-image pass, ``--tile-full-pass``)."""
    return tuple(int(v) for v in boxes[k]) if k < len(boxes) else (0, 0, int(width), int(height))


def part_chunks(tiles: int, tile: int, full_pass: bool) -> list[tuple[int, int]]:
    """``(start, stop)`` model inputs of each part of an image cut into ``tiles`` tiles of
    ``tile`` px: :func:`tiles_per_part` consecutive tiles, then with ``full_pass`` the
    whole-image pass alone (it is another size)."""
    per_part = tiles_per_part(tile, tiles)
    chunks = [(a, min(a + per_part, tiles)) for a in range(0, tiles, per_part)]
    if full_pass:
        chunks.append((tiles, tiles + 1))
    return chunks


# --------------------------------------------------------------------------- RLE helpers


def rect_rle(box: Box, size: tuple[int, int]) -> dict:
    """Compressed COCO RLE of the rectangle ``box`` (x0, y0, x1, y1) in an image of ``size``
    (H, W), built from its runs (O(width), whatever the area)."""
    from pycocotools import mask as mask_utils

    im_h, im_w = int(size[0]), int(size[1])
    x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
    x1, y1 = min(im_w, int(box[2])), min(im_h, int(box[3]))
    total = im_h * im_w
    if x1 <= x0 or y1 <= y0:
        counts = [total]
    elif y1 - y0 == im_h:  # whole columns: one run
        counts = [x0 * im_h, (x1 - x0) * im_h, total - x1 * im_h]
    else:
        h = y1 - y0
        counts = [x0 * im_h + y0] + [h, im_h - h] * (x1 - x0 - 1) + [h, total - (x1 - 1) * im_h - y1]
    return mask_utils.frPyObjects({"size": [im_h, im_w], "counts": counts}, im_h, im_w)


def _rle(instance: dict, size: tuple[int, int]) -> dict:
    """An instance's mask as a pycocotools RLE (its box when it has no mask: a box-only model)."""
    seg = instance.get("segmentation")
    if seg is None:
        x, y, w, h = instance["bbox"]
        return rect_rle((int(np.floor(x)), int(np.floor(y)), int(np.ceil(x + w)), int(np.ceil(y + h))), size)
    counts = seg["counts"]
    return {"size": [int(v) for v in seg["size"]], "counts": counts if isinstance(counts, bytes) else bytes(counts)}


def _area(rle: dict) -> int:
    from pycocotools import mask as mask_utils

    return int(mask_utils.area(rle))


def _intersect(rles: list[dict]) -> dict:
    from pycocotools import mask as mask_utils

    return mask_utils.merge(rles, intersect=True)


def _union(rles: list[dict]) -> dict:
    from pycocotools import mask as mask_utils

    return mask_utils.merge(rles, intersect=False)


# --------------------------------------------------------------------------- translation


def tile_instances(pred: dict[str, Any], region: Box, pixel_size: tuple[int, int], full_size: tuple[int, int],
                   category_ids: Sequence[int]) -> list[dict]:
    """One tile's predictions -> result instances (RESULT_SCHEMA ``instances`` dicts) in the full
    image's frame.

    ``pred``: numpy ``boxes`` float ``[N, 4]`` xyxy in the tile's pixel frame, ``labels`` ``[N]``
    (1..K), ``scores`` ``[N]``, optional ``masks`` ``[N, 1, M, M]`` probabilities and
    ``keypoints`` ``[N, K, 3]`` (x, y, score). ``region`` (x0, y0, x1, y1): where the tile's
    pixels came from in the full image; ``pixel_size`` (h, w): the tile's pixels as the model
    got them (the region's size, or smaller for the whole-image pass: boxes are scaled back);
    ``full_size`` (H, W). Each mask is pasted within its box in the region's frame and its RLE
    placed at the region's offset (:func:`pipeline.infer.paste.crop_rle_counts`): memory is one
    box at a time."""
    import torch
    from pycocotools import mask as mask_utils

    from pipeline.infer.paste import MASK_THRESHOLD, crop_rle_counts, paste_regions
    from pipeline.results import ResultsError

    x0, y0, x1, y1 = (int(v) for v in region)
    rh, rw = y1 - y0, x1 - x0
    im_h, im_w = int(full_size[0]), int(full_size[1])
    boxes = np.asarray(pred["boxes"], dtype=np.float32).reshape(-1, 4).copy()
    n = boxes.shape[0]
    if n == 0:
        return []
    sy, sx = rh / float(pixel_size[0]), rw / float(pixel_size[1])
    if sx != 1.0 or sy != 1.0:
        boxes *= np.array([sx, sy, sx, sy], dtype=np.float32)
    counts: list[bytes | None] = [None] * n
    if pred.get("masks") is not None:
        masks = torch.as_tensor(np.asarray(pred["masks"], dtype=np.float32))
        for i, (cy, cx, crop) in enumerate(paste_regions(masks, torch.as_tensor(boxes), (rh, rw))):
            runs = crop_rle_counts((crop > MASK_THRESHOLD).numpy(), y0 + cy, x0 + cx, (im_h, im_w))
            counts[i] = bytes(mask_utils.frPyObjects({"size": [im_h, im_w], "counts": runs}, im_h, im_w)["counts"])
    points: list[list[float] | None] = [None] * n
    if pred.get("keypoints") is not None:
        kp = np.asarray(pred["keypoints"], dtype=np.float32).reshape(n, -1, 3).copy()
        kp[..., 0] = kp[..., 0] * sx + x0
        kp[..., 1] = kp[..., 1] * sy + y0
        points = [None if np.isnan(row).all() else row.reshape(-1).tolist() for row in kp]
    boxes += np.array([x0, y0, x0, y0], dtype=np.float32)
    out = []
    for box, label, score, c, p in zip(boxes.tolist(), np.asarray(pred["labels"]).tolist(),
                                       np.asarray(pred["scores"]).tolist(), counts, points):
        if not 1 <= int(label) <= len(category_ids):
            raise ResultsError(f"label {label} has no category (model labels are 1..{len(category_ids)})")
        out.append({"category_id": int(category_ids[int(label) - 1]), "score": float(score),
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "segmentation": None if c is None else {"size": [im_h, im_w], "counts": c},
                    "keypoints": p})
    return out


# --------------------------------------------------------------------------- seam merge


def _xyxy(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in bbox)
    return x, y, x + w, y + h


def ios_within(a: dict, a_region: dict, b: dict, b_region: dict) -> float:
    """``|a ∩ b ∩ R| / min(|a ∩ R|, |b ∩ R|)`` with ``R = a_region ∩ b_region`` (all RLEs of
    one size); 0 when R is empty or either mask has no pixel in R."""
    band = _intersect([a_region, b_region])
    if _area(band) == 0:
        return 0.0
    smaller = min(_area(_intersect([a, band])), _area(_intersect([b, band])))
    if smaller == 0:
        return 0.0
    return _area(_intersect([a, b, band])) / smaller


class BoxGrid:
    """Which boxes may meet a query box: xyxy ``boxes`` ``[N, 4]`` (pixels) bucketed by the
    ``cell`` x ``cell`` px squares they touch, so a query looks at the boxes of the cells it
    touches, not at all N (the seam merge of a 16k^2 image has ~150,000 instances: comparing each
    group with every instance was quadratic). Invariant: :meth:`candidates` is a superset of the
    boxes meeting the query (edges touching count), in index order."""

    def __init__(self, boxes: np.ndarray, cell: float) -> None:
        self.cell = float(max(cell, 1.0))
        self.cells: dict[tuple[int, int], list[int]] = {}
        for i, (x0, y0, x1, y1) in enumerate(self._span(boxes)):
            for gx in range(x0, x1 + 1):
                for gy in range(y0, y1 + 1):
                    self.cells.setdefault((gx, gy), []).append(i)

    def _span(self, boxes: np.ndarray) -> np.ndarray:
        """Per box, the first and last cell column and row it touches: ``[N, 4]`` int."""
        return np.floor(np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / self.cell).astype(np.int64)

    def candidates(self, box: np.ndarray) -> np.ndarray:
        """Indices (int64, sorted, unique) of the boxes in the cells ``box`` (xyxy) touches."""
        x0, y0, x1, y1 = self._span(box)[0]
        found = [self.cells.get((gx, gy), ()) for gx in range(x0, x1 + 1) for gy in range(y0, y1 + 1)]
        flat = [i for cell in found for i in cell]
        return np.unique(np.asarray(flat, dtype=np.int64))


def merge_instances(instances: Sequence[dict], regions: Sequence[Box], size: tuple[int, int], *,
                    threshold: float = MATCH_THRESHOLD) -> list[dict]:
    """One image's instances from all its tiles (full-image coordinates; ``regions[i]`` the tile
    box instance ``i`` was predicted in; ``size`` (H, W)) -> the merged instances, by score
    (the rule in the module docstring)."""
    from pycocotools import mask as mask_utils

    n = len(instances)
    if len(regions) != n:
        raise MaskrayError(f"{n} instances but {len(regions)} regions")
    if n == 0:
        return []
    size = (int(size[0]), int(size[1]))
    order = sorted(range(n), key=lambda i: -float(instances[i]["score"]))
    tiles = [tuple(int(v) for v in r) for r in regions]
    region_rles: dict[Box, dict] = {t: rect_rle(t, size) for t in set(tiles)}
    masks: dict[int, dict] = {}

    def mask(i: int) -> dict:
        if i not in masks:
            masks[i] = _rle(instances[i], size)
        return masks[i]

    boxes = np.array([_xyxy(inst["bbox"]) for inst in instances], dtype=np.float64).reshape(n, 4)
    categories = np.array([int(inst["category_id"]) for inst in instances])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    taken = np.zeros(n, dtype=bool)
    grid = BoxGrid(boxes, min(max(t[2] - t[0], t[3] - t[1]) for t in region_rles))
    out = []
    for lead in order:
        if taken[lead]:
            continue
        taken[lead] = True
        members, union, band = [lead], None, region_rles[tiles[lead]]
        group_box, group_tiles, category = boxes[lead].copy(), {tiles[lead]}, categories[lead]
        grown = True
        while grown:
            grown = False
            # the cheap pre-filter, vectorised over the grid's candidates: same category, not
            # taken, boxes meeting the group's
            near = grid.candidates(group_box)
            b = boxes[near]
            near = near[~taken[near] & (categories[near] == category)
                        & (b[:, 0] <= group_box[2]) & (group_box[0] <= b[:, 2])
                        & (b[:, 1] <= group_box[3]) & (group_box[1] <= b[:, 3])]
            for j in near[np.argsort(rank[near])]:
                if tiles[j] in group_tiles:
                    continue
                group_mask = union if union is not None else mask(lead)
                if ios_within(group_mask, band, mask(j), region_rles[tiles[j]]) < threshold:
                    continue
                taken[j] = True
                members.append(int(j))
                union = _union([group_mask, mask(j)])
                band = _union([band, region_rles[tiles[j]]])
                group_tiles.add(tiles[j])
                group_box = np.concatenate([np.minimum(group_box[:2], boxes[j, :2]),
                                            np.maximum(group_box[2:], boxes[j, 2:])])
                grown = True
        if len(members) == 1:
            out.append(dict(instances[lead]))
            continue
        merged = dict(instances[lead])  # category, score (the maximum: the leader's), keypoints
        if instances[lead].get("segmentation") is not None:
            merged["segmentation"] = {"size": list(size), "counts": bytes(union["counts"])}
            merged["bbox"] = [float(v) for v in mask_utils.toBbox(union)]
        else:  # a box-only model: the union of the boxes
            x0, y0, x1, y1 = (float(v) for v in group_box)
            merged["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        out.append(merged)
    return out


def merge_tiles(per_tile: Sequence[Sequence[dict] | None], regions: Sequence[Box],
                size: tuple[int, int]) -> list[dict]:
    """One tiled image's instances from its model inputs' instances (``per_tile[k]``, full-image
    coordinates, predicted in ``regions[k]``; None = none) -> :func:`merge_instances`, each
    instance owned by its input's region. ``size`` (H, W)."""
    instances, owners = [], []
    for found, region in zip(per_tile, regions):
        instances.extend(found or [])
        owners.extend([tuple(region)] * len(found or []))
    return merge_instances(instances, owners, size)


# --------------------------------------------------------------------------- one process


def segment_tiled(forward: Callable[[list[Any]], Sequence[dict[str, Any]]], images: Sequence[Any], *, tile: int,
                  overlap: float, full_pass: bool = False, model_size: Sequence[int] | None = None,
                  category_ids: Sequence[int], batch_size: int = 4,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[list[dict]]:
    """Per image, its result instances (RESULT_SCHEMA ``instances`` dicts: ``category_id``,
    ``score``, xywh ``bbox``, RLE ``segmentation`` in full-image coordinates, ``keypoints``) as
    ``maskray infer --tile`` makes them, in this process: the rules of the Ray path, shared.

    ``forward``: a list of uint8 ``[3,h,w]`` CPU tensors at their original size -> per image
    :meth:`pipeline.infer.predictor.Predictor.forward_uint8`'s output (numpy arrays or tensors:
    ``boxes`` xyxy in that input's frame, ``labels`` 1..K, ``scores``, optional ``masks``
    ``[N,1,M,M]`` probabilities and ``keypoints`` ``[N,K,3]``). ``images``: uint8 ``[3,H,W]``
    (numpy arrays or tensors). ``category_ids[label - 1]`` is a label's category.

    * Images no larger than ``tile`` (:func:`needs_tiles`) run together, ``batch_size`` per
      call, as the plain path does (:func:`pipeline.results.to_result_instances`, as
      :func:`pipeline.infer.stages.unit_table`).
    * A larger image is cut by :func:`plan_tiles` (``tile``, ``overlap``), and with
      ``full_pass`` run once more whole, shrunk to ``model_size`` (min, max) by
      :func:`full_pass_size` (pixels: :func:`pipeline.infer.stages.tile_chw`, strips of at
      most ``max_pixels`` as the read stage's ``--max-pixels``). Its inputs run in the read
      stage's parts (:func:`part_chunks`), ``batch_size`` per call; each input's instances
      are pasted in full-image coordinates (:func:`tile_instances`) and merged across seams
      (:func:`merge_tiles`).
    """
    import torch

    from pipeline.infer.stages import ArrayRegions, tile_chw
    from pipeline.results import to_result_instances

    if tile < 1:
        raise MaskrayError(f"tile {tile} must be >= 1")
    if full_pass and model_size is None:
        raise MaskrayError("the whole-image pass (full_pass) needs the model's (min_size, max_size)")
    if batch_size < 1:
        raise MaskrayError(f"batch size {batch_size} must be >= 1")

    def run(chws: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """``forward`` over ``chws``, ``batch_size`` per call; outputs as numpy arrays."""
        outs = []
        for a in range(0, len(chws), batch_size):
            for out in forward([torch.from_numpy(c) for c in chws[a:a + batch_size]]):
                outs.append({k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                             for k, v in out.items()})
        return outs

    arrays = [np.ascontiguousarray(im.numpy() if isinstance(im, torch.Tensor) else im) for im in images]
    for chw in arrays:
        if chw.dtype != np.uint8 or chw.ndim != 3 or chw.shape[0] != 3:
            raise MaskrayError(f"segment_tiled takes uint8 [3,H,W] images, got {chw.dtype} {list(chw.shape)}")
    out: list[list[dict]] = [[] for _ in arrays]
    plain = [i for i, chw in enumerate(arrays) if not needs_tiles(chw.shape[2], chw.shape[1], tile)]
    for i, pred in zip(plain, run([arrays[i] for i in plain])):
        h, w = arrays[i].shape[1:]
        out[i] = to_result_instances(pred["boxes"], pred["labels"], pred["scores"], pred.get("masks"), h, w,
                                     category_ids, keypoints=pred.get("keypoints"))
    for i, chw in enumerate(arrays):
        height, width = int(chw.shape[1]), int(chw.shape[2])
        if not needs_tiles(width, height, tile):
            continue
        source, boxes = ArrayRegions(chw), plan_tiles(width, height, tile, overlap)
        sizes = tuple(model_size) if full_pass else ()  # read only by the whole-image pass
        per_tile, regions = [], []
        for a, b in part_chunks(len(boxes), tile, full_pass):
            inputs = [tile_chw(source, boxes, k, model_size=sizes, max_pixels=max_pixels) for k in range(a, b)]
            for k, pixels, pred in zip(range(a, b), inputs, run(inputs)):
                region = tile_region(boxes, k, width, height)
                per_tile.append(tile_instances(pred, region, pixels.shape[1:], (height, width), category_ids))
                regions.append(region)
        out[i] = merge_tiles(per_tile, regions, (height, width))
    return out


# --------------------------------------------------------------------------- part files


def parts_uri(output_uri: str, unit: str) -> str:
    """``<output>/_tiles/<unit>``: the folder of a unit's parts."""
    from pipeline import storage

    return storage.join(output_uri, TILES_DIR, unit)


def base_name(tiles: int) -> str:
    return f"base.tiles-{tiles:07d}.parquet"


def part_name(position: int, start: int, stop: int, count: int) -> str:
    return f"p{position:06d}.t{start:05d}-{stop:05d}-of-{count:05d}.parquet"


def image_part_names(position: int, tiles: int, tile: int, full_pass: bool) -> set[str]:
    """The part file names of the image at ``position`` cut into ``tiles`` tiles of ``tile`` px
    (and the whole-image pass with ``full_pass``)."""
    count = tiles + (1 if full_pass else 0)
    return {part_name(position, a, b, count) for a, b in part_chunks(tiles, tile, full_pass)}


def stale_parts(names: Iterable[str], tile: int, full_pass: bool) -> list[str]:
    """The part files among ``names`` of images cut into other parts than :func:`image_part_names`
    cuts them now (written by another maskray version): every part of such an image, so that it is
    recomputed whole rather than merged from overlapping parts, which would count tiles twice."""
    by_position: dict[int, list[tuple[str, int]]] = {}
    for name in names:
        part = _PART.match(name)
        if part:
            by_position.setdefault(int(part.group(1)), []).append((name, int(part.group(4))))
    stale = []
    for position, parts in by_position.items():
        counts = {count for _, count in parts}
        tiles = next(iter(counts)) - (1 if full_pass else 0)
        if len(counts) == 1 and tiles >= 1 and {n for n, _ in parts} <= image_part_names(position, tiles, tile,
                                                                                            full_pass):
            continue
        stale.extend(n for n, _ in parts)
    return stale


def list_parts(output_uri: str, unit: str) -> list[str]:
    """Names of the part files of ``unit`` written so far (sorted)."""
    from pipeline import storage

    folder = parts_uri(output_uri, unit)
    return sorted(storage.relative(u, folder) for u in storage.list_files(folder, suffixes=(".parquet",)))


def parse_parts(names: Iterable[str]) -> tuple[int | None, dict[int, tuple[int, int]]]:
    """``(tiles the base names, or None without a base; {position: (tiles present, tiles of the
    image)}``) from a unit's part names."""
    expected, done = None, {}
    for name in names:
        base = _BASE.match(name)
        if base:
            expected = int(base.group(1))
            continue
        part = _PART.match(name)
        if part:
            p, a, b, n = (int(v) for v in part.groups())
            have, _ = done.get(p, (0, n))
            done[p] = (have + b - a, n)
    return expected, done


def complete_positions(names: Iterable[str]) -> set[int]:
    """Positions whose every tile has a part file."""
    return {p for p, (have, n) in parse_parts(names)[1].items() if have >= n}


def write_part(output_uri: str, unit: str, name: str, table: Any, meta: dict, attempt: Any) -> None:
    """One part file (a RESULT_SCHEMA table, ``meta`` JSON in its schema metadata), atomically."""
    from pipeline.results import write_unit

    metadata = dict(table.schema.metadata or {})
    metadata[PART_KEY] = json.dumps(meta).encode()
    write_unit(parts_uri(output_uri, unit), name, table.replace_schema_metadata(metadata), attempt=attempt)


def read_part(output_uri: str, unit: str, name: str) -> tuple[Any, dict]:
    """A part file's table and its metadata JSON."""
    from pipeline import storage
    from pipeline.results import read_table

    uri = storage.join(parts_uri(output_uri, unit), name)
    table = read_table(uri)
    raw = (table.schema.metadata or {}).get(PART_KEY)
    if raw is None:
        raise MaskrayError(f"{uri}: a tile part without its {PART_KEY.decode()} metadata")
    return table, json.loads(raw)


def read_base_meta(output_uri: str, unit: str, name: str) -> dict:
    """The metadata of a unit's base part (footer only)."""
    import pyarrow.parquet as pq

    from pipeline import storage

    fs, path = storage.resolve(storage.join(parts_uri(output_uri, unit), name))
    with fs.open_input_file(path) as f:
        return json.loads(pq.read_schema(f).metadata[PART_KEY])


def merge_image(rows: Sequence[dict], regions: Sequence[Box], size: tuple[int, int]) -> dict:
    """The results row of one tiled image from its tiles' rows (``rows[k]`` predicted in
    ``regions[k]``): an error row (no instances) naming the first failed tile, or the merged
    instances (:func:`merge_instances`)."""
    first = rows[0]
    for row, region in zip(rows, regions):
        if row["error"] is not None:
            x0, y0 = region[0], region[1]
            return {**first, "instances": [], "error": f"{row['error']} (tile at x={x0}, y={y0})"}
    return {**first, "instances": merge_tiles([row["instances"] for row in rows], regions, size), "error": None}


def try_merge(output_uri: str, unit: str, *, attempt: Any) -> tuple[Any, int]:
    """Write ``<output>/<unit>`` from its parts when every part is there (then delete them);
    returns ``(its RESULT_SCHEMA table, the images written)``, or ``(None, 0)`` while parts are
    missing (or when another actor's merge already removed them: the unit file then exists)."""
    import pyarrow as pa

    from pipeline import storage
    from pipeline.results import RESULT_SCHEMA, write_unit

    names = list_parts(output_uri, unit)
    expected, done = parse_parts(names)
    if expected is None or sum(min(have, n) for have, n in done.values()) < expected:
        return None, 0
    base = next(n for n in names if _BASE.match(n))
    try:
        base_table, meta = read_part(output_uri, unit, base)
        rows = dict(zip(meta["positions"], base_table.to_pylist()))
        by_position: dict[int, list[str]] = {}
        for name in names:
            part = _PART.match(name)
            if part:
                by_position.setdefault(int(part.group(1)), []).append(name)
        for position_text in meta["tiled"]:
            position = int(position_text)
            tile_rows, regions = [], []
            for name in sorted(by_position.get(position, [])):
                table, part_meta = read_part(output_uri, unit, name)
                tile_rows.extend(table.to_pylist())
                regions.extend(tuple(r) for r in part_meta["regions"])
            rows[position] = merge_image(tile_rows, regions, tuple(part_meta["full_size"]))
    except (FileNotFoundError, storage.StorageError):
        if storage.exists(storage.join(output_uri, unit)):
            return None, 0  # another actor merged it and removed the parts
        raise
    order = list(meta["unit_positions"])
    table = pa.Table.from_pylist([rows[p] for p in order], schema=RESULT_SCHEMA)
    written = write_unit(output_uri, unit, table, positions=order if meta["merge"] else None, attempt=attempt)
    for name in names:
        storage.delete(storage.join(parts_uri(output_uri, unit), name))
    return written, len(order)


def delete_stale_parts(output_uri: str, committed: set[str] | None) -> int:
    """Delete the part files under ``<output>/_tiles/`` of the units in ``committed`` (left when a
    run stopped between a unit's merge and the removal of its parts), or every part file with
    None (``--overwrite``). Parts of uncommitted units stay: a rerun resumes from them. Returns
    the count deleted."""
    from pipeline import storage

    folder = storage.join(output_uri, TILES_DIR)
    deleted = 0
    for uri in storage.list_files(folder):
        unit = storage.relative(uri, folder).split("/", 1)[0]
        if committed is None or unit in committed:
            storage.delete(uri)
            deleted += 1
    return deleted
