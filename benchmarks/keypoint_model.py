"""Keypoint R-CNN: ours (model.ops poolers) vs torchvision's keypointrcnn_resnet50_fpn, same weights and inputs.

One Ray-free run (the keypoint step of benchmarks/gpu_check.sh):

1. agreement: torchvision's state dict loads into ``build_maskrcnn(masks=False, num_keypoints=17)``
   with strict=True; on the same images, in float32, the two give the same number of detections
   and their boxes, keypoints and keypoint scores are compared one to one (largest differences
   printed; the step fails when the detection counts differ or a matched box moves > 0.5 px);
2. throughput: inference and training images/s under ``--amp``, the two models interleaved round
   by round, ratio ours / torchvision; a non-finite keypoint loss fails the step.

    python benchmarks/keypoint_model.py                  # CPU: 2 threads, 320 px, batch 2
    python benchmarks/keypoint_model.py --device cuda    # GPU: 800x1333, batch 8, bf16 autocast

Weights are random (seeded, box and keypoint logits scaled so scores spread; no download).
Training steps use lr=0, so both models keep the same weights and do the same work every step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from timing import alternating_rates  # noqa: E402  (benchmarks/timing.py)
from torchvision.models.detection import keypointrcnn_resnet50_fpn  # noqa: E402

K = 17


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--height", type=int, help="image height (default 320 on CPU, 800 on GPU)")
    p.add_argument("--width", type=int, help="image width (default 320 on CPU, 1333 on GPU)")
    p.add_argument("--batch", type=int, help="images per step (default 2 on CPU, 8 on GPU)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), help="autocast dtype (default: none on CPU, bf16 on GPU)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per mode (median reported)")
    p.add_argument("--iters", type=int, default=2, help="steps per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    return p.parse_args(argv)


def make_targets(batch, h, w, gen):
    """Four boxes per image, each with K keypoints inside it (two thirds visible)."""
    targets = []
    for _ in range(batch):
        n = 4
        xy = torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.6, h * 0.6])
        wh = torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.3, h * 0.3]) + 16
        points = xy[:, None] + torch.rand(n, K, 2, generator=gen) * wh[:, None]
        v = (torch.rand(n, K, 1, generator=gen) < 2 / 3).float() * 2
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.ones(n, dtype=torch.int64),
                        "keypoints": torch.cat([points, v], 2)})
    return targets


def spread_scores(model, images):
    """Scale the box classifier and keypoint logits of a random model so detection scores and
    heatmap maxima are not near-ties (which float noise would otherwise reorder)."""
    heads = model.roi_heads
    seen = {}
    for key, layer, std in (("cls", heads.box_predictor.cls_score, 3.0),
                            ("kp", heads.keypoint_predictor.kps_score_lowres, 9.0)):
        hook = layer.register_forward_hook(lambda m, i, o, key=key: seen.__setitem__(key, o.detach()))
        with torch.inference_mode():
            model(images[:1])
        hook.remove()
        scale = std / float(seen[key].float().std().clamp_min(1e-12))
        with torch.no_grad():
            layer.weight.mul_(scale)
            layer.bias.mul_(scale)


def agreement(expected, got):
    """(detections, max box diff px, max keypoint diff px, max keypoint score diff, moved keypoints) over
    detections matched one to one by label and nearest box."""
    box = kp = score = 0.0
    moved = 0
    for e, g in zip(expected, got):
        if len(e["boxes"]) != len(g["boxes"]):
            raise SystemExit(f"detections differ: torchvision {len(e['boxes'])}, ours {len(g['boxes'])}")
        taken = set()
        for i in range(len(e["boxes"])):
            d = (g["boxes"] - e["boxes"][i]).abs().amax(dim=1)
            d[g["labels"] != e["labels"][i]] = float("inf")
            for j in taken:
                d[j] = float("inf")
            j = int(d.argmin())
            taken.add(j)
            box = max(box, float(d[j]))
            step = (g["keypoints"][j, :, :2] - e["keypoints"][i, :, :2]).abs().amax(dim=1)
            moved += int((step > 0.5).sum())  # an argmax near-tie decided the other way
            kp = max(kp, float(step[step <= 0.5].max()) if (step <= 0.5).any() else 0.0)
            score = max(score, float((g["keypoints_scores"][j] - e["keypoints_scores"][i]).abs().max()))
    return sum(len(e["boxes"]) for e in expected), box, kp, score, moved


def main(argv=None) -> int:
    args = parse_args(argv)
    from model import build_maskrcnn

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    h = args.height or (800 if gpu else 320)
    w = args.width or (1333 if gpu else 320)
    batch = args.batch or (8 if gpu else 2)
    amp = args.amp or ("bf16" if gpu else "none")
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if not gpu:
        torch.set_num_threads(args.threads)
    else:  # agreement in true float32 (TF32 convs differ from the CPU's by ~1e-3)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    sizes = dict(min_size=min(h, w), max_size=max(h, w))

    torch.manual_seed(0)
    reference = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2, num_keypoints=K,
                                          **sizes).eval()
    gen = torch.Generator().manual_seed(1)
    images_cpu = [torch.rand(3, h, w, generator=gen) for _ in range(batch)]
    spread_scores(reference, images_cpu)
    ours = build_maskrcnn(num_classes=2, masks=False, num_keypoints=K, **sizes).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    models = {"torchvision": reference.to(device), "ours": ours.to(device)}
    images = [im.to(device) for im in images_cpu]
    targets = [{k: v.to(device) for k, v in t.items()} for t in make_targets(batch, h, w, gen)]
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.0) for name, m in models.items()}

    print(f"# Keypoint R-CNN R50-FPN ({K} keypoints) | device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if gpu else f' ({args.threads} threads)'} | "
          f"{h}x{w} | batch {batch} | amp {amp} | torch {torch.__version__}")
    with torch.inference_mode():
        expected, got = models["torchvision"](images), models["ours"](images)
    n, box, kp, score, moved = agreement([{k: v.cpu() for k, v in o.items()} for o in expected],
                                         [{k: v.cpu() for k, v in o.items()} for o in got])
    print(f"agreement (float32): {n} detections, max |box| {box:.2e} px, max |keypoint| {kp:.2e} px, "
          f"max |keypoint score| {score:.2e}, {moved} of {n * K} keypoints on another heatmap maximum")
    if box > 0.5:
        raise SystemExit(f"boxes differ by {box:.3f} px")

    def sync():
        if gpu:
            torch.cuda.synchronize(device)

    def step(name, mode):
        model = models[name]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if mode == "infer":
                with torch.inference_mode():
                    model(images)
                return
            losses = model(images, targets)
            if not torch.isfinite(losses["loss_keypoint"]):
                raise SystemExit(f"{name}: keypoint loss {float(losses['loss_keypoint'])}")
            loss = sum(losses.values())
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    print(f"{'mode':9} {'torchvision img/s':>18} {'ours img/s':>11} {'ours/tv':>8}")
    for mode in ("infer", "train"):
        rates = alternating_rates(models, step, sync, mode, warmup=args.warmup, rounds=args.rounds,
                                  iters=args.iters, batch=batch)
        tv, us = rates["torchvision"], rates["ours"]
        print(f"kp {mode:6} {tv:18.2f} {us:11.2f} {us / tv:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
