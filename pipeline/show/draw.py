"""PNG overlays of instances (masks, boxes, class names, scores) with torchvision's drawing utilities."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import torch
from torchvision.io import encode_png
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from pipeline.instances import Instances


def label_colors(num_labels: int) -> list[tuple[int, int, int]]:
    """A distinct, stable RGB colour per label 0..num_labels-1 (golden-ratio hues)."""
    colors = []
    for i in range(num_labels):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 1.0)
        colors.append((int(255 * r), int(255 * g), int(255 * b)))
    return colors


def draw_instances(image: torch.Tensor, instances: Instances, label_names: Sequence[str], *,
                   score_thresh: float = 0.5, alpha: float = 0.45, box_width: int = 2) -> torch.Tensor:
    """``image`` (uint8 [3, H, W]) with ``instances`` scoring >= ``score_thresh`` drawn on it.

    ``label_names[i - 1]`` names label ``i``; boxes are captioned "name score".
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
        canvas = draw_segmentation_masks(canvas, kept.masks.bool(), alpha=alpha, colors=colors)
    captions = [
        f"{label_names[label - 1] if 0 < label <= len(label_names) else label} {score:.2f}"
        for label, score in zip(labels, kept.scores.tolist())
    ]
    return draw_bounding_boxes(canvas, kept.boxes, labels=captions, colors=colors, width=box_width)


def to_png(image: torch.Tensor) -> bytes:
    """PNG bytes of a uint8 [3, H, W] image."""
    return encode_png(image.contiguous()).numpy().tobytes()


DISPLAY_LONG_SIDE = 1280  # px: what an overlay is drawn at, whatever the photo's size


def render_overlay(image: torch.Tensor, instances: Instances, label_names: Sequence[str], *,
                   score_thresh: float = 0.5, long_side: int = DISPLAY_LONG_SIDE, alpha: float = 0.45) -> torch.Tensor:
    """A readable overlay: ``image`` (uint8 ``[3,H,W]``) scaled so its longer side is
    ``long_side`` px (a 64-px image is upscaled, a 12-MP photo shrunk), masks and boxes of the
    instances scoring >= ``score_thresh`` drawn at that size, and captions ("name score") in a
    scalable font ~2.2% of the longer side high, white on the instance's colour, kept inside the
    frame. Returns uint8 ``[3, h, w]``."""
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
        masks = torch.stack([F.interpolate(m[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5
                             for m in kept.masks])  # one instance at a time: never N full-size float masks
        canvas = draw_segmentation_masks(canvas, masks, alpha=alpha, colors=colors)
    boxes = kept.boxes * scale
    line = max(2, round(long_side / 400))
    canvas = draw_bounding_boxes(canvas, boxes, colors=colors, width=line)
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
