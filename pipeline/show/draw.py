"""PNG overlays of instances (masks, boxes, keypoints and skeletons, class names, scores) with
torchvision's drawing utilities.

Keypoints: an instance's ``keypoints`` ``[K, 3]`` (``x, y, score`` of a prediction, or ``x, y, v``
of ground truth) are drawn where the third value is at least ``kp_thresh`` (default
:data:`pipeline.results.KEYPOINT_VISIBLE_SCORE`, 2: the heatmap logit Detectron draws at, and
ground truth's ``v = 2``, visible), as dots in the instance's colour ringed in black, joined by
its category's ``skeleton`` (COCO's 1-based pairs) in that colour where both ends are drawn.
Dot radius and line width grow with the size drawn at, so they stay readable on a 12-MP photo.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import torch
from torchvision.io import encode_png
from torchvision.utils import draw_bounding_boxes

from pipeline.instances import Instances
from pipeline.results import KEYPOINT_VISIBLE_SCORE


def label_colors(num_labels: int) -> list[tuple[int, int, int]]:
    """A distinct, stable RGB colour per label 0..num_labels-1 (golden-ratio hues)."""
    colors = []
    for i in range(num_labels):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 1.0)
        colors.append((int(255 * r), int(255 * g), int(255 * b)))
    return colors


def keypoint_sizes(long_side: int) -> tuple[int, int]:
    """``(dot radius, skeleton line width)`` in pixels for a picture whose longer side is
    ``long_side`` px: 5 and 3 at 1280, 16 and 10 at 4000."""
    return max(2, round(long_side / 250)), max(1, round(long_side / 400))


def draw_instance_keypoints(canvas: torch.Tensor, keypoints: torch.Tensor, colors: Sequence[tuple[int, int, int]],
                            skeletons: Sequence[Sequence[Sequence[int]] | None], *, radius: int, width: int,
                            kp_thresh: float = KEYPOINT_VISIBLE_SCORE) -> torch.Tensor:
    """``canvas`` (uint8 [3, H, W]) with each instance's keypoints (``keypoints`` float [N, K, 3]
    ``x, y, score|v`` in canvas pixels) whose third value is >= ``kp_thresh``: skeleton lines
    (``skeletons[i]``: 1-based pairs, or None) in ``colors[i]``, then dots ringed in black.

    Drawn with PIL in one pass (``torchvision.utils.draw_keypoints`` draws every skeleton line
    white, whatever its ``colors``)."""
    import numpy as np
    from PIL import Image, ImageDraw

    picture = Image.fromarray(canvas.permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(picture)
    ring = radius + max(1, width // 2)
    for kp, color, skeleton in zip(keypoints.tolist(), colors, skeletons):
        shown = [score >= kp_thresh for _, _, score in kp]
        for a, b in skeleton or ():
            i, j = int(a) - 1, int(b) - 1
            if 0 <= i < len(kp) and 0 <= j < len(kp) and shown[i] and shown[j]:
                draw.line([(kp[i][0], kp[i][1]), (kp[j][0], kp[j][1])], fill=tuple(color), width=width)
        for (x, y, _), on in zip(kp, shown):
            if on:
                draw.ellipse([x - ring, y - ring, x + ring, y + ring], fill=(0, 0, 0))
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=tuple(color))
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).contiguous()


def draw_masks(image: torch.Tensor, masks: torch.Tensor, colors: Sequence[tuple[int, int, int]], *,
               alpha: float = 0.45) -> torch.Tensor:
    """torchvision's ``draw_segmentation_masks`` (uint8 ``image`` [3, H, W], bool ``masks`` [N, H, W],
    one colour each; pixels of two or more masks black; blended by ``alpha``), the same pixels
    (``tests/unit/test_show_large.py``) one mask at a time: torchvision's ``masks.sum(0)`` promotes
    the whole stack to int64 (2.5 GB for 200 masks at 1250x1250, an overview of a huge scene)."""
    if masks.shape[0] == 0:
        return image
    drawn = image.detach().clone()
    count = torch.zeros(tuple(image.shape[1:]), dtype=torch.int32)
    for mask, color in zip(masks, colors):
        drawn[:, mask] = torch.tensor(color, dtype=image.dtype)[:, None]
        count += mask
    drawn[:, count > 1] = 0
    return (image * (1 - alpha) + drawn * alpha).to(image.dtype)


def draw_instances(image: torch.Tensor, instances: Instances, label_names: Sequence[str], *,
                   score_thresh: float = 0.5, alpha: float = 0.45, box_width: int = 2,
                   skeletons: Sequence[Sequence[Sequence[int]] | None] | None = None,
                   kp_thresh: float = KEYPOINT_VISIBLE_SCORE) -> torch.Tensor:
    """``image`` (uint8 [3, H, W]) with ``instances`` scoring >= ``score_thresh`` drawn on it.

    ``label_names[i - 1]`` names label ``i``; boxes are captioned "name score". Keypoints (when
    the instances have them) are drawn at the image's own size (:func:`keypoint_sizes`), joined by
    ``skeletons[i - 1]``, label ``i``'s skeleton (COCO 1-based pairs; None: dots only).
    """
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"draw_instances needs a uint8 [3, H, W] image, got {image.dtype} {tuple(image.shape)}")
    kept = instances.to("cpu").filter(score_thresh)
    canvas = image.cpu()
    if len(kept) == 0:
        return canvas.clone()
    palette = label_colors(len(label_names) + 1)
    labels = kept.labels.tolist()
    colors = [palette[label % len(palette)] for label in labels]
    if kept.masks is not None:
        canvas = draw_masks(canvas, kept.masks.bool(), colors, alpha=alpha)
    captions = [
        f"{label_names[label - 1] if 0 < label <= len(label_names) else label} {score:.2f}"
        for label, score in zip(labels, kept.scores.tolist())
    ]
    canvas = draw_bounding_boxes(canvas, kept.boxes, labels=captions, colors=colors, width=box_width)
    if kept.keypoints is not None:
        radius, width = keypoint_sizes(max(canvas.shape[1], canvas.shape[2]))
        canvas = draw_instance_keypoints(canvas, kept.keypoints, colors, _skeletons_of(labels, skeletons),
                                         radius=radius, width=width, kp_thresh=kp_thresh)
    return canvas


def _skeletons_of(labels: Sequence[int], skeletons: Sequence | None) -> list:
    """Each instance's skeleton: ``skeletons[label - 1]`` (None where not given)."""
    if skeletons is None:
        return [None] * len(labels)
    return [skeletons[label - 1] if 0 < label <= len(skeletons) else None for label in labels]


