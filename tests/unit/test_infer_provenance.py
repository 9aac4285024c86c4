"""The output prefix's run record (pipeline.infer.driver.check_provenance), no Ray."""

import pytest

from pipeline.infer.config import InferConfig
from pipeline.infer.driver import check_provenance
from pipeline.runrecord import RunChangedError


def _record(**options) -> dict:
    config = InferConfig(checkpoint="/m.pt", input="/in", output="/out", **options)
    return {"model": "digest", "options": config.result_settings()}


def test_results_recorded_before_tiling_existed_are_the_same_run_until_a_tile_option_changes(tmp_path):
    out = str(tmp_path / "out")
    old = _record()
    for key in ("tile", "tile_overlap", "tile_full_pass", "max_whole_pixels"):
        del old["options"][key]  # as a version without --tile recorded it
    check_provenance(out, old, overwrite=False, existing=[])
    check_provenance(out, _record(), overwrite=False, existing=["part-00000.parquet"])  # defaults: the same run
    with pytest.raises(RunChangedError, match=r"options\.tile \(0 -> 512\)"):
        check_provenance(out, _record(tile=512), overwrite=False, existing=["part-00000.parquet"])


def test_results_recorded_before_the_unit_byte_bound_were_planned_by_image_count_alone(tmp_path):
    """A record without ``unit_bytes`` stands for units cut by image count only (0 = no bound), not
    for the new default: a rerun under the bound could cut other units and duplicate rows."""
    out = str(tmp_path / "out")
    old = _record(images_per_unit=8)
    del old["options"]["unit_bytes"]
    check_provenance(out, old, overwrite=False, existing=[])
    check_provenance(out, _record(images_per_unit=8, unit_bytes=0), overwrite=False, existing=["part-00000.parquet"])
    with pytest.raises(RunChangedError, match=r"options\.unit_bytes \(0 -> 16777216\)"):
        check_provenance(out, _record(images_per_unit=8), overwrite=False, existing=["part-00000.parquet"])
