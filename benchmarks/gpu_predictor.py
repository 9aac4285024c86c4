"""Predictor images/s: ``pipeline.infer.predictor.Predictor.forward_uint8`` on uint8 images (what the
Ray Data model stage ships), one device, no Ray. Used by benchmarks/gpu_check.sh.

    python benchmarks/gpu_predictor.py [--device cuda] [--size 800] [--batch 8] [--rounds 3]

Random-weight R50-FPN Mask R-CNN (no download); prints one line ``predictor images/s: X``.
Exits 0 with a ``skipped:`` line when the Predictor cannot be imported here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=800, help="image side, px (square uint8 images)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backbone", default="resnet50")
    args = p.parse_args(argv)
    try:
        from pipeline.infer.predictor import Predictor
    except Exception as exc:  # noqa: BLE001 - any import failure is reported, not fatal
        print(f"skipped: pipeline.infer.predictor.Predictor is not importable here ({type(exc).__name__}: {exc})")
        return 0
    from model import build_maskrcnn

    torch.manual_seed(0)
    model = build_maskrcnn(backbone=args.backbone, num_classes=91, min_size=args.size, max_size=args.size)
    predictor = Predictor(model=model, device=args.device, score_threshold=0.05)
    gen = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, args.size, args.size), generator=gen, dtype=torch.uint8)
              for _ in range(args.batch)]

    def sync():
        if predictor.device.type == "cuda":
            torch.cuda.synchronize(predictor.device)

    predictor.forward_uint8(images)  # warm-up
    sync()
    rates = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        predictor.forward_uint8(images)
        sync()
        rates.append(args.batch / (time.perf_counter() - t0))
    print(f"# Predictor.forward_uint8 | device {predictor.device} | amp {predictor.amp} | {args.backbone} | "
          f"{args.size}x{args.size} uint8 | batch {args.batch} | median of {args.rounds}")
    print(f"predictor images/s: {statistics.median(rates):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
