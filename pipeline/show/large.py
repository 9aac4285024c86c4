"""Looking at huge images (``maskray show`` on scenes of hundreds of megapixels) in bounded memory.

- :func:`overview`: the whole image shrunk by an integer factor to at most ``long_side`` px,
  read block by block through :func:`pipeline.data.regions.open_regions` (a tiled TIFF never
  decoded whole, a PNG decoded once) and reduced with Pillow's box filter.
- :func:`overlay_window`: the instances drawn over a window of the image shown at some display
  size; each instance's mask is read only over its box within the window from its RLE
  (:func:`pipeline.data.decode.rle_window`), never as a full-size mask.
- :func:`render_large`: the overview with the best :data:`MAX_OVERVIEW_INSTANCES` instances, and
  full-resolution crops around the ``crops`` best detections (their box plus a margin, at least
  :data:`CROP_MIN_SIDE` px shown), each with every instance that reaches into it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

LARGE_PIXELS = 50_000_000  # images above this are shown as an overview + crops (the plain path's limit)
MAX_OVERVIEW_INSTANCES = 100  # best-scoring instances drawn on an overview (4 MB of masks each at 1280 px)
CROP_MIN_SIDE = 256  # px: a crop smaller than this is enlarged (nearest) to be readable
CROP_MAX_SIDE = 2048  # px: a crop window is at most this (larger objects are shown shrunk)
_BLOCK = 64  # overview pixels per block side read at a time


def overview(source: Any, long_side: int) -> tuple[np.ndarray, int]:
    """``(uint8 [h, w, 3], factor)``: ``source`` (a :class:`pipeline.data.regions.RegionSource`)
    reduced by the integer ``factor = ceil(max(W, H) / long_side)`` (box average; the last row and
    column of boxes may be partial), ``h = ceil(H / factor)``. Memory: the output and one block of
    ``64 * factor`` px square."""
    from PIL import Image

    width, height = source.width, source.height
    factor = max(1, math.ceil(max(width, height) / long_side))
    out_h, out_w = -(-height // factor), -(-width // factor)
    out = np.zeros((out_h, out_w, 3), dtype=np.uint8)
    step = _BLOCK * factor
    for y0 in range(0, height, step):
        for x0 in range(0, width, step):
            y1, x1 = min(height, y0 + step), min(width, x0 + step)
            block = Image.fromarray(source.read(x0, y0, x1, y1))
            small = np.asarray(block.reduce(factor) if factor > 1 else block)
            oy, ox = y0 // factor, x0 // factor
            out[oy:oy + small.shape[0], ox:ox + small.shape[1]] = small
    return out, factor


def _box(instance: dict) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in instance["bbox"])
    return x, y, x + w, y + h


def overlay_window(pixels: np.ndarray, window: tuple[int, int, int, int], frame: tuple[int, int],
                   instances: Sequence[dict], label_of: dict[int, int], label_names: Sequence[str], *,
                   score_thresh: float, skeletons: Sequence | None = None) -> Any:
    """A PIL overlay of ``pixels`` (uint8 ``[h, w, 3]``, the window ``(x0, y0, x1, y1)`` of a
    ``frame`` = ``(H, W)`` image shown at ``h x w``) with the ``instances`` (results-schema dicts in
    full-image pixels) scoring >= ``score_thresh`` that reach into the window. Display pixel
    ``(r, c)`` shows full-image pixel ``(y0 + (r + 0.5) * (y1 - y0) / h, x0 + ...)`` (floored)."""
    import torch
    from PIL import Image

    from pipeline.data.decode import rle_window
    from pipeline.instances import Instances
    from pipeline.show.draw import render_overlay

    x0, y0, x1, y1 = window
    h, w = pixels.shape[:2]
    sy, sx = h / (y1 - y0), w / (x1 - x0)
    rows = np.minimum(y0 + ((np.arange(h) + 0.5) / sy).astype(np.int64), y1 - 1)
    cols = np.minimum(x0 + ((np.arange(w) + 0.5) / sx).astype(np.int64), x1 - 1)
    kept = []
    for inst in instances:
        bx0, by0, bx1, by1 = _box(inst)
        if inst.get("score") is None or float(inst["score"]) < score_thresh:
            continue
        if bx0 < x1 and by0 < y1 and bx1 > x0 and by1 > y0:
            kept.append(inst)
    masks = np.zeros((len(kept), h, w), dtype=bool)
    for n, inst in enumerate(kept):
        seg = inst.get("segmentation")
        if not seg:
            continue
        bx0, by0, bx1, by1 = _box(inst)
        wx0, wy0 = max(x0, int(math.floor(bx0))), max(y0, int(math.floor(by0)))
        wx1, wy1 = min(x1, int(math.ceil(bx1)), frame[1]), min(y1, int(math.ceil(by1)), frame[0])
        rsel = np.flatnonzero((rows >= wy0) & (rows < wy1))
        csel = np.flatnonzero((cols >= wx0) & (cols < wx1))
        if wx1 <= wx0 or wy1 <= wy0 or not rsel.size or not csel.size:
            continue
        crop, _ = rle_window(bytes(seg["counts"]), frame[0], frame[1], (wx0, wy0, wx1, wy1))
        masks[n][np.ix_(rsel, csel)] = crop[np.ix_(rows[rsel] - wy0, cols[csel] - wx0)]
    boxes = torch.tensor([_box(i) for i in kept], dtype=torch.float32).reshape(-1, 4)
    boxes = (boxes - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)) * torch.tensor([sx, sy, sx, sy])
    keypoints = None
    if any(i.get("keypoints") for i in kept):
        from pipeline.show.gallery import _keypoints_at

        keypoints = _keypoints_at(kept, (sx, sy))
        keypoints[..., 0] -= x0 * sx
        keypoints[..., 1] -= y0 * sy
    found = Instances((h, w), boxes, torch.tensor([float(i["score"]) for i in kept], dtype=torch.float32),
                      torch.tensor([label_of[int(i["category_id"])] for i in kept], dtype=torch.int64),
                      torch.from_numpy(masks), keypoints)
    canvas = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    drawn = render_overlay(canvas, found, label_names, score_thresh=score_thresh, long_side=max(h, w),
                           skeletons=skeletons)
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())


def crop_window(instance: dict, frame: tuple[int, int]) -> tuple[int, int, int, int]:
    """The full-resolution window shown around a detection: its box grown by half its longer side
    (at least 32 px) each way, clipped to the image and to :data:`CROP_MAX_SIDE` around its centre."""
    bx0, by0, bx1, by1 = _box(instance)
    margin = max(32.0, 0.5 * max(bx1 - bx0, by1 - by0))
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
    half_w = min((bx1 - bx0) / 2 + margin, CROP_MAX_SIDE / 2)
    half_h = min((by1 - by0) / 2 + margin, CROP_MAX_SIDE / 2)
    x0, x1 = max(0, int(cx - half_w)), min(frame[1], int(math.ceil(cx + half_w)))
    y0, y1 = max(0, int(cy - half_h)), min(frame[0], int(math.ceil(cy + half_h)))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def render_large(data: bytes | str, instances: Sequence[dict], label_of: dict[int, int], label_names: Sequence[str], *,
                 long_side: int, score_thresh: float, crops: int, intensity: str | None = None,
                 skeletons: Sequence | None = None) -> tuple[Any, list[tuple[dict, Any]]]:
    """``(overview picture, [(instance, crop picture), ...])`` of a huge image (encoded bytes, or a
    URI: a TIFF there is read with ranged reads; see the module doc):
    the overview at most ``long_side`` px with the best :data:`MAX_OVERVIEW_INSTANCES` instances
    scoring >= ``score_thresh``; a full-resolution crop around each of the ``crops`` best."""
    from PIL import Image

    from pipeline.data.decode import DEFAULT_INTENSITY
    from pipeline.data.regions import DEFAULT_MAX_WHOLE_PIXELS, open_regions

    ranked = sorted((i for i in instances if i.get("score") is not None and float(i["score"]) >= score_thresh),
                    key=lambda i: -float(i["score"]))
    with open_regions(data, max_region_pixels=None, max_whole_pixels=DEFAULT_MAX_WHOLE_PIXELS,
                      intensity=intensity or DEFAULT_INTENSITY) as source:
        frame = (source.height, source.width)
        small, _ = overview(source, long_side)
        windows = [crop_window(inst, frame) for inst in ranked[:crops]]
        pixels = [source.read(*window) for window in windows]
    # the image is released before drawing (a PNG's decoded pixels are the largest thing here)
    picture = overlay_window(small, (0, 0, frame[1], frame[0]), frame, ranked[:MAX_OVERVIEW_INSTANCES],
                             label_of, label_names, score_thresh=score_thresh, skeletons=skeletons)
    del small
    shown = []
    for inst, window, crop in zip(ranked, windows, pixels):
        side = max(crop.shape[:2])
        if side < CROP_MIN_SIDE:  # enlarge small crops, nearest: the pixels stay visible as pixels
            k = math.ceil(CROP_MIN_SIDE / side)
            crop = np.asarray(Image.fromarray(crop).resize((crop.shape[1] * k, crop.shape[0] * k),
                                                           Image.Resampling.NEAREST))
        shown.append((inst, overlay_window(crop, window, frame, ranked, label_of, label_names,
                                           score_thresh=score_thresh, skeletons=skeletons)))
    return picture, shown


def _tiff_size(handle: Any) -> tuple[int, int] | None:
    import tifffile

    try:
        with tifffile.TiffFile(handle) as tif:
            page = tif.pages[0]
            return int(page.imagewidth), int(page.imagelength)
    except Exception:  # noqa: BLE001 - unreadable: the plain path reports it
        return None


def is_large(data: bytes | str, threshold: int = LARGE_PIXELS) -> bool:
    """Whether an image (encoded bytes, or a TIFF's URI) holds more than ``threshold`` pixels,
    from its header only (a TIFF Pillow cannot parse, e.g. BigTIFF, is asked of tifffile)."""
    from pipeline.data.decode import ImageDecodeError, image_size

    if isinstance(data, str):
        from pipeline import storage

        fs, path = storage.resolve(data)
        with fs.open_input_file(path) as handle:
            size = _tiff_size(handle)
        return size is not None and size[0] * size[1] > threshold
    try:
        width, height = image_size(data, max_pixels=1 << 62)  # header only; Pillow's bomb check off
    except ImageDecodeError:
        import io

        size = _tiff_size(io.BytesIO(data)) if bytes(data[:4]) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+") \
            else None
        if size is None:
            return False
        width, height = size
    return width * height > threshold
