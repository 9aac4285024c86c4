"""pipeline.infer.predictor without Ray: the predictor against the plain model, the bounded
segment path, the uint8 model stage, lanes and TTA rescaling."""

from __future__ import annotations

import io
import threading

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from model.checkpoint import ModelConfig, build_from_config
from model.errors import MaskrayError
from pipeline.infer.predictor import Predictor

SIZE = 64
CATEGORIES = [{"id": 3, "name": "a"}, {"id": 9, "name": "b"}]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = ModelConfig.for_categories(
        CATEGORIES, backbone="resnet18", min_size=SIZE, max_size=96, box_detections_per_img=5,
        options={"rpn_pre_nms_top_n_test": 60, "rpn_post_nms_top_n_test": 30})
    return build_from_config(config).eval(), config


def predict_images(model, images, *, transforms=None):
    """Predictions for ``images`` in their own frames (:meth:`Predictor.predict`), through the
    ``transforms`` TTA hook when given (``transforms(predict_fn, images)``)."""
    predictor = model if isinstance(model, Predictor) else Predictor(model=model, score_threshold=0.0)
    return predictor.predict(images) if transforms is None else transforms(predictor.predict, images)


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


def test_segment_equals_predict_plus_torchvision_paste_and_rle(tiny):
    """The bounded path (per-instance paste + RLE) gives the RLEs of predict's full-size masks."""
    from pipeline.instances import Instances
    from pipeline.results import result_instances_from_coco

    model, config = tiny
    predictor = Predictor(model=model, config=config, score_threshold=0.0)
    ims = images(2, seed=5)
    segmented = predictor.segment(ims)
    for im, got, plain in zip(ims, segmented, predictor.predict(ims)):
        size = tuple(im.shape[-2:])
        expected = result_instances_from_coco(Instances.from_output(plain, size).to_coco(0, config.category_ids()))
        assert len(got) == len(expected) > 0
        assert [g["segmentation"] for g in got] == [e["segmentation"] for e in expected]
        assert [g["category_id"] for g in got] == [e["category_id"] for e in expected]
        np.testing.assert_allclose([g["bbox"] for g in got], [e["bbox"] for e in expected], atol=1e-3)


def units_table(images_: list[torch.Tensor | None], errors: list[str | None] | None = None) -> pa.Table:
    errors = errors or [None if im is not None else "decode failed: x" for im in images_]
    return pa.table({
        "unit": ["u.parquet"], "positions": pa.array([list(range(len(images_)))], pa.list_(pa.int64())),
        "image_ids": pa.array([list(range(1, len(images_) + 1))], pa.list_(pa.int64())),
        "file_names": pa.array([[f"{i}.png" for i in range(len(images_))]], pa.list_(pa.string())),
        "heights": pa.array([[0 if im is None else int(im.shape[1]) for im in images_]], pa.list_(pa.int32())),
        "widths": pa.array([[0 if im is None else int(im.shape[2]) for im in images_]], pa.list_(pa.int32())),
        "pixels": pa.array([[b"" if im is None else im.numpy().tobytes() for im in images_]],
                           pa.list_(pa.large_binary())),
        "errors": pa.array([errors], pa.list_(pa.string())), "merge": [False],
    })


def test_model_stage_takes_uint8_and_isolates_a_failing_image(tiny, monkeypatch):
    from pipeline.infer.predictor import unpack

    model, config = tiny
    ims = images(3, seed=2)
    predictor = Predictor(model=model, config=config, model_id="m#sha256:1", batch_size=2)
    out = predictor(units_table([ims[0], None, ims[1], ims[2]]))
    assert out.column("model").to_pylist() == ["m#sha256:1"]
    preds = out.column("preds")[0].as_py()
    assert preds[1] is None and all(p is not None for p in (preds[0], preds[2], preds[3]))
    plain = predictor.forward_uint8([ims[0]])[0]
    np.testing.assert_allclose(unpack(preds[0])["boxes"], plain["boxes"].numpy(), atol=1e-4)

    real = predictor.forward_uint8

    def flaky(batch):
        if len(batch) > 1 or int(batch[0][0, 0, 0]) == int(ims[1][0, 0, 0]):  # the batch, then image 1 alone
            raise RuntimeError("out of memory")
        return real(batch)

    monkeypatch.setattr(predictor, "forward_uint8", flaky)
    out = predictor(units_table(ims[:2]))
    errors = out.column("errors")[0].as_py()
    assert errors[0] is None and "out of memory" in errors[1] and errors[1].startswith("inference failed:")
    assert out.column("preds")[0].as_py()[1] is None


