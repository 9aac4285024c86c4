"""Helpers for the train integration tests: tiny labeled shapes datasets and small configs.

Datasets are written straight to maskray shards (``pipeline.data.synth`` images and annotations,
polygons turned into compressed RLE here), so these tests need neither ``maskray convert``
nor files on disk outside the dataset URI.
"""

from __future__ import annotations

import argparse
import os
import threading

from pipeline import storage

from pipeline.data.format import Manifest, ShardWriter, make_annotation, make_row, write_manifest, manifest_uri


# On a loaded shared machine the raylet gives up waiting for its agents after 30 s ("The current
# node timed out during startup"); the Ray instances these tests start wait longer.
os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")


def _rle(segmentation, height: int, width: int) -> dict:
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed (crowd)
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation)
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts if isinstance(counts, bytes) else counts.encode()}


def make_shapes_dataset(uri: str, *, images: int, seed: int = 0, size: int = 64, first_id: int = 1,
                        images_per_shard: int = 16, num_categories: int = 4,
                        corrupt: frozenset[int] = frozenset()) -> Manifest:
    """``images`` synthetic shapes images of ``size`` px as a maskray-shards/1 dataset at ``uri``;
    the images at the indices in ``corrupt`` are stored truncated (undecodable PNG)."""
    from pipeline.data.synth import categories_for, make_image

    categories = categories_for(num_categories)
    ann_id = 1
    with ShardWriter(uri, images_per_shard=images_per_shard) as writer:
        for index in range(images):
            png, anns = make_image(seed, index, size, categories)
            if index in corrupt:
                png = png[: len(png) // 2]
            image_id = first_id + index
            rows = []
            for ann in anns:
                rle = _rle(ann["segmentation"], size, size)
                rows.append(make_annotation(id=ann_id, category_id=ann["category_id"], bbox=ann["bbox"],
                                            area=ann["area"], iscrowd=bool(ann["iscrowd"]), size=rle["size"],
                                            counts=rle["counts"]))
                ann_id += 1
            writer.add(make_row(image_id=image_id, file_name=f"{image_id:06d}.png", width=size, height=size,
                                image=png, annotations=rows))
    manifest = Manifest(categories=[{"id": c["id"], "name": c["name"]} for c in categories],
                        shards=writer.shards, source=f"pipeline.data.synth seed={seed}")
    write_manifest(manifest_uri(uri), manifest)
    return manifest


def tiny_config(train: str, val: str, storage_path: str, name: str, **overrides) -> dict:
    """A config dict for a seconds-long CPU run on 64-px images (resnet18, few iterations)."""
    config = {
        "name": name,
        "storage_path": storage_path,
        "num_workers": 2,
        "cpus_per_worker": 0.5,
        "images_per_worker": 2,
        "log_every": 2,
        "data": {"train": train, "val": val, "val_max_images": 4, "shuffle_buffer": 0, "decode_cpus": 0.1},
        "model": {"backbone": "resnet18", "min_size": 64, "max_size": 64, "box_detections_per_img": 20,
                  "options": {"anchor_sizes": [[8], [16], [32], [64], [128]], "rpn_batch_size_per_image": 32,
                              "box_batch_size_per_image": 32, "rpn_pre_nms_top_n_train": 200,
                              "rpn_post_nms_top_n_train": 100, "rpn_pre_nms_top_n_test": 100,
                              "rpn_post_nms_top_n_test": 50}},
        "optim": {"base_lr": 0.002, "reference_batch": 4, "grad_clip": 1.0},
        "schedule": {"max_iters": 6, "warmup_iters": 2},
        "augment": {"hflip_prob": 0.5},
        "checkpoint": {"every": 2, "keep": 2},
        "eval": {"every": 0, "at_end": False},
    }
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return config


def write_config(path, config: dict) -> str:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return str(path)


def run_uri(config: dict) -> str:
    return storage.join(config["storage_path"], config["name"])


def checkpoint_registered(run_dir: str, name: str) -> bool:
    """Whether Ray Train has registered checkpoint ``name`` of a local run (its files can exist earlier)."""
    path = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
    try:
        with open(path) as f:
            return name in f.read()
    except OSError:
        return False


def run_in_thread(path: str) -> tuple[threading.Thread, dict]:
    """`maskray train --config PATH` in a thread; the dict gets "rc" or "error" when it ends."""
    from jobs import train

    outcome: dict = {}

    def target():
        try:
            outcome["rc"] = train.run(argparse.Namespace(config=path, overrides=[], verbose=False))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome
