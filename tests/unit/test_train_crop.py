"""augment.crop: training on random windows of large images. The stream's decode step
(``DecodeAugment``) must give exactly the window's pixels and the target a reference computes
independently from the full-size masks (crop, visible fraction, boxes of the cropped masks,
keypoints outside set to (0, 0, 0)); the window's target never decodes a mask at full size."""

import io

import numpy as np
import pytest
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.data.decode import decode_target_window, rle_counts, rle_window
from pipeline.train.config import ConfigError, TrainConfig
from pipeline.train.config import load_config
from pipeline.train.data import DecodeAugment, random_window

H, W, K = 230, 310, 2


def _position_image() -> np.ndarray:
    """Pixels that say where they are: R = x % 256, G = y, B = x // 256 (H < 256)."""
    yy, xx = np.mgrid[0:H, 0:W]
    return np.stack([xx % 256, yy, xx // 256], axis=-1).astype(np.uint8)


def _masks(rng) -> list[np.ndarray]:
    masks = []
    for _ in range(14):
        m = np.zeros((H, W), dtype=np.uint8)
        cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        r = rng.uniform(6, 60)
        yy, xx = np.mgrid[0:H, 0:W]
        m[(xx - cx) ** 2 / r ** 2 + (yy - cy) ** 2 / (0.5 * r) ** 2 <= 1] = 1
        if m.sum() >= 4:
            masks.append(m)
    return masks


def _row(encode="png", seed=0):
    rng = np.random.default_rng(seed)
    masks = _masks(rng)
    anns = []
    for i, m in enumerate(masks):
        rle = mask_utils.encode(np.asfortranarray(m))
        ys, xs = np.nonzero(m)
        kps = []
        for _ in range(K):  # one point on the object, one anywhere (labelled or not)
            j = rng.integers(len(xs))
            kps += [float(xs[j]) + 0.5, float(ys[j]) + 0.5, 2]
        kps[3:6] = [rng.uniform(0, W), rng.uniform(0, H), int(rng.integers(0, 3))]
        if kps[5] == 0:
            kps[3:5] = [0.0, 0.0]
        anns.append({"id": i + 1, "category_id": 1 + i % 2, "iscrowd": i == 3,
                     "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                              float(ys.max() - ys.min() + 1)],
                     "area": float(m.sum()), "segmentation": {"size": [H, W], "counts": rle["counts"]},
                     "keypoints": kps, "num_keypoints": 1})
    img = _position_image()
    buf = io.BytesIO()
    if encode == "png":
        Image.fromarray(img).save(buf, format="PNG")
    else:
        tifffile.imwrite(buf, img, tile=(64, 64), photometric="rgb", compression="zlib")
    return {"image_id": 7, "width": W, "height": H, "image": buf.getvalue(), "annotations": anns}, masks


def _reference(row, masks, window, min_visible):
    """The expected training target of ``window``, from the full-size masks."""
    x0, y0, x1, y1 = window
    boxes, labels, crops, kps = [], [], [], []
    for ann, m in zip(row["annotations"], masks):
        crop = m[y0:y1, x0:x1].astype(bool)
        if ann["iscrowd"] or crop.sum() == 0 or crop.sum() < min_visible * m.sum():
            continue
        ys, xs = np.nonzero(crop)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels.append(ann["category_id"])
        crops.append(crop)
        pts = np.asarray(ann["keypoints"], dtype=np.float32).reshape(K, 3)
        for p in pts:
            x, y = p[0] - x0, p[1] - y0
            inside = 0 <= x <= x1 - x0 and 0 <= y <= y1 - y0
            p[:] = (x, y, p[2]) if inside and p[2] > 0 else (0, 0, 0)
        kps.append(pts)
    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
            np.asarray(crops, bool).reshape(-1, y1 - y0, x1 - x0), np.asarray(kps, np.float32).reshape(-1, K, 3))


def _window_of(image: np.ndarray) -> tuple[int, int, int, int]:
    x0 = int(image[0, 0, 0]) + 256 * int(image[2, 0, 0])
    y0 = int(image[1, 0, 0])
    return x0, y0, x0 + image.shape[2], y0 + image.shape[1]


@pytest.mark.parametrize("encode", ["png", "tiff"])
def test_crops_keep_annotations_consistent_with_a_reference(encode):
    row, masks = _row(encode)
    full = _position_image()
    fn = DecodeAugment([1, 2], hflip_prob=0.0, seed=5, num_keypoints=K, crop=128, crop_min_visible=0.3)
    windows, kept = set(), 0
    for _ in range(12):
        (out,) = fn(row)
        image = out["image"]
        assert image.shape == (3, 128, 128)
        window = _window_of(image)
        windows.add(window)
        x0, y0, x1, y1 = window
        np.testing.assert_array_equal(image, full[y0:y1, x0:x1].transpose(2, 0, 1))
        boxes, labels, crops, kps = _reference(row, masks, window, 0.3)
        got_masks = np.unpackbits(out["masks"], axis=-1, count=out["mask_width"]).astype(bool)
        np.testing.assert_array_equal(out["boxes"], boxes)
        np.testing.assert_array_equal(out["labels"], labels)
        np.testing.assert_array_equal(got_masks, crops)
        np.testing.assert_array_equal(out["keypoints"], kps)
        kept += len(labels)
    assert len(windows) >= 10 and kept > 0  # random windows, and instances kept in them


def test_visible_fraction_threshold_and_small_images():
    row, masks = _row()
    window = (100, 50, 228, 178)
    for min_visible in (0.0, 0.3, 0.9, 1.0):
        target = decode_target_window(row["annotations"], H, W, window, [1, 2], K, min_visible)
        boxes, labels, crops, _ = _reference(row, masks, window, min_visible)
        iscrowd = target["iscrowd"].numpy()
        np.testing.assert_array_equal(target["masks"].numpy()[~iscrowd].astype(bool), crops)
        np.testing.assert_array_equal(target["area"].numpy()[~iscrowd], crops.reshape(len(crops), -1).sum(1))
    # an image no larger than the crop goes through the whole-image path unchanged
    plain = DecodeAugment([1, 2], hflip_prob=0.0, num_keypoints=K)
    cropping = DecodeAugment([1, 2], hflip_prob=0.0, num_keypoints=K, crop=512)
    (a,), (b,) = plain(row), cropping(row)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_rle_window_reads_a_window_without_the_full_mask():
    rng = np.random.default_rng(3)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 80, size=2))
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(m))
        assert rle_counts(rle["counts"]).sum() == h * w
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = int(rng.integers(x0 + 1, w + 1)), int(rng.integers(y0 + 1, h + 1))
        crop, area = rle_window(rle["counts"], h, w, (x0, y0, x1, y1))
        np.testing.assert_array_equal(crop, m[y0:y1, x0:x1].astype(bool))
        assert area == m.sum()


def test_random_window_stays_inside():
    import random

    rng = random.Random(0)
    for _ in range(200):
        x0, y0, x1, y1 = random_window(rng, 300, 90, 128)
        assert 0 <= x0 and x1 <= 300 and x1 - x0 == 128 and (y0, y1) == (0, 90)


def test_crop_config_is_validated_and_result_changing(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("data: {train: /d}\naugment: {crop: 512, crop_min_visible: 0.5}\n")
    config = load_config(str(path))
    assert (config.augment.crop, config.augment.crop_min_visible) == (512, 0.5)
    from pipeline.train.config import NON_RESULT_KEYS

    assert not any(k.startswith("augment") for k in NON_RESULT_KEYS)
    with pytest.raises(ConfigError, match=r"augment\.crop: must be 0 \(off\) or a crop side >= 32"):
        load_config(str(path), ["augment.crop=8"])
    with pytest.raises(ConfigError, match=r"augment\.crop_min_visible: 1.5 is outside \[0, 1\]"):
        load_config(str(path), ["augment.crop_min_visible=1.5"])
    assert TrainConfig.from_dict(config.to_dict()) == config
