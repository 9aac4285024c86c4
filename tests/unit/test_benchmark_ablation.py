"""benchmarks/ablation.py (Mask R-CNN's Table 2 on our data): the variants' configs, the shared data
order, the noise-aware verdicts, and a whole run at toy size."""

import importlib.util
import json
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ablation_under_test", ROOT / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny_data(bench, tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation-data")
    train = bench.make_dataset(str(root / "train"), images=4, seed=0, size=64)
    return train


def _record(variant, seed, ap):
    return {"variant": variant, "seed": seed, "metrics": {"segm": {"AP": ap, "AP50": ap, "AP75": ap},
                                                          "bbox": {"AP": ap}}}


def test_each_variant_builds_the_demo_model_with_its_own_switches(bench, tiny_data):
    from model import mask_heads
    from model.checkpoint import build_from_config
    from pipeline.train.engine import plan_run

    setup = bench.Setup(images=4, val_images=1, size=64, iters=20, batch=2, threads=1)
    base = bench.train_config(setup, tiny_data, bench.BASELINE, 0)
    assert base.model.options["anchor_sizes"] == [[8], [16], [32], [64], [128]]
    assert base.schedule.max_iters == 20 and base.schedule.steps == [16] and base.lr == pytest.approx(0.01)
    categories = plan_run(base).categories
    for variant, switches in bench.VARIANTS.items():
        config = bench.train_config(setup, tiny_data, variant, 3)
        assert config.seed == 3
        want = base.model.model_dict()
        want.update(switches)
        assert config.model.model_dict() == want, variant
        if variant in ("roialign", "roialign_v2", "roiwarp"):
            continue  # the pooler switch is built and checked on roipool: four model builds keep this test short
        heads = build_from_config(config.model.model_config(categories)).roi_heads
        pooler = switches.get("pooler", "roialign")
        assert heads.box_roi_pool.mode == pooler and heads.mask_roi_pool.mode == pooler, variant
        assert getattr(heads, "mask_loss", "sigmoid") == switches.get("mask_loss", "sigmoid"), variant
        predictor = heads.mask_predictor
        masks = predictor.num_masks if hasattr(predictor, "num_masks") else predictor.mask_fcn_logits.out_channels
        assert masks == (1 if switches.get("class_agnostic_mask") else len(categories) + 1), variant
        assert isinstance(heads.mask_head, mask_heads.MaskMLPHead) == (switches.get("mask_head") == "mlp"), variant


def test_every_variant_sees_the_same_batches_for_a_seed(bench, tiny_data):
    from pipeline.data.format import read_rows
    from pipeline.train.engine import plan_run

    rows = list(read_rows(tiny_data))
    setup = bench.Setup(images=4, val_images=1, size=64, iters=5, batch=2, threads=1)

    def first(variant, seed, n=3):
        config = bench.train_config(setup, tiny_data, variant, seed)
        stream = bench.batches(rows, config, plan_run(config), seed)
        return [next(stream) for _ in range(n)]  # 6 images: into the second epoch of 4

    def same(a, b):
        for (ims_a, tg_a), (ims_b, tg_b) in zip(a, b, strict=True):
            if not all(torch.equal(x, y) for x, y in zip(ims_a, ims_b, strict=True)):
                return False
            for ta, tb in zip(tg_a, tg_b, strict=True):
                if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta):
                    return False
        return True

    baseline = first("roialign", 0)
    assert same(baseline, first("roipool", 0))
    assert same(baseline, first("mlp", 0))
    assert not same(baseline, first("roialign", 1))


def test_verdicts_compare_differences_with_the_baselines_spread(bench):
    records = [_record("roialign", 0, 0.30), _record("roialign", 1, 0.28),  # spread 2 points
               _record("roiwarp", 0, 0.25), _record("roipool", 0, 0.26),
               _record("softmax", 0, 0.35), _record("mlp", 0, 0.285)]
    assert bench.noise(records) == pytest.approx(2.0)
    line = bench.verdict(records, ["roialign", "roiwarp", "roipool"], bench.noise(records))
    assert "roialign - roiwarp = +4.0 (holds)" in line  # baseline mean 29.0
    assert "roiwarp - roipool = -1.0 (within noise)" in line
    assert bench.verdict(records, ["roialign", "softmax"], 2.0) == "roialign - softmax = -6.0 (reversed)"
    assert bench.verdict(records, ["roialign", "mlp"], 2.0) == "roialign - mlp = +0.5 (within noise)"
    assert bench.verdict(records, ["roialign", "agnostic"], 2.0).startswith("not measured (agnostic")
    assert "(holds, no noise estimate)" in bench.verdict(records[:1] + records[2:3], ["roialign", "roiwarp"], None)

    tables = bench.format_tables(records)
    assert "| RoIPool | 26.9 | 48.8 | 26.4 | 26.0 | 26.0 | 26.0 | 26.0 |" in tables
    assert "| RoIAlign | 30.3 | 51.2 | 31.5 | 29.0 ± 1.0 |" in tables
    assert "| softmax (over classes) | 24.8 |" in tables and "| MLP (fc, fc, fc) | 31.5 |" in tables


def test_a_whole_run_at_toy_size(bench, tmp_path, capsys):
    """RoIPool trained as the mask model and as the keypoint & mask model, evaluated, tabulated."""
    out = tmp_path / "ablation.json"
    result = bench.main(["--variants", "roipool", "--keypoints", "--images", "4", "--val-images", "4", "--size", "64",
                         "--iters", "2", "--batch", "2", "--threads", "1", "--data-dir", str(tmp_path / "data"),
                         "--out", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [(r["variant"], r["task"], r["seed"], r["iters"]) for r in result["runs"]] == [
        ("roipool", "masks", 0, 2), ("roipool", "keypoints", 0, 2)]
    masks, keypoints = result["runs"]
    assert set(masks["metrics"]) == {"bbox", "segm"} and set(keypoints["metrics"]) == {"bbox", "segm", "keypoints"}
    for record in result["runs"]:
        for kind in record["metrics"].values():
            assert all(value is None or 0.0 <= value <= 1.0 for value in kind.values())
        assert record["train_s"] > 0 and record["final_loss"] > 0
    assert "roipool      seed 0  mask AP " in printed and "roipool      (kp model) seed 0  kp AP " in printed
    assert "| RoIWarp | 27.2 | 49.2 | 27.1 | – | – | – | – | – | not run (--keypoints) |" in printed
    kp_ap = 100 * keypoints["metrics"]["keypoints"]["AP"]
    assert f"| RoIPool | 26.9 | 48.8 | 26.4 | {100 * masks['metrics']['segm']['AP']:.1f} |" in printed
    assert printed.split("| RoIPool |")[1].split("\n")[0].endswith(f"| 59.8 | {kp_ap:.1f} |")


def test_tables_from_saved_runs_merge_files(bench, tmp_path, capsys):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"runs": [_record("roialign", 0, 0.30), _record("roipool", 0, 0.20)]}))
    second.write_text(json.dumps({"runs": [_record("roialign", 1, 0.26)]}))
    result = bench.main(["--tables-from", str(first), str(second)])
    printed = capsys.readouterr().out
    assert len(result["runs"]) == 3 and result["noise_mask_AP"] == pytest.approx(4.0)
    assert "| RoIAlign | 30.3 | 51.2 | 31.5 | 28.0 ± 2.0 |" in printed
    assert "roialign - roiwarp" not in printed and "not measured (roiwarp not run)" in printed
