"""The pseudo-labelling step of a round: teacher TTA candidates -> thresholds -> pseudo-label shards.

1. **Candidates**: ``pipeline.infer.driver.run_inference`` over the unlabeled dataset with the
   teacher as a :class:`pipeline.distill.tta.TTAPredictor`: every merged TTA instance at or above
   ``tta.min_score``, written as results files (one per unit) under ``<out>/candidates`` with its
   ``provenance.json``. The inference engine gives this step exactly-once units, resume (a rerun
   skips committed units), provenance (a rerun with another teacher or TTA refuses), progress and
   bounded retries; an undecodable image is an error row.
2. **Thresholds** per class from the candidates' scores (:mod:`pipeline.distill.thresholds`).
3. **Pseudo-labels**: each unlabeled image with its candidates at or above the thresholds, as a
   maskray dataset at ``<out>`` (the image bytes from the unlabeled shards, the instances from the
   results files, streamed one unit at a time), with ``round`` and ``teacher`` in the manifest's
   ``extra``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from collections.abc import Iterator

from model.errors import MaskrayError
from pipeline.distill.config import ThresholdConfig, TTAConfig
from pipeline.infer.config import DEFAULT_IMAGES_PER_UNIT, DEFAULT_UNIT_BYTES

logger = logging.getLogger(__name__)

CANDIDATES = "candidates"


def _results_rows(uri: str) -> list[dict]:
    """The rows (``image_id``, ``instances``, ``error``) of one results file."""
    from pipeline.results import read_table

    return read_table(uri, columns=["image_id", "instances", "error"]).to_pylist()


def label_candidates(unlabeled_uri: str, out_uri: str, teacher: str, tta: TTAConfig, *, batch_size: int = 8,
                     actors: int = 1, cpus_per_actor: float = 1.0, threads: int = 0,
                     images_per_unit: int = DEFAULT_IMAGES_PER_UNIT, unit_bytes: int = DEFAULT_UNIT_BYTES):
    """Teacher TTA inference over every unlabeled image -> results files under ``out_uri``
    (see the module docstring); returns the driver's ``InferenceSummary``."""
    from pipeline.distill.tta import TTAPredictor
    from pipeline.infer.config import InferConfig
    from pipeline.infer.driver import run_inference

    return run_inference(InferConfig(input=unlabeled_uri, output=out_uri, checkpoint=teacher,
                                     batch_size=batch_size, actors=str(actors), cpus_per_actor=cpus_per_actor,
                                     threads=threads or None, score_threshold=tta.min_score,
                                     tta=json.loads(json.dumps(dataclasses.asdict(tta))),
                                     images_per_unit=images_per_unit, unit_bytes=unit_bytes),
                         predictor_factory=TTAPredictor)


def _units(unlabeled_uri: str, candidates_uri: str, images_per_unit: int,
           unit_bytes: int) -> Iterator[tuple[list[dict], list[dict]]]:
    """Per unit of the candidates' run, in order: (the unlabeled shard's rows, its results rows)."""
    import pyarrow.parquet as pq

    from pipeline import storage
    from pipeline.infer.driver import plan

    units, _ = plan(unlabeled_uri, images_per_unit, unit_bytes)
    shard_uri, shard_rows = None, []
    for unit in units:
        if unit.uri != shard_uri:
            table = pq.read_table(io.BytesIO(storage.read_bytes(unit.uri)),
                                  columns=["image_id", "file_name", "width", "height", "image"])
            shard_uri, shard_rows = unit.uri, table.to_pylist()
        uri = storage.join(candidates_uri, unit.unit)
        if not storage.exists(uri):
            raise MaskrayError(f"{uri}: missing; the candidates' inference did not finish (rerun to resume it)")
        results = _results_rows(uri)
        rows = shard_rows[unit.start:unit.stop]
        if [r["image_id"] for r in rows] != [r["image_id"] for r in results]:
            raise MaskrayError(f"{uri}: its image ids differ from {unit.describe()}; the unlabeled dataset changed "
                               "under the candidates (delete them to recompute)")
        yield rows, results


def candidate_scores(unlabeled_uri: str, candidates_uri: str,
                     images_per_unit: int = DEFAULT_IMAGES_PER_UNIT,
                     unit_bytes: int = DEFAULT_UNIT_BYTES) -> tuple[dict[int, list[float]], int, int]:
    """``(scores per category id, images labelled, images with an error)`` of the candidates."""
    from pipeline import storage
    from pipeline.infer.driver import plan

    scores: dict[int, list[float]] = {}
    images = errors = 0
    units, _ = plan(unlabeled_uri, images_per_unit, unit_bytes)
    for unit in units:
        for row in _results_rows(storage.join(candidates_uri, unit.unit)):
            if row["error"] is not None:
                errors += 1
                continue
            images += 1
            for inst in row["instances"] or ():
                scores.setdefault(int(inst["category_id"]), []).append(float(inst["score"]))
    return scores, images, errors


def check_errors(images_in: int, errors: int, source_uri: str, max_bad_fraction: float) -> int:
    """More than ``max_bad_fraction`` of ``images_in`` with an error row (undecodable, over the pixel
    limit) stops the round with one line; fewer are logged and left out. Returns ``errors``."""
    if errors:
        logger.warning("pseudo-labels: %d of %d images of %s could not be labelled (error rows of the candidates) "
                       "and were left out", errors, images_in, source_uri)
    if errors > max_bad_fraction * images_in:
        raise MaskrayError(f"pseudo-labels: {errors} of {images_in} images of {source_uri} could not be labelled, "
                           f"more than the {max_bad_fraction:g} allowed (see the error rows of the candidates)")
    return errors


