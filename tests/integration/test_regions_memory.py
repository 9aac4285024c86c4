"""Huge images read region by region within the issue's memory bounds (peak RSS, VmHWM, of a child
process that opens the file and reads every tile of a 1024-px, 20 %-overlap grid):

- a 20,000 x 20,000 PNG (decoded whole, once): <= 2.5 GB;
- a 40,000 x 40,000 tiled BigTIFF (1.6 GP, 4.8 GB of pixels): <= 1.5 GB.

The files are generated cheaply: the PNG streamed row by row through zlib, the TIFF from a few
pre-compressed tiles repeated (tifffile writes byte segments as they are). A tiled TIFF on a real
S3 server (SeaweedFS) is read with ranged GETs, never fetched whole.
"""

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[2]
TILE = 512


def write_png(path: Path, width: int, height: int) -> None:
    """An RGB8 PNG of simple content (bands of a few distinct rows), streamed through zlib."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    xs = np.arange(width)
    rows = []
    for k in range(16):
        row = np.stack([(xs // 64 + k) % 2 * 160 + 40, np.full(width, k * 15), (xs // 512) % 256], -1)
        rows.append(b"\x00" + row.astype(np.uint8).tobytes())
    comp = zlib.compressobj(1)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        for y in range(height):
            data = comp.compress(rows[(y // 37) % 16])
            if data:
                f.write(chunk(b"IDAT", data))
        f.write(chunk(b"IDAT", comp.flush()) + chunk(b"IEND", b""))


def tile_pixels(k: int) -> np.ndarray:
    """Tile ``k`` of the TIFF's 8 distinct tiles: 32-px blocks, and an object in every other one."""
    yy, xx = np.mgrid[0:TILE, 0:TILE] // 32
    tile = np.stack([(xx + k) % 4 * 60, (yy + 2 * k) % 4 * 60, np.full((TILE, TILE), 30 * k)], -1)
    if k % 2 == 0:
        tile[100:300, 150:400] = (220, 30, 30)
    return tile.astype(np.uint8)


def write_tiled_tiff(path, size: int) -> None:
    """A ``size`` x ``size`` RGB BigTIFF of 512-px zlib tiles: tile ``i`` (row-major) is
    :func:`tile_pixels` ``(i % 8)``, compressed once and written as bytes."""
    encoded = [zlib.compress(tile_pixels(k).tobytes(), 6) for k in range(8)]
    count = (-(-size // TILE)) ** 2
    tifffile.imwrite(path, (encoded[i % 8] for i in range(count)), shape=(size, size, 3), dtype=np.uint8,
                     tile=(TILE, TILE), photometric="rgb", compression="zlib", bigtiff=True)


CHILD = r"""
import json, resource, sys, time
from pipeline.data.regions import open_regions
path, tile, stride = sys.argv[1], 1024, 1024 - 205
t = time.time()
src = open_regions(path, max_region_pixels=tile * tile, max_whole_pixels=1_000_000_000)
opened = time.time() - t
starts = lambda n: sorted(set(list(range(0, n - tile, stride)) + [n - tile]))
reads, checksum = 0, 0
for y in starts(src.height):
    for x in starts(src.width):
        region = src.read(x, y, x + tile, y + tile)
        checksum += int(region[::97, ::89].sum())
        reads += 1
def peak_mb():
    # VmHWM: this process image's own peak; ru_maxrss survives exec, so it can carry the parent's
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_mb": peak_mb(), "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "reads": reads,
                  "open_s": opened, "total_s": time.time() - t, "readable": src.region_readable,
                  "width": src.width, "height": src.height, "checksum": checksum}))
"""


def peak_while_reading(path: Path) -> dict:
    """Peak RSS (MB) and counts of a fresh process reading every region of ``path``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True,
                         env=env, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_20k_png_read_region_by_region_within_2_5_gb(tmp_path):
    path = tmp_path / "scene.png"
    write_png(path, 20_000, 20_000)
    stats = peak_while_reading(path)
    print(f"20000x20000 PNG ({path.stat().st_size / 1e6:.0f} MB file): {stats}")
    assert (stats["width"], stats["height"], stats["readable"]) == (20_000, 20_000, False)
    assert stats["reads"] == 25 * 25
    assert stats["peak_mb"] <= 2500


@pytest.mark.slow
def test_40k_tiled_tiff_read_region_by_region_within_1_5_gb(tmp_path):
    path = tmp_path / "scene.tif"
    write_tiled_tiff(path, 40_000)
    stats = peak_while_reading(path)
    print(f"40000x40000 tiled TIFF ({path.stat().st_size / 1e6:.0f} MB file): {stats}")
    assert (stats["width"], stats["height"], stats["readable"]) == (40_000, 40_000, True)
    assert stats["reads"] == 49 * 49
    assert stats["peak_mb"] <= 1500


def test_tiled_tiff_on_s3_is_read_with_ranged_gets(s3, tmp_path):
    from pipeline import storage
    from pipeline.data.regions import open_regions

    size = 4096
    local = tmp_path / "scene.tif"
    write_tiled_tiff(local, size)
    uri = f"s3://{s3.bucket}/scenes/scene.tif"
    storage.write_bytes(uri, local.read_bytes())
    fs, key = storage.resolve(uri)
    requested = []
    real_open = fs.open_input_file

    class Counting:
        def __init__(self, handle):
            self.handle = handle

        def read(self, n=-1):
            data = self.handle.read(n)
            requested.append(len(data))
            return data

        def readinto(self, buf):
            n = self.handle.readinto(buf)
            requested.append(n)
            return n

        def __getattr__(self, name):
            return getattr(self.handle, name)

    class CountingFs:
        def open_input_file(self, path):
            return Counting(real_open(path))

    import pipeline.data.regions as regions

    original = regions.storage.resolve
    regions.storage.resolve = lambda u: (CountingFs(), key)
    try:
        with open_regions(uri, max_region_pixels=None, max_whole_pixels=None) as src:
            region = src.read(1000, 700, 1600, 1300)
    finally:
        regions.storage.resolve = original
    expected = np.zeros((600, 600, 3), np.uint8)
    cols = size // TILE
    for ty in range(700 // TILE, 1300 // TILE + 1):
        for tx in range(1000 // TILE, 1600 // TILE + 1):
            k = (ty * cols + tx) % 8
            y0, x0 = ty * TILE, tx * TILE
            ys, xs = slice(max(700, y0), min(1300, y0 + TILE)), slice(max(1000, x0), min(1600, x0 + TILE))
            expected[ys.start - 700:ys.stop - 700, xs.start - 1000:xs.stop - 1000] = \
                tile_pixels(k)[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
    np.testing.assert_array_equal(region, expected)
    assert 0 < sum(requested) < local.stat().st_size / 4, (sum(requested), local.stat().st_size)
