"""pipeline.inference without Ray: the predictor against the plain model, the CPU stages on bad
images, the exactly-once shard collector, commits, resume checks and COCO JSON."""

from __future__ import annotations

import argparse
import io
import json
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from model.checkpoint import ModelConfig, build_from_config, save_checkpoint
from model.errors import MaskrayError
from pipeline import format as fmt
from pipeline import inference
from pipeline.inference import Predictor, ShardCollector, predict_images

SIZE = 64
CATEGORIES = [{"id": 3, "name": "a"}, {"id": 9, "name": "b"}]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = ModelConfig.for_categories(
        CATEGORIES, backbone="resnet18", min_size=SIZE, max_size=96, box_detections_per_img=5,
        options={"rpn_pre_nms_top_n_test": 60, "rpn_post_nms_top_n_test": 30})
    return build_from_config(config).eval(), config


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def images(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 48 + 8 * i, 80), dtype=torch.uint8, generator=g) for i in range(n)]


def test_predict_images_matches_the_plain_model(tiny):
    model, config = tiny
    ims = images(2)
    with torch.inference_mode():
        expected = model([im.float() / 255 for im in ims])
    got = predict_images(model, ims)
    for e, g, im in zip(expected, got, ims):
        assert len(g["scores"]) == len(e["scores"]) > 0
        torch.testing.assert_close(g["boxes"], e["boxes"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(g["scores"], e["scores"], atol=1e-4, rtol=1e-4)
        assert torch.equal(g["labels"], e["labels"])
        assert g["masks"].shape == (len(e["scores"]), 1, *im.shape[-2:])
        torch.testing.assert_close(g["masks"], e["masks"], atol=1e-3, rtol=1e-3)


def test_score_threshold_and_tta_hook(tiny):
    model, config = tiny
    predictor = Predictor(model=model, config=config, score_threshold=0.3)
    ims = images(1)
    out = predictor(ims)[0]  # calling with a list of tensors is the plain loop
    assert bool((out["scores"] >= 0.3).all())

    def hflip(predict_fn, batch):
        outs = predict_fn([im.flip(-1) for im in batch])
        for o, im in zip(outs, batch):
            w = im.shape[-1]
            o["boxes"] = torch.stack([w - o["boxes"][:, 2], o["boxes"][:, 1], w - o["boxes"][:, 0], o["boxes"][:, 3]], 1)
            o["masks"] = o["masks"].flip(-1)
        return outs

    flipped = predict_images(predictor, ims, transforms=hflip)[0]
    assert flipped["masks"].shape[-2:] == ims[0].shape[-2:]
    assert bool((flipped["boxes"][:, 0] <= flipped["boxes"][:, 2]).all())


def stage_input(rows: list[tuple[str, bytes]]) -> pa.Table:
    return pa.table({
        "image_id": pa.array(range(1, len(rows) + 1), pa.int64()),
        "file_name": [name for name, _ in rows],
        "image": pa.array([data for _, data in rows], pa.binary()),
        "shard": ["part-00000.parquet"] * len(rows),
        "row": pa.array(range(len(rows)), pa.int64()),
    })


def test_cpu_and_model_stages_give_one_row_per_image(tiny):
    from pycocotools import mask as mask_utils

    model, config = tiny
    rng = np.random.default_rng(0)
    good = png(rng.integers(0, 255, (40, 72, 3), dtype=np.uint8))
    rows = [
        ("good.png", good),
        ("truncated.png", good[: len(good) // 2]),
        ("zero.png", b""),
        ("junk.jpg", b"not an image"),
        ("gray16.png", png(rng.integers(0, 65535, (30, 50), dtype=np.uint16))),
        ("rgba.png", png(rng.integers(0, 255, (30, 50, 4), dtype=np.uint8), "RGBA")),
        ("big.png", png(np.zeros((100, 100, 3), np.uint8))),
    ]
    pre = inference._preprocess(stage_input(rows), min_size=SIZE, max_size=96, max_pixels=5_000)
    errors = dict(zip(pre.column("file_name").to_pylist(), pre.column("error").to_pylist()))
    assert {k for k, v in errors.items() if v} == {"truncated.png", "zero.png", "junk.jpg", "big.png"}
    assert "MP" in errors["big.png"]
    assert pre.column("height").to_pylist()[0] == 40 and pre.column("rwidth").to_pylist()[0] == 96  # 96/72 < 64/40

    predictor = Predictor(model=model, config=config, score_threshold=0.0, model_id="m")
    post = inference._postprocess(predictor(pre), category_ids=config.category_ids())
    assert post.num_rows == len(rows)
    assert post.column("row").to_pylist() == list(range(len(rows)))
    by_name = dict(zip(post.column("file_name").to_pylist(), post.to_pylist()))
    from pipeline.dataset import decode_image

    plain = predictor.predict([decode_image(good)])[0]
    got = by_name["good.png"]["instances"]
    assert len(got) == len(plain["scores"]) > 0
    for inst, box in zip(got, plain["boxes"].tolist()):
        assert inst["category_id"] in (3, 9)
        np.testing.assert_allclose(inst["bbox"], [box[0], box[1], box[2] - box[0], box[3] - box[1]], atol=1e-2)
        assert mask_utils.decode(inst["segmentation"]).shape == (40, 72)
    for name in ("truncated.png", "zero.png", "junk.jpg", "big.png"):
        assert by_name[name]["instances"] == [] and by_name[name]["error"]
    for name in ("gray16.png", "rgba.png"):
        assert by_name[name]["error"] is None


def test_no_detections_and_a_failing_image_only_cost_their_own_rows(tiny, monkeypatch):
    model, config = tiny
    rows = [(f"{i}.png", png(np.full((32, 32, 3), 40 * i, np.uint8))) for i in range(3)]
    pre = inference._preprocess(stage_input(rows), min_size=SIZE, max_size=96, max_pixels=None)
    blind = Predictor(model=model, config=config, score_threshold=1.0)
    post = inference._postprocess(blind(pre), category_ids=config.category_ids())
    assert post.column("instances").to_pylist() == [[], [], []]
    assert post.column("error").to_pylist() == [None, None, None]

    predictor = Predictor(model=model, config=config)
    real = predictor.forward_resized

    def flaky(batch, sizes):
        if len(batch) > 1 or float(batch[0].mean()) > 0.2:  # the whole batch, then image 2 alone
            raise RuntimeError("out of memory")
        return real(batch, sizes)

    monkeypatch.setattr(predictor, "forward_resized", flaky)
    out = predictor(pre)
    assert out.column("pred").null_count == 1
    errors = out.column("error").to_pylist()
    assert errors[:2] == [None, None] and "out of memory" in errors[2]


def test_read_rows_takes_exact_row_ranges_across_row_groups(tmp_path):
    rows = [fmt.make_row(image_id=10 + i, file_name=f"{i}.png", width=1, height=1, image=bytes([i]))
            for i in range(8)]
    uri = str(tmp_path / "part-00000.parquet")
    pq.write_table(fmt.rows_to_table(rows), uri, row_group_size=3)
    units = pa.Table.from_pylist([{"shard": "part-00000.parquet", "uri": uri, "start": a, "stop": b, "total": 8}
                                  for a, b in ((0, 2), (2, 7), (7, 8))])
    out = inference._read_rows(units, columns=inference.READ_COLUMNS)
    assert out.column("row").to_pylist() == list(range(8))
    assert out.column("image_id").to_pylist() == [10 + i for i in range(8)]
    assert out.column("image").to_pylist() == [bytes([i]) for i in range(8)]
    assert set(out.column("shard").to_pylist()) == {"part-00000.parquet"}
    wrong = pa.Table.from_pylist([{"shard": "p", "uri": uri, "start": 0, "stop": 2, "total": 9}])
    with pytest.raises(MaskrayError, match="has 8 rows but the manifest says 9"):
        inference._read_rows(wrong, columns=inference.READ_COLUMNS)


def piece(shard: str, rows: list[int]) -> pa.Table:
    return pa.table({"shard": [shard] * len(rows), "row": pa.array(rows, pa.int64())})


def test_shard_collector_commits_each_shard_once_without_duplicates():
    commits: list[tuple[str, list[int]]] = []
    collector = ShardCollector({"a": 3, "b": 2}, lambda name, pieces: commits.append(
        (name, sorted(r for p in pieces for r in p.column("row").to_pylist()))))
    collector.add(pa.concat_tables([piece("a", [0, 1]), piece("b", [1])]))
    collector.add(piece("a", [1, 0]))  # a retried batch
    assert commits == []
    collector.add(pa.concat_tables([piece("a", [2]), piece("b", [0])]))
    assert commits == [("a", [0, 1, 2]), ("b", [0, 1])]
    collector.add(piece("a", [2]))  # late duplicate of a committed shard
    collector.finish()
    assert len(commits) == 2 and collector.duplicates == 3

    with pytest.raises(MaskrayError, match="more rows"):
        ShardCollector({"a": 1}, lambda *a: None).add(piece("a", [1]))
    with pytest.raises(MaskrayError, match="unknown shard"):
        ShardCollector({"a": 1}, lambda *a: None).add(piece("z", [0]))
    incomplete = ShardCollector({"a": 2}, lambda *a: None)
    incomplete.add(piece("a", [0]))
    with pytest.raises(MaskrayError, match=r"a \(1/2 rows\)"):
        incomplete.finish()


def result_piece(shard: str, rows: list[int], instances: list[list[dict]], errors: list[str | None]) -> pa.Table:
    return pa.table({
        "shard": [shard] * len(rows), "row": pa.array(rows, pa.int64()),
        "image_id": pa.array([100 + r for r in rows], pa.int64()), "file_name": [f"{r}.png" for r in rows],
        "instances": pa.array(instances, fmt.RESULT_SCHEMA.field("instances").type),
        "error": pa.array(errors, pa.string()),
    })


def test_commit_resume_check_and_coco_json(tmp_path, monkeypatch):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    mask = np.zeros((20, 30), np.uint8, order="F")
    mask[2:8, 3:9] = 1
    rle = mask_utils.encode(mask)
    inst = {"category_id": 3, "score": 0.9, "bbox": [3.0, 2.0, 6.0, 6.0],
            "segmentation": {"size": [20, 30], "counts": rle["counts"]}}
    out = str(tmp_path / "out")
    uri = inference.result_uri(out, "s3-ish/prefix/part-00007.parquet")
    assert uri.endswith("/out/part-00007.parquet")
    pieces = [result_piece("x", [1], [[]], ["decode failed: junk"]), result_piece("x", [0], [[inst, inst]], [None])]
    assert inference._commit(uri, pieces, "ckpt#sha256:abc") == (2, 1, 2)
    table = pq.read_table(uri)
    assert table.schema.equals(fmt.RESULT_SCHEMA)
    assert table.column("image_id").to_pylist() == [100, 101]  # ordered by input row
    assert set(table.column("model").to_pylist()) == {"ckpt#sha256:abc"}
    assert inference._complete_rows(uri) == 2
    assert inference._complete_rows(str(tmp_path / "out" / "missing.parquet")) is None
    (tmp_path / "out" / "broken.parquet").write_bytes(b"PAR1 not parquet")
    assert inference._complete_rows(str(tmp_path / "out" / "broken.parquet")) is None

    json_path = str(tmp_path / "coco.json")
    assert inference.write_coco_json(out, ["part-00007.parquet"], json_path) == 2
    gt = COCO()
    gt.dataset = {"images": [{"id": 100, "width": 30, "height": 20}, {"id": 101, "width": 30, "height": 20}],
                  "annotations": [], "categories": CATEGORIES}
    gt.createIndex()
    res = gt.loadRes(json_path)
    assert len(res.getAnnIds()) == 2
    assert json.load(open(json_path))[0]["segmentation"]["counts"] == rle["counts"].decode()


def test_finished_shards_are_skipped_without_starting_ray(tmp_path, tiny, monkeypatch):
    import ray

    model, config = tiny
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    ckpt = str(tmp_path / "ckpt.pt")
    save_checkpoint(ckpt, model, config)
    infos = []
    (tmp_path / "data").mkdir()
    for index, count in enumerate((2, 0)):
        path = fmt.SHARD_PATTERN.format(index=index)
        rows = [fmt.make_row(image_id=index * 10 + i, file_name=f"{i}.png", width=1, height=1, image=b"x")
                for i in range(count)]
        pq.write_table(fmt.rows_to_table(rows), f"{data}/{path}")
        infos.append(fmt.ShardInfo(path=path, images=count, instances=0))
    fmt.write_manifest(data, fmt.Manifest(categories=CATEGORIES, shards=infos))
    inference._commit(inference.result_uri(out, infos[0].path),
                      [result_piece("part-00000.parquet", [0, 1], [[], []], [None, None])], "m")
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray must not start"))

    summary = inference.run_inference(data, out, ckpt, coco_json=str(tmp_path / "c.json"))
    assert (summary.shards_skipped, summary.shards_done, summary.images, summary.images_skipped) == (1, 1, 0, 2)
    assert pq.read_table(inference.result_uri(out, infos[1].path)).num_rows == 0  # empty shard committed
    assert "images: 0  errors: 0  instances: 0" in summary.line()


def test_job_arguments():
    from jobs import infer

    parser = argparse.ArgumentParser()
    infer.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", "c", "--input", "i", "--output", "o", "--actors", "1,3"])
    assert infer.parse_actors(args.actors) == (1, 3) and args.batch_size == 4 and args.gpus_per_actor is None
    assert args.threads is None
    assert infer.parse_actors("2") == 2
    for bad in ("0", "3,1", "x"):
        with pytest.raises(MaskrayError, match="--actors"):
            infer.parse_actors(bad)
    args.batch_size = 0
    with pytest.raises(MaskrayError, match="--batch-size"):
        infer.run(args)
    args.batch_size, args.threads = 4, -1
    with pytest.raises(MaskrayError, match="--threads"):
        infer.run(args)


def test_cpu_actor_threads_share_the_cluster_cores():
    assert inference.cpu_actor_threads([2.0], 1) == 2  # one actor on a 2-core node: both cores
    assert inference.cpu_actor_threads([2.0], 2) == 1
    assert inference.cpu_actor_threads([2.0], 3) == 1  # never below one thread
    assert inference.cpu_actor_threads([16.0, 16.0], 4) == 8
    assert inference.cpu_actor_threads([16.0, 4.0], 1) == 16  # no more than the largest node has
    assert inference.cpu_actor_threads([0.0], 1) == 1  # a GPU-only view of the cluster
    with pytest.raises(MaskrayError, match="actors"):
        inference.cpu_actor_threads([2.0], 0)


class LaneRecorder(Predictor):
    """Records, per lane: its thread, its number of images and torch's threads in it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def _forward_lane(self, images, original_sizes, cpu, intra):
        out = super()._forward_lane(images, original_sizes, cpu, intra)
        self.calls.append((threading.get_ident(), len(images), torch.get_num_threads()))
        return out


def test_lanes_split_a_batch_and_keep_its_order(tiny):
    model, config = tiny
    g = torch.Generator().manual_seed(3)
    ims = [torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8, generator=g) for _ in range(5)]
    floats = [im.float() / 255 for im in ims]
    sizes = [(64, 80)] * 5
    before = torch.get_num_threads()
    try:
        expected = Predictor(model=model, config=config).forward_resized(floats, sizes)
        lanes = LaneRecorder(model=model, config=config, threads=2)
        got = lanes.forward_resized(floats, sizes)
        # 5 images on 2 threads: lanes of 2 and 3 images on two threads, 1 torch thread each.
        assert sorted(n for _, n, _ in lanes.calls) == [2, 3]
        assert len({ident for ident, _, _ in lanes.calls}) == 2
        assert [t for _, _, t in lanes.calls] == [1, 1]
        assert len(got) == 5
        for e, o in zip(expected, got):
            assert len(o["scores"]) == len(e["scores"]) > 0
            torch.testing.assert_close(o["boxes"], e["boxes"], atol=1e-3, rtol=1e-4)
            torch.testing.assert_close(o["masks"], e["masks"], atol=1e-3, rtol=1e-3)
        lanes.calls.clear()
        lanes.forward_resized(floats[:1], sizes[:1])  # one image: one lane on both threads
        assert [(n, t) for _, n, t in lanes.calls] == [(1, 2)]
        assert lanes.forward_resized([], []) == []
    finally:
        torch.set_num_threads(before)
    with pytest.raises(MaskrayError, match="threads"):
        Predictor(model=model, config=config, threads=-2)


def test_tta_can_rescale_the_predictor(tiny):
    from pipeline.pseudo import _model_scale

    model, config = tiny
    predictor = Predictor(model=model, config=config)
    assert (predictor.min_size, predictor.max_size) == (SIZE, 96)
    image = images(1)[0]
    with _model_scale(predictor, 0.5):
        assert (predictor.min_size, predictor.max_size) == (32, 48)
        half = predictor.predict([image])[0]
    assert (predictor.min_size, predictor.max_size) == (SIZE, 96)
    assert half["masks"].shape[-2:] == image.shape[-2:]  # still in the input's frame