def to_annotations(image_id: int, instances: list[dict]) -> list[dict]:
    """Result instances -> shard annotations (``id`` = image_id x 1000 + k, ``area`` of the RLE,
    not crowd, ``score`` kept)."""
    from pycocotools import mask as mask_utils

    out = []
    for k, inst in enumerate(instances):
        seg = inst["segmentation"]
        rle = {"size": [int(v) for v in seg["size"]], "counts": seg["counts"]}
        out.append({"id": int(image_id) * 1000 + k, "category_id": int(inst["category_id"]),
                    "bbox": [float(v) for v in inst["bbox"]], "area": float(mask_utils.area(rle)),
                    "iscrowd": False, "segmentation": rle, "score": float(inst["score"])})
    return out


def write_pseudo_labels(unlabeled_uri: str, candidates_uri: str, out_uri: str, thresholds: dict[int, float], *,
                        categories: list[dict], extra: dict, keep_empty: bool = False,
                        images_per_unit: int = DEFAULT_IMAGES_PER_UNIT, unit_bytes: int = DEFAULT_UNIT_BYTES,
                        images_per_shard: int = 1000) -> tuple[int, int]:
    """The thresholded candidates as a maskray dataset at ``out_uri`` (rows with an error left out;
    images without any instance left out unless ``keep_empty``); returns (images, instances)."""
    from pipeline.data.format import Manifest, ShardWriter, write_manifest
    from pipeline.distill.thresholds import apply_thresholds

    images = instances = 0
    with ShardWriter(out_uri, images_per_shard=images_per_shard) as writer:
        for rows, results in _units(unlabeled_uri, candidates_uri, images_per_unit, unit_bytes):
            for row, result in zip(rows, results):
                if result["error"] is not None:
                    continue
                kept = apply_thresholds(result["instances"] or [], thresholds)
                if not kept and not keep_empty:
                    continue
                writer.add({**row, "annotations": to_annotations(row["image_id"], kept)})
                images += 1
                instances += len(kept)
    write_manifest(out_uri, Manifest(categories=categories, shards=writer.close(), source=candidates_uri,
                                     extra=extra))
    return images, instances


def _teacher_categories(teacher: str, fallback: list[dict]) -> list[dict]:
    from pipeline.weights import read_model

    config, _, _, _ = read_model(teacher)
    return [dict(c) for c in config.categories] or list(fallback)


def run_pseudo_labels(round_index: int, teacher: str, out_uri: str, *, unlabeled: str, labeled: str,
                      tta: TTAConfig, thresholds: ThresholdConfig, keep_empty: bool = False,
                      batch_size: int = 8, actors: int = 1, cpus_per_actor: float = 1.0, threads: int = 0,
                      max_bad_fraction: float = 0.01):
    """The whole pseudo-labelling step of one round (see the module docstring). Returns a
    :class:`pipeline.distill.rounds.PseudoLabels`."""
    from pipeline import storage
    from pipeline.data.format import read_manifest, read_rows
    from pipeline.distill.rounds import PseudoLabels
    from pipeline.distill.thresholds import choose_thresholds

    start = time.perf_counter()
    candidates = storage.join(out_uri, CANDIDATES)
    summary = label_candidates(unlabeled, candidates, teacher, tta, batch_size=batch_size, actors=actors,
                               cpus_per_actor=cpus_per_actor, threads=threads)
    logger.info("pseudo-labels of round %d: candidates %s", round_index, summary.line())
    source = read_manifest(unlabeled)
    categories = _teacher_categories(teacher, source.categories)
    category_ids = [int(c["id"]) for c in categories]
    scores, images, errors = candidate_scores(unlabeled, candidates)
    check_errors(images + errors, errors, unlabeled, max_bad_fraction)
    chosen = choose_thresholds(thresholds, category_ids, scores=scores, images=images,
                               labeled=(r["annotations"] for r in read_rows(labeled, columns=["annotations"])))
    extra = {"round": round_index, "teacher": teacher, "thresholds": {str(k): v for k, v in chosen.items()},
             "threshold_mode": thresholds.mode, "candidates": candidates}
    kept_images, instances = write_pseudo_labels(unlabeled, candidates, out_uri, chosen, categories=categories,
                                                 extra=extra, keep_empty=keep_empty)
    logger.info("pseudo-labels of round %d: %d instances on %d of %d images (%d candidates) in %.1f s -> %s",
                round_index, instances, kept_images, source.num_images, sum(len(s) for s in scores.values()),
                time.perf_counter() - start, out_uri)
    return PseudoLabels(dataset=out_uri, thresholds=chosen, images=kept_images, instances=instances,
                        round=round_index, teacher=teacher)


def check_pseudo_dataset(dataset_uri: str, *, round_index: int, teacher: str) -> None:
    """Refuse a pseudo-label dataset that is not the one of ``round_index`` by ``teacher``."""
    from pipeline.data.format import read_manifest

    extra = read_manifest(dataset_uri).extra
    if extra.get("round") != round_index or extra.get("teacher") != teacher:
        raise MaskrayError(f"{dataset_uri}: pseudo-labels of round {extra.get('round')} by {extra.get('teacher')}, "
                           f"but round {round_index} with teacher {teacher} asked for them")