def test_run_units_hands_the_writer_the_same_predictions_unpickled(tiny):
    """The model actor writes what ``run_units`` returns (numpy arrays, no pickle round trip in one
    process); it is the same as the packed table ``process_units`` ships."""
    from pipeline.infer.predictor import unpack

    model, config = tiny
    ims = images(3, seed=4)
    predictor = Predictor(model=model, config=config, model_id="m#sha256:2", batch_size=2)
    table = units_table([ims[0], None, ims[1], ims[2]])
    [unit] = predictor.run_units(table)
    packed = predictor.process_units(table)
    assert unit["model"] == "m#sha256:2" and unit["unit"] == "u.parquet" and "pixels" not in unit
    assert unit["errors"] == packed.column("errors")[0].as_py() == [None, "decode failed: x", None, None]
    assert unit["preds"][1] is None
    for got, shipped in zip(unit["preds"], packed.column("preds")[0].as_py()):
        if got is None:
            assert shipped is None
            continue
        assert all(isinstance(v, np.ndarray) for v in got.values())
        for key, value in unpack(shipped).items():
            np.testing.assert_array_equal(got[key], value)


def test_the_benchmarks_timing_hook_runs_in_the_model_actors_path(tiny, tmp_path):
    """benchmarks/infer.py times the first model batch by overriding the method the model actor
    (``SegmentAndWrite``) calls; hooking a method it no longer calls crashed the benchmark."""
    import importlib.util
    import pathlib

    from pipeline.infer.stages import SegmentAndWrite

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "infer.py"
    spec = importlib.util.spec_from_file_location("bench_infer_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model, config = tiny
    marker = str(tmp_path / "first-batch")
    actor = SegmentAndWrite(output_uri=str(tmp_path / "out"), category_ids=config.category_ids(),
                            predictor_factory=bench.timed_predictor(marker), model=model, config=config,
                            model_id="m#sha256:3")
    from pipeline.infer.stages import group

    meta = pa.concat_tables(actor(group(units_table(images(2, seed=5)))))
    assert meta.column("images").to_pylist() == [2] and (tmp_path / "out" / "u.parquet").exists()
    assert float(open(marker).read()) > 0


def test_read_model_config_builds_no_model(tiny, tmp_path, monkeypatch):
    """The driver reads sizes, categories and the digest without building the network."""
    import model.checkpoint as checkpoint
    from pipeline.infer.predictor import load_model, read_model_config

    net, config = tiny
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, net, config)
    _, _, model_id = load_model(path)

    def no_build(_config):
        raise AssertionError("a model was built")

    monkeypatch.setattr(checkpoint, "build_from_config", no_build)
    got, got_id = read_model_config(path)
    assert got_id == model_id and got_id.startswith(path + "#sha256:")
    assert got == config and (got.min_size, got.max_size) == (SIZE, 96) and got.category_ids() == [3, 9]


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
    from pipeline.distill.tta import model_scale

    model, config = tiny
    predictor = Predictor(model=model, config=config)
    assert (predictor.min_size, predictor.max_size) == (SIZE, 96)
    image = images(1)[0]
    with model_scale(predictor, 0.5):
        assert (predictor.min_size, predictor.max_size) == (32, 48)
        half = predictor.predict([image])[0]
    assert (predictor.min_size, predictor.max_size) == (SIZE, 96)
    assert half["masks"].shape[-2:] == image.shape[-2:]  # still in the input's frame


@pytest.mark.parametrize("shape,sizes", [((3, 64, 64), (64, 96)), ((3, 40, 72), (64, 96)), ((3, 97, 31), (64, 96)),
                                         ((3, 3000, 4000), (800, 1333)), ((3, 4000, 3000), (800, 1333)),
                                         ((3, 480, 640), (800, 1333)), ((3, 10, 2000), (800, 1333))])
