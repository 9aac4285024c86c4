"""Per-class score thresholds that turn the teacher's candidates into pseudo-labels.

The data-distillation rule (Radosavovic et al., CVPR 2018): choose class ``c``'s threshold so the
average number of pseudo instances per unlabeled image equals the labeled set's average for
``c`` (:func:`density_thresholds`), never below a floor; or one fixed threshold for every class
(:class:`pipeline.distill.config.ThresholdConfig`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np

from model.errors import MaskrayError
from pipeline.distill.config import ThresholdConfig

logger = logging.getLogger(__name__)

# A threshold above every score: no pseudo instance of that class (JSON-safe, unlike inf).
NEVER = 1.0 + 1e-6


def labeled_density(annotation_lists: Iterable[Sequence[dict]], category_ids: Sequence[int]) -> dict[int, float]:
    """Average number of (non-crowd) instances per image for each category id."""
    counts = {int(c): 0 for c in category_ids}
    images = 0
    for annotations in annotation_lists:
        images += 1
        for ann in annotations or ():
            if ann.get("iscrowd"):
                continue
            cid = int(ann["category_id"])
            if cid in counts:
                counts[cid] += 1
    if images == 0:
        raise MaskrayError("density rule: the labeled dataset has no images")
    return {c: n / images for c, n in counts.items()}


def density_thresholds(scores: dict[int, Sequence[float]], num_images: int,
                       target_per_image: dict[int, float], *, floor: float = 0.0) -> dict[int, float]:
    """Per-class thresholds so that ``#{score >= t_c} / num_images`` matches
    ``target_per_image[c]`` (rounded to whole instances): ``t_c`` is the k-th highest score with
    ``k = round(target * num_images)``; never below ``floor``; :data:`NEVER` when ``k == 0``."""
    if num_images <= 0:
        raise MaskrayError("density rule: no unlabeled images to threshold")
    thresholds = {}
    for cid, target in target_per_image.items():
        k = int(round(target * num_images))
        s = np.sort(np.asarray(scores.get(cid, ()), dtype=np.float64))[::-1]
        if k <= 0:
            t = NEVER
        elif k >= len(s):
            t = floor
        else:
            t = float(s[k - 1])
        thresholds[int(cid)] = float(max(t, floor))
    return thresholds


def apply_thresholds(instances: Sequence[dict], thresholds: dict[int, float]) -> list[dict]:
    """The instances (dicts with ``category_id`` and ``score``) at or above their class's threshold."""
    return [a for a in instances if a["score"] >= thresholds.get(int(a["category_id"]), NEVER)]


def choose_thresholds(config: ThresholdConfig, category_ids: Sequence[int], *,
                      labeled: Iterable[Sequence[dict]] | None = None,
                      scores: dict[int, Sequence[float]] | None = None, images: int = 0) -> dict[int, float]:
    """Per-class thresholds: ``config.value`` for every class (fixed), or the density rule from
    the ``labeled`` annotation lists and the candidates' ``scores`` per category over ``images``
    unlabeled images."""
    if config.mode == "fixed":
        return {int(c): float(config.value) for c in category_ids}
    if labeled is None or scores is None:
        raise MaskrayError("density rule: needs the labeled annotations and the candidates' scores")
    density = labeled_density(labeled, category_ids)
    thresholds = density_thresholds(scores, images, density, floor=config.floor)
    for cid in category_ids:
        logger.info("pseudo-labels: category %s: labeled %.2f/image -> threshold %.3f", cid, density[int(cid)],
                    thresholds[int(cid)])
    return thresholds
