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
