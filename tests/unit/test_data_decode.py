"""pipeline.data.decode decode_image / decode_target (no Ray)."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import format as fmt
from pipeline.data.decode import (INTENSITY_MODES, ImageDecodeError, TargetError, decode_image,
                              decode_target, image_size, load_image)
from pipeline.data.synth import encode_rle
from png_bombs import png_header_only


def _encode(img: Image.Image, fmt_: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt_, **kw)
    return buf.getvalue()


def _rgb(h=6, w=5):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_rgb_png_exact():
    arr = _rgb()
    t = decode_image(_encode(Image.fromarray(arr)))
    assert t.dtype == torch.uint8 and t.shape == (3, 6, 5)
    assert np.array_equal(t.permute(1, 2, 0).numpy(), arr)


def test_gray_rgba_palette():
    gray = _rgb()[:, :, 0]
    t = decode_image(_encode(Image.fromarray(gray, "L")))
    assert t.shape == (3, 6, 5) and all(np.array_equal(t[c].numpy(), gray) for c in range(3))
    rgba = np.concatenate([_rgb(), np.full((6, 5, 1), 7, np.uint8)], axis=2)
    t = decode_image(_encode(Image.fromarray(rgba, "RGBA")))
    assert np.array_equal(t.permute(1, 2, 0).numpy(), rgba[:, :, :3])
    pal = Image.fromarray(_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    t = decode_image(_encode(pal))
    assert np.array_equal(t.permute(1, 2, 0).numpy(), np.asarray(pal.convert("RGB")))


def test_16bit_png_scaled_to_8bit_by_dtype_range_when_asked():
    arr16 = np.array([[0, 257, 65535], [32768, 1000, 65280]], dtype=np.uint16)
    img = Image.fromarray(arr16)  # mode I;16
    data = _encode(img)
    t = decode_image(data, intensity="dtype")
    expected = np.array([[0, 1, 255], [128, 4, 254]], dtype=np.uint8)
    assert t.shape == (3, 2, 3) and np.array_equal(t[0].numpy(), expected)


def _png_16bit(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    h, w = arr.shape[:2]
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def test_16bit_rgb_and_gray_alpha_png():
    rgb = np.zeros((2, 3, 3), np.uint16)
    rgb[..., 0], rgb[..., 2] = 65535, 32768
    t = decode_image(_png_16bit(rgb, color_type=2))
    assert t.shape == (3, 2, 3) and t[:, 1, 2].tolist() == [255, 0, 128]
    gray_alpha = np.zeros((2, 3, 2), np.uint16)
    gray_alpha[..., 0], gray_alpha[..., 1] = 40000, 65535
    t = decode_image(_png_16bit(gray_alpha, color_type=4))
    assert t.shape == (3, 2, 3) and t[:, 0, 0].tolist() == [156, 156, 156]


def test_jpeg_and_cmyk():
    arr = np.full((16, 16, 3), (200, 30, 90), np.uint8)
    t = decode_image(_encode(Image.fromarray(arr), "JPEG", quality=95))
    assert t.shape == (3, 16, 16)
    assert np.abs(t.permute(1, 2, 0).numpy().astype(int) - arr).max() <= 6
    cmyk = Image.fromarray(arr).convert("CMYK")
    t = decode_image(_encode(cmyk, "JPEG", quality=95))
    assert t.shape == (3, 16, 16)


def test_bad_bytes_raise_clear_errors():
    with pytest.raises(ImageDecodeError, match=r"empty image data \(0 bytes\)"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        decode_image(b"hello, this is not an image")
    png = _encode(Image.fromarray(_rgb(64, 64)))
    with pytest.raises(ImageDecodeError, match="corrupt or truncated PNG"):
        decode_image(png[: len(png) // 2])


def test_pixel_limit_refuses_before_decoding():
    huge = png_header_only(10_000, 10_000)
    assert image_size(huge, max_pixels=None) == (10_000, 10_000)
    with pytest.raises(ImageDecodeError, match=r"10000x10000 = 100\.0 MP, over the 50 MP limit"):
        decode_image(huge)
    small = _encode(Image.fromarray(_rgb(40, 40)))
    with pytest.raises(ImageDecodeError, match="over the"):
        decode_image(small, max_pixels=1000)
    assert decode_image(small, max_pixels=None).shape == (3, 40, 40)


def test_decode_target():
    h, w = 8, 10
    m1 = np.zeros((h, w), bool)
    m1[1:4, 2:7] = True
    m2 = np.zeros((h, w), bool)
    m2[5:8, 0:3] = True
    anns = []
    for i, (m, cat, crowd) in enumerate([(m1, 7, False), (m2, 3, True)]):
        rle = encode_rle(m)
        ys, xs = np.nonzero(m)
        anns.append(fmt.make_annotation(
            id=i, category_id=cat, bbox=[xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1],
            area=m.sum(), iscrowd=crowd, size=rle["size"], counts=rle["counts"]))
    t = decode_target(anns, h, w, [3, 7])
    assert t["labels"].tolist() == [2, 1]
    assert t["boxes"].dtype == torch.float32
    assert t["boxes"].tolist() == [[2, 1, 7, 4], [0, 5, 3, 8]]
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (2, h, w)
    assert np.array_equal(t["masks"][0].numpy(), m1) and np.array_equal(t["masks"][1].numpy(), m2)
    assert t["iscrowd"].tolist() == [False, True] and t["area"].tolist() == [15.0, 9.0]
    empty = decode_target([], h, w, [3, 7])
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, h, w)
    assert empty["labels"].dtype == torch.int64
    with pytest.raises(TargetError, match="category_id 7 not in"):
        decode_target(anns, h, w, [3])
    with pytest.raises(TargetError, match="does not match the image"):
        decode_target(anns, h + 1, w, [3, 7])


def _stardist_like_uint16(h=256, w=256) -> np.ndarray:
    """uint16 with values 0-235 like stardist's img2d.tif: dim background, brighter nuclei."""
    rng = np.random.default_rng(3)
    img = rng.normal(20, 4, size=(h, w))
    yy, xx = np.mgrid[:h, :w]
    for _ in range(40):
        cy, cx, r = rng.integers(10, h - 10), rng.integers(10, w - 10), rng.integers(4, 9)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.normal(150, 30)
    return np.clip(img, 0, 235).astype(np.uint16)


