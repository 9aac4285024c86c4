"""Reading rectangular regions of images of any size in bounded memory.

:func:`open_regions` opens an image (local path, ``s3://`` URI or encoded bytes) and returns a
:class:`RegionSource`: ``width``, ``height`` and ``read(x0, y0, x1, y1)`` -> ``uint8 [y1-y0, x1-x0, 3]``
RGB, in the stored pixel grid (EXIF orientation is not applied; ``orientation`` tells it, as
:func:`pipeline.data.decode.decode_array_oriented` does).

Two kinds of files:

- **Region-readable**: TIFF and BigTIFF whose tiles (or strips) are small (at most
  :data:`MAX_SEGMENT_PIXELS` each): read with tifffile, decoding only the TIFF tiles a region
  touches (the page's ``dataoffsets``/``databytecounts`` and its ``decode``; ranged reads from a
  file or an S3 object). Memory is the region plus the tiles that cover it, whatever the image
  size. ``max_region_pixels`` limits each region.
- **Decoded whole** (PNG, JPEG, WebP, BMP..., and TIFFs tifffile cannot decode piecewise): decoded
  once when opened, kept in Pillow's native mode (1 byte per pixel for gray, 4 for RGB), and each
  region is cropped from it and converted then, so there is no second full-size copy.
  ``max_whole_pixels`` limits the whole image (checked on the header, before decoding), and
  ``max_region_pixels`` each region.

Images of more than 8 bits per sample (16/32-bit integer, float) are mapped to ``uint8`` with one
range per image (:func:`pipeline.data.decode.intensity_range` of the ``intensity`` mode), so that
the tiles of one image agree: a decoded-whole image's range comes from all its pixels (exact
histogram for 16 bits), a region-readable one's from up to :data:`RANGE_SAMPLE_TILES` of its
tiles spread evenly over the image (deterministic: every process reading the file gets the same
mapping).

An over-limit image or region raises :class:`pipeline.data.decode.ImageDecodeError` with one line
naming the file and both limits.
"""

from __future__ import annotations

import io
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.data.decode import (DEFAULT_INTENSITY, ImageDecodeError, check_intensity,
                                  image_orientation, intensity_range, load_image,
                                  scale_to_uint8)

DEFAULT_MAX_WHOLE_PIXELS = 1_000_000_000  # formats decoded whole: ~1 GP (4 GB as Pillow RGB)
MAX_SEGMENT_PIXELS = 16 * 1024 * 1024  # a TIFF tile/strip larger than this is not region-readable
RANGE_SAMPLE_TILES = 64  # tiles sampled for the intensity range of a >8-bit tiled image
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_PHOTOMETRIC = {0: "miniswhite", 1: "minisblack", 2: "rgb", 3: "palette"}
_JPEG_COMPRESSIONS = (6, 7, 34892)  # JPEG tiles in YCbCr (pathology slides): the codec gives RGB


def _photometric(page: Any) -> str | None:
    value = int(page.photometric)
    if value == 6 and int(page.compression) in _JPEG_COMPRESSIONS:
        return "rgb"
    return _PHOTOMETRIC.get(value)


def _name(data: bytes | str) -> str:
    return data if isinstance(data, str) else f"<{len(data)} bytes>"


def _limit_text(max_region_pixels: int | None, max_whole_pixels: int | None) -> str:
    def mp(v: int | None) -> str:
        return "none" if v is None else f"{v / 1e6:g} MP"
    return f"max_region_pixels {mp(max_region_pixels)}, max_whole_pixels {mp(max_whole_pixels)}"


