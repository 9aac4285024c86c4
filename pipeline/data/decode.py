"""Reading maskray shards with Ray Data, and decoding rows into tensors.

- :func:`read_shards` streams the shards a manifest lists (``ray.data.read_parquet`` with the
  filesystem from :func:`pipeline.storage.resolve`; nothing is listed beyond the manifest).
- :func:`decode_image` turns the stored bytes into a ``uint8`` CHW tensor with 3 channels
  (gray, palette, RGBA, 16-bit and CMYK inputs are normalised; 16/32-bit by their own range,
  :data:`INTENSITY_MODES`), after the one pixel limit (:func:`check_pixels`) on the header;
  :func:`decode_target` turns
  the ``annotations`` list into torchvision detection targets; :func:`decode_target_window` the
  target of a crop of a large image, reading only the crop's part of each mask
  (:func:`rle_window`). Regions of huge images: :mod:`pipeline.data.regions`.
- :func:`read_rows` (re-exported from :mod:`pipeline.data.format`) iterates rows without Ray.

Ray and torch are imported inside the functions that need them.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from model.errors import MaskrayError
from pipeline import storage
from pipeline.data.format import dataset_root, read_manifest, read_rows, shard_uris  # noqa: F401

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000  # the one pixel limit (check_pixels); a 4000x3000 photo is 12 MP
_PIL_LIMIT_LOCK = threading.Lock()


class ImageDecodeError(MaskrayError):
    """Image bytes that cannot be decoded (empty, corrupt, unsupported, too large)."""


class TargetError(MaskrayError):
    """Annotations that cannot be turned into a target (bad RLE size, unknown category)."""


# ---------------------------------------------------------------------------------------------
# Ray Data


def read_shards(dataset_uri: str, *, columns: list[str] | None = None,
                override_num_blocks: int | None = None, rows_per_block: int = 128,
                shuffle: str | None = None, datasource_v2: bool = False,
                **read_parquet_args: Any):
    """A ``ray.data.Dataset`` streaming the rows of the dataset at ``dataset_uri``.

    Only the shards listed in its ``manifest.json`` are read (a shard left by an interrupted
    writer is invisible). ``columns`` projects (e.g. everything but ``image`` for statistics);
    ``shuffle="files"`` shuffles shard order each epoch; other keyword arguments go to
    ``ray.data.read_parquet`` (e.g. ``num_cpus=`` per read task, ``concurrency=``).

    By default this uses Ray Data's V1 Parquet datasource: V2 (Ray's default since 2.5x)
    starts footer-reader actors for every read, which costs 20–60 s per read on a small or
    busy cluster (measured here: 0.3–2 s vs 24–63 s for the same 4 shards on 2 cores).
    ``datasource_v2=True`` opts back in.

    Blocks: ``override_num_blocks`` defaults to ``max(shards, images / rows_per_block)``.
    Ray's own default (200 blocks) cuts a 1,000-image shard into slices of 5–10 rows whose
    per-block overhead made reads 2–6× slower here; one block per shard starves a
    downstream actor pool of parallelism on small datasets.
    """
    import ray.data

    manifest = read_manifest(dataset_uri)
    uris = shard_uris(dataset_uri, manifest)
    if not uris:
        raise MaskrayError(f"{dataset_root(dataset_uri)}: the manifest lists no shards")
    fs, _ = storage.resolve(uris[0])
    paths = [storage.resolve(u)[1] for u in uris]
    kwargs: dict[str, Any] = dict(read_parquet_args)
    if override_num_blocks is None:
        override_num_blocks = max(len(paths), -(-manifest.num_images // max(1, rows_per_block)))
    kwargs["override_num_blocks"] = override_num_blocks
    if shuffle is not None:
        kwargs["shuffle"] = shuffle
    ctx = ray.data.DataContext.get_current()
    old_v2 = getattr(ctx, "use_datasource_v2", None)
    try:
        if old_v2 is not None:
            ctx.use_datasource_v2 = datasource_v2  # read at planning time, restored below
        return ray.data.read_parquet(paths, filesystem=fs, columns=columns, **kwargs)
    except OSError as exc:
        raise storage.storage_error(dataset_root(dataset_uri), exc) from exc
    finally:
        if old_v2 is not None:
            ctx.use_datasource_v2 = old_v2


# ---------------------------------------------------------------------------------------------
# Images

# How images with more than 8 bits per sample (16-bit and 32-bit integer, 32-bit float; one
# channel) are mapped to uint8. 8-bit images (gray, palette, RGB, CMYK...) are never rescaled.
#   "percentile": per image, the PERCENTILE_RANGE percentiles -> 0..255, clipped (default; as
#                 stardist/csbdeep's normalize and cellpose do: 1st and 99.8th percentiles)
#   "minmax":     per image, min..max -> 0..255
#   "dtype":      0..65535 -> 0..255 for integer images (a 0-235 microscopy image becomes
#                 black, so only for data that really spans the range); min-max for float
INTENSITY_MODES: tuple[str, ...] = ("percentile", "minmax", "dtype")
DEFAULT_INTENSITY = "percentile"
PERCENTILE_RANGE = (1.0, 99.8)


def check_intensity(intensity: str) -> str:
    """``intensity`` if it is one of :data:`INTENSITY_MODES` (else a one-line ValueError)."""
    if intensity not in INTENSITY_MODES:
        raise ValueError(f"intensity {intensity!r} is not one of {', '.join(INTENSITY_MODES)}")
    return intensity


def check_pixels(width: int, height: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
    """The one pixel-limit check (and its one error text), done on header sizes before decoding.

    ``max_pixels`` defaults to :data:`DEFAULT_MAX_PIXELS` (50 MP: a 4000x3000 photo is 12 MP);
    ``None`` leaves only Pillow's own bomb check (error above ~179 MP).
    """
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(f"image is {width}x{height} = {width * height / 1e6:.1f} MP, over "
                               f"the {max_pixels / 1e6:g} MP limit (max_pixels), "
                               f"refused before decoding")


def open_image(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """A PIL image for encoded ``data`` (header parsed; pixels not decoded yet).

    Raises :class:`ImageDecodeError` for empty or unrecognised data and for images larger than
    ``max_pixels`` (:func:`check_pixels`), before any pixel memory is allocated. Pillow's own
    bomb check is replaced by ours only when ``max_pixels`` is set (ours runs right after the
    header is read); with ``None`` Pillow's stays on.
    """
    from PIL import Image

    if data is None or len(data) == 0:
        raise ImageDecodeError("empty image data (0 bytes)")
    try:
        if max_pixels is None:
            img = Image.open(io.BytesIO(data))
        else:
            with _PIL_LIMIT_LOCK:
                old_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    img = Image.open(io.BytesIO(data))  # lazy: reads the header only
                finally:
                    Image.MAX_IMAGE_PIXELS = old_limit
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image refused by Pillow's decompression bomb check ({exc})") \
            from None
    except Exception as exc:  # noqa: BLE001 - PIL raises several types for junk
        head = bytes(data[:8]).hex()
        raise ImageDecodeError(f"not a recognised image format ({len(data)} bytes starting "
                               f"with {head}: {exc})") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has an empty size {width}x{height}")
    check_pixels(width, height, max_pixels)
    return img


def image_size(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` from the header of encoded image bytes (no pixel decode); raises
    :class:`ImageDecodeError` over ``max_pixels``."""
    return open_image(data, max_pixels=max_pixels).size


