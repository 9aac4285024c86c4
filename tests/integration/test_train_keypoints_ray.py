"""A keypoint & mask model trained with Ray Train on synthetic stick figures learns their keypoints.

The recipe is ``configs/keypoints-cpu.yaml`` (the demo's keypoint stage): ``maskray synth
--keypoints`` images (figures with 7 keypoints beside circles and squares) converted to shards,
2 Ray Train workers on CPU, scored at the end of training on held-out images by the workers'
evaluation hook (COCOeval OKS with the figures' sigmas, ``eval.kpt_oks_sigmas``).
"""

import logging
import time
from pathlib import Path

import pytest

import train_support  # noqa: F401  (sets the raylet's agent timeout for a loaded machine)

REPO = Path(__file__).resolve().parents[2]
SIZE = 96


def _dataset(root: Path, images: int, seed: int, first_id: int) -> str:
    from pipeline.data.convert import convert_coco
    from pipeline.data.synth import synthesize

    synthesize(str(root / "synth"), images=images, seed=seed, size=SIZE, num_categories=2, max_objects=3,
               keypoints=True, first_id=first_id, workers=2)
    convert_coco(str(root / "synth" / "annotations.json"), str(root / "synth" / "images"), str(root / "shards"),
                 runner="local", workers=2)
    return str(root / "shards")


@pytest.mark.slow
def test_keypoint_model_reaches_kp_ap50_on_held_out_figures(ray_local, tmp_path, caplog):
    from pipeline.data.synth import FIGURE_KEYPOINTS, FIGURE_OKS_SIGMAS
    from pipeline.evaluate import load_checkpoint_uri
    from pipeline.train import fit, load_config

    caplog.set_level(logging.INFO, logger="pipeline.train.engine")
    train = _dataset(tmp_path / "train", 600, seed=0, first_id=1)
    val = _dataset(tmp_path / "val", 100, seed=1, first_id=100001)
    config = load_config(str(REPO / "configs" / "keypoints-cpu.yaml"),
                         [f"data.train={train}", f"data.val={val}", f"storage_path={tmp_path / 'runs'}"])
    assert config.eval.kpt_oks_sigmas == FIGURE_OKS_SIGMAS
    start = time.perf_counter()
    result = fit(config)
    seconds = time.perf_counter() - start
    metrics = result.eval_metrics()
    kp, segm = metrics["keypoints"], metrics["segm"]
    print(f"\nkeypoints-cpu: {config.schedule.max_iters} iterations in {seconds:.0f} s (fit, Ray start included): "
          f"kp AP {kp['AP']:.3f} AP50 {kp['AP50']:.3f}, mask AP {segm['AP']:.3f} AP50 {segm['AP50']:.3f}")
    assert kp["AP50"] >= 0.6, metrics
    assert segm["AP50"] >= 0.1, metrics  # the joint model segments too (a loose floor: the target is keypoints)
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.train.engine"]
    assert any(" kp " in line for line in lines if line.startswith("iter ")), lines  # keypoint loss on the console
    assert any("keypoints AP" in line for line in lines if line.startswith("eval iter")), lines
    # the checkpoint rebuilds the keypoint model with the figure's names
    _, model_config, _ = load_checkpoint_uri(result.checkpoint_uri)
    assert model_config.num_keypoints == 7 and model_config.masks
    assert [c.get("keypoints") for c in model_config.categories if c.get("keypoints")] == [FIGURE_KEYPOINTS]
