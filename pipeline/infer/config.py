"""``InferConfig``: everything one ``maskray infer`` run is told, typed and checked on creation.

``maskray infer`` flags and ``--set`` map onto these fields (``jobs.cli.add_config_arguments``);
library callers build it directly::

    run_inference(InferConfig(input="s3://b/shards", output="s3://b/results",
                              checkpoint="torchvision:maskrcnn_resnet50_fpn_v2"))

The run's provenance (``<output>/provenance.json``) is this config's result-changing fields
(:meth:`InferConfig.result_settings`) beside the model digest and the input's identity; the
fields declared run-only (where and how fast it runs) may differ on a rerun. ``checkpoint`` and
``input`` are run-only *as names*: the record holds what they name (the model's sha256, the
input listing's identity), so the same bytes named another way are the same run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pipeline.config import option, require, require_tiling, run_only_keys, to_dict
from pipeline.data.decode import DEFAULT_INTENSITY, DEFAULT_MAX_PIXELS, INTENSITY_MODES

AMP_MODES = ("auto", "on", "off")
DEFAULT_MAX_WHOLE_PIXELS = 1_000_000_000  # with --tile, for formats decoded whole (a 20k x 20k PNG is 400 MP)
# Units of work and commit (pipeline.infer.driver.plan). Each costs ~5-10 ms of Ray Data and write
# overhead on a 2-core node: the no-op benchmark's 100-image shards of 64-px images split 64 + 36
# ran at 0.75x a plain loop in steady state, whole (<= 128) at 0.99-1.13x (benchmarks/RESULTS.md).
# The byte bound keeps large images few per unit (one 12-MP JPEG is ~4 MB encoded, 36 MB decoded).
DEFAULT_IMAGES_PER_UNIT = 128
DEFAULT_UNIT_BYTES = 16 * 2**20


@dataclass(frozen=True)
class InferConfig:
    """One inference run (see the module docstring)."""

    CONFIG_ROOT: ClassVar[bool] = True

    input: str = option("", "dataset prefix (maskray shards, labeled or not) or a prefix of image files",
                        result=False)
    output: str = option("", "results prefix: one Parquet file per unit (rerun to resume)", result=False)
    checkpoint: str = option("", "maskray checkpoint or torchvision state dict (local path or s3://), or a "
                             "torchvision name: torchvision:maskrcnn_resnet50_fpn_v2, "
                             "torchvision:maskrcnn_resnet50_fpn", result=False)
    coco_json: str | None = option(None, "also write COCO results JSON (pycocotools COCO.loadRes) covering "
                                   "every unit", result=False)
    score_threshold: float = option(0.05, "drop detections scoring below T (default 0.05)")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, f"images with more pixels become error rows (default "
                             f"{DEFAULT_MAX_PIXELS:,}; 0 = no limit)")
    images_per_unit: int = option(DEFAULT_IMAGES_PER_UNIT, f"images per unit of work and results file at most "
                                  f"(default {DEFAULT_IMAGES_PER_UNIT}; see --unit-bytes)")
    unit_bytes: int = option(DEFAULT_UNIT_BYTES, f"encoded image bytes per unit at most, by each shard's mean bytes "
                             f"per image or each file's size (default {DEFAULT_UNIT_BYTES // 2**20} MiB: 12-MP "
                             f"photos travel a few per unit, thumbnails --images-per-unit; 0 = no bound). A "
                             f"unit's decoded pixels travel together")
    exif: bool = option(True, "apply EXIF orientation, as image viewers do (default); --no-exif keeps the raw "
                        "pixel frame")
    intensity: str = option(DEFAULT_INTENSITY, "how 16/32-bit images map to 0..255: percentile (default), "
                            "minmax or dtype")
    amp: str | bool = option("auto", "autocast in the model: float16 on GPUs, bfloat16 on CPUs (about 3x faster on "
                      "CPUs with AMX; results differ from float32's). auto (default): on for GPU actors, off "
                      "for CPU actors, whose results then equal torchvision's; on; off")
    tile: int = option(0, "cut images wider or taller than SIZE px into SIZE x SIZE tiles run at native resolution "
                       "(the model's own size rule still applies to a tile), instances merged across seams into one "
                       "row per image (default 0 = off)")
    tile_overlap: float = option(0.2, "with --tile: the fraction of a tile its neighbour overlaps (default 0.2); "
                                 "an object cut by a seam is joined through this band, so > 0")
    tile_full_pass: bool = option(False, "with --tile: also run each tiled image whole at the model's size, merged "
                                  "with the tiles (objects larger than a tile)")
    max_whole_pixels: int = option(DEFAULT_MAX_WHOLE_PIXELS, f"with --tile: images that must be decoded whole "
                                   f"(PNG, JPEG) may have up to N pixels (default {DEFAULT_MAX_WHOLE_PIXELS:,}; "
                                   f"0 = no limit); tiled TIFFs are read region by region, --max-pixels per tile")
    # test-time augmentation for a predictor that takes it (distillation's teacher); not a flag
    tta: dict[str, Any] | None = None
    batch_size: int = option(4, "images per model call (default 4)", result=False)
    actors: str = option("1", "model actors: a fixed count N or an autoscaling range MIN,MAX (default 1)",
                         result=False)
    gpus_per_actor: float | None = option(None, "GPUs per model actor (default: 1 when the cluster has GPUs, "
                                          "else 0 = CPU actors)", result=False)
    cpus_per_actor: float | None = option(None, "CPUs per model actor (default 1, lowered on a CPU-only "
                                          "cluster so one CPU stays for the read tasks)", result=False)
    threads: int | None = option(None, "threads per CPU model actor, each batch split in lanes over them "
                                 "(default: the cluster's CPUs / actors; 0 = Ray's default)", result=False)
    overwrite: bool = option(False, "recompute results that --output holds from another checkpoint, input or "
                             "options", result=False)
    retry_errors: bool = option(False, "recompute only the rows whose error may be transient (read or "
                                "inference failures)", result=False)

    def __post_init__(self) -> None:
        if isinstance(self.amp, bool):  # YAML reads --set amp=on / off as booleans
            object.__setattr__(self, "amp", "on" if self.amp else "off")
        require(bool(self.input.strip()), "input", "required (--input URI)")
        require(bool(self.output.strip()), "output", "required (--output URI)")
        require(bool(self.checkpoint.strip()), "checkpoint", "required (--checkpoint URI or torchvision:NAME)")
        require(0.0 <= self.score_threshold <= 1.0, "score_threshold", f"must be in [0, 1], got {self.score_threshold}")
        require(self.max_pixels >= 0, "max_pixels", f"must be >= 0 (0 = no limit), got {self.max_pixels}")
        require(self.images_per_unit >= 1, "images_per_unit", f"must be >= 1, got {self.images_per_unit}")
        require(self.unit_bytes >= 0, "unit_bytes", f"must be >= 0 (0 = no bound), got {self.unit_bytes}")
        require(self.intensity in INTENSITY_MODES, "intensity",
                f"{self.intensity!r} is not one of {', '.join(INTENSITY_MODES)}")
        require(self.amp in AMP_MODES, "amp", f"{self.amp!r} is not one of {', '.join(AMP_MODES)}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        self.actor_range  # noqa: B018  (checks the text)
        require_tiling(self.tile, self.tile_overlap, self.tile_full_pass)
        require(self.max_whole_pixels >= 0, "max_whole_pixels", f"must be >= 0 (0 = no limit), got "
                f"{self.max_whole_pixels}")
        require(self.tile == 0 or self.tta is None, "tile", "tiled inference does not take a tta predictor")
        require(self.gpus_per_actor is None or self.gpus_per_actor >= 0, "gpus_per_actor",
                f"must be >= 0, got {self.gpus_per_actor}")
        require(self.cpus_per_actor is None or self.cpus_per_actor > 0, "cpus_per_actor",
                f"must be > 0, got {self.cpus_per_actor}")
        require(self.threads is None or self.threads >= 0, "threads", f"must be >= 0 (0 = Ray's default), got "
                f"{self.threads}")

    @property
    def actor_range(self) -> tuple[int, int]:
        """``(min, max)`` model actors (equal for a fixed pool)."""
        try:
            parts = [int(p) for p in str(self.actors).split(",")]
        except ValueError:
            parts = []
        ok = (len(parts) == 1 and parts[0] >= 1) or (len(parts) == 2 and 1 <= parts[0] <= parts[1])
        require(ok, "actors", f"{self.actors!r}: expected N >= 1 or MIN,MAX with 1 <= MIN <= MAX")
        return (parts[0], parts[-1])

    @property
    def pixel_limit(self) -> int | None:
        """``max_pixels`` as the decoders take it (None = no limit)."""
        return self.max_pixels or None

    @property
    def autocast(self) -> bool | None:
        """``amp`` as the actors take it: None = on for GPU actors, off for CPU actors."""
        return {"auto": None, "on": True, "off": False}[self.amp]

    def result_settings(self) -> dict[str, Any]:
        """The fields that change results (everything but the run-only ones): the provenance's options."""
        skip = run_only_keys(InferConfig)
        return {k: v for k, v in to_dict(self).items() if k not in skip}

    @property
    def whole_pixel_limit(self) -> int | None:
        """``max_whole_pixels`` as the decoders take it (None = no limit)."""
        return self.max_whole_pixels or None
