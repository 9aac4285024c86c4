"""``maskray infer --tile 1024`` end to end over huge images within the issue's memory bounds:

- a 20,000 x 20,000 PNG (decoded whole, once, by its read task): every Ray worker's peak RSS
  <= 2.5 GB;
- a tiled BigTIFF, read region by region: every Ray worker's peak RSS <= 1.5 GB (the issue's
  bound for 40,000 x 40,000). CI runs it at :data:`TIFF_SIDE` = 20,000 (400 MP, 400 parts, ~20 s:
  the suite's 30 minutes); ``MASKRAY_TEST_TIFF_SIDE=40000`` runs the issue's size (1.6 GP, 4.8 GB
  of pixels, 1,600 parts, ~85 s; benchmarks/RESULTS.md). A worker's memory depends on a part,
  not on the image's size;

and in both the driver's RSS grows by less than :data:`DRIVER_GROWTH_MB` (it sees counts only),
and the result is one row for the image, with no error. The PNG runs at the default overlap (0.2:
25 x 25 = 625 one-tile parts), the TIFF at overlap 0 (at 40k: 1,600 parts instead of 2,401, ~85 s
instead of ~140 s on 2 cores; a part's memory does not depend on the overlap). The files are made as
``test_regions_memory`` makes them. The predictor builds no network (:func:`cheap_predictor`):
it makes every tile float and resizes it as the model's input (so the model actor holds what a
real one holds per tile) and reports one small detection per tile, so the parts, their merge and
the results carry real instances.

Measured here (2 quiet cores): PNG 37 s, largest worker 1.9 GB (the read task: Pillow holds
the decoded image as 4 bytes a pixel, 1.6 GB); TIFF at 40k 84 s, largest worker 1.15 GB (the
model actor, torch's libraries included); the driver +150 MB, nearly all in the run's first
seconds.
Before ``pipeline.infer.stages.pixel_lists`` the PNG's read worker reached 3.7 GB: pyarrow kept
every tile it converted from a memoryview (:func:`test_decoded_rows_release_their_pixels`).

Peak RSS is ``VmHWM`` of each process of THIS test's Ray (the driver's descendants whose command
line names a Ray worker), sampled every :data:`SAMPLE_SECONDS` and once more at the end; other
Ray instances on the machine are not counted.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_infer_tiled import tiny_checkpoint
from test_regions_memory import write_png, write_tiled_tiff

from pipeline.infer.config import InferConfig
from pipeline.infer.driver import run_inference
from pipeline.infer.predictor import Predictor
from pipeline.infer.stages import decoded_row, pixel_lists
from pipeline.infer.tiles import TILES_DIR
from pipeline.results import unit_names

TILE = 1024
TIFF_SIDE = int(os.environ.get("MASKRAY_TEST_TIFF_SIDE", "20000"))  # px (see the module docstring)
SAMPLE_SECONDS = 0.2
DRIVER_GROWTH_MB = 300
UNIT = "files-0000000-0000001.parquet"
BOX = 64  # px: the side of each tile's one detection, at the tile's centre


def cheap_predictor() -> type[Predictor]:
    """A Predictor without a network: it reads the checkpoint's config only, makes each image
    float in [0, 1] and resizes it to the model's size (:func:`~pipeline.infer.predictor.resize_for_model`,
    as the real model stage does: every pixel is read), and answers one ``BOX`` x ``BOX`` detection
    at the centre of the image (label 1, a full 28 x 28 mask). Defined in a function so Ray pickles
    it by value."""
    from pipeline.infer.predictor import read_model_config, resize_for_model, to_float

    class Cheap(Predictor):
        def __init__(self, checkpoint_uri: str | None = None, *, batch_size: int = 4, **_ignored) -> None:
            self.config, self.model_id = read_model_config(checkpoint_uri)
            self.batch_size, self.threads, self.amp = batch_size, 0, False
            self.device = torch.device("cpu")
            self.category_ids = list(self.config.category_ids())
            self.sizes = (self.config.min_size, self.config.max_size)

        def unit_predictions(self, images):
            outs = []
            for image in images:
                small = resize_for_model(to_float(image), *self.sizes)
                h, w = int(image.shape[-2]), int(image.shape[-1])
                x0, y0 = (w - BOX) / 2, (h - BOX) / 2
                outs.append({"boxes": np.array([[x0, y0, x0 + BOX, y0 + BOX]], np.float32),
                             "labels": np.array([1]), "scores": np.array([0.5 + float(small.mean()) / 4], np.float32),
                             "masks": np.ones((1, 1, 28, 28), np.float32)})
            return outs

    return Cheap


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def descendants(root: int) -> list[int]:
    """Pids of every live descendant of process ``root`` (from each process's parent in ``/proc``)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the field after the state
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class PeakRss:
    """Peak RSS (MB) while in the ``with`` block, sampled every :data:`SAMPLE_SECONDS` s and at
    the end (the workers' peaks reset on entry): ``workers`` maps each Ray worker process of this
    process's Ray (its descendants whose command line holds ``ray::`` or ``default_worker.py``)
    to ``(its title when its peak was seen, its VmHWM)``; ``driver`` is this process's largest
    ``VmRSS``, ``driver_start`` its RSS at the start."""

    def __init__(self) -> None:
        self.me = os.getpid()
        self.workers: dict[int, tuple[str, float]] = {}
        self.driver = self.driver_start = 0.0
        self._stop = threading.Event()

    @property
    def worker_peak(self) -> float:
        return max((peak for _, peak in self.workers.values()), default=0.0)

    def ray_workers(self) -> list[tuple[int, bytes]]:
        """``(pid, command line)`` of the live Ray workers of this process's Ray."""
        found = []
        for pid in descendants(self.me):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue  # ended meanwhile
            if b"ray::" in cmd or b"default_worker.py" in cmd:
                found.append((pid, cmd))
        return found

    def sample(self) -> None:
        self.driver = max(self.driver, _status_kb(self.me, "VmRSS") / 1024)
        for pid, cmd in self.ray_workers():
            try:
                peak = _status_kb(pid, "VmHWM") / 1024
            except (OSError, StopIteration):
                continue  # a worker that ended between the listing and the read
            if peak > self.workers.get(pid, ("", -1.0))[1]:
                self.workers[pid] = (cmd.split(b"\0")[0].decode(errors="replace"), peak)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.sample()

    def __enter__(self) -> PeakRss:
        # Ray reuses its workers across runs: reset each one's VmHWM to its RSS now ("5" in
        # /proc/PID/clear_refs), so an earlier run's peak (the module's other test) is not counted
        for pid, _ in self.ray_workers():
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
            except (FileNotFoundError, ProcessLookupError):
                continue  # ended meanwhile
        self.driver_start = _status_kb(self.me, "VmRSS") / 1024
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()


def test_decoded_rows_release_their_pixels():
    """The read stage's rows copy their pixels once and keep no reference to the images (pyarrow
    26 never released the object behind a memoryview passed to ``pa.array``); the bytes are the
    images' in C order, an error row's are empty."""
    images = [np.arange(3 * 5 * 7, dtype=np.uint8).reshape(3, 5, 7), None,
              np.full((3, 2, 4), 9, np.uint8).transpose(0, 2, 1)]  # not C-contiguous
    refs = [weakref.ref(images[0]), weakref.ref(images[2])]
    row = decoded_row({"unit": "u", "only": []}, [0, 1, 2], [1, 2, 3], ["a", "b", "c"], images,
                      [None, "decode failed: x", None], part=None)
    column = pixel_lists([images[:2], [], images[2:]])
    expected = [images[0].tobytes(), b"", images[2].tobytes()]
    del images
    gc.collect()
    assert [r() for r in refs] == [None, None]
    assert row.column("pixels").to_pylist() == [expected]
    assert column.to_pylist() == [expected[:2], [], expected[2:]]
    assert row.column("heights").to_pylist() == [[5, 0, 4]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    tiny_checkpoint(str(path))
    return str(path)


def infer_tiled(image_dir, out: str, checkpoint: str, overlap: float = 0.2) -> tuple[dict, PeakRss, float]:
    """``run_inference --tile 1024`` over ``image_dir`` (one image): its one results row, the peak
    RSS figures and the run's seconds."""
    with PeakRss() as peak:
        start = time.perf_counter()
        summary = run_inference(InferConfig(input=str(image_dir), output=out, checkpoint=checkpoint, tile=TILE,
                                            tile_overlap=overlap),
                                predictor_factory=cheap_predictor())
        seconds = time.perf_counter() - start
    assert unit_names(out) == [UNIT]
    rows = pq.read_table(os.path.join(out, UNIT)).to_pylist()
    assert len(rows) == 1 and summary.images == 1 and summary.errors == 0
    assert not any(files for _, _, files in os.walk(os.path.join(out, TILES_DIR)))
    assert peak.workers, "no Ray worker of this test's Ray was sampled"
    return rows[0], peak, seconds


def figures(what: str, peak: PeakRss, seconds: float, row: dict) -> str:
    top = sorted(peak.workers.values(), key=lambda w: -w[1])[:2]
    return (f"{what}: {seconds:.1f} s, worker peak RSS {peak.worker_peak:.0f} MB (largest: "
            + ", ".join(f"{name} {mb:.0f} MB" for name, mb in top)
            + f"), driver RSS {peak.driver_start:.0f} -> peak {peak.driver:.0f} MB, {len(row['instances'])} instances")


@pytest.mark.slow
def test_infer_tile_over_20k_png_within_2_5_gb(ray_local, checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    write_png(images / "scene.png", 20_000, 20_000)
    row, peak, seconds = infer_tiled(images, str(tmp_path / "out"), checkpoint)
    print(figures("20000x20000 PNG, --tile 1024", peak, seconds, row))
    assert row["error"] is None and row["file_name"].endswith("scene.png")
    assert len(row["instances"]) == 25 * 25  # one per tile of the 20 %-overlap grid, none merged
    assert peak.worker_peak <= 2500, peak.workers
    assert peak.driver - peak.driver_start < DRIVER_GROWTH_MB


@pytest.mark.slow
def test_infer_tile_over_tiled_tiff_within_1_5_gb(ray_local, checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    write_tiled_tiff(images / "scene.tif", TIFF_SIDE)
    row, peak, seconds = infer_tiled(images, str(tmp_path / "out"), checkpoint, overlap=0.0)
    print(figures(f"{TIFF_SIDE}x{TIFF_SIDE} tiled TIFF, --tile 1024", peak, seconds, row))
    assert row["error"] is None and row["file_name"].endswith("scene.tif")
    assert len(row["instances"]) == (-(-TIFF_SIDE // TILE)) ** 2  # one per tile, none merged (no overlap)
    assert peak.worker_peak <= 1500, peak.workers
    assert peak.driver - peak.driver_start < DRIVER_GROWTH_MB