def test_resize_for_model_is_torchvisions_eval_resize_bit_for_bit(shape, sizes):
    """Our resize (no torchvision import in the model stage's pre-processing) equals the one inside
    torchvision's GeneralizedRCNNTransform, which the detector applies in ``model(images)``."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform, _resize_image_and_masks

    from pipeline.infer.predictor import resize_for_model

    image = torch.rand(shape, generator=torch.Generator().manual_seed(shape[1] * shape[2]))
    expected, _ = _resize_image_and_masks(image, float(sizes[0]), float(sizes[1]))
    got = resize_for_model(image, *sizes)
    assert got.shape == expected.shape and torch.equal(got, expected)
    transform = GeneralizedRCNNTransform(sizes[0], sizes[1], [0.0] * 3, [1.0] * 3).eval()
    batch, _ = transform([image])
    assert tuple(batch.image_sizes[0]) == tuple(got.shape[-2:])


@pytest.mark.parametrize("shape,sizes", [((3, 64, 64), (64, 96)), ((3, 40, 72), (64, 96)), ((3, 97, 31), (64, 96)),
                                         ((3, 480, 640), (800, 1333)), ((3, 800, 1200), (800, 1333))])
def test_batched_preparation_equals_one_image_at_a_time(tiny, shape, sizes):
    """The model stage prepares consecutive images of one size as one [N,3,H,W] batch
    (``forward_uint8``): every value equals the image's own resize and ``prepare`` (normalize +
    torchvision's resize), bit for bit, whether the rule resizes it or keeps its size."""
    from pipeline.infer.predictor import resize_for_model, to_float

    model, config = tiny  # min_size 64, max_size 96
    predictor = Predictor(model=model, config=config)
    g = torch.Generator().manual_seed(shape[1] + shape[2])
    ims = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=g) for _ in range(3)]
    floats = torch.stack([to_float(im) for im in ims])
    for got, one in zip(resize_for_model(floats, *sizes).unbind(0), floats.unbind(0)):
        assert torch.equal(got, resize_for_model(one, *sizes))
    for got, im in zip(predictor.prepare(floats).unbind(0), ims):
        want = predictor.prepare(to_float(im))
        assert got.shape == want.shape and torch.equal(got, want)


def test_forward_uint8_prepares_runs_of_one_size_together(tiny, monkeypatch):
    """Mixed sizes: each run of consecutive same-size images is prepared once, as a batch of at most
    PREPARE_BATCH_PIXELS, and the model receives the images in their order, each as ``prepare``
    alone would make it."""
    from pipeline.infer import predictor as predictor_module
    from pipeline.infer.predictor import to_float

    model, config = tiny
    predictor = Predictor(model=model, config=config)
    g = torch.Generator().manual_seed(7)
    shapes = [(3, 64, 64), (3, 64, 64), (3, 40, 72), (3, 64, 64), (3, 40, 72), (3, 40, 72)]
    ims = [torch.randint(0, 256, s, dtype=torch.uint8, generator=g) for s in shapes]
    calls, seen = [], []
    real_prepare = predictor.prepare
    monkeypatch.setattr(predictor, "prepare", lambda x: calls.append(tuple(x.shape)) or real_prepare(x))
    monkeypatch.setattr(predictor, "forward_resized", lambda resized, sizes: seen.append((resized, sizes)) or [])
    predictor.forward_uint8(ims)
    assert [c[0] for c in calls] == [2, 1, 1, 2]
    calls.clear()
    monkeypatch.setattr(predictor_module, "PREPARE_BATCH_PIXELS", 2 * 64 * 64 - 1)  # large images: one at a time
    predictor.forward_uint8(ims)
    assert [c[0] for c in calls] == [1, 1, 1, 1, 2]
    resized, sizes = seen[0]
    assert sizes == [s[1:] for s in shapes]
    for im, got in zip(ims, resized):
        assert torch.equal(got, real_prepare(to_float(im)))