class RegionSource:
    """An opened image: ``width``, ``height`` (pixels), ``orientation`` (EXIF 1..8, not applied),
    ``region_readable`` (True when regions are decoded piecewise) and :meth:`read`.

    Safe to read from several threads (reads are serialised). Use as a context manager or call
    :meth:`close` to release the file.
    """

    width: int
    height: int
    orientation: int = 1
    region_readable: bool = False

    def __init__(self, name: str, max_region_pixels: int | None, max_whole_pixels: int | None):
        self.name = name
        self.max_region_pixels = max_region_pixels
        self.max_whole_pixels = max_whole_pixels
        self._lock = threading.Lock()

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Pixels ``[y0, y1) x [x0, x1)`` as ``uint8 [y1-y0, x1-x0, 3]`` RGB (C-contiguous).

        The region must lie inside the image and hold at most ``max_region_pixels`` pixels."""
        x0, y0, x1, y1 = int(x0), int(y0), int(x1), int(y1)
        if not (0 <= x0 < x1 <= self.width and 0 <= y0 < y1 <= self.height):
            raise ValueError(f"{self.name}: region x {x0}..{x1}, y {y0}..{y1} is empty or outside "
                             f"the {self.width}x{self.height} image")
        pixels = (x1 - x0) * (y1 - y0)
        if self.max_region_pixels is not None and pixels > self.max_region_pixels:
            raise ImageDecodeError(f"{self.name}: region {x1 - x0}x{y1 - y0} = {pixels / 1e6:.1f} MP "
                                   f"is over the per-region limit "
                                   f"({_limit_text(self.max_region_pixels, self.max_whole_pixels)})")
        with self._lock:
            out = self._read(x0, y0, x1, y1)
        return np.ascontiguousarray(out)

    def _read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file (reads after this fail)."""

    def __enter__(self) -> RegionSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "region-readable" if self.region_readable else "decoded whole"
        return f"{type(self).__name__}({self.name!r}, {self.width}x{self.height}, {kind})"


# ---------------------------------------------------------------------------------------------
# Decoded whole (Pillow)

_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class _WholeImage(RegionSource):
    """A Pillow image decoded once, kept in its own mode; regions cropped and converted on read."""

    def __init__(self, name: str, data: bytes, *, max_region_pixels: int | None,
                 max_whole_pixels: int | None, intensity: str):
        super().__init__(name, max_region_pixels, max_whole_pixels)
        from pipeline.data.decode import open_image

        # our own check, with its own message; Pillow's bomb check off (the limit is ours)
        img = open_image(data, max_pixels=1 << 62)
        self.width, self.height = img.size
        if max_whole_pixels is not None and self.width * self.height > max_whole_pixels:
            raise ImageDecodeError(
                f"{name}: image is {self.width}x{self.height} = {self.width * self.height / 1e6:.1f} MP, "
                f"over the whole-image limit for a format decoded whole ({img.format or 'image'}; "
                f"{_limit_text(max_region_pixels, max_whole_pixels)}), refused before decoding")
        del img
        img = load_image(data, max_pixels=1 << 62)
        self.orientation = image_orientation(img)
        if img.mode in ("P", "PA") and "transparency" in img.info:
            img = img.convert("RGBA")
        self._img = img
        self._range = None
        if img.mode in _HIGH_BIT_MODES:
            self._range = intensity_range(self._band_values(), intensity) \
                if intensity != "dtype" or img.mode == "F" else intensity_range(
                    np.zeros(1, np.uint16), intensity)

    def _band_values(self) -> np.ndarray:
        """The image's values for its intensity range: a view for 16-bit modes (Pillow's buffer
        is read through ``np.asarray`` of the image, one copy at the native depth)."""
        arr = np.asarray(self._img)
        if arr.ndim != 2:
            raise ImageDecodeError(f"{self.name}: unsupported image layout {arr.shape} for mode "
                                   f"{self._img.mode}")
        return arr

    def _read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        crop = self._img.crop((x0, y0, x1, y1))
        if self._img.mode in _HIGH_BIT_MODES:
            gray = scale_to_uint8(np.asarray(crop), self._range)
            return np.repeat(gray[:, :, None], 3, axis=2)
        if crop.mode != "RGB":
            crop = crop.convert("RGB")
        return np.asarray(crop, dtype=np.uint8)

    def close(self) -> None:
        self._img = None


# ---------------------------------------------------------------------------------------------
# Region-readable TIFF (tifffile)


@dataclass(frozen=True)
class _Layout:
    """How a TIFF page's pixels are cut into segments (tiles or strips)."""

    seg_h: int  # segment rows
    seg_w: int  # segment columns
    rows: int  # segments down the image
    cols: int  # segments across
    planes: int  # separate sample planes (planarconfig 2), else 1


