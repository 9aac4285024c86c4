"""A deterministic synthetic COCO dataset of shapes with exact instance masks.

``synthesize(out, images=N, seed=S)`` writes ``out/images/NNNNNN.png`` and
``out/annotations.json`` (COCO: ``images``, ``annotations``, ``categories``). Each image has
1–4 shapes (circle, square, triangle, star, and ellipse when 5 categories are asked for) of
random saturated colour, size, rotation and overlap on a textured low-saturation background.

Masks are exact by construction: every shape is a polygon rasterised with pycocotools, and the
image is painted from those very masks, later shapes occluding earlier ones. A shape that is
fully visible is annotated with its polygon (decoding it gives the painted pixels); an occluded
one, and a random ``rle_fraction`` of the others, with the compressed RLE of its visible pixels.
Some images (``crowd_fraction``) also hold a crowd: a cluster of small shapes of one category
annotated as one ``iscrowd`` uncompressed RLE, as COCO does. ``bbox`` and ``area`` are those of
the visible mask. Image ``i`` depends only on ``(seed, i)``.

``unlabeled=M`` also writes ``out/unlabeled/NNNNNN.png`` from an independent random stream (no
annotations): a pool for ``maskray pack`` and self-training.

``keypoints=True`` adds a category with keypoints, ``figure``: a stick figure (head disc, body,
arms and legs as thick bars, round hands and feet) whose :data:`FIGURE_KEYPOINTS` are exact
(``head`` the head's centre, ``neck``, ``hip``, ``left_hand``/``right_hand`` and
``left_foot``/``right_foot`` the centres of its hand and foot discs; two decimals). ``left_*`` is
on the image's left of the upright figure (it leans at most 25°), so a horizontal flip swaps
left and right as the names' flip map says. The category carries ``keypoints`` and
``skeleton``; each figure's annotation ``keypoints`` (``x, y, v`` × 7) with ``v = 2`` where the
keypoint's pixel is painted with the figure, ``v = 1`` where a later instance covers it, and
``0, 0, 0`` outside the image; ``num_keypoints`` counts ``v > 0``. Half of the objects are then
figures (never crowds). Without ``keypoints`` the output is what it always was.
"""

from __future__ import annotations

import io
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline import storage

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "ellipse")
FIGURE = "figure"
FIGURE_KEYPOINTS = ["head", "neck", "hip", "left_hand", "right_hand", "left_foot", "right_foot"]
FIGURE_SKELETON = [[1, 2], [2, 3], [2, 4], [2, 5], [3, 6], [3, 7]]  # 1-based, COCO's convention
FIGURE_FRACTION = 0.5  # of the objects, when keypoints are on
# OKS sigmas for evaluating figures (eval.kpt_oks_sigmas), in COCO's range (0.025 nose .. 0.107
# hips): the head and hands/feet are disc centres, neck and hip bar joints
FIGURE_OKS_SIGMAS = [0.05, 0.06, 0.08, 0.06, 0.06, 0.07, 0.07]
MIN_VISIBLE_FRACTION = 0.5
MIN_VISIBLE_PIXELS = 24


@dataclass
class SynthSummary:
    out: str
    annotations_uri: str
    images: int
    instances: int
    polygons: int
    rles: int
    crowd: int
    unlabeled: int
    figures: int = 0  # instances with keypoints

    def __str__(self) -> str:
        figures = f", {self.figures} with keypoints" if self.figures else ""
        return (f"synth: {self.images} images, {self.instances} instances ({self.polygons} "
                f"polygons, {self.rles} RLE, {self.crowd} crowd{figures}), {self.unlabeled} unlabeled "
                f"-> {self.out}")


