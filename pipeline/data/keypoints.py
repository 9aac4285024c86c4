"""Keypoint skeletons of COCO categories: names, skeleton, the flip map, and checks of one
annotation's ``[x, y, v] × K`` (GUIDE "Dataset format").

A category with keypoints carries COCO's ``keypoints`` (K unique names) and ``skeleton``
(pairs of 1-based keypoint indices); a category without them has K = 0. An annotation of a
category with K keypoints holds ``keypoints`` as 3K numbers ``x, y, v`` (pixels; ``v`` 0 = not
labeled, 1 = labeled but not visible, 2 = visible) and ``num_keypoints``, the count of ``v > 0``.

The flip map of a horizontal flip is a permutation of the K indices: ``flipped[i] =
original[flip[i]]`` after the x coordinates are mirrored. It comes from the names (COCO's
``left_*`` / ``right_*``, see :data:`FLIP_PREFIXES`) or from given pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from model.errors import MaskrayError

# name prefixes that pair keypoints under a horizontal flip: "left_eye" <-> "right_eye"
FLIP_PREFIXES = (("left_", "right_"),)
VISIBILITY = (0, 1, 2)

# COCO person's 17 keypoints and skeleton (person_keypoints_*.json)
COCO_PERSON_KEYPOINTS = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle"]
COCO_PERSON_SKELETON = [
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
    [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]


class KeypointError(MaskrayError):
    """A skeleton, flip map or annotation's keypoints are malformed."""


def keypoint_names(category: dict) -> list[str]:
    """The keypoint names of a COCO category dict (``[]`` when it has none)."""
    return list(category.get("keypoints") or [])


def check_category(category: dict) -> None:
    """Raise a one-line :class:`KeypointError` when ``keypoints``/``skeleton`` are malformed:
    names must be unique non-empty strings; skeleton pairs two different 1-based indices in
    1..K (and needs keypoints)."""
    where = f"category {category.get('id')!r} ({category.get('name')!r})"
    names = category.get("keypoints")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise KeypointError(f"{where}: 'keypoints' must be a list of names")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise KeypointError(f"{where}: keypoint names repeat: {dup}")
    skeleton = category.get("skeleton")
    if skeleton is None:
        return
    k = len(names or [])
    if not isinstance(skeleton, list):
        raise KeypointError(f"{where}: 'skeleton' must be a list of [a, b] pairs")
    for pair in skeleton:
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(i, int) and not isinstance(i, bool) for i in pair)
                and all(1 <= i <= k for i in pair) and pair[0] != pair[1]):
            raise KeypointError(f"{where}: skeleton pair {pair!r} must be two different 1-based "
                                f"keypoint indices in 1..{k}")


def check_annotation(keypoints: Any, num_keypoints: Any, k: int) -> tuple[str, str]:
    """``("", "")`` when one annotation's ``keypoints``/``num_keypoints`` fit a category with
    ``k`` keypoints, else ``(reason, detail)`` for a convert problem. ``None`` for both is
    always fine (no keypoints given), and so is ``[]`` on a category without keypoints.
    ``num_keypoints`` must equal the count of ``v > 0``:
    COCO's files are consistent, so a disagreement means a broken file and is an error (not
    silently recomputed)."""
    if keypoints is None:
        if num_keypoints not in (None, 0):
            return "malformed keypoints", f"num_keypoints {num_keypoints!r} without keypoints"
        return "", ""
    if k == 0:
        if keypoints == [] and num_keypoints in (None, 0):
            return "", ""  # some files write empty keypoints for every category
        return "keypoints on a category without keypoints", "the category names no keypoints"
    if not isinstance(keypoints, list):
        return "malformed keypoints", "keypoints must be a list of numbers"
    if len(keypoints) != 3 * k:
        return "malformed keypoints", f"{len(keypoints)} values, expected 3*{k} = {3 * k}"
    for i, value in enumerate(keypoints):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or abs(value) > 3.4e38:
            return "malformed keypoints", f"value {i} is {value!r}, not a finite number"
    vs = keypoints[2::3]
    for i, v in enumerate(vs):
        if v not in VISIBILITY:
            return "malformed keypoints", f"keypoint {i}: v={v!r} is not 0, 1 or 2"
    count = sum(1 for v in vs if v > 0)
    if num_keypoints is not None:
        if isinstance(num_keypoints, bool) or not isinstance(num_keypoints, (int, float)) \
                or num_keypoints != count:
            return "malformed keypoints", (f"num_keypoints {num_keypoints!r} but {count} "
                                           f"keypoints have v > 0")
    return "", ""


def flip_map(names: Sequence[str], given: Sequence[Sequence] | None = None) -> list[int]:
    """The horizontal-flip permutation of K keypoints: ``flip[i]`` is the index whose point
    becomes point ``i`` after mirroring (a pair swaps, an unpaired point maps to itself).

    ``given`` None: derived from the names, ``left_X`` <-> ``right_X`` (:data:`FLIP_PREFIXES`);
    a ``left_``/``right_`` name whose partner is missing is an error, other names map to
    themselves. ``given`` a list (``data.keypoint_flip_map``): pairs of names or of 0-based
    indices; an empty list is the identity. A pair naming an unknown keypoint, a keypoint
    paired with itself, or one used twice is a one-line :class:`KeypointError`.
    """
    names = list(names)
    k = len(names)
    index = {name: i for i, name in enumerate(names)}
    if len(index) != k:
        raise KeypointError(f"keypoint names repeat: {names}")
    flip = list(range(k))
    if given is None:
        for i, name in enumerate(names):
            for a, b in FLIP_PREFIXES:
                for mine, other in ((a, b), (b, a)):
                    if name.startswith(mine):
                        partner = other + name[len(mine):]
                        if partner not in index:
                            raise KeypointError(f"keypoint {name!r} has no partner {partner!r} to "
                                                f"flip with (set data.keypoint_flip_map)")
                        flip[i] = index[partner]
        return flip
    used: set[int] = set()
    for pair in given:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise KeypointError(f"flip pair {pair!r} must be [a, b] (two names or indices)")
        ids = []
        for item in pair:
            if isinstance(item, str):
                if item not in index:
                    raise KeypointError(f"flip pair {list(pair)!r} names unknown keypoint {item!r} "
                                        f"(keypoints: {names})")
                ids.append(index[item])
            elif isinstance(item, int) and not isinstance(item, bool):
                if not 0 <= item < k:
                    raise KeypointError(f"flip pair {list(pair)!r}: index {item} is outside 0..{k - 1}")
                ids.append(item)
            else:
                raise KeypointError(f"flip pair {list(pair)!r}: {item!r} is neither a name nor an index")
        a, b = ids
        if a == b:
            raise KeypointError(f"flip pair {list(pair)!r} pairs a keypoint with itself")
        for i in (a, b):
            if i in used:
                raise KeypointError(f"flip pair {list(pair)!r}: keypoint {names[i]!r} is already "
                                    f"in another pair")
            used.add(i)
        flip[a], flip[b] = b, a
    return flip
