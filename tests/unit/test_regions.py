"""pipeline.data.regions: regions of tiled TIFFs decoded piecewise, other formats decoded once;
every region equals the same slice of the whole image decoded by pipeline.data.decode."""

import io

import numpy as np
import pytest
import tifffile
from PIL import Image
from png_bombs import png_header_only

from pipeline.data import regions
from pipeline.data.decode import ImageDecodeError, decode_array, to_uint8
from pipeline.data.regions import open_regions

H, W = 300, 500
BOXES = [(0, 0, W, H), (0, 0, 1, 1), (63, 63, 65, 65), (100, 17, 333, 299), (W - 5, H - 7, W, H),
         (64, 0, 128, 64), (10, 250, 490, 300)]


def _rgb(h=H, w=W, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _tiff(arr, **kwargs) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kwargs)
    return buf.getvalue()


def _png(arr, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def _open(data, **kw):
    kw.setdefault("max_region_pixels", None)
    kw.setdefault("max_whole_pixels", regions.DEFAULT_MAX_WHOLE_PIXELS)
    return open_regions(data, **kw)


def _check_all(src, expected):
    assert (src.width, src.height) == (expected.shape[1], expected.shape[0])
    for x0, y0, x1, y1 in BOXES:
        got = src.read(x0, y0, x1, y1)
        assert got.dtype == np.uint8 and got.shape == (y1 - y0, x1 - x0, 3) and got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected[y0:y1, x0:x1], err_msg=str((x0, y0, x1, y1)))


@pytest.mark.parametrize("compression", [None, "zlib", "lzw", "zstd"])
def test_tiled_rgb_tiff_is_region_readable_and_exact(compression):
    arr = _rgb()
    src = _open(_tiff(arr, tile=(64, 64), compression=compression, photometric="rgb"))
    assert src.region_readable
    _check_all(src, arr)


def test_strip_bigtiff_planar_and_rgba_layouts():
    arr = _rgb()
    for data in (_tiff(arr, rowsperstrip=16, bigtiff=True, photometric="rgb"),
                 _tiff(np.ascontiguousarray(arr.transpose(2, 0, 1)), tile=(64, 64),
                       planarconfig="separate", photometric="rgb"),
                 _tiff(np.dstack([arr, np.full((H, W, 1), 7, np.uint8)]), tile=(32, 64),
                       photometric="rgb", extrasamples=["unassalpha"])):
        src = _open(data)
        assert src.region_readable
        _check_all(src, arr)


def test_jpeg_ycbcr_tiles_as_in_pathology_slides():
    yy, xx = np.mgrid[0:H, 0:W]
    arr = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    data = _tiff(arr, tile=(64, 64), compression="jpeg", photometric="rgb")  # stored as YCbCr JPEG
    src = _open(data)
    assert src.region_readable
    _check_all(src, tifffile.imread(io.BytesIO(data)))  # what tifffile's own whole read gives


def test_only_the_tiles_a_region_touches_are_decoded():
    src = _open(_tiff(_rgb(), tile=(64, 64), photometric="rgb"))
    calls = []
    decode = src._decode
    src._decode = lambda data, idx, **kw: (calls.append(idx), decode(data, idx, **kw))[1]
    src.read(70, 70, 120, 120)  # inside tile (row 1, col 1) of 8 columns
    assert calls == [1 * 8 + 1]
    calls.clear()
    src.read(60, 0, 70, 10)  # across columns 0 and 1
    assert sorted(calls) == [0, 1]


def test_gray_16_bit_tiff_uses_one_range_for_the_whole_image():
    rng = np.random.default_rng(1)
    arr = (rng.gamma(2.0, 400.0, size=(H, W)) + np.linspace(0, 3000, W)).astype(np.uint16)
    src = _open(_tiff(arr, tile=(64, 64)))  # 40 tiles <= RANGE_SAMPLE_TILES: every tile sampled
    expected = np.repeat(to_uint8(arr)[:, :, None], 3, axis=2)
    _check_all(src, expected)
    # a 16-bit PNG decoded whole maps the same way as decode_array
    png = _png(arr)
    _check_all(_open(png), decode_array(png))


def test_gray_palette_and_miniswhite_tiffs():
    gray = _rgb()[..., 0]
    _check_all(_open(_tiff(gray, tile=(64, 64))), np.repeat(gray[:, :, None], 3, axis=2))
    inverted = _open(_tiff(gray, tile=(64, 64), photometric="miniswhite"))
    _check_all(inverted, np.repeat(255 - gray[:, :, None], 3, axis=2))
    cmap = np.random.default_rng(2).integers(0, 65536, size=(3, 256)).astype(np.uint16)
    pal = _open(_tiff(gray, tile=(64, 64), photometric="palette", colormap=cmap))
    _check_all(pal, (cmap >> 8).astype(np.uint8).T[gray])


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA"])
def test_png_decoded_whole_matches_decode_array(mode):
    arr = _rgb()
    img = Image.fromarray(arr)
    if mode == "P":
        img = img.quantize(64)
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    src = _open(data)
    assert not src.region_readable
    _check_all(src, decode_array(data))


def test_jpeg_and_stripped_one_segment_tiff_from_a_path(tmp_path):
    arr = _rgb()
    jpg = tmp_path / "photo.jpg"
    Image.fromarray(arr).save(jpg, quality=90)
    _check_all(_open(str(jpg)), decode_array(jpg.read_bytes()))
    tif = tmp_path / "scene.tif"
    tif.write_bytes(_tiff(arr, tile=(64, 64), compression="zlib", photometric="rgb"))
    with _open(str(tif)) as src:
        assert src.region_readable
        _check_all(src, arr)


def test_limits_name_the_file_and_both_limits(tmp_path):
    arr = _rgb()
    png = tmp_path / "big.png"
    png.write_bytes(_png(arr))
    with pytest.raises(ImageDecodeError) as err:
        _open(str(png), max_whole_pixels=100_000, max_region_pixels=20_000)
    text = str(err.value)
    assert "big.png" in text and "max_whole_pixels 0.1 MP" in text and "max_region_pixels 0.02 MP" in text
    assert "\n" not in text
    # a tiled TIFF over the whole-image limit is still readable, region by region
    tif = tmp_path / "big.tif"
    tif.write_bytes(_tiff(arr, tile=(64, 64), photometric="rgb"))
    src = _open(str(tif), max_whole_pixels=100_000, max_region_pixels=20_000)
    np.testing.assert_array_equal(src.read(0, 0, 100, 200), arr[:200, :100])
    with pytest.raises(ImageDecodeError, match=r"big\.tif: region 200x101 .* over the per-region limit"):
        src.read(0, 0, 200, 101)
    with pytest.raises(ValueError, match="outside"):
        src.read(0, 0, W + 1, 10)


def test_junk_and_bombs_are_refused_with_one_line(tmp_path):
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        _open(b"II*\x00 this is no tiff at all")
    with pytest.raises(ImageDecodeError, match="empty image data"):
        _open(b"")
    # a PNG header claiming 100k x 100k: refused from its header, nothing decoded; with no whole
    # limit it still fails as truncated data, not as a 40 GB allocation
    bomb = png_header_only(100_000, 100_000)
    with pytest.raises(ImageDecodeError, match=r"<\d+ bytes>: image is 100000x100000 = 10000.0 MP"):
        _open(bomb)