def categories_for(num_categories: int, keypoints: bool = False) -> list[dict]:
    """The shape categories (ids 1..N), then with ``keypoints`` the ``figure`` category (id N+1)
    with its keypoint names and skeleton."""
    if not 1 <= num_categories <= len(SHAPES):
        raise ValueError(f"num_categories must be in 1..{len(SHAPES)}, got {num_categories}")
    cats = [{"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(SHAPES[:num_categories])]
    if keypoints:
        cats.append({"id": num_categories + 1, "name": FIGURE, "supercategory": "figure",
                     "keypoints": list(FIGURE_KEYPOINTS), "skeleton": [list(p) for p in FIGURE_SKELETON]})
    return cats


# ---------------------------------------------------------------------------------------------
# Geometry


def shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float,
                  aspect: float = 0.6) -> np.ndarray:
    """Vertices ``[K, 2]`` (x, y) of a shape centred at (cx, cy) with outer radius ``r``."""
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif kind == "ellipse":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        pts = np.stack([np.cos(t) * r, np.sin(t) * r * aspect], 1)
    elif kind == "square":
        t = np.pi / 4 + np.arange(4) * np.pi / 2
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif kind == "triangle":
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif kind == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        pts = np.stack([np.cos(t) * rad, np.sin(t) * rad], 1)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    c, s = math.cos(angle), math.sin(angle)
    rot = pts @ np.array([[c, s], [-s, c]])
    out = rot + np.array([cx, cy])
    return np.round(out, 2)


def _disc(centre: np.ndarray, radius: float, points: int) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return centre + radius * np.stack([np.cos(t), np.sin(t)], 1)


def _bar(a: np.ndarray, b: np.ndarray, half_width: float) -> np.ndarray:
    """The quad ``[4, 2]`` of a bar from ``a`` to ``b``, ``2 * half_width`` thick."""
    d = (b - a) / max(float(np.hypot(*(b - a))), 1e-6)
    n = np.array([-d[1], d[0]]) * half_width
    return np.stack([a + n, b + n, b - n, a - n])


def figure_geometry(cx: float, cy: float, r: float, lean: float, arms: tuple[float, float],
                    legs: tuple[float, float]) -> tuple[list[np.ndarray], np.ndarray]:
    """A stick figure: its polygons (each ``[P, 2]`` x, y; their union is the figure) and its
    keypoints ``[7, 2]`` (x, y) in :data:`FIGURE_KEYPOINTS` order, both rounded to 2 decimals.

    ``r`` is about half its height (pixels), ``lean`` its rotation (radians, about its centre),
    ``arms`` the left and right arm's angles below the horizontal, ``legs`` the legs' angles
    from the vertical (radians). Image coordinates: x right, y down; the left hand and foot are
    on the image's left of the upright figure.
    """
    neck, hip = np.array([0.0, -0.48 * r]), np.array([0.0, 0.18 * r])
    head = np.array([0.0, -0.72 * r])
    arm, leg = 0.62 * r, 0.78 * r
    left_hand = neck + arm * np.array([-math.cos(arms[0]), math.sin(arms[0])])
    right_hand = neck + arm * np.array([math.cos(arms[1]), math.sin(arms[1])])
    left_foot = hip + leg * np.array([-math.sin(legs[0]), math.cos(legs[0])])
    right_foot = hip + leg * np.array([math.sin(legs[1]), math.cos(legs[1])])
    points = np.stack([head, neck, hip, left_hand, right_hand, left_foot, right_foot])
    c, s = math.cos(lean), math.sin(lean)
    rot = np.array([[c, s], [-s, c]])  # row vectors: p @ rot rotates by ``lean``
    centre = np.array([cx, cy])

    def place(pts: np.ndarray) -> np.ndarray:
        return np.round(pts @ rot + centre, 2)

    half = max(1.5, 0.07 * r)
    end = max(2.0, 0.1 * r)
    polys = [_disc(head, 0.22 * r, 24), _bar(neck, hip, half)]
    polys += [_bar(neck, p, half) for p in (left_hand, right_hand)]
    polys += [_bar(hip, p, half) for p in (left_foot, right_foot)]
    polys += [_disc(p, end, 12) for p in (left_hand, right_hand, left_foot, right_foot)]
    polys += [_disc(p, half * 1.2, 8) for p in (neck, hip)]  # joints: bars only touch them
    return [place(p) for p in polys], place(points)


def rasterize_union(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """``bool [H, W]`` union of polygons, as pycocotools decodes a COCO multi-polygon."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects([p.reshape(-1).tolist() for p in polygons], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def rasterize(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """``bool [H, W]`` mask of a polygon exactly as pycocotools decodes it."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects([polygon.reshape(-1).tolist()], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def encode_rle(mask: np.ndarray) -> dict:
    """Compressed RLE ``{"size": [h, w], "counts": bytes}`` of a 2-D mask."""
    from pycocotools import mask as mask_utils

    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed (crowd) RLE ``{"size": [h, w], "counts": [int, ...]}``."""
    flat = mask.astype(np.uint8).reshape(-1, order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(v) for v in runs]}


def mask_bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]


# ---------------------------------------------------------------------------------------------
# Rendering


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured low-saturation background ``float32 [H, W, 3]`` and its mean colour."""
    base = rng.uniform(70, 170)
    tint = rng.uniform(-12, 12, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    gx, gy = rng.uniform(-25, 25, size=2)
    img = base + gx * (xx - 0.5) + gy * (yy - 0.5)
    kind = rng.integers(0, 3)
    freq = rng.uniform(4, 12)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == 0:  # stripes
        theta = rng.uniform(0, np.pi)
        img = img + 12 * np.sin(2 * np.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta))
                                + phase)
    elif kind == 1:  # checker
        img = img + 10 * np.sign(np.sin(2 * np.pi * freq * xx / 2 + phase)
                                 * np.sin(2 * np.pi * freq * yy / 2))
    else:  # blotches
        img = img + 12 * np.sin(2 * np.pi * freq * xx * 0.5 + phase) * np.cos(
            2 * np.pi * freq * yy * 0.4)
    out = img[:, :, None] + tint[None, None, :]
    out = out + rng.normal(0, 5, size=out.shape)
    return out.astype(np.float32), np.clip(base + tint, 0, 255)


def _object_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
    """A saturated colour far (L1 ≥ 150) from the background's mean."""
    best, best_d = None, -1.0
    for _ in range(20):
        hue = rng.uniform(0, 6)
        sat = rng.uniform(0.6, 1.0)
        val = rng.uniform(0.55, 1.0) if rng.random() < 0.7 else rng.uniform(0.15, 0.35)
        c = val * sat
        x = c * (1 - abs(hue % 2 - 1))
        m = val - c
        rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(hue) % 6]
        colour = (np.array(rgb) + m) * 255.0
        d = float(np.abs(colour - bg_mean).sum())
        if d >= 150:
            return colour
        if d > best_d:
            best, best_d = colour, d
    return best


