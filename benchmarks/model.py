"""Mask R-CNN throughput: ours (model.ops poolers) vs torchvision's maskrcnn_resnet50_fpn, same weights and inputs.

Inference and training images/s, measured in one run with the two models interleaved round
by round (so machine load hits both alike); the ratio ours / torchvision is the result.

    python benchmarks/model.py                      # CPU: 2 threads, 320 px, batch 2
    python benchmarks/model.py --device cuda        # GPU: 800x1333, batch 8, bf16 autocast

Weights are random (seeded; no download). Training steps use lr=0 so both models keep the
same weights and therefore do the same work every step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from timing import alternating_rates  # noqa: E402  (benchmarks/timing.py)
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--variant", default="v1", choices=("v1", "v2"))
    p.add_argument("--height", type=int, help="image height (default 320 on CPU, 800 on GPU)")
    p.add_argument("--width", type=int, help="image width (default 320 on CPU, 1333 on GPU)")
    p.add_argument("--batch", type=int, help="images per step (default 2 on CPU, 8 on GPU)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), help="autocast dtype (default: none on CPU, bf16 on GPU)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per mode (median reported)")
    p.add_argument("--iters", type=int, default=2, help="steps per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    p.add_argument("--modes", default="infer,train", help="comma list of infer,train")
    return p.parse_args(argv)


def make_targets(batch, h, w, gen):
    targets = []
    for _ in range(batch):
        n = 4
        xy = torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.6, h * 0.6])
        wh = torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.3, h * 0.3]) + 16
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, 91, (n,), generator=gen), "masks": masks})
    return targets


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
    sizes = dict(min_size=min(h, w), max_size=max(h, w))

    torch.manual_seed(0)
    builder = maskrcnn_resnet50_fpn if args.variant == "v1" else maskrcnn_resnet50_fpn_v2
    reference = builder(weights=None, weights_backbone=None, num_classes=91, **sizes)
    ours = build_maskrcnn(variant=args.variant, num_classes=91, **sizes)
    ours.load_state_dict(reference.state_dict(), strict=True)
    models = {"torchvision": reference.to(device), "ours": ours.to(device)}
    if args.channels_last:
        for m in models.values():
            m.to(memory_format=torch.channels_last)

    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, h, w, generator=gen).to(device) for _ in range(batch)]
    targets = [{k: v.to(device) for k, v in t.items()} for t in make_targets(batch, h, w, gen)]
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.0) for name, m in models.items()}

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
            loss = sum(losses.values())
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    print(f"# Mask R-CNN R50-FPN {args.variant} | device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if gpu else f' ({args.threads} threads)'} | "
          f"{h}x{w} | batch {batch} | amp {amp} | channels_last {args.channels_last} | torch {torch.__version__}")
    print(f"{'mode':6} {'torchvision img/s':>18} {'ours img/s':>11} {'ours/tv':>8}")
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        rates = alternating_rates(models, step, sync, mode, warmup=args.warmup, rounds=args.rounds,
                                  iters=args.iters, batch=batch)
        tv, us = rates["torchvision"], rates["ours"]
        print(f"{mode:6} {tv:18.2f} {us:11.2f} {us / tv:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
