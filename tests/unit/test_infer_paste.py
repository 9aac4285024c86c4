"""pipeline.infer.paste: per-instance paste + RLE equals torchvision's full-size paste + pycocotools."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from pipeline.infer.paste import crop_rle_counts, encode_instance_masks
from pipeline.results import to_result_instances


def _reference(masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], inclusive: bool = False) -> list[bytes]:
    out = []
    for i in range(len(boxes)):  # one at a time: a 12-MP float mask is 48 MB
        pasted = paste_masks_in_image(masks[i:i + 1], boxes[i:i + 1], size)[0, 0]
        binary = (pasted >= 0.5) if inclusive else (pasted > 0.5)
        out.append(mask_utils.encode(np.asfortranarray(binary.numpy().astype(np.uint8)))["counts"])
    return out


def _instances(n: int, size: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, w = size
    wh = torch.rand(n, 2, generator=g) * torch.tensor([900.0, 700.0]) + 30
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w + 10.0, h + 10.0]) - 20  # some cross the border
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0] = torch.tensor([0.0, 0.0, w - 1.0, h - 1.0])  # the whole image
    boxes[1] = torch.tensor([w - 3.0, h - 3.0, w + 50.0, h + 40.0])  # a corner sliver
    boxes[2] = torch.tensor([w - 1.0, 5.0, w - 1.0, 60.0])  # zero width on the right edge
    masks = torch.rand(n, 1, 28, 28, generator=g)
    masks[3] = 1.0  # foreground up to the bottom/right edges of its box
    masks[4] = 0.0  # empty
    return masks, boxes


def test_equal_to_torchvision_on_a_12mp_image():
    size = (3000, 4000)
    h, w = size
    masks, boxes = _instances(24, size)
    ours, areas = encode_instance_masks(masks, boxes, size)
    assert ours == _reference(masks, boxes, size)
    assert areas[4] == 0 and areas[0] > 0
    decoded = mask_utils.decode({"size": list(size), "counts": ours[1]})
    assert decoded.shape == size and decoded[:-3].sum() == 0
    # A box wholly outside (torchvision's paste raises there) is an empty mask, not an error.
    outside, area = encode_instance_masks(masks[:1], torch.tensor([[w + 10.0, 5.0, w + 90.0, 60.0]]), size)
    assert area == [0] and mask_utils.decode({"size": list(size), "counts": outside[0]}).sum() == 0


def test_inclusive_threshold_matches_pseudo_labels_rule():
    size = (97, 130)
    masks, boxes = _instances(12, size, seed=3)
    masks[5] = 0.5  # exactly at the threshold: only the inclusive rule keeps it
    ours, areas = encode_instance_masks(masks, boxes, size, inclusive=True)
    assert ours == _reference(masks, boxes, size, inclusive=True)


@pytest.mark.parametrize("seed", range(20))
def test_crop_rle_counts_against_full_mask(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(1, 12)), int(rng.integers(1, 12))
    ch, cw = int(rng.integers(0, h + 1)), int(rng.integers(0, w + 1))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = rng.random((ch, cw)) > 0.5
    full = np.zeros((h, w), np.uint8)
    full[y0:y0 + ch, x0:x0 + cw] = crop
    expected = mask_utils.encode(np.asfortranarray(full))["counts"]
    counts = crop_rle_counts(crop, y0, x0, (h, w))
    assert sum(counts) == h * w
    assert mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)["counts"] == expected


def test_result_instances_carry_categories_and_xywh():
    size = (60, 80)
    masks, boxes = _instances(6, size, seed=1)
    out = to_result_instances(boxes.numpy(), [1, 2, 1, 2, 1, 2], np.linspace(0.9, 0.4, 6), masks.numpy(),
                              60, 80, [7, 9])
    assert [o["category_id"] for o in out] == [7, 9, 7, 9, 7, 9]
    assert out[0]["bbox"] == pytest.approx([0, 0, 79, 59])
    assert [o["segmentation"]["counts"] for o in out] == _reference(masks, boxes, size)
    with pytest.raises(Exception, match="label 3"):
        to_result_instances(boxes[:1].numpy(), [3], [0.5], masks[:1].numpy(), 60, 80, [7, 9])