def render(rng: np.random.Generator, size: int, categories: list[dict], *,
           min_objects: int = 1, max_objects: int = 4, crowd_fraction: float = 0.05,
           labeled: bool = True) -> tuple[np.ndarray, list[dict]]:
    """One image ``uint8 [H, W, 3]`` and its objects (``category_id``, ``polygon`` (a list of
    polygons for a figure) or None, ``full`` and ``mask`` (visible) pixels, ``iscrowd``,
    ``keypoints`` ``[K, 2]`` or None), bottom layer first. Categories with ``keypoints`` are
    figures (:data:`FIGURE_FRACTION` of the objects); the others shapes."""
    shapes = [c for c in categories if not c.get("keypoints")]
    figures = [c for c in categories if c.get("keypoints")]
    img, bg_mean = _background(rng, size)
    objects: list[dict] = []  # each: category_id, polygon, full, mask(visible), iscrowd

    def place(mask: np.ndarray) -> bool:
        """Occlude earlier objects by ``mask`` unless that hides too much of one of them."""
        for obj in objects:
            left = obj["mask"] & ~mask
            need = obj["full"].sum() * (0.0 if obj["iscrowd"] else MIN_VISIBLE_FRACTION)
            if left.sum() < max(need, MIN_VISIBLE_PIXELS):
                return False
        for obj in objects:
            obj["mask"] = obj["mask"] & ~mask
        return True

    if labeled and crowd_fraction > 0 and rng.random() < crowd_fraction:
        cat = shapes[int(rng.integers(len(shapes)))]
        cx, cy = rng.uniform(0.25, 0.75, size=2) * size
        union = np.zeros((size, size), dtype=bool)
        colour = _object_colour(rng, bg_mean)
        for _ in range(int(rng.integers(3, 6))):
            r = rng.uniform(0.035, 0.06) * size
            ox, oy = rng.normal(0, 0.08 * size, size=2)
            poly = shape_polygon(cat["name"], cx + ox, cy + oy, max(r, 3.0),
                                 rng.uniform(0, 2 * np.pi))
            union |= rasterize(poly, size, size)
        if union.sum() >= MIN_VISIBLE_PIXELS:
            img[union] = colour
            objects.append({"category_id": cat["id"], "polygon": None, "full": union,
                            "mask": union.copy(), "iscrowd": True, "keypoints": None})

    count = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(count):
        if figures and rng.random() < FIGURE_FRACTION:
            cat = figures[int(rng.integers(len(figures)))]
        else:
            cat = shapes[int(rng.integers(len(shapes)))]
        for _attempt in range(25):
            points = None
            if cat.get("keypoints"):
                r = rng.uniform(0.2, 0.32) * size
                cx, cy = rng.uniform(r * 0.6, size - r * 0.6, size=2)
                poly, points = figure_geometry(cx, cy, r, rng.uniform(-0.35, 0.35),
                                               tuple(rng.uniform(-0.7, 0.87, size=2)),
                                               tuple(rng.uniform(0.17, 0.7, size=2)))
                mask = rasterize_union(poly, size, size)
            else:
                r = rng.uniform(0.12, 0.26) * size
                cx, cy = rng.uniform(r * 0.6, size - r * 0.6, size=2)
                poly = shape_polygon(cat["name"], cx, cy, r, rng.uniform(0, 2 * np.pi),
                                     aspect=rng.uniform(0.45, 0.7))
                mask = rasterize(poly, size, size)
            if mask.sum() < MIN_VISIBLE_PIXELS * 2:
                continue
            if place(mask):
                colour = _object_colour(rng, bg_mean)
                shade = colour[None, :] + rng.normal(0, 4, size=(int(mask.sum()), 3))
                img[mask] = shade
                objects.append({"category_id": cat["id"], "polygon": poly, "full": mask,
                                "mask": mask.copy(), "iscrowd": False, "keypoints": points})
                break
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


def encode_png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def make_image(seed: int, index: int, size: int, categories: list[dict], *,
               labeled: bool = True, rle_fraction: float = 0.1, crowd_fraction: float = 0.05,
               min_objects: int = 1, max_objects: int = 4) -> tuple[bytes, list[dict]]:
    """PNG bytes and COCO annotation dicts (without ``id``/``image_id``) for image ``index``."""
    rng = np.random.default_rng([seed, 0 if labeled else 1, index])
    img, objects = render(rng, size, categories, min_objects=min_objects,
                          max_objects=max_objects, crowd_fraction=crowd_fraction, labeled=labeled)
    anns = []
    for obj in objects if labeled else ():
        mask = obj["mask"]
        if obj["iscrowd"]:
            seg = uncompressed_rle(mask)
        elif obj["polygon"] is not None and np.array_equal(mask, obj["full"]) \
                and rng.random() >= rle_fraction:
            polys = obj["polygon"] if isinstance(obj["polygon"], list) else [obj["polygon"]]
            seg = [p.reshape(-1).tolist() for p in polys]
        else:
            rle = encode_rle(mask)
            seg = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}
        ann = {"category_id": obj["category_id"], "segmentation": seg,
               "area": float(mask.sum()), "bbox": mask_bbox(mask), "iscrowd": int(obj["iscrowd"])}
        if obj["keypoints"] is not None:
            ann["keypoints"], ann["num_keypoints"] = keypoint_labels(obj["keypoints"], obj["full"], mask)
        anns.append(ann)
    return encode_png(img), anns


