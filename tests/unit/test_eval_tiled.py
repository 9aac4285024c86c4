"""Evaluation of large images tiled as ``maskray infer --tile`` segments them
(:func:`pipeline.infer.tiles.segment_tiled`, ``evaluate_model(tile=...)``, ``maskray eval --tile``,
the train config's ``eval.tile``), no Ray.

The image is a mosaic of small synthetic labelled images (:func:`pipeline.data.synth.make_image`)
placed after an offset so that tile seams cut objects. The model is an ORACLE answering like
``Predictor.forward_uint8``: it finds where its input's pixels come from in the mosaic (a tile
region, exactly, or the whole mosaic shrunk for the whole-image pass) and reports the ground
truth visible there (boxes in the input's frame, ``M`` x ``M`` mask probabilities of the visible
part), so what is tested is the tiling: the same inputs, instances and RLEs as the Ray path's
own functions, and a COCO score near 1 only when the seams are merged.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from jobs import cli
from model.checkpoint import ModelConfig
from pipeline.config import ConfigError
from pipeline.data.format import make_annotation, make_row
from pipeline.data.synth import categories_for, make_image
from pipeline.evaluate import evaluate_model
from pipeline.infer import tiles
from pipeline.train.config import TrainConfig

CATEGORIES = [dict(c, id=10 + k) for k, c in enumerate(categories_for(3))]  # ids 10.. : labels map to ids
CELL, GRID, OFFSET = 128, 3, 37  # 3 x 3 cells of 128 px after 37 px of background: seams cut objects
TILE, OVERLAP = 160, 0.25
MODEL_SIZE = (128, 1333)  # the oracle's (min_size, max_size): the whole-image pass shrinks to 128 px
MIN_PIXELS = 8  # a sliver smaller than this at a tile border is not reported (a model would miss it too)
M = 28  # the oracle's mask resolution, torchvision's (its masks: aligned RoIAlign of the visible part)


def mask_of(segmentation, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode()}
    return mask_utils.decode(rle).astype(bool)


def build_mosaic() -> tuple[np.ndarray, list[dict]]:
    """The mosaic, uint8 ``[3,H,W]``, and its objects (``label`` 1..K, full-size bool ``mask``)."""
    size = OFFSET + GRID * CELL + 29
    canvas = np.full((size, size, 3), 127, dtype=np.uint8)
    objects = []
    for k in range(GRID * GRID):
        data, anns = make_image(3, k, CELL, CATEGORIES, crowd_fraction=0.0, min_objects=2, max_objects=4)
        y0, x0 = OFFSET + (k // GRID) * CELL, OFFSET + (k % GRID) * CELL
        canvas[y0:y0 + CELL, x0:x0 + CELL] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        for ann in anns:
            full = np.zeros((size, size), dtype=bool)
            full[y0:y0 + CELL, x0:x0 + CELL] = mask_of(ann["segmentation"], CELL, CELL)
            if full.sum() >= 30:
                label = [c["id"] for c in CATEGORIES].index(ann["category_id"]) + 1
                objects.append({"label": label, "mask": full})
    return np.ascontiguousarray(canvas.transpose(2, 0, 1)), objects


MOSAIC, OBJECTS = build_mosaic()
HEIGHT, WIDTH = MOSAIC.shape[1:]


class Oracle:
    """``forward_uint8`` of a model that sees the ground truth of the pixels it is given; its
    ``transform`` carries the model's sizes (read for the whole-image pass)."""

    transform = SimpleNamespace(min_size=(MODEL_SIZE[0],), max_size=MODEL_SIZE[1])

    def __init__(self, overlap: float = OVERLAP) -> None:
        self.overlap = overlap  # of the tiles it is shown
        self.inputs: list[tuple[int, int]] = []  # (h, w) of every input, in call order

    def region(self, image: np.ndarray) -> tiles.Box:
        """Where ``image`` comes from: a tile whose pixels it is exactly, or the whole mosaic
        (as it is, or shrunk to the whole-image pass's size)."""
        h, w = image.shape[1:]
        if (h, w) in ((HEIGHT, WIDTH), tuple(reversed(tiles.full_pass_size(WIDTH, HEIGHT, *MODEL_SIZE)))):
            return (0, 0, WIDTH, HEIGHT)
        for x0, y0, x1, y1 in tiles.plan_tiles(WIDTH, HEIGHT, TILE, self.overlap):
            if (y1 - y0, x1 - x0) == (h, w) and np.array_equal(MOSAIC[:, y0:y1, x0:x1], image):
                return (x0, y0, x1, y1)
        raise AssertionError(f"a {w}x{h} input that is no region of the mosaic")

    def predict(self, image: np.ndarray) -> dict[str, np.ndarray]:
        from torchvision.ops import roi_align

        x0, y0, x1, y1 = self.region(image)
        sx, sy = image.shape[2] / (x1 - x0), image.shape[1] / (y1 - y0)
        boxes, labels, masks = [], [], []
        for obj in OBJECTS:
            visible = obj["mask"][y0:y1, x0:x1]
            if visible.sum() < MIN_PIXELS:
                continue
            ys, xs = np.nonzero(visible)
            tight = visible[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            boxes.append([xs.min() * sx, ys.min() * sy, (xs.max() + 1) * sx, (ys.max() + 1) * sy])
            labels.append(obj["label"])
            masks.append(roi_align(torch.from_numpy(tight.astype(np.float32))[None, None],
                                   [torch.tensor([[0.0, 0.0, float(tight.shape[1]), float(tight.shape[0])]])],
                                   (M, M), 1.0, aligned=True)[0].numpy())
        n = len(boxes)
        return {"boxes": np.array(boxes, np.float32).reshape(n, 4), "labels": np.array(labels, np.int64),
                "scores": np.linspace(0.95, 0.9, n, dtype=np.float32),
                "masks": np.array(masks, np.float32).reshape(n, 1, M, M)}

    def forward_uint8(self, images: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        assert all(im.dtype == torch.uint8 for im in images)
        self.inputs.extend(tuple(im.shape[1:]) for im in images)
        return [self.predict(im.numpy()) for im in images]


def oracle_stage(oracle: Oracle):
    """A model stage answering with ``oracle``: decoded part (one-row table) -> its unit dict with ``preds``."""

    def run(decoded) -> dict:
        row = decoded.to_pylist()[0]
        ims = [torch.frombuffer(bytearray(p), dtype=torch.uint8).view(3, h, w)
               for p, h, w in zip(row["pixels"], row["heights"], row["widths"])]
        return dict(row, preds=oracle.forward_uint8(ims), model="oracle")

    return run


def ray_path_instances(tmp_path, model_stage, image: np.ndarray = MOSAIC, *, tile: int = TILE,
                       full_pass: bool, model_size=MODEL_SIZE) -> list[dict]:
    """``image``'s instances through the Ray path's own functions, without Ray: the read stage
    (:func:`~pipeline.infer.stages.tiled_rows`), ``model_stage`` (a decoded part -> its unit dict
    with ``preds``: ``Predictor.run_units``), the post-processing
    (:func:`~pipeline.infer.stages.tile_table`) and the merge (:func:`~pipeline.infer.tiles.merge_image`)."""
    from pipeline.infer.stages import tile_table, tiled_rows

    (tmp_path / "in").mkdir()
    Image.fromarray(image.transpose(1, 2, 0)).save(tmp_path / "in" / "mosaic.png")
    unit = {"unit": "files-0000000-0000001.parquet", "source": "files", "uri": "", "start": 0, "stop": 0, "total": 0,
            "paths": [str(tmp_path / "in" / "mosaic.png")], "prefix": str(tmp_path / "in"), "only": []}
    tile_rows, regions = [], []
    for decoded in tiled_rows(unit, tile=tile, overlap=OVERLAP, full_pass=full_pass, model_size=model_size,
                              output_uri=str(tmp_path / "out"), max_whole_pixels=None, max_pixels=None):
        if not decoded.column("regions")[0].as_py():
            continue  # the unit's (empty) base
        ran = model_stage(decoded)
        tile_rows.extend(tile_table(ran, [c["id"] for c in CATEGORIES]).to_pylist())
        regions.extend(tuple(r) for r in ran["regions"])
    return tiles.merge_image(tile_rows, regions, image.shape[1:])["instances"]


@pytest.mark.parametrize("full_pass", [False, True])
def test_segment_tiled_gives_the_ray_paths_instances(tmp_path, full_pass):
    ray_oracle, oracle = Oracle(), Oracle()
    expected = ray_path_instances(tmp_path, oracle_stage(ray_oracle), full_pass=full_pass)
    found = tiles.segment_tiled(oracle.forward_uint8, [MOSAIC], tile=TILE, overlap=OVERLAP, full_pass=full_pass,
                                model_size=MODEL_SIZE, category_ids=[c["id"] for c in CATEGORIES])[0]
    grid = tiles.plan_tiles(WIDTH, HEIGHT, TILE, OVERLAP)
    assert len(grid) == 16 and oracle.inputs == ray_oracle.inputs  # the same model inputs, in the same order
    assert len(oracle.inputs) == len(grid) + full_pass
    assert len(found) == len(expected) == len(OBJECTS)  # seams merged: one instance per object
    for a, b in zip(found, expected):
        assert a["segmentation"]["counts"] == b["segmentation"]["counts"]  # the same RLE, byte for byte
        assert a["segmentation"]["size"] == [HEIGHT, WIDTH] == list(b["segmentation"]["size"])
        assert (a["category_id"], a["score"]) == (b["category_id"], pytest.approx(b["score"]))
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)  # the Ray path stores float32


def test_images_no_larger_than_the_tile_take_the_plain_path():
    from pipeline.results import to_result_instances

    small = np.ascontiguousarray(MOSAIC[:, :TILE, 10:TILE])
    pred = {"boxes": np.array([[5, 6, 40, 50], [100, 90, 149, 159]], np.float32), "labels": np.array([1, 3]),
            "scores": np.array([0.9, 0.8], np.float32), "masks": np.full((2, 1, M, M), 0.7, np.float32)}
    calls = []

    def forward(images):
        calls.append([tuple(im.shape) for im in images])
        return [pred for _ in images]

    found = tiles.segment_tiled(forward, [small, torch.from_numpy(small)], tile=TILE, overlap=OVERLAP,
                                category_ids=[c["id"] for c in CATEGORIES], batch_size=4)
    assert calls == [[(3, TILE, TILE - 10)] * 2]  # one batch, whole, as a unit's untiled images
    plain = to_result_instances(pred["boxes"], pred["labels"], pred["scores"], pred["masks"], TILE, TILE - 10,
                                [c["id"] for c in CATEGORIES])
    assert found == [plain, plain]


def mosaic_row() -> dict:
    buf = io.BytesIO()
    Image.fromarray(MOSAIC.transpose(1, 2, 0)).save(buf, format="PNG", compress_level=1)
    anns = []
    for k, obj in enumerate(OBJECTS):
        rle = mask_utils.encode(np.asfortranarray(obj["mask"].astype(np.uint8)))
        anns.append(make_annotation(id=k + 1, category_id=CATEGORIES[obj["label"] - 1]["id"],
                                    bbox=mask_utils.toBbox(rle).tolist(), area=float(obj["mask"].sum()),
                                    iscrowd=False, size=rle["size"], counts=rle["counts"]))
    return make_row(image_id=1, file_name="mosaic.png", width=WIDTH, height=HEIGHT, image=buf.getvalue(),
                    annotations=anns)


def test_tiled_evaluation_scores_what_tiled_inference_segments():
    row = mosaic_row()
    merged = evaluate_model(Oracle(), [row], CATEGORIES, tile=TILE, tile_overlap=OVERLAP)
    assert merged["segm"]["AP"] >= 0.9 and merged["bbox"]["AP"] >= 0.9
    assert merged["segm"]["AP50"] == pytest.approx(1.0)  # every object once: none lost, split or doubled
    # no overlap: the tiles share no pixels, an object cut by a seam stays two instances
    cut = evaluate_model(Oracle(overlap=0.0), [row], CATEGORIES, tile=TILE, tile_overlap=0.0)
    assert cut["segm"]["AP50"] < 0.95 and cut["segm"]["AP"] < merged["segm"]["AP"]
    with_whole = evaluate_model(Oracle(), [row], CATEGORIES, tile=TILE, tile_overlap=OVERLAP, tile_full_pass=True)
    assert with_whole["segm"]["AP"] >= 0.9  # the whole-image pass's detections merge into the tiles'


@pytest.mark.parametrize("section,message", [
    ({"tile": 16}, "eval.tile: must be 0 (off) or >= 32 px, got 16"),
    ({"tile": 256, "tile_overlap": 0.95}, "eval.tile_overlap: must be in [0, 0.9], got 0.95"),
    ({"tile": 256, "tile_overlap": -0.1}, "eval.tile_overlap: must be in [0, 0.9], got -0.1"),
    ({"tile_full_pass": True}, "eval.tile_full_pass: needs eval.tile > 0"),
])
def test_bad_eval_tile_values_are_one_line_naming_the_key(section, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"data": {"train": "/d"}, "eval": section}, source="run.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="tile"):
        evaluate_model(Oracle(), [], CATEGORIES, **section)  # the same rule, before any image is read


def test_tiled_evaluation_of_a_model_it_cannot_run_is_one_line():
    from model.errors import MaskrayError

    with pytest.raises(MaskrayError, match="tiled evaluation runs a torchvision-style detector .* Linear has neither"):
        evaluate_model(torch.nn.Linear(1, 1), [mosaic_row()], CATEGORIES, tile=TILE)


def test_eval_tile_defaults_are_off():
    config = TrainConfig.from_dict({"data": {"train": "/d"}})
    assert (config.eval.tile, config.eval.tile_overlap, config.eval.tile_full_pass) == (0, 0.2, False)


def test_eval_job_flags_reach_evaluate_model(monkeypatch, capsys):
    seen = {}

    def fake_evaluate(model, data, categories, **kwargs):
        seen.update(kwargs, data=data)
        return {"bbox": dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm", "APl"), 0.5)}

    config = ModelConfig.for_categories(CATEGORIES, backbone="resnet18")
    monkeypatch.setattr("pipeline.evaluate.evaluate_model", fake_evaluate)
    monkeypatch.setattr("pipeline.evaluate.load_checkpoint_uri", lambda uri: (None, config, {}))
    monkeypatch.setattr("pipeline.data.format.read_manifest", lambda uri: SimpleNamespace(categories=CATEGORIES))
    base = ["--checkpoint", "c.pt", "--data", "shards", "--device", "cpu"]
    assert cli.module_main("eval", [*base, "--tile", "512", "--tile-overlap", "0.3", "--tile-full-pass"]) == 0
    assert (seen["tile"], seen["tile_overlap"], seen["tile_full_pass"]) == (512, 0.3, True)
    assert cli.module_main("eval", base) == 0
    assert (seen["tile"], seen["tile_overlap"], seen["tile_full_pass"]) == (0, 0.2, False)  # off by default
    seen.clear()
    capsys.readouterr()
    assert cli.module_main("eval", [*base, "--tile", "16"]) == 1
    err = capsys.readouterr().err.strip()
    assert "tile: must be 0 (off) or >= 32 px, got 16" in err and len(err.splitlines()) == 1 and not seen


def test_train_eval_hook_passes_the_eval_tile_settings(monkeypatch):
    from pipeline.train.hooks import Due, EvalHook
    from pipeline.train.loop import RunPlan, Worker

    seen = {}

    def fake_evaluate(model, data, categories, **kwargs):
        seen.update(kwargs)
        return {"bbox": {"AP": 0.5, "AP50": 0.7}, "segm": {"AP": 0.4, "AP50": 0.6}}

    monkeypatch.setattr("pipeline.evaluate.evaluate_model", fake_evaluate)
    config = TrainConfig.from_dict({"data": {"train": "/d", "val": "/d/val"},
                                    "eval": {"tile": 512, "tile_overlap": 0.3, "tile_full_pass": True}})
    plan = RunPlan(categories=CATEGORIES, train_images=10, val_images=1, total_iters=10, lr=0.01, global_batch=2)
    w = Worker(config, plan, torch.nn.Linear(1, 1), config.model.model_config(CATEGORIES), None, [],
               torch.device("cpu"))
    metrics, lines = {}, []
    EvalHook(lines.append).after_interval(w, metrics, Due(False, True, False))
    assert (seen["tile"], seen["tile_overlap"], seen["tile_full_pass"]) == (512, 0.3, True)
    assert metrics["segm_AP"] == 0.4 and lines and not w.stop_reason


def test_a_real_model_is_scored_on_what_the_model_actor_writes(tmp_path):
    """A Mask R-CNN (random weights, a few detections per input, 64-px tiles of a corner of the
    mosaic: fast on CPU): ``evaluate_model(tile=...)``'s instances are those that the Ray path's
    read stage, model stage (``Predictor.run_units``, as ``SegmentAndWrite`` runs it) and merge make."""
    from model.checkpoint import build_from_config
    from pipeline.evaluate import segment_rows_tiled
    from pipeline.infer.predictor import Predictor

    tile, image = 64, np.ascontiguousarray(MOSAIC[:, 30:150, 20:170])
    torch.manual_seed(0)
    config = ModelConfig.for_categories(CATEGORIES, backbone="resnet18", min_size=tile, max_size=tile,
                                        box_score_thresh=0.0, box_detections_per_img=4,
                                        options={"rpn_pre_nms_top_n_test": 30, "rpn_post_nms_top_n_test": 8})
    model = build_from_config(config).eval()
    actor = Predictor(model=model, config=config, device="cpu", amp=False, batch_size=4)
    # the driver's model_size: the model config's (min_size, max_size)
    expected = ray_path_instances(tmp_path, lambda decoded: actor.run_units(decoded)[0], image, tile=tile,
                                  full_pass=True, model_size=(config.min_size, config.max_size))
    buf = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buf, format="PNG")
    row = make_row(image_id=1, file_name="corner.png", width=150, height=120, image=buf.getvalue())
    (_, found), = segment_rows_tiled(model, [row], tile=tile, tile_overlap=OVERLAP, tile_full_pass=True,
                                     category_ids=[c["id"] for c in CATEGORIES], batch_size=4)
    assert len(tiles.plan_tiles(150, 120, tile, OVERLAP)) == 9 and len(expected) > 0 and len(found) == len(expected)
    for a, b in zip(found, expected):
        assert a["segmentation"]["counts"] == b["segmentation"]["counts"] and a["category_id"] == b["category_id"]
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3) and a["score"] == pytest.approx(b["score"], abs=1e-6)
