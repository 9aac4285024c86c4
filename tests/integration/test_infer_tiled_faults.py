"""``maskray infer --tile`` keeps exactly-once when a model actor dies in the middle of a tiled image.

The input is the seam-cut mosaic of ``test_infer_tiled`` (834 x 834 px) and two small images, one
unit; at 128-px tiles the mosaic is 81 tiles in 17 parts. The predictor is that module's oracle
(deterministic answers from the ground truth), here made to kill its actor process with
``os._exit`` once, as it starts a tile part while at least :data:`KILL_AFTER_PARTS` parts of the
image are already written (a marker file makes it die only once, anywhere). Ray restarts the actor
and retries the part on it; should the run stop instead, a rerun resumes from the parts written.
Either way the results must equal those of an uninterrupted run: one row per image, the same
instances (same count, same RLEs), and no part file left under ``<output>/_tiles/``.
"""

from __future__ import annotations

import os
import re

from test_infer_tiled import mosaic_input, oracle_predictor, rows_of  # noqa: F401 (mosaic_input: a fixture)

from model.errors import MaskrayError
from pipeline.infer.config import InferConfig
from pipeline.infer.driver import run_inference
from pipeline.infer.predictor import Predictor
from pipeline.infer.tiles import TILES_DIR, plan_tiles, tiles_per_part

TILE, OVERLAP = 128, 0.25
UNIT = "files-0000000-0000003.parquet"
KILL_AFTER_PARTS = 3  # tile parts of the mosaic on disk before the actor is killed
TILE_PART = re.compile(r"^p\d+\.t\d+-\d+-of-\d+\.parquet$")


def killing_oracle(truth_path: str, log_dir: str, parts_dir: str, marker: str) -> type[Predictor]:
    """The oracle of ``test_infer_tiled`` that kills its actor process (``os._exit(1)``) once: on the
    first tile part it starts while ``parts_dir`` holds >= :data:`KILL_AFTER_PARTS` tile parts. The
    marker file (created exclusively, so one death in the whole run) gets ``"<pid> <part> <parts
    written>"``. Defined in a function so it pickles by value."""
    Oracle = oracle_predictor(truth_path, log_dir)

    class KillingOracle(Oracle):
        def run_units(self, table, batch_size=None):
            part = table.column("part")[0].as_py() if "part" in table.column_names else None
            if part and TILE_PART.match(part) and os.path.isdir(parts_dir):
                written = [n for n in os.listdir(parts_dir) if TILE_PART.match(n)]
                if len(written) >= KILL_AFTER_PARTS:
                    try:
                        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    except FileExistsError:
                        pass
                    else:
                        os.write(fd, f"{os.getpid()} {part} {len(written)}".encode())
                        os.close(fd)
                        os._exit(1)
            return super().run_units(table, batch_size)

    return KillingOracle


def left_under_tiles(out: str) -> list[str]:
    """Every file under ``<out>/_tiles/`` (parts, and temporary files of an interrupted write)."""
    return [os.path.join(d, f) for d, _, files in os.walk(os.path.join(out, TILES_DIR)) for f in files]


def test_actor_killed_mid_tiled_image_gives_the_uninterrupted_results(ray_local, mosaic_input, tmp_path):
    m = mosaic_input
    tiles = len(plan_tiles(m["size"][1], m["size"][0], TILE, OVERLAP))
    parts = -(-tiles // tiles_per_part(TILE, tiles))
    assert parts > KILL_AFTER_PARTS + 2, "the kill must fall in the middle of the image"

    def config(out: str) -> InferConfig:
        return InferConfig(input=m["input"], output=out, checkpoint=m["ckpt"], tile=TILE, tile_overlap=OVERLAP,
                           actors="2", score_threshold=0.0)

    ref_out, ref_log = str(tmp_path / "ref"), tmp_path / "ref-log"
    ref_log.mkdir()
    run_inference(config(ref_out), predictor_factory=oracle_predictor(m["truth"], str(ref_log)))
    reference = rows_of(ref_out)
    assert len(reference[0]["instances"]) > 50  # the mosaic's objects, merged across seams

    out, log, marker = str(tmp_path / "out"), tmp_path / "log", str(tmp_path / "killed")
    log.mkdir()
    killing = killing_oracle(m["truth"], str(log), os.path.join(out, TILES_DIR, UNIT), marker)
    try:
        summary = run_inference(config(out), predictor_factory=killing)
        resumed = False
    except MaskrayError as exc:  # Ray's retries spent: the run stops, and a rerun resumes
        assert "not committed" in str(exc)
        summary = run_inference(config(out), predictor_factory=killing)
        resumed = True
    assert os.path.exists(marker), "the fault was not injected"
    pid, part, written = open(marker).read().split()
    print(f"actor {pid} killed starting {part} with {written}/{parts} parts written; "
          f"{'stopped, resumed by a rerun' if resumed else 'the run completed on its own'}")
    assert KILL_AFTER_PARTS <= int(written) < parts
    # the part whose actor died was run again, by another process
    assert (log / part).read_text() != pid
    rows = rows_of(out)
    assert [r["file_name"].rsplit("/", 1)[-1] for r in rows] == ["a-mosaic.png", "b-small0.png", "b-small1.png"]
    assert all(r["error"] is None for r in rows)
    assert len(rows[0]["instances"]) == len(reference[0]["instances"])
    assert rows == reference  # same ids, instances, RLEs, scores, boxes
    assert left_under_tiles(out) == []
    if not resumed:
        assert summary.images == 3 and summary.units_done == 1