def keypoint_labels(points: np.ndarray, full: np.ndarray, visible: np.ndarray) -> tuple[list, int]:
    """COCO ``keypoints`` (``x, y, v`` × K) and ``num_keypoints`` of ``points`` ``[K, 2]``: ``v = 1``
    where a later instance covers the point's pixel of ``full`` (``visible`` lacks it), else 2;
    ``0, 0, 0`` outside the image."""
    h, w = full.shape
    out: list = []
    for x, y in points.tolist():
        col, row = int(math.floor(x)), int(math.floor(y))
        if not (0 <= col < w and 0 <= row < h):
            out += [0, 0, 0]
            continue
        out += [float(x), float(y), 1 if full[row, col] and not visible[row, col] else 2]
    return out, sum(1 for v in out[2::3] if v > 0)


def synthesize(out: str, *, images: int, seed: int = 0, size: int = 128,
               num_categories: int = 4, min_objects: int = 1, max_objects: int = 4,
               rle_fraction: float = 0.1, crowd_fraction: float = 0.05, unlabeled: int = 0,
               first_id: int = 1, workers: int = 4, keypoints: bool = False) -> SynthSummary:
    """Write the dataset under ``out`` (local folder or ``s3://`` prefix); see module doc
    (``keypoints``: add the ``figure`` category with keypoints)."""
    if images < 0 or unlabeled < 0:
        raise ValueError("images and unlabeled must be >= 0")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError("need 1 <= min_objects <= max_objects")
    categories = categories_for(num_categories, keypoints)
    storage.makedirs(out)

    def one(index: int, labeled: bool):
        data, anns = make_image(seed, index, size, categories, labeled=labeled,
                                rle_fraction=rle_fraction, crowd_fraction=crowd_fraction,
                                min_objects=min_objects, max_objects=max_objects)
        folder = "images" if labeled else "unlabeled"
        name = f"{first_id + index:06d}.png"
        storage.write_bytes(storage.join(out, folder, name), data, fsync=False)
        return name, anns

    coco_images, coco_anns = [], []
    counts = {"polygons": 0, "rles": 0, "crowd": 0, "figures": 0}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for index, (name, anns) in enumerate(pool.map(lambda i: one(i, True), range(images))):
            image_id = first_id + index
            coco_images.append({"id": image_id, "file_name": name, "width": size,
                                "height": size})
            for ann in anns:
                ann = {"id": len(coco_anns) + 1, "image_id": image_id, **ann}
                coco_anns.append(ann)
                counts["figures"] += "keypoints" in ann
                if ann["iscrowd"]:
                    counts["crowd"] += 1
                elif isinstance(ann["segmentation"], list):
                    counts["polygons"] += 1
                else:
                    counts["rles"] += 1
        list(pool.map(lambda i: one(i, False), range(unlabeled)))
    coco = {"info": {"description": "maskray synthetic shapes", "seed": seed, "size": size},
            "images": coco_images, "annotations": coco_anns, "categories": categories}
    ann_uri = storage.join(out, "annotations.json")
    storage.write_bytes(ann_uri, json.dumps(coco).encode())
    summary = SynthSummary(out=str(out), annotations_uri=ann_uri, images=images,
                           instances=len(coco_anns), unlabeled=unlabeled, **counts)
    log.debug("%s", summary)  # the synth job prints it
    return summary


