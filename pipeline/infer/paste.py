"""Per-instance mask paste + COCO RLE in bounded memory.

torchvision's ``paste_masks_in_image`` builds one full-size float mask per detection
(100 detections on a 12-MP photo: 4.8 GB) and pycocotools then encodes a full-size uint8 copy
of all of them. Here each instance is pasted only over its own (expanded, clipped) box, binarized
there, and its full-image column-major RLE is built from that crop's runs: memory is one box
region at a time, and the result is bit-for-bit the RLE of torchvision's pasted mask
(``tests/unit/test_infer_paste.py`` checks equality on a 4000x3000 image).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from model.errors import MaskrayError

MASK_THRESHOLD = 0.5  # the same rule as pipeline.instances: probability > 0.5 is foreground


def paste_regions(masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], padding: int = 1):
    """Yield ``(y0, x0, region)`` per instance: ``region`` float ``[y1-y0, x1-x0]`` is exactly
    ``paste_masks_in_image(masks, boxes, image_size)[i, 0, y0:y1, x0:x1]`` and that mask is zero
    outside it. ``masks`` float ``[N,1,M,M]`` (or ``[N,M,M]``) probabilities, ``boxes`` float
    ``[N,4]`` xyxy pixels in the image frame, ``image_size`` ``(H, W)``."""
    from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

    if masks.dim() == 3:
        masks = masks[:, None]
    if masks.shape[0] != boxes.shape[0]:
        raise MaskrayError(f"{masks.shape[0]} masks but {boxes.shape[0]} boxes")
    im_h, im_w = int(image_size[0]), int(image_size[1])
    padded, scale = expand_masks(masks.float(), padding=padding)
    ints = expand_boxes(boxes.float(), scale).to(dtype=torch.int64).tolist()
    for mask, (bx0, by0, bx1, by1) in zip(padded, ints):
        w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
        x0, x1 = max(bx0, 0), min(bx1 + 1, im_w)
        y0, y1 = max(by0, 0), min(by1 + 1, im_h)
        if x1 <= x0 or y1 <= y0:
            yield 0, 0, mask.new_zeros((0, 0))
            continue
        # Interpolating to the whole (h, w) box then cropping keeps torchvision's exact values;
        # the box is at most the image plus the expansion margin, so one box at a time is bounded.
        resized = F.interpolate(mask[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        yield y0, x0, resized[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]


def crop_rle_counts(crop: np.ndarray, y0: int, x0: int, image_size: tuple[int, int]) -> list[int]:
    """Uncompressed COCO RLE counts (column-major, first run = zeros) of an ``(H, W)`` binary
    image that is zero except ``crop`` (bool ``[h, w]``) placed at row ``y0``, column ``x0``."""
    im_h, im_w = int(image_size[0]), int(image_size[1])
    h, w = crop.shape
    total = im_h * im_w
    if h == 0 or w == 0:
        return [total]
    # Column-major over the crop only, each column framed by a zero above and below, so every
    # foreground run starts and ends inside its column: O(crop) work, whatever the image size.
    framed = np.zeros((w, h + 2), dtype=np.int8)
    framed[:, 1:h + 1] = crop.T
    step = np.diff(framed.ravel())
    starts = np.flatnonzero(step == 1) + 1  # flat index of a run's first pixel
    ends = np.flatnonzero(step == -1) + 1  # flat index just past a run's last pixel
    if starts.size == 0:
        return [total]
    # Flat index q -> column q // (h+2), crop row q % (h+2) - 1 -> full-image column-major index.
    def full(q: np.ndarray) -> np.ndarray:
        return (x0 + q // (h + 2)) * im_h + y0 + q % (h + 2) - 1

    first, past = full(starts), full(ends)
    # A run reaching the image's bottom row continues into the next column's run from row 0.
    keep_end = np.ones(first.size, dtype=bool)
    keep_start = np.ones(first.size, dtype=bool)
    joined = past[:-1] == first[1:]
    keep_end[:-1] &= ~joined
    keep_start[1:] &= ~joined
    edges = np.empty(2 * int(keep_start.sum()), dtype=np.int64)
    edges[0::2] = first[keep_start]
    edges[1::2] = past[keep_end]
    bounds = [0, *edges.tolist()]
    if bounds[-1] != total:
        bounds.append(total)
    return np.diff(np.asarray(bounds, dtype=np.int64)).tolist()


def encode_instance_masks(masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], *,
                          threshold: float = MASK_THRESHOLD, inclusive: bool = False) -> tuple[list[bytes], list[int]]:
    """Compressed COCO RLE ``counts`` (bytes) and areas (pixels) of every instance pasted at
    ``image_size`` and binarized (``> threshold``, or ``>= threshold`` with ``inclusive``), one
    instance at a time. Equal to pycocotools ``encode`` of torchvision's ``paste_masks_in_image``."""
    im_h, im_w = int(image_size[0]), int(image_size[1])
    counts_out, areas = [], []
    for y0, x0, region in paste_regions(masks.detach().cpu(), boxes.detach().cpu(), (im_h, im_w)):
        crop = (region >= threshold if inclusive else region > threshold).numpy()
        counts = crop_rle_counts(crop, y0, x0, (im_h, im_w))
        rle = mask_utils.frPyObjects({"size": [im_h, im_w], "counts": counts}, im_h, im_w)
        counts_out.append(bytes(rle["counts"]))
        areas.append(int(crop.sum()))
    return counts_out, areas