def test_real_range_uint16_keeps_its_contrast():
    arr = _stardist_like_uint16()
    assert arr.max() <= 235
    data = _encode(Image.fromarray(arr), "TIFF")
    t = decode_image(data)  # default: per-image percentile scaling
    out = t[0].numpy().astype(float)
    assert t.shape == (3, 256, 256)
    assert out.max() == 255 and out.min() == 0
    nuclei, background = arr > 80, arr < 40
    assert out[nuclei].mean() - out[background].mean() > 100  # nuclei stand out
    # min-max also keeps it; the dtype's range blacks it out (max 1: the bug this replaces)
    assert decode_image(data, intensity="minmax")[0].max() == 255
    assert decode_image(data, intensity="dtype")[0].max() <= 1
    # the same mapping through every decode entry point (train/eval/infer/show call these)
    assert np.array_equal(decode_image(data).numpy(), decode_image(data, intensity="percentile").numpy())


def test_32bit_float_and_int_images_mapped_by_their_range():
    f = np.linspace(-3.0, 5.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    t = decode_image(_encode(Image.fromarray(f, "F"), "TIFF"))
    assert t.min() == 0 and t.max() == 255
    i32 = (np.arange(64 * 64, dtype=np.int32).reshape(64, 64) * 3 + 100000)
    t = decode_image(_encode(Image.fromarray(i32, "I"), "TIFF"), intensity="minmax")
    assert t.min() == 0 and t.max() == 255


def test_8bit_images_unchanged_by_any_intensity_mode():
    arr = _rgb(20, 30)
    arr[0, 0] = (3, 4, 5)  # would move under any rescaling
    data = _encode(Image.fromarray(arr))
    gray = _encode(Image.fromarray(arr[:, :, 1], "L"))
    for mode in INTENSITY_MODES:
        assert np.array_equal(decode_image(data, intensity=mode).permute(1, 2, 0).numpy(), arr)
        assert np.array_equal(decode_image(gray, intensity=mode)[0].numpy(), arr[:, :, 1])
    with pytest.raises(ValueError, match="intensity 'gamma' is not one of percentile, minmax, dtype"):
        decode_image(data, intensity="gamma")


def test_30000_squared_png_bomb_refused_from_header(monkeypatch):
    bomb = png_header_only(30_000, 30_000)  # a few dozen bytes declaring 900 MP
    assert len(bomb) < 100
    from PIL import ImageFile

    def no_decode(self):  # the limit must act before any decode is attempted
        raise AssertionError("decode attempted")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    for call in (decode_image, load_image, image_size):
        with pytest.raises(ImageDecodeError,
                           match=r"image is 30000x30000 = 900\.0 MP, over the 50 MP limit"):
            call(bomb)
    # no limit of ours: Pillow's own bomb check still refuses it (never switched off)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        image_size(bomb, max_pixels=None)