# ---------------------------------------------------------------------------------------------
# Mosaics: many small labelled images stitched into one large one, for tiled inference


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets (pixels) of tiles of side ``tile`` overlapping by the fraction ``overlap``
    along a side of ``length`` pixels: every ``tile - round(tile * overlap)`` pixels, the last tile
    flush with the end (SAHI's rule); ``[0]`` when the side fits in one tile."""
    if tile < 1 or not 0.0 <= overlap < 1.0:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < 1, got {tile}, {overlap}")
    if length <= tile:
        return [0]
    stride = max(1, tile - int(round(tile * overlap)))
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


@dataclass
class Mosaic:
    """What :func:`make_mosaic` wrote (URIs) and how its objects meet the tile seams.

    ``image``: the mosaic (PNG or tiled TIFF), ``width`` x ``height`` pixels; ``annotations``: its
    COCO json (one image, id 1, annotations in mosaic pixels); ``small_annotations``: the COCO json
    of the small images (``small_images`` folder), the ground truth image by image; ``mapping``:
    ``mosaic.json`` with ``placements`` (per small image: ``image_id``, ``file_name``, ``x``, ``y``
    of its top-left corner in the mosaic, ``width``, ``height``) and ``annotations`` (per mosaic
    annotation: ``id``, the small ``image_id`` and ``small_id`` it came from, ``cut`` and
    ``split``). ``cut``: objects that a tile edge crosses; ``split``: objects that no single tile
    holds whole (tiled inference must union their pieces), for tiles of ``tile`` pixels
    overlapping by ``overlap`` placed by ``starts`` (default :func:`tile_starts`).
    """

    image: str
    annotations: str
    small_annotations: str
    small_images: str
    mapping: str
    width: int
    height: int
    tile: int
    overlap: float
    instances: int
    cut: int
    split: int
    placements: list[dict]

    def __str__(self) -> str:
        return (f"mosaic: {self.width}x{self.height}, {len(self.placements)} images, {self.instances} "
                f"instances ({self.cut} crossed by a tile edge, {self.split} in no single tile of "
                f"{self.tile} px, overlap {self.overlap:g}) -> {self.image}")


def _axis_flags(lo: np.ndarray, hi: np.ndarray, starts: list[int], tile: int) -> tuple[np.ndarray, np.ndarray]:
    """For extents ``[lo, hi)`` along one axis: (crossed by a tile edge, in no tile's span)."""
    edges = np.asarray(sorted({e for s in starts for e in (s, s + tile)}))
    crossed = ((edges[None, :] > lo[:, None]) & (edges[None, :] < hi[:, None])).any(axis=1)
    s = np.asarray(starts)
    inside = ((s[None, :] <= lo[:, None]) & (s[None, :] + tile >= hi[:, None])).any(axis=1)
    return crossed, ~inside


def _best_offset(lo: np.ndarray, hi: np.ndarray, cells: int, cell: int, length: int, tile: int,
                 overlap: float, starts_fn) -> int:
    """The grid offset in [0, cell) along one axis that puts the most objects across seams."""
    starts = starts_fn(length, tile, overlap)
    best, best_score = 0, -1
    for off in range(0, cell, max(1, cell // 32)):
        crossed, split = _axis_flags(lo + off, hi + off, starts, tile)
        score = int(split.sum()) * (cells + 1) + int(crossed.sum())
        if score > best_score:
            best, best_score = off, score
    return best


def _shift_rle(seg, x: int, y: int, height: int, width: int):
    """A small image's RLE segmentation (compressed dict or crowd counts list) moved to ``(x, y)``
    of a ``height`` x ``width`` mosaic, in the same form. Built from a column strip of the mosaic's
    height (never a full-size mask): the strip's runs plus the zero columns before and after."""
    from pycocotools import mask as mask_utils

    h, w = (int(v) for v in seg["size"])
    rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else \
        {"size": [h, w], "counts": seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]}
    strip = np.zeros((height, w), dtype=np.uint8)
    strip[y:y + h] = mask_utils.decode(rle)
    counts = uncompressed_rle(strip)["counts"]
    counts[0] += x * height
    tail = (width - x - w) * height
    if len(counts) % 2:  # ends with a zero run
        counts[-1] += tail
    elif tail:
        counts.append(tail)
    if isinstance(seg["counts"], list):
        return {"size": [height, width], "counts": counts}
    out = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [height, width], "counts": out["counts"].decode()}


def _polygons_inside(polygons: list, height: int, width: int) -> bool:
    return all(0 <= v <= (width - 1 if i % 2 == 0 else height - 1)
               for poly in polygons for i, v in enumerate(poly))


def _shift_annotation(ann: dict, size: tuple[int, int], x: int, y: int, height: int, width: int) -> dict:
    """``ann`` of an image of ``size`` ``(h, w)`` moved to ``(x, y)`` of a ``height`` x ``width``
    mosaic (segmentation, box, keypoints)."""
    from pycocotools import mask as mask_utils

    out = dict(ann)
    seg = ann["segmentation"]
    if isinstance(seg, list) and not _polygons_inside(seg, *size):
        # a shape reaching past its image's border: pycocotools clipped it there, the mosaic must
        # too (the neighbour's pixels are not this object's), so it moves as its RLE
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, *size))
        seg = {"size": list(size), "counts": rle["counts"].decode()}
    if isinstance(seg, list):
        out["segmentation"] = [[v + (x if i % 2 == 0 else y) for i, v in enumerate(poly)] for poly in seg]
    else:
        out["segmentation"] = _shift_rle(seg, x, y, height, width)
    bx, by, bw, bh = ann["bbox"]
    out["bbox"] = [bx + x, by + y, bw, bh]
    if ann.get("keypoints"):
        pts = list(ann["keypoints"])
        for i in range(0, len(pts), 3):
            if pts[i + 2] > 0:
                pts[i], pts[i + 1] = pts[i] + x, pts[i + 1] + y
        out["keypoints"] = pts
    return out