class _TiffRegions(RegionSource):
    """Regions of a tiled (or finely stripped) TIFF page, decoding only the segments they touch."""

    region_readable = True

    def __init__(self, name: str, tif: Any, handle: Any, *, max_region_pixels: int | None,
                 max_whole_pixels: int | None, intensity: str):
        super().__init__(name, max_region_pixels, max_whole_pixels)
        self._tif = tif
        self._handle = handle  # the file object we opened (tifffile leaves it open), or None
        page = tif.pages[0]
        self._page = page
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        if page.is_tiled:
            seg_h, seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            seg_h, seg_w = min(int(page.rowsperstrip), self.height), self.width
        planes = int(page.samplesperpixel) if page.planarconfig == 2 else 1
        self._layout = _Layout(seg_h, seg_w, math.ceil(self.height / seg_h),
                               math.ceil(self.width / seg_w), planes)
        self._samples = int(page.samplesperpixel)
        self._photometric = _photometric(page)
        self._colormap = None
        if self._photometric == "palette":
            cmap = np.asarray(page.colormap)  # [3, 2**bits], 16-bit values
            self._colormap = (cmap >> 8).astype(np.uint8).T if cmap.max() > 255 else cmap.astype(np.uint8).T
        self._dtype = np.dtype(page.dtype)
        self._decode = page.decode
        self._decode_args = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader}
        self._range = None
        if self._needs_mapping():
            self._range = self._sampled_range(intensity)

    # -- layout -------------------------------------------------------------------------------

    def _needs_mapping(self) -> bool:
        return self._dtype != np.uint8 and self._photometric != "palette"

    def _segment_ids(self, row: int, col: int) -> list[int]:
        lay = self._layout
        flat = row * lay.cols + col
        return [p * lay.rows * lay.cols + flat for p in range(lay.planes)]

    def _raw(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Native-dtype samples ``[y1-y0, x1-x0, S]`` of the region, from the segments it touches."""
        lay = self._layout
        out = np.zeros((y1 - y0, x1 - x0, self._samples), dtype=self._dtype)
        wanted: list[tuple[int, int, int, int]] = []  # (segment index, plane, row, col)
        for row in range(y0 // lay.seg_h, (y1 - 1) // lay.seg_h + 1):
            for col in range(x0 // lay.seg_w, (x1 - 1) // lay.seg_w + 1):
                for plane, idx in enumerate(self._segment_ids(row, col)):
                    wanted.append((idx, plane, row, col))
        page, fh = self._page, self._tif.filehandle
        offsets = [page.dataoffsets[w[0]] for w in wanted]
        counts = [page.databytecounts[w[0]] for w in wanted]
        where = {w[0]: w for w in wanted}
        for data, idx in fh.read_segments(offsets, counts, indices=[w[0] for w in wanted],
                                          sort=True):
            _, plane, row, col = where[idx]
            if data is None:  # an absent (sparse) tile reads as zeros
                continue
            try:
                seg = self._decode(data, idx, **self._decode_args)[0]
            except Exception as exc:  # noqa: BLE001 - codecs raise several types
                raise ImageDecodeError(f"{self.name}: cannot decode TIFF segment {idx} "
                                       f"({type(exc).__name__}: {exc})") from None
            seg = seg.reshape(seg.shape[-3], seg.shape[-2], seg.shape[-1])  # [h, w, s]
            sy, sx = row * lay.seg_h, col * lay.seg_w
            ay0, ay1 = max(y0, sy), min(y1, sy + seg.shape[0])
            ax0, ax1 = max(x0, sx), min(x1, sx + seg.shape[1])
            if ay1 <= ay0 or ax1 <= ax0:
                continue
            block = seg[ay0 - sy:ay1 - sy, ax0 - sx:ax1 - sx]
            if lay.planes > 1:
                out[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0, plane] = block[..., 0]
            else:
                out[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0] = block
        return out

    def _sampled_range(self, intensity: str) -> tuple[float, float] | None:
        """One intensity range for the whole image, from up to :data:`RANGE_SAMPLE_TILES`
        segments spread evenly over it (colour samples only, alpha left out)."""
        lay = self._layout
        total = lay.rows * lay.cols
        picks = np.unique(np.linspace(0, total - 1, min(total, RANGE_SAMPLE_TILES)).round().astype(int))
        parts = []
        for flat in picks.tolist():
            row, col = divmod(flat, lay.cols)
            y0, x0 = row * lay.seg_h, col * lay.seg_w
            y1, x1 = min(y0 + lay.seg_h, self.height), min(x0 + lay.seg_w, self.width)
            parts.append(self._colour_samples(self._raw(x0, y0, x1, y1)).reshape(-1))
        return intensity_range(np.concatenate(parts), intensity)

    def _colour_samples(self, raw: np.ndarray) -> np.ndarray:
        """``[h, w, 1 or 3]``: gray (gray+alpha's gray) or RGB (RGBA's RGB)."""
        if self._photometric == "rgb":
            return raw[..., :3]
        return raw[..., :1]

    def _read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        raw = self._raw(x0, y0, x1, y1)
        if self._photometric == "palette":
            return self._colormap[raw[..., 0].astype(np.intp)]
        samples = self._colour_samples(raw)
        if self._dtype != np.uint8:
            samples = scale_to_uint8(samples, self._range)
        if self._photometric == "miniswhite":
            samples = 255 - samples
        if samples.shape[-1] == 1:
            samples = np.repeat(samples, 3, axis=2)
        return samples

    def close(self) -> None:
        self._tif.close()
        if self._handle is not None:
            self._handle.close()


def _tiff_region_readable(page: Any) -> str | None:
    """None when ``page`` can be read region by region, else why not (then it is decoded whole)."""
    photometric = _photometric(page)
    if photometric is None:
        return f"photometric {page.photometric!s}"
    if int(page.samplesperpixel) not in (1, 2, 3, 4) or (photometric == "rgb" and int(page.samplesperpixel) < 3):
        return f"{page.samplesperpixel} samples per pixel"
    if page.imagedepth > 1 or page.dtype is None:
        return "volumetric or unsupported sample type"
    seg = page.tilelength * page.tilewidth if page.is_tiled else page.rowsperstrip * page.imagewidth
    if seg > MAX_SEGMENT_PIXELS:
        return f"segments of {seg / 1e6:.0f} MP"
    try:
        page.decode  # noqa: B018 - raises for codecs that are not installed
    except Exception as exc:  # noqa: BLE001
        return str(exc)
    if not len(page.dataoffsets):
        return "no image data"
    return None


def _open_tiff(name: str, handle: Any, owned: Any, **kwargs: Any) -> RegionSource | None:
    """A :class:`_TiffRegions` for a region-readable TIFF (it closes ``owned`` when closed), None
    for one to decode whole."""
    import tifffile

    tif = None
    try:
        tif = tifffile.TiffFile(handle)
        page = tif.pages[0]
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads: Pillow gets its turn
        if tif is not None:
            tif.close()
        return None
    try:
        if _tiff_region_readable(page) is None:
            return _TiffRegions(name, tif, owned, **kwargs)
    except Exception:
        tif.close()
        raise
    tif.close()
    return None


# ---------------------------------------------------------------------------------------------
# Opening


def _is_tiff(head: bytes) -> bool:
    return bytes(head[:4]) in _TIFF_MAGIC


def open_regions(data: bytes | str, *, max_region_pixels: int | None, max_whole_pixels: int | None,
                 intensity: str = DEFAULT_INTENSITY) -> RegionSource:
    """Open an image to read its regions (see the module doc).

    ``data``: encoded bytes, a local path or an ``s3://`` URI (a TIFF there is read with ranged
    reads; other formats are fetched whole). ``max_region_pixels`` limits every region read
    (None: no limit); ``max_whole_pixels`` limits images that must be decoded whole (None: no
    limit; :data:`DEFAULT_MAX_WHOLE_PIXELS` is the usual setting). ``intensity`` maps images of
    more than 8 bits (:data:`pipeline.data.decode.INTENSITY_MODES`).

    Raises :class:`pipeline.data.decode.ImageDecodeError` (one line naming the file) for
    unreadable data and over-limit images, :class:`pipeline.storage.StorageError` for a
    missing or unreachable file.
    """
    check_intensity(intensity)
    name = _name(data)
    kwargs = {"max_region_pixels": max_region_pixels, "max_whole_pixels": max_whole_pixels,
              "intensity": intensity}
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
        if _is_tiff(data[:4]):
            source = _open_tiff(name, io.BytesIO(data), None, **kwargs)
            if source is not None:
                return source
        return _whole(name, data, **kwargs)
    fs, path = storage.resolve(data)
    try:
        handle = fs.open_input_file(path)  # random access: ranged GETs on S3
    except OSError as exc:
        raise storage.storage_error(data, exc) from exc
    try:
        head = handle.read(4)
        handle.seek(0)
        if _is_tiff(head):
            source = _open_tiff(name, handle, handle, **kwargs)
            if source is not None:
                return source  # owns the handle now
            handle.seek(0)
        encoded = handle.read()
    except OSError as exc:
        handle.close()
        raise storage.storage_error(data, exc) from exc
    handle.close()
    return _whole(name, encoded, **kwargs)


def _whole(name: str, data: bytes, **kwargs: Any) -> RegionSource:
    try:
        return _WholeImage(name, data, **kwargs)
    except ImageDecodeError as exc:
        text = str(exc)
        raise ImageDecodeError(text if text.startswith(name) else f"{name}: {text}") from None
