"""Instances <-> COCO dicts: RLE encoding, box formats, label/category mapping."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from model.errors import MaskrayError
from pipeline.instances import Instances, decode_mask, encode_masks


def _output(h=40, w=50):
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 1, h, w, generator=g)
    return {
        "boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0], [0.0, 0.0, 50.0, 40.0], [5.5, 6.5, 7.5, 9.0]]),
        "scores": torch.tensor([0.9, 0.5, 0.2]),
        "labels": torch.tensor([1, 2, 1]),
        "masks": probs,
    }


def test_rle_decodes_to_binarized_mask():
    output = _output()
    inst = Instances.from_output(output, (40, 50))
    expected = (output["masks"][:, 0] > 0.5).numpy().astype(np.uint8)
    rles = encode_masks(output["masks"][:, 0])
    assert [r["size"] for r in rles] == [[40, 50]] * 3
    assert all(isinstance(r["counts"], str) for r in rles)
    for rle, exp, m in zip(rles, expected, inst.masks):
        np.testing.assert_array_equal(decode_mask(rle), exp)
        np.testing.assert_array_equal(m.numpy(), exp.astype(bool))
        # pycocotools reads our RLE directly (counts as bytes)
        np.testing.assert_array_equal(mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}), exp)
        assert mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}) == exp.sum()


def test_to_coco_and_back():
    inst = Instances.from_output(_output(), (40, 50))
    coco = inst.to_coco(image_id=17, category_ids=[5, 9])
    assert [r["category_id"] for r in coco] == [5, 9, 5]
    assert coco[0]["bbox"] == [1.0, 2.0, 10.0, 20.0]
    assert coco[0]["image_id"] == 17 and coco[0]["score"] == pytest.approx(0.9)
    back = Instances.from_coco(coco, (40, 50), [5, 9])
    assert torch.equal(back.labels, inst.labels)
    torch.testing.assert_close(back.boxes, inst.boxes)
    torch.testing.assert_close(back.scores, inst.scores)
    assert torch.equal(back.masks, inst.masks)


def test_subset_filter_empty_and_errors():
    inst = Instances.from_output(_output(), (40, 50))
    assert len(inst.filter(0.4)) == 2 and len(inst[0]) == 1
    empty = Instances.empty((8, 9))
    assert empty.to_coco(1, [1]) == [] and empty.masks.shape == (0, 8, 9)
    assert len(Instances.from_coco([], (8, 9), [1])) == 0
    with pytest.raises(MaskrayError, match="label 2 has no category"):
        inst.to_coco(1, [5])
    with pytest.raises(MaskrayError, match="category_id 4"):
        Instances.from_coco([{"image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1]}], (8, 9), [1])
    with pytest.raises(MaskrayError, match="masks must be"):
        Instances((8, 9), torch.zeros(1, 4), torch.zeros(1), torch.ones(1, dtype=torch.int64),
                  torch.zeros(1, 8, 10, dtype=torch.bool))
    boxes_only = Instances.from_output({k: v for k, v in _output().items() if k != "masks"}, (40, 50))
    assert "segmentation" not in boxes_only.to_coco(1, [1, 2])[0]