def make_mosaic(out: str, *, grid: tuple[int, int] = (8, 8), cell: int = 128, seed: int = 0,
                tile: int = 512, overlap: float = 0.2, image_format: str = "png",
                num_categories: int = 4, max_objects: int = 4, crowd_fraction: float = 0.0,
                keypoints: bool = False, starts=None) -> Mosaic:
    """Stitch ``grid`` = ``(rows, cols)`` small synthetic images of ``cell`` pixels into one mosaic
    and write under ``out`` (local folder or ``s3://`` prefix):

    - ``small/images/*.png`` + ``small/annotations.json``: the small images (:func:`synthesize`
      with this ``seed``, ``cell`` as the size), the ground truth one image at a time;
    - ``mosaic.png`` (or ``mosaic.tif``, tiled 256x256, zlib, with ``image_format="tiff"``) of
      ``(rows + 1) * cell`` x ``(cols + 1) * cell`` pixels: the grid of cells on a gray border,
      shifted by the offset (less than a cell, per axis) that puts the most objects across the
      edges of tiles of side ``tile`` overlapping by ``overlap`` (placed by ``starts(length, tile,
      overlap)``, default :func:`tile_starts`), so that seams cut objects;
    - ``mosaic.json`` (COCO, one image with id 1, every annotation moved into mosaic pixels: polygons,
      RLE, boxes and keypoints shifted, masks never built at full size) and ``mapping.json``
      (placements and the annotation correspondence, see :class:`Mosaic`).

    Crowds are off by default (``crowd_fraction``): an accuracy test counts objects. Objects span
    0.24-0.52 of a cell, so ``split`` objects need ``tile * overlap`` below that (e.g. 128-px cells,
    tile 256, overlap 0.1). Cost: the small images are rendered at ~40-70 ms each on 2 cores
    (a 32x32 grid of 128 px took 137 s on the loaded 2-core box), the mosaic is built in memory
    (3 bytes per pixel) before it is written.
    """
    if image_format not in ("png", "tiff"):
        raise ValueError(f"image_format must be 'png' or 'tiff', got {image_format!r}")
    rows, cols = (int(v) for v in grid)
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be (rows >= 1, cols >= 1), got {grid}")
    starts_fn = starts or tile_starts
    small = storage.join(out, "small")
    synthesize(small, images=rows * cols, seed=seed, size=cell, num_categories=num_categories,
               max_objects=max_objects, crowd_fraction=crowd_fraction, keypoints=keypoints)
    coco = json.loads(storage.read_bytes(storage.join(small, "annotations.json")))
    height, width = (rows + 1) * cell, (cols + 1) * cell
    anns = coco["annotations"]
    cell_of = {im["id"]: divmod(k, cols) for k, im in enumerate(coco["images"])}
    boxes = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    grid_rc = np.asarray([cell_of[a["image_id"]] for a in anns], dtype=np.int64).reshape(-1, 2)
    x_lo = grid_rc[:, 1] * cell + boxes[:, 0]
    y_lo = grid_rc[:, 0] * cell + boxes[:, 1]
    ox = _best_offset(x_lo, x_lo + boxes[:, 2], cols, cell, width, tile, overlap, starts_fn)
    oy = _best_offset(y_lo, y_lo + boxes[:, 3], rows, cell, height, tile, overlap, starts_fn)

    from PIL import Image

    canvas = np.full((height, width, 3), 128, dtype=np.uint8)
    placements = []
    for im in coco["images"]:
        r, c = cell_of[im["id"]]
        x, y = ox + c * cell, oy + r * cell
        data = storage.read_bytes(storage.join(small, "images", im["file_name"]))
        canvas[y:y + cell, x:x + cell] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        placements.append({"image_id": im["id"], "file_name": im["file_name"], "x": x, "y": y,
                           "width": im["width"], "height": im["height"]})
    where = {p["image_id"]: p for p in placements}
    crossed_x, split_x = _axis_flags(x_lo + ox, x_lo + ox + boxes[:, 2], starts_fn(width, tile, overlap), tile)
    crossed_y, split_y = _axis_flags(y_lo + oy, y_lo + oy + boxes[:, 3], starts_fn(height, tile, overlap), tile)
    mosaic_anns, mapping = [], []
    for k, ann in enumerate(anns):
        p = where[ann["image_id"]]
        moved = _shift_annotation(ann, (p["height"], p["width"]), p["x"], p["y"], height, width)
        moved.update(id=k + 1, image_id=1)
        mosaic_anns.append(moved)
        mapping.append({"id": k + 1, "image_id": ann["image_id"], "small_id": ann["id"],
                        "cut": bool(crossed_x[k] or crossed_y[k]), "split": bool(split_x[k] or split_y[k])})

    name = "mosaic.png" if image_format == "png" else "mosaic.tif"
    buf = io.BytesIO()
    if image_format == "png":
        Image.fromarray(canvas, "RGB").save(buf, format="PNG", compress_level=1)
    else:
        import tifffile

        tifffile.imwrite(buf, canvas, tile=(256, 256), compression="zlib", photometric="rgb")
    del canvas
    image_uri = storage.join(out, name)
    storage.write_bytes(image_uri, buf.getvalue())
    mosaic_coco = {"info": {"description": "maskray mosaic", "seed": seed, "cell": cell, "grid": [rows, cols]},
                   "images": [{"id": 1, "file_name": name, "width": width, "height": height}],
                   "annotations": mosaic_anns, "categories": coco["categories"]}
    ann_uri, map_uri = storage.join(out, "mosaic.json"), storage.join(out, "mapping.json")
    storage.write_bytes(ann_uri, json.dumps(mosaic_coco).encode())
    storage.write_bytes(map_uri, json.dumps({"image": name, "width": width, "height": height,
                                             "tile": tile, "overlap": overlap, "offset": [ox, oy],
                                             "placements": placements, "annotations": mapping}).encode())
    result = Mosaic(image=image_uri, annotations=ann_uri, small_annotations=storage.join(small, "annotations.json"),
                    small_images=storage.join(small, "images"), mapping=map_uri, width=width, height=height,
                    tile=tile, overlap=overlap, instances=len(mosaic_anns),
                    cut=sum(m["cut"] for m in mapping), split=sum(m["split"] for m in mapping),
                    placements=placements)
    log.debug("%s", result)
    return result