def load_image(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """:func:`open_image` then a full decode (catches truncated/corrupt streams)."""
    img = open_image(data, max_pixels=max_pixels)
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt streams raise several types
        raise ImageDecodeError(f"corrupt or truncated {img.format or 'image'} data "
                               f"({len(data)} bytes: {exc})") from None
    return img


_SCALE_CHUNK = 1 << 22  # values per chunk when mapping to uint8 (bounds the float64 temporaries)


def _histogram_percentiles(arr: np.ndarray, percents: Sequence[float]) -> list[float]:
    """``np.percentile(arr, percents)`` (linear interpolation) of an integer array of at most 16
    bits from a histogram built chunk by chunk: equal results, without a float64 copy or a
    sort of the whole array."""
    flat = arr.reshape(-1)
    offset = int(np.iinfo(arr.dtype).min)
    hist = np.zeros(1 << (8 * arr.dtype.itemsize), dtype=np.int64)
    for start in range(0, flat.size, _SCALE_CHUNK):
        chunk = flat[start:start + _SCALE_CHUNK].astype(np.int64) - offset
        hist += np.bincount(chunk, minlength=hist.size)
    cum = np.cumsum(hist)
    n = int(cum[-1])

    def order_stat(k: int) -> float:  # the k-th smallest value (0-based)
        return float(np.searchsorted(cum, k, side="right") + offset)

    out = []
    for p in percents:
        pos = float(p) / 100.0 * (n - 1)
        lo = int(np.floor(pos))
        frac = pos - lo
        v_lo = order_stat(lo)
        v_hi = order_stat(min(lo + 1, n - 1))
        out.append(v_lo + frac * (v_hi - v_lo) if frac else v_lo)
    return out


def intensity_range(arr: np.ndarray, intensity: str = DEFAULT_INTENSITY) -> tuple[float, float] | None:
    """The ``(lo, hi)`` values that :func:`to_uint8` maps to 0 and 255 for ``arr`` (any shape,
    more than 8 bits), or None when the image maps to all zeros (no finite value, or constant).

    Computed once per image and applied to its regions with :func:`scale_to_uint8`, so that the
    tiles of one image share one mapping. Integer images of up to 16 bits use an exact histogram
    (no float64 copy of the image); others a float64 percentile."""
    check_intensity(intensity)
    if intensity == "dtype" and np.issubdtype(arr.dtype, np.integer):
        return 0.0, 65535.0
    if arr.size == 0:
        return None
    small_int = np.issubdtype(arr.dtype, np.integer) and arr.dtype.itemsize <= 2
    if small_int:
        if intensity == "percentile":
            lo, hi = _histogram_percentiles(arr, PERCENTILE_RANGE)
            if hi <= lo:
                lo, hi = float(arr.min()), float(arr.max())
        else:
            lo, hi = float(arr.min()), float(arr.max())
        return (lo, hi) if hi > lo else None
    values = np.asarray(arr, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return None
    if intensity == "percentile":
        lo, hi = (float(v) for v in np.percentile(values[finite], PERCENTILE_RANGE))
        if hi <= lo:  # (nearly) constant between the percentiles: fall back to min-max
            lo, hi = float(values[finite].min()), float(values[finite].max())
    else:  # "minmax", and "dtype" for float images (no dtype range to speak of)
        lo, hi = float(values[finite].min()), float(values[finite].max())
    return (lo, hi) if hi > lo else None


def scale_to_uint8(arr: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    """``arr`` mapped linearly from ``value_range`` ``(lo, hi)`` to 0..255 (rounded, clipped;
    NaN/inf become 0), ``uint8`` of the same shape; all zeros for None. Works in chunks, so the
    float64 temporaries stay small whatever the image size."""
    out = np.zeros(arr.shape, dtype=np.uint8)
    if value_range is None or arr.size == 0:
        return out
    lo, hi = value_range
    flat_in, flat_out = np.ascontiguousarray(arr).reshape(-1), out.reshape(-1)
    factor = 255.0 / (hi - lo)
    for start in range(0, flat_in.size, _SCALE_CHUNK):
        values = flat_in[start:start + _SCALE_CHUNK].astype(np.float64)
        scaled = (np.where(np.isfinite(values), values, lo) - lo) * factor
        flat_out[start:start + _SCALE_CHUNK] = np.rint(np.clip(scaled, 0.0, 255.0))
    return out


def to_uint8(arr: np.ndarray, intensity: str = DEFAULT_INTENSITY) -> np.ndarray:
    """A one-channel array of more than 8 bits -> ``uint8`` of the same shape (see
    :data:`INTENSITY_MODES`). NaN/inf become the low end; a constant image becomes 0.
    (:func:`intensity_range` then :func:`scale_to_uint8`.)"""
    return scale_to_uint8(arr, intensity_range(arr, intensity))


def image_orientation(img: Any) -> int:
    """The EXIF orientation tag (1..8) of a decoded PIL image; 1 when absent or unreadable.

    Asked after the decode on the same image object: Pillow finds a PNG's ``eXIf`` chunk only by
    loading the image, so opening the bytes a second time to ask would decode every PNG twice."""
    try:
        value = int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - no EXIF is the normal case; the decode reports real damage
        return 1
    return value if 1 <= value <= 8 else 1


def decode_array_oriented(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                          intensity: str = DEFAULT_INTENSITY) -> tuple[np.ndarray, int]:
    """:func:`decode_array` and the image's EXIF orientation (1..8, not applied), from one decode."""
    check_intensity(intensity)
    img = load_image(data, max_pixels=max_pixels)
    orientation = image_orientation(img)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if arr.ndim != 2:
            raise ImageDecodeError(f"unsupported image layout {arr.shape} for mode {mode}")
        arr = to_uint8(arr, intensity)
        return np.repeat(arr[:, :, None], 3, axis=2), orientation
    if mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageDecodeError(f"unexpected decoded shape {arr.shape} from mode {mode}")
    return arr, orientation


def decode_array(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 intensity: str = DEFAULT_INTENSITY) -> np.ndarray:
    """Encoded bytes -> ``uint8`` array ``[H, W, 3]``.

    Gray and palette images are expanded to RGB; alpha is dropped; CMYK/YCbCr/LAB are converted
    to RGB; 8-bit images keep their values. One-channel 16-bit and 32-bit (integer or float)
    images are mapped by ``intensity`` (:data:`INTENSITY_MODES`; default per-image
    1st-99.8th percentile). 16-bit RGB and gray+alpha PNGs reach us already reduced to 8 bits
    by Pillow (high byte). EXIF orientation is not applied (annotations refer to the stored
    pixel grid; inference applies it, :func:`decode_array_oriented`). Raises
    :class:`ImageDecodeError` over ``max_pixels`` before decoding.
    """
    return decode_array_oriented(data, max_pixels=max_pixels, intensity=intensity)[0]


def decode_image(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 intensity: str = DEFAULT_INTENSITY):
    """Encoded image bytes -> ``torch.uint8`` tensor ``[3, H, W]`` (see :func:`decode_array`).

    Raises :class:`ImageDecodeError` (one line saying what is wrong) for empty, corrupt or
    truncated data and for images over ``max_pixels`` (default 50 MP), read from the header
    before any decode. ``intensity`` maps 16/32-bit images (:data:`INTENSITY_MODES`).
    """
    import torch

    arr = decode_array(data, max_pixels=max_pixels, intensity=intensity)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


# ---------------------------------------------------------------------------------------------
# Targets


def decode_masks(annotations: Sequence[dict], height: int, width: int) -> np.ndarray:
    """``uint8 [N, H, W]`` masks from the annotations' compressed RLE."""
    from pycocotools import mask as mask_utils

    if not annotations:
        return np.zeros((0, height, width), dtype=np.uint8)
    rles = []
    for ann in annotations:
        seg = ann.get("segmentation") or {}
        size = [int(v) for v in (seg.get("size") or ())]
        counts = seg.get("counts")
        if size != [height, width]:
            raise TargetError(f"annotation {ann.get('id')}: RLE size {size} does not match the "
                              f"image ({height}x{width})")
        if counts is None:
            raise TargetError(f"annotation {ann.get('id')}: no RLE counts")
        if isinstance(counts, str):
            counts = counts.encode()
        rles.append({"size": size, "counts": bytes(counts)})
    masks = mask_utils.decode(rles)  # [H, W, N], Fortran order
    return np.ascontiguousarray(masks.transpose(2, 0, 1), dtype=np.uint8)


def decode_keypoints(annotations: Sequence[dict], num_keypoints: int) -> np.ndarray:
    """``float32 [N, K, 3]`` keypoints (x, y pixels; v in {0, 1, 2}) from COCO ``keypoints`` lists.

    An annotation without keypoints (none stored, or a category that names none) gets K
    points of zeros (v = 0: not labeled). A point with v = 0 is written (0, 0, 0), COCO's
    convention, so that transforms never move a point that is not there.
    """
    k = int(num_keypoints)
    out = np.zeros((len(annotations), k, 3), dtype=np.float32)
    for i, ann in enumerate(annotations):
        values = ann.get("keypoints")
        if values is None or len(values) == 0:
            continue
        if len(values) != 3 * k:
            raise TargetError(f"annotation {ann.get('id')}: {len(values)} keypoint values, expected "
                              f"3 x {k} (x, y, v per keypoint of the model)")
        points = np.asarray(values, dtype=np.float32).reshape(k, 3)
        if not np.isin(points[:, 2], (0, 1, 2)).all() or not np.isfinite(points).all():
            raise TargetError(f"annotation {ann.get('id')}: keypoint visibility outside {{0, 1, 2}} "
                              f"or a non-finite coordinate")
        points[points[:, 2] == 0] = 0.0
        out[i] = points
    return out


def decode_target(annotations: Sequence[dict] | None, height: int, width: int,
                  category_ids: Sequence[int], num_keypoints: int = 0) -> dict:
    """Annotations of one row -> a torchvision detection target.

    Returns ``{"boxes": float32 [N, 4] xyxy pixels, "labels": int64 [N] in 1..K,
    "masks": uint8 [N, H, W], "iscrowd": bool [N], "area": float32 [N]}`` where label ``i``
    is ``category_ids[i - 1]`` (manifest category order). With ``num_keypoints`` > 0 (a
    keypoint model's K) it adds ``"keypoints": float32 [N, K, 3]`` (x, y in pixels, v kept;
    zeros for an instance without keypoints: :func:`decode_keypoints`).
    """
    import torch

    annotations = list(annotations or ())
    label_of = {int(c): i + 1 for i, c in enumerate(category_ids)}
    n = len(annotations)
    boxes = np.zeros((n, 4), dtype=np.float32)
    labels = np.zeros((n,), dtype=np.int64)
    iscrowd = np.zeros((n,), dtype=bool)
    area = np.zeros((n,), dtype=np.float32)
    for i, ann in enumerate(annotations):
        cat = int(ann["category_id"])
        if cat not in label_of:
            raise TargetError(f"annotation {ann.get('id')}: category_id {cat} not in the "
                              f"dataset's categories {list(category_ids)}")
        x, y, w, h = (float(v) for v in ann["bbox"])
        boxes[i] = (x, y, x + w, y + h)
        labels[i] = label_of[cat]
        iscrowd[i] = bool(ann.get("iscrowd"))
        area[i] = float(ann.get("area") or 0.0)
    masks = decode_masks(annotations, int(height), int(width))
    target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
              "masks": torch.from_numpy(masks), "iscrowd": torch.from_numpy(iscrowd),
              "area": torch.from_numpy(area)}
    if num_keypoints:
        target["keypoints"] = torch.from_numpy(decode_keypoints(annotations, num_keypoints))
    return target


# ---------------------------------------------------------------------------------------------
# Targets of a window (training crops of large images)


def rle_counts(counts: bytes | str) -> np.ndarray:
    """Run lengths ``int64 [R]`` (column-major, first run = zeros) of COCO's compressed RLE string,
    the inverse of pycocotools' ``rleToString`` (maskApi.c ``rleFrString``: 5-bit groups + 48, the
    sign in bit 4 of the last group, runs after the second stored as differences to the run two
    before). Lets a window of a huge mask be read without decoding the mask at full size."""
    data = counts.encode() if isinstance(counts, str) else bytes(counts)
    out: list[int] = []
    p, n = 0, len(data)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return np.asarray(out, dtype=np.int64)


def rle_window(counts: bytes | str, height: int, width: int,
               window: tuple[int, int, int, int]) -> tuple[np.ndarray, int]:
    """The pixels of a ``height`` x ``width`` mask (compressed COCO RLE ``counts``) inside
    ``window`` ``(x0, y0, x1, y1)``: ``bool [y1-y0, x1-x0]``, and the mask's whole area (pixels).
    Memory is one column strip of the window's width (``height x (x1-x0)`` bytes), never the mask."""
    x0, y0, x1, y1 = window
    runs = rle_counts(counts)
    ends = np.cumsum(runs)
    starts = ends - runs
    fg = np.arange(runs.size) % 2 == 1  # odd runs are foreground
    area = int(runs[fg].sum())
    lo, hi = x0 * height, x1 * height  # the window's columns, column-major
    a = np.clip(starts[fg], lo, hi) - lo
    b = np.clip(ends[fg], lo, hi) - lo
    keep = b > a
    edges = np.zeros(hi - lo + 1, dtype=np.int32)
    np.add.at(edges, a[keep], 1)
    np.add.at(edges, b[keep], -1)
    strip = np.cumsum(edges[:-1]).astype(bool).reshape(x1 - x0, height)  # [columns, rows]
    return np.ascontiguousarray(strip[:, y0:y1].T), area


def decode_target_window(annotations: Sequence[dict] | None, height: int, width: int,
                         window: tuple[int, int, int, int], category_ids: Sequence[int],
                         num_keypoints: int = 0, min_visible: float = 0.0) -> dict:
    """:func:`decode_target` of the crop ``window`` ``(x0, y0, x1, y1)`` of a ``height`` x
    ``width`` image, in the crop's pixels, without decoding any mask at full size.

    Masks are cropped (:func:`rle_window`); boxes are recomputed from the cropped masks (xyxy,
    ``x_max + 1``, as COCO boxes of masks are); ``area`` is the visible pixels; keypoints are
    shifted, and those outside the crop (or not labeled) become ``(0, 0, 0)``. Instances with
    fewer than ``min_visible`` of their mask's pixels inside the crop, or none, are dropped (an
    annotation whose box misses the window is dropped without decoding its mask).
    """
    import torch

    x0, y0, x1, y1 = (int(v) for v in window)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise TargetError(f"crop window {window} is empty or outside the {width}x{height} image")
    kept: list[dict] = []
    masks: list[np.ndarray] = []
    for ann in annotations or ():
        bx, by, bw, bh = (float(v) for v in ann["bbox"])
        if bx >= x1 or by >= y1 or bx + bw <= x0 or by + bh <= y0:
            continue
        seg = ann.get("segmentation") or {}
        size = [int(v) for v in (seg.get("size") or ())]
        if size != [height, width] or seg.get("counts") is None:
            raise TargetError(f"annotation {ann.get('id')}: RLE size {size} does not match the "
                              f"image ({height}x{width}) or has no counts")
        crop, area = rle_window(seg["counts"], height, width, (x0, y0, x1, y1))
        visible = int(crop.sum())
        if visible == 0 or visible < min_visible * area:
            continue
        kept.append(ann)
        masks.append(crop)
    n, h, w = len(kept), y1 - y0, x1 - x0
    label_of = {int(c): i + 1 for i, c in enumerate(category_ids)}
    boxes = np.zeros((n, 4), dtype=np.float32)
    labels = np.zeros((n,), dtype=np.int64)
    for i, (ann, crop) in enumerate(zip(kept, masks)):
        cat = int(ann["category_id"])
        if cat not in label_of:
            raise TargetError(f"annotation {ann.get('id')}: category_id {cat} not in the "
                              f"dataset's categories {list(category_ids)}")
        labels[i] = label_of[cat]
        cols, rows = np.flatnonzero(crop.any(axis=0)), np.flatnonzero(crop.any(axis=1))
        boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    stack = np.stack(masks).astype(np.uint8) if masks else np.zeros((0, h, w), dtype=np.uint8)
    target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
              "masks": torch.from_numpy(stack),
              "iscrowd": torch.tensor([bool(a.get("iscrowd")) for a in kept], dtype=torch.bool),
              "area": torch.from_numpy(stack.reshape(n, -1).sum(1).astype(np.float32))}
    if num_keypoints:
        kp = decode_keypoints(kept, num_keypoints)
        kp[..., 0] -= x0
        kp[..., 1] -= y0
        inside = (kp[..., 0] >= 0) & (kp[..., 0] <= w) & (kp[..., 1] >= 0) & (kp[..., 1] <= h)
        kp[~inside | (kp[..., 2] == 0)] = 0.0
        target["keypoints"] = torch.from_numpy(kp)
    return target
