"""The driver's progress line counts tile parts as they are written (``maskray infer --tile``),
not only images as their units commit: without Ray, the metadata rows that the model stage makes
(:func:`pipeline.infer.stages.write_units` over a real tiled read) are fed to the driver's
``_watch`` in the order a run would yield them."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from pipeline.infer import driver
from pipeline.infer.driver import InferenceSummary, Progress, Unit
from pipeline.infer.stages import tiled_rows, write_units
from pipeline.infer.tiles import base_name, part_name

TILE = 64
UNIT = "files-0000000-0000001.parquet"


class MetadataRows:
    """What ``_watch`` reads of a Ray dataset: its metadata tables, in order."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def iter_batches(self, **_options):
        return iter(self.batches)


def no_detections(row: dict) -> list[dict]:
    return [{"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
             "scores": np.zeros(0, np.float32), "masks": np.zeros((0, 1, 28, 28), np.float32)}
            for _ in row["positions"]]


def progress_tiles(caplog) -> list[tuple[int, int, int]]:
    """``(images done, tiles done, tiles total)`` of each progress line logged."""
    found = []
    for record in caplog.records:
        m = re.match(r"progress: (\d+)/\d+ images .*; tiles (\d+)/(\d+) of tiled images", record.getMessage())
        if m:
            found.append(tuple(int(v) for v in m.groups()))
    return found


def test_watch_logs_tile_parts_as_they_are_written(tmp_path, monkeypatch, caplog):
    from PIL import Image

    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(path)
    out = str(tmp_path / "out")
    unit = Unit(UNIT, "files", paths=(str(path),), prefix=str(tmp_path / "in"))
    # 300 x 200 px at 64-px tiles, no overlap: 5 x 4 = 20 tiles in parts of 8, 8 and 4 (parts capped
    # at 8 tiles here), then the base
    from pipeline.infer import tiles

    monkeypatch.setattr(tiles, "MIN_PARTS_PER_IMAGE", 1)
    monkeypatch.setattr(tiles, "MAX_TILES_PER_PART", 8)
    metadata = []
    for decoded in tiled_rows(unit.row(), tile=TILE, overlap=0.0, full_pass=False, model_size=(64, 64),
                              output_uri=out, max_whole_pixels=None, max_pixels=None):
        row = decoded.to_pylist()[0]
        metadata.append(write_units([dict(row, preds=no_detections(row), model="m")], output_uri=out,
                                    category_ids=[1]))
    parts = [m.column("part")[0].as_py() for m in metadata]
    assert parts == [part_name(0, 0, 8, 20), part_name(0, 8, 16, 20), part_name(0, 16, 20, 20), base_name(20)]
    assert [m.column("committed")[0].as_py() for m in metadata] == [False, False, False, True]
    # a retried task reports its part again, and a part arrives after its unit committed
    batches = metadata[:1] + metadata[:1] + metadata[1:] + metadata[1:2]

    monkeypatch.setattr(driver, "PROGRESS_SECONDS", 0.0)  # a line for every report
    caplog.set_level(logging.INFO, logger=driver.__name__)
    summary = InferenceSummary()
    driver._watch(MetadataRows(batches), [unit], summary, started=0.0, on_unit_committed=None)

    assert progress_tiles(caplog) == [(0, 8, 20), (0, 16, 20), (0, 20, 20), (1, 20, 20)]
    assert summary.images == 1 and summary.units_done == 1


def test_plain_write_units_rows_name_no_part(tmp_path):
    row = {"unit": "u.parquet", "positions": [0], "image_ids": [7], "file_names": ["a.png"], "heights": [8],
           "widths": [8], "errors": [None], "merge": False, "model": "m"}
    meta = write_units([dict(row, preds=no_detections(row))], output_uri=str(tmp_path), category_ids=[1])
    assert meta.column("part").to_pylist() == [None] and meta.column("committed").to_pylist() == [True]


def test_progress_counts_each_part_once_and_a_committed_unit_whole(caplog):
    caplog.set_level(logging.INFO, logger=driver.__name__)
    progress = Progress(total=3, every=0.0)
    progress.add_part("u", part_name(0, 8, 16, 20))  # a resumed run: tiles 0-7 were written before
    progress.add_part("u", part_name(0, 8, 16, 20))
    progress.add_part("u", base_name(24))  # the base holds no tiles
    progress.add_part("u", "check")
    progress.add_part("u", part_name(3, 0, 4, 4))
    progress.add_part("v", part_name(0, 0, 8, 30))
    assert (progress.tiles_done, progress.tiles_total) == (20, 54)
    progress.add(2, "u")  # u's images count as wholly tiled once it is committed
    assert (progress.tiles_done, progress.tiles_total, progress.done) == (32, 54, 2)  # + the 12 unseen
    progress.add(1, "w")  # a unit without tiles
    assert progress_tiles(caplog) == [(0, 8, 20), (0, 12, 24), (0, 20, 54), (2, 32, 54), (3, 32, 54)]


def test_progress_without_tiles_keeps_its_line(caplog):
    caplog.set_level(logging.INFO, logger=driver.__name__)
    progress = Progress(total=4, every=0.0)
    progress.add(4)
    assert caplog.records[-1].getMessage().startswith("progress: 4/4 images (100%)")
    assert "tiles" not in caplog.records[-1].getMessage()


@pytest.mark.parametrize("every", [None, 5.0])
def test_progress_cadence(every, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=driver.__name__)
    monkeypatch.setattr(driver, "PROGRESS_SECONDS", 5.0)
    progress = Progress(total=10, every=every)
    assert progress.every == 5.0
    progress.add_part("u", part_name(0, 0, 8, 20))  # within the cadence: no line
    progress.add(1, "x")
    assert caplog.records == []
    progress.last -= 6.0
    progress.add_part("u", part_name(0, 8, 16, 20))
    assert progress_tiles(caplog) == [(1, 16, 20)]
