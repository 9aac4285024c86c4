"""Mask post-processing on a 12-MP photo: per-instance paste + RLE (``pipeline.infer.paste``) vs
torchvision's ``paste_masks_in_image`` + pycocotools ``encode`` (what ``pipeline.instances`` did).

Each side runs in its own child process on one torch thread, so the peak RSS printed is that
side's alone (``ru_maxrss`` of the child). The same 100 detections (28x28 probabilities, boxes
of 30-900 px spread over a 4000x3000 frame, as a busy street photo gives) go to both; the RLEs
are checked equal. Prints seconds, peak RSS and the ratio. Target: ours <= 1 s and <= 1 GB.

    python benchmarks/paste.py [--instances 100] [--width 4000] [--height 3000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _inputs(n: int, h: int, w: int):
    import torch

    g = torch.Generator().manual_seed(0)
    wh = torch.rand(n, 2, generator=g) * torch.tensor([870.0, 870.0]) + 30
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([float(w), float(h)]) - wh)
    # Blob-like probabilities (a model's masks are smooth): a bump per mask plus a little noise.
    grid = torch.linspace(-1, 1, 28)
    radius = (grid[None, :] ** 2 + grid[:, None] ** 2).sqrt()
    masks = (1.2 - radius)[None, None] * (0.7 + 0.3 * torch.rand(n, 1, 1, 1, generator=g))
    masks = (masks + 0.1 * torch.rand(n, 1, 28, 28, generator=g)).clamp(0, 1)
    return masks, torch.cat([xy, xy + wh], 1)


def _side(which: str, n: int, h: int, w: int, queue) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from pycocotools import mask as mask_utils
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from pipeline.infer.paste import encode_instance_masks

    masks, boxes = _inputs(n, h, w)
    encode_instance_masks(masks[:1], boxes[:1], (64, 64))  # imports and first calls out of the timing
    start = time.perf_counter()
    if which == "ours":
        counts, _ = encode_instance_masks(masks, boxes, (h, w))
    else:
        pasted = paste_masks_in_image(masks, boxes, (h, w))[:, 0] > 0.5  # [N,H,W], as Instances.from_output
        rles = mask_utils.encode(np.asfortranarray(pasted.numpy().transpose(1, 2, 0).astype(np.uint8)))
        counts = [r["counts"] for r in rles]
    seconds = time.perf_counter() - start
    queue.put((which, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, counts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = {}
    for which in ("ours", "torchvision"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_side, args=(which, args.instances, args.height, args.width, queue))
        proc.start()
        results[which] = queue.get()
        proc.join()
    ours, ref = results["ours"], results["torchvision"]
    if ours[3] != ref[3]:
        print("MISMATCH: the RLEs differ", file=sys.stderr)
        return 1
    print(f"uptime: {os.getloadavg()}  image {args.width}x{args.height}, {args.instances} instances, one thread")
    for name, seconds, rss, _ in (ours, ref):
        print(f"{name:12s} {seconds:7.2f} s   peak RSS {rss / 2**30:5.2f} GiB")
    print(f"ratio (torchvision time / ours): {ref[1] / ours[1]:.1f}x   peak RSS ratio: {ref[2] / ours[2]:.1f}x   "
          f"RLEs equal: yes   target ours <= 1 s: {'met' if ours[1] <= 1 else 'NOT met'}, "
          f"<= 1 GiB: {'met' if ours[2] <= 2**30 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