def to_png(image: torch.Tensor) -> bytes:
    """PNG bytes of a uint8 [3, H, W] image."""
    return encode_png(image.contiguous()).numpy().tobytes()


DISPLAY_LONG_SIDE = 1280  # px: what an overlay is drawn at, whatever the photo's size


def render_overlay(image: torch.Tensor, instances: Instances, label_names: Sequence[str], *,
                   score_thresh: float = 0.5, long_side: int = DISPLAY_LONG_SIDE, alpha: float = 0.45,
                   skeletons: Sequence[Sequence[Sequence[int]] | None] | None = None,
                   kp_thresh: float = KEYPOINT_VISIBLE_SCORE) -> torch.Tensor:
    """A readable overlay: ``image`` (uint8 ``[3,H,W]``) scaled so its longer side is
    ``long_side`` px (a 64-px image is upscaled, a 12-MP photo shrunk), masks, boxes and keypoints
    (with ``skeletons[label - 1]``, see :func:`draw_instances`) of the instances scoring >=
    ``score_thresh`` drawn at that size, and captions ("name score") in a scalable font ~2.2% of
    the longer side high, white on the instance's colour, kept inside the frame. Returns uint8
    ``[3, h, w]``."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image, ImageDraw, ImageFont

    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"render_overlay needs a uint8 [3, H, W] image, got {image.dtype} {tuple(image.shape)}")
    height, width = int(image.shape[1]), int(image.shape[2])
    scale = long_side / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    mode = "nearest" if scale >= 1 else "area"  # crisp pixels when enlarging, no aliasing when shrinking
    canvas = F.interpolate(image[None].float(), size=size, mode=mode)[0].round().clamp(0, 255).to(torch.uint8)
    kept = instances.to("cpu").filter(score_thresh)
    if len(kept) == 0:
        return canvas
    palette = label_colors(len(label_names) + 1)
    labels = kept.labels.tolist()
    colors = [palette[label % len(palette)] for label in labels]
    if kept.masks is not None:
        if tuple(kept.masks.shape[1:]) == size:  # already at the drawn size (pipeline.show.large)
            masks = kept.masks.bool()
        else:
            masks = torch.stack([F.interpolate(m[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5
                                 for m in kept.masks])  # one instance at a time: never N full-size float masks
        canvas = draw_masks(canvas, masks, colors, alpha=alpha)
    boxes = kept.boxes * scale
    line = max(2, round(long_side / 400))
    canvas = draw_bounding_boxes(canvas, boxes, colors=colors, width=line)
    if kept.keypoints is not None:
        keypoints = kept.keypoints.clone()
        keypoints[..., :2] *= scale
        radius, width = keypoint_sizes(long_side)
        canvas = draw_instance_keypoints(canvas, keypoints, colors, _skeletons_of(labels, skeletons),
                                         radius=radius, width=width, kp_thresh=kp_thresh)
    picture = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(12, round(long_side * 0.022)))
    for box, label, score, color in zip(boxes.tolist(), labels, kept.scores.tolist(), colors):
        text = f"{label_names[label - 1] if 0 < label <= len(label_names) else label} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * line, bottom - top + 2 * line
        x = min(max(0, box[0]), size[1] - tw)
        y = box[1] - th if box[1] - th >= 0 else min(box[1], size[0] - th)  # above the box, else inside
        draw.rectangle([x, y, x + tw, y + th], fill=color)
        draw.text((x + line - left, y + line - top), text, font=font, fill=(255, 255, 255),
                  stroke_width=max(1, line // 2), stroke_fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).contiguous()
